//! Logs under journald. Without the sd-daemon prefixes every line lands
//! in the journal at the default priority, so `journalctl -p warning`
//! shows nothing and declines hide among routine lines; without dropping
//! our timestamp each line carries two.

use std::os::unix::fs::MetadataExt;
use std::process::Stdio;

use crate::{Env, T1};

/// Runs a verbose sweep with stderr on a file that `JOURNAL_STREAM` names
/// (as systemd does with its journal socket) and returns the lines.
fn sweep_logged_to_journal(env: &Env, format: &str, journal: bool) -> Vec<String> {
    let path = env.path().join(format!("journal-{format}-{journal}.log"));
    let file = std::fs::File::create(&path).expect("log file");
    let meta = file.metadata().expect("stat");
    let mut cmd = env.command();
    cmd.args(["--verbose", "--now", T1, "sweep"])
        .env("RENEWD__LOG__FORMAT", format)
        .stdout(Stdio::null())
        .stderr(file);
    if journal {
        cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    }
    let status = cmd.status().expect("run sweep");
    assert!(status.success());
    std::fs::read_to_string(&path)
        .expect("read log")
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn under_journald_each_line_carries_its_priority_and_no_timestamp() {
    let env = Env::new("");
    env.subscriptions(1);

    let lines = sweep_logged_to_journal(&env, "pretty", true);

    assert!(!lines.is_empty());
    for line in &lines {
        let rest = ["<3>", "<4>", "<6>", "<7>"]
            .iter()
            .find_map(|p| line.strip_prefix(p))
            .unwrap_or_else(|| panic!("no priority prefix: {line}"));
        assert!(
            !rest.trim_start().starts_with("20"),
            "no timestamp of our own: {line}"
        );
    }
    assert!(lines
        .iter()
        .any(|l| l.starts_with("<6>") && l.contains("subscription renewed")));
}

#[test]
fn json_lines_under_journald_keep_the_priority_outside_the_json() {
    let env = Env::new("");
    env.subscriptions(1);

    let lines = sweep_logged_to_journal(&env, "json", true);

    let finished = lines
        .iter()
        .find(|l| l.contains("sweep finished"))
        .expect("a summary line");
    let json = finished.strip_prefix("<6>").expect("info priority");
    let event: serde_json::Value = serde_json::from_str(json).expect("one JSON object");
    assert_eq!(event["message"], "sweep finished");
    assert!(event.get("timestamp").is_none(), "{event}");
}

#[test]
fn outside_journald_lines_keep_their_timestamp_and_no_prefix() {
    let env = Env::new("");
    env.subscriptions(1);

    let lines = sweep_logged_to_journal(&env, "json", false);

    let finished = lines
        .iter()
        .find(|l| l.contains("sweep finished"))
        .expect("a summary line");
    let event: serde_json::Value = serde_json::from_str(finished).expect("one JSON object");
    assert!(event.get("timestamp").is_some(), "{event}");
}
