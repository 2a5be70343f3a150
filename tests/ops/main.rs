//! Operations, end to end: the built `renewd` binary run the way systemd
//! runs it. Each test gets its own state directory, config file, notify
//! socket (standing in for systemd's `NOTIFY_SOCKET`) and loopback port.
//!
//! The daemon runs with `--now` fixed a day after the subscriptions'
//! first anniversary, so its catch-up sweep at start has renewals to do;
//! a slow sandbox gateway (`RENEWD__GATEWAY__SANDBOX__LATENCY_MS`) keeps
//! them in flight long enough to signal it in the middle.

mod config_errors;
mod health;
mod logs;
mod notify;
mod shutdown;
mod single_instance;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// When the test subscriptions are bought (UTC customers: each period ends
/// at 00:00 UTC on 1 March).
pub const T0: &str = "2025-03-01T00:00:00Z";
/// A day after the first anniversary: every subscription is due.
pub const T1: &str = "2026-03-02T00:00:00Z";
pub const FIRST_END: &str = "2026-03-01T00:00:00Z";
pub const SECOND_END: &str = "2027-03-01T00:00:00Z";

pub struct Env {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Env {
    /// A state directory and a config file holding `extra` (TOML tables).
    pub fn new(extra: &str) -> Env {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = dir.path().join("renewd.toml");
        let text = format!(
            "state_dir = \"{dir}\"\n\n[database]\nurl = \"sqlite://{dir}/renewd.db\"\n\n{extra}\n",
            dir = dir.path().display()
        );
        std::fs::write(&config, text).expect("write config");
        Env { dir, config }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> &Path {
        &self.config
    }

    pub fn db_path(&self) -> PathBuf {
        self.path().join("renewd.db")
    }

    /// The binary with this env's config and a clean environment.
    pub fn command(&self) -> Command {
        let mut cmd = self.bare_command();
        cmd.arg("--config").arg(&self.config);
        cmd
    }

    /// The binary with no config file, run in this env's directory, with
    /// nothing from the test runner's `RENEWD*`, systemd or logging variables.
    pub fn bare_command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_renewd"));
        for (key, _) in std::env::vars() {
            if key.starts_with("RENEWD") {
                cmd.env_remove(key);
            }
        }
        for key in [
            "RUST_LOG",
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "JOURNAL_STREAM",
            "CREDENTIALS_DIRECTORY",
        ] {
            cmd.env_remove(key);
        }
        cmd.current_dir(self.path());
        cmd
    }

    pub fn cli(&self, now: &str, args: &[&str]) -> Output {
        self.command()
            .args(["--now", now])
            .args(args)
            .output()
            .expect("run renewd")
    }

    pub fn json(&self, now: &str, args: &[&str]) -> Value {
        let out = self.cli(now, args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// `n` customers, each with a yearly subscription bought at `T0` by card.
    pub fn subscriptions(&self, n: usize) -> Vec<i64> {
        (0..n)
            .map(|i| {
                let email = format!("ops{i}@example.com");
                let customer = self.json(
                    T0,
                    &[
                        "customer", "add", "--name", "Ops Test", "--email", &email, "--json",
                    ],
                )["id"]
                    .as_i64()
                    .expect("customer id");
                self.json(
                    T0,
                    &[
                        "subscription",
                        "purchase",
                        "--customer",
                        &customer.to_string(),
                        "--accept-terms",
                        "2026-04",
                        "--card",
                        "pm_card_visa",
                        "--json",
                    ],
                )["id"]
                    .as_i64()
                    .expect("subscription id")
            })
            .collect()
    }

    /// Starts `renewd run` at `now` with a notify socket this test owns.
    pub fn spawn(&self, now: &str, vars: &[(&str, &str)]) -> Daemon {
        let socket = self.path().join(format!("notify-{}.sock", unique()));
        let receiver = UnixDatagram::bind(&socket).expect("bind notify socket");
        receiver
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("socket timeout");
        let notes: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let done = Arc::new(AtomicBool::new(false));
        {
            let notes = notes.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 8192];
                while !done.load(Ordering::SeqCst) {
                    if let Ok(n) = receiver.recv(&mut buf) {
                        let text = String::from_utf8_lossy(&buf[..n]).to_string();
                        notes.lock().unwrap().push((Instant::now(), text));
                    }
                }
            });
        }
        let log = self.path().join(format!("daemon-{}.log", unique()));
        let stderr = std::fs::File::create(&log).expect("log file");
        let mut cmd = self.command();
        cmd.args(["--now", now, "run"])
            .env("NOTIFY_SOCKET", &socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn renewd run");
        Daemon {
            child,
            notes,
            done,
            log,
            started: Instant::now(),
        }
    }

    /// One number from the daemon's database (read while it runs: WAL).
    pub fn query_i64(&self, sql: &str) -> i64 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let url = format!("sqlite://{}", self.db_path().display());
        rt.block_on(async {
            let pool = sqlx::SqlitePool::connect(&url).await.expect("open db");
            let n: i64 = sqlx::query_scalar(sql)
                .fetch_one(&pool)
                .await
                .expect("query");
            pool.close().await;
            n
        })
    }

    /// Checks the shutdown invariant at `now` and returns how many
    /// subscriptions were renewed: each is either renewed whole (a second
    /// succeeded charge and its paid invoice, period extended) or untouched
    /// (no renewal attempt at all), and no attempt is left without an outcome.
    pub fn assert_each_renewal_done_or_untouched(&self, now: &str, subs: &[i64]) -> usize {
        let charges = self.json(now, &["sandbox", "charges", "--json"]);
        let invoices = self.json(now, &["invoice", "list", "--json"]);
        let charges = charges.as_array().expect("charges array");
        let invoices = invoices.as_array().expect("invoices array");
        let mut renewed = 0;
        for id in subs {
            let sub = self.json(now, &["subscription", "show", &id.to_string(), "--json"]);
            let succeeded = charges
                .iter()
                .filter(|c| c["outcome"] == "succeeded")
                .filter(|c| {
                    c["idempotency_key"]
                        .as_str()
                        .and_then(|k| k.split(':').nth(1))
                        == Some(&id.to_string())
                })
                .count();
            let paid = invoices
                .iter()
                .filter(|i| i["subscription_id"] == *id && i["status"] == "paid")
                .count();
            let attempts = self.query_i64(&format!(
                "SELECT COUNT(*) FROM payment_attempts a JOIN renewals r ON r.id = a.renewal_id \
                 WHERE r.subscription_id = {id} AND r.kind = 'auto'"
            ));
            assert_eq!(
                succeeded, paid,
                "subscription {id}: every succeeded charge has exactly one paid invoice"
            );
            match sub["current_period_end"].as_str() {
                Some(SECOND_END) => {
                    assert_eq!(succeeded, 2, "subscription {id}: renewed once");
                    renewed += 1;
                }
                Some(FIRST_END) => {
                    assert_eq!(succeeded, 1, "subscription {id}: untouched");
                    assert_eq!(attempts, 0, "subscription {id}: no renewal attempt");
                }
                other => panic!("subscription {id}: unexpected period end {other:?}"),
            }
        }
        let open = self.query_i64(
            "SELECT COUNT(*) FROM payment_attempts WHERE status IN ('pending', 'unknown')",
        );
        assert_eq!(open, 0, "no attempt is left without an outcome");
        renewed
    }

    /// Waits until the daemon has committed a renewal attempt, i.e. a
    /// gateway call is in flight.
    pub fn wait_for_a_charge_in_flight(&self, daemon: &Daemon) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.db_path().exists()
                && self.query_i64(
                    "SELECT COUNT(*) FROM payment_attempts a JOIN renewals r ON r.id = a.renewal_id \
                     WHERE r.kind = 'auto' AND a.status = 'pending'",
                ) > 0
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no charge in flight after 30s; log:\n{}", daemon.log());
    }
}

pub struct Daemon {
    child: Child,
    notes: Arc<Mutex<Vec<(Instant, String)>>>,
    done: Arc<AtomicBool>,
    log: PathBuf,
    pub started: Instant,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every datagram received on the notify socket, with when.
    pub fn notes(&self) -> Vec<(Instant, String)> {
        self.notes.lock().unwrap().clone()
    }

    /// Waits for a notification containing `needle`; returns its time.
    pub fn wait_note(&self, needle: &str, timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((at, _)) = self.notes().into_iter().find(|(_, n)| n.contains(needle)) {
                return at;
            }
            if Instant::now() > deadline {
                panic!(
                    "no {needle:?} notification within {timeout:?}; got {:?}; log:\n{}",
                    self.notes(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: i32) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "renewd still running after {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::SeqCst)
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A plain HTTP/1.1 GET: (status, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
