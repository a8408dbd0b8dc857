//! The verifier's HTTP API. Limits: request bodies of `POST /v1/verify` up to
//! [`super::MAX_BODY`] bytes (413 beyond), keys up to `MAX_KEY_LEN` characters
//! (`MALFORMED` beyond); hyper's own header limits apply to `/v1/auth`.
//!
//! `/v1/auth` is the forward-auth contract nginx `auth_request`, Traefik `ForwardAuth`,
//! Caddy `forward_auth` and Envoy's HTTP `ext_authz` share: any method, at `/v1/auth` and
//! every path under `/v1/auth/` (Envoy appends the original path), the body ignored; 200
//! with the identity headers, 401 with `WWW-Authenticate` otherwise, 503 only while the
//! index cannot be trusted. Never 404/429/5xx as a decision.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::Uri;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use chrono::SecondsFormat;
use serde::Serialize;

use super::decision::decide;
use super::request::{key_from_body, key_from_headers, required_scopes};
use super::{Checker, Code, HTTP, MAX_BODY};
use crate::metrics::Metrics;
use crate::runtime::health::Readiness;

#[derive(Clone)]
struct AppState {
    checker: Checker,
    /// Whether the index may be answered from (its watches are current).
    trusted: Readiness,
}

/// `/v1/verify`, `/v1/auth` (answering 503 unless `trusted`), and the health and
/// metrics routes (`/readyz` follows `ready`: it goes false first when stopping, while
/// the API still answers).
pub fn router(checker: Checker, metrics: Arc<Metrics>, ready: Readiness, trusted: Readiness) -> Router {
    let api = Router::new()
        .route("/v1/verify", post(verify))
        .route("/v1/auth", any(auth))
        .route("/v1/auth/", any(auth))
        .route("/v1/auth/{*original}", any(auth))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(AppState { checker, trusted });
    api.merge(crate::runtime::health::router(metrics, ready))
}

#[derive(Serialize)]
struct ApiKeyRef<'a> {
    namespace: &'a str,
    name: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VerifyResponse<'a> {
    valid: bool,
    code: Code,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_key: Option<ApiKeyRef<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    slot: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scopes: Option<&'a [String]>,
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

/// Before the index has synced the verifier cannot tell a valid key from an unknown
/// one, and while a watch has been failing for longer than `--max-staleness` it may miss
/// revocations: it says so (503) instead of answering from an index it cannot trust.
fn not_synced() -> Response {
    let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, super::decision::NOT_CURRENT);
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

async fn verify(State(s): State<AppState>, body: Bytes) -> Response {
    if !s.trusted.get() {
        return not_synced();
    }
    let started = Instant::now();
    let key = match key_from_body(&body) {
        Ok(key) => key,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let verdict = s.checker.check(HTTP, "verify", &key, &[], started);
    let e = verdict.entry.as_ref();
    let body = VerifyResponse {
        valid: verdict.code == Code::Valid,
        code: verdict.code,
        api_key: e.map(|e| ApiKeyRef { namespace: &e.apikey.namespace, name: &e.apikey.name }),
        owner: e.map(|e| e.apikey.owner.as_str()),
        client_id: e.map(|e| e.apikey.client_id.as_str()),
        key_id: e.map(|e| e.key_id.as_str()),
        slot: e.map(|e| e.slot.to_string()),
        expires_at: e.and_then(|e| e.expires_at).map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true)),
        scopes: e.filter(|_| verdict.code == Code::Valid).map(|e| &e.apikey.scopes[..]),
    };
    axum::Json(body).into_response()
}

/// The request the proxy asks about: `X-Forwarded-Uri` (Traefik, Caddy), `X-Original-URI`
/// (nginx), else the path after `/v1/auth` (Envoy's HTTP mode appends it), else `/`.
pub fn original_uri<'a>(headers: &'a HeaderMap, uri: &'a Uri) -> &'a str {
    ["x-forwarded-uri", "x-original-uri"]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .or_else(|| uri.path().strip_prefix("/v1/auth").filter(|p| !p.is_empty()))
        .unwrap_or("/")
}

async fn auth(State(s): State<AppState>, uri: Uri, headers: HeaderMap) -> Response {
    if !s.trusted.get() {
        return not_synced();
    }
    let started = Instant::now();
    let required = required_scopes(&headers, uri.query());
    let key = key_from_headers(&headers).unwrap_or_default();
    let verdict = s.checker.check(HTTP, "auth", key, &required, started);
    tracing::debug!(
        uri = s.checker.loggable(original_uri(&headers, &uri)),
        code = verdict.code.as_str(),
        "forward-auth"
    );
    let decision = decide(&verdict, &required);
    let status = StatusCode::from_u16(decision.status).unwrap_or(StatusCode::UNAUTHORIZED);
    let mut resp = if decision.allowed() {
        status.into_response()
    } else {
        (status, [(header::CONTENT_TYPE, "application/json")], decision.body()).into_response()
    };
    for (name, value) in decision.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
    if !decision.remove.is_empty() {
        // Envoy's HTTP ext_authz (and so Istio's envoyExtAuthzHttp) removes these from the
        // request before the upstream, whatever its allowed_upstream_headers say.
        let remove = HeaderValue::from_str(&decision.remove.join(", ")).expect("header names");
        resp.headers_mut().insert("x-envoy-auth-headers-to-remove", remove);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_original_uri_comes_from_the_proxys_header_else_the_path_under_v1_auth() {
        let uri = |u: &str| u.parse::<Uri>().unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(original_uri(&h, &uri("/v1/auth")), "/");
        assert_eq!(original_uri(&h, &uri("/v1/auth/orders/42?x=1")), "/orders/42");
        h.insert("x-original-uri", HeaderValue::from_static("/nginx/path"));
        assert_eq!(original_uri(&h, &uri("/v1/auth")), "/nginx/path");
        h.insert("x-forwarded-uri", HeaderValue::from_static("/traefik/path"));
        assert_eq!(original_uri(&h, &uri("/v1/auth/envoy")), "/traefik/path");
    }
}
