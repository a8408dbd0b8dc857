//! The gRPC `ext_authz` mapping (`keyward::verifier::request::ask_of_check`) and its answer
//! (`decision::decide`, `decision::check_response`) on any input, as `verify_request`
//! covers HTTP.
//!
//! The input is read two ways. As protobuf bytes of a `CheckRequest` (whatever prost
//! decodes). And as lines describing one: `h name: value` a header, `x scopes` the
//! route's `context_extensions["scope"]`, `p path` the path; that request is sent both
//! as Envoy's header map (`headers`, duplicates joined with ",") and raw (`header_map`).
//!
//! - Mapping never panics; the required scopes are sorted, without repeats, and include
//!   every scope listed in the context extension.
//! - The index holds one key (scopes `orders:read`, `audit`). The answer is `OK` exactly
//!   when that key was found and every required scope is one of the key's; otherwise 401
//!   (`UNAUTHENTICATED`) or, for a valid key without a required scope, 403
//!   (`PERMISSION_DENIED`).
//! - An allow sets only identity headers, removes both key headers and every identity
//!   header it does not set, and no header value it sets contains the key.
//! - The header-map and raw forms of a request whose header names are all different
//!   get the same verdict.
#![no_main]

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap as PbHeaderMap, HeaderValue as PbHeader};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use keyward::verifier::decision::{IDENTITY_HEADERS, KEY_HEADERS, check_response, decide};
use keyward::verifier::request::{SCOPE_EXTENSION, ask_of_check, key_from_headers};
use keyward::verifier::{Code, Index};
use libfuzzer_sys::fuzz_target;
use prost::Message;

#[path = "held.rs"]
mod held;
use held::HELD;

const HELD_SCOPES: [&str; 2] = ["audit", "orders:read"];

static INDEX: LazyLock<Index> = LazyLock::new(|| held::index(&HELD_SCOPES));

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = CheckRequest::decode(data) {
        answer_fits(&req);
    }
    let text = String::from_utf8_lossy(data);
    let (mut headers, mut scope, mut path) = (Vec::new(), None, String::new());
    for line in text.lines() {
        match line.split_at_checked(2) {
            Some(("h ", rest)) => {
                let (name, value) = rest.split_once(':').unwrap_or((rest, ""));
                headers.push((name.trim().to_ascii_lowercase(), value.trim_start().to_string()));
            }
            Some(("x ", rest)) => scope = Some(rest.to_string()),
            Some(("p ", rest)) => path = rest.to_string(),
            _ => {}
        }
    }
    let request = |http: HttpRequest| CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request { http: Some(http), ..Default::default() }),
            context_extensions: scope.iter().map(|s| (SCOPE_EXTENSION.to_string(), s.clone())).collect(),
            ..Default::default()
        }),
    };
    let mut map = std::collections::HashMap::<String, String>::new();
    for (k, v) in &headers {
        map.entry(k.clone()).and_modify(|old| *old = format!("{old},{v}")).or_insert_with(|| v.clone());
    }
    let raw = headers
        .iter()
        .map(|(k, v)| PbHeader { key: k.clone(), raw_value: v.as_bytes().to_vec(), ..Default::default() })
        .collect();
    let as_map = request(HttpRequest { headers: map, path: path.clone(), ..Default::default() });
    let as_raw =
        request(HttpRequest { header_map: Some(PbHeaderMap { headers: raw }), path, ..Default::default() });
    let (a, b) = (answer_fits(&as_map), answer_fits(&as_raw));
    let mut names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    names.sort();
    names.dedup();
    if names.len() == headers.len() {
        assert_eq!(a, b, "the header map and raw forms of {headers:?} differ");
    }
    if let Some(s) = &scope {
        let ask = ask_of_check(&as_map);
        for listed in s.split([' ', ',']).map(str::trim).filter(|s| !s.is_empty()) {
            assert!(ask.required.iter().any(|r| r == listed), "{listed:?} not required: {:?}", ask.required);
        }
    }
});

/// Map, verify, decide and render `req`, checking the properties above; the code.
fn answer_fits(req: &CheckRequest) -> Code {
    let now = DateTime::<Utc>::UNIX_EPOCH;
    let ask = ask_of_check(req);
    assert!(ask.required.windows(2).all(|w| w[0] < w[1]), "{:?}", ask.required);
    let key = key_from_headers(&ask.headers).unwrap_or_default();
    let mut verdict = INDEX.verify(key, now);
    let scoped = ask.required.iter().all(|r| HELD_SCOPES.contains(&r.as_str()));
    if verdict.code == Code::Valid && !scoped {
        verdict.code = Code::InsufficientScope;
    }
    let decision = decide(&verdict, &ask.required);
    let response = check_response(&decision);
    let rpc = response.status.as_ref().map(|s| s.code);
    match response.http_response.expect("an HTTP response") {
        HttpResponse::OkResponse(ok) => {
            assert!(key == HELD && scoped, "allowed {key:?} requiring {:?}", ask.required);
            assert_eq!(rpc, Some(0));
            let set: Vec<&str> = ok.headers.iter().map(|h| h.header.as_ref().unwrap().key.as_str()).collect();
            assert!(set.iter().all(|h| IDENTITY_HEADERS.contains(h)), "{set:?}");
            for h in KEY_HEADERS.iter().chain(IDENTITY_HEADERS.iter().filter(|h| !set.contains(h))) {
                assert!(ok.headers_to_remove.iter().any(|r| r == h), "{h} neither set nor removed");
            }
            assert!(ok.headers.iter().all(|h| !h.header.as_ref().unwrap().value.contains(HELD)));
        }
        HttpResponse::DeniedResponse(denied) => {
            assert!(key != HELD || !scoped);
            let status = denied.status.map(|s| s.code);
            if verdict.code == Code::InsufficientScope {
                assert_eq!((rpc, status), (Some(7), Some(403)));
            } else {
                assert_eq!((rpc, status), (Some(16), Some(401)), "{:?}", verdict.code);
            }
            assert!(
                !denied.body.contains(HELD)
                    && denied.headers.iter().all(|h| !h.header.as_ref().unwrap().value.contains(HELD))
            );
        }
        other => panic!("{other:?}"),
    }
    verdict.code
}
