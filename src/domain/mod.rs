//! The pure domain: money, term arithmetic, the subscription state machine,
//! reminder choice, invoice calculation and validated values.
//!
//! Nothing here does I/O or reads the clock; every function that needs the
//! time takes `now` as an argument.

pub mod invoice;
pub mod money;
pub mod reminder;
pub mod subscription;
pub mod term;
pub mod values;

pub use money::{Currency, Money};
pub use subscription::{AutoRenew, Status};
