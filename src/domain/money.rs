//! Money: an integer amount of a currency's minor unit plus its ISO 4217 code.
//!
//! No floating point ever touches an amount. JPY has no minor unit, so
//! ¥53,000 is `53000`; USD has two, so $475.00 is `47500`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// ISO 4217 currencies renewd knows, with their minor-unit exponent.
/// A currency not listed here is refused rather than guessed.
const CURRENCIES: &[(&str, u8, &str)] = &[
    ("AUD", 2, "A$"),
    ("BHD", 3, "BHD "),
    ("BRL", 2, "R$"),
    ("CAD", 2, "CA$"),
    ("CHF", 2, "CHF "),
    ("CNY", 2, "CN¥"),
    ("DKK", 2, "DKK "),
    ("EUR", 2, "€"),
    ("GBP", 2, "£"),
    ("HKD", 2, "HK$"),
    ("INR", 2, "₹"),
    ("JOD", 3, "JOD "),
    ("JPY", 0, "¥"),
    ("KRW", 0, "₩"),
    ("KWD", 3, "KWD "),
    ("MXN", 2, "MX$"),
    ("NOK", 2, "NOK "),
    ("NZD", 2, "NZ$"),
    ("SEK", 2, "SEK "),
    ("SGD", 2, "SGD "),
    ("TWD", 2, "NT$"),
    ("USD", 2, "$"),
    ("VND", 0, "₫"),
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("{0:?} is not an ISO 4217 currency code renewd supports (for example JPY, USD, EUR)")]
    UnknownCurrency(String),
    #[error("amount overflow")]
    Overflow,
    #[error("cannot combine {0} and {1}")]
    CurrencyMismatch(Currency, Currency),
}

/// An ISO 4217 currency code from the table above.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency(&'static str);

impl Currency {
    pub fn parse(code: &str) -> Result<Self, MoneyError> {
        let upper = code.trim().to_ascii_uppercase();
        CURRENCIES
            .iter()
            .find(|(c, _, _)| *c == upper)
            .map(|(c, _, _)| Currency(c))
            .ok_or_else(|| MoneyError::UnknownCurrency(code.to_string()))
    }

    pub fn code(self) -> &'static str {
        self.0
    }

    /// Digits after the decimal point: 0 for JPY, 2 for USD, 3 for KWD.
    pub fn exponent(self) -> u8 {
        self.entry().1
    }

    fn symbol(self) -> &'static str {
        self.entry().2
    }

    fn entry(self) -> &'static (&'static str, u8, &'static str) {
        // A Currency can only be built from the table, so the lookup holds.
        CURRENCIES
            .iter()
            .find(|(c, _, _)| *c == self.0)
            .unwrap_or(&("XXX", 2, ""))
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0)
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Currency::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An amount in a currency's minor unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Money {
    pub amount_minor: i64,
    pub currency: Currency,
}

impl Money {
    pub fn new(amount_minor: i64, currency: Currency) -> Self {
        Self {
            amount_minor,
            currency,
        }
    }

    pub fn zero(currency: Currency) -> Self {
        Self::new(0, currency)
    }

    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        if self.currency != other.currency {
            return Err(MoneyError::CurrencyMismatch(self.currency, other.currency));
        }
        self.amount_minor
            .checked_add(other.amount_minor)
            .map(|a| Money::new(a, self.currency))
            .ok_or(MoneyError::Overflow)
    }

    pub fn checked_mul(self, factor: i64) -> Result<Money, MoneyError> {
        self.amount_minor
            .checked_mul(factor)
            .map(|a| Money::new(a, self.currency))
            .ok_or(MoneyError::Overflow)
    }

    /// The amount for people: `¥53,000`, `$475.00`, `-€1.50`.
    pub fn display(&self) -> String {
        let exp = u32::from(self.currency.exponent());
        let abs = self.amount_minor.unsigned_abs();
        let unit = 10u64.pow(exp);
        let major = group_thousands(abs / unit);
        let sign = if self.amount_minor < 0 { "-" } else { "" };
        let symbol = self.currency.symbol();
        if exp == 0 {
            format!("{sign}{symbol}{major}")
        } else {
            let minor = abs % unit;
            format!(
                "{sign}{symbol}{major}.{minor:0width$}",
                width = exp as usize
            )
        }
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn jpy() -> Currency {
        Currency::parse("JPY").unwrap()
    }
    fn usd() -> Currency {
        Currency::parse("usd").unwrap()
    }

    #[test]
    fn jpy_has_no_minor_unit_and_usd_has_two() {
        assert_eq!(Money::new(53_000, jpy()).display(), "¥53,000");
        assert_eq!(Money::new(47_500, usd()).display(), "$475.00");
        assert_eq!(Money::new(5, usd()).display(), "$0.05");
        assert_eq!(Money::new(-150, usd()).display(), "-$1.50");
        assert_eq!(Money::new(1_234_567_891, jpy()).display(), "¥1,234,567,891");
    }

    #[test]
    fn unknown_currencies_are_refused() {
        assert!(matches!(
            Currency::parse("XYZ"),
            Err(MoneyError::UnknownCurrency(_))
        ));
        assert!(Currency::parse("").is_err());
    }

    #[test]
    fn adding_different_currencies_is_an_error() {
        let r = Money::new(1, jpy()).checked_add(Money::new(1, usd()));
        assert!(matches!(r, Err(MoneyError::CurrencyMismatch(_, _))));
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        let r = Money::new(i64::MAX, jpy()).checked_add(Money::new(1, jpy()));
        assert_eq!(r, Err(MoneyError::Overflow));
    }

    proptest! {
        #[test]
        fn addition_is_exact_and_commutative(a in -1_000_000_000_000i64..1_000_000_000_000, b in -1_000_000_000_000i64..1_000_000_000_000) {
            let x = Money::new(a, usd());
            let y = Money::new(b, usd());
            prop_assert_eq!(x.checked_add(y).unwrap().amount_minor, a + b);
            prop_assert_eq!(x.checked_add(y), y.checked_add(x));
        }

        #[test]
        fn display_round_trips_the_digits(a in 0i64..10_000_000_000) {
            let shown = Money::new(a, usd()).display();
            let digits: String = shown.chars().filter(|c| c.is_ascii_digit()).collect();
            prop_assert_eq!(digits.parse::<i64>().unwrap(), a);
        }
    }
}
