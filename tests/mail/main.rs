//! Mail delivered over real SMTP: a year of time travel into MailDev, a
//! relay that goes down and comes back, a recipient the relay rejects, the
//! `mail retry` command, and the rendered samples under `docs/mail/`.

mod maildev;
mod outage;
mod rejection;
mod responder;
mod samples;
mod support;
mod year;
