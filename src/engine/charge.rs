//! Paying one period: the recovery points of a renewal.
//!
//! 1. An open attempt (committed, no outcome, or `unknown`) is reconciled
//!    with the gateway under the same idempotency key before anything else.
//!    Only a confirmed non-charge lets a new attempt (new key) follow.
//! 2. The subscription is re-read: cancelled, already renewed or auto-renew
//!    off since the renewal was opened means no charge.
//! 3. The attempt row with its key is committed, then the gateway is called
//!    with no transaction open.
//! 4. The outcome is written in one transaction with everything it causes
//!    (term extension, invoice, outbox mail, events), checked against the
//!    lease so a worker whose claim was taken over cannot write.

use jiff::{Span, Timestamp};
use serde_json::json;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::{Engine, EngineError, EngineResult};
use crate::domain::subscription::Event as SubEvent;
use crate::domain::{term, AutoRenew, Currency, Money, Status};
use crate::gateway::{Charge, ChargeRequest, GatewayError, Lookup};
use crate::invoice;
use crate::mail::MailKind;
use crate::store::{
    Attempt, AttemptPatch, AttemptStatus, Change, Invoice, Lease, NewAttempt, NewEvent, NewInvoice,
    NewMail, PaymentMethod, Period, RenewalKind, RenewalPatch, RenewalStatus, RenewalWork,
    StoreError, SubscriptionPatch,
};

/// What happened to one claimed renewal.
#[derive(Debug, Clone)]
pub enum Outcome {
    Renewed(Box<Invoice>),
    /// An open invoice was issued (bank transfer); payment is recorded later.
    Issued(Box<Invoice>),
    Declined {
        retry_at: Option<Timestamp>,
        code: String,
    },
    /// Retries ran out (`declined`: on this very attempt) or grace ended.
    Expired {
        declined: bool,
    },
    /// The outcome of a charge is not known yet; it will be reconciled.
    Unknown,
    Skipped,
    /// Handed back untouched: the daemon began to stop before its turn at
    /// the gateway.
    Deferred,
}

/// A permit of `gate`, if there is one.
async fn permit(gate: Option<&Semaphore>) -> EngineResult<Option<SemaphorePermit<'_>>> {
    match gate {
        Some(g) => g
            .acquire()
            .await
            .map(Some)
            .map_err(|e| EngineError::Internal(format!("gateway slots: {e}"))),
        None => Ok(None),
    }
}

impl Engine {
    /// Works one claimed renewal to its next resting point.
    pub(crate) async fn process(&self, lease: &Lease, now: Timestamp) -> EngineResult<Outcome> {
        self.process_gated(lease, now, None).await
    }

    /// [`Engine::process`], holding a permit of `gate` (when given) only
    /// while the gateway is called. A sweep keeps more renewals in hand than
    /// `renewal.concurrency`, so that while some read and write the
    /// database others fill the gateway's slots: the gate keeps exactly
    /// that many calls in flight (renewd bench, "gateway-bound").
    pub(crate) async fn process_gated(
        &self,
        lease: &Lease,
        now: Timestamp,
        gate: Option<&Semaphore>,
    ) -> EngineResult<Outcome> {
        let mut work = self.load(lease).await?;
        if let Some(open) = work.last_attempt.clone().filter(|a| a.status.is_open()) {
            let permit = permit(gate).await?;
            let looked_up = self
                .within_gateway_timeout(
                    "no answer to the lookup",
                    self.gateway.lookup(&open.idempotency_key),
                )
                .await;
            drop(permit);
            match looked_up {
                Ok(Lookup::Charged(charge)) => {
                    tracing::info!(
                        subscription_id = work.subscription.id,
                        idempotency_key = %open.idempotency_key,
                        outcome = "charged",
                        "reconciled: the gateway took the charge"
                    );
                    return self
                        .record_success(&work, &open, charge, lease, now, true)
                        .await;
                }
                Ok(Lookup::Declined(decline)) => {
                    return self
                        .record_decline(&work, &open, decline, lease, now, true)
                        .await
                }
                Ok(Lookup::NotFound) if !self.settled(&open, now) => {
                    let still = GatewayError::Unknown(
                        "no record of the key yet; the request may still be in flight".into(),
                    );
                    return self.record_unknown(&work, &open, &still, lease, now).await;
                }
                Ok(Lookup::NotFound) => {
                    self.store
                        .apply(
                            Change {
                                lease: Some(lease.clone()),
                                attempt: Some(AttemptPatch {
                                    id: open.id,
                                    status: AttemptStatus::NotCharged,
                                    decline_kind: None,
                                    decline_code: None,
                                    gateway_reference: None,
                                    reconcile_count: Some(open.reconcile_count + 1),
                                }),
                                events: vec![NewEvent {
                                    idempotency_key: Some(open.idempotency_key.clone()),
                                    outcome: Some("not_charged".into()),
                                    amount_minor: Some(open.amount_minor),
                                    currency: Some(open.currency.clone()),
                                    ..NewEvent::new("charge.reconciled", &work.subscription)
                                }],
                                ..Default::default()
                            },
                            now,
                        )
                        .await?;
                    tracing::info!(
                        subscription_id = work.subscription.id,
                        idempotency_key = %open.idempotency_key,
                        outcome = "not_charged",
                        "reconciled: the gateway never charged this key"
                    );
                    work = self.load(lease).await?;
                }
                Err(e) => return self.record_unknown(&work, &open, &e, lease, now).await,
            }
        }

        if let Some(reason) = no_charge_reason(&work) {
            return self.skip(&work, lease, reason, now).await;
        }
        if matches!(
            work.subscription.payment,
            PaymentMethod::BankTransfer { .. }
        ) {
            return self.process_transfer(&work, lease, now).await;
        }
        if let Some(first) = work.renewal.first_attempt_at {
            if work.renewal.kind == RenewalKind::Auto && now >= self.grace_end(&work, first) {
                return self
                    .expire_unpaid(&work, lease, "grace period over", now)
                    .await;
            }
        }

        let PaymentMethod::Card { token, .. } = &work.subscription.payment else {
            return self.skip(&work, lease, "not_card", now).await;
        };
        let amounts = self.price_year(&work.subscription.plan, &work.customer)?;
        let n = work.renewal.attempt_count + 1;
        let key = idempotency_key(&work, n);
        // The slot is taken before the attempt is written and held through
        // the call: the request must follow its attempt at once, since a
        // lookup that finds nothing `gateway.timeout` after the attempt was
        // written takes the key as never charged (`settled`).
        let permit = permit(gate).await?;
        if gate.is_some() && self.store.claiming_stopped() {
            // Shutting down while this renewal waited for its slot: it has
            // only been read, so it is handed back untouched for the next
            // start rather than charged after the stop was asked for.
            self.release(lease, &work, now).await?;
            return Ok(Outcome::Deferred);
        }
        let attempt = self
            .store
            .begin_attempt(
                lease,
                &NewAttempt {
                    idempotency_key: key.clone(),
                    payment_method: token.clone(),
                    amount_minor: amounts.total_minor,
                    currency: amounts.currency.clone(),
                    invoice_draft: amounts.clone(),
                },
                now,
            )
            .await?;
        let currency =
            Currency::parse(&amounts.currency).map_err(|e| EngineError::Internal(e.to_string()))?;
        let request = ChargeRequest {
            idempotency_key: key,
            payment_method: token.clone(),
            amount: Money::new(amounts.total_minor, currency),
            description: format!(
                "{} #{} term {}",
                self.plan_name(&work.subscription.plan),
                work.subscription.id,
                work.renewal.term
            ),
            attempt_id: attempt.id,
            subscription_id: work.subscription.id,
        };
        let started = std::time::Instant::now();
        let result = self
            .within_gateway_timeout("no answer", self.gateway.charge(&request))
            .await;
        drop(permit);
        tracing::debug!(
            subscription_id = work.subscription.id,
            idempotency_key = %request.idempotency_key,
            latency_ms = started.elapsed().as_millis() as u64,
            "gateway answered"
        );
        let outcome = match &result {
            Ok(_) => "succeeded",
            Err(GatewayError::Unknown(_)) => "unknown",
            Err(_) => "declined",
        };
        metrics::counter!(crate::monitoring::GATEWAY_CHARGES, "outcome" => outcome).increment(1);
        metrics::histogram!(crate::monitoring::GATEWAY_LATENCY, "operation" => "charge")
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(charge) => {
                self.record_success(&work, &attempt, charge, lease, now, false)
                    .await
            }
            Err(GatewayError::Unknown(reason)) => {
                self.record_unknown(&work, &attempt, &GatewayError::Unknown(reason), lease, now)
                    .await
            }
            Err(decline) => {
                self.record_decline(&work, &attempt, decline, lease, now, false)
                    .await
            }
        }
    }

    /// Whether a request sent for `attempt` can no longer be in flight, so
    /// that the gateway's "never saw this key" is final.
    /// A gateway call cut off at `gateway.timeout`: past it, the outcome is
    /// unknown (`what` says which call went unanswered).
    async fn within_gateway_timeout<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T, GatewayError>>,
    ) -> Result<T, GatewayError> {
        match tokio::time::timeout(self.config.gateway_timeout.unsigned_abs(), call).await {
            Ok(r) => r,
            Err(_) => Err(GatewayError::Unknown(format!(
                "{what} within gateway.timeout ({})",
                self.config.raw.gateway.timeout
            ))),
        }
    }

    fn settled(&self, attempt: &Attempt, now: Timestamp) -> bool {
        attempt
            .created_at
            .saturating_add(self.config.gateway_timeout)
            .map(|t| now >= t)
            .unwrap_or(false)
    }

    /// The term a payment of this renewal buys, and the subscription's status
    /// after it (`None` if the subscription can no longer take a payment).
    /// A purchase, or a renewal of an expired subscription, starts a new
    /// anchor at the renewal's start; otherwise the term follows the anchor.
    pub(super) fn new_term(&self, work: &RenewalWork) -> EngineResult<(Period, Option<Status>)> {
        let sub = &work.subscription;
        let r = &work.renewal;
        let fresh = r.kind == RenewalKind::Purchase || sub.status == Status::Expired;
        let anchor = match (fresh, sub.anchor_date) {
            (false, Some(a)) => a,
            _ => term::anchor_date(r.period_start, &self.zone_of(&work.customer)),
        };
        let term_n = if fresh { 1 } else { r.term };
        let end = self.period_end(anchor, term_n, &work.customer)?;
        let event = if sub.status == Status::Expired {
            SubEvent::ManualRenewal
        } else {
            SubEvent::Paid
        };
        let period = Period {
            anchor_date: anchor,
            term: term_n,
            start: r.period_start,
            end,
        };
        Ok((period, sub.status.on(event).ok()))
    }

    /// The guarded update that gives the subscription its new term; a manual
    /// renewal also resets the auto-renewal switch (rule 3).
    pub(super) fn term_patch(
        &self,
        work: &RenewalWork,
        status: Status,
        period: Period,
    ) -> SubscriptionPatch {
        let sub = &work.subscription;
        let auto_renew = (work.renewal.kind == RenewalKind::Manual).then(|| {
            AutoRenew::after_manual_renewal(!work.renewal.auto_renew_after.unwrap_or(true))
        });
        // A continuing term may only follow the period it was opened for;
        // a new anchor (purchase, renewal after expiry) follows what was read.
        let fresh = work.renewal.kind == RenewalKind::Purchase || sub.status == Status::Expired;
        let expect_end = if fresh {
            sub.current_period_end
        } else {
            Some(work.renewal.period_start)
        };
        SubscriptionPatch {
            id: sub.id,
            expect_status: vec![sub.status],
            expect_period_end: Some(expect_end),
            status: Some(status),
            period: Some(period),
            auto_renew,
            ..Default::default()
        }
    }

    /// A declined manual renewal changes nothing for the subscription: the
    /// person renewing sees the decline at once. The period goes back to the
    /// automatic flow (due at its start, or retried tomorrow if already
    /// past due), so refusing a manual card never loses the renewal.
    async fn manual_declined(
        &self,
        work: &RenewalWork,
        attempt_patch: AttemptPatch,
        event: NewEvent,
        decline: &GatewayError,
        lease: &Lease,
        now: Timestamp,
    ) -> EngineResult<Outcome> {
        let expired = work.subscription.status == Status::Expired;
        let (status, next) = if expired {
            (RenewalStatus::Failed, None)
        } else if work.renewal.period_start > now {
            (RenewalStatus::Pending, Some(work.renewal.period_start))
        } else {
            (
                RenewalStatus::Retrying,
                now.saturating_add(jiff::SignedDuration::from_hours(24))
                    .ok(),
            )
        };
        self.store
            .apply(
                Change {
                    lease: Some(lease.clone()),
                    attempt: Some(attempt_patch),
                    renewal: Some(RenewalPatch {
                        status,
                        next_attempt_at: next,
                        note: Some(decline.to_string()),
                        release: true,
                    }),
                    renewal_kind: (!expired).then_some(RenewalKind::Auto),
                    events: vec![event],
                    ..Default::default()
                },
                now,
            )
            .await?;
        tracing::warn!(
            subscription_id = work.subscription.id,
            customer_id = work.subscription.customer_id,
            outcome = "declined",
            decline_code = decline.code(),
            "manual renewal declined"
        );
        Ok(Outcome::Declined {
            retry_at: None,
            code: decline.code().to_string(),
        })
    }

    pub(super) async fn load(&self, lease: &Lease) -> EngineResult<RenewalWork> {
        self.store
            .renewal_work(lease.renewal_id)
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("renewal {}", lease.renewal_id)))
    }

    /// The last instant a period may stay unpaid: the first attempt plus
    /// the grace days, counted on the customer's calendar. Counting from the
    /// first attempt (not the period end) means downtime of renewd never
    /// expires a subscription that was never asked to pay.
    fn grace_end(&self, work: &RenewalWork, first_attempt: Timestamp) -> Timestamp {
        first_attempt
            .to_zoned(self.zone_of(&work.customer))
            .checked_add(Span::new().days(i64::from(self.config.raw.dunning.grace_days)))
            .map(|z| z.timestamp())
            .unwrap_or(first_attempt)
    }

    async fn record_success(
        &self,
        work: &RenewalWork,
        attempt: &Attempt,
        charge: Charge,
        lease: &Lease,
        now: Timestamp,
        reconciled: bool,
    ) -> EngineResult<Outcome> {
        let sub = &work.subscription;
        let r = &work.renewal;
        let purchase = r.kind == RenewalKind::Purchase;
        let (period, status) = self.new_term(work)?;
        let (term_n, end) = (period.term, period.end);
        let amounts = attempt.invoice_draft.clone();
        let invoice = NewInvoice {
            series: invoice::series(
                &self.config.raw.invoice.prefix,
                now,
                &self.config.invoice_zone,
            ),
            digits: self.config.raw.invoice.digits,
            subscription_id: sub.id,
            customer_id: sub.customer_id,
            renewal_id: Some(r.id),
            attempt_id: Some(attempt.id),
            status: "paid".into(),
            document: self.invoice_document(sub, &work.customer, &amounts),
            amounts,
            issued_at: now,
            due_at: None,
            paid_at: Some(now),
            period_start: r.period_start,
            period_end: end,
            payment_kind: "card".into(),
            payment_reference: Some(charge.reference.clone()),
        };
        let mut ctx = self.mail_context(sub, &work.customer);
        ctx["amount"] = json!(self.money(attempt.amount_minor, &attempt.currency));
        ctx["new_period_end_date"] = json!(self.local_date(end, &work.customer));
        ctx["period_end_date"] = json!(self.local_date(end, &work.customer));
        let mail_kind = if r.kind != RenewalKind::Auto {
            MailKind::OrderConfirmation
        } else {
            MailKind::Receipt
        };
        let event_kind = if purchase {
            "purchase.paid"
        } else {
            "renewal.succeeded"
        };
        let mut change = Change {
            lease: Some(lease.clone()),
            attempt: Some(AttemptPatch {
                id: attempt.id,
                status: AttemptStatus::Succeeded,
                decline_kind: None,
                decline_code: None,
                gateway_reference: Some(charge.reference.clone()),
                reconcile_count: None,
            }),
            renewal: Some(RenewalPatch {
                status: RenewalStatus::Succeeded,
                next_attempt_at: None,
                note: None,
                release: true,
            }),
            subscription: status.map(|status| self.term_patch(work, status, period)),
            invoice: Some(invoice),
            mails: vec![NewMail {
                subscription_id: sub.id,
                customer_id: sub.customer_id,
                kind: mail_kind,
                period_key: end.as_second(),
                offset_key: 0,
                recipient: work.customer.email.clone(),
                locale: work.customer.locale.clone(),
                context: ctx,
            }],
            events: vec![NewEvent {
                amount_minor: Some(attempt.amount_minor),
                currency: Some(attempt.currency.clone()),
                period_end: Some(end),
                idempotency_key: Some(attempt.idempotency_key.clone()),
                outcome: Some("charged".into()),
                detail: json!({"gateway_reference": charge.reference, "term": term_n, "terms_acceptance_id": r.terms_acceptance_id}),
                ..NewEvent::new(event_kind, sub)
            }],
            only_if_mail_is_new: false,
            ..Default::default()
        };
        if reconciled {
            change.events.push(NewEvent {
                amount_minor: Some(attempt.amount_minor),
                currency: Some(attempt.currency.clone()),
                idempotency_key: Some(attempt.idempotency_key.clone()),
                outcome: Some("charged".into()),
                detail: json!({"gateway_reference": charge.reference}),
                ..NewEvent::new("charge.reconciled", sub)
            });
        }
        let refund = |why: String| refund_required(change.clone(), sub, &why);
        let applied = if change.subscription.is_none() {
            let why = format!("subscription is {} and cannot take the payment", sub.status);
            self.store.apply(refund(why), now).await?
        } else {
            match self.store.apply(change.clone(), now).await {
                Err(StoreError::Conflict(why)) => self.store.apply(refund(why), now).await?,
                other => other?,
            }
        };
        let invoice = applied
            .invoice
            .ok_or_else(|| EngineError::Internal("payment recorded without an invoice".into()))?;
        tracing::info!(
            subscription_id = sub.id,
            customer_id = sub.customer_id,
            invoice_number = %invoice.number,
            amount_minor = attempt.amount_minor,
            currency = %attempt.currency,
            period_end = %end,
            idempotency_key = %attempt.idempotency_key,
            outcome = "charged",
            "{}",
            if purchase { "purchase paid" } else { "subscription renewed" }
        );
        // Its documents are rendered when its receipt is mailed (which
        // attaches the PDF and keeps a copy under STATE_DIR/invoices), after
        // the commit and off the renewal's path; `renewd invoice download`
        // renders them from the database at any time.
        Ok(Outcome::Renewed(Box::new(invoice)))
    }

    async fn record_decline(
        &self,
        work: &RenewalWork,
        attempt: &Attempt,
        decline: GatewayError,
        lease: &Lease,
        now: Timestamp,
        reconciled: bool,
    ) -> EngineResult<Outcome> {
        let sub = &work.subscription;
        let hard = matches!(decline, GatewayError::HardDecline { .. });
        let attempt_patch = AttemptPatch {
            id: attempt.id,
            status: AttemptStatus::Declined,
            decline_kind: decline.decline_kind().map(str::to_string),
            decline_code: Some(decline.code().to_string()),
            gateway_reference: None,
            reconcile_count: None,
        };
        let base_event = NewEvent {
            amount_minor: Some(attempt.amount_minor),
            currency: Some(attempt.currency.clone()),
            idempotency_key: Some(attempt.idempotency_key.clone()),
            outcome: Some(format!(
                "declined_{}",
                decline.decline_kind().unwrap_or("unknown")
            )),
            detail: json!({"decline_code": decline.code(), "attempt": attempt.attempt_no, "reconciled": reconciled}),
            ..NewEvent::new("charge.declined", sub)
        };

        if work.renewal.kind == RenewalKind::Manual {
            return self
                .manual_declined(work, attempt_patch, base_event, &decline, lease, now)
                .await;
        }
        if work.renewal.kind == RenewalKind::Purchase {
            // A refused first payment: the subscription never starts.
            let status = sub
                .status
                .on(SubEvent::Expire)
                .map_err(|e| EngineError::Internal(e.to_string()))?;
            self.store
                .apply(
                    Change {
                        lease: Some(lease.clone()),
                        attempt: Some(attempt_patch),
                        renewal: Some(RenewalPatch {
                            status: RenewalStatus::Failed,
                            next_attempt_at: None,
                            note: Some(decline.to_string()),
                            release: true,
                        }),
                        subscription: Some(SubscriptionPatch {
                            id: sub.id,
                            expect_status: vec![Status::PendingPayment],
                            status: Some(status),
                            ..Default::default()
                        }),
                        events: vec![base_event],
                        ..Default::default()
                    },
                    now,
                )
                .await?;
            tracing::warn!(
                subscription_id = sub.id,
                customer_id = sub.customer_id,
                amount_minor = attempt.amount_minor,
                currency = %attempt.currency,
                idempotency_key = %attempt.idempotency_key,
                outcome = "declined",
                decline_code = decline.code(),
                "purchase declined"
            );
            return Ok(Outcome::Declined {
                retry_at: None,
                code: decline.code().to_string(),
            });
        }

        let first = work.renewal.first_attempt_at.unwrap_or(attempt.created_at);
        let grace_end = self.grace_end(work, first);
        // The next slot of the schedule that is still ahead: after downtime,
        // missed slots are skipped rather than fired back to back.
        let retry_at = if hard {
            None
        } else {
            let zone = self.zone_of(&work.customer);
            let used = usize::try_from(attempt.attempt_no - 1).unwrap_or(usize::MAX);
            self.config
                .raw
                .dunning
                .retry_days
                .iter()
                .skip(used)
                .filter_map(|&d| {
                    first
                        .to_zoned(zone.clone())
                        .checked_add(Span::new().days(i64::from(d)))
                        .ok()
                        .map(|z| z.timestamp())
                })
                .find(|&t| t > now)
                .filter(|&t| t < grace_end)
        };
        let exhausted = !hard && retry_at.is_none();
        let mut ctx = self.mail_context(sub, &work.customer);
        ctx["amount"] = json!(self.money(attempt.amount_minor, &attempt.currency));
        ctx["decline_reason"] = json!(decline_reason(&decline));
        ctx["next_retry_date"] = json!(retry_at.map(|t| self.local_date(t, &work.customer)));
        ctx["grace_end_date"] = json!(self.local_date(grace_end, &work.customer));
        let period_key = work.renewal.period_start.as_second();
        let mut mails = vec![NewMail {
            subscription_id: sub.id,
            customer_id: sub.customer_id,
            kind: MailKind::PaymentFailed,
            period_key,
            offset_key: attempt.attempt_no,
            recipient: work.customer.email.clone(),
            locale: work.customer.locale.clone(),
            context: ctx.clone(),
        }];
        let mut events = vec![base_event];
        let (renewal_status, next_at, sub_event) = if exhausted {
            mails.push(self.expired_mail(work, period_key));
            events.push(NewEvent {
                outcome: Some("retries_exhausted".into()),
                ..NewEvent::new("subscription.expired", sub)
            });
            (RenewalStatus::Failed, None, SubEvent::Expire)
        } else if hard {
            (
                RenewalStatus::ActionRequired,
                Some(grace_end),
                SubEvent::PaymentFailed,
            )
        } else {
            events.push(NewEvent {
                outcome: Some("retry_scheduled".into()),
                detail: json!({"retry_at": retry_at.map(|t| t.to_string()), "attempt": attempt.attempt_no}),
                ..NewEvent::new("renewal.retry_scheduled", sub)
            });
            (RenewalStatus::Retrying, retry_at, SubEvent::PaymentFailed)
        };
        let status = sub
            .status
            .on(sub_event)
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        self.store
            .apply(
                Change {
                    lease: Some(lease.clone()),
                    attempt: Some(attempt_patch),
                    renewal: Some(RenewalPatch {
                        status: renewal_status,
                        next_attempt_at: next_at,
                        note: Some(decline.to_string()),
                        release: true,
                    }),
                    subscription: Some(SubscriptionPatch {
                        id: sub.id,
                        expect_status: vec![Status::Active, Status::PastDue],
                        expect_period_end: Some(Some(work.renewal.period_start)),
                        status: Some(status),
                        ..Default::default()
                    }),
                    mails,
                    events,
                    ..Default::default()
                },
                now,
            )
            .await?;
        tracing::warn!(
            subscription_id = sub.id,
            customer_id = sub.customer_id,
            amount_minor = attempt.amount_minor,
            currency = %attempt.currency,
            period_end = %work.renewal.period_start,
            idempotency_key = %attempt.idempotency_key,
            outcome = if exhausted { "expired" } else if hard { "declined_hard" } else { "retry_scheduled" },
            decline_code = decline.code(),
            retry_at = retry_at.map(|t| t.to_string()),
            "renewal payment declined"
        );
        if exhausted {
            return Ok(Outcome::Expired { declined: true });
        }
        Ok(Outcome::Declined {
            retry_at,
            code: decline.code().to_string(),
        })
    }

    /// Leaves the attempt open and schedules the next question to the
    /// gateway; the lease is released so any worker may reconcile it.
    async fn record_unknown(
        &self,
        work: &RenewalWork,
        attempt: &Attempt,
        error: &GatewayError,
        lease: &Lease,
        now: Timestamp,
    ) -> EngineResult<Outcome> {
        let backoff = &self.config.reconcile_backoff;
        let step = usize::try_from(attempt.reconcile_count)
            .unwrap_or(usize::MAX)
            .min(backoff.len().saturating_sub(1));
        let wait = backoff
            .get(step)
            .copied()
            .unwrap_or(jiff::SignedDuration::from_mins(5));
        let next = now.saturating_add(wait).unwrap_or(now);
        self.store
            .apply(
                Change {
                    lease: Some(lease.clone()),
                    attempt: Some(AttemptPatch {
                        id: attempt.id,
                        status: AttemptStatus::Unknown,
                        decline_kind: None,
                        decline_code: None,
                        gateway_reference: None,
                        reconcile_count: Some(attempt.reconcile_count + 1),
                    }),
                    renewal: Some(RenewalPatch {
                        status: work.renewal.status,
                        next_attempt_at: Some(next),
                        note: Some(error.to_string()),
                        release: true,
                    }),
                    events: vec![NewEvent {
                        amount_minor: Some(attempt.amount_minor),
                        currency: Some(attempt.currency.clone()),
                        idempotency_key: Some(attempt.idempotency_key.clone()),
                        outcome: Some("unknown".into()),
                        detail: json!({"error": error.to_string(), "reconcile_at": next.to_string()}),
                        ..NewEvent::new("charge.unknown", &work.subscription)
                    }],
                    ..Default::default()
                },
                now,
            )
            .await?;
        tracing::error!(
            subscription_id = work.subscription.id,
            customer_id = work.subscription.customer_id,
            amount_minor = attempt.amount_minor,
            currency = %attempt.currency,
            idempotency_key = %attempt.idempotency_key,
            outcome = "unknown",
            reconcile_at = %next,
            error = %error,
            "charge outcome unknown; will reconcile with the same key"
        );
        Ok(Outcome::Unknown)
    }

    async fn skip(
        &self,
        work: &RenewalWork,
        lease: &Lease,
        reason: &'static str,
        now: Timestamp,
    ) -> EngineResult<Outcome> {
        // A transfer invoice already issued for this period is void: nothing
        // is owed for a renewal that will not happen.
        let open = self
            .store
            .list_invoices(Some(work.subscription.id))
            .await?
            .into_iter()
            .find(|i| i.renewal_id == Some(work.renewal.id) && i.status == "open");
        self.store
            .apply(
                Change {
                    lease: Some(lease.clone()),
                    settle_invoice: open.as_ref().map(|i| crate::store::InvoiceSettlement {
                        number: i.number.clone(),
                        status: "void".into(),
                        paid_at: None,
                        reference: None,
                    }),
                    renewal: Some(RenewalPatch {
                        status: RenewalStatus::Skipped,
                        next_attempt_at: None,
                        note: Some(reason.into()),
                        release: true,
                    }),
                    events: vec![NewEvent {
                        outcome: Some(reason.into()),
                        ..NewEvent::new("renewal.skipped", &work.subscription)
                    }],
                    ..Default::default()
                },
                now,
            )
            .await?;
        tracing::info!(
            subscription_id = work.subscription.id,
            outcome = reason,
            "renewal skipped: no charge"
        );
        Ok(Outcome::Skipped)
    }

    async fn expire_unpaid(
        &self,
        work: &RenewalWork,
        lease: &Lease,
        why: &str,
        now: Timestamp,
    ) -> EngineResult<Outcome> {
        let sub = &work.subscription;
        let status = sub
            .status
            .on(SubEvent::Expire)
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        self.store
            .apply(
                Change {
                    lease: Some(lease.clone()),
                    renewal: Some(RenewalPatch {
                        status: RenewalStatus::Failed,
                        next_attempt_at: None,
                        note: Some(why.into()),
                        release: true,
                    }),
                    subscription: Some(SubscriptionPatch {
                        id: sub.id,
                        expect_status: vec![sub.status],
                        status: Some(status),
                        ..Default::default()
                    }),
                    mails: vec![self.expired_mail(work, work.renewal.period_start.as_second())],
                    events: vec![NewEvent {
                        outcome: Some(why.into()),
                        ..NewEvent::new("subscription.expired", sub)
                    }],
                    ..Default::default()
                },
                now,
            )
            .await?;
        tracing::warn!(
            subscription_id = sub.id,
            customer_id = sub.customer_id,
            outcome = "expired",
            reason = why,
            "subscription expired unpaid"
        );
        Ok(Outcome::Expired { declined: false })
    }

    pub(super) fn expired_mail(&self, work: &RenewalWork, period_key: i64) -> NewMail {
        NewMail {
            subscription_id: work.subscription.id,
            customer_id: work.subscription.customer_id,
            kind: MailKind::Expired,
            period_key,
            offset_key: 0,
            recipient: work.customer.email.clone(),
            locale: work.customer.locale.clone(),
            context: self.mail_context(&work.subscription, &work.customer),
        }
    }
}

/// A charge went through but the subscription can no longer be extended
/// (it changed while the call was out). The money was taken, so the payment
/// and its invoice are still recorded, and billing staff are told to refund.
fn refund_required(mut change: Change, sub: &crate::store::Subscription, why: &str) -> Change {
    tracing::error!(
        subscription_id = sub.id,
        customer_id = sub.customer_id,
        outcome = "refund_required",
        reason = why,
        "charged, but the subscription changed meanwhile: recorded and invoiced, refund required"
    );
    change.subscription = None;
    change.mails.clear();
    if let Some(r) = change.renewal.as_mut() {
        r.note = Some(format!("refund required: {why}"));
    }
    change.events.push(NewEvent {
        outcome: Some("refund_required".into()),
        detail: json!({"reason": why}),
        ..NewEvent::new("renewal.refund_required", sub)
    });
    change
}

/// `renew:{subscription}:{period_start}:a{n}`: the same for every retry of
/// the same attempt, different for the next attempt.
fn idempotency_key(work: &RenewalWork, n: i64) -> String {
    let prefix = if work.renewal.kind == RenewalKind::Purchase {
        "purchase"
    } else {
        "renew"
    };
    format!(
        "{prefix}:{}:{}:a{n}",
        work.subscription.id, work.renewal.period_start
    )
}

/// Why this renewal must not be charged now, if it must not.
fn no_charge_reason(work: &RenewalWork) -> Option<&'static str> {
    let sub = &work.subscription;
    let r = &work.renewal;
    if sub.status == Status::Cancelled {
        return Some("cancelled");
    }
    match r.kind {
        RenewalKind::Purchase => (sub.status != Status::PendingPayment).then_some("already_paid"),
        RenewalKind::Auto => {
            if sub.current_period_end != Some(r.period_start) {
                Some("already_renewed")
            } else if !sub.auto_renew.on {
                Some("auto_renew_off")
            } else if sub.cancel_at_period_end {
                Some("cancel_at_period_end")
            } else if !matches!(sub.status, Status::Active | Status::PastDue) {
                Some("not_active")
            } else {
                None
            }
        }
        RenewalKind::Manual => (sub.status != Status::Expired
            && sub.current_period_end != Some(r.period_start))
        .then_some("already_renewed"),
    }
}

fn decline_reason(e: &GatewayError) -> String {
    match e {
        GatewayError::HardDecline { message, .. } | GatewayError::SoftDecline { message, .. } => {
            message.clone()
        }
        GatewayError::Unknown(_) => "unknown".into(),
    }
}
