//! The rendered samples under `docs/mail/`: one HTML file per mail kind and
//! language, from the built-in templates and a fixed context. The test
//! fails when a template changed and the samples did not; regenerate them
//! with `RENEWD_WRITE_DOCS=1 cargo test --test mail samples`.

use std::path::PathBuf;

use renewd::mail::templates::{sample_context, Templates, LOCALES};
use renewd::mail::MailKind;

fn context(locale: &str) -> serde_json::Value {
    let mut c = sample_context();
    if locale == "en" {
        for (k, v) in [
            ("customer_name", "John Smith"),
            ("timezone", "America/New_York"),
            ("period_end_at", "2028-03-01T05:00:00Z"),
            ("currency", "USD"),
            ("amount", "$475.00"),
            (
                "renew_command",
                "renewd subscription renew 42 --accept-terms 2026-04 --card <payment method>",
            ),
        ] {
            c[k] = serde_json::json!(v);
        }
    } else {
        c["customer_name"] = serde_json::json!("山田 花子");
        c["decline_reason"] = serde_json::json!("残高不足");
    }
    c
}

#[test]
fn the_samples_in_docs_match_the_templates() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/mail");
    let write = std::env::var_os("RENEWD_WRITE_DOCS").is_some();
    if write {
        std::fs::create_dir_all(&dir).expect("docs/mail");
    }
    let templates = Templates::builtin();
    let mut stale = vec![];
    for kind in MailKind::ALL {
        for locale in LOCALES {
            let r = templates
                .render(kind, locale, &context(locale))
                .unwrap_or_else(|e| panic!("{kind} {locale}: {e}"));
            // The subject and text part ride along in a comment, so one file
            // shows all three parts of the message.
            let sample = format!(
                "<!--\nSubject: {}\n\n{}-->\n{}",
                r.subject,
                r.text.replace("--", "- -"),
                r.html
            );
            let path = dir.join(format!("{kind}.{locale}.html"));
            if write {
                std::fs::write(&path, &sample).expect("write sample");
            } else if std::fs::read_to_string(&path).ok().as_deref() != Some(sample.as_str()) {
                stale.push(path.display().to_string());
            }
        }
    }
    assert!(
        stale.is_empty(),
        "these samples are out of date; run `RENEWD_WRITE_DOCS=1 cargo test --test mail samples`:\n{}",
        stale.join("\n")
    );
}
