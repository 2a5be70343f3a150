//! The commands billing staff and customers trigger: add a customer,
//! purchase, turn auto-renewal on or off. Each validates its input into
//! domain types first, so bad input is refused before anything is written.

use jiff::Timestamp;
use serde_json::json;

use super::{Engine, EngineError, EngineResult};
use crate::domain::subscription::AutoRenewError;
use crate::domain::values::{Country, EmailAddress, Locale, Name, Zone};
use crate::domain::{Currency, Status};
use crate::store::{Change, Customer, NewCustomer, NewEvent, Subscription, SubscriptionPatch};

#[derive(Debug, Clone, Default)]
pub struct NewCustomerInput {
    pub name: String,
    pub email: String,
    pub timezone: Option<String>,
    pub locale: Option<String>,
    pub country: Option<String>,
    pub currency: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct PurchaseInput {
    pub customer_id: i64,
    pub plan: Option<String>,
    pub accept_terms: Option<String>,
    pub card: String,
    pub card_expiry: Option<String>,
}

/// What a purchase led to.
pub type PurchaseResult = super::FlowResult;

fn invalid(e: impl std::fmt::Display) -> EngineError {
    EngineError::Invalid(e.to_string())
}

impl Engine {
    pub async fn add_customer(&self, input: NewCustomerInput) -> EngineResult<Customer> {
        let name = Name::parse(&input.name).map_err(invalid)?;
        let email = EmailAddress::parse(&input.email).map_err(invalid)?;
        let zone = match &input.timezone {
            Some(z) => Zone::parse(z).map_err(invalid)?,
            None => self.config.default_zone.clone(),
        };
        let locale = match &input.locale {
            Some(l) => Locale::parse(l).map_err(invalid)?,
            None => self.config.default_locale,
        };
        let country = match &input.country {
            Some(c) => Country::parse(c).map_err(invalid)?,
            None => self.config.default_country.clone(),
        };
        let currency = match &input.currency {
            Some(c) => Currency::parse(c).map_err(invalid)?,
            None => self.config.default_currency,
        };
        let sold = self.config.sold_currencies();
        if !sold.iter().any(|c| c == currency.code()) {
            return Err(EngineError::Invalid(format!(
                "currency {currency} is not sold by any plan; use one of {}",
                sold.join(", ")
            )));
        }
        let now = self.now();
        let customer = self
            .store
            .insert_customer(
                &NewCustomer {
                    name: name.as_str().to_string(),
                    email: email.as_str().to_string(),
                    timezone: zone.name().to_string(),
                    locale: locale.as_str().to_string(),
                    country: country.as_str().to_string(),
                    currency: currency.code().to_string(),
                },
                now,
            )
            .await?;
        tracing::info!(customer_id = customer.id, email = %email.masked(), "customer added");
        Ok(customer)
    }

    /// Checks a terms version against the current one (rule 6).
    pub fn check_terms(&self, accepted: Option<&str>) -> EngineResult<String> {
        let current = &self.config.raw.terms.current;
        match accepted {
            Some(v) if v == current => Ok(v.to_string()),
            Some(v) if self.config.raw.terms.versions.iter().any(|x| x == v) => Err(EngineError::Refused(format!(
                "terms version {v} is outdated; the customer must accept the current Terms and Conditions: --accept-terms {current}"
            ))),
            Some(v) => Err(EngineError::Invalid(format!(
                "unknown terms version {v:?}; the current Terms and Conditions version is {current} (--accept-terms {current})"
            ))),
            None => Err(EngineError::Invalid(format!(
                "payment refused: the Terms and Conditions must be accepted; pass --accept-terms {current}"
            ))),
        }
    }

    /// Buys a subscription by card: the card is charged at once.
    pub async fn purchase(&self, input: PurchaseInput) -> EngineResult<PurchaseResult> {
        let terms = self.check_terms(input.accept_terms.as_deref())?;
        let (customer, plan) = self
            .customer_and_plan(input.customer_id, input.plan)
            .await?;
        let payment = self
            .card_method(&input.card, input.card_expiry.as_deref())
            .await?;
        self.start_purchase(&customer, plan, payment, terms).await
    }

    /// Rule 3: off at any time; on only if not locked by an earlier "off".
    pub async fn set_auto_renew(&self, id: i64, on: bool) -> EngineResult<Subscription> {
        let sub = self.subscription(id).await?;
        if sub.status == Status::Cancelled {
            return Err(EngineError::Refused(format!(
                "subscription {id} is cancelled; auto-renewal cannot change"
            )));
        }
        let next = sub.auto_renew.set(on).map_err(|e| match e {
            AutoRenewError::LockedUntilRenewal => EngineError::Refused(format!(
                "auto-renewal of subscription {id} was turned off and cannot be turned back on until the subscription is renewed again; renew it with `{}`",
                self.renew_command(&sub)
            )),
        })?;
        if next == sub.auto_renew {
            return Ok(sub);
        }
        let now: Timestamp = self.now();
        self.store
            .apply(
                Change {
                    subscription: Some(SubscriptionPatch {
                        id,
                        expect_status: vec![sub.status],
                        auto_renew: Some(next),
                        ..Default::default()
                    }),
                    events: vec![NewEvent {
                        outcome: Some(if on { "on" } else { "off" }.into()),
                        detail: json!({"can_enable": next.can_enable}),
                        ..NewEvent::new("subscription.auto_renew", &sub)
                    }],
                    ..Default::default()
                },
                now,
            )
            .await?;
        tracing::info!(
            subscription_id = id,
            customer_id = sub.customer_id,
            outcome = if on { "on" } else { "off" },
            "auto-renewal switched"
        );
        self.subscription(id).await
    }

    pub async fn subscription(&self, id: i64) -> EngineResult<Subscription> {
        self.store.subscription(id).await?.ok_or_else(|| {
            EngineError::NotFound(format!(
                "subscription {id} not found; see `renewd subscription list`"
            ))
        })
    }
}
