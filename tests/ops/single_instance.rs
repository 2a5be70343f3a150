//! One daemon per SQLite file. SQLite has one writer; two daemons on the
//! same file would not double-charge (leases and idempotency keys see to
//! that) but would fight over the write lock and lease each other's work,
//! and an operator who started a second one by mistake would not know.
//! The second one must refuse to start, saying why, and the lock must go
//! with the first so a restart is never blocked by a stale lock.

use std::time::Duration;

use crate::{Env, T1};

#[test]
fn a_second_daemon_on_the_same_sqlite_file_refuses_to_start_with_one_line() {
    let env = Env::new("");
    let mut first = env.spawn(T1, &[]);
    first.wait_note("READY=1", Duration::from_secs(30));

    let mut second = env.spawn(T1, &[]);
    let exit = second.wait_exit(Duration::from_secs(30));

    assert_eq!(exit.code(), Some(1), "log:\n{}", second.log());
    let log = second.log();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("already running"), "{log}");
    assert!(lines[0].contains(&format!("pid {}", first.pid())), "{log}");
    assert!(
        lines[0].contains(&env.db_path().display().to_string()),
        "{log}"
    );
    assert!(
        !second.notes().iter().any(|(_, n)| n.contains("READY=1")),
        "never ready"
    );

    first.signal(libc::SIGTERM);
    assert_eq!(first.wait_exit(Duration::from_secs(30)).code(), Some(0));
    let mut third = env.spawn(T1, &[]);
    third.wait_note("READY=1", Duration::from_secs(30));
    third.signal(libc::SIGTERM);
    assert_eq!(third.wait_exit(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn one_shot_commands_still_work_while_the_daemon_runs() {
    let env = Env::new("");
    let mut daemon = env.spawn(T1, &[]);
    daemon.wait_note("READY=1", Duration::from_secs(30));

    let out = env.cli(T1, &["subscription", "list", "--json"]);

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).code(), Some(0));
}
