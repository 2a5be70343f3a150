//! The SMTP transport: lettre's async tokio transport over rustls (no
//! OpenSSL), with a connection pool, a deadline per message, and the relay's
//! answers sorted into what the outbox should do next.
//!
//! The sorting matters more than the sending. A 4xx reply, a refused
//! connection, a timeout or a TLS failure says nothing about the message, so
//! it is `Transient` and the outbox retries with backoff. A 5xx reply to the
//! message (the recipient does not exist, the content is refused) will get
//! the same answer tomorrow, so it is `Permanent` and only that message
//! fails. A 5xx reply to our credentials is the exception: it is our
//! configuration, not the message, so it stays `Transient` and no mail is
//! lost while an operator fixes it.
//!
//! Server replies often quote the recipient; every address in an error is
//! masked before it leaves this module, because errors end up in logs.

use std::time::Duration;

use async_trait::async_trait;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use secrecy::{ExposeSecret, SecretString};

use super::{MailError, MailTransport, OutgoingMail};
use crate::config::{SmtpSettings, SmtpTls};
use crate::domain::values::mask_email;

pub struct SmtpTransport {
    inner: AsyncSmtpTransport<Tokio1Executor>,
    timeout: Duration,
}

impl std::fmt::Debug for SmtpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpTransport")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Problems with `mail.smtp` settings that can be seen without touching the
/// network or the file system, one message per problem, each naming its key.
/// (An empty host is reported by `Config::validate` itself.)
pub fn check_settings(s: &SmtpSettings) -> Vec<String> {
    let mut problems = Vec::new();
    if s.port == 0 {
        problems
            .push("mail.smtp.port must be 1..=65535 (587 for starttls, 465 for implicit)".into());
    }
    if let Err(e) = parse_timeout(&s.timeout) {
        problems.push(e);
    }
    if !(1..=64).contains(&s.pool_size) {
        problems.push(format!(
            "mail.smtp.pool_size = {} must be 1..=64",
            s.pool_size
        ));
    }
    let has_password = !s.password.expose_secret().is_empty();
    let has_file = !s.password_file.is_empty();
    if has_password && has_file {
        problems
            .push("mail.smtp.password and mail.smtp.password_file are both set; keep one".into());
    }
    if s.username.is_empty() && (has_password || has_file) {
        problems.push(
            "mail.smtp.password is set but mail.smtp.username is empty; set both or neither".into(),
        );
    }
    if !s.username.is_empty() && !has_password && !has_file {
        problems.push("mail.smtp.username is set but neither mail.smtp.password nor mail.smtp.password_file is; give the password in one of them (or RENEWD__MAIL__SMTP__PASSWORD)".into());
    }
    if s.tls == SmtpTls::None && !s.username.is_empty() && !is_loopback(&s.host) {
        problems.push(format!(
            "mail.smtp.tls = \"none\" would send the password to {:?} in clear text; use \"starttls\" or \"implicit\" (\"none\" is for a relay on this machine)",
            s.host
        ));
    }
    problems
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let bad =
        || format!("mail.smtp.timeout = {s:?} is not a duration of 1s..=10m; use e.g. \"30s\"");
    let d = s.parse::<jiff::SignedDuration>().map_err(|_| bad())?;
    let d = Duration::try_from(d).map_err(|_| bad())?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(600) {
        return Err(bad());
    }
    Ok(d)
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// The password from `password` or read from `password_file`; `None` when
/// no authentication is configured. Errors name the setting, never the
/// secret.
pub fn resolve_password(s: &SmtpSettings) -> Result<Option<SecretString>, String> {
    if s.username.is_empty() {
        return Ok(None);
    }
    if !s.password.expose_secret().is_empty() {
        return Ok(Some(s.password.clone()));
    }
    if s.password_file.is_empty() {
        return Err("mail.smtp.username is set but no password is configured".into());
    }
    // Same rules as every secret file: a path, or the bare name of a
    // systemd credential in $CREDENTIALS_DIRECTORY.
    crate::config::read_secret_file("mail.smtp.password_file", &s.password_file).map(Some)
}

impl SmtpTransport {
    /// Builds the transport; connects lazily, on the first message.
    pub fn new(s: &SmtpSettings) -> Result<SmtpTransport, String> {
        if s.host.is_empty() {
            return Err("mail.smtp.host is empty; set the relay host".into());
        }
        if let Some(p) = check_settings(s).into_iter().next() {
            return Err(p);
        }
        let timeout = parse_timeout(&s.timeout)?;
        let tls_parameters = || -> Result<TlsParameters, String> {
            let mut builder = TlsParameters::builder(s.host.clone());
            if !s.ca_file.is_empty() {
                let pem = std::fs::read(&s.ca_file).map_err(|e| {
                    format!("mail.smtp.ca_file = {:?} cannot be read: {e}", s.ca_file)
                })?;
                let cert = Certificate::from_pem(&pem).map_err(|e| {
                    format!(
                        "mail.smtp.ca_file = {:?} is not a PEM certificate: {e}",
                        s.ca_file
                    )
                })?;
                builder = builder.add_root_certificate(cert);
            }
            builder
                .build_rustls()
                .map_err(|e| format!("mail.smtp: cannot set up TLS for {:?}: {e}", s.host))
        };
        let tls = match s.tls {
            SmtpTls::None => Tls::None,
            SmtpTls::Starttls => Tls::Required(tls_parameters()?),
            SmtpTls::Implicit => Tls::Wrapper(tls_parameters()?),
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(s.host.clone())
            .port(s.port)
            .tls(tls)
            .timeout(Some(timeout))
            .pool_config(
                PoolConfig::new()
                    .max_size(s.pool_size)
                    .idle_timeout(Duration::from_secs(60)),
            );
        if let Some(password) = resolve_password(s)? {
            builder = builder.credentials(Credentials::new(
                s.username.clone(),
                password.expose_secret().to_string(),
            ));
        }
        Ok(SmtpTransport {
            inner: builder.build(),
            timeout,
        })
    }
}

#[async_trait]
impl MailTransport for SmtpTransport {
    async fn send(&self, mail: &OutgoingMail) -> Result<(), MailError> {
        // lettre's timeout covers each socket operation; this one bounds the
        // whole exchange, so a relay that trickles cannot hold a claim past
        // its lease.
        match tokio::time::timeout(self.timeout, self.inner.send(mail.message.clone())).await {
            Err(_) => Err(MailError::Transient(format!(
                "SMTP relay did not finish within {:?}",
                self.timeout
            ))),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(classify(&e)),
        }
    }
}

/// Reply codes that refuse our credentials rather than the message.
const AUTH_CODES: [&str; 4] = ["530", "534", "535", "538"];

fn classify(e: &lettre::transport::smtp::Error) -> MailError {
    let text = mask_addresses(&describe(e));
    let code = e.status().map(|c| c.to_string());
    if e.is_permanent() {
        let auth =
            code.as_deref().is_some_and(|c| AUTH_CODES.contains(&c)) || text.contains("5.7.8");
        if auth {
            MailError::Transient(format!("SMTP relay refused our credentials: {text}"))
        } else {
            MailError::Permanent(format!("SMTP relay rejected the message: {text}"))
        }
    } else if e.is_client() {
        // lettre refused to send (e.g. non-ASCII to a server without
        // 8BITMIME): the same message will be refused again.
        MailError::Permanent(format!("cannot send over SMTP: {text}"))
    } else if e.is_transient() {
        MailError::Transient(format!("SMTP relay deferred the message: {text}"))
    } else {
        MailError::Transient(format!("SMTP relay unreachable: {text}"))
    }
}

fn describe(e: &lettre::transport::smtp::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    // lettre's Display already includes its direct source; add the rest of
    // the chain (e.g. the io error under a TLS failure) once.
    let mut first = true;
    while let Some(s) = source {
        let part = s.to_string();
        if !first && !msg.contains(&part) {
            msg.push_str(": ");
            msg.push_str(&part);
        }
        first = false;
        source = s.source();
    }
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Replaces every `local@domain` in `text` with its masked form.
pub fn mask_addresses(text: &str) -> String {
    let is_local = |c: char| c.is_ascii_alphanumeric() || "._%+-!#$&'*/=?^`{|}~".contains(c);
    let is_domain = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '-';
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '@' {
            let mut start = i;
            while start > 0 && is_local(chars[start - 1]) {
                start -= 1;
            }
            let mut end = i + 1;
            while end < chars.len() && is_domain(chars[end]) {
                end += 1;
            }
            // The local part is already in `out`; take it back.
            if start < i && end > i + 1 {
                let local_len: usize = chars[start..i].iter().map(|c| c.len_utf8()).sum();
                out.truncate(out.len() - local_len);
                let address: String = chars[start..end].iter().collect();
                out.push_str(&mask_email(&address));
                i = end;
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> SmtpSettings {
        SmtpSettings {
            host: "smtp.example.com".into(),
            port: 587,
            tls: SmtpTls::Starttls,
            username: String::new(),
            password: SecretString::from(""),
            password_file: String::new(),
            ca_file: String::new(),
            pool_size: 4,
            timeout: "30s".into(),
        }
    }

    #[test]
    fn addresses_in_server_replies_are_masked() {
        assert_eq!(
            mask_addresses("550 5.1.1 <nobody@example.com>: Recipient address rejected"),
            "550 5.1.1 <n***@example.com>: Recipient address rejected"
        );
        assert_eq!(
            mask_addresses("no address here @ all"),
            "no address here @ all"
        );
    }

    #[test]
    fn valid_settings_have_no_problems() {
        assert!(check_settings(&settings()).is_empty());
    }

    #[test]
    fn a_password_is_never_sent_in_clear_text_to_a_remote_relay() {
        let mut s = settings();
        s.tls = SmtpTls::None;
        s.username = "renewd".into();
        s.password = "hunter2".into();
        let problems = check_settings(&s).join("\n");
        assert!(problems.contains("clear text"), "{problems}");
        assert!(!problems.contains("hunter2"));
        s.host = "127.0.0.1".into();
        assert!(check_settings(&s).is_empty());
    }

    #[test]
    fn bad_pool_timeout_and_credentials_are_reported_by_key() {
        let mut s = settings();
        s.pool_size = 0;
        s.timeout = "forever".into();
        s.username = "renewd".into();
        let problems = check_settings(&s).join("\n");
        assert!(problems.contains("mail.smtp.pool_size"), "{problems}");
        assert!(problems.contains("mail.smtp.timeout"), "{problems}");
        assert!(problems.contains("mail.smtp.password"), "{problems}");
    }

    #[test]
    fn the_password_can_come_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("smtp-password");
        std::fs::write(&path, "s3cret\n").unwrap();
        let mut s = settings();
        s.username = "renewd".into();
        s.password_file = path.to_string_lossy().into_owned();
        let p = resolve_password(&s).unwrap().unwrap();
        assert_eq!(p.expose_secret(), "s3cret");
        s.password_file = dir.path().join("missing").to_string_lossy().into_owned();
        let err = resolve_password(&s).unwrap_err();
        assert!(err.contains("mail.smtp.password_file"), "{err}");
    }

    #[tokio::test]
    async fn every_tls_mode_builds_a_transport() {
        for tls in [SmtpTls::None, SmtpTls::Starttls, SmtpTls::Implicit] {
            let mut s = settings();
            s.tls = tls;
            assert!(SmtpTransport::new(&s).is_ok(), "{tls:?}");
        }
    }
}
