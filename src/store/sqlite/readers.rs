//! Connections driven directly, on the calling thread: the store's
//! readers, and the sandbox gateway's ledger (`gateway::sandbox`).
//!
//! A read through sqlx's pool is handed to the connection's worker thread,
//! and its rows handed back one message at a time: two or more thread
//! wake-ups per read, which cost more than SQLite's own work on the reads a
//! sweep makes for each renewal and each invoice it mails (renewd bench,
//! "time travel": `futex` was the largest single item of a simulated
//! year's profile). The sweep's reads run here instead, through SQLite's C
//! API on the caller's thread, their statements kept prepared ([`Held`],
//! as the write connection's are).
//!
//! Each connection is behind a plain mutex that is never held across an
//! `await`: a read takes a free connection if there is one, else waits for
//! one (a read is short: a few rows by key, or a page of a scan). SQLite's
//! busy handler is off on the readers, so a read that finds the database
//! locked by another process (a WAL recovery, an exclusive lock) does not
//! hold the thread: it lets go of its reader and tries again after an
//! async pause, until the store's busy timeout has passed.
//!
//! A script run here has no transaction around it: each statement is its
//! own. A script that met a locked database is run again from its first
//! statement, so a write through [`Readers::run`] must be one statement,
//! committed when it ends (the sandbox's ledger takes a charge in one
//! `INSERT`): a second one would run the first again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, SqliteConnection};

use super::raw::{BusyWait, Held};
use super::script::{Script, Tagged};
use crate::store::StoreResult;

/// One reader: its handle taken from sqlx's worker.
struct Reader {
    /// Declared before `_conn`, so it is dropped (its statements finalized
    /// and the handle given back) before the connection closes.
    held: Held,
    _conn: SqliteConnection,
}

pub(crate) struct Readers {
    slots: Vec<Mutex<Reader>>,
    next: AtomicUsize,
    /// How long a read keeps trying while the database is locked.
    busy_timeout: Duration,
}

impl Readers {
    /// Opens `n` (at least one) reader connections with `options`; a read
    /// that finds the database locked keeps trying for `busy_timeout`.
    pub(crate) async fn open(
        options: &SqliteConnectOptions,
        n: usize,
        busy_timeout: Duration,
    ) -> StoreResult<Readers> {
        let mut slots = Vec::with_capacity(n.max(1));
        for _ in 0..n.max(1) {
            let mut conn = options.connect().await?;
            // SAFETY: `held` is declared before `_conn` in `Reader`, so it
            // is dropped first, and `_conn` is never used through sqlx.
            let mut held = unsafe { Held::take(&mut conn) }.await?;
            held.set_busy_timeout(0);
            slots.push(Mutex::new(Reader { held, _conn: conn }));
        }
        Ok(Readers {
            slots,
            next: AtomicUsize::new(0),
            busy_timeout,
        })
    }

    /// A free reader if there is one, else the next in turn once it is free.
    fn reader(&self) -> MutexGuard<'_, Reader> {
        let n = self.slots.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            if let Ok(r) = self.slots[(first + i) % n].try_lock() {
                return r;
            }
        }
        self.slots[first]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs a script (its statements in order, each in its own
    /// transaction) and returns the rows of all of them; its statements
    /// stay prepared for the next run of the same text. A script that met
    /// the database locked is run again, from its first statement: reads
    /// may be any number of statements, a write only one (see above).
    pub(crate) async fn run(&self, script: &Script) -> StoreResult<Tagged> {
        let mut wait = BusyWait::new(self.busy_timeout);
        loop {
            // The reader is given back before any pause.
            let result = {
                let mut reader = self.reader();
                let result = script.run_db(&mut reader.held);
                debug_assert!(
                    !reader.held.in_transaction(),
                    "a script left a transaction open on a direct connection"
                );
                result
            };
            match result {
                Err(e) if wait.again(&e).await => {}
                other => return Ok(other?),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::raw::Cols;
    use sqlx::sqlite::SqliteJournalMode;
    use sqlx::Connection;

    async fn setup(dir: &tempfile::TempDir, n: usize) -> (Readers, SqliteConnection) {
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("r.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let mut writer = options.connect().await.unwrap();
        sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")
            .execute(&mut writer)
            .await
            .unwrap();
        (
            Readers::open(&options, n, Duration::from_secs(30))
                .await
                .unwrap(),
            writer,
        )
    }

    async fn insert(conn: &mut SqliteConnection, name: &str) {
        sqlx::query("INSERT INTO t (name) VALUES (?)")
            .bind(name)
            .execute(conn)
            .await
            .unwrap();
    }

    async fn names(readers: &Readers) -> Vec<String> {
        let mut s = Script::default();
        s.push("SELECT name FROM t WHERE id > ? ORDER BY id", [0.into()]);
        let out = readers.run(&s).await.unwrap();
        out.all().iter().map(|r| r.col("name").unwrap()).collect()
    }

    #[tokio::test]
    async fn each_read_sees_what_was_committed_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (readers, mut writer) = setup(&dir, 2).await;
        assert!(names(&readers).await.is_empty());
        insert(&mut writer, "one").await;
        // The same kept statement, on each reader in turn: none of them
        // keeps the snapshot of its last read.
        assert_eq!(names(&readers).await, ["one"]);
        assert_eq!(names(&readers).await, ["one"]);
        let mut tx = writer.begin().await.unwrap();
        insert(&mut tx, "two").await;
        // Not yet committed: not seen.
        assert_eq!(names(&readers).await, ["one"]);
        tx.commit().await.unwrap();
        assert_eq!(names(&readers).await, ["one", "two"]);
        assert_eq!(names(&readers).await, ["one", "two"]);
    }

    #[tokio::test]
    async fn a_failed_read_is_an_error_and_the_reader_reads_on() {
        let dir = tempfile::tempdir().unwrap();
        let (readers, mut writer) = setup(&dir, 1).await;
        let mut bad = Script::default();
        bad.push("SELECT nothing FROM t WHERE id = ?", [1.into()]);
        assert!(readers.run(&bad).await.is_err());
        // One that fails while it runs, after its first row: the statement
        // is reset all the same, and holds no snapshot.
        let mut overflow = Script::default();
        overflow.push(
            "SELECT abs(v) AS a FROM (SELECT 1 AS v UNION ALL SELECT -9223372036854775808) WHERE ? ORDER BY v DESC",
            [1.into()],
        );
        assert!(readers.run(&overflow).await.is_err());
        insert(&mut writer, "one").await;
        assert_eq!(names(&readers).await, ["one"]);
    }

    // The test holds readers busy while it reads (a read awaits only on a
    // locked database, which this test never has).
    #[allow(clippy::await_holding_lock)]
    #[tokio::test]
    async fn a_read_takes_a_free_reader_or_waits_for_a_busy_one() {
        let dir = tempfile::tempdir().unwrap();
        let (readers, mut writer) = setup(&dir, 2).await;
        insert(&mut writer, "one").await;
        // One reader busy: the read goes to the other, whichever is next.
        for busy in 0..2 {
            let _held = readers.slots[busy].lock().unwrap();
            assert_eq!(names(&readers).await, ["one"]);
        }
        // Both busy: the read waits until one is free.
        let both: Vec<_> = readers.slots.iter().map(|s| s.lock().unwrap()).collect();
        std::thread::scope(|scope| {
            let (done, finished) = std::sync::mpsc::channel();
            let readers = &readers;
            scope.spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .unwrap();
                done.send(runtime.block_on(names(readers))).unwrap();
            });
            assert!(finished
                .recv_timeout(std::time::Duration::from_millis(100))
                .is_err());
            drop(both);
            assert_eq!(finished.recv().unwrap(), ["one"]);
        });
    }

    #[tokio::test]
    async fn a_kept_read_follows_a_change_of_schema() {
        let dir = tempfile::tempdir().unwrap();
        let (readers, mut writer) = setup(&dir, 1).await;
        let mut s = Script::default();
        s.push("SELECT * FROM t WHERE id > ?", [0.into()]);
        insert(&mut writer, "one").await;
        let before = readers.run(&s).await.unwrap();
        assert!(before.all()[0].col::<Option<String>>("extra").is_err());
        sqlx::query("ALTER TABLE t ADD COLUMN extra TEXT DEFAULT 'x'")
            .execute(&mut writer)
            .await
            .unwrap();
        let after = readers.run(&s).await.unwrap();
        assert_eq!(
            after.all()[0].col::<Option<String>>("extra").unwrap(),
            Some("x".to_string())
        );
    }
}
