//! The Stripe gateway against a local fake Stripe (wiremock with a stateful
//! responder that honours idempotency keys as Stripe does): charges and
//! declines, answers lost after the charge, timeouts, reconciliation by key,
//! its settings, and one renewal driven by the real engine.

mod config;
mod engine;
mod fake;
mod gateway;
