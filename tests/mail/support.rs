//! The mail test harness: one app per test with its own temp directory
//! (database, sandbox ledger), a MockClock, the sandbox gateway and the
//! real SMTP transport pointed at a server on 127.0.0.1. Business time is
//! the mock clock's; only the SMTP exchange itself runs in real time.

use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use renewd::clock::{Clock, MockClock, SharedClock};
use renewd::config::Config;
use renewd::engine::{DeliveryStats, Engine, NewCustomerInput, PurchaseInput, SweepSummary};
use renewd::gateway::sandbox::SandboxGateway;
use renewd::mail::smtp::SmtpTransport;
use renewd::mail::MailKind;
use renewd::store::sqlite::SqliteStore;
use renewd::store::{Mail, MailFilter, Store, Subscription};

pub struct MailApp {
    pub dir: tempfile::TempDir,
    pub clock: Arc<MockClock>,
    pub engine: Engine,
}

pub fn t(s: &str) -> Timestamp {
    s.parse().expect("test instant")
}

pub fn days(n: i64) -> SignedDuration {
    SignedDuration::from_hours(24 * n)
}

impl MailApp {
    /// An app delivering over SMTP (no TLS) to 127.0.0.1:`smtp_port`.
    pub async fn spawn(start: &str, smtp_port: u16) -> MailApp {
        Self::spawn_with(start, smtp_port, &[]).await
    }

    pub async fn spawn_with(start: &str, smtp_port: u16, env: &[(&str, &str)]) -> MailApp {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().to_string_lossy().to_string();
        let mut vars: Vec<(String, String)> = vec![
            ("RENEWD__STATE_DIR".into(), state.clone()),
            (
                "RENEWD__DATABASE__URL".into(),
                format!("sqlite://{state}/renewd.db"),
            ),
            ("RENEWD__MAIL__TRANSPORT".into(), "smtp".into()),
            ("RENEWD__MAIL__SMTP__HOST".into(), "127.0.0.1".into()),
            ("RENEWD__MAIL__SMTP__PORT".into(), smtp_port.to_string()),
            ("RENEWD__MAIL__SMTP__TLS".into(), "none".into()),
            ("RENEWD__MAIL__SMTP__TIMEOUT".into(), "10s".into()),
        ];
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let config = Arc::new(Config::load_with_env(None, vars).expect("test config"));
        let clock = Arc::new(MockClock::new(t(start)));
        let shared: SharedClock = clock.clone();
        let store = SqliteStore::open(&config.raw.database.url, 8)
            .await
            .expect("store");
        store.migrate().await.expect("migrate");
        let sandbox = Arc::new(
            SandboxGateway::open(
                &config.sandbox_ledger(),
                shared.clone(),
                std::time::Duration::ZERO,
            )
            .await
            .expect("sandbox"),
        );
        let transport = SmtpTransport::new(&config.raw.mail.smtp).expect("smtp transport");
        let engine = Engine {
            store: Arc::new(store),
            gateway: sandbox,
            transport: Arc::new(transport),
            clock: shared,
            config,
            instance: "mail-test:1".into(),
        };
        MailApp { dir, clock, engine }
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    pub fn advance(&self, by: SignedDuration) {
        self.clock.set(self.now().checked_add(by).expect("time"));
    }

    pub async fn sweep(&self) -> SweepSummary {
        self.engine.sweep().await.expect("sweep")
    }

    pub async fn deliver(&self) -> DeliveryStats {
        self.engine.deliver_mail().await.expect("deliver mail")
    }

    /// Sweeps every `step` up to and including `until`, as the daemon would.
    pub async fn run_until(&self, until: &str, step: SignedDuration) {
        let until = t(until);
        while self.now() < until {
            let next = self.now().checked_add(step).expect("time").min(until);
            self.clock.set(next);
            self.sweep().await;
        }
    }

    pub async fn customer(
        &self,
        name: &str,
        email: &str,
        tz: &str,
        locale: &str,
        currency: &str,
    ) -> i64 {
        let country = if currency == "JPY" { "JP" } else { "US" };
        self.engine
            .add_customer(NewCustomerInput {
                name: name.into(),
                email: email.into(),
                timezone: Some(tz.into()),
                locale: Some(locale.into()),
                country: Some(country.into()),
                currency: Some(currency.into()),
            })
            .await
            .expect("customer")
            .id
    }

    pub async fn purchase(&self, customer: i64, card: &str, expiry: Option<&str>) -> Subscription {
        self.engine
            .purchase(PurchaseInput {
                customer_id: customer,
                plan: None,
                accept_terms: Some(self.engine.config.raw.terms.current.clone()),
                card: card.into(),
                card_expiry: expiry.map(str::to_string),
            })
            .await
            .expect("purchase")
            .subscription
    }

    pub async fn mails(&self) -> Vec<Mail> {
        self.engine
            .store
            .list_mail(&MailFilter::default())
            .await
            .expect("mail")
    }

    /// The one outbox row addressed to `recipient`.
    pub async fn mail_to(&self, recipient: &str) -> Mail {
        let mut rows: Vec<Mail> = self
            .mails()
            .await
            .into_iter()
            .filter(|m| m.recipient == recipient)
            .collect();
        assert_eq!(rows.len(), 1, "mail to {recipient}");
        rows.remove(0)
    }

    pub async fn mails_of(&self, kind: MailKind) -> Vec<Mail> {
        self.mails()
            .await
            .into_iter()
            .filter(|m| m.kind == kind)
            .collect()
    }
}
