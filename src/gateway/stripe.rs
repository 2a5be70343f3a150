//! The Stripe gateway: off-session PaymentIntents over Stripe's HTTP API.
//!
//! A charge reads the stored PaymentMethod (to learn its customer), then
//! creates and confirms a PaymentIntent off-session under our idempotency
//! key: the `Idempotency-Key` header, and again in metadata beside our
//! attempt and subscription ids, so Stripe's records point back to ours.
//! Declines become hard or soft by Stripe's decline code ([`is_soft`]).
//! Timeouts, broken connections, 5xx, 429 and a refused idempotency key are
//! `Unknown`: the request may have charged, or the fault is ours, and in
//! neither case may the customer be told that the card failed.
//!
//! Reconciliation (`lookup`) asks Stripe's search API for the PaymentIntent
//! whose metadata carries the key, then scans the newest PaymentIntents (a
//! list, which unlike search is read-after-write consistent). Repeating the
//! POST with the same key was not chosen: Stripe stores a 500 answer under
//! its key and replays it, so the repeat would answer "500" forever after
//! the very failure it should resolve; and `lookup` has only the key, not
//! the parameters a repeat must match. Search may lag behind writes (under
//! a minute, normally), so a "not found" is final only after [`SEARCH_LAG`]:
//! config requires `gateway.timeout`, after which the engine trusts
//! `NotFound`, to cover two requests plus that lag.
//!
//! Never log, nor put into an error, the API key or a payment method token.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use jiff::SignedDuration;
use reqwest::{StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::{CardDetails, Charge, ChargeRequest, GatewayError, Lookup, PaymentGateway};
use crate::config::Config;

/// How far Stripe's search index may trail a write before we believe that
/// a key it does not know was never charged: twice the lag Stripe documents
/// for normal operation.
pub const SEARCH_LAG: SignedDuration = SignedDuration::from_secs(120);

/// The API version our requests and parsing are written against.
const API_VERSION: &str = "2024-06-20";

/// How many of the newest PaymentIntents `lookup` scans after a search.
const RECENT_SCAN: &str = "100";

/// Decline codes a later retry may get past: money, limits and the issuer's
/// or network's passing trouble. Everything else, including a generic
/// `card_declined`/`generic_decline` and `do_not_honor` (Stripe's advice for
/// both is "the customer must contact their bank"), is hard: retrying those
/// off-session only piles up declines on the card, so the customer is asked
/// to update it instead.
const SOFT_DECLINES: &[&str] = &[
    "insufficient_funds",
    "processing_error",
    "try_again_later",
    "issuer_not_available",
    "reenter_transaction",
    "approve_with_id",
    "card_velocity_exceeded",
    "withdrawal_count_limit_exceeded",
    "card_decline_rate_limit_exceeded",
];

const NOT_ATTACHED: &str = "The stored payment method is not attached to a Stripe customer, so it cannot be charged off-session; save the card with a SetupIntent for a customer first.";

/// Whether a Stripe decline code may pass on a later retry.
pub fn is_soft(code: &str) -> bool {
    SOFT_DECLINES.contains(&code)
}

#[derive(Debug, thiserror::Error)]
pub enum StripeSetupError {
    #[error("{0}")]
    Settings(String),
    #[error("cannot build the HTTPS client for Stripe: {0}")]
    Client(String),
}

/// What the gateway needs, already validated (see [`StripeGateway::from_config`]).
#[derive(Clone)]
pub struct StripeOptions {
    pub api_key: SecretString,
    /// `https://api.stripe.com`, or a fake server's address in tests.
    pub base_url: String,
    /// The longest one HTTP request may take.
    pub request_timeout: Duration,
}

pub struct StripeGateway {
    http: reqwest::Client,
    base: Url,
    api_key: SecretString,
}

impl StripeGateway {
    pub fn new(options: StripeOptions) -> Result<Self, StripeSetupError> {
        let base = Url::parse(&options.base_url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && !u.cannot_be_a_base())
            .ok_or_else(|| {
                StripeSetupError::Settings(format!(
                    "gateway.stripe.base_url = {:?} is not an http(s) URL",
                    options.base_url
                ))
            })?;
        let http = reqwest::Client::builder()
            .timeout(options.request_timeout)
            .connect_timeout(options.request_timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("renewd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| StripeSetupError::Client(e.to_string()))?;
        Ok(StripeGateway {
            http,
            base,
            api_key: options.api_key,
        })
    }

    /// Builds the gateway from `[gateway.stripe]`, reading the key file.
    pub fn from_config(config: &Config) -> Result<Self, StripeSetupError> {
        let settings = &config.raw.gateway.stripe;
        let api_key = settings
            .resolve_api_key()
            .map_err(StripeSetupError::Settings)?;
        let request_timeout = settings
            .request_timeout
            .parse::<SignedDuration>()
            .ok()
            .filter(|d| d.is_positive())
            .map(|d| d.unsigned_abs())
            .ok_or_else(|| {
                StripeSetupError::Settings(format!(
                    "gateway.stripe.request_timeout = {:?} is not a positive duration",
                    settings.request_timeout
                ))
            })?;
        Self::new(StripeOptions {
            api_key,
            base_url: settings.base_url.clone(),
            request_timeout,
        })
    }

    /// The base URL with `segments` appended, each percent-encoded.
    fn endpoint(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        // Cannot fail: `new` refused URLs that cannot be a base.
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Answer, GatewayError> {
        let response = request
            .bearer_auth(self.api_key.expose_secret())
            .header("Stripe-Version", API_VERSION)
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let request_id = header("request-id");
        let replayed = header("idempotent-replayed").is_some_and(|v| v == "true");
        let body = response.bytes().await.map_err(transport)?.to_vec();
        Ok(Answer {
            status,
            request_id,
            replayed,
            body,
        })
    }

    async fn payment_method(&self, token: &str) -> Result<PaymentMethod, GatewayError> {
        let url = self.endpoint(&["v1", "payment_methods", token]);
        let answer = self.send(self.http.get(url)).await?;
        if answer.status.is_success() {
            return answer.json("the payment method");
        }
        let error = answer.error();
        // Only Stripe's own "no such object" counts: a bare 404 from a proxy
        // or a wrong base_url must not tell a customer their card is gone.
        if error.code.as_deref() == Some("resource_missing") {
            return Err(GatewayError::HardDecline {
                code: "resource_missing".into(),
                message: "Stripe has no such payment method; the customer must add a card again."
                    .into(),
            });
        }
        Err(answer.failure("reading the payment method"))
    }

    /// PaymentIntents from a list or search URL that carry `key`, the
    /// succeeded one first.
    async fn intents_with_key(
        &self,
        url: Url,
        key: &str,
        what: &str,
    ) -> Result<Option<PaymentIntent>, GatewayError> {
        let answer = self.send(self.http.get(url)).await?;
        if !answer.status.is_success() {
            return Err(answer.failure(what));
        }
        let list: IntentList = answer.json(what)?;
        let mut found: Vec<PaymentIntent> = list
            .data
            .into_iter()
            .filter(|pi| pi.metadata.get("idempotency_key").map(String::as_str) == Some(key))
            .collect();
        found.sort_by_key(|pi| pi.status != "succeeded");
        Ok(found.into_iter().next())
    }
}

/// One HTTP answer, read whole.
struct Answer {
    status: StatusCode,
    request_id: Option<String>,
    replayed: bool,
    body: Vec<u8>,
}

impl Answer {
    fn json<T: DeserializeOwned>(&self, what: &str) -> Result<T, GatewayError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            GatewayError::Unknown(format!(
                "cannot read Stripe's answer about {what}{}: {e}",
                self.tag()
            ))
        })
    }

    fn error(&self) -> ApiError {
        serde_json::from_slice::<ErrorBody>(&self.body)
            .map(|b| b.error)
            .unwrap_or_default()
    }

    /// ` (request req_...)` when Stripe named the request, for support.
    fn tag(&self) -> String {
        match &self.request_id {
            Some(id) => format!(" (request {id})"),
            None => String::new(),
        }
    }

    /// A failure that is not a card decline: always `Unknown`, saying why.
    fn failure(&self, doing: &str) -> GatewayError {
        let error = self.error();
        let status = self.status;
        let message = error.message.as_deref().unwrap_or("no message");
        let tag = self.tag();
        GatewayError::Unknown(if status.is_server_error() {
            format!("Stripe answered {status} while {doing}{tag}: {message}")
        } else if status == StatusCode::TOO_MANY_REQUESTS {
            format!("Stripe rate-limited {doing} (429){tag}; the request was not processed")
        } else if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            format!("Stripe refused the API key while {doing} ({status}){tag}: {message}; check gateway.stripe.api_key")
        } else {
            format!(
                "Stripe refused {doing} ({status} {}/{}){tag}: {message}",
                error.kind.as_deref().unwrap_or("-"),
                error.code.as_deref().unwrap_or("-")
            )
        })
    }

    /// The outcome of a PaymentIntent create that did not succeed.
    fn charge_failure(&self, key: &str) -> GatewayError {
        let error = self.error();
        if self.status.is_server_error() || self.status == StatusCode::TOO_MANY_REQUESTS {
            return self.failure("creating the payment intent");
        }
        let idempotency = error.kind.as_deref() == Some("idempotency_error")
            || error.code.as_deref() == Some("idempotency_key_in_use")
            || self.status == StatusCode::CONFLICT;
        if idempotency {
            return GatewayError::Unknown(format!(
                "Stripe refused idempotency key {key} ({}){}: {}. This is a renewd bug, not a card problem: the key was reused with other parameters or while its first request was running; the first request's outcome is reconciled by key",
                self.status,
                self.tag(),
                error.message.as_deref().unwrap_or("no message")
            ));
        }
        if error.kind.as_deref() == Some("card_error") {
            return decline(&error);
        }
        if error.code.as_deref() == Some("resource_missing")
            && matches!(error.param.as_deref(), Some("payment_method" | "customer"))
        {
            return GatewayError::HardDecline {
                code: "resource_missing".into(),
                message: "Stripe no longer has this payment method or its customer; the customer must add a card again.".into(),
            };
        }
        self.failure("creating the payment intent")
    }
}

#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: ApiError,
}

#[derive(Debug, Default, Deserialize)]
struct ApiError {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    decline_code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    param: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PaymentIntent {
    id: String,
    status: String,
    #[serde(default)]
    last_payment_error: Option<ApiError>,
    #[serde(default)]
    metadata: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct IntentList {
    data: Vec<PaymentIntent>,
}

#[derive(Debug, Deserialize)]
struct PaymentMethod {
    #[serde(default)]
    customer: Option<String>,
    #[serde(default)]
    card: Option<Card>,
}

#[derive(Debug, Deserialize)]
struct Card {
    brand: String,
    last4: String,
}

/// A card error as a hard or soft decline, named by its most specific code.
fn decline(error: &ApiError) -> GatewayError {
    let code = error
        .decline_code
        .as_deref()
        .filter(|c| !c.is_empty())
        .or(error.code.as_deref())
        .unwrap_or("card_declined")
        .to_string();
    let message = error
        .message
        .clone()
        .unwrap_or_else(|| "The card was declined.".into());
    if is_soft(&code) {
        GatewayError::SoftDecline { code, message }
    } else {
        GatewayError::HardDecline { code, message }
    }
}

/// What a PaymentIntent's status says about the charge.
fn intent_outcome(pi: PaymentIntent) -> Result<Charge, GatewayError> {
    match pi.status.as_str() {
        "succeeded" => Ok(Charge { reference: pi.id }),
        "requires_payment_method" => Err(match &pi.last_payment_error {
            Some(error) => decline(error),
            None => GatewayError::HardDecline {
                code: "card_declined".into(),
                message: "The card was declined.".into(),
            },
        }),
        "requires_action" => Err(GatewayError::HardDecline {
            code: "authentication_required".into(),
            message: "The bank asks the customer to authenticate this payment, which cannot happen off-session; the customer must pay on-session or use another card.".into(),
        }),
        "canceled" => Err(GatewayError::HardDecline {
            code: "payment_intent_canceled".into(),
            message: format!("PaymentIntent {} was canceled.", pi.id),
        }),
        other => Err(GatewayError::Unknown(format!(
            "PaymentIntent {} is {other}; its outcome is not final yet",
            pi.id
        ))),
    }
}

/// A transport failure: the request may or may not have reached Stripe. The
/// URL is stripped, since it can hold a payment method token.
fn transport(e: reqwest::Error) -> GatewayError {
    let what = if e.is_timeout() {
        "no answer from Stripe within gateway.stripe.request_timeout"
    } else if e.is_connect() {
        "cannot connect to Stripe"
    } else {
        "the connection to Stripe failed"
    };
    let e = e.without_url();
    let mut chain = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    GatewayError::Unknown(format!("{what}: {chain}"))
}

/// Stripe's search query for our key, quotes and backslashes escaped.
fn search_query(key: &str) -> String {
    let escaped = key.replace('\\', "\\\\").replace('\'', "\\'");
    format!("metadata['idempotency_key']:'{escaped}'")
}

#[async_trait]
impl PaymentGateway for StripeGateway {
    async fn charge(&self, req: &ChargeRequest) -> Result<Charge, GatewayError> {
        let pm = self.payment_method(&req.payment_method).await?;
        let customer = pm.customer.ok_or_else(|| GatewayError::HardDecline {
            code: "payment_method_not_attached".into(),
            message: NOT_ATTACHED.into(),
        })?;
        let amount = req.amount.amount_minor.to_string();
        let currency = req.amount.currency.code().to_ascii_lowercase();
        let attempt_id = req.attempt_id.to_string();
        let subscription_id = req.subscription_id.to_string();
        let form: [(&str, &str); 11] = [
            ("amount", &amount),
            ("currency", &currency),
            ("customer", &customer),
            ("payment_method", &req.payment_method),
            ("payment_method_types[]", "card"),
            ("confirm", "true"),
            ("off_session", "true"),
            ("description", &req.description),
            ("metadata[attempt_id]", &attempt_id),
            ("metadata[subscription_id]", &subscription_id),
            ("metadata[idempotency_key]", &req.idempotency_key),
        ];
        let request = self
            .http
            .post(self.endpoint(&["v1", "payment_intents"]))
            .header("Idempotency-Key", &req.idempotency_key)
            .form(&form);
        let answer = self.send(request).await?;
        tracing::debug!(
            subscription_id = req.subscription_id,
            idempotency_key = %req.idempotency_key,
            status = answer.status.as_u16(),
            request_id = answer.request_id.as_deref(),
            replayed = answer.replayed,
            "stripe answered the payment intent"
        );
        if answer.status.is_success() {
            return intent_outcome(answer.json("the payment intent")?);
        }
        Err(answer.charge_failure(&req.idempotency_key))
    }

    async fn lookup(&self, idempotency_key: &str) -> Result<Lookup, GatewayError> {
        let mut search = self.endpoint(&["v1", "payment_intents", "search"]);
        search
            .query_pairs_mut()
            .append_pair("query", &search_query(idempotency_key))
            .append_pair("limit", "10");
        let mut found = self
            .intents_with_key(search, idempotency_key, "searching payment intents")
            .await?;
        if found.is_none() {
            // Search trails writes; the newest intents are read consistently.
            let mut recent = self.endpoint(&["v1", "payment_intents"]);
            recent.query_pairs_mut().append_pair("limit", RECENT_SCAN);
            found = self
                .intents_with_key(recent, idempotency_key, "listing recent payment intents")
                .await?;
        }
        let Some(pi) = found else {
            return Ok(Lookup::NotFound);
        };
        match intent_outcome(pi) {
            Ok(charge) => Ok(Lookup::Charged(charge)),
            Err(GatewayError::Unknown(why)) => Err(GatewayError::Unknown(why)),
            Err(decline) => Ok(Lookup::Declined(decline)),
        }
    }

    async fn card_details(&self, payment_method: &str) -> Result<CardDetails, GatewayError> {
        let pm = self.payment_method(payment_method).await?;
        let card = pm.card.ok_or_else(|| GatewayError::HardDecline {
            code: "payment_method_not_card".into(),
            message: "The stored payment method is not a card.".into(),
        })?;
        if pm.customer.is_none() {
            return Err(GatewayError::HardDecline {
                code: "payment_method_not_attached".into(),
                message: NOT_ATTACHED.into(),
            });
        }
        Ok(CardDetails {
            brand: card.brand,
            last4: card.last4,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card_error(code: &str, decline_code: Option<&str>) -> ApiError {
        ApiError {
            kind: Some("card_error".into()),
            code: Some(code.into()),
            decline_code: decline_code.map(str::to_string),
            message: Some("declined".into()),
            param: None,
        }
    }

    #[test]
    fn declines_are_named_by_their_most_specific_code_and_classed() {
        let cases = [
            ("card_declined", Some("insufficient_funds"), "soft"),
            ("card_declined", Some("try_again_later"), "soft"),
            ("processing_error", None, "soft"),
            ("card_decline_rate_limit_exceeded", None, "soft"),
            ("card_declined", Some("generic_decline"), "hard"),
            ("card_declined", Some("do_not_honor"), "hard"),
            ("card_declined", None, "hard"),
            ("expired_card", None, "hard"),
            ("incorrect_number", None, "hard"),
            ("card_declined", Some("stolen_card"), "hard"),
            ("card_declined", Some("fraudulent"), "hard"),
            (
                "authentication_required",
                Some("authentication_required"),
                "hard",
            ),
            ("card_declined", Some("some_future_code"), "hard"),
        ];
        for (code, decline_code, class) in cases {
            let e = decline(&card_error(code, decline_code));
            assert_eq!(e.decline_kind(), Some(class), "{code}/{decline_code:?}");
            assert_eq!(e.code(), decline_code.unwrap_or(code));
        }
    }

    #[test]
    fn a_search_query_escapes_quotes() {
        assert_eq!(
            search_query("renew:1:2027:a1"),
            "metadata['idempotency_key']:'renew:1:2027:a1'"
        );
        assert_eq!(search_query("a'b"), "metadata['idempotency_key']:'a\\'b'");
    }

    #[test]
    fn an_intent_still_processing_is_not_an_outcome() {
        let pi = PaymentIntent {
            id: "pi_1".into(),
            status: "processing".into(),
            last_payment_error: None,
            metadata: HashMap::new(),
        };
        assert!(matches!(intent_outcome(pi), Err(GatewayError::Unknown(_))));
    }
}
