//! Settings: the built-in defaults, an optional file, then environment
//! variables (`RENEWD__SECTION__KEY`), validated into the types the engine
//! uses. Unknown keys are refused, and every problem names its key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use jiff::civil::Time;
use jiff::SignedDuration;
use serde::{Deserialize, Serialize};

use crate::domain::values::{Country, Locale, Zone};
use crate::domain::Currency;

mod diagnostics;
use diagnostics::{
    check_http_listen, environment_problems, explain_load_error, one_line, unknown_keys, Origins,
};
pub use diagnostics::{credential_path, read_secret_file};

/// The defaults compiled into the binary (the file `config/default.toml`).
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{source_name}: {message}")]
    Load {
        source_name: String,
        message: String,
    },
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub state_dir: PathBuf,
    pub default_plan: String,
    pub database: DatabaseSettings,
    pub schedule: ScheduleSettings,
    pub renewal: RenewalSettings,
    pub dunning: DunningSettings,
    pub bank_transfer: BankTransferSettings,
    pub gateway: GatewaySettings,
    pub mail: MailSettings,
    pub invoice: InvoiceSettings,
    pub seller: SellerSettings,
    pub terms: TermsSettings,
    pub plans: BTreeMap<String, PlanSettings>,
    pub tax: TaxSettings,
    pub customer_defaults: CustomerDefaults,
    pub http: HttpSettings,
    pub shutdown: ShutdownSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: String,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSettings {
    pub sweep: String,
    pub mail: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RenewalSettings {
    pub local_time: String,
    pub reminder_offsets_days: Vec<u32>,
    pub upcoming_notice_days: u32,
    pub lease: String,
    pub batch_size: u32,
    pub concurrency: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DunningSettings {
    pub retry_days: Vec<u32>,
    pub grace_days: u32,
    pub reconcile_backoff: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BankTransferSettings {
    pub lead_days: u32,
    pub due_days: u32,
    pub grace_days: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GatewayKind {
    Sandbox,
    Stripe,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    pub kind: GatewayKind,
    pub timeout: String,
    pub sandbox: SandboxSettings,
    pub stripe: StripeSettings,
}

/// The Stripe gateway's settings. The key is a secret: `Debug` hides it and
/// `check-config` shows it as `***`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StripeSettings {
    /// A secret (`sk_...`) or restricted (`rk_...`) key; empty when the key
    /// comes from `api_key_file`.
    #[serde(serialize_with = "serialize_secret")]
    pub api_key: secrecy::SecretString,
    /// A file holding the key (e.g. a systemd credential); empty means none.
    pub api_key_file: String,
    pub base_url: String,
    /// The longest one HTTP request to Stripe may take.
    pub request_timeout: String,
}

impl StripeSettings {
    /// The API key, from `api_key` or read from `api_key_file`. The error
    /// names the setting and never shows the secret.
    pub fn resolve_api_key(&self) -> Result<secrecy::SecretString, String> {
        use secrecy::ExposeSecret;
        let inline = self.api_key.expose_secret().trim();
        let key = match (inline.is_empty(), self.api_key_file.is_empty()) {
            (false, false) => {
                return Err("gateway.stripe.api_key and gateway.stripe.api_key_file are both set; keep one".into())
            }
            (true, true) => {
                return Err("gateway.stripe.api_key is empty and gateway.stripe.api_key_file is not set; give the Stripe secret key in one of them (or RENEWD__GATEWAY__STRIPE__API_KEY)".into())
            }
            (false, true) => inline.to_string(),
            (true, false) => read_secret_file("gateway.stripe.api_key_file", &self.api_key_file)?
                .expose_secret()
                .to_string(),
        };
        if !(key.starts_with("sk_") || key.starts_with("rk_")) || key.contains(char::is_whitespace)
        {
            return Err("gateway.stripe.api_key: not a Stripe secret key; it starts with sk_ or rk_ (a publishable pk_ key cannot charge)".into());
        }
        Ok(key.into())
    }
}

/// Writes a secret as `***` (or empty when unset), for `check-config`.
fn serialize_secret<S: serde::Serializer>(
    secret: &secrecy::SecretString,
    s: S,
) -> Result<S::Ok, S::Error> {
    use secrecy::ExposeSecret;
    s.serialize_str(if secret.expose_secret().is_empty() {
        ""
    } else {
        "***"
    })
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSettings {
    pub latency_ms: u64,
    pub ledger: String,
    /// Fault injection: every n-th charge request is taken, then answered
    /// with a timeout (0: off).
    pub timeout_after_charge_every: u64,
    /// Every n-th charge request fails with a 500 before charging (0: off).
    pub fail_5xx_every: u64,
    /// Every n-th new charge is declined (soft, processing_error) (0: off).
    pub decline_every: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MailTransportKind {
    File,
    Smtp,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MailSettings {
    pub transport: MailTransportKind,
    pub from: String,
    pub max_attempts: u32,
    /// Operator overrides of the mail templates; empty means built-in only.
    pub templates_dir: String,
    pub smtp: SmtpSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain text, for a relay on localhost only.
    None,
    /// Connect in plain text, then upgrade; refuse a server that cannot.
    Starttls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Implicit,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    /// Empty means no authentication.
    pub username: String,
    /// Empty when the password comes from `password_file`.
    #[serde(serialize_with = "serialize_secret")]
    pub password: secrecy::SecretString,
    /// A file holding the password (e.g. a systemd credential); empty means none.
    pub password_file: String,
    /// Extra PEM root certificates to trust, for a relay with a private CA.
    pub ca_file: String,
    /// Connections kept open to the relay, and messages sent at once.
    pub pool_size: u32,
    /// The longest one message may take, connecting included.
    pub timeout: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InvoiceSettings {
    pub prefix: String,
    pub digits: u8,
    pub timezone: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SellerSettings {
    pub name: String,
    pub address: Vec<String>,
    pub email: String,
    pub tax_id: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TermsSettings {
    pub current: String,
    pub versions: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSettings {
    pub name: String,
    pub prices: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaxSettings {
    pub default_rate_bp: u32,
    pub rates_bp: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerDefaults {
    pub timezone: String,
    pub locale: String,
    pub country: String,
    pub currency: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    /// How long in-flight renewals may take to finish after SIGTERM.
    pub timeout: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

/// Settings checked and turned into the types the engine works with.
#[derive(Debug, Clone)]
pub struct Config {
    pub raw: Settings,
    pub local_time: Time,
    pub lease: SignedDuration,
    pub gateway_timeout: SignedDuration,
    pub reconcile_backoff: Vec<SignedDuration>,
    pub invoice_zone: Zone,
    pub default_zone: Zone,
    pub default_locale: Locale,
    pub default_country: Country,
    pub default_currency: Currency,
}

impl Config {
    /// Loads the defaults, then `file` if given, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        use config::{Environment, File, FileFormat};
        let mut builder =
            config::Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        let source_name = match file {
            Some(path) => {
                if !path.is_file() {
                    return Err(ConfigError::Load {
                        source_name: path.display().to_string(),
                        message: "config file not found; pass an existing TOML file with --config"
                            .into(),
                    });
                }
                builder =
                    builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
                path.display().to_string()
            }
            None => "built-in defaults".to_string(),
        };
        let env_map: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("RENEWD__"))
            .collect();
        let env_names: Vec<String> = env_map.keys().cloned().collect();
        builder = builder.add_source(
            Environment::with_prefix("RENEWD")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("renewal.reminder_offsets_days")
                .with_list_parse_key("dunning.retry_days")
                .with_list_parse_key("dunning.reconcile_backoff")
                .with_list_parse_key("terms.versions")
                .with_list_parse_key("seller.address")
                .try_parsing(true)
                .source(Some(env_map)),
        );
        let describe = if env_names.is_empty() {
            source_name.clone()
        } else {
            format!("{source_name} + environment ({})", env_names.join(", "))
        };
        let merged = builder.build().map_err(|e| ConfigError::Load {
            source_name: describe.clone(),
            message: one_line(&e.to_string()),
        })?;
        // Every problem line names where its key was set: the variable, the
        // file, or the built-in defaults.
        let origins = Origins::new(file, &env_names, &describe);
        let unknown = unknown_keys(&merged);
        if !unknown.is_empty() {
            return Err(ConfigError::Invalid(
                unknown
                    .iter()
                    .map(|p| format!("{}: {p}", origins.of_problem(p)))
                    .collect(),
            ));
        }
        let raw: Settings = merged.try_deserialize().map_err(|e| {
            let problem = explain_load_error(&e.to_string());
            ConfigError::Invalid(vec![format!("{}: {problem}", origins.of_problem(&problem))])
        })?;
        let mut problems = environment_problems(&raw);
        let result = Config::validate(raw);
        let problems = match result {
            Ok(config) if problems.is_empty() => return Ok(config),
            Ok(_) => problems,
            Err(mut p) => {
                p.append(&mut problems);
                p
            }
        };
        Err(ConfigError::Invalid(
            problems
                .into_iter()
                .map(|p| format!("{}: {p}", origins.of_problem(&p)))
                .collect(),
        ))
    }

    /// How long in-flight work may take to finish after SIGTERM.
    pub fn shutdown_timeout(&self) -> std::time::Duration {
        self.raw
            .shutdown
            .timeout
            .parse::<SignedDuration>()
            .map(|d| d.unsigned_abs())
            .unwrap_or(std::time::Duration::from_secs(60))
    }

    /// The health and metrics address, when `http.listen` is set.
    pub fn http_listen(&self) -> Option<std::net::SocketAddr> {
        self.raw.http.listen.parse().ok()
    }

    /// Checks every key that has rules beyond its type; returns one message
    /// per problem, each naming the key and what is allowed.
    pub fn validate(raw: Settings) -> Result<Config, Vec<String>> {
        let mut problems = Vec::new();
        let local_time = parse_local_time(&raw.renewal.local_time).unwrap_or_else(|| {
            problems.push(format!(
                "renewal.local_time = {:?} is not a time of day; use HH:MM, e.g. \"00:00\"",
                raw.renewal.local_time
            ));
            Time::midnight()
        });
        let lease = parse_duration("renewal.lease", &raw.renewal.lease, &mut problems);
        let gateway_timeout =
            parse_duration("gateway.timeout", &raw.gateway.timeout, &mut problems);
        if lease < SignedDuration::from_secs(10) {
            problems.push(format!(
                "renewal.lease = {:?} is too short; use at least \"10s\"",
                raw.renewal.lease
            ));
        }
        if gateway_timeout >= lease {
            problems.push(format!(
                "gateway.timeout = {:?} must be shorter than renewal.lease = {:?}, or a claim could expire during a charge",
                raw.gateway.timeout, raw.renewal.lease
            ));
        }
        let reconcile_backoff: Vec<SignedDuration> = raw
            .dunning
            .reconcile_backoff
            .iter()
            .map(|s| parse_duration("dunning.reconcile_backoff", s, &mut problems))
            .collect();
        if reconcile_backoff.is_empty() {
            problems.push(
                "dunning.reconcile_backoff is empty; give at least one wait, e.g. [\"1m\"]".into(),
            );
        }
        if raw
            .renewal
            .reminder_offsets_days
            .iter()
            .any(|&d| d == 0 || d > 366)
        {
            problems.push("renewal.reminder_offsets_days: each offset must be 1..=366 days".into());
        }
        if raw.renewal.upcoming_notice_days == 0 || raw.renewal.upcoming_notice_days > 366 {
            problems.push("renewal.upcoming_notice_days must be 1..=366".into());
        }
        if raw.bank_transfer.lead_days == 0 || raw.bank_transfer.lead_days > 180 {
            problems.push("bank_transfer.lead_days must be 1..=180".into());
        }
        if raw.bank_transfer.due_days == 0 || raw.bank_transfer.due_days > 180 {
            problems.push("bank_transfer.due_days must be 1..=180".into());
        }
        if raw.renewal.batch_size == 0 {
            problems.push("renewal.batch_size must be at least 1".into());
        }
        if raw.renewal.concurrency == 0 {
            problems.push("renewal.concurrency must be at least 1".into());
        }
        if raw.dunning.retry_days.windows(2).any(|w| w[0] >= w[1])
            || raw.dunning.retry_days.contains(&0)
        {
            problems.push("dunning.retry_days must be strictly increasing days after the first attempt, e.g. [1, 3, 5, 7]".into());
        }
        if raw.database.max_connections == 0 {
            problems.push("database.max_connections must be at least 1".into());
        }
        if !(raw.database.url.starts_with("sqlite:")
            || raw.database.url.starts_with("postgres://")
            || raw.database.url.starts_with("postgresql://"))
        {
            problems.push(format!(
                "database.url = {:?}: use sqlite://PATH or postgres://USER@HOST/DB",
                redact_url(&raw.database.url)
            ));
        }
        for (key, expr) in [
            ("schedule.sweep", &raw.schedule.sweep),
            ("schedule.mail", &raw.schedule.mail),
        ] {
            if let Err(e) = check_cron(expr) {
                problems.push(format!(
                    "{key} = {expr:?} is not a cron expression ({e}); use six fields: sec min hour day month weekday, e.g. \"0 * * * * *\""
                ));
            }
        }
        let zone = |key: &str, name: &str| {
            Zone::parse(name).map_err(|_| {
                format!("{key} = {name:?} is not an IANA time zone; use a name such as UTC or Asia/Tokyo")
            })
        };
        let invoice_zone = zone("invoice.timezone", &raw.invoice.timezone);
        let default_zone = zone(
            "customer_defaults.timezone",
            &raw.customer_defaults.timezone,
        );
        let default_locale = Locale::parse(&raw.customer_defaults.locale)
            .map_err(|e| format!("customer_defaults.locale: {e}"));
        let default_country = Country::parse(&raw.customer_defaults.country)
            .map_err(|e| format!("customer_defaults.country: {e}"));
        let default_currency = Currency::parse(&raw.customer_defaults.currency)
            .map_err(|e| format!("customer_defaults.currency: {e}"));
        if raw.invoice.prefix.is_empty()
            || !raw
                .invoice
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric())
        {
            problems.push("invoice.prefix must be letters and digits, e.g. \"INV\"".into());
        }
        if !(4..=12).contains(&raw.invoice.digits) {
            problems.push("invoice.digits must be 4..=12".into());
        }
        if !raw.terms.versions.contains(&raw.terms.current) {
            problems.push(format!(
                "terms.current = {:?} is not listed in terms.versions; add it there",
                raw.terms.current
            ));
        }
        if raw.plans.is_empty() {
            problems.push("plans: define at least one plan, e.g. [plans.action-pack]".into());
        }
        if !raw.plans.contains_key(&raw.default_plan) {
            problems.push(format!(
                "default_plan = {:?} is not one of [plans]",
                raw.default_plan
            ));
        }
        for (id, plan) in &raw.plans {
            if plan.prices.is_empty() {
                problems.push(format!("plans.{id}.prices: give at least one price"));
            }
            for (code, amount) in &plan.prices {
                if let Err(e) = Currency::parse(code) {
                    problems.push(format!("plans.{id}.prices.{code}: {e}"));
                }
                if *amount <= 0 {
                    problems.push(format!(
                        "plans.{id}.prices.{code} must be a positive amount in minor units"
                    ));
                }
            }
        }
        for (country, bp) in &raw.tax.rates_bp {
            if Country::parse(country).is_err() {
                problems.push(format!(
                    "tax.rates_bp.{country}: not a two-letter country code"
                ));
            }
            if *bp > 10_000 {
                problems.push(format!(
                    "tax.rates_bp.{country} = {bp}: a rate is 0..=10000 basis points"
                ));
            }
        }
        if raw.tax.default_rate_bp > 10_000 {
            problems.push("tax.default_rate_bp: a rate is 0..=10000 basis points".into());
        }
        if raw.mail.transport == MailTransportKind::Smtp && raw.mail.smtp.host.is_empty() {
            problems.push(
                "mail.smtp.host is empty but mail.transport = \"smtp\"; set the relay host".into(),
            );
        }
        if raw.mail.transport == MailTransportKind::Smtp {
            problems.extend(crate::mail::smtp::check_settings(&raw.mail.smtp));
        }
        if !raw.mail.templates_dir.is_empty() {
            if let Err(e) =
                crate::mail::templates::for_dir(Some(Path::new(&raw.mail.templates_dir)))
            {
                problems.push(format!("mail.templates_dir: {e}"));
            }
        }
        if raw.gateway.kind == GatewayKind::Stripe {
            let stripe = &raw.gateway.stripe;
            if let Err(e) = stripe.resolve_api_key() {
                problems.push(e);
            }
            if !(stripe.base_url.starts_with("https://") || stripe.base_url.starts_with("http://"))
            {
                problems.push(format!(
                    "gateway.stripe.base_url = {:?} is not an http(s) URL; use \"https://api.stripe.com\"",
                    stripe.base_url
                ));
            }
            let request_timeout = parse_duration(
                "gateway.stripe.request_timeout",
                &stripe.request_timeout,
                &mut problems,
            );
            // A "no such key" from Stripe's search is only final once the
            // charge could have been made and indexed (see gateway::stripe).
            let needed = request_timeout
                .saturating_mul(2)
                .saturating_add(crate::gateway::stripe::SEARCH_LAG);
            if gateway_timeout < needed {
                problems.push(format!(
                    "gateway.timeout = {:?} is too short for gateway.kind = \"stripe\": it must cover two requests of gateway.stripe.request_timeout = {:?} plus {:#} for Stripe's search index to catch up; use at least {:#}",
                    raw.gateway.timeout,
                    stripe.request_timeout,
                    crate::gateway::stripe::SEARCH_LAG,
                    needed
                ));
            }
        }
        if raw.mail.max_attempts == 0 {
            problems.push("mail.max_attempts must be at least 1".into());
        }
        if crate::mail::parse_mailbox(&raw.mail.from).is_none() {
            problems.push(format!(
                "mail.from = {:?} is not a mailbox; use \"Name <address@example.com>\"",
                raw.mail.from
            ));
        }
        if let Some(problem) = check_http_listen(&raw.http.listen) {
            problems.push(problem);
        }
        let shutdown = parse_duration("shutdown.timeout", &raw.shutdown.timeout, &mut problems);
        if shutdown > SignedDuration::from_mins(10) {
            problems.push(format!(
                "shutdown.timeout = {:?} is too long; use at most \"10m\" and keep it below the unit's TimeoutStopSec",
                raw.shutdown.timeout
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&raw.log.level) {
            problems.push(format!("log.level = {:?}: {e}", raw.log.level));
        }
        let invoice_zone = take(invoice_zone, &mut problems);
        let default_zone = take(default_zone, &mut problems);
        let default_locale = take(default_locale, &mut problems);
        let default_country = take(default_country, &mut problems);
        let default_currency = take(default_currency, &mut problems);
        match (
            invoice_zone,
            default_zone,
            default_locale,
            default_country,
            default_currency,
        ) {
            (
                Some(invoice_zone),
                Some(default_zone),
                Some(default_locale),
                Some(default_country),
                Some(default_currency),
            ) if problems.is_empty() => Ok(Config {
                raw,
                local_time,
                lease,
                gateway_timeout,
                reconcile_backoff,
                invoice_zone,
                default_zone,
                default_locale,
                default_country,
                default_currency,
            }),
            _ => Err(problems),
        }
    }

    pub fn state_dir(&self) -> &Path {
        &self.raw.state_dir
    }

    pub fn mail_dir(&self) -> PathBuf {
        self.raw.state_dir.join("mail")
    }

    pub fn invoice_dir(&self) -> PathBuf {
        self.raw.state_dir.join("invoices")
    }

    pub fn sandbox_ledger(&self) -> PathBuf {
        if self.raw.gateway.sandbox.ledger.is_empty() {
            self.raw.state_dir.join("sandbox-ledger.db")
        } else {
            PathBuf::from(&self.raw.gateway.sandbox.ledger)
        }
    }

    /// The price of `plan` in `currency`, if the plan is sold in it.
    pub fn price(&self, plan: &str, currency: Currency) -> Option<i64> {
        self.raw
            .plans
            .get(plan)?
            .prices
            .get(currency.code())
            .copied()
    }

    pub fn tax_rate_bp(&self, country: &str) -> u32 {
        self.raw
            .tax
            .rates_bp
            .get(country)
            .copied()
            .unwrap_or(self.raw.tax.default_rate_bp)
    }

    /// Every currency some plan is sold in.
    pub fn sold_currencies(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .raw
            .plans
            .values()
            .flat_map(|p| p.prices.keys().cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// The effective settings as JSON with secrets redacted, for `check-config`.
    pub fn effective_json(&self) -> serde_json::Value {
        let mut raw = self.raw.clone();
        raw.database.url = redact_url(&raw.database.url);
        serde_json::to_value(&raw).unwrap_or_default()
    }
}

/// Hides a password in a database URL: `postgres://u:***@host/db`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let creds = &url[scheme_end + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..scheme_end + 3], user, &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

fn take<T>(r: Result<T, String>, problems: &mut Vec<String>) -> Option<T> {
    r.map_err(|e| problems.push(e)).ok()
}

fn parse_local_time(s: &str) -> Option<Time> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    Time::new(h.parse().ok()?, m.parse().ok()?, 0, 0).ok()
}

fn parse_duration(key: &str, s: &str, problems: &mut Vec<String>) -> SignedDuration {
    match s.parse::<SignedDuration>() {
        Ok(d) if d.is_positive() => d,
        _ => {
            problems.push(format!(
                "{key} = {s:?} is not a positive duration; use e.g. \"30s\", \"5m\", \"2h\""
            ));
            SignedDuration::from_secs(60)
        }
    }
}

/// Validates a cron expression the way the scheduler will parse it.
pub fn check_cron(expr: &str) -> Result<(), String> {
    tokio_cron_scheduler::Job::new_async(expr, |_, _| Box::pin(async {}))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_env(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load_with_env(
            None,
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn the_built_in_defaults_are_valid() {
        let c = load_env(&[]).unwrap();
        assert_eq!(c.raw.database.url, "sqlite://var/renewd.db");
        assert_eq!(c.raw.renewal.reminder_offsets_days, vec![30, 7, 1]);
        assert_eq!(c.lease, SignedDuration::from_mins(5));
    }

    #[test]
    fn environment_variables_override_keys() {
        let c = load_env(&[
            ("RENEWD__DATABASE__URL", "sqlite:///tmp/x.db"),
            ("RENEWD__RENEWAL__REMINDER_OFFSETS_DAYS", "14,2"),
            ("RENEWD__GATEWAY__SANDBOX__LATENCY_MS", "50"),
        ])
        .unwrap();
        assert_eq!(c.raw.database.url, "sqlite:///tmp/x.db");
        assert_eq!(c.raw.renewal.reminder_offsets_days, vec![14, 2]);
        assert_eq!(c.raw.gateway.sandbox.latency_ms, 50);
    }

    #[test]
    fn an_unknown_key_is_refused_by_name() {
        let err = load_env(&[("RENEWD__RENEWAL__TYPO_KEY", "1")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("typo_key"), "{err}");
        assert!(err.contains("RENEWD__RENEWAL__TYPO_KEY"), "{err}");
    }

    #[test]
    fn a_bad_cron_expression_names_its_key() {
        let err = load_env(&[("RENEWD__SCHEDULE__SWEEP", "every minute")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("schedule.sweep"), "{err}");
    }

    #[test]
    fn a_bad_zone_and_a_bad_duration_are_both_reported() {
        let err = load_env(&[
            ("RENEWD__INVOICE__TIMEZONE", "Mars/Base"),
            ("RENEWD__RENEWAL__LEASE", "soon"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("invoice.timezone"), "{err}");
        assert!(err.contains("renewal.lease"), "{err}");
    }

    #[test]
    fn a_gateway_timeout_not_shorter_than_the_lease_is_refused() {
        let err = load_env(&[("RENEWD__GATEWAY__TIMEOUT", "10m")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gateway.timeout") && err.contains("renewal.lease"),
            "{err}"
        );
        let err = load_env(&[("RENEWD__RENEWAL__LEASE", "500ms")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("too short"), "{err}");
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("sqlite://var/x.db"), "sqlite://var/x.db");
    }
}
