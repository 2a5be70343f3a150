//! Integration tests through the harness in `support`: MockClock, the
//! sandbox gateway (its own ledger file) and the file mail transport.

mod support;

mod declines;
mod flows;
mod hazards;
mod reminders;
mod renewal;
