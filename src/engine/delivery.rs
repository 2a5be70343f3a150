//! Delivers the outbox: claims queued mail with a lease, renders it, hands
//! it to the transport and records the result. A failure is retried with
//! exponential backoff up to `mail.max_attempts`, then marked failed; a
//! permanent rejection fails at once. One message never blocks the others:
//! each row has its own attempts, backoff and status.
//!
//! At-least-once, never silently dropped: a row is marked sent only after
//! the transport accepted it, so a crash between the relay's acceptance and
//! the write that records it sends it again on the next run, with the same
//! `Message-ID` (the receiver can drop the copy). Accepted messages are
//! recorded in groups (a group is written once `RECORD_GROUP` messages are
//! waiting, the oldest has waited `RECORD_WAIT` and no other such write is
//! still going, or the batch's sends are over), so such a crash resends the
//! group being written, those accepted since, and those still at the relay.
//! A store error stops a batch from sending more, but what was already
//! accepted is still recorded first.
//!
//! A claim is sized so that a batch of slow sends still finishes inside its
//! lease; otherwise another sender could claim the same rows and send them
//! twice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use super::{Engine, EngineError, EngineResult};
use crate::config::MailTransportKind;
use crate::domain::values::mask_email;
use crate::mail::templates::{self, Templates};
use crate::mail::{self, Attachment, MailError, MailKind, OutgoingMail};
use crate::store::{Invoice, Mail, StoreError};

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct DeliveryStats {
    pub sent: u32,
    pub retrying: u32,
    pub failed: u32,
}

const MAIL_BATCH: u32 = 100;
/// Accepted messages recorded in one write. Each write is a commit that
/// waits for the disk; writing as soon as anything was accepted made about
/// one commit per six messages, most of the commits of a simulated year
/// (renewd bench, "time travel").
const RECORD_GROUP: usize = 32;
/// How long an accepted message waits for its group to fill before it is
/// recorded anyway (once the write before it is done), so that slow sends
/// (SMTP) are still recorded soon.
const RECORD_WAIT: Duration = Duration::from_millis(100);
/// Messages the file transport writes at once.
const FILE_CONCURRENCY: usize = 8;

impl Engine {
    pub async fn deliver_mail(&self) -> EngineResult<DeliveryStats> {
        self.deliver_mail_at(self.now()).await
    }

    pub async fn deliver_mail_at(&self, now: Timestamp) -> EngineResult<DeliveryStats> {
        let mut stats = DeliveryStats::default();
        let concurrency = self.mail_concurrency();
        let batch_size = self.mail_batch_size(concurrency);
        loop {
            let claim = self.new_claim(now);
            let batch = self.store.claim_mail(now, &claim, batch_size).await?;
            if batch.is_empty() {
                return Ok(stats);
            }
            self.deliver_batch(batch, &claim.token, now, concurrency, &mut stats)
                .await?;
        }
    }

    /// Sends a claimed batch, `concurrency` messages at a time. A failure is
    /// recorded on its own. Messages the transport accepted are recorded
    /// together while the sends go on: each write takes every message
    /// accepted since the last one, once a group is due (see `RECORD_GROUP`).
    /// The writes, the sends and the failures are polled together, since a
    /// write waits for the store's writer, which another of them may hold.
    async fn deliver_batch(
        &self,
        batch: Vec<Mail>,
        token: &str,
        now: Timestamp,
        concurrency: usize,
        stats: &mut DeliveryStats,
    ) -> EngineResult<()> {
        // After an error, messages not yet started are left claimed (their
        // lease runs out and the next sender takes them); those already
        // sent are still recorded before the error is returned.
        let stopping = AtomicBool::new(false);
        let stopping = &stopping;
        let mut sends = futures::stream::iter(batch)
            .map(|m| async move {
                if stopping.load(Ordering::Relaxed) {
                    return (m, None);
                }
                let outcome = self.send_one(&m, now).await;
                (m, Some(outcome))
            })
            .buffer_unordered(concurrency);
        let mut sending = true;
        let mut accepted: Vec<Mail> = Vec::new();
        // When the oldest message in `accepted` must be recorded by.
        let mut record_by = None;
        let mut recording = None;
        let mut failing = FuturesUnordered::new();
        let mut error = None;
        loop {
            let due = !sending
                || accepted.len() >= RECORD_GROUP
                || record_by.is_some_and(|at| tokio::time::Instant::now() >= at);
            if recording.is_none() && !accepted.is_empty() && due {
                let mails = std::mem::take(&mut accepted);
                record_by = None;
                recording = Some(Box::pin(self.record_sent(mails, token, now)));
            }
            if !sending && recording.is_none() && failing.is_empty() {
                return error.map_or(Ok(()), Err);
            }
            tokio::select! {
                // Failure records wait their turn like sends did: no more
                // than `concurrency` at once.
                next = sends.next(), if sending && failing.len() < concurrency => match next {
                    Some((m, Some(Ok(())))) => {
                        record_by.get_or_insert_with(|| tokio::time::Instant::now() + RECORD_WAIT);
                        accepted.push(m);
                    }
                    Some((m, Some(Err(e)))) => failing.push(async move {
                        self.record_failure(&m, token, e, now).await
                    }),
                    Some((_, None)) => {}
                    None => sending = false,
                },
                Some(failed) = failing.next(), if !failing.is_empty() => match failed {
                    Ok(Recorded::Retrying) => stats.retrying += 1,
                    Ok(Recorded::Failed) => stats.failed += 1,
                    Ok(Recorded::LeaseLost) => {}
                    Err(e) => {
                        stopping.store(true, Ordering::Relaxed);
                        error.get_or_insert(e);
                    }
                },
                // The oldest accepted message has waited long enough.
                () = async {
                    match record_by {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                }, if recording.is_none() && record_by.is_some() => {}
                sent = async {
                    match recording.as_mut() {
                        Some(r) => r.await,
                        None => std::future::pending().await,
                    }
                }, if recording.is_some() => {
                    recording = None;
                    match sent {
                        Ok(n) => stats.sent += n,
                        Err(e) => {
                            stopping.store(true, Ordering::Relaxed);
                            error.get_or_insert(e);
                        }
                    }
                }
            }
        }
    }

    /// Messages in flight at once: the SMTP pool's size (one connection
    /// each). The file transport writes each message to its own file, so
    /// several go at once; one at a time, every message waited for its own
    /// commit of `sent` (renewd bench, "time travel").
    fn mail_concurrency(&self) -> usize {
        match self.config.raw.mail.transport {
            MailTransportKind::Smtp => {
                usize::try_from(self.config.raw.mail.smtp.pool_size.max(1)).unwrap_or(1)
            }
            MailTransportKind::File => FILE_CONCURRENCY,
        }
    }

    /// As many rows as can be sent, `concurrency` at a time and each taking
    /// up to the SMTP timeout, well inside one lease. A file is written in
    /// milliseconds: the file transport takes the largest batch.
    fn mail_batch_size(&self, concurrency: usize) -> u32 {
        if self.config.raw.mail.transport == MailTransportKind::File {
            return MAIL_BATCH;
        }
        let lease = Duration::try_from(self.config.lease).unwrap_or(Duration::from_secs(60));
        let timeout = humantime_secs(&self.config.raw.mail.smtp.timeout).max(1);
        let rounds = (lease.as_secs() / 2 / timeout).max(1);
        let n = rounds.saturating_mul(u64::try_from(concurrency).unwrap_or(1));
        u32::try_from(n).unwrap_or(MAIL_BATCH).clamp(1, MAIL_BATCH)
    }

    /// Records messages the transport accepted, in one write; returns how
    /// many were recorded.
    async fn record_sent(
        &self,
        mails: Vec<Mail>,
        token: &str,
        now: Timestamp,
    ) -> EngineResult<u32> {
        let ids: Vec<i64> = mails.iter().map(|m| m.id).collect();
        let recorded = self.store.mails_sent(&ids, token, now).await?;
        let mut sent = 0;
        for m in &mails {
            if recorded.contains(&m.id) {
                sent += 1;
                tracing::info!(
                    mail_id = m.id,
                    subscription_id = m.subscription_id,
                    customer_id = m.customer_id,
                    mail_kind = m.kind.as_str(),
                    recipient = %mask_email(&m.recipient),
                    invoice_number = m.invoice_number.as_deref(),
                    attempts = m.attempts + 1,
                    outcome = "sent",
                    "mail delivered"
                );
            } else {
                lease_lost(m, "mail sent but not recorded: the claim was taken over");
            }
        }
        Ok(sent)
    }

    async fn record_failure(
        &self,
        m: &Mail,
        token: &str,
        e: MailError,
        now: Timestamp,
    ) -> EngineResult<Recorded> {
        let recipient = mask_email(&m.recipient);
        let attempts = m.attempts + 1;
        let permanent = !matches!(e, MailError::Transient(_));
        let retry_at = (!permanent && attempts < i64::from(self.config.raw.mail.max_attempts))
            .then(|| now.saturating_add(backoff(attempts)).unwrap_or(now));
        let result = self
            .store
            .mail_failed(m.id, token, &e.to_string(), retry_at, now)
            .await;
        if result.is_ok() {
            match retry_at {
                Some(at) => tracing::warn!(
                    mail_id = m.id,
                    subscription_id = m.subscription_id,
                    customer_id = m.customer_id,
                    mail_kind = m.kind.as_str(),
                    recipient = %recipient,
                    attempts,
                    retry_at = %at,
                    error = %e,
                    outcome = "retrying",
                    "mail delivery failed; will retry"
                ),
                None => tracing::error!(
                    mail_id = m.id,
                    subscription_id = m.subscription_id,
                    customer_id = m.customer_id,
                    mail_kind = m.kind.as_str(),
                    recipient = %recipient,
                    attempts,
                    error = %e,
                    outcome = "failed",
                    "mail delivery failed for good; `renewd mail retry {}` queues it again",
                    m.id
                ),
            }
        }
        let result = result.map(|()| {
            if retry_at.is_some() {
                Recorded::Retrying
            } else {
                Recorded::Failed
            }
        });
        match result {
            Ok(r) => Ok(r),
            Err(StoreError::Conflict(_)) => {
                lease_lost(m, "mail outcome not recorded: the claim was taken over");
                Ok(Recorded::LeaseLost)
            }
            Err(e) => Err(EngineError::from(e)),
        }
    }

    /// The templates this engine's config names (loaded once per process).
    fn templates(&self) -> Result<std::sync::Arc<Templates>, MailError> {
        let dir = &self.config.raw.mail.templates_dir;
        templates::for_dir((!dir.is_empty()).then(|| std::path::Path::new(dir)))
            // The operator's directory broke after startup: keep the mail
            // queued until it is fixed rather than failing it.
            .map_err(|e| MailError::Transient(e.to_string()))
    }

    /// Renders and sends one message. What needs the store (the invoice a
    /// message carries) is read here; the rendering, the invoice's
    /// documents and the MIME encoding are CPU work and go to the blocking
    /// pool with the transport's own (`MailTransport::build_and_send`).
    async fn send_one(&self, m: &Mail, now: Timestamp) -> Result<(), MailError> {
        let templates = self.templates()?;
        let from = mail::parse_mailbox(&self.config.raw.mail.from)
            .ok_or_else(|| MailError::Build("mail.from is not a mailbox".into()))?;
        let invoice = self.invoice_to_attach(m).await?;
        let invoice_dir = self.config.invoice_dir();
        let (id, kind, locale, recipient) = (m.id, m.kind, m.locale.clone(), m.recipient.clone());
        let context = context_of(m);
        self.transport
            .build_and_send(Box::new(move || {
                let rendered = templates
                    .render(kind, &locale, &context)
                    .map_err(|e| MailError::Build(e.to_string()))?;
                let attachments = match invoice {
                    Some(invoice) => vec![invoice_pdf(&invoice_dir, &invoice)?],
                    None => vec![],
                };
                let message =
                    mail::build_message(id, kind, &from, &recipient, &rendered, &attachments, now)?;
                Ok(OutgoingMail {
                    outbox_id: id,
                    kind,
                    message,
                })
            }))
            .await
    }

    /// The invoice a message is about, for the kinds that carry it as a PDF
    /// (order confirmations, receipts and issued invoices).
    async fn invoice_to_attach(&self, m: &Mail) -> Result<Option<Invoice>, MailError> {
        let carries_invoice = matches!(
            m.kind,
            MailKind::OrderConfirmation | MailKind::Receipt | MailKind::InvoiceIssued
        );
        let Some(number) = m.invoice_number.as_deref().filter(|_| carries_invoice) else {
            return Ok(None);
        };
        self.store
            .invoice(number)
            .await
            .map_err(|e| MailError::Transient(format!("cannot load invoice {number}: {e}")))?
            .ok_or_else(|| MailError::Build(format!("invoice {number} does not exist")))
            .map(Some)
    }
}

/// The invoice's PDF as an attachment (its documents are kept under `dir`
/// as they are sent; see `invoice::render_for_mail`).
fn invoice_pdf(dir: &std::path::Path, invoice: &Invoice) -> Result<Attachment, MailError> {
    let number = &invoice.number;
    let pdf = crate::invoice::render_for_mail(dir, invoice)
        .map_err(|e| MailError::Build(format!("cannot render invoice {number}: {e}")))?;
    Ok(Attachment {
        filename: format!("{number}.pdf"),
        content_type: "application/pdf".into(),
        bytes: pdf,
    })
}

enum Recorded {
    Retrying,
    Failed,
    LeaseLost,
}

/// Another sender took the row over after this claim's lease ran out; the
/// row is theirs to record now.
fn lease_lost(m: &Mail, message: &'static str) {
    tracing::warn!(
        mail_id = m.id,
        subscription_id = m.subscription_id,
        outcome = "lease_lost",
        "{message}"
    );
}

/// Renders a stored mail with the process's templates (see
/// `templates::install`); used to show subjects in `renewd mail list`.
pub fn render(m: &Mail) -> Result<templates::Rendered, MailError> {
    templates::render(m.kind, &m.locale, &context_of(m))
        .map_err(|e| MailError::Build(e.to_string()))
}

/// The row's context with its invoice number merged in.
fn context_of(m: &Mail) -> serde_json::Value {
    let mut ctx = m.context.clone();
    if let (Some(n), Some(obj)) = (&m.invoice_number, ctx.as_object_mut()) {
        obj.insert("invoice_number".into(), serde_json::json!(n));
    }
    ctx
}

fn humantime_secs(s: &str) -> u64 {
    s.parse::<SignedDuration>()
        .ok()
        .and_then(|d| u64::try_from(d.as_secs()).ok())
        .unwrap_or(30)
}

/// 1, 2, 4, 8 ... minutes, capped at six hours.
fn backoff(attempts: i64) -> SignedDuration {
    let exp = u32::try_from(attempts.clamp(1, 20) - 1).unwrap_or(0);
    SignedDuration::from_mins(2i64.saturating_pow(exp).min(360))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_minute_up_to_six_hours() {
        let mins: Vec<i64> = (1..=12).map(|a| backoff(a).as_secs() / 60).collect();
        assert_eq!(mins, [1, 2, 4, 8, 16, 32, 64, 128, 256, 360, 360, 360]);
    }
}
