//! The long-running daemon: the cron trigger, the main loop, signals,
//! systemd notification and the single-instance lock.
//!
//! tokio-cron-scheduler only wakes the loop; what is due is decided by the
//! engine from the database and the clock, so a missed trigger is caught up
//! by the next one. Ticks arrive on a bounded channel and are handled one
//! at a time, so sweeps never overlap; extra ticks while a sweep runs are
//! dropped (the running sweep already covers them).
//!
//! The watchdog is pinged from this loop and only while the work in hand
//! makes progress (its future is being polled), never from a separate
//! task: a sweep stuck on a lock or a hung connection for about
//! `WatchdogSec` stops the pings and systemd restarts renewd, which then
//! resumes every renewal from its last recovery point.
//!
//! Shutdown: the first SIGTERM/SIGINT stops all claiming (the store hands
//! out no new renewals or mail), lets the claimed work finish for at most
//! `shutdown.timeout`, and exits 0. Work still in flight at the deadline is
//! dropped: each renewal is safe at every point (an attempt is committed
//! before the gateway call; a transaction is written whole or not at all).
//! A second signal exits at once.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::Context;
use jiff::Timestamp;
use sd_notify::NotifyState;
use tokio::sync::mpsc;
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::config::Config;
use crate::engine::{Engine, SweepSummary};
use crate::monitoring::{Health, Monitor};

#[derive(Debug, Clone, Copy)]
enum Tick {
    Sweep,
    Mail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// Runs until SIGTERM or SIGINT, then drains (see the module comment).
pub async fn run(engine: Arc<Engine>) -> anyhow::Result<()> {
    // Every line the daemon logs carries the instance (host:pid), so the
    // logs of several instances sharing one database can be told apart.
    use tracing::Instrument;
    let span = tracing::info_span!("renewd", instance = %engine.instance);
    run_instance(engine).instrument(span).await
}

async fn run_instance(engine: Arc<Engine>) -> anyhow::Result<()> {
    let config = engine.config.clone();
    let monitor = Arc::new(Monitor::install());
    let health = Health::new(ready_max_age(&config.raw.schedule.sweep, engine.now()));
    // Bound before READY, so a taken port fails the start instead of
    // leaving a daemon that cannot be watched.
    let listener = match config.http_listen() {
        Some(addr) => Some(crate::http::bind(addr).await?),
        None => None,
    };
    let stop = shutdown_signal()?;

    let (tx, rx) = mpsc::channel::<Tick>(1);
    let scheduler = JobScheduler::new()
        .await
        .context("cannot start scheduler")?;
    for (expr, tick) in [
        (config.raw.schedule.sweep.clone(), Tick::Sweep),
        (config.raw.schedule.mail.clone(), Tick::Mail),
    ] {
        let tx = tx.clone();
        let job = Job::new_async(expr.as_str(), move |_, _| {
            let tx = tx.clone();
            Box::pin(async move {
                let _ = tx.try_send(tick);
            })
        })
        .with_context(|| format!("bad cron expression {expr:?}"))?;
        scheduler.add(job).await.context("cannot schedule job")?;
    }
    scheduler.start().await.context("cannot start scheduler")?;

    if let Some(listener) = listener {
        let addr = listener.local_addr().ok();
        crate::http::serve(
            listener,
            crate::http::HttpState {
                store: engine.store.clone(),
                clock: engine.clock.clone(),
                health: health.clone(),
                monitor: monitor.clone(),
            },
        );
        tracing::info!(address = ?addr, "health and metrics listening");
    }
    {
        let monitor = monitor.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(10));
            loop {
                every.tick().await;
                monitor.upkeep();
            }
        });
    }

    let watchdog = Watchdog::from_env();
    tracing::info!(
        instance = %engine.instance,
        sweep = %config.raw.schedule.sweep,
        mail = %config.raw.schedule.mail,
        watchdog_secs = watchdog.limit.map(|d| d.as_secs()),
        "renewd started"
    );
    notify(&[
        NotifyState::Ready,
        NotifyState::Status("ready; catching up on work that fell due while stopped"),
    ]);

    let mut daemon = Daemon {
        engine,
        monitor,
        health,
        watchdog,
        stop,
        rx,
        shutdown_timeout: config.shutdown_timeout(),
        draining: false,
    };
    daemon.main_loop().await;

    let mut scheduler = scheduler;
    let _ = scheduler.shutdown().await;
    notify(&[NotifyState::Status("stopped")]);
    tracing::info!("stopped");
    crate::telemetry::flush();
    Ok(())
}

struct Daemon {
    engine: Arc<Engine>,
    monitor: Arc<Monitor>,
    health: Arc<Health>,
    watchdog: Watchdog,
    stop: mpsc::Receiver<()>,
    rx: mpsc::Receiver<Tick>,
    shutdown_timeout: Duration,
    draining: bool,
}

impl Daemon {
    async fn main_loop(&mut self) {
        // Catch up at once on whatever fell due while renewd was down.
        if self.work(Tick::Sweep).await == Flow::Stop {
            return;
        }
        loop {
            tokio::select! {
                Some(()) = self.stop.recv() => {
                    self.begin_drain();
                    return;
                }
                _ = self.watchdog.tick() => self.watchdog.ping(),
                Some(tick) = self.rx.recv() => {
                    if self.work(tick).await == Flow::Stop {
                        return;
                    }
                }
                else => return,
            }
        }
    }

    async fn work(&mut self, tick: Tick) -> Flow {
        match tick {
            Tick::Sweep => {
                let engine = self.engine.clone();
                self.health.sweep_started();
                let started = Instant::now();
                let (result, flow) = self.drive(async move { engine.sweep().await }).await;
                let took = started.elapsed();
                match result {
                    Some(Ok(s)) => {
                        self.health.sweep_finished(true);
                        self.monitor.record_sweep(Ok(&s), took, self.engine.now());
                        let status = status_line(&s, took);
                        notify(&[NotifyState::Status(&status)]);
                    }
                    Some(Err(e)) => {
                        self.health.sweep_finished(false);
                        self.monitor.record_sweep(Err(()), took, self.engine.now());
                        tracing::error!(error = %e, "sweep failed");
                        let status = format!("last sweep failed: {e}");
                        notify(&[NotifyState::Status(&status)]);
                    }
                    None => self.health.sweep_finished(false),
                }
                flow
            }
            Tick::Mail => {
                let engine = self.engine.clone();
                let (result, flow) = self.drive(async move { engine.deliver_mail().await }).await;
                match result {
                    Some(Ok(d)) => self.monitor.record_delivery(&d),
                    Some(Err(e)) => tracing::error!(error = %e, "mail delivery failed"),
                    None => {}
                }
                flow
            }
        }
    }

    /// Polls `work` to its end, pinging the watchdog only while it makes
    /// progress. A first signal starts the drain; `None` means the drain
    /// deadline passed and the work was dropped.
    async fn drive<T>(
        &mut self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> (Option<T>, Flow) {
        let mut work = Tracked::new(work);
        let progress = work.progress.clone();
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut stalled_reported = false;
        loop {
            tokio::select! {
                out = &mut work => {
                    let flow = if self.draining { Flow::Stop } else { Flow::Continue };
                    return (Some(out), flow);
                }
                Some(()) = self.stop.recv(), if !self.draining => {
                    self.begin_drain();
                    deadline = Some(tokio::time::Instant::now() + self.shutdown_timeout);
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                    tracing::warn!(
                        shutdown_timeout_secs = self.shutdown_timeout.as_secs(),
                        "shutdown.timeout reached with work in flight; exiting now (every renewal in flight resumes from its last recovery point at the next start)"
                    );
                    return (None, Flow::Stop);
                }
                _ = self.watchdog.tick() => {
                    let idle = progress.idle();
                    if idle < self.watchdog.interval() {
                        self.watchdog.ping();
                        stalled_reported = false;
                    } else if !stalled_reported {
                        stalled_reported = true;
                        tracing::error!(
                            idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX),
                            "work has made no progress; withholding the watchdog ping so systemd restarts renewd if it stays stuck"
                        );
                    }
                }
            }
        }
    }

    fn begin_drain(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        self.health.set_draining();
        self.monitor.set_draining();
        self.engine.store.stop_claiming();
        let status = format!(
            "stopping: claiming no new work, finishing what is in flight (at most {}s)",
            self.shutdown_timeout.as_secs()
        );
        notify(&[NotifyState::Stopping, NotifyState::Status(&status)]);
        tracing::info!(
            shutdown_timeout_secs = self.shutdown_timeout.as_secs(),
            "stopping: claiming no new work, finishing what is in flight (signal again to exit at once)"
        );
    }
}

fn status_line(s: &SweepSummary, took: Duration) -> String {
    format!(
        "last sweep at {}: renewed {}, declined {}, retry scheduled {}, expired {}, unknown {}, invoices {}, reminders {}, notices {}, mail sent {}, mail failed {}, errors {} ({:.1}s)",
        s.now,
        s.renewed,
        s.declined,
        s.retry_scheduled,
        s.expired,
        s.unknown,
        s.invoices_issued,
        s.reminders,
        s.notices,
        s.mail_sent,
        s.mail_failed,
        s.errors,
        took.as_secs_f64()
    )
}

/// Sends a notification to systemd (nothing when not started by it).
fn notify(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// systemd's watchdog: `WatchdogSec=` arrives as `WATCHDOG_USEC`; renewd
/// pings every half of it.
struct Watchdog {
    limit: Option<Duration>,
    ticker: Option<tokio::time::Interval>,
}

impl Watchdog {
    fn from_env() -> Watchdog {
        let limit = sd_notify::watchdog_enabled().filter(|d| !d.is_zero());
        let ticker = limit.map(|d| {
            let mut t = tokio::time::interval(d / 2);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        Watchdog { limit, ticker }
    }

    /// How long work may go without progress before pings are withheld.
    fn interval(&self) -> Duration {
        self.limit.map(|d| d / 2).unwrap_or(Duration::MAX)
    }

    async fn tick(&mut self) {
        match &mut self.ticker {
            Some(t) => {
                t.tick().await;
            }
            None => std::future::pending::<()>().await,
        }
    }

    fn ping(&self) {
        if self.limit.is_some() {
            notify(&[NotifyState::Watchdog]);
        }
    }
}

/// A future that records when it last made progress: when something it
/// waits for woke it (a query answered, a timer fired, a gateway call
/// returned). Polls alone do not count: `select!` polls every branch each
/// time the loop wakes, including for the watchdog's own timer.
struct Tracked<T> {
    inner: Pin<Box<dyn Future<Output = T> + Send>>,
    progress: Arc<Progress>,
}

struct Progress {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last wake-up (or the first poll).
    last: AtomicU64,
}

impl Progress {
    fn mark(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::SeqCst);
    }

    /// How long since the work last made progress.
    fn idle(&self) -> Duration {
        let at = Duration::from_millis(self.last.load(Ordering::SeqCst));
        self.epoch.elapsed().saturating_sub(at)
    }
}

/// Forwards a wake-up to the task, noting the time first.
struct ProgressWaker {
    progress: Arc<Progress>,
    task: std::task::Waker,
}

impl std::task::Wake for ProgressWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.progress.mark();
        self.task.wake_by_ref();
    }
}

impl<T> Tracked<T> {
    fn new(work: impl Future<Output = T> + Send + 'static) -> Tracked<T> {
        let progress = Arc::new(Progress {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
        });
        Tracked {
            inner: Box::pin(work),
            progress,
        }
    }
}

impl<T> Future for Tracked<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<T> {
        let waker = std::task::Waker::from(Arc::new(ProgressWaker {
            progress: self.progress.clone(),
            task: cx.waker().clone(),
        }));
        let mut inner_cx = TaskContext::from_waker(&waker);
        self.inner.as_mut().poll(&mut inner_cx)
    }
}

/// How old the last good sweep may be before `/readyz` fails: two of the
/// longest gaps in the sweep schedule plus five minutes, so one missed or
/// slow run is tolerated and two are not.
fn ready_max_age(sweep_cron: &str, now: Timestamp) -> Duration {
    let slack = Duration::from_secs(300);
    let gap = longest_gap(sweep_cron, now).unwrap_or(Duration::from_secs(3600));
    gap.saturating_mul(2).saturating_add(slack)
}

fn longest_gap(expr: &str, now: Timestamp) -> Option<Duration> {
    let cron = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .build()
        .parse(expr)
        .ok()?;
    let start = chrono::DateTime::<chrono::Utc>::from_timestamp(now.as_second(), 0)?;
    let mut prev = cron.find_next_occurrence(&start, false).ok()?;
    let mut longest = Duration::ZERO;
    for _ in 0..16 {
        let next = cron.find_next_occurrence(&prev, false).ok()?;
        let gap = (next - prev).to_std().ok()?;
        longest = longest.max(gap);
        prev = next;
    }
    Some(longest)
}

/// The first SIGTERM/SIGINT is delivered on the channel; the second exits.
fn shutdown_signal() -> anyhow::Result<mpsc::Receiver<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            seen += 1;
            if seen == 1 {
                tracing::info!("signal received: finishing the current work, then exiting (signal again to exit at once)");
                let _ = tx.send(()).await;
            } else {
                tracing::warn!("second signal: exiting at once");
                crate::telemetry::flush();
                std::process::exit(130);
            }
        }
    });
    Ok(rx)
}

/// Holds the exclusive lock that keeps a second daemon off the same SQLite
/// database; released when dropped (or when the process dies, so a crash
/// never leaves a stale lock).
#[derive(Debug)]
pub struct InstanceLock {
    _file: std::fs::File,
    pub path: PathBuf,
}

/// Takes the single-instance lock for `config`'s database: an exclusive
/// `flock` on `DB.lock` next to a SQLite file. PostgreSQL needs none (its
/// daemons share work through leases), so that returns `None`.
pub fn lock_instance(config: &Config) -> anyhow::Result<Option<InstanceLock>> {
    use std::io::{Read, Seek, Write};
    let url = &config.raw.database.url;
    let Some(db) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .map(|rest| rest.split('?').next().unwrap_or_default())
        .filter(|p| !p.is_empty() && *p != ":memory:")
    else {
        return Ok(None);
    };
    let path = PathBuf::from(format!("{db}.lock"));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create database directory {}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another renewd".to_string()
            } else {
                format!("another renewd (pid {holder})")
            };
            anyhow::bail!(
                "{who} is already running on {db} (lock {} is held); stop it first, e.g. systemctl stop renewd. SQLite serves one daemon; use PostgreSQL to run several",
                path.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    // The holder's pid, for the refusal message of the next one.
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = write!(file, "{}", std::process::id());
    Ok(Some(InstanceLock { _file: file, path }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_age_follows_the_sweep_schedule() {
        let now: Timestamp = "2026-01-01T00:00:30Z".parse().unwrap();
        assert_eq!(
            longest_gap("0 * * * * *", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            longest_gap("0 0 9,17 * * *", now),
            Some(Duration::from_secs(16 * 3600))
        );
        assert_eq!(
            ready_max_age("0 * * * * *", now),
            Duration::from_secs(2 * 60 + 300)
        );
    }

    #[tokio::test]
    async fn a_tracked_future_counts_wake_ups_not_polls() {
        let mut work = Tracked::new(async {
            tokio::time::sleep(Duration::from_millis(80)).await;
            7
        });
        let progress = work.progress.clone();
        let waker = futures::task::noop_waker();
        let mut cx = TaskContext::from_waker(&waker);
        assert!(Pin::new(&mut work).poll(&mut cx).is_pending());
        std::thread::sleep(Duration::from_millis(30));
        // A spurious poll (as select! does) is not progress.
        assert!(Pin::new(&mut work).poll(&mut cx).is_pending());
        assert!(progress.idle() >= Duration::from_millis(30));
        assert_eq!(work.await, 7);
        assert!(
            progress.idle() < Duration::from_millis(30),
            "the timer woke it"
        );
    }
}
