//! renewd: keeps yearly subscriptions renewed.
//!
//! The pure [`domain`] sits in the middle; [`store`], [`gateway`] and
//! [`mail`] are adapters around it; [`engine`] drives them; [`daemon`] and
//! [`cli`] are the edges. Only [`clock`] reads the system time.

pub mod bench;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod domain;
pub mod engine;
pub mod gateway;
pub mod http;
pub mod invoice;
pub mod mail;
pub mod monitoring;
pub mod startup;
pub mod store;
pub mod telemetry;
