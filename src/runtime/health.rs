//! The small HTTP server for `/healthz`, `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Readiness shared between the component and its health server.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Mark ready (or not).
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
    /// Whether `/readyz` answers 200.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct HealthState {
    metrics: Arc<Metrics>,
    ready: Readiness,
}

/// Routes for health and metrics, to serve alone or merge into another router.
pub fn router(metrics: Arc<Metrics>, ready: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(HealthState { metrics, ready })
}

async fn readyz(State(s): State<HealthState>) -> impl IntoResponse {
    if s.ready.get() { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") }
}

async fn render_metrics(State(s): State<HealthState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        s.metrics.render(),
    )
}

/// Bind `addr` now (so a taken port fails start-up) and serve `app` until `shutdown`.
pub async fn serve(
    addr: &str,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>> {
    let sock: SocketAddr = addr.parse().map_err(|e: std::net::AddrParseError| Error::Listen {
        addr: addr.into(),
        source: std::io::Error::other(e),
    })?;
    let listener = tokio::net::TcpListener::bind(sock)
        .await
        .map_err(|source| Error::Listen { addr: addr.into(), source })?;
    tracing::info!(addr = %listener.local_addr().map_or(sock, |a| a), "serving /healthz, /readyz, /metrics");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %e, "health server stopped");
        }
    }))
}
