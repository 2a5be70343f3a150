//! A year of renewd's life, delivered over SMTP into MailDev: every message
//! a customer should get arrives exactly once, with the right subject,
//! recipient, language, text and HTML parts, and the invoice PDF where one
//! belongs. Without the outbox (or with a transport that re-sends), a
//! customer would get a second receipt or none at all; without the
//! templates' locale choice, a Tokyo customer would read English.

use std::collections::BTreeMap;

use renewd::engine::{render_mail, CancelAt, ContactInput};
use renewd::mail::MailKind;
use serde_json::Value;

use crate::maildev::MailDev;
use crate::support::{days, MailApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_year_of_time_travel_delivers_exactly_the_expected_mail() {
    let Some(server) = MailDev::start() else {
        return;
    };
    // Arrange: five customers whose year touches every kind of mail.
    let app = MailApp::spawn("2027-03-01T03:00:00Z", server.smtp_port).await;
    // Tokyo, Japanese, auto-renewal on, card expiring before the renewal.
    let hanako = app
        .customer("山田 花子", "hanako@example.jp", "Asia/Tokyo", "ja", "JPY")
        .await;
    app.purchase(hanako, "pm_card_visa", Some("2027-12")).await;
    // New York, English, auto-renewal off: reminders, then expiry.
    let john = app
        .customer(
            "John Smith",
            "john@example.com",
            "America/New_York",
            "en",
            "USD",
        )
        .await;
    let ny = app.purchase(john, "pm_card_visa", None).await;
    app.engine
        .set_auto_renew(ny.id, false)
        .await
        .expect("auto-renew off");
    // A card that will be declined at renewal: dunning, then expiry.
    let kenji = app
        .customer("Kenji Sato", "kenji@example.com", "UTC", "en", "USD")
        .await;
    let declining = app.purchase(kenji, "pm_card_visa", None).await;
    app.engine
        .set_payment_method(
            declining.id,
            "pm_card_chargeDeclinedInsufficientFunds",
            None,
        )
        .await
        .expect("card change");
    // A company paying by bank transfer: the invoice goes to its contact.
    let firm = app
        .customer("Aiko Tanaka", "aiko@example.jp", "Asia/Tokyo", "ja", "JPY")
        .await;
    let terms = app.engine.config.raw.terms.current.clone();
    app.engine
        .purchase_by_transfer(
            firm,
            None,
            Some(&terms),
            &ContactInput {
                name: "経理部 鈴木".into(),
                phone: "+81-3-1234-5678".into(),
                email: "keiri@example.jp".into(),
            },
        )
        .await
        .expect("transfer purchase");
    // A customer who cancels at once.
    let mary = app
        .customer(
            "Mary Jones",
            "mary@example.com",
            "Europe/London",
            "en",
            "EUR",
        )
        .await;
    let leaving = app.purchase(mary, "pm_card_visa", None).await;
    let req = app
        .engine
        .open_request(leaving.id, "cancel", "moving on")
        .await
        .expect("request");
    app.engine
        .resolve_request(req.id, CancelAt::Now)
        .await
        .expect("cancel");

    // Act: a year and a bit, one sweep a day (each sweep delivers the outbox).
    app.run_until("2028-03-20T00:00:00Z", days(1)).await;

    // Assert: the outbox, customer by customer in order of creation (the
    // order across customers within one sweep is not fixed).
    let rows = app.mails().await;
    let mut per_recipient: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for m in &rows {
        per_recipient
            .entry(m.recipient.as_str())
            .or_default()
            .push(m.kind.as_str());
    }
    let expected: BTreeMap<&str, Vec<&str>> = [
        (
            "hanako@example.jp",
            vec![
                "order_confirmation",
                "upcoming_renewal",
                "card_expiring",
                "receipt",
            ],
        ),
        (
            "john@example.com",
            vec![
                "order_confirmation",
                "renewal_reminder",
                "renewal_reminder",
                "renewal_reminder",
                "expired",
            ],
        ),
        (
            "kenji@example.com",
            vec![
                "order_confirmation",
                "upcoming_renewal",
                "payment_failed",
                "payment_failed",
                "payment_failed",
                "payment_failed",
                "payment_failed",
                "expired",
            ],
        ),
        ("keiri@example.jp", vec!["invoice_issued"]),
        ("mary@example.com", vec!["order_confirmation", "cancelled"]),
    ]
    .into_iter()
    .collect();
    assert_eq!(per_recipient, expected);
    let reminder_days: Vec<i64> = rows
        .iter()
        .filter(|m| m.kind == MailKind::RenewalReminder)
        .map(|m| m.offset_key)
        .collect();
    assert_eq!(reminder_days, [30, 7, 1]);
    assert!(
        rows.iter().all(|m| m.status == "sent" && m.attempts == 1),
        "{rows:#?}"
    );

    // Every row arrived exactly once, under its own Message-ID.
    let received = server.emails();
    let mut by_id: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for e in &received {
        let id = e["headers"]["message-id"]
            .as_str()
            .unwrap_or("")
            .to_string();
        by_id.entry(id).or_default().push(e);
    }
    assert_eq!(received.len(), rows.len(), "one message per outbox row");
    for m in &rows {
        let id = format!("<renewd.{}.{}@example.com>", m.id, m.kind);
        let copies = by_id.get(&id).map(Vec::len).unwrap_or(0);
        assert_eq!(copies, 1, "{id} arrived {copies} times");
        let e = by_id[&id][0];
        let ja = m.locale == "ja";
        let want = render_mail(m).expect("render");
        assert_eq!(e["subject"].as_str(), Some(want.subject.as_str()), "{id}");
        assert_eq!(e["to"].as_array().map(Vec::len), Some(1), "{id}");
        assert_eq!(
            e["to"][0]["address"].as_str(),
            Some(m.recipient.as_str()),
            "{id}"
        );
        assert_eq!(
            e["from"][0]["address"].as_str(),
            Some("billing@example.com"),
            "{id}"
        );
        // Both parts, in the customer's language.
        let text = e["text"].as_str().unwrap_or("");
        let html = e["html"].as_str().unwrap_or("");
        assert!(
            text.len() > 100 && html.contains("<!DOCTYPE html>"),
            "{id}: parts missing"
        );
        if ja {
            assert!(
                text.contains("様") && html.contains("lang=\"ja\""),
                "{id} is not Japanese"
            );
            assert!(want.subject.contains('】'), "{id} subject");
        } else {
            assert!(
                text.starts_with("Dear ") && html.contains("lang=\"en\""),
                "{id} is not English"
            );
        }
        // The invoice PDF rides on the mails about money received or due.
        let attachments = e["attachments"].as_array().cloned().unwrap_or_default();
        let carries_invoice = matches!(
            m.kind,
            MailKind::OrderConfirmation | MailKind::Receipt | MailKind::InvoiceIssued
        );
        if carries_invoice {
            let number = m.invoice_number.as_deref().expect("invoice number");
            assert_eq!(attachments.len(), 1, "{id}: {attachments:?}");
            let filename = format!("{number}.pdf");
            assert_eq!(attachments[0]["filename"].as_str(), Some(filename.as_str()));
            assert_eq!(
                attachments[0]["contentType"].as_str(),
                Some("application/pdf")
            );
            let email_id = e["id"].as_str().expect("MailDev id");
            let stored = attachments[0]["generatedFileName"]
                .as_str()
                .unwrap_or(&filename);
            let pdf = server.attachment(email_id, stored);
            assert!(pdf.starts_with(b"%PDF"), "{id}: attachment is not a PDF");
            assert!(
                pdf.windows(number.len()).any(|w| w == number.as_bytes()),
                "{id}: the PDF is not invoice {number}"
            );
        } else {
            assert!(attachments.is_empty(), "{id}: unexpected attachment");
        }
    }

    // Spot checks a customer would notice.
    let subject = |kind: MailKind, to: &str| -> String {
        let m = rows
            .iter()
            .find(|m| m.kind == kind && m.recipient == to)
            .expect("mail");
        by_id[&format!("<renewd.{}.{}@example.com>", m.id, m.kind)][0]["subject"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(
        subject(MailKind::Receipt, "hanako@example.jp"),
        "【Renewd Example K.K.】Action Pack (yearly) 更新の領収書（INV-2028-000001）"
    );
    assert_eq!(
        subject(MailKind::RenewalReminder, "john@example.com"),
        "Your Action Pack (yearly) subscription ends on February 28, 2028"
    );
    let receipt = received
        .iter()
        .find(|e| e["subject"].as_str().is_some_and(|s| s.contains("領収書")))
        .expect("receipt");
    assert!(
        receipt["text"].as_str().unwrap_or("").contains("¥58,300"),
        "JPY amount with tax"
    );
    let last = rows
        .iter()
        .find(|m| m.kind == MailKind::RenewalReminder && m.offset_key == 1)
        .expect("the 1-day reminder");
    let reminder = by_id[&format!("<renewd.{}.renewal_reminder@example.com>", last.id)][0];
    let text = reminder["text"].as_str().unwrap_or("");
    assert!(
        text.contains("at 00:00 on February 28, 2028 (America/New_York time), tomorrow"),
        "{text}"
    );
    assert!(
        text.contains(&format!("renewd subscription renew {}", ny.id)),
        "{text}"
    );
    assert!(text.contains("$475.00"), "{text}");
}
