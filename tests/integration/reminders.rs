//! Reminders, notices and expiry for subscriptions nearing their end.

use renewd::domain::AutoRenew;
use renewd::engine::EngineError;
use renewd::mail::MailKind;

use crate::support::{days, t, TestApp};

#[tokio::test]
async fn an_auto_renew_off_subscription_gets_each_reminder_once_then_expires_at_period_end() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let sub = app.purchase(c, "pm_card_visa").await;
    app.engine.set_auto_renew(sub.id, false).await.unwrap();

    // Twice a day, so every reminder day is swept more than once.
    app.run_until("2028-03-31T23:59:59Z", jiff::SignedDuration::from_hours(12))
        .await;
    let offsets: Vec<i64> = app
        .mails_of(sub.id, MailKind::RenewalReminder)
        .await
        .iter()
        .map(|m| m.offset_key)
        .collect();
    assert_eq!(offsets, vec![30, 7, 1]);
    assert_eq!(app.sub(sub.id).await.status.as_str(), "active");

    app.set("2028-04-01T00:00:00Z");
    let s = app.sweep().await;
    assert_eq!(s.expired, 1);
    let after = app.sub(sub.id).await;
    assert_eq!(after.status.as_str(), "expired");
    assert_eq!(
        app.succeeded_charges().await.len(),
        1,
        "only the purchase was charged"
    );
    assert_eq!(app.mails_of(sub.id, MailKind::Expired).await.len(), 1);

    app.run_until("2028-06-01T00:00:00Z", days(1)).await;
    assert_eq!(
        app.mails_of(sub.id, MailKind::RenewalReminder).await.len(),
        3,
        "no reminders after expiry"
    );
    assert_eq!(app.mails_of(sub.id, MailKind::Expired).await.len(), 1);
}

#[tokio::test]
async fn after_a_long_gap_only_the_latest_due_reminder_is_sent() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let sub = app.purchase(c, "pm_card_visa").await;
    app.engine.set_auto_renew(sub.id, false).await.unwrap();

    // Down from the purchase until 3 days before the end: the 30-day
    // reminder is stale, the 7-day one is the latest due.
    app.set("2028-03-29T00:00:00Z");
    let s = app.sweep().await;
    assert_eq!(s.reminders, 1);
    let sent: Vec<i64> = app
        .mails_of(sub.id, MailKind::RenewalReminder)
        .await
        .iter()
        .map(|m| m.offset_key)
        .collect();
    assert_eq!(sent, vec![7]);

    app.set("2028-03-31T00:00:00Z");
    app.sweep().await;
    let sent: Vec<i64> = app
        .mails_of(sub.id, MailKind::RenewalReminder)
        .await
        .iter()
        .map(|m| m.offset_key)
        .collect();
    assert_eq!(sent, vec![7, 1]);
}

#[tokio::test]
async fn a_reminder_says_when_the_subscription_ends_and_how_to_renew() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("Asia/Tokyo", "en", "JP", "JPY").await;
    let sub = app.purchase(c, "pm_card_visa").await;
    app.engine.set_auto_renew(sub.id, false).await.unwrap();
    app.set("2028-03-25T00:00:00Z");
    app.sweep().await;
    let mail = &app.mails_of(sub.id, MailKind::RenewalReminder).await[0];
    let rendered = renewd::engine::render_mail(mail).unwrap();
    assert!(
        rendered.subject.contains("April 1, 2028"),
        "{}",
        rendered.subject
    );
    assert!(
        rendered
            .text
            .contains(&format!("renewd subscription renew {}", sub.id)),
        "{}",
        rendered.text
    );
    let file = app
        .dir
        .path()
        .join("mail")
        .join(format!("{:08}-renewal_reminder.eml", mail.id));
    let eml = std::fs::read_to_string(file).unwrap();
    assert!(eml.contains("Message-ID: <renewd."), "{eml}");
    assert!(eml.contains("To: customer@example.com"));
}

#[tokio::test]
async fn auto_renew_on_subscriptions_get_one_upcoming_notice_and_a_card_expiry_warning() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let sub = app
        .engine
        .purchase(renewd::engine::PurchaseInput {
            customer_id: c,
            plan: None,
            accept_terms: Some("2026-04".into()),
            card: "pm_card_visa".into(),
            card_expiry: Some("2028-02".into()),
        })
        .await
        .unwrap()
        .subscription;
    app.run_until("2028-03-31T00:00:00Z", days(1)).await;
    let notices = app.mails_of(sub.id, MailKind::UpcomingRenewal).await;
    assert_eq!(notices.len(), 1);
    assert_eq!(
        notices[0].created_at,
        t("2028-03-02T00:00:00Z"),
        "30 days before the end"
    );
    assert_eq!(app.mails_of(sub.id, MailKind::CardExpiring).await.len(), 1);
    assert!(app
        .mails_of(sub.id, MailKind::RenewalReminder)
        .await
        .is_empty());
}

/// A card changed after the upcoming notice went out still gets its
/// warning: the notice scan passes over a subscription whose notices are
/// queued (SQLite marks it), and a new payment method must undo that.
#[tokio::test]
async fn a_card_that_ends_first_set_after_the_notice_still_gets_its_warning() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let sub = app.purchase(c, "pm_card_visa").await;
    app.run_until("2028-03-10T00:00:00Z", days(1)).await;
    assert_eq!(
        app.mails_of(sub.id, MailKind::UpcomingRenewal).await.len(),
        1
    );
    assert!(app
        .mails_of(sub.id, MailKind::CardExpiring)
        .await
        .is_empty());
    // Valid through March 2028: it ends before the April 1 renewal.
    app.engine
        .set_payment_method(sub.id, "pm_card_mastercard", Some("2028-03"))
        .await
        .unwrap();
    app.run_until("2028-03-31T00:00:00Z", days(1)).await;
    let warnings = app.mails_of(sub.id, MailKind::CardExpiring).await;
    assert_eq!(warnings.len(), 1);
    assert_eq!(
        warnings[0].created_at,
        t("2028-03-11T00:00:00Z"),
        "the next day's sweep"
    );
    assert_eq!(
        app.mails_of(sub.id, MailKind::UpcomingRenewal).await.len(),
        1,
        "the notice is not sent again"
    );
}

/// The notice scan passes over a subscription once its notices are queued,
/// also when they were queued before (a database from before the marker, or
/// a card changed to one that still runs past the renewal): offered again,
/// its notice writes nothing, and it is marked all the same.
#[tokio::test]
async fn a_subscription_whose_notice_was_already_queued_is_marked_when_offered_again() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let sub = app.purchase(c, "pm_card_visa").await;
    let owed = |now: &str| notice_scan(t(now));
    let ids = |rows: Vec<(renewd::store::Subscription, renewd::store::Customer)>| -> Vec<i64> {
        rows.iter().map(|(s, _)| s.id).collect()
    };
    app.run_until("2028-03-05T00:00:00Z", days(1)).await;
    let store = &app.engine.store;
    assert!(ids(store.scan(&owed("2028-03-05T00:00:00Z")).await.unwrap()).is_empty());
    app.engine
        .set_payment_method(sub.id, "pm_card_mastercard", Some("2031-01"))
        .await
        .unwrap();
    assert_eq!(
        ids(store.scan(&owed("2028-03-05T00:00:00Z")).await.unwrap()),
        [sub.id],
        "a new card: looked at again"
    );
    app.run_until("2028-03-06T00:00:00Z", days(1)).await;
    assert!(
        ids(store.scan(&owed("2028-03-06T00:00:00Z")).await.unwrap()).is_empty(),
        "marked again, though nothing new was queued"
    );
    assert_eq!(
        app.mails_of(sub.id, MailKind::UpcomingRenewal).await.len(),
        1
    );
}

/// The notice scan reads on a reader and queues in a later write: a card
/// changed in between (by the CLI, another process) must leave the
/// subscription unmarked, or the new card's warning would never be sent.
/// (Found by review: the mark was guarded by the period alone.)
#[tokio::test]
async fn a_card_changed_between_the_scan_and_its_write_is_looked_at_again() {
    use renewd::store::{NewEvent, NewMail, Notice, NoticesDecided};
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let sub = app.purchase(c, "pm_card_visa").await;
    app.set("2028-03-02T00:00:00Z");
    let now = app.now();
    let store = &app.engine.store;
    let batch = store.scan(&notice_scan(now)).await.unwrap();
    assert_eq!(batch.len(), 1);
    let (stale, _) = &batch[0];
    let seen = match &stale.payment {
        renewd::store::PaymentMethod::Card { expiry, .. } => expiry.clone(),
        other => panic!("{other:?}"),
    };
    // Another process stores a card that ends before the renewal.
    app.engine
        .set_payment_method(sub.id, "pm_card_mastercard", Some("2028-03"))
        .await
        .unwrap();
    // The sweep queues what it decided from its read: the notice only.
    let notice = Notice {
        mail: NewMail {
            subscription_id: sub.id,
            customer_id: sub.customer_id,
            kind: MailKind::UpcomingRenewal,
            period_key: stale.current_period_end.unwrap().as_second(),
            offset_key: 30,
            recipient: "someone@example.com".into(),
            locale: "en".into(),
            context: serde_json::json!({}),
        },
        event: NewEvent {
            outcome: Some("queued".into()),
            detail: serde_json::json!({}),
            ..NewEvent::new("mail.upcoming_renewal", stale)
        },
        completes_upcoming: Some(NoticesDecided { card_expiry: seen }),
    };
    assert!(matches!(
        store.queue_notices(&[notice], now).await[0],
        Ok(true)
    ));
    app.run_until("2028-03-31T00:00:00Z", days(1)).await;
    assert_eq!(
        app.mails_of(sub.id, MailKind::CardExpiring).await.len(),
        1,
        "the new card's warning"
    );
}

/// The notice scan reads the subscriptions still owed a notice: one whose
/// notices are queued is not offered again, day after day, and one renewed
/// is owed the next period's notice.
#[tokio::test]
async fn each_period_gets_one_upcoming_notice_over_several_years() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let sub = app.purchase(c, "pm_card_visa").await;
    app.run_until("2030-04-02T00:00:00Z", days(1)).await;
    let notices: Vec<_> = app
        .mails_of(sub.id, MailKind::UpcomingRenewal)
        .await
        .iter()
        .map(|m| m.created_at)
        .collect();
    assert_eq!(
        notices,
        [
            t("2028-03-02T00:00:00Z"),
            t("2029-03-02T00:00:00Z"),
            t("2030-03-02T00:00:00Z")
        ]
    );
    assert_eq!(app.succeeded_charges().await.len(), 4);
}

#[tokio::test]
async fn auto_renew_cannot_be_re_enabled_before_a_renewal() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    let off = app.engine.set_auto_renew(sub.id, false).await.unwrap();
    assert_eq!(
        off.auto_renew,
        AutoRenew {
            on: false,
            can_enable: false
        }
    );
    let err = app.engine.set_auto_renew(sub.id, true).await.unwrap_err();
    assert!(matches!(err, EngineError::Refused(_)));
    let msg = err.to_string();
    assert!(
        msg.contains("cannot be turned back on until the subscription is renewed again"),
        "{msg}"
    );
    assert!(msg.contains("renewd subscription renew"), "{msg}");
    assert!(!app.sub(sub.id).await.auto_renew.on);
}

#[tokio::test]
async fn turning_auto_renew_off_before_the_anniversary_means_no_charge() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    app.set("2028-03-30T00:00:00Z");
    app.engine.set_auto_renew(sub.id, false).await.unwrap();
    app.run_until("2028-04-10T00:00:00Z", days(1)).await;
    assert_eq!(app.succeeded_charges().await.len(), 1);
    assert_eq!(app.sub(sub.id).await.status.as_str(), "expired");
}

/// Notices are queued a batch per write: each queued mail gets exactly one
/// audit event, one already queued writes nothing, and the order is kept.
#[tokio::test]
async fn a_batch_of_notices_queues_each_new_one_with_its_event_and_skips_those_already_queued() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let sub = app.purchase(c, "pm_card_visa").await;
    let notice = |offset: i64| reminder_notice(&sub, sub.id, offset);
    let store = &app.engine.store;
    let now = app.now();
    let first = vec![notice(30), notice(7)];
    let queued = |results: Vec<renewd::store::StoreResult<bool>>| -> Vec<bool> {
        results.into_iter().map(|r| r.unwrap()).collect()
    };
    assert_eq!(queued(store.queue_notices(&first, now).await), [true, true]);
    let second = vec![notice(30), notice(1), notice(7)];
    assert_eq!(
        queued(store.queue_notices(&second, now).await),
        [false, true, false]
    );

    let (offsets, events) = reminders_queued(&app, sub.id).await;
    assert_eq!(offsets, [30, 7, 1], "queued once each, in order");
    assert_eq!(
        events,
        [30, 7, 1],
        "one event per queued mail, none for a skipped one"
    );
}

/// A notice that cannot be written (here: its subscription does not exist)
/// fails alone: the batch's write is undone whole and its notices are
/// queued one at a time, so the others are queued once each, with one
/// event each, and only that one reports an error.
#[tokio::test]
async fn a_notice_that_cannot_be_written_fails_alone_and_the_rest_of_its_batch_is_queued_once() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let sub = app.purchase(c, "pm_card_visa").await;
    let batch = vec![
        reminder_notice(&sub, sub.id, 30),
        reminder_notice(&sub, sub.id + 1_000_000, 14),
        reminder_notice(&sub, sub.id, 7),
    ];
    let results = app.engine.store.queue_notices(&batch, app.now()).await;
    assert!(matches!(results[0], Ok(true)), "{:?}", results[0]);
    assert!(results[1].is_err(), "{:?}", results[1]);
    assert!(matches!(results[2], Ok(true)), "{:?}", results[2]);

    let (offsets, events) = reminders_queued(&app, sub.id).await;
    assert_eq!(offsets, [30, 7], "the others queued once each");
    assert_eq!(events, [30, 7], "one event each, none for the failed one");
}

/// The reminder and expiry scans read subscriptions a page at a time (500),
/// and stop at the first page that comes back short. A page boundary
/// mishandled would leave the subscriptions past it without their reminder
/// or their expiry, silently.
#[tokio::test]
async fn reminders_and_expiry_reach_every_subscription_when_there_are_more_than_a_scan_page_holds()
{
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let mut subs = Vec::new();
    for _ in 0..501 {
        let sub = app.purchase(c, "pm_card_visa").await;
        app.engine.set_auto_renew(sub.id, false).await.unwrap();
        subs.push(sub.id);
    }
    app.set("2028-03-02T00:00:00Z");
    assert_eq!(app.sweep().await.reminders, 501, "the 30-day reminder");
    app.set("2028-04-01T00:00:00Z");
    assert_eq!(app.sweep().await.expired, 501);
    for id in [subs[0], subs[499], subs[500]] {
        assert_eq!(app.mails_of(id, MailKind::RenewalReminder).await.len(), 1);
        assert_eq!(app.sub(id).await.status.as_str(), "expired");
    }
}

/// A renewal reminder `offset` days out for `subscription_id` (the id may
/// name no subscription), with the audit event that goes with it.
fn reminder_notice(
    sub: &renewd::store::Subscription,
    subscription_id: i64,
    offset: i64,
) -> renewd::store::Notice {
    use renewd::store::{NewEvent, NewMail, Notice};
    Notice {
        mail: NewMail {
            subscription_id,
            customer_id: sub.customer_id,
            kind: MailKind::RenewalReminder,
            period_key: 1_900_000_000,
            offset_key: offset,
            recipient: "someone@example.com".into(),
            locale: "en".into(),
            context: serde_json::json!({}),
        },
        event: NewEvent {
            outcome: Some("queued".into()),
            detail: serde_json::json!({"offset_days": offset}),
            ..NewEvent::new("mail.renewal_reminder", sub)
        },
        completes_upcoming: None,
    }
}

/// The sweep's upcoming-notice scan at `now` (30 days' notice), as far as
/// the test subscriptions' first renewal.
fn notice_scan(now: jiff::Timestamp) -> renewd::store::Scan {
    renewd::store::Scan {
        statuses: vec![renewd::domain::Status::Active],
        auto_renew: Some(true),
        card_only: true,
        ends_after: Some(now),
        ends_at_or_before: t("2028-04-30T00:00:00Z"),
        without_open_renewal: false,
        not_cancelling: true,
        after_id: 0,
        limit: 100,
        skip_queued: Some(renewd::store::QueuedNotice::Upcoming),
    }
}

/// The offsets of a subscription's queued reminders, and of their audit
/// events, in order.
async fn reminders_queued(app: &TestApp, sub_id: i64) -> (Vec<i64>, Vec<serde_json::Value>) {
    let offsets = app
        .mails_of(sub_id, MailKind::RenewalReminder)
        .await
        .iter()
        .map(|m| m.offset_key)
        .collect();
    let events = app
        .events_of(sub_id)
        .await
        .into_iter()
        .filter(|e| e.kind == "mail.renewal_reminder")
        .map(|e| e.detail["offset_days"].clone())
        .collect();
    (offsets, events)
}
