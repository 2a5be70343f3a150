//! Delivers the outbox: claims queued mail with a lease, renders it, hands
//! it to the transport and records the result. A failure is retried with
//! exponential backoff up to `mail.max_attempts`, then marked failed; a
//! permanent rejection fails at once. One message never blocks the others.

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use super::{Engine, EngineResult};
use crate::domain::values::mask_email;
use crate::mail::{self, templates, MailError, OutgoingMail};
use crate::store::Mail;

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct DeliveryStats {
    pub sent: u32,
    pub retrying: u32,
    pub failed: u32,
}

const MAIL_BATCH: u32 = 100;

impl Engine {
    pub async fn deliver_mail(&self) -> EngineResult<DeliveryStats> {
        self.deliver_mail_at(self.now()).await
    }

    pub async fn deliver_mail_at(&self, now: Timestamp) -> EngineResult<DeliveryStats> {
        let mut stats = DeliveryStats::default();
        loop {
            let claim = self.new_claim(now);
            let batch = self.store.claim_mail(now, &claim, MAIL_BATCH).await?;
            if batch.is_empty() {
                return Ok(stats);
            }
            for m in batch {
                match self.send_one(&m, now).await {
                    Ok(()) => {
                        self.store.mail_sent(m.id, &claim.token, now).await?;
                        stats.sent += 1;
                        tracing::info!(
                            mail_id = m.id,
                            subscription_id = m.subscription_id,
                            customer_id = m.customer_id,
                            mail_kind = m.kind.as_str(),
                            recipient = %mask_email(&m.recipient),
                            invoice_number = m.invoice_number.as_deref(),
                            outcome = "sent",
                            "mail delivered"
                        );
                    }
                    Err(e) => {
                        let attempts = m.attempts + 1;
                        let permanent = !matches!(e, MailError::Transient(_));
                        let retry_at = (!permanent
                            && attempts < i64::from(self.config.raw.mail.max_attempts))
                        .then(|| now.saturating_add(backoff(attempts)).unwrap_or(now));
                        self.store
                            .mail_failed(m.id, &claim.token, &e.to_string(), retry_at, now)
                            .await?;
                        if retry_at.is_some() {
                            stats.retrying += 1;
                            tracing::warn!(mail_id = m.id, subscription_id = m.subscription_id, mail_kind = m.kind.as_str(), attempts, error = %e, outcome = "retrying", "mail delivery failed; will retry");
                        } else {
                            stats.failed += 1;
                            tracing::error!(mail_id = m.id, subscription_id = m.subscription_id, mail_kind = m.kind.as_str(), attempts, error = %e, outcome = "failed", "mail delivery failed for good");
                        }
                    }
                }
            }
        }
    }

    async fn send_one(&self, m: &Mail, now: Timestamp) -> Result<(), MailError> {
        let rendered = render(m)?;
        let from = mail::parse_mailbox(&self.config.raw.mail.from)
            .ok_or_else(|| MailError::Build("mail.from is not a mailbox".into()))?;
        let message = mail::build_message(m.id, m.kind, &from, &m.recipient, &rendered, now)?;
        self.transport
            .send(&OutgoingMail {
                outbox_id: m.id,
                kind: m.kind,
                message,
            })
            .await
    }
}

/// Renders a stored mail with its invoice number merged into the context.
pub fn render(m: &Mail) -> Result<templates::Rendered, MailError> {
    let mut ctx = m.context.clone();
    if let (Some(n), Some(obj)) = (&m.invoice_number, ctx.as_object_mut()) {
        obj.insert("invoice_number".into(), serde_json::json!(n));
    }
    templates::render(m.kind, &m.locale, &ctx).map_err(|e| MailError::Build(e.to_string()))
}

/// 1, 2, 4, 8 ... minutes, capped at six hours.
fn backoff(attempts: i64) -> SignedDuration {
    let exp = u32::try_from(attempts.clamp(1, 20) - 1).unwrap_or(0);
    SignedDuration::from_mins(2i64.saturating_pow(exp).min(360))
}
