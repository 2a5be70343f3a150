//! The real engine (SQLite store, mocked clock, file mail) renewing through
//! the Stripe gateway and the fake Stripe. The hazard: Stripe takes the
//! money but answers 500; without reconciliation by the same key the next
//! sweep would charge the customer again under a new key.

use std::sync::Arc;

use renewd::clock::{MockClock, SharedClock};
use renewd::config::Config;
use renewd::engine::{Engine, NewCustomerInput, PurchaseInput};
use renewd::startup::build_engine;

use crate::fake::{FakeStripe, API_KEY};

struct App {
    _dir: tempfile::TempDir,
    clock: Arc<MockClock>,
    engine: Engine,
}

async fn spawn(fake: &FakeStripe, start: &str) -> App {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_string_lossy().to_string();
    let vars = [
        ("RENEWD__STATE_DIR", state.clone()),
        (
            "RENEWD__DATABASE__URL",
            format!("sqlite://{state}/renewd.db"),
        ),
        ("RENEWD__GATEWAY__KIND", "stripe".into()),
        ("RENEWD__GATEWAY__TIMEOUT", "3m".into()),
        ("RENEWD__GATEWAY__STRIPE__API_KEY", API_KEY.into()),
        ("RENEWD__GATEWAY__STRIPE__BASE_URL", fake.uri()),
        ("RENEWD__GATEWAY__STRIPE__REQUEST_TIMEOUT", "5s".into()),
    ];
    let config = Config::load_with_env(None, vars.map(|(k, v)| (k.to_string(), v))).unwrap();
    let clock = Arc::new(MockClock::new(start.parse().unwrap()));
    let shared: SharedClock = clock.clone();
    let engine = build_engine(Arc::new(config), shared).await.unwrap();
    App {
        _dir: dir,
        clock,
        engine,
    }
}

#[tokio::test]
async fn a_renewal_whose_charge_answered_500_is_reconciled_by_key_and_charged_once() {
    let fake = FakeStripe::start().await;
    let app = spawn(&fake, "2027-05-01T00:00:00Z").await;
    let customer = app
        .engine
        .add_customer(NewCustomerInput {
            name: "Hanako Yamada".into(),
            email: "hanako@example.jp".into(),
            timezone: Some("Asia/Tokyo".into()),
            locale: Some("ja".into()),
            country: Some("JP".into()),
            currency: Some("JPY".into()),
        })
        .await
        .unwrap();
    let sub = app
        .engine
        .purchase(PurchaseInput {
            customer_id: customer.id,
            accept_terms: Some(app.engine.config.raw.terms.current.clone()),
            card: "pm_card_visa".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .subscription;
    assert_eq!(
        fake.state().succeeded().len(),
        1,
        "the purchase was charged"
    );

    // A year on, Stripe takes the renewal charge but answers 500.
    fake.state().fail_after_charging = 1;
    app.clock.set("2028-05-01T00:00:00Z".parse().unwrap());
    let first = app.engine.sweep().await.unwrap();
    assert_eq!(first.unknown, 1);
    assert_eq!(app.engine.subscription(sub.id).await.unwrap().term, 1);

    // After the reconcile backoff, the engine asks Stripe about the key.
    app.clock.set("2028-05-01T00:01:00Z".parse().unwrap());
    let second = app.engine.sweep().await.unwrap();

    assert_eq!(second.renewed, 1);
    assert_eq!(app.engine.subscription(sub.id).await.unwrap().term, 2);
    let invoices = app.engine.store.list_invoices(Some(sub.id)).await.unwrap();
    assert_eq!(invoices.len(), 2, "one paid invoice per charge");
    let state = fake.state();
    assert_eq!(state.succeeded().len(), 2, "purchase and one renewal");
    let renewal_posts: Vec<_> = state
        .posts
        .iter()
        .filter(|p| {
            p.idempotency_key
                .as_deref()
                .is_some_and(|k| k.starts_with("renew:"))
        })
        .collect();
    assert_eq!(renewal_posts.len(), 1, "no second request, no new key");
    let renewal_reference = state.intents[1]["id"].as_str().unwrap();
    assert!(
        invoices
            .iter()
            .any(|i| i.payment_reference.as_deref() == Some(renewal_reference)),
        "the renewal invoice points to Stripe's PaymentIntent"
    );
}
