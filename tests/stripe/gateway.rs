//! The Stripe gateway against the fake server, one behaviour per test.
//!
//! The hazards: a decline classed wrongly retries a dead card for days (or
//! gives up on a customer who was only short of money); an answer lost after
//! Stripe took the money, treated as a failure, makes the next attempt
//! charge the customer twice; a refused idempotency key, treated as a
//! decline, tells a customer their card failed for our own bug.

use std::time::Duration;

use renewd::domain::{Currency, Money};
use renewd::gateway::stripe::{StripeGateway, StripeOptions};
use renewd::gateway::{ChargeRequest, GatewayError, Lookup, PaymentGateway};

use crate::fake::{FakeStripe, API_KEY, CUSTOMER};

fn gateway_at(base_url: &str, key: &str, timeout: Duration) -> StripeGateway {
    StripeGateway::new(StripeOptions {
        api_key: key.into(),
        base_url: base_url.into(),
        request_timeout: timeout,
    })
    .unwrap()
}

fn gateway(fake: &FakeStripe) -> StripeGateway {
    gateway_at(&fake.uri(), API_KEY, Duration::from_secs(5))
}

fn request(key: &str, pm: &str) -> ChargeRequest {
    ChargeRequest {
        idempotency_key: key.into(),
        payment_method: pm.into(),
        amount: Money::new(58300, Currency::parse("JPY").unwrap()),
        description: "Action Pack (yearly) #7 term 2".into(),
        attempt_id: 41,
        subscription_id: 7,
    }
}

const KEY: &str = "renew:7:1798729200:a1";

#[tokio::test]
async fn a_good_card_is_charged_off_session_for_its_customer_under_our_key() {
    let fake = FakeStripe::start().await;

    let charge = gateway(&fake)
        .charge(&request(KEY, "pm_card_visa"))
        .await
        .unwrap();

    let state = fake.state();
    assert_eq!(state.succeeded().len(), 1);
    assert_eq!(charge.reference, state.intents[0]["id"].as_str().unwrap());
    let post = &state.posts[0];
    assert_eq!(post.idempotency_key.as_deref(), Some(KEY));
    assert_eq!(post.param("amount"), Some("58300"));
    assert_eq!(post.param("currency"), Some("jpy"));
    assert_eq!(post.param("customer"), Some(CUSTOMER));
    assert_eq!(post.param("payment_method"), Some("pm_card_visa"));
    assert_eq!(post.param("confirm"), Some("true"));
    assert_eq!(post.param("off_session"), Some("true"));
    assert_eq!(post.param("metadata[attempt_id]"), Some("41"));
    assert_eq!(post.param("metadata[subscription_id]"), Some("7"));
    assert_eq!(post.param("metadata[idempotency_key]"), Some(KEY));
}

#[tokio::test]
async fn a_generic_decline_is_a_hard_decline() {
    let fake = FakeStripe::start().await;

    let err = gateway(&fake)
        .charge(&request(KEY, "pm_card_chargeDeclined"))
        .await
        .unwrap_err();

    assert!(
        matches!(&err, GatewayError::HardDecline { code, .. } if code == "generic_decline"),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_expired_card_is_a_hard_decline() {
    let fake = FakeStripe::start().await;

    let err = gateway(&fake)
        .charge(&request(KEY, "pm_card_chargeDeclinedExpiredCard"))
        .await
        .unwrap_err();

    assert!(
        matches!(&err, GatewayError::HardDecline { code, .. } if code == "expired_card"),
        "{err:?}"
    );
}

#[tokio::test]
async fn authentication_required_off_session_is_a_hard_decline() {
    let fake = FakeStripe::start().await;

    let err = gateway(&fake)
        .charge(&request(KEY, "pm_card_authenticationRequired"))
        .await
        .unwrap_err();

    assert!(
        matches!(&err, GatewayError::HardDecline { code, .. } if code == "authentication_required"),
        "{err:?}"
    );
}

#[tokio::test]
async fn insufficient_funds_is_a_soft_decline() {
    let fake = FakeStripe::start().await;

    let err = gateway(&fake)
        .charge(&request(KEY, "pm_card_chargeDeclinedInsufficientFunds"))
        .await
        .unwrap_err();

    assert!(
        matches!(&err, GatewayError::SoftDecline { code, message } if code == "insufficient_funds" && message.contains("insufficient funds")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_repeated_key_is_answered_from_the_first_request_and_charges_once() {
    let fake = FakeStripe::start().await;
    let gw = gateway(&fake);

    let first = gw.charge(&request(KEY, "pm_card_visa")).await.unwrap();
    let second = gw.charge(&request(KEY, "pm_card_visa")).await.unwrap();

    assert_eq!(first, second);
    assert_eq!(fake.state().intents.len(), 1);
    assert_eq!(fake.state().posts_for(KEY), 2);
}

#[tokio::test]
async fn a_key_reused_with_other_parameters_is_an_unknown_outcome_not_a_decline() {
    let fake = FakeStripe::start().await;
    let gw = gateway(&fake);
    gw.charge(&request(KEY, "pm_card_visa")).await.unwrap();
    let mut changed = request(KEY, "pm_card_visa");
    changed.amount = Money::new(1, Currency::parse("JPY").unwrap());

    let err = gw.charge(&changed).await.unwrap_err();

    let GatewayError::Unknown(message) = &err else {
        panic!("expected an unknown outcome, got {err:?}");
    };
    assert!(
        message.contains("idempotency key") && message.contains("renewd bug"),
        "{message}"
    );
    assert_eq!(fake.state().intents.len(), 1);
}

#[tokio::test]
async fn a_500_after_charging_is_replayed_for_its_key_and_lookup_finds_the_one_charge() {
    let fake = FakeStripe::start().await;
    fake.state().fail_after_charging = 1;
    let gw = gateway(&fake);

    let first = gw.charge(&request(KEY, "pm_card_visa")).await.unwrap_err();
    let repeat = gw.charge(&request(KEY, "pm_card_visa")).await.unwrap_err();
    let found = gw.lookup(KEY).await.unwrap();

    assert!(
        matches!(&first, GatewayError::Unknown(m) if m.contains("500")),
        "{first:?}"
    );
    assert!(
        matches!(&repeat, GatewayError::Unknown(m) if m.contains("500")),
        "{repeat:?}"
    );
    let state = fake.state();
    assert_eq!(state.succeeded().len(), 1, "Stripe charged exactly once");
    let Lookup::Charged(charge) = found else {
        panic!("lookup should find the charge, got {found:?}");
    };
    assert_eq!(charge.reference, state.intents[0]["id"].as_str().unwrap());
}

#[tokio::test]
async fn a_500_before_charging_reconciles_as_never_charged() {
    let fake = FakeStripe::start().await;
    fake.state().fail_before_charging = 1;
    let gw = gateway(&fake);

    let err = gw.charge(&request(KEY, "pm_card_visa")).await.unwrap_err();
    let found = gw.lookup(KEY).await.unwrap();

    assert!(matches!(err, GatewayError::Unknown(_)));
    assert_eq!(found, Lookup::NotFound);
    assert!(fake.state().intents.is_empty());
}

#[tokio::test]
async fn lookup_finds_a_charge_that_search_has_not_indexed_yet() {
    let fake = FakeStripe::start().await;
    let gw = gateway(&fake);
    let charge = gw.charge(&request(KEY, "pm_card_visa")).await.unwrap();
    fake.state().search_lags = true;

    let found = gw.lookup(KEY).await.unwrap();

    assert_eq!(found, Lookup::Charged(charge));
}

#[tokio::test]
async fn lookup_of_a_declined_key_is_that_decline() {
    let fake = FakeStripe::start().await;
    let gw = gateway(&fake);
    let _ = gw
        .charge(&request(KEY, "pm_card_chargeDeclinedInsufficientFunds"))
        .await;

    let found = gw.lookup(KEY).await.unwrap();

    assert!(
        matches!(&found, Lookup::Declined(GatewayError::SoftDecline { code, .. }) if code == "insufficient_funds"),
        "{found:?}"
    );
}

#[tokio::test]
async fn lookup_of_a_key_stripe_never_saw_is_not_found() {
    let fake = FakeStripe::start().await;
    let gw = gateway(&fake);
    gw.charge(&request("renew:8:1798729200:a1", "pm_card_visa"))
        .await
        .unwrap();

    let found = gw.lookup(KEY).await.unwrap();

    assert_eq!(found, Lookup::NotFound);
}

#[tokio::test]
async fn an_answer_slower_than_the_request_timeout_is_an_unknown_outcome() {
    let fake = FakeStripe::start().await;
    fake.state().create_delay = Some(Duration::from_secs(3));
    let gw = gateway_at(&fake.uri(), API_KEY, Duration::from_millis(500));

    let err = gw.charge(&request(KEY, "pm_card_visa")).await.unwrap_err();

    assert!(
        matches!(&err, GatewayError::Unknown(m) if m.contains("request_timeout")),
        "{err:?}"
    );
    // Stripe took the money although the answer never came: lookup says so.
    assert!(matches!(gw.lookup(KEY).await.unwrap(), Lookup::Charged(_)));
}

#[tokio::test]
async fn a_refused_connection_is_an_unknown_outcome() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let gw = gateway_at(&format!("http://{closed}"), API_KEY, Duration::from_secs(2));

    let err = gw.charge(&request(KEY, "pm_card_visa")).await.unwrap_err();

    let GatewayError::Unknown(message) = &err else {
        panic!("expected an unknown outcome, got {err:?}");
    };
    assert!(
        !message.contains("pm_card_visa"),
        "no card token in errors: {message}"
    );
}

#[tokio::test]
async fn a_refused_api_key_is_an_unknown_outcome_not_a_decline() {
    let fake = FakeStripe::start().await;
    let gw = gateway_at(&fake.uri(), "sk_test_wrong", Duration::from_secs(5));

    let err = gw.charge(&request(KEY, "pm_card_visa")).await.unwrap_err();

    assert!(
        matches!(&err, GatewayError::Unknown(m) if m.contains("401") && m.contains("gateway.stripe.api_key") && !m.contains("sk_test_wrong")),
        "{err:?}"
    );
}

#[tokio::test]
async fn card_details_are_the_brand_and_last_four_of_the_payment_method() {
    let fake = FakeStripe::start().await;

    let details = gateway(&fake)
        .card_details("pm_card_mastercard")
        .await
        .unwrap();

    assert_eq!(details.brand, "mastercard");
    assert_eq!(details.last4, "4444");
}

#[tokio::test]
async fn an_unknown_payment_method_is_refused_as_missing() {
    let fake = FakeStripe::start().await;

    let err = gateway(&fake)
        .card_details("pm_no_such_card")
        .await
        .unwrap_err();

    assert!(
        matches!(&err, GatewayError::HardDecline { code, .. } if code == "resource_missing"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_payment_method_without_a_customer_cannot_be_used_off_session() {
    let fake = FakeStripe::start().await;
    let gw = gateway(&fake);

    let details = gw.card_details("pm_card_unattached").await.unwrap_err();
    let charge = gw
        .charge(&request(KEY, "pm_card_unattached"))
        .await
        .unwrap_err();

    for err in [details, charge] {
        assert!(
            matches!(&err, GatewayError::HardDecline { code, .. } if code == "payment_method_not_attached"),
            "{err:?}"
        );
    }
    assert!(fake.state().posts.is_empty());
}
