//! The relay goes down and comes back. Without the outbox's retries a
//! receipt queued during the outage would be lost; without marking rows
//! sent only after the relay accepted them, or with a retry that ignored
//! what was already sent, a customer would get the same mail twice.

use crate::maildev::{free_port, MailDev};
use crate::support::{days, MailApp};
use jiff::SignedDuration;
use renewd::mail::MailKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_queued_while_the_relay_is_down_is_delivered_exactly_once_when_it_is_back() {
    let port = free_port();
    // The relay is up for the first customer.
    let Some(mut first) = MailDev::start_on(port) else {
        return;
    };
    let app = MailApp::spawn("2027-03-01T03:00:00Z", port).await;
    let a = app
        .customer("Ann Early", "ann@example.com", "UTC", "en", "USD")
        .await;
    app.purchase(a, "pm_card_visa", None).await;
    assert_eq!(app.deliver().await.sent, 1);
    let before = first.emails();
    assert_eq!(before.len(), 1);

    // Act: the relay goes down; three more purchases queue their mail.
    first.stop();
    for (name, email) in [
        ("Ben Down", "ben@example.com"),
        ("Cho Down", "cho@example.jp"),
        ("Dan Down", "dan@example.com"),
    ] {
        let c = app.customer(name, email, "UTC", "en", "USD").await;
        app.purchase(c, "pm_card_visa", None).await;
    }
    let stats = app.deliver().await;
    assert_eq!((stats.sent, stats.retrying, stats.failed), (0, 3, 0));
    for m in app.mails().await.iter().filter(|m| m.status != "sent") {
        assert_eq!(m.status, "queued");
        assert_eq!(m.attempts, 1);
        let err = m.last_error.as_deref().unwrap_or("");
        assert!(err.contains("unreachable"), "{err}");
    }
    // Still down a minute later: a second attempt, still queued.
    app.advance(SignedDuration::from_mins(1));
    assert_eq!(app.deliver().await.retrying, 3);
    // Backing off: right after a failure nothing is due.
    assert_eq!(app.deliver().await, Default::default());

    // The relay comes back on the same port.
    let second = MailDev::start_on(port).expect("MailDev again");
    app.advance(SignedDuration::from_mins(2));
    let stats = app.deliver().await;
    assert_eq!((stats.sent, stats.retrying, stats.failed), (3, 0, 0));
    // Later runs find nothing more to send.
    app.advance(days(1));
    assert_eq!(app.deliver().await, Default::default());

    // Assert: each of the four confirmations arrived once, over both relays.
    let after = second.emails();
    assert_eq!(after.len(), 3, "{after:#?}");
    let mut ids: Vec<String> = before
        .iter()
        .chain(after.iter())
        .map(|e| {
            e["headers"]["message-id"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    ids.sort();
    let mut expected: Vec<String> = app
        .mails_of(MailKind::OrderConfirmation)
        .await
        .iter()
        .map(|m| format!("<renewd.{}.order_confirmation@example.com>", m.id))
        .collect();
    expected.sort();
    assert_eq!(ids, expected);
    let rows = app.mails().await;
    assert!(rows.iter().all(|m| m.status == "sent"));
    assert_eq!(
        rows.iter().map(|m| m.attempts).collect::<Vec<_>>(),
        [1, 3, 3, 3]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_still_undeliverable_after_the_last_attempt_fails_and_can_be_retried() {
    let port = free_port();
    let app = MailApp::spawn_with(
        "2027-03-01T03:00:00Z",
        port,
        &[("RENEWD__MAIL__MAX_ATTEMPTS", "3")],
    )
    .await;
    let c = app
        .customer("Eve Late", "eve@example.com", "UTC", "en", "USD")
        .await;
    app.purchase(c, "pm_card_visa", None).await;
    // Nothing listens on the port: three attempts, then failed.
    for _ in 0..3 {
        app.deliver().await;
        app.advance(SignedDuration::from_hours(1));
    }
    let m = app.mails().await.remove(0);
    assert_eq!((m.status.as_str(), m.attempts), ("failed", 3));
    assert_eq!(
        app.deliver().await,
        Default::default(),
        "failed mail is not retried by itself"
    );

    // An operator fixes the relay and queues the message again.
    let Some(server) = MailDev::start_on(port) else {
        return;
    };
    let requeued = app
        .engine
        .store
        .requeue_mail(m.id, app.now())
        .await
        .expect("requeue");
    assert_eq!((requeued.status.as_str(), requeued.attempts), ("queued", 0));
    assert_eq!(app.deliver().await.sent, 1);
    assert_eq!(server.emails().len(), 1);
    // Only failed mail can be retried.
    let err = app
        .engine
        .store
        .requeue_mail(m.id, app.now())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("only failed mail"), "{err}");
}
