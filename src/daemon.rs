//! The long-running daemon: the cron trigger, the main loop and signals.
//!
//! tokio-cron-scheduler only wakes the loop; what is due is decided by the
//! engine from the database and the clock, so a missed trigger is caught up
//! by the next one. Ticks arrive on a bounded channel and are handled one
//! at a time, so sweeps never overlap; extra ticks while a sweep runs are
//! dropped (the running sweep already covers them).

use std::sync::Arc;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::engine::Engine;

#[derive(Debug, Clone, Copy)]
enum Tick {
    Sweep,
    Mail,
}

/// Runs until SIGTERM or SIGINT. The sweep in progress is finished first
/// (each renewal is safe at every point anyway); a second signal exits at
/// once.
pub async fn run(engine: Arc<Engine>) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::channel::<Tick>(1);
    let scheduler = JobScheduler::new()
        .await
        .context("cannot start scheduler")?;
    for (expr, tick) in [
        (engine.config.raw.schedule.sweep.clone(), Tick::Sweep),
        (engine.config.raw.schedule.mail.clone(), Tick::Mail),
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
    tracing::info!(instance = %engine.instance, sweep = %engine.config.raw.schedule.sweep, mail = %engine.config.raw.schedule.mail, "renewd started");

    let mut stop = shutdown_signal()?;
    // Catch up at once on whatever fell due while renewd was down.
    sweep(&engine).await;
    loop {
        tokio::select! {
            _ = stop.recv() => break,
            Some(tick) = rx.recv() => match tick {
                Tick::Sweep => sweep(&engine).await,
                Tick::Mail => {
                    if let Err(e) = engine.deliver_mail().await {
                        tracing::error!(error = %e, "mail delivery failed");
                    }
                }
            },
        }
    }
    tracing::info!("shutting down");
    let mut scheduler = scheduler;
    let _ = scheduler.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn sweep(engine: &Engine) {
    if let Err(e) = engine.sweep().await {
        tracing::error!(error = %e, "sweep failed");
    }
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
                std::process::exit(130);
            }
        }
    });
    Ok(rx)
}
