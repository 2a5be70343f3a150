//! Mail: the kinds of message renewd sends, their rendering, and the
//! transports that deliver them.
//!
//! Mail is never sent from inside a business transaction. The engine writes
//! an outbox row (kind, recipient, locale and a context snapshot) in the
//! transaction that caused it; a sender later claims the row, renders it and
//! hands it to a transport. A message's `Message-ID` derives from its outbox
//! row, so a receiver can drop the rare duplicate.

pub mod file;
pub mod smtp;
pub mod templates;

use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use jiff::Timestamp;
use lettre::message::header::ContentType;
use lettre::message::{Attachment as MimeAttachment, Mailbox, MultiPart};
use lettre::Message;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MailKind {
    OrderConfirmation,
    Receipt,
    RenewalReminder,
    UpcomingRenewal,
    CardExpiring,
    PaymentFailed,
    InvoiceIssued,
    Expired,
    Cancelled,
}

impl MailKind {
    pub const ALL: [MailKind; 9] = [
        MailKind::OrderConfirmation,
        MailKind::Receipt,
        MailKind::RenewalReminder,
        MailKind::UpcomingRenewal,
        MailKind::CardExpiring,
        MailKind::PaymentFailed,
        MailKind::InvoiceIssued,
        MailKind::Expired,
        MailKind::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MailKind::OrderConfirmation => "order_confirmation",
            MailKind::Receipt => "receipt",
            MailKind::RenewalReminder => "renewal_reminder",
            MailKind::UpcomingRenewal => "upcoming_renewal",
            MailKind::CardExpiring => "card_expiring",
            MailKind::PaymentFailed => "payment_failed",
            MailKind::InvoiceIssued => "invoice_issued",
            MailKind::Expired => "expired",
            MailKind::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for MailKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MailKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MailKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown mail kind `{s}`"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// Worth retrying: the server is down, a timeout, a 4xx reply.
    #[error("temporary delivery failure: {0}")]
    Transient(String),
    /// Retrying will not help: the recipient was rejected (5xx).
    #[error("permanent delivery failure: {0}")]
    Permanent(String),
    #[error("cannot build message: {0}")]
    Build(String),
}

/// A rendered message ready for a transport.
#[derive(Debug, Clone)]
pub struct OutgoingMail {
    pub outbox_id: i64,
    pub kind: MailKind,
    pub message: Message,
}

/// Builds one message: renders its templates and documents and encodes it.
/// This is CPU work, so it runs on the blocking pool rather than on the
/// thread polling the sweep (renewd bench, "time travel").
pub type BuildMail = Box<dyn FnOnce() -> Result<OutgoingMail, MailError> + Send>;

#[async_trait]
pub trait MailTransport: Send + Sync {
    async fn send(&self, mail: &OutgoingMail) -> Result<(), MailError>;

    /// Builds the message on the blocking pool, then sends it. A transport
    /// that itself works on the blocking pool (files) does both in one trip.
    async fn build_and_send(&self, build: BuildMail) -> Result<(), MailError> {
        let mail = tokio::task::spawn_blocking(build)
            .await
            .map_err(builder_stopped)??;
        self.send(&mail).await
    }
}

/// A build that panicked fails its message, as a rendering error does
/// (retrying renders the same row the same way); one cancelled by the
/// runtime's shutdown is retried.
pub fn builder_stopped(e: tokio::task::JoinError) -> MailError {
    if e.is_panic() {
        MailError::Build(format!("building the message panicked: {e}"))
    } else {
        MailError::Transient(format!("the mail builder stopped: {e}"))
    }
}

/// Parses `Name <address>` or a bare address into a mailbox.
pub fn parse_mailbox(s: &str) -> Option<Mailbox> {
    s.parse::<Mailbox>().ok()
}

/// The deterministic Message-ID of an outbox row.
pub fn message_id(outbox_id: i64, kind: MailKind, from: &Mailbox) -> String {
    format!(
        "<renewd.{outbox_id}.{}@{}>",
        kind.as_str(),
        from.email.domain()
    )
}

/// A file carried by a message, e.g. the invoice PDF.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub filename: String,
    pub content_type: String,
    pub bytes: Vec<u8>,
}

/// Builds the MIME message for one row: the plain-text and HTML parts as
/// alternatives, wrapped with the attachments in `multipart/mixed` when
/// there are any. The recipient must be exactly one mailbox; lettre encodes
/// every header, so no rendered value can add one.
pub fn build_message(
    outbox_id: i64,
    kind: MailKind,
    from: &Mailbox,
    to: &str,
    rendered: &templates::Rendered,
    attachments: &[Attachment],
    date: Timestamp,
) -> Result<Message, MailError> {
    let to: Mailbox = to
        .parse()
        .map_err(|e| MailError::Permanent(format!("invalid recipient: {e}")))?;
    let body = MultiPart::alternative_plain_html(rendered.text.clone(), rendered.html.clone());
    let body = if attachments.is_empty() {
        body
    } else {
        let mut mixed = MultiPart::mixed().multipart(body);
        for a in attachments {
            let content_type = ContentType::parse(&a.content_type)
                .map_err(|e| MailError::Build(format!("{}: {e}", a.content_type)))?;
            mixed = mixed.singlepart(
                MimeAttachment::new(a.filename.clone()).body(a.bytes.clone(), content_type),
            );
        }
        mixed
    };
    Message::builder()
        .from(from.clone())
        .to(to)
        .subject(rendered.subject.clone())
        .message_id(Some(message_id(outbox_id, kind, from)))
        .date(std::time::SystemTime::from(date))
        .multipart(body)
        .map_err(|e| MailError::Build(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message whose build panics fails like a rendering error (retrying
    /// builds it the same way); a build the runtime cancelled is retried.
    #[tokio::test]
    async fn a_build_that_panics_fails_its_message_and_a_cancelled_one_is_retried() {
        let panicked = tokio::task::spawn_blocking(|| -> () { panic!("template bug") })
            .await
            .unwrap_err();
        assert!(matches!(builder_stopped(panicked), MailError::Build(_)));

        let task = tokio::spawn(std::future::pending::<()>());
        task.abort();
        let cancelled = task.await.unwrap_err();
        assert!(matches!(
            builder_stopped(cancelled),
            MailError::Transient(_)
        ));
    }
}
