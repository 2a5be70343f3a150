//! A cluster for one test: a fresh PostgreSQL database (dropped when the
//! test ends), a state directory with the sandbox gateway's ledger that
//! every instance shares, an in-process engine to seed data fast, and
//! `renewd` processes of the built binary to race on it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use renewd::clock::{MockClock, SharedClock};
use renewd::config::Config;
use renewd::engine::{Engine, NewCustomerInput, PurchaseInput};
use renewd::gateway::sandbox::SandboxGateway;
use renewd::mail::file::FileTransport;
use renewd::store::postgres::PgStore;
use renewd::store::Store;
use sqlx::{Connection, Executor, PgPool};

/// The server's maintenance database, where test databases are created.
fn admin_url() -> String {
    std::env::var("RENEWD_TEST_PG_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// A fresh database, dropped `WITH (FORCE)` when this guard is.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin: String,
}

impl TestDb {
    /// `None` (with a notice past the output capture) when PostgreSQL is
    /// unreachable and CI is not set; under CI an unreachable server fails
    /// the test instead of skipping it.
    pub async fn create() -> Option<TestDb> {
        let admin = admin_url();
        let connect = sqlx::PgConnection::connect(&admin);
        let mut conn = match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok(conn)) => conn,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer in 10s".into(),
                };
                if in_ci() {
                    panic!("CI is set and PostgreSQL at {admin} is unreachable ({why}): the multi-instance tests cannot run");
                }
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "multi-instance PostgreSQL tests NOT run: {admin} is unreachable ({why}); see README \"Tests\""
                );
                return None;
            }
        };
        let name = format!("renewd_test_{}", uuid::Uuid::new_v4().simple());
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create test database");
        let _ = conn.close().await;
        let mut url = url::Url::parse(&admin).expect("RENEWD_TEST_PG_URL is a URL");
        url.set_path(&format!("/{name}"));
        Some(TestDb {
            name,
            url: url.to_string(),
            admin,
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop runs inside the test's runtime, which cannot be blocked on.
        let dropped = std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .map_err(|e| e.to_string())?;
                conn.execute(sql.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = conn.close().await;
                Ok(())
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("cannot drop test database {}: {e}", self.name),
            Err(_) => eprintln!(
                "cannot drop test database {}: the thread panicked",
                self.name
            ),
        }
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// A connection pool of the test's own, to look at and disturb the database.
    pub pool: PgPool,
    pub db: TestDb,
}

/// A `renewd` process of the built binary.
pub struct Instance {
    pub name: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

pub struct Finished {
    pub name: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "{}: stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.name, self.stdout, self.stderr
            )
        })
    }

    pub fn assert_ok(&self) -> &Self {
        assert!(
            self.status.success(),
            "{} exited with {}:\nstdout:\n{}\nstderr:\n{}",
            self.name,
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

impl Instance {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no drain, no cleanup, leases left as they are.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
    }

    pub async fn wait(self) -> Finished {
        let Instance {
            name,
            mut child,
            stdout,
            stderr,
        } = self;
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("join")
            .expect("wait for renewd");
        Finished {
            name,
            status,
            stdout: std::fs::read_to_string(&stdout).unwrap_or_default(),
            stderr: std::fs::read_to_string(&stderr).unwrap_or_default(),
        }
    }
}

impl Cluster {
    /// `None` when PostgreSQL is unreachable outside CI (see [`TestDb::create`]).
    pub async fn start() -> Option<Cluster> {
        let db = TestDb::create().await?;
        let pool = PgPool::connect(&db.url)
            .await
            .expect("connect test database");
        Some(Cluster {
            dir: tempfile::tempdir().expect("tempdir"),
            pool,
            db,
        })
    }

    fn env(&self) -> Vec<(String, String)> {
        let state = self.dir.path().display().to_string();
        vec![
            ("RENEWD__DATABASE__URL".into(), self.db.url.clone()),
            ("RENEWD__STATE_DIR".into(), state.clone()),
            (
                "RENEWD__GATEWAY__SANDBOX__LEDGER".into(),
                format!("{state}/sandbox-ledger.db"),
            ),
            ("RENEWD__LOG__FORMAT".into(), "json".into()),
        ]
    }

    /// Creates `n` UTC customers, each buying a yearly card subscription at
    /// `at`, through the engine in this process (the sandbox ledger is the
    /// one the instances use). Returns the subscription ids.
    pub async fn seed(&self, n: usize, at: &str) -> Vec<i64> {
        let config = Arc::new(Config::load_with_env(None, self.env()).expect("config"));
        let clock: SharedClock = Arc::new(MockClock::new(at.parse().expect("instant")));
        let store = PgStore::open(&self.db.url, 16, "seed:0")
            .await
            .expect("store");
        store.migrate().await.expect("migrate");
        let sandbox = SandboxGateway::open(&config.sandbox_ledger(), clock.clone(), Duration::ZERO)
            .await
            .expect("sandbox");
        let engine = Engine {
            store: Arc::new(store),
            gateway: Arc::new(sandbox),
            transport: Arc::new(FileTransport::new(config.mail_dir())),
            clock,
            config: config.clone(),
            instance: "seed:0".into(),
        };
        let engine = &engine;
        let mut ids: Vec<i64> = stream::iter(0..n)
            .map(|i| async move {
                let customer = engine
                    .add_customer(NewCustomerInput {
                        name: format!("Customer {i}"),
                        email: format!("c{i}@example.com"),
                        timezone: Some("UTC".into()),
                        locale: Some("en".into()),
                        country: Some("US".into()),
                        currency: Some("USD".into()),
                    })
                    .await
                    .expect("customer");
                let bought = engine
                    .purchase(PurchaseInput {
                        customer_id: customer.id,
                        plan: None,
                        accept_terms: Some(engine.config.raw.terms.current.clone()),
                        card: "pm_card_visa".into(),
                        card_expiry: None,
                    })
                    .await
                    .expect("purchase");
                assert!(
                    bought.problem.is_none(),
                    "purchase refused: {:?}",
                    bought.problem
                );
                bought.subscription.id
            })
            .buffer_unordered(16)
            .collect()
            .await;
        ids.sort_unstable();
        // The order confirmations go out now, so the sweeps under test
        // deliver only what their renewals queue.
        engine
            .deliver_mail_at(at.parse().expect("instant"))
            .await
            .expect("deliver order confirmations");
        ids
    }

    /// Starts `renewd --now NOW ARGS...` with the cluster's config and `extra`
    /// overrides (e.g. `RENEWD__GATEWAY__SANDBOX__LATENCY_MS`).
    pub fn spawn(&self, name: &str, now: &str, extra: &[(&str, &str)], args: &[&str]) -> Instance {
        let stdout = self.dir.path().join(format!("{name}.out"));
        let stderr = self.dir.path().join(format!("{name}.err"));
        let child = Command::new(env!("CARGO_BIN_EXE_renewd"))
            .arg("--now")
            .arg(now)
            .args(args)
            .envs(self.env())
            .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start renewd");
        Instance {
            name: name.into(),
            child,
            stdout,
            stderr,
        }
    }

    /// Starts `count` sweeps at `now` at once and waits for all of them.
    pub async fn sweeps(
        &self,
        prefix: &str,
        count: usize,
        now: &str,
        extra: &[(&str, &str)],
    ) -> Vec<Finished> {
        let instances: Vec<Instance> = (0..count)
            .map(|i| self.spawn(&format!("{prefix}{i}"), now, extra, &["sweep", "--json"]))
            .collect();
        let mut out = Vec::new();
        for instance in instances {
            out.push(instance.wait().await);
        }
        out
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Every backend connected to the test's database but this one's.
    pub async fn terminate_all_backends(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT COUNT(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.db.name)
        .fetch_one(&self.pool)
        .await
        .expect("terminate backends")
    }

    /// The invariants after the renewal of `subs` for the period starting
    /// at `period_start`: one successful charge per period in the sandbox
    /// ledger, one paid invoice each, invoice numbers gap-free in every
    /// series, every subscription a term further, and every mail sent once.
    pub async fn assert_renewed_exactly_once(&self, subs: &[i64], period_start: &str) {
        // The ledger, read the way billing staff would.
        let ledger = self
            .spawn(
                "ledger",
                period_start,
                &[],
                &["sandbox", "charges", "--json"],
            )
            .wait()
            .await;
        ledger.assert_ok();
        let charges = ledger.json();
        let mut charged: HashMap<String, usize> = HashMap::new();
        for c in charges.as_array().expect("ledger array") {
            let key = c["idempotency_key"].as_str().expect("key");
            if c["outcome"] == "succeeded" && key.starts_with("renew:") {
                let (period, _attempt) = key.rsplit_once(":a").expect("renew:SUB:PERIOD:aN");
                *charged.entry(period.to_string()).or_default() += 1;
            }
        }
        for sub in subs {
            let period = format!("renew:{sub}:{period_start}");
            assert_eq!(
                charged.get(&period).copied().unwrap_or(0),
                1,
                "period {period} must be charged exactly once"
            );
        }
        assert_eq!(charged.len(), subs.len(), "no other period was charged");

        let invoices: Vec<(String, i64, i64, String)> = sqlx::query_as(
            "SELECT series, seq, subscription_id, status FROM invoices ORDER BY series, seq",
        )
        .fetch_all(&self.pool)
        .await
        .expect("invoices");
        let mut series: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for (s, seq, _, _) in &invoices {
            series.entry(s.clone()).or_default().push(*seq);
        }
        for (s, seqs) in &series {
            let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
            assert_eq!(
                seqs, &expected,
                "invoice numbers of {s} are gap-free from 1"
            );
        }
        let year = &period_start[..4];
        let mut per_sub: HashMap<i64, usize> = HashMap::new();
        for (s, _, sub, status) in &invoices {
            if s.ends_with(year) {
                assert_eq!(status, "paid");
                *per_sub.entry(*sub).or_default() += 1;
            }
        }
        for sub in subs {
            assert_eq!(
                per_sub.get(sub).copied(),
                Some(1),
                "one renewal invoice for subscription {sub}"
            );
        }

        let renewed = self
            .scalar("SELECT COUNT(*) FROM subscriptions WHERE status = 'active' AND term = 2")
            .await;
        assert_eq!(
            renewed,
            subs.len() as i64,
            "every subscription is in its second term"
        );
        let open = self
            .scalar("SELECT COUNT(*) FROM renewals WHERE status NOT IN ('succeeded')")
            .await;
        assert_eq!(open, 0, "no renewal is left open");
        let twice = self
            .scalar(
                "SELECT COUNT(*) FROM (SELECT renewal_id FROM payment_attempts WHERE status = 'succeeded' \
                 GROUP BY renewal_id HAVING COUNT(*) > 1) x",
            )
            .await;
        assert_eq!(twice, 0, "no renewal has two successful attempts");
        let sent_twice = self
            .scalar(
                "SELECT COUNT(*) FROM (SELECT detail->>'mail_id' FROM events WHERE kind = 'mail.sent' \
                 GROUP BY 1 HAVING COUNT(*) > 1) x",
            )
            .await;
        assert_eq!(sent_twice, 0, "no message was sent twice");
        let unsent = self
            .scalar("SELECT COUNT(*) FROM outbox WHERE status <> 'sent'")
            .await;
        assert_eq!(unsent, 0, "every message was sent");
    }
}
