//! What a forward-auth verdict tells the proxy, whatever the protocol: the HTTP status
//! the client gets, the identity headers the upstream gets on allow, and the challenge
//! the client gets on refusal. Pure: `/v1/auth` (HTTP) and `Check` (gRPC `ext_authz`)
//! both render a [`Decision`], so the two protocols cannot drift apart.

use axum::http::HeaderValue;
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue as PbHeader, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckResponse, DeniedHttpResponse, OkHttpResponse};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::rpc::Status as RpcStatus;

use super::{Code, Verdict};

/// The headers that carry the key (`Authorization: Bearer`, `X-Api-Key`): never passed
/// to the upstream by a proxy that can remove them (gRPC `headers_to_remove`, the
/// examples' nginx and Caddy configurations).
pub const KEY_HEADERS: [&str; 2] = ["authorization", "x-api-key"];

/// Every header the verifier may set for the upstream on allow. A proxy must not pass a
/// client-sent one through: gRPC overwrites those it sets and removes the others.
pub const IDENTITY_HEADERS: [&str; 7] = [
    "x-keyward-namespace",
    "x-keyward-apikey",
    "x-keyward-owner",
    "x-keyward-client-id",
    "x-keyward-key-id",
    "x-keyward-scopes",
    "x-keyward-code",
];

/// `WWW-Authenticate` of a refusal of the key itself (RFC 6750).
pub const CHALLENGE: &str = r#"Bearer realm="keyward", error="invalid_token""#;

/// A forward-auth answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// 200 (allow), 401 (no valid key) or 403 (a required scope is missing).
    pub status: u16,
    /// The verdict's code.
    pub code: Code,
    /// Allow: the identity headers for the upstream, each a name of [`IDENTITY_HEADERS`].
    /// Refuse: the headers for the client (`WWW-Authenticate`, `X-Keyward-Code`). Every
    /// value is a valid HTTP header value; one that would not be (an owner with
    /// characters HTTP cannot carry) is left out, never mangled.
    pub headers: Vec<(&'static str, String)>,
    /// Allow: the headers a proxy must remove from the request before the upstream: the
    /// key headers and every identity header not set (a client's forged copy). gRPC
    /// sends them as `headers_to_remove`, `/v1/auth` as `x-envoy-auth-headers-to-remove`
    /// (Envoy's HTTP mode and Istio apply it; other proxies ignore it).
    pub remove: Vec<&'static str>,
}

impl Decision {
    /// Whether the request is allowed.
    pub fn allowed(&self) -> bool {
        self.status == 200
    }

    /// The body of a refusal: `{"error": ..., "code": ...}` (RFC 6750's error code and the
    /// verifier's), so a client behind a proxy that copies it learns why.
    pub fn body(&self) -> String {
        let error = if self.status == 403 { "insufficient_scope" } else { "invalid_token" };
        serde_json::json!({ "error": error, "code": self.code }).to_string()
    }
}

/// The answer to `verdict` for a route that requires `required` scopes (the verdict is
/// already `INSUFFICIENT_SCOPE` when a valid key lacks one).
pub fn decide(verdict: &Verdict, required: &[String]) -> Decision {
    let mut headers: Vec<(&'static str, String)> = Vec::new();
    let mut add = |name: &'static str, value: String| {
        if HeaderValue::from_str(&value).is_ok() {
            headers.push((name, value));
        }
    };
    let status = match (verdict.code, &verdict.entry) {
        (Code::Valid, Some(e)) => {
            // The namespace and ApiKey name are what no other namespace can claim; the
            // owner is free text, unique only within its namespace.
            add("x-keyward-namespace", e.apikey.namespace.to_string());
            add("x-keyward-apikey", e.apikey.name.to_string());
            add("x-keyward-owner", e.apikey.owner.to_string());
            add("x-keyward-client-id", e.apikey.client_id.to_string());
            add("x-keyward-key-id", e.key_id.to_string());
            if !e.apikey.scopes.is_empty() {
                add("x-keyward-scopes", e.apikey.scopes.join(" "));
            }
            200
        }
        (Code::InsufficientScope, _) => {
            let scope = required.join(" ").replace(['"', '\\'], "");
            add(
                "www-authenticate",
                format!(r#"Bearer realm="keyward", error="insufficient_scope", scope="{scope}""#),
            );
            403
        }
        _ => {
            add("www-authenticate", CHALLENGE.to_string());
            401
        }
    };
    headers.push(("x-keyward-code", verdict.code.as_str().to_string()));
    let remove = if status == 200 {
        let set: Vec<&str> = headers.iter().map(|(n, _)| *n).collect();
        KEY_HEADERS.iter().chain(IDENTITY_HEADERS.iter().filter(|h| !set.contains(h))).copied().collect()
    } else {
        Vec::new()
    };
    Decision { status, code: verdict.code, headers, remove }
}

/// gRPC status codes (`google.rpc.Code`) of a `CheckResponse`.
mod rpc_code {
    pub const OK: i32 = 0;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const UNAVAILABLE: i32 = 14;
    pub const UNAUTHENTICATED: i32 = 16;
}

/// `decision` as Envoy's `CheckResponse`. Allow: `OK`, with `ok_response.headers` setting
/// (overwriting any client-sent copy) each identity header, and `headers_to_remove`
/// naming the key headers and every identity header not set, so the upstream never sees
/// the raw key nor a forged identity. Refuse: `UNAUTHENTICATED` (401) or
/// `PERMISSION_DENIED` (403), with `denied_response` carrying the status, the challenge
/// and the JSON body.
pub fn check_response(decision: &Decision) -> CheckResponse {
    let headers = |set: &[(&'static str, String)]| -> Vec<HeaderValueOption> {
        set.iter().map(|(name, value)| header_option(name, value)).collect()
    };
    if decision.allowed() {
        return CheckResponse {
            status: Some(RpcStatus { code: rpc_code::OK, ..Default::default() }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: headers(&decision.headers),
                headers_to_remove: decision.remove.iter().map(|h| (*h).into()).collect(),
                ..Default::default()
            })),
            ..Default::default()
        };
    }
    let mut client = decision.headers.clone();
    client.push(("content-type", "application/json".into()));
    let code = if decision.status == 403 { rpc_code::PERMISSION_DENIED } else { rpc_code::UNAUTHENTICATED };
    denied(code, decision.status, &headers(&client), decision.body(), decision.code.as_str())
}

/// The `CheckResponse` while the index cannot be trusted: `UNAVAILABLE`, 503 with
/// `Retry-After`, as `/v1/auth` answers then.
pub fn check_unavailable() -> CheckResponse {
    let body = serde_json::json!({ "error": NOT_CURRENT }).to_string();
    let headers = [header_option("retry-after", "1"), header_option("content-type", "application/json")];
    denied(rpc_code::UNAVAILABLE, 503, &headers, body, NOT_CURRENT)
}

/// Why the verifier answers 503.
pub const NOT_CURRENT: &str = "the verifier's index is not current (not synced yet, or its watch is failing)";

/// A header set (a client's copy replaced) by Envoy.
fn header_option(name: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(PbHeader { key: name.into(), value: value.into(), ..Default::default() }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn denied(
    code: i32,
    status: u16,
    headers: &[HeaderValueOption],
    body: String,
    message: &str,
) -> CheckResponse {
    CheckResponse {
        status: Some(RpcStatus { code, message: message.into(), ..Default::default() }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: i32::from(status) }),
            headers: headers.to_vec(),
            body,
        })),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::Utc;

    use super::*;
    use crate::api::{KeyState, Slot};
    use crate::verifier::{Entry, Holder};

    fn entry(owner: &str, scopes: &[&str]) -> Entry {
        Entry {
            apikey: Arc::new(Holder {
                namespace: "shop".into(),
                name: "checkout".into(),
                owner: owner.into(),
                client_id: "c1".into(),
                revoked: Box::default(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                resource_version: None,
            }),
            key_id: "abcd".into(),
            slot: Slot::Primary,
            position: 0,
            created_at: Utc::now(),
            expires_at: None,
            last_used_at: None,
            state: KeyState::Active,
        }
    }

    #[test]
    fn allow_carries_the_identity_and_refusals_the_challenge() {
        let valid = Verdict { code: Code::Valid, entry: Some(entry("payments", &["a:read", "b"])) };
        let d = decide(&valid, &[]);
        assert!(d.allowed());
        let names: Vec<_> = d.headers.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, IDENTITY_HEADERS);
        assert!(d.headers.contains(&("x-keyward-scopes", "a:read b".into())));
        assert_eq!(d.remove, KEY_HEADERS);

        let d = decide(&Verdict { code: Code::Valid, entry: Some(entry("Zoë \u{7f}", &[])) }, &[]);
        assert!(!d.headers.iter().any(|(n, _)| *n == "x-keyward-owner" || *n == "x-keyward-scopes"), "{d:?}");

        let d = decide(&Verdict { code: Code::Expired, entry: Some(entry("p", &[])) }, &[]);
        assert_eq!((d.status, d.headers.len(), d.remove.len()), (401, 2, 0));
        assert_eq!(d.headers[0], ("www-authenticate", CHALLENGE.into()));
        assert_eq!(d.body(), r#"{"code":"EXPIRED","error":"invalid_token"}"#);

        let scant = Verdict { code: Code::InsufficientScope, entry: Some(entry("p", &[])) };
        let d = decide(&scant, &["orders:write".into(), "x\"y".into()]);
        assert_eq!(d.status, 403);
        assert_eq!(
            d.headers[0].1,
            r#"Bearer realm="keyward", error="insufficient_scope", scope="orders:write xy""#
        );
        assert!(d.body().contains("insufficient_scope"));
    }

    #[test]
    fn the_grpc_answer_sets_the_identity_and_removes_the_key_and_any_forged_identity() {
        let valid = Verdict { code: Code::Valid, entry: Some(entry("payments", &[])) };
        let r = check_response(&decide(&valid, &[]));
        assert_eq!(r.status.as_ref().unwrap().code, rpc_code::OK);
        let Some(HttpResponse::OkResponse(ok)) = &r.http_response else { panic!("{r:?}") };
        let set: Vec<&str> = ok.headers.iter().map(|h| h.header.as_ref().unwrap().key.as_str()).collect();
        assert_eq!(
            set,
            [
                "x-keyward-namespace",
                "x-keyward-apikey",
                "x-keyward-owner",
                "x-keyward-client-id",
                "x-keyward-key-id",
                "x-keyward-code"
            ]
        );
        assert!(
            ok.headers.iter().all(|h| h.append_action == HeaderAppendAction::OverwriteIfExistsOrAdd as i32)
        );
        assert_eq!(ok.headers_to_remove, ["authorization", "x-api-key", "x-keyward-scopes"]);

        for (code, http, rpc) in [
            (Code::NotFound, 401, rpc_code::UNAUTHENTICATED),
            (Code::InsufficientScope, 403, rpc_code::PERMISSION_DENIED),
        ] {
            let r = check_response(&decide(&Verdict { code, entry: None }, &["a".into()]));
            assert_eq!(r.status.as_ref().unwrap().code, rpc);
            let Some(HttpResponse::DeniedResponse(d)) = &r.http_response else { panic!("{r:?}") };
            assert_eq!(d.status.as_ref().unwrap().code, http);
            assert!(d.body.contains(code.as_str()), "{}", d.body);
            assert!(d.headers.iter().any(|h| h.header.as_ref().unwrap().key == "www-authenticate"));
        }
        let r = check_unavailable();
        assert_eq!(r.status.as_ref().unwrap().code, rpc_code::UNAVAILABLE);
    }
}
