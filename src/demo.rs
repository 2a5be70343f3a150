//! `renewd run --demo`: seeds an empty database with a few customers placed
//! around their anniversaries, so the first sweep (at start-up) shows a
//! renewal, a decline with its retry, a reminder, an upcoming-renewal notice
//! and an expiry within the first minute.

use std::sync::Arc;

use anyhow::Context;
use jiff::{SignedDuration, Timestamp};

use crate::clock::MockClock;
use crate::engine::{Engine, NewCustomerInput, PurchaseInput};
use crate::store::{Change, PaymentMethod, SubscriptionPatch};

struct Seed {
    name: &'static str,
    email: &'static str,
    timezone: &'static str,
    locale: &'static str,
    country: &'static str,
    currency: &'static str,
    /// How long ago the purchase was made.
    days_ago: i64,
    auto_renew: bool,
    /// A card to switch to after the purchase (to show a decline).
    later_card: Option<&'static str>,
}

const SEEDS: &[Seed] = &[
    Seed {
        name: "Aiko Tanaka",
        email: "aiko@example.jp",
        timezone: "Asia/Tokyo",
        locale: "ja",
        country: "JP",
        currency: "JPY",
        days_ago: 366,
        auto_renew: true,
        later_card: None,
    },
    Seed {
        name: "Ben Carter",
        email: "ben@example.com",
        timezone: "America/New_York",
        locale: "en",
        country: "US",
        currency: "USD",
        days_ago: 345,
        auto_renew: true,
        later_card: None,
    },
    Seed {
        name: "Chloé Martin",
        email: "chloe@example.fr",
        timezone: "Europe/Paris",
        locale: "en",
        country: "FR",
        currency: "EUR",
        days_ago: 360,
        auto_renew: false,
        later_card: None,
    },
    Seed {
        name: "Dan Okafor",
        email: "dan@example.com",
        timezone: "UTC",
        locale: "en",
        country: "US",
        currency: "USD",
        days_ago: 367,
        auto_renew: true,
        later_card: Some("pm_card_chargeDeclinedInsufficientFunds"),
    },
    Seed {
        name: "Emi Sato",
        email: "emi@example.jp",
        timezone: "Asia/Tokyo",
        locale: "ja",
        country: "JP",
        currency: "JPY",
        days_ago: 368,
        auto_renew: false,
        later_card: None,
    },
];

/// Seeds the demo data if the database has no customers; returns how many
/// subscriptions were created.
pub async fn seed_if_empty(engine: &Engine) -> anyhow::Result<usize> {
    if engine.store.count_customers().await? > 0 {
        tracing::info!("demo: database is not empty; nothing seeded");
        return Ok(0);
    }
    let now = engine.now();
    for s in SEEDS {
        let at: Timestamp = now
            .checked_sub(SignedDuration::from_hours(24 * s.days_ago))
            .context("demo date out of range")?;
        let past = Engine {
            store: engine.store.clone(),
            gateway: engine.gateway.clone(),
            transport: engine.transport.clone(),
            clock: Arc::new(MockClock::new(at)),
            config: engine.config.clone(),
            instance: engine.instance.clone(),
        };
        let customer = past
            .add_customer(NewCustomerInput {
                name: s.name.into(),
                email: s.email.into(),
                timezone: Some(s.timezone.into()),
                locale: Some(s.locale.into()),
                country: Some(s.country.into()),
                currency: Some(s.currency.into()),
            })
            .await?;
        let bought = past
            .purchase(PurchaseInput {
                customer_id: customer.id,
                plan: None,
                accept_terms: Some(engine.config.raw.terms.current.clone()),
                card: "pm_card_visa".into(),
                card_expiry: Some("2035-12".into()),
            })
            .await?;
        let id = bought.subscription.id;
        if !s.auto_renew {
            past.set_auto_renew(id, false).await?;
        }
        if let Some(card) = s.later_card {
            engine
                .store
                .apply(
                    Change {
                        subscription: Some(SubscriptionPatch {
                            id,
                            payment: Some(PaymentMethod::Card {
                                token: card.into(),
                                brand: "visa".into(),
                                last4: "9995".into(),
                                expiry: Some("2035-12".into()),
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    at,
                )
                .await?;
        }
    }
    tracing::info!(
        subscriptions = SEEDS.len(),
        "demo: seeded customers around their anniversaries"
    );
    Ok(SEEDS.len())
}
