//! Config problems an operator can act on: each one line naming the key,
//! where it was set (the environment variable, the file, or the built-in
//! defaults) and what is allowed. Also the checks that need the machine
//! rather than the text: a writable state directory and database
//! directory, and secrets files (systemd credentials).
//!
//! Nothing here may print a secret: a secrets file is named, never shown.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{GatewayKind, LogFormat, MailTransportKind, Settings, DEFAULT_TOML};

/// Sections whose keys are names chosen by the operator (plan ids, country
/// codes), so they cannot be checked against the defaults.
const OPEN_MAPS: &[&str] = &["plans", "tax.rates_bp"];

/// Where a `*_file` secret setting points. A bare name (no `/`) is looked
/// up in `$CREDENTIALS_DIRECTORY` when systemd supplies credentials
/// (`LoadCredential=NAME:PATH`); anything else is a path as given.
pub fn credential_path(value: &str) -> PathBuf {
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    credential_path_in(value, dir.as_deref())
}

fn credential_path_in(value: &str, credentials: Option<&Path>) -> PathBuf {
    match credentials {
        Some(dir) if !value.is_empty() && !value.contains('/') => dir.join(value),
        _ => PathBuf::from(value),
    }
}

/// Reads the secret a `*_file` setting (`key` = `value`) points to, trimmed.
/// The error names the key and the file, never the content.
pub fn read_secret_file(key: &str, value: &str) -> Result<secrecy::SecretString, String> {
    let path = credential_path(value);
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().is_empty() => Err(format!(
            "{key} = {value:?}: {} is empty; it must hold the secret",
            path.display()
        )),
        Ok(text) => Ok(secrecy::SecretString::from(text.trim().to_string())),
        Err(e) => Err(format!(
            "{key} = {value:?}: cannot read {} ({e}); give a readable file holding the secret, or the name of a systemd credential (LoadCredential=NAME:PATH) found in $CREDENTIALS_DIRECTORY",
            path.display()
        )),
    }
}

/// Tells which source set each key.
pub(super) struct Origins {
    file: Option<(String, Value)>,
    env: Vec<String>,
    /// Keys at the top level that are not sections: problems may start with them.
    top_level: Vec<String>,
    fallback: String,
}

impl Origins {
    pub(super) fn new(file: Option<&Path>, env: &[String], fallback: &str) -> Origins {
        let file = file.map(|path| {
            let value = config::Config::builder()
                .add_source(config::File::from(path).format(config::FileFormat::Toml))
                .build()
                .ok()
                .and_then(|c| c.try_deserialize::<Value>().ok())
                .unwrap_or(Value::Null);
            (path.display().to_string(), value)
        });
        let top_level = match defaults() {
            Value::Object(map) => map
                .iter()
                .filter(|(k, v)| !v.is_object() || OPEN_MAPS.contains(&k.as_str()))
                .map(|(k, _)| k.clone())
                .collect(),
            _ => Vec::new(),
        };
        Origins {
            file,
            env: env.to_vec(),
            top_level,
            fallback: fallback.to_string(),
        }
    }

    fn of_key(&self, key: &str) -> Option<String> {
        let var = format!(
            "RENEWD__{}",
            key.split('.')
                .map(str::to_uppercase)
                .collect::<Vec<_>>()
                .join("__")
        );
        if let Some(name) = self.env.iter().find(|n| n.eq_ignore_ascii_case(&var)) {
            return Some(format!("environment variable {name}"));
        }
        match &self.file {
            Some((name, value)) if lookup(value, key).is_some() => Some(name.clone()),
            _ => None,
        }
    }

    /// The source of the first key named in `problem` that was set outside
    /// the defaults (a problem about two keys is blamed on the one the
    /// operator changed).
    pub(super) fn of_problem(&self, problem: &str) -> String {
        let mut tokens = problem
            .split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
            .map(|t| t.trim_matches('.'))
            .filter(|t| !t.is_empty());
        // Every problem starts with its key (an unknown one included).
        let leading = tokens.next().and_then(|t| self.of_key(t));
        leading
            .or_else(|| {
                tokens
                    .filter(|t| t.contains('.') || self.top_level.iter().any(|k| k == t))
                    .find_map(|t| self.of_key(t))
            })
            .unwrap_or_else(|| self.fallback.clone())
    }
}

fn lookup<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.').try_fold(value, |v, part| v.get(part))
}

fn defaults() -> Value {
    config::Config::builder()
        .add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ))
        .build()
        .ok()
        .and_then(|c| c.try_deserialize::<Value>().ok())
        .unwrap_or(Value::Null)
}

/// Every key in `merged` that renewd does not know, each as a problem
/// that lists what its section allows. (serde would stop at the first.)
pub(super) fn unknown_keys(merged: &config::Config) -> Vec<String> {
    let Ok(merged) = merged.clone().try_deserialize::<Value>() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    walk(&merged, &defaults(), "", &mut out);
    out
}

fn walk(value: &Value, known: &Value, prefix: &str, out: &mut Vec<String>) {
    let (Value::Object(values), Value::Object(keys)) = (value, known) else {
        return;
    };
    for (name, sub) in values {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match keys.get(name) {
            None => out.push(format!(
                "{path} is not a known key; {} allows: {}",
                section(prefix),
                keys.keys().cloned().collect::<Vec<_>>().join(", ")
            )),
            Some(known) if !OPEN_MAPS.contains(&path.as_str()) => walk(sub, known, &path, out),
            Some(_) => {}
        }
    }
}

fn section(prefix: &str) -> String {
    if prefix.is_empty() {
        "the top level".into()
    } else {
        format!("[{prefix}]")
    }
}

/// Rewrites the config crate's and serde's messages (unknown field, wrong
/// type, unknown enum value) as `key ...: what is allowed`.
pub(super) fn explain_load_error(message: &str) -> String {
    let message = one_line(message);
    let (body, key) = match message.find(" for key `") {
        Some(i) => {
            let key = message[i + " for key `".len()..]
                .split('`')
                .next()
                .unwrap_or_default()
                .to_string();
            (message[..i].to_string(), Some(key))
        }
        None => (message.clone(), None),
    };
    if let Some(rest) = body.strip_prefix("unknown field `") {
        let (name, allowed) = rest.split_once('`').unwrap_or((rest, ""));
        let allowed: Vec<&str> = allowed.split('`').skip(1).step_by(2).collect();
        let (path, prefix) = match &key {
            Some(k) if !k.is_empty() => (format!("{k}.{name}"), k.as_str()),
            _ => (name.to_string(), ""),
        };
        return format!(
            "{path} is not a known key; {} allows: {}",
            section(prefix),
            allowed.join(", ")
        );
    }
    match key {
        Some(key) if body.starts_with("enum ") || body.starts_with("unknown variant") => {
            let value = body
                .rsplit(' ')
                .next()
                .unwrap_or_default()
                .trim_matches(|c| c == '`' || c == ',');
            let value = if body.starts_with("unknown variant") {
                body.split('`').nth(1).unwrap_or(value)
            } else {
                value
            };
            match allowed_values(&key) {
                Some(allowed) => {
                    format!("{key} = {value:?} is not allowed; use one of: {allowed}")
                }
                None => format!("{key} = {value:?} is not allowed ({body})"),
            }
        }
        Some(key) => format!("{key}: {body}; see config/default.toml for the expected form"),
        None => body,
    }
}

/// The values an enum key accepts, read from serde's own refusal so the
/// list cannot drift from the types.
fn allowed_values(key: &str) -> Option<String> {
    let probe = "\"?\"";
    let refusal = match key {
        "gateway.kind" => serde_json::from_str::<GatewayKind>(probe).err(),
        "mail.transport" => serde_json::from_str::<MailTransportKind>(probe).err(),
        "log.format" => serde_json::from_str::<LogFormat>(probe).err(),
        _ => None,
    }?
    .to_string();
    let expected = refusal.split_once("expected")?.1;
    let names: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    (!names.is_empty()).then(|| names.join(", "))
}

/// Joins a multi-line message (TOML parse errors draw a caret diagram)
/// into one line, dropping the diagram.
pub(super) fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| !l.starts_with('|') && !l.starts_with("in "))
        .filter(|l| {
            !l.split_once(" |")
                .is_some_and(|(n, _)| n.chars().all(|c| c.is_ascii_digit()))
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// Problems only the machine can show: directories renewd must write to.
pub(super) fn environment_problems(raw: &Settings) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(why) = check_writable_dir(&raw.state_dir) {
        problems.push(format!(
            "state_dir = {:?} is not usable: {why}; renewd writes mail, invoices and the sandbox ledger there, so use a directory its user can write (under systemd, StateDirectory=)",
            raw.state_dir.display().to_string()
        ));
    }
    if let Some(db) = sqlite_path(&raw.database.url) {
        let dir = match db.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let usable = check_writable_dir(&dir).and_then(|()| match std::fs::metadata(&db) {
            Ok(m) if m.is_dir() => Err(format!("{} is a directory", db.display())),
            Ok(_) => std::fs::OpenOptions::new()
                .write(true)
                .open(&db)
                .map(|_| ())
                .map_err(|e| format!("cannot write {}: {e}", db.display())),
            Err(_) => Ok(()),
        });
        if let Err(why) = usable {
            problems.push(format!(
                "database.url = {:?} is not usable: {why}; SQLite writes the database, its journal and renewd's lock file there, so use sqlite://PATH in a directory renewd's user can write",
                raw.database.url
            ));
        }
    }
    if raw.gateway.kind == GatewayKind::Sandbox && !raw.gateway.sandbox.ledger.is_empty() {
        let ledger = Path::new(&raw.gateway.sandbox.ledger);
        let dir = match ledger.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if let Err(why) = check_writable_dir(dir) {
            problems.push(format!(
                "gateway.sandbox.ledger = {:?} is not usable: {why}; use a path in a writable directory, or \"\" for STATE_DIR/sandbox-ledger.db",
                raw.gateway.sandbox.ledger
            ));
        }
    }
    problems
}

/// The file path of a `sqlite:` URL (none for an in-memory database).
fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

/// Whether renewd can create files in `dir`, or create `dir` itself: the
/// nearest existing ancestor must be a directory it can write in. Tried
/// with a probe file, the only test that also sees read-only mounts.
fn check_writable_dir(dir: &Path) -> Result<(), String> {
    let mut existing = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    loop {
        match std::fs::metadata(existing) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(format!("{} is not a directory", existing.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                existing = match existing.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    Some(_) => Path::new("."),
                    None => return Err(format!("{}: {e}", dir.display())),
                };
            }
            Err(e) => return Err(format!("{}: {e}", existing.display())),
        }
    }
    let probe = existing.join(format!(".renewd-write-check-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!("cannot write in {}: {e}", existing.display())),
    }
}

/// `http.listen`: empty (off) or a loopback `IP:PORT`.
pub(super) fn check_http_listen(listen: &str) -> Option<String> {
    if listen.is_empty() {
        return None;
    }
    match listen.parse::<std::net::SocketAddr>() {
        Err(_) => Some(format!(
            "http.listen = {listen:?} is not an address; use a loopback IP:PORT such as \"127.0.0.1:9187\", or \"\" to turn it off"
        )),
        Ok(addr) if !addr.ip().is_loopback() => Some(format!(
            "http.listen = {listen:?} is not a loopback address; /metrics and /readyz have no authentication, so use 127.0.0.1:PORT or [::1]:PORT and scrape through a local agent or proxy"
        )),
        Ok(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_credential_name_is_found_in_the_credentials_directory() {
        let dir = Path::new("/run/credentials/renewd.service");
        assert_eq!(
            credential_path_in("stripe-key", Some(dir)),
            dir.join("stripe-key")
        );
        assert_eq!(
            credential_path_in("/etc/renewd/key", Some(dir)),
            PathBuf::from("/etc/renewd/key")
        );
        assert_eq!(
            credential_path_in("stripe-key", None),
            PathBuf::from("stripe-key")
        );
    }

    #[test]
    fn serde_messages_become_key_and_allowed_values() {
        assert_eq!(
            explain_load_error("unknown field `typo`, expected one of `a`, `b` for key `renewal`"),
            "renewal.typo is not a known key; [renewal] allows: a, b"
        );
        assert_eq!(
            explain_load_error(
                "enum GatewayKind does not have variant constructor paypal for key `gateway.kind`"
            ),
            "gateway.kind = \"paypal\" is not allowed; use one of: sandbox, stripe"
        );
        let wrong = explain_load_error("invalid type: string \"x\", expected an integer for key `renewal.batch_size` in the environment");
        assert!(
            wrong
                .starts_with("renewal.batch_size: invalid type: string \"x\", expected an integer"),
            "{wrong}"
        );
    }

    #[test]
    fn a_toml_syntax_error_fits_on_one_line() {
        let text = "TOML parse error at line 1, column 9\n  |\n1 | [renewal\n  |         ^\nunclosed table, expected `]`\n in x.toml";
        assert_eq!(
            one_line(text),
            "TOML parse error at line 1, column 9: unclosed table, expected `]`"
        );
    }

    #[test]
    fn only_loopback_listen_addresses_pass() {
        assert!(check_http_listen("").is_none());
        assert!(check_http_listen("127.0.0.1:9187").is_none());
        assert!(check_http_listen("[::1]:9187").is_none());
        assert!(check_http_listen("0.0.0.0:9187").is_some());
        assert!(check_http_listen("localhost:9187").is_some());
    }
}
