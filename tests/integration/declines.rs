//! Declined renewals: soft declines are retried on the schedule, hard ones
//! are not; either way the subscription is past_due and then expires.

use renewd::mail::MailKind;
use renewd::store::{Change, PaymentMethod, SubscriptionPatch};

use crate::support::{days, t, TestApp};

async fn switch_card(app: &TestApp, id: i64, token: &str) {
    app.engine
        .store
        .apply(
            Change {
                subscription: Some(SubscriptionPatch {
                    id,
                    payment: Some(PaymentMethod::Card {
                        token: token.into(),
                        brand: "visa".into(),
                        last4: "0000".into(),
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
}

#[tokio::test]
async fn a_soft_decline_is_retried_on_days_1_3_5_7_then_the_subscription_expires() {
    let app = TestApp::spawn("2027-05-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let sub = app.purchase(c, "pm_card_visa").await;
    switch_card(&app, sub.id, "pm_card_chargeDeclinedInsufficientFunds").await;

    app.set("2028-05-01T00:00:00Z");
    let s = app.sweep().await;
    assert_eq!((s.declined, s.retry_scheduled), (1, 1));
    assert_eq!(app.sub(sub.id).await.status.as_str(), "past_due");

    app.run_until("2028-05-20T00:00:00Z", jiff::SignedDuration::from_hours(6))
        .await;
    let attempts: Vec<_> = app
        .charges()
        .await
        .into_iter()
        .filter(|c| c.idempotency_key.starts_with("renew:"))
        .map(|c| (c.created_at.to_string(), c.outcome))
        .collect();
    let expect: Vec<(String, String)> = [
        "2028-05-01",
        "2028-05-02",
        "2028-05-04",
        "2028-05-06",
        "2028-05-08",
    ]
    .iter()
    .map(|d| (format!("{d}T00:00:00Z"), "declined".to_string()))
    .collect();
    assert_eq!(attempts, expect);
    assert_eq!(
        app.mails_of(sub.id, MailKind::PaymentFailed).await.len(),
        5,
        "one payment-failed mail per attempt"
    );
    assert_eq!(app.sub(sub.id).await.status.as_str(), "expired");
    assert_eq!(app.mails_of(sub.id, MailKind::Expired).await.len(), 1);
}

#[tokio::test]
async fn a_hard_decline_is_not_retried_and_expires_when_the_grace_period_ends() {
    let app = TestApp::spawn("2027-05-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let sub = app.purchase(c, "pm_card_visa").await;
    switch_card(&app, sub.id, "pm_card_chargeDeclined").await;

    app.set("2028-05-01T00:00:00Z");
    let s = app.sweep().await;
    assert_eq!((s.declined, s.retry_scheduled), (1, 0));
    app.run_until("2028-05-14T23:00:00Z", jiff::SignedDuration::from_hours(6))
        .await;
    assert_eq!(app.sub(sub.id).await.status.as_str(), "past_due");
    assert_eq!(
        app.charges().await.len(),
        2,
        "the purchase and one declined renewal: no retry"
    );
    app.set("2028-05-15T00:00:00Z");
    assert_eq!(app.sweep().await.expired, 1);
    assert_eq!(app.sub(sub.id).await.status.as_str(), "expired");
    assert_eq!(app.charges().await.len(), 2);
}

#[tokio::test]
async fn a_retry_that_succeeds_renews_from_the_old_period_end() {
    let app = TestApp::spawn("2027-05-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let sub = app.purchase(c, "pm_card_visa").await;
    switch_card(&app, sub.id, "pm_card_chargeDeclinedInsufficientFunds").await;
    app.set("2028-05-01T00:00:00Z");
    app.sweep().await;
    switch_card(&app, sub.id, "pm_card_visa").await;
    app.run_until("2028-05-03T00:00:00Z", days(1)).await;
    let after = app.sub(sub.id).await;
    assert_eq!(after.status.as_str(), "active");
    assert_eq!(
        after.current_period_start,
        Some(t("2028-05-01T00:00:00Z")),
        "not the retry date"
    );
    assert_eq!(after.current_period_end, Some(t("2029-05-01T00:00:00Z")));
    assert_eq!(app.succeeded_charges().await.len(), 2);
    assert_eq!(app.invoices(sub.id).await.len(), 2);
}

#[tokio::test]
async fn a_declined_purchase_never_starts_the_subscription() {
    let app = TestApp::spawn("2027-05-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let r = app
        .engine
        .purchase(renewd::engine::PurchaseInput {
            customer_id: c,
            plan: None,
            accept_terms: Some("2026-04".into()),
            card: "pm_card_chargeDeclined".into(),
            card_expiry: None,
        })
        .await
        .unwrap();
    assert!(r.problem.unwrap().contains("card declined"));
    assert!(r.invoice.is_none());
    assert_eq!(r.subscription.status.as_str(), "expired");
    assert!(app.invoices(r.subscription.id).await.is_empty());
    app.run_until("2028-06-01T00:00:00Z", days(7)).await;
    assert_eq!(app.charges().await.len(), 1, "never charged again");
}

#[tokio::test]
async fn after_downtime_missed_retries_are_skipped_not_fired_back_to_back() {
    let app = TestApp::spawn("2027-05-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let sub = app.purchase(c, "pm_card_visa").await;
    switch_card(&app, sub.id, "pm_card_chargeDeclinedInsufficientFunds").await;
    app.set("2028-05-01T00:00:00Z");
    app.sweep().await;
    // Down until day 6: the retries of days 1, 3 and 5 were missed.
    app.set("2028-05-07T00:00:00Z");
    let s = app.sweep().await;
    assert_eq!(s.declined, 1, "one retry now, not three in a row");
    let renewals = app
        .charges()
        .await
        .into_iter()
        .filter(|c| c.idempotency_key.starts_with("renew:"))
        .count();
    assert_eq!(renewals, 2);
    assert_eq!(app.mails_of(sub.id, MailKind::PaymentFailed).await.len(), 2);
    app.set("2028-05-08T00:00:00Z");
    app.sweep().await;
    assert_eq!(
        app.sub(sub.id).await.status.as_str(),
        "expired",
        "the day-7 retry was the last"
    );
}
