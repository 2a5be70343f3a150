//! Mail templates: for every kind and locale a subject, a plain-text part
//! and an HTML part, rendered with minijinja from the context snapshot the
//! engine stored on the outbox row.
//!
//! The defaults live in `src/mail/templates/` and are compiled in. An
//! operator may override any of them from a directory (`mail.templates_dir`)
//! holding files of the same names: `layout.html`, `macros.html`,
//! `LOCALE/footer.txt` and `LOCALE/KIND.subject.txt`, `LOCALE/KIND.txt`,
//! `LOCALE/KIND.html`. A file the directory does not have falls back to the
//! built-in one, so an override can be as small as one subject line.
//!
//! Templates never see money as floats or instants as system time: amounts
//! arrive formatted by `Money::display`, dates as the customer's local
//! dates, and the filters here only reformat them for the locale. HTML parts
//! are auto-escaped; text parts and subjects are not (they are not HTML),
//! and a subject is flattened to one line so no template can add a header.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use minijinja::{Environment, State, Value};

use super::MailKind;
use crate::domain::values::Zone;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: String,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot render {kind} mail: {message}")]
pub struct RenderError {
    pub kind: MailKind,
    pub message: String,
}

/// A template set that cannot be loaded: a missing directory, a file that
/// does not parse, a name renewd does not use.
#[derive(Debug, thiserror::Error)]
#[error("mail templates in {dir}: {message}")]
pub struct TemplateError {
    pub dir: PathBuf,
    pub message: String,
}

/// The locales with templates of their own; any other falls back to `en`.
pub const LOCALES: [&str; 2] = ["en", "ja"];

macro_rules! builtin {
    ($($kind:literal),* $(,)?) => {
        &[
            ("layout.html", include_str!("templates/layout.html")),
            ("macros.html", include_str!("templates/macros.html")),
            ("en/footer.txt", include_str!("templates/en/footer.txt")),
            ("ja/footer.txt", include_str!("templates/ja/footer.txt")),
            $(
                (concat!("en/", $kind, ".subject.txt"), include_str!(concat!("templates/en/", $kind, ".subject.txt"))),
                (concat!("en/", $kind, ".txt"), include_str!(concat!("templates/en/", $kind, ".txt"))),
                (concat!("en/", $kind, ".html"), include_str!(concat!("templates/en/", $kind, ".html"))),
                (concat!("ja/", $kind, ".subject.txt"), include_str!(concat!("templates/ja/", $kind, ".subject.txt"))),
                (concat!("ja/", $kind, ".txt"), include_str!(concat!("templates/ja/", $kind, ".txt"))),
                (concat!("ja/", $kind, ".html"), include_str!(concat!("templates/ja/", $kind, ".html"))),
            )*
        ]
    };
}

/// Every built-in template by name.
pub const BUILTIN: &[(&str, &str)] = builtin!(
    "order_confirmation",
    "receipt",
    "renewal_reminder",
    "upcoming_renewal",
    "card_expiring",
    "payment_failed",
    "invoice_issued",
    "expired",
    "cancelled",
);

fn builtin_source(name: &str) -> Option<&'static str> {
    BUILTIN.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// A loaded template set: the built-ins, with an operator's overrides on
/// top when a directory is given.
pub struct Templates {
    env: Environment<'static>,
    dir: Option<PathBuf>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates").field("dir", &self.dir).finish()
    }
}

impl Templates {
    /// The built-in templates only.
    pub fn builtin() -> Templates {
        Templates {
            env: environment(None),
            dir: None,
        }
    }

    /// The built-ins overridden by the files in `dir`. Every file there must
    /// be one renewd uses (or sit under `partials/`, for the operator's own
    /// includes), and every kind must render in every locale with a sample
    /// context, so a broken override is refused at startup rather than
    /// discovered when a customer's mail fails.
    pub fn load(dir: &Path) -> Result<Templates, TemplateError> {
        let fail = |message: String| TemplateError {
            dir: dir.to_path_buf(),
            message,
        };
        if !dir.is_dir() {
            return Err(fail(
                "not a directory; create it or leave mail.templates_dir empty for the built-in templates".into(),
            ));
        }
        let mut unknown = Vec::new();
        for name in files_under(dir).map_err(|e| fail(e.to_string()))? {
            if builtin_source(&name).is_none() && !name.starts_with("partials/") {
                unknown.push(name);
            }
        }
        if !unknown.is_empty() {
            return Err(fail(format!(
                "{} not a template renewd uses (check the name against the built-in ones: LOCALE/KIND.subject.txt, LOCALE/KIND.txt, LOCALE/KIND.html, layout.html, macros.html, LOCALE/footer.txt; put your own includes under partials/)",
                unknown.join(", ") + if unknown.len() == 1 { " is" } else { " are" }
            )));
        }
        let templates = Templates {
            env: environment(Some(dir.to_path_buf())),
            dir: Some(dir.to_path_buf()),
        };
        let sample = sample_context();
        for kind in MailKind::ALL {
            for locale in LOCALES {
                templates
                    .render(kind, locale, &sample)
                    .map_err(|e| fail(format!("{locale}/{kind}: {}", e.message)))?;
            }
        }
        Ok(templates)
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Renders one message from the outbox row's context object.
    pub fn render(
        &self,
        kind: MailKind,
        locale: &str,
        ctx: &serde_json::Value,
    ) -> Result<Rendered, RenderError> {
        let err = |e: minijinja::Error| RenderError {
            kind,
            message: describe(&e),
        };
        let locale = if LOCALES.contains(&locale) {
            locale
        } else {
            "en"
        };
        let base = Value::from_serialize(ctx);
        let render = |name: String, extra: Value| -> Result<String, RenderError> {
            let tpl = self.env.get_template(&name).map_err(err)?;
            tpl.render(minijinja::context! { ..extra, ..base.clone() })
                .map_err(err)
        };
        let vars = minijinja::context! { locale => locale, kind => kind.as_str() };
        let subject = one_line(&render(
            format!("{locale}/{kind}.subject.txt"),
            vars.clone(),
        )?);
        let text = tidy_text(&render(format!("{locale}/{kind}.txt"), vars.clone())?);
        let (accent, accent_soft) = accent(kind);
        let html = render(
            format!("{locale}/{kind}.html"),
            minijinja::context! {
                ..vars,
                ..minijinja::context! { subject => &subject, accent => accent, accent_soft => accent_soft }
            },
        )?;
        Ok(Rendered {
            subject,
            text,
            html,
        })
    }
}

/// Renders with the template set this process was configured with (see
/// [`install`]), or the built-ins.
pub fn render(
    kind: MailKind,
    locale: &str,
    ctx: &serde_json::Value,
) -> Result<Rendered, RenderError> {
    active().render(kind, locale, ctx)
}

fn active_slot() -> &'static RwLock<Option<Arc<Templates>>> {
    static ACTIVE: OnceLock<RwLock<Option<Arc<Templates>>>> = OnceLock::new();
    ACTIVE.get_or_init(|| RwLock::new(None))
}

/// Makes `templates` the set [`render`] uses in this process (startup calls
/// this with the configured directory).
pub fn install(templates: Arc<Templates>) {
    if let Ok(mut slot) = active_slot().write() {
        *slot = Some(templates);
    }
}

fn active() -> Arc<Templates> {
    if let Some(t) = active_slot().read().ok().and_then(|s| s.clone()) {
        return t;
    }
    builtin_shared()
}

fn builtin_shared() -> Arc<Templates> {
    static BUILTIN_SET: OnceLock<Arc<Templates>> = OnceLock::new();
    BUILTIN_SET
        .get_or_init(|| Arc::new(Templates::builtin()))
        .clone()
}

/// The template set for a configured directory (`None`: the built-ins),
/// loaded once per process and directory.
pub fn for_dir(dir: Option<&Path>) -> Result<Arc<Templates>, TemplateError> {
    let Some(dir) = dir.filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(builtin_shared());
    };
    static LOADED: OnceLock<Mutex<HashMap<PathBuf, Arc<Templates>>>> = OnceLock::new();
    let loaded = LOADED.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(t) = loaded.lock().ok().and_then(|m| m.get(dir).cloned()) {
        return Ok(t);
    }
    let t = Arc::new(Templates::load(dir)?);
    if let Ok(mut m) = loaded.lock() {
        m.insert(dir.to_path_buf(), t.clone());
    }
    Ok(t)
}

/// The colour of a kind's top edge and badge: green for money received,
/// blue for information, amber for something to do, red for trouble.
fn accent(kind: MailKind) -> (&'static str, &'static str) {
    use MailKind::*;
    match kind {
        OrderConfirmation | Receipt => ("#067647", "#ecfdf3"),
        UpcomingRenewal | InvoiceIssued => ("#1d4ed8", "#eff4ff"),
        RenewalReminder | CardExpiring => ("#b54708", "#fffaeb"),
        PaymentFailed | Expired => ("#b42318", "#fef3f2"),
        Cancelled => ("#475467", "#f2f4f7"),
    }
}

fn environment(dir: Option<PathBuf>) -> Environment<'static> {
    let mut env = Environment::new();
    // Lenient: a field a kind's context lacks renders empty rather than
    // failing the mail; the tests check no template leaves a blank.
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Lenient);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_auto_escape_callback(|name| {
        if name.ends_with(".html") {
            minijinja::AutoEscape::Html
        } else {
            minijinja::AutoEscape::None
        }
    });
    env.set_loader(move |name| {
        if let Some(dir) = &dir {
            if is_safe_name(name) {
                let path = dir.join(name);
                if path.is_file() {
                    return std::fs::read_to_string(&path).map(Some).map_err(|e| {
                        minijinja::Error::new(
                            minijinja::ErrorKind::InvalidOperation,
                            format!("cannot read {}: {e}", path.display()),
                        )
                    });
                }
            }
        }
        Ok(builtin_source(name).map(str::to_string))
    });
    env.add_filter("date", filter_date);
    env.add_filter("month", filter_month);
    env.add_filter("datetime", filter_datetime);
    env.add_filter("days_from_now", filter_days_from_now);
    env.add_filter("money", filter_money);
    env
}

/// A template name is relative and stays inside the directory.
fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.contains('\\')
        && name
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

fn files_under(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(dir) {
                let name = rel.to_string_lossy().replace('\\', "/");
                // Editors' and VCS droppings are not templates.
                if name.ends_with(".txt") || name.ends_with(".html") {
                    out.push(name);
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

fn describe(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// A subject is one header line: control characters (CR, LF, tabs) become
/// spaces and runs of spaces collapse.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Trailing spaces off every line, at most one blank line in a row, one
/// final newline.
fn tidy_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut blank = 0;
    for line in s.trim_matches('\n').lines() {
        let line = line.trim_end();
        if line.is_empty() {
            blank += 1;
            if blank > 1 {
                continue;
            }
        } else {
            blank = 0;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn locale_of(state: &State) -> String {
    state
        .lookup("locale")
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "en".into())
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

fn month_name(m: i8) -> &'static str {
    usize::try_from(m - 1)
        .ok()
        .and_then(|i| MONTHS.get(i))
        .copied()
        .unwrap_or("")
}

/// A local date for the locale: `March 1, 2028`, `2028年3月1日`. A value
/// that is not a date is shown as it is.
pub fn format_date(locale: &str, value: &str) -> String {
    match value.parse::<jiff::civil::Date>() {
        Ok(d) if locale == "ja" => format!("{}年{}月{}日", d.year(), d.month(), d.day()),
        Ok(d) => format!("{} {}, {}", month_name(d.month()), d.day(), d.year()),
        Err(_) => value.to_string(),
    }
}

fn filter_date(state: &State, value: Value) -> String {
    if value.is_undefined() || value.is_none() {
        return String::new();
    }
    format_date(&locale_of(state), &value.to_string())
}

/// A card's `YYYY-MM` expiry month: `December 2027`, `2027年12月`.
fn filter_month(state: &State, value: Value) -> String {
    let s = value.to_string();
    let parsed = s.split_once('-').and_then(|(y, m)| {
        let y: i16 = y.parse().ok()?;
        let m: i8 = m.parse().ok()?;
        (1..=12).contains(&m).then_some((y, m))
    });
    match parsed {
        Some((y, m)) if locale_of(state) == "ja" => format!("{y}年{m}月"),
        Some((y, m)) => format!("{} {y}", month_name(m)),
        None => s,
    }
}

/// An RFC 3339 instant shown in the customer's zone, as a phrase:
/// `at 00:00 on March 1, 2028 (Asia/Tokyo time)`,
/// `2028年3月1日 0:00（Asia/Tokyo 時間）`.
fn filter_datetime(state: &State, value: Value, zone: Option<Value>) -> String {
    let s = value.to_string();
    let Ok(t) = s.parse::<jiff::Timestamp>() else {
        return s;
    };
    let zone_name = zone
        .map(|z| z.to_string())
        .filter(|z| !z.is_empty() && z != "none" && z != "undefined")
        .unwrap_or_else(|| "UTC".into());
    let zone = Zone::parse(&zone_name).ok();
    let tz = zone
        .as_ref()
        .map(|z| z.tz().clone())
        .unwrap_or(jiff::tz::TimeZone::UTC);
    let z = t.to_zoned(tz);
    if locale_of(state) == "ja" {
        format!(
            "{}年{}月{}日 {}:{:02}（{zone_name} 時間）",
            z.year(),
            z.month(),
            z.day(),
            z.hour(),
            z.minute()
        )
    } else {
        format!(
            "at {:02}:{:02} on {} {}, {} ({zone_name} time)",
            z.hour(),
            z.minute(),
            month_name(z.month()),
            z.day(),
            z.year()
        )
    }
}

/// Days left as words: `tomorrow`, `in 7 days`; `明日`, `あと 7 日`.
fn filter_days_from_now(state: &State, value: Value) -> String {
    let n = i64::try_from(value.clone()).unwrap_or(0);
    match (locale_of(state).as_str(), n) {
        ("ja", 0) => "本日".into(),
        ("ja", 1) => "明日".into(),
        ("ja", n) => format!("あと {n} 日"),
        (_, 0) => "today".into(),
        (_, 1) => "tomorrow".into(),
        (_, n) => format!("in {n} days"),
    }
}

/// `{{ amount_minor | money(currency) }}`: an integer amount of the
/// currency's minor unit shown as `¥53,000` or `$475.00`.
fn filter_money(value: Value, currency: String) -> String {
    let minor = i64::try_from(value.clone()).ok();
    match (minor, crate::domain::Currency::parse(&currency)) {
        (Some(m), Ok(c)) => crate::domain::Money::new(m, c).display(),
        _ => value.to_string(),
    }
}

/// A context with every field any built-in template uses, for checking a
/// template set and for the samples in `docs/`.
pub fn sample_context() -> serde_json::Value {
    serde_json::json!({
        "customer_name": "Hanako Yamada",
        "subscription_id": 42,
        "plan_name": "Action Pack (yearly)",
        "seller_name": "Renewd Example K.K.",
        "renew_command": "renewd subscription renew 42 --accept-terms 2026-04 --card <payment method>",
        "period_end_date": "2028-03-01",
        "period_end_at": "2028-02-29T15:00:00Z",
        "timezone": "Asia/Tokyo",
        "currency": "JPY",
        "amount_minor": 58300,
        "new_period_end_date": "2029-03-01",
        "card": "visa •••• 4242",
        "amount": "¥58,300",
        "days_left": 7,
        "card_expiry": "2027-12",
        "decline_reason": "Your card has insufficient funds.",
        "next_retry_date": "2028-03-04",
        "grace_end_date": "2028-03-15",
        "invoice_number": "INV-2028-000042",
        "due_date": "2028-02-15",
        "cancelled_date": "2028-01-10",
        "access_until_date": "2028-03-01",
    })
}

/// Names of the built-in templates, grouped by locale, for documentation.
pub fn builtin_names() -> BTreeMap<&'static str, Vec<&'static str>> {
    let mut out: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, _) in BUILTIN {
        let group = name.split_once('/').map(|(l, _)| l).unwrap_or("");
        out.entry(group).or_default().push(name);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> serde_json::Value {
        sample_context()
    }

    fn render_builtin(kind: MailKind, locale: &str, ctx: &serde_json::Value) -> Rendered {
        Templates::builtin()
            .render(kind, locale, ctx)
            .unwrap_or_else(|e| panic!("{kind} {locale}: {e}"))
    }

    #[test]
    fn every_kind_renders_in_both_languages_with_no_blank_fields() {
        for kind in MailKind::ALL {
            for locale in LOCALES {
                let r = render_builtin(kind, locale, &ctx());
                let all = format!("{}\n{}\n{}", r.subject, r.text, r.html);
                assert!(!r.subject.is_empty(), "{kind} {locale}");
                assert!(r.text.contains("Hanako Yamada"), "{kind} {locale}");
                assert!(r.html.contains("Hanako Yamada"), "{kind} {locale}");
                assert!(r.html.starts_with("<!DOCTYPE html>"), "{kind} {locale}");
                assert!(r.html.contains(&format!("lang=\"{locale}\"")));
                for leftover in ["{{", "{%", "}}", "%}", "undefined", "()", "（）", "[]"] {
                    assert!(
                        !all.contains(leftover),
                        "{kind} {locale} contains {leftover:?}:\n{all}"
                    );
                }
                let words = format!("{} {}", r.subject, r.text);
                assert!(
                    !words.split_whitespace().any(|w| w == "none" || w == "None"),
                    "{kind} {locale} shows a missing value:\n{words}"
                );
                assert!(!r.text.contains("\n\n\n"), "{kind} {locale}");
                if locale == "ja" {
                    assert!(r.text.contains("様"), "{kind} text is not Japanese");
                    assert!(r.html.contains("様"), "{kind} html is not Japanese");
                    assert!(!r.text.contains("Dear"), "{kind} ja has English");
                } else {
                    assert!(r.text.starts_with("Dear"), "{kind} en");
                    assert!(!r.text.contains('様'), "{kind} en has Japanese");
                }
            }
        }
    }

    #[test]
    fn html_escapes_customer_data_and_text_does_not() {
        let mut c = ctx();
        c["customer_name"] = serde_json::json!("Hanako <script>alert(1)</script> & co");
        let r = render_builtin(MailKind::Receipt, "en", &c);
        assert!(r.html.contains("Hanako &lt;script&gt;"), "{}", r.html);
        assert!(!r.html.contains("<script>"));
        assert!(r.text.contains("Hanako <script>alert(1)</script> & co"));
    }

    #[test]
    fn a_subject_is_always_one_line() {
        let mut c = ctx();
        c["plan_name"] = serde_json::json!("Pack\r\nBcc: victim@example.com");
        for kind in MailKind::ALL {
            for locale in LOCALES {
                let r = render_builtin(kind, locale, &c);
                assert!(!r.subject.contains('\n') && !r.subject.contains('\r'));
            }
        }
    }

    #[test]
    fn the_reminder_says_when_it_ends_and_how_to_renew() {
        let r = render_builtin(MailKind::RenewalReminder, "en", &ctx());
        assert_eq!(
            r.subject,
            "Your Action Pack (yearly) subscription ends on March 1, 2028"
        );
        assert!(
            r.text
                .contains("at 00:00 on March 1, 2028 (Asia/Tokyo time), in 7 days"),
            "{}",
            r.text
        );
        assert!(r.text.contains("renewd subscription renew 42"));
        assert!(r.html.contains("renewd subscription renew 42"));
        let ja = render_builtin(MailKind::RenewalReminder, "ja", &ctx());
        assert!(ja.subject.contains("2028年3月1日"), "{}", ja.subject);
        assert!(
            ja.text
                .contains("2028年3月1日 0:00（Asia/Tokyo 時間）に終了します（あと 7 日）"),
            "{}",
            ja.text
        );
        assert!(ja.text.contains("renewd subscription renew 42"));
    }

    #[test]
    fn amounts_keep_the_currency_format_in_both_languages() {
        let mut c = ctx();
        for locale in LOCALES {
            let r = render_builtin(MailKind::Receipt, locale, &c);
            assert!(r.text.contains("¥58,300"), "{locale}");
        }
        c["amount"] = serde_json::json!("$475.00");
        let r = render_builtin(MailKind::UpcomingRenewal, "en", &c);
        assert!(r.text.contains("$475.00") && r.html.contains("$475.00"));
    }

    #[test]
    fn the_money_filter_formats_minor_units_for_the_currency() {
        let env = environment(None);
        let out = env
            .render_str(
                "{{ a | money('JPY') }} {{ b | money('USD') }}",
                minijinja::context! { a => 53000, b => 47500 },
            )
            .unwrap();
        assert_eq!(out, "¥53,000 $475.00");
    }

    #[test]
    fn dates_are_written_for_the_locale() {
        assert_eq!(format_date("en", "2028-03-01"), "March 1, 2028");
        assert_eq!(format_date("ja", "2028-03-01"), "2028年3月1日");
        assert_eq!(format_date("en", "soon"), "soon");
    }

    #[test]
    fn a_payment_failure_without_a_retry_says_so() {
        let mut c = ctx();
        c["next_retry_date"] = serde_json::Value::Null;
        let r = render_builtin(MailKind::PaymentFailed, "en", &c);
        assert!(r.text.contains("We will not try this card again"));
        let r = render_builtin(MailKind::PaymentFailed, "ja", &c);
        assert!(r.text.contains("再請求は行いません"));
    }

    #[test]
    fn an_unknown_locale_falls_back_to_english() {
        let r = render_builtin(MailKind::Expired, "fr", &ctx());
        assert!(r.text.starts_with("Dear"));
    }

    #[test]
    fn an_override_directory_replaces_only_the_files_it_has() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("en")).unwrap();
        std::fs::write(
            dir.path().join("en/receipt.subject.txt"),
            "Thanks, {{ customer_name }}: {{ invoice_number }}\n",
        )
        .unwrap();
        let t = Templates::load(dir.path()).unwrap();
        let r = t.render(MailKind::Receipt, "en", &ctx()).unwrap();
        assert_eq!(r.subject, "Thanks, Hanako Yamada: INV-2028-000042");
        assert!(r.text.starts_with("Dear Hanako Yamada"));
        let ja = t.render(MailKind::Receipt, "ja", &ctx()).unwrap();
        assert!(ja.subject.contains("領収書"));
    }

    #[test]
    fn a_broken_or_misnamed_override_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("en")).unwrap();
        std::fs::write(dir.path().join("en/reciept.txt"), "x").unwrap();
        let err = Templates::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("en/reciept.txt"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("ja")).unwrap();
        std::fs::write(dir.path().join("ja/expired.txt"), "{% if %}").unwrap();
        let err = Templates::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("ja/expired"), "{err}");

        let err = Templates::load(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a directory"), "{err}");
    }

    #[test]
    fn template_names_cannot_leave_the_directory() {
        assert!(is_safe_name("en/receipt.txt"));
        assert!(!is_safe_name("../etc/passwd"));
        assert!(!is_safe_name("/etc/passwd"));
        assert!(!is_safe_name("en/../../x"));
    }
}
