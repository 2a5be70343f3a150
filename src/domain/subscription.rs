//! The subscription state machine and the auto-renewal switch.
//!
//! ```text
//! pending_payment --paid--> active --renewed--> active
//!        |                    |  \--payment failed--> past_due --paid--> active
//!        |                    |                          |
//!        +---never paid--> expired <--period over-------+
//! any state but cancelled --cancel--> cancelled (final)
//! expired --manual renewal--> active (new anchor)
//! ```
//!
//! Rule 3 of the design lives here too: auto-renewal can be turned off at any
//! time, but once off it cannot be turned back on until the subscription has
//! been renewed again.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    PendingPayment,
    Active,
    PastDue,
    Expired,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::PendingPayment,
        Status::Active,
        Status::PastDue,
        Status::Expired,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::PendingPayment => "pending_payment",
            Status::Active => "active",
            Status::PastDue => "past_due",
            Status::Expired => "expired",
            Status::Cancelled => "cancelled",
        }
    }

    /// The state after `event`, or an error when the event makes no sense in
    /// this state (the engine never forces a transition).
    pub fn on(self, event: Event) -> Result<Status, TransitionError> {
        use Event::*;
        use Status::*;
        let next = match (self, event) {
            (PendingPayment | Active | PastDue, Paid) => Active,
            (Expired, ManualRenewal) => Active,
            (Active | PastDue, PaymentFailed) => PastDue,
            (PendingPayment | Active | PastDue, Expire) => Expired,
            (PendingPayment | Active | PastDue | Expired, Cancel) => Cancelled,
            _ => return Err(TransitionError { from: self, event }),
        };
        Ok(next)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown subscription status `{0}` (one of pending_payment, active, past_due, expired, cancelled)")]
pub struct UnknownStatus(pub String);

impl FromStr for Status {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

/// What can happen to a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A purchase or renewal payment succeeded.
    Paid,
    /// A renewal of an expired subscription, which starts a new anchor.
    ManualRenewal,
    /// A renewal payment was declined.
    PaymentFailed,
    /// The period ended unrenewed, or retries ran out.
    Expire,
    Cancel,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {from} subscription cannot take the event {event:?}")]
pub struct TransitionError {
    pub from: Status,
    pub event: Event,
}

/// The auto-renewal switch: whether it is on, and whether it may be turned on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AutoRenew {
    pub on: bool,
    pub can_enable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AutoRenewError {
    #[error("auto-renewal was turned off and cannot be turned back on until the subscription is renewed again")]
    LockedUntilRenewal,
}

impl AutoRenew {
    /// The switch of a new purchase: on.
    pub fn at_purchase() -> Self {
        AutoRenew {
            on: true,
            can_enable: true,
        }
    }

    /// The switch after a manual renewal: back on unless asked not to, and
    /// unlocked either way.
    pub fn after_manual_renewal(keep_off: bool) -> Self {
        AutoRenew {
            on: !keep_off,
            can_enable: true,
        }
    }

    pub fn set(self, on: bool) -> Result<AutoRenew, AutoRenewError> {
        match (on, self.on) {
            (false, _) => Ok(AutoRenew {
                on: false,
                can_enable: false,
            }),
            (true, true) => Ok(self),
            (true, false) if self.can_enable => Ok(AutoRenew {
                on: true,
                can_enable: true,
            }),
            (true, false) => Err(AutoRenewError::LockedUntilRenewal),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_renew_cannot_be_re_enabled_before_a_renewal() {
        let off = AutoRenew::at_purchase().set(false).unwrap();
        assert!(!off.on && !off.can_enable);
        assert_eq!(off.set(true), Err(AutoRenewError::LockedUntilRenewal));
    }

    #[test]
    fn a_manual_renewal_unlocks_and_turns_auto_renew_back_on() {
        assert_eq!(
            AutoRenew::after_manual_renewal(false),
            AutoRenew {
                on: true,
                can_enable: true
            }
        );
        let kept_off = AutoRenew::after_manual_renewal(true);
        assert!(!kept_off.on);
        assert!(kept_off.set(true).unwrap().on);
    }

    #[test]
    fn turning_off_is_always_allowed() {
        let on = AutoRenew::at_purchase();
        assert!(!on.set(false).unwrap().on);
        assert!(!on.set(false).unwrap().set(false).unwrap().on);
    }

    #[test]
    fn cancelled_is_final() {
        for e in [
            Event::Paid,
            Event::ManualRenewal,
            Event::PaymentFailed,
            Event::Expire,
            Event::Cancel,
        ] {
            assert!(Status::Cancelled.on(e).is_err());
        }
    }

    #[test]
    fn a_failed_renewal_goes_past_due_and_a_payment_brings_it_back() {
        let s = Status::Active.on(Event::PaymentFailed).unwrap();
        assert_eq!(s, Status::PastDue);
        assert_eq!(s.on(Event::Paid).unwrap(), Status::Active);
        assert_eq!(s.on(Event::Expire).unwrap(), Status::Expired);
    }

    #[test]
    fn an_expired_subscription_comes_back_only_by_manual_renewal() {
        assert!(Status::Expired.on(Event::Paid).is_err());
        assert_eq!(
            Status::Expired.on(Event::ManualRenewal).unwrap(),
            Status::Active
        );
    }

    #[test]
    fn status_names_round_trip() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>().unwrap(), s);
        }
        assert!("paused".parse::<Status>().is_err());
    }
}
