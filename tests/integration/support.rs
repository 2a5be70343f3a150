//! The integration harness: one app per test with its own temp directory
//! (database, sandbox ledger, mail files), a MockClock and the sandbox
//! gateway, so a test reads: create, advance the clock, sweep, assert.
//!
//! The backend comes from `RENEWD_TEST_BACKEND`: `sqlite` (the default) or
//! `postgres`, where every test gets its own fresh database on the server
//! at `RENEWD_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`)
//! and drops it when the test ends. Asked for PostgreSQL, a test fails when
//! the server is unreachable: it never passes without having run.

use std::sync::Arc;

use async_trait::async_trait;
use jiff::{SignedDuration, Timestamp};
use renewd::clock::{Clock, MockClock, SharedClock};
use renewd::config::Config;
use renewd::engine::{Engine, NewCustomerInput, PurchaseInput, SweepSummary};
use renewd::gateway::sandbox::{LedgerCharge, SandboxGateway};
use renewd::gateway::{CardDetails, Charge, ChargeRequest, GatewayError, Lookup, PaymentGateway};
use renewd::mail::file::FileTransport;
use renewd::mail::MailKind;
use renewd::store::postgres::PgStore;
use renewd::store::sqlite::SqliteStore;
use renewd::store::{Invoice, Mail, MailFilter, Store, Subscription};

pub struct TestApp {
    pub dir: tempfile::TempDir,
    pub clock: Arc<MockClock>,
    pub engine: Engine,
    pub sandbox: Arc<SandboxGateway>,
    /// The test's own PostgreSQL database, dropped with the app (last, after
    /// the engine's connections).
    pub pg: Option<PgDatabase>,
}

/// The database the suite runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub fn backend() -> Backend {
    match std::env::var("RENEWD_TEST_BACKEND").as_deref() {
        Ok("postgres") | Ok("postgresql") | Ok("pg") => Backend::Postgres,
        Ok("") | Ok("sqlite") | Err(_) => Backend::Sqlite,
        Ok(other) => panic!("RENEWD_TEST_BACKEND={other:?}: use sqlite or postgres"),
    }
}

/// The server's maintenance database, where test databases are created.
pub fn pg_admin_url() -> String {
    std::env::var("RENEWD_TEST_PG_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh PostgreSQL database for one test, dropped (`WITH (FORCE)`, so
/// connections still open do not keep it) when this guard is.
pub struct PgDatabase {
    pub name: String,
    pub url: String,
    admin: String,
}

impl PgDatabase {
    pub async fn create() -> PgDatabase {
        use sqlx::{Connection, Executor};
        let admin = pg_admin_url();
        let connect = sqlx::PgConnection::connect(&admin);
        let mut conn = match tokio::time::timeout(std::time::Duration::from_secs(10), connect).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => panic!(
                "RENEWD_TEST_BACKEND=postgres but PostgreSQL at {admin} is unreachable: {e} (start it, see README \"Tests\")"
            ),
            Err(_) => panic!("RENEWD_TEST_BACKEND=postgres but PostgreSQL at {admin} did not answer in 10s"),
        };
        let name = format!("renewd_test_{}", uuid::Uuid::new_v4().simple());
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create test database");
        let _ = conn.close().await;
        let mut url = url::Url::parse(&admin).expect("RENEWD_TEST_PG_URL is a URL");
        url.set_path(&format!("/{name}"));
        PgDatabase {
            name,
            url: url.to_string(),
            admin,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot be blocked on:
        // the DROP runs on a thread of its own, waited for.
        let admin = self.admin.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                use sqlx::{Connection, Executor};
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .map_err(|e| e.to_string())?;
                conn.execute(sql.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = conn.close().await;
                Ok::<(), String>(())
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("cannot drop test database {}: {e}", self.name),
            Err(_) => eprintln!(
                "cannot drop test database {}: the dropping thread panicked",
                self.name
            ),
        }
    }
}

pub fn t(s: &str) -> Timestamp {
    s.parse().expect("test instant")
}

pub fn contact() -> renewd::engine::ContactInput {
    renewd::engine::ContactInput {
        name: "Keiko Accounts".into(),
        phone: "+81 3-1234-5678".into(),
        email: "ap@example.co.jp".into(),
    }
}

pub fn days(n: i64) -> SignedDuration {
    SignedDuration::from_hours(24 * n)
}

impl TestApp {
    pub async fn spawn(start: &str) -> TestApp {
        Self::spawn_with(start, &[], |g| g).await
    }

    /// An app whose gateway is the sandbox wrapped by `wrap` (for fault
    /// injection), with extra config overrides.
    pub async fn spawn_with(
        start: &str,
        env: &[(&str, &str)],
        wrap: impl FnOnce(Arc<dyn PaymentGateway>) -> Arc<dyn PaymentGateway>,
    ) -> TestApp {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().to_string_lossy().to_string();
        let pg = match backend() {
            Backend::Sqlite => None,
            Backend::Postgres => Some(PgDatabase::create().await),
        };
        let database_url = match &pg {
            Some(db) => db.url.clone(),
            None => format!("sqlite://{state}/renewd.db"),
        };
        let mut vars: Vec<(String, String)> = vec![
            ("RENEWD__STATE_DIR".into(), state.clone()),
            ("RENEWD__DATABASE__URL".into(), database_url),
        ];
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let config = Arc::new(Config::load_with_env(None, vars).expect("test config"));
        let clock = Arc::new(MockClock::new(t(start)));
        let shared: SharedClock = clock.clone();
        let store: Arc<dyn Store> = match &pg {
            Some(db) => Arc::new(PgStore::open(&db.url, 8, "test:1").await.expect("store")),
            None => Arc::new(
                SqliteStore::open(&config.raw.database.url, 8)
                    .await
                    .expect("store"),
            ),
        };
        store.migrate().await.expect("migrate");
        let sandbox = Arc::new(
            SandboxGateway::open(
                &config.sandbox_ledger(),
                shared.clone(),
                std::time::Duration::from_millis(config.raw.gateway.sandbox.latency_ms),
            )
            .await
            .expect("sandbox"),
        );
        let gateway = wrap(sandbox.clone());
        let engine = Engine {
            store,
            gateway,
            transport: Arc::new(FileTransport::new(config.mail_dir())),
            clock: shared,
            config,
            instance: "test:1".into(),
        };
        TestApp {
            dir,
            clock,
            engine,
            sandbox,
            pg,
        }
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    pub fn set(&self, at: &str) {
        self.clock.set(t(at));
    }

    pub async fn sweep(&self) -> SweepSummary {
        self.engine.sweep().await.expect("sweep")
    }

    /// Advances the clock by `step` up to and including `until`, sweeping at
    /// every step, as the daemon would.
    pub async fn run_until(&self, until: &str, step: SignedDuration) -> Vec<SweepSummary> {
        let until = t(until);
        let mut out = vec![];
        while self.now() < until {
            let next = self.now().checked_add(step).unwrap().min(until);
            self.clock.set(next);
            out.push(self.sweep().await);
        }
        out
    }

    pub async fn customer(&self, tz: &str, locale: &str, country: &str, currency: &str) -> i64 {
        self.engine
            .add_customer(NewCustomerInput {
                name: "Test Customer".into(),
                email: "customer@example.com".into(),
                timezone: Some(tz.into()),
                locale: Some(locale.into()),
                country: Some(country.into()),
                currency: Some(currency.into()),
            })
            .await
            .expect("customer")
            .id
    }

    pub async fn purchase(&self, customer: i64, card: &str) -> Subscription {
        let r = self
            .engine
            .purchase(PurchaseInput {
                customer_id: customer,
                plan: None,
                accept_terms: Some(self.engine.config.raw.terms.current.clone()),
                card: card.into(),
                card_expiry: None,
            })
            .await
            .expect("purchase");
        r.subscription
    }

    pub async fn transfer_purchase(&self, customer: i64) -> renewd::engine::FlowResult {
        self.engine
            .purchase_by_transfer(customer, None, Some("2026-04"), &contact())
            .await
            .expect("transfer purchase")
    }

    pub async fn renew_by_card(
        &self,
        id: i64,
        card: &str,
    ) -> Result<renewd::engine::FlowResult, renewd::engine::EngineError> {
        self.engine
            .renew(renewd::engine::RenewInput {
                subscription_id: id,
                accept_terms: Some("2026-04".into()),
                card: Some(card.into()),
                ..Default::default()
            })
            .await
    }

    pub async fn events_of(&self, sub: i64) -> Vec<renewd::store::Event> {
        self.engine.store.events(Some(sub)).await.expect("events")
    }

    /// A Tokyo customer paying in JPY with a Visa card.
    pub async fn tokyo_subscription(&self) -> Subscription {
        let c = self.customer("Asia/Tokyo", "ja", "JP", "JPY").await;
        self.purchase(c, "pm_card_visa").await
    }

    pub async fn sub(&self, id: i64) -> Subscription {
        self.engine.subscription(id).await.expect("subscription")
    }

    pub async fn charges(&self) -> Vec<LedgerCharge> {
        self.sandbox.charges().await.expect("ledger")
    }

    pub async fn succeeded_charges(&self) -> Vec<LedgerCharge> {
        self.charges()
            .await
            .into_iter()
            .filter(|c| c.outcome == "succeeded")
            .collect()
    }

    pub async fn invoices(&self, sub: i64) -> Vec<Invoice> {
        self.engine
            .store
            .list_invoices(Some(sub))
            .await
            .expect("invoices")
    }

    pub async fn mails(&self, sub: i64) -> Vec<Mail> {
        self.engine
            .store
            .list_mail(&MailFilter {
                status: None,
                subscription_id: Some(sub),
            })
            .await
            .expect("mail")
    }

    pub async fn mails_of(&self, sub: i64, kind: MailKind) -> Vec<Mail> {
        self.mails(sub)
            .await
            .into_iter()
            .filter(|m| m.kind == kind)
            .collect()
    }

    /// Row counts of every table: a fingerprint of the whole database.
    pub async fn fingerprint(&self) -> Vec<(String, i64)> {
        if let Some(db) = &self.pg {
            return pg_fingerprint(&db.url).await;
        }
        let pool = sqlx::SqlitePool::connect(&self.engine.config.raw.database.url)
            .await
            .unwrap();
        let tables: Vec<String> =
            sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                .fetch_all(&pool)
                .await
                .unwrap();
        let mut out = vec![];
        for table in tables {
            let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM \"{table}\""))
                .fetch_one(&pool)
                .await
                .unwrap();
            out.push((table, n));
        }
        let updated: Option<i64> = sqlx::query_scalar("SELECT MAX(updated_at) FROM subscriptions")
            .fetch_one(&pool)
            .await
            .unwrap();
        out.push(("max(subscriptions.updated_at)".into(), updated.unwrap_or(0)));
        out
    }
}

/// `TestApp::fingerprint` on PostgreSQL: row counts of every table of the
/// test's database, and the latest subscription change in unix seconds.
async fn pg_fingerprint(url: &str) -> Vec<(String, i64)> {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename COLLATE \"C\"",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut out = vec![];
    for table in tables {
        let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM \"{table}\""))
            .fetch_one(&pool)
            .await
            .unwrap();
        out.push((table, n));
    }
    let updated: Option<i64> =
        sqlx::query_scalar("SELECT EXTRACT(EPOCH FROM MAX(updated_at))::bigint FROM subscriptions")
            .fetch_one(&pool)
            .await
            .unwrap();
    out.push(("max(subscriptions.updated_at)".into(), updated.unwrap_or(0)));
    pool.close().await;
    out
}

/// A gateway that passes the charge to the processor but then loses the
/// answer, as a timeout after the processor took the money would.
pub struct LosesAnswers {
    pub inner: Arc<dyn PaymentGateway>,
    pub remaining: std::sync::atomic::AtomicU32,
}

#[async_trait]
impl PaymentGateway for LosesAnswers {
    async fn charge(&self, req: &ChargeRequest) -> Result<Charge, GatewayError> {
        let result = self.inner.charge(req).await;
        let left = self.remaining.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.remaining
                .store(left - 1, std::sync::atomic::Ordering::SeqCst);
            return Err(GatewayError::Unknown(
                "timed out waiting for the processor".into(),
            ));
        }
        result
    }
    async fn lookup(&self, key: &str) -> Result<Lookup, GatewayError> {
        self.inner.lookup(key).await
    }
    async fn card_details(&self, pm: &str) -> Result<CardDetails, GatewayError> {
        self.inner.card_details(pm).await
    }
}

/// A gateway that fails before reaching the processor (connection refused)
/// a number of times: nothing is charged.
pub struct Unreachable {
    pub inner: Arc<dyn PaymentGateway>,
    pub remaining: std::sync::atomic::AtomicU32,
}

#[async_trait]
impl PaymentGateway for Unreachable {
    async fn charge(&self, req: &ChargeRequest) -> Result<Charge, GatewayError> {
        let left = self.remaining.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.remaining
                .store(left - 1, std::sync::atomic::Ordering::SeqCst);
            return Err(GatewayError::Unknown("connection refused".into()));
        }
        self.inner.charge(req).await
    }
    async fn lookup(&self, key: &str) -> Result<Lookup, GatewayError> {
        self.inner.lookup(key).await
    }
    async fn card_details(&self, pm: &str) -> Result<CardDetails, GatewayError> {
        self.inner.card_details(pm).await
    }
}

/// A gateway that counts its charges in flight and remembers the most seen
/// at once, holding each for a moment so that they overlap.
pub struct CountsInFlight {
    pub inner: Arc<dyn PaymentGateway>,
    pub now: std::sync::atomic::AtomicUsize,
    pub most: std::sync::atomic::AtomicUsize,
    /// When set, each call also counts the attempts written (their
    /// `charge.attempt` events) and not yet answered by this gateway.
    pub store: std::sync::Mutex<Option<Arc<dyn Store>>>,
    pub answered: std::sync::atomic::AtomicUsize,
    pub most_unanswered: std::sync::atomic::AtomicUsize,
}

impl CountsInFlight {
    pub fn new(inner: Arc<dyn PaymentGateway>) -> CountsInFlight {
        CountsInFlight {
            inner,
            now: std::sync::atomic::AtomicUsize::new(0),
            most: std::sync::atomic::AtomicUsize::new(0),
            store: std::sync::Mutex::new(None),
            answered: std::sync::atomic::AtomicUsize::new(0),
            most_unanswered: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl PaymentGateway for CountsInFlight {
    async fn charge(&self, req: &ChargeRequest) -> Result<Charge, GatewayError> {
        use std::sync::atomic::Ordering::SeqCst;
        let n = self.now.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(n, SeqCst);
        let store = self.store.lock().unwrap().clone();
        if let Some(store) = store {
            let written = store
                .events(None)
                .await
                .unwrap()
                .iter()
                .filter(|e| e.kind == "charge.attempt")
                .count();
            let unanswered = written.saturating_sub(self.answered.load(SeqCst));
            self.most_unanswered.fetch_max(unanswered, SeqCst);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let result = self.inner.charge(req).await;
        self.answered.fetch_add(1, SeqCst);
        self.now.fetch_sub(1, SeqCst);
        result
    }
    async fn lookup(&self, key: &str) -> Result<Lookup, GatewayError> {
        self.inner.lookup(key).await
    }
    async fn card_details(&self, pm: &str) -> Result<CardDetails, GatewayError> {
        self.inner.card_details(pm).await
    }
}
