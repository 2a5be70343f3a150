//! `renewd customer ...`

use clap::Subcommand;

use super::{print_json, views, CliResult};
use crate::engine::{Engine, NewCustomerInput};

#[derive(Debug, Subcommand)]
pub enum CustomerCommand {
    /// Add a customer.
    Add {
        #[arg(long)]
        name: String,
        #[arg(long)]
        email: String,
        /// IANA time zone, e.g. Asia/Tokyo (default from config).
        #[arg(long)]
        timezone: Option<String>,
        /// en or ja.
        #[arg(long)]
        locale: Option<String>,
        /// ISO 3166-1 alpha-2, e.g. JP.
        #[arg(long)]
        country: Option<String>,
        /// ISO 4217, e.g. JPY.
        #[arg(long)]
        currency: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(engine: &Engine, cmd: CustomerCommand) -> CliResult {
    match cmd {
        CustomerCommand::Add {
            name,
            email,
            timezone,
            locale,
            country,
            currency,
            json,
        } => {
            let c = engine
                .add_customer(NewCustomerInput {
                    name,
                    email,
                    timezone,
                    locale,
                    country,
                    currency,
                })
                .await?;
            if json {
                print_json(&views::customer(&c))
            } else {
                println!(
                    "customer {} added: {} ({}, {}, {})",
                    c.id, c.name, c.timezone, c.locale, c.currency
                );
                Ok(())
            }
        }
    }
}
