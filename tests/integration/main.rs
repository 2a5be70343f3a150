//! Integration tests through the harness in `support`: MockClock, the
//! sandbox gateway (its own ledger file) and the file mail transport.

mod support;

mod declines;
mod flows;
mod hazards;
mod reminders;
mod renewal;

/// Tells, past the harness's output capture, when this run was on SQLite
/// only, so a plain `cargo test` says the PostgreSQL run was not done.
#[test]
fn the_suite_says_which_backend_it_ran_on() {
    use std::io::Write;
    let line = match support::backend() {
        support::Backend::Postgres => {
            "integration suite: ran on PostgreSQL (a fresh database per test)\n"
        }
        support::Backend::Sqlite => {
            "integration suite: ran on SQLite; the PostgreSQL suite was NOT run \
             (RENEWD_TEST_BACKEND=postgres cargo test --test integration; see README)\n"
        }
    };
    let _ = std::io::stderr().write_all(line.as_bytes());
}
