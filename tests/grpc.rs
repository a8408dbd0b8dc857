//! Envoy's gRPC `ext_authz` on the real API server: a tonic client sends `Check` as
//! Envoy does (headers as a map, or raw with `encode_raw_headers`; route scopes in
//! `context_extensions`) and sees the same verdicts as `/v1/auth`, the identity headers
//! for the upstream, the key and forged identities removed, and `grpc.health.v1`.

mod common;

use std::time::Duration;

use common::{TestNamespace, check_request, client, get_key, http, metric_sum, secret_data, verify_json};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use serde_json::json;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// What a `CheckResponse` says: (rpc code, HTTP status, headers set, headers removed, body).
#[derive(Debug)]
struct Said {
    rpc: i32,
    status: u16,
    headers: Vec<(String, String)>,
    removed: Vec<String>,
    body: String,
}

impl Said {
    fn of(r: CheckResponse) -> Said {
        let rpc = r.status.map(|s| s.code).unwrap_or(-1);
        let pairs = |h: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption]| {
            h.iter().filter_map(|o| o.header.as_ref()).map(|h| (h.key.clone(), h.value.clone())).collect()
        };
        match r.http_response {
            Some(HttpResponse::OkResponse(ok)) => Said {
                rpc,
                status: 200,
                headers: pairs(&ok.headers),
                removed: ok.headers_to_remove,
                body: String::new(),
            },
            Some(HttpResponse::DeniedResponse(d)) => Said {
                rpc,
                status: d.status.map_or(0, |s| s.code as u16),
                headers: pairs(&d.headers),
                removed: vec![],
                body: d.body,
            },
            other => panic!("no HTTP response: {other:?}"),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

async fn check(c: &mut AuthorizationClient<Channel>, req: CheckRequest) -> Said {
    Said::of(c.check(req).await.expect("a Check answer").into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_ext_authz_answers_the_http_matrix_with_identity_headers_and_never_the_key() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "grpc").await;
    let policy = ns.policy(&client, "p", json!({"expiry": {"maxLifetime": "P1D"}})).await;
    // Unused keys under this policy expire for inactivity after 6 s and stay expired.
    let idle_policy = ns
        .policy(
            &client,
            "idle",
            json!({"expiry": {"maxLifetime": "PT1H", "inactivityTimeout": "PT6S"}, "rotation": {"flipBefore": "PT1S"}}),
        )
        .await;
    let _controller = common::controller_for(&ns.name, &[], "info");
    let grpc_addr = format!("127.0.0.1:{}", common::free_port());
    let verifier = common::KeywardProcess::start(
        &["verifier", "--namespace", &ns.name, "--grpc-listen", &grpc_addr],
        // Debug: the requests' URIs are logged, and must carry no key.
        "info,keyward=debug",
    );
    verifier.wait_ready().await;
    let channel =
        Channel::from_shared(format!("http://{grpc_addr}")).unwrap().connect().await.expect("connect");
    let health = HealthClient::new(channel.clone());
    // SERVING once the index has synced (followed every 100 ms), for both names.
    for service in ["", "envoy.service.auth.v3.Authorization"] {
        common::eventually(&format!("gRPC health of {service:?}"), Duration::from_secs(5), || {
            let mut health = health.clone();
            async move {
                let got = health.check(HealthCheckRequest { service: service.into() }).await.ok()?;
                (got.into_inner().status == ServingStatus::Serving as i32).then_some(())
            }
        })
        .await;
    }
    let mut authz = AuthorizationClient::new(channel);

    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "team-a", "scopes": ["orders:read"]})).await;
    ns.apikey(&client, "idle", json!({"policy": idle_policy, "owner": "team-b"})).await;
    ns.apikey(&client, "gone", json!({"policy": policy, "owner": "team-c"})).await;
    let material = |name: &'static str| {
        let (client, ns) = (client.clone(), ns.name.clone());
        async move {
            common::eventually(name, Duration::from_secs(30), || async {
                secret_data(&client, &ns, name).await?.get("api-key").cloned()
            })
            .await
        }
    };
    let (key, idle, gone) = (material("svc").await, material("idle").await, material("gone").await);
    let bearer = format!("Bearer {key}");
    common::eventually("the verifier to know the key", Duration::from_secs(10), || async {
        (verify_json(&verifier.addr, &key)["code"] == "VALID").then_some(())
    })
    .await;

    // Valid, through either key header, in either header form: OK, the identity set
    // (overwriting forged copies), the key headers and unset identity headers removed.
    for raw in [false, true] {
        for (name, value) in [("Authorization", bearer.as_str()), ("X-Api-Key", key.as_str())] {
            let forged = [(name, value), ("X-Keyward-Owner", "admin"), ("X-Keyward-Code", "VALID")];
            let said = check(&mut authz, check_request(&forged, raw, None)).await;
            let what = format!("{name} raw={raw}: {said:?}");
            assert_eq!((said.rpc, said.status), (0, 200), "{what}");
            assert_eq!(said.header("x-keyward-namespace"), Some(ns.name.as_str()), "{what}");
            assert_eq!(said.header("x-keyward-apikey"), Some("svc"), "{what}");
            assert_eq!(said.header("x-keyward-owner"), Some("team-a"), "{what}");
            assert_eq!(said.header("x-keyward-scopes"), Some("orders:read"), "{what}");
            assert_eq!(said.header("x-keyward-code"), Some("VALID"), "{what}");
            assert!(said.header("x-keyward-client-id").is_some_and(|c| c.starts_with("kwc_")), "{what}");
            for h in ["authorization", "x-api-key"] {
                assert!(said.removed.iter().any(|r| r == h), "{h} removed: {what}");
            }
            assert!(!said.headers.iter().any(|(_, v)| v.contains(&key)), "the key is never echoed: {what}");
        }
    }
    // A client that puts its key in its URL: the verifier logs the URI without it.
    let mut in_url = check_request(&[("Authorization", &bearer)], false, None);
    let http_request = in_url.attributes.as_mut().unwrap().request.as_mut().unwrap().http.as_mut().unwrap();
    http_request.path = format!("/keys/{key}/x?api_key={key}");
    assert_eq!(check(&mut authz, in_url).await.status, 200);
    let over_http = format!("/v1/auth/keys/{key}?api_key={key}");
    assert_eq!(http(&verifier.addr, "GET", &over_http, &[("Authorization", &bearer)], b"").unwrap().0, 200);
    // The first use over gRPC is recorded (written at once, like HTTP's).
    common::eventually("lastUsedAt from the gRPC use", Duration::from_secs(10), || async {
        let k = get_key(&client, &ns.name, "svc").await;
        k.status?.keys.iter().any(|k| k.last_used_at.is_some()).then_some(())
    })
    .await;

    // Scopes per route (context_extensions), like ?scope= over HTTP.
    let said =
        check(&mut authz, check_request(&[("Authorization", &bearer)], false, Some("orders:read"))).await;
    assert_eq!(said.status, 200, "{said:?}");
    let said = check(
        &mut authz,
        check_request(&[("Authorization", &bearer)], false, Some("orders:read, orders:write")),
    )
    .await;
    assert_eq!((said.rpc, said.status), (7, 403), "{said:?}");
    assert_eq!(said.header("x-keyward-code"), Some("INSUFFICIENT_SCOPE"));
    assert!(
        said.header("www-authenticate").is_some_and(|w| w.contains(r#"error="insufficient_scope""#)),
        "{said:?}"
    );
    assert!(said.body.contains("INSUFFICIENT_SCOPE"), "{said:?}");

    // Refusals: 401 with the challenge and the code, as over HTTP (compared one by one).
    let random = keyward::keys::KeyFormat::default().generate().expose().to_string();
    let huge = "k".repeat(100_000);
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, bool);
    let cases: Vec<Case> = vec![
        ("random", vec![("Authorization", format!("Bearer {random}"))], false),
        ("malformed", vec![("X-Api-Key", "hello".into())], false),
        ("missing", vec![], false),
        ("oversized", vec![("X-Api-Key", huge.clone())], false),
        ("other scheme", vec![("Authorization", "Basic dXNlcjpwYXNz".into())], false),
        ("twice", vec![("Authorization", bearer.clone()), ("Authorization", bearer.clone())], true),
    ];
    for (what, headers, raw) in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let said = check(&mut authz, check_request(&headers, *raw, None)).await;
        assert_eq!((said.rpc, said.status), (16, 401), "{what}: {said:?}");
        let (code, head, _) = http(&verifier.addr, "GET", "/v1/auth", &headers, b"").unwrap();
        assert_eq!(code, 401, "{what} over HTTP");
        let grpc_code = said.header("x-keyward-code").unwrap().to_lowercase();
        assert!(head.contains(&format!("x-keyward-code: {grpc_code}")), "{what}: {grpc_code} vs {head}");
        assert_eq!(said.header("www-authenticate"), Some(r#"Bearer realm="keyward", error="invalid_token""#));
        assert!(said.body.contains(&said.header("x-keyward-code").unwrap().to_string()), "{what}: {said:?}");
    }
    // A message over the limit is refused by the transport; the server keeps serving.
    let too_big = "k".repeat(200_000);
    let err = authz.check(check_request(&[("X-Api-Key", &too_big)], false, None)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert_eq!(check(&mut authz, check_request(&[("X-Api-Key", &key)], false, None)).await.status, 200);

    // Expired (inactivity: it stays expired) and revoked: visible within 5 s.
    common::eventually("the idle key to expire", Duration::from_secs(30), || async {
        let said = check(&mut authz.clone(), check_request(&[("X-Api-Key", &idle)], false, None)).await;
        (said.header("x-keyward-code") == Some("EXPIRED") && said.status == 401).then_some(())
    })
    .await;
    let gone_id = common::eventually("gone's key ID", Duration::from_secs(10), || async {
        Some(get_key(&client, &ns.name, "gone").await.status?.keys.first()?.key_id.clone())
    })
    .await;
    assert_eq!(check(&mut authz, check_request(&[("X-Api-Key", &gone)], false, None)).await.status, 200);
    common::revoke_keys(&client, &ns.name, "gone", &[gone_id.as_str()]).await;
    let revoked = tokio::time::Instant::now();
    common::eventually("the revocation over gRPC", Duration::from_secs(5), || async {
        let said = check(&mut authz.clone(), check_request(&[("X-Api-Key", &gone)], false, None)).await;
        (said.header("x-keyward-code") == Some("REVOKED")).then_some(())
    })
    .await;
    eprintln!("revocation visible over gRPC after {:?}", revoked.elapsed());
    // A scope added: visible within 5 s.
    common::patch_key(&client, &ns.name, "svc", json!({"spec": {"scopes": ["orders:read", "orders:write"]}}))
        .await;
    common::eventually("the added scope over gRPC", Duration::from_secs(5), || async {
        let req = check_request(&[("Authorization", &bearer)], false, Some("orders:write"));
        (check(&mut authz.clone(), req).await.status == 200).then_some(())
    })
    .await;

    let metrics = verifier.get("/metrics").unwrap().1;
    let grpc_valid = metrics
        .lines()
        .find(|l| {
            l.starts_with("keyward_verify_requests_total{")
                && l.contains(r#"protocol="grpc""#)
                && l.contains(r#"code="VALID""#)
        })
        .unwrap_or_else(|| panic!("gRPC requests counted by protocol: {metrics}"));
    assert!(grpc_valid.contains(r#"endpoint="check""#), "{grpc_valid}");
    assert!(metric_sum(&metrics, "keyward_verify_requests_total") >= 20.0);
    let log = std::fs::read_to_string(&verifier.log).unwrap();
    for secret in [&key, &idle, &gone] {
        assert!(!log.contains(secret.as_str()), "key material in the verifier's log");
    }
    assert!(log.contains("/keys/<redacted>/x") && log.contains("ext_authz"), "the URIs are logged");
}
