//! Where the verifier finds the key in a request: the JSON body of `POST /v1/verify`
//! and the `Authorization: Bearer` / `X-Api-Key` headers of `GET /v1/auth`. Pure (no
//! I/O, no state), so the HTTP handlers stay thin and `fuzz/` can feed them any bytes.
//!
//! Both return the key trimmed of surrounding white space and judge nothing else: an
//! empty or over-long key is the index's to refuse (`MALFORMED`).

use axum::http::{HeaderMap, header};
use serde::Deserialize;

/// Why a `POST /v1/verify` body was refused (400); the message is the response's `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The body is not UTF-8.
    #[error("body is not UTF-8")]
    NotUtf8,
    /// The body is not a JSON object with a string `key`.
    #[error("body must be JSON: {{\"key\": \"...\"}}")]
    NotJson,
}

#[derive(Deserialize)]
struct VerifyRequest {
    key: String,
}

/// The key of a `POST /v1/verify` body `{"key": "..."}`, trimmed.
pub fn key_from_body(body: &[u8]) -> Result<String, BodyError> {
    let text = std::str::from_utf8(body).map_err(|_| BodyError::NotUtf8)?;
    let req: VerifyRequest = serde_json::from_str(text).map_err(|_| BodyError::NotJson)?;
    Ok(req.key.trim().to_owned())
}

/// The key from `Authorization: Bearer <key>` or, when there is no readable
/// `Authorization`, `X-Api-Key: <key>`; trimmed. `None` for another scheme, and for a
/// request that sends the header it reads more than once: a proxy and the upstream
/// behind it could each read a different one, so such a request is refused, not
/// guessed at.
pub fn key_from_headers(headers: &HeaderMap) -> Option<&str> {
    let single = |name| {
        let mut values = headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (Some(v), None) => Ok(v.to_str().ok()),
            (None, _) => Ok(None),
            (Some(_), Some(_)) => Err(()),
        }
    };
    if let Some(v) = single(header::AUTHORIZATION).ok()? {
        let (scheme, rest) = v.trim().split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim());
    }
    single(header::HeaderName::from_static("x-api-key")).ok()?.map(str::trim)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn keys_from_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(key_from_headers(&h), None);
        h.insert("x-api-key", HeaderValue::from_static(" kw_abc "));
        assert_eq!(key_from_headers(&h), Some("kw_abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer kw_xyz"));
        assert_eq!(key_from_headers(&h), Some("kw_xyz"), "Authorization wins");
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic dXNlcjpwYXNz"));
        assert_eq!(key_from_headers(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer  kw_lower"));
        assert_eq!(key_from_headers(&h), Some("kw_lower"));
        // An Authorization value that is not visible ASCII is skipped, as if absent.
        h.insert(header::AUTHORIZATION, HeaderValue::from_bytes(b"Bearer \xff").unwrap());
        assert_eq!(key_from_headers(&h), Some("kw_abc"));
    }

    #[test]
    fn a_header_sent_twice_is_refused_not_guessed() {
        let mut h = HeaderMap::new();
        h.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer kw_a"));
        h.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer kw_a"));
        h.insert("x-api-key", HeaderValue::from_static("kw_c"));
        assert_eq!(key_from_headers(&h), None, "two Authorization headers, even equal ones");
        let mut h = HeaderMap::new();
        h.append("x-api-key", HeaderValue::from_static("kw_a"));
        h.append("x-api-key", HeaderValue::from_static("kw_b"));
        assert_eq!(key_from_headers(&h), None, "two X-Api-Key headers");
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer kw_z"));
        assert_eq!(key_from_headers(&h), Some("kw_z"), "one Authorization decides; X-Api-Key is not read");
    }

    #[test]
    fn keys_from_bodies() {
        assert_eq!(key_from_body(br#"{"key": " kw_abc "}"#), Ok("kw_abc".into()));
        assert_eq!(key_from_body(br#"{"key": "kw_abc", "other": 1}"#), Ok("kw_abc".into()));
        assert_eq!(key_from_body(br#"{"key": ""}"#), Ok(String::new()));
        // serde reads a struct from an array of its fields too, and skips other fields unparsed.
        assert_eq!(key_from_body(br#"["kw_abc"]"#), Ok("kw_abc".into()));
        assert_eq!(key_from_body(br#"{"key": "kw_abc", "n": 1e999}"#), Ok("kw_abc".into()));
        assert_eq!(key_from_body(b"\xff"), Err(BodyError::NotUtf8));
        for bad in [&b""[..], b"kw_abc", b"{}", br#"{"key": 1}"#, br#"{"key": "a", "key": "b"}"#] {
            assert_eq!(key_from_body(bad), Err(BodyError::NotJson), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(BodyError::NotJson.to_string(), r#"body must be JSON: {"key": "..."}"#);
    }
}

/// The scopes a forward-auth request requires: every `scope` query parameter and every
/// `X-Keyward-Require-Scope` header, each a list separated by spaces or commas (the
/// union: a party that adds a requirement can only make the answer stricter). Sorted,
/// without repeats. Percent-encoded values are decoded (`orders%3Aread`); a value that
/// is not a well-formed scope is kept, so no key satisfies it (refused, never ignored).
pub fn required_scopes(headers: &HeaderMap, query: Option<&str>) -> Vec<String> {
    let mut lists: Vec<String> = headers
        .get_all("x-keyward-require-scope")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into())
        .collect();
    for pair in query.unwrap_or_default().split('&') {
        if let Some(("scope", value)) = pair.split_once('=') {
            lists.push(percent_decode(&value.replace('+', " ")));
        }
    }
    scope_union(lists.iter().map(String::as_str))
}

/// The scopes of lists separated by spaces or commas: sorted, without repeats.
fn scope_union<'a>(lists: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = lists
        .flat_map(|l| l.split([' ', ',']))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What may be logged of the URI of a request a client made, whose URL may carry its
/// key: the path without its query and fragment, percent-decoded, with every run of
/// key characters (`A-Z a-z 0-9 _ -`) that is 16 or more long (a key has at least 16
/// random bytes) or starts with one of `prefixes` (the key formats') replaced by
/// `<redacted>`.
pub fn loggable_uri(uri: &str, prefixes: &[&str]) -> String {
    let path = percent_decode(uri.split(['?', '#']).next().unwrap_or_default());
    let mut out = String::with_capacity(path.len());
    let mut token = String::new();
    let flush = |token: &mut String, out: &mut String| {
        let keyish = token.len() >= 16 || prefixes.iter().any(|p| !p.is_empty() && token.starts_with(p));
        out.push_str(if keyish { "<redacted>" } else { token });
        token.clear();
    };
    for c in path.chars() {
        if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
            token.push(c);
        } else {
            flush(&mut token, &mut out);
            out.push(c);
        }
    }
    flush(&mut token, &mut out);
    out
}

/// The `context_extensions` entry (Envoy's per-route `check_settings`) in which a route
/// lists the scopes it requires of a gRPC `Check`.
pub const SCOPE_EXTENSION: &str = "scope";

/// What an Envoy gRPC `Check` asks, in the terms `/v1/auth` reads.
#[derive(Debug, Default)]
pub struct CheckAsk {
    /// The client request's headers, from `headers` and from `header_map` (Envoy sends
    /// the raw form with `encode_raw_headers`): a name or value HTTP cannot carry is left
    /// out, as hyper would refuse it, and a header sent in both forms counts twice (so a
    /// key header seen twice is refused, as over HTTP).
    pub headers: HeaderMap,
    /// The client request's path (with its query), for logs.
    pub path: String,
    /// The scopes the route requires: `context_extensions["scope"]` and any
    /// `X-Keyward-Require-Scope` headers (the client's own query string is not read: the
    /// route, not the caller, says what it requires).
    pub required: Vec<String>,
}

/// Map a `Check` request. Pure, total: any request gives an ask (at worst one with no
/// key, refused as `MALFORMED`).
pub fn ask_of_check(req: &envoy_types::pb::envoy::service::auth::v3::CheckRequest) -> CheckAsk {
    let mut ask = CheckAsk::default();
    let Some(attributes) = &req.attributes else { return ask };
    let mut add = |name: &[u8], value: &[u8]| {
        if let (Ok(n), Ok(v)) = (header::HeaderName::from_bytes(name), header::HeaderValue::from_bytes(value))
        {
            ask.headers.append(n, v);
        }
    };
    if let Some(http) = attributes.request.as_ref().and_then(|r| r.http.as_ref()) {
        for (name, value) in &http.headers {
            add(name.as_bytes(), value.as_bytes());
        }
        for h in http.header_map.iter().flat_map(|m| &m.headers) {
            let value = if h.raw_value.is_empty() { h.value.as_bytes() } else { &h.raw_value };
            add(h.key.as_bytes(), value);
        }
        ask.path = http.path.clone();
    }
    let route = attributes.context_extensions.get(SCOPE_EXTENSION).map(String::as_str);
    let from_headers = required_scopes(&ask.headers, None);
    ask.required = scope_union(from_headers.iter().map(String::as_str).chain(route));
    ask
}

/// `%XX` decoded (invalid escapes are kept as they are).
fn percent_decode(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod scope_tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn required_scopes_are_the_union_of_query_and_headers() {
        let mut h = HeaderMap::new();
        assert!(required_scopes(&h, None).is_empty());
        assert!(required_scopes(&h, Some("x=1&scope=")).is_empty());
        h.append("x-keyward-require-scope", HeaderValue::from_static("orders:write, billing/read"));
        h.append("x-keyward-require-scope", HeaderValue::from_static("orders:write"));
        let got = required_scopes(&h, Some("scope=orders%3Aread+audit&y=2&scope=orders:read"));
        assert_eq!(got, ["audit", "billing/read", "orders:read", "orders:write"]);
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }

    #[test]
    fn what_is_logged_of_a_uri_has_no_query_and_no_key_like_segment() {
        let key = "kw_2bBbumlcWNIwiRMY8fBK4h4l6DsIRIFKsOpaOPWnBiZ4MA8LS";
        assert_eq!(loggable_uri(&format!("/orders/42?api_key={key}#x"), &["kw_"]), "/orders/42");
        assert_eq!(loggable_uri(&format!("/keys/{key}/use"), &["kw_"]), "/keys/<redacted>/use");
        assert_eq!(loggable_uri("/", &[""]), "/");
        // Percent-encoded, inside a segment, or of a format without a prefix.
        let bare = &key[3..];
        for uri in [format!("/k/kw%5F{bare}"), format!("/x;key={key}"), format!("/token:{bare}/a")] {
            let logged = loggable_uri(&uri, &["kw_", ""]);
            assert!(!logged.contains(bare) && logged.contains("<redacted>"), "{uri} → {logged}");
        }
        assert_eq!(loggable_uri("/orders/42/kw_x", &["kw_"]), "/orders/42/<redacted>");
        assert_eq!(loggable_uri("/orders/2026-11-24/items", &["kw_"]), "/orders/2026-11-24/items");
    }

    #[test]
    fn a_check_request_maps_headers_raw_headers_path_and_route_scopes() {
        use envoy_types::pb::envoy::config::core::v3::{HeaderMap as PbHeaderMap, HeaderValue as PbHeader};
        use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
        use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};

        assert!(ask_of_check(&CheckRequest::default()).headers.is_empty());
        let raw = |k: &str, v: &[u8]| PbHeader { key: k.into(), raw_value: v.to_vec(), ..Default::default() };
        let http = HttpRequest {
            path: "/orders/42?scope=ignored".into(),
            headers: [
                ("authorization".to_string(), "Bearer kw_a".to_string()),
                (":authority".into(), "shop".into()),
                ("x-keyward-require-scope".into(), "audit".into()),
            ]
            .into(),
            header_map: Some(PbHeaderMap { headers: vec![raw("X-Api-Key", b"kw_b"), raw("x-bad", b"\x00")] }),
            ..Default::default()
        };
        let req = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request { http: Some(http), ..Default::default() }),
                context_extensions: [("scope".to_string(), "orders:write, orders:read".to_string())].into(),
                ..Default::default()
            }),
        };
        let ask = ask_of_check(&req);
        assert_eq!(ask.path, "/orders/42?scope=ignored");
        assert_eq!(key_from_headers(&ask.headers), Some("kw_a"));
        assert_eq!(ask.headers.get("x-api-key").unwrap(), "kw_b");
        assert!(ask.headers.get("x-bad").is_none() && ask.headers.len() == 3, "{:?}", ask.headers);
        assert_eq!(ask.required, ["audit", "orders:read", "orders:write"]);
    }
}
