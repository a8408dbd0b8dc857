//! The verifier's request parsing (`keyward::verifier::request`) on any bytes, and the
//! index's verdict on whatever key it finds.
//!
//! The input is used three ways: as a `POST /v1/verify` body; as header values (split at
//! the first `\n`: `Authorization`, then `X-Api-Key`, each only where it is a value
//! hyper would accept); and as a key wrapped in a well-formed body and headers.
//!
//! - A body is refused as not UTF-8 exactly when it is not; an accepted body is JSON
//!   whose `key` (an object field, or serde's one-element array form) is that string.
//! - A found key is trimmed, part of what was sent, and `Authorization` wins over
//!   `X-Api-Key`; `Bearer` is matched in any case.
//! - A request that sends `Authorization` (or, without one, `X-Api-Key`) twice gets no key.
//! - Wrapping any string as `{"key": ...}` or `Bearer ...`/`X-Api-Key` gives it back
//!   trimmed (for headers: when it is a valid header value and not blank).
//! - The index, holding one key of the default format, answers `VALID` for that key
//!   alone, `MALFORMED` for an empty key, one longer than `MAX_KEY_LEN` or one not of
//!   the format, and `NOT_FOUND` for any other.
#![no_main]

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};
use keyward::keys::{KeyFormat, MAX_KEY_LEN};
use keyward::verifier::request::{BodyError, key_from_body, key_from_headers};
use keyward::verifier::{Code, Index};
use libfuzzer_sys::fuzz_target;

#[path = "held.rs"]
mod held;
use held::HELD;

static INDEX: LazyLock<Index> = LazyLock::new(|| held::index(&[]));

fuzz_target!(|data: &[u8]| {
    let index = &*INDEX;
    let now = DateTime::<Utc>::UNIX_EPOCH;

    // The input as a body.
    match key_from_body(data) {
        Ok(key) => {
            let text = std::str::from_utf8(data).expect("a body that is not UTF-8 was accepted");
            match serde_json::from_str::<serde_json::Value>(text) {
                Ok(value) => {
                    let field = match &value {
                        serde_json::Value::Object(map) => map.get("key"),
                        serde_json::Value::Array(items) => items.first(),
                        other => panic!("accepted {other:?}"),
                    };
                    let sent = field.and_then(|v| v.as_str()).expect("accepted a body without a string key");
                    assert_eq!(key, sent.trim());
                }
                // Fields other than `key` are skipped unparsed, so `{"key": "k", "n": 1e999}`
                // is accepted although a Value cannot hold 1e999; nothing else may differ.
                Err(e) => assert!(e.to_string().starts_with("number out of range"), "{e}: {text:?}"),
            }
            verdict_fits(index, &key, now);
        }
        Err(BodyError::NotUtf8) => assert!(std::str::from_utf8(data).is_err()),
        Err(BodyError::NotJson) => assert!(std::str::from_utf8(data).is_ok()),
    }

    // The input as headers.
    let (auth, api_key) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let auth = HeaderValue::from_bytes(auth).ok();
    let api_key = api_key.and_then(|v| HeaderValue::from_bytes(v).ok());
    let mut headers = HeaderMap::new();
    if let Some(v) = &auth {
        headers.insert(AUTHORIZATION, v.clone());
    }
    if let Some(v) = &api_key {
        headers.insert("x-api-key", v.clone());
    }
    let readable = |v: &Option<HeaderValue>| v.as_ref().and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (auth_text, api_key_text) = (readable(&auth), readable(&api_key));
    if let Some(key) = key_from_headers(&headers) {
        assert_eq!(key, key.trim());
        match &auth_text {
            Some(a) => {
                assert!(a.trim().get(..6).is_some_and(|s| s.eq_ignore_ascii_case("bearer")), "{a:?}");
                assert!(a.trim_end().ends_with(key), "{key:?} is not the end of {a:?}");
            }
            None => assert_eq!(Some(key), api_key_text.as_deref().map(str::trim)),
        }
        verdict_fits(index, key, now);
    } else {
        assert!(auth_text.is_some() || api_key_text.is_none(), "X-Api-Key {api_key_text:?} was ignored");
    }

    // Any header sent twice is refused whatever else is there: a proxy and its upstream
    // could read different copies.
    for name in [AUTHORIZATION.as_str(), "x-api-key"] {
        if let Some(v) = if name == "x-api-key" { &api_key } else { &auth } {
            let mut twice = headers.clone();
            twice.remove(AUTHORIZATION);
            twice.append(name, v.clone());
            twice.append(name, v.clone());
            assert_eq!(key_from_headers(&twice), None, "{name} sent twice");
        }
    }

    // The input as a key, wrapped the ways clients send it.
    let sent = String::from_utf8_lossy(data);
    let body = serde_json::json!({ "key": sent }).to_string();
    assert_eq!(key_from_body(body.as_bytes()).as_deref(), Ok(sent.trim()), "{body}");
    verdict_fits(index, sent.trim(), now);
    if let Ok(v) = HeaderValue::from_str(&sent) {
        // hyper passes obs-text (bytes 0x80..=0xff) through; such a value is not read,
        // and an unreadable Authorization leaves the word to X-Api-Key.
        let readable = v.to_str().is_ok();
        let expected =
            if readable { (!sent.trim().is_empty()).then(|| sent.trim()) } else { Some("kw_fallback") };
        for scheme in ["Bearer", "bearer", "BEARER"] {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, HeaderValue::from_str(&format!("{scheme} {sent}")).unwrap());
            h.insert("x-api-key", HeaderValue::from_static("kw_fallback"));
            assert_eq!(key_from_headers(&h), expected, "{scheme} {sent:?}");
        }
        let mut h = HeaderMap::new();
        h.insert("x-api-key", v);
        assert_eq!(key_from_headers(&h), readable.then(|| sent.trim()));
    }
});

/// What the index says about a found key.
fn verdict_fits(index: &Index, key: &str, now: DateTime<Utc>) {
    let verdict = index.verify(key, now);
    let expected = if key == HELD {
        Code::Valid
    } else if key.is_empty() || key.len() > MAX_KEY_LEN || KeyFormat::default().check(key).is_err() {
        Code::Malformed
    } else {
        Code::NotFound
    };
    assert_eq!(verdict.code, expected, "{key:?}");
    assert_eq!(verdict.entry.is_some(), expected == Code::Valid, "{key:?}");
}
