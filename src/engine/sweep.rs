//! One sweep at `now`, in order: renewals (and their retries and
//! reconciliations), expiry, reminders, upcoming-renewal notices, mail.
//!
//! Every step is idempotent: renewal rows are unique per period, claims are
//! leased, mail is unique per (subscription, period, kind, offset), so a
//! sweep run twice at the same instant changes nothing the second time.
//! All due-date logic reads the database and `now`; a sweep after downtime
//! catches up on whatever fell due meanwhile.

use std::collections::VecDeque;

use futures::stream::{FuturesUnordered, StreamExt};
use jiff::{SignedDuration, Timestamp};
use serde::Serialize;
use serde_json::json;

use super::charge::Outcome;
use super::{Engine, EngineResult};
use crate::domain::reminder;
use crate::domain::subscription::Event as SubEvent;
use crate::domain::values::CardExpiry;
use crate::domain::Status;
use crate::mail::MailKind;
use crate::store::{
    Change, Customer, Lease, NewEvent, NewMail, Notice, NoticesDecided, PaymentMethod,
    QueuedNotice, Scan, Subscription, SubscriptionPatch,
};

/// What one sweep did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SweepSummary {
    pub now: String,
    pub renewed: u32,
    pub declined: u32,
    pub retry_scheduled: u32,
    pub expired: u32,
    pub cancelled: u32,
    pub reminders: u32,
    pub notices: u32,
    pub invoices_issued: u32,
    pub unknown: u32,
    pub skipped: u32,
    pub mail_sent: u32,
    pub mail_failed: u32,
    pub errors: u32,
}

/// Time spent in each phase of one or more sweeps.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PhaseTimes {
    pub renewals: std::time::Duration,
    pub expiry: std::time::Duration,
    pub reminders: std::time::Duration,
    pub notices: std::time::Duration,
    pub mail: std::time::Duration,
}

/// One thing a sweep at `now` would do (for `--dry-run`).
#[derive(Debug, Clone, Serialize)]
pub struct PlannedAction {
    pub subscription_id: i64,
    pub action: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SweepPlan {
    pub now: String,
    pub actions: Vec<PlannedAction>,
    pub mail_queued: usize,
}

/// Rows a scan reads at a time. A page shorter than this is the last one:
/// asking again for the rows after it (one more query, on a connection whose
/// cache the last commit emptied) found nothing every time (renewd bench,
/// "time travel": two scans a day per kind of notice, one of them empty).
const SCAN_BATCH: u32 = 500;

impl Engine {
    /// A sweep at the clock's current instant.
    pub async fn sweep(&self) -> EngineResult<SweepSummary> {
        self.sweep_at(self.now()).await
    }

    pub async fn sweep_at(&self, now: Timestamp) -> EngineResult<SweepSummary> {
        self.sweep_timed(now, &mut PhaseTimes::default()).await
    }

    /// A sweep at `now` that adds how long each phase took to `times`
    /// (`renewd bench` shows where a simulated year goes).
    pub(crate) async fn sweep_timed(
        &self,
        now: Timestamp,
        times: &mut PhaseTimes,
    ) -> EngineResult<SweepSummary> {
        let mut s = SweepSummary {
            now: now.to_string(),
            ..Default::default()
        };
        let mut lap = std::time::Instant::now();
        let mut split = |to: &mut std::time::Duration| {
            let at = std::time::Instant::now();
            *to += at - lap;
            lap = at;
        };
        self.renewals(now, &mut s).await?;
        split(&mut times.renewals);
        self.expiries(now, &mut s).await?;
        split(&mut times.expiry);
        self.reminders(now, &mut s).await?;
        split(&mut times.reminders);
        self.notices(now, &mut s).await?;
        split(&mut times.notices);
        let d = self.deliver_mail_at(now).await?;
        split(&mut times.mail);
        s.mail_sent = d.sent;
        s.mail_failed = d.failed;
        tracing::info!(
            now = %now,
            instance = %self.instance,
            renewed = s.renewed,
            declined = s.declined,
            retry_scheduled = s.retry_scheduled,
            expired = s.expired,
            reminders = s.reminders,
            notices = s.notices,
            invoices_issued = s.invoices_issued,
            unknown = s.unknown,
            mail_sent = s.mail_sent,
            errors = s.errors,
            "sweep finished"
        );
        Ok(s)
    }

    /// The renewal phase alone (claim, charge, invoice, outbox); `pub(crate)`
    /// so `renewd bench` can time it apart from mail delivery.
    pub(crate) async fn renewals(&self, now: Timestamp, s: &mut SweepSummary) -> EngineResult<()> {
        let lead =
            SignedDuration::from_hours(24 * i64::from(self.config.raw.bank_transfer.lead_days));
        let batch_size = self.config.raw.renewal.batch_size;
        let concurrency = self.config.raw.renewal.concurrency.max(1);
        // The next batch is claimed as soon as a worker is free and nothing
        // claimed is waiting, while the last renewals of the previous batch
        // are still at the gateway, so `concurrency` calls stay in flight from
        // the first renewal to the last. (Claiming only once a whole batch had
        // finished left the workers idle at every batch's tail: renewd bench,
        // "gateway-bound".) Never more than one batch is claimed and not yet
        // started, so a shutdown still finishes only what was claimed before
        // it and claims nothing more. The claim and the renewals in flight are polled
        // together, since a claim waits for the store's writer, which a
        // renewal in flight may hold. A failed claim stops claiming; the
        // renewals in flight finish before the error is returned.
        //
        // Up to twice as many renewals of a claimed batch are in hand as
        // gateway calls allowed in flight (`gate`): each renewal reads and
        // writes the database before and after its call, and meanwhile
        // another takes its gateway slot (renewd bench, "gateway-bound").
        // On shutdown, renewals still waiting for a slot are handed back
        // untouched (`Outcome::Deferred`): only those already at the
        // gateway finish.
        let gate = tokio::sync::Semaphore::new(concurrency);
        let in_hand = concurrency.saturating_mul(2);
        let mut in_flight = FuturesUnordered::new();
        let mut queue: VecDeque<Lease> = VecDeque::new();
        let mut claiming = None;
        let mut claimed_any = false;
        let mut exhausted = false;
        // Due periods are opened (renewal rows inserted) once per round, not
        // before every batch: opening scans every subscription still due, so
        // doing it per batch made a sweep over N due renewals cost N^2 / batch
        // (renewd bench, 100,000 due).
        let mut reopen = true;
        let mut claim_error = None;
        loop {
            while in_flight.len() < in_hand {
                let Some(lease) = queue.pop_front() else {
                    break;
                };
                in_flight.push(self.process_lease(lease, now, &gate));
            }
            if queue.is_empty() && claiming.is_none() && !exhausted && in_flight.len() < in_hand {
                claiming = Some(Box::pin(self.claim_batch(now, lead, batch_size, reopen)));
                reopen = false;
            }
            if in_flight.is_empty() && claiming.is_none() {
                break;
            }
            tokio::select! {
                Some((id, r)) = in_flight.next(), if !in_flight.is_empty() => tally(s, id, r),
                claimed = async {
                    match claiming.as_mut() {
                        Some(claim) => claim.await,
                        None => std::future::pending().await,
                    }
                }, if claiming.is_some() => {
                    claiming = None;
                    match claimed {
                        Ok(leases) if leases.is_empty() => {
                            // Nothing left now; once the renewals in flight
                            // are done, one more round looks again, for
                            // periods they left due (renewd was down for
                            // over a year).
                            exhausted = true;
                        }
                        Ok(leases) => {
                            claimed_any = true;
                            queue.extend(leases);
                        }
                        Err(e) => {
                            exhausted = true;
                            claim_error = Some(e);
                        }
                    }
                }
                else => break,
            }
            if exhausted && in_flight.is_empty() && claim_error.is_none() && claimed_any {
                exhausted = false;
                claimed_any = false;
                reopen = true;
            }
        }
        match claim_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Claims the next batch of due renewals, first opening what fell due
    /// when `open` (the first batch of each round).
    async fn claim_batch(
        &self,
        now: Timestamp,
        lead: SignedDuration,
        batch_size: u32,
        open: bool,
    ) -> EngineResult<Vec<Lease>> {
        // Opened again on every round: a renewal that succeeded may leave a
        // period end still in the past (renewd was down for over a year),
        // and that next period is due in this same sweep.
        if open {
            self.store.open_due_renewals(now, lead).await?;
        }
        // The lease runs from when it is taken, not from the start of the
        // sweep, so a long sweep never hands out already-expired claims.
        let claim = self.new_claim(self.now().max(now));
        let ids = self.store.claim_renewals(now, &claim, batch_size).await?;
        Ok(ids
            .into_iter()
            .map(|id| Lease {
                renewal_id: id,
                token: claim.token.clone(),
            })
            .collect())
    }

    async fn process_lease(
        &self,
        lease: Lease,
        now: Timestamp,
        gate: &tokio::sync::Semaphore,
    ) -> (i64, EngineResult<Outcome>) {
        (
            lease.renewal_id,
            self.process_gated(&lease, now, Some(gate)).await,
        )
    }

    /// Subscriptions whose period ended with no renewal in progress: those
    /// to be cancelled at period end are cancelled, those with auto-renewal
    /// off expire.
    async fn expiries(&self, now: Timestamp, s: &mut SweepSummary) -> EngineResult<()> {
        let mut after = 0;
        loop {
            let batch = self
                .store
                .scan(&Scan {
                    statuses: vec![Status::Active, Status::PastDue],
                    auto_renew: None,
                    card_only: false,
                    ends_after: None,
                    ends_at_or_before: now,
                    without_open_renewal: true,
                    not_cancelling: false,
                    after_id: after,
                    limit: SCAN_BATCH,
                    skip_queued: None,
                })
                .await?;
            let Some(last) = batch.last() else {
                return Ok(());
            };
            after = last.0.id;
            let more = batch.len() >= SCAN_BATCH as usize;
            let mut closing = Vec::new();
            for (sub, customer) in &batch {
                if sub.cancel_at_period_end {
                    closing.push((sub, customer, SubEvent::Cancel));
                    continue;
                }
                if sub.auto_renew.on {
                    // Auto-renewing subscriptions are renewed, retried or
                    // expired through their renewal row. Reaching here means
                    // the period ended with no renewal open: say so loudly.
                    s.errors += 1;
                    tracing::error!(
                        subscription_id = sub.id,
                        customer_id = sub.customer_id,
                        period_end = %fmt_opt(sub.current_period_end),
                        "period ended with auto-renewal on but no renewal in progress; see `renewd events --subscription {}`",
                        sub.id
                    );
                    continue;
                }
                closing.push((sub, customer, SubEvent::Expire));
            }
            // Each subscription is closed in its own transaction, several at
            // once so that their commits share a flush (one after another,
            // every expiry waited for its own fsync: renewd bench, "time travel").
            let mut closed = FuturesUnordered::new();
            for (sub, customer, event) in closing {
                closed.push(self.close_one(sub, customer, event, now));
                if closed.len() >= self.config.raw.renewal.concurrency.max(1) {
                    if let Some(r) = closed.next().await {
                        count_closed(s, r);
                    }
                }
            }
            while let Some(r) = closed.next().await {
                count_closed(s, r);
            }
            if !more {
                return Ok(());
            }
        }
    }

    async fn close_one(
        &self,
        sub: &Subscription,
        customer: &Customer,
        event: SubEvent,
        now: Timestamp,
    ) -> (i64, bool, EngineResult<()>) {
        let cancel = matches!(event, SubEvent::Cancel);
        (
            sub.id,
            cancel,
            self.close_period(sub, customer, event, now).await,
        )
    }

    /// Ends a subscription whose period is over and that has no renewal
    /// open: cancelled (a cancellation at period end) or expired (auto-renew
    /// off), with its mail and audit event, in one transaction.
    async fn close_period(
        &self,
        sub: &Subscription,
        customer: &Customer,
        event: SubEvent,
        now: Timestamp,
    ) -> EngineResult<()> {
        let status = sub
            .status
            .on(event)
            .map_err(|e| super::EngineError::Internal(e.to_string()))?;
        let period_key = sub.current_period_end.map(|t| t.as_second()).unwrap_or(0);
        let mut ctx = self.mail_context(sub, customer);
        let (mail, kind, outcome) = if event == SubEvent::Cancel {
            ctx["cancelled_date"] =
                json!(sub.current_period_end.map(|e| self.local_date(e, customer)));
            (
                self.cancel_mail(sub, customer, ctx),
                "subscription.cancelled",
                "cancelled_at_period_end",
            )
        } else {
            (
                self.new_mail(sub, customer, MailKind::Expired, period_key, 0, ctx),
                "subscription.expired",
                "period_ended",
            )
        };
        self.store
            .apply(
                Change {
                    subscription: Some(SubscriptionPatch {
                        id: sub.id,
                        expect_status: vec![sub.status],
                        expect_period_end: Some(sub.current_period_end),
                        status: Some(status),
                        ..Default::default()
                    }),
                    mails: vec![mail],
                    events: vec![NewEvent {
                        outcome: Some(outcome.into()),
                        ..NewEvent::new(kind, sub)
                    }],
                    ..Default::default()
                },
                now,
            )
            .await?;
        tracing::info!(
            subscription_id = sub.id,
            customer_id = sub.customer_id,
            period_end = %fmt_opt(sub.current_period_end),
            outcome = status.as_str(),
            "subscription {} at period end",
            status
        );
        Ok(())
    }

    fn new_mail(
        &self,
        sub: &Subscription,
        customer: &Customer,
        kind: MailKind,
        period_key: i64,
        offset_key: i64,
        context: serde_json::Value,
    ) -> NewMail {
        NewMail {
            subscription_id: sub.id,
            customer_id: sub.customer_id,
            kind,
            period_key,
            offset_key,
            recipient: customer.email.clone(),
            locale: customer.locale.clone(),
            context,
        }
    }

    /// Scans active subscriptions whose period ends within `days` (plus a
    /// day of slack for DST) and hands each to `f`.
    async fn scan_ending_within(
        &self,
        now: Timestamp,
        days: u32,
        auto_renew: bool,
        skip: QueuedNotice,
        mut f: impl FnMut(&Subscription, &Customer) -> Vec<(MailKind, i64, serde_json::Value)>,
    ) -> EngineResult<(u32, u32)> {
        let horizon = now
            .saturating_add(SignedDuration::from_hours(24 * (i64::from(days) + 1)))
            .unwrap_or(now);
        let (mut queued, mut errors, mut after) = (0, 0, 0);
        let upcoming = skip == QueuedNotice::Upcoming;
        loop {
            let batch = self
                .store
                .scan(&Scan {
                    statuses: vec![Status::Active],
                    auto_renew: Some(auto_renew),
                    card_only: auto_renew,
                    ends_after: Some(now),
                    ends_at_or_before: horizon,
                    without_open_renewal: false,
                    not_cancelling: true,
                    after_id: after,
                    limit: SCAN_BATCH,
                    // Queued notices are not offered again every day.
                    skip_queued: Some(skip.clone()),
                })
                .await?;
            let Some(last) = batch.last() else {
                return Ok((queued, errors));
            };
            after = last.0.id;
            let more = batch.len() >= SCAN_BATCH as usize;
            // The batch's notices are queued in one write, in order (one
            // write per subscription made every notice wait for its own
            // commit: renewd bench, "time travel").
            let mut notices: Vec<Notice> = Vec::new();
            for (sub, customer) in &batch {
                let period_key = sub.current_period_end.map(|t| t.as_second()).unwrap_or(0);
                let first = notices.len();
                for (kind, offset, ctx) in f(sub, customer) {
                    notices.push(Notice {
                        mail: self.new_mail(sub, customer, kind, period_key, offset, ctx),
                        event: NewEvent {
                            outcome: Some("queued".into()),
                            detail: json!({"mail_kind": kind.as_str(), "offset_days": offset}),
                            ..NewEvent::new(&format!("mail.{}", kind.as_str()), sub)
                        },
                        completes_upcoming: None,
                    });
                }
                // The subscription's notices for this period are all here,
                // decided on the card expiry just read.
                if let Some(last) = notices.get_mut(first..).and_then(<[Notice]>::last_mut) {
                    last.completes_upcoming = upcoming.then(|| NoticesDecided {
                        card_expiry: match &sub.payment {
                            PaymentMethod::Card { expiry, .. } => expiry.clone(),
                            PaymentMethod::BankTransfer { .. } => None,
                        },
                    });
                }
            }
            let results = self.store.queue_notices(&notices, now).await;
            for (n, result) in notices.iter().zip(results) {
                match result {
                    Ok(true) => {
                        queued += 1;
                        tracing::info!(
                            subscription_id = n.mail.subscription_id,
                            customer_id = n.mail.customer_id,
                            period_end = %fmt_opt(n.event.period_end),
                            mail_kind = n.mail.kind.as_str(),
                            offset_days = n.mail.offset_key,
                            outcome = "queued",
                            "notice queued"
                        );
                    }
                    Ok(false) => {}
                    Err(e) => {
                        errors += 1;
                        tracing::error!(
                            subscription_id = n.mail.subscription_id,
                            mail_kind = n.mail.kind.as_str(),
                            error = %e,
                            "cannot queue notice; the next sweep offers it again"
                        );
                    }
                }
            }
            if !more {
                return Ok((queued, errors));
            }
        }
    }

    async fn reminders(&self, now: Timestamp, s: &mut SweepSummary) -> EngineResult<()> {
        let offsets = self.config.raw.renewal.reminder_offsets_days.clone();
        let max = offsets.iter().copied().max().unwrap_or(0);
        let skip = QueuedNotice::Reminders {
            offsets_days: offsets.clone(),
            now,
        };
        let (queued, errors) = self
            .scan_ending_within(now, max, false, skip, |sub, customer| {
                let Some(end) = sub.current_period_end else {
                    return vec![];
                };
                let tz = self.zone_of(customer);
                match reminder::due_reminder(end, &offsets, now, &tz) {
                    Some(days) => {
                        let mut ctx = self.mail_context(sub, customer);
                        let today = now.to_zoned(tz.clone()).date();
                        let last = end.to_zoned(tz.clone()).date();
                        let left = (last - today).get_days();
                        ctx["days_left"] = json!(left);
                        vec![(MailKind::RenewalReminder, i64::from(days), ctx)]
                    }
                    None => vec![],
                }
            })
            .await?;
        s.reminders += queued;
        s.errors += errors;
        Ok(())
    }

    /// The upcoming-renewal notice, and the card-expiring warning when the
    /// stored card ends before the renewal date.
    async fn notices(&self, now: Timestamp, s: &mut SweepSummary) -> EngineResult<()> {
        let days = self.config.raw.renewal.upcoming_notice_days;
        let skip = QueuedNotice::Upcoming;
        let (queued, errors) = self
            .scan_ending_within(now, days, true, skip, |sub, customer| {
                let Some(end) = sub.current_period_end else {
                    return vec![];
                };
                let tz = self.zone_of(customer);
                if !reminder::notice_due(end, days, now, &tz) {
                    return vec![];
                }
                let ctx = self.mail_context(sub, customer);
                let mut out = vec![(MailKind::UpcomingRenewal, i64::from(days), ctx.clone())];
                if let PaymentMethod::Card {
                    expiry: Some(expiry),
                    ..
                } = &sub.payment
                {
                    if let Ok(exp) = CardExpiry::parse(expiry) {
                        if exp.last_valid_day() < end.to_zoned(tz.clone()).date() {
                            let mut c = ctx;
                            c["card_expiry"] = json!(exp.to_string());
                            out.push((MailKind::CardExpiring, 0, c));
                        }
                    }
                }
                out
            })
            .await?;
        s.notices += queued;
        s.errors += errors;
        Ok(())
    }

    /// What a sweep at `now` would do, without writing anything.
    pub async fn plan_at(&self, now: Timestamp) -> EngineResult<SweepPlan> {
        let mut actions = Vec::new();
        let new_due = self
            .store
            .scan(&Scan {
                statuses: vec![Status::Active],
                auto_renew: Some(true),
                card_only: true,
                ends_after: None,
                ends_at_or_before: now,
                without_open_renewal: true,
                not_cancelling: false,
                after_id: 0,
                limit: u32::MAX,
                skip_queued: None,
            })
            .await?;
        for (sub, _) in new_due.iter().filter(|(s, _)| !s.cancel_at_period_end) {
            actions.push(PlannedAction {
                subscription_id: sub.id,
                action: "charge".into(),
                detail: format!(
                    "renew term {} ending {}",
                    sub.term + 1,
                    fmt_opt(sub.current_period_end)
                ),
            });
        }
        // Bank-transfer renewals whose invoice is due to be issued.
        let lead =
            SignedDuration::from_hours(24 * i64::from(self.config.raw.bank_transfer.lead_days));
        let transfers = self
            .store
            .scan(&Scan {
                statuses: vec![Status::Active],
                auto_renew: Some(true),
                card_only: false,
                ends_after: None,
                ends_at_or_before: now.saturating_add(lead).unwrap_or(now),
                without_open_renewal: true,
                not_cancelling: false,
                after_id: 0,
                limit: u32::MAX,
                skip_queued: None,
            })
            .await?;
        for (sub, _) in transfers.iter().filter(|(s, _)| {
            !s.cancel_at_period_end && matches!(s.payment, PaymentMethod::BankTransfer { .. })
        }) {
            actions.push(PlannedAction {
                subscription_id: sub.id,
                action: "invoice".into(),
                detail: format!(
                    "issue the transfer invoice for term {} ending {}",
                    sub.term + 1,
                    fmt_opt(sub.current_period_end)
                ),
            });
        }
        for w in self.store.due_renewals(now).await? {
            let open = w.last_attempt.as_ref().is_some_and(|a| a.status.is_open());
            let transfer = matches!(w.subscription.payment, PaymentMethod::BankTransfer { .. });
            actions.push(PlannedAction {
                subscription_id: w.subscription.id,
                action: if open {
                    "reconcile"
                } else if transfer
                    && w.renewal.status == crate::store::RenewalStatus::AwaitingTransfer
                {
                    "transfer_overdue"
                } else if transfer {
                    "invoice"
                } else if w.renewal.attempt_count > 0 {
                    "retry"
                } else {
                    "charge"
                }
                .into(),
                detail: format!(
                    "renewal {} ({}), attempt {}",
                    w.renewal.id,
                    w.renewal.status.as_str(),
                    w.renewal.attempt_count + 1
                ),
            });
        }
        let expiring = self
            .store
            .scan(&Scan {
                statuses: vec![Status::Active, Status::PastDue],
                auto_renew: None,
                card_only: false,
                ends_after: None,
                ends_at_or_before: now,
                without_open_renewal: true,
                not_cancelling: false,
                after_id: 0,
                limit: u32::MAX,
                skip_queued: None,
            })
            .await?;
        for (sub, _) in &expiring {
            let action = if sub.cancel_at_period_end {
                "cancel"
            } else if !sub.auto_renew.on {
                "expire"
            } else {
                continue;
            };
            actions.push(PlannedAction {
                subscription_id: sub.id,
                action: action.into(),
                detail: format!("period ended {}", fmt_opt(sub.current_period_end)),
            });
        }
        let offsets = &self.config.raw.renewal.reminder_offsets_days;
        let max = offsets.iter().copied().max().unwrap_or(0);
        let horizon = now
            .saturating_add(SignedDuration::from_hours(24 * (i64::from(max) + 1)))
            .unwrap_or(now);
        let candidates = self
            .store
            .scan(&Scan {
                statuses: vec![Status::Active],
                auto_renew: Some(false),
                card_only: false,
                ends_after: Some(now),
                ends_at_or_before: horizon,
                without_open_renewal: false,
                not_cancelling: true,
                after_id: 0,
                limit: u32::MAX,
                skip_queued: None,
            })
            .await?;
        for (sub, customer) in &candidates {
            let Some(end) = sub.current_period_end else {
                continue;
            };
            if let Some(days) = reminder::due_reminder(end, offsets, now, &self.zone_of(customer)) {
                let sent = self
                    .store
                    .list_mail(&crate::store::MailFilter {
                        status: None,
                        subscription_id: Some(sub.id),
                    })
                    .await?
                    .iter()
                    .any(|m| {
                        m.kind == MailKind::RenewalReminder
                            && m.period_key == end.as_second()
                            && m.offset_key == i64::from(days)
                    });
                if !sent {
                    actions.push(PlannedAction {
                        subscription_id: sub.id,
                        action: "remind".into(),
                        detail: format!("{days}-day reminder before {end}"),
                    });
                }
            }
        }
        let mail_queued = self
            .store
            .list_mail(&crate::store::MailFilter {
                status: Some("queued".into()),
                subscription_id: None,
            })
            .await?
            .len();
        Ok(SweepPlan {
            now: now.to_string(),
            actions,
            mail_queued,
        })
    }
}

/// Counts one closed period (cancelled or expired) into the sweep summary.
fn count_closed(s: &mut SweepSummary, (id, cancel, r): (i64, bool, EngineResult<()>)) {
    match (cancel, r) {
        (true, Ok(())) => s.cancelled += 1,
        (false, Ok(())) => s.expired += 1,
        (true, Err(e)) => {
            s.errors += 1;
            tracing::error!(subscription_id = id, error = %e, "cannot cancel subscription");
        }
        (false, Err(e)) => {
            s.errors += 1;
            tracing::error!(subscription_id = id, error = %e, "cannot expire subscription");
        }
    }
}

/// Counts one renewal's outcome into the sweep summary.
fn tally(s: &mut SweepSummary, id: i64, r: EngineResult<Outcome>) {
    match r {
        Ok(Outcome::Renewed(_)) => {
            s.renewed += 1;
            s.invoices_issued += 1;
        }
        Ok(Outcome::Declined { retry_at, .. }) => {
            s.declined += 1;
            if retry_at.is_some() {
                s.retry_scheduled += 1;
            }
        }
        Ok(Outcome::Expired { declined }) => {
            s.declined += u32::from(declined);
            s.expired += 1;
        }
        Ok(Outcome::Issued(_)) => s.invoices_issued += 1,
        Ok(Outcome::Unknown) => s.unknown += 1,
        Ok(Outcome::Skipped) => s.skipped += 1,
        Ok(Outcome::Deferred) => {}
        Err(e) => {
            // The lease stays until it expires, so this renewal is not retried
            // in a tight loop; the next sweep after the lease runs out takes it
            // up again.
            s.errors += 1;
            tracing::error!(renewal_id = id, error = %e, "renewal failed; will be taken up again when its lease expires");
        }
    }
}

fn fmt_opt(t: Option<Timestamp>) -> String {
    t.map(|t| t.to_string()).unwrap_or_else(|| "-".into())
}
