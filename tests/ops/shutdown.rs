//! SIGTERM in the middle of a sweep (what `systemctl stop` and every
//! upgrade do). Without the drain, a stop would either cut renewals in
//! half at a bad moment, or keep claiming batch after batch until systemd
//! gives up and SIGKILLs. With it: no new claims, the renewals in flight
//! finish (charge, invoice and mail in one commit), and renewd exits 0
//! within `shutdown.timeout`; what the deadline cuts is resumed safely.

use std::time::{Duration, Instant};

use crate::{Env, T1};

#[test]
fn sigterm_during_a_sweep_finishes_the_renewals_in_flight_claims_no_more_and_exits_0() {
    // Six due renewals, claimed two at a time, each gateway call 3s.
    let env =
        Env::new("[renewal]\nbatch_size = 2\nconcurrency = 2\n\n[shutdown]\ntimeout = \"30s\"\n");
    let subs = env.subscriptions(6);
    let mut daemon = env.spawn(T1, &[("RENEWD__GATEWAY__SANDBOX__LATENCY_MS", "3000")]);
    daemon.wait_note("READY=1", Duration::from_secs(30));
    env.wait_for_a_charge_in_flight(&daemon);

    daemon.signal(libc::SIGTERM);
    let exit = daemon.wait_exit(Duration::from_secs(30));

    assert_eq!(exit.code(), Some(0), "log:\n{}", daemon.log());
    daemon.wait_note("STOPPING=1", Duration::from_secs(5));
    let renewed = env.assert_each_renewal_done_or_untouched(T1, &subs);
    assert!(
        (1..=2).contains(&renewed),
        "only the renewals already at the gateway finished, the rest were handed back untouched: {renewed} renewed; log:\n{}",
        daemon.log()
    );

    // Nothing was lost: the next start renews the rest, each exactly once.
    let summary = env.json(T1, &["sweep", "--json"]);
    assert_eq!(summary["renewed"].as_u64(), Some(6 - renewed as u64));
    assert_eq!(env.assert_each_renewal_done_or_untouched(T1, &subs), 6);
}

#[test]
fn a_drain_longer_than_shutdown_timeout_exits_0_and_the_next_sweep_completes_the_cut_renewals() {
    let env =
        Env::new("[renewal]\nbatch_size = 2\nconcurrency = 2\n\n[shutdown]\ntimeout = \"1s\"\n");
    let subs = env.subscriptions(2);
    let mut daemon = env.spawn(T1, &[("RENEWD__GATEWAY__SANDBOX__LATENCY_MS", "20000")]);
    daemon.wait_note("READY=1", Duration::from_secs(30));
    env.wait_for_a_charge_in_flight(&daemon);

    let signalled = Instant::now();
    daemon.signal(libc::SIGTERM);
    let exit = daemon.wait_exit(Duration::from_secs(15));

    assert_eq!(exit.code(), Some(0), "log:\n{}", daemon.log());
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "exited at the deadline, not after the 20s call"
    );
    assert!(
        daemon.log().contains("shutdown.timeout reached"),
        "{}",
        daemon.log()
    );
    // The attempts were committed before the calls, so the next sweep
    // (after gateway.timeout and the claim's lease) asks the gateway about
    // the same keys first, then charges each period exactly once.
    let later = "2026-03-02T01:00:00Z";
    let summary = env.json(later, &["sweep", "--json"]);
    assert_eq!(summary["renewed"], 2, "{summary}");
    assert_eq!(env.assert_each_renewal_done_or_untouched(later, &subs), 2);
}

#[test]
fn a_second_signal_exits_at_once() {
    let env = Env::new("[shutdown]\ntimeout = \"60s\"\n");
    env.subscriptions(1);
    let mut daemon = env.spawn(T1, &[("RENEWD__GATEWAY__SANDBOX__LATENCY_MS", "30000")]);
    daemon.wait_note("READY=1", Duration::from_secs(30));
    env.wait_for_a_charge_in_flight(&daemon);

    daemon.signal(libc::SIGTERM);
    daemon.wait_note("STOPPING=1", Duration::from_secs(5));
    let second = Instant::now();
    daemon.signal(libc::SIGINT);
    let exit = daemon.wait_exit(Duration::from_secs(10));

    assert!(second.elapsed() < Duration::from_secs(5), "exited at once");
    assert_eq!(exit.code(), Some(130), "log:\n{}", daemon.log());
}
