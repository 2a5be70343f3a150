//! What one store write costs through sqlx, against the same statements
//! run on SQLite directly (docs/benchmarks.md, "Seventh session").
//!
//! `cargo run --release --example script_cost [N]`
//!
//! A write shaped like a renewal's outcome (a guarded subscription update
//! and an attempt update that return tagged rows, an invoice, an outbox row,
//! two events), in its own savepoint, 16 to a `BEGIN IMMEDIATE … COMMIT`,
//! WAL and `synchronous = FULL`, in a temporary directory ($TMPDIR). The
//! same connection runs blocks of writes three ways, in turn:
//! - sqlx: the statements as one multi-statement query, as the store sends a
//!   `Script` now (prepared once, kept in sqlx's statement cache); every
//!   write is handed to sqlx's worker thread and its results handed back;
//! - direct: the connection's handle taken from sqlx's worker
//!   (`SqliteConnection::lock_handle`) and the statements prepared, bound
//!   and stepped on the calling thread, prepared anew for every write;
//! - direct, reused: the same, each statement prepared once and reset.
//!
//! Nothing here is renewd's code; it measures how much of a write is the
//! hand-off between threads.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, CStr};
use std::ptr::{null, null_mut};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use libsqlite3_sys as ffi;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, SqliteConnection};

const SCHEMA: &str = "
CREATE TABLE subs (id INTEGER PRIMARY KEY, status TEXT NOT NULL, term INTEGER NOT NULL,
  lease TEXT, period_end INTEGER, updated_at INTEGER);
CREATE INDEX subs_due ON subs (status, period_end);
CREATE TABLE invoices (number TEXT PRIMARY KEY, sub_id INTEGER NOT NULL, total INTEGER NOT NULL,
  currency TEXT NOT NULL, issued_at INTEGER NOT NULL, document TEXT NOT NULL);
CREATE INDEX inv_sub ON invoices (sub_id);
CREATE TABLE mail (id INTEGER PRIMARY KEY, sub_id INTEGER NOT NULL, kind TEXT NOT NULL,
  period_key TEXT NOT NULL, recipient TEXT NOT NULL, context TEXT NOT NULL, status TEXT NOT NULL,
  created_at INTEGER NOT NULL, UNIQUE (sub_id, kind, period_key));
CREATE TABLE events (id INTEGER PRIMARY KEY, sub_id INTEGER NOT NULL, kind TEXT NOT NULL,
  detail TEXT NOT NULL, at INTEGER NOT NULL);
CREATE INDEX ev_sub ON events (sub_id, at);
CREATE TABLE attempts (id INTEGER PRIMARY KEY, sub_id INTEGER NOT NULL, key TEXT NOT NULL UNIQUE,
  status TEXT NOT NULL, amount INTEGER NOT NULL, at INTEGER NOT NULL);
";

const PER_TX: usize = 16;
const BLOCK: usize = 1008;
/// Rows a write returns: the subscription, the attempt, the outbox row.
const TAGGED: usize = 3;

#[derive(Clone)]
enum Arg {
    Int(i64),
    Text(String),
}

/// The statements of write `i`, in one text, and their arguments in order.
fn write(i: i64) -> (String, Vec<Arg>) {
    let text = |s: &str| Arg::Text(s.to_string());
    let mut sql = String::from("SAVEPOINT w;\n");
    let mut args = Vec::new();
    sql.push_str(
        "UPDATE subs SET term = term + 1, lease = NULL, period_end = ?, updated_at = ? \
         WHERE id = ? AND lease = ? RETURNING 'sub' AS tag, id, term;\n",
    );
    args.extend([Arg::Int(i + 1000), Arg::Int(i), Arg::Int(i), text("lease")]);
    sql.push_str(
        "UPDATE attempts SET status = 'succeeded' WHERE key = ? RETURNING 'att' AS tag, id;\n",
    );
    args.push(Arg::Text(format!("key-{i}")));
    sql.push_str(
        "INSERT INTO invoices (number, sub_id, total, currency, issued_at, document) \
         VALUES (?, ?, ?, ?, ?, ?);\n",
    );
    args.extend([
        Arg::Text(format!("INV-{i:08}")),
        Arg::Int(i),
        Arg::Int(12000),
        text("JPY"),
        Arg::Int(i),
        text(r#"{"lines":[{"description":"Yearly plan","amount":12000}],"tax":1200}"#),
    ]);
    sql.push_str(
        "INSERT INTO mail (sub_id, kind, period_key, recipient, context, status, created_at) \
         VALUES (?, 'receipt', ?, ?, ?, 'queued', ?) ON CONFLICT DO NOTHING \
         RETURNING 'mail' AS tag, id;\n",
    );
    args.extend([
        Arg::Int(i),
        Arg::Text(format!("p{i}")),
        text("someone@example.com"),
        text(r#"{"invoice":"INV"}"#),
        Arg::Int(i),
    ]);
    for kind in ["renewed", "invoiced"] {
        sql.push_str("INSERT INTO events (sub_id, kind, detail, at) VALUES (?, ?, ?, ?);\n");
        args.extend([Arg::Int(i), text(kind), text("{}"), Arg::Int(i)]);
    }
    sql.push_str("RELEASE w;\n");
    (sql, args)
}

async fn sqlx_write(c: &mut SqliteConnection, sql: &str, args: Vec<Arg>) -> anyhow::Result<usize> {
    let mut q = sqlx::query(sql);
    for a in args {
        q = match a {
            Arg::Int(v) => q.bind(v),
            Arg::Text(v) => q.bind(v),
        };
    }
    Ok(q.fetch_all(&mut *c).await?.len())
}

/// Statements prepared on one handle, by text; finalized by `clear`.
#[derive(Default)]
struct Prepared(HashMap<String, Vec<*mut ffi::sqlite3_stmt>>);

impl Prepared {
    /// Finalizes every statement; called while the handle is held.
    fn clear(&mut self) {
        for stmt in self.0.drain().flat_map(|(_, v)| v) {
            // SAFETY: each was prepared on the handle still held, and is
            // finalized once (drained).
            unsafe { ffi::sqlite3_finalize(stmt) };
        }
    }
}

fn error(db: *mut ffi::sqlite3) -> anyhow::Error {
    // SAFETY: the handle is open; sqlite3_errmsg returns a NUL-terminated
    // string owned by it.
    let msg = unsafe { CStr::from_ptr(ffi::sqlite3_errmsg(db)) };
    anyhow::anyhow!("sqlite: {}", msg.to_string_lossy())
}

/// Splits `sql` into prepared statements.
///
/// # Safety
/// `db` must be an open handle that no other thread uses meanwhile.
unsafe fn prepare(
    db: *mut ffi::sqlite3,
    sql: &str,
    flags: u32,
) -> anyhow::Result<Vec<*mut ffi::sqlite3_stmt>> {
    let mut out = Vec::new();
    let mut tail = sql.as_ptr().cast::<c_char>();
    // SAFETY: one past the end of `sql`.
    let end = unsafe { tail.add(sql.len()) };
    while tail < end {
        let mut stmt = null_mut();
        let mut next: *const c_char = null();
        // SAFETY: tail..end lies inside `sql`.
        let left = c_int::try_from(unsafe { end.offset_from(tail) })?;
        // SAFETY: as above; `stmt` and `next` are written by SQLite.
        let rc = unsafe { ffi::sqlite3_prepare_v3(db, tail, left, flags, &mut stmt, &mut next) };
        if rc != ffi::SQLITE_OK {
            for s in out {
                // SAFETY: prepared above, not yet finalized.
                unsafe { ffi::sqlite3_finalize(s) };
            }
            return Err(error(db));
        }
        tail = next;
        if !stmt.is_null() {
            out.push(stmt);
        }
    }
    Ok(out)
}

/// Binds, steps and resets `stmts`; returns how many rows they returned.
///
/// # Safety
/// As for [`prepare`]; `stmts` were prepared on `db`.
unsafe fn step_all(
    db: *mut ffi::sqlite3,
    stmts: &[*mut ffi::sqlite3_stmt],
    args: &[Arg],
) -> anyhow::Result<usize> {
    let mut rows = 0;
    let mut next_arg = args.iter();
    for &stmt in stmts {
        // SAFETY (this block): `stmt` is a live statement of `db`.
        unsafe {
            for p in 1..=ffi::sqlite3_bind_parameter_count(stmt) {
                let rc = match next_arg.next() {
                    Some(Arg::Int(v)) => ffi::sqlite3_bind_int64(stmt, p, *v),
                    Some(Arg::Text(s)) => ffi::sqlite3_bind_text(
                        stmt,
                        p,
                        s.as_ptr().cast::<c_char>(),
                        c_int::try_from(s.len())?,
                        ffi::SQLITE_TRANSIENT(),
                    ),
                    None => bail!("fewer arguments than placeholders"),
                };
                if rc != ffi::SQLITE_OK {
                    return Err(error(db));
                }
            }
            loop {
                match ffi::sqlite3_step(stmt) {
                    ffi::SQLITE_ROW => {
                        // Read every column, as a row decoder would.
                        for c in 0..ffi::sqlite3_column_count(stmt) {
                            let _ = ffi::sqlite3_column_name(stmt, c);
                            let _ = ffi::sqlite3_column_text(stmt, c);
                        }
                        rows += 1;
                    }
                    ffi::SQLITE_DONE => break,
                    _ => {
                        let e = error(db);
                        ffi::sqlite3_reset(stmt);
                        return Err(e);
                    }
                }
            }
            ffi::sqlite3_reset(stmt);
            ffi::sqlite3_clear_bindings(stmt);
        }
    }
    Ok(rows)
}

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Sqlx,
    Direct,
    Reused,
}

#[derive(Default)]
struct Tally {
    writes: Duration,
    commits: Duration,
    n: usize,
}

impl Tally {
    fn per_write_us(&self) -> f64 {
        self.writes.as_secs_f64() * 1e6 / self.n.max(1) as f64
    }
    fn per_commit_us(&self) -> f64 {
        self.commits.as_secs_f64() * 1e6 / (self.n / PER_TX).max(1) as f64
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let blocks: usize = match std::env::args().nth(1) {
        Some(n) => {
            n.parse::<usize>()
                .context("N: how many writes of each kind, e.g. 8000")?
                / BLOCK
        }
        None => 8,
    }
    .max(1);
    let dir = tempfile::tempdir().context("cannot make a temporary directory")?;
    let opts = SqliteConnectOptions::from_str(&format!(
        "sqlite://{}",
        dir.path().join("cost.db").display()
    ))?
    .create_if_missing(true)
    .journal_mode(SqliteJournalMode::Wal)
    .synchronous(SqliteSynchronous::Full)
    .busy_timeout(Duration::from_secs(30));
    let mut c = opts.connect().await?;
    sqlx::raw_sql(SCHEMA).execute(&mut c).await?;
    let total = blocks * 3 * BLOCK;
    let mut seed = c.begin().await?;
    for i in 0..i64::try_from(total)? {
        sqlx::query("INSERT INTO subs (id, status, term, lease, period_end, updated_at) VALUES (?, 'active', 1, 'lease', 0, 0)")
            .bind(i)
            .execute(&mut *seed)
            .await?;
        sqlx::query("INSERT INTO attempts (sub_id, key, status, amount, at) VALUES (?, ?, 'pending', 12000, 0)")
            .bind(i)
            .bind(format!("key-{i}"))
            .execute(&mut *seed)
            .await?;
    }
    seed.commit().await?;

    let mut tallies = [Tally::default(), Tally::default(), Tally::default()];
    let mut i = 0i64;
    for round in 0..blocks * 3 {
        let way = [Way::Sqlx, Way::Direct, Way::Reused][round % 3];
        let tally = &mut tallies[round % 3];
        for _ in 0..BLOCK / PER_TX {
            let started = Instant::now();
            let committing;
            if way == Way::Sqlx {
                sqlx::query("BEGIN IMMEDIATE").execute(&mut c).await?;
                for _ in 0..PER_TX {
                    let (sql, args) = write(i);
                    i += 1;
                    if sqlx_write(&mut c, &sql, args).await? != TAGGED {
                        bail!("a write did not find its rows");
                    }
                }
                committing = Instant::now();
                sqlx::query("COMMIT").execute(&mut c).await?;
            } else {
                let mut handle = c.lock_handle().await?;
                let db = handle.as_raw_handle().as_ptr();
                let mut prepared = Prepared::default();
                // SAFETY: the handle is held (sqlx's worker waits for it)
                // until `handle` is dropped, after `prepared` is cleared.
                let result = unsafe {
                    (|| -> anyhow::Result<Instant> {
                        let begin = prepare(db, "BEGIN IMMEDIATE", 0)?;
                        step_all(db, &begin, &[])?;
                        prepared.0.insert("BEGIN".into(), begin);
                        for _ in 0..PER_TX {
                            let (sql, args) = write(i);
                            i += 1;
                            let rows = if way == Way::Reused {
                                if !prepared.0.contains_key(&sql) {
                                    let stmts = prepare(db, &sql, ffi::SQLITE_PREPARE_PERSISTENT)?;
                                    prepared.0.insert(sql.clone(), stmts);
                                }
                                step_all(db, &prepared.0[&sql], &args)?
                            } else {
                                let stmts = prepare(db, &sql, 0)?;
                                let rows = step_all(db, &stmts, &args);
                                for s in stmts {
                                    ffi::sqlite3_finalize(s);
                                }
                                rows?
                            };
                            if rows != TAGGED {
                                bail!("a write did not find its rows");
                            }
                        }
                        let committing = Instant::now();
                        let commit = prepare(db, "COMMIT", 0)?;
                        let done = step_all(db, &commit, &[]);
                        for s in commit {
                            ffi::sqlite3_finalize(s);
                        }
                        done?;
                        Ok(committing)
                    })()
                };
                prepared.clear();
                drop(handle);
                committing = result?;
            }
            tally.writes += committing - started;
            tally.commits += committing.elapsed();
            tally.n += PER_TX;
        }
    }
    let base = tallies[0].per_write_us();
    println!(
        "{} writes each way, {PER_TX} to a transaction, WAL, synchronous = FULL, in {}",
        tallies[0].n,
        dir.path().display()
    );
    println!("| way | µs per write | against sqlx | µs per COMMIT |");
    println!("|---|---|---|---|");
    for (name, t) in [
        "sqlx (the store's way now)",
        "direct, prepared every time",
        "direct, statements reused",
    ]
    .iter()
    .zip(&tallies)
    {
        println!(
            "| {name} | {:.1} | x{:.2} | {:.0} |",
            t.per_write_us(),
            t.per_write_us() / base,
            t.per_commit_us()
        );
    }
    c.close().await?;
    Ok(())
}
