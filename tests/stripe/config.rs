//! The `[gateway.stripe]` settings. Without these checks a daemon would
//! start with no key and fail every renewal as "unknown", or print the
//! secret key in `check-config` for anyone reading the terminal or a log.

use renewd::config::{Config, ConfigError};
use secrecy::ExposeSecret;

fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let mut env = vec![
        ("RENEWD__GATEWAY__KIND", "stripe"),
        ("RENEWD__GATEWAY__TIMEOUT", "3m"),
    ];
    env.extend_from_slice(vars);
    Config::load_with_env(
        None,
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

#[test]
fn a_stripe_gateway_without_a_key_is_refused_naming_the_key() {
    let err = load(&[]).unwrap_err().to_string();

    assert!(err.contains("gateway.stripe.api_key"), "{err}");
    assert!(err.contains("api_key_file"), "{err}");
}

#[test]
fn an_unreadable_key_file_is_refused_naming_the_file() {
    let err = load(&[(
        "RENEWD__GATEWAY__STRIPE__API_KEY_FILE",
        "/nonexistent/stripe-key",
    )])
    .unwrap_err()
    .to_string();

    assert!(
        err.contains("gateway.stripe.api_key_file") && err.contains("/nonexistent/stripe-key"),
        "{err}"
    );
}

#[test]
fn a_publishable_key_is_refused_without_showing_it() {
    let err = load(&[("RENEWD__GATEWAY__STRIPE__API_KEY", "pk_test_visible")])
        .unwrap_err()
        .to_string();

    assert!(err.contains("gateway.stripe.api_key"), "{err}");
    assert!(!err.contains("pk_test_visible"), "{err}");
}

#[test]
fn the_key_is_read_from_a_file_such_as_a_systemd_credential() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stripe-key");
    std::fs::write(&file, "sk_test_from_file\n").unwrap();

    let config = load(&[(
        "RENEWD__GATEWAY__STRIPE__API_KEY_FILE",
        file.to_str().unwrap(),
    )])
    .unwrap();

    let key = config.raw.gateway.stripe.resolve_api_key().unwrap();
    assert_eq!(key.expose_secret(), "sk_test_from_file");
}

#[test]
fn check_config_and_debug_output_never_show_the_key() {
    let config = load(&[("RENEWD__GATEWAY__STRIPE__API_KEY", "sk_test_secret123")]).unwrap();

    let shown = config.effective_json().to_string();
    let debug = format!("{config:?}");

    assert_eq!(
        config.effective_json()["gateway"]["stripe"]["api_key"],
        "***"
    );
    assert!(!shown.contains("sk_test_secret123"), "{shown}");
    assert!(!debug.contains("sk_test_secret123"));
}

#[test]
fn a_gateway_timeout_too_short_for_stripe_search_to_catch_up_is_refused() {
    let err = load(&[
        ("RENEWD__GATEWAY__STRIPE__API_KEY", "sk_test_x"),
        ("RENEWD__GATEWAY__TIMEOUT", "30s"),
    ])
    .unwrap_err()
    .to_string();

    assert!(
        err.contains("gateway.timeout") && err.contains("gateway.stripe.request_timeout"),
        "{err}"
    );
}
