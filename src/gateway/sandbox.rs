//! The sandbox gateway: the default processor of the embedded setup.
//!
//! It keeps its own ledger in a separate SQLite file, as an outside
//! processor would, so a charge it took survives a crash of renewd. It
//! honours idempotency keys like Stripe (a repeated key returns the stored
//! result; a repeated key with different parameters is refused), stamps each
//! charge with the clock's instant, and understands Stripe's test tokens.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use tokio::sync::Mutex;

use super::{CardDetails, Charge, ChargeRequest, GatewayError, Lookup, PaymentGateway};
use crate::clock::SharedClock;
use crate::store::sqlite::direct::{Arg, Cols, Connections, Row, Script, Tagged};

/// Stripe's test payment methods and how the sandbox answers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TestCard {
    Succeeds {
        brand: &'static str,
        last4: &'static str,
    },
    Hard {
        code: &'static str,
        last4: &'static str,
    },
    Soft {
        code: &'static str,
        last4: &'static str,
    },
}

fn test_card(token: &str) -> Option<TestCard> {
    use TestCard::*;
    Some(match token {
        "pm_card_visa" => Succeeds {
            brand: "visa",
            last4: "4242",
        },
        "pm_card_visa_debit" => Succeeds {
            brand: "visa",
            last4: "5556",
        },
        "pm_card_mastercard" => Succeeds {
            brand: "mastercard",
            last4: "4444",
        },
        "pm_card_amex" => Succeeds {
            brand: "amex",
            last4: "8431",
        },
        "pm_card_jcb" => Succeeds {
            brand: "jcb",
            last4: "0505",
        },
        "pm_card_chargeDeclined" => Hard {
            code: "card_declined",
            last4: "0002",
        },
        "pm_card_chargeDeclinedExpiredCard" => Hard {
            code: "expired_card",
            last4: "0069",
        },
        "pm_card_chargeDeclinedFraudulent" => Hard {
            code: "fraudulent",
            last4: "0019",
        },
        "pm_card_chargeDeclinedInsufficientFunds" => Soft {
            code: "insufficient_funds",
            last4: "9995",
        },
        "pm_card_chargeDeclinedProcessingError" => Soft {
            code: "processing_error",
            last4: "0119",
        },
        _ => return None,
    })
}

/// One row of the sandbox's ledger.
#[derive(Debug, Clone, Serialize)]
pub struct LedgerCharge {
    pub id: String,
    pub idempotency_key: String,
    pub payment_method: String,
    pub amount_minor: i64,
    pub currency: String,
    pub outcome: String,
    pub decline_code: Option<String>,
    pub created_at: Timestamp,
}

/// Faults the sandbox injects, for tests and drills.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    pub timeout_after_charge_every: u64,
    pub fail_5xx_every: u64,
    pub decline_every: u64,
}

impl From<&crate::config::SandboxSettings> for Faults {
    fn from(s: &crate::config::SandboxSettings) -> Self {
        Faults {
            timeout_after_charge_every: s.timeout_after_charge_every,
            fail_5xx_every: s.fail_5xx_every,
            decline_every: s.decline_every,
        }
    }
}

/// Connections driven directly: charges take one at a time (the `write`
/// mutex), so a lookup never waits behind a charge for one.
const LEDGER_CONNECTIONS: usize = 2;

/// How long a statement waits for another process's lock on the ledger.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Takes the charge unless its key was seen before; returns the new row.
const INSERT_CHARGE: &str = "INSERT INTO charges (seq, id, idempotency_key, payment_method, amount_minor, currency, outcome, \
     decline_kind, decline_code, created_at) \
     SELECT n, printf('ch_sandbox_%08d', n), ?, ?, ?, ?, ?, ?, ?, ? \
     FROM (SELECT IFNULL((SELECT seq FROM charges ORDER BY seq DESC LIMIT 1), 0) + 1 AS n) WHERE true \
     ON CONFLICT (idempotency_key) DO NOTHING RETURNING *";

const CHARGE_BY_KEY: &str = "SELECT * FROM charges WHERE idempotency_key = ?";

fn every(n: u64, k: u64) -> bool {
    k > 0 && n.is_multiple_of(k)
}

pub struct SandboxGateway {
    /// The ledger's connections, driven directly (see
    /// [`SandboxGateway::ledger`]): through an sqlx pool, every charge was
    /// handed to sqlx's worker thread and back, which cost a simulated
    /// year's renewals more than the ledger's own writes (renewd bench,
    /// "time travel").
    direct: Arc<Connections>,
    clock: SharedClock,
    latency: Duration,
    write: Mutex<()>,
    faults: Faults,
    requests: std::sync::atomic::AtomicU64,
}

impl SandboxGateway {
    pub async fn open(
        ledger: &Path,
        clock: SharedClock,
        latency: Duration,
    ) -> Result<Self, sqlx::Error> {
        if let Some(parent) = ledger.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(sqlx::Error::Io)?;
            }
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", ledger.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // Every commit reaches the OS before `charge` returns, so the
            // ledger survives renewd being killed (tests/crash); only a power
            // cut could lose its tail. The sandbox stands in for a processor,
            // whose own durability is not renewd's cost to pay: at FULL every
            // charge waited for a flush of its own (renewd bench).
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT);
        let direct = Connections::open(&options, LEDGER_CONNECTIONS, BUSY_TIMEOUT)
            .await
            .map_err(ledger_error)?;
        let mut schema = Script::default();
        schema.push(
            "CREATE TABLE IF NOT EXISTS charges (
                seq             INTEGER PRIMARY KEY,
                id              TEXT    NOT NULL UNIQUE,
                idempotency_key TEXT    NOT NULL UNIQUE,
                payment_method  TEXT    NOT NULL,
                amount_minor    INTEGER NOT NULL,
                currency        TEXT    NOT NULL,
                outcome         TEXT    NOT NULL,
                decline_kind    TEXT,
                decline_code    TEXT,
                created_at      INTEGER NOT NULL
            )",
            [],
        );
        direct.run(&schema).await.map_err(ledger_error)?;
        Ok(SandboxGateway {
            direct: Arc::new(direct),
            clock,
            latency,
            write: Mutex::new(()),
            faults: Faults::default(),
            requests: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Turns on fault injection.
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// The whole ledger, oldest first.
    pub async fn charges(&self) -> Result<Vec<LedgerCharge>, sqlx::Error> {
        let mut all = Script::default();
        all.push("SELECT * FROM charges ORDER BY seq", []);
        let rows = self.direct.run(&all).await.map_err(ledger_error)?;
        let charge = |r: &Row| -> Result<LedgerCharge, crate::store::StoreError> {
            Ok(LedgerCharge {
                id: r.col("id")?,
                idempotency_key: r.col("idempotency_key")?,
                payment_method: r.col("payment_method")?,
                amount_minor: r.col("amount_minor")?,
                currency: r.col("currency")?,
                outcome: r.col("outcome")?,
                decline_code: r.col("decline_code")?,
                created_at: Timestamp::from_second(r.col("created_at")?)
                    .map_err(|e| crate::store::StoreError::Corrupt(e.to_string()))?,
            })
        };
        rows.all()
            .iter()
            .map(|r| charge(r).map_err(ledger_error))
            .collect()
    }

    /// Answers `latency` after the request arrived, as a processor does:
    /// the sandbox's own work (its ledger write) is part of that time, not
    /// added to it, so a gateway-bound sweep is measured against the latency
    /// it was given (`renewd bench`, "gateway-bound"). A caller that gives up
    /// sooner has still been charged, as with a real processor; the
    /// idempotency key and the lookup are how renewd finds out.
    async fn answer_after_latency<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        let answer_at = tokio::time::Instant::now() + self.latency;
        let answer = work.await;
        if !self.latency.is_zero() {
            tokio::time::sleep_until(answer_at).await;
        }
        answer
    }

    async fn take_charge(&self, req: &ChargeRequest) -> Result<Charge, GatewayError> {
        let n = self
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        if every(n, self.faults.fail_5xx_every) {
            return Err(GatewayError::Unknown(
                "sandbox: injected HTTP 500 before charging".into(),
            ));
        }
        let (outcome, kind, code) = match test_card(&req.payment_method) {
            _ if every(n, self.faults.decline_every) => {
                ("declined", Some("soft"), Some("processing_error"))
            }
            Some(TestCard::Succeeds { .. }) => ("succeeded", None, None),
            Some(TestCard::Hard { code, .. }) => ("declined", Some("hard"), Some(code)),
            Some(TestCard::Soft { code, .. }) => ("declined", Some("soft"), Some(code)),
            None => ("declined", Some("hard"), Some("resource_missing")),
        };
        // One statement: the charge is taken unless its key was seen before
        // (a single statement is atomic, against another process's writes
        // too; the mutex only keeps this process's requests in the order
        // they came). It runs to its end, so its connection holds no
        // transaction afterwards: one left open kept the ledger's WAL from
        // ever being checkpointed, and every lookup in it grew slower with
        // the ledger's size (renewd bench, "time travel").
        let _guard = self.write.lock().await;
        let mut insert = Script::default();
        insert.push(
            INSERT_CHARGE,
            [
                Arg::from(&req.idempotency_key),
                Arg::from(&req.payment_method),
                Arg::from(req.amount.amount_minor),
                Arg::from(req.amount.currency.code()),
                Arg::from(outcome),
                Arg::from(kind),
                Arg::from(code),
                Arg::from(self.clock.now().as_second()),
            ],
        );
        let inserted = self.ledger(insert).await?;
        let Some(row) = inserted.all().first() else {
            let row = self
                .charge_by_key(&req.idempotency_key)
                .await?
                .ok_or_else(|| {
                    GatewayError::Unknown(format!(
                        "sandbox ledger: no charge for key {} after a conflict on it",
                        req.idempotency_key
                    ))
                })?;
            let same = row.col::<String>("payment_method").map_err(infra)? == req.payment_method
                && row.col::<i64>("amount_minor").map_err(infra)? == req.amount.amount_minor
                && row.col::<String>("currency").map_err(infra)? == req.amount.currency.code();
            if !same {
                // Stripe answers 400 idempotency_error; nothing was charged by this request.
                return Err(GatewayError::HardDecline {
                    code: "idempotency_error".into(),
                    message: "Keys for idempotent requests can only be used with the same parameters they were first used with.".into(),
                });
            }
            return Self::stored_result(&row).map_err(infra)?;
        };
        if every(n, self.faults.timeout_after_charge_every) {
            return Err(GatewayError::Unknown(
                "sandbox: injected timeout after taking the charge".into(),
            ));
        }
        Self::stored_result(row).map_err(infra)?
    }

    /// Runs one statement on the ledger. With no latency, on the caller's
    /// thread: it is the cheapest way, and a simulated year's renewals
    /// took a fifth less time than through sqlx's worker thread (renewd
    /// bench, "time travel"). With a latency, as a task of its own, which
    /// the runtime may run on another of its threads while the caller's
    /// goes on with other renewals: on the thread polling the sweep (the
    /// bench's main thread), the gateway-bound line fell from 0.94 to 0.92.
    ///
    /// A caller that gives up (the gateway timeout) aborts the task: a
    /// charge still waiting for another process's lock is then never
    /// taken, as on the caller's thread, so a lookup that later finds no
    /// such key cannot be overtaken by it (see `gateway.timeout`).
    async fn ledger(&self, script: Script) -> Result<Tagged, GatewayError> {
        if self.latency.is_zero() {
            return self.direct.run(&script).await.map_err(infra);
        }
        let direct = self.direct.clone();
        let task = AbortOnDrop(tokio::spawn(async move { direct.run(&script).await }));
        task.finish().await
    }

    /// The ledger's row for `key`, if there is one.
    async fn charge_by_key(&self, key: &str) -> Result<Option<Row>, GatewayError> {
        let mut select = Script::default();
        select.push(CHARGE_BY_KEY, [Arg::from(key)]);
        let rows = self.ledger(select).await?;
        Ok(rows.all().first().cloned())
    }

    async fn find_charge(&self, idempotency_key: &str) -> Result<Lookup, GatewayError> {
        Ok(match self.charge_by_key(idempotency_key).await? {
            None => Lookup::NotFound,
            Some(row) => match Self::stored_result(&row).map_err(infra)? {
                Ok(charge) => Lookup::Charged(charge),
                Err(decline) => Lookup::Declined(decline),
            },
        })
    }

    fn stored_result(
        row: &impl Cols,
    ) -> Result<Result<Charge, GatewayError>, crate::store::StoreError> {
        let outcome: String = row.col("outcome")?;
        let code: Option<String> = row.col("decline_code")?;
        let kind: Option<String> = row.col("decline_kind")?;
        let code = code.unwrap_or_default();
        Ok(match (outcome.as_str(), kind.as_deref()) {
            ("succeeded", _) => Ok(Charge {
                reference: row.col("id")?,
            }),
            (_, Some("soft")) => Err(GatewayError::SoftDecline {
                message: decline_message(&code).into(),
                code,
            }),
            _ => Err(GatewayError::HardDecline {
                message: decline_message(&code).into(),
                code,
            }),
        })
    }
}

/// A ledger task, aborted if its caller stops waiting for it. The task
/// awaits only between tries on a locked ledger (when no statement runs),
/// so an abort never cuts a statement short.
struct AbortOnDrop(tokio::task::JoinHandle<crate::store::StoreResult<Tagged>>);

impl AbortOnDrop {
    async fn finish(mut self) -> Result<Tagged, GatewayError> {
        (&mut self.0).await.map_err(infra)?.map_err(infra)
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn decline_message(code: &str) -> &'static str {
    match code {
        "insufficient_funds" => "The card has insufficient funds.",
        "expired_card" => "The card has expired.",
        "processing_error" => "An error occurred while processing the card.",
        "fraudulent" => "The card was declined.",
        "resource_missing" => "No such payment method.",
        _ => "The card was declined.",
    }
}

/// A store error from the ledger, as the sqlx error `open` and `charges`
/// return: SQLite's own errors as they are, anything else (a row that does
/// not read back) as a decode error.
fn ledger_error(e: crate::store::StoreError) -> sqlx::Error {
    match e {
        crate::store::StoreError::Database(e) => e,
        other => sqlx::Error::Decode(other.to_string().into()),
    }
}

fn infra(e: impl std::fmt::Display) -> GatewayError {
    GatewayError::Unknown(format!("sandbox ledger: {e}"))
}

#[async_trait]
impl PaymentGateway for SandboxGateway {
    async fn charge(&self, req: &ChargeRequest) -> Result<Charge, GatewayError> {
        self.answer_after_latency(self.take_charge(req)).await
    }

    async fn lookup(&self, idempotency_key: &str) -> Result<Lookup, GatewayError> {
        self.answer_after_latency(self.find_charge(idempotency_key))
            .await
    }

    async fn card_details(&self, payment_method: &str) -> Result<CardDetails, GatewayError> {
        match test_card(payment_method) {
            Some(TestCard::Succeeds { brand, last4 }) => Ok(CardDetails {
                brand: brand.into(),
                last4: last4.into(),
            }),
            Some(TestCard::Hard { last4, .. } | TestCard::Soft { last4, .. }) => Ok(CardDetails {
                brand: "visa".into(),
                last4: last4.into(),
            }),
            None => Err(GatewayError::HardDecline {
                code: "resource_missing".into(),
                message: format!(
                    "No such payment method `{payment_method}`; the sandbox knows Stripe's test tokens such as pm_card_visa"
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::MockClock;
    use crate::domain::{Currency, Money};
    use std::sync::Arc;

    async fn sandbox(dir: &tempfile::TempDir) -> SandboxGateway {
        let clock = Arc::new(MockClock::new("2027-01-01T00:00:00Z".parse().unwrap()));
        SandboxGateway::open(&dir.path().join("ledger.db"), clock, Duration::ZERO)
            .await
            .unwrap()
    }

    fn req(key: &str, pm: &str, amount: i64) -> ChargeRequest {
        ChargeRequest {
            idempotency_key: key.into(),
            payment_method: pm.into(),
            amount: Money::new(amount, Currency::parse("JPY").unwrap()),
            description: "test".into(),
            attempt_id: 1,
            subscription_id: 1,
        }
    }

    #[tokio::test]
    async fn a_repeated_key_returns_the_first_result_and_charges_once() {
        let dir = tempfile::tempdir().unwrap();
        let gw = sandbox(&dir).await;
        let first = gw.charge(&req("k1", "pm_card_visa", 100)).await.unwrap();
        let second = gw.charge(&req("k1", "pm_card_visa", 100)).await.unwrap();
        assert_eq!(first, second);
        assert_eq!(gw.charges().await.unwrap().len(), 1);
    }

    /// Two sandboxes on one ledger file, as two renewd processes would
    /// be, each charging its keys (200 of them, named `PREFIX0`..) at the
    /// same time; returns them with the references each was answered.
    async fn charge_from_both(
        dir: &tempfile::TempDir,
        prefixes: [&'static str; 2],
    ) -> [(SandboxGateway, Vec<String>); 2] {
        let charge_all = |gw: SandboxGateway, prefix: &'static str| async move {
            let mut refs = Vec::new();
            for i in 0..200 {
                let charge = gw
                    .charge(&req(&format!("{prefix}{i}"), "pm_card_visa", 100))
                    .await
                    .unwrap();
                refs.push(charge.reference);
            }
            (gw, refs)
        };
        let (a, b) = (sandbox(dir).await, sandbox(dir).await);
        let (a, b) = tokio::join!(
            tokio::spawn(charge_all(a, prefixes[0])),
            tokio::spawn(charge_all(b, prefixes[1]))
        );
        [a.unwrap(), b.unwrap()]
    }

    /// Charging at once, each sandbox meets the other's lock and tries
    /// again, and every charge gets a number of its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_processes_share_one_ledger_without_losing_a_charge() {
        let dir = tempfile::tempdir().unwrap();
        let [(a, _), (b, _)] = charge_from_both(&dir, ["a", "b"]).await;
        let ledger = a.charges().await.unwrap();
        assert_eq!(ledger.len(), 400);
        let ids: std::collections::HashSet<_> = ledger.iter().map(|c| c.id.clone()).collect();
        assert_eq!(ids.len(), 400);
        // Either side finds the other's charges by key.
        assert!(matches!(
            a.lookup("b199").await.unwrap(),
            Lookup::Charged(_)
        ));
        assert!(matches!(b.lookup("a0").await.unwrap(), Lookup::Charged(_)));
        assert_eq!(b.lookup("c0").await.unwrap(), Lookup::NotFound);
    }

    /// The same keys charged from both sides at once: one charge each.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_same_key_from_two_processes_is_charged_once() {
        let dir = tempfile::tempdir().unwrap();
        let [(a, from_a), (_, from_b)] = charge_from_both(&dir, ["k", "k"]).await;
        assert_eq!(from_a, from_b);
        assert_eq!(a.charges().await.unwrap().len(), 200);
    }

    /// A ledger another process holds locked: the charge waits for it, then
    /// lands once; a caller that gave up while it waited was never
    /// charged, with a latency (its own task) or without.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_charge_waits_out_a_locked_ledger_and_one_given_up_is_never_taken() {
        use sqlx::Connection;
        for latency in [Duration::ZERO, Duration::from_millis(1)] {
            let dir = tempfile::tempdir().unwrap();
            let clock = Arc::new(MockClock::new("2027-01-01T00:00:00Z".parse().unwrap()));
            let gw = SandboxGateway::open(&dir.path().join("ledger.db"), clock, latency)
                .await
                .unwrap();
            let path = dir.path().join("ledger.db");
            let mut other =
                sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
                    .await
                    .unwrap();
            sqlx::raw_sql("BEGIN IMMEDIATE")
                .execute(&mut other)
                .await
                .unwrap();
            // Given up while the lock is held.
            let gave_up = tokio::time::timeout(
                Duration::from_millis(100),
                gw.charge(&req("gave-up", "pm_card_visa", 100)),
            )
            .await;
            assert!(gave_up.is_err(), "charged through another process's lock");
            // Waiting: lands once the lock is let go.
            let waiting = tokio::spawn(async move {
                let charged = gw.charge(&req("waited", "pm_card_visa", 100)).await;
                (gw, charged)
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!waiting.is_finished());
            sqlx::raw_sql("COMMIT").execute(&mut other).await.unwrap();
            let (gw, charged) = waiting.await.unwrap();
            charged.unwrap();
            // Long enough for a charge left retrying to have landed.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let keys: Vec<String> = gw
                .charges()
                .await
                .unwrap()
                .into_iter()
                .map(|c| c.idempotency_key)
                .collect();
            assert_eq!(keys, ["waited"], "latency {latency:?}");
            assert_eq!(gw.lookup("gave-up").await.unwrap(), Lookup::NotFound);
        }
    }

    #[tokio::test]
    async fn a_repeated_key_with_other_parameters_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let gw = sandbox(&dir).await;
        gw.charge(&req("k1", "pm_card_visa", 100)).await.unwrap();
        let err = gw
            .charge(&req("k1", "pm_card_visa", 200))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "idempotency_error");
        assert_eq!(gw.charges().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn injected_faults_happen_on_their_turn_and_a_timeout_keeps_the_charge() {
        let dir = tempfile::tempdir().unwrap();
        let gw = sandbox(&dir).await.with_faults(Faults {
            timeout_after_charge_every: 2,
            fail_5xx_every: 3,
            decline_every: 0,
        });
        assert!(gw.charge(&req("a", "pm_card_visa", 1)).await.is_ok());
        let timed_out = gw.charge(&req("b", "pm_card_visa", 1)).await.unwrap_err();
        assert!(matches!(timed_out, GatewayError::Unknown(_)));
        assert!(
            matches!(gw.lookup("b").await.unwrap(), Lookup::Charged(_)),
            "taken before the timeout"
        );
        let five_hundred = gw.charge(&req("c", "pm_card_visa", 1)).await.unwrap_err();
        assert!(matches!(five_hundred, GatewayError::Unknown(_)));
        assert_eq!(
            gw.lookup("c").await.unwrap(),
            Lookup::NotFound,
            "a 500 before charging took nothing"
        );
    }

    #[tokio::test]
    async fn test_tokens_decline_as_stripe_does() {
        let dir = tempfile::tempdir().unwrap();
        let gw = sandbox(&dir).await;
        let hard = gw
            .charge(&req("a", "pm_card_chargeDeclined", 100))
            .await
            .unwrap_err();
        assert_eq!(hard.decline_kind(), Some("hard"));
        let soft = gw
            .charge(&req("b", "pm_card_chargeDeclinedInsufficientFunds", 100))
            .await
            .unwrap_err();
        assert_eq!(soft.decline_kind(), Some("soft"));
        let expired = gw
            .charge(&req("c", "pm_card_chargeDeclinedExpiredCard", 100))
            .await
            .unwrap_err();
        assert_eq!(expired.code(), "expired_card");
        assert_eq!(gw.lookup("b").await.unwrap(), Lookup::Declined(soft));
        assert_eq!(gw.lookup("never-sent").await.unwrap(), Lookup::NotFound);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_answer_comes_latency_after_the_request_with_the_ledger_write_inside_it() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(MockClock::new("2027-01-01T00:00:00Z".parse().unwrap()));
        let latency = Duration::from_secs(3);
        let gw = Arc::new(
            SandboxGateway::open(&dir.path().join("ledger.db"), clock, latency)
                .await
                .unwrap(),
        );
        let asked = std::time::Instant::now();
        let call = tokio::spawn({
            let gw = gw.clone();
            async move { gw.charge(&req("k1", "pm_card_visa", 100)).await }
        });
        // The charge reaches the ledger long before the answer: were the
        // ledger write made after the latency, nothing would be there for 3 s.
        let mut ledger = Vec::new();
        for _ in 0..100 {
            ledger = gw.charges().await.unwrap();
            if !ledger.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(ledger.len(), 1, "charged within 2 s of the request");
        assert!(!call.is_finished(), "answered before the latency was up");
        let charge = call.await.unwrap().unwrap();
        assert!(
            asked.elapsed() >= latency,
            "answered {:?} after the request",
            asked.elapsed()
        );
        assert_eq!(charge.reference, ledger[0].id);
    }
}
