//! The engine: wires the domain to the store, the gateway and the mail
//! outbox. The sweep, the charge of one renewal, the CLI's commands and mail
//! delivery all live here; nothing here reads the system time (every entry
//! point takes `now` from the clock once and passes it down).

mod charge;
mod commands;
mod delivery;
mod flows;
mod sweep;

use std::sync::Arc;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde_json::json;

pub use commands::{NewCustomerInput, PurchaseInput, PurchaseResult};
pub use delivery::render as render_mail;
pub use delivery::DeliveryStats;
pub use flows::{CancelAt, ContactInput, FlowResult, RenewInput};
pub(crate) use sweep::PhaseTimes;
pub use sweep::{PlannedAction, SweepPlan, SweepSummary};

use crate::clock::SharedClock;
use crate::config::Config;
use crate::domain::invoice::{self, InvoiceAmounts, LineInput};
use crate::domain::values::Zone;
use crate::domain::{term, Currency, Money};
use crate::gateway::PaymentGateway;
use crate::mail::MailTransport;
use crate::store::{Claim, Customer, PaymentMethod, Store, StoreError, Subscription};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The input is malformed; nothing was written.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// A business rule refuses the request; nothing was written.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(StoreError),
    #[error("{0}")]
    Internal(String),
}

pub type EngineResult<T> = Result<T, EngineError>;

impl From<StoreError> for EngineError {
    /// A guarded write that found the data changed (or a renewal busy) is a
    /// refusal the person can act on, not an internal failure.
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => EngineError::Refused(m),
            other => EngineError::Store(other),
        }
    }
}

pub(crate) fn invalid_input(e: impl std::fmt::Display) -> EngineError {
    EngineError::Invalid(e.to_string())
}

/// An optional instant for messages.
pub(crate) fn fmt_ts(t: Option<Timestamp>) -> String {
    t.map(|t| t.to_string()).unwrap_or_else(|| "-".into())
}

pub struct Engine {
    pub store: Arc<dyn Store>,
    pub gateway: Arc<dyn PaymentGateway>,
    pub transport: Arc<dyn MailTransport>,
    pub clock: SharedClock,
    pub config: Arc<Config>,
    /// `host:pid`, written into leases and log lines.
    pub instance: String,
}

/// The name this process goes by in leases and logs.
pub fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", std::process::id())
}

impl Engine {
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    fn new_claim(&self, now: Timestamp) -> Claim {
        Claim {
            token: uuid::Uuid::new_v4().to_string(),
            owner: self.instance.clone(),
            expires_at: now.saturating_add(self.config.lease).unwrap_or(now),
        }
    }

    fn zone_of(&self, customer: &Customer) -> TimeZone {
        Zone::parse(&customer.timezone)
            .map(|z| z.tz().clone())
            .unwrap_or(TimeZone::UTC)
    }

    fn local_date(&self, t: Timestamp, customer: &Customer) -> String {
        t.to_zoned(self.zone_of(customer)).date().to_string()
    }

    /// The end instant of term `n` of a subscription anchored on `anchor`.
    fn period_end(
        &self,
        anchor: jiff::civil::Date,
        n: i64,
        customer: &Customer,
    ) -> EngineResult<Timestamp> {
        term::period_end(anchor, n, &self.zone_of(customer), self.config.local_time)
            .map_err(|e| EngineError::Internal(e.to_string()))
    }

    fn plan_name(&self, plan: &str) -> String {
        self.config
            .raw
            .plans
            .get(plan)
            .map(|p| p.name.clone())
            .unwrap_or_else(|| plan.to_string())
    }

    /// What one year of `plan` costs `customer` today: lines, tax, total.
    fn price_year(&self, plan: &str, customer: &Customer) -> EngineResult<InvoiceAmounts> {
        let currency =
            Currency::parse(&customer.currency).map_err(|e| EngineError::Invalid(e.to_string()))?;
        let price = self.config.price(plan, currency).ok_or_else(|| {
            EngineError::Refused(format!(
                "plan `{plan}` has no price in {currency}; add one under [plans.{plan}.prices] or use a currency it is sold in"
            ))
        })?;
        invoice::calculate(
            currency,
            &[LineInput {
                description: self.plan_name(plan),
                quantity: 1,
                unit_amount_minor: price,
                tax_rate_bp: self.config.tax_rate_bp(&customer.country),
            }],
        )
        .map_err(|e| EngineError::Internal(e.to_string()))
    }

    fn money(&self, minor: i64, currency: &str) -> String {
        Currency::parse(currency)
            .map(|c| Money::new(minor, c).display())
            .unwrap_or_else(|_| format!("{minor} {currency}"))
    }

    fn renew_command(&self, sub: &Subscription) -> String {
        format!(
            "renewd subscription renew {} --accept-terms {} --card <payment method>",
            sub.id, self.config.raw.terms.current
        )
    }

    /// The context every mail about `sub` starts from.
    fn mail_context(&self, sub: &Subscription, customer: &Customer) -> serde_json::Value {
        let card = match &sub.payment {
            PaymentMethod::Card { brand, last4, .. } => format!("{brand} •••• {last4}"),
            PaymentMethod::BankTransfer { .. } => String::new(),
        };
        let amount = self
            .price_year(&sub.plan, customer)
            .map(|a| self.money(a.total_minor, &a.currency))
            .unwrap_or_default();
        json!({
            "customer_name": customer.name,
            "subscription_id": sub.id,
            "plan_name": self.plan_name(&sub.plan),
            "seller_name": self.config.raw.seller.name,
            "renew_command": self.renew_command(sub),
            "period_end_date": sub.current_period_end.map(|e| self.local_date(e, customer)),
            // The exact instant and the zone, so a mail can say "at 00:00 on
            // March 1 (Asia/Tokyo time)" rather than only a date.
            "period_end_at": sub.current_period_end.map(|e| e.to_string()),
            "timezone": customer.timezone,
            "card": card,
            "amount": amount,
        })
    }

    /// The frozen seller, buyer and payment details an invoice carries.
    fn invoice_document(
        &self,
        sub: &Subscription,
        customer: &Customer,
        amounts: &InvoiceAmounts,
    ) -> serde_json::Value {
        let seller = &self.config.raw.seller;
        let payment = match &sub.payment {
            PaymentMethod::Card { brand, last4, .. } => {
                json!({"kind": "card", "brand": brand, "last4": last4})
            }
            PaymentMethod::BankTransfer { contact_name, .. } => {
                json!({"kind": "bank_transfer", "contact_name": contact_name})
            }
        };
        json!({
            "seller": {"name": seller.name, "address": seller.address, "email": seller.email, "tax_id": seller.tax_id},
            "buyer": {"name": customer.name, "email": customer.email, "country": customer.country},
            "plan": {"id": sub.plan, "name": self.plan_name(&sub.plan)},
            "locale": customer.locale,
            "timezone": self.config.raw.invoice.timezone,
            "lines": amounts.lines,
            "taxes": amounts.taxes,
            "payment": payment,
        })
    }
}
