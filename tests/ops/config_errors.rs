//! Bad configs are refused by `check-config` (systemd's ExecStartPre) and
//! by start-up, with exit code 2 and one line per problem naming the key,
//! where it was set (the file or the variable) and what is allowed.
//! Without this an operator gets a serde message with no key, a daemon that
//! starts and fails at the first sweep, or a typo (`leese = "5m"`) that is
//! silently ignored while the default applies.

use std::process::Output;

use crate::Env;

/// One bad config: a file body and/or environment, and what each refusal
/// line must name.
struct Bad {
    name: &'static str,
    file: Option<&'static str>,
    env: &'static [(&'static str, &'static str)],
    /// Per expected line: the key and a fragment of what is allowed.
    lines: &'static [(&'static str, &'static str)],
}

const NOT_A_DIR: &str = "@NOT_A_DIR@";

const TABLE: &[Bad] = &[
    Bad {
        name: "unknown top-level key in the file",
        file: Some("colour = \"blue\"\n"),
        env: &[],
        lines: &[("colour", "the top level allows: ")],
    },
    Bad {
        name: "unknown key in a section, from the environment",
        file: None,
        env: &[("RENEWD__RENEWAL__LEESE", "5m")],
        lines: &[("renewal.leese", "[renewal] allows: batch_size")],
    },
    Bad {
        name: "unknown key in a nested section",
        file: Some("[gateway.sandbox]\nlatency = 5\n"),
        env: &[],
        lines: &[("gateway.sandbox.latency", "latency_ms")],
    },
    Bad {
        name: "two unknown keys, two lines",
        file: Some("[mail]\nsender = \"x\"\n[http]\nport = 9187\n"),
        env: &[],
        lines: &[
            ("http.port", "[http] allows: listen"),
            ("mail.sender", "[mail] allows: "),
        ],
    },
    Bad {
        name: "bad cron expression in the file",
        file: Some("[schedule]\nsweep = \"every minute\"\n"),
        env: &[],
        lines: &[("schedule.sweep", "six fields")],
    },
    Bad {
        name: "cron expression without a seconds field",
        file: None,
        env: &[("RENEWD__SCHEDULE__MAIL", "*/15 * * * *")],
        lines: &[("schedule.mail", "six fields")],
    },
    Bad {
        name: "a duration that is not one",
        file: Some("[renewal]\nlease = \"soon\"\n"),
        env: &[],
        lines: &[("renewal.lease", "\"30s\", \"5m\"")],
    },
    Bad {
        name: "a negative shutdown timeout",
        file: None,
        env: &[("RENEWD__SHUTDOWN__TIMEOUT", "-5s")],
        lines: &[("shutdown.timeout", "positive duration")],
    },
    Bad {
        name: "a bad duration inside a list",
        file: Some("[dunning]\nreconcile_backoff = [\"1m\", \"often\"]\n"),
        env: &[],
        lines: &[("dunning.reconcile_backoff", "positive duration")],
    },
    Bad {
        name: "a gateway timeout not shorter than the lease",
        file: None,
        env: &[("RENEWD__GATEWAY__TIMEOUT", "10m")],
        lines: &[("gateway.timeout", "shorter than renewal.lease")],
    },
    Bad {
        name: "unknown time zone",
        file: Some("[invoice]\ntimezone = \"Mars/Olympus_Mons\"\n"),
        env: &[],
        lines: &[("invoice.timezone", "IANA time zone")],
    },
    Bad {
        name: "a city that is not a zone name",
        file: None,
        env: &[("RENEWD__CUSTOMER_DEFAULTS__TIMEZONE", "Tokyo")],
        lines: &[("customer_defaults.timezone", "Asia/Tokyo")],
    },
    Bad {
        name: "a time of day out of range",
        file: Some("[renewal]\nlocal_time = \"25:00\"\n"),
        env: &[],
        lines: &[("renewal.local_time", "HH:MM")],
    },
    Bad {
        name: "an unknown log format",
        file: Some("[log]\nformat = \"xml\"\n"),
        env: &[],
        lines: &[("log.format", "one of: pretty, json")],
    },
    Bad {
        name: "an unknown gateway",
        file: None,
        env: &[("RENEWD__GATEWAY__KIND", "paypal")],
        lines: &[("gateway.kind", "one of: sandbox, stripe")],
    },
    Bad {
        name: "a word where a number belongs",
        file: Some("[renewal]\nbatch_size = \"many\"\n"),
        env: &[],
        lines: &[("renewal.batch_size", "expected an integer")],
    },
    Bad {
        name: "a public health and metrics address",
        file: Some("[http]\nlisten = \"0.0.0.0:9187\"\n"),
        env: &[],
        lines: &[("http.listen", "127.0.0.1:PORT")],
    },
    Bad {
        name: "a host name where an address belongs",
        file: None,
        env: &[("RENEWD__HTTP__LISTEN", "localhost:9187")],
        lines: &[("http.listen", "IP:PORT")],
    },
    Bad {
        name: "a state directory that cannot be written",
        file: None,
        env: &[("RENEWD__STATE_DIR", NOT_A_DIR)],
        lines: &[("state_dir", "a directory its user can write")],
    },
    Bad {
        name: "a database in a directory that cannot be written",
        file: None,
        env: &[("RENEWD__DATABASE__URL", "sqlite://@NOT_A_DIR@/renewd.db")],
        lines: &[("database.url", "sqlite://PATH")],
    },
    Bad {
        name: "a secrets file that does not exist",
        file: Some(
            "[gateway]\nkind = \"stripe\"\ntimeout = \"4m\"\n[gateway.stripe]\napi_key_file = \"/nonexistent/renewd/stripe-key\"\n[renewal]\nlease = \"10m\"\n",
        ),
        env: &[],
        lines: &[("gateway.stripe.api_key_file", "/nonexistent/renewd/stripe-key")],
    },
    Bad {
        name: "the current terms version not among the published ones",
        file: Some("[terms]\ncurrent = \"2099-01\"\n"),
        env: &[],
        lines: &[("terms.current", "terms.versions")],
    },
    Bad {
        name: "a problem in the file and one in the environment",
        file: Some("[invoice]\ntimezone = \"Nowhere/City\"\n"),
        env: &[("RENEWD__RENEWAL__LEASE", "a while")],
        lines: &[
            ("renewal.lease", "\"5m\""),
            ("invoice.timezone", "IANA time zone"),
        ],
    },
];

/// Runs `args` with a bad config from `bad`: its file (if any) in a fresh
/// directory, its environment, the state and database in that directory.
fn run_bad(bad: &Bad, args: &[&str]) -> (Output, String) {
    let env = Env::new("");
    let not_a_dir = env.path().join("plain-file");
    std::fs::write(&not_a_dir, "").expect("plain file");
    let not_a_dir = not_a_dir.join("sub");
    let file = env.path().join("bad.toml");
    let mut cmd = env.bare_command();
    cmd.env("RENEWD__STATE_DIR", env.path()).env(
        "RENEWD__DATABASE__URL",
        format!("sqlite://{}/renewd.db", env.path().display()),
    );
    if let Some(body) = bad.file {
        std::fs::write(&file, body).expect("bad config");
        cmd.arg("--config").arg(&file);
    }
    for (k, v) in bad.env {
        cmd.env(k, v.replace(NOT_A_DIR, &not_a_dir.display().to_string()));
    }
    let out = cmd.args(args).output().expect("run renewd");
    assert!(
        !env.path().join("renewd.db").exists(),
        "{}: nothing is created from a bad config",
        bad.name
    );
    (out, file.display().to_string())
}

fn check_refusal(bad: &Bad, out: &Output, file: &str) -> Result<(), String> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(2) {
        return Err(format!("exit {:?}, stderr:\n{stderr}", out.status.code()));
    }
    let lines: Vec<&str> = stderr.lines().collect();
    if lines.len() != bad.lines.len() {
        return Err(format!(
            "{} lines, wanted {}:\n{stderr}",
            lines.len(),
            bad.lines.len()
        ));
    }
    for (key, allowed) in bad.lines {
        let Some(line) = lines.iter().find(|l| l.contains(key)) else {
            return Err(format!("no line names {key}:\n{stderr}"));
        };
        if !line.starts_with("renewd: ") {
            return Err(format!("not a renewd line: {line}"));
        }
        let var = format!(
            "RENEWD__{}",
            key.split('.')
                .map(str::to_uppercase)
                .collect::<Vec<_>>()
                .join("__")
        );
        let from_env = bad.env.iter().any(|(k, _)| *k == var);
        let source_named = if from_env {
            line.contains(&format!("environment variable {var}"))
        } else {
            line.contains(file)
        };
        if !source_named {
            return Err(format!(
                "{key}: the source ({}) is not named: {line}",
                if from_env { var.as_str() } else { file }
            ));
        }
        if !line.contains(allowed) {
            return Err(format!(
                "{key}: {allowed:?} (what is allowed) missing: {line}"
            ));
        }
    }
    Ok(())
}

#[test]
fn every_bad_config_fails_check_config_with_one_line_per_problem() {
    assert!(TABLE.len() >= 15);
    let failures: Vec<String> = TABLE
        .iter()
        .filter_map(|bad| {
            let (out, file) = run_bad(bad, &["check-config"]);
            check_refusal(bad, &out, &file)
                .err()
                .map(|e| format!("{}: {e}", bad.name))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn every_bad_config_also_stops_the_daemon_before_it_starts() {
    let failures: Vec<String> = TABLE
        .iter()
        .filter_map(|bad| {
            let (out, file) = run_bad(bad, &["run"]);
            check_refusal(bad, &out, &file)
                .err()
                .map(|e| format!("{}: {e}", bad.name))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_missing_config_file_is_named() {
    let env = Env::new("");
    let missing = env.path().join("nope.toml");
    let out = env
        .bare_command()
        .arg("--config")
        .arg(&missing)
        .arg("check-config")
        .output()
        .expect("run renewd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    assert!(stderr.contains("--config"), "{stderr}");
}

#[test]
fn a_toml_syntax_error_is_one_line_naming_the_file_and_position() {
    let env = Env::new("");
    let file = env.path().join("broken.toml");
    std::fs::write(&file, "[renewal\nlease = \"5m\"\n").expect("write");
    let out = env
        .bare_command()
        .arg("--config")
        .arg(&file)
        .arg("check-config")
        .output()
        .expect("run renewd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(stderr.contains("line 1"), "{stderr}");
}

#[test]
fn check_config_prints_the_effective_config_with_secrets_redacted() {
    let env = Env::new("");
    let out = env
        .command()
        .args(["check-config", "--json"])
        .env(
            "RENEWD__GATEWAY__STRIPE__API_KEY",
            "sk_test_ops_do_not_print",
        )
        .env(
            "RENEWD__DATABASE__URL",
            "postgres://renewd:hunter2-ops@db.internal/renewd",
        )
        .output()
        .expect("run renewd");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("sk_test_ops_do_not_print"), "{stdout}");
    assert!(!stdout.contains("hunter2-ops"), "{stdout}");
    let effective: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(effective["gateway"]["stripe"]["api_key"], "***");
    assert_eq!(
        effective["database"]["url"],
        "postgres://renewd:***@db.internal/renewd"
    );
    assert_eq!(effective["shutdown"]["timeout"], "60s");
    assert_eq!(effective["http"]["listen"], "");
}
