//! A relay that rejects one recipient for good (550) and defers another
//! (451). Without the split between permanent and temporary failures, the
//! rejected message would be retried for a day, or the deferred one given
//! up at once; without per-row delivery, one bad address would hold back
//! every other customer's mail. MailDev accepts everything, so these tests
//! talk to a small SMTP responder in the test process.

use jiff::SignedDuration;

use crate::responder::Responder;
use crate::support::MailApp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_rejected_for_good_fails_while_the_others_go_out() {
    let relay = Responder::start();
    relay.reply_to_rcpt(
        "gone@example.com",
        "550 5.1.1 <gone@example.com>: Recipient address rejected: User unknown",
    );
    relay.reply_to_rcpt(
        "busy@example.com",
        "451 4.3.0 <busy@example.com>: try again later",
    );
    let app = MailApp::spawn("2027-03-01T03:00:00Z", relay.port).await;
    for (name, email) in [
        ("Amy Fine", "amy@example.com"),
        ("Gus Gone", "gone@example.com"),
        ("Bea Busy", "busy@example.com"),
        ("Zed Fine", "zed@example.com"),
    ] {
        let c = app.customer(name, email, "UTC", "en", "USD").await;
        app.purchase(c, "pm_card_visa", None).await;
    }

    let stats = app.deliver().await;

    assert_eq!((stats.sent, stats.retrying, stats.failed), (2, 1, 1));
    let gone = app.mail_to("gone@example.com").await;
    assert_eq!((gone.status.as_str(), gone.attempts), ("failed", 1));
    let err = gone.last_error.clone().unwrap_or_default();
    assert!(err.contains("550") && err.contains("rejected"), "{err}");
    assert!(
        !err.contains("gone@example.com"),
        "full address in the error: {err}"
    );
    let busy = app.mail_to("busy@example.com").await;
    assert_eq!((busy.status.as_str(), busy.attempts), ("queued", 1));
    assert!(busy.last_error.unwrap_or_default().contains("451"));
    for ok in ["amy@example.com", "zed@example.com"] {
        assert_eq!(app.mail_to(ok).await.status, "sent");
    }
    let received = relay.received();
    let mut rcpts: Vec<String> = received.iter().flat_map(|r| r.rcpt.clone()).collect();
    rcpts.sort();
    assert_eq!(rcpts, ["amy@example.com", "zed@example.com"]);
    assert!(received
        .iter()
        .all(|r| r.data.contains("Message-ID: <renewd.")));

    // The deferred one goes out once the relay takes it; the rejected one
    // stays failed.
    relay.accept("busy@example.com");
    app.advance(SignedDuration::from_mins(5));
    let stats = app.deliver().await;
    assert_eq!((stats.sent, stats.retrying, stats.failed), (1, 0, 0));
    assert_eq!(app.mail_to("busy@example.com").await.status, "sent");
    assert_eq!(app.mail_to("gone@example.com").await.status, "failed");
    assert_eq!(relay.received().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_refusing_our_credentials_keeps_the_mail_queued() {
    let relay = Responder::start();
    relay.reply_to_rcpt(
        "amy@example.com",
        "535 5.7.8 Authentication credentials invalid",
    );
    let app = MailApp::spawn("2027-03-01T03:00:00Z", relay.port).await;
    let c = app
        .customer("Amy Fine", "amy@example.com", "UTC", "en", "USD")
        .await;
    app.purchase(c, "pm_card_visa", None).await;

    let stats = app.deliver().await;

    assert_eq!((stats.sent, stats.retrying, stats.failed), (0, 1, 0));
    let m = app.mails().await.remove(0);
    assert_eq!(m.status, "queued");
    assert!(m.last_error.unwrap_or_default().contains("credentials"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_the_last_error_and_retries_a_failed_message() {
    let relay = Responder::start();
    relay.reply_to_rcpt("gone@example.com", "550 5.1.1 User unknown");
    let app = MailApp::spawn("2027-03-01T03:00:00Z", relay.port).await;
    let c = app
        .customer("Gus Gone", "gone@example.com", "UTC", "en", "USD")
        .await;
    app.purchase(c, "pm_card_visa", None).await;
    app.deliver().await;
    let id = app.mails().await[0].id;
    let state = app.dir.path().to_string_lossy().to_string();
    let renewd = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_renewd"))
            .args(args)
            .args(["--now", "2027-03-02T00:00:00Z"])
            .env_remove("RENEWD_CONFIG")
            .env("RENEWD__STATE_DIR", &state)
            .env(
                "RENEWD__DATABASE__URL",
                format!("sqlite://{state}/renewd.db"),
            )
            .env("RENEWD__MAIL__TRANSPORT", "smtp")
            .env("RENEWD__MAIL__SMTP__HOST", "127.0.0.1")
            .env("RENEWD__MAIL__SMTP__PORT", relay.port.to_string())
            .env("RENEWD__MAIL__SMTP__TLS", "none")
            .output()
            .expect("run renewd")
    };

    let list = renewd(&["mail", "list", "--status", "failed", "--json"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    assert_eq!(rows[0]["id"], id);
    assert_eq!(rows[0]["attempts"], 1);
    assert!(rows[0]["last_error"].as_str().unwrap_or("").contains("550"));
    let text = renewd(&["mail", "list"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("failed") && text.contains("last error"),
        "{text}"
    );

    let retry = renewd(&["mail", "retry", &id.to_string(), "--json"]);
    assert!(
        retry.status.success(),
        "{}",
        String::from_utf8_lossy(&retry.stderr)
    );
    let row: serde_json::Value = serde_json::from_slice(&retry.stdout).expect("json");
    assert_eq!(
        (row["status"].as_str(), row["attempts"].as_i64()),
        (Some("queued"), Some(0))
    );

    let again = renewd(&["mail", "retry", &id.to_string()]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("only failed mail can be retried"));
    let missing = renewd(&["mail", "retry", "9999"]);
    assert_eq!(missing.status.code(), Some(2));
}
