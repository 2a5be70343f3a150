//! `renewd request ...`: support requests; cancellation goes through one.

use clap::{Subcommand, ValueEnum};

use super::{print_json, CliResult, Failure};
use crate::engine::{CancelAt, Engine, EngineError};
use crate::store::Request;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum When {
    Now,
    PeriodEnd,
}

#[derive(Debug, Subcommand)]
pub enum RequestCommand {
    /// Open a request for a subscription.
    Open {
        #[arg(long)]
        subscription: i64,
        /// cancel
        #[arg(long)]
        kind: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        json: bool,
    },
    /// Show one request.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// List requests, oldest first.
    List {
        /// open, in_progress, resolved or rejected.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Mark a request as being worked on.
    Start {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Resolve a cancellation: cancel now or at the period end.
    Resolve {
        id: i64,
        #[arg(long, value_enum)]
        cancel: When,
        #[arg(long)]
        json: bool,
    },
    /// Reject a request, saying why.
    Reject {
        id: i64,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        json: bool,
    },
}

fn show(r: &Request, json: bool) -> CliResult {
    if json {
        return print_json(r);
    }
    println!(
        "request {} subscription {} {} {} reason {:?}{}",
        r.id,
        r.subscription_id,
        r.kind,
        r.status,
        r.reason,
        r.resolution
            .as_ref()
            .map(|x| format!(" resolution {x:?}"))
            .unwrap_or_default()
    );
    Ok(())
}

pub async fn run(engine: &Engine, cmd: RequestCommand) -> CliResult {
    match cmd {
        RequestCommand::Open {
            subscription,
            kind,
            reason,
            json,
        } => show(
            &engine.open_request(subscription, &kind, &reason).await?,
            json,
        ),
        RequestCommand::Show { id, json } => show(&engine.request(id).await?, json),
        RequestCommand::List { status, json } => {
            if let Some(s) = &status {
                if !matches!(s.as_str(), "open" | "in_progress" | "resolved" | "rejected") {
                    return Err(Failure::usage(format!(
                        "--status {s:?}: use open, in_progress, resolved or rejected"
                    )));
                }
            }
            let all = engine
                .store
                .list_requests(status.as_deref())
                .await
                .map_err(EngineError::from)?;
            if json {
                return print_json(&all);
            }
            for r in &all {
                show(r, false)?;
            }
            Ok(())
        }
        RequestCommand::Start { id, json } => show(&engine.start_request(id).await?, json),
        RequestCommand::Resolve { id, cancel, json } => {
            let at = match cancel {
                When::Now => CancelAt::Now,
                When::PeriodEnd => CancelAt::PeriodEnd,
            };
            show(&engine.resolve_request(id, at).await?, json)
        }
        RequestCommand::Reject { id, reason, json } => {
            show(&engine.reject_request(id, &reason).await?, json)
        }
    }
}
