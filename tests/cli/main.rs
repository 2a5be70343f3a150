//! End-to-end tests: the built `renewd` binary driven through the CLI
//! contract with `--now`, each test in its own state directory.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn db(&self) -> String {
        format!("sqlite://{}/renewd.db", self.dir.path().display())
    }

    fn cmd(&self, now: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_renewd"))
            .args(["--now", now])
            .args(args)
            .env("RENEWD__STATE_DIR", self.dir.path())
            .env("RENEWD__DATABASE__URL", self.db())
            .env_remove("RENEWD_CONFIG")
            .env_remove("RUST_LOG")
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    /// Runs a command that must succeed and print JSON.
    fn json(&self, now: &str, args: &[&str]) -> Value {
        let out = self.cmd(now, args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// Every row of every table, as text: any write shows up as a change.
    fn snapshot(&self) -> String {
        let path = self.dir.path().join("renewd.db");
        if !path.exists() {
            return String::new();
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use sqlx::Row;
            let pool = sqlx::SqlitePool::connect(&self.db()).await.unwrap();
            let tables: Vec<String> = sqlx::query_scalar(
                "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            let mut out = String::new();
            for t in tables {
                for row in sqlx::query(&format!("SELECT * FROM \"{t}\""))
                    .fetch_all(&pool)
                    .await
                    .unwrap()
                {
                    let cols: Vec<String> = (0..row.len())
                        .map(|i| {
                            row.try_get::<Option<String>, _>(i)
                                .map(|v| v.unwrap_or_default())
                                .or_else(|_| {
                                    row.try_get::<Option<i64>, _>(i)
                                        .map(|v| v.map(|n| n.to_string()).unwrap_or_default())
                                })
                                .unwrap_or_else(|_| "?".into())
                        })
                        .collect();
                    out.push_str(&format!("{t}: {}\n", cols.join("|")));
                }
            }
            pool.close().await;
            out
        })
    }
}

const T0: &str = "2027-03-01T01:00:00Z";

fn add_customer(env: &Env) -> i64 {
    let c = env.json(
        T0,
        &[
            "customer",
            "add",
            "--name",
            "Hanako Yamada",
            "--email",
            "hanako@example.jp",
            "--timezone",
            "Asia/Tokyo",
            "--locale",
            "ja",
            "--country",
            "JP",
            "--currency",
            "JPY",
            "--json",
        ],
    );
    c["id"].as_i64().unwrap()
}

fn purchase(env: &Env, customer: i64) -> Value {
    env.json(
        T0,
        &[
            "subscription",
            "purchase",
            "--customer",
            &customer.to_string(),
            "--accept-terms",
            "2026-04",
            "--card",
            "pm_card_visa",
            "--json",
        ],
    )
}

#[test]
fn purchase_sweep_and_inspect_through_the_cli_contract() {
    let env = Env::new();
    let customer = add_customer(&env);
    let sub = purchase(&env, customer);
    assert_eq!(sub["status"], "active");
    assert_eq!(sub["auto_renew"], true);
    assert_eq!(sub["auto_renew_can_enable"], true);
    assert_eq!(sub["anchor_date"], "2027-03-01");
    assert_eq!(sub["current_period_end"], "2028-02-29T15:00:00Z");
    assert_eq!(sub["payment_method"]["kind"], "card");
    assert_eq!(sub["payment_method"]["last4"], "4242");
    assert!(
        !sub.to_string().contains("pm_card_visa"),
        "no payment token in output"
    );
    let id = sub["id"].as_i64().unwrap().to_string();

    let summary = env.json("2028-02-29T15:00:00Z", &["sweep", "--json"]);
    assert_eq!(summary["renewed"], 1);
    assert_eq!(summary["invoices_issued"], 1);
    for key in [
        "declined",
        "retry_scheduled",
        "expired",
        "reminders",
        "mail_sent",
    ] {
        assert!(summary.get(key).is_some(), "summary has {key}");
    }
    let again = env.json("2028-02-29T15:00:00Z", &["sweep", "--json"]);
    assert_eq!(again["renewed"], 0);

    let shown = env.json(
        "2028-03-01T00:00:00Z",
        &["subscription", "show", &id, "--json"],
    );
    assert_eq!(shown["current_period_end"], "2029-02-28T15:00:00Z");

    let invoices = env.json("2028-03-01T00:00:00Z", &["invoice", "list", "--json"]);
    let numbers: Vec<&str> = invoices
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["number"].as_str().unwrap())
        .collect();
    assert_eq!(numbers, vec!["INV-2027-000001", "INV-2028-000001"]);
    for field in [
        "subscription_id",
        "status",
        "currency",
        "subtotal_minor",
        "tax_minor",
        "total_minor",
        "issued_at",
        "due_at",
        "paid_at",
        "period_start",
        "period_end",
        "payment_kind",
    ] {
        assert!(invoices[0].get(field).is_some(), "invoice has {field}");
    }
    assert_eq!(invoices[1]["total_minor"], 58_300);

    let mail = env.json("2028-03-01T00:00:00Z", &["mail", "list", "--json"]);
    let kinds: Vec<&str> = mail
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["order_confirmation", "receipt"]);
    assert!(mail[1]["subject"]
        .as_str()
        .unwrap()
        .contains("INV-2028-000001"));
    assert_eq!(mail[1]["status"], "sent");

    let charges = env.json("2028-03-01T00:00:00Z", &["sandbox", "charges", "--json"]);
    assert_eq!(charges.as_array().unwrap().len(), 2);
    assert_eq!(
        charges[1]["created_at"], "2028-02-29T15:00:00Z",
        "stamped with the --now clock"
    );
    for field in [
        "id",
        "idempotency_key",
        "payment_method",
        "amount_minor",
        "currency",
        "outcome",
    ] {
        assert!(charges[0].get(field).is_some(), "charge has {field}");
    }

    let events = env.json(
        "2028-03-01T00:00:00Z",
        &["events", "--subscription", &id, "--json"],
    );
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"terms.accepted")
            && kinds.contains(&"purchase.paid")
            && kinds.contains(&"renewal.succeeded"),
        "{kinds:?}"
    );

    let out_path = env.dir.path().join("inv.html");
    let out = env.cmd(
        "2028-03-01T00:00:00Z",
        &[
            "invoice",
            "download",
            "INV-2028-000001",
            "--format",
            "html",
            "--out",
            out_path.to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    let html = std::fs::read_to_string(out_path).unwrap();
    assert!(
        html.contains("INV-2028-000001") && html.contains("¥58,300"),
        "JPY shows no decimals"
    );
    assert!(
        Path::new(&env.dir.path().join("invoices/INV-2028-000001.html")).exists(),
        "the daemon wrote the document"
    );
}

#[test]
fn turning_auto_renew_back_on_is_refused_with_the_command_that_renews() {
    let env = Env::new();
    let customer = add_customer(&env);
    let id = purchase(&env, customer)["id"].as_i64().unwrap().to_string();
    let off = env.json(T0, &["subscription", "auto-renew", &id, "off", "--json"]);
    assert_eq!(off["auto_renew"], false);
    assert_eq!(off["auto_renew_can_enable"], false);
    let before = env.snapshot();
    let out = env.cmd(T0, &["subscription", "auto-renew", &id, "on"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("until the subscription is renewed again")
            && err.contains("renewd subscription renew"),
        "{err}"
    );
    assert_eq!(env.snapshot(), before);
}

#[test]
fn dry_run_reports_what_a_sweep_would_do_and_writes_nothing() {
    let env = Env::new();
    let customer = add_customer(&env);
    purchase(&env, customer);
    let before = env.snapshot();
    let plan = env.json("2028-03-01T00:00:00Z", &["sweep", "--dry-run", "--json"]);
    let actions = plan["actions"].as_array().unwrap();
    assert_eq!(actions.len(), 1);
    assert_eq!(actions[0]["action"], "charge");
    assert_eq!(env.snapshot(), before);
    let charges = env.json("2028-03-01T00:00:00Z", &["sandbox", "charges", "--json"]);
    assert_eq!(
        charges.as_array().unwrap().len(),
        1,
        "no charge from a dry run"
    );
}

#[test]
fn simulate_moves_a_test_clock_through_the_years() {
    let env = Env::new();
    let customer = add_customer(&env);
    purchase(&env, customer);
    let out = env.json(
        T0,
        &[
            "simulate",
            "--until",
            "2030-03-05T00:00:00Z",
            "--step",
            "1d",
            "--json",
        ],
    );
    assert_eq!(out["totals"]["renewed"], 3);
    let charges = env.json("2030-03-05T00:00:00Z", &["sandbox", "charges", "--json"]);
    assert_eq!(charges.as_array().unwrap().len(), 4);
}

/// Bad input: one line on stderr naming the problem, a non-zero exit, and
/// not a byte of the database changed.
#[test]
fn bad_input_gets_one_clear_line_and_changes_nothing() {
    let env = Env::new();
    let customer = add_customer(&env).to_string();
    purchase(&env, customer.parse().unwrap());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "customer",
                "add",
                "--name",
                "X",
                "--email",
                "not-an-address",
            ],
            "invalid email address",
        ),
        (
            vec![
                "customer",
                "add",
                "--name",
                "X",
                "--email",
                "x@example.com\r\nBcc: y@example.com",
            ],
            "invalid email address",
        ),
        (
            vec![
                "customer",
                "add",
                "--name",
                "X",
                "--email",
                "x@example.com",
                "--timezone",
                "Mars/Olympus",
            ],
            "unknown time zone",
        ),
        (
            vec![
                "customer",
                "add",
                "--name",
                "X",
                "--email",
                "x@example.com",
                "--currency",
                "XYZ",
            ],
            "ISO 4217",
        ),
        (
            vec![
                "customer",
                "add",
                "--name",
                "X",
                "--email",
                "x@example.com",
                "--currency",
                "GBP",
            ],
            "not sold",
        ),
        (
            vec![
                "customer",
                "add",
                "--name",
                "X",
                "--email",
                "x@example.com",
                "--locale",
                "fr",
            ],
            "unknown locale",
        ),
        (
            vec!["customer", "add", "--name", " ", "--email", "x@example.com"],
            "invalid name",
        ),
        (
            vec![
                "subscription",
                "purchase",
                "--customer",
                &customer,
                "--card",
                "pm_card_visa",
            ],
            "--accept-terms",
        ),
        (
            vec![
                "subscription",
                "purchase",
                "--customer",
                &customer,
                "--accept-terms",
                "2025-01",
                "--card",
                "pm_card_visa",
            ],
            "outdated",
        ),
        (
            vec![
                "subscription",
                "purchase",
                "--customer",
                &customer,
                "--accept-terms",
                "1999",
                "--card",
                "pm_card_visa",
            ],
            "unknown terms version",
        ),
        (
            vec![
                "subscription",
                "purchase",
                "--customer",
                &customer,
                "--accept-terms",
                "2026-04",
                "--plan",
                "gold",
                "--card",
                "pm_card_visa",
            ],
            "unknown plan",
        ),
        (
            vec![
                "subscription",
                "purchase",
                "--customer",
                "999",
                "--accept-terms",
                "2026-04",
                "--card",
                "pm_card_visa",
            ],
            "customer 999 not found",
        ),
        (
            vec![
                "subscription",
                "purchase",
                "--customer",
                &customer,
                "--accept-terms",
                "2026-04",
                "--card",
                "4242424242424242",
            ],
            "never a card number",
        ),
        (
            vec![
                "subscription",
                "purchase",
                "--customer",
                &customer,
                "--accept-terms",
                "2026-04",
                "--card",
                "pm_card_unknown",
            ],
            "No such payment method",
        ),
        (
            vec![
                "subscription",
                "purchase",
                "--customer",
                &customer,
                "--accept-terms",
                "2026-04",
                "--card",
                "pm_card_visa",
                "--card-expiry",
                "2030-13",
            ],
            "invalid card expiry",
        ),
        (
            vec!["subscription", "show", "999"],
            "subscription 999 not found",
        ),
        (
            vec!["subscription", "list", "--status", "paused"],
            "unknown subscription status",
        ),
        (
            vec!["subscription", "frobnicate"],
            "unrecognized subcommand",
        ),
        (vec!["invoice", "show", "INV-1999-000001"], "not found"),
        (
            vec![
                "simulate",
                "--until",
                "2028-01-01T00:00:00Z",
                "--step",
                "1 fortnight",
            ],
            "--step",
        ),
    ];
    for (args, needle) in cases {
        let before = env.snapshot();
        let out = env.cmd(T0, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(
            err.lines().count(),
            1,
            "{args:?} printed more than one line: {err}"
        );
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in {err:?}"
        );
        assert!(
            !err.contains("4242424242424242"),
            "card numbers are never echoed"
        );
        assert_eq!(env.snapshot(), before, "{args:?} changed the database");
    }
    // A malformed --now is refused before anything is opened.
    let before = env.snapshot();
    let out = env.cmd(
        "2027-02-30T00:00:00Z",
        &["customer", "add", "--name", "X", "--email", "x@example.com"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(err.lines().count(), 1);
    assert!(err.contains("--now") && err.contains("RFC 3339"), "{err}");
    assert_eq!(env.snapshot(), before);
}

#[test]
fn a_bad_config_file_names_the_key_and_the_file() {
    let env = Env::new();
    let file = env.dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[renewal]\nlocal_time = \"25:00\"\n[schedule]\nsweep = \"sometimes\"\n",
    )
    .unwrap();
    let out = env.cmd(T0, &["--config", file.to_str().unwrap(), "check-config"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("renewal.local_time") && err.contains("schedule.sweep"),
        "{err}"
    );
    assert!(err.contains("bad.toml"), "{err}");
    assert_eq!(err.lines().count(), 2, "one line per problem: {err}");

    std::fs::write(&file, "[renewal]\nno_such_key = 1\n").unwrap();
    let out = env.cmd(T0, &["--config", file.to_str().unwrap(), "check-config"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("no_such_key"), "{err}");

    let ok = env.cmd(T0, &["check-config", "--json"]);
    assert!(ok.status.success());
    let effective: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(effective["gateway"]["kind"], "sandbox");
}

#[test]
fn terms_prints_the_current_version() {
    let env = Env::new();
    let customer = add_customer(&env);
    purchase(&env, customer);
    let terms = env.json(T0, &["terms", "--json"]);
    assert_eq!(terms["current"], "2026-04");
    assert_eq!(terms["accepted"][0]["acceptances"], 1);
}

#[test]
fn bank_transfer_purchase_mark_paid_and_documents_through_the_cli() {
    let env = Env::new();
    let customer = add_customer(&env).to_string();
    let sub = env.json(
        T0,
        &[
            "subscription",
            "purchase",
            "--customer",
            &customer,
            "--accept-terms",
            "2026-04",
            "--bank-transfer",
            "--contact-name",
            "Keiko Accounts",
            "--contact-phone",
            "+81 3-1234-5678",
            "--contact-email",
            "ap@example.co.jp",
            "--json",
        ],
    );
    assert_eq!(sub["status"], "pending_payment");
    assert_eq!(sub["payment_method"]["kind"], "bank_transfer");
    assert_eq!(sub["invoice"]["status"], "open");
    let number = sub["invoice"]["number"].as_str().unwrap().to_string();
    let id = sub["id"].as_i64().unwrap().to_string();

    let paid = env.json(
        "2027-03-05T00:00:00Z",
        &[
            "invoice",
            "mark-paid",
            &number,
            "--reference",
            "MIZUHO-7781",
            "--json",
        ],
    );
    assert_eq!(paid["status"], "paid");
    assert_eq!(paid["payment_reference"], "MIZUHO-7781");
    let shown = env.json(
        "2027-03-05T00:00:00Z",
        &["subscription", "show", &id, "--json"],
    );
    assert_eq!(shown["status"], "active");
    assert_eq!(shown["anchor_date"], "2027-03-01");

    let pdf = env.dir.path().join("inv.pdf");
    let out = env.cmd(
        "2027-03-05T00:00:00Z",
        &[
            "invoice",
            "download",
            &number,
            "--format",
            "pdf",
            "--out",
            pdf.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&pdf).unwrap();
    assert!(bytes.starts_with(b"%PDF-") && String::from_utf8_lossy(&bytes).contains(&number));
    let events = env.json(
        "2027-03-05T00:00:00Z",
        &["events", "--subscription", &id, "--json"],
    );
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"invoice.issued") && kinds.contains(&"invoice.paid"),
        "{kinds:?}"
    );
}

#[test]
fn manual_renewal_and_cancellation_requests_through_the_cli() {
    let env = Env::new();
    let customer = add_customer(&env);
    let id = purchase(&env, customer)["id"].as_i64().unwrap().to_string();
    env.json(T0, &["subscription", "auto-renew", &id, "off", "--json"]);
    let renewed = env.json(
        "2028-02-20T00:00:00Z",
        &[
            "subscription",
            "renew",
            &id,
            "--accept-terms",
            "2026-04",
            "--json",
        ],
    );
    assert_eq!(renewed["auto_renew"], true);
    assert_eq!(renewed["current_period_end"], "2029-02-28T15:00:00Z");
    assert_eq!(renewed["invoice"]["status"], "paid");

    let req = env.json(
        "2028-03-01T00:00:00Z",
        &[
            "request",
            "open",
            "--subscription",
            &id,
            "--kind",
            "cancel",
            "--reason",
            "closing the company",
            "--json",
        ],
    );
    assert_eq!(req["status"], "open");
    let rid = req["id"].as_i64().unwrap().to_string();
    let listed = env.json(
        "2028-03-01T00:00:00Z",
        &["request", "list", "--status", "open", "--json"],
    );
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let done = env.json(
        "2028-03-01T00:00:00Z",
        &["request", "resolve", &rid, "--cancel", "now", "--json"],
    );
    assert_eq!(done["status"], "resolved");
    for field in [
        "id",
        "subscription_id",
        "kind",
        "status",
        "reason",
        "created_at",
        "resolved_at",
    ] {
        assert!(done.get(field).is_some(), "request has {field}");
    }
    let shown = env.json(
        "2028-03-01T00:00:00Z",
        &["subscription", "show", &id, "--json"],
    );
    assert_eq!(shown["status"], "cancelled");
}

#[test]
fn bad_input_in_the_vendor_flows_gets_one_line_and_changes_nothing() {
    let env = Env::new();
    let customer = add_customer(&env).to_string();
    let paid_sub = purchase(&env, customer.parse().unwrap());
    let id = paid_sub["id"].as_i64().unwrap().to_string();
    let cancelled = purchase(&env, customer.parse().unwrap())["id"]
        .as_i64()
        .unwrap()
        .to_string();
    let rid = env.json(
        T0,
        &[
            "request",
            "open",
            "--subscription",
            &cancelled,
            "--kind",
            "cancel",
            "--reason",
            "x",
            "--json",
        ],
    )["id"]
        .as_i64()
        .unwrap()
        .to_string();
    env.json(
        T0,
        &["request", "resolve", &rid, "--cancel", "now", "--json"],
    );
    // Renewed early once: renewing the same subscription again must be refused.
    env.json(
        T0,
        &[
            "subscription",
            "renew",
            &id,
            "--accept-terms",
            "2026-04",
            "--json",
        ],
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["subscription", "renew", "999", "--accept-terms", "2026-04"],
            "subscription 999 not found",
        ),
        (
            vec![
                "subscription",
                "payment-method",
                "999",
                "--card",
                "pm_card_visa",
            ],
            "subscription 999 not found",
        ),
        (
            vec![
                "request",
                "open",
                "--subscription",
                "999",
                "--kind",
                "cancel",
                "--reason",
                "x",
            ],
            "subscription 999 not found",
        ),
        (
            vec![
                "request",
                "open",
                "--subscription",
                &cancelled,
                "--kind",
                "cancel",
                "--reason",
                "again",
            ],
            "already cancelled",
        ),
        (
            vec![
                "request",
                "open",
                "--subscription",
                &id,
                "--kind",
                "refund",
                "--reason",
                "x",
            ],
            "only request kind is cancel",
        ),
        (
            vec!["request", "resolve", &rid, "--cancel", "now"],
            "only open requests",
        ),
        (vec!["request", "show", "999"], "request 999 not found"),
        (
            vec![
                "invoice",
                "mark-paid",
                "INV-2027-000001",
                "--reference",
                "X-1",
            ],
            "already paid",
        ),
        (
            vec![
                "invoice",
                "mark-paid",
                "INV-1999-000001",
                "--reference",
                "X-1",
            ],
            "not found",
        ),
        (
            vec!["subscription", "renew", &id, "--accept-terms", "2026-04"],
            "already renewed",
        ),
        (
            vec![
                "subscription",
                "renew",
                &cancelled,
                "--accept-terms",
                "2026-04",
            ],
            "cancelled",
        ),
        (
            vec![
                "subscription",
                "purchase",
                "--customer",
                &customer,
                "--accept-terms",
                "2026-04",
                "--bank-transfer",
                "--contact-name",
                "K",
                "--contact-phone",
                "call me",
                "--contact-email",
                "ap@example.co.jp",
            ],
            "invalid phone number",
        ),
        (
            vec![
                "subscription",
                "purchase",
                "--customer",
                &customer,
                "--accept-terms",
                "2026-04",
                "--bank-transfer",
                "--contact-name",
                "K",
                "--contact-phone",
                "+81 3-1234-5678",
                "--contact-email",
                "nope",
            ],
            "--contact-email",
        ),
        (
            vec![
                "subscription",
                "purchase",
                "--customer",
                &customer,
                "--accept-terms",
                "2026-04",
                "--bank-transfer",
            ],
            "--contact-name",
        ),
        (
            vec!["subscription", "auto-renew", &cancelled, "on"],
            "cancelled",
        ),
    ];
    for (args, needle) in cases {
        let before = env.snapshot();
        let out = env.cmd("2027-06-01T00:00:00Z", &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(
            err.lines().count(),
            1,
            "{args:?} printed more than one line: {err}"
        );
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in {err:?}"
        );
        assert_eq!(env.snapshot(), before, "{args:?} changed the database");
    }
}
