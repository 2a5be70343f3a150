//! The flows of the vendor page beyond the automatic card renewal: bank
//! transfers (an open invoice, paid when staff record the transfer),
//! manual renewal, changing the card, and cancellation through a support
//! request.
//!
//! Every flow that touches a period's payment goes through that period's
//! renewal row and its lease, the same as the sweep, so a person and the
//! daemon acting at once never pay a period twice.

use jiff::{SignedDuration, Span, Timestamp};
use serde_json::json;

use super::charge::Outcome;
use super::{invalid_input, Engine, EngineError, EngineResult};
use crate::domain::subscription::Event as SubEvent;
use crate::domain::values::{CardExpiry, CardToken, EmailAddress, Name, Phone};
use crate::domain::Status;
use crate::gateway::GatewayError;
use crate::invoice;
use crate::mail::MailKind;
use crate::store::{
    Change, Customer, Invoice, InvoiceSettlement, Lease, NewEvent, NewInvoice, NewMail,
    NewManualRenewal, Opened, PaymentMethod, RenewalKind, RenewalPatch, RenewalStatus, RenewalWork,
    Request, RequestUpdate, Subscription, SubscriptionPatch,
};

/// A bank-transfer contact as typed by staff.
#[derive(Debug, Clone, Default)]
pub struct ContactInput {
    pub name: String,
    pub phone: String,
    pub email: String,
}

/// A manual renewal: `subscription renew`.
#[derive(Debug, Clone, Default)]
pub struct RenewInput {
    pub subscription_id: i64,
    pub accept_terms: Option<String>,
    pub card: Option<String>,
    pub card_expiry: Option<String>,
    pub bank_transfer: Option<ContactInput>,
    pub no_auto_renew: bool,
}

/// What a purchase or manual renewal led to.
#[derive(Debug, Clone)]
pub struct FlowResult {
    pub subscription: Subscription,
    pub invoice: Option<Invoice>,
    /// Set when the payment did not go through: why, for the caller to show.
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelAt {
    Now,
    PeriodEnd,
}

impl ContactInput {
    fn validate(&self) -> EngineResult<PaymentMethod> {
        let name =
            Name::parse(&self.name).map_err(|e| invalid_input(format!("--contact-name: {e}")))?;
        let phone = Phone::parse(&self.phone).map_err(invalid_input)?;
        let email = EmailAddress::parse(&self.email)
            .map_err(|e| invalid_input(format!("--contact-email: {e}")))?;
        Ok(PaymentMethod::BankTransfer {
            contact_name: name.as_str().to_string(),
            contact_phone: phone.as_str().to_string(),
            contact_email: email.as_str().to_string(),
        })
    }
}

fn outcome_result(sub_id: i64, outcome: Outcome) -> (Option<Invoice>, Option<String>) {
    match outcome {
        Outcome::Renewed(inv) => (Some(*inv), None),
        Outcome::Issued(inv) => (Some(*inv), None),
        Outcome::Declined { code, .. } => (
            None,
            Some(format!("card declined ({code}); subscription {sub_id} was not renewed; try another card")),
        ),
        Outcome::Unknown => (
            None,
            Some(format!(
                "the payment outcome is unknown; renewd will reconcile it on the next sweep for subscription {sub_id}"
            )),
        ),
        Outcome::Expired { .. } | Outcome::Skipped | Outcome::Deferred => (None, Some(format!("subscription {sub_id} was not renewed"))),
    }
}

impl Engine {
    /// Validates a card token and expiry and asks the gateway for its details.
    pub(super) async fn card_method(
        &self,
        card: &str,
        expiry: Option<&str>,
    ) -> EngineResult<PaymentMethod> {
        let token = CardToken::parse(card).map_err(invalid_input)?;
        let expiry = expiry
            .map(CardExpiry::parse)
            .transpose()
            .map_err(invalid_input)?;
        let details = self
            .gateway
            .card_details(token.as_str())
            .await
            .map_err(|e| match e {
                GatewayError::Unknown(m) => {
                    EngineError::Internal(format!("cannot reach the payment gateway: {m}"))
                }
                other => EngineError::Invalid(other.to_string()),
            })?;
        Ok(PaymentMethod::Card {
            token: token.as_str().to_string(),
            brand: details.brand,
            last4: details.last4,
            expiry: expiry.map(|e| e.to_string()),
        })
    }

    /// Buys a subscription paid by electronic bank transfer: an open invoice
    /// is issued and mailed to the contact; the subscription waits in
    /// `pending_payment` until the transfer is recorded.
    pub async fn purchase_by_transfer(
        &self,
        customer_id: i64,
        plan: Option<String>,
        accept_terms: Option<&str>,
        contact: &ContactInput,
    ) -> EngineResult<FlowResult> {
        let terms = self.check_terms(accept_terms)?;
        let payment = contact.validate()?;
        let (customer, plan) = self.customer_and_plan(customer_id, plan).await?;
        self.start_purchase(&customer, plan, payment, terms).await
    }

    /// Records a purchase and pays its first term: a card is charged at
    /// once; a bank transfer gets an open invoice.
    pub(super) async fn start_purchase(
        &self,
        customer: &Customer,
        plan: String,
        payment: PaymentMethod,
        terms_version: String,
    ) -> EngineResult<FlowResult> {
        let now = self.now();
        let claim = self.new_claim(now);
        let (sub, renewal) = self
            .store
            .insert_purchase(
                &crate::store::NewPurchase {
                    customer_id: customer.id,
                    plan,
                    payment,
                    terms_version,
                },
                &claim,
                now,
            )
            .await?;
        let lease = Lease {
            renewal_id: renewal.id,
            token: claim.token,
        };
        let outcome = self.process(&lease, now).await?;
        let (invoice, problem) = outcome_result(sub.id, outcome);
        Ok(FlowResult {
            subscription: self.subscription(sub.id).await?,
            invoice,
            problem,
        })
    }

    /// The bank-transfer side of `process`: issue the open invoice, then at
    /// its deadline move the subscription to past due, void and expire.
    pub(super) async fn process_transfer(
        &self,
        work: &RenewalWork,
        lease: &Lease,
        now: Timestamp,
    ) -> EngineResult<Outcome> {
        let sub = &work.subscription;
        let r = &work.renewal;
        if r.status != RenewalStatus::AwaitingTransfer {
            return self.issue_transfer_invoice(work, lease, now).await;
        }
        let open = self
            .store
            .list_invoices(Some(sub.id))
            .await?
            .into_iter()
            .find(|i| i.renewal_id == Some(r.id) && i.status == "open");
        let grace_end = r
            .period_start
            .checked_add(SignedDuration::from_hours(
                24 * i64::from(self.config.raw.bank_transfer.grace_days),
            ))
            .unwrap_or(r.period_start);
        // An automatic renewal past the period end but inside the grace
        // period: the subscription is past due until the grace ends.
        if r.kind == RenewalKind::Auto && sub.status == Status::Active && now < grace_end {
            self.store
                .apply(
                    Change {
                        lease: Some(lease.clone()),
                        renewal: Some(RenewalPatch {
                            status: RenewalStatus::AwaitingTransfer,
                            next_attempt_at: Some(grace_end),
                            note: Some("transfer not received by the period end".into()),
                            release: true,
                        }),
                        subscription: Some(SubscriptionPatch {
                            id: sub.id,
                            expect_status: vec![Status::Active],
                            status: Some(Status::PastDue),
                            ..Default::default()
                        }),
                        events: vec![NewEvent {
                            outcome: Some("past_due".into()),
                            detail: json!({"grace_end": grace_end.to_string()}),
                            ..NewEvent::new("transfer.overdue", sub)
                        }],
                        ..Default::default()
                    },
                    now,
                )
                .await?;
            tracing::warn!(
                subscription_id = sub.id,
                customer_id = sub.customer_id,
                outcome = "past_due",
                "bank transfer not received by the period end"
            );
            return Ok(Outcome::Declined {
                retry_at: Some(grace_end),
                code: "transfer_overdue".into(),
            });
        }
        // Deadline passed unpaid: the invoice is void. A purchase never
        // starts; a renewal ends the subscription; a manual renewal of a
        // subscription that is still running just lapses.
        let expire = matches!(r.kind, RenewalKind::Purchase | RenewalKind::Auto)
            && matches!(
                sub.status,
                Status::PendingPayment | Status::Active | Status::PastDue
            );
        // An unpaid manual renewal of a subscription that renews itself hands
        // the period back to the automatic flow (the row is unique per
        // period, so failing it would lose the automatic renewal).
        let hand_back = r.kind == RenewalKind::Manual
            && matches!(sub.status, Status::Active | Status::PastDue)
            && sub.auto_renew.on;
        // A past-due subscription whose manual renewal lapsed, with nothing
        // to hand back to, ends here rather than staying past due.
        let expire = expire
            || (r.kind == RenewalKind::Manual
                && sub.status == Status::PastDue
                && !sub.auto_renew.on);
        let status = if expire {
            sub.status.on(SubEvent::Expire).ok()
        } else {
            None
        };
        let mut mails = vec![];
        if status.is_some() && r.kind != RenewalKind::Purchase {
            mails.push(self.expired_mail(work, r.period_start.as_second()));
        }
        self.store
            .apply(
                Change {
                    lease: Some(lease.clone()),
                    settle_invoice: open.as_ref().map(|i| InvoiceSettlement {
                        number: i.number.clone(),
                        status: "void".into(),
                        paid_at: None,
                        reference: None,
                    }),
                    renewal: Some(if hand_back {
                        RenewalPatch {
                            status: RenewalStatus::Pending,
                            next_attempt_at: Some(now),
                            note: Some(
                                "manual transfer not received; back to automatic renewal".into(),
                            ),
                            release: true,
                        }
                    } else {
                        RenewalPatch {
                            status: RenewalStatus::Failed,
                            next_attempt_at: None,
                            note: Some("transfer not received".into()),
                            release: true,
                        }
                    }),
                    renewal_kind: hand_back.then_some(RenewalKind::Auto),
                    subscription: status.map(|st| SubscriptionPatch {
                        id: sub.id,
                        expect_status: vec![sub.status],
                        status: Some(st),
                        ..Default::default()
                    }),
                    mails,
                    events: vec![NewEvent {
                        outcome: Some("void".into()),
                        detail: json!({"invoice_number": open.as_ref().map(|i| i.number.clone())}),
                        ..NewEvent::new("invoice.voided", sub)
                    }],
                    ..Default::default()
                },
                now,
            )
            .await?;
        if let Some(inv) = &open {
            self.rewrite_documents(&inv.number).await;
        }
        tracing::warn!(
            subscription_id = sub.id,
            customer_id = sub.customer_id,
            invoice_number = open.as_ref().map(|i| i.number.as_str()),
            outcome = "void",
            "bank transfer not received: invoice voided"
        );
        Ok(if status.is_some() {
            Outcome::Expired { declined: false }
        } else {
            Outcome::Skipped
        })
    }

    async fn issue_transfer_invoice(
        &self,
        work: &RenewalWork,
        lease: &Lease,
        now: Timestamp,
    ) -> EngineResult<Outcome> {
        let sub = &work.subscription;
        let r = &work.renewal;
        let PaymentMethod::BankTransfer {
            contact_email,
            contact_name,
            ..
        } = &sub.payment
        else {
            return Err(EngineError::Internal(
                "transfer flow on a card subscription".into(),
            ));
        };
        let (period, _) = self.new_term(work)?;
        let amounts = self.price_year(&sub.plan, &work.customer)?;
        // A renewal invoice is due at the period end; a purchase or manual
        // renewal invoice after the configured number of days.
        let due = match r.kind {
            RenewalKind::Auto => r.period_start,
            _ => now
                .to_zoned(self.zone_of(&work.customer))
                .checked_add(Span::new().days(i64::from(self.config.raw.bank_transfer.due_days)))
                .map(|z| z.timestamp())
                .unwrap_or(now),
        };
        let total = self.money(amounts.total_minor, &amounts.currency);
        let mut ctx = self.mail_context(sub, &work.customer);
        ctx["customer_name"] = json!(contact_name);
        ctx["amount"] = json!(total);
        ctx["due_date"] = json!(self.local_date(due, &work.customer));
        ctx["new_period_end_date"] = json!(self.local_date(period.end, &work.customer));
        let applied = self
            .store
            .apply(
                Change {
                    lease: Some(lease.clone()),
                    renewal: Some(RenewalPatch {
                        status: RenewalStatus::AwaitingTransfer,
                        next_attempt_at: Some(due),
                        note: None,
                        release: true,
                    }),
                    invoice: Some(NewInvoice {
                        series: invoice::series(&self.config.raw.invoice.prefix, now, &self.config.invoice_zone),
                        digits: self.config.raw.invoice.digits,
                        subscription_id: sub.id,
                        customer_id: sub.customer_id,
                        renewal_id: Some(r.id),
                        attempt_id: None,
                        status: "open".into(),
                        document: self.invoice_document(sub, &work.customer, &amounts),
                        amounts: amounts.clone(),
                        issued_at: now,
                        due_at: Some(due),
                        paid_at: None,
                        period_start: period.start,
                        period_end: period.end,
                        payment_kind: "bank_transfer".into(),
                        payment_reference: None,
                    }),
                    mails: vec![NewMail {
                        subscription_id: sub.id,
                        customer_id: sub.customer_id,
                        kind: MailKind::InvoiceIssued,
                        period_key: period.end.as_second(),
                        offset_key: 0,
                        recipient: contact_email.clone(),
                        locale: work.customer.locale.clone(),
                        context: ctx,
                    }],
                    events: vec![NewEvent {
                        amount_minor: Some(amounts.total_minor),
                        currency: Some(amounts.currency.clone()),
                        period_end: Some(period.end),
                        outcome: Some("open".into()),
                        detail: json!({"due_at": due.to_string(), "kind": r.kind.as_str(), "terms_acceptance_id": r.terms_acceptance_id}),
                        ..NewEvent::new("invoice.issued", sub)
                    }],
                    ..Default::default()
                },
                now,
            )
            .await?;
        let inv = applied
            .invoice
            .ok_or_else(|| EngineError::Internal("transfer invoice not recorded".into()))?;
        if let Err(e) = invoice::write_documents(&self.config.invoice_dir(), &inv) {
            tracing::error!(invoice_number = %inv.number, error = %e, "cannot write invoice document");
        }
        tracing::info!(
            subscription_id = sub.id,
            customer_id = sub.customer_id,
            invoice_number = %inv.number,
            amount_minor = inv.total_minor,
            currency = %inv.currency,
            period_end = %period.end,
            outcome = "open",
            due_at = %due,
            "bank-transfer invoice issued"
        );
        Ok(Outcome::Issued(Box::new(inv)))
    }

    /// Records a bank transfer against an open invoice (staff, `invoice
    /// mark-paid`): the period is paid and the subscription extended.
    pub async fn mark_paid(&self, number: &str, reference: &str) -> EngineResult<Invoice> {
        let reference = reference.trim();
        if reference.is_empty()
            || reference.chars().count() > 100
            || reference.chars().any(char::is_control)
        {
            return Err(invalid_input(
                "--reference: give the bank's transfer reference (1 to 100 characters, one line)",
            ));
        }
        let inv = self.store.invoice(number).await?.ok_or_else(|| {
            EngineError::NotFound(format!(
                "invoice {number} not found; see `renewd invoice list`"
            ))
        })?;
        match inv.status.as_str() {
            "paid" => {
                return Err(EngineError::Refused(format!(
                    "invoice {number} is already paid (reference {}); nothing recorded",
                    inv.payment_reference.as_deref().unwrap_or("-")
                )))
            }
            "void" => {
                return Err(EngineError::Refused(format!(
                    "invoice {number} is void; the subscription must be renewed again (`renewd subscription renew {}`)",
                    inv.subscription_id
                )))
            }
            _ => {}
        }
        let renewal_id = self.store.invoice_renewal(number).await?.ok_or_else(|| {
            EngineError::Internal(format!("invoice {number} belongs to no renewal"))
        })?;
        let now = self.now();
        let claim = self.new_claim(now);
        if !self.store.claim_renewal(renewal_id, &claim, now).await? {
            return Err(EngineError::Refused(format!(
                "the renewal of invoice {number} is being processed right now; try again in a minute"
            )));
        }
        let lease = Lease {
            renewal_id,
            token: claim.token,
        };
        let work = self.load(&lease).await?;
        // Only an invoice still awaited settles its period: a period since
        // paid otherwise (say, by card) must not be paid again.
        if work.renewal.status != RenewalStatus::AwaitingTransfer {
            self.release(&lease, &work, now).await?;
            return Err(EngineError::Refused(format!(
                "invoice {number} no longer awaits a transfer (its renewal is {}); nothing recorded",
                work.renewal.status.as_str()
            )));
        }
        let sub = &work.subscription;
        let (period, status) = self.new_term(&work)?;
        let status = match status {
            Some(s) => s,
            None => {
                self.release(&lease, &work, now).await?;
                return Err(EngineError::Refused(format!(
                    "subscription {} is {} and cannot take this payment",
                    sub.id, sub.status
                )));
            }
        };
        let kind = if work.renewal.kind == RenewalKind::Auto {
            MailKind::Receipt
        } else {
            MailKind::OrderConfirmation
        };
        let mut ctx = self.mail_context(sub, &work.customer);
        ctx["amount"] = json!(self.money(inv.total_minor, &inv.currency));
        ctx["new_period_end_date"] = json!(self.local_date(period.end, &work.customer));
        ctx["period_end_date"] = json!(self.local_date(period.end, &work.customer));
        ctx["card"] = json!(format!("bank transfer {reference}"));
        let applied = self
            .store
            .apply(
                Change {
                    lease: Some(lease.clone()),
                    settle_invoice: Some(InvoiceSettlement {
                        number: number.to_string(),
                        status: "paid".into(),
                        paid_at: Some(now),
                        reference: Some(reference.to_string()),
                    }),
                    renewal: Some(RenewalPatch {
                        status: RenewalStatus::Succeeded,
                        next_attempt_at: None,
                        note: None,
                        release: true,
                    }),
                    subscription: Some(self.term_patch(&work, status, period)),
                    mails: vec![NewMail {
                        subscription_id: sub.id,
                        customer_id: sub.customer_id,
                        kind,
                        period_key: period.end.as_second(),
                        offset_key: 0,
                        recipient: work.customer.email.clone(),
                        locale: work.customer.locale.clone(),
                        context: ctx,
                    }],
                    events: vec![NewEvent {
                        amount_minor: Some(inv.total_minor),
                        currency: Some(inv.currency.clone()),
                        period_end: Some(period.end),
                        outcome: Some("paid".into()),
                        detail: json!({"reference": reference, "kind": work.renewal.kind.as_str()}),
                        ..NewEvent::new("invoice.paid", sub)
                    }],
                    ..Default::default()
                },
                now,
            )
            .await?;
        let paid = applied
            .invoice
            .ok_or_else(|| EngineError::Internal("paid invoice not returned".into()))?;
        self.rewrite_documents(number).await;
        tracing::info!(
            subscription_id = sub.id,
            customer_id = sub.customer_id,
            invoice_number = %number,
            amount_minor = paid.total_minor,
            currency = %paid.currency,
            period_end = %period.end,
            outcome = "paid",
            "bank transfer recorded"
        );
        Ok(paid)
    }

    /// Gives a claimed renewal back untouched.
    pub(super) async fn release(
        &self,
        lease: &Lease,
        work: &RenewalWork,
        now: Timestamp,
    ) -> EngineResult<()> {
        self.store
            .apply(
                Change {
                    lease: Some(lease.clone()),
                    renewal: Some(RenewalPatch {
                        status: work.renewal.status,
                        next_attempt_at: work.renewal.next_attempt_at,
                        note: None,
                        release: true,
                    }),
                    ..Default::default()
                },
                now,
            )
            .await?;
        Ok(())
    }

    async fn rewrite_documents(&self, number: &str) {
        if let Ok(Some(inv)) = self.store.invoice(number).await {
            if let Err(e) = invoice::write_documents(&self.config.invoice_dir(), &inv) {
                tracing::error!(invoice_number = %number, error = %e, "cannot write invoice document");
            }
        }
    }

    pub(super) async fn customer_and_plan(
        &self,
        customer_id: i64,
        plan: Option<String>,
    ) -> EngineResult<(Customer, String)> {
        let customer = self.store.customer(customer_id).await?.ok_or_else(|| {
            EngineError::NotFound(format!(
                "customer {customer_id} not found; create one with `renewd customer add`"
            ))
        })?;
        let plan = plan.unwrap_or_else(|| self.config.raw.default_plan.clone());
        if !self.config.raw.plans.contains_key(&plan) {
            let known: Vec<&str> = self.config.raw.plans.keys().map(String::as_str).collect();
            return Err(invalid_input(format!(
                "unknown plan {plan:?}; use one of {}",
                known.join(", ")
            )));
        }
        self.price_year(&plan, &customer)?;
        Ok((customer, plan))
    }

    /// A manual renewal (rule 3, rule 9): before the period end it extends
    /// from the old end and keeps the anniversary; after expiry it starts a
    /// new anchor now. It turns auto-renewal back on unless asked not to.
    pub async fn renew(&self, input: RenewInput) -> EngineResult<FlowResult> {
        let terms = self.check_terms(input.accept_terms.as_deref())?;
        if input.card.is_some() && input.bank_transfer.is_some() {
            return Err(invalid_input(
                "choose one payment method: --card or --bank-transfer",
            ));
        }
        let sub = self.subscription(input.subscription_id).await?;
        let id = sub.id;
        match sub.status {
            Status::Cancelled => {
                return Err(EngineError::Refused(format!("subscription {id} is cancelled and cannot be renewed")))
            }
            Status::PendingPayment => {
                return Err(EngineError::Refused(format!(
                    "subscription {id} is not paid yet; record its transfer with `renewd invoice mark-paid`"
                )))
            }
            _ => {}
        }
        if sub.cancel_at_period_end {
            return Err(EngineError::Refused(format!(
                "subscription {id} is to be cancelled at its period end"
            )));
        }
        let now = self.now();
        if sub.status != Status::Expired && sub.current_period_start.is_some_and(|s| s > now) {
            return Err(EngineError::Refused(format!(
                "subscription {id} is already renewed until {}; it cannot be renewed twice for the same period",
                super::fmt_ts(sub.current_period_end)
            )));
        }
        let payment = match (&input.card, &input.bank_transfer) {
            (Some(card), _) => Some(self.card_method(card, input.card_expiry.as_deref()).await?),
            (None, Some(contact)) => Some(contact.validate()?),
            (None, None) => None,
        };
        let customer = self.store.customer(sub.customer_id).await?.ok_or_else(|| {
            EngineError::Internal(format!("customer of subscription {id} missing"))
        })?;
        self.price_year(&sub.plan, &customer)?;
        let (period_start, term) = match (sub.status, sub.current_period_end) {
            (Status::Expired, _) | (_, None) => (now, 1),
            (_, Some(end)) => (end, sub.term + 1),
        };
        let claim = self.new_claim(now);
        let opened = self
            .store
            .open_manual_renewal(
                &NewManualRenewal {
                    subscription_id: id,
                    customer_id: sub.customer_id,
                    period_start,
                    term,
                    terms_version: terms,
                    auto_renew_after: !input.no_auto_renew,
                },
                &claim,
                now,
            )
            .await?;
        let renewal = match opened {
            Opened::Claimed(r) => r,
            Opened::AlreadyPaid => {
                return Err(EngineError::Refused(format!(
                    "subscription {id} is already renewed for the period starting {period_start}"
                )))
            }
            Opened::Busy => {
                return Err(EngineError::Refused(format!(
                    "a renewal of subscription {id} is being processed right now or is already in progress; check `renewd subscription show {id}` and `renewd invoice list --subscription {id}`"
                )))
            }
            Opened::AwaitingTransfer => {
                return Err(EngineError::Refused(format!(
                    "subscription {id} already has an open invoice for this period; record the transfer with `renewd invoice mark-paid` or let it lapse"
                )))
            }
        };
        let lease = Lease {
            renewal_id: renewal.id,
            token: claim.token,
        };
        // The new payment method is stored only once the renewal is ours, so
        // a refused renewal changes nothing.
        if let Some(pm) = payment {
            self.store
                .apply(
                    Change {
                        lease: Some(lease.clone()),
                        subscription: Some(SubscriptionPatch {
                            id,
                            expect_status: vec![sub.status],
                            payment: Some(pm.clone()),
                            ..Default::default()
                        }),
                        events: vec![NewEvent {
                            outcome: Some(pm.kind().into()),
                            ..NewEvent::new("payment_method.updated", &sub)
                        }],
                        ..Default::default()
                    },
                    now,
                )
                .await?;
        }
        let outcome = self.process(&lease, now).await?;
        let (invoice, problem) = outcome_result(id, outcome);
        Ok(FlowResult {
            subscription: self.subscription(id).await?,
            invoice,
            problem,
        })
    }

    /// Stores a new card; a subscription waiting on a declined card is
    /// retried with it on the next sweep.
    pub async fn set_payment_method(
        &self,
        id: i64,
        card: &str,
        expiry: Option<&str>,
    ) -> EngineResult<Subscription> {
        let sub = self.subscription(id).await?;
        if sub.status == Status::Cancelled {
            return Err(EngineError::Refused(format!(
                "subscription {id} is cancelled"
            )));
        }
        let pm = self.card_method(card, expiry).await?;
        // A period already asked for by transfer is paid by that transfer (or
        // lapses): switching it to a card could pay it twice.
        if let Some(open) = self
            .store
            .list_invoices(Some(id))
            .await?
            .into_iter()
            .find(|i| i.status == "open")
        {
            return Err(EngineError::Refused(format!(
                "subscription {id} has invoice {} awaiting a bank transfer; record it with `renewd invoice mark-paid` or let it lapse before switching to a card",
                open.number
            )));
        }
        let now = self.now();
        self.store
            .apply(
                Change {
                    subscription: Some(SubscriptionPatch {
                        id,
                        expect_status: vec![sub.status],
                        payment: Some(pm),
                        ..Default::default()
                    }),
                    wake_renewals_of: Some(id),
                    events: vec![NewEvent {
                        outcome: Some("card".into()),
                        ..NewEvent::new("payment_method.updated", &sub)
                    }],
                    ..Default::default()
                },
                now,
            )
            .await?;
        tracing::info!(
            subscription_id = id,
            customer_id = sub.customer_id,
            outcome = "updated",
            "card updated"
        );
        self.subscription(id).await
    }

    /// Opens a support request (rule 10); only `cancel` requests exist.
    pub async fn open_request(
        &self,
        subscription_id: i64,
        kind: &str,
        reason: &str,
    ) -> EngineResult<Request> {
        if kind != "cancel" {
            return Err(invalid_input(format!(
                "--kind {kind:?}: the only request kind is cancel"
            )));
        }
        let reason = reason.trim();
        if reason.is_empty() || reason.chars().count() > 2000 {
            return Err(invalid_input("--reason: say why, in 1 to 2000 characters"));
        }
        let sub = self.subscription(subscription_id).await?;
        if sub.status == Status::Cancelled {
            return Err(EngineError::Refused(format!(
                "subscription {subscription_id} is already cancelled"
            )));
        }
        let pending = self.store.list_requests(None).await?.into_iter().find(|r| {
            r.subscription_id == subscription_id
                && matches!(r.status.as_str(), "open" | "in_progress")
        });
        if let Some(r) = pending {
            return Err(EngineError::Refused(format!(
                "request {} for subscription {subscription_id} is already {}; see `renewd request show {}`",
                r.id, r.status, r.id
            )));
        }
        Ok(self
            .store
            .insert_request(subscription_id, kind, reason, self.now())
            .await?)
    }

    pub async fn request(&self, id: i64) -> EngineResult<Request> {
        self.store.request(id).await?.ok_or_else(|| {
            EngineError::NotFound(format!("request {id} not found; see `renewd request list`"))
        })
    }

    /// Staff picked the request up.
    pub async fn start_request(&self, id: i64) -> EngineResult<Request> {
        let r = self.request(id).await?;
        self.update_request(&r, "in_progress", None, vec!["open"])
            .await
    }

    pub async fn reject_request(&self, id: i64, reason: &str) -> EngineResult<Request> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(invalid_input("--reason: say why the request is rejected"));
        }
        let r = self.request(id).await?;
        self.update_request(
            &r,
            "rejected",
            Some(reason.to_string()),
            vec!["open", "in_progress"],
        )
        .await
    }

    async fn update_request(
        &self,
        r: &Request,
        status: &str,
        resolution: Option<String>,
        from: Vec<&str>,
    ) -> EngineResult<Request> {
        if !from.contains(&r.status.as_str()) {
            return Err(EngineError::Refused(format!(
                "request {} is {}; it cannot become {status}",
                r.id, r.status
            )));
        }
        let sub = self.subscription(r.subscription_id).await?;
        self.store
            .apply(
                Change {
                    request: Some(RequestUpdate {
                        id: r.id,
                        expect_status: from.iter().map(|s| s.to_string()).collect(),
                        status: status.to_string(),
                        resolution: resolution.clone(),
                        resolved: status == "rejected",
                    }),
                    events: vec![NewEvent {
                        outcome: Some(status.to_string()),
                        detail: json!({"request_id": r.id, "resolution": resolution}),
                        ..NewEvent::new("request.updated", &sub)
                    }],
                    ..Default::default()
                },
                self.now(),
            )
            .await?;
        self.request(r.id).await
    }

    /// Resolves a cancellation request: cancel now, or at the period end.
    /// Nothing is charged or reminded after the cancellation takes effect.
    pub async fn resolve_request(&self, id: i64, at: CancelAt) -> EngineResult<Request> {
        let r = self.request(id).await?;
        if !matches!(r.status.as_str(), "open" | "in_progress") {
            return Err(EngineError::Refused(format!(
                "request {id} is {}; only open requests can be resolved",
                r.status
            )));
        }
        let sub = self.subscription(r.subscription_id).await?;
        let customer = self
            .store
            .customer(sub.customer_id)
            .await?
            .ok_or_else(|| EngineError::Internal("customer missing".into()))?;
        let now = self.now();
        // A subscription that is not running (past due, unpaid, expired) has
        // no period left to serve: cancelling at period end is cancelling now.
        let now_or_end = if sub.status == Status::Active {
            at
        } else {
            CancelAt::Now
        };
        let (patch, resolution, mails) = match now_or_end {
            CancelAt::Now => {
                let status = sub
                    .status
                    .on(SubEvent::Cancel)
                    .map_err(|e| EngineError::Refused(e.to_string()))?;
                let mut ctx = self.mail_context(&sub, &customer);
                ctx["cancelled_date"] = json!(self.local_date(now, &customer));
                (
                    SubscriptionPatch {
                        id: sub.id,
                        expect_status: vec![sub.status],
                        status: Some(status),
                        ..Default::default()
                    },
                    format!("cancelled now ({now})"),
                    vec![self.cancel_mail(&sub, &customer, ctx)],
                )
            }
            CancelAt::PeriodEnd => (
                SubscriptionPatch {
                    id: sub.id,
                    expect_status: vec![sub.status],
                    cancel_at_period_end: Some(true),
                    ..Default::default()
                },
                format!(
                    "cancels at period end ({})",
                    super::fmt_ts(sub.current_period_end)
                ),
                {
                    // Told now; the mail at the period end is the same outbox
                    // row (unique per period and kind), so it is not sent twice.
                    let mut ctx = self.mail_context(&sub, &customer);
                    ctx["cancelled_date"] = json!(self.local_date(now, &customer));
                    ctx["access_until_date"] = json!(sub
                        .current_period_end
                        .map(|e| self.local_date(e, &customer)));
                    vec![self.cancel_mail(&sub, &customer, ctx)]
                },
            ),
        };
        self.store
            .apply(
                Change {
                    subscription: Some(patch),
                    close_renewals_of: Some(sub.id),
                    request: Some(RequestUpdate {
                        id,
                        expect_status: vec!["open".into(), "in_progress".into()],
                        status: "resolved".into(),
                        resolution: Some(resolution.clone()),
                        resolved: true,
                    }),
                    mails,
                    events: vec![NewEvent {
                        outcome: Some(
                            if now_or_end == CancelAt::Now {
                                "cancelled"
                            } else {
                                "cancel_at_period_end"
                            }
                            .into(),
                        ),
                        detail: json!({"request_id": id, "resolution": resolution}),
                        ..NewEvent::new("subscription.cancellation", &sub)
                    }],
                    ..Default::default()
                },
                now,
            )
            .await?;
        for inv in self.store.list_invoices(Some(sub.id)).await? {
            if inv.status == "void" {
                self.rewrite_documents(&inv.number).await;
            }
        }
        tracing::info!(subscription_id = sub.id, customer_id = sub.customer_id, request_id = id, outcome = %resolution, "cancellation request resolved");
        self.request(id).await
    }

    pub(super) fn cancel_mail(
        &self,
        sub: &Subscription,
        customer: &Customer,
        context: serde_json::Value,
    ) -> NewMail {
        NewMail {
            subscription_id: sub.id,
            customer_id: sub.customer_id,
            kind: MailKind::Cancelled,
            period_key: sub.current_period_end.map(|t| t.as_second()).unwrap_or(0),
            offset_key: 0,
            recipient: customer.email.clone(),
            locale: customer.locale.clone(),
            context,
        }
    }
}
