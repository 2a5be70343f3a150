//! `renewd mail ...`: the outbox as billing staff see it, and the one
//! repair they need: queue a failed message again once its cause is fixed.

use clap::Subcommand;

use super::{print_json, views, CliResult, Failure};
use crate::engine::{Engine, EngineError};
use crate::store::{MailFilter, StoreError};

#[derive(Debug, Subcommand)]
pub enum MailCommand {
    /// The outbox, oldest first: status, attempts and the last error.
    List {
        /// queued, sent or failed.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        subscription: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// Queue a failed message again, due now with a fresh attempt budget.
    Retry {
        id: i64,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(engine: &Engine, cmd: MailCommand) -> CliResult {
    match cmd {
        MailCommand::List {
            status,
            subscription,
            json,
        } => {
            if let Some(s) = &status {
                if !matches!(s.as_str(), "queued" | "sent" | "failed") {
                    return Err(Failure::usage(format!(
                        "--status {s:?}: use queued, sent or failed"
                    )));
                }
            }
            let all = engine
                .store
                .list_mail(&MailFilter {
                    status,
                    subscription_id: subscription,
                })
                .await
                .map_err(EngineError::from)?;
            let rows = views::list(&all, views::mail);
            if json {
                print_json(&rows)
            } else {
                for m in &rows {
                    print_line(m);
                }
                Ok(())
            }
        }
        MailCommand::Retry { id, json } => {
            let now = engine.now();
            let m = engine
                .store
                .requeue_mail(id, now)
                .await
                .map_err(|e| match e {
                    StoreError::NotFound(_) => Failure::usage(format!(
                        "mail {id} does not exist; `renewd mail list` shows the outbox"
                    )),
                    StoreError::Conflict(why) => Failure::usage(why),
                    other => Failure::from(EngineError::from(other)),
                })?;
            tracing::info!(
                mail_id = m.id,
                subscription_id = m.subscription_id,
                customer_id = m.customer_id,
                mail_kind = m.kind.as_str(),
                outcome = "requeued",
                "failed mail queued again"
            );
            let view = views::mail(&m);
            if json {
                print_json(&view)
            } else {
                println!(
                    "mail {id} queued again; the next mail delivery sends it ({} to {})",
                    m.kind.as_str(),
                    crate::domain::values::mask_email(&m.recipient)
                );
                Ok(())
            }
        }
    }
}

/// `ID STATUS attempts N KIND subscription S SUBJECT [last error: ...]`
fn print_line(m: &serde_json::Value) {
    let s = |k: &str| m[k].as_str().unwrap_or("").to_string();
    let mut line = format!(
        "{:>5}  {:<6}  attempts {:<2}  {:<18}  subscription {:<5}  {}",
        m["id"],
        s("status"),
        m["attempts"],
        s("kind"),
        m["subscription_id"],
        s("subject"),
    );
    if let Some(e) = m["last_error"].as_str().filter(|e| !e.is_empty()) {
        line.push_str(&format!("  [last error: {e}]"));
    }
    println!("{line}");
}
