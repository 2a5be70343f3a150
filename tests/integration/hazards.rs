//! Hazards of moving money. Without the guards here, a timeout after the
//! processor took the money would lead to a second charge under a new key,
//! a crash between the gateway call and the commit would lose the renewal,
//! and two workers could charge the same period.

use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use renewd::store::{Claim, Lease, NewAttempt};

use crate::support::{t, LosesAnswers, TestApp, Unreachable};

#[tokio::test]
async fn a_timeout_after_the_charge_is_reconciled_with_the_same_key_and_charges_once() {
    let app = TestApp::spawn_with("2027-05-01T00:00:00Z", &[], |inner| {
        Arc::new(LosesAnswers {
            inner,
            remaining: AtomicU32::new(0),
        })
    })
    .await;
    let sub = app.tokyo_subscription().await;
    // From now on the gateway loses its next answer.
    let app = {
        let gw = Arc::new(LosesAnswers {
            inner: app.sandbox.clone(),
            remaining: AtomicU32::new(1),
        });
        let mut app = app;
        app.engine.gateway = gw;
        app
    };
    app.set("2028-05-01T00:00:00Z");
    let s = app.sweep().await;
    assert_eq!(s.unknown, 1);
    assert_eq!(
        app.sub(sub.id).await.term,
        1,
        "not renewed until the outcome is known"
    );
    assert_eq!(
        app.sweep().await.renewed,
        0,
        "reconciliation waits for its backoff"
    );

    app.set("2028-05-01T00:01:00Z");
    let s = app.sweep().await;
    assert_eq!(s.renewed, 1);
    let renewals: Vec<_> = app
        .charges()
        .await
        .into_iter()
        .filter(|c| c.idempotency_key.starts_with("renew:"))
        .collect();
    assert_eq!(renewals.len(), 1, "one charge, no second key");
    assert!(renewals[0].idempotency_key.ends_with(":a1"));
    assert_eq!(app.invoices(sub.id).await.len(), 2);
    // The audit log tells the whole story, oldest first.
    let kinds: Vec<String> = app
        .engine
        .store
        .events(Some(sub.id))
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind.starts_with("charge.") || e.kind == "renewal.succeeded")
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        vec![
            "charge.attempt",
            "charge.attempt",
            "charge.unknown",
            "renewal.succeeded",
            "charge.reconciled"
        ],
        "purchase attempt, renewal attempt, its unknown outcome, then the reconciled success"
    );
}

#[tokio::test]
async fn an_unreachable_gateway_is_confirmed_uncharged_before_a_new_attempt() {
    let app = TestApp::spawn("2027-05-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    let mut app = app;
    app.engine.gateway = Arc::new(Unreachable {
        inner: app.sandbox.clone(),
        remaining: AtomicU32::new(1),
    });
    app.set("2028-05-01T00:00:00Z");
    assert_eq!(app.sweep().await.unknown, 1);
    app.set("2028-05-01T00:01:00Z");
    assert_eq!(app.sweep().await.renewed, 1);
    let keys: Vec<String> = app
        .charges()
        .await
        .into_iter()
        .map(|c| c.idempotency_key)
        .collect();
    assert_eq!(keys.len(), 2);
    assert!(
        keys[1].ends_with(":a2"),
        "attempt 2 only after attempt 1 was confirmed uncharged: {keys:?}"
    );
    let events = app.engine.store.events(Some(sub.id)).await.unwrap();
    assert!(events
        .iter()
        .any(|e| e.kind == "charge.reconciled" && e.outcome.as_deref() == Some("not_charged")));
}

#[tokio::test]
async fn a_crash_between_the_charge_and_the_commit_is_recovered_after_the_lease_expires() {
    let app = TestApp::spawn("2027-05-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    app.set("2028-05-01T00:00:00Z");
    let store = app.engine.store.clone();
    let now = app.now();

    // A worker claims the renewal, commits its attempt, charges, then dies.
    store
        .open_due_renewals(now, jiff::SignedDuration::ZERO)
        .await
        .unwrap();
    let claim = Claim {
        token: "dead-worker".into(),
        owner: "dead:1".into(),
        expires_at: t("2028-05-01T00:05:00Z"),
    };
    let ids = store.claim_renewals(now, &claim, 10).await.unwrap();
    assert_eq!(ids.len(), 1);
    let lease = Lease {
        renewal_id: ids[0],
        token: claim.token.clone(),
    };
    let work = store.renewal_work(ids[0]).await.unwrap().unwrap();
    let draft = renewd::domain::invoice::calculate(
        renewd::domain::Currency::parse("JPY").unwrap(),
        &[renewd::domain::invoice::LineInput {
            description: "x".into(),
            quantity: 1,
            unit_amount_minor: 53_000,
            tax_rate_bp: 1000,
        }],
    )
    .unwrap();
    let key = format!(
        "renew:{}:{}:a1",
        sub.id,
        work.renewal.period_start.as_second()
    );
    let attempt = store
        .begin_attempt(
            &lease,
            &NewAttempt {
                idempotency_key: key.clone(),
                payment_method: "pm_card_visa".into(),
                amount_minor: 58_300,
                currency: "JPY".into(),
                invoice_draft: draft,
            },
            now,
        )
        .await
        .unwrap();
    use renewd::gateway::PaymentGateway;
    app.sandbox
        .charge(&renewd::gateway::ChargeRequest {
            idempotency_key: key.clone(),
            payment_method: "pm_card_visa".into(),
            amount: renewd::domain::Money::new(
                58_300,
                renewd::domain::Currency::parse("JPY").unwrap(),
            ),
            description: "x".into(),
            attempt_id: attempt.id,
            subscription_id: sub.id,
        })
        .await
        .unwrap();

    // While the dead worker's lease holds, nobody touches the renewal.
    assert_eq!(app.sweep().await.renewed, 0);
    assert_eq!(app.sub(sub.id).await.term, 1);

    app.set("2028-05-01T00:05:00Z");
    let s = app.sweep().await;
    assert_eq!(s.renewed, 1, "{s:?}");
    let renewals: Vec<_> = app
        .charges()
        .await
        .into_iter()
        .filter(|c| c.idempotency_key.starts_with("renew:"))
        .collect();
    assert_eq!(
        renewals.len(),
        1,
        "the charge taken before the crash is the only one"
    );
    assert_eq!(app.invoices(sub.id).await.len(), 2);
    assert_eq!(app.sub(sub.id).await.term, 2);
}

#[tokio::test]
async fn a_worker_whose_lease_was_taken_over_cannot_write() {
    let app = TestApp::spawn("2027-05-01T00:00:00Z").await;
    app.tokyo_subscription().await;
    app.set("2028-05-01T00:00:00Z");
    let store = app.engine.store.clone();
    let now = app.now();
    store
        .open_due_renewals(now, jiff::SignedDuration::ZERO)
        .await
        .unwrap();
    let old = Claim {
        token: "old".into(),
        owner: "a:1".into(),
        expires_at: now,
    };
    let ids = store.claim_renewals(now, &old, 10).await.unwrap();
    let newer = Claim {
        token: "new".into(),
        owner: "b:2".into(),
        expires_at: t("2028-05-01T01:00:00Z"),
    };
    assert_eq!(
        store.claim_renewals(now, &newer, 10).await.unwrap(),
        ids,
        "the expired lease is taken over"
    );
    let stale = Lease {
        renewal_id: ids[0],
        token: "old".into(),
    };
    let sub = app
        .engine
        .store
        .renewal_work(ids[0])
        .await
        .unwrap()
        .unwrap()
        .subscription;
    let events_before = store.events(Some(sub.id)).await.unwrap().len();
    // A write that would change plenty: none of it may land.
    let err = store
        .apply(
            renewd::store::Change {
                lease: Some(stale.clone()),
                subscription: Some(renewd::store::SubscriptionPatch {
                    id: sub.id,
                    cancel_at_period_end: Some(true),
                    ..Default::default()
                }),
                renewal: Some(renewd::store::RenewalPatch {
                    status: renewd::store::RenewalStatus::Skipped,
                    next_attempt_at: None,
                    note: Some("stale".into()),
                    release: true,
                }),
                events: vec![renewd::store::NewEvent::new("stale.write", &sub)],
                ..Default::default()
            },
            now,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, renewd::store::StoreError::LeaseLost(_)),
        "{err}"
    );
    assert_eq!(
        store.events(Some(sub.id)).await.unwrap().len(),
        events_before
    );
    assert!(!app.sub(sub.id).await.cancel_at_period_end);
    let work = store.renewal_work(ids[0]).await.unwrap().unwrap();
    assert_ne!(work.renewal.status, renewd::store::RenewalStatus::Skipped);
    // The lease's holder still writes, and its savepoint was not disturbed.
    let holder = Lease {
        renewal_id: ids[0],
        token: "new".into(),
    };
    store
        .apply(
            renewd::store::Change {
                lease: Some(holder),
                events: vec![renewd::store::NewEvent::new("holder.write", &sub)],
                ..Default::default()
            },
            now,
        )
        .await
        .unwrap();
    assert_eq!(
        store.events(Some(sub.id)).await.unwrap().len(),
        events_before + 1
    );
}

#[tokio::test]
async fn a_subscription_cancelled_or_switched_off_after_the_claim_is_not_charged() {
    let app = TestApp::spawn("2027-05-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    app.set("2028-05-01T00:00:00Z");
    app.engine
        .store
        .open_due_renewals(app.now(), jiff::SignedDuration::ZERO)
        .await
        .unwrap();
    // Auto-renewal turned off after the renewal row was opened.
    app.engine.set_auto_renew(sub.id, false).await.unwrap();
    let s = app.sweep().await;
    assert_eq!((s.renewed, s.skipped, s.expired), (0, 1, 1));
    assert_eq!(app.charges().await.len(), 1, "only the purchase");
}

#[tokio::test]
async fn a_not_found_answer_is_not_trusted_while_the_first_request_may_still_be_in_flight() {
    // Without the settle window, a worker reconciling 10 s after a lost
    // request would charge a new key while the first request could still land.
    let app = TestApp::spawn_with(
        "2027-05-01T00:00:00Z",
        &[
            ("RENEWD__DUNNING__RECONCILE_BACKOFF", "10s"),
            ("RENEWD__GATEWAY__TIMEOUT", "30s"),
        ],
        |g| g,
    )
    .await;
    app.tokyo_subscription().await;
    let mut app = app;
    app.engine.gateway = Arc::new(Unreachable {
        inner: app.sandbox.clone(),
        remaining: AtomicU32::new(1),
    });
    app.set("2028-05-01T00:00:00Z");
    assert_eq!(app.sweep().await.unknown, 1);
    app.set("2028-05-01T00:00:10Z");
    let s = app.sweep().await;
    assert_eq!(
        (s.renewed, s.unknown),
        (0, 1),
        "still unknown inside the settle window"
    );
    assert_eq!(app.charges().await.len(), 1, "no second key yet");
    app.set("2028-05-01T00:00:40Z");
    assert_eq!(app.sweep().await.renewed, 1);
    assert!(app.charges().await[1].idempotency_key.ends_with(":a2"));
}

#[tokio::test]
async fn a_charge_that_lands_after_the_subscription_changed_is_still_invoiced_and_flagged_for_refund(
) {
    let app = TestApp::spawn("2027-05-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    let mut app = app;
    app.engine.gateway = Arc::new(LosesAnswers {
        inner: app.sandbox.clone(),
        remaining: AtomicU32::new(1),
    });
    app.set("2028-05-01T00:00:00Z");
    assert_eq!(app.sweep().await.unknown, 1);
    // Meanwhile the subscription is cancelled by hand.
    app.engine
        .store
        .apply(
            renewd::store::Change {
                subscription: Some(renewd::store::SubscriptionPatch {
                    id: sub.id,
                    status: Some(renewd::domain::Status::Cancelled),
                    ..Default::default()
                }),
                ..Default::default()
            },
            app.now(),
        )
        .await
        .unwrap();
    app.set("2028-05-01T00:01:00Z");
    app.sweep().await;
    let invoices = app.invoices(sub.id).await;
    assert_eq!(invoices.len(), 2, "the charge taken is invoiced");
    assert_eq!(
        invoices[1].payment_reference.as_deref(),
        Some(app.charges().await[1].id.as_str())
    );
    let events = app.engine.store.events(Some(sub.id)).await.unwrap();
    assert!(events.iter().any(|e| e.kind == "renewal.refund_required"));
    assert_eq!(app.sub(sub.id).await.status.as_str(), "cancelled");
    assert!(app
        .mails_of(sub.id, renewd::mail::MailKind::Receipt)
        .await
        .is_empty());
}

#[tokio::test]
async fn after_more_than_a_year_down_every_missed_period_is_renewed_in_one_sweep_and_the_next_sweep_does_nothing(
) {
    let app = TestApp::spawn("2027-05-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    app.set("2029-06-01T00:00:00Z");
    assert_eq!(app.sweep().await.renewed, 2);
    let before = app.fingerprint().await;
    assert_eq!(app.sweep().await.renewed, 0);
    assert_eq!(app.fingerprint().await, before);
    assert_eq!(app.sub(sub.id).await.term, 3);
    assert_eq!(app.succeeded_charges().await.len(), 3);
}

#[tokio::test]
async fn downtime_longer_than_the_grace_period_still_charges_instead_of_expiring() {
    let app = TestApp::spawn("2027-05-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    app.set("2028-06-15T00:00:00Z");
    assert_eq!(app.sweep().await.renewed, 1);
    assert_eq!(app.sub(sub.id).await.status.as_str(), "active");
}

/// Sent mail is recorded a batch per write, and only by the sender whose
/// claim still holds: rows another sender took over after the first one's
/// lease ran out are left for the new holder to record, events included,
/// while the rest of the batch is recorded.
#[tokio::test]
async fn sent_mail_is_recorded_only_by_the_sender_still_holding_the_claim() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let subs = [
        app.purchase(c, "pm_card_visa").await.id,
        app.purchase(c, "pm_card_visa").await.id,
    ];
    let store = &app.engine.store;
    let claim = |token: &str, at: jiff::Timestamp| Claim {
        token: token.into(),
        owner: format!("test:{token}"),
        expires_at: at + jiff::SignedDuration::from_mins(1),
    };
    let now = app.now();
    let first = store.claim_mail(now, &claim("a", now), 100).await.unwrap();
    let ids: Vec<i64> = first.iter().map(|m| m.id).collect();
    assert_eq!(ids.len(), 2, "one order confirmation per purchase");

    // The first sender's lease runs out; another claims the first row only.
    let later = now + jiff::SignedDuration::from_mins(2);
    let second = store
        .claim_mail(later, &claim("b", later), 1)
        .await
        .unwrap();
    assert_eq!(second.iter().map(|m| m.id).collect::<Vec<_>>(), [ids[0]]);

    let status = |mails: Vec<renewd::store::Mail>| -> Vec<String> {
        mails.into_iter().map(|m| m.status).collect()
    };
    let sent_events =
        |events: Vec<renewd::store::Event>| events.iter().filter(|e| e.kind == "mail.sent").count();
    // The first sender records what it still holds, and only that.
    assert_eq!(store.mails_sent(&ids, "a", later).await.unwrap(), [ids[1]]);
    assert_eq!(status(app.mails(subs[0]).await), ["queued"]);
    assert_eq!(status(app.mails(subs[1]).await), ["sent"]);
    assert_eq!(sent_events(app.events_of(subs[0]).await), 0);
    assert_eq!(sent_events(app.events_of(subs[1]).await), 1);

    // The new holder records its row.
    assert_eq!(store.mails_sent(&ids, "b", later).await.unwrap(), [ids[0]]);
    assert_eq!(status(app.mails(subs[0]).await), ["sent"]);
    assert_eq!(sent_events(app.events_of(subs[0]).await), 1);
    assert_eq!(sent_events(app.events_of(subs[1]).await), 1);
}

/// A refused write must not leave its row locks behind. PostgreSQL keeps a
/// transaction's locks until its ROLLBACK reaches the server; a transaction
/// merely dropped by the client only queues that ROLLBACK, which is sent
/// when its pooled connection is next driven. Meanwhile a claim (`FOR UPDATE
/// SKIP LOCKED`) passes over the renewal and the sweep misses it. Here the
/// runtime that owns the pool is not driven again after the refusal, so a
/// ROLLBACK left to the pool would never be sent, and another connection
/// finds the renewal still locked.
#[test]
fn a_refused_cancellation_leaves_no_renewal_locked() {
    use renewd::engine::{CancelAt, EngineError};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (app, sub, req) = rt.block_on(async {
        let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
        let sub = app.tokyo_subscription().await;
        let mut app = app;
        app.engine.gateway = Arc::new(LosesAnswers {
            inner: app.sandbox.clone(),
            remaining: AtomicU32::new(1),
        });
        app.set("2028-04-01T00:00:00Z");
        assert_eq!(app.sweep().await.unknown, 1);
        let req = app
            .engine
            .open_request(sub.id, "cancel", "leaving")
            .await
            .expect("request");
        (app, sub, req)
    });
    let refused = rt.block_on(app.engine.resolve_request(req.id, CancelAt::Now));
    assert!(
        matches!(refused, Err(EngineError::Refused(ref m)) if m.contains("reconciled")),
        "{refused:?}"
    );
    if let Some(db) = &app.pg {
        let url = db.url.clone();
        let locked = std::thread::spawn(move || {
            let other = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            other.block_on(async {
                use sqlx::{Connection, Executor};
                let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
                conn.execute("SET lock_timeout = '2s'").await.expect("set");
                let mut tx = conn.begin().await.expect("begin");
                let r = sqlx::query(
                    "SELECT id FROM renewals WHERE subscription_id = $1 \
                     AND status = 'pending' FOR UPDATE NOWAIT",
                )
                .bind(sub.id)
                .fetch_all(&mut *tx)
                .await;
                let _ = tx.rollback().await;
                r.err().map(|e| e.to_string())
            })
        })
        .join()
        .expect("lock check");
        assert_eq!(
            locked, None,
            "the refused cancellation still locks the renewal"
        );
    }
    rt.block_on(async {
        app.set("2028-04-01T00:01:00Z");
        assert_eq!(app.sweep().await.renewed, 1, "the charge taken is recorded");
        drop(app);
    });
}

/// A relay that accepts the first message at once and holds every later one
/// until `release` is notified.
struct HoldsAfterFirst {
    inner: renewd::mail::file::FileTransport,
    sent: AtomicU32,
    release: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl renewd::mail::MailTransport for HoldsAfterFirst {
    async fn send(&self, mail: &renewd::mail::OutgoingMail) -> Result<(), renewd::mail::MailError> {
        if self.sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
            self.release.notified().await;
        }
        self.inner.send(mail).await
    }
}

/// Accepted mail is recorded in groups, but a message the relay accepted
/// is not held back behind a send that hangs: without the wait bound, it
/// would stay unrecorded (and be sent again after a crash) for as long as
/// the slowest message of its batch took.
#[tokio::test]
async fn accepted_mail_is_recorded_while_another_send_still_hangs() {
    let mut app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let subs = [
        app.purchase(c, "pm_card_visa").await.id,
        app.purchase(c, "pm_card_visa").await.id,
    ];
    let relay = Arc::new(HoldsAfterFirst {
        inner: renewd::mail::file::FileTransport::new(app.engine.config.mail_dir()),
        sent: AtomicU32::new(0),
        release: tokio::sync::Notify::new(),
    });
    app.engine.transport = relay.clone();
    let sent_count = || async {
        let mut n = 0;
        for sub in subs {
            n += app
                .mails(sub)
                .await
                .iter()
                .filter(|m| m.status == "sent")
                .count();
        }
        n
    };
    let watch = async {
        // Polls the store (no fixed sleep): the first message must be
        // recorded while the second is still held at the relay, within a
        // few times RECORD_WAIT (100 ms), not only when the batch ends.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let mut recorded_while_held = false;
        while std::time::Instant::now() < deadline {
            if sent_count().await == 1 {
                recorded_while_held = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        relay.release.notify_one();
        recorded_while_held
    };
    let (delivered, recorded_while_held) = tokio::join!(app.engine.deliver_mail(), watch);
    assert!(
        recorded_while_held,
        "the accepted message waited for the held one"
    );
    assert_eq!(delivered.expect("delivery").sent, 2);
    assert_eq!(sent_count().await, 2);
}
