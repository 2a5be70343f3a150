//! A fake Stripe: a local wiremock server with one stateful responder that
//! behaves like the parts of Stripe's API the gateway uses.
//!
//! Like Stripe, it stores the answer to every PaymentIntent create under its
//! `Idempotency-Key` and replays it for a repeat with the same parameters
//! (even a 500), and refuses a repeat with different parameters with a 400
//! `idempotency_error`. Its ledger (`intents`) is the truth about what was
//! charged, whatever it answered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

pub const API_KEY: &str = "sk_test_fake_key";
pub const CUSTOMER: &str = "cus_fake_1";

/// One PaymentIntent create as the fake received it.
#[derive(Debug, Clone)]
pub struct Posted {
    pub idempotency_key: Option<String>,
    pub params: Vec<(String, String)>,
}

impl Posted {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The answer Stripe stored for a key: the parameters first sent with it,
/// the status and the body.
type Stored = (Vec<(String, String)>, u16, Value);

#[derive(Default)]
pub struct State {
    /// Stored answers by idempotency key.
    answers: HashMap<String, Stored>,
    /// Every PaymentIntent created, oldest first: what was really charged.
    pub intents: Vec<Value>,
    /// Every PaymentIntent create received, replays included.
    pub posts: Vec<Posted>,
    /// Creates that take the charge and then answer 500 (Stripe stores and
    /// replays that 500 for the key).
    pub fail_after_charging: u32,
    /// Creates that answer 500 without charging anything.
    pub fail_before_charging: u32,
    /// Search does not see any intent yet, as when its index lags.
    pub search_lags: bool,
    /// Delay before every PaymentIntent create is answered (the charge is
    /// taken at once).
    pub create_delay: Option<Duration>,
}

impl State {
    pub fn succeeded(&self) -> Vec<&Value> {
        self.intents
            .iter()
            .filter(|pi| pi["status"] == "succeeded")
            .collect()
    }

    pub fn posts_for(&self, key: &str) -> usize {
        self.posts
            .iter()
            .filter(|p| p.idempotency_key.as_deref() == Some(key))
            .count()
    }
}

pub struct FakeStripe {
    pub server: MockServer,
    state: Arc<Mutex<State>>,
}

impl FakeStripe {
    pub async fn start() -> FakeStripe {
        let server = MockServer::start().await;
        let state = Arc::new(Mutex::new(State::default()));
        Mock::given(any())
            .respond_with(Responder {
                state: state.clone(),
            })
            .mount(&server)
            .await;
        FakeStripe { server, state }
    }

    pub fn uri(&self) -> String {
        self.server.uri()
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }
}

/// How the fake's test payment methods behave (Stripe's test tokens).
enum Card {
    Good {
        brand: &'static str,
        last4: &'static str,
    },
    Declined {
        code: &'static str,
        decline_code: Option<&'static str>,
        message: &'static str,
    },
}

fn card(pm: &str) -> Option<(Option<&'static str>, Card)> {
    let attached = Some(CUSTOMER);
    Some(match pm {
        "pm_card_visa" => (
            attached,
            Card::Good {
                brand: "visa",
                last4: "4242",
            },
        ),
        "pm_card_mastercard" => (
            attached,
            Card::Good {
                brand: "mastercard",
                last4: "4444",
            },
        ),
        "pm_card_unattached" => (
            None,
            Card::Good {
                brand: "visa",
                last4: "4242",
            },
        ),
        "pm_card_chargeDeclined" => (
            attached,
            Card::Declined {
                code: "card_declined",
                decline_code: Some("generic_decline"),
                message: "Your card was declined.",
            },
        ),
        "pm_card_chargeDeclinedInsufficientFunds" => (
            attached,
            Card::Declined {
                code: "card_declined",
                decline_code: Some("insufficient_funds"),
                message: "Your card has insufficient funds.",
            },
        ),
        "pm_card_chargeDeclinedExpiredCard" => (
            attached,
            Card::Declined {
                code: "expired_card",
                decline_code: Some("expired_card"),
                message: "Your card has expired.",
            },
        ),
        "pm_card_authenticationRequired" => (
            attached,
            Card::Declined {
                code: "authentication_required",
                decline_code: Some("authentication_required"),
                message: "Your card was declined. This transaction requires authentication.",
            },
        ),
        _ => return None,
    })
}

fn error(status: u16, kind: &str, code: Option<&str>, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .set_body_json(json!({"error": {"type": kind, "code": code, "message": message}}))
}

struct Responder {
    state: Arc<Mutex<State>>,
}

impl Respond for Responder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let authorized = request
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {API_KEY}"));
        if !authorized {
            return error(
                401,
                "invalid_request_error",
                None,
                "Invalid API Key provided.",
            );
        }
        let mut state = self.state.lock().unwrap();
        let path = request.url.path().to_string();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let response = match (request.method.as_str(), segments.as_slice()) {
            ("GET", ["v1", "payment_methods", pm]) => payment_method(pm),
            ("POST", ["v1", "payment_intents"]) => create_intent(&mut state, request),
            ("GET", ["v1", "payment_intents", "search"]) => search(&state, request),
            ("GET", ["v1", "payment_intents"]) => list(&state, request),
            _ => error(
                404,
                "invalid_request_error",
                None,
                "Unrecognized request URL.",
            ),
        };
        response.insert_header("request-id", format!("req_fake_{}", state.posts.len()))
    }
}

fn payment_method(pm: &str) -> ResponseTemplate {
    let Some((customer, behaviour)) = card(pm) else {
        return error(
            404,
            "invalid_request_error",
            Some("resource_missing"),
            &format!("No such PaymentMethod: '{pm}'"),
        );
    };
    let (brand, last4) = match behaviour {
        Card::Good { brand, last4 } => (brand, last4),
        Card::Declined { .. } => ("visa", "0002"),
    };
    ResponseTemplate::new(200).set_body_json(json!({
        "id": pm,
        "object": "payment_method",
        "type": "card",
        "customer": customer,
        "card": {"brand": brand, "last4": last4, "exp_month": 12, "exp_year": 2034},
    }))
}

fn create_intent(state: &mut State, request: &Request) -> ResponseTemplate {
    let params: Vec<(String, String)> = url::form_urlencoded::parse(&request.body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let key = request
        .headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    state.posts.push(Posted {
        idempotency_key: key.clone(),
        params: params.clone(),
    });
    let delay = state.create_delay;
    let with_delay = |r: ResponseTemplate| match delay {
        Some(d) => r.set_delay(d),
        None => r,
    };
    if let Some(key) = &key {
        if let Some((first, status, body)) = state.answers.get(key) {
            if *first != params {
                return with_delay(error(
                    400,
                    "idempotency_error",
                    None,
                    &format!("Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{key}' if you meant to execute a different request."),
                ));
            }
            return with_delay(
                ResponseTemplate::new(*status)
                    .set_body_json(body.clone())
                    .insert_header("idempotent-replayed", "true"),
            );
        }
    }
    let (status, body) = execute_create(state, &params);
    if let Some(key) = key {
        state.answers.insert(key, (params, status, body.clone()));
    }
    with_delay(ResponseTemplate::new(status).set_body_json(body))
}

/// Runs a create the first time its key is seen: the status and body to
/// store for the key.
fn execute_create(state: &mut State, params: &[(String, String)]) -> (u16, Value) {
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let api_error = json!({"error": {"type": "api_error", "message": "An unknown error occurred"}});
    if state.fail_before_charging > 0 {
        state.fail_before_charging -= 1;
        return (500, api_error);
    }
    let pm = get("payment_method");
    let Some((customer, behaviour)) = card(&pm) else {
        return (
            400,
            json!({"error": {"type": "invalid_request_error", "code": "resource_missing", "param": "payment_method", "message": format!("No such PaymentMethod: '{pm}'")}}),
        );
    };
    if customer != Some(get("customer").as_str())
        || get("off_session") != "true"
        || get("confirm") != "true"
    {
        return (
            400,
            json!({"error": {"type": "invalid_request_error", "message": "The provided PaymentMethod was previously used with a different customer or is not set up for off-session use."}}),
        );
    }
    let metadata: serde_json::Map<String, Value> = params
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("metadata[")
                .and_then(|k| k.strip_suffix(']'))
                .map(|k| (k.to_string(), json!(v)))
        })
        .collect();
    let mut intent = json!({
        "id": format!("pi_fake_{:04}", state.intents.len() + 1),
        "object": "payment_intent",
        "amount": get("amount").parse::<i64>().unwrap_or(-1),
        "currency": get("currency"),
        "customer": get("customer"),
        "payment_method": pm,
        "metadata": metadata,
    });
    let (status, body) = match behaviour {
        Card::Good { .. } => {
            intent["status"] = json!("succeeded");
            (200, intent.clone())
        }
        Card::Declined {
            code,
            decline_code,
            message,
        } => {
            let err = json!({"type": "card_error", "code": code, "decline_code": decline_code, "message": message});
            intent["status"] = json!("requires_payment_method");
            intent["last_payment_error"] = err.clone();
            let mut body = json!({"error": err});
            body["error"]["payment_intent"] = intent.clone();
            (402, body)
        }
    };
    state.intents.push(intent);
    if state.fail_after_charging > 0 {
        state.fail_after_charging -= 1;
        return (500, api_error);
    }
    (status, body)
}

/// Understands only `metadata['idempotency_key']:'KEY'`, the query the
/// gateway sends.
fn search(state: &State, request: &Request) -> ResponseTemplate {
    let query = request
        .url
        .query_pairs()
        .find(|(k, _)| k == "query")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let Some(key) = query
        .strip_prefix("metadata['idempotency_key']:'")
        .and_then(|q| q.strip_suffix('\''))
        .map(|k| k.replace("\\'", "'").replace("\\\\", "\\"))
    else {
        return error(400, "invalid_request_error", None, "Invalid search query.");
    };
    let data: Vec<Value> = if state.search_lags {
        vec![]
    } else {
        state
            .intents
            .iter()
            .filter(|pi| pi["metadata"]["idempotency_key"] == key.as_str())
            .cloned()
            .collect()
    };
    ResponseTemplate::new(200)
        .set_body_json(json!({"object": "search_result", "data": data, "has_more": false}))
}

fn list(state: &State, request: &Request) -> ResponseTemplate {
    let limit: usize = request
        .url
        .query_pairs()
        .find(|(k, _)| k == "limit")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(10);
    let data: Vec<Value> = state.intents.iter().rev().take(limit).cloned().collect();
    ResponseTemplate::new(200)
        .set_body_json(json!({"object": "list", "data": data, "has_more": false}))
}
