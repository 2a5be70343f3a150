//! `renewd mail ...`

use clap::Subcommand;

use super::{print_json, views, CliResult, Failure};
use crate::engine::{Engine, EngineError};
use crate::store::MailFilter;

#[derive(Debug, Subcommand)]
pub enum MailCommand {
    /// The outbox, oldest first.
    List {
        /// queued, sent or failed.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        subscription: Option<i64>,
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
                    println!(
                        "{} {} subscription {} {} {}",
                        m["id"],
                        m["status"].as_str().unwrap_or(""),
                        m["subscription_id"],
                        m["kind"].as_str().unwrap_or(""),
                        m["subject"].as_str().unwrap_or("")
                    );
                }
                Ok(())
            }
        }
    }
}
