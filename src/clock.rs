//! The one place that reads the system time.
//!
//! Everything that needs "now" gets it from a [`Clock`] passed in, so tests
//! (and the CLI's `--now`) can fix or move time. Nothing outside this module
//! may call `Timestamp::now()`.

use std::sync::{Arc, Mutex, PoisonError};

use jiff::{SignedDuration, Timestamp};

/// A source of the current instant.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Timestamp;
}

/// The clock shared by every component of one process.
pub type SharedClock = Arc<dyn Clock>;

/// The real wall clock, truncated to whole seconds: every instant renewd
/// stores is whole seconds, so comparing a stored instant with `now` never
/// depends on sub-second noise.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        truncate(Timestamp::now())
    }
}

/// A clock that only moves when told to: tests set and advance it, and the
/// CLI fixes it with `--now` for one process.
#[derive(Debug)]
pub struct MockClock {
    now: Mutex<Timestamp>,
}

impl MockClock {
    pub fn new(start: Timestamp) -> Self {
        Self {
            now: Mutex::new(truncate(start)),
        }
    }

    pub fn set(&self, t: Timestamp) {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner) = truncate(t);
    }

    /// Moves the clock by `by` (negative moves it back).
    pub fn advance(&self, by: SignedDuration) {
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        *now = truncate(now.saturating_add(by).unwrap_or(*now));
    }
}

impl Clock for MockClock {
    fn now(&self) -> Timestamp {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn truncate(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mock_clock_moves_only_when_advanced() {
        let start: Timestamp = "2027-01-01T00:00:00Z".parse().unwrap();
        let clock = MockClock::new(start);
        assert_eq!(clock.now(), start);
        clock.advance(SignedDuration::from_hours(24));
        assert_eq!(clock.now().to_string(), "2027-01-02T00:00:00Z");
        clock.set(start);
        assert_eq!(clock.now(), start);
    }

    #[test]
    fn instants_are_whole_seconds() {
        let clock = MockClock::new("2027-01-01T00:00:00.750Z".parse().unwrap());
        assert_eq!(clock.now().subsec_nanosecond(), 0);
    }
}
