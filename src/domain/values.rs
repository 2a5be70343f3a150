//! Validated values: once parsed, they cannot be invalid.
//!
//! Every input from the CLI or the config passes through one of these at
//! the edge, so the engine and the store never see a malformed email
//! address, an unknown time zone or a card number where a token belongs.

use std::fmt;

use jiff::civil::Date;
use jiff::tz::TimeZone;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("invalid email address {0:?}: expected one address like name@example.com")]
    Email(String),
    #[error("unknown time zone {0:?}: use an IANA name such as Asia/Tokyo or Europe/Paris")]
    TimeZone(String),
    #[error("unknown locale {0:?}: use en or ja")]
    Locale(String),
    #[error("invalid country {0:?}: use an ISO 3166-1 alpha-2 code such as JP or US")]
    Country(String),
    #[error("invalid name: {0}")]
    Name(&'static str),
    #[error("invalid card token {0:?}: expected a payment method token such as pm_card_visa, never a card number")]
    CardToken(String),
    #[error("invalid card expiry {0:?}: expected YYYY-MM, for example 2029-04")]
    CardExpiry(String),
    #[error("invalid phone number {0:?}: expected digits with an optional leading +, spaces or dashes, 7 to 15 digits")]
    Phone(String),
}

/// An email address that is safe to put in a mail header: one address,
/// no display name, no whitespace, no control characters, no separators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct EmailAddress(String);

impl EmailAddress {
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        let err = || ValueError::Email(s.to_string());
        let s2 = s.trim();
        if s2.len() > 254 || s2.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err());
        }
        if s2.contains(['<', '>', ',', ';', '"', '(', ')', '[', ']', '\\']) {
            return Err(err());
        }
        let (local, domain) = s2.split_once('@').ok_or_else(err)?;
        if local.is_empty() || local.len() > 64 || domain.contains('@') {
            return Err(err());
        }
        let labels: Vec<&str> = domain.split('.').collect();
        if labels.len() < 2
            || labels.iter().any(|l| {
                l.is_empty()
                    || l.len() > 63
                    || l.starts_with('-')
                    || l.ends_with('-')
                    || !l.chars().all(|c| c.is_alphanumeric() || c == '-')
            })
        {
            return Err(err());
        }
        if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
            return Err(err());
        }
        Ok(EmailAddress(s2.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The address as logs may show it: `j***@example.com`.
    pub fn masked(&self) -> String {
        mask_email(&self.0)
    }
}

/// Masks any stored address for logs: first character of the local part,
/// then `***`, then the domain.
pub fn mask_email(address: &str) -> String {
    match address.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".to_string(),
    }
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An IANA time zone name that the time-zone database knows.
#[derive(Debug, Clone)]
pub struct Zone {
    name: String,
    tz: TimeZone,
}

impl Zone {
    pub fn parse(name: &str) -> Result<Self, ValueError> {
        let name = name.trim();
        if name.is_empty() {
            return Err(ValueError::TimeZone(name.to_string()));
        }
        let tz = TimeZone::get(name).map_err(|_| ValueError::TimeZone(name.to_string()))?;
        Ok(Zone {
            name: name.to_string(),
            tz,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn tz(&self) -> &TimeZone {
        &self.tz
    }
}

impl PartialEq for Zone {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Locale {
    En,
    Ja,
}

impl Locale {
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "en" => Ok(Locale::En),
            "ja" => Ok(Locale::Ja),
            _ => Err(ValueError::Locale(s.to_string())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Locale::En => "en",
            Locale::Ja => "ja",
        }
    }
}

/// An ISO 3166-1 alpha-2 country code (shape only: two ASCII letters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Country(String);

impl Country {
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        let up = s.trim().to_ascii_uppercase();
        if up.len() == 2 && up.chars().all(|c| c.is_ascii_uppercase()) {
            Ok(Country(up))
        } else {
            Err(ValueError::Country(s.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A person's or company's name: not blank, no control characters, at most
/// 200 characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Name(String);

impl Name {
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        let t = s.trim();
        if t.is_empty() {
            return Err(ValueError::Name("it is empty"));
        }
        if t.chars().count() > 200 {
            return Err(ValueError::Name("it is longer than 200 characters"));
        }
        if t.chars().any(char::is_control) {
            return Err(ValueError::Name("it contains control characters"));
        }
        Ok(Name(t.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A stored payment method token (`pm_...`). renewd never sees card numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct CardToken(String);

impl CardToken {
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        let t = s.trim();
        let ok = t.starts_with("pm_")
            && t.len() > 3
            && t.len() <= 255
            && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if ok {
            Ok(CardToken(t.to_string()))
        } else {
            Err(ValueError::CardToken(mask_secretish(t)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A mistyped token might be a card number: never echo digits back whole.
fn mask_secretish(s: &str) -> String {
    let digits = s.chars().filter(|c| c.is_ascii_digit()).count();
    if digits >= 8 {
        "<redacted: looks like a card number>".to_string()
    } else {
        s.chars().take(40).collect()
    }
}

/// A card's expiry month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CardExpiry {
    pub year: i16,
    pub month: i8,
}

impl CardExpiry {
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        let err = || ValueError::CardExpiry(s.to_string());
        let (y, m) = s.trim().split_once('-').ok_or_else(err)?;
        let year: i16 = y.parse().map_err(|_| err())?;
        let month: i8 = m.parse().map_err(|_| err())?;
        if y.len() != 4 || !(1..=12).contains(&month) || !(2000..=2200).contains(&year) {
            return Err(err());
        }
        Ok(CardExpiry { year, month })
    }

    /// The card works through the last day of its expiry month.
    pub fn last_valid_day(self) -> Date {
        Date::new(self.year, self.month, 1)
            .map(|d| d.last_of_month())
            .unwrap_or(Date::MAX)
    }
}

impl fmt::Display for CardExpiry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// A contact phone number: digits with an optional leading `+` and
/// spaces, dashes or dots between groups; 7 to 15 digits (E.164's limit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Phone(String);

impl Phone {
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        let t = s.trim();
        let body = t.strip_prefix('+').unwrap_or(t);
        let digits = body.chars().filter(char::is_ascii_digit).count();
        let shape_ok = body
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, ' ' | '-' | '.' | '(' | ')'));
        if shape_ok
            && (7..=15).contains(&digits)
            && body.starts_with(|c: char| c.is_ascii_digit() || c == '(')
        {
            Ok(Phone(t.to_string()))
        } else {
            Err(ValueError::Phone(t.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_emails_parse() {
        for ok in [
            "a@example.com",
            "first.last+tag@mail.example.co.jp",
            "x@日本.jp",
        ] {
            assert!(EmailAddress::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn emails_that_could_inject_headers_are_refused() {
        for bad in [
            "",
            "no-at-sign",
            "a@b",
            "a@@b.com",
            "a@b.com\r\nBcc: x@y.com",
            "Name <a@b.com>",
            "a@b.com, c@d.com",
            "a b@c.com",
            ".a@b.com",
            "a@-b.com",
        ] {
            assert!(EmailAddress::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn masked_email_hides_the_local_part() {
        let e = EmailAddress::parse("hanako@example.jp").unwrap();
        assert_eq!(e.masked(), "h***@example.jp");
    }

    #[test]
    fn zones_must_exist() {
        assert!(Zone::parse("Asia/Tokyo").is_ok());
        assert!(Zone::parse("Mars/Olympus").is_err());
        assert!(Zone::parse("").is_err());
    }

    #[test]
    fn card_tokens_are_not_card_numbers() {
        assert!(CardToken::parse("pm_card_visa").is_ok());
        let err = CardToken::parse("4242424242424242")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("4242424242424242"), "{err}");
    }

    #[test]
    fn card_expiry_is_year_dash_month() {
        let e = CardExpiry::parse("2028-02").unwrap();
        assert_eq!(e.last_valid_day(), jiff::civil::date(2028, 2, 29));
        assert!(CardExpiry::parse("2028-13").is_err());
        assert!(CardExpiry::parse("28-02").is_err());
    }

    #[test]
    fn phones_are_digits_with_separators() {
        assert!(Phone::parse("+81 3-1234-5678").is_ok());
        assert!(Phone::parse("(03) 1234 5678").is_ok());
        assert!(Phone::parse("12345").is_err());
        assert!(Phone::parse("call me").is_err());
        assert!(Phone::parse("+81 3 1234\n5678").is_err());
    }
}
