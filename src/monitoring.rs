//! What the daemon tells its operators: Prometheus metrics and the health
//! the HTTP endpoints report.
//!
//! Counters are derived from each sweep's [`SweepSummary`] and each mail
//! run's [`DeliveryStats`], so the engine stays free of metrics code (the
//! one exception is gateway latency, measured where the call is made, in
//! `engine::charge`). Gauges are read from the store when `/metrics` is
//! scraped, so they are never staler than the scrape. Nothing here reads
//! business time except through the engine's clock; `Instant` only
//! measures durations.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::engine::{DeliveryStats, SweepSummary};
use crate::store::{Store, StoreError};

pub const SWEEPS: &str = "renewd_sweeps_total";
pub const SWEEP_DURATION: &str = "renewd_sweep_duration_seconds";
pub const LAST_SWEEP: &str = "renewd_last_successful_sweep_timestamp_seconds";
pub const RENEWALS: &str = "renewd_renewals_total";
pub const RETRIES_SCHEDULED: &str = "renewd_renewal_retries_scheduled_total";
pub const INVOICES: &str = "renewd_invoices_issued_total";
pub const NOTICES: &str = "renewd_notices_queued_total";
pub const MAIL_DELIVERIES: &str = "renewd_mail_deliveries_total";
/// Recorded in `engine::charge` around the gateway call.
pub const GATEWAY_CHARGES: &str = "renewd_gateway_charges_total";
/// Recorded in `engine::charge` around the gateway call.
pub const GATEWAY_LATENCY: &str = "renewd_gateway_request_duration_seconds";
pub const DUE: &str = "renewd_subscriptions_due";
pub const PAST_DUE: &str = "renewd_subscriptions_past_due";
pub const UNKNOWN_CHARGES: &str = "renewd_charges_unknown";
pub const MAIL_MESSAGES: &str = "renewd_mail_messages";
pub const MAIL_OLDEST_QUEUED: &str = "renewd_mail_oldest_queued_age_seconds";
pub const STORE_UP: &str = "renewd_store_up";
pub const DRAINING: &str = "renewd_draining";
pub const BUILD_INFO: &str = "renewd_build_info";

const RENEWAL_OUTCOMES: &[&str] = &[
    "renewed", "declined", "expired", "unknown", "skipped", "error",
];
const CHARGE_OUTCOMES: &[&str] = &["succeeded", "declined", "unknown"];
const MAIL_STATUSES: &[&str] = &["sent", "retrying", "failed"];
const NOTICE_KINDS: &[&str] = &["renewal_reminder", "upcoming_renewal"];

/// The Prometheus registry of this process.
pub struct Monitor {
    prometheus: PrometheusHandle,
    /// (kind, status) pairs of the mail gauge seen so far: one that
    /// disappears from the store is set to 0 rather than left stale.
    mail_series: Mutex<BTreeSet<(String, String)>>,
}

impl Monitor {
    /// Installs the process-wide recorder and registers every series at
    /// zero, so dashboards and alerts see them before the first event.
    pub fn install() -> Monitor {
        let sweep_buckets = [0.05, 0.25, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0];
        let gateway_buckets = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(SWEEP_DURATION.into()), &sweep_buckets)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(GATEWAY_LATENCY.into()), &gateway_buckets)
            })
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let prometheus = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!(
                "a metrics recorder was already installed; /metrics shows only this registry"
            );
        }
        describe();
        for outcome in ["ok", "error"] {
            counter!(SWEEPS, "outcome" => outcome).absolute(0);
        }
        for outcome in RENEWAL_OUTCOMES {
            counter!(RENEWALS, "outcome" => *outcome).absolute(0);
        }
        for outcome in CHARGE_OUTCOMES {
            counter!(GATEWAY_CHARGES, "outcome" => *outcome).absolute(0);
        }
        for status in MAIL_STATUSES {
            counter!(MAIL_DELIVERIES, "status" => *status).absolute(0);
        }
        for kind in NOTICE_KINDS {
            counter!(NOTICES, "kind" => *kind).absolute(0);
        }
        counter!(RETRIES_SCHEDULED).absolute(0);
        counter!(INVOICES).absolute(0);
        gauge!(DRAINING).set(0.0);
        gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        Monitor {
            prometheus,
            mail_series: Mutex::new(BTreeSet::new()),
        }
    }

    /// Counts what one sweep did (or that it failed).
    pub fn record_sweep(&self, result: Result<&SweepSummary, ()>, took: Duration, now: Timestamp) {
        histogram!(SWEEP_DURATION).record(took.as_secs_f64());
        let Ok(s) = result else {
            counter!(SWEEPS, "outcome" => "error").increment(1);
            return;
        };
        counter!(SWEEPS, "outcome" => "ok").increment(1);
        gauge!(LAST_SWEEP).set(now.as_millisecond() as f64 / 1000.0);
        for (outcome, n) in [
            ("renewed", s.renewed),
            ("declined", s.declined),
            ("expired", s.expired),
            ("unknown", s.unknown),
            ("skipped", s.skipped),
            ("error", s.errors),
        ] {
            counter!(RENEWALS, "outcome" => outcome).increment(u64::from(n));
        }
        counter!(RETRIES_SCHEDULED).increment(u64::from(s.retry_scheduled));
        counter!(INVOICES).increment(u64::from(s.invoices_issued));
        counter!(NOTICES, "kind" => "renewal_reminder").increment(u64::from(s.reminders));
        counter!(NOTICES, "kind" => "upcoming_renewal").increment(u64::from(s.notices));
        counter!(MAIL_DELIVERIES, "status" => "sent").increment(u64::from(s.mail_sent));
        counter!(MAIL_DELIVERIES, "status" => "failed").increment(u64::from(s.mail_failed));
    }

    /// Counts one run of the mail sender.
    pub fn record_delivery(&self, d: &DeliveryStats) {
        counter!(MAIL_DELIVERIES, "status" => "sent").increment(u64::from(d.sent));
        counter!(MAIL_DELIVERIES, "status" => "retrying").increment(u64::from(d.retrying));
        counter!(MAIL_DELIVERIES, "status" => "failed").increment(u64::from(d.failed));
    }

    pub fn set_draining(&self) {
        gauge!(DRAINING).set(1.0);
    }

    /// Reads the gauges from the store at `now`. On failure the store is
    /// reported down and the previous values stay.
    pub async fn refresh_gauges(&self, store: &dyn Store, now: Timestamp) -> Result<(), String> {
        let read = tokio::time::timeout(Duration::from_secs(5), store.gauges(now)).await;
        let g = match read {
            Ok(Ok(g)) => g,
            Ok(Err(e)) => {
                gauge!(STORE_UP).set(0.0);
                return Err(describe_store_error(&e));
            }
            Err(_) => {
                gauge!(STORE_UP).set(0.0);
                return Err("the database did not answer within 5s".into());
            }
        };
        gauge!(STORE_UP).set(1.0);
        gauge!(DUE).set(g.due_subscriptions as f64);
        gauge!(PAST_DUE).set(g.past_due_subscriptions as f64);
        if let Some(n) = g.unknown_charges {
            gauge!(UNKNOWN_CHARGES).set(n as f64);
        }
        let age = g
            .oldest_queued_mail_at
            .map(|t| now.duration_since(t).as_secs_f64().max(0.0))
            .unwrap_or(0.0);
        gauge!(MAIL_OLDEST_QUEUED).set(age);
        let mut seen = self
            .mail_series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now_present: BTreeSet<(String, String)> = g
            .mail
            .iter()
            .map(|(k, s, _)| (k.clone(), s.clone()))
            .collect();
        for (kind, status) in seen.difference(&now_present) {
            gauge!(MAIL_MESSAGES, "kind" => kind.clone(), "status" => status.clone()).set(0.0);
        }
        for (kind, status, n) in &g.mail {
            gauge!(MAIL_MESSAGES, "kind" => kind.clone(), "status" => status.clone())
                .set(*n as f64);
        }
        seen.extend(now_present);
        Ok(())
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        self.prometheus.render()
    }

    /// Drains histogram buffers; run periodically so memory stays flat
    /// when nobody scrapes.
    pub fn upkeep(&self) {
        self.prometheus.run_upkeep();
    }
}

fn describe_store_error(e: &StoreError) -> String {
    format!("database: {e}")
}

fn describe() {
    describe_counter!(SWEEPS, "Sweeps run, by outcome (ok, error).");
    describe_histogram!(
        SWEEP_DURATION,
        metrics::Unit::Seconds,
        "How long one sweep took."
    );
    describe_gauge!(
        LAST_SWEEP,
        metrics::Unit::Seconds,
        "Unix time (renewd's clock) of the last sweep that finished without error."
    );
    describe_counter!(
        RENEWALS,
        "Renewals worked by sweeps, by outcome (renewed, declined, expired, unknown, skipped, error)."
    );
    describe_counter!(RETRIES_SCHEDULED, "Soft declines given a retry date.");
    describe_counter!(INVOICES, "Invoices issued by sweeps.");
    describe_counter!(
        NOTICES,
        "Reminder and upcoming-renewal mails queued, by kind."
    );
    describe_counter!(
        MAIL_DELIVERIES,
        "Outbox delivery attempts, by status (sent, retrying, failed)."
    );
    describe_counter!(
        GATEWAY_CHARGES,
        "Charge calls to the payment gateway, by outcome (succeeded, declined, unknown)."
    );
    describe_histogram!(
        GATEWAY_LATENCY,
        metrics::Unit::Seconds,
        "Latency of payment gateway calls, by operation."
    );
    describe_gauge!(
        DUE,
        "Active subscriptions whose period has ended and that no sweep has renewed or expired yet."
    );
    describe_gauge!(
        PAST_DUE,
        "Subscriptions in past_due (retrying a declined payment)."
    );
    describe_gauge!(
        UNKNOWN_CHARGES,
        "Payment attempts whose outcome is not known yet (in flight or awaiting reconciliation)."
    );
    describe_gauge!(MAIL_MESSAGES, "Outbox messages, by kind and status.");
    describe_gauge!(
        MAIL_OLDEST_QUEUED,
        metrics::Unit::Seconds,
        "Age of the oldest message still queued (0 when none)."
    );
    describe_gauge!(STORE_UP, "1 when the last gauge read reached the database.");
    describe_gauge!(
        DRAINING,
        "1 once a stop was requested and in-flight work is finishing."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label tells which renewd runs."
    );
}

/// What `/readyz` reports, fed by the daemon loop.
pub struct Health {
    epoch: Instant,
    /// Milliseconds after `epoch` (+1, 0 = never) of the last good sweep.
    last_ok: AtomicU64,
    /// Milliseconds after `epoch` (+1, 0 = none) the running sweep started.
    running_since: AtomicU64,
    max_age: Duration,
    draining: AtomicBool,
}

impl Health {
    /// `max_age`: how old the last good sweep may be before renewd is not
    /// ready (a sweep still running counts from its start).
    pub fn new(max_age: Duration) -> Arc<Health> {
        Arc::new(Health {
            epoch: Instant::now(),
            last_ok: AtomicU64::new(0),
            running_since: AtomicU64::new(0),
            max_age,
            draining: AtomicBool::new(false),
        })
    }

    fn stamp(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    pub fn sweep_started(&self) {
        self.running_since.store(self.stamp(), Ordering::SeqCst);
    }

    pub fn sweep_finished(&self, ok: bool) {
        if ok {
            self.last_ok.store(self.stamp(), Ordering::SeqCst);
        }
        self.running_since.store(0, Ordering::SeqCst);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    /// Whether the sweeps are keeping up; the database is checked apart.
    pub fn sweeps_ready(&self) -> Result<(), String> {
        if self.draining.load(Ordering::SeqCst) {
            return Err("stopping: finishing in-flight work".into());
        }
        let now = self.stamp();
        let age = |stamp: u64| Duration::from_millis(now.saturating_sub(stamp));
        let last_ok = self.last_ok.load(Ordering::SeqCst);
        let running = self.running_since.load(Ordering::SeqCst);
        let fresh = |stamp: u64| stamp != 0 && age(stamp) <= self.max_age;
        if fresh(last_ok) || (last_ok != 0 && fresh(running)) {
            return Ok(());
        }
        if last_ok == 0 {
            if running != 0 {
                return Err(format!(
                    "the first sweep has been running for {}s",
                    age(running).as_secs()
                ));
            }
            return Err("no sweep has finished yet".into());
        }
        Err(format!(
            "the last successful sweep finished {}s ago (more than {}s)",
            age(last_ok).as_secs(),
            self.max_age.as_secs()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_a_recent_successful_sweep() {
        let h = Health::new(Duration::from_secs(60));
        assert!(h.sweeps_ready().is_err());
        h.sweep_started();
        assert!(
            h.sweeps_ready().is_err(),
            "the first sweep has not finished"
        );
        h.sweep_finished(true);
        assert!(h.sweeps_ready().is_ok());
        h.set_draining();
        assert!(h.sweeps_ready().is_err());
    }

    #[test]
    fn a_failed_first_sweep_is_not_ready() {
        let h = Health::new(Duration::from_secs(60));
        h.sweep_started();
        h.sweep_finished(false);
        assert!(h.sweeps_ready().is_err());
    }
}
