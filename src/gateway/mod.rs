//! Payment gateways: the [`PaymentGateway`] trait and its adapters.
//!
//! A gateway charges a stored payment method off-session under an
//! idempotency key, and can be asked later what happened to a key. Its
//! error tells a hard decline (do not retry) from a soft decline (retry on
//! schedule) from an unknown outcome (reconcile with the same key, never
//! resend with a new one).

pub mod sandbox;
pub mod stripe;

use async_trait::async_trait;
use serde::Serialize;

use crate::domain::Money;

#[derive(Debug, Clone)]
pub struct ChargeRequest {
    pub idempotency_key: String,
    pub payment_method: String,
    pub amount: Money,
    pub description: String,
    /// Our attempt id, sent as metadata so the processor's records point back.
    pub attempt_id: i64,
    pub subscription_id: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Charge {
    /// The processor's id for the charge (e.g. `ch_...`, `pi_...`).
    pub reference: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// The card was refused for a reason a retry will not fix.
    #[error("card declined ({code}): {message}")]
    HardDecline { code: String, message: String },
    /// The card was refused for a reason that may pass later.
    #[error("card declined for now ({code}): {message}")]
    SoftDecline { code: String, message: String },
    /// The request may or may not have charged: a timeout, a 5xx, a broken
    /// connection. Reconcile with the same key.
    #[error("outcome unknown: {0}")]
    Unknown(String),
}

impl GatewayError {
    pub fn decline_kind(&self) -> Option<&'static str> {
        match self {
            GatewayError::HardDecline { .. } => Some("hard"),
            GatewayError::SoftDecline { .. } => Some("soft"),
            GatewayError::Unknown(_) => None,
        }
    }

    pub fn code(&self) -> &str {
        match self {
            GatewayError::HardDecline { code, .. } | GatewayError::SoftDecline { code, .. } => code,
            GatewayError::Unknown(_) => "unknown",
        }
    }
}

/// What the gateway knows about an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The gateway never saw this key: nothing was charged.
    NotFound,
    Charged(Charge),
    /// The key was seen and declined.
    Declined(GatewayError),
}

/// What may be shown of a card: brand and last four digits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CardDetails {
    pub brand: String,
    pub last4: String,
}

#[async_trait]
pub trait PaymentGateway: Send + Sync {
    async fn charge(&self, req: &ChargeRequest) -> Result<Charge, GatewayError>;
    async fn lookup(&self, idempotency_key: &str) -> Result<Lookup, GatewayError>;
    /// Brand and last four of a stored payment method; an error when the
    /// gateway does not know the token.
    async fn card_details(&self, payment_method: &str) -> Result<CardDetails, GatewayError>;
}
