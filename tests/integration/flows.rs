//! The flows of the vendor page: the auto-renew lock, manual renewal, bank
//! transfers, changing the card, cancellation requests and invoice
//! documents. Each test would fail if its rule broke.

use renewd::domain::Status;
use renewd::engine::{CancelAt, EngineError};
use renewd::mail::MailKind;

use crate::support::{days, t, TestApp};

/// A cancellation request for `id`, opened and resolved at once.
async fn cancel(app: &TestApp, id: i64, at: CancelAt) {
    let req = app
        .engine
        .open_request(id, "cancel", "closing down")
        .await
        .unwrap();
    app.engine.resolve_request(req.id, at).await.unwrap();
}

#[tokio::test]
async fn re_enabling_auto_renew_is_refused_until_a_manual_renewal_and_allowed_right_after() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    app.engine.set_auto_renew(sub.id, false).await.unwrap();
    assert!(matches!(
        app.engine.set_auto_renew(sub.id, true).await,
        Err(EngineError::Refused(_))
    ));

    app.set("2028-03-20T00:00:00Z");
    let renewed = app.renew_by_card(sub.id, "pm_card_visa").await.unwrap();
    assert!(renewed.problem.is_none());
    assert!(
        renewed.subscription.auto_renew.on,
        "a manual renewal turns auto-renewal back on"
    );
    assert!(renewed.subscription.auto_renew.can_enable);
    app.engine
        .set_auto_renew(sub.id, true)
        .await
        .expect("`on` is allowed right after the renewal");
}

#[tokio::test]
async fn a_manual_renewal_with_no_auto_renew_keeps_it_off_but_unlocked() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    app.engine.set_auto_renew(sub.id, false).await.unwrap();
    app.set("2028-03-20T00:00:00Z");
    let r = app
        .engine
        .renew(renewd::engine::RenewInput {
            subscription_id: sub.id,
            accept_terms: Some("2026-04".into()),
            no_auto_renew: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!r.subscription.auto_renew.on);
    assert!(r.subscription.auto_renew.can_enable);
}

#[tokio::test]
async fn reminders_reach_an_auto_renew_off_subscription_and_stop_once_it_is_renewed_manually() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let sub = app.purchase(c, "pm_card_visa").await;
    app.engine.set_auto_renew(sub.id, false).await.unwrap();
    app.run_until("2028-03-10T00:00:00Z", days(1)).await;
    assert_eq!(
        app.mails_of(sub.id, MailKind::RenewalReminder).await.len(),
        1,
        "the 30-day reminder"
    );

    let r = app.renew_by_card(sub.id, "pm_card_visa").await.unwrap();
    let renewed = r.subscription;
    assert_eq!(
        renewed.current_period_start,
        Some(t("2028-04-01T00:00:00Z")),
        "extends from the old period end"
    );
    assert_eq!(
        renewed.current_period_end,
        Some(t("2029-04-01T00:00:00Z")),
        "keeps the anniversary"
    );
    assert_eq!(
        app.mails_of(sub.id, MailKind::OrderConfirmation)
            .await
            .len(),
        2,
        "purchase and manual renewal"
    );

    app.run_until("2028-04-10T00:00:00Z", days(1)).await;
    assert_eq!(
        app.mails_of(sub.id, MailKind::RenewalReminder).await.len(),
        1,
        "no 7-day or 1-day reminder after renewing"
    );
    assert_eq!(app.sub(sub.id).await.status, Status::Active);
    assert_eq!(app.succeeded_charges().await.len(), 2);
}

#[tokio::test]
async fn renewing_twice_for_the_same_period_is_refused() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    app.set("2028-03-20T00:00:00Z");
    app.renew_by_card(sub.id, "pm_card_visa").await.unwrap();
    let again = app.renew_by_card(sub.id, "pm_card_visa").await;
    assert!(
        matches!(again, Err(EngineError::Refused(ref m)) if m.contains("already renewed")),
        "{again:?}"
    );
    app.run_until("2028-04-05T00:00:00Z", days(1)).await;
    assert_eq!(
        app.succeeded_charges().await.len(),
        2,
        "the anniversary does not charge the prepaid period"
    );
}

#[tokio::test]
async fn a_manual_renewal_after_expiry_starts_a_new_anchor_at_the_renewal_instant() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let sub = app.purchase(c, "pm_card_visa").await;
    app.engine.set_auto_renew(sub.id, false).await.unwrap();
    app.set("2028-04-01T00:00:00Z");
    app.sweep().await;
    assert_eq!(app.sub(sub.id).await.status, Status::Expired);

    app.set("2028-06-15T09:30:00Z");
    let r = app.renew_by_card(sub.id, "pm_card_visa").await.unwrap();
    let s = r.subscription;
    assert_eq!(s.status, Status::Active);
    assert_eq!(s.anchor_date.unwrap().to_string(), "2028-06-15");
    assert_eq!(s.current_period_start, Some(t("2028-06-15T09:30:00Z")));
    assert_eq!(s.current_period_end, Some(t("2029-06-15T00:00:00Z")));
    assert!(s.auto_renew.on);
}

#[tokio::test]
async fn a_manual_renewal_racing_the_automatic_one_charges_once() {
    let app = TestApp::spawn_with(
        "2027-04-01T00:00:00Z",
        &[("RENEWD__GATEWAY__SANDBOX__LATENCY_MS", "50")],
        |g| g,
    )
    .await;
    let sub = app.tokyo_subscription().await;
    app.set("2028-04-01T00:00:00Z");
    let (swept, manual) = tokio::join!(
        app.engine.sweep(),
        app.renew_by_card(sub.id, "pm_card_visa")
    );
    let swept = swept.unwrap();
    let renewals: Vec<_> = app
        .charges()
        .await
        .into_iter()
        .filter(|c| !c.idempotency_key.starts_with("purchase:"))
        .collect();
    assert_eq!(renewals.len(), 1, "one charge for the period: {renewals:?}");
    assert_eq!(app.invoices(sub.id).await.len(), 2);
    let manual_won = manual
        .as_ref()
        .map(|r| r.problem.is_none())
        .unwrap_or(false);
    assert!(
        manual_won ^ (swept.renewed == 1),
        "exactly one of them renewed: sweep {swept:?}, manual {manual:?}"
    );
    assert_eq!(app.sub(sub.id).await.term, 2);
    // Whatever the order, a later sweep changes nothing.
    app.set("2028-04-02T00:00:00Z");
    app.sweep().await;
    assert_eq!(app.charges().await.len(), 2);
}

#[tokio::test]
async fn a_manual_renewal_is_refused_while_the_automatic_one_holds_the_period() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    app.set("2028-04-01T00:00:00Z");
    let store = app.engine.store.clone();
    // The due period is opened once; opening again finds it open.
    for opened in [1, 0] {
        assert_eq!(
            store
                .open_due_renewals(app.now(), jiff::SignedDuration::ZERO)
                .await
                .unwrap(),
            opened
        );
    }
    let claim = renewd::store::Claim {
        token: "worker".into(),
        owner: "w:1".into(),
        expires_at: t("2028-04-01T00:05:00Z"),
    };
    assert_eq!(
        store
            .claim_renewals(app.now(), &claim, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    let r = app.renew_by_card(sub.id, "pm_card_visa").await;
    assert!(
        matches!(r, Err(EngineError::Refused(ref m)) if m.contains("being processed")),
        "{r:?}"
    );
    assert_eq!(app.charges().await.len(), 1);
}

#[tokio::test]
async fn a_bank_transfer_purchase_left_unpaid_never_activates() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("Asia/Tokyo", "ja", "JP", "JPY").await;
    let r = app.transfer_purchase(c).await;
    let sub = r.subscription;
    let inv = r.invoice.unwrap();
    assert_eq!(sub.status, Status::PendingPayment);
    assert_eq!(inv.status, "open");
    assert_eq!(
        inv.due_at,
        Some(t("2027-05-01T00:00:00Z")),
        "due 30 days later"
    );
    let issued = app.mails_of(sub.id, MailKind::InvoiceIssued).await;
    assert_eq!(issued.len(), 1);
    assert_eq!(
        issued[0].recipient, "ap@example.co.jp",
        "mailed to the transfer contact"
    );

    app.run_until("2027-05-10T00:00:00Z", days(1)).await;
    assert_eq!(app.sub(sub.id).await.status, Status::Expired);
    assert_eq!(app.invoices(sub.id).await[0].status, "void");
    let late = app.engine.mark_paid(&inv.number, "LATE-1").await;
    assert!(
        matches!(late, Err(EngineError::Refused(_))),
        "a void invoice cannot be paid"
    );
    assert!(app.charges().await.is_empty());
}

#[tokio::test]
async fn a_paid_bank_transfer_purchase_activates_at_the_purchase_date_and_renews_by_invoice_a_year_later(
) {
    let app = TestApp::spawn("2027-04-01T03:00:00Z").await;
    let c = app.customer("Asia/Tokyo", "ja", "JP", "JPY").await;
    let r = app.transfer_purchase(c).await;
    let sub = r.subscription;
    app.set("2027-04-10T00:00:00Z");
    let paid = app
        .engine
        .mark_paid(&r.invoice.unwrap().number, "MIZUHO-7781")
        .await
        .unwrap();
    assert_eq!(paid.status, "paid");
    assert_eq!(paid.payment_reference.as_deref(), Some("MIZUHO-7781"));
    let active = app.sub(sub.id).await;
    assert_eq!(active.status, Status::Active);
    assert_eq!(
        active.anchor_date.unwrap().to_string(),
        "2027-04-01",
        "anchored at the purchase date"
    );
    assert_eq!(active.current_period_end, Some(t("2028-03-31T15:00:00Z")));

    // 30 days before the anniversary the renewal invoice goes to the contact.
    app.run_until("2028-03-05T00:00:00Z", days(1)).await;
    let invoices = app.invoices(sub.id).await;
    assert_eq!(invoices.len(), 2);
    let renewal = &invoices[1];
    assert_eq!(renewal.status, "open");
    assert_eq!(renewal.issued_at, t("2028-03-02T00:00:00Z"));
    assert_eq!(renewal.due_at, Some(t("2028-03-31T15:00:00Z")));
    assert_eq!(app.mails_of(sub.id, MailKind::InvoiceIssued).await.len(), 2);

    app.engine
        .mark_paid(&renewal.number, "MIZUHO-9001")
        .await
        .unwrap();
    let renewed = app.sub(sub.id).await;
    assert_eq!(
        renewed.current_period_start,
        Some(t("2028-03-31T15:00:00Z")),
        "from the old period end"
    );
    assert_eq!(renewed.current_period_end, Some(t("2029-03-31T15:00:00Z")));
    let again = app.engine.mark_paid(&renewal.number, "MIZUHO-9001").await;
    assert!(matches!(again, Err(EngineError::Refused(ref m)) if m.contains("already paid")));
    assert!(app.charges().await.is_empty(), "no card was charged");
}

#[tokio::test]
async fn an_unpaid_bank_transfer_renewal_is_past_due_then_expires_after_the_grace_period() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let r = app.transfer_purchase(c).await;
    app.engine
        .mark_paid(&r.invoice.unwrap().number, "REF-1")
        .await
        .unwrap();
    let id = r.subscription.id;
    app.run_until("2028-04-01T00:00:00Z", days(1)).await;
    assert_eq!(app.sub(id).await.status, Status::PastDue);
    app.run_until("2028-04-14T23:00:00Z", days(1)).await;
    assert_eq!(app.sub(id).await.status, Status::PastDue);
    app.set("2028-04-15T00:00:00Z");
    app.sweep().await;
    assert_eq!(app.sub(id).await.status, Status::Expired);
    assert_eq!(app.invoices(id).await[1].status, "void");
    assert_eq!(app.mails_of(id, MailKind::Expired).await.len(), 1);
}

#[tokio::test]
async fn a_new_card_is_used_by_the_next_renewal() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    app.engine
        .set_payment_method(sub.id, "pm_card_mastercard", Some("2031-01"))
        .await
        .unwrap();
    app.set("2028-04-01T00:00:00Z");
    app.sweep().await;
    let last = app.charges().await.pop().unwrap();
    assert_eq!(last.payment_method, "pm_card_mastercard");
    assert_eq!(last.outcome, "succeeded");
}

#[tokio::test]
async fn updating_the_card_while_past_due_retries_on_the_next_sweep() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    app.engine
        .set_payment_method(sub.id, "pm_card_chargeDeclined", None)
        .await
        .unwrap();
    app.set("2028-04-01T00:00:00Z");
    app.sweep().await;
    assert_eq!(app.sub(sub.id).await.status, Status::PastDue);
    app.set("2028-04-01T06:00:00Z");
    app.engine
        .set_payment_method(sub.id, "pm_card_visa", None)
        .await
        .unwrap();
    assert_eq!(
        app.sweep().await.renewed,
        1,
        "retried at once with the new card"
    );
    let s = app.sub(sub.id).await;
    assert_eq!(s.status, Status::Active);
    assert_eq!(s.current_period_start, Some(t("2028-03-31T15:00:00Z")));
}

#[tokio::test]
async fn a_cancellation_at_period_end_charges_nothing_at_the_anniversary() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    app.set("2027-09-01T00:00:00Z");
    let req = app
        .engine
        .open_request(sub.id, "cancel", "moving to another vendor")
        .await
        .unwrap();
    assert_eq!(req.status, "open");
    assert_eq!(
        app.engine.start_request(req.id).await.unwrap().status,
        "in_progress"
    );
    let done = app
        .engine
        .resolve_request(req.id, CancelAt::PeriodEnd)
        .await
        .unwrap();
    assert_eq!(done.status, "resolved");
    assert_eq!(
        app.sub(sub.id).await.status,
        Status::Active,
        "serves the period it paid for"
    );
    assert_eq!(
        app.mails_of(sub.id, MailKind::Cancelled).await.len(),
        1,
        "told when the request is resolved"
    );

    app.run_until("2028-04-10T00:00:00Z", days(1)).await;
    assert_eq!(app.charges().await.len(), 1, "only the purchase");
    assert_eq!(app.sub(sub.id).await.status, Status::Cancelled);
    assert!(
        app.mails_of(sub.id, MailKind::UpcomingRenewal)
            .await
            .is_empty(),
        "no renewal notice for a cancelling subscription"
    );
    assert_eq!(app.mails_of(sub.id, MailKind::Cancelled).await.len(), 1);
}

#[tokio::test]
async fn a_cancellation_at_period_end_with_auto_renewal_off_gets_no_reminders() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    let plain = app.tokyo_subscription().await;
    for id in [sub.id, plain.id] {
        app.engine.set_auto_renew(id, false).await.unwrap();
    }
    cancel(&app, sub.id, CancelAt::PeriodEnd).await;
    assert!(app.sub(sub.id).await.cancel_at_period_end);

    // Inside the reminder window: the dry run plans a reminder for the
    // subscription that will lapse, none for the one that is cancelling.
    app.set("2028-03-05T00:00:00Z");
    let plan = app.engine.plan_at(app.now()).await.unwrap();
    let reminded: Vec<i64> = plan
        .actions
        .iter()
        .filter(|a| a.action == "remind")
        .map(|a| a.subscription_id)
        .collect();
    assert_eq!(reminded, [plain.id], "{:?}", plan.actions);

    app.run_until("2028-04-10T00:00:00Z", days(1)).await;
    assert!(
        app.mails_of(sub.id, MailKind::RenewalReminder)
            .await
            .is_empty(),
        "no reminder for a subscription cancelling at period end"
    );
    assert!(!app
        .mails_of(plain.id, MailKind::RenewalReminder)
        .await
        .is_empty());
    assert_eq!(app.sub(sub.id).await.status, Status::Cancelled);
    assert_eq!(app.sub(plain.id).await.status, Status::Expired);
}

#[tokio::test]
async fn a_cancellation_now_stops_reminders_at_once() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    app.engine.set_auto_renew(sub.id, false).await.unwrap();
    app.run_until("2028-03-05T00:00:00Z", days(1)).await;
    assert_eq!(
        app.mails_of(sub.id, MailKind::RenewalReminder).await.len(),
        1
    );
    cancel(&app, sub.id, CancelAt::Now).await;
    assert_eq!(app.sub(sub.id).await.status, Status::Cancelled);
    app.run_until("2028-05-01T00:00:00Z", days(1)).await;
    assert_eq!(
        app.mails_of(sub.id, MailKind::RenewalReminder).await.len(),
        1,
        "no reminder after cancellation"
    );
    assert_eq!(app.mails_of(sub.id, MailKind::Cancelled).await.len(), 1);
    assert_eq!(app.charges().await.len(), 1);
    let again = app.engine.open_request(sub.id, "cancel", "again").await;
    assert!(matches!(again, Err(EngineError::Refused(ref m)) if m.contains("already cancelled")));
}

#[tokio::test]
async fn a_rejected_request_leaves_the_subscription_alone() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    let req = app
        .engine
        .open_request(sub.id, "cancel", "too expensive")
        .await
        .unwrap();
    let r = app
        .engine
        .reject_request(req.id, "contract requires 30 days notice")
        .await
        .unwrap();
    assert_eq!(r.status, "rejected");
    assert!(r.resolved_at.is_some());
    assert_eq!(app.sub(sub.id).await.status, Status::Active);
    assert!(matches!(
        app.engine.resolve_request(req.id, CancelAt::Now).await,
        Err(EngineError::Refused(_))
    ));
}

#[tokio::test]
async fn terms_acceptance_is_recorded_and_automatic_renewals_point_to_it() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    app.set("2028-04-01T00:00:00Z");
    app.sweep().await;
    let events = app.events_of(sub.id).await;
    let accepted = events.iter().find(|e| e.kind == "terms.accepted").unwrap();
    assert_eq!(accepted.outcome.as_deref(), Some("2026-04"));
    let renewed = events
        .iter()
        .find(|e| e.kind == "renewal.succeeded")
        .unwrap();
    assert!(
        renewed.detail["terms_acceptance_id"].as_i64().is_some(),
        "{:?}",
        renewed.detail
    );
    let outdated = app
        .engine
        .renew(renewd::engine::RenewInput {
            subscription_id: sub.id,
            accept_terms: Some("2025-01".into()),
            ..Default::default()
        })
        .await;
    assert!(matches!(outdated, Err(EngineError::Refused(ref m)) if m.contains("2026-04")));
}

/// Checks a PDF's structure the way a reader does (header, cross-reference
/// table whose offsets point at their objects, trailer) and returns the
/// text shown on its page.
fn parse_pdf(bytes: &[u8]) -> String {
    fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
        hay[from..]
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + from)
    }
    assert!(bytes.starts_with(b"%PDF-1."), "PDF header");
    let tail = String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(64)..]).to_string();
    assert!(tail.trim_end().ends_with("%%EOF"), "trailer end: {tail}");
    let sx = bytes.windows(9).rposition(|w| w == b"startxref").unwrap();
    let off: usize = String::from_utf8_lossy(&bytes[sx + 9..])
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        bytes[off..].starts_with(b"xref"),
        "startxref points at the xref table"
    );
    let table = String::from_utf8_lossy(&bytes[off..]).to_string();
    let mut lines = table.lines().skip(1);
    let count: usize = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    for (i, line) in lines.take(count).enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields[2] == "n" {
            let at: usize = fields[0].parse().unwrap();
            assert!(
                bytes[at..].starts_with(format!("{i} 0 obj").as_bytes()),
                "object {i} at offset {at}"
            );
        }
    }
    assert!(
        find(bytes, b"/Root", off).is_some(),
        "trailer names the catalog"
    );
    // Text shown with Tj: literal (...) or hex <...> strings, WinAnsi-decoded.
    let content = String::from_utf8_lossy(bytes).to_string();
    let mut text = String::new();
    for line in content.split(" Tj") {
        let Some(start) = line.rfind(['(', '<']) else {
            continue;
        };
        let raw = &line[start + 1..];
        let decoded: Vec<u8> = if line[start..].starts_with('<') {
            let hex = raw.trim_end_matches('>');
            (0..hex.len() / 2)
                .filter_map(|k| u8::from_str_radix(&hex[2 * k..2 * k + 2], 16).ok())
                .collect()
        } else {
            raw.trim_end_matches(')').bytes().collect()
        };
        text.extend(decoded.iter().map(|&b| match b {
            0xA5 => '¥',
            0x95 => '•',
            0x96 => '–',
            _ => b as char,
        }));
        text.push('\n');
    }
    text
}

#[tokio::test]
async fn the_invoice_pdf_parses_and_shows_the_number_total_and_tax() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    let inv = app.invoices(sub.id).await.remove(0);
    let pdf = renewd::invoice::render_pdf(&inv).unwrap();
    let text = parse_pdf(&pdf);
    assert!(text.contains("Invoice INV-2027-000001"), "{text}");
    assert!(
        text.contains("¥58,300"),
        "JPY total without decimals: {text}"
    );
    assert!(text.contains("Tax 10% on ¥53,000"), "{text}");
    assert!(text.contains("visa") && text.contains("4242"), "{text}");
    assert!(text.contains("PAID"));
    // The copy under STATE_DIR/invoices is kept when the order
    // confirmation carrying it is mailed, and is the same document.
    let on_disk = app.dir.path().join("invoices").join("INV-2027-000001.pdf");
    assert!(!on_disk.exists(), "documents are rendered after the commit");
    let sent = app.engine.deliver_mail().await.unwrap();
    assert!(sent.sent >= 1, "{sent:?}");
    assert_eq!(
        std::fs::read(&on_disk).unwrap(),
        pdf,
        "the daemon kept the document it mailed"
    );
    let html = std::fs::read_to_string(on_disk.with_extension("html")).unwrap();
    assert!(html.contains("INV-2027-000001"), "{html}");

    let c = app.customer("UTC", "en", "US", "USD").await;
    let usd = app.purchase(c, "pm_card_visa").await;
    let text = parse_pdf(&renewd::invoice::render_pdf(&app.invoices(usd.id).await[0]).unwrap());
    assert!(text.contains("$475.00"), "USD shows two decimals: {text}");
}

#[tokio::test]
async fn an_unpaid_manual_transfer_renewal_hands_the_period_back_to_automatic_renewal() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    app.set("2027-12-01T00:00:00Z");
    let r = app
        .engine
        .renew(renewd::engine::RenewInput {
            subscription_id: sub.id,
            accept_terms: Some("2026-04".into()),
            bank_transfer: Some(crate::support::contact()),
            ..Default::default()
        })
        .await
        .unwrap();
    let manual_invoice = r.invoice.unwrap();
    assert_eq!(manual_invoice.status, "open");
    // Never paid: due 2027-12-31; the subscription (now paying by transfer)
    // still renews automatically by invoice before its anniversary.
    app.run_until("2028-03-10T00:00:00Z", days(1)).await;
    let invoices = app.invoices(sub.id).await;
    assert_eq!(
        invoices
            .iter()
            .find(|i| i.number == manual_invoice.number)
            .unwrap()
            .status,
        "void"
    );
    let auto = invoices.last().unwrap();
    assert_eq!(
        auto.status, "open",
        "the automatic renewal invoice was issued: {invoices:?}"
    );
    assert_eq!(auto.due_at, app.sub(sub.id).await.current_period_end);
}

#[tokio::test]
async fn a_dry_run_previews_transfer_invoices_and_period_end_cancellations_and_writes_nothing() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let transfer = app.transfer_purchase(c).await;
    app.engine
        .mark_paid(&transfer.invoice.unwrap().number, "REF-1")
        .await
        .unwrap();
    let cancelling = app.tokyo_subscription().await;
    cancel(&app, cancelling.id, CancelAt::PeriodEnd).await;

    app.set("2028-03-31T16:00:00Z");
    let before = app.fingerprint().await;
    let plan = app.engine.plan_at(app.now()).await.unwrap();
    let actions: Vec<(i64, String)> = plan
        .actions
        .iter()
        .map(|a| (a.subscription_id, a.action.clone()))
        .collect();
    assert!(
        actions.contains(&(transfer.subscription.id, "invoice".to_string())),
        "{actions:?}"
    );
    assert!(
        actions.contains(&(cancelling.id, "cancel".to_string())),
        "{actions:?}"
    );
    assert_eq!(app.fingerprint().await, before, "a dry run writes nothing");
}

#[tokio::test]
async fn a_japanese_buyer_name_is_kept_in_the_pdf_in_the_japanese_font() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let jp = app
        .engine
        .add_customer(renewd::engine::NewCustomerInput {
            name: "山田花子".into(),
            email: "hanako@example.jp".into(),
            timezone: Some("Asia/Tokyo".into()),
            locale: Some("ja".into()),
            country: Some("JP".into()),
            currency: Some("JPY".into()),
        })
        .await
        .unwrap();
    let sub = app.purchase(jp.id, "pm_card_visa").await;
    let pdf = renewd::invoice::render_pdf(&app.invoices(sub.id).await[0]).unwrap();
    parse_pdf(&pdf);
    let raw = String::from_utf8_lossy(&pdf).to_uppercase();
    let name_ucs2: String = "山田花子"
        .encode_utf16()
        .map(|u| format!("{u:04X}"))
        .collect();
    assert!(
        raw.contains(&name_ucs2),
        "the name is shown, not replaced by ?"
    );
    assert!(
        raw.contains("/UNIJIS-UCS2-H"),
        "through Adobe's Japanese encoding"
    );
}

// Interactions between flows. Without these guards a period could be paid
// by card and by transfer, a charge of unknown outcome could be dropped by
// a cancellation, or an expired subscription renewed twice for one year.

#[tokio::test]
async fn a_card_cannot_replace_a_transfer_that_is_already_invoiced() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let r = app.transfer_purchase(c).await;
    app.engine
        .mark_paid(&r.invoice.unwrap().number, "REF-1")
        .await
        .unwrap();
    app.run_until("2028-03-05T00:00:00Z", days(1)).await;
    let switched = app
        .engine
        .set_payment_method(r.subscription.id, "pm_card_visa", None)
        .await;
    assert!(
        matches!(switched, Err(EngineError::Refused(ref m)) if m.contains("awaiting a bank transfer")),
        "{switched:?}"
    );
    let renewed = app.renew_by_card(r.subscription.id, "pm_card_visa").await;
    assert!(
        matches!(renewed, Err(EngineError::Refused(ref m)) if m.contains("open invoice")),
        "{renewed:?}"
    );
    assert!(
        app.charges().await.is_empty(),
        "no card was charged for the invoiced period"
    );
}

#[tokio::test]
async fn turning_auto_renew_off_after_a_transfer_invoice_was_issued_voids_it() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let r = app.transfer_purchase(c).await;
    let id = r.subscription.id;
    app.engine
        .mark_paid(&r.invoice.unwrap().number, "REF-1")
        .await
        .unwrap();
    app.run_until("2028-03-05T00:00:00Z", days(1)).await;
    let renewal_invoice = app.invoices(id).await.pop().unwrap();
    assert_eq!(renewal_invoice.status, "open");
    app.engine.set_auto_renew(id, false).await.unwrap();
    app.run_until("2028-04-02T00:00:00Z", days(1)).await;
    assert_eq!(app.invoices(id).await.pop().unwrap().status, "void");
    assert_eq!(app.sub(id).await.status, Status::Expired);
    let late = app.engine.mark_paid(&renewal_invoice.number, "REF-2").await;
    assert!(matches!(late, Err(EngineError::Refused(_))), "{late:?}");
}

#[tokio::test]
async fn cancelling_waits_until_a_charge_of_unknown_outcome_is_settled() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    let mut app = app;
    app.engine.gateway = std::sync::Arc::new(crate::support::LosesAnswers {
        inner: app.sandbox.clone(),
        remaining: std::sync::atomic::AtomicU32::new(1),
    });
    app.set("2028-04-01T00:00:00Z");
    assert_eq!(app.sweep().await.unknown, 1);
    let req = app
        .engine
        .open_request(sub.id, "cancel", "leaving")
        .await
        .unwrap();
    let early = app.engine.resolve_request(req.id, CancelAt::Now).await;
    assert!(
        matches!(early, Err(EngineError::Refused(ref m)) if m.contains("reconciled")),
        "{early:?}"
    );
    app.set("2028-04-01T00:01:00Z");
    assert_eq!(app.sweep().await.renewed, 1, "the charge taken is recorded");
    app.engine
        .resolve_request(req.id, CancelAt::Now)
        .await
        .unwrap();
    assert_eq!(app.sub(sub.id).await.status, Status::Cancelled);
    assert_eq!(
        app.invoices(sub.id).await.len(),
        2,
        "the renewal charge kept its invoice"
    );
}

#[tokio::test]
async fn an_expired_subscription_cannot_be_renewed_twice_for_one_year() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let c = app.customer("UTC", "en", "US", "USD").await;
    let sub = app.purchase(c, "pm_card_visa").await;
    app.engine.set_auto_renew(sub.id, false).await.unwrap();
    app.set("2028-04-02T00:00:00Z");
    app.sweep().await;
    let by_transfer = || renewd::engine::RenewInput {
        subscription_id: sub.id,
        accept_terms: Some("2026-04".into()),
        bank_transfer: Some(crate::support::contact()),
        ..Default::default()
    };
    let first = app.engine.renew(by_transfer()).await.unwrap();
    assert_eq!(first.invoice.as_ref().unwrap().status, "open");
    app.set("2028-04-02T01:00:00Z");
    let second = app.engine.renew(by_transfer()).await;
    assert!(
        matches!(second, Err(EngineError::Refused(ref m)) if m.contains("already in progress")),
        "{second:?}"
    );
    let by_card = app.renew_by_card(sub.id, "pm_card_visa").await;
    assert!(
        matches!(by_card, Err(EngineError::Refused(_))),
        "{by_card:?}"
    );
    assert_eq!(app.charges().await.len(), 1, "only the purchase");
}

#[tokio::test]
async fn a_refused_manual_renewal_leaves_the_payment_method_alone() {
    let app = TestApp::spawn("2027-04-01T00:00:00Z").await;
    let sub = app.tokyo_subscription().await;
    app.set("2028-04-01T00:00:00Z");
    let store = app.engine.store.clone();
    store
        .open_due_renewals(app.now(), jiff::SignedDuration::ZERO)
        .await
        .unwrap();
    let claim = renewd::store::Claim {
        token: "worker".into(),
        owner: "w:1".into(),
        expires_at: t("2028-04-01T00:05:00Z"),
    };
    store.claim_renewals(app.now(), &claim, 10).await.unwrap();
    let r = app.renew_by_card(sub.id, "pm_card_mastercard").await;
    assert!(matches!(r, Err(EngineError::Refused(_))), "{r:?}");
    match app.sub(sub.id).await.payment {
        renewd::store::PaymentMethod::Card { token, .. } => assert_eq!(token, "pm_card_visa"),
        other => panic!("{other:?}"),
    }
}
