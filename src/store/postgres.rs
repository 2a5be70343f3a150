//! The PostgreSQL store: the engine for more than one instance. Several
//! daemons against one database share the work by claiming rows with
//! `FOR UPDATE SKIP LOCKED` in one `UPDATE ... RETURNING` and a lease (token
//! and expiry on the renewd `Clock`) that another instance takes over once
//! it has expired. It behaves like the SQLite store in every respect; where
//! SQLite's single writer (`BEGIN IMMEDIATE`) made a read-then-write safe,
//! this store takes a row lock instead (`SELECT ... FOR UPDATE` on the
//! renewal in every lease check, on the counter row of an invoice series in
//! the paying transaction), under PostgreSQL's default READ COMMITTED.
//!
//! Connection loss: a statement that fails because the connection dropped
//! or the server is restarting (or a deadlock victim) rolls its transaction
//! back on the server, so the whole transaction is run again after a
//! backoff, for about a minute. A failed COMMIT has an unknown outcome: it
//! is retried only where running the transaction twice is harmless (see
//! `transaction!`); elsewhere (an attempt, a payment) it surfaces as an
//! error, the engine leaves the renewal's lease to expire, and whoever takes
//! it next resumes from the last recovery point that really committed.
//!
//! Business time never comes from the server: `now` is bound as a
//! parameter, never `NOW()`.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use jiff::civil::Date;
use jiff::Timestamp;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder, Row};

use super::*;
use crate::domain::AutoRenew;

/// Migrations compiled into the binary, applied in order.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "renewable_index",
        include_str!("../../migrations/postgres/0002_renewable_index.sql"),
    ),
    (
        3,
        "reminder_index",
        include_str!("../../migrations/postgres/0003_reminder_index.sql"),
    ),
    (
        4,
        "notice_marker",
        include_str!("../../migrations/postgres/0004_notice_marker.sql"),
    ),
];

/// The advisory lock that serializes `migrate()` of instances starting
/// together ("renewd" in ASCII).
const MIGRATE_LOCK: i64 = 0x72656e657764;

/// Waits between tries of an operation that met a transient failure: they
/// double from the first up to the longest, for as long as `RETRY_FOR`.
const RETRY_FIRST_WAIT: Duration = Duration::from_millis(100);
const RETRY_LONGEST_WAIT: Duration = Duration::from_secs(5);
const RETRY_FOR: Duration = Duration::from_secs(60);

/// The statuses of a renewal still to be worked on. Written out in the SQL
/// (not bound) wherever `renewals_due` should serve the query, so the
/// planner can match the partial index's predicate.
const OPEN_RENEWAL: &str = "('pending', 'retrying', 'action_required', 'awaiting_transfer')";

pub struct PgStore {
    pool: PgPool,
    /// `host:pid` of this process, for log lines.
    instance: String,
    /// Set by [`Store::stop_claiming`]: claims find nothing from then on.
    draining: AtomicBool,
}

/// What a transaction body decided.
enum Finish<T> {
    Commit(T),
    /// Write nothing, answer `T` (e.g. a reminder that was already queued).
    Rollback(T),
}

/// What `open_manual_renewal` found, before the renewal is read back.
enum Manual {
    AlreadyPaid,
    AwaitingTransfer,
    Busy,
    Claimed(i64),
}

/// Pins the output type of a transaction body, so `?` inside it knows its
/// error type.
fn body<T, F: std::future::Future<Output = StoreResult<Finish<T>>>>(f: F) -> F {
    f
}

fn read<T, F: std::future::Future<Output = StoreResult<T>>>(f: F) -> F {
    f
}

/// Runs `$body` (an async block using `$tx: &mut PgConnection`) in one
/// READ COMMITTED transaction, again from the start after a transient
/// failure before COMMIT (see the module comment).
///
/// A failed COMMIT is retried only for operations marked `idempotent`:
/// running them again after a commit that did land is harmless (an
/// insert-or-ignore, a claim whose rows just wait for their lease to
/// expire, a token-guarded write that then finds its token gone).
macro_rules! transaction {
    ($store:expr, $op:expr, |$tx:ident| $body:expr) => {
        transaction!(@run $store, $op, false, |$tx| $body)
    };
    ($store:expr, $op:expr, idempotent, |$tx:ident| $body:expr) => {
        transaction!(@run $store, $op, true, |$tx| $body)
    };
    (@run $store:expr, $op:expr, $idempotent:expr, |$tx:ident| $body:expr) => {{
        let mut retry = Retry::new($op, &$store.instance);
        loop {
            let mut txn = match $store.pool.begin().await {
                Ok(txn) => txn,
                Err(e) => {
                    let e = StoreError::from(e);
                    if retry.again(&e).await {
                        continue;
                    }
                    break Err(e);
                }
            };
            let out = {
                let $tx: &mut PgConnection = &mut txn;
                body($body).await
            };
            match out {
                Ok(Finish::Commit(v)) => {
                    break match txn.commit().await {
                        Ok(()) => Ok(v),
                        Err(e) => {
                            let e = StoreError::from(e);
                            if $idempotent && retry.again(&e).await {
                                continue;
                            }
                            tracing::warn!(
                                instance = %$store.instance,
                                operation = $op,
                                error = %e,
                                "database commit failed; its outcome is unknown and the work is left to be taken up again"
                            );
                            Err(e)
                        }
                    };
                }
                Ok(Finish::Rollback(v)) => {
                    // A failed rollback leaves a broken connection, which
                    // the server rolls back when it drops it.
                    let _ = txn.rollback().await;
                    break Ok(v);
                }
                Err(e) => {
                    // Rolled back here and waited for, not merely dropped:
                    // a dropped transaction only queues its ROLLBACK, which
                    // is sent when the pool next drives the connection, and
                    // until then its row locks stand, so a claim (`SKIP
                    // LOCKED`) would pass over rows a refused write had read
                    // `FOR UPDATE`. A failed rollback leaves a broken
                    // connection, which the server rolls back when it drops it.
                    let _ = txn.rollback().await;
                    if retry.again(&e).await {
                        continue;
                    }
                    break Err(e);
                }
            }
        }
    }};
}

/// Runs `$fut` (an async block that only reads) again after a transient
/// failure.
macro_rules! retrying {
    ($store:expr, $op:expr, $fut:expr) => {{
        let mut retry = Retry::new($op, &$store.instance);
        loop {
            match read($fut).await {
                Err(e) => {
                    if retry.again(&e).await {
                        continue;
                    }
                    break Err(e);
                }
                ok => break ok,
            }
        }
    }};
}

/// The backoff of one operation.
struct Retry<'a> {
    op: &'static str,
    instance: &'a str,
    tries: u32,
    started: Instant,
}

impl<'a> Retry<'a> {
    fn new(op: &'static str, instance: &'a str) -> Self {
        Retry {
            op,
            instance,
            tries: 0,
            started: Instant::now(),
        }
    }

    /// Waits and answers true when `e` is worth another try.
    async fn again(&mut self, e: &StoreError) -> bool {
        if !is_transient(e) || self.started.elapsed() >= RETRY_FOR {
            return false;
        }
        let wait = RETRY_FIRST_WAIT
            .saturating_mul(1u32 << self.tries.min(16))
            .min(RETRY_LONGEST_WAIT);
        self.tries += 1;
        tracing::warn!(
            instance = %self.instance,
            operation = self.op,
            attempt = self.tries,
            wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            error = %e,
            "database unavailable or transaction aborted; retrying"
        );
        tokio::time::sleep(wait).await;
        true
    }
}

/// A failure that says nothing about the data: the connection was lost, the
/// server is shutting down or starting up, or the transaction lost a
/// deadlock. The transaction was rolled back; running it again is safe.
fn is_transient(e: &StoreError) -> bool {
    let StoreError::Database(e) = e else {
        return false;
    };
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            let code = code.as_ref();
            // 08: connection exception; 57P01-03: admin shutdown, crash
            // shutdown, cannot connect now; 53300: too many connections;
            // 40001 / 40P01: serialization failure / deadlock.
            code.starts_with("08")
                || matches!(
                    code,
                    "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01"
                )
        }),
        _ => false,
    }
}

/// An instant as PostgreSQL stores it: whole seconds, like the SQLite store.
fn at(t: Timestamp) -> DateTime<Utc> {
    // jiff's range (years -9999..=9999) lies inside chrono's, so this never
    // falls back.
    DateTime::from_timestamp(t.as_second(), 0).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn ts(t: DateTime<Utc>) -> StoreResult<Timestamp> {
    Timestamp::from_second(t.timestamp())
        .map_err(|e| StoreError::Corrupt(format!("instant {t}: {e}")))
}

fn opt_ts(t: Option<DateTime<Utc>>) -> StoreResult<Option<Timestamp>> {
    t.map(ts).transpose()
}

fn pg_date(d: Date) -> StoreResult<NaiveDate> {
    NaiveDate::from_ymd_opt(
        i32::from(d.year()),
        u32::from(d.month().unsigned_abs()),
        u32::from(d.day().unsigned_abs()),
    )
    .ok_or_else(|| StoreError::Corrupt(format!("date {d}")))
}

fn date(d: NaiveDate) -> StoreResult<Date> {
    let bad = |e: String| StoreError::Corrupt(format!("date {d}: {e}"));
    let year = i16::try_from(d.year()).map_err(|e| bad(e.to_string()))?;
    let month = i8::try_from(d.month()).map_err(|e| bad(e.to_string()))?;
    let day = i8::try_from(d.day()).map_err(|e| bad(e.to_string()))?;
    Date::new(year, month, day).map_err(|e| bad(e.to_string()))
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://...`). `instance`
    /// (`host:pid`) names the connections in `pg_stat_activity` and this
    /// store's log lines.
    pub async fn open(url: &str, max_connections: u32, instance: &str) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url)?
            .application_name(&format!("renewd {instance}"))
            // Plan every statement for its actual `now`: a generic plan of
            // a prepared scan guesses the share of ended periods and walks
            // the whole table in id order when few have ended, where the
            // custom plan reads the due index (what is due, not the table).
            .options([("plan_cache_mode", "force_custom_plan")]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            // Also how long one try waits for a server that is restarting.
            .acquire_timeout(Duration::from_secs(10))
            // A connection the server dropped (restart, pg_terminate_backend)
            // is found dead and replaced before it is handed out.
            .test_before_acquire(true)
            .connect_with(options)
            .await?;
        Ok(PgStore {
            pool,
            instance: instance.to_string(),
            draining: AtomicBool::new(false),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

const SUBSCRIPTION_COLUMNS: &str = "s.id, s.customer_id, s.plan, s.status, s.auto_renew, s.auto_renew_can_enable, \
     s.anchor_date, s.term, s.current_period_start, s.current_period_end, s.payment_kind, s.card_token, \
     s.card_brand, s.card_last4, s.card_expiry, s.contact_name, s.contact_phone, s.contact_email, \
     s.terms_acceptance_id, s.cancel_at_period_end, s.cancelled_at, s.created_at, s.updated_at";

const CUSTOMER_COLUMNS: &str =
    "c.id AS c_id, c.name AS c_name, c.email AS c_email, c.timezone AS c_timezone, c.locale AS c_locale, \
     c.country AS c_country, c.currency AS c_currency, c.created_at AS c_created_at";

const RENEWAL_COLUMNS: &str = "r.id AS r_id, r.subscription_id AS r_subscription_id, r.kind AS r_kind, \
     r.period_start AS r_period_start, r.term AS r_term, r.status AS r_status, r.attempt_count AS r_attempt_count, \
     r.first_attempt_at AS r_first_attempt_at, r.next_attempt_at AS r_next_attempt_at, \
     r.terms_acceptance_id AS r_terms_acceptance_id, r.auto_renew_after AS r_auto_renew_after";

const INVOICE_COLUMNS: &str = "number, renewal_id, subscription_id, customer_id, status, currency, subtotal_minor, tax_minor, \
     total_minor, issued_at, due_at, paid_at, period_start, period_end, payment_kind, payment_reference, document";

const MAIL_COLUMNS: &str =
    "id, subscription_id, customer_id, kind, period_key, offset_key, recipient, locale, \
     invoice_number, context, status, attempts, last_error, created_at, sent_at";

const ATTEMPT_COLUMNS: &str =
    "id, renewal_id, attempt_no, idempotency_key, payment_method, amount_minor, currency, \
     invoice_draft, status, reconcile_count, created_at";

fn subscription_from(r: &PgRow) -> StoreResult<Subscription> {
    let status: String = r.try_get("status")?;
    let payment_kind: String = r.try_get("payment_kind")?;
    let text = |c: &str| -> StoreResult<String> {
        Ok(r.try_get::<Option<String>, _>(c)?.unwrap_or_default())
    };
    let payment = match payment_kind.as_str() {
        "card" => PaymentMethod::Card {
            token: text("card_token")?,
            brand: text("card_brand")?,
            last4: text("card_last4")?,
            expiry: r.try_get("card_expiry")?,
        },
        _ => PaymentMethod::BankTransfer {
            contact_name: text("contact_name")?,
            contact_phone: text("contact_phone")?,
            contact_email: text("contact_email")?,
        },
    };
    let anchor: Option<NaiveDate> = r.try_get("anchor_date")?;
    Ok(Subscription {
        id: r.try_get("id")?,
        customer_id: r.try_get("customer_id")?,
        plan: r.try_get("plan")?,
        status: status
            .parse()
            .map_err(|e: crate::domain::subscription::UnknownStatus| {
                StoreError::Corrupt(e.to_string())
            })?,
        auto_renew: AutoRenew {
            on: r.try_get("auto_renew")?,
            can_enable: r.try_get("auto_renew_can_enable")?,
        },
        anchor_date: anchor.map(date).transpose()?,
        term: r.try_get("term")?,
        current_period_start: opt_ts(r.try_get("current_period_start")?)?,
        current_period_end: opt_ts(r.try_get("current_period_end")?)?,
        payment,
        terms_acceptance_id: r.try_get("terms_acceptance_id")?,
        cancel_at_period_end: r.try_get("cancel_at_period_end")?,
        cancelled_at: opt_ts(r.try_get("cancelled_at")?)?,
        created_at: ts(r.try_get("created_at")?)?,
        updated_at: ts(r.try_get("updated_at")?)?,
    })
}

fn customer_from(r: &PgRow, prefix: &str) -> StoreResult<Customer> {
    let col = |c: &str| format!("{prefix}{c}");
    Ok(Customer {
        id: r.try_get(col("id").as_str())?,
        name: r.try_get(col("name").as_str())?,
        email: r.try_get(col("email").as_str())?,
        timezone: r.try_get(col("timezone").as_str())?,
        locale: r.try_get(col("locale").as_str())?,
        country: r.try_get(col("country").as_str())?,
        currency: r.try_get(col("currency").as_str())?,
        created_at: ts(r.try_get(col("created_at").as_str())?)?,
    })
}

fn renewal_from(r: &PgRow) -> StoreResult<Renewal> {
    let kind: String = r.try_get("r_kind")?;
    let status: String = r.try_get("r_status")?;
    Ok(Renewal {
        id: r.try_get("r_id")?,
        subscription_id: r.try_get("r_subscription_id")?,
        kind: match kind.as_str() {
            "purchase" => RenewalKind::Purchase,
            "manual" => RenewalKind::Manual,
            _ => RenewalKind::Auto,
        },
        period_start: ts(r.try_get("r_period_start")?)?,
        term: r.try_get("r_term")?,
        status: RenewalStatus::parse(&status)?,
        attempt_count: r.try_get("r_attempt_count")?,
        first_attempt_at: opt_ts(r.try_get("r_first_attempt_at")?)?,
        next_attempt_at: opt_ts(r.try_get("r_next_attempt_at")?)?,
        terms_acceptance_id: r.try_get("r_terms_acceptance_id")?,
        auto_renew_after: r.try_get("r_auto_renew_after")?,
    })
}

fn attempt_from(r: &PgRow) -> StoreResult<Attempt> {
    let status: String = r.try_get("status")?;
    let draft: serde_json::Value = r.try_get("invoice_draft")?;
    Ok(Attempt {
        id: r.try_get("id")?,
        renewal_id: r.try_get("renewal_id")?,
        attempt_no: r.try_get("attempt_no")?,
        idempotency_key: r.try_get("idempotency_key")?,
        payment_method: r.try_get("payment_method")?,
        amount_minor: r.try_get("amount_minor")?,
        currency: r.try_get("currency")?,
        invoice_draft: serde_json::from_value(draft)
            .map_err(|e| StoreError::Corrupt(format!("invoice draft: {e}")))?,
        status: AttemptStatus::parse(&status)?,
        reconcile_count: r.try_get("reconcile_count")?,
        created_at: ts(r.try_get("created_at")?)?,
    })
}

fn invoice_from(r: &PgRow) -> StoreResult<Invoice> {
    Ok(Invoice {
        number: r.try_get("number")?,
        renewal_id: r.try_get("renewal_id")?,
        subscription_id: r.try_get("subscription_id")?,
        customer_id: r.try_get("customer_id")?,
        status: r.try_get("status")?,
        currency: r.try_get("currency")?,
        subtotal_minor: r.try_get("subtotal_minor")?,
        tax_minor: r.try_get("tax_minor")?,
        total_minor: r.try_get("total_minor")?,
        issued_at: ts(r.try_get("issued_at")?)?,
        due_at: opt_ts(r.try_get("due_at")?)?,
        paid_at: opt_ts(r.try_get("paid_at")?)?,
        period_start: ts(r.try_get("period_start")?)?,
        period_end: ts(r.try_get("period_end")?)?,
        payment_kind: r.try_get("payment_kind")?,
        payment_reference: r.try_get("payment_reference")?,
        document: r.try_get("document")?,
    })
}

fn mail_from(r: &PgRow) -> StoreResult<Mail> {
    let kind: String = r.try_get("kind")?;
    Ok(Mail {
        id: r.try_get("id")?,
        subscription_id: r.try_get("subscription_id")?,
        customer_id: r.try_get("customer_id")?,
        kind: kind
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("mail kind {kind}")))?,
        period_key: r.try_get("period_key")?,
        offset_key: r.try_get("offset_key")?,
        recipient: r.try_get("recipient")?,
        locale: r.try_get("locale")?,
        invoice_number: r.try_get("invoice_number")?,
        context: r.try_get("context")?,
        status: r.try_get("status")?,
        attempts: r.try_get("attempts")?,
        last_error: r.try_get("last_error")?,
        created_at: ts(r.try_get("created_at")?)?,
        sent_at: opt_ts(r.try_get("sent_at")?)?,
    })
}

fn request_from(r: &PgRow) -> StoreResult<Request> {
    Ok(Request {
        id: r.try_get("id")?,
        subscription_id: r.try_get("subscription_id")?,
        kind: r.try_get("kind")?,
        status: r.try_get("status")?,
        reason: r.try_get("reason")?,
        resolution: r.try_get("resolution")?,
        created_at: ts(r.try_get("created_at")?)?,
        updated_at: ts(r.try_get("updated_at")?)?,
        resolved_at: opt_ts(r.try_get("resolved_at")?)?,
    })
}

fn event_from(r: &PgRow) -> StoreResult<Event> {
    let detail: Option<serde_json::Value> = r.try_get("detail")?;
    Ok(Event {
        id: r.try_get("id")?,
        at: ts(r.try_get("at")?)?,
        kind: r.try_get("kind")?,
        subscription_id: r.try_get("subscription_id")?,
        customer_id: r.try_get("customer_id")?,
        invoice_number: r.try_get("invoice_number")?,
        amount_minor: r.try_get("amount_minor")?,
        currency: r.try_get("currency")?,
        period_end: opt_ts(r.try_get("period_end")?)?,
        idempotency_key: r.try_get("idempotency_key")?,
        outcome: r.try_get("outcome")?,
        detail: detail.unwrap_or(serde_json::Value::Null),
    })
}

/// Checks the lease and locks the renewal row until the transaction ends,
/// so no other instance can take the lease over between this check and
/// the commit (what `BEGIN IMMEDIATE` gives the SQLite store).
async fn check_lease(tx: &mut PgConnection, lease: &Lease) -> StoreResult<()> {
    let held: Option<Option<String>> =
        sqlx::query_scalar("SELECT lease_token FROM renewals WHERE id = $1 FOR UPDATE")
            .bind(lease.renewal_id)
            .fetch_optional(&mut *tx)
            .await?;
    match held {
        Some(Some(t)) if t == lease.token => Ok(()),
        Some(_) => Err(StoreError::LeaseLost(lease.renewal_id)),
        None => Err(StoreError::NotFound(format!(
            "renewal {}",
            lease.renewal_id
        ))),
    }
}

async fn insert_event(
    tx: &mut PgConnection,
    e: &NewEvent,
    invoice_number: Option<&str>,
    now: Timestamp,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO events (at, kind, subscription_id, customer_id, invoice_number, amount_minor, currency, \
         period_end, idempotency_key, outcome, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(at(now))
    .bind(&e.kind)
    .bind(e.subscription_id)
    .bind(e.customer_id)
    .bind(invoice_number)
    .bind(e.amount_minor)
    .bind(&e.currency)
    .bind(e.period_end.map(at))
    .bind(&e.idempotency_key)
    .bind(&e.outcome)
    .bind(&e.detail)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn insert_mail(
    tx: &mut PgConnection,
    m: &NewMail,
    invoice_number: Option<&str>,
    now: Timestamp,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "INSERT INTO outbox (subscription_id, customer_id, kind, period_key, offset_key, recipient, locale, \
         invoice_number, context, status, next_attempt_at, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'queued', $10, $10) \
         ON CONFLICT (subscription_id, period_key, kind, offset_key) DO NOTHING",
    )
    .bind(m.subscription_id)
    .bind(m.customer_id)
    .bind(m.kind.as_str())
    .bind(m.period_key)
    .bind(m.offset_key)
    .bind(&m.recipient)
    .bind(&m.locale)
    .bind(invoice_number)
    .bind(&m.context)
    .bind(at(now))
    .execute(&mut *tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

async fn insert_invoice(tx: &mut PgConnection, inv: &NewInvoice) -> StoreResult<String> {
    // The upsert leaves the series' counter row locked until this
    // transaction ends: a concurrent payment waits for our commit (and sees
    // our number) or our rollback (and takes the same number), so numbers
    // are gap-free and strictly increasing across instances.
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO invoice_counters (series, last_seq) VALUES ($1, 1) \
         ON CONFLICT (series) DO UPDATE SET last_seq = invoice_counters.last_seq + 1 RETURNING last_seq",
    )
    .bind(&inv.series)
    .fetch_one(&mut *tx)
    .await?;
    let number = format!(
        "{}-{:0width$}",
        inv.series,
        seq,
        width = usize::from(inv.digits)
    );
    sqlx::query(
        "INSERT INTO invoices (number, series, seq, subscription_id, customer_id, renewal_id, attempt_id, status, \
         currency, subtotal_minor, tax_minor, total_minor, issued_at, due_at, paid_at, period_start, period_end, \
         payment_kind, payment_reference, document) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)",
    )
    .bind(&number)
    .bind(&inv.series)
    .bind(seq)
    .bind(inv.subscription_id)
    .bind(inv.customer_id)
    .bind(inv.renewal_id)
    .bind(inv.attempt_id)
    .bind(&inv.status)
    .bind(&inv.amounts.currency)
    .bind(inv.amounts.subtotal_minor)
    .bind(inv.amounts.tax_minor)
    .bind(inv.amounts.total_minor)
    .bind(at(inv.issued_at))
    .bind(inv.due_at.map(at))
    .bind(inv.paid_at.map(at))
    .bind(at(inv.period_start))
    .bind(at(inv.period_end))
    .bind(&inv.payment_kind)
    .bind(&inv.payment_reference)
    .bind(&inv.document)
    .execute(&mut *tx)
    .await?;
    Ok(number)
}

/// A guarded update: under READ COMMITTED an UPDATE that waited for a
/// concurrent writer re-evaluates its WHERE on the row that writer left, so
/// the guard sees the latest committed status and period end.
async fn patch_subscription(
    tx: &mut PgConnection,
    p: &SubscriptionPatch,
    now: Timestamp,
) -> StoreResult<()> {
    let mut q = QueryBuilder::<Postgres>::new("UPDATE subscriptions SET updated_at = ");
    q.push_bind(at(now));
    if let Some(s) = p.status {
        q.push(", status = ").push_bind(s.as_str());
        if s == crate::domain::Status::Cancelled {
            q.push(", cancelled_at = ").push_bind(at(now));
        }
    }
    if let Some(c) = p.cancel_at_period_end {
        q.push(", cancel_at_period_end = ").push_bind(c);
    }
    if let Some(a) = p.auto_renew {
        q.push(", auto_renew = ").push_bind(a.on);
        q.push(", auto_renew_can_enable = ").push_bind(a.can_enable);
    }
    if let Some(period) = &p.period {
        q.push(", anchor_date = ")
            .push_bind(pg_date(period.anchor_date)?);
        q.push(", term = ").push_bind(period.term);
        q.push(", current_period_start = ")
            .push_bind(at(period.start));
        q.push(", current_period_end = ").push_bind(at(period.end));
    }
    if let Some(pm) = &p.payment {
        let (kind, card, contact): ([Option<String>; 4], _, _) = match pm {
            PaymentMethod::Card {
                token,
                brand,
                last4,
                expiry,
            } => (
                [Some("card".into()), None, None, None],
                [
                    Some(token.clone()),
                    Some(brand.clone()),
                    Some(last4.clone()),
                    expiry.clone(),
                ],
                [None, None, None],
            ),
            PaymentMethod::BankTransfer {
                contact_name,
                contact_phone,
                contact_email,
            } => (
                [Some("bank_transfer".into()), None, None, None],
                [None, None, None, None],
                [
                    Some(contact_name.clone()),
                    Some(contact_phone.clone()),
                    Some(contact_email.clone()),
                ],
            ),
        };
        let [kind, ..] = kind;
        q.push(", payment_kind = ").push_bind(kind);
        let [token, brand, last4, expiry] = card;
        q.push(", card_token = ").push_bind(token);
        q.push(", card_brand = ").push_bind(brand);
        q.push(", card_last4 = ").push_bind(last4);
        q.push(", card_expiry = ").push_bind(expiry);
        let [name, phone, email] = contact;
        q.push(", contact_name = ").push_bind(name);
        q.push(", contact_phone = ").push_bind(phone);
        q.push(", contact_email = ").push_bind(email);
        // A new card may end before the renewal date: the notice scan must
        // look at the subscription again (migration 4).
        q.push(", notified_period_end = NULL");
    }
    if let Some(id) = p.terms_acceptance_id {
        q.push(", terms_acceptance_id = ").push_bind(id);
    }
    q.push(" WHERE id = ").push_bind(p.id);
    if !p.expect_status.is_empty() {
        let statuses: Vec<String> = p
            .expect_status
            .iter()
            .map(|s| s.as_str().to_string())
            .collect();
        q.push(" AND status = ANY(").push_bind(statuses).push(")");
    }
    match p.expect_period_end {
        Some(Some(end)) => {
            q.push(" AND current_period_end = ").push_bind(at(end));
        }
        Some(None) => {
            q.push(" AND current_period_end IS NULL");
        }
        None => {}
    }
    let done = q.build().execute(&mut *tx).await?;
    if done.rows_affected() == 1 {
        Ok(())
    } else {
        Err(StoreError::Conflict(format!(
            "subscription {} changed since it was read (expected status {:?}, period end {:?})",
            p.id, p.expect_status, p.expect_period_end
        )))
    }
}

/// A status list written into SQL: the values are the domain's own
/// constants, never input, and literals let the planner use the indexes.
fn status_list(statuses: &[crate::domain::Status]) -> String {
    let quoted: Vec<String> = statuses
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    if quoted.is_empty() {
        "(NULL)".into()
    } else {
        format!("({})", quoted.join(", "))
    }
}

/// The `AND NOT ...` clause of [`Scan::skip_queued`] (see the SQLite
/// store's twin). Every value in it is an integer or a mail kind name,
/// written inline; each probe is one lookup in the outbox's unique
/// (subscription, period, kind, offset) index.
fn skip_queued_sql(skip: &QueuedNotice) -> String {
    let queued = |kind: MailKind, offset: &str| {
        format!(
            "EXISTS (SELECT 1 FROM outbox o WHERE o.subscription_id = s.id \
             AND o.period_key = extract(epoch FROM s.current_period_end)::bigint \
             AND o.kind = '{}' AND {offset})",
            kind.as_str()
        )
    };
    match skip {
        QueuedNotice::Reminders { offsets_days, now } => {
            let arms: Vec<String> = QueuedNotice::reminder_cutoffs(offsets_days, *now)
                .into_iter()
                .map(|(d, cutoff)| match cutoff {
                    Some(c) => {
                        format!("(o.offset_key = {d} AND s.current_period_end > to_timestamp({c}))")
                    }
                    None => format!("o.offset_key = {d}"),
                })
                .collect();
            if arms.is_empty() {
                return String::new();
            }
            format!(
                " AND NOT {}",
                queued(
                    MailKind::RenewalReminder,
                    &format!("({})", arms.join(" OR "))
                )
            )
        }
        // The marker (migration 4): also the condition of the partial index
        // `subscriptions_notice`, which the notice scan reads.
        QueuedNotice::Upcoming => {
            " AND s.notified_period_end IS DISTINCT FROM s.current_period_end".into()
        }
    }
}

#[async_trait]
impl Store for PgStore {
    async fn migrate(&self) -> StoreResult<()> {
        transaction!(self, "migrate", idempotent, |tx| async {
            // Instances started together take turns: the second finds the
            // schema in place and applies nothing.
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(MIGRATE_LOCK)
                .execute(&mut *tx)
                .await?;
            let exists: bool =
                sqlx::query_scalar("SELECT to_regclass('schema_migrations') IS NOT NULL")
                    .fetch_one(&mut *tx)
                    .await?;
            if !exists {
                sqlx::query(
                    "CREATE TABLE schema_migrations (version bigint PRIMARY KEY, name text NOT NULL, \
                     applied_at timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP)",
                )
                .execute(&mut *tx)
                .await?;
            }
            let current: i64 = sqlx::query_scalar(
                "SELECT COALESCE(MAX(version), 0)::bigint FROM schema_migrations",
            )
            .fetch_one(&mut *tx)
            .await?;
            let known = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
            if current > known {
                return Err(StoreError::SchemaTooNew {
                    found: current,
                    known,
                });
            }
            for &(version, name, sql) in MIGRATIONS {
                if version <= current {
                    continue;
                }
                // A plain &str goes by the simple protocol: every statement in it runs.
                sqlx::Executor::execute(&mut *tx, sql).await?;
                sqlx::query("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)")
                    .bind(version)
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
            }
            Ok(Finish::Commit(()))
        })
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn insert_customer(&self, c: &NewCustomer, now: Timestamp) -> StoreResult<Customer> {
        let id = transaction!(self, "insert_customer", |tx| async {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO customers (name, email, timezone, locale, country, currency, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            )
            .bind(&c.name)
            .bind(&c.email)
            .bind(&c.timezone)
            .bind(&c.locale)
            .bind(&c.country)
            .bind(&c.currency)
            .bind(at(now))
            .fetch_one(&mut *tx)
            .await?;
            insert_event(
                tx,
                &NewEvent {
                    kind: "customer.created".into(),
                    customer_id: Some(id),
                    ..Default::default()
                },
                None,
                now,
            )
            .await?;
            Ok(Finish::Commit(id))
        })?;
        Ok(Customer {
            id,
            name: c.name.clone(),
            email: c.email.clone(),
            timezone: c.timezone.clone(),
            locale: c.locale.clone(),
            country: c.country.clone(),
            currency: c.currency.clone(),
            created_at: now,
        })
    }

    async fn customer(&self, id: i64) -> StoreResult<Option<Customer>> {
        retrying!(self, "customer", async {
            let row = sqlx::query(&format!(
                "SELECT {CUSTOMER_COLUMNS} FROM customers c WHERE c.id = $1"
            ))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
            row.map(|r| customer_from(&r, "c_")).transpose()
        })
    }

    async fn count_customers(&self) -> StoreResult<i64> {
        retrying!(self, "count_customers", async {
            Ok(sqlx::query_scalar("SELECT COUNT(*) FROM customers")
                .fetch_one(&self.pool)
                .await?)
        })
    }

    async fn insert_purchase(
        &self,
        p: &NewPurchase,
        claim: &Claim,
        now: Timestamp,
    ) -> StoreResult<(Subscription, Renewal)> {
        let renewal_id = transaction!(self, "insert_purchase", |tx| async {
            let acceptance_id: i64 = sqlx::query_scalar(
                "INSERT INTO terms_acceptances (customer_id, version, accepted_at, context) \
                 VALUES ($1, $2, $3, 'purchase') RETURNING id",
            )
            .bind(p.customer_id)
            .bind(&p.terms_version)
            .bind(at(now))
            .fetch_one(&mut *tx)
            .await?;
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO subscriptions (customer_id, plan, status, auto_renew, auto_renew_can_enable, payment_kind, \
                 terms_acceptance_id, created_at, updated_at) \
                 VALUES ($1, $2, 'pending_payment', true, true, $3, $4, $5, $5) RETURNING id",
            )
            .bind(p.customer_id)
            .bind(&p.plan)
            .bind(p.payment.kind())
            .bind(acceptance_id)
            .bind(at(now))
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query("UPDATE terms_acceptances SET subscription_id = $1 WHERE id = $2")
                .bind(id)
                .bind(acceptance_id)
                .execute(&mut *tx)
                .await?;
            patch_subscription(
                tx,
                &SubscriptionPatch {
                    id,
                    payment: Some(p.payment.clone()),
                    ..Default::default()
                },
                now,
            )
            .await?;
            let renewal_id: i64 = sqlx::query_scalar(
                "INSERT INTO renewals (subscription_id, kind, period_start, term, status, next_attempt_at, lease_token, \
                 lease_owner, lease_expires_at, terms_acceptance_id, created_at, updated_at) \
                 VALUES ($1, 'purchase', $2, 1, 'pending', $2, $3, $4, $5, $6, $2, $2) RETURNING id",
            )
            .bind(id)
            .bind(at(now))
            .bind(&claim.token)
            .bind(&claim.owner)
            .bind(at(claim.expires_at))
            .bind(acceptance_id)
            .fetch_one(&mut *tx)
            .await?;
            insert_event(
                tx,
                &NewEvent {
                    kind: "terms.accepted".into(),
                    subscription_id: Some(id),
                    customer_id: Some(p.customer_id),
                    outcome: Some(p.terms_version.clone()),
                    detail: serde_json::json!({"terms_version": p.terms_version, "context": "purchase"}),
                    ..Default::default()
                },
                None,
                now,
            )
            .await?;
            Ok(Finish::Commit(renewal_id))
        })?;
        let work = self
            .renewal_work(renewal_id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("renewal {renewal_id}")))?;
        Ok((work.subscription, work.renewal))
    }

    async fn subscription(&self, id: i64) -> StoreResult<Option<Subscription>> {
        retrying!(self, "subscription", async {
            let row = sqlx::query(&format!(
                "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions s WHERE s.id = $1"
            ))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
            row.map(|r| subscription_from(&r)).transpose()
        })
    }

    async fn list_subscriptions(&self, f: &SubscriptionFilter) -> StoreResult<Vec<Subscription>> {
        retrying!(self, "list_subscriptions", async {
            let mut q = QueryBuilder::<Postgres>::new(format!(
                "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions s WHERE true"
            ));
            if let Some(status) = f.status {
                q.push(" AND s.status = ").push_bind(status.as_str());
            }
            if let Some(before) = f.due_before {
                q.push(" AND s.current_period_end < ").push_bind(at(before));
            }
            let rows = q
                .push(" ORDER BY s.id")
                .build()
                .fetch_all(&self.pool)
                .await?;
            rows.iter().map(subscription_from).collect()
        })
    }

    async fn scan(&self, scan: &Scan) -> StoreResult<Vec<(Subscription, Customer)>> {
        retrying!(self, "scan", async {
            let mut q = QueryBuilder::<Postgres>::new(format!(
                "SELECT {SUBSCRIPTION_COLUMNS}, {CUSTOMER_COLUMNS} FROM subscriptions s \
                 JOIN customers c ON c.id = s.customer_id WHERE s.status IN {} AND s.current_period_end <= ",
                status_list(&scan.statuses)
            ));
            q.push_bind(at(scan.ends_at_or_before));
            q.push(" AND s.id > ").push_bind(scan.after_id);
            if let Some(after) = scan.ends_after {
                q.push(" AND s.current_period_end > ").push_bind(at(after));
            }
            if let Some(on) = scan.auto_renew {
                q.push(" AND s.auto_renew = ").push_bind(on);
            }
            if scan.card_only {
                q.push(" AND s.payment_kind = 'card'");
            }
            if scan.not_cancelling {
                q.push(" AND NOT s.cancel_at_period_end");
            }
            // The reminder scan's partial index (migration 3): its
            // conditions as literals, which a generic plan can match.
            if scan.reads_reminder_index() {
                q.push(" AND s.status = 'active' AND NOT s.auto_renew");
            }
            // The notice scan's partial index (migration 4), likewise (the
            // marker's condition comes with `skip_queued`).
            if scan.reads_notice_index() {
                q.push(
                    " AND s.status = 'active' AND s.auto_renew AND s.payment_kind = 'card' \
                     AND NOT s.cancel_at_period_end",
                );
            }
            if scan.without_open_renewal {
                q.push(format!(
                    " AND NOT EXISTS (SELECT 1 FROM renewals r WHERE r.subscription_id = s.id \
                     AND r.status IN {OPEN_RENEWAL})"
                ));
            }
            if let Some(skip) = &scan.skip_queued {
                q.push(skip_queued_sql(skip));
            }
            q.push(" ORDER BY s.id LIMIT ")
                .push_bind(i64::from(scan.limit));
            let rows = q.build().fetch_all(&self.pool).await?;
            rows.iter()
                .map(|r| Ok((subscription_from(r)?, customer_from(r, "c_")?)))
                .collect()
        })
    }

    async fn open_due_renewals(
        &self,
        now: Timestamp,
        transfer_lead: jiff::SignedDuration,
    ) -> StoreResult<u64> {
        let lead_end = now.saturating_add(transfer_lead).unwrap_or(now);
        transaction!(self, "open_due_renewals", idempotent, |tx| async {
            // Inserted in id order, so two instances opening the same rows
            // wait on each other instead of deadlocking.
            let cards = sqlx::query(
                "INSERT INTO renewals (subscription_id, kind, period_start, term, status, next_attempt_at, \
                 terms_acceptance_id, created_at, updated_at) \
                 SELECT s.id, 'auto', s.current_period_end, s.term + 1, 'pending', s.current_period_end, \
                        s.terms_acceptance_id, $1, $1 \
                 FROM subscriptions s \
                 WHERE s.status = 'active' AND s.current_period_end <= $1 AND s.auto_renew \
                   AND s.payment_kind = 'card' AND NOT s.cancel_at_period_end \
                 ORDER BY s.id \
                 ON CONFLICT (subscription_id, period_start) DO NOTHING",
            )
            .bind(at(now))
            .execute(&mut *tx)
            .await?;
            let transfers = sqlx::query(
                "INSERT INTO renewals (subscription_id, kind, period_start, term, status, next_attempt_at, \
                 terms_acceptance_id, created_at, updated_at) \
                 SELECT s.id, 'auto', s.current_period_end, s.term + 1, 'pending', $1, s.terms_acceptance_id, $1, $1 \
                 FROM subscriptions s \
                 WHERE s.status = 'active' AND s.current_period_end <= $2 AND s.auto_renew \
                   AND s.payment_kind = 'bank_transfer' AND NOT s.cancel_at_period_end \
                 ORDER BY s.id \
                 ON CONFLICT (subscription_id, period_start) DO NOTHING",
            )
            .bind(at(now))
            .bind(at(lead_end))
            .execute(&mut *tx)
            .await?;
            Ok(Finish::Commit(
                cards.rows_affected() + transfers.rows_affected(),
            ))
        })
    }

    async fn open_manual_renewal(
        &self,
        r: &NewManualRenewal,
        claim: &Claim,
        now: Timestamp,
    ) -> StoreResult<Opened> {
        let opened = transaction!(self, "open_manual_renewal", |tx| async {
            let find = || {
                sqlx::query(
                    "SELECT id, status, lease_token, lease_expires_at FROM renewals \
                     WHERE subscription_id = $1 AND period_start = $2 FOR UPDATE",
                )
                .bind(r.subscription_id)
                .bind(at(r.period_start))
            };
            // Serialises manual renewals of one subscription, then refuses a
            // second one while another period's renewal is still open (say, an
            // expired subscription's renewal awaiting its transfer).
            sqlx::query("SELECT id FROM subscriptions WHERE id = $1 FOR UPDATE")
                .bind(r.subscription_id)
                .execute(&mut *tx)
                .await?;
            let other_open: i64 = sqlx::query_scalar(&format!(
                "SELECT COUNT(*) FROM renewals WHERE subscription_id = $1 AND period_start <> $2 \
                 AND status IN {OPEN_RENEWAL}"
            ))
            .bind(r.subscription_id)
            .bind(at(r.period_start))
            .fetch_one(&mut *tx)
            .await?;
            if other_open > 0 {
                return Ok(Finish::Rollback(Manual::Busy));
            }
            let mut existing = find().fetch_optional(&mut *tx).await?;
            let mut created = None;
            if existing.is_none() {
                // Inserted with the sweep's conflict rule: if an instance
                // opened the automatic row meanwhile, that row is taken over
                // below, as it would have been had it existed already.
                created = sqlx::query_scalar::<_, i64>(
                    "INSERT INTO renewals (subscription_id, kind, period_start, term, status, next_attempt_at, \
                     created_at, updated_at) VALUES ($1, 'manual', $2, $3, 'pending', $4, $4, $4) \
                     ON CONFLICT (subscription_id, period_start) DO NOTHING RETURNING id",
                )
                .bind(r.subscription_id)
                .bind(at(r.period_start))
                .bind(r.term)
                .bind(at(now))
                .fetch_optional(&mut *tx)
                .await?;
                if created.is_none() {
                    existing = find().fetch_optional(&mut *tx).await?;
                }
            }
            if let Some(row) = &existing {
                let status: String = row.try_get("status")?;
                let held: Option<String> = row.try_get("lease_token")?;
                let until: Option<DateTime<Utc>> = row.try_get("lease_expires_at")?;
                if status == "succeeded" {
                    return Ok(Finish::Rollback(Manual::AlreadyPaid));
                }
                if status == "awaiting_transfer" {
                    return Ok(Finish::Rollback(Manual::AwaitingTransfer));
                }
                if held.is_some() && until.is_some_and(|u| u > at(now)) {
                    return Ok(Finish::Rollback(Manual::Busy));
                }
            }
            let acceptance_id: i64 = sqlx::query_scalar(
                "INSERT INTO terms_acceptances (customer_id, subscription_id, version, accepted_at, context) \
                 VALUES ($1, $2, $3, $4, 'manual_renewal') RETURNING id",
            )
            .bind(r.customer_id)
            .bind(r.subscription_id)
            .bind(&r.terms_version)
            .bind(at(now))
            .fetch_one(&mut *tx)
            .await?;
            let id = match (&existing, created) {
                (_, Some(id)) => {
                    sqlx::query(
                        "UPDATE renewals SET terms_acceptance_id = $1, auto_renew_after = $2 WHERE id = $3",
                    )
                    .bind(acceptance_id)
                    .bind(r.auto_renew_after)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                    id
                }
                (Some(row), None) => {
                    let id: i64 = row.try_get("id")?;
                    // An automatic renewal row for the same period becomes this
                    // manual one: the same row, so the period is paid at most once.
                    sqlx::query(
                        "UPDATE renewals SET kind = 'manual', status = CASE WHEN status IN ('failed', 'skipped') \
                         THEN 'pending' ELSE status END, next_attempt_at = $1, terms_acceptance_id = $2, \
                         auto_renew_after = $3, updated_at = $1 WHERE id = $4",
                    )
                    .bind(at(now))
                    .bind(acceptance_id)
                    .bind(r.auto_renew_after)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                    id
                }
                (None, None) => {
                    return Err(StoreError::NotFound(format!(
                        "renewal of subscription {} for {}",
                        r.subscription_id, r.period_start
                    )))
                }
            };
            sqlx::query(
                "UPDATE renewals SET lease_token = $1, lease_owner = $2, lease_expires_at = $3 WHERE id = $4",
            )
            .bind(&claim.token)
            .bind(&claim.owner)
            .bind(at(claim.expires_at))
            .bind(id)
            .execute(&mut *tx)
            .await?;
            insert_event(
                tx,
                &NewEvent {
                    kind: "terms.accepted".into(),
                    subscription_id: Some(r.subscription_id),
                    customer_id: Some(r.customer_id),
                    outcome: Some(r.terms_version.clone()),
                    detail: serde_json::json!({"terms_version": r.terms_version, "context": "manual_renewal", "acceptance_id": acceptance_id}),
                    ..Default::default()
                },
                None,
                now,
            )
            .await?;
            Ok(Finish::Commit(Manual::Claimed(id)))
        })?;
        match opened {
            Manual::AlreadyPaid => Ok(Opened::AlreadyPaid),
            Manual::AwaitingTransfer => Ok(Opened::AwaitingTransfer),
            Manual::Busy => Ok(Opened::Busy),
            Manual::Claimed(id) => {
                let work = self
                    .renewal_work(id)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(format!("renewal {id}")))?;
                Ok(Opened::Claimed(work.renewal))
            }
        }
    }

    async fn claim_renewal(
        &self,
        renewal_id: i64,
        claim: &Claim,
        now: Timestamp,
    ) -> StoreResult<bool> {
        transaction!(self, "claim_renewal", |tx| async {
            let done = sqlx::query(
                "UPDATE renewals SET lease_token = $1, lease_owner = $2, lease_expires_at = $3, updated_at = $4 \
                 WHERE id = $5 AND (lease_token IS NULL OR lease_expires_at <= $4)",
            )
            .bind(&claim.token)
            .bind(&claim.owner)
            .bind(at(claim.expires_at))
            .bind(at(now))
            .bind(renewal_id)
            .execute(&mut *tx)
            .await?;
            Ok(Finish::Commit(done.rows_affected() == 1))
        })
    }

    async fn invoice_renewal(&self, number: &str) -> StoreResult<Option<i64>> {
        retrying!(self, "invoice_renewal", async {
            Ok(sqlx::query_scalar::<_, Option<i64>>(
                "SELECT renewal_id FROM invoices WHERE number = $1",
            )
            .bind(number)
            .fetch_optional(&self.pool)
            .await?
            .flatten())
        })
    }

    async fn insert_request(
        &self,
        subscription_id: i64,
        kind: &str,
        reason: &str,
        now: Timestamp,
    ) -> StoreResult<Request> {
        let id = transaction!(self, "insert_request", |tx| async {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO requests (subscription_id, kind, status, reason, created_at, updated_at) \
                 VALUES ($1, $2, 'open', $3, $4, $4) RETURNING id",
            )
            .bind(subscription_id)
            .bind(kind)
            .bind(reason)
            .bind(at(now))
            .fetch_one(&mut *tx)
            .await?;
            insert_event(
                tx,
                &NewEvent {
                    kind: "request.opened".into(),
                    subscription_id: Some(subscription_id),
                    outcome: Some("open".into()),
                    detail: serde_json::json!({"request_id": id, "request_kind": kind}),
                    ..Default::default()
                },
                None,
                now,
            )
            .await?;
            Ok(Finish::Commit(id))
        })?;
        self.request(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("request {id}")))
    }

    async fn request(&self, id: i64) -> StoreResult<Option<Request>> {
        retrying!(self, "request", async {
            let row = sqlx::query("SELECT * FROM requests WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
            row.map(|r| request_from(&r)).transpose()
        })
    }

    async fn list_requests(&self, status: Option<&str>) -> StoreResult<Vec<Request>> {
        retrying!(self, "list_requests", async {
            let rows = sqlx::query(
                "SELECT * FROM requests WHERE ($1::text IS NULL OR status = $1) ORDER BY id",
            )
            .bind(status)
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(request_from).collect()
        })
    }

    async fn claim_renewals(
        &self,
        now: Timestamp,
        claim: &Claim,
        limit: u32,
    ) -> StoreResult<Vec<i64>> {
        if self.is_draining() {
            return Ok(Vec::new());
        }
        // SKIP LOCKED: instances claiming at once each take different rows
        // instead of queueing behind one another. A row whose claim another
        // instance committed meanwhile is re-checked under the lock and
        // dropped if its lease is now held.
        let sql = format!(
            "UPDATE renewals SET lease_token = $1, lease_owner = $2, lease_expires_at = $3, updated_at = $4 \
             WHERE id IN (SELECT id FROM renewals \
                          WHERE status IN {OPEN_RENEWAL} AND next_attempt_at <= $4 \
                            AND (lease_token IS NULL OR lease_expires_at <= $4) \
                          ORDER BY next_attempt_at, id LIMIT $5 \
                          FOR UPDATE SKIP LOCKED) \
             RETURNING id"
        );
        let mut ids = transaction!(self, "claim_renewals", idempotent, |tx| async {
            let ids: Vec<i64> = sqlx::query_scalar(&sql)
                .bind(&claim.token)
                .bind(&claim.owner)
                .bind(at(claim.expires_at))
                .bind(at(now))
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await?;
            Ok(Finish::Commit(ids))
        })?;
        ids.sort_unstable();
        Ok(ids)
    }

    async fn due_renewals(&self, now: Timestamp) -> StoreResult<Vec<RenewalWork>> {
        let sql = format!(
            "SELECT id FROM renewals WHERE status IN {OPEN_RENEWAL} \
             AND next_attempt_at <= $1 AND (lease_token IS NULL OR lease_expires_at <= $1) \
             ORDER BY next_attempt_at, id"
        );
        let ids: Vec<i64> = retrying!(self, "due_renewals", async {
            Ok(sqlx::query_scalar(&sql)
                .bind(at(now))
                .fetch_all(&self.pool)
                .await?)
        })?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(w) = self.renewal_work(id).await? {
                out.push(w);
            }
        }
        Ok(out)
    }

    async fn renewal_work(&self, renewal_id: i64) -> StoreResult<Option<RenewalWork>> {
        let sql = format!(
            "SELECT {SUBSCRIPTION_COLUMNS}, {CUSTOMER_COLUMNS}, {RENEWAL_COLUMNS} FROM renewals r \
             JOIN subscriptions s ON s.id = r.subscription_id JOIN customers c ON c.id = s.customer_id WHERE r.id = $1"
        );
        let attempt_sql = format!(
            "SELECT {ATTEMPT_COLUMNS} FROM payment_attempts WHERE renewal_id = $1 ORDER BY attempt_no DESC LIMIT 1"
        );
        retrying!(self, "renewal_work", async {
            let row = sqlx::query(&sql)
                .bind(renewal_id)
                .fetch_optional(&self.pool)
                .await?;
            let Some(row) = row else { return Ok(None) };
            let attempt = sqlx::query(&attempt_sql)
                .bind(renewal_id)
                .fetch_optional(&self.pool)
                .await?;
            Ok(Some(RenewalWork {
                renewal: renewal_from(&row)?,
                subscription: subscription_from(&row)?,
                customer: customer_from(&row, "c_")?,
                last_attempt: attempt.map(|a| attempt_from(&a)).transpose()?,
            }))
        })
    }

    async fn begin_attempt(
        &self,
        lease: &Lease,
        a: &NewAttempt,
        now: Timestamp,
    ) -> StoreResult<Attempt> {
        let draft = serde_json::to_value(&a.invoice_draft)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let insert = format!(
            "INSERT INTO payment_attempts (renewal_id, attempt_no, idempotency_key, payment_method, amount_minor, \
             currency, invoice_draft, status, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', $8) \
             RETURNING {ATTEMPT_COLUMNS}"
        );
        transaction!(self, "begin_attempt", |tx| async {
            check_lease(tx, lease).await?;
            let attempt_no: i64 = sqlx::query_scalar(
                "UPDATE renewals SET attempt_count = attempt_count + 1, first_attempt_at = COALESCE(first_attempt_at, $1), \
                 updated_at = $1 WHERE id = $2 RETURNING attempt_count",
            )
            .bind(at(now))
            .bind(lease.renewal_id)
            .fetch_one(&mut *tx)
            .await?;
            let row = sqlx::query(&insert)
                .bind(lease.renewal_id)
                .bind(attempt_no)
                .bind(&a.idempotency_key)
                .bind(&a.payment_method)
                .bind(a.amount_minor)
                .bind(&a.currency)
                .bind(&draft)
                .bind(at(now))
                .fetch_one(&mut *tx)
                .await?;
            let attempt = attempt_from(&row)?;
            let (subscription_id, customer_id): (i64, i64) = sqlx::query_as(
                "SELECT s.id, s.customer_id FROM renewals r JOIN subscriptions s ON s.id = r.subscription_id \
                 WHERE r.id = $1",
            )
            .bind(lease.renewal_id)
            .fetch_one(&mut *tx)
            .await?;
            insert_event(
                tx,
                &NewEvent {
                    kind: "charge.attempt".into(),
                    subscription_id: Some(subscription_id),
                    customer_id: Some(customer_id),
                    amount_minor: Some(a.amount_minor),
                    currency: Some(a.currency.clone()),
                    idempotency_key: Some(a.idempotency_key.clone()),
                    outcome: Some("sent".into()),
                    detail: serde_json::json!({"attempt": attempt.attempt_no, "payment_method_kind": "card"}),
                    ..Default::default()
                },
                None,
                now,
            )
            .await?;
            Ok(Finish::Commit(attempt))
        })
    }

    async fn apply(&self, change: Change, now: Timestamp) -> StoreResult<Applied> {
        let change = &change;
        transaction!(self, "apply", |tx| async {
            if let Some(lease) = &change.lease {
                check_lease(tx, lease).await?;
            }
            if let Some(a) = &change.attempt {
                sqlx::query(
                    "UPDATE payment_attempts SET status = $1, decline_kind = COALESCE($2, decline_kind), \
                     decline_code = COALESCE($3, decline_code), gateway_reference = COALESCE($4, gateway_reference), \
                     reconcile_count = COALESCE($5, reconcile_count), \
                     completed_at = CASE WHEN $1 IN ('succeeded', 'declined', 'not_charged') THEN $6 ELSE completed_at END \
                     WHERE id = $7",
                )
                .bind(a.status.as_str())
                .bind(&a.decline_kind)
                .bind(&a.decline_code)
                .bind(&a.gateway_reference)
                .bind(a.reconcile_count)
                .bind(at(now))
                .bind(a.id)
                .execute(&mut *tx)
                .await?;
            }
            if let Some(p) = &change.subscription {
                patch_subscription(tx, p, now).await?;
            }
            if let Some(sub) = change.close_renewals_of {
                // Locks the open renewals, so a claim either committed before
                // (and is seen as busy here) or skips them until we commit.
                let busy: Vec<bool> = sqlx::query_scalar(&format!(
                    "SELECT lease_token IS NOT NULL AND lease_expires_at > $2 FROM renewals \
                     WHERE subscription_id = $1 AND status IN {OPEN_RENEWAL} ORDER BY id FOR UPDATE"
                ))
                .bind(sub)
                .bind(at(now))
                .fetch_all(&mut *tx)
                .await?;
                if busy.into_iter().any(|b| b) {
                    return Err(StoreError::Conflict(format!(
                        "a renewal of subscription {sub} is being processed right now; try again in a minute"
                    )));
                }
                // A charge whose outcome is not known yet must be reconciled
                // first: cancelling now could leave taken money unrecorded.
                let unsettled: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM payment_attempts a JOIN renewals r ON r.id = a.renewal_id \
                     WHERE r.subscription_id = $1 AND a.status IN ('pending', 'unknown')",
                )
                .bind(sub)
                .fetch_one(&mut *tx)
                .await?;
                if unsettled > 0 {
                    return Err(StoreError::Conflict(format!(
                        "a charge of subscription {sub} is still being reconciled with the gateway; cancel once it is settled (see `renewd events --subscription {sub}`)"
                    )));
                }
                sqlx::query(&format!(
                    "UPDATE renewals SET status = 'skipped', outcome_note = 'cancelled', next_attempt_at = NULL, \
                     lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = $1 \
                     WHERE subscription_id = $2 AND status IN {OPEN_RENEWAL}"
                ))
                .bind(at(now))
                .bind(sub)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE invoices SET status = 'void' WHERE subscription_id = $1 AND status = 'open'",
                )
                .bind(sub)
                .execute(&mut *tx)
                .await?;
            }
            if let Some(sub) = change.wake_renewals_of {
                sqlx::query(
                    "UPDATE renewals SET next_attempt_at = $1, updated_at = $1 \
                     WHERE subscription_id = $2 AND status IN ('retrying', 'action_required')",
                )
                .bind(at(now))
                .bind(sub)
                .execute(&mut *tx)
                .await?;
            }
            if let Some(settle) = &change.settle_invoice {
                let done = sqlx::query(
                    "UPDATE invoices SET status = $1, paid_at = $2, payment_reference = COALESCE($3, payment_reference) \
                     WHERE number = $4 AND status = 'open'",
                )
                .bind(&settle.status)
                .bind(settle.paid_at.map(at))
                .bind(&settle.reference)
                .bind(&settle.number)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() != 1 {
                    return Err(StoreError::Conflict(format!(
                        "invoice {} is not open",
                        settle.number
                    )));
                }
            }
            if let Some(r) = &change.request {
                let updated: Option<i64> = sqlx::query_scalar(
                    "UPDATE requests SET status = $1, resolution = COALESCE($2, resolution), updated_at = $3, \
                     resolved_at = CASE WHEN $4 THEN $3 ELSE resolved_at END \
                     WHERE id = $5 AND status = ANY($6) RETURNING id",
                )
                .bind(&r.status)
                .bind(&r.resolution)
                .bind(at(now))
                .bind(r.resolved)
                .bind(r.id)
                .bind(&r.expect_status)
                .fetch_optional(&mut *tx)
                .await?;
                if updated.is_none() {
                    return Err(StoreError::Conflict(format!(
                        "request {} is no longer {}",
                        r.id,
                        r.expect_status.join(" or ")
                    )));
                }
            }
            let invoice_number = match &change.invoice {
                Some(inv) => Some(insert_invoice(tx, inv).await?),
                None => change.settle_invoice.as_ref().map(|s| s.number.clone()),
            };
            if let (Some(kind), Some(lease)) = (change.renewal_kind, &change.lease) {
                sqlx::query("UPDATE renewals SET kind = $1 WHERE id = $2")
                    .bind(kind.as_str())
                    .bind(lease.renewal_id)
                    .execute(&mut *tx)
                    .await?;
            }
            if let (Some(r), Some(lease)) = (&change.renewal, &change.lease) {
                sqlx::query(
                    "UPDATE renewals SET status = $1, next_attempt_at = $2, outcome_note = COALESCE($3, outcome_note), \
                     lease_token = CASE WHEN $4 THEN NULL ELSE lease_token END, \
                     lease_owner = CASE WHEN $4 THEN NULL ELSE lease_owner END, \
                     lease_expires_at = CASE WHEN $4 THEN NULL ELSE lease_expires_at END, \
                     updated_at = $5 WHERE id = $6",
                )
                .bind(r.status.as_str())
                .bind(r.next_attempt_at.map(at))
                .bind(&r.note)
                .bind(r.release)
                .bind(at(now))
                .bind(lease.renewal_id)
                .execute(&mut *tx)
                .await?;
            }
            let mut queued = 0u32;
            for m in &change.mails {
                if insert_mail(tx, m, invoice_number.as_deref(), now).await? {
                    queued += 1;
                }
            }
            if change.only_if_mail_is_new && queued == 0 {
                return Ok(Finish::Rollback(Applied::default()));
            }
            for e in &change.events {
                insert_event(tx, e, invoice_number.as_deref(), now).await?;
            }
            let invoice = match &invoice_number {
                Some(n) => {
                    let row = sqlx::query(&format!(
                        "SELECT {INVOICE_COLUMNS} FROM invoices WHERE number = $1"
                    ))
                    .bind(n)
                    .fetch_one(&mut *tx)
                    .await?;
                    Some(invoice_from(&row)?)
                }
                None => None,
            };
            Ok(Finish::Commit(Applied {
                applied: true,
                invoice,
                mails_queued: queued,
            }))
        })
    }

    async fn claim_mail(
        &self,
        now: Timestamp,
        claim: &Claim,
        limit: u32,
    ) -> StoreResult<Vec<Mail>> {
        if self.is_draining() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "UPDATE outbox SET lease_token = $1, lease_expires_at = $2 \
             WHERE id IN (SELECT id FROM outbox WHERE status = 'queued' AND next_attempt_at <= $3 \
                          AND (lease_token IS NULL OR lease_expires_at <= $3) ORDER BY next_attempt_at, id LIMIT $4 \
                          FOR UPDATE SKIP LOCKED) \
             RETURNING {MAIL_COLUMNS}"
        );
        let rows = transaction!(self, "claim_mail", idempotent, |tx| async {
            let rows = sqlx::query(&sql)
                .bind(&claim.token)
                .bind(at(claim.expires_at))
                .bind(at(now))
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await?;
            Ok(Finish::Commit(rows))
        })?;
        let mut mails: Vec<Mail> = rows.iter().map(mail_from).collect::<StoreResult<_>>()?;
        mails.sort_by_key(|m| m.id);
        Ok(mails)
    }

    async fn mails_sent(&self, ids: &[i64], token: &str, now: Timestamp) -> StoreResult<Vec<i64>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        transaction!(self, "mails_sent", idempotent, |tx| async {
            let sent: Vec<(i64, i64, String)> = sqlx::query_as(
                "UPDATE outbox SET status = 'sent', sent_at = $1, attempts = attempts + 1, lease_token = NULL, \
                 lease_expires_at = NULL, last_error = NULL WHERE id = ANY($2) AND lease_token = $3 \
                 RETURNING id, subscription_id, kind",
            )
            .bind(at(now))
            .bind(ids)
            .bind(token)
            .fetch_all(&mut *tx)
            .await?;
            let mut sent = sent;
            sent.sort_by_key(|(id, ..)| *id);
            for (id, sub, kind) in &sent {
                insert_event(
                    tx,
                    &NewEvent {
                        kind: "mail.sent".into(),
                        subscription_id: Some(*sub),
                        outcome: Some("sent".into()),
                        detail: serde_json::json!({"mail_id": id, "mail_kind": kind}),
                        ..Default::default()
                    },
                    None,
                    now,
                )
                .await?;
            }
            let ids: Vec<i64> = sent.into_iter().map(|(id, ..)| id).collect();
            Ok(if ids.is_empty() {
                Finish::Rollback(ids)
            } else {
                Finish::Commit(ids)
            })
        })
    }

    async fn mark_notified(
        &self,
        subscription_id: i64,
        period_key: i64,
        decided: &NoticesDecided,
    ) -> StoreResult<()> {
        transaction!(self, "mark_notified", idempotent, |tx| async {
            sqlx::query(
                "UPDATE subscriptions SET notified_period_end = current_period_end \
                 WHERE id = $1 AND extract(epoch FROM current_period_end)::bigint = $2 \
                 AND card_expiry IS NOT DISTINCT FROM $3",
            )
            .bind(subscription_id)
            .bind(period_key)
            .bind(decided.card_expiry.as_deref())
            .execute(&mut *tx)
            .await?;
            Ok(Finish::Commit(()))
        })
    }

    async fn mail_failed(
        &self,
        id: i64,
        token: &str,
        error: &str,
        retry_at: Option<Timestamp>,
        now: Timestamp,
    ) -> StoreResult<()> {
        let status = if retry_at.is_some() {
            "queued"
        } else {
            "failed"
        };
        transaction!(self, "mail_failed", idempotent, |tx| async {
            let done = sqlx::query(
                "UPDATE outbox SET status = $1, attempts = attempts + 1, last_error = $2, next_attempt_at = $3, \
                 lease_token = NULL, lease_expires_at = NULL WHERE id = $4 AND lease_token = $5",
            )
            .bind(status)
            .bind(error)
            .bind(at(retry_at.unwrap_or(now)))
            .bind(id)
            .bind(token)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() != 1 {
                return Err(StoreError::Conflict(format!(
                    "mail {id} is no longer claimed by this sender"
                )));
            }
            Ok(Finish::Commit(()))
        })
    }

    async fn list_mail(&self, f: &MailFilter) -> StoreResult<Vec<Mail>> {
        retrying!(self, "list_mail", async {
            let mut q = QueryBuilder::<Postgres>::new(format!(
                "SELECT {MAIL_COLUMNS} FROM outbox WHERE true"
            ));
            if let Some(status) = &f.status {
                q.push(" AND status = ").push_bind(status);
            }
            if let Some(id) = f.subscription_id {
                q.push(" AND subscription_id = ").push_bind(id);
            }
            let rows = q.push(" ORDER BY id").build().fetch_all(&self.pool).await?;
            rows.iter().map(mail_from).collect()
        })
    }

    async fn invoice(&self, number: &str) -> StoreResult<Option<Invoice>> {
        let sql = format!("SELECT {INVOICE_COLUMNS} FROM invoices WHERE number = $1");
        retrying!(self, "invoice", async {
            let row = sqlx::query(&sql)
                .bind(number)
                .fetch_optional(&self.pool)
                .await?;
            row.map(|r| invoice_from(&r)).transpose()
        })
    }

    async fn list_invoices(&self, subscription_id: Option<i64>) -> StoreResult<Vec<Invoice>> {
        retrying!(self, "list_invoices", async {
            // Each filter only when given, so the index serves it.
            let mut q = QueryBuilder::<Postgres>::new(format!(
                "SELECT {INVOICE_COLUMNS} FROM invoices WHERE true"
            ));
            if let Some(id) = subscription_id {
                q.push(" AND subscription_id = ").push_bind(id);
            }
            // COLLATE "C": byte order, as SQLite sorts, whatever the database's locale.
            let rows = q
                .push(" ORDER BY series COLLATE \"C\", seq")
                .build()
                .fetch_all(&self.pool)
                .await?;
            rows.iter().map(invoice_from).collect()
        })
    }

    async fn events(&self, subscription_id: Option<i64>) -> StoreResult<Vec<Event>> {
        retrying!(self, "events", async {
            let mut q = QueryBuilder::<Postgres>::new("SELECT * FROM events WHERE true");
            if let Some(id) = subscription_id {
                q.push(" AND subscription_id = ").push_bind(id);
            }
            let rows = q.push(" ORDER BY id").build().fetch_all(&self.pool).await?;
            rows.iter().map(event_from).collect()
        })
    }

    async fn terms_acceptances(&self) -> StoreResult<Vec<(String, i64)>> {
        retrying!(self, "terms_acceptances", async {
            Ok(sqlx::query_as(
                "SELECT version, COUNT(*) FROM terms_acceptances GROUP BY version ORDER BY version COLLATE \"C\"",
            )
            .fetch_all(&self.pool)
            .await?)
        })
    }

    async fn gauges(&self, now: Timestamp) -> StoreResult<Gauges> {
        retrying!(self, "gauges", async {
            // Each count reads one range of an index: the due ones, not all.
            let (due, past_due, unknown): (i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT COUNT(*) FROM subscriptions WHERE status = 'active' AND current_period_end <= $1), \
                        (SELECT COUNT(*) FROM subscriptions WHERE status = 'past_due'), \
                        (SELECT COUNT(*) FROM payment_attempts WHERE status IN ('pending', 'unknown'))",
            )
            .bind(at(now))
            .fetch_one(&self.pool)
            .await?;
            let mail: Vec<(String, String, i64)> = sqlx::query_as(
                "SELECT kind, status, COUNT(*) FROM outbox GROUP BY kind, status \
                 ORDER BY kind COLLATE \"C\", status COLLATE \"C\"",
            )
            .fetch_all(&self.pool)
            .await?;
            let oldest: Option<DateTime<Utc>> =
                sqlx::query_scalar("SELECT MIN(created_at) FROM outbox WHERE status = 'queued'")
                    .fetch_one(&self.pool)
                    .await?;
            Ok(Gauges {
                due_subscriptions: due,
                past_due_subscriptions: past_due,
                unknown_charges: Some(unknown),
                mail,
                oldest_queued_mail_at: opt_ts(oldest)?,
            })
        })
    }

    fn stop_claiming(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    fn claiming_stopped(&self) -> bool {
        self.is_draining()
    }

    async fn requeue_mail(&self, id: i64, now: Timestamp) -> StoreResult<Mail> {
        let sql = format!(
            "UPDATE outbox SET status = 'queued', attempts = 0, next_attempt_at = $1, lease_token = NULL, \
             lease_expires_at = NULL WHERE id = $2 AND status = 'failed' RETURNING {MAIL_COLUMNS}"
        );
        let row = transaction!(self, "requeue_mail", |tx| async {
            let current: Option<(String, i64, i64, i64)> = sqlx::query_as(
                "SELECT status, attempts, subscription_id, customer_id FROM outbox WHERE id = $1 FOR UPDATE",
            )
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((status, attempts, subscription_id, customer_id)) = current else {
                return Err(StoreError::NotFound(format!("mail {id}")));
            };
            if status != "failed" {
                return Err(StoreError::Conflict(format!(
                    "mail {id} is {status}; only failed mail can be retried"
                )));
            }
            let row = sqlx::query(&sql)
                .bind(at(now))
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
            insert_event(
                tx,
                &NewEvent {
                    kind: "mail.requeued".into(),
                    subscription_id: Some(subscription_id),
                    customer_id: Some(customer_id),
                    outcome: Some("queued".into()),
                    detail: serde_json::json!({"mail_id": id, "previous_attempts": attempts}),
                    ..Default::default()
                },
                None,
                now,
            )
            .await?;
            Ok(Finish::Commit(row))
        })?;
        mail_from(&row)
    }
}
