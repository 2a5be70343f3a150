//! The write connection driven directly, on the calling thread.
//!
//! sqlx runs each SQLite connection on a worker thread of its own: every
//! query is handed to that thread and its results handed back, which costs
//! more than SQLite's own work on a write (`cargo run --release --example
//! script_cost`: 146 µs a renewal-sized write through sqlx, 41 µs run
//! directly with its statements reused). The store's writes are serial
//! (one write connection, one writer at a time), so those hand-offs were
//! what bounded a simulated year (docs/benchmarks.md).
//!
//! [`Held`] takes the connection's handle from sqlx's worker (which then
//! waits, parked, until it is given back) and runs statements through
//! SQLite's C API, keeping them prepared for the next write of the same
//! text. It gives the handle back, finalizing every statement it prepared,
//! when dropped; sqlx's own queries on the connection must wait for that
//! (see `WriteConn` in `group_commit`).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, CStr};
use std::ptr::{null, null_mut, NonNull};
use std::sync::Arc;

use libsqlite3_sys as ffi;
use sqlx::sqlite::{LockedSqliteHandle, SqliteRow};
use sqlx::{Sqlite, SqliteConnection};

use super::script::Arg;
use crate::store::{StoreError, StoreResult};

/// Texts kept prepared at most (sqlx's own cache keeps 100 statements);
/// past it, every kept statement is finalized and keeping starts over.
pub(super) const KEPT: usize = 128;

/// One value of a row, owned.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Int(i64),
    /// TEXT, and REAL in SQLite's text form (renewd stores no REAL).
    Text(String),
    Blob(Vec<u8>),
}

/// One row returned by a statement run directly.
#[derive(Debug, Clone)]
pub(crate) struct RawRow {
    names: Arc<[String]>,
    values: Vec<Value>,
}

impl RawRow {
    /// Whether column `name` holds the text `text`.
    pub(crate) fn is_text(&self, name: &str, text: &str) -> bool {
        matches!(self.value(name), Ok(Value::Text(t)) if t == text)
    }

    fn value(&self, name: &str) -> StoreResult<&Value> {
        self.names
            .iter()
            .position(|n| n == name)
            .and_then(|i| self.values.get(i))
            .ok_or_else(|| StoreError::Corrupt(format!("no column `{name}` in the row")))
    }
}

/// A column type the store reads, from an sqlx row or a [`RawRow`].
pub(crate) trait Col: Sized + for<'r> sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite> {
    fn from_value(v: &Value) -> Option<Self>;
}

impl Col for i64 {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

impl Col for i32 {
    fn from_value(v: &Value) -> Option<Self> {
        i64::from_value(v).and_then(|i| i32::try_from(i).ok())
    }
}

impl Col for u32 {
    fn from_value(v: &Value) -> Option<Self> {
        i64::from_value(v).and_then(|i| u32::try_from(i).ok())
    }
}

impl Col for bool {
    fn from_value(v: &Value) -> Option<Self> {
        i64::from_value(v).map(|i| i != 0)
    }
}

impl Col for String {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}

impl<T: Col> Col for Option<T> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Null => Some(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// Reading a column by name, from either kind of row.
pub(crate) trait Cols {
    fn col<T: Col>(&self, name: &str) -> StoreResult<T>;
}

impl Cols for SqliteRow {
    fn col<T: Col>(&self, name: &str) -> StoreResult<T> {
        Ok(sqlx::Row::try_get(self, name)?)
    }
}

impl Cols for RawRow {
    fn col<T: Col>(&self, name: &str) -> StoreResult<T> {
        let v = self.value(name)?;
        T::from_value(v).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "column `{name}` holds {v:?}, not a {}",
                std::any::type_name::<T>()
            ))
        })
    }
}

/// A misuse caught before SQLite saw it (arguments that do not fit).
pub(crate) fn error(what: String) -> sqlx::Error {
    sqlx::Error::Protocol(format!("sqlite: {what}"))
}

/// An error SQLite returned, with its extended result code: reported as
/// sqlx reports SQLite's errors (`sqlx::Error::Database`, with `kind()` for
/// constraint violations), so messages and checks read as through sqlx.
#[derive(Debug)]
pub(crate) struct SqliteFailure {
    code: c_int,
    message: String,
}

impl SqliteFailure {
    /// The primary result code (`SQLITE_BUSY`, ...).
    pub(crate) fn primary(&self) -> c_int {
        self.code & 0xff
    }
}

impl std::fmt::Display for SqliteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "(code: {}) {}", self.code, self.message)
    }
}

impl std::error::Error for SqliteFailure {}

impl sqlx::error::DatabaseError for SqliteFailure {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
        Some(self.code.to_string().into())
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> sqlx::error::ErrorKind {
        use sqlx::error::ErrorKind;
        match self.code {
            ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                ErrorKind::UniqueViolation
            }
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => ErrorKind::ForeignKeyViolation,
            ffi::SQLITE_CONSTRAINT_NOTNULL => ErrorKind::NotNullViolation,
            ffi::SQLITE_CONSTRAINT_CHECK => ErrorKind::CheckViolation,
            _ => ErrorKind::Other,
        }
    }
}

/// The primary SQLite result code of `e`, if SQLite returned it here.
pub(crate) fn sqlite_code(e: &sqlx::Error) -> Option<c_int> {
    match e {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<SqliteFailure>()
            .map(SqliteFailure::primary),
        _ => None,
    }
}

/// Waits out a database locked by another process without SQLite's busy
/// handler (which would hold the thread, and every future polled by the
/// same task): after each try that met the lock, a pause (1 ms, doubling
/// up to 50 ms) until `limit` has passed since the first.
pub(super) struct BusyWait {
    deadline: tokio::time::Instant,
    pause: std::time::Duration,
}

impl BusyWait {
    const PAUSE_MAX: std::time::Duration = std::time::Duration::from_millis(50);

    pub(super) fn new(limit: std::time::Duration) -> BusyWait {
        BusyWait {
            deadline: tokio::time::Instant::now() + limit,
            pause: std::time::Duration::from_millis(1),
        }
    }

    /// Whether `e` met the lock and there is time left to try again: if
    /// so, after the pause.
    pub(super) async fn again(&mut self, e: &sqlx::Error) -> bool {
        let now = tokio::time::Instant::now();
        if sqlite_code(e) != Some(ffi::SQLITE_BUSY) || now >= self.deadline {
            return false;
        }
        tokio::time::sleep(self.pause.min(self.deadline - now)).await;
        self.pause = (self.pause * 2).min(Self::PAUSE_MAX);
        true
    }
}

/// A connection's handle (the write connection's, or a reader's), taken
/// from sqlx's worker thread.
pub(super) struct Held {
    /// Statements prepared on the handle, by text; all finalized in `drop`,
    /// before the handle goes back.
    prepared: HashMap<String, Vec<NonNull<ffi::sqlite3_stmt>>>,
    db: NonNull<ffi::sqlite3>,
    /// Gives the handle back to sqlx's worker when dropped (after the
    /// statements, being declared after them).
    _guard: LockedSqliteHandle<'static>,
}

// SAFETY: the handle is used by one thread at a time: `Held` is reached
// only through the store's write mutex (the write connection's) or a
// reader's own mutex (`readers`), and sqlx's worker thread is parked
// on the connection's lock for as long as `_guard` lives. SQLite handles
// opened by sqlx may move between threads (sqlx's own worker model relies
// on it; SQLite is built threadsafe).
unsafe impl Send for Held {}

impl Held {
    /// Takes the handle of `conn` from sqlx's worker.
    ///
    /// # Safety
    /// `conn` must outlive the returned value, and must not be used through
    /// sqlx while it lives (that would wait forever for the worker). The
    /// lifetime argument below rests on sqlx-sqlite 0.8.6's internals, which
    /// is why Cargo.toml pins that version.
    pub(super) async unsafe fn take(conn: &mut SqliteConnection) -> Result<Held, sqlx::Error> {
        let mut guard = conn.lock_handle().await?;
        let db = guard.as_raw_handle();
        // SAFETY: the guard borrows the worker's shared state, which lives
        // in an `Arc` held by `conn` (so moving `conn` does not move it);
        // the caller keeps `conn` alive for as long as the `Held` lives
        // (`WriteConn` declares `held` before `conn`, so it drops first).
        let guard: LockedSqliteHandle<'static> = unsafe { std::mem::transmute(guard) };
        Ok(Held {
            prepared: HashMap::new(),
            db: db.cast(),
            _guard: guard,
        })
    }

    /// How many texts are kept prepared.
    #[cfg(test)]
    pub(super) fn kept(&self) -> usize {
        self.prepared.len()
    }

    fn last_error(&self) -> sqlx::Error {
        // SAFETY: the handle is open and held; the message is
        // NUL-terminated and owned by SQLite until the next call.
        let (code, msg) = unsafe {
            (
                ffi::sqlite3_extended_errcode(self.db.as_ptr()),
                CStr::from_ptr(ffi::sqlite3_errmsg(self.db.as_ptr())),
            )
        };
        sqlx::Error::Database(Box::new(SqliteFailure {
            code,
            message: msg.to_string_lossy().into_owned(),
        }))
    }

    /// The WAL file of the main database, as SQLite itself names it (beside
    /// the real file, symbolic links followed); `None` for a database with
    /// no file (in memory, temporary).
    pub(super) fn wal_path(&self) -> Option<std::path::PathBuf> {
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: the handle is open and held; `sqlite3_db_filename`'s
        // answer (owned by SQLite while the connection is open) is only
        // passed to `sqlite3_filename_wal` when it names a file, as its
        // documentation requires; both strings are NUL-terminated and copied
        // before the handle is used again.
        unsafe {
            let db = ffi::sqlite3_db_filename(self.db.as_ptr(), c"main".as_ptr());
            if db.is_null() || *db == 0 {
                return None;
            }
            let wal = ffi::sqlite3_filename_wal(db);
            if wal.is_null() {
                return None;
            }
            let bytes = CStr::from_ptr(wal).to_bytes();
            Some(std::ffi::OsStr::from_bytes(bytes).into())
        }
    }

    /// Whether a transaction is open on the handle.
    pub(super) fn in_transaction(&self) -> bool {
        // SAFETY: the handle is open and held.
        unsafe { ffi::sqlite3_get_autocommit(self.db.as_ptr()) == 0 }
    }

    /// How long SQLite's busy handler waits for another connection's lock
    /// (as `PRAGMA busy_timeout`).
    pub(super) fn set_busy_timeout(&mut self, ms: c_int) {
        // SAFETY: the handle is open and held.
        unsafe { ffi::sqlite3_busy_timeout(self.db.as_ptr(), ms) };
    }

    /// Prepares the first statement of `sql`; returns it (none for a tail
    /// of blanks or comments) and how many bytes it took.
    fn prepare_next(
        &self,
        sql: &[u8],
        keep: bool,
    ) -> Result<(Option<NonNull<ffi::sqlite3_stmt>>, usize), sqlx::Error> {
        let flags = if keep {
            ffi::SQLITE_PREPARE_PERSISTENT
        } else {
            0
        };
        let len = c_int::try_from(sql.len()).map_err(|_| error("statement too long".into()))?;
        let mut stmt = null_mut();
        let mut next: *const c_char = null();
        // SAFETY: `sql` is valid for `len` bytes; SQLite writes `stmt` and
        // `next` (a pointer into `sql`, or one past its end).
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(
                self.db.as_ptr(),
                sql.as_ptr().cast::<c_char>(),
                len,
                flags,
                &mut stmt,
                &mut next,
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(self.last_error());
        }
        let used = if next.is_null() {
            sql.len()
        } else {
            // SAFETY: a non-null `next` points into `sql` or one past its end.
            let used = unsafe { next.cast::<u8>().offset_from(sql.as_ptr()) };
            usize::try_from(used)
                .unwrap_or(sql.len())
                .clamp(1, sql.len())
        };
        Ok((NonNull::new(stmt), used))
    }

    /// Runs every statement of `sql` in order, binding `args` across them
    /// (each `?` takes the next); returns the rows of all of them. The
    /// first time, each statement is prepared just before it runs (a
    /// statement may use a table made by the one before); with `keep`, the
    /// statements stay prepared for the next run of the same text.
    pub(super) fn run(
        &mut self,
        sql: &str,
        args: &[Arg],
        keep: bool,
    ) -> Result<Vec<RawRow>, sqlx::Error> {
        let mut rows = Vec::new();
        let mut args = args.iter();
        if let Some(stmts) = self.prepared.get(sql) {
            for stmt in stmts {
                self.step_reset(stmt.as_ptr(), &mut args, &mut rows)?;
            }
        } else {
            if keep && self.prepared.len() >= KEPT {
                for (_, stmts) in self.prepared.drain() {
                    finalize(stmts);
                }
            }
            let bytes = sql.as_bytes();
            let mut at = 0;
            let mut stmts = Vec::new();
            while at < bytes.len() {
                let (stmt, used) = match self.prepare_next(&bytes[at..], keep) {
                    Ok(next) => next,
                    Err(e) => {
                        finalize(stmts);
                        return Err(e);
                    }
                };
                at += used;
                let Some(stmt) = stmt else { continue };
                stmts.push(stmt);
                if let Err(e) = self.step_reset(stmt.as_ptr(), &mut args, &mut rows) {
                    finalize(stmts);
                    return Err(e);
                }
            }
            if keep {
                self.prepared.insert(sql.to_string(), stmts);
            } else {
                finalize(stmts);
            }
        }
        if args.next().is_some() {
            return Err(error("more arguments than placeholders".into()));
        }
        Ok(rows)
    }

    /// Binds, steps to the end and resets one statement.
    fn step_reset<'a>(
        &self,
        stmt: *mut ffi::sqlite3_stmt,
        args: &mut impl Iterator<Item = &'a Arg>,
        rows: &mut Vec<RawRow>,
    ) -> Result<(), sqlx::Error> {
        let result = self.step_one(stmt, args, rows);
        // SAFETY: `stmt` is a live statement of this handle; reset and
        // unbound, it holds no lock and no value of `args`.
        unsafe {
            ffi::sqlite3_reset(stmt);
            ffi::sqlite3_clear_bindings(stmt);
        }
        result
    }

    fn step_one<'a>(
        &self,
        stmt: *mut ffi::sqlite3_stmt,
        args: &mut impl Iterator<Item = &'a Arg>,
        rows: &mut Vec<RawRow>,
    ) -> Result<(), sqlx::Error> {
        // SAFETY (every FFI call here): `stmt` is a live statement of the
        // held handle; text is bound with SQLITE_TRANSIENT (SQLite copies
        // it); column values are copied out before the next step.
        unsafe {
            for p in 1..=ffi::sqlite3_bind_parameter_count(stmt) {
                // Only anonymous `?`s take the next argument; `?NNN` and
                // `:name` would bind out of order.
                if !ffi::sqlite3_bind_parameter_name(stmt, p).is_null() {
                    return Err(error(
                        "only anonymous `?` placeholders are supported".into(),
                    ));
                }
                let rc = match args.next() {
                    Some(Arg::Int(Some(v))) => ffi::sqlite3_bind_int64(stmt, p, *v),
                    Some(Arg::Text(Some(s))) => ffi::sqlite3_bind_text(
                        stmt,
                        p,
                        s.as_ptr().cast::<c_char>(),
                        c_int::try_from(s.len()).map_err(|_| error("value too long".into()))?,
                        ffi::SQLITE_TRANSIENT(),
                    ),
                    Some(Arg::Int(None) | Arg::Text(None)) => ffi::sqlite3_bind_null(stmt, p),
                    None => return Err(error("fewer arguments than placeholders".into())),
                };
                if rc != ffi::SQLITE_OK {
                    return Err(self.last_error());
                }
            }
            let mut names: Option<Arc<[String]>> = None;
            loop {
                match ffi::sqlite3_step(stmt) {
                    ffi::SQLITE_ROW => {
                        let n = ffi::sqlite3_column_count(stmt);
                        let names = names
                            .get_or_insert_with(|| {
                                (0..n)
                                    .map(|c| {
                                        let name = ffi::sqlite3_column_name(stmt, c);
                                        if name.is_null() {
                                            String::new()
                                        } else {
                                            CStr::from_ptr(name).to_string_lossy().into_owned()
                                        }
                                    })
                                    .collect()
                            })
                            .clone();
                        let values = (0..n).map(|c| column(stmt, c)).collect::<Vec<_>>();
                        // A value SQLite could not copy out for lack of
                        // memory reads as empty: never let one through.
                        if ffi::sqlite3_errcode(self.db.as_ptr()) == ffi::SQLITE_NOMEM {
                            return Err(self.last_error());
                        }
                        rows.push(RawRow { names, values });
                    }
                    ffi::SQLITE_DONE => return Ok(()),
                    _ => return Err(self.last_error()),
                }
            }
        }
    }
}

/// Column `c` of the current row of `stmt`, copied.
///
/// # Safety
/// `stmt` must be a live statement positioned on a row.
unsafe fn column(stmt: *mut ffi::sqlite3_stmt, c: c_int) -> Value {
    // SAFETY: as the function's contract; the pointers SQLite returns are
    // valid for the byte counts it gives, until the next step or reset.
    unsafe {
        match ffi::sqlite3_column_type(stmt, c) {
            ffi::SQLITE_NULL => Value::Null,
            ffi::SQLITE_INTEGER => Value::Int(ffi::sqlite3_column_int64(stmt, c)),
            ffi::SQLITE_BLOB => {
                let p = ffi::sqlite3_column_blob(stmt, c).cast::<u8>();
                let n = usize::try_from(ffi::sqlite3_column_bytes(stmt, c)).unwrap_or(0);
                if p.is_null() || n == 0 {
                    Value::Blob(Vec::new())
                } else {
                    Value::Blob(std::slice::from_raw_parts(p, n).to_vec())
                }
            }
            // TEXT, and REAL as text.
            _ => {
                let p = ffi::sqlite3_column_text(stmt, c);
                let n = usize::try_from(ffi::sqlite3_column_bytes(stmt, c)).unwrap_or(0);
                if p.is_null() || n == 0 {
                    Value::Text(String::new())
                } else {
                    Value::Text(
                        String::from_utf8_lossy(std::slice::from_raw_parts(p, n)).into_owned(),
                    )
                }
            }
        }
    }
}

fn finalize(stmts: Vec<NonNull<ffi::sqlite3_stmt>>) {
    for stmt in stmts {
        // SAFETY: each statement was prepared on the held handle and is
        // finalized once (the vector is consumed).
        unsafe { ffi::sqlite3_finalize(stmt.as_ptr()) };
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        for (_, stmts) in self.prepared.drain() {
            finalize(stmts);
        }
    }
}
