//! Which notice is due at `now`.
//!
//! Offsets are whole days before the period end, counted on the customer's
//! local calendar (so a reminder arrives at the same local time of day as
//! the period end, across DST changes). After downtime only the latest
//! offset that is still due is chosen: a subscription 5 days from its end
//! gets the 7-day reminder, never the 30-day one as a stale backlog.

use jiff::tz::TimeZone;
use jiff::{Span, Timestamp};

/// The instant `days` local days before `period_end`.
pub fn days_before(period_end: Timestamp, days: u32, tz: &TimeZone) -> Timestamp {
    let local = period_end.to_zoned(tz.clone());
    local
        .checked_sub(Span::new().days(i64::from(days)))
        .map(|z| z.timestamp())
        .unwrap_or(period_end)
}

/// The reminder offset (in days) due at `now`, if any: the smallest offset
/// whose send time has passed, while the period has not yet ended.
pub fn due_reminder(
    period_end: Timestamp,
    offsets_days: &[u32],
    now: Timestamp,
    tz: &TimeZone,
) -> Option<u32> {
    if now >= period_end {
        return None;
    }
    offsets_days
        .iter()
        .copied()
        .filter(|&d| days_before(period_end, d, tz) <= now)
        .min()
}

/// Whether a one-off notice `days` before the period end is due at `now`.
pub fn notice_due(period_end: Timestamp, days: u32, now: Timestamp, tz: &TimeZone) -> bool {
    now < period_end && days_before(period_end, days, tz) <= now
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    const OFFSETS: [u32; 3] = [30, 7, 1];

    #[test]
    fn nothing_is_due_before_the_first_offset() {
        let end = t("2027-04-01T00:00:00Z");
        assert_eq!(
            due_reminder(end, &OFFSETS, t("2027-03-01T23:59:59Z"), &TimeZone::UTC),
            None
        );
    }

    #[test]
    fn each_offset_is_due_from_its_day() {
        let end = t("2027-04-01T00:00:00Z");
        let utc = TimeZone::UTC;
        assert_eq!(
            due_reminder(end, &OFFSETS, t("2027-03-02T00:00:00Z"), &utc),
            Some(30)
        );
        assert_eq!(
            due_reminder(end, &OFFSETS, t("2027-03-25T00:00:00Z"), &utc),
            Some(7)
        );
        assert_eq!(
            due_reminder(end, &OFFSETS, t("2027-03-31T00:00:00Z"), &utc),
            Some(1)
        );
    }

    #[test]
    fn after_downtime_only_the_latest_due_reminder_is_chosen() {
        let end = t("2027-04-01T00:00:00Z");
        assert_eq!(
            due_reminder(end, &OFFSETS, t("2027-03-30T12:00:00Z"), &TimeZone::UTC),
            Some(7)
        );
    }

    #[test]
    fn nothing_is_due_once_the_period_has_ended() {
        let end = t("2027-04-01T00:00:00Z");
        assert_eq!(due_reminder(end, &OFFSETS, end, &TimeZone::UTC), None);
        assert!(!notice_due(end, 30, end, &TimeZone::UTC));
    }

    #[test]
    fn offsets_count_local_days_across_a_dst_change() {
        // New York springs forward on 2027-03-14: 7 local days before
        // 2027-03-20 00:00 EDT is 2027-03-13 00:00 EST, 7*24h + 1h earlier.
        let ny = TimeZone::get("America/New_York").unwrap();
        let end = t("2027-03-20T04:00:00Z");
        assert_eq!(days_before(end, 7, &ny), t("2027-03-13T05:00:00Z"));
    }
}
