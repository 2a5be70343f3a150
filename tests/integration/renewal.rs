//! Time travel through renewals: anniversaries computed from the anchor,
//! one charge, one invoice and one receipt per period.

use renewd::mail::MailKind;

use crate::support::{days, t, TestApp};

fn local_date(ts: jiff::Timestamp, tz: &str) -> String {
    ts.to_zoned(jiff::tz::TimeZone::get(tz).unwrap())
        .date()
        .to_string()
}

#[tokio::test]
async fn a_card_subscription_renews_on_each_anniversary_for_five_years_with_one_charge_invoice_and_receipt_each(
) {
    let app = TestApp::spawn("2027-03-10T03:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    assert_eq!(sub.anchor_date.unwrap().to_string(), "2027-03-10");

    app.run_until("2032-03-20T00:00:00Z", days(1)).await;

    let charges = app.succeeded_charges().await;
    assert_eq!(charges.len(), 6, "the purchase and five renewals");
    let keys: std::collections::BTreeSet<_> =
        charges.iter().map(|c| c.idempotency_key.clone()).collect();
    assert_eq!(keys.len(), 6, "every charge has its own key");
    let invoices = app.invoices(sub.id).await;
    assert_eq!(invoices.len(), 6);
    for (year, inv) in (2027..=2032).zip(&invoices) {
        assert_eq!(inv.number, format!("INV-{year}-000001"));
        assert_eq!(inv.status, "paid");
        assert_eq!(inv.total_minor, 58_300, "¥53,000 plus 10% tax");
        assert_eq!(
            local_date(inv.period_end, "Asia/Tokyo"),
            format!("{}-03-10", year + 1)
        );
    }
    for (charge, inv) in charges.iter().zip(&invoices) {
        assert_eq!(
            inv.payment_reference.as_deref(),
            Some(charge.id.as_str()),
            "each invoice pays exactly its charge"
        );
    }
    let receipts = app.mails_of(sub.id, MailKind::Receipt).await;
    assert_eq!(receipts.len(), 5);
    let receipt_invoices: std::collections::BTreeSet<_> = receipts
        .iter()
        .map(|m| m.invoice_number.clone().unwrap())
        .collect();
    assert_eq!(receipt_invoices.len(), 5, "one receipt per renewal invoice");
    assert!(receipts.iter().all(|m| m.status == "sent"));
    let sub = app.sub(sub.id).await;
    assert_eq!(sub.term, 6);
    assert_eq!(
        local_date(sub.current_period_end.unwrap(), "Asia/Tokyo"),
        "2033-03-10"
    );
}

#[tokio::test]
async fn renewal_charges_at_the_local_period_end_and_not_a_second_before() {
    let app = TestApp::spawn("2027-03-10T03:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    let end = sub.current_period_end.unwrap();
    assert_eq!(end, t("2028-03-09T15:00:00Z"), "midnight in Tokyo");

    app.clock
        .set(end.checked_sub(jiff::SignedDuration::from_secs(1)).unwrap());
    assert_eq!(app.sweep().await.renewed, 0);
    app.clock.set(end);
    assert_eq!(app.sweep().await.renewed, 1);
    let renewed = app.sub(sub.id).await;
    assert_eq!(
        renewed.current_period_start,
        Some(end),
        "the new term starts at the old period end"
    );
}

#[tokio::test]
async fn a_29_february_purchase_renews_on_28_february_until_the_next_leap_year() {
    let app = TestApp::spawn("2028-02-29T05:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let sub = app.purchase(c, "pm_card_visa").await;
    assert_eq!(sub.anchor_date.unwrap().to_string(), "2028-02-29");

    app.run_until("2032-03-05T00:00:00Z", days(1)).await;

    let renewal_starts: Vec<String> = app
        .invoices(sub.id)
        .await
        .iter()
        .skip(1)
        .map(|i| i.period_start.to_string())
        .collect();
    assert_eq!(
        renewal_starts,
        vec![
            "2029-02-28T00:00:00Z",
            "2030-02-28T00:00:00Z",
            "2031-02-28T00:00:00Z",
            "2032-02-29T00:00:00Z"
        ]
    );
    assert_eq!(
        app.sub(sub.id).await.current_period_end,
        Some(t("2033-02-28T00:00:00Z"))
    );
}

#[tokio::test]
async fn a_subscription_far_ahead_of_utc_renews_on_its_local_date() {
    // Kiritimati is UTC+14: 12:00 UTC on 1 June is already 2 June there.
    let app = TestApp::spawn("2027-06-01T12:00:00Z").await;
    let c = app.customer("Pacific/Kiritimati", "en", "US", "USD").await;
    let sub = app.purchase(c, "pm_card_visa").await;
    assert_eq!(sub.anchor_date.unwrap().to_string(), "2027-06-02");
    assert_eq!(sub.current_period_end, Some(t("2028-06-01T10:00:00Z")));

    app.set("2028-06-01T09:59:59Z");
    assert_eq!(app.sweep().await.renewed, 0);
    app.set("2028-06-01T10:00:00Z");
    assert_eq!(app.sweep().await.renewed, 1);
}

#[tokio::test]
async fn a_subscription_far_behind_utc_renews_on_its_local_date() {
    // Pago Pago is UTC-11: 05:00 UTC on 1 June is still 31 May there.
    let app = TestApp::spawn("2027-06-01T05:00:00Z").await;
    let c = app.customer("Pacific/Pago_Pago", "en", "US", "USD").await;
    let sub = app.purchase(c, "pm_card_visa").await;
    assert_eq!(sub.anchor_date.unwrap().to_string(), "2027-05-31");
    assert_eq!(sub.current_period_end, Some(t("2028-05-31T11:00:00Z")));
    app.set("2028-05-31T11:00:00Z");
    assert_eq!(app.sweep().await.renewed, 1);
}

#[tokio::test]
async fn invoice_numbers_are_gap_free_across_many_subscriptions() {
    let app = TestApp::spawn("2027-01-05T00:00:00Z").await;
    for _ in 0..7 {
        app.tokyo_subscription().await;
    }
    app.run_until("2028-01-10T00:00:00Z", days(1)).await;
    let all = app.engine.store.list_invoices(None).await.unwrap();
    let y2027: Vec<_> = all
        .iter()
        .filter(|i| i.number.starts_with("INV-2027-"))
        .map(|i| i.number.clone())
        .collect();
    let y2028: Vec<_> = all
        .iter()
        .filter(|i| i.number.starts_with("INV-2028-"))
        .map(|i| i.number.clone())
        .collect();
    assert_eq!(
        y2027,
        (1..=7)
            .map(|n| format!("INV-2027-{n:06}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        y2028,
        (1..=7)
            .map(|n| format!("INV-2028-{n:06}"))
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_sweep_run_twice_at_the_same_instant_charges_once_and_changes_nothing() {
    let app = TestApp::spawn("2027-01-10T00:00:00Z").await;
    let renewing = app.tokyo_subscription().await;
    let lapsing = app.tokyo_subscription().await;
    app.engine.set_auto_renew(lapsing.id, false).await.unwrap();
    app.set("2027-02-20T00:00:00Z");
    let reminded = app.tokyo_subscription().await;
    app.engine.set_auto_renew(reminded.id, false).await.unwrap();
    let c = app.customer("UTC", "en", "US", "USD").await;
    let declining = app.purchase(c, "pm_card_visa").await;
    app.engine
        .store
        .apply(
            renewd::store::Change {
                subscription: Some(renewd::store::SubscriptionPatch {
                    id: declining.id,
                    payment: Some(renewd::store::PaymentMethod::Card {
                        token: "pm_card_chargeDeclinedInsufficientFunds".into(),
                        brand: "visa".into(),
                        last4: "9995".into(),
                        expiry: None,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            app.now(),
        )
        .await
        .unwrap();

    // 2028-01-20: the first two have passed their end, the third is 31 days
    // from its end... move to where everything is due at once.
    app.set("2028-02-12T00:00:00Z");
    let first = app.sweep().await;
    assert_eq!(first.renewed, 1, "{first:?}");
    assert_eq!(first.expired, 1, "{first:?}");
    assert_eq!(first.reminders, 1, "{first:?}");
    assert!(
        first.declined == 0,
        "the declining card is not due yet: {first:?}"
    );
    let charges_after_first = app.charges().await.len();
    let before = app.fingerprint().await;

    let second = app.sweep().await;
    assert_eq!(
        app.charges().await.len(),
        charges_after_first,
        "no second charge"
    );
    assert_eq!(
        app.fingerprint().await,
        before,
        "the second sweep wrote nothing"
    );
    assert_eq!(
        (
            second.renewed,
            second.expired,
            second.reminders,
            second.notices,
            second.mail_sent,
            second.declined
        ),
        (0, 0, 0, 0, 0, 0)
    );
    assert_eq!(app.sub(renewing.id).await.term, 2);
}

#[tokio::test]
async fn a_sweep_keeps_at_most_renewal_concurrency_gateway_calls_in_flight_and_renews_every_one_once(
) {
    let counter = std::sync::Arc::new(std::sync::Mutex::new(None));
    let slot = counter.clone();
    let app = TestApp::spawn_with(
        "2027-03-10T03:00:00Z",
        &[
            ("RENEWD__RENEWAL__CONCURRENCY", "3"),
            ("RENEWD__RENEWAL__BATCH_SIZE", "4"),
        ],
        move |inner| {
            let c = std::sync::Arc::new(crate::support::CountsInFlight::new(inner));
            *slot.lock().unwrap() = Some(c.clone());
            c
        },
    )
    .await;
    let mut subs = Vec::new();
    for _ in 0..12 {
        subs.push(app.tokyo_subscription().await);
    }
    let gateway = counter.lock().unwrap().clone().unwrap();
    gateway.most.store(0, std::sync::atomic::Ordering::SeqCst);
    gateway
        .answered
        .store(subs.len(), std::sync::atomic::Ordering::SeqCst);
    *gateway.store.lock().unwrap() = Some(app.engine.store.clone());
    app.set("2028-03-10T03:00:00Z");
    let summary = app.sweep().await;
    assert_eq!(summary.renewed, 12, "{summary:?}");
    let most = gateway.most.load(std::sync::atomic::Ordering::SeqCst);
    assert!(most <= 3, "{most} gateway calls were in flight at once");
    assert!(most >= 2, "the calls overlapped: at most {most} at once");
    // An attempt is written only once its call has a slot: a request never
    // waits behind its attempt, whose age decides when a lookup that finds
    // nothing is trusted.
    let unanswered = gateway
        .most_unanswered
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        unanswered <= 3,
        "{unanswered} attempts were written and not yet answered at once"
    );
    for sub in &subs {
        assert_eq!(app.invoices(sub.id).await.len(), 2, "one charge per period");
    }
    assert_eq!(app.sweep().await.renewed, 0, "nothing left to renew");
}
