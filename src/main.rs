//! The `renewd` binary: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of the system allocator: glibc's malloc and free were
/// about 14% of a simulated year's samples (mail bodies, invoice PDFs and
/// rows freed on other threads than the ones that made them), and the year
/// ran about 10% faster with mimalloc (renewd bench, "time travel").
/// Transparent huge pages stay off (see `huge_pages_off`): with them, the
/// peak of a sweep over 100,000 renewals went from 34 to 99 MiB.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process. mimalloc reserves
/// large aligned regions; where the kernel backs them with 2 MiB pages
/// (`madvise`, which the `no_thp` build leaves out, or a host set to
/// `always`), a sweep's resident memory triples.
fn huge_pages_off() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory
    // of this process; a kernel without it returns an error, which changes
    // nothing.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

fn main() -> ExitCode {
    huge_pages_off();
    // SAFETY: nothing has started SQLite, and no other thread exists yet.
    let sqlite_on_our_allocator = unsafe { renewd::store::sqlite::memory::configure() };
    // Every CLI test runs a debug build of this binary: one that started
    // SQLite before this point would fail them all, not lose its speed
    // silently.
    debug_assert!(
        sqlite_on_our_allocator,
        "SQLite started before main configured its memory"
    );
    let cli = match renewd::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            // clap's message spans several lines; keep the first, which names the problem.
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("renewd: {first} (see renewd --help)");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("renewd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(renewd::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            for line in f.message.lines() {
                eprintln!("renewd: {line}");
            }
            ExitCode::from(u8::try_from(f.code).unwrap_or(1))
        }
    }
}
