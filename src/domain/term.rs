//! Term arithmetic: when each yearly period of a subscription ends.
//!
//! Period n ends on `anchor + n years` at the configured local time in the
//! customer's time zone. Every end is computed from the anchor, never by
//! adding a year to the previous end, so a 29 February anchor renews on
//! 28 February in common years and on 29 February again in leap years
//! (jiff clamps the day when the month is too short).
//!
//! A local time that falls in a DST gap or overlap resolves to exactly one
//! instant with jiff's "compatible" rule: in a gap the clock reading after
//! the gap, in an overlap the earlier of the two instants.

use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;
use jiff::{Span, Timestamp};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TermError {
    #[error("period {0} of anchor {1} is outside the supported calendar")]
    OutOfRange(i64, Date),
}

/// The anchor date of a purchase made at `at` by a customer in `tz`.
pub fn anchor_date(at: Timestamp, tz: &TimeZone) -> Date {
    at.to_zoned(tz.clone()).date()
}

/// The calendar date on which period `n` (1-based) ends.
pub fn anniversary(anchor: Date, n: i64) -> Result<Date, TermError> {
    anchor
        .checked_add(Span::new().years(n))
        .map_err(|_| TermError::OutOfRange(n, anchor))
}

/// The instant at which period `n` (1-based) ends.
pub fn period_end(anchor: Date, n: i64, tz: &TimeZone, at: Time) -> Result<Timestamp, TermError> {
    let date = anniversary(anchor, n)?;
    date.to_datetime(at)
        .to_zoned(tz.clone())
        .map(|z| z.timestamp())
        .map_err(|_| TermError::OutOfRange(n, anchor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;
    use proptest::prelude::*;

    fn midnight() -> Time {
        Time::midnight()
    }

    #[test]
    fn leap_day_anchor_renews_on_28_february_until_the_next_leap_year() {
        let anchor = date(2028, 2, 29);
        let ends: Vec<Date> = (1..=4).map(|n| anniversary(anchor, n).unwrap()).collect();
        assert_eq!(
            ends,
            vec![
                date(2029, 2, 28),
                date(2030, 2, 28),
                date(2031, 2, 28),
                date(2032, 2, 29)
            ]
        );
    }

    #[test]
    fn period_end_is_local_midnight_in_the_customer_zone() {
        let tokyo = TimeZone::get("Asia/Tokyo").unwrap();
        let end = period_end(date(2027, 3, 1), 1, &tokyo, midnight()).unwrap();
        assert_eq!(end.to_string(), "2028-02-29T15:00:00Z");
    }

    #[test]
    fn a_local_time_in_a_dst_gap_resolves_to_one_instant_after_the_gap() {
        // 2027-03-14 02:30 does not exist in New York (clocks jump 02:00 -> 03:00).
        let ny = TimeZone::get("America/New_York").unwrap();
        let end = period_end(date(2026, 3, 14), 1, &ny, Time::new(2, 30, 0, 0).unwrap()).unwrap();
        assert_eq!(end.to_string(), "2027-03-14T07:30:00Z");
        assert_eq!(
            end,
            period_end(date(2026, 3, 14), 1, &ny, Time::new(2, 30, 0, 0).unwrap()).unwrap()
        );
    }

    #[test]
    fn a_local_time_in_a_dst_overlap_resolves_to_the_earlier_instant() {
        // 2027-11-07 01:30 happens twice in New York; the first is EDT (UTC-4).
        let ny = TimeZone::get("America/New_York").unwrap();
        let end = period_end(date(2026, 11, 7), 1, &ny, Time::new(1, 30, 0, 0).unwrap()).unwrap();
        assert_eq!(end.to_string(), "2027-11-07T05:30:00Z");
    }

    fn zones() -> Vec<String> {
        let mut all: Vec<String> = jiff::tz::db()
            .available()
            .map(|n| n.to_string())
            .filter(|n| !n.starts_with("Etc/") && n.contains('/'))
            .collect();
        all.sort();
        all
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Every end comes from the anchor: same month, the anchor's day
        /// clamped to the month's length, strictly increasing, no drift.
        #[test]
        fn every_anniversary_is_the_anchor_plus_n_years_clamped(
            year in 1970i16..2200,
            month in 1i8..=12,
            day in 1i8..=31,
            zone_index in any::<prop::sample::Index>(),
            hour in 0i8..24,
            minute in 0i8..60,
        ) {
            let zones = zones();
            let tz = TimeZone::get(zones[zone_index.index(zones.len())].as_str()).unwrap();
            let anchor = match Date::new(year, month, day) {
                Ok(d) => d,
                Err(_) => Date::new(year, month, 1).unwrap().last_of_month(),
            };
            let at = Time::new(hour, minute, 0, 0).unwrap();
            let mut previous = period_end(anchor, 0, &tz, at).unwrap();
            for n in 1..=30i64 {
                let d = anniversary(anchor, n).unwrap();
                prop_assert_eq!(d.month(), anchor.month());
                prop_assert_eq!(i64::from(d.year()), i64::from(anchor.year()) + n);
                prop_assert_eq!(d.day(), anchor.day().min(d.days_in_month()));
                let end = period_end(anchor, n, &tz, at).unwrap();
                prop_assert!(end > previous, "period {} does not end after period {}", n, n - 1);
                // The end instant reads as the anniversary date in the customer's zone
                // (a DST gap may move the clock reading, never the date, at these hours
                // except in zones that skip whole days, which the filter keeps rare).
                let local = end.to_zoned(tz.clone());
                prop_assert!(local.date() == d || local.date() == d.tomorrow().unwrap());
                previous = end;
            }
        }

        #[test]
        fn a_29_february_anchor_lands_on_29_february_exactly_in_leap_years(n in 1i64..400) {
            let anchor = date(2028, 2, 29);
            let d = anniversary(anchor, n).unwrap();
            let leap = d.in_leap_year();
            prop_assert_eq!(d.day(), if leap { 29 } else { 28 });
        }
    }
}
