//! Several `renewd` processes sweeping one PostgreSQL database.
//!
//! What goes wrong without the guards: two instances that read the same
//! due renewal both charge it (no `FOR UPDATE SKIP LOCKED` claim, no lease
//! checked on every write); two payments that read the same invoice
//! counter issue the same number or skip one (counter row not locked in
//! the paying transaction); an instance that dies holding claims leaves
//! those customers unrenewed forever (no lease expiry), or the one that
//! takes over charges again with a new key (no reconciliation); a dropped
//! connection aborts the sweep or, retried blindly, writes twice.
//!
//! Each test seeds its own fresh database (dropped afterwards) and judges
//! the outcome by the sandbox gateway's own ledger, shared by every
//! instance as an outside processor would be. PostgreSQL comes from
//! `RENEWD_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`);
//! when it is unreachable these tests pass with a notice, unless `CI` is
//! set, when they fail.

mod cluster;

use std::time::Duration;

use cluster::Cluster;

/// The tests of this binary run one at a time: each already runs several
/// processes on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Purchases at T0 end (UTC customers, 00:00 local) at PERIOD_END; the
/// sweeps run just after it.
const T0: &str = "2026-01-10T00:00:00Z";
const PERIOD_END: &str = "2027-01-10T00:00:00Z";
const SWEEP_AT: &str = "2027-01-10T00:30:00Z";
/// Past the 5-minute `renewal.lease` of every claim taken at SWEEP_AT.
const AFTER_LEASES: &str = "2027-01-10T00:40:00Z";

fn renewed(runs: &[cluster::Finished]) -> Vec<i64> {
    runs.iter()
        .map(|r| {
            r.assert_ok().json()["renewed"]
                .as_i64()
                .expect("renewed count")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_renew_a_thousand_due_periods_exactly_once() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let subs = cluster.seed(1_000, T0).await;

    let runs = cluster
        .sweeps(
            "sweep",
            4,
            SWEEP_AT,
            &[
                ("RENEWD__RENEWAL__BATCH_SIZE", "50"),
                ("RENEWD__RENEWAL__CONCURRENCY", "8"),
            ],
        )
        .await;

    let counts = renewed(&runs);
    eprintln!("renewals per instance: {counts:?}");
    assert_eq!(
        counts.iter().sum::<i64>(),
        1_000,
        "each period renewed by exactly one instance"
    );
    assert!(
        counts.iter().filter(|&&n| n > 0).count() >= 2,
        "the work was shared: {counts:?}"
    );
    cluster.assert_renewed_exactly_once(&subs, PERIOD_END).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_s_renewals_are_finished_by_the_others_once_its_leases_expire() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let subs = cluster.seed(200, T0).await;

    // A slow gateway, and one batch holding every due renewal: the victim
    // holds all the leases while it charges them a few at a time.
    let mut victim = cluster.spawn(
        "victim",
        SWEEP_AT,
        &[
            ("RENEWD__GATEWAY__SANDBOX__LATENCY_MS", "200"),
            ("RENEWD__RENEWAL__BATCH_SIZE", "500"),
            ("RENEWD__RENEWAL__CONCURRENCY", "4"),
        ],
        &["sweep", "--json"],
    );
    let owner = format!("%:{}", victim.pid());
    let mut waited = 0;
    loop {
        let done = cluster
            .scalar("SELECT COUNT(*) FROM renewals WHERE status = 'succeeded' AND kind = 'auto'")
            .await;
        if done >= 10 {
            break;
        }
        waited += 1;
        assert!(waited < 600, "the victim renewed nothing in 60s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    victim.kill();
    let killed = victim.wait().await;
    assert!(!killed.status.success(), "the victim was killed mid-sweep");
    let held: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM renewals WHERE status = 'pending' AND lease_owner LIKE $1",
    )
    .bind(&owner)
    .fetch_one(&cluster.pool)
    .await
    .expect("leases");
    assert!(held > 0, "the victim died holding leases");
    eprintln!("the victim died holding {held} leased renewals");

    // While its leases run, nobody else touches its renewals.
    let early = cluster.sweeps("early", 3, SWEEP_AT, &[]).await;
    assert_eq!(
        renewed(&early).iter().sum::<i64>(),
        0,
        "leased work is left alone"
    );
    let still: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM renewals WHERE status = 'pending' AND lease_owner LIKE $1",
    )
    .bind(&owner)
    .fetch_one(&cluster.pool)
    .await
    .expect("leases");
    assert_eq!(still, held);

    // Once they have expired, the others take it over and finish it.
    let late = cluster.sweeps("late", 3, AFTER_LEASES, &[]).await;
    assert_eq!(
        renewed(&late).iter().sum::<i64>(),
        held,
        "the victim's renewals are finished"
    );
    cluster.assert_renewed_exactly_once(&subs, PERIOD_END).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_every_database_connection_mid_sweep_loses_and_doubles_nothing() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let subs = cluster.seed(300, T0).await;

    let extra = [
        ("RENEWD__GATEWAY__SANDBOX__LATENCY_MS", "20"),
        ("RENEWD__RENEWAL__BATCH_SIZE", "20"),
        ("RENEWD__RENEWAL__CONCURRENCY", "4"),
    ];
    let instances: Vec<_> = (0..4)
        .map(|i| cluster.spawn(&format!("sweep{i}"), SWEEP_AT, &extra, &["sweep", "--json"]))
        .collect();
    // Cut every connection three times while the instances are busy.
    let mut cuts = 0;
    let mut terminated = 0;
    for _ in 0..600 {
        let done = cluster
            .scalar("SELECT COUNT(*) FROM renewals WHERE status = 'succeeded' AND kind = 'auto'")
            .await;
        if done >= 300 {
            break;
        }
        if done >= 30 * (cuts + 1) {
            terminated += cluster.terminate_all_backends().await;
            cuts += 1;
            if cuts == 3 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cuts > 0 && terminated > 0, "connections were cut mid-sweep");
    let mut runs = Vec::new();
    for instance in instances {
        runs.push(instance.wait().await);
    }
    // Every instance rode the cuts out and finished its sweep.
    let counts = renewed(&runs);
    eprintln!("cuts {cuts}, backends terminated {terminated}, renewals per instance: {counts:?}");
    let retried = runs
        .iter()
        .filter(|r| r.stderr.contains("retrying"))
        .count();
    eprintln!("instances that logged a retry: {retried}");

    // A renewal whose COMMIT was cut has an unknown outcome and keeps its
    // lease: the next sweep after the lease takes it up from its last
    // recovery point.
    let last = cluster.sweeps("after", 1, AFTER_LEASES, &[]).await;
    let finished = renewed(&last)[0];
    // At most 300: a renewal whose COMMIT landed but was reported lost is
    // renewed and counted by nobody; the ledger below is the judge.
    assert!(counts.iter().sum::<i64>() + finished <= 300);
    cluster.assert_renewed_exactly_once(&subs, PERIOD_END).await;
}

/// Not a test: renewals per second with 1, 2 and 4 instances sweeping one
/// PostgreSQL database (sandbox gateway at zero latency), beside pgbench's
/// TPS for its simple-update workload on the same server, so the ratio to
/// the database's own limit shows. Run it in release mode:
///
/// `cargo test --release --test multi -- --ignored --nocapture instances_benchmark`
///
/// `RENEWD_BENCH_RENEWALS` sets the renewals per run (default 2000). The time
/// is the wall time of the whole sweep processes (start, claims, charges,
/// invoices, receipts delivered to files, exit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark; run it by name with --ignored"]
async fn instances_benchmark() {
    let _serial = SERIAL.lock().await;
    let n: usize = std::env::var("RENEWD_BENCH_RENEWALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let mut rows = Vec::new();
    for instances in [1usize, 2, 4] {
        let Some(cluster) = Cluster::start().await else {
            return;
        };
        cluster.seed(n, T0).await;
        let started = std::time::Instant::now();
        let runs = cluster
            .sweeps(
                "bench",
                instances,
                SWEEP_AT,
                &[
                    ("RENEWD__RENEWAL__BATCH_SIZE", "100"),
                    ("RENEWD__RENEWAL__CONCURRENCY", "8"),
                ],
            )
            .await;
        let took = started.elapsed().as_secs_f64();
        assert_eq!(renewed(&runs).iter().sum::<i64>(), n as i64);
        rows.push((instances, n as f64 / took, took));
    }
    let tps = pgbench_tps().await;
    println!();
    println!("| instances | renewals | seconds | renewals/s | pgbench simple-update TPS | renewals/s ÷ TPS |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for (instances, rate, took) in rows {
        println!(
            "| {instances} | {n} | {took:.1} | {rate:.0} | {tps:.0} | {:.3} |",
            rate / tps
        );
    }
}

/// pgbench's built-in simple-update workload (scale 1, 4 clients, 10 s) on
/// a database of its own on the same server.
async fn pgbench_tps() -> f64 {
    let db = cluster::TestDb::create().await.expect("PostgreSQL");
    let url = db.url.clone();
    tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| {
            let out = std::process::Command::new("pgbench")
                .args(args)
                .arg(&url)
                .output()
                .expect("pgbench (Debian's postgresql-client)");
            assert!(
                out.status.success(),
                "pgbench {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        run(&["-i", "-q", "-s", "1"]);
        let report = run(&["-b", "simple-update", "-c", "4", "-j", "2", "-T", "10"]);
        report
            .lines()
            .find_map(|l| {
                l.strip_prefix("tps = ")
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or_else(|| panic!("no tps line in pgbench's report:\n{report}"))
    })
    .await
    .expect("pgbench thread")
}
