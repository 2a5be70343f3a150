//! Health and metrics over HTTP. Without them an operator learns that
//! renewals stopped from customers; with them a probe sees a daemon that
//! is up but not sweeping, and Prometheus alerts on failing sweeps, failing
//! mail and charges stuck in an unknown state.

use std::time::Duration;

use crate::{free_port, http_get, Env, T1};

#[test]
fn healthz_readyz_and_metrics_answer_on_the_configured_loopback_address() {
    let port = free_port();
    let env = Env::new(&format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"));
    env.subscriptions(1);
    let mut daemon = env.spawn(T1, &[]);
    daemon.wait_note("READY=1", Duration::from_secs(30));
    daemon.wait_note("STATUS=last sweep at", Duration::from_secs(30));

    assert_eq!(http_get(port, "/healthz"), (200, "ok\n".to_string()));
    let (status, body) = http_get(port, "/readyz");
    assert_eq!(status, 200, "{body}");
    let (status, metrics) = http_get(port, "/metrics");
    assert_eq!(status, 200);
    for series in [
        "renewd_sweeps_total{outcome=\"ok\"} 1",
        "renewd_sweeps_total{outcome=\"error\"} 0",
        "renewd_sweep_duration_seconds_bucket{le=\"+Inf\"} 1",
        "renewd_renewals_total{outcome=\"renewed\"} 1",
        "renewd_renewals_total{outcome=\"declined\"} 0",
        "renewd_gateway_charges_total{outcome=\"succeeded\"} 1",
        "renewd_gateway_request_duration_seconds_bucket{operation=\"charge\",le=\"+Inf\"} 1",
        "renewd_invoices_issued_total 1",
        "renewd_mail_deliveries_total{status=\"sent\"}",
        "renewd_mail_messages{kind=\"receipt\",status=\"sent\"} 1",
        "renewd_subscriptions_due 0",
        "renewd_subscriptions_past_due 0",
        "renewd_charges_unknown 0",
        "renewd_last_successful_sweep_timestamp_seconds",
        "renewd_store_up 1",
        "# TYPE renewd_sweep_duration_seconds histogram",
    ] {
        assert!(
            metrics.contains(series),
            "{series} missing from:\n{metrics}"
        );
    }
    assert_eq!(http_get(port, "/nope").0, 404);

    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn readyz_is_not_ready_until_the_first_sweep_has_finished() {
    let port = free_port();
    let env = Env::new(&format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"));
    env.subscriptions(1);
    let mut daemon = env.spawn(T1, &[("RENEWD__GATEWAY__SANDBOX__LATENCY_MS", "3000")]);
    daemon.wait_note("READY=1", Duration::from_secs(30));
    env.wait_for_a_charge_in_flight(&daemon);

    let (status, body) = http_get(port, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("first sweep"), "{body}");
    assert_eq!(http_get(port, "/healthz").0, 200, "alive all the same");

    daemon.wait_note("STATUS=last sweep at", Duration::from_secs(30));
    let (status, body) = http_get(port, "/readyz");
    assert_eq!(status, 200, "{body}");
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn a_taken_http_port_stops_the_start_with_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let env = Env::new(&format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"));
    let mut daemon = env.spawn(T1, &[]);
    let exit = daemon.wait_exit(Duration::from_secs(30));

    assert_ne!(exit.code(), Some(0));
    let log = daemon.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("renewd: ")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(errors[0].contains("http.listen"), "{log}");
    assert!(
        !daemon.notes().iter().any(|(_, n)| n.contains("READY=1")),
        "never ready"
    );
}
