//! The health and metrics endpoints, on `http.listen` (loopback only, off
//! by default):
//!
//! - `GET /healthz`: 200 while the process serves requests (liveness).
//! - `GET /readyz`: 200 when the database answers and the last successful
//!   sweep is recent; 503 with the reason otherwise, and while stopping.
//! - `GET /metrics`: Prometheus text format.
//!
//! Read-only: nothing here may change state, and no body carries customer
//! data or secrets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::clock::SharedClock;
use crate::monitoring::{Health, Monitor};
use crate::store::Store;

#[derive(Clone)]
pub struct HttpState {
    pub store: Arc<dyn Store>,
    pub clock: SharedClock,
    pub health: Arc<Health>,
    pub monitor: Arc<Monitor>,
}

/// Binds the listener; done before READY so a taken port fails the start.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("http.listen = \"{addr}\": cannot listen"))
}

/// Serves until the process exits.
pub fn serve(listener: TcpListener, state: HttpState) -> tokio::task::JoinHandle<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "health and metrics server stopped");
        }
    })
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<HttpState>) -> Response {
    match tokio::time::timeout(Duration::from_secs(2), s.store.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return not_ready(format!("database unreachable: {e}")),
        Err(_) => return not_ready("database did not answer within 2s".into()),
    }
    match s.health.sweeps_ready() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => not_ready(why),
    }
}

fn not_ready(why: String) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready: {why}\n"),
    )
        .into_response()
}

async fn metrics(State(s): State<HttpState>) -> Response {
    if let Err(e) = s.monitor.refresh_gauges(&*s.store, s.clock.now()).await {
        tracing::warn!(error = %e, "cannot read metrics gauges");
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.monitor.render(),
    )
        .into_response()
}
