//! The verifier's HTTP API. Limits: request bodies of `POST /v1/verify` up to
//! [`super::MAX_BODY`] bytes (413 beyond), keys up to `MAX_KEY_LEN` characters
//! (`MALFORMED` beyond); hyper's own header limits apply to `/v1/auth`.
//!
//! `/v1/auth` is the forward-auth contract nginx `auth_request`, Traefik `ForwardAuth`,
//! Caddy `forward_auth` and Envoy's HTTP `ext_authz` share: any method, at `/v1/auth` and
//! every path under `/v1/auth/` (Envoy appends the original path), the body ignored; 200
//! with the identity headers, 401 with `WWW-Authenticate` otherwise, 503 only while the
//! index cannot be trusted. Never 404/429/5xx as a decision.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::Uri;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use chrono::{SecondsFormat, Utc};
use serde::Serialize;

use super::request::{key_from_body, key_from_headers, required_scopes};
use super::usage::Usage;
use super::{Code, Index, MAX_BODY, RequestLabels, Verdict, VerifierMetrics};
use crate::health::Readiness;
use crate::metrics::Metrics;

#[derive(Clone)]
struct AppState {
    index: Arc<RwLock<Index>>,
    usage: Arc<Usage>,
    vm: Arc<VerifierMetrics>,
    /// Whether the index may be answered from (its watches are current).
    trusted: Readiness,
}

/// `/v1/verify`, `/v1/auth` (answering 503 unless `trusted`), and the health and
/// metrics routes (`/readyz` follows `ready`: it goes false first when stopping, while
/// the API still answers).
pub fn router(
    index: Arc<RwLock<Index>>,
    usage: Arc<Usage>,
    vm: Arc<VerifierMetrics>,
    metrics: Arc<Metrics>,
    ready: Readiness,
    trusted: Readiness,
) -> Router {
    let api = Router::new()
        .route("/v1/verify", post(verify))
        .route("/v1/auth", any(auth))
        .route("/v1/auth/", any(auth))
        .route("/v1/auth/{*original}", any(auth))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(AppState { index, usage, vm, trusted });
    api.merge(crate::health::router(metrics, ready))
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

impl AppState {
    /// Verify `key`, requiring `scopes` of a valid key (else `INSUFFICIENT_SCOPE`); a
    /// valid key's use is recorded either way (the caller did hold a working key).
    fn check(&self, endpoint: &'static str, key: &str, scopes: &[String], started: Instant) -> Verdict {
        let now = Utc::now();
        let mut verdict = self.index.read().unwrap_or_else(|p| p.into_inner()).verify(key, now);
        if verdict.code == Code::Valid
            && let Some(e) = &verdict.entry
            && scopes.iter().any(|s| e.apikey.scopes.binary_search(s).is_err())
        {
            self.usage.record(e, now);
            verdict.code = Code::InsufficientScope;
        }
        if verdict.code == Code::Valid
            && let Some(e) = &verdict.entry
        {
            self.usage.record(e, now);
        }
        self.vm.requests.get_or_create(&RequestLabels { endpoint, code: verdict.code.as_str() }).inc();
        self.vm.latency.observe(started.elapsed().as_secs_f64());
        verdict
    }
}

/// Before the index has synced the verifier cannot tell a valid key from an unknown
/// one, and while a watch has been failing for longer than `--max-staleness` it may miss
/// revocations: it says so (503) instead of answering from an index it cannot trust.
fn not_synced() -> Response {
    let mut resp = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the verifier's index is not current (not synced yet, or its watch is failing)",
    );
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
    let verdict = s.check("verify", &key, &[], started);
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
        scopes: e.filter(|_| verdict.code == Code::Valid).map(|e| e.apikey.scopes.as_slice()),
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

/// `WWW-Authenticate` of a refusal (RFC 6750).
const CHALLENGE: &str = r#"Bearer realm="keyward", error="invalid_token""#;

async fn auth(State(s): State<AppState>, uri: Uri, headers: HeaderMap) -> Response {
    if !s.trusted.get() {
        return not_synced();
    }
    let started = Instant::now();
    let required = required_scopes(&headers, uri.query());
    let verdict = s.check("auth", key_from_headers(&headers).unwrap_or_default(), &required, started);
    tracing::debug!(uri = original_uri(&headers, &uri), code = verdict.code.as_str(), "forward-auth");
    let code = HeaderValue::from_static(verdict.code.as_str());
    match (verdict.code, &verdict.entry) {
        (Code::Valid, Some(e)) => {
            let mut resp = StatusCode::OK.into_response();
            let h = resp.headers_mut();
            // The namespace and ApiKey name are what no other namespace can claim; the
            // owner is free text, unique only within its namespace.
            for (name, value) in [
                ("x-keyward-namespace", e.apikey.namespace.as_str()),
                ("x-keyward-apikey", e.apikey.name.as_str()),
                ("x-keyward-owner", e.apikey.owner.as_str()),
                ("x-keyward-client-id", e.apikey.client_id.as_str()),
                ("x-keyward-key-id", e.key_id.as_str()),
            ] {
                if let Ok(v) = HeaderValue::from_str(value) {
                    h.insert(name, v);
                }
            }
            if let Ok(v) = HeaderValue::from_str(&e.apikey.scopes.join(" "))
                && !e.apikey.scopes.is_empty()
            {
                h.insert("x-keyward-scopes", v);
            }
            h.insert("x-keyward-code", code);
            resp
        }
        (Code::InsufficientScope, _) => {
            let mut resp = StatusCode::FORBIDDEN.into_response();
            let challenge = format!(
                r#"Bearer realm="keyward", error="insufficient_scope", scope="{}""#,
                required.join(" ")
            );
            if let Ok(v) = HeaderValue::from_str(&challenge) {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            resp.headers_mut().insert("x-keyward-code", code);
            resp
        }
        _ => {
            let mut resp = StatusCode::UNAUTHORIZED.into_response();
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(CHALLENGE));
            resp.headers_mut().insert("x-keyward-code", code);
            resp
        }
    }
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
