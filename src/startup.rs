//! Builds the application from its config: store (migrated), gateway, mail
//! transport, all sharing one clock.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::clock::SharedClock;
use crate::config::{Config, GatewayKind, MailTransportKind};
use crate::engine::{instance_name, Engine};
use crate::gateway::sandbox::SandboxGateway;
use crate::gateway::stripe::StripeGateway;
use crate::gateway::PaymentGateway;
use crate::mail::file::FileTransport;
use crate::mail::smtp::SmtpTransport;
use crate::mail::MailTransport;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::store::Store;

/// Opens the configured database, applying migrations.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let url = &config.raw.database.url;
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        // Several instances may share this database: each names itself
        // (host:pid) in its leases, its connections and its log lines.
        let shown = crate::config::redact_url(url);
        let store = PgStore::open(url, config.raw.database.max_connections, &instance_name())
            .await
            .with_context(|| format!("cannot connect to database {shown}"))?;
        store.migrate().await.context("cannot migrate database")?;
        return Ok(Arc::new(store));
    }
    if !url.starts_with("sqlite:") {
        anyhow::bail!(
            "database.url {}: use sqlite://PATH or postgres://USER@HOST/DB",
            crate::config::redact_url(url)
        );
    }
    let store = SqliteStore::open(url, config.raw.database.max_connections)
        .await
        .with_context(|| format!("cannot open database {url}"))?;
    store.migrate().await.context("cannot migrate database")?;
    Ok(Arc::new(store))
}

pub async fn open_sandbox(
    config: &Config,
    clock: SharedClock,
) -> anyhow::Result<Arc<SandboxGateway>> {
    let path = config.sandbox_ledger();
    let gw = SandboxGateway::open(
        &path,
        clock,
        Duration::from_millis(config.raw.gateway.sandbox.latency_ms),
    )
    .await
    .with_context(|| format!("cannot open sandbox ledger {}", path.display()))?
    .with_faults(crate::gateway::sandbox::Faults::from(
        &config.raw.gateway.sandbox,
    ));
    Ok(Arc::new(gw))
}

pub async fn build_engine(config: Arc<Config>, clock: SharedClock) -> anyhow::Result<Engine> {
    let store = open_store(&config).await?;
    let gateway: Arc<dyn PaymentGateway> = match config.raw.gateway.kind {
        GatewayKind::Sandbox => open_sandbox(&config, clock.clone()).await?,
        GatewayKind::Stripe => Arc::new(
            StripeGateway::from_config(&config).context("cannot set up the Stripe gateway")?,
        ),
    };
    let transport: Arc<dyn MailTransport> = match config.raw.mail.transport {
        MailTransportKind::File => Arc::new(FileTransport::new(config.mail_dir())),
        MailTransportKind::Smtp => Arc::new(
            SmtpTransport::new(&config.raw.mail.smtp)
                .map_err(anyhow::Error::msg)
                .context("cannot set up the SMTP transport")?,
        ),
    };
    crate::mail::templates::install(crate::mail::templates::for_dir(Some(
        std::path::Path::new(&config.raw.mail.templates_dir),
    ))?);
    Ok(Engine {
        store,
        gateway,
        transport,
        clock,
        config,
        instance: instance_name(),
    })
}
