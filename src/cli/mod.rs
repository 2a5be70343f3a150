//! The command line: the contract billing staff, ops scripts and black-box
//! tests rely on (DESIGN.md, "CLI contract"). Every command takes the global
//! `--config FILE` and `--now T`; read commands take `--json` and then print
//! one JSON document on stdout. Errors are one line on stderr and a
//! non-zero exit.

mod customer;
mod invoice;
mod mail;
mod ops;
mod request;
mod subscription;
mod views;

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use jiff::Timestamp;

use crate::clock::{MockClock, SharedClock, SystemClock};
use crate::config::Config;
use crate::engine::{Engine, EngineError};

#[derive(Debug, Parser)]
#[command(
    name = "renewd",
    version,
    about = "Keeps yearly subscriptions renewed: charges, reminders, invoices."
)]
pub struct Cli {
    /// Config file layered over the built-in defaults (also $RENEWD_CONFIG).
    #[arg(long, global = true, env = "RENEWD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Fix the clock at this RFC 3339 instant for this process (a test clock).
    #[arg(long, global = true, value_name = "T")]
    pub now: Option<String>,
    /// Log at the configured level on stderr (one-shot commands are quiet by default).
    #[arg(long, short, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply database migrations.
    Migrate,
    /// Run the daemon.
    Run {
        /// Seed sample customers around their anniversaries into an empty database.
        #[arg(long)]
        demo: bool,
    },
    /// One pass at `now`: renewals, retries, expiry, reminders, notices, mail.
    Sweep {
        /// Report what the sweep would do and write nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Consecutive sweeps from `--now` to `--until`, the clock advanced by `--step`.
    Simulate {
        #[arg(long, value_name = "T")]
        until: String,
        /// e.g. 1d, 12h, 30m, 1w.
        #[arg(long, default_value = "1d")]
        step: String,
        #[arg(long)]
        json: bool,
    },
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig {
        #[arg(long)]
        json: bool,
    },
    /// The current Terms and Conditions version and the accepted ones.
    Terms {
        #[arg(long)]
        json: bool,
    },
    #[command(subcommand)]
    Customer(customer::CustomerCommand),
    #[command(subcommand)]
    Subscription(subscription::SubscriptionCommand),
    #[command(subcommand)]
    Invoice(invoice::InvoiceCommand),
    #[command(subcommand)]
    Mail(mail::MailCommand),
    /// Support requests (cancellation).
    #[command(subcommand)]
    Request(request::RequestCommand),
    /// The audit log, oldest first.
    Events {
        #[arg(long)]
        subscription: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    #[command(subcommand)]
    Sandbox(ops::SandboxCommand),
    /// The benchmark table (docs/benchmarks.md), on its own temporary data.
    Bench(crate::bench::BenchArgs),
}

/// A failure to report: its one-line message and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: i32,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            code: 2,
        }
    }
}

impl From<EngineError> for Failure {
    fn from(e: EngineError) -> Self {
        let code = match e {
            EngineError::Invalid(_) | EngineError::NotFound(_) | EngineError::Refused(_) => 2,
            EngineError::Store(_) | EngineError::Internal(_) => 1,
        };
        Failure {
            message: e.to_string(),
            code,
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure {
            message: format!("{e:#}"),
            code: 1,
        }
    }
}

pub type CliResult = Result<(), Failure>;

/// Parses `--now`: an RFC 3339 instant such as 2027-03-01T00:00:00Z.
pub fn parse_now(s: &str) -> Result<Timestamp, Failure> {
    s.parse::<Timestamp>().map_err(|_| {
        Failure::usage(format!(
            "--now {s:?} is not an RFC 3339 instant; use e.g. 2027-03-01T00:00:00Z or 2027-03-01T09:00:00+09:00"
        ))
    })
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> CliResult {
    let now = cli.now.as_deref().map(parse_now).transpose()?;
    let config = Arc::new(Config::load(cli.config.as_deref()).map_err(|e| Failure {
        message: e.to_string(),
        code: 2,
    })?);
    let long_running = matches!(
        cli.command,
        Command::Run { .. } | Command::Sweep { .. } | Command::Simulate { .. } | Command::Migrate
    );
    let level = if cli.verbose || long_running {
        config.raw.log.level.clone()
    } else {
        "off".to_string()
    };
    crate::telemetry::init(config.raw.log.format, &level);
    let clock: SharedClock = match now {
        Some(t) => Arc::new(MockClock::new(t)),
        None => Arc::new(SystemClock),
    };
    match cli.command {
        Command::CheckConfig { json } => ops::check_config(&config, json),
        Command::Simulate { until, step, json } => {
            ops::simulate(config, now, &until, &step, json).await
        }
        Command::Sandbox(cmd) => ops::sandbox(config, clock, cmd).await,
        // The bench builds its own config, data and engines.
        Command::Bench(args) => crate::bench::run(args, now).await,
        command => {
            // Held until the daemon returns: a second `run` on the same
            // SQLite file is refused before it migrates or sweeps anything.
            let _instance = match command {
                Command::Run { .. } => crate::daemon::lock_instance(&config)?,
                _ => None,
            };
            let engine = Arc::new(crate::startup::build_engine(config, clock).await?);
            dispatch(engine, command).await
        }
    }
}

async fn dispatch(engine: Arc<Engine>, command: Command) -> CliResult {
    match command {
        Command::Migrate => {
            // build_engine has applied the migrations already.
            println!("database is up to date");
            Ok(())
        }
        Command::Run { demo } => ops::run_daemon(engine, demo).await,
        Command::Sweep { dry_run, json } => ops::sweep(&engine, dry_run, json).await,
        Command::Terms { json } => ops::terms(&engine, json).await,
        Command::Events { subscription, json } => ops::events(&engine, subscription, json).await,
        Command::Customer(cmd) => customer::run(&engine, cmd).await,
        Command::Subscription(cmd) => subscription::run(&engine, cmd).await,
        Command::Invoice(cmd) => invoice::run(&engine, cmd).await,
        Command::Mail(cmd) => mail::run(&engine, cmd).await,
        Command::Request(cmd) => request::run(&engine, cmd).await,
        Command::CheckConfig { .. }
        | Command::Simulate { .. }
        | Command::Sandbox(_)
        | Command::Bench(_) => Err(Failure::usage("internal: command dispatched twice")),
    }
}

/// Prints `value` as one JSON document.
pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> CliResult {
    let s = serde_json::to_string_pretty(value).map_err(|e| Failure {
        message: format!("cannot encode output: {e}"),
        code: 1,
    })?;
    println!("{s}");
    Ok(())
}
