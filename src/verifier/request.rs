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
    let mut out: Vec<String> = Vec::new();
    let mut add = |list: &str| {
        out.extend(list.split([' ', ',']).map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned));
    };
    for v in headers.get_all("x-keyward-require-scope") {
        add(&String::from_utf8_lossy(v.as_bytes()));
    }
    for pair in query.unwrap_or_default().split('&') {
        if let Some(("scope", value)) = pair.split_once('=') {
            add(&percent_decode(&value.replace('+', " ")));
        }
    }
    out.sort();
    out.dedup();
    out
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
}
