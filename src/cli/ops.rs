//! Operational commands: run, sweep, simulate, check-config, terms, events,
//! and the sandbox gateway's ledger.

use std::sync::Arc;

use clap::Subcommand;
use jiff::{SignedDuration, Timestamp};
use serde_json::json;

use super::{parse_now, print_json, views, CliResult, Failure};
use crate::clock::{Clock, MockClock, SharedClock, SystemClock};
use crate::config::Config;
use crate::engine::{Engine, EngineError, SweepSummary};

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// The sandbox gateway's own ledger of charges.
    Charges {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run_daemon(engine: Arc<Engine>, demo: bool) -> CliResult {
    if demo {
        crate::demo::seed_if_empty(&engine).await?;
    }
    crate::daemon::run(engine).await?;
    Ok(())
}

pub async fn sweep(engine: &Engine, dry_run: bool, json: bool) -> CliResult {
    let now = engine.now();
    if dry_run {
        let plan = engine.plan_at(now).await?;
        if json {
            return print_json(&plan);
        }
        println!(
            "dry run at {}: {} actions, {} mail queued",
            plan.now,
            plan.actions.len(),
            plan.mail_queued
        );
        for a in &plan.actions {
            println!(
                "  subscription {}: {} ({})",
                a.subscription_id, a.action, a.detail
            );
        }
        return Ok(());
    }
    let s = engine.sweep_at(now).await?;
    if json {
        print_json(&s)
    } else {
        print_summary(&s);
        Ok(())
    }
}

fn print_summary(s: &SweepSummary) {
    println!(
        "sweep at {}: renewed {}, declined {}, retry scheduled {}, expired {}, reminders {}, notices {}, invoices {}, unknown {}, mail sent {}, errors {}",
        s.now, s.renewed, s.declined, s.retry_scheduled, s.expired, s.reminders, s.notices, s.invoices_issued, s.unknown, s.mail_sent, s.errors
    );
}

/// Parses a step such as `1d`, `12h`, `30m`, `45s` or `1w`.
pub fn parse_step(s: &str) -> Result<SignedDuration, Failure> {
    let bad = || {
        Failure::usage(format!(
            "--step {s:?}: use a number and a unit, e.g. 1d, 12h, 30m, 1w"
        ))
    };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let n: i64 = t[..split].parse().map_err(|_| bad())?;
    let secs = match &t[split..] {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(bad()),
    };
    if n <= 0 {
        return Err(bad());
    }
    Ok(SignedDuration::from_secs(
        n.checked_mul(secs).ok_or_else(bad)?,
    ))
}

pub async fn simulate(
    config: Arc<Config>,
    start: Option<Timestamp>,
    until: &str,
    step: &str,
    json: bool,
) -> CliResult {
    let until = parse_now(until)
        .map_err(|_| Failure::usage(format!("--until {until:?} is not an RFC 3339 instant")))?;
    let step = parse_step(step)?;
    let start = start.unwrap_or_else(|| SystemClock.now());
    if until < start {
        return Err(Failure::usage(format!(
            "--until {until} is before the start {start}"
        )));
    }
    let clock = Arc::new(MockClock::new(start));
    let shared: SharedClock = clock.clone();
    let engine = crate::startup::build_engine(config, shared).await?;
    let mut total = SweepSummary::default();
    let mut steps = 0u64;
    loop {
        let s = engine.sweep().await?;
        steps += 1;
        let busy =
            s.renewed + s.declined + s.expired + s.reminders + s.notices + s.unknown + s.mail_sent
                > 0;
        if busy && !json {
            print_summary(&s);
        }
        add(&mut total, &s);
        if clock.now() >= until {
            break;
        }
        let next = clock.now().saturating_add(step).unwrap_or(until).min(until);
        clock.set(next);
    }
    total.now = clock.now().to_string();
    if json {
        print_json(
            &json!({"steps": steps, "from": start.to_string(), "until": until.to_string(), "totals": total}),
        )
    } else {
        println!("simulated {steps} sweeps from {start} to {until}");
        print_summary(&total);
        Ok(())
    }
}

fn add(t: &mut SweepSummary, s: &SweepSummary) {
    t.renewed += s.renewed;
    t.declined += s.declined;
    t.retry_scheduled += s.retry_scheduled;
    t.expired += s.expired;
    t.reminders += s.reminders;
    t.notices += s.notices;
    t.invoices_issued += s.invoices_issued;
    t.unknown += s.unknown;
    t.skipped += s.skipped;
    t.mail_sent += s.mail_sent;
    t.mail_failed += s.mail_failed;
    t.errors += s.errors;
}

pub fn check_config(config: &Config, json: bool) -> CliResult {
    let effective = config.effective_json();
    if json {
        print_json(&effective)
    } else {
        println!("configuration is valid; effective settings (secrets redacted):");
        print_json(&effective)
    }
}

pub async fn terms(engine: &Engine, json: bool) -> CliResult {
    let counts = engine
        .store
        .terms_acceptances()
        .await
        .map_err(EngineError::from)?;
    let t = views::Terms {
        current: engine.config.raw.terms.current.clone(),
        versions: engine.config.raw.terms.versions.clone(),
        accepted: counts
            .iter()
            .map(|(v, n)| json!({"version": v, "acceptances": n}))
            .collect(),
    };
    if json {
        print_json(&t)
    } else {
        println!("current Terms and Conditions: {}", t.current);
        println!("published versions: {}", t.versions.join(", "));
        for (v, n) in counts {
            println!("accepted {v}: {n} times");
        }
        Ok(())
    }
}

pub async fn events(engine: &Engine, subscription: Option<i64>, json: bool) -> CliResult {
    let all = engine
        .store
        .events(subscription)
        .await
        .map_err(EngineError::from)?;
    if json {
        print_json(&all)
    } else {
        for e in &all {
            println!(
                "{} {} subscription {} {}{}{}",
                e.at,
                e.kind,
                e.subscription_id
                    .map(|i| i.to_string())
                    .unwrap_or_else(|| "-".into()),
                e.outcome.clone().unwrap_or_default(),
                e.invoice_number
                    .as_ref()
                    .map(|n| format!(" invoice {n}"))
                    .unwrap_or_default(),
                e.amount_minor
                    .map(|a| format!(" {a} {}", e.currency.clone().unwrap_or_default()))
                    .unwrap_or_default(),
            );
        }
        Ok(())
    }
}

pub async fn sandbox(config: Arc<Config>, clock: SharedClock, cmd: SandboxCommand) -> CliResult {
    match cmd {
        SandboxCommand::Charges { json } => {
            let gw = crate::startup::open_sandbox(&config, clock).await?;
            let charges = gw.charges().await.map_err(|e| Failure {
                message: format!("sandbox ledger: {e}"),
                code: 1,
            })?;
            if json {
                print_json(&charges)
            } else {
                for c in &charges {
                    println!(
                        "{} {} {} {} {} {} {}",
                        c.id,
                        c.created_at,
                        c.idempotency_key,
                        c.payment_method,
                        c.amount_minor,
                        c.currency,
                        c.outcome
                    );
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse_with_units() {
        assert_eq!(parse_step("1d").unwrap(), SignedDuration::from_hours(24));
        assert_eq!(parse_step("30m").unwrap(), SignedDuration::from_mins(30));
        assert!(parse_step("0d").is_err());
        assert!(parse_step("1 fortnight").is_err());
        assert!(parse_step("d").is_err());
    }
}
