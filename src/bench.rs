//! `renewd bench`: how fast renewd renews, how its cost grows with the
//! table, and how close it comes to the database's own limit (issue 8).
//!
//! Every line is measured in this run beside a baseline measured in the same
//! run, and shown with its target. The bench builds its own data in a
//! temporary directory (database, sandbox ledger, mail files) that it removes
//! at the end; large tables are seeded with bulk SQL straight into the
//! database, never through the engine, so seeding stays fast and is not
//! measured. Sweeps whose peak memory matters run in a child process (this
//! binary again, with a hidden flag), so the parent's own seeding does not
//! count towards it.
//!
//! It never reads the system time for business logic: every engine runs on a
//! `MockClock` set to fixed instants; `std::time::Instant` only measures
//! elapsed wall time. It asserts nothing about timings (`.ci/run` runs a
//! small size as a smoke test); targets are reported, not enforced.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, ToSpan};
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection};

use crate::cli::{CliResult, Failure};
use crate::clock::{MockClock, SharedClock};
use crate::config::Config;
use crate::domain::term;
use crate::engine::{Engine, PhaseTimes, SweepSummary};

/// The size of the published table (docs/benchmarks.md).
pub const FULL_SIZE: u64 = 100_000;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Subscriptions in the largest sweeps. 100000 is the full table; a
    /// smaller size scales every line down (renewal sweeps of size/10 and
    /// size, tables of size/10, size and 10 x size) for smoke runs.
    #[arg(long, default_value_t = FULL_SIZE, value_name = "N")]
    pub size: u64,
    /// Print the report as one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Where the JSON report is written as well.
    #[arg(long, value_name = "FILE", default_value = "renewd-bench.json")]
    pub out: PathBuf,
    /// A PostgreSQL server (postgres://...) to run the table on instead of a
    /// temporary SQLite file; a temporary database is created on it.
    #[arg(long, env = "RENEWD_BENCH_DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
    /// Gateway calls in flight at once (renewal.concurrency) in the
    /// throughput lines.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub concurrency: usize,
    /// Sandbox latency of the gateway-bound line, in milliseconds.
    #[arg(long, default_value_t = 50, value_name = "MS")]
    pub latency_ms: u64,
    /// Where the temporary data goes (a fresh directory inside DIR, removed
    /// at the end); default: $TMPDIR or /tmp.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Internal: run one measured sweep over the database in STATE_DIR at
    /// `--now` and print its figures as JSON (the parent bench reads them).
    #[arg(long, hide = true, value_name = "STATE_DIR")]
    pub child_sweep: Option<PathBuf>,
    /// Only these lines (comma-separated: renewal, gateway, empty, year,
    /// year-scattered), e.g. to profile one; the raw limit is always
    /// measured.
    #[arg(long, value_delimiter = ',', value_name = "LINES")]
    pub only: Vec<Section>,
}

/// The lines `--only` can pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// Renewal throughput and peak memory (sandbox at 0 ms).
    Renewal,
    /// Gateway-bound throughput (sandbox at --latency-ms).
    Gateway,
    /// Empty-sweep cost against table size.
    Empty,
    /// A simulated year of daily sweeps (ids in purchase order).
    Year,
    /// The same year with the renewal days scattered over the ids: the
    /// worst case for locality, measured for reference.
    YearScattered,
}

/// Runs the bench (or, with the hidden flag, one child sweep).
pub async fn run(args: BenchArgs, now: Option<Timestamp>) -> CliResult {
    if let Some(dir) = &args.child_sweep {
        let now = now.ok_or_else(|| Failure::usage("bench --child-sweep needs --now"))?;
        let figures = child_sweep(dir, &args, now).await?;
        return crate::cli::print_json(&figures);
    }
    if args.size < 10 {
        return Err(Failure::usage("--size must be at least 10"));
    }
    if args.concurrency == 0 {
        return Err(Failure::usage("--concurrency must be at least 1"));
    }
    let report = run_all(&args).await?;
    let text = serde_json::to_string_pretty(&report).map_err(anyhow::Error::from)?;
    std::fs::write(&args.out, format!("{text}\n"))
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    if args.json {
        println!("{text}");
    } else {
        print!("{}", report.table());
        println!("JSON written to {}", args.out.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The report

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub size: u64,
    pub backend: String,
    pub concurrency: usize,
    pub latency_ms: u64,
    pub machine: Machine,
    /// One row per figure, as printed.
    pub lines: Vec<Line>,
    pub raw_limit: RawLimit,
    /// The minimum durable transactions one renewal needs (see `MIN_TX`).
    pub min_tx_per_renewal: u32,
    pub renewal_throughput: Vec<SweepFigures>,
    pub gateway_bound: Option<SweepFigures>,
    pub empty_sweep: Vec<EmptySweep>,
    pub time_travel: Option<TimeTravel>,
    /// The same year over ids scattered across the renewal days (no target).
    pub time_travel_scattered: Option<TimeTravel>,
    pub wall_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub name: String,
    pub measured: String,
    pub baseline: String,
    pub target: String,
    /// Whether the target is met; `None` at smoke sizes, where targets that
    /// speak of full-size tables do not apply.
    pub met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub mem_total_mib: u64,
    /// /proc/loadavg (1, 5, 15 minutes) when the bench started and ended:
    /// figures taken on a busy machine say so here.
    pub load_at_start: String,
    pub load_at_end: String,
    /// Where the bench's data lived.
    pub data_dir: String,
    /// Creating one small file (write, then rename) there, in microseconds:
    /// every renewal creates three (invoice HTML and PDF, the receipt).
    pub file_create_us: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RawLimit {
    pub transactions: u64,
    pub seconds: f64,
    pub per_second: f64,
}

/// What one measured sweep did (printed by the child process).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepFigures {
    pub due: u64,
    pub latency_ms: u64,
    pub concurrency: usize,
    /// The renewal phase of the sweep: claim, charge, invoice, outbox.
    pub seconds: f64,
    pub renewals_per_second: f64,
    /// The whole sweep, mail delivery of the receipts included.
    pub sweep_seconds: f64,
    pub summary: Counts,
    /// Resident memory of the child once its engine was built, before the sweep.
    pub rss_before_kib: u64,
    /// Peak resident memory of the child (VmHWM) after the sweep.
    pub peak_rss_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EmptySweep {
    pub subscriptions: u64,
    /// Median of several sweeps that find nothing due.
    pub median_ms: f64,
    pub runs: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimeTravel {
    pub subscriptions: u64,
    /// How the ids relate to the renewal days (see `Layout`).
    pub layout: Layout,
    pub days: u32,
    pub seconds: f64,
    pub totals: Counts,
    /// Seconds of the year spent in each phase of the sweeps.
    pub phases: YearPhases,
    /// CPU seconds the process used during the year, in user space and in
    /// the kernel (`getrusage`): the target's 60 s on 2 cores allow 120.
    #[serde(default)]
    pub cpu_user_seconds: f64,
    #[serde(default)]
    pub cpu_system_seconds: f64,
    /// Bytes the process wrote during the year through write calls
    /// (`wchar` of /proc/self/io: the database, its WAL, mail and invoice
    /// files), and those sent on to storage (`write_bytes`; none on tmpfs).
    #[serde(default)]
    pub bytes_written: u64,
    #[serde(default)]
    pub bytes_to_storage: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct YearPhases {
    pub renewals: f64,
    pub expiry: f64,
    pub reminders: f64,
    pub notices: f64,
    pub mail: f64,
}

/// Durable transactions one renewal cannot do without: the attempt row (with
/// its idempotency key) committed before the gateway is called, and the
/// outcome (term, invoice, outbox mail, events) committed after it
/// (DESIGN.md, "How a renewal stays safe", 3). The claim is shared by a
/// whole batch and the processor's own ledger is the processor's, so neither
/// is counted; mail delivery happens later and is not part of the minimum.
pub const MIN_TX: u32 = 2;

const TARGET_THROUGHPUT_RATIO: f64 = 0.5;
const TARGET_GATEWAY_RATIO: f64 = 0.9;
const TARGET_FLAT_RATIO: f64 = 2.0;
const TARGET_PEAK_MIB: f64 = 64.0;
const TARGET_YEAR_SECONDS: f64 = 60.0;
/// The cores the year's target is set on.
const TARGET_YEAR_CORES: f64 = 2.0;

impl Report {
    /// The human table: one row per line, each with its baseline and target.
    pub fn table(&self) -> String {
        let headers = ["line", "measured", "baseline (same run)", "target", "met"];
        let rows: Vec<[String; 5]> = self
            .lines
            .iter()
            .map(|l| {
                [
                    l.name.clone(),
                    l.measured.clone(),
                    l.baseline.clone(),
                    l.target.clone(),
                    match l.met {
                        Some(true) => "yes".into(),
                        Some(false) => "NO".into(),
                        None if l.target.starts_with('-') => "-".into(),
                        None => "n/a (smoke size)".into(),
                    },
                ]
            })
            .collect();
        let mut widths = headers.map(str::len);
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r.iter()) {
                *w = (*w).max(c.chars().count());
            }
        }
        let fmt_row = |cells: &[String]| {
            let mut s = String::from("|");
            for (c, w) in cells.iter().zip(widths.iter()) {
                s.push_str(&format!(" {c:<w$} |"));
            }
            s.push('\n');
            s
        };
        let mut out = format!(
            "renewd bench: size {}, backend {}, concurrency {}, {} ({} cores, {} MiB), load {} -> {}\n\
             data in {} (creating a file there: {:.0} us)\n\n",
            self.size,
            self.backend,
            self.concurrency,
            self.machine.cpu_model,
            self.machine.cores,
            self.machine.mem_total_mib,
            self.machine.load_at_start,
            self.machine.load_at_end,
            self.machine.data_dir,
            self.machine.file_create_us
        );
        out.push_str(&fmt_row(&headers.map(String::from)));
        let sep: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        out.push_str(&fmt_row(&sep));
        for r in &rows {
            out.push_str(&fmt_row(r));
        }
        out.push_str(&format!(
            "\nwall time of the whole bench: {:.0} s\n",
            self.wall_seconds
        ));
        out
    }
}

// ---------------------------------------------------------------------------
// Orchestration

/// The sizes of every line, scaled from `--size`.
#[derive(Debug, Clone)]
struct Plan {
    renewal_sizes: Vec<u64>,
    gateway_size: u64,
    table_sizes: Vec<u64>,
    year_size: u64,
    raw_duration: Duration,
    empty_runs: usize,
    full: bool,
}

impl Plan {
    fn for_size(size: u64) -> Plan {
        Plan {
            renewal_sizes: vec![size / 10, size],
            // Issue 4's figure: 10,000 due renewals at full size.
            gateway_size: size / 10,
            table_sizes: vec![size / 10, size, size * 10],
            year_size: size,
            raw_duration: Duration::from_secs((size / 20_000).clamp(1, 5)),
            empty_runs: if size >= FULL_SIZE { 7 } else { 3 },
            full: size >= FULL_SIZE,
        }
    }
}

async fn run_all(args: &BenchArgs) -> anyhow::Result<Report> {
    let started = Instant::now();
    let plan = Plan::for_size(args.size);
    let load_at_start = loadavg();
    let backend = Backend::connect(args).await?;
    let work = WorkDir::create(args.dir.clone().unwrap_or_else(std::env::temp_dir))?;
    let wanted = |s: Section| args.only.is_empty() || args.only.contains(&s);

    let file_create_us = file_create_cost(&work.sub("files")?)?;
    eprintln!("bench: raw limit ...");
    let raw = backend
        .raw_limit(&work.sub("raw")?, plan.raw_duration)
        .await?;

    let mut renewal_throughput = Vec::new();
    let renewal_sizes = if wanted(Section::Renewal) {
        plan.renewal_sizes.clone()
    } else {
        Vec::new()
    };
    for &n in &renewal_sizes {
        eprintln!("bench: renewal throughput over {n} due renewals ...");
        let line = format!("renew_{n}");
        let dir = work.sub(&line)?;
        let setup = Setup::new(&backend, &dir, &line, 0, args.concurrency).await?;
        seed_due(&setup, n).await?;
        renewal_throughput.push(spawn_child_sweep(&setup, DUE_NOW).await?);
        setup.cleanup().await;
    }

    let mut gateway_bound = None;
    if wanted(Section::Gateway) {
        eprintln!("bench: gateway-bound throughput ...");
        let dir = work.sub("gateway")?;
        let setup =
            Setup::new(&backend, &dir, "gateway", args.latency_ms, args.concurrency).await?;
        seed_due(&setup, plan.gateway_size).await?;
        gateway_bound = Some(spawn_child_sweep(&setup, DUE_NOW).await?);
        setup.cleanup().await;
    }

    let mut empty_sweep = Vec::new();
    if wanted(Section::Empty) {
        eprintln!("bench: empty sweeps ...");
        let dir = work.sub("empty")?;
        let setup = Setup::new(&backend, &dir, "empty", 0, args.concurrency).await?;
        empty_sweep = empty_sweeps(&setup, &plan).await?;
        setup.cleanup().await;
    }

    let mut year = None;
    let mut year_scattered = None;
    for (section, layout, name, slot) in [
        (Section::Year, Layout::Purchase, "year", &mut year),
        (
            Section::YearScattered,
            Layout::Scattered,
            "year_scattered",
            &mut year_scattered,
        ),
    ] {
        if !wanted(section) {
            continue;
        }
        eprintln!(
            "bench: a simulated year over {} subscriptions ({}) ...",
            plan.year_size,
            layout.describe()
        );
        let dir = work.sub(name)?;
        let setup = Setup::new(&backend, &dir, name, 0, args.concurrency).await?;
        *slot = Some(time_travel(&setup, plan.year_size, layout).await?);
        setup.cleanup().await;
    }

    let machine = Machine {
        cpu_model: cpu_model(),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        mem_total_mib: meminfo_kib("MemTotal:") / 1024,
        load_at_start,
        load_at_end: loadavg(),
        data_dir: work.root.display().to_string(),
        file_create_us,
    };
    let mut report = Report {
        size: args.size,
        backend: backend.name(),
        concurrency: args.concurrency,
        latency_ms: args.latency_ms,
        machine,
        lines: Vec::new(),
        raw_limit: raw,
        min_tx_per_renewal: MIN_TX,
        renewal_throughput,
        gateway_bound,
        empty_sweep,
        time_travel: year,
        time_travel_scattered: year_scattered,
        wall_seconds: 0.0,
    };
    report.lines = lines(&report, &plan);
    report.wall_seconds = started.elapsed().as_secs_f64();
    backend.drop_databases().await;
    drop(work);
    Ok(report)
}

fn lines(r: &Report, plan: &Plan) -> Vec<Line> {
    let judge = |ok: bool| plan.full.then_some(ok);
    let raw = r.raw_limit.per_second;
    let mut out = vec![Line {
        name: "raw limit: durable write tx/s (one client, one-row UPDATE)".into(),
        measured: format!("{raw:.0} tx/s"),
        baseline: format!(
            "{} tx in {:.1} s",
            r.raw_limit.transactions, r.raw_limit.seconds
        ),
        target: "- (the baseline)".into(),
        met: None,
    }];
    let per_renewal_limit = raw / f64::from(MIN_TX);
    for f in &r.renewal_throughput {
        let ratio = f.renewals_per_second / per_renewal_limit;
        out.push(Line {
            name: format!("renewal throughput: {} due, sandbox 0 ms", f.due),
            measured: format!(
                "{:.0} renewals/s ({} in {:.1} s; whole sweep with mail {:.1} s{})",
                f.renewals_per_second,
                f.summary.renewed,
                f.seconds,
                f.sweep_seconds,
                errors_note(&f.summary)
            ),
            baseline: format!("raw / {MIN_TX} tx = {per_renewal_limit:.0}/s; ratio {ratio:.2}"),
            target: format!("ratio >= {TARGET_THROUGHPUT_RATIO}"),
            met: judge(ratio >= TARGET_THROUGHPUT_RATIO),
        });
    }
    if let Some(g) = &r.gateway_bound {
        let ideal = g.concurrency as f64 / (g.latency_ms.max(1) as f64 / 1000.0);
        let ratio = g.renewals_per_second / ideal;
        out.push(Line {
            name: format!(
                "gateway-bound: {} due, sandbox {} ms, concurrency {}",
                g.due, g.latency_ms, g.concurrency
            ),
            measured: format!(
                "{:.0} renewals/s ({:.1} s{})",
                g.renewals_per_second,
                g.seconds,
                errors_note(&g.summary)
            ),
            baseline: format!(
                "ideal {} / {} ms = {ideal:.0}/s; ratio {ratio:.2}",
                g.concurrency, g.latency_ms
            ),
            target: format!("ratio >= {TARGET_GATEWAY_RATIO}"),
            met: judge(ratio >= TARGET_GATEWAY_RATIO),
        });
    }
    if let Some(base) = r.empty_sweep.first() {
        for e in &r.empty_sweep {
            let ratio = e.median_ms / base.median_ms.max(f64::EPSILON);
            let last = std::ptr::eq(e, r.empty_sweep.last().unwrap_or(base));
            out.push(Line {
                name: format!(
                    "empty sweep: {} subscriptions, nothing due",
                    e.subscriptions
                ),
                measured: format!("{:.2} ms (median of {})", e.median_ms, e.runs.len()),
                baseline: format!(
                    "{:.2} ms at {}; x{ratio:.2}",
                    base.median_ms, base.subscriptions
                ),
                target: if last {
                    format!("<= x{TARGET_FLAT_RATIO}")
                } else {
                    "-".into()
                },
                met: if last {
                    judge(ratio <= TARGET_FLAT_RATIO)
                } else {
                    None
                },
            });
        }
    }
    if let Some(big) = r.renewal_throughput.last() {
        let peak = big.peak_rss_kib as f64 / 1024.0;
        out.push(Line {
            name: format!("peak memory: sweep over {} due renewals", big.due),
            measured: format!("{peak:.1} MiB (VmHWM)"),
            baseline: format!(
                "{:.1} MiB before the sweep",
                big.rss_before_kib as f64 / 1024.0
            ),
            target: format!("< {TARGET_PEAK_MIB} MiB"),
            met: judge(peak < TARGET_PEAK_MIB),
        });
    }
    if let Some(t) = &r.time_travel {
        out.push(year_line(
            t,
            format!("< {TARGET_YEAR_SECONDS} s"),
            judge(t.seconds < TARGET_YEAR_SECONDS),
        ));
    }
    if let Some(t) = &r.time_travel_scattered {
        out.push(year_line(t, "- (the worst case)".into(), None));
    }
    out
}

/// The line of one simulated year: its time, what it did, where the time
/// went, and the CPU and bytes it used.
fn year_line(t: &TimeTravel, target: String, met: Option<bool>) -> Line {
    let s = &t.totals;
    Line {
        name: format!(
            "time travel: {} daily sweeps over {} subscriptions (mixed; {})",
            t.days,
            t.subscriptions,
            t.layout.describe()
        ),
        measured: format!("{:.1} s", t.seconds),
        baseline: format!(
            "renewed {}, declined {}, expired {}, cancelled {}, reminders {}, notices {}, invoices {}, mail {}; by phase: renewals {:.1} s, expiry {:.1} s, reminders {:.1} s, notices {:.1} s, mail {:.1} s; CPU {:.1} s (user {:.1}, system {:.1}) of the {:.0} s {} cores give in {} s; wrote {:.2} GB ({:.2} GB to storage)",
            s.renewed, s.declined, s.expired, s.cancelled, s.reminders, s.notices, s.invoices_issued, s.mail_sent,
            t.phases.renewals, t.phases.expiry, t.phases.reminders, t.phases.notices, t.phases.mail,
            t.cpu_user_seconds + t.cpu_system_seconds, t.cpu_user_seconds, t.cpu_system_seconds,
            TARGET_YEAR_SECONDS * TARGET_YEAR_CORES, TARGET_YEAR_CORES, TARGET_YEAR_SECONDS,
            t.bytes_written as f64 / 1e9, t.bytes_to_storage as f64 / 1e9
        ),
        target,
        met,
    }
}

fn errors_note(s: &Counts) -> String {
    if s.errors + s.unknown + s.declined > 0 {
        format!(
            "; errors {}, unknown {}, declined {}",
            s.errors, s.unknown, s.declined
        )
    } else {
        String::new()
    }
}

// ---------------------------------------------------------------------------
// Backends and set-up

/// Where the bench's databases live.
#[derive(Debug)]
enum Backend {
    /// A fresh SQLite file per line, with the store's own settings.
    Sqlite,
    /// A PostgreSQL server; each line gets its own temporary database,
    /// dropped at the end.
    Postgres {
        server_url: String,
        /// `synchronous_commit` and `fsync` as the server runs them.
        settings: String,
        created: std::sync::Mutex<Vec<String>>,
    },
}

impl Backend {
    async fn connect(args: &BenchArgs) -> anyhow::Result<Backend> {
        match args.database_url.as_deref() {
            None => Ok(Backend::Sqlite),
            Some(u) if u.starts_with("sqlite:") => Ok(Backend::Sqlite),
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                let mut conn = sqlx::PgConnection::connect(u).await.with_context(|| {
                    format!("cannot connect to {}", crate::config::redact_url(u))
                })?;
                let sync: String = sqlx::query_scalar("SHOW synchronous_commit")
                    .fetch_one(&mut conn)
                    .await?;
                let fsync: String = sqlx::query_scalar("SHOW fsync").fetch_one(&mut conn).await?;
                conn.close().await?;
                Ok(Backend::Postgres {
                    server_url: u.to_string(),
                    settings: format!("synchronous_commit={sync}, fsync={fsync}"),
                    created: std::sync::Mutex::new(Vec::new()),
                })
            }
            Some(u) => bail!(
                "--database-url {}: use postgres://... (or leave it out for a temporary SQLite file)",
                crate::config::redact_url(u)
            ),
        }
    }

    fn name(&self) -> String {
        match self {
            Backend::Sqlite => "sqlite (WAL; durable commits: synchronous=FULL, or NORMAL and a sync of the WAL for the store's writer)".into(),
            Backend::Postgres { settings, .. } => format!("postgresql ({settings})"),
        }
    }

    fn is_postgres(&self) -> bool {
        matches!(self, Backend::Postgres { .. })
    }

    /// The database URL of a line: a file in its directory, or a new
    /// database on the server.
    async fn database_for(&self, dir: &Path, line: &str) -> anyhow::Result<String> {
        match self {
            Backend::Sqlite => Ok(format!("sqlite://{}", dir.join("renewd.db").display())),
            Backend::Postgres {
                server_url,
                created,
                ..
            } => {
                let name = format!("renewd_bench_{}_{line}", std::process::id())
                    .replace(|c: char| !c.is_ascii_alphanumeric(), "_");
                let mut conn = sqlx::PgConnection::connect(server_url).await?;
                sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut conn)
                    .await?;
                sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\""))
                    .execute(&mut conn)
                    .await?;
                conn.close().await?;
                created
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(name.clone());
                Ok(with_database(server_url, &name))
            }
        }
    }

    /// Drops the databases the bench created (best effort).
    async fn drop_databases(&self) {
        let Backend::Postgres {
            server_url,
            created,
            ..
        } = self
        else {
            return;
        };
        let names = std::mem::take(
            &mut *created
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if let Ok(mut conn) = sqlx::PgConnection::connect(server_url).await {
            for name in names {
                let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut conn)
                    .await;
            }
            let _ = conn.close().await;
        }
    }

    /// Durable one-row write transactions per second with the settings the
    /// store uses, pgbench-style: one client updating one row, one
    /// transaction after another (SQLite has one writer anyway; the same
    /// single client on PostgreSQL keeps the two tables comparable).
    async fn raw_limit(&self, dir: &Path, duration: Duration) -> anyhow::Result<RawLimit> {
        let (n, seconds) = match self {
            Backend::Sqlite => {
                let mut conn = sqlite_options(&dir.join("raw.db")).connect().await?;
                sqlx::raw_sql(
                    "CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL); \
                     INSERT INTO accounts VALUES (1, 0);",
                )
                .execute(&mut conn)
                .await?;
                let started = Instant::now();
                let mut n = 0u64;
                while started.elapsed() < duration || n < 50 {
                    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
                    sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE id = 1")
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    n += 1;
                }
                let seconds = started.elapsed().as_secs_f64();
                conn.close().await?;
                (n, seconds)
            }
            Backend::Postgres { .. } => {
                let url = self.database_for(dir, "raw").await?;
                let mut conn = sqlx::PgConnection::connect(&url).await?;
                sqlx::raw_sql(
                    "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL); \
                     INSERT INTO accounts VALUES (1, 0);",
                )
                .execute(&mut conn)
                .await?;
                let started = Instant::now();
                let mut n = 0u64;
                while started.elapsed() < duration || n < 50 {
                    let mut tx = conn.begin().await?;
                    sqlx::query("UPDATE accounts SET balance = balance + 1 WHERE id = 1")
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    n += 1;
                }
                let seconds = started.elapsed().as_secs_f64();
                conn.close().await?;
                (n, seconds)
            }
        };
        Ok(RawLimit {
            transactions: n,
            seconds,
            per_second: n as f64 / seconds,
        })
    }
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let host_at = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[host_at..].find('/') {
        Some(i) => &base[..host_at + i],
        None => base,
    };
    format!("{base}/{db}{query}")
}

/// The store's own connection settings (src/store/sqlite.rs), for the raw
/// limit and for seeding.
fn sqlite_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(30))
}

/// A temporary directory removed when dropped.
struct WorkDir {
    root: PathBuf,
}

impl WorkDir {
    fn create(base: PathBuf) -> anyhow::Result<WorkDir> {
        for n in 0..1000u32 {
            let root = base.join(format!("renewd-bench-{}-{n}", std::process::id()));
            match std::fs::create_dir(&root) {
                Ok(()) => return Ok(WorkDir { root }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", root.display()))
                }
            }
        }
        bail!(
            "cannot create a temporary directory under {}",
            base.display()
        )
    }

    fn sub(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// One line's state directory, database and config.
struct Setup {
    dir: PathBuf,
    database_url: String,
    postgres: bool,
    latency_ms: u64,
    concurrency: usize,
    config: Arc<Config>,
}

impl Setup {
    async fn new(
        backend: &Backend,
        dir: &Path,
        line: &str,
        latency_ms: u64,
        concurrency: usize,
    ) -> anyhow::Result<Setup> {
        let database_url = backend.database_for(dir, line).await?;
        let config = bench_config(dir, &database_url, latency_ms, concurrency)?;
        Ok(Setup {
            dir: dir.to_path_buf(),
            database_url,
            postgres: backend.is_postgres(),
            latency_ms,
            concurrency,
            config,
        })
    }

    async fn engine(&self, start: Timestamp) -> anyhow::Result<(Engine, Arc<MockClock>)> {
        let clock = Arc::new(MockClock::new(start));
        let shared: SharedClock = clock.clone();
        let engine = crate::startup::build_engine(self.config.clone(), shared).await?;
        Ok((engine, clock))
    }

    /// Ends a line. Its files stay until the bench ends: deleting hundreds
    /// of thousands of files mid-run makes the next lines' file creation
    /// slower (ext4 without a journal skips recently freed inodes).
    async fn cleanup(&self) {}
}

/// The built-in defaults with the bench's state directory, database,
/// sandbox latency and concurrency.
fn bench_config(
    dir: &Path,
    database_url: &str,
    latency_ms: u64,
    concurrency: usize,
) -> anyhow::Result<Arc<Config>> {
    let vars = vec![
        ("RENEWD__STATE_DIR".to_string(), dir.display().to_string()),
        (
            "RENEWD__DATABASE__URL".to_string(),
            database_url.to_string(),
        ),
        (
            "RENEWD__GATEWAY__SANDBOX__LATENCY_MS".to_string(),
            latency_ms.to_string(),
        ),
        (
            "RENEWD__RENEWAL__CONCURRENCY".to_string(),
            concurrency.to_string(),
        ),
    ];
    let config = Config::load_with_env(None, vars).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Arc::new(config))
}

// ---------------------------------------------------------------------------
// Seeding: bulk SQL straight into the database

/// The instant the renewal-throughput sweeps run at; every seeded due
/// subscription ended in the 30 days before it.
const DUE_NOW: &str = "2027-07-01T00:00:00Z";
/// The instant the empty sweeps run at; nothing ends within 60 days of it.
const IDLE_NOW: &str = "2027-01-01T00:00:00Z";
/// The first day of the simulated year.
const YEAR_START: &str = "2027-01-01T00:00:00Z";

/// A customer profile: time zone, locale, country, currency.
type Zone = (&'static str, &'static str, &'static str, &'static str);

/// Customer time zones, spread round-robin over the seeded subscriptions.
const ZONES: [Zone; 4] = [
    ("UTC", "en", "US", "USD"),
    ("Asia/Tokyo", "ja", "JP", "JPY"),
    ("America/New_York", "en", "US", "USD"),
    ("Europe/London", "en", "US", "USD"),
];

/// Which states the seeded subscriptions are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mix {
    /// Active, auto-renewal on, a card that succeeds: every one due now.
    DueCards,
    /// Active (auto-renewal on and off), expired and cancelled rows, none
    /// due within the reminder and notice horizons.
    Idle,
    /// Everything a year brings: renewals, reminders and expiry, soft and
    /// hard declines, expiring cards, bank transfers, cancellations.
    Year,
}

/// How the seeded ids relate to the days the periods end on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// Ids in purchase order, as a real table assigns them: a yearly
    /// subscription renews on the anniversary of its purchase, so the
    /// subscriptions due on one day were bought on one day and are
    /// neighbours in id (and in every index keyed by subscription). Zones and
    /// states still alternate from one id to the next.
    Purchase,
    /// The days scattered over the ids (id x 7919 mod days), which no real
    /// table does (a subscription's id would say nothing of when it was
    /// bought): each renewal of a day lands on a page of its own in every
    /// index keyed by subscription. The bench's only layout before the
    /// fifteenth session; kept as the worst case.
    Scattered,
}

impl Layout {
    fn describe(self) -> &'static str {
        match self {
            Layout::Purchase => "ids in purchase order",
            Layout::Scattered => "ids scattered over the days",
        }
    }

    /// The SQL for the day index `d` of id `i` among `first..first + n`.
    fn day_sql(self, first: i64, n: u64, span_days: i64) -> String {
        match self {
            Layout::Purchase => format!("((i - {first}) * {span_days}) / {n}"),
            Layout::Scattered => format!("(i * 7919) % {span_days}"),
        }
    }
}

/// The `subscriptions` columns each mix writes, as SQL over `g.i` (the
/// id), `g.k` (= id mod 100) and the calendar row `c`; `pg` writes flags as
/// booleans (PostgreSQL) instead of 0 and 1 (SQLite).
fn subscription_select(mix: Mix, pg: bool) -> String {
    let flag = |on: bool| match (pg, on) {
        (true, true) => "true",
        (true, false) => "false",
        (false, true) => "1",
        (false, false) => "0",
    };
    let (t, f) = (flag(true), flag(false));
    let (status, auto, token, last4, expiry, kind, cancel) = match mix {
        Mix::DueCards => (
            "'active'".to_string(),
            t.to_string(),
            "'pm_card_visa'".to_string(),
            "'4242'".to_string(),
            "'2031-12'".to_string(),
            "'card'".to_string(),
            f.to_string(),
        ),
        Mix::Idle => (
            "CASE WHEN g.k < 85 THEN 'active' WHEN g.k < 93 THEN 'expired' ELSE 'cancelled' END"
                .into(),
            format!("CASE WHEN g.k < 70 THEN {t} ELSE {f} END"),
            "'pm_card_visa'".into(),
            "'4242'".into(),
            "'2031-12'".into(),
            "'card'".into(),
            f.to_string(),
        ),
        Mix::Year => (
            "'active'".into(),
            // 60-74: auto-renewal turned off (reminders, then expiry).
            format!("CASE WHEN g.k >= 60 AND g.k < 75 THEN {f} ELSE {t} END"),
            // 75-79 soft declines (dunning, then expiry), 80-82 hard declines.
            "CASE WHEN g.k >= 88 AND g.k < 95 THEN NULL \
                  WHEN g.k >= 75 AND g.k < 80 THEN 'pm_card_chargeDeclinedInsufficientFunds' \
                  WHEN g.k >= 80 AND g.k < 83 THEN 'pm_card_chargeDeclined' ELSE 'pm_card_visa' END"
                .into(),
            "CASE WHEN g.k >= 88 AND g.k < 95 THEN NULL WHEN g.k >= 75 AND g.k < 80 THEN '9995' \
                  WHEN g.k >= 80 AND g.k < 83 THEN '0002' ELSE '4242' END"
                .into(),
            // 83-87: the card ends before the renewal date (a warning first).
            "CASE WHEN g.k >= 88 AND g.k < 95 THEN NULL WHEN g.k >= 83 AND g.k < 88 THEN '2027-01' \
                  ELSE '2031-12' END"
                .into(),
            // 88-94: bank transfer (an open invoice ahead, never paid here).
            "CASE WHEN g.k >= 88 AND g.k < 95 THEN 'bank_transfer' ELSE 'card' END".into(),
            // 95-99: cancelled at period end through a request.
            format!("CASE WHEN g.k >= 95 THEN {t} ELSE {f} END"),
        ),
    };
    let is_card = format!("({kind}) = 'card'");
    // PostgreSQL: the terms acceptance points back at the subscription only
    // through the subscription (its own column is left empty: the foreign
    // key would need the subscription first).
    format!(
        "SELECT g.i, g.i, 'action-pack', {status}, {auto}, {auto}, c.anchor, 1, c.start_s, c.end_s, {kind}, \
         {token}, CASE WHEN {is_card} THEN 'visa' END, {last4}, {expiry}, \
         CASE WHEN {is_card} THEN NULL ELSE 'Accounts ' || g.i END, \
         CASE WHEN {is_card} THEN NULL ELSE '+81 3-1234-5678' END, \
         CASE WHEN {is_card} THEN NULL ELSE 'ap' || g.i || '@example.com' END, \
         g.i, {cancel}, CASE WHEN ({status}) = 'cancelled' THEN c.start_s END, c.start_s, c.start_s"
    )
}

/// (zone index, day index, anchor date, period start, period end in unix seconds).
type CalendarRow = (i64, i64, String, i64, i64);

/// One calendar row per zone and day: the anchor and the instants the
/// engine itself computes for term 1 (which ends on anchor + 1 year).
fn calendar(setup: &Setup, first_end: Date, span_days: i64) -> anyhow::Result<Vec<CalendarRow>> {
    let local = setup.config.local_time;
    let mut rows = Vec::new();
    for (z, (zone, ..)) in ZONES.iter().enumerate() {
        let tz = TimeZone::get(zone)?;
        for d in 0..span_days {
            let end_date = first_end.checked_add(d.days())?;
            let anchor = end_date.checked_sub(1.year())?;
            let start = term::period_end(anchor, 0, &tz, local)?;
            let end = term::period_end(anchor, 1, &tz, local)?;
            rows.push((
                i64::try_from(z)?,
                d,
                anchor.to_string(),
                start.as_second(),
                end.as_second(),
            ));
        }
    }
    Ok(rows)
}

/// The INSERT statements that seed customers, terms acceptances and
/// subscriptions from `cte` (which defines `g`) and `bench_calendar`.
fn seed_statements(setup: &Setup, cte: &str, mix: Mix) -> Vec<String> {
    let pg = setup.postgres;
    let overriding = if pg { "OVERRIDING SYSTEM VALUE" } else { "" };
    let zone_case = |pick: fn(&Zone) -> &'static str| {
        let arms: String = ZONES
            .iter()
            .enumerate()
            .map(|(z, row)| format!(" WHEN {z} THEN '{}'", pick(row)))
            .collect();
        format!("CASE g.z{arms} END")
    };
    let join = "FROM g JOIN bench_calendar c ON c.z = g.z AND c.d = g.d";
    vec![
        format!(
            "{cte} INSERT INTO customers (id, name, email, timezone, locale, country, currency, created_at) \
             {overriding} SELECT g.i, 'Bench Customer ' || g.i, 'customer' || g.i || '@example.com', \
             {}, {}, {}, {}, c.start_s {join}",
            zone_case(|r| r.0),
            zone_case(|r| r.1),
            zone_case(|r| r.2),
            zone_case(|r| r.3)
        ),
        format!(
            "{cte} INSERT INTO terms_acceptances (id, customer_id, subscription_id, version, accepted_at, context) \
             {overriding} SELECT g.i, g.i, {}, '{}', c.start_s, 'purchase' {join}",
            if pg { "NULL" } else { "g.i" },
            setup.config.raw.terms.current
        ),
        format!(
            "{cte} INSERT INTO subscriptions (id, customer_id, plan, status, auto_renew, auto_renew_can_enable, \
             anchor_date, term, current_period_start, current_period_end, payment_kind, card_token, card_brand, \
             card_last4, card_expiry, contact_name, contact_phone, contact_email, terms_acceptance_id, \
             cancel_at_period_end, cancelled_at, created_at, updated_at) \
             {overriding} {} {join}",
            subscription_select(mix, pg)
        ),
    ]
}

/// Seeds subscriptions `first..first + n` (ids, customer ids and terms
/// acceptance ids are all `i`) whose periods end on the days `first_end ..
/// first_end + span_days` (which day each id gets: `layout`), spread over
/// the zones, in one transaction.
async fn seed(
    setup: &Setup,
    first: u64,
    n: u64,
    first_end: Date,
    span_days: i64,
    mix: Mix,
    layout: Layout,
) -> anyhow::Result<()> {
    if n == 0 {
        return Ok(());
    }
    // Migrations first, as the store applies them.
    drop(crate::startup::open_store(&setup.config).await?);
    let rows = calendar(setup, first_end, span_days)?;
    let (lo, hi) = (i64::try_from(first)?, i64::try_from(first + n - 1)?);
    let zones = ZONES.len();
    let day = layout.day_sql(lo, n, span_days);
    let pick = format!("i % {zones} AS z, {day} AS d, i % 100 AS k");
    if setup.postgres {
        let mut conn = sqlx::PgConnection::connect(&setup.database_url).await?;
        let mut tx = conn.begin().await?;
        sqlx::raw_sql(
            "CREATE TEMP TABLE bench_calendar (z bigint, d bigint, anchor date, start_s timestamptz, \
             end_s timestamptz, PRIMARY KEY (z, d)) ON COMMIT DROP",
        )
        .execute(&mut *tx)
        .await?;
        for (z, d, anchor, start, end) in &rows {
            sqlx::query(
                "INSERT INTO bench_calendar VALUES ($1, $2, $3::date, to_timestamp($4), to_timestamp($5))",
            )
            .bind(z)
            .bind(d)
            .bind(anchor)
            .bind(*start as f64)
            .bind(*end as f64)
            .execute(&mut *tx)
            .await?;
        }
        let cte = format!(
            "WITH g AS (SELECT i, {pick} FROM generate_series({lo}::bigint, {hi}::bigint) AS s(i))"
        );
        for sql in seed_statements(setup, &cte, mix) {
            sqlx::raw_sql(&sql).execute(&mut *tx).await?;
        }
        for table in ["customers", "terms_acceptances", "subscriptions"] {
            sqlx::raw_sql(&format!(
                "SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
            ))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        sqlx::raw_sql("ANALYZE").execute(&mut conn).await?;
        conn.close().await?;
        return Ok(());
    }
    let path = setup
        .database_url
        .strip_prefix("sqlite://")
        .unwrap_or(&setup.database_url);
    let mut conn = sqlite_options(Path::new(path)).connect().await?;
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::raw_sql(
        "CREATE TEMP TABLE IF NOT EXISTS bench_calendar (z INTEGER, d INTEGER, anchor TEXT, start_s INTEGER, \
         end_s INTEGER, PRIMARY KEY (z, d)); DELETE FROM bench_calendar;",
    )
    .execute(&mut *tx)
    .await?;
    for (z, d, anchor, start, end) in &rows {
        sqlx::query("INSERT INTO bench_calendar VALUES (?, ?, ?, ?, ?)")
            .bind(z)
            .bind(d)
            .bind(anchor)
            .bind(start)
            .bind(end)
            .execute(&mut *tx)
            .await?;
    }
    let cte = format!(
        "WITH RECURSIVE seq(i) AS (SELECT {lo} UNION ALL SELECT i + 1 FROM seq WHERE i < {hi}), \
         g AS (SELECT i, {pick} FROM seq)"
    );
    for sql in seed_statements(setup, &cte, mix) {
        sqlx::raw_sql(&sql).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    sqlx::raw_sql("ANALYZE").execute(&mut conn).await?;
    conn.close().await?;
    Ok(())
}

fn instant(s: &str) -> anyhow::Result<Timestamp> {
    Ok(s.parse()?)
}

async fn seed_due(setup: &Setup, n: u64) -> anyhow::Result<()> {
    let now = instant(DUE_NOW)?;
    let first_end = now.to_zoned(TimeZone::UTC).date().checked_sub(31.days())?;
    seed(setup, 1, n, first_end, 30, Mix::DueCards, Layout::Purchase).await
}

// ---------------------------------------------------------------------------
// Lines

/// Runs one sweep in a child process and reads its figures.
async fn spawn_child_sweep(setup: &Setup, now: &str) -> anyhow::Result<SweepFigures> {
    let exe = std::env::current_exe().context("cannot find the renewd binary to re-run")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("bench")
        .arg("--child-sweep")
        .arg(&setup.dir)
        .arg("--now")
        .arg(now)
        .arg("--database-url")
        .arg(&setup.database_url)
        .arg("--latency-ms")
        .arg(setup.latency_ms.to_string())
        .arg("--concurrency")
        .arg(setup.concurrency.to_string())
        .env_remove("RENEWD_CONFIG")
        .stdin(std::process::Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .context("cannot wait for the child sweep")?
        .context("cannot run the child sweep")?;
    if !out.status.success() {
        bail!(
            "child sweep failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("cannot read the child sweep's figures")
}

/// The child's side: one sweep at `now` over the prepared database.
async fn child_sweep(dir: &Path, args: &BenchArgs, now: Timestamp) -> anyhow::Result<SweepFigures> {
    let url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", dir.join("renewd.db").display()));
    let config = bench_config(dir, &url, args.latency_ms, args.concurrency)?;
    let clock: SharedClock = Arc::new(MockClock::new(now));
    let engine = crate::startup::build_engine(config, clock).await?;
    let due = engine
        .store
        .gauges(now)
        .await
        .map(|g| u64::try_from(g.due_subscriptions).unwrap_or(0))
        .unwrap_or(0);
    let rss_before_kib = proc_status_kib("VmRSS:");
    // One sweep, timed in two parts: the renewal phase (claim, charge,
    // invoice, outbox), then the rest of the same sweep (which finds no
    // renewal left, and delivers the receipts).
    let started = Instant::now();
    let mut renewal = SweepSummary::default();
    engine.renewals(now, &mut renewal).await?;
    let seconds = started.elapsed().as_secs_f64();
    let rest = engine.sweep_at(now).await?;
    let sweep_seconds = started.elapsed().as_secs_f64();
    let mut summary = Counts::from(&renewal);
    summary.add(&rest);
    Ok(SweepFigures {
        due,
        latency_ms: args.latency_ms,
        concurrency: args.concurrency,
        seconds,
        renewals_per_second: f64::from(summary.renewed) / seconds.max(f64::EPSILON),
        sweep_seconds,
        summary,
        rss_before_kib,
        peak_rss_kib: proc_status_kib("VmHWM:"),
    })
}

/// Sweep time over growing tables where nothing is due.
async fn empty_sweeps(setup: &Setup, plan: &Plan) -> anyhow::Result<Vec<EmptySweep>> {
    let now = instant(IDLE_NOW)?;
    let first_end = now.to_zoned(TimeZone::UTC).date().checked_add(60.days())?;
    let mut seeded = 0u64;
    let mut out = Vec::new();
    for &size in &plan.table_sizes {
        seed(
            setup,
            seeded + 1,
            size - seeded,
            first_end,
            300,
            Mix::Idle,
            Layout::Purchase,
        )
        .await?;
        seeded = size;
        let (engine, _) = setup.engine(now).await?;
        // A warm-up sweep, so every size is measured with a warm cache.
        let first = engine.sweep_at(now).await?;
        if first.renewed + first.expired + first.reminders + first.notices + first.mail_sent > 0 {
            bail!("the idle table had work due: {first:?}");
        }
        let mut runs = Vec::new();
        for _ in 0..plan.empty_runs {
            let started = Instant::now();
            engine.sweep_at(now).await?;
            runs.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        out.push(EmptySweep {
            subscriptions: size,
            median_ms: sorted[sorted.len() / 2],
            runs,
        });
    }
    Ok(out)
}

/// A year of daily sweeps over `n` subscriptions in mixed states.
async fn time_travel(setup: &Setup, n: u64, layout: Layout) -> anyhow::Result<TimeTravel> {
    let start = instant(YEAR_START)?;
    let first_end = start.to_zoned(TimeZone::UTC).date().checked_add(9.days())?;
    seed(setup, 1, n, first_end, 355, Mix::Year, layout).await?;
    let (engine, clock) = setup.engine(start).await?;
    let days = 365u32;
    let mut totals = Counts::default();
    let mut times = PhaseTimes::default();
    let before = Usage::now();
    let started = Instant::now();
    for day in 1..=days {
        let t = start.checked_add(SignedDuration::from_hours(24 * i64::from(day)))?;
        clock.set(t);
        let s = engine.sweep_timed(t, &mut times).await?;
        totals.add(&s);
    }
    let seconds = started.elapsed().as_secs_f64();
    let used = Usage::now().since(&before);
    Ok(TimeTravel {
        subscriptions: n,
        layout,
        days,
        seconds,
        totals,
        cpu_user_seconds: used.user_seconds,
        cpu_system_seconds: used.system_seconds,
        bytes_written: used.bytes_written,
        bytes_to_storage: used.bytes_to_storage,
        phases: YearPhases {
            renewals: times.renewals.as_secs_f64(),
            expiry: times.expiry.as_secs_f64(),
            reminders: times.reminders.as_secs_f64(),
            notices: times.notices.as_secs_f64(),
            mail: times.mail.as_secs_f64(),
        },
    })
}

/// The counts of one sweep (or the sum of several), as the report shows them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counts {
    pub renewed: u32,
    pub declined: u32,
    pub retry_scheduled: u32,
    pub expired: u32,
    pub cancelled: u32,
    pub reminders: u32,
    pub notices: u32,
    pub invoices_issued: u32,
    pub unknown: u32,
    pub skipped: u32,
    pub mail_sent: u32,
    pub mail_failed: u32,
    pub errors: u32,
}

impl Counts {
    fn add(&mut self, s: &SweepSummary) {
        self.renewed += s.renewed;
        self.declined += s.declined;
        self.retry_scheduled += s.retry_scheduled;
        self.expired += s.expired;
        self.cancelled += s.cancelled;
        self.reminders += s.reminders;
        self.notices += s.notices;
        self.invoices_issued += s.invoices_issued;
        self.unknown += s.unknown;
        self.skipped += s.skipped;
        self.mail_sent += s.mail_sent;
        self.mail_failed += s.mail_failed;
        self.errors += s.errors;
    }
}

impl From<&SweepSummary> for Counts {
    fn from(s: &SweepSummary) -> Self {
        let mut c = Counts::default();
        c.add(s);
        c
    }
}

// ---------------------------------------------------------------------------
// The machine

/// A `kB` field of /proc/self/status (VmRSS, VmHWM), in KiB; 0 if unknown.
fn proc_status_kib(field: &str) -> u64 {
    proc_field(
        &std::fs::read_to_string("/proc/self/status").unwrap_or_default(),
        field,
    )
}

fn meminfo_kib(field: &str) -> u64 {
    proc_field(
        &std::fs::read_to_string("/proc/meminfo").unwrap_or_default(),
        field,
    )
}

/// What the process has used so far: CPU time and bytes written. Unknown
/// figures (no /proc, a failed `getrusage`) are 0.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Usage {
    user_seconds: f64,
    system_seconds: f64,
    bytes_written: u64,
    bytes_to_storage: u64,
}

impl Usage {
    fn now() -> Usage {
        let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
        let mut usage = Usage {
            bytes_written: proc_field(&io, "wchar:"),
            bytes_to_storage: proc_field(&io, "write_bytes:"),
            ..Usage::default()
        };
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::uninit();
        // SAFETY: `getrusage` fills the whole struct when it returns 0, and
        // it is read only then.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } == 0 {
            let ru = unsafe { ru.assume_init() };
            let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            usage.user_seconds = secs(ru.ru_utime);
            usage.system_seconds = secs(ru.ru_stime);
        }
        usage
    }

    /// What was used between `earlier` and this reading.
    fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            user_seconds: (self.user_seconds - earlier.user_seconds).max(0.0),
            system_seconds: (self.system_seconds - earlier.system_seconds).max(0.0),
            bytes_written: self.bytes_written.saturating_sub(earlier.bytes_written),
            bytes_to_storage: self
                .bytes_to_storage
                .saturating_sub(earlier.bytes_to_storage),
        }
    }
}

/// The number after `field` on its line of a /proc file (`VmHWM:` in
/// KiB, `wchar:` in bytes); 0 if absent.
fn proc_field(text: &str, field: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The mean time to create a small file the way renewd does (a temporary
/// file renamed into place), over 500 files.
fn file_create_cost(dir: &Path) -> anyhow::Result<f64> {
    let body = vec![b'x'; 2048];
    let started = Instant::now();
    for i in 0..500 {
        let tmp = dir.join(format!("{i}.tmp"));
        std::fs::write(&tmp, &body)?;
        std::fs::rename(&tmp, dir.join(format!("{i}.eml")))?;
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / 500.0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoke_sizes_scale_every_line_down() {
        let p = Plan::for_size(500);
        assert_eq!(p.renewal_sizes, vec![50, 500]);
        assert_eq!(p.table_sizes, vec![50, 500, 5_000]);
        assert!(!p.full);
        assert!(Plan::for_size(FULL_SIZE).full);
    }

    /// The day each id of `first..first + n` gets, as the seed's SQL
    /// computes it (SQLite in memory).
    async fn days(layout: Layout, first: i64, n: u64, span: i64) -> Vec<i64> {
        let mut conn = sqlx::SqliteConnection::connect("sqlite::memory:")
            .await
            .unwrap();
        let last = first + i64::try_from(n).unwrap() - 1;
        let sql = format!(
            "WITH RECURSIVE seq(i) AS (SELECT {first} UNION ALL SELECT i + 1 FROM seq WHERE i < {last}) \
             SELECT {} FROM seq ORDER BY i",
            layout.day_sql(first, n, span)
        );
        sqlx::query_scalar(&sql).fetch_all(&mut conn).await.unwrap()
    }

    #[tokio::test]
    async fn purchase_order_gives_each_day_a_run_of_neighbouring_ids() {
        // 1,000 ids from 501 (a second seeding, as the empty sweeps do) over 7 days.
        let d = days(Layout::Purchase, 501, 1_000, 7).await;
        assert_eq!(d.len(), 1_000);
        assert!(
            d.windows(2).all(|w| w[0] <= w[1]),
            "days must follow the ids"
        );
        assert_eq!((d[0], d[999]), (0, 6));
        for day in 0..7 {
            let count = d.iter().filter(|&&x| x == day).count();
            assert!((142..=143).contains(&count), "day {day}: {count} ids");
        }
    }

    #[tokio::test]
    async fn scattered_layout_spreads_neighbours_over_the_days() {
        let d = days(Layout::Scattered, 1, 1_000, 7).await;
        assert!(d.iter().all(|x| (0..7).contains(x)));
        // Neighbouring ids land on different days.
        assert!(d.windows(2).all(|w| w[0] != w[1]));
    }

    #[test]
    fn proc_fields_are_read_in_kib() {
        let text = "Name:\trenewd\nVmHWM:\t   51200 kB\nVmRSS:\t   40000 kB\n";
        assert_eq!(proc_field(text, "VmHWM:"), 51_200);
        assert_eq!(proc_field(text, "VmSwap:"), 0);
    }

    #[test]
    fn io_fields_are_read_in_bytes() {
        let text = "rchar: 3193182458\nwchar: 3244083059\nsyscr: 779669\nwrite_bytes: 3486576640\ncancelled_write_bytes: 390094848\n";
        assert_eq!(proc_field(text, "wchar:"), 3_244_083_059);
        assert_eq!(proc_field(text, "write_bytes:"), 3_486_576_640);
    }

    #[test]
    fn usage_counts_this_process_work_and_writes() {
        let before = Usage::now();
        let file = std::env::temp_dir().join(format!("renewd-usage-{}", std::process::id()));
        std::fs::write(&file, vec![b'x'; 1 << 20]).unwrap();
        std::fs::remove_file(&file).unwrap();
        // Work until the kernel has charged this process some CPU time (a
        // few clock ticks), or give up after 10 s of it.
        let started = Instant::now();
        let mut x = 1u64;
        while Usage::now().since(&before).user_seconds == 0.0 && started.elapsed().as_secs() < 10 {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i));
            }
        }
        let used = Usage::now().since(&before);
        assert!(used.bytes_written >= 1 << 20, "{used:?}");
        assert!(used.user_seconds > 0.0, "{used:?}");
    }

    #[test]
    fn usage_since_subtracts_the_earlier_reading() {
        let earlier = Usage {
            user_seconds: 1.5,
            system_seconds: 0.5,
            bytes_written: 1_000,
            bytes_to_storage: 4_096,
        };
        let later = Usage {
            user_seconds: 4.0,
            system_seconds: 2.0,
            bytes_written: 3_500,
            bytes_to_storage: 4_096,
        };
        let used = later.since(&earlier);
        assert_eq!(used.user_seconds, 2.5);
        assert_eq!(used.system_seconds, 1.5);
        assert_eq!(used.bytes_written, 2_500);
        assert_eq!(used.bytes_to_storage, 0);
    }
}
