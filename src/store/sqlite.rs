//! The embedded SQLite store: one file, WAL mode, a committed renewal
//! survives power loss (`synchronous = FULL`, or for the store's own writer
//! `NORMAL` with the WAL synced before a write is answered), foreign keys on.
//!
//! SQLite has one writer at a time. Every write transaction starts with
//! `BEGIN IMMEDIATE` (a deferred transaction that reads and then writes can
//! fail outright when another writer commits in between) and, inside this
//! process, waits its turn on an async mutex instead of spinning on
//! SQLite's busy handler. Turns that follow each other closely share one
//! durable commit (see `group_commit`): a call returns only once its write
//! is on disk, but many renewals in flight no longer queue for one fsync each.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use jiff::civil::Date;
use jiff::Timestamp;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};

use super::*;
use crate::domain::AutoRenew;

/// Migrations compiled into the binary, applied in order.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "renewable_index",
        include_str!("../../migrations/sqlite/0002_renewable_index.sql"),
    ),
    (
        3,
        "reminder_index",
        include_str!("../../migrations/sqlite/0003_reminder_index.sql"),
    ),
    (
        4,
        "notice_marker",
        include_str!("../../migrations/sqlite/0004_notice_marker.sql"),
    ),
];

mod group_commit;
use group_commit::{Durability, GroupCommit, WriteTx};
pub mod memory;
mod raw;
use raw::Cols;
mod readers;
use readers::Readers;
/// SQLite connections driven on the caller's thread, for the process's
/// other SQLite files (the sandbox gateway's ledger).
pub(crate) mod direct {
    pub(crate) use super::raw::{Cols, RawRow as Row};
    pub(crate) use super::readers::Readers as Connections;
    pub(crate) use super::script::{Arg, Script, Tagged};
}
mod script;
use script::{Arg, Script, Tagged};

pub struct SqliteStore {
    pool: SqlitePool,
    /// The sweep's reads, run on the calling thread (see `readers`).
    readers: Readers,
    /// Every write goes through here, one at a time, batched into shared commits.
    writer: GroupCommit,
    /// Set by [`Store::stop_claiming`]: claims find nothing from then on.
    draining: std::sync::atomic::AtomicBool,
}

type Tx<'a> = WriteTx<'a>;

/// Reader connections driven directly: one per core of the machines renewd
/// is sized for (a read holds its connection only while SQLite runs it).
const READERS: usize = 2;

/// WAL pages after which the writer's COMMIT checkpoints (SQLite's
/// default is 1,000).
const WAL_AUTOCHECKPOINT: u32 = 10_000;

/// How long a connection waits for another process's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) fn secs(t: Timestamp) -> i64 {
    t.as_second()
}

pub(crate) fn ts(s: i64) -> StoreResult<Timestamp> {
    Timestamp::from_second(s).map_err(|e| StoreError::Corrupt(format!("instant {s}: {e}")))
}

fn opt_ts(s: Option<i64>) -> StoreResult<Option<Timestamp>> {
    s.map(ts).transpose()
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://PATH`).
    pub async fn open(url: &str, max_connections: u32) -> StoreResult<Self> {
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        if let Some(parent) = Path::new(path).parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    StoreError::Database(sqlx::Error::Configuration(
                        format!("cannot create database directory {}: {e}", parent.display())
                            .into(),
                    ))
                })?;
            }
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        // Every write runs in a savepoint of the batch transaction, whose
        // statement journal spilled to a temporary file once it held over
        // 64 KiB of pages: most writes created, wrote and deleted a file in
        // the system's temporary directory (renewd bench, "time travel").
        // In memory it is the pages a write changes that existed before it,
        // freed when its savepoint is released. Only the writer: readers'
        // large sorts may still spill to disk.
        //
        // Its COMMITs write the WAL without waiting for the disk; the group
        // commit syncs the WAL itself before any writer is answered, while
        // the next writers go on (`group_commit`, "Durability").
        //
        // It checkpoints once the WAL holds 10,000 pages (40 MiB), not
        // SQLite's 1,000: a page the year's renewals keep changing is copied
        // to the database once per checkpoint, so fewer checkpoints write
        // fewer bytes (renewd bench, "time travel": 6% fewer bytes; the year
        // on disk as long or up to 8 s shorter in four alternating pairs;
        // the gateway-bound line unchanged).
        let writer = GroupCommit::open(
            &options
                .clone()
                .pragma("temp_store", "memory")
                .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT.to_string()),
            BUSY_TIMEOUT,
            Durability::AfterCommit,
        )
        .await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(Duration::from_secs(60))
            // A connection to a local file does not go stale, and the ping
            // that tests it is one more hand-off to its worker thread and
            // back before every read (renewd bench, "time travel").
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        let readers = Readers::open(&options, READERS, BUSY_TIMEOUT).await?;
        Ok(SqliteStore {
            pool,
            readers,
            writer,
            draining: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// This writer's turn: `tx` holds the turn until it commits (which
    /// waits for the shared commit to be durable) or is dropped (which rolls
    /// it back). The `()` keeps the call sites' `(_guard, tx)` shape.
    async fn write_tx(&self) -> StoreResult<((), Tx<'_>)> {
        Ok(((), self.writer.begin().await?))
    }

    /// A batch of notices in one write: each mail is inserted unless
    /// already queued (then a row tagged `mail` comes back), then its event,
    /// only if that insert wrote a row. Each notice is its own script, all
    /// of the same text, so its two statements are prepared once and kept:
    /// one script of the whole batch was a text of its own every time,
    /// prepared anew, about 100 µs a notice (renewd bench, "time travel").
    async fn queue_batch(&self, notices: &[Notice], now: Timestamp) -> StoreResult<Vec<bool>> {
        if notices.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.script_tx().await?;
        let mut queued = Vec::with_capacity(notices.len());
        let mut marked = false;
        for (i, n) in notices.iter().enumerate() {
            // The scripts run on this thread without waiting for anything:
            // let the runtime's other tasks in now and then (the writer's
            // turn is held across the pause, which is safe: it is async).
            if i > 0 && i % 64 == 0 {
                tokio::task::yield_now().await;
            }
            let mut s = Script::default();
            push_mail_returning(&mut s, &n.mail, &InvoiceRef::None, now, "'mail' AS tag");
            push_event_if_inserted(&mut s, &n.event, now);
            if let Some(decided) = &n.completes_upcoming {
                // Queued now or before: the notice scan passes over the
                // subscription until its period or its card changes.
                push_mark_notified(&mut s, n.mail.subscription_id, n.mail.period_key, decided);
            }
            let out = tx.run(s).await?;
            marked |= out.has("marked");
            queued.push(out.has("mail"));
        }
        finish_write(tx, marked || queued.contains(&true)).await?;
        Ok(queued)
    }

    /// As `write_tx`, for a write made of scripts run with `Tx::run`: the
    /// savepoint opens in the first script's round trip.
    async fn script_tx(&self) -> StoreResult<Tx<'_>> {
        self.writer.begin_deferred().await
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

fn subscription_from(r: &impl Cols) -> StoreResult<Subscription> {
    let status: String = r.col("status")?;
    let payment_kind: String = r.col("payment_kind")?;
    let payment = match payment_kind.as_str() {
        "card" => PaymentMethod::Card {
            token: r.col::<Option<String>>("card_token")?.unwrap_or_default(),
            brand: r.col::<Option<String>>("card_brand")?.unwrap_or_default(),
            last4: r.col::<Option<String>>("card_last4")?.unwrap_or_default(),
            expiry: r.col("card_expiry")?,
        },
        _ => PaymentMethod::BankTransfer {
            contact_name: r.col::<Option<String>>("contact_name")?.unwrap_or_default(),
            contact_phone: r
                .col::<Option<String>>("contact_phone")?
                .unwrap_or_default(),
            contact_email: r
                .col::<Option<String>>("contact_email")?
                .unwrap_or_default(),
        },
    };
    let anchor: Option<String> = r.col("anchor_date")?;
    Ok(Subscription {
        id: r.col("id")?,
        customer_id: r.col("customer_id")?,
        plan: r.col("plan")?,
        status: status
            .parse()
            .map_err(|e: crate::domain::subscription::UnknownStatus| {
                StoreError::Corrupt(e.to_string())
            })?,
        auto_renew: AutoRenew {
            on: r.col("auto_renew")?,
            can_enable: r.col("auto_renew_can_enable")?,
        },
        anchor_date: anchor
            .map(|a| {
                a.parse::<Date>()
                    .map_err(|e| StoreError::Corrupt(format!("anchor {a}: {e}")))
            })
            .transpose()?,
        term: r.col("term")?,
        current_period_start: opt_ts(r.col("current_period_start")?)?,
        current_period_end: opt_ts(r.col("current_period_end")?)?,
        payment,
        terms_acceptance_id: r.col("terms_acceptance_id")?,
        cancel_at_period_end: r.col("cancel_at_period_end")?,
        cancelled_at: opt_ts(r.col("cancelled_at")?)?,
        created_at: ts(r.col("created_at")?)?,
        updated_at: ts(r.col("updated_at")?)?,
    })
}

fn customer_from(r: &impl Cols, prefix: &str) -> StoreResult<Customer> {
    let col = |c: &str| format!("{prefix}{c}");
    Ok(Customer {
        id: r.col(col("id").as_str())?,
        name: r.col(col("name").as_str())?,
        email: r.col(col("email").as_str())?,
        timezone: r.col(col("timezone").as_str())?,
        locale: r.col(col("locale").as_str())?,
        country: r.col(col("country").as_str())?,
        currency: r.col(col("currency").as_str())?,
        created_at: ts(r.col(col("created_at").as_str())?)?,
    })
}

fn renewal_from(r: &impl Cols) -> StoreResult<Renewal> {
    let kind: String = r.col("r_kind")?;
    let status: String = r.col("r_status")?;
    Ok(Renewal {
        id: r.col("r_id")?,
        subscription_id: r.col("r_subscription_id")?,
        kind: match kind.as_str() {
            "purchase" => RenewalKind::Purchase,
            "manual" => RenewalKind::Manual,
            _ => RenewalKind::Auto,
        },
        period_start: ts(r.col("r_period_start")?)?,
        term: r.col("r_term")?,
        status: RenewalStatus::parse(&status)?,
        attempt_count: r.col("r_attempt_count")?,
        first_attempt_at: opt_ts(r.col("r_first_attempt_at")?)?,
        next_attempt_at: opt_ts(r.col("r_next_attempt_at")?)?,
        terms_acceptance_id: r.col("r_terms_acceptance_id")?,
        auto_renew_after: r.col("r_auto_renew_after")?,
    })
}

fn attempt_from(r: &impl Cols) -> StoreResult<Attempt> {
    let status: String = r.col("status")?;
    let draft: String = r.col("invoice_draft")?;
    Ok(Attempt {
        id: r.col("id")?,
        renewal_id: r.col("renewal_id")?,
        attempt_no: r.col("attempt_no")?,
        idempotency_key: r.col("idempotency_key")?,
        payment_method: r.col("payment_method")?,
        amount_minor: r.col("amount_minor")?,
        currency: r.col("currency")?,
        invoice_draft: serde_json::from_str(&draft)
            .map_err(|e| StoreError::Corrupt(format!("invoice draft: {e}")))?,
        status: AttemptStatus::parse(&status)?,
        reconcile_count: r.col("reconcile_count")?,
        created_at: ts(r.col("created_at")?)?,
    })
}

fn invoice_from(r: &impl Cols) -> StoreResult<Invoice> {
    let doc: String = r.col("document")?;
    Ok(Invoice {
        number: r.col("number")?,
        renewal_id: r.col("renewal_id")?,
        subscription_id: r.col("subscription_id")?,
        customer_id: r.col("customer_id")?,
        status: r.col("status")?,
        currency: r.col("currency")?,
        subtotal_minor: r.col("subtotal_minor")?,
        tax_minor: r.col("tax_minor")?,
        total_minor: r.col("total_minor")?,
        issued_at: ts(r.col("issued_at")?)?,
        due_at: opt_ts(r.col("due_at")?)?,
        paid_at: opt_ts(r.col("paid_at")?)?,
        period_start: ts(r.col("period_start")?)?,
        period_end: ts(r.col("period_end")?)?,
        payment_kind: r.col("payment_kind")?,
        payment_reference: r.col("payment_reference")?,
        document: serde_json::from_str(&doc)
            .map_err(|e| StoreError::Corrupt(format!("invoice document: {e}")))?,
    })
}

fn mail_from(r: &impl Cols) -> StoreResult<Mail> {
    let kind: String = r.col("kind")?;
    let context: String = r.col("context")?;
    Ok(Mail {
        id: r.col("id")?,
        subscription_id: r.col("subscription_id")?,
        customer_id: r.col("customer_id")?,
        kind: kind
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("mail kind {kind}")))?,
        period_key: r.col("period_key")?,
        offset_key: r.col("offset_key")?,
        recipient: r.col("recipient")?,
        locale: r.col("locale")?,
        invoice_number: r.col("invoice_number")?,
        context: serde_json::from_str(&context)
            .map_err(|e| StoreError::Corrupt(format!("mail context: {e}")))?,
        status: r.col("status")?,
        attempts: r.col("attempts")?,
        last_error: r.col("last_error")?,
        created_at: ts(r.col("created_at")?)?,
        sent_at: opt_ts(r.col("sent_at")?)?,
    })
}

fn request_from(r: &impl Cols) -> StoreResult<Request> {
    Ok(Request {
        id: r.col("id")?,
        subscription_id: r.col("subscription_id")?,
        kind: r.col("kind")?,
        status: r.col("status")?,
        reason: r.col("reason")?,
        resolution: r.col("resolution")?,
        created_at: ts(r.col("created_at")?)?,
        updated_at: ts(r.col("updated_at")?)?,
        resolved_at: opt_ts(r.col("resolved_at")?)?,
    })
}

/// Ends a write: committed (and durable) if it `changed` anything, else
/// rolled back at once. A claim or an opening that found nothing has nothing
/// to make durable, and need not wait for the batch's flush (renewd bench,
/// "time travel": most sweeps end with such empty rounds).
async fn finish_write(tx: Tx<'_>, changed: bool) -> StoreResult<()> {
    if changed {
        tx.commit().await
    } else {
        tx.rollback().await
    }
}

/// The lease check that opens a leased write's script.
fn push_lease_check(s: &mut Script, lease: &Lease) {
    s.push(
        "SELECT 'lease' AS tag, lease_token FROM renewals WHERE id = ?",
        [lease.renewal_id.into()],
    );
}

/// Whether the lease read by [`push_lease_check`] is still ours.
fn lease_held(out: &Tagged, lease: &Lease) -> StoreResult<()> {
    match out.first("lease") {
        Some(row) if row.col::<Option<String>>("lease_token")?.as_deref() == Some(&lease.token) => {
            Ok(())
        }
        Some(_) => Err(StoreError::LeaseLost(lease.renewal_id)),
        None => Err(StoreError::NotFound(format!(
            "renewal {}",
            lease.renewal_id
        ))),
    }
}

/// Runs a leased write's script. If the lease is no longer ours, or a
/// statement fails, the write is undone whole and the lease's fate is the
/// error (a lost lease explains a failed statement, e.g. the invoice of an
/// attempt another instance already recorded).
async fn run_leased(tx: &mut Tx<'_>, s: Script, lease: &Lease) -> StoreResult<Tagged> {
    match tx.run(s).await {
        Ok(out) => match lease_held(&out, lease) {
            Ok(()) => Ok(out),
            Err(e) => {
                tx.undo().await?;
                Err(e)
            }
        },
        Err(e) => {
            tx.undo().await?;
            let mut check = Script::default();
            push_lease_check(&mut check, lease);
            lease_held(&tx.run(check).await?, lease)?;
            Err(e)
        }
    }
}

/// The invoice number a write's mail and events point to: none, one
/// already issued, or the one this same script issues (read back from the
/// series counter the script just advanced).
enum InvoiceRef<'a> {
    None,
    Known(&'a str),
    Issued(&'a NewInvoice),
}

impl InvoiceRef<'_> {
    /// The number as an SQL expression, and its arguments.
    fn sql(&self) -> (&'static str, Vec<Arg>) {
        match self {
            InvoiceRef::None => ("NULL", Vec::new()),
            InvoiceRef::Known(n) => ("?", vec![(*n).into()]),
            InvoiceRef::Issued(inv) => (
                "(SELECT series || '-' || printf('%0*d', ?, last_seq) FROM invoice_counters WHERE series = ?)",
                vec![i64::from(inv.digits).into(), (&inv.series).into()],
            ),
        }
    }
}

/// One INSERT for all of a write's events, in order.
/// The events columns, in the order of [`event_args`].
const EVENT_INSERT: &str =
    "INSERT INTO events (at, kind, subscription_id, customer_id, invoice_number, \
     amount_minor, currency, period_end, idempotency_key, outcome, detail)";

fn push_events(s: &mut Script, events: &[NewEvent], invoice: &InvoiceRef<'_>, now: Timestamp) {
    if events.is_empty() {
        return;
    }
    s.fragment(&format!("{EVENT_INSERT} VALUES "), []);
    for (i, e) in events.iter().enumerate() {
        let (number, number_args) = invoice.sql();
        let args = event_args(e, number_args, now);
        let sep = if i == 0 { "" } else { ", " };
        s.fragment(
            &format!("{sep}(?, ?, ?, ?, {number}, ?, ?, ?, ?, ?, ?)"),
            args,
        );
    }
    s.end();
}

async fn insert_event(
    tx: &mut Tx<'_>,
    e: &NewEvent,
    invoice_number: Option<&str>,
    now: Timestamp,
) -> StoreResult<()> {
    let mut s = Script::default();
    let invoice = invoice_number.map_or(InvoiceRef::None, InvoiceRef::Known);
    push_events(&mut s, std::slice::from_ref(e), &invoice, now);
    tx.run(s).await?;
    Ok(())
}

/// Queues a mail unless the same one is queued already; tagged `mail` when
/// it was queued.
fn push_mail(s: &mut Script, m: &NewMail, invoice: &InvoiceRef<'_>, now: Timestamp) {
    push_mail_returning(s, m, invoice, now, "'mail' AS tag");
}

/// Inserts a mail unless it is already queued; the row `returning` comes
/// back when it was inserted.
fn push_mail_returning(
    s: &mut Script,
    m: &NewMail,
    invoice: &InvoiceRef<'_>,
    now: Timestamp,
    returning: &str,
) {
    let (number, number_args) = invoice.sql();
    let mut args: Vec<Arg> = vec![
        m.subscription_id.into(),
        m.customer_id.into(),
        m.kind.as_str().into(),
        m.period_key.into(),
        m.offset_key.into(),
        (&m.recipient).into(),
        (&m.locale).into(),
    ];
    args.extend(number_args);
    args.extend([
        m.context.to_string().into(),
        secs(now).into(),
        secs(now).into(),
    ]);
    s.push(
        &format!(
            "INSERT INTO outbox (subscription_id, customer_id, kind, period_key, offset_key, recipient, locale, \
             invoice_number, context, status, next_attempt_at, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, {number}, ?, 'queued', ?, ?) \
             ON CONFLICT (subscription_id, period_key, kind, offset_key) DO NOTHING RETURNING {returning}"
        ),
        args,
    );
}

/// An audit event written only if the statement before it (a mail's
/// insert) wrote a row: `changes()` is 0 after `DO NOTHING`.
fn push_event_if_inserted(s: &mut Script, e: &NewEvent, now: Timestamp) {
    s.push(
        &format!("{EVENT_INSERT} SELECT ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ? WHERE changes() = 1"),
        event_args(e, Vec::new(), now),
    );
}

/// An event's values in column order, its invoice number as the arguments
/// of that column's SQL.
fn event_args(e: &NewEvent, number_args: Vec<Arg>, now: Timestamp) -> Vec<Arg> {
    let mut args: Vec<Arg> = vec![
        secs(now).into(),
        (&e.kind).into(),
        e.subscription_id.into(),
        e.customer_id.into(),
    ];
    args.extend(number_args);
    args.extend([
        e.amount_minor.into(),
        (&e.currency).into(),
        e.period_end.map(secs).into(),
        (&e.idempotency_key).into(),
        (&e.outcome).into(),
        e.detail.to_string().into(),
    ]);
    args
}

/// Issues an invoice with the next number of its series. The counter row is
/// written first in the transaction, so under BEGIN IMMEDIATE nobody else
/// can take a number until we commit or roll back: numbers are gap-free and
/// strictly increasing.
fn push_invoice(s: &mut Script, inv: &NewInvoice) {
    s.push(
        "INSERT INTO invoice_counters (series, last_seq) VALUES (?, 1) \
         ON CONFLICT (series) DO UPDATE SET last_seq = last_seq + 1",
        [(&inv.series).into()],
    );
    let (number, number_args) = InvoiceRef::Issued(inv).sql();
    let mut args = number_args;
    args.extend([
        (&inv.series).into(),
        (&inv.series).into(),
        inv.subscription_id.into(),
        inv.customer_id.into(),
        inv.renewal_id.into(),
        inv.attempt_id.into(),
        (&inv.status).into(),
        (&inv.amounts.currency).into(),
        inv.amounts.subtotal_minor.into(),
        inv.amounts.tax_minor.into(),
        inv.amounts.total_minor.into(),
        secs(inv.issued_at).into(),
        inv.due_at.map(secs).into(),
        inv.paid_at.map(secs).into(),
        secs(inv.period_start).into(),
        secs(inv.period_end).into(),
        (&inv.payment_kind).into(),
        (&inv.payment_reference).into(),
        inv.document.to_string().into(),
    ]);
    s.push(
        &format!(
            "INSERT INTO invoices (number, series, seq, subscription_id, customer_id, renewal_id, attempt_id, status, \
             currency, subtotal_minor, tax_minor, total_minor, issued_at, due_at, paid_at, period_start, period_end, \
             payment_kind, payment_reference, document) \
             VALUES ({number}, ?, (SELECT last_seq FROM invoice_counters WHERE series = ?), \
             ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ),
        args,
    );
}

/// Marks a subscription's upcoming notices for the period ending at
/// `period_key` as queued (see `Store::mark_notified`); tagged `marked`
/// when it matched.
fn push_mark_notified(
    s: &mut Script,
    subscription_id: i64,
    period_key: i64,
    decided: &NoticesDecided,
) {
    s.push(
        "UPDATE subscriptions SET notified_period_end = current_period_end \
         WHERE id = ? AND current_period_end = ? AND card_expiry IS ? RETURNING 'marked' AS tag",
        [
            subscription_id.into(),
            period_key.into(),
            decided.card_expiry.as_deref().into(),
        ],
    );
}

/// The guarded subscription update; tagged `subscription` when it matched.
fn push_subscription(s: &mut Script, p: &SubscriptionPatch, now: Timestamp) {
    let mut sets = vec!["updated_at = ?".to_string()];
    let mut args: Vec<Arg> = vec![secs(now).into()];
    if let Some(st) = p.status {
        sets.push("status = ?".into());
        args.push(st.as_str().into());
        if st == crate::domain::Status::Cancelled {
            // In SQL the right-hand side sees the old row, so bind `now` again.
            sets.push("cancelled_at = ?".into());
            args.push(secs(now).into());
        }
    }
    if let Some(c) = p.cancel_at_period_end {
        sets.push("cancel_at_period_end = ?".into());
        args.push(c.into());
    }
    if let Some(a) = p.auto_renew {
        sets.push("auto_renew = ?, auto_renew_can_enable = ?".into());
        args.extend([a.on.into(), a.can_enable.into()]);
    }
    if let Some(period) = &p.period {
        sets.push(
            "anchor_date = ?, term = ?, current_period_start = ?, current_period_end = ?".into(),
        );
        args.extend([
            period.anchor_date.to_string().into(),
            period.term.into(),
            secs(period.start).into(),
            secs(period.end).into(),
        ]);
    }
    if let Some(pm) = &p.payment {
        sets.push(
            "payment_kind = ?, card_token = ?, card_brand = ?, card_last4 = ?, card_expiry = ?, \
             contact_name = ?, contact_phone = ?, contact_email = ?, notified_period_end = NULL"
                .into(),
        );
        let none = || Arg::Text(None);
        match pm {
            PaymentMethod::Card {
                token,
                brand,
                last4,
                expiry,
            } => args.extend([
                "card".into(),
                token.into(),
                brand.into(),
                last4.into(),
                expiry.into(),
                none(),
                none(),
                none(),
            ]),
            PaymentMethod::BankTransfer {
                contact_name,
                contact_phone,
                contact_email,
            } => args.extend([
                "bank_transfer".into(),
                none(),
                none(),
                none(),
                none(),
                contact_name.into(),
                contact_phone.into(),
                contact_email.into(),
            ]),
        }
    }
    if let Some(id) = p.terms_acceptance_id {
        sets.push("terms_acceptance_id = ?".into());
        args.push(id.into());
    }
    let mut sql = format!("UPDATE subscriptions SET {} WHERE id = ?", sets.join(", "));
    args.push(p.id.into());
    if !p.expect_status.is_empty() {
        let marks = vec!["?"; p.expect_status.len()].join(", ");
        sql.push_str(&format!(" AND status IN ({marks})"));
        args.extend(p.expect_status.iter().map(|st| st.as_str().into()));
    }
    match p.expect_period_end {
        Some(Some(end)) => {
            sql.push_str(" AND current_period_end = ?");
            args.push(secs(end).into());
        }
        Some(None) => sql.push_str(" AND current_period_end IS NULL"),
        None => {}
    }
    sql.push_str(" RETURNING 'subscription' AS tag");
    s.push(&sql, args);
}

fn subscription_conflict(p: &SubscriptionPatch) -> StoreError {
    StoreError::Conflict(format!(
        "subscription {} changed since it was read (expected status {:?}, period end {:?})",
        p.id, p.expect_status, p.expect_period_end
    ))
}

async fn patch_subscription(
    tx: &mut Tx<'_>,
    p: &SubscriptionPatch,
    now: Timestamp,
) -> StoreResult<()> {
    let mut s = Script::default();
    push_subscription(&mut s, p, now);
    if tx.run(s).await?.has("subscription") {
        Ok(())
    } else {
        Err(subscription_conflict(p))
    }
}

/// The `AND NOT ...` clause of [`Scan::skip_queued`] and the values of its
/// `?`s. The offsets and mail kind names, which come from the config, are
/// written inline; the reminder cutoffs, which move with `now`, are bound,
/// so the text recurs from day to day and stays prepared. Each reminder
/// probe is one lookup in the outbox's unique (subscription, period, kind,
/// offset) index; upcoming notices are marked on the subscription.
fn skip_queued_sql(skip: &QueuedNotice) -> (String, Vec<Arg>) {
    let queued = |kind: MailKind, offset: &str| {
        format!(
            "EXISTS (SELECT 1 FROM outbox o WHERE o.subscription_id = s.id AND o.period_key = s.current_period_end \
             AND o.kind = '{}' AND {offset})",
            kind.as_str()
        )
    };
    match skip {
        QueuedNotice::Reminders { offsets_days, now } => {
            let mut args = Vec::new();
            let arms: Vec<String> = QueuedNotice::reminder_cutoffs(offsets_days, *now)
                .into_iter()
                .map(|(d, cutoff)| match cutoff {
                    Some(c) => {
                        args.push(c.into());
                        format!("(o.offset_key = {d} AND s.current_period_end > ?)")
                    }
                    None => format!("o.offset_key = {d}"),
                })
                .collect();
            if arms.is_empty() {
                return (String::new(), args);
            }
            let sql = format!(
                " AND NOT {}",
                queued(
                    MailKind::RenewalReminder,
                    &format!("({})", arms.join(" OR "))
                )
            );
            (sql, args)
        }
        // The marker (migration 4): also the condition of the partial index
        // `subscriptions_notice`, which the notice scan reads.
        QueuedNotice::Upcoming => (
            " AND s.notified_period_end IS NOT s.current_period_end".into(),
            Vec::new(),
        ),
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> StoreResult<()> {
        let (_guard, mut tx) = self.write_tx().await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)",
        )
        .execute(&mut *tx)
        .await?;
        let current: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
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
            // A plain &str runs every statement in it (sqlx splits the tail).
            sqlx::Executor::execute(&mut *tx, sql).await?;
            sqlx::query("INSERT INTO schema_migrations (version, name) VALUES (?, ?)")
                .bind(version)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        if let Some(why) = self.writer.stopped() {
            return Err(StoreError::Database(sqlx::Error::Io(
                std::io::Error::other(why.to_string()),
            )));
        }
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn insert_customer(&self, c: &NewCustomer, now: Timestamp) -> StoreResult<Customer> {
        let (_guard, mut tx) = self.write_tx().await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO customers (name, email, timezone, locale, country, currency, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(&c.name)
        .bind(&c.email)
        .bind(&c.timezone)
        .bind(&c.locale)
        .bind(&c.country)
        .bind(&c.currency)
        .bind(secs(now))
        .fetch_one(&mut *tx)
        .await?;
        insert_event(
            &mut tx,
            &NewEvent {
                kind: "customer.created".into(),
                customer_id: Some(id),
                ..Default::default()
            },
            None,
            now,
        )
        .await?;
        tx.commit().await?;
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
        let row = sqlx::query(&format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers c WHERE c.id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| customer_from(&r, "c_")).transpose()
    }

    async fn count_customers(&self) -> StoreResult<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM customers")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn insert_purchase(
        &self,
        p: &NewPurchase,
        claim: &Claim,
        now: Timestamp,
    ) -> StoreResult<(Subscription, Renewal)> {
        let (_guard, mut tx) = self.write_tx().await?;
        let acceptance_id: i64 = sqlx::query_scalar(
            "INSERT INTO terms_acceptances (customer_id, version, accepted_at, context) VALUES (?, ?, ?, 'purchase') RETURNING id",
        )
        .bind(p.customer_id)
        .bind(&p.terms_version)
        .bind(secs(now))
        .fetch_one(&mut *tx)
        .await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO subscriptions (customer_id, plan, status, auto_renew, auto_renew_can_enable, payment_kind, \
             terms_acceptance_id, created_at, updated_at) VALUES (?, ?, 'pending_payment', 1, 1, ?, ?, ?, ?) RETURNING id",
        )
        .bind(p.customer_id)
        .bind(&p.plan)
        .bind(p.payment.kind())
        .bind(acceptance_id)
        .bind(secs(now))
        .bind(secs(now))
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("UPDATE terms_acceptances SET subscription_id = ? WHERE id = ?")
            .bind(id)
            .bind(acceptance_id)
            .execute(&mut *tx)
            .await?;
        patch_subscription(
            &mut tx,
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
             VALUES (?, 'purchase', ?, 1, 'pending', ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(id)
        .bind(secs(now))
        .bind(secs(now))
        .bind(&claim.token)
        .bind(&claim.owner)
        .bind(secs(claim.expires_at))
        .bind(acceptance_id)
        .bind(secs(now))
        .bind(secs(now))
        .fetch_one(&mut *tx)
        .await?;
        insert_event(
            &mut tx,
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
        tx.commit().await?;
        let work = self
            .renewal_work(renewal_id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("renewal {renewal_id}")))?;
        Ok((work.subscription, work.renewal))
    }

    async fn subscription(&self, id: i64) -> StoreResult<Option<Subscription>> {
        let row = sqlx::query(&format!(
            "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions s WHERE s.id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| subscription_from(&r)).transpose()
    }

    async fn list_subscriptions(&self, f: &SubscriptionFilter) -> StoreResult<Vec<Subscription>> {
        let mut q = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions s WHERE true"
        ));
        if let Some(status) = f.status {
            q.push(" AND s.status = ").push_bind(status.as_str());
        }
        if let Some(before) = f.due_before {
            q.push(" AND s.current_period_end < ")
                .push_bind(secs(before));
        }
        let rows = q
            .push(" ORDER BY s.id")
            .build()
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(subscription_from).collect()
    }

    async fn scan(&self, scan: &Scan) -> StoreResult<Vec<(Subscription, Customer)>> {
        let marks = vec!["?"; scan.statuses.len()].join(", ");
        // INDEXED BY: with `ORDER BY s.id` the planner otherwise walks the
        // whole table in id order, so a sweep that finds nothing would cost
        // O(table) (renewd bench, "empty sweep"); the due index reads only
        // the periods that have ended. The reminder scan reads its own
        // partial index, whose conditions are repeated as literals.
        let (index, conditions) = if scan.reads_reminder_index() {
            (
                "subscriptions_remind",
                " AND s.status = 'active' AND s.auto_renew = 0 AND s.cancel_at_period_end = 0",
            )
        } else if scan.reads_notice_index() {
            (
                "subscriptions_notice",
                " AND s.status = 'active' AND s.auto_renew = 1 AND s.payment_kind = 'card' \
                 AND s.cancel_at_period_end = 0",
            )
        } else {
            ("subscriptions_due", "")
        };
        let mut sql = format!(
            "SELECT {SUBSCRIPTION_COLUMNS}, {CUSTOMER_COLUMNS} FROM subscriptions s INDEXED BY {index} \
             JOIN customers c ON c.id = s.customer_id \
             WHERE s.status IN ({marks}) AND s.current_period_end <= ? AND s.id > ?{conditions}"
        );
        if scan.ends_after.is_some() {
            sql.push_str(" AND s.current_period_end > ?");
        }
        if scan.auto_renew.is_some() {
            sql.push_str(" AND s.auto_renew = ?");
        }
        if scan.card_only {
            sql.push_str(" AND s.payment_kind = 'card'");
        }
        if scan.not_cancelling {
            sql.push_str(" AND s.cancel_at_period_end = 0");
        }
        if scan.without_open_renewal {
            sql.push_str(
                " AND NOT EXISTS (SELECT 1 FROM renewals r WHERE r.subscription_id = s.id \
                 AND r.status IN ('pending', 'retrying', 'action_required', 'awaiting_transfer'))",
            );
        }
        let mut args: Vec<Arg> = scan.statuses.iter().map(|s| s.as_str().into()).collect();
        args.push(secs(scan.ends_at_or_before).into());
        args.push(scan.after_id.into());
        if let Some(after) = scan.ends_after {
            args.push(secs(after).into());
        }
        if let Some(on) = scan.auto_renew {
            args.push(on.into());
        }
        if let Some(skip) = &scan.skip_queued {
            let (clause, skip_args) = skip_queued_sql(skip);
            sql.push_str(&clause);
            args.extend(skip_args);
        }
        sql.push_str(" ORDER BY s.id LIMIT ?");
        args.push(scan.limit.into());
        let mut s = Script::default();
        s.push(&sql, args);
        let out = self.readers.run(&s).await?;
        out.all()
            .iter()
            .map(|r| Ok((subscription_from(r)?, customer_from(r, "c_")?)))
            .collect()
    }

    async fn open_due_renewals(
        &self,
        now: Timestamp,
        transfer_lead: jiff::SignedDuration,
    ) -> StoreResult<u64> {
        // One script on the write connection's handle: a write through
        // sqlx's query API would take the handle back from it first. The
        // partial index holds only subscriptions that can renew, so the
        // bank-transfer lead's window is not read row by row (migration 2).
        let at = secs(now);
        let mut s = Script::default();
        s.push(
            "INSERT INTO renewals (subscription_id, kind, period_start, term, status, next_attempt_at, \
             terms_acceptance_id, created_at, updated_at) \
             SELECT s.id, 'auto', s.current_period_end, s.term + 1, 'pending', s.current_period_end, \
                    s.terms_acceptance_id, ?, ? \
             FROM subscriptions s INDEXED BY subscriptions_renewable \
             WHERE s.status = 'active' AND s.current_period_end <= ? AND s.auto_renew = 1 \
               AND s.payment_kind = 'card' AND s.cancel_at_period_end = 0 \
             ON CONFLICT (subscription_id, period_start) DO NOTHING \
             RETURNING 'opened' AS tag",
            [at.into(), at.into(), at.into()],
        );
        s.push(
            "INSERT INTO renewals (subscription_id, kind, period_start, term, status, next_attempt_at, \
             terms_acceptance_id, created_at, updated_at) \
             SELECT s.id, 'auto', s.current_period_end, s.term + 1, 'pending', ?, s.terms_acceptance_id, ?, ? \
             FROM subscriptions s INDEXED BY subscriptions_renewable \
             WHERE s.status = 'active' AND s.current_period_end <= ? AND s.auto_renew = 1 \
               AND s.payment_kind = 'bank_transfer' AND s.cancel_at_period_end = 0 \
             ON CONFLICT (subscription_id, period_start) DO NOTHING \
             RETURNING 'opened' AS tag",
            [
                at.into(),
                at.into(),
                at.into(),
                secs(now.saturating_add(transfer_lead).unwrap_or(now)).into(),
            ],
        );
        let mut tx = self.script_tx().await?;
        let out = tx.run(s).await?;
        let opened = u64::try_from(out.count("opened")).unwrap_or(u64::MAX);
        finish_write(tx, opened > 0).await?;
        Ok(opened)
    }

    async fn open_manual_renewal(
        &self,
        r: &NewManualRenewal,
        claim: &Claim,
        now: Timestamp,
    ) -> StoreResult<Opened> {
        let (_guard, mut tx) = self.write_tx().await?;
        // Another renewal of this subscription still open for a different
        // period (say, a manual renewal of an expired subscription awaiting
        // its transfer): a second one would pay the same year twice.
        let other_open: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM renewals WHERE subscription_id = ? AND period_start <> ? \
             AND status IN ('pending', 'retrying', 'action_required', 'awaiting_transfer')",
        )
        .bind(r.subscription_id)
        .bind(secs(r.period_start))
        .fetch_one(&mut *tx)
        .await?;
        if other_open > 0 {
            return Ok(Opened::Busy);
        }
        let existing = sqlx::query(
            "SELECT id, status, lease_token, lease_expires_at FROM renewals WHERE subscription_id = ? AND period_start = ?",
        )
        .bind(r.subscription_id)
        .bind(secs(r.period_start))
        .fetch_optional(&mut *tx)
        .await?;
        let acceptance_id: i64 = sqlx::query_scalar(
            "INSERT INTO terms_acceptances (customer_id, subscription_id, version, accepted_at, context) \
             VALUES (?, ?, ?, ?, 'manual_renewal') RETURNING id",
        )
        .bind(r.customer_id)
        .bind(r.subscription_id)
        .bind(&r.terms_version)
        .bind(secs(now))
        .fetch_one(&mut *tx)
        .await?;
        let id = match existing {
            Some(row) => {
                let status: String = row.try_get("status")?;
                let held: Option<String> = row.try_get("lease_token")?;
                let until: Option<i64> = row.try_get("lease_expires_at")?;
                if status == "succeeded" {
                    return Ok(Opened::AlreadyPaid);
                }
                if status == "awaiting_transfer" {
                    return Ok(Opened::AwaitingTransfer);
                }
                if held.is_some() && until.is_some_and(|u| u > secs(now)) {
                    return Ok(Opened::Busy);
                }
                let id: i64 = row.try_get("id")?;
                // An automatic renewal row for the same period becomes this
                // manual one: the same row, so the period is paid at most once.
                sqlx::query(
                    "UPDATE renewals SET kind = 'manual', status = CASE WHEN status IN ('failed', 'skipped') \
                     THEN 'pending' ELSE status END, next_attempt_at = ?, terms_acceptance_id = ?, \
                     auto_renew_after = ?, updated_at = ? WHERE id = ?",
                )
                .bind(secs(now))
                .bind(acceptance_id)
                .bind(r.auto_renew_after)
                .bind(secs(now))
                .bind(id)
                .execute(&mut *tx)
                .await?;
                id
            }
            None => {
                sqlx::query_scalar(
                    "INSERT INTO renewals (subscription_id, kind, period_start, term, status, next_attempt_at, \
                     terms_acceptance_id, auto_renew_after, created_at, updated_at) \
                     VALUES (?, 'manual', ?, ?, 'pending', ?, ?, ?, ?, ?) RETURNING id",
                )
                .bind(r.subscription_id)
                .bind(secs(r.period_start))
                .bind(r.term)
                .bind(secs(now))
                .bind(acceptance_id)
                .bind(r.auto_renew_after)
                .bind(secs(now))
                .bind(secs(now))
                .fetch_one(&mut *tx)
                .await?
            }
        };
        sqlx::query("UPDATE renewals SET lease_token = ?, lease_owner = ?, lease_expires_at = ? WHERE id = ?")
            .bind(&claim.token)
            .bind(&claim.owner)
            .bind(secs(claim.expires_at))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        insert_event(
            &mut tx,
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
        tx.commit().await?;
        let work = self
            .renewal_work(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("renewal {id}")))?;
        Ok(Opened::Claimed(work.renewal))
    }

    async fn claim_renewal(
        &self,
        renewal_id: i64,
        claim: &Claim,
        now: Timestamp,
    ) -> StoreResult<bool> {
        let (_guard, mut tx) = self.write_tx().await?;
        let done = sqlx::query(
            "UPDATE renewals SET lease_token = ?, lease_owner = ?, lease_expires_at = ?, updated_at = ? \
             WHERE id = ? AND (lease_token IS NULL OR lease_expires_at <= ?)",
        )
        .bind(&claim.token)
        .bind(&claim.owner)
        .bind(secs(claim.expires_at))
        .bind(secs(now))
        .bind(renewal_id)
        .bind(secs(now))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    async fn invoice_renewal(&self, number: &str) -> StoreResult<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT renewal_id FROM invoices WHERE number = ?")
                .bind(number)
                .fetch_optional(&self.pool)
                .await?
                .flatten(),
        )
    }

    async fn insert_request(
        &self,
        subscription_id: i64,
        kind: &str,
        reason: &str,
        now: Timestamp,
    ) -> StoreResult<Request> {
        let (_guard, mut tx) = self.write_tx().await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO requests (subscription_id, kind, status, reason, created_at, updated_at) \
             VALUES (?, ?, 'open', ?, ?, ?) RETURNING id",
        )
        .bind(subscription_id)
        .bind(kind)
        .bind(reason)
        .bind(secs(now))
        .bind(secs(now))
        .fetch_one(&mut *tx)
        .await?;
        insert_event(
            &mut tx,
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
        tx.commit().await?;
        self.request(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("request {id}")))
    }

    async fn request(&self, id: i64) -> StoreResult<Option<Request>> {
        let row = sqlx::query("SELECT * FROM requests WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| request_from(&r)).transpose()
    }

    async fn list_requests(&self, status: Option<&str>) -> StoreResult<Vec<Request>> {
        let rows =
            sqlx::query("SELECT * FROM requests WHERE (?1 IS NULL OR status = ?1) ORDER BY id")
                .bind(status)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(request_from).collect()
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
        let at = secs(now);
        let mut s = Script::default();
        s.push(
            "UPDATE renewals SET lease_token = ?, lease_owner = ?, lease_expires_at = ?, updated_at = ? \
             WHERE id IN (SELECT id FROM renewals \
                          WHERE status IN ('pending', 'retrying', 'action_required', 'awaiting_transfer') AND next_attempt_at <= ? \
                            AND (lease_token IS NULL OR lease_expires_at <= ?) \
                          ORDER BY next_attempt_at, id LIMIT ?) \
             RETURNING 'claimed' AS tag, id",
            [
                (&claim.token).into(),
                (&claim.owner).into(),
                secs(claim.expires_at).into(),
                at.into(),
                at.into(),
                at.into(),
                limit.into(),
            ],
        );
        let mut tx = self.script_tx().await?;
        let out = tx.run(s).await?;
        let ids = out
            .rows("claimed")
            .map(|r| r.col::<i64>("id"))
            .collect::<StoreResult<Vec<_>>>()?;
        finish_write(tx, !ids.is_empty()).await?;
        Ok(ids)
    }

    async fn due_renewals(&self, now: Timestamp) -> StoreResult<Vec<RenewalWork>> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM renewals WHERE status IN ('pending', 'retrying', 'action_required', 'awaiting_transfer') \
             AND next_attempt_at <= ?1 AND (lease_token IS NULL OR lease_expires_at <= ?1) ORDER BY next_attempt_at, id",
        )
        .bind(secs(now))
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(w) = self.renewal_work(id).await? {
                out.push(w);
            }
        }
        Ok(out)
    }

    async fn renewal_work(&self, renewal_id: i64) -> StoreResult<Option<RenewalWork>> {
        // Both reads in one round trip on one connection.
        let mut s = Script::default();
        s.push(
            &format!(
                "SELECT 'work' AS tag, {SUBSCRIPTION_COLUMNS}, {CUSTOMER_COLUMNS}, {RENEWAL_COLUMNS} FROM renewals r \
                 JOIN subscriptions s ON s.id = r.subscription_id JOIN customers c ON c.id = s.customer_id WHERE r.id = ?"
            ),
            [renewal_id.into()],
        );
        s.push(
            "SELECT 'attempt' AS tag, * FROM payment_attempts WHERE renewal_id = ? ORDER BY attempt_no DESC LIMIT 1",
            [renewal_id.into()],
        );
        let out = self.readers.run(&s).await?;
        let Some(row) = out.first("work") else {
            return Ok(None);
        };
        Ok(Some(RenewalWork {
            renewal: renewal_from(row)?,
            subscription: subscription_from(row)?,
            customer: customer_from(row, "c_")?,
            last_attempt: out.first("attempt").map(attempt_from).transpose()?,
        }))
    }

    async fn begin_attempt(
        &self,
        lease: &Lease,
        a: &NewAttempt,
        now: Timestamp,
    ) -> StoreResult<Attempt> {
        let draft = serde_json::to_string(&a.invoice_draft)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut s = Script::default();
        push_lease_check(&mut s, lease);
        s.push(
            "UPDATE renewals SET attempt_count = attempt_count + 1, first_attempt_at = COALESCE(first_attempt_at, ?), \
             updated_at = ? WHERE id = ?",
            [secs(now).into(), secs(now).into(), lease.renewal_id.into()],
        );
        s.push(
            "INSERT INTO payment_attempts (renewal_id, attempt_no, idempotency_key, payment_method, amount_minor, \
             currency, invoice_draft, status, created_at) \
             SELECT id, attempt_count, ?, ?, ?, ?, ?, 'pending', ? FROM renewals WHERE id = ? \
             RETURNING 'attempt' AS tag, *",
            [
                (&a.idempotency_key).into(),
                (&a.payment_method).into(),
                a.amount_minor.into(),
                (&a.currency).into(),
                draft.into(),
                secs(now).into(),
                lease.renewal_id.into(),
            ],
        );
        s.push(
            "INSERT INTO events (at, kind, subscription_id, customer_id, amount_minor, currency, \
             idempotency_key, outcome, detail) \
             SELECT ?, 'charge.attempt', s.id, s.customer_id, ?, ?, ?, 'sent', \
             json_object('attempt', r.attempt_count, 'payment_method_kind', 'card') \
             FROM renewals r JOIN subscriptions s ON s.id = r.subscription_id WHERE r.id = ?",
            [
                secs(now).into(),
                a.amount_minor.into(),
                (&a.currency).into(),
                (&a.idempotency_key).into(),
                lease.renewal_id.into(),
            ],
        );
        let mut tx = self.script_tx().await?;
        let out = run_leased(&mut tx, s, lease).await?;
        let attempt = match out.first("attempt") {
            Some(row) => attempt_from(row)?,
            None => {
                tx.rollback().await?;
                return Err(StoreError::NotFound(format!(
                    "renewal {}",
                    lease.renewal_id
                )));
            }
        };
        tx.commit().await?;
        Ok(attempt)
    }

    async fn apply(&self, change: Change, now: Timestamp) -> StoreResult<Applied> {
        // The whole change is one script (one round trip); what it must find
        // is checked from the tags it returns, in the order the checks were
        // once made statement by statement, and any failure undoes it whole.
        let mut s = Script::default();
        if let Some(lease) = &change.lease {
            push_lease_check(&mut s, lease);
        }
        if let Some(a) = &change.attempt {
            s.push(
                "UPDATE payment_attempts SET status = ?, decline_kind = COALESCE(?, decline_kind), \
                 decline_code = COALESCE(?, decline_code), gateway_reference = COALESCE(?, gateway_reference), \
                 reconcile_count = COALESCE(?, reconcile_count), \
                 completed_at = CASE WHEN ? IN ('succeeded', 'declined', 'not_charged') THEN ? ELSE completed_at END \
                 WHERE id = ?",
                [
                    a.status.as_str().into(),
                    (&a.decline_kind).into(),
                    (&a.decline_code).into(),
                    (&a.gateway_reference).into(),
                    a.reconcile_count.into(),
                    a.status.as_str().into(),
                    secs(now).into(),
                    a.id.into(),
                ],
            );
        }
        if let Some(p) = &change.subscription {
            push_subscription(&mut s, p, now);
        }
        if let Some(sub) = change.close_renewals_of {
            s.push(
                "SELECT 'busy' AS tag WHERE EXISTS (SELECT 1 FROM renewals WHERE subscription_id = ? \
                 AND lease_token IS NOT NULL AND lease_expires_at > ? \
                 AND status IN ('pending', 'retrying', 'action_required', 'awaiting_transfer'))",
                [sub.into(), secs(now).into()],
            );
            // A charge whose outcome is not known yet must be reconciled
            // first: cancelling now could leave taken money unrecorded.
            s.push(
                "SELECT 'unsettled' AS tag WHERE EXISTS (SELECT 1 FROM payment_attempts a \
                 JOIN renewals r ON r.id = a.renewal_id \
                 WHERE r.subscription_id = ? AND a.status IN ('pending', 'unknown'))",
                [sub.into()],
            );
            s.push(
                "UPDATE renewals SET status = 'skipped', outcome_note = 'cancelled', next_attempt_at = NULL, \
                 lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = ? \
                 WHERE subscription_id = ? AND status IN ('pending', 'retrying', 'action_required', 'awaiting_transfer')",
                [secs(now).into(), sub.into()],
            );
            s.push(
                "UPDATE invoices SET status = 'void' WHERE subscription_id = ? AND status = 'open'",
                [sub.into()],
            );
        }
        if let Some(sub) = change.wake_renewals_of {
            s.push(
                "UPDATE renewals SET next_attempt_at = ?, updated_at = ? \
                 WHERE subscription_id = ? AND status IN ('retrying', 'action_required')",
                [secs(now).into(), secs(now).into(), sub.into()],
            );
        }
        if let Some(settle) = &change.settle_invoice {
            s.push(
                "UPDATE invoices SET status = ?, paid_at = ?, payment_reference = COALESCE(?, payment_reference) \
                 WHERE number = ? AND status = 'open' RETURNING 'settled' AS tag",
                [
                    (&settle.status).into(),
                    settle.paid_at.map(secs).into(),
                    (&settle.reference).into(),
                    (&settle.number).into(),
                ],
            );
        }
        if let Some(r) = &change.request {
            let marks = vec!["?"; r.expect_status.len().max(1)].join(", ");
            let mut args: Vec<Arg> = vec![
                (&r.status).into(),
                (&r.resolution).into(),
                secs(now).into(),
                r.resolved.into(),
                secs(now).into(),
                r.id.into(),
            ];
            args.extend(r.expect_status.iter().map(Arg::from));
            if r.expect_status.is_empty() {
                // The lone `?` above: NULL, which no status matches.
                args.push(Arg::Text(None));
            }
            s.push(
                &format!(
                    "UPDATE requests SET status = ?, resolution = COALESCE(?, resolution), updated_at = ?, \
                     resolved_at = CASE WHEN ? THEN ? ELSE resolved_at END WHERE id = ? AND status IN ({marks}) \
                     RETURNING 'request' AS tag"
                ),
                args,
            );
        }
        let invoice = match (&change.invoice, &change.settle_invoice) {
            (Some(inv), _) => {
                push_invoice(&mut s, inv);
                InvoiceRef::Issued(inv)
            }
            (None, Some(settle)) => InvoiceRef::Known(&settle.number),
            (None, None) => InvoiceRef::None,
        };
        if let Some(lease) = &change.lease {
            if change.renewal_kind.is_some() || change.renewal.is_some() {
                let mut sets = Vec::new();
                let mut args: Vec<Arg> = Vec::new();
                if let Some(kind) = change.renewal_kind {
                    sets.push("kind = ?");
                    args.push(kind.as_str().into());
                }
                if let Some(r) = &change.renewal {
                    sets.push(
                        "status = ?, next_attempt_at = ?, outcome_note = COALESCE(?, outcome_note), \
                         lease_token = CASE WHEN ? THEN NULL ELSE lease_token END, \
                         lease_owner = CASE WHEN ? THEN NULL ELSE lease_owner END, \
                         lease_expires_at = CASE WHEN ? THEN NULL ELSE lease_expires_at END, \
                         updated_at = ?",
                    );
                    args.extend([
                        r.status.as_str().into(),
                        r.next_attempt_at.map(secs).into(),
                        (&r.note).into(),
                        r.release.into(),
                        r.release.into(),
                        r.release.into(),
                        secs(now).into(),
                    ]);
                }
                args.push(lease.renewal_id.into());
                s.push(
                    &format!("UPDATE renewals SET {} WHERE id = ?", sets.join(", ")),
                    args,
                );
            }
        }
        for m in &change.mails {
            push_mail(&mut s, m, &invoice, now);
        }
        push_events(&mut s, &change.events, &invoice, now);
        if !matches!(invoice, InvoiceRef::None) {
            let (number, args) = invoice.sql();
            s.push(
                &format!("SELECT 'invoice' AS tag, {INVOICE_COLUMNS} FROM invoices WHERE number = {number}"),
                args,
            );
        }

        // The writer's turn is taken only now that the script is built.
        let mut tx = self.script_tx().await?;
        let out = match change.lease.as_ref() {
            Some(lease) => run_leased(&mut tx, s, lease).await?,
            None => tx.run(s).await?,
        };
        let refused = if let Some(p) = change
            .subscription
            .as_ref()
            .filter(|_| !out.has("subscription"))
        {
            Some(subscription_conflict(p))
        } else if let Some(sub) = change.close_renewals_of.filter(|_| out.has("busy")) {
            Some(StoreError::Conflict(format!(
                "a renewal of subscription {sub} is being processed right now; try again in a minute"
            )))
        } else if let Some(sub) = change.close_renewals_of.filter(|_| out.has("unsettled")) {
            Some(StoreError::Conflict(format!(
                "a charge of subscription {sub} is still being reconciled with the gateway; cancel once it is settled (see `renewd events --subscription {sub}`)"
            )))
        } else if let Some(settle) = change
            .settle_invoice
            .as_ref()
            .filter(|_| !out.has("settled"))
        {
            Some(StoreError::Conflict(format!(
                "invoice {} is not open",
                settle.number
            )))
        } else {
            change
                .request
                .as_ref()
                .filter(|_| !out.has("request"))
                .map(|r| {
                    StoreError::Conflict(format!(
                        "request {} is no longer {}",
                        r.id,
                        r.expect_status.join(" or ")
                    ))
                })
        };
        if let Some(e) = refused {
            tx.rollback().await?;
            return Err(e);
        }
        let queued = u32::try_from(out.count("mail")).unwrap_or(u32::MAX);
        if change.only_if_mail_is_new && queued == 0 {
            tx.rollback().await?;
            return Ok(Applied::default());
        }
        let invoice = out.first("invoice").map(invoice_from).transpose()?;
        tx.commit().await?;
        Ok(Applied {
            applied: true,
            invoice,
            mails_queued: queued,
        })
    }

    async fn queue_notices(&self, notices: &[Notice], now: Timestamp) -> Vec<StoreResult<bool>> {
        match self.queue_batch(notices, now).await {
            Ok(queued) => queued.into_iter().map(Ok).collect(),
            // Whatever failed, it failed whole: one at a time, so a notice
            // that cannot be written keeps none of the others back.
            Err(e) => {
                tracing::warn!(notices = notices.len(), error = %e, "a batch of notices failed; queuing them one at a time");
                queue_each(self, notices, now).await
            }
        }
    }

    async fn mark_notified(
        &self,
        subscription_id: i64,
        period_key: i64,
        decided: &NoticesDecided,
    ) -> StoreResult<()> {
        let mut s = Script::default();
        push_mark_notified(&mut s, subscription_id, period_key, decided);
        let mut tx = self.script_tx().await?;
        let out = tx.run(s).await?;
        let marked = out.has("marked");
        finish_write(tx, marked).await
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
        let mut s = Script::default();
        s.push(
            &format!(
                "UPDATE outbox SET lease_token = ?, lease_expires_at = ? \
                 WHERE id IN (SELECT id FROM outbox WHERE status = 'queued' AND next_attempt_at <= ? \
                              AND (lease_token IS NULL OR lease_expires_at <= ?) ORDER BY next_attempt_at, id LIMIT ?) \
                 RETURNING 'claimed' AS tag, {MAIL_COLUMNS}"
            ),
            [
                (&claim.token).into(),
                secs(claim.expires_at).into(),
                secs(now).into(),
                secs(now).into(),
                limit.into(),
            ],
        );
        let mut tx = self.script_tx().await?;
        let out = tx.run(s).await?;
        let claimed = out.has("claimed");
        finish_write(tx, claimed).await?;
        let mut mails: Vec<Mail> = out
            .rows("claimed")
            .map(mail_from)
            .collect::<StoreResult<_>>()?;
        mails.sort_by_key(|m| m.id);
        Ok(mails)
    }

    async fn mails_sent(&self, ids: &[i64], token: &str, now: Timestamp) -> StoreResult<Vec<i64>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let list = format!(
            "[{}]",
            ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
        );
        let mut s = Script::default();
        // The events first, from the rows still claimed, then the rows.
        s.push(
            "INSERT INTO events (at, kind, subscription_id, outcome, detail) \
             SELECT ?, 'mail.sent', subscription_id, 'sent', json_object('mail_id', id, 'mail_kind', kind) \
             FROM outbox WHERE id IN (SELECT value FROM json_each(?)) AND lease_token = ? ORDER BY id",
            [secs(now).into(), list.as_str().into(), token.into()],
        );
        s.push(
            "UPDATE outbox SET status = 'sent', sent_at = ?, attempts = attempts + 1, lease_token = NULL, \
             lease_expires_at = NULL, last_error = NULL \
             WHERE id IN (SELECT value FROM json_each(?)) AND lease_token = ? RETURNING 'sent' AS tag, id",
            [secs(now).into(), list.as_str().into(), token.into()],
        );
        let mut tx = self.script_tx().await?;
        let done = tx.run(s).await?;
        let sent = done
            .rows("sent")
            .map(|r| r.col::<i64>("id"))
            .collect::<Result<Vec<_>, _>>()?;
        finish_write(tx, !sent.is_empty()).await?;
        Ok(sent)
    }

    async fn mail_failed(
        &self,
        id: i64,
        token: &str,
        error: &str,
        retry_at: Option<Timestamp>,
        now: Timestamp,
    ) -> StoreResult<()> {
        let (_guard, mut tx) = self.write_tx().await?;
        let status = if retry_at.is_some() {
            "queued"
        } else {
            "failed"
        };
        let done = sqlx::query(
            "UPDATE outbox SET status = ?, attempts = attempts + 1, last_error = ?, next_attempt_at = ?, \
             lease_token = NULL, lease_expires_at = NULL WHERE id = ? AND lease_token = ?",
        )
        .bind(status)
        .bind(error)
        .bind(secs(retry_at.unwrap_or(now)))
        .bind(id)
        .bind(token)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Conflict(format!(
                "mail {id} is no longer claimed by this sender"
            )));
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list_mail(&self, f: &MailFilter) -> StoreResult<Vec<Mail>> {
        let mut q =
            QueryBuilder::<Sqlite>::new(format!("SELECT {MAIL_COLUMNS} FROM outbox WHERE true"));
        if let Some(status) = &f.status {
            q.push(" AND status = ").push_bind(status);
        }
        if let Some(id) = f.subscription_id {
            q.push(" AND subscription_id = ").push_bind(id);
        }
        let rows = q.push(" ORDER BY id").build().fetch_all(&self.pool).await?;
        rows.iter().map(mail_from).collect()
    }

    async fn invoice(&self, number: &str) -> StoreResult<Option<Invoice>> {
        let mut s = Script::default();
        s.push(
            &format!("SELECT {INVOICE_COLUMNS} FROM invoices WHERE number = ?"),
            [number.into()],
        );
        let out = self.readers.run(&s).await?;
        out.all().first().map(invoice_from).transpose()
    }

    async fn list_invoices(&self, subscription_id: Option<i64>) -> StoreResult<Vec<Invoice>> {
        // Each filter only when given: `(? IS NULL OR subscription_id = ?)`
        // reads the whole table, which a renewal of a transfer subscription
        // did on every visit (renewd bench, "time travel").
        let mut q = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {INVOICE_COLUMNS} FROM invoices WHERE true"
        ));
        if let Some(id) = subscription_id {
            q.push(" AND subscription_id = ").push_bind(id);
        }
        let rows = q
            .push(" ORDER BY series, seq")
            .build()
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(invoice_from).collect()
    }

    async fn events(&self, subscription_id: Option<i64>) -> StoreResult<Vec<Event>> {
        let mut q = QueryBuilder::<Sqlite>::new("SELECT * FROM events WHERE true");
        if let Some(id) = subscription_id {
            q.push(" AND subscription_id = ").push_bind(id);
        }
        let rows = q.push(" ORDER BY id").build().fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                let detail: Option<String> = r.try_get("detail")?;
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
                    detail: detail
                        .and_then(|d| serde_json::from_str(&d).ok())
                        .unwrap_or(serde_json::Value::Null),
                })
            })
            .collect()
    }

    async fn terms_acceptances(&self) -> StoreResult<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT version, COUNT(*) FROM terms_acceptances GROUP BY version ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn gauges(&self, now: Timestamp) -> StoreResult<Gauges> {
        let (due, past_due): (i64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(status = 'active' AND current_period_end <= ?1), 0), \
                    COALESCE(SUM(status = 'past_due'), 0) \
             FROM subscriptions WHERE status IN ('active', 'past_due')",
        )
        .bind(secs(now))
        .fetch_one(&self.pool)
        .await?;
        let unknown: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM payment_attempts WHERE status IN ('pending', 'unknown')",
        )
        .fetch_one(&self.pool)
        .await?;
        let mail: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT kind, status, COUNT(*) FROM outbox GROUP BY kind, status ORDER BY kind, status",
        )
        .fetch_all(&self.pool)
        .await?;
        let oldest: Option<i64> =
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
    }

    fn stop_claiming(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn claiming_stopped(&self) -> bool {
        self.is_draining()
    }

    async fn requeue_mail(&self, id: i64, now: Timestamp) -> StoreResult<Mail> {
        let (_guard, mut tx) = self.write_tx().await?;
        let current: Option<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT status, attempts, subscription_id, customer_id FROM outbox WHERE id = ?",
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
        let row = sqlx::query(&format!(
            "UPDATE outbox SET status = 'queued', attempts = 0, next_attempt_at = ?, lease_token = NULL, \
             lease_expires_at = NULL WHERE id = ? AND status = 'failed' RETURNING {MAIL_COLUMNS}"
        ))
        .bind(secs(now))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        insert_event(
            &mut tx,
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
        tx.commit().await?;
        mail_from(&row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_leaves_the_sync_to_the_group_commit_and_checkpoints_at_its_threshold() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("renewd.db").display());
        let store = SqliteStore::open(&url, 2).await.unwrap();
        let (_, mut tx) = store.write_tx().await.unwrap();
        let level: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        let pages: i64 = sqlx::query_scalar("PRAGMA wal_autocheckpoint")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(level, 1, "NORMAL: the group commit syncs the WAL");
        assert_eq!(pages, i64::from(WAL_AUTOCHECKPOINT));
        assert!(store.writer.stopped().is_none());
        store.ping().await.unwrap();
    }
}
