//! Invoice calculation: lines, tax by rate, totals.
//!
//! Prices are tax-exclusive. Tax is computed once per rate over the sum of
//! the lines at that rate (as Japan's qualified-invoice rules require) and
//! rounded half up to the currency's minor unit: `(taxable * bp + 5000) /
//! 10000` in integers. Rates are basis points (1000 = 10%).

use serde::{Deserialize, Serialize};

use super::money::{Currency, Money, MoneyError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineInput {
    pub description: String,
    pub quantity: u32,
    pub unit_amount_minor: i64,
    pub tax_rate_bp: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub number: u32,
    pub description: String,
    pub quantity: u32,
    pub unit_amount_minor: i64,
    pub amount_minor: i64,
    pub tax_rate_bp: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaxSummary {
    pub rate_bp: u32,
    pub taxable_minor: i64,
    pub tax_minor: i64,
}

/// The computed content of an invoice, before it has a number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceAmounts {
    pub currency: String,
    pub lines: Vec<Line>,
    pub taxes: Vec<TaxSummary>,
    pub subtotal_minor: i64,
    pub tax_minor: i64,
    pub total_minor: i64,
}

impl InvoiceAmounts {
    pub fn total(&self) -> Result<Money, MoneyError> {
        Ok(Money::new(
            self.total_minor,
            Currency::parse(&self.currency)?,
        ))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvoiceError {
    #[error("an invoice needs at least one line")]
    NoLines,
    #[error("line {0} has a negative amount; use a credit note instead")]
    NegativeLine(u32),
    #[error("amount overflow on invoice")]
    Overflow,
}

impl From<MoneyError> for InvoiceError {
    fn from(_: MoneyError) -> Self {
        InvoiceError::Overflow
    }
}

/// Tax on `taxable` at `rate_bp`, rounded half up.
pub fn tax_at(taxable: i64, rate_bp: u32) -> Result<i64, InvoiceError> {
    let product = i128::from(taxable) * i128::from(rate_bp) + 5_000;
    i64::try_from(product / 10_000).map_err(|_| InvoiceError::Overflow)
}

pub fn calculate(currency: Currency, inputs: &[LineInput]) -> Result<InvoiceAmounts, InvoiceError> {
    if inputs.is_empty() {
        return Err(InvoiceError::NoLines);
    }
    let mut lines = Vec::with_capacity(inputs.len());
    let mut taxes: Vec<TaxSummary> = Vec::new();
    let mut subtotal = Money::zero(currency);
    for (i, input) in inputs.iter().enumerate() {
        let number = u32::try_from(i + 1).map_err(|_| InvoiceError::Overflow)?;
        if input.unit_amount_minor < 0 {
            return Err(InvoiceError::NegativeLine(number));
        }
        let amount =
            Money::new(input.unit_amount_minor, currency).checked_mul(i64::from(input.quantity))?;
        subtotal = subtotal.checked_add(amount)?;
        match taxes.iter_mut().find(|t| t.rate_bp == input.tax_rate_bp) {
            Some(t) => {
                t.taxable_minor = t
                    .taxable_minor
                    .checked_add(amount.amount_minor)
                    .ok_or(InvoiceError::Overflow)?
            }
            None => taxes.push(TaxSummary {
                rate_bp: input.tax_rate_bp,
                taxable_minor: amount.amount_minor,
                tax_minor: 0,
            }),
        }
        lines.push(Line {
            number,
            description: input.description.clone(),
            quantity: input.quantity,
            unit_amount_minor: input.unit_amount_minor,
            amount_minor: amount.amount_minor,
            tax_rate_bp: input.tax_rate_bp,
        });
    }
    let mut tax_total = 0i64;
    for t in &mut taxes {
        t.tax_minor = tax_at(t.taxable_minor, t.rate_bp)?;
        tax_total = tax_total
            .checked_add(t.tax_minor)
            .ok_or(InvoiceError::Overflow)?;
    }
    taxes.sort_by_key(|t| std::cmp::Reverse(t.rate_bp));
    let total = subtotal
        .amount_minor
        .checked_add(tax_total)
        .ok_or(InvoiceError::Overflow)?;
    Ok(InvoiceAmounts {
        currency: currency.code().to_string(),
        lines,
        taxes,
        subtotal_minor: subtotal.amount_minor,
        tax_minor: tax_total,
        total_minor: total,
    })
}

/// `1000` basis points as `10%`, `825` as `8.25%`.
pub fn format_rate(bp: u32) -> String {
    let whole = bp / 100;
    let frac = bp % 100;
    if frac == 0 {
        format!("{whole}%")
    } else if frac.is_multiple_of(10) {
        format!("{whole}.{}%", frac / 10)
    } else {
        format!("{whole}.{frac:02}%")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn line(amount: i64, bp: u32) -> LineInput {
        LineInput {
            description: "Action Pack".into(),
            quantity: 1,
            unit_amount_minor: amount,
            tax_rate_bp: bp,
        }
    }

    #[test]
    fn jpy_invoice_with_ten_percent_tax() {
        let a = calculate(Currency::parse("JPY").unwrap(), &[line(53_000, 1000)]).unwrap();
        assert_eq!(
            (a.subtotal_minor, a.tax_minor, a.total_minor),
            (53_000, 5_300, 58_300)
        );
    }

    #[test]
    fn tax_is_rounded_half_up_once_per_rate() {
        // Two lines of 5 at 10%: per-line rounding would give 1 + 1 = 2,
        // per-rate rounding gives round(1.0) = 1.
        let a = calculate(
            Currency::parse("JPY").unwrap(),
            &[line(5, 1000), line(5, 1000)],
        )
        .unwrap();
        assert_eq!(a.tax_minor, 1);
        assert_eq!(tax_at(15, 1000).unwrap(), 2); // 1.5 rounds up
        assert_eq!(tax_at(14, 1000).unwrap(), 1); // 1.4 rounds down
    }

    #[test]
    fn several_rates_are_summarised_separately() {
        let a = calculate(
            Currency::parse("JPY").unwrap(),
            &[line(1000, 800), line(1000, 1000)],
        )
        .unwrap();
        assert_eq!(a.taxes.len(), 2);
        assert_eq!(a.taxes[0].rate_bp, 1000);
        assert_eq!(a.tax_minor, 180);
    }

    #[test]
    fn negative_lines_and_empty_invoices_are_refused() {
        let jpy = Currency::parse("JPY").unwrap();
        assert_eq!(calculate(jpy, &[]), Err(InvoiceError::NoLines));
        assert_eq!(
            calculate(jpy, &[line(-1, 0)]),
            Err(InvoiceError::NegativeLine(1))
        );
    }

    #[test]
    fn rates_read_as_percentages() {
        assert_eq!(format_rate(1000), "10%");
        assert_eq!(format_rate(825), "8.25%");
        assert_eq!(format_rate(750), "7.5%");
        assert_eq!(format_rate(0), "0%");
    }

    proptest! {
        #[test]
        fn total_is_subtotal_plus_tax(amounts in prop::collection::vec((0i64..10_000_000, 0u32..2500), 1..8)) {
            let inputs: Vec<LineInput> = amounts.iter().map(|&(a, bp)| line(a, bp)).collect();
            let a = calculate(Currency::parse("USD").unwrap(), &inputs).unwrap();
            prop_assert_eq!(a.subtotal_minor, amounts.iter().map(|(a, _)| a).sum::<i64>());
            prop_assert_eq!(a.total_minor, a.subtotal_minor + a.tax_minor);
            prop_assert_eq!(a.tax_minor, a.taxes.iter().map(|t| t.tax_minor).sum::<i64>());
        }
    }
}
