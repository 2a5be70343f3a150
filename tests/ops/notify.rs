//! systemd notification (Type=notify). Without READY=1 systemd would
//! consider renewd started the moment it forked, before the database was
//! migrated, and units ordered after it (or `systemctl start` waiting for
//! it) would go on too early. Without progress-gated watchdog pings, a
//! sweep stuck on a hung connection would leave a daemon that looks alive
//! and renews nothing.

use std::time::Duration;

use crate::{Env, T1};

#[test]
fn the_daemon_notifies_ready_once_migrated_and_reports_each_sweep_in_status() {
    let env = Env::new("");
    env.subscriptions(1);
    let mut daemon = env.spawn(T1, &[]);

    let ready = daemon.wait_note("READY=1", Duration::from_secs(30));
    let migrated = env.query_i64(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'subscriptions'",
    );
    assert_eq!(migrated, 1, "the database is migrated before READY");
    let status = daemon.wait_note("STATUS=last sweep at", Duration::from_secs(30));
    assert!(ready <= status, "READY comes before the first sweep ends");
    let notes = daemon.notes();
    let summary = notes
        .iter()
        .map(|(_, n)| n.as_str())
        .find(|n| n.contains("STATUS=last sweep at"))
        .unwrap_or_default();
    assert!(summary.contains("renewed 1"), "{summary}");
    assert!(summary.contains("errors 0"), "{summary}");

    daemon.signal(libc::SIGTERM);
    let exit = daemon.wait_exit(Duration::from_secs(30));
    assert_eq!(exit.code(), Some(0), "log:\n{}", daemon.log());
    daemon.wait_note("STOPPING=1", Duration::from_secs(5));
    daemon.wait_note("STATUS=stopped", Duration::from_secs(5));
}

#[test]
fn watchdog_pings_stop_while_a_sweep_makes_no_progress_and_resume_after_it() {
    // One renewal, one gateway call that hangs for 4s: with WatchdogSec=1s
    // the pings must pause for that long (systemd would restart renewd),
    // then resume once the sweep moves again.
    let env = Env::new("[renewal]\nbatch_size = 1\nconcurrency = 1\n");
    env.subscriptions(1);
    let mut daemon = env.spawn(
        T1,
        &[
            ("WATCHDOG_USEC", "1000000"),
            ("RENEWD__GATEWAY__SANDBOX__LATENCY_MS", "4000"),
        ],
    );
    daemon.wait_note("READY=1", Duration::from_secs(30));
    let swept = daemon.wait_note("STATUS=last sweep at", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(2500));
    daemon.signal(libc::SIGTERM);
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(30)).code(),
        Some(0),
        "log:\n{}",
        daemon.log()
    );

    let pings: Vec<_> = daemon
        .notes()
        .into_iter()
        .filter(|(_, n)| n.contains("WATCHDOG=1"))
        .map(|(at, _)| at)
        .collect();
    let longest_silence = pings
        .windows(2)
        .filter(|w| w[1] <= swept + Duration::from_millis(600))
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    assert!(
        longest_silence >= Duration::from_secs(2),
        "pings paused during the stuck call (longest gap {longest_silence:?}, pings {pings:?})"
    );
    let after = pings.iter().filter(|at| **at > swept).count();
    assert!(
        after >= 2,
        "pings resumed after the sweep ({after} after it)"
    );
    assert!(
        daemon.log().contains("withholding the watchdog ping"),
        "the stall is logged:\n{}",
        daemon.log()
    );
}
