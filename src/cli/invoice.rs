//! `renewd invoice ...`

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};

use super::{print_json, views, CliResult, Failure};
use crate::engine::{Engine, EngineError};
use crate::invoice as docs;
use crate::store::Invoice;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Html,
    Pdf,
}

#[derive(Debug, Subcommand)]
pub enum InvoiceCommand {
    /// List invoices in number order.
    List {
        #[arg(long)]
        subscription: Option<i64>,
        #[arg(long)]
        json: bool,
    },
    /// Show one invoice.
    Show {
        number: String,
        #[arg(long)]
        json: bool,
    },
    /// Record the bank transfer that pays an open invoice.
    MarkPaid {
        number: String,
        /// The bank's reference of the transfer.
        #[arg(long)]
        reference: String,
        #[arg(long)]
        json: bool,
    },
    /// Write an invoice document.
    Download {
        number: String,
        #[arg(long, value_enum, default_value = "html")]
        format: Format,
        /// Where to write it (default: NUMBER.html in the current directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

async fn find(engine: &Engine, number: &str) -> Result<Invoice, Failure> {
    engine
        .store
        .invoice(number)
        .await
        .map_err(EngineError::from)?
        .ok_or_else(|| {
            Failure::usage(format!(
                "invoice {number} not found; see `renewd invoice list`"
            ))
        })
}

pub async fn run(engine: &Engine, cmd: InvoiceCommand) -> CliResult {
    match cmd {
        InvoiceCommand::List { subscription, json } => {
            let all = engine
                .store
                .list_invoices(subscription)
                .await
                .map_err(EngineError::from)?;
            if json {
                print_json(&views::list(&all, |i| views::invoice(i, false)))
            } else {
                for i in &all {
                    println!(
                        "{} subscription {} {} {} {} issued {}",
                        i.number,
                        i.subscription_id,
                        i.status,
                        i.total_minor,
                        i.currency,
                        i.issued_at
                    );
                }
                Ok(())
            }
        }
        InvoiceCommand::Show { number, json } => {
            let i = find(engine, &number).await?;
            if json {
                print_json(&views::invoice(&i, true))
            } else {
                println!(
                    "{} subscription {} {} total {} {} (tax {}) period {} – {}",
                    i.number,
                    i.subscription_id,
                    i.status,
                    i.total_minor,
                    i.currency,
                    i.tax_minor,
                    i.period_start,
                    i.period_end
                );
                Ok(())
            }
        }
        InvoiceCommand::MarkPaid {
            number,
            reference,
            json,
        } => {
            let i = engine.mark_paid(&number, &reference).await?;
            if json {
                print_json(&views::invoice(&i, false))
            } else {
                println!(
                    "{} paid (reference {}); subscription {} renewed",
                    i.number,
                    reference.trim(),
                    i.subscription_id
                );
                Ok(())
            }
        }
        InvoiceCommand::Download {
            number,
            format,
            out,
        } => {
            let i = find(engine, &number).await?;
            let (bytes, ext) = match format {
                Format::Html => (docs::render_html(&i).map(String::into_bytes), "html"),
                Format::Pdf => (docs::render_pdf(&i), "pdf"),
            };
            let bytes = bytes.map_err(|e| Failure {
                message: e.to_string(),
                code: 1,
            })?;
            let path = out.unwrap_or_else(|| PathBuf::from(format!("{number}.{ext}")));
            std::fs::write(&path, bytes).map_err(|e| Failure {
                message: format!("cannot write {}: {e}", path.display()),
                code: 1,
            })?;
            println!("{}", path.display());
            Ok(())
        }
    }
}
