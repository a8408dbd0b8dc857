//! Envoy's gRPC `ext_authz` (`envoy.service.auth.v3.Authorization/Check`) and
//! `grpc.health.v1` on `--grpc-listen`: the same index, usage recording, metrics (label
//! `protocol="grpc"`) and verdicts as `/v1/auth`, mapped by
//! [`super::request::ask_of_check`] and rendered by [`super::decision::check_response`].
//!
//! Limits: a `Check` message up to [`MAX_CHECK`] bytes (tonic refuses larger ones with
//! `RESOURCE_EXHAUSTED`, which Envoy turns into its `status_on_error`, 403 by default),
//! keys up to `MAX_KEY_LEN` characters (`MALFORMED` beyond).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::authorization_server::{Authorization, AuthorizationServer};
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;

use super::decision::{check_response, check_unavailable, decide};
use super::request::{ask_of_check, key_from_headers};
use super::{Checker, GRPC};
use crate::error::{Error, Result};
use crate::runtime::health::Readiness;

/// Largest `Check` message accepted: Envoy's own request-header limit is 60 KiB by
/// default (up to 96 KiB), and keyward asks for no body.
pub const MAX_CHECK: usize = 128 * 1024;

struct ExtAuthz {
    checker: Checker,
    trusted: Readiness,
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> std::result::Result<Response<CheckResponse>, Status> {
        if !self.trusted.get() {
            return Ok(Response::new(check_unavailable()));
        }
        let started = Instant::now();
        let ask = ask_of_check(request.get_ref());
        let key = key_from_headers(&ask.headers).unwrap_or_default();
        let verdict = self.checker.check(GRPC, "check", key, &ask.required, started);
        tracing::debug!(uri = self.checker.loggable(&ask.path), code = verdict.code.as_str(), "ext_authz");
        Ok(Response::new(check_response(&decide(&verdict, &ask.required))))
    }
}

/// Bind `addr` and serve `Check` and health until `shutdown`. `Check` answers from the
/// index while `trusted` (else `UNAVAILABLE`, 503); health says `SERVING` (for "" and for
/// the Authorization service) exactly while `ready`, checked every 100 ms, so it goes
/// `NOT_SERVING` first when the verifier stops, as `/readyz` does.
pub async fn serve(
    addr: &str,
    checker: Checker,
    ready: Readiness,
    trusted: Readiness,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>> {
    let listen_error = |source| Error::Listen { addr: addr.into(), source };
    let sock: SocketAddr = addr.parse().map_err(|e| listen_error(std::io::Error::other(e)))?;
    let listener = tokio::net::TcpListener::bind(sock).await.map_err(listen_error)?;
    tracing::info!(addr = %listener.local_addr().map_or(sock, |a| a), "serving gRPC ext_authz and grpc.health.v1");
    let (reporter, health) = tonic_health::server::health_reporter();
    let authz = AuthorizationServer::new(ExtAuthz { checker, trusted }).max_decoding_message_size(MAX_CHECK);
    let follow = tokio::spawn(async move {
        let mut was = None;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let now = ready.get();
            if was != Some(now) {
                let status = if now { ServingStatus::Serving } else { ServingStatus::NotServing };
                for service in
                    ["", envoy_types::pb::envoy::service::auth::v3::authorization_server::SERVICE_NAME]
                {
                    reporter.set_service_status(service, status).await;
                }
                was = Some(now);
            }
        }
    });
    // Nagle off: each answer is one small write, which would otherwise wait for the
    // client's delayed ACK (40 ms per Check, measured with bench/verifier.sh).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    Ok(tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(authz)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        follow.abort();
        if let Err(e) = served {
            tracing::error!(error = %e, "gRPC server stopped");
        }
    }))
}
