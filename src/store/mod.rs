//! Persistence behind one trait, so the engine never knows which database
//! it talks to. `sqlite` is the embedded default; a PostgreSQL adapter
//! implements the same trait.
//!
//! State changes go through [`Store::apply`]: the engine decides (with the
//! domain) what must change and hands the store one [`Change`], which the
//! store writes in a single transaction or not at all. When the change
//! carries a [`Lease`], the store first checks that the lease is still
//! held, so a worker whose claim was taken over cannot write.

pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use jiff::civil::Date;
use jiff::Timestamp;
use serde::Serialize;

use crate::domain::invoice::InvoiceAmounts;
use crate::domain::{AutoRenew, Status};
use crate::mail::MailKind;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    /// The lease on a renewal was taken over by another worker.
    #[error("lease on renewal {0} is no longer held")]
    LeaseLost(i64),
    /// A guarded update found the row changed since it was read.
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("database schema is at version {found}, newer than this renewd knows ({known}); run the newer renewd or restore the database")]
    SchemaTooNew { found: i64, known: i64 },
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, Serialize)]
pub struct Customer {
    pub id: i64,
    pub name: String,
    pub email: String,
    pub timezone: String,
    pub locale: String,
    pub country: String,
    pub currency: String,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone)]
pub struct NewCustomer {
    pub name: String,
    pub email: String,
    pub timezone: String,
    pub locale: String,
    pub country: String,
    pub currency: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PaymentMethod {
    Card {
        /// The gateway's token for the stored card (`pm_...`), never a number.
        token: String,
        brand: String,
        last4: String,
        expiry: Option<String>,
    },
    BankTransfer {
        contact_name: String,
        contact_phone: String,
        contact_email: String,
    },
}

impl PaymentMethod {
    pub fn kind(&self) -> &'static str {
        match self {
            PaymentMethod::Card { .. } => "card",
            PaymentMethod::BankTransfer { .. } => "bank_transfer",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Subscription {
    pub id: i64,
    pub customer_id: i64,
    pub plan: String,
    pub status: Status,
    pub auto_renew: AutoRenew,
    pub anchor_date: Option<Date>,
    /// n such that the current period ends on anchor + n years.
    pub term: i64,
    pub current_period_start: Option<Timestamp>,
    pub current_period_end: Option<Timestamp>,
    pub payment: PaymentMethod,
    pub terms_acceptance_id: Option<i64>,
    pub cancel_at_period_end: bool,
    pub cancelled_at: Option<Timestamp>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone)]
pub struct NewPurchase {
    pub customer_id: i64,
    pub plan: String,
    pub payment: PaymentMethod,
    pub terms_version: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RenewalKind {
    Purchase,
    Auto,
    Manual,
}

impl RenewalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RenewalKind::Purchase => "purchase",
            RenewalKind::Auto => "auto",
            RenewalKind::Manual => "manual",
        }
    }
}

/// Where the payment of one period stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RenewalStatus {
    /// Due; no attempt outcome yet.
    Pending,
    /// A soft decline; the next attempt is scheduled.
    Retrying,
    /// A hard decline; waits for a new card until the grace period ends.
    ActionRequired,
    /// An open invoice was issued; waits for a bank transfer to be recorded.
    AwaitingTransfer,
    Succeeded,
    /// Retries or grace ran out; the subscription expired.
    Failed,
    /// No charge was due after all (cancelled, renewed otherwise, auto-renew off).
    Skipped,
}

impl RenewalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RenewalStatus::Pending => "pending",
            RenewalStatus::Retrying => "retrying",
            RenewalStatus::ActionRequired => "action_required",
            RenewalStatus::AwaitingTransfer => "awaiting_transfer",
            RenewalStatus::Succeeded => "succeeded",
            RenewalStatus::Failed => "failed",
            RenewalStatus::Skipped => "skipped",
        }
    }

    pub fn parse(s: &str) -> StoreResult<Self> {
        Ok(match s {
            "pending" => RenewalStatus::Pending,
            "retrying" => RenewalStatus::Retrying,
            "action_required" => RenewalStatus::ActionRequired,
            "awaiting_transfer" => RenewalStatus::AwaitingTransfer,
            "succeeded" => RenewalStatus::Succeeded,
            "failed" => RenewalStatus::Failed,
            "skipped" => RenewalStatus::Skipped,
            other => return Err(StoreError::Corrupt(format!("renewal status {other}"))),
        })
    }
}

#[derive(Debug, Clone)]
pub struct Renewal {
    pub id: i64,
    pub subscription_id: i64,
    pub kind: RenewalKind,
    pub period_start: Timestamp,
    pub term: i64,
    pub status: RenewalStatus,
    pub attempt_count: i64,
    pub first_attempt_at: Option<Timestamp>,
    pub next_attempt_at: Option<Timestamp>,
    pub terms_acceptance_id: Option<i64>,
    /// For a manual renewal: whether auto-renewal is on once it is paid.
    pub auto_renew_after: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptStatus {
    /// Committed before the gateway call; no answer recorded yet.
    Pending,
    Succeeded,
    Declined,
    /// The call was made but its outcome is not known: reconcile, never resend with a new key.
    Unknown,
    /// Reconciliation confirmed the gateway never charged this key.
    NotCharged,
}

impl AttemptStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptStatus::Pending => "pending",
            AttemptStatus::Succeeded => "succeeded",
            AttemptStatus::Declined => "declined",
            AttemptStatus::Unknown => "unknown",
            AttemptStatus::NotCharged => "not_charged",
        }
    }

    pub fn parse(s: &str) -> StoreResult<Self> {
        Ok(match s {
            "pending" => AttemptStatus::Pending,
            "succeeded" => AttemptStatus::Succeeded,
            "declined" => AttemptStatus::Declined,
            "unknown" => AttemptStatus::Unknown,
            "not_charged" => AttemptStatus::NotCharged,
            other => return Err(StoreError::Corrupt(format!("attempt status {other}"))),
        })
    }

    /// An attempt whose outcome must be learnt from the gateway before
    /// anything else happens to its subscription.
    pub fn is_open(self) -> bool {
        matches!(self, AttemptStatus::Pending | AttemptStatus::Unknown)
    }
}

#[derive(Debug, Clone)]
pub struct Attempt {
    pub id: i64,
    pub renewal_id: i64,
    pub attempt_no: i64,
    pub idempotency_key: String,
    pub payment_method: String,
    pub amount_minor: i64,
    pub currency: String,
    pub invoice_draft: InvoiceAmounts,
    pub status: AttemptStatus,
    pub reconcile_count: i64,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone)]
pub struct NewAttempt {
    pub idempotency_key: String,
    pub payment_method: String,
    pub amount_minor: i64,
    pub currency: String,
    pub invoice_draft: InvoiceAmounts,
}

/// Everything the engine needs to work on one claimed renewal.
#[derive(Debug, Clone)]
pub struct RenewalWork {
    pub renewal: Renewal,
    pub subscription: Subscription,
    pub customer: Customer,
    pub last_attempt: Option<Attempt>,
}

/// A claim on a renewal: only its holder may write to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub renewal_id: i64,
    pub token: String,
}

/// The parameters of a new claim.
#[derive(Debug, Clone)]
pub struct Claim {
    pub token: String,
    pub owner: String,
    pub expires_at: Timestamp,
}

#[derive(Debug, Clone, Serialize)]
pub struct Invoice {
    pub number: String,
    pub renewal_id: Option<i64>,
    pub subscription_id: i64,
    pub customer_id: i64,
    pub status: String,
    pub currency: String,
    pub subtotal_minor: i64,
    pub tax_minor: i64,
    pub total_minor: i64,
    pub issued_at: Timestamp,
    pub due_at: Option<Timestamp>,
    pub paid_at: Option<Timestamp>,
    pub period_start: Timestamp,
    pub period_end: Timestamp,
    pub payment_kind: String,
    pub payment_reference: Option<String>,
    /// Snapshot of seller, buyer, lines, taxes and payment method at issue.
    pub document: serde_json::Value,
}

#[derive(Debug, Clone)]
pub struct NewInvoice {
    /// e.g. `INV-2027`; the store appends the next number of the series.
    pub series: String,
    pub digits: u8,
    pub subscription_id: i64,
    pub customer_id: i64,
    pub renewal_id: Option<i64>,
    pub attempt_id: Option<i64>,
    pub status: String,
    pub amounts: InvoiceAmounts,
    pub issued_at: Timestamp,
    pub due_at: Option<Timestamp>,
    pub paid_at: Option<Timestamp>,
    pub period_start: Timestamp,
    pub period_end: Timestamp,
    pub payment_kind: String,
    pub payment_reference: Option<String>,
    pub document: serde_json::Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct Mail {
    pub id: i64,
    pub subscription_id: i64,
    pub customer_id: i64,
    pub kind: MailKind,
    pub period_key: i64,
    pub offset_key: i64,
    pub recipient: String,
    pub locale: String,
    pub invoice_number: Option<String>,
    pub context: serde_json::Value,
    pub status: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub created_at: Timestamp,
    pub sent_at: Option<Timestamp>,
}

#[derive(Debug, Clone)]
pub struct NewMail {
    pub subscription_id: i64,
    pub customer_id: i64,
    pub kind: MailKind,
    /// The period the mail belongs to (its end, unix seconds); with `kind`
    /// and `offset_key` it makes the mail unique.
    pub period_key: i64,
    pub offset_key: i64,
    pub recipient: String,
    pub locale: String,
    pub context: serde_json::Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub id: i64,
    pub at: Timestamp,
    pub kind: String,
    pub subscription_id: Option<i64>,
    pub customer_id: Option<i64>,
    pub invoice_number: Option<String>,
    pub amount_minor: Option<i64>,
    pub currency: Option<String>,
    pub period_end: Option<Timestamp>,
    pub idempotency_key: Option<String>,
    pub outcome: Option<String>,
    pub detail: serde_json::Value,
}

/// A reminder or notice to queue: its mail and the audit event that says
/// it was queued.
#[derive(Debug, Clone)]
pub struct Notice {
    pub mail: NewMail,
    pub event: NewEvent,
    /// Set on the last of its subscription's upcoming-renewal notices for
    /// the period: once they are queued (or found queued), the store marks
    /// the subscription so that the notice scan passes over it until its
    /// period or its payment method changes (see [`Store::mark_notified`]).
    pub completes_upcoming: Option<NoticesDecided>,
}

/// What a subscription's upcoming notices were decided on, besides the
/// period (the mail's `period_key`): the card expiry the scan read, which
/// decides the card-expiring warning. The mark is written only while the
/// subscription still has it: a card changed between the scan and the write
/// (by another process) leaves it unmarked, to be looked at again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoticesDecided {
    pub card_expiry: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct NewEvent {
    pub kind: String,
    pub subscription_id: Option<i64>,
    pub customer_id: Option<i64>,
    pub amount_minor: Option<i64>,
    pub currency: Option<String>,
    pub period_end: Option<Timestamp>,
    pub idempotency_key: Option<String>,
    pub outcome: Option<String>,
    pub detail: serde_json::Value,
}

impl NewEvent {
    pub fn new(kind: &str, sub: &Subscription) -> Self {
        NewEvent {
            kind: kind.to_string(),
            subscription_id: Some(sub.id),
            customer_id: Some(sub.customer_id),
            period_end: sub.current_period_end,
            detail: serde_json::Value::Null,
            ..Default::default()
        }
    }
}

/// The new period of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub anchor_date: Date,
    pub term: i64,
    pub start: Timestamp,
    pub end: Timestamp,
}

/// A guarded update of one subscription: it applies only while the row
/// still matches the guard.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionPatch {
    pub id: i64,
    /// Guard: the status must be one of these (empty: any).
    pub expect_status: Vec<Status>,
    /// Guard: the current period must still end here.
    pub expect_period_end: Option<Option<Timestamp>>,
    pub status: Option<Status>,
    pub auto_renew: Option<AutoRenew>,
    pub period: Option<Period>,
    pub payment: Option<PaymentMethod>,
    pub terms_acceptance_id: Option<i64>,
    pub cancel_at_period_end: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct AttemptPatch {
    pub id: i64,
    pub status: AttemptStatus,
    pub decline_kind: Option<String>,
    pub decline_code: Option<String>,
    pub gateway_reference: Option<String>,
    pub reconcile_count: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct RenewalPatch {
    pub status: RenewalStatus,
    pub next_attempt_at: Option<Timestamp>,
    pub note: Option<String>,
    /// Drop the lease so the next sweep may claim the renewal at once.
    pub release: bool,
}

/// An issued invoice moving from `open` to `paid` or `void`.
#[derive(Debug, Clone)]
pub struct InvoiceSettlement {
    pub number: String,
    /// `paid` or `void`.
    pub status: String,
    pub paid_at: Option<Timestamp>,
    pub reference: Option<String>,
}

/// A support request moving to a new status.
#[derive(Debug, Clone)]
pub struct RequestUpdate {
    pub id: i64,
    pub expect_status: Vec<String>,
    pub status: String,
    pub resolution: Option<String>,
    pub resolved: bool,
}

/// One atomic state change: all of it is written, or none.
#[derive(Debug, Clone, Default)]
pub struct Change {
    pub lease: Option<Lease>,
    pub attempt: Option<AttemptPatch>,
    pub renewal: Option<RenewalPatch>,
    pub subscription: Option<SubscriptionPatch>,
    pub invoice: Option<NewInvoice>,
    /// Settles an open invoice (fails with a conflict if it is not open).
    pub settle_invoice: Option<InvoiceSettlement>,
    /// Makes this subscription's waiting retries due now (a new card).
    pub wake_renewals_of: Option<i64>,
    /// Closes this subscription's open renewals as skipped; a conflict if one
    /// is held by a worker right now (a charge may be in flight).
    pub close_renewals_of: Option<i64>,
    pub request: Option<RequestUpdate>,
    /// Changes the kind of the leased renewal (a declined manual renewal
    /// hands the period back to the automatic flow).
    pub renewal_kind: Option<RenewalKind>,
    pub mails: Vec<NewMail>,
    pub events: Vec<NewEvent>,
    /// The change exists to queue its mails: if every one of them is
    /// already queued, write nothing (reminders, notices).
    pub only_if_mail_is_new: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// False when `only_if_mail_is_new` found every mail already queued.
    pub applied: bool,
    pub invoice: Option<Invoice>,
    pub mails_queued: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Request {
    pub id: i64,
    pub subscription_id: i64,
    pub kind: String,
    pub status: String,
    pub reason: String,
    pub resolution: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub resolved_at: Option<Timestamp>,
}

/// What `open_renewal` found for a period.
#[derive(Debug, Clone)]
pub enum Opened {
    /// The renewal row is ours to work on under the claim.
    Claimed(Renewal),
    /// Another worker holds it right now.
    Busy,
    /// The period is already paid.
    AlreadyPaid,
    /// An open bank-transfer invoice already asks for this period.
    AwaitingTransfer,
}

/// A renewal asked for by a person (manual renewal).
#[derive(Debug, Clone)]
pub struct NewManualRenewal {
    pub subscription_id: i64,
    pub customer_id: i64,
    pub period_start: Timestamp,
    pub term: i64,
    pub terms_version: String,
    pub auto_renew_after: bool,
}

#[derive(Debug, Clone, Default)]
pub struct SubscriptionFilter {
    pub status: Option<Status>,
    pub due_before: Option<Timestamp>,
}

#[derive(Debug, Clone, Default)]
pub struct MailFilter {
    pub status: Option<String>,
    pub subscription_id: Option<i64>,
}

/// Which subscriptions a scan looks at: those in one of `statuses` whose
/// current period ends in `(ends_after, ends_at_or_before]`.
#[derive(Debug, Clone)]
pub struct Scan {
    pub statuses: Vec<Status>,
    pub auto_renew: Option<bool>,
    pub card_only: bool,
    pub ends_after: Option<Timestamp>,
    pub ends_at_or_before: Timestamp,
    /// Leave out subscriptions with an open renewal: those belong to the
    /// renewal worker that holds (or will hold) their lease.
    pub without_open_renewal: bool,
    /// Leave out subscriptions set to cancel at the end of their period:
    /// they get no reminders and no upcoming-renewal notices. In the scan
    /// itself, not after it: every day they stayed in the notice window
    /// and filled its pages (5% of the subscriptions of a simulated year,
    /// more than a page a day at 100,000: renewd bench, "time travel").
    pub not_cancelling: bool,
    pub after_id: i64,
    pub limit: u32,
    /// Leave out subscriptions whose notice for the current period is
    /// already queued. Without it a daily sweep re-offers (and rolls back)
    /// an outbox insert for every subscription inside a 30-day notice
    /// window, every day: most of the work of a simulated year (renewd
    /// bench). Only an optimisation: the outbox insert is idempotent anyway,
    /// so a store may ignore it, but must never leave out a notice still due.
    pub skip_queued: Option<QueuedNotice>,
}

impl Scan {
    /// Whether this is the reminder scan (active subscriptions with
    /// auto-renewal off, not cancelling), which reads the partial index
    /// `subscriptions_remind` (migration 3) instead of `subscriptions_due`.
    /// A store then states the index's conditions in the query as
    /// literals, for the planner to see that the index holds every row.
    pub(crate) fn reads_reminder_index(&self) -> bool {
        self.statuses == [Status::Active] && self.not_cancelling && self.auto_renew == Some(false)
    }

    /// Whether this is the upcoming-notice scan (active card subscriptions
    /// renewing automatically, not cancelling, leaving out those whose
    /// notices are queued). A store that marks subscriptions as notified
    /// (see [`Store::mark_notified`]) reads only the unmarked ones.
    pub(crate) fn reads_notice_index(&self) -> bool {
        self.statuses == [Status::Active]
            && self.not_cancelling
            && self.auto_renew == Some(true)
            && self.card_only
            && self.skip_queued == Some(QueuedNotice::Upcoming)
    }
}

/// Notices a [`Scan`] may leave out once they are queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueuedNotice {
    /// Renewal reminders at these offsets (days before the period end).
    /// Left out while the smallest reminder queued for the period is still
    /// the one due at `now`: the next smaller offset has not come due (with
    /// an hour of margin, as local days vary by an hour across DST).
    Reminders {
        offsets_days: Vec<u32>,
        now: Timestamp,
    },
    /// The upcoming-renewal notice, with the card-expiring warning when the
    /// card ends before the period: left out once both are marked queued for
    /// the current period (see [`Store::mark_notified`]; migration 4).
    Upcoming,
}

impl QueuedNotice {
    /// `(offset, cutoff)` per reminder offset, largest first: a reminder at
    /// `offset` is the one due while the period ends after `cutoff` (unix
    /// seconds); the smallest offset has no cutoff.
    pub fn reminder_cutoffs(offsets_days: &[u32], now: Timestamp) -> Vec<(i64, Option<i64>)> {
        let mut offsets: Vec<i64> = offsets_days.iter().map(|&d| i64::from(d)).collect();
        offsets.sort_unstable_by(|a, b| b.cmp(a));
        offsets.dedup();
        let next: Vec<Option<i64>> = offsets
            .iter()
            .skip(1)
            .map(|&d| Some(d))
            .chain([None])
            .collect();
        offsets
            .iter()
            .zip(next)
            .map(|(&d, smaller)| (d, smaller.map(|s| now.as_second() + s * 86_400 + 3_600)))
            .collect()
    }
}

/// Point-in-time counts for the daemon's metrics gauges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Active subscriptions whose period has ended (not yet renewed or expired).
    pub due_subscriptions: i64,
    pub past_due_subscriptions: i64,
    /// Payment attempts with no known outcome (in flight or awaiting
    /// reconciliation); `None` when the backend cannot tell.
    pub unknown_charges: Option<i64>,
    /// Outbox rows by (kind, status).
    pub mail: Vec<(String, String, i64)>,
    /// When the oldest message still queued was written.
    pub oldest_queued_mail_at: Option<Timestamp>,
}

#[async_trait]
pub trait Store: Send + Sync {
    /// Applies pending migrations; refuses a schema newer than this build.
    async fn migrate(&self) -> StoreResult<()>;
    async fn ping(&self) -> StoreResult<()>;

    async fn insert_customer(&self, c: &NewCustomer, now: Timestamp) -> StoreResult<Customer>;
    async fn customer(&self, id: i64) -> StoreResult<Option<Customer>>;
    async fn count_customers(&self) -> StoreResult<i64>;

    /// Records a purchase awaiting payment: the subscription
    /// (`pending_payment`), the terms acceptance, and the renewal row of its
    /// first term, already claimed with `claim` so the caller can charge it.
    async fn insert_purchase(
        &self,
        p: &NewPurchase,
        claim: &Claim,
        now: Timestamp,
    ) -> StoreResult<(Subscription, Renewal)>;
    async fn subscription(&self, id: i64) -> StoreResult<Option<Subscription>>;
    async fn list_subscriptions(&self, f: &SubscriptionFilter) -> StoreResult<Vec<Subscription>>;
    async fn scan(&self, scan: &Scan) -> StoreResult<Vec<(Subscription, Customer)>>;

    /// Creates (insert-or-ignore) the renewal row of every card subscription
    /// with auto-renewal on whose period has ended, and of every
    /// bank-transfer one whose period ends within `transfer_lead` (its
    /// invoice is issued ahead). Returns rows created.
    async fn open_due_renewals(
        &self,
        now: Timestamp,
        transfer_lead: jiff::SignedDuration,
    ) -> StoreResult<u64>;
    /// Creates or takes the renewal row of a manual renewal, with its terms
    /// acceptance, claimed under `claim`.
    async fn open_manual_renewal(
        &self,
        r: &NewManualRenewal,
        claim: &Claim,
        now: Timestamp,
    ) -> StoreResult<Opened>;
    /// Claims one renewal if nobody holds it.
    async fn claim_renewal(
        &self,
        renewal_id: i64,
        claim: &Claim,
        now: Timestamp,
    ) -> StoreResult<bool>;
    /// The renewal an invoice belongs to.
    async fn invoice_renewal(&self, number: &str) -> StoreResult<Option<i64>>;

    async fn insert_request(
        &self,
        subscription_id: i64,
        kind: &str,
        reason: &str,
        now: Timestamp,
    ) -> StoreResult<Request>;
    async fn request(&self, id: i64) -> StoreResult<Option<Request>>;
    async fn list_requests(&self, status: Option<&str>) -> StoreResult<Vec<Request>>;
    /// Claims up to `limit` due, unleased (or lease-expired) renewals.
    async fn claim_renewals(
        &self,
        now: Timestamp,
        claim: &Claim,
        limit: u32,
    ) -> StoreResult<Vec<i64>>;
    /// Counts the renewals a claim at `now` would find (for `--dry-run`).
    async fn due_renewals(&self, now: Timestamp) -> StoreResult<Vec<RenewalWork>>;
    async fn renewal_work(&self, renewal_id: i64) -> StoreResult<Option<RenewalWork>>;
    /// Commits a new attempt (with its idempotency key) before the gateway
    /// is called.
    async fn begin_attempt(
        &self,
        lease: &Lease,
        a: &NewAttempt,
        now: Timestamp,
    ) -> StoreResult<Attempt>;

    async fn apply(&self, change: Change, now: Timestamp) -> StoreResult<Applied>;

    /// Queues notices (each a mail and its audit event), in order and in one
    /// write where the store can; a notice whose mail is already queued
    /// writes nothing. Returns, in order, whether each was queued, or why it
    /// could not be. By default one `apply` per notice ([`queue_each`]).
    async fn queue_notices(&self, notices: &[Notice], now: Timestamp) -> Vec<StoreResult<bool>> {
        queue_each(self, notices, now).await
    }

    /// Records that a subscription's upcoming-renewal notices for the period
    /// ending at `period_key` (unix seconds) are all queued, so that the
    /// notice scan passes over it until its period or payment method changes
    /// (see [`Notice::completes_upcoming`]). Nothing when the period or the
    /// card expiry is no longer the one the notices were decided on. Only an
    /// optimisation: an unmarked subscription is offered again, and its
    /// notices, already queued, write nothing.
    async fn mark_notified(
        &self,
        subscription_id: i64,
        period_key: i64,
        decided: &NoticesDecided,
    ) -> StoreResult<()>;

    async fn claim_mail(&self, now: Timestamp, claim: &Claim, limit: u32)
        -> StoreResult<Vec<Mail>>;
    /// Records, in one write, that the transport accepted these messages;
    /// returns the ids recorded. The others were taken over by another sender
    /// after this claim's lease ran out, and are theirs to record.
    async fn mails_sent(&self, ids: &[i64], token: &str, now: Timestamp) -> StoreResult<Vec<i64>>;
    /// Records a failed delivery: retry at `retry_at`, or give up when `None`.
    async fn mail_failed(
        &self,
        id: i64,
        token: &str,
        error: &str,
        retry_at: Option<Timestamp>,
        now: Timestamp,
    ) -> StoreResult<()>;
    async fn list_mail(&self, f: &MailFilter) -> StoreResult<Vec<Mail>>;

    async fn invoice(&self, number: &str) -> StoreResult<Option<Invoice>>;
    async fn list_invoices(&self, subscription_id: Option<i64>) -> StoreResult<Vec<Invoice>>;

    async fn events(&self, subscription_id: Option<i64>) -> StoreResult<Vec<Event>>;
    /// How many acceptances each terms version has.
    async fn terms_acceptances(&self) -> StoreResult<Vec<(String, i64)>>;

    /// Counts for the metrics gauges at `now`. This default reads through
    /// the list methods (every row) and cannot see payment attempts, so it
    /// reports no unknown-charge count; a backend should answer with counts.
    async fn gauges(&self, now: Timestamp) -> StoreResult<Gauges> {
        let active = self
            .list_subscriptions(&SubscriptionFilter {
                status: Some(Status::Active),
                due_before: None,
            })
            .await?;
        let past_due = self
            .list_subscriptions(&SubscriptionFilter {
                status: Some(Status::PastDue),
                due_before: None,
            })
            .await?;
        let mut mail = std::collections::BTreeMap::<(String, String), i64>::new();
        let mut oldest_queued_mail_at: Option<Timestamp> = None;
        for m in self.list_mail(&MailFilter::default()).await? {
            if m.status == "queued" {
                oldest_queued_mail_at =
                    Some(oldest_queued_mail_at.map_or(m.created_at, |t| t.min(m.created_at)));
            }
            *mail
                .entry((m.kind.as_str().to_string(), m.status))
                .or_default() += 1;
        }
        Ok(Gauges {
            due_subscriptions: active
                .iter()
                .filter(|s| s.current_period_end.is_some_and(|end| end <= now))
                .count() as i64,
            past_due_subscriptions: past_due.len() as i64,
            unknown_charges: None,
            mail: mail.into_iter().map(|((k, s), n)| (k, s, n)).collect(),
            oldest_queued_mail_at,
        })
    }

    /// From now on, refuse every claim of renewals and mail made through
    /// this handle (they find nothing): the daemon's drain on shutdown, so
    /// the sweep in hand finishes what it claimed and takes nothing new.
    /// A backend without it relies on the daemon's shutdown timeout alone.
    fn stop_claiming(&self) {}

    /// Whether [`Store::stop_claiming`] was called on this handle.
    fn claiming_stopped(&self) -> bool {
        false
    }

    /// Queues a failed mail again, due at once with a fresh attempt budget
    /// (`renewd mail retry`); its last error stays for the record. `NotFound`
    /// for no such mail, `Conflict` for one that is not failed.
    async fn requeue_mail(&self, id: i64, now: Timestamp) -> StoreResult<Mail>;
}

/// Notices queued one `apply` each: one subscription's in order, several
/// subscriptions at once (their commits can share a flush). A failure is
/// that notice's alone.
pub(crate) async fn queue_each<S: Store + ?Sized>(
    store: &S,
    notices: &[Notice],
    now: Timestamp,
) -> Vec<StoreResult<bool>> {
    use futures::StreamExt;
    const AT_ONCE: usize = 8;
    let mut running = futures::stream::FuturesOrdered::new();
    let mut out = Vec::with_capacity(notices.len());
    for group in notices.chunk_by(|a, b| a.mail.subscription_id == b.mail.subscription_id) {
        running.push_back(queue_group(store, group, now));
        if running.len() >= AT_ONCE {
            if let Some(done) = running.next().await {
                out.extend(done);
            }
        }
    }
    while let Some(done) = running.next().await {
        out.extend(done);
    }
    out
}

/// One subscription's notices, in order.
fn queue_group<'a, S: Store + ?Sized>(
    store: &'a S,
    group: &'a [Notice],
    now: Timestamp,
) -> futures::future::BoxFuture<'a, Vec<StoreResult<bool>>> {
    Box::pin(async move {
        let mut out = Vec::with_capacity(group.len());
        for n in group {
            let change = Change {
                mails: vec![n.mail.clone()],
                events: vec![n.event.clone()],
                only_if_mail_is_new: true,
                ..Default::default()
            };
            out.push(store.apply(change, now).await.map(|a| a.applied));
        }
        if let Some(last) = group.last() {
            if let (Some(decided), true) = (&last.completes_upcoming, out.iter().all(Result::is_ok))
            {
                let (id, period) = (last.mail.subscription_id, last.mail.period_key);
                if let Err(e) = store.mark_notified(id, period, decided).await {
                    // Harmless: the next sweep offers the notices again.
                    tracing::warn!(subscription_id = id, error = %e, "cannot mark the notices as queued");
                }
            }
        }
        out
    })
}
