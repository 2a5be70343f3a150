//! Group commit for the SQLite store: many write transactions, one fsync.
//!
//! With `synchronous = FULL` every COMMIT waits for the disk, and SQLite has
//! one writer, so transactions committed one after another cap renewd at the
//! disk's flush rate (`renewd bench`, "raw limit") divided by the two
//! commits each renewal needs, however many renewals are in flight.
//!
//! Here every writer still runs alone (it holds an async mutex, as before),
//! but inside a savepoint of a batch transaction that one dedicated
//! connection keeps open. A background flusher commits the batch as soon as
//! the writers already queued for the mutex have had their turn, and only
//! then are their `commit` calls answered. So:
//! - each write transaction is still atomic (its savepoint is released or
//!   rolled back whole) and serial (each sees everything written before it);
//! - nothing is acknowledged before it is durable: `commit` returns once the
//!   batch's COMMIT has returned, and a batch that fails fails every member;
//! - one fsync covers every writer that arrived while the previous batch was
//!   being written.
//!
//! The fsync need not keep the connection: with [`Durability::AfterCommit`]
//! the connection runs at `synchronous = NORMAL`, so COMMIT only appends the
//! batch's frames to the WAL, and the flusher syncs the WAL file itself once
//! it has let the next writers in; the batch's members are answered when
//! that sync has returned. Meanwhile the next batch is written, and its
//! COMMIT waits for the sync before it (one sync at a time, in order). The
//! WAL is append-only between checkpoints and SQLite syncs it before every
//! checkpoint and every restart, so a sync covers every batch committed
//! before it: nothing is acknowledged before it is durable, as with `FULL`.
//! What changes is that other connections can read a batch during its sync,
//! before it is durable. A power cut then loses it, and with it every batch
//! after it, whether or not someone read it: renewd acts on the outside (a
//! charge, a mail) only after a write of its own was acknowledged (the
//! attempt, the mail's claim), which is durable only once everything it
//! read is. A sync that fails stops the store's writes for good (the
//! kernel may have dropped the pages it could not write, so a later sync
//! that succeeds would prove nothing): renewd must be restarted, and
//! SQLite then recovers what the WAL on disk holds. The batch of that sync
//! is told it was committed but may not be durable, and the store's health
//! check fails from then on.
//!
//! The WAL is the file SQLite names for the connection (symbolic links
//! followed), opened once when the store opens and synced through that one
//! descriptor: Linux reports a failed write-back once to each open file, so
//! a descriptor opened afterwards could sync without error what never
//! reached the disk (if SQLite's own checkpoint, which ignores the error,
//! was told first). The file stays the same while the store is open: SQLite
//! deletes a WAL only when its last connection closes.
//!
//! It must never let a writer run outside the batch transaction. SQLite
//! rolls a whole transaction back by itself on some errors (I/O, full disk);
//! when that happens the savepoint bookkeeping fails, the batch is marked
//! broken, and a broken batch ends in ROLLBACK with an error for each member.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, OnceLock};

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, SqliteConnection};
use tokio::sync::{mpsc, watch, Mutex, MutexGuard};

use std::ffi::c_int;
use std::time::Duration;

use super::raw::{BusyWait, Held};
use super::script::{Script, Tagged};
use crate::store::{StoreError, StoreResult};

/// How a batch's COMMIT is made durable.
pub(super) enum Durability {
    /// COMMIT waits for the disk itself (`synchronous = FULL`, as `options`
    /// set it), holding the connection meanwhile, as `AfterCommit` does
    /// without a WAL file; the tests of the batches alone use it.
    #[cfg(test)]
    InCommit,
    /// COMMIT only writes the WAL (`synchronous = NORMAL`), and the flusher
    /// syncs the connection's WAL file, off the connection, before the batch
    /// is answered (see the module's documentation).
    AfterCommit,
    /// As `AfterCommit`, with this in place of the WAL file's sync.
    #[cfg(test)]
    AfterCommitWith(WalSync),
}

/// Makes everything written to the WAL so far durable.
type WalSync = Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>;

/// The batch writer of one store: the connection, and the flusher's signal.
pub(super) struct GroupCommit {
    state: Arc<Mutex<State>>,
    flush: mpsc::UnboundedSender<()>,
    /// Why nothing more can be written: a sync of the WAL failed.
    stopped: Arc<OnceLock<String>>,
    /// The WAL file synced after each COMMIT, if any.
    #[cfg_attr(not(test), allow(dead_code))]
    wal: Option<std::path::PathBuf>,
}

struct State {
    conn: WriteConn,
    /// The open batch transaction (BEGIN IMMEDIATE issued), if any.
    batch: Option<Batch>,
    /// A writer's savepoint is still open: its [`WriteTx`] was dropped
    /// without commit or rollback (an early `?` return, or a cancelled
    /// task). The next holder of the mutex rolls it back first.
    dangling: Option<Savepoint>,
    /// A writer that was opening the batch went away while its opening
    /// was on its way (a cancelled task): BEGIN may have run with nobody
    /// to end it. The next holder of the mutex rolls back first.
    unopened: bool,
    /// The last writer committed: its savepoint is released by the next
    /// writer's opening (or by the batch's COMMIT), which saves each write a
    /// round trip of its own.
    release_pending: Option<Savepoint>,
    /// The same as [`GroupCommit`]'s.
    stopped: Arc<OnceLock<String>>,
}

/// A writer's savepoint. A writer takes the name the savepoint still open
/// (the last writer's, until its release) does not have, so undoing a
/// writer whose opening never ran fails (and breaks the batch) instead of
/// undoing the writer before it. Two names, not one per writer, keep the
/// scripts' text (which starts with the opening) few enough to stay in the
/// connection's statement cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Savepoint {
    A,
    B,
}

impl Savepoint {
    fn name(self) -> &'static str {
        match self {
            Savepoint::A => "renewd_write_a",
            Savepoint::B => "renewd_write_b",
        }
    }

    /// The name for the next writer, given the savepoint still open.
    fn after(open: Option<Savepoint>) -> Savepoint {
        match open {
            Some(Savepoint::A) => Savepoint::B,
            _ => Savepoint::A,
        }
    }

    fn rollback_to(self) -> String {
        format!("ROLLBACK TO {0}; RELEASE {0}", self.name())
    }
}

struct Batch {
    /// Writers whose savepoint was released into this batch.
    members: usize,
    /// Why the batch can no longer be committed.
    broken: Option<String>,
    /// Answered once the batch has ended: `Ok` when it is durable.
    done: Answer,
}

/// Where a batch's members wait for their answer.
type Answer = watch::Sender<Option<Result<(), Unwritten>>>;

/// Why a batch's writes are not known to be durable.
#[derive(Debug, Clone)]
enum Unwritten {
    /// Rolled back: nothing of the batch was written.
    NotCommitted(String),
    /// Committed, but the sync after it failed: other connections see it,
    /// and it may or may not survive a crash.
    NotSynced(String),
}

/// One writer's turn: a savepoint inside the open batch. Derefs to the
/// connection, like an sqlx transaction.
pub(crate) struct WriteTx<'a> {
    state: MutexGuard<'a, State>,
    flush: &'a mpsc::UnboundedSender<()>,
    open: bool,
    savepoint: Savepoint,
    /// The last writer's savepoint, released by this one's opening.
    releases: Option<Savepoint>,
    /// The opening (savepoint) not yet sent: it goes in front of the first
    /// script this writer runs ([`WriteTx::run`]), in the same round trip.
    pending: Option<String>,
    /// This writer opens the batch: its opening starts with BEGIN
    /// IMMEDIATE, and the batch exists once that has run.
    opens_batch: bool,
}

/// Runs `f` on this thread. A statement that may take long (COMMIT on the
/// disk's flush) first tells a
/// multi-threaded runtime to move this thread's other tasks elsewhere; the
/// rest (tens of microseconds) just run. One that took over a second is
/// logged, as sqlx logs slow statements.
fn may_block<T>(long: bool, what: &'static str, f: impl FnOnce() -> T) -> T {
    let multi = || {
        tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
    };
    let started = std::time::Instant::now();
    let out = if long && multi() {
        tokio::task::block_in_place(f)
    } else {
        f()
    };
    let took = started.elapsed();
    if took >= SLOW {
        tracing::warn!(
            statement = what,
            elapsed_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            "slow SQLite write"
        );
    }
    out
}

/// A write statement slower than this is logged.
const SLOW: Duration = Duration::from_secs(1);

/// The write connection: driven directly (`raw::Held`) for the store's
/// scripts and the batch's own statements, given back to sqlx for the
/// writes that use sqlx's query API ([`WriteTx`]'s `DerefMut`).
pub(super) struct WriteConn {
    /// Declared before `conn`, so it is dropped (its statements finalized
    /// and the handle given back) before the connection closes.
    held: Option<Held>,
    conn: SqliteConnection,
    /// How long a BEGIN IMMEDIATE may wait for another process's write
    /// lock (the store's `busy_timeout`).
    busy_timeout: Duration,
}

impl WriteConn {
    /// The connection's handle, taken from sqlx's worker if sqlx has it.
    async fn held(&mut self) -> Result<&mut Held, sqlx::Error> {
        let held = match self.held.take() {
            Some(held) => held,
            // SAFETY: `held` is declared before `conn`, so it is dropped
            // first, and `sqlx()` drops it before sqlx uses `conn`.
            None => unsafe { Held::take(&mut self.conn) }.await?,
        };
        Ok(self.held.insert(held))
    }

    /// Runs `f`, an opening that starts with BEGIN IMMEDIATE, without
    /// waiting in SQLite's busy handler (which would hold this thread, and
    /// every future polled by the same task, for up to `busy_timeout`):
    /// while another process holds the write lock and nothing was begun,
    /// it tries again after a pause, until `busy_timeout` has passed.
    async fn opening<T>(
        &mut self,
        mut f: impl FnMut(&mut Held) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        let limit = self.busy_timeout;
        let restore = c_int::try_from(limit.as_millis()).unwrap_or(c_int::MAX);
        let mut wait = BusyWait::new(limit);
        loop {
            let held = self.held().await?;
            held.set_busy_timeout(0);
            let result = f(held);
            held.set_busy_timeout(restore);
            match result {
                // Retried only while nothing was begun.
                Err(e) if !held.in_transaction() && wait.again(&e).await => {}
                other => return other,
            }
        }
    }

    /// Moves the connection to `synchronous = NORMAL` and opens its WAL file
    /// for the syncs after each COMMIT, if the database is in WAL mode and
    /// has a file; otherwise leaves it as it is (`None`).
    async fn wal_sync(&mut self) -> Result<Option<(WalSync, std::path::PathBuf)>, sqlx::Error> {
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(self.sqlx())
            .await?;
        // A read opens (and creates) the WAL.
        sqlx::query("SELECT count(*) FROM sqlite_schema")
            .execute(self.sqlx())
            .await?;
        let wal = self.held().await?.wal_path();
        let Some(wal) = wal.filter(|_| mode.eq_ignore_ascii_case("wal")) else {
            tracing::warn!(
                journal_mode = %mode,
                "the database is not a file in WAL mode; every COMMIT waits for the disk"
            );
            return Ok(None);
        };
        let file = std::fs::File::open(&wal).map_err(|e| {
            sqlx::Error::Io(std::io::Error::new(
                e.kind(),
                format!("cannot open the WAL {}: {e}", wal.display()),
            ))
        })?;
        self.exec("PRAGMA synchronous = NORMAL").await?;
        let sync: WalSync = Arc::new(move || file.sync_data());
        Ok(Some((sync, wal)))
    }

    /// Runs fixed SQL (one or more statements).
    async fn exec(&mut self, sql: &str) -> Result<(), sqlx::Error> {
        self.held().await?.run(sql, &[], true)?;
        Ok(())
    }

    /// Runs fixed SQL that starts with BEGIN IMMEDIATE (see `opening`).
    async fn exec_opening(&mut self, sql: &str) -> Result<(), sqlx::Error> {
        self.opening(|held| held.run(sql, &[], true).map(drop))
            .await
    }

    /// Commits the batch transaction: waits for the disk's flush.
    async fn commit(&mut self) -> Result<(), sqlx::Error> {
        let held = self.held().await?;
        may_block(true, "COMMIT", || held.run("COMMIT", &[], true))?;
        Ok(())
    }

    /// Runs a script; `opens_batch` when it starts with BEGIN IMMEDIATE.
    async fn script(&mut self, script: Script, opens_batch: bool) -> StoreResult<Tagged> {
        if opens_batch {
            return Ok(self.opening(|held| script.run_db(held)).await?);
        }
        let held = self.held().await?;
        Ok(may_block(false, "script", || script.run_db(held))?)
    }

    /// The connection for sqlx's query API (the handle given back first).
    fn sqlx(&mut self) -> &mut SqliteConnection {
        self.held = None;
        &mut self.conn
    }
}

fn failed(why: &str) -> StoreError {
    StoreError::Database(sqlx::Error::Io(std::io::Error::other(format!(
        "the write was not committed: {why}"
    ))))
}

fn unknown(why: &str) -> StoreError {
    StoreError::Database(sqlx::Error::Io(std::io::Error::other(format!(
        "the write was committed, but may not be on disk (check it before writing it again): {why}"
    ))))
}

impl GroupCommit {
    /// Opens the dedicated write connection and starts the flusher (which
    /// ends when the store is dropped).
    /// `busy_timeout` is the one `options` sets (sqlx does not say it).
    /// With [`Durability::AfterCommit`], the connection is moved to
    /// `synchronous = NORMAL` and its WAL file opened for the syncs; should
    /// the database not be in WAL mode (where only COMMIT's own sync is
    /// durable) or have no file, it stays as `options` made it.
    pub(super) async fn open(
        options: &SqliteConnectOptions,
        busy_timeout: Duration,
        durability: Durability,
    ) -> Result<GroupCommit, sqlx::Error> {
        let mut conn = WriteConn {
            held: None,
            conn: options.connect().await?,
            busy_timeout,
        };
        let (sync, wal) = match durability {
            #[cfg(test)]
            Durability::InCommit => (None, None),
            Durability::AfterCommit => match conn.wal_sync().await? {
                Some((sync, wal)) => (Some(sync), Some(wal)),
                None => (None, None),
            },
            #[cfg(test)]
            Durability::AfterCommitWith(sync) => {
                conn.exec("PRAGMA synchronous = NORMAL").await?;
                (Some(sync), None)
            }
        };
        let stopped = Arc::new(OnceLock::new());
        let state = Arc::new(Mutex::new(State {
            conn,
            batch: None,
            dangling: None,
            unopened: false,
            release_pending: None,
            stopped: stopped.clone(),
        }));
        let (flush, signals) = mpsc::unbounded_channel();
        tokio::spawn(flusher(state.clone(), signals, sync, stopped.clone()));
        Ok(GroupCommit {
            state,
            flush,
            stopped,
            wal,
        })
    }

    /// Why the store writes nothing more, if it does not (a sync of the WAL
    /// failed; see the module's documentation).
    pub(super) fn stopped(&self) -> Option<&str> {
        self.stopped.get().map(String::as_str)
    }

    /// Waits for this writer's turn and opens its savepoint in the batch
    /// (opening a batch with BEGIN IMMEDIATE if none is open), in one round
    /// trip.
    pub(super) async fn begin(&self) -> StoreResult<WriteTx<'_>> {
        let mut tx = self.begin_deferred().await?;
        if let Some(opening) = tx.pending.take() {
            let opened = if tx.opens_batch {
                tx.state.conn.exec_opening(&opening).await
            } else {
                tx.state.conn.exec(&opening).await
            };
            match opened {
                Ok(()) => tx.opened(),
                Err(e) => {
                    tx.open = false;
                    if tx.opens_batch {
                        tx.state.abort_opening().await;
                    } else {
                        tx.state.mark_broken(&e);
                        let _ = self.flush.send(());
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(tx)
    }

    /// As [`GroupCommit::begin`], but the savepoint (and the batch's BEGIN
    /// IMMEDIATE, when this writer opens the batch) is opened by the first
    /// script the writer runs, in the same round trip: one or two fewer
    /// per write. Such a writer must write through [`WriteTx::run`] only.
    pub(super) async fn begin_deferred(&self) -> StoreResult<WriteTx<'_>> {
        if let Some(why) = self.stopped() {
            return Err(failed(why));
        }
        let mut state = self.state.lock().await;
        state.repair().await;
        if state.batch.as_ref().is_some_and(|b| b.broken.is_some()) {
            // Rolled back: nothing to make durable.
            if let Some((done, result, _)) = state.finish().await {
                done.send_replace(Some(result));
            }
        }
        // The last writer's savepoint released into the batch, and this
        // writer's opened; with no batch open, the batch is begun first.
        let opens_batch = state.batch.is_none();
        debug_assert!(!opens_batch || state.release_pending.is_none());
        let releases = state.release_pending.take();
        let savepoint = Savepoint::after(releases);
        let opening = match releases {
            _ if opens_batch => format!("BEGIN IMMEDIATE; SAVEPOINT {}", savepoint.name()),
            Some(last) => format!("RELEASE {}; SAVEPOINT {}", last.name(), savepoint.name()),
            None => format!("SAVEPOINT {}", savepoint.name()),
        };
        Ok(WriteTx {
            state,
            flush: &self.flush,
            open: true,
            savepoint,
            releases,
            pending: Some(opening),
            opens_batch,
        })
    }
}

impl State {
    /// The opening of a batch failed, perhaps part-way (BEGIN ran, a later
    /// statement of the same round trip did not): no transaction is left
    /// open. Nobody else has joined a batch that was never opened, so
    /// rolling it back undoes only the writer that opened it.
    async fn abort_opening(&mut self) {
        debug_assert!(self.batch.is_none());
        // Fails ("no transaction is active") when BEGIN itself failed.
        let _ = self.conn.exec("ROLLBACK").await;
    }

    fn mark_broken(&mut self, e: &sqlx::Error) {
        if let Some(b) = self.batch.as_mut() {
            b.broken.get_or_insert_with(|| e.to_string());
        }
    }

    /// Rolls back the savepoint of a writer that went away mid-way.
    async fn repair(&mut self) {
        if std::mem::take(&mut self.unopened) {
            self.abort_opening().await;
        }
        if let Some(savepoint) = self.dangling.take() {
            if let Err(e) = self.conn.exec(&savepoint.rollback_to()).await {
                self.mark_broken(&e);
            }
        }
    }

    /// Ends the open batch, COMMIT (or ROLLBACK if broken, empty, or the
    /// store stopped), and returns its members' answer, to be sent once the
    /// batch is durable (see [`Durability`]), and whether it was committed.
    async fn finish(&mut self) -> Option<(Answer, Result<(), Unwritten>, bool)> {
        self.repair().await;
        let mut batch = self.batch.take()?;
        if let Some(why) = self.stopped.get() {
            batch.broken.get_or_insert_with(|| why.clone());
        }
        // COMMIT releases the last writer's savepoint with the rest.
        self.release_pending = None;
        let result = match batch.broken {
            Some(why) => {
                // SQLite may have rolled back already; this only makes sure.
                let _ = self.conn.exec("ROLLBACK").await;
                Err(why)
            }
            None if batch.members == 0 => {
                self.conn.exec("ROLLBACK").await.map_err(|e| e.to_string())
            }
            None => match self.conn.commit().await {
                Ok(()) => Ok(()),
                Err(e) => {
                    let _ = self.conn.exec("ROLLBACK").await;
                    Err(e.to_string())
                }
            },
        };
        // Nothing is committed by a broken batch (its result is an error)
        // or an empty one (rolled back).
        let committed = batch.members > 0 && result.is_ok();
        Some((
            batch.done,
            result.map_err(Unwritten::NotCommitted),
            committed,
        ))
    }
}

/// Commits each batch once the writers queued ahead of it have joined it:
/// the mutex is fair, so taking it means everyone who asked before has had
/// their turn. With [`Durability::AfterCommit`] the WAL is synced after the
/// mutex is let go, so the next batch is written meanwhile; its COMMIT
/// waits for this loop's next turn.
async fn flusher(
    state: Arc<Mutex<State>>,
    mut signals: mpsc::UnboundedReceiver<()>,
    sync: Option<WalSync>,
    stopped: Arc<OnceLock<String>>,
) {
    while signals.recv().await.is_some() {
        while signals.try_recv().is_ok() {}
        let Some((done, result, committed)) = state.lock().await.finish().await else {
            continue;
        };
        let result = match &sync {
            Some(sync) if committed => match may_block(true, "WAL sync", || sync()) {
                Ok(()) => result,
                Err(e) => {
                    let why = format!(
                        "the database's WAL could not be synced to disk ({e}); \
                         renewd writes nothing more until it is restarted"
                    );
                    tracing::error!(
                        error = %e,
                        "WAL sync failed: the store writes nothing more until renewd is restarted"
                    );
                    let _ = stopped.set(why.clone());
                    Err(Unwritten::NotSynced(why))
                }
            },
            _ => result,
        };
        done.send_replace(Some(result));
    }
}

impl WriteTx<'_> {
    /// Runs a script, the savepoint's opening first if it is still pending.
    /// If the script fails, the opening may or may not have run: undoing
    /// (ROLLBACK TO this writer's own savepoint) then fails if it did not,
    /// and that breaks the batch. A writer that was opening the batch is
    /// rolled back whole instead and starts again: its next script opens
    /// the batch anew.
    pub(crate) async fn run(&mut self, mut script: Script) -> StoreResult<Tagged> {
        let Some(opening) = self.pending.take() else {
            return self.state.conn.script(script, false).await;
        };
        script.prepend(&opening);
        match self.state.conn.script(script, self.opens_batch).await {
            Ok(out) => {
                self.opened();
                Ok(out)
            }
            Err(e) if self.opens_batch => {
                self.state.abort_opening().await;
                self.pending = Some(opening);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// This writer's opening has run: if it began the batch, the batch is
    /// open now.
    fn opened(&mut self) {
        if std::mem::take(&mut self.opens_batch) {
            self.state.batch = Some(Batch {
                members: 0,
                broken: None,
                done: watch::channel(None).0,
            });
        }
    }

    /// Nothing was sent for this writer: its turn ends with nothing to undo,
    /// and the savepoint it would have released is released by the next.
    /// The flusher is told, in case this writer opened the batch.
    fn never_opened(&mut self) -> bool {
        if self.pending.take().is_none() {
            return false;
        }
        self.open = false;
        self.state.release_pending = self.releases;
        let _ = self.flush.send(());
        true
    }

    /// Releases the savepoint into the batch, lets the next writer in, and
    /// returns once the batch is durable.
    pub(crate) async fn commit(mut self) -> StoreResult<()> {
        if self.never_opened() {
            return Ok(());
        }
        let Some(batch) = self.state.batch.as_mut() else {
            // Still open: dropped, it is rolled back by the next writer.
            return Err(failed("no batch transaction was open"));
        };
        batch.members += 1;
        let mut done = batch.done.subscribe();
        // Released by whatever runs next on the connection: the next
        // writer's opening or the batch's COMMIT. If that fails, the batch
        // fails, and this writer with it.
        self.state.release_pending = Some(self.savepoint);
        self.open = false;
        let _ = self.flush.send(());
        drop(self);
        let answer = done
            .wait_for(Option::is_some)
            .await
            .map(|r| r.clone())
            .map_err(|_| failed("the store shut down before the batch was committed"))?;
        match answer {
            Some(Ok(())) => Ok(()),
            Some(Err(Unwritten::NotCommitted(why))) => Err(failed(&why)),
            Some(Err(Unwritten::NotSynced(why))) => Err(unknown(&why)),
            None => Err(failed("the batch ended without an answer")),
        }
    }

    /// Undoes this writer's changes so far; its savepoint stays open, so it
    /// can go on writing, then commit or roll back.
    pub(crate) async fn undo(&mut self) -> StoreResult<()> {
        if self.pending.is_some() {
            return Ok(());
        }
        let sql = format!("ROLLBACK TO {}", self.savepoint.name());
        let result = self.state.conn.exec(&sql).await;
        if let Err(e) = &result {
            self.state.mark_broken(e);
        }
        Ok(result?)
    }

    /// Undoes this writer's changes; the batch goes on without them.
    pub(crate) async fn rollback(mut self) -> StoreResult<()> {
        if self.never_opened() {
            return Ok(());
        }
        self.open = false;
        let result = self.state.conn.exec(&self.savepoint.rollback_to()).await;
        if let Err(e) = &result {
            self.state.mark_broken(e);
        }
        // The batch may have no other member: let the flusher end it.
        let _ = self.flush.send(());
        Ok(result?)
    }
}

impl Drop for WriteTx<'_> {
    fn drop(&mut self) {
        if !self.never_opened() && self.open {
            if self.opens_batch {
                self.state.unopened = true;
            } else {
                self.state.dangling = Some(self.savepoint);
            }
            let _ = self.flush.send(());
        }
    }
}

impl Deref for WriteTx<'_> {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.state.conn.conn
    }
}

impl DerefMut for WriteTx<'_> {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        debug_assert!(
            self.pending.is_none(),
            "a deferred writer writes through WriteTx::run"
        );
        self.state.conn.sqlx()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
    use sqlx::Connection;
    use std::time::Duration;

    async fn setup(dir: &tempfile::TempDir) -> (Arc<GroupCommit>, SqliteConnectOptions) {
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("g.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full);
        let g = GroupCommit::open(&options, Duration::from_secs(30), Durability::InCommit)
            .await
            .unwrap();
        create_table(&g).await;
        (Arc::new(g), options)
    }

    /// The table the tests write, created through `g`.
    async fn create_table(g: &GroupCommit) {
        let mut tx = g.begin().await.unwrap();
        sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    /// What another connection sees: only what was committed.
    async fn committed(options: &SqliteConnectOptions) -> Vec<i64> {
        let mut conn = options.connect().await.unwrap();
        let ids = sqlx::query_scalar("SELECT id FROM t ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        ids
    }

    async fn insert(g: &GroupCommit, id: i64) -> WriteTx<'_> {
        let mut tx = g.begin().await.unwrap();
        sqlx::query("INSERT INTO t (id) VALUES (?)")
            .bind(id)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx
    }

    #[tokio::test]
    async fn every_commit_that_returned_is_visible_to_other_connections() {
        let dir = tempfile::tempdir().unwrap();
        let (g, options) = setup(&dir).await;
        let writers: Vec<_> = (1..=40)
            .map(|id| {
                let g = g.clone();
                tokio::spawn(async move { insert(&g, id).await.commit().await })
            })
            .collect();
        for w in writers {
            w.await.unwrap().unwrap();
        }
        assert_eq!(committed(&options).await, (1..=40).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_writer_dropped_mid_way_is_rolled_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (g, options) = setup(&dir).await;
        insert(&g, 1).await.commit().await.unwrap();
        drop(insert(&g, 2).await);
        insert(&g, 3).await.rollback().await.unwrap();
        insert(&g, 4).await.commit().await.unwrap();
        assert_eq!(committed(&options).await, vec![1, 4]);
    }

    #[tokio::test]
    async fn a_failed_statement_after_a_commit_undoes_only_its_own_writer() {
        let dir = tempfile::tempdir().unwrap();
        let (g, options) = setup(&dir).await;
        // The first writer commits, leaving the release of its savepoint to
        // the next opening; the second takes its turn before the flusher
        // (a current-thread test runtime runs the flusher only when both
        // wait), fails a statement and goes away mid-way, as a `?` would.
        let first = insert(&g, 1).await.commit();
        let second = async {
            let mut tx = g.begin().await.unwrap();
            sqlx::query("INSERT INTO t (id) VALUES (2)")
                .execute(&mut *tx)
                .await
                .unwrap();
            let duplicate = sqlx::query("INSERT INTO t (id) VALUES (1)")
                .execute(&mut *tx)
                .await;
            assert!(duplicate.is_err(), "the first writer's row is there");
        };
        let (committed_first, ()) = tokio::join!(first, second);
        committed_first.unwrap();
        insert(&g, 3).await.commit().await.unwrap();
        assert_eq!(committed(&options).await, vec![1, 3]);
    }

    fn script(sql: &str) -> Script {
        let mut s = Script::default();
        s.push(sql, []);
        s
    }

    #[tokio::test]
    async fn a_deferred_writer_opens_its_savepoint_with_its_script_and_a_failure_undoes_only_itself(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (g, options) = setup(&dir).await;
        // As above, but the second writer's opening (which also releases
        // the first writer's savepoint) travels with its failing script.
        let first = insert(&g, 1).await.commit();
        let second = async {
            let mut tx = g.begin_deferred().await.unwrap();
            let failed = tx
                .run(script(
                    "INSERT INTO t (id) VALUES (2); INSERT INTO t (id) VALUES (1)",
                ))
                .await;
            assert!(failed.is_err(), "the first writer's row is there");
            tx.rollback().await.unwrap();
        };
        let (committed_first, ()) = tokio::join!(first, second);
        committed_first.unwrap();
        let mut third = g.begin_deferred().await.unwrap();
        third
            .run(script("INSERT INTO t (id) VALUES (3)"))
            .await
            .unwrap();
        third.commit().await.unwrap();
        assert_eq!(committed(&options).await, vec![1, 3]);
    }

    #[tokio::test]
    async fn a_deferred_writer_that_sends_nothing_leaves_the_batch_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let (g, options) = setup(&dir).await;
        // The first writer's savepoint is still to be released when the
        // second, which never runs a script, ends its turn both ways.
        let first = insert(&g, 1).await.commit();
        let idle = async {
            g.begin_deferred().await.unwrap().commit().await.unwrap();
            g.begin_deferred().await.unwrap().rollback().await.unwrap();
            drop(g.begin_deferred().await.unwrap());
            insert(&g, 2).await.commit().await.unwrap();
        };
        let (committed_first, ()) = tokio::join!(first, idle);
        committed_first.unwrap();
        assert_eq!(committed(&options).await, vec![1, 2]);
    }

    #[tokio::test]
    async fn a_writer_whose_opening_never_ran_breaks_the_batch_instead_of_undoing_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let (g, options) = setup(&dir).await;
        // The second writer's opening (which would also release the first
        // writer's savepoint) is lost before it reaches SQLite, as if its
        // script failed to start; then the writer goes away. Undoing it
        // must not undo the first writer, whose commit would then report a
        // write that is not there: the batch fails, and says so.
        let first = insert(&g, 1).await.commit();
        let second = async {
            let mut tx = g.begin_deferred().await.unwrap();
            assert!(tx.pending.take().is_some());
            drop(tx);
        };
        let (committed_first, ()) = tokio::join!(first, second);
        assert!(committed_first.is_err(), "the first writer is told");
        assert_eq!(committed(&options).await, Vec::<i64>::new());
        insert(&g, 3).await.commit().await.unwrap();
        assert_eq!(committed(&options).await, vec![3]);
    }

    #[tokio::test]
    async fn a_writer_whose_script_opens_the_batch_and_fails_leaves_nothing_open() {
        let dir = tempfile::tempdir().unwrap();
        let (g, options) = setup(&dir).await;
        // No batch is open: the writer's BEGIN IMMEDIATE travels with its
        // script, whose second statement fails after the first has written.
        let mut tx = g.begin_deferred().await.unwrap();
        let failed = tx
            .run(script(
                "INSERT INTO t (id) VALUES (1); INSERT INTO t (id) VALUES (1)",
            ))
            .await;
        assert!(failed.is_err(), "the second insert is a duplicate");
        // The writer can go on: its next script opens the batch anew.
        tx.run(script("INSERT INTO t (id) VALUES (2)"))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        // A writer that fails and goes away leaves no transaction behind.
        let mut tx = g.begin_deferred().await.unwrap();
        assert!(tx
            .run(script("INSERT INTO t (id) VALUES (2)"))
            .await
            .is_err());
        drop(tx);
        insert(&g, 3).await.commit().await.unwrap();
        assert_eq!(committed(&options).await, vec![2, 3]);
    }

    #[tokio::test]
    async fn a_writer_that_goes_away_while_its_script_opens_the_batch_leaves_nothing_open() {
        let dir = tempfile::tempdir().unwrap();
        let (g, options) = setup(&dir).await;
        // The opening (BEGIN IMMEDIATE, the savepoint) and a row reach
        // SQLite, but the writer's task is cancelled before it hears back.
        let mut tx = g.begin_deferred().await.unwrap();
        let opening = tx.pending.take().unwrap();
        tx.state
            .conn
            .exec_opening(&format!("{opening}; INSERT INTO t (id) VALUES (1)"))
            .await
            .unwrap();
        drop(tx);
        insert(&g, 2).await.commit().await.unwrap();
        assert_eq!(committed(&options).await, vec![2]);
    }

    #[tokio::test]
    async fn a_writer_waiting_for_another_process_lock_leaves_its_task_free_and_goes_on_once_released(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (g, options) = setup(&dir).await;
        // Another process (a CLI command, say) holds the write lock.
        let mut other = options.connect().await.unwrap();
        let mut held = other.begin_with("BEGIN IMMEDIATE").await.unwrap();
        sqlx::query("INSERT INTO t (id) VALUES (9)")
            .execute(&mut *held)
            .await
            .unwrap();
        let write = async { insert(&g, 1).await.commit().await };
        tokio::pin!(write);
        // The writer waits for the lock without holding the thread: the same
        // task (one thread here) goes on with its other futures meanwhile.
        // Waiting in SQLite's busy handler instead, the timer could not
        // fire until the 30 s busy timeout had run out and the write failed.
        let waited = tokio::select! {
            done = &mut write => panic!("written while another process held the lock: {done:?}"),
            () = tokio::time::sleep(Duration::from_millis(300)) => true,
        };
        assert!(waited);
        held.commit().await.unwrap();
        write.await.unwrap();
        other.close().await.unwrap();
        assert_eq!(committed(&options).await, vec![1, 9]);
    }

    #[tokio::test]
    async fn a_writer_whose_begin_waits_out_the_busy_timeout_fails_and_can_try_again() {
        let dir = tempfile::tempdir().unwrap();
        let (_, options) = setup(&dir).await;
        let g = GroupCommit::open(
            &options.clone().busy_timeout(Duration::from_millis(50)),
            Duration::from_millis(50),
            Durability::InCommit,
        )
        .await
        .unwrap();
        // Another process (a CLI command, say) holds the write lock.
        let mut other = options.connect().await.unwrap();
        let mut held = other.begin_with("BEGIN IMMEDIATE").await.unwrap();
        sqlx::query("INSERT INTO t (id) VALUES (9)")
            .execute(&mut *held)
            .await
            .unwrap();
        let mut tx = g.begin_deferred().await.unwrap();
        assert!(tx
            .run(script("INSERT INTO t (id) VALUES (1)"))
            .await
            .is_err());
        held.commit().await.unwrap();
        // Not run outside a transaction: the retry opens the batch, and the
        // commit is the batch's.
        tx.run(script("INSERT INTO t (id) VALUES (1)"))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert!(g.begin().await.unwrap().rollback().await.is_ok());
        other.close().await.unwrap();
        assert_eq!(committed(&options).await, vec![1, 9]);
    }

    /// A group commit at `synchronous = NORMAL` whose WAL sync is `sync`.
    async fn setup_after_commit(
        dir: &tempfile::TempDir,
        sync: WalSync,
    ) -> (GroupCommit, SqliteConnectOptions) {
        let (_, options) = setup(dir).await;
        let g = GroupCommit::open(
            &options,
            Duration::from_secs(30),
            Durability::AfterCommitWith(sync),
        )
        .await
        .unwrap();
        (g, options)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_is_answered_only_after_the_wal_sync_and_the_next_writers_go_on_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        // The sync waits until the test lets it go, and counts its runs.
        let (open_gate, gate) = std::sync::mpsc::channel::<()>();
        let gate = std::sync::Mutex::new(gate);
        let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = syncs.clone();
        let sync: WalSync = Arc::new(move || {
            gate.lock().unwrap().recv().unwrap();
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        });
        let (g, options) = setup_after_commit(&dir, sync).await;
        let g = Arc::new(g);
        let first = tokio::spawn({
            let g = g.clone();
            async move { insert(&g, 1).await.commit().await }
        });
        // The batch is committed and its sync started, but not answered.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!first.is_finished(), "answered before the sync returned");
        // COMMIT ran before the sync: another connection reads the batch.
        assert_eq!(committed(&options).await, vec![1], "synced before COMMIT");
        // The connection is free: the next writer writes during the sync,
        // and waits for its own.
        let (wrote, written) = tokio::sync::oneshot::channel();
        let second = tokio::spawn({
            let g = g.clone();
            async move {
                let tx = insert(&g, 2).await;
                let _ = wrote.send(());
                tx.commit().await
            }
        });
        tokio::time::timeout(Duration::from_secs(10), written)
            .await
            .expect("the next writer wrote while the sync ran")
            .unwrap();
        assert!(!first.is_finished());
        open_gate.send(()).unwrap();
        first.await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!second.is_finished(), "answered before its own sync");
        open_gate.send(()).unwrap();
        second.await.unwrap().unwrap();
        assert_eq!(syncs.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(committed(&options).await, vec![1, 2]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_wal_sync_fails_its_batch_and_stops_every_later_write() {
        let dir = tempfile::tempdir().unwrap();
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let failing = fail.clone();
        let sync: WalSync = Arc::new(move || {
            if failing.load(std::sync::atomic::Ordering::SeqCst) {
                Err(std::io::Error::other("EIO"))
            } else {
                Ok(())
            }
        });
        let (g, _) = setup_after_commit(&dir, sync).await;
        insert(&g, 1).await.commit().await.unwrap();
        fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let e = insert(&g, 2).await.commit().await.unwrap_err();
        assert!(e.to_string().contains("may not be on disk"), "{e}");
        assert!(e.to_string().contains("could not be synced"), "{e}");
        assert!(g.stopped().is_some());
        // The disk may be fine again; the store still writes nothing more.
        fail.store(false, std::sync::atomic::Ordering::SeqCst);
        let later = g.begin().await.err().expect("a write after a failed sync");
        assert!(
            later.to_string().contains("until it is restarted"),
            "{later}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_synced_is_the_one_sqlite_writes_even_through_a_symbolic_link() {
        let dir = tempfile::tempdir().unwrap();
        let (_, options) = setup(&dir).await;
        // The database is reached through a link in another directory, where
        // a stale file has the name the WAL would have beside the link.
        let links = tempfile::tempdir().unwrap();
        let link = links.path().join("link.db");
        std::os::unix::fs::symlink(dir.path().join("g.db"), &link).unwrap();
        std::fs::write(links.path().join("link.db-wal"), b"").unwrap();
        let through_link = options.clone().filename(&link);
        let g = GroupCommit::open(
            &through_link,
            Duration::from_secs(30),
            Durability::AfterCommit,
        )
        .await
        .unwrap();
        let wal = g.wal.clone().expect("a WAL to sync");
        assert_eq!(
            wal.canonicalize().unwrap(),
            dir.path().join("g.db-wal").canonicalize().unwrap()
        );
        insert(&g, 1).await.commit().await.unwrap();
        assert_eq!(committed(&options).await, vec![1]);
        // The connection commits without its own sync.
        let mut tx = g.begin().await.unwrap();
        let level: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(level, 1, "NORMAL");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_in_memory_keeps_its_commits_syncing_themselves() {
        let options = SqliteConnectOptions::new().in_memory(true);
        let g = GroupCommit::open(&options, Duration::from_secs(30), Durability::AfterCommit)
            .await
            .unwrap();
        assert!(g.wal.is_none());
        create_table(&g).await;
    }

    #[tokio::test]
    async fn a_lone_dropped_writer_does_not_keep_the_database_locked() {
        let dir = tempfile::tempdir().unwrap();
        let (g, options) = setup(&dir).await;
        drop(insert(&g, 1).await);
        // Another connection can write: the flusher ended the empty batch.
        let mut other = options.connect().await.unwrap();
        let mut tx = other.begin_with("BEGIN IMMEDIATE").await.unwrap();
        sqlx::query("INSERT INTO t (id) VALUES (9)")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        other.close().await.unwrap();
        assert_eq!(committed(&options).await, vec![9]);
    }
}
