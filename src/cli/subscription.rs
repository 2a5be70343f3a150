//! `renewd subscription ...`

use clap::{Subcommand, ValueEnum};

use super::{parse_now, print_json, views, CliResult, Failure};
use crate::domain::Status;
use crate::engine::{ContactInput, Engine, FlowResult, PurchaseInput, RenewInput};
use crate::store::{Subscription, SubscriptionFilter};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// The bank-transfer contact (with --bank-transfer).
#[derive(Debug, Clone, clap::Args)]
pub struct Contact {
    #[arg(long)]
    contact_name: Option<String>,
    #[arg(long)]
    contact_phone: Option<String>,
    #[arg(long)]
    contact_email: Option<String>,
}

impl Contact {
    fn input(self, bank_transfer: bool) -> Result<Option<ContactInput>, Failure> {
        let given = self.contact_name.is_some()
            || self.contact_phone.is_some()
            || self.contact_email.is_some();
        if !bank_transfer {
            return if given {
                Err(Failure::usage(
                    "--contact-* options go with --bank-transfer",
                ))
            } else {
                Ok(None)
            };
        }
        match (self.contact_name, self.contact_phone, self.contact_email) {
            (Some(name), Some(phone), Some(email)) => Ok(Some(ContactInput { name, phone, email })),
            _ => Err(Failure::usage(
                "--bank-transfer needs --contact-name, --contact-phone and --contact-email",
            )),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum SubscriptionCommand {
    /// Buy a subscription; a card is charged at once.
    Purchase {
        #[arg(long)]
        customer: i64,
        #[arg(long)]
        plan: Option<String>,
        /// The Terms and Conditions version the customer accepted (see `renewd terms`).
        #[arg(long, value_name = "VERSION")]
        accept_terms: Option<String>,
        /// A stored payment method token, e.g. pm_card_visa (never a card number).
        #[arg(long, value_name = "PM_TOKEN")]
        card: Option<String>,
        /// YYYY-MM; a card expiring before a renewal triggers a warning email.
        #[arg(long, value_name = "YYYY-MM")]
        card_expiry: Option<String>,
        /// Pay by electronic bank transfer (an open invoice is issued).
        #[arg(long)]
        bank_transfer: bool,
        #[command(flatten)]
        contact: Contact,
        #[arg(long)]
        json: bool,
    },
    /// Renew now: by card (charged at once) or bank transfer (open invoice).
    Renew {
        id: i64,
        #[arg(long, value_name = "VERSION")]
        accept_terms: Option<String>,
        /// A new card to pay with (default: the stored payment method).
        #[arg(long, value_name = "PM_TOKEN")]
        card: Option<String>,
        #[arg(long, value_name = "YYYY-MM")]
        card_expiry: Option<String>,
        #[arg(long)]
        bank_transfer: bool,
        #[command(flatten)]
        contact: Contact,
        /// Keep automatic renewal off after this renewal.
        #[arg(long)]
        no_auto_renew: bool,
        #[arg(long)]
        json: bool,
    },
    /// Store a new card; the next renewal (or pending retry) uses it.
    PaymentMethod {
        id: i64,
        #[arg(long, value_name = "PM_TOKEN")]
        card: String,
        #[arg(long, value_name = "YYYY-MM")]
        card_expiry: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show one subscription.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// List subscriptions.
    List {
        /// pending_payment, active, past_due, expired or cancelled.
        #[arg(long)]
        status: Option<String>,
        /// Only those whose current period ends before this instant.
        #[arg(long, value_name = "T")]
        due_before: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Turn automatic renewal on or off.
    AutoRenew {
        id: i64,
        #[arg(value_enum)]
        switch: Switch,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(engine: &Engine, cmd: SubscriptionCommand) -> CliResult {
    match cmd {
        SubscriptionCommand::Purchase {
            customer,
            plan,
            accept_terms,
            card,
            card_expiry,
            bank_transfer,
            contact,
            json,
        } => {
            // Terms first: without acceptance the payment is refused whatever else is wrong.
            engine.check_terms(accept_terms.as_deref())?;
            if let Some(contact) = contact.input(bank_transfer)? {
                if card.is_some() {
                    return Err(Failure::usage(
                        "choose one payment method: --card or --bank-transfer",
                    ));
                }
                let r = engine
                    .purchase_by_transfer(customer, plan, accept_terms.as_deref(), &contact)
                    .await?;
                return report(r, json);
            }
            let card = card.ok_or_else(|| {
                Failure::usage("choose a payment method: --card PM_TOKEN (e.g. pm_card_visa)")
            })?;
            let result = engine
                .purchase(PurchaseInput {
                    customer_id: customer,
                    plan,
                    accept_terms,
                    card,
                    card_expiry,
                })
                .await?;
            if json {
                let mut v = views::subscription(&result.subscription);
                v["invoice"] = result
                    .invoice
                    .as_ref()
                    .map(|i| views::invoice(i, false))
                    .unwrap_or_default();
                print_json(&v)?;
            } else {
                print_subscription(&result.subscription);
                if let Some(inv) = &result.invoice {
                    println!("paid: invoice {}", inv.number);
                }
            }
            match result.problem {
                Some(p) => Err(Failure {
                    message: p,
                    code: 1,
                }),
                None => Ok(()),
            }
        }
        SubscriptionCommand::Renew {
            id,
            accept_terms,
            card,
            card_expiry,
            bank_transfer,
            contact,
            no_auto_renew,
            json,
        } => {
            engine.check_terms(accept_terms.as_deref())?;
            let bank_transfer = contact.input(bank_transfer)?;
            let r = engine
                .renew(RenewInput {
                    subscription_id: id,
                    accept_terms,
                    card,
                    card_expiry,
                    bank_transfer,
                    no_auto_renew,
                })
                .await?;
            report(r, json)
        }
        SubscriptionCommand::PaymentMethod {
            id,
            card,
            card_expiry,
            json,
        } => {
            let s = engine
                .set_payment_method(id, &card, card_expiry.as_deref())
                .await?;
            if json {
                print_json(&views::subscription(&s))
            } else {
                print_subscription(&s);
                Ok(())
            }
        }
        SubscriptionCommand::Show { id, json } => {
            let s = engine.subscription(id).await?;
            if json {
                print_json(&views::subscription(&s))
            } else {
                print_subscription(&s);
                Ok(())
            }
        }
        SubscriptionCommand::List {
            status,
            due_before,
            json,
        } => {
            let status = status
                .map(|s| {
                    s.parse::<Status>()
                        .map_err(|e| Failure::usage(e.to_string()))
                })
                .transpose()?;
            let due_before = due_before
                .map(|t| {
                    parse_now(&t).map_err(|_| {
                        Failure::usage(format!("--due-before {t:?} is not an RFC 3339 instant"))
                    })
                })
                .transpose()?;
            let subs = engine
                .store
                .list_subscriptions(&SubscriptionFilter { status, due_before })
                .await
                .map_err(crate::engine::EngineError::from)?;
            if json {
                print_json(&views::list(&subs, views::subscription))
            } else {
                subs.iter().for_each(print_subscription);
                Ok(())
            }
        }
        SubscriptionCommand::AutoRenew { id, switch, json } => {
            let s = engine
                .set_auto_renew(id, matches!(switch, Switch::On))
                .await?;
            if json {
                print_json(&views::subscription(&s))
            } else {
                print_subscription(&s);
                Ok(())
            }
        }
    }
}

/// Prints the subscription and invoice a purchase or renewal led to; a
/// payment that did not go through is the command's error.
fn report(r: FlowResult, json: bool) -> CliResult {
    if json {
        let mut v = views::subscription(&r.subscription);
        v["invoice"] = r
            .invoice
            .as_ref()
            .map(|i| views::invoice(i, false))
            .unwrap_or_default();
        print_json(&v)?;
    } else {
        print_subscription(&r.subscription);
        if let Some(inv) = &r.invoice {
            println!(
                "invoice {} {} (total {} {})",
                inv.number, inv.status, inv.total_minor, inv.currency
            );
        }
    }
    match r.problem {
        Some(p) => Err(Failure {
            message: p,
            code: 1,
        }),
        None => Ok(()),
    }
}

fn print_subscription(s: &Subscription) {
    println!(
        "subscription {} customer {} plan {} {} auto-renew {}{} period ends {}",
        s.id,
        s.customer_id,
        s.plan,
        s.status,
        if s.auto_renew.on { "on" } else { "off" },
        if s.auto_renew.can_enable {
            ""
        } else {
            " (locked until renewed)"
        },
        s.current_period_end
            .map(|t| t.to_string())
            .unwrap_or_else(|| "-".into()),
    );
}
