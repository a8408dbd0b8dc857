//! The verifier end to end: real nginx (`auth_request`) in front of a tiny upstream,
//! keyward's controller and verifier, a client that reads `api-key` from the Secret
//! before every request (as a mounted file would) across flips and regenerations;
//! the JSON API and its limits; and last-use tracking feeding inactivity expiry.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::{TestNamespace, client, get_key, http, metric_sum, ready, secret_data, verify_json, wait_key};
use keyward::api::KeyState;
use serde_json::json;

/// A proxy (nginx, Caddy) running from a scratch directory, listening on `front`.
struct Proxy {
    child: std::process::Child,
    front: String,
    _dir: std::path::PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    /// `child`, once it accepts connections on 127.0.0.1:`port`.
    async fn listening(what: &str, child: std::process::Child, port: u16, dir: std::path::PathBuf) -> Proxy {
        let front = format!("127.0.0.1:{port}");
        let f = front.clone();
        common::eventually(&format!("{what} to listen"), Duration::from_secs(20), || {
            let f = f.clone();
            async move { std::net::TcpStream::connect(&f).ok().map(|_| ()) }
        })
        .await;
        Proxy { child, front, _dir: dir }
    }
}

/// The example file `name` under `examples/` with each (from, to) replaced (each `from`
/// must be there: the test runs the example as users read it).
fn example_with(name: &str, replace: &[(&str, String)]) -> String {
    let mut text =
        std::fs::read_to_string(format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    for (from, to) in replace {
        assert!(text.contains(from), "the example has {from}");
        text = text.replace(from, to);
    }
    text
}

fn nginx_binary() -> String {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("nginx from Debian (hack/test.sh installs it)")
        .to_string()
}

/// nginx running `examples/nginx-auth-request.conf` itself (its upstream addresses and
/// port replaced) in front of an upstream that echoes the identity headers it receives.
async fn nginx(verifier: &str) -> Proxy {
    let dir = std::env::temp_dir().join(format!("keyward-nginx-{}", rand::random::<u64>()));
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let (front, upstream) = (common::free_port(), common::free_port());
    let server = example_with(
        "nginx-auth-request.conf",
        &[
            ("keyward-verifier.keyward-system.svc:8081", verifier.to_string()),
            ("payments.payments.svc:8080", format!("127.0.0.1:{upstream}")),
            ("listen 8080;", format!("listen 127.0.0.1:{front};")),
        ],
    );
    let d = dir.display();
    let conf = format!(
        r#"daemon off; master_process off; worker_processes 1;
error_log {d}/error.log; pid {d}/nginx.pid;
events {{ worker_connections 512; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  server {{
    listen 127.0.0.1:{upstream};
    location / {{
      return 200 "upstream ok owner=$http_x_keyward_owner namespace=$http_x_keyward_namespace apikey=$http_x_keyward_apikey key-id=$http_x_keyward_key_id client-id=$http_x_keyward_client_id scopes=$http_x_keyward_scopes authorization=$http_authorization\n";
    }}
  }}
{server}
}}
"#
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = std::process::Command::new(nginx_binary())
        .args(["-p", &dir.display().to_string(), "-c", &dir.join("nginx.conf").display().to_string()])
        .spawn()
        .expect("start nginx");
    Proxy::listening("nginx", child, front, dir).await
}

/// A request through nginx with `key` (and `extra` headers): status and the upstream's echo.
fn via_nginx(front: &str, key: &str, extra: &[(&str, &str)]) -> (u16, String) {
    let auth = format!("Bearer {key}");
    let mut headers = vec![("Authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    http(front, "GET", "/orders", &headers, b"").map_or((0, String::new()), |(code, _, body)| (code, body))
}

fn through_nginx(front: &str, key: &str) -> u16 {
    let (code, body) = via_nginx(front, key, &[]);
    if code == 200 {
        assert!(body.starts_with("upstream ok owner=team-a namespace=kw-"), "{body}");
        assert!(body.contains("authorization=\n"), "the key does not reach the upstream: {body}");
    }
    code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_never_rejects_the_current_key_across_flips() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "nginx").await;
    let policy =
        ns.policy(&client, "p", json!({"expiry": {"maxLifetime": "PT20S", "minLifetime": "PT1S"}})).await;
    let _controller = common::controller_for(&ns.name, &[], "info");
    let verifier = common::verifier_for(&ns.name);
    verifier.wait_ready().await;
    let nginx = nginx(&verifier.addr).await;
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "team-a"})).await;
    common::eventually("the first key in the Secret", Duration::from_secs(30), || async {
        secret_data(&client, &ns.name, "svc").await?.get("api-key").cloned()
    })
    .await;

    // 50 s: flips at 15, 25, 35, 45 s; regenerations at 20, 30, 40 s.
    let started = tokio::time::Instant::now();
    let (mut sent, mut rejected) = (0u32, Vec::new());
    let mut keys_used: Vec<String> = Vec::new();
    let mut first_key: Option<String> = None;
    while started.elapsed() < Duration::from_secs(50) {
        let data = secret_data(&client, &ns.name, "svc").await.unwrap();
        let key = data["api-key"].clone();
        first_key.get_or_insert_with(|| key.clone());
        if keys_used.last() != Some(&key) {
            keys_used.push(key.clone());
        }
        let code = through_nginx(&nginx.front, &key);
        sent += 1;
        if code != 200 {
            rejected.push((started.elapsed(), code));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(keys_used.len() >= 4, "at least two flips and regenerations: {} keys", keys_used.len());
    assert!(
        rejected.is_empty(),
        "{} of {sent} requests with the current key were rejected: {rejected:?}",
        rejected.len()
    );
    eprintln!("{sent} requests through nginx, {} keys, 0 rejected", keys_used.len());

    // A random well-formed key, an expired key and a revoked key get 401.
    let random = keyward::keys::KeyFormat::default().generate();
    assert_eq!(through_nginx(&nginx.front, random.expose()), 401);
    assert_eq!(through_nginx(&nginx.front, "not-a-key"), 401);
    assert_eq!(
        through_nginx(&nginx.front, first_key.as_deref().unwrap()),
        401,
        "the first key expired long ago"
    );
    // A standby key with a few seconds of life left, read as one consistent pair: its
    // material in the Secret has the hash status lists for it. (A slot's new material
    // reaches the Secret before its hash reaches status, and a draining standby may be
    // about to expire: either would make the check below race the lifecycle.)
    let (standby_material, standby_id) =
        common::eventually("a standby key valid for 8 s more", Duration::from_secs(30), || async {
            let status = get_key(&client, &ns.name, "svc").await.status?;
            let data = secret_data(&client, &ns.name, "svc").await?;
            let soon = Utc::now() + chrono::TimeDelta::seconds(8);
            status.keys.iter().find_map(|k| {
                let material = data.get(k.slot.data_key())?;
                (k.state == KeyState::Standby
                    && k.effective_expires_at.is_some_and(|t| t > soon)
                    && keyward::keys::hash(material) == k.hash)
                    .then(|| (material.clone(), k.key_id.clone()))
            })
        })
        .await;
    common::eventually("the standby to verify too", Duration::from_secs(5), || async {
        (through_nginx(&nginx.front, &standby_material) == 200).then_some(())
    })
    .await;
    let revoked_at = tokio::time::Instant::now();
    common::revoke_keys(&client, &ns.name, "svc", &[standby_id.as_str()]).await;
    common::eventually("the revoked key to be refused", Duration::from_secs(5), || async {
        (through_nginx(&nginx.front, &standby_material) == 401).then_some(())
    })
    .await;
    eprintln!("revocation visible after {:?}", revoked_at.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_api_answers_codes_and_refuses_bad_requests() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "verify").await;
    let policy = ns.policy(&client, "p", json!({"expiry": {"maxLifetime": "P1D"}})).await;
    let _controller = common::controller_for(&ns.name, &[], "info");
    let verifier = common::verifier_for(&ns.name);
    verifier.wait_ready().await;
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "team-a"})).await;
    let key = common::eventually("the key", Duration::from_secs(30), || async {
        secret_data(&client, &ns.name, "svc").await?.get("api-key").cloned()
    })
    .await;
    let post = |body: &[u8]| {
        http(&verifier.addr, "POST", "/v1/verify", &[("Content-Type", "application/json")], body)
    };
    let answer = |k: &str| verify_json(&verifier.addr, k);
    let ok = common::eventually("the verifier to know the key", Duration::from_secs(10), || async {
        let v = answer(&key);
        (v["code"] == "VALID").then_some(v)
    })
    .await;
    assert_eq!(ok["valid"], true);
    assert_eq!(ok["apiKey"], json!({"namespace": ns.name, "name": "svc"}));
    assert_eq!(ok["owner"], "team-a");
    assert!(ok["clientId"].as_str().unwrap().starts_with("kwc_"));
    assert!(ok["keyId"].is_string() && ok["slot"] == "Primary" && ok["expiresAt"].is_string());
    assert_eq!(answer(keyward::keys::KeyFormat::default().generate().expose())["code"], "NOT_FOUND");
    for bad in ["", "kw_", "hello", &format!("{key}x"), &"k".repeat(1000)] {
        let v = answer(bad);
        assert_eq!((v["valid"].clone(), v["code"].clone()), (json!(false), json!("MALFORMED")), "{bad:.20}");
    }
    // Bad requests: never a panic or a hang.
    assert_eq!(post(b"{not json").unwrap().0, 400);
    assert_eq!(post(b"{\"key\": 5}").unwrap().0, 400);
    assert_eq!(post(&[0xff, 0xfe, 0x00]).unwrap().0, 400);
    assert_eq!(post(&vec![b'a'; 64 * 1024]).unwrap().0, 413);
    let (code, head, _) = http(&verifier.addr, "GET", "/v1/auth", &[("X-Api-Key", &key)], b"").unwrap();
    assert_eq!(code, 200);
    for h in [
        format!("x-keyward-namespace: {}", ns.name),
        "x-keyward-apikey: svc".into(),
        "x-keyward-owner: team-a".into(),
        "x-keyward-key-id: ".into(),
        "x-keyward-client-id: kwc_".into(),
        // Envoy's HTTP mode removes the key and the identity headers not set (a client's
        // forged X-Keyward-Scopes) before the upstream.
        "x-envoy-auth-headers-to-remove: authorization, x-api-key, x-keyward-scopes".into(),
    ] {
        assert!(head.contains(&h), "{h} in {head}");
    }
    let (code, head, _) = http(&verifier.addr, "GET", "/v1/auth", &[], b"").unwrap();
    assert_eq!(code, 401);
    assert!(head.contains("x-keyward-code: malformed"), "{head}");
    assert!(head.contains(r#"www-authenticate: bearer realm="keyward", error="invalid_token""#), "{head}");
    // The forward-auth contract (Traefik, Caddy, nginx, Envoy HTTP): any method, every
    // path under /v1/auth/ (Envoy appends the original path), either key header, any body.
    let bearer = format!("Bearer {key}");
    let unknown = keyward::keys::KeyFormat::default().generate().expose().to_string();
    let unknown_bearer = format!("Bearer {unknown}");
    for method in ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"] {
        for path in ["/v1/auth", "/v1/auth/", "/v1/auth/orders/42", "/v1/auth/a/b/c?x=1&y=%2F"] {
            for (header, good, bad) in [
                ("Authorization", bearer.as_str(), unknown_bearer.as_str()),
                ("X-Api-Key", key.as_str(), unknown.as_str()),
            ] {
                let what = format!("{method} {path} {header}");
                let (code, head, _) =
                    http(&verifier.addr, method, path, &[(header, good)], b"{\"ignored\": true}")
                        .expect(&what);
                assert_eq!(code, 200, "{what}: {head}");
                assert!(head.contains(&format!("x-keyward-namespace: {}", ns.name)), "{what}: {head}");
                let (code, head, _) = http(&verifier.addr, method, path, &[(header, bad)], b"").expect(&what);
                assert_eq!(code, 401, "{what}: {head}");
                assert!(
                    head.contains("www-authenticate: bearer realm=\"keyward\"")
                        && head.contains("x-keyward-code: not_found"),
                    "{what}: {head}"
                );
            }
        }
    }
    // Oversized and repeated key headers: a decision (401 MALFORMED), not a dropped
    // connection; the same key sent twice is refused too (a proxy and its upstream could
    // read different copies).
    let huge = "k".repeat(100_000);
    let bearer = format!("Bearer {key}");
    for headers in [
        vec![("X-Api-Key", huge.as_str())],
        vec![("Authorization", &format!("Bearer {huge}"))],
        vec![("Authorization", bearer.as_str()), ("Authorization", bearer.as_str())],
        vec![("X-Api-Key", key.as_str()), ("X-Api-Key", key.as_str())],
    ] {
        let (code, head, _) = http(&verifier.addr, "GET", "/v1/auth", &headers, b"").expect("an answer");
        assert_eq!(code, 401, "{:.60?}", headers);
        assert!(head.contains("x-keyward-code: malformed") && !head.contains("x-keyward-owner"), "{head}");
    }
    assert_eq!(verifier.get("/healthz").unwrap().0, 200, "still serving");
    let metrics = verifier.get("/metrics").unwrap().1;
    assert!(metric_sum(&metrics, "keyward_verify_requests_total") >= 10.0, "{metrics}");
    assert!(metrics.contains("keyward_verify_duration_seconds_bucket"));
    assert!(metrics.contains("keyward_verifier_index_keys 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_use_is_written_at_most_once_a_minute_and_keeps_used_keys_alive() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "usage").await;
    let policy = ns
        .policy(&client, "p", json!({"expiry": {"maxLifetime": "PT1H", "inactivityTimeout": "PT90S"}, "rotation": {"flipBefore": "PT2S"}}))
        .await;
    let _controller = common::controller_for(&ns.name, &[], "info");
    let verifier = common::verifier_for(&ns.name);
    verifier.wait_ready().await;
    ns.apikey(&client, "used", json!({"policy": policy, "owner": "a"})).await;
    ns.apikey(&client, "idle", json!({"policy": policy, "owner": "b"})).await;
    let key = common::eventually("the used key", Duration::from_secs(30), || async {
        secret_data(&client, &ns.name, "used").await?.get("api-key").cloned()
    })
    .await;
    let started = tokio::time::Instant::now();
    let mut last_seen = None;
    let mut advanced = 0;
    while started.elapsed() < Duration::from_secs(130) {
        let code =
            http(&verifier.addr, "GET", "/v1/auth", &[("Authorization", &format!("Bearer {key}"))], b"")
                .unwrap()
                .0;
        assert_eq!(code, 200, "the used key stays valid at {:?}", started.elapsed());
        let used = get_key(&client, &ns.name, "used").await;
        let at = used
            .status
            .as_ref()
            .and_then(|s| s.keys.iter().find(|k| k.state == KeyState::Active))
            .and_then(|k| k.last_used_at);
        if at.is_some() && at != last_seen {
            advanced += 1;
            last_seen = at;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let writes = metric_sum(&verifier.get("/metrics").unwrap().1, "keyward_verifier_usage_writes_total");
    eprintln!("lastUsedAt advanced {advanced} times, {writes} writes in 130 s of traffic");
    assert!((2.0..=3.0).contains(&writes), "at most one write per key per minute: {writes}");
    assert!(advanced >= 2, "lastUsedAt advances under traffic");
    assert!(last_seen.unwrap() > Utc::now() - chrono::TimeDelta::seconds(70));
    let used = get_key(&client, &ns.name, "used").await;
    assert_eq!(ready(&used).unwrap().1, "KeyActive");
    let idle = wait_key(&client, &ns.name, "idle", Duration::from_secs(30), |k| ready(k).map(|r| r.1)).await;
    assert_eq!(idle, "KeyExpiredInactive", "the unused key expired for inactivity");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_namespace_can_neither_revoke_our_keys_nor_claim_our_identity() {
    let client = client().await;
    let a = TestNamespace::new(&client, "tenant-a").await;
    let b = TestNamespace::new(&client, "tenant-b").await;
    let spec = json!({"expiry": {"maxLifetime": "PT1H"}});
    let pa = a.policy(&client, "p", spec.clone()).await;
    let pb = b.policy(&client, "p", spec).await;
    let _ca = common::controller_for(&a.name, &[], "info");
    let _cb = common::controller_for(&b.name, &[], "info");
    // One verifier for every namespace, as the chart installs it.
    let verifier = common::KeywardProcess::start(&["verifier"], "info");
    verifier.wait_ready().await;
    let nginx = nginx(&verifier.addr).await;
    a.apikey(&client, "checkout", json!({"policy": pa, "owner": "payments"})).await;
    b.apikey(&client, "mallory", json!({"policy": pb, "owner": "payments"})).await;
    let mut keys = Vec::new();
    for (ns, name) in [(&a.name, "checkout"), (&b.name, "mallory")] {
        let key = common::eventually("the key", Duration::from_secs(30), || async {
            secret_data(&client, ns, name).await?.get("api-key").cloned()
        })
        .await;
        let v = common::eventually("the verifier to know the key", Duration::from_secs(10), || async {
            let v = verify_json(&verifier.addr, &key);
            (v["code"] == "VALID").then_some(v)
        })
        .await;
        assert_eq!(v["apiKey"], json!({"namespace": ns, "name": name}), "told apart by namespace and name");
        assert_eq!(v["owner"], "payments", "the owner is the same free text in both");
        keys.push(key);
    }
    let (key_a, key_b) = (keys[0].clone(), keys[1].clone());

    // Through the documented nginx configuration: the upstream sees who called, and
    // identity headers a caller injects never reach it.
    let injected = [
        ("X-Keyward-Owner", "admin"),
        ("X-Keyward-Namespace", "kube-system"),
        ("x-keyward-apikey", "root"),
        ("X-Keyward-Key-Id", "0000000000000000"),
        ("X-Keyward-Scopes", "admin"),
        ("X-Keyward-Owner", "admin-again"),
    ];
    for (key, ns, name) in [(&key_a, &a.name, "checkout"), (&key_b, &b.name, "mallory")] {
        let (code, body) = via_nginx(&nginx.front, key, &injected);
        assert_eq!(code, 200, "{body}");
        let expected = format!("upstream ok owner=payments namespace={ns} apikey={name} key-id=");
        assert!(body.starts_with(&expected), "{body}");
        assert!(!body.contains("admin") && !body.contains("root") && !body.contains("kube-system"), "{body}");
        assert!(body.contains("scopes= authorization=\n"), "{body}");
    }
    let (code, _, body) = http(&nginx.front, "GET", "/orders", &injected, b"").unwrap();
    assert_eq!(code, 401, "injected identity without a key: {body}");
    assert!(!body.contains("upstream ok"));

    // B lists A's key IDs (public: status, Events, X-Keyward-Key-Id) in its revokedKeys,
    // together with its own active key, whose refusal shows the verifier has the change.
    let a_before = get_key(&client, &a.name, "checkout").await;
    let a_ids: Vec<String> =
        a_before.status.iter().flat_map(|s| s.keys.iter().map(|k| k.key_id.clone())).collect();
    let b_active = common::active(&get_key(&client, &b.name, "mallory").await).unwrap().key_id;
    let mut listed: Vec<&str> = a_ids.iter().map(String::as_str).collect();
    listed.push(&b_active);
    common::revoke_keys(&client, &b.name, "mallory", &listed).await;
    common::eventually("B's own key to be revoked", Duration::from_secs(5), || async {
        (verify_json(&verifier.addr, &key_b)["code"] == "REVOKED").then_some(())
    })
    .await;
    let v = verify_json(&verifier.addr, &key_a);
    assert_eq!(
        (v["code"].as_str(), v["apiKey"]["namespace"].as_str()),
        (Some("VALID"), Some(a.name.as_str()))
    );
    assert_eq!(via_nginx(&nginx.front, &key_a, &[]).0, 200, "A's key still passes nginx");
    // B's controller acts on B's list (a new active key for B); A's keys stay as they were.
    wait_key(&client, &b.name, "mallory", Duration::from_secs(30), |k| {
        let s = k.status.as_ref()?;
        (s.observed_generation == k.metadata.generation && common::active(k)?.key_id != b_active)
            .then_some(())
    })
    .await;
    let a_after = get_key(&client, &a.name, "checkout").await;
    let ids_after: Vec<String> =
        a_after.status.iter().flat_map(|s| s.keys.iter().map(|k| k.key_id.clone())).collect();
    assert_eq!(ids_after, a_ids, "A's keys were not touched");
    assert!(a_after.status.unwrap().keys.iter().all(|k| k.state != KeyState::Revoked));
    assert_eq!(
        ready(&get_key(&client, &a.name, "checkout").await).unwrap(),
        ("True".into(), "KeyActive".into())
    );
    assert_eq!(verify_json(&verifier.addr, &key_a)["code"], "VALID");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_verifier_replicas_write_last_use_once_per_interval_in_total() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "replicas").await;
    let policy = ns.policy(&client, "p", json!({"expiry": {"maxLifetime": "PT1H"}})).await;
    let _controller = common::controller_for(&ns.name, &[], "info");
    let replicas: Vec<_> = (0..2)
        .map(|_| {
            common::KeywardProcess::start(
                &["verifier", "--namespace", &ns.name, "--usage-flush-interval", "PT10S"],
                "info",
            )
        })
        .collect();
    for r in &replicas {
        r.wait_ready().await;
    }
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "a"})).await;
    let key = common::eventually("the key", Duration::from_secs(30), || async {
        secret_data(&client, &ns.name, "svc").await?.get("api-key").cloned()
    })
    .await;
    let auth = format!("Bearer {key}");
    // Counted from before the first request, so every write falls inside.
    let started = tokio::time::Instant::now();
    for r in &replicas {
        common::eventually("each replica to know the key", Duration::from_secs(10), || async {
            (http(&r.addr, "GET", "/v1/auth", &[("Authorization", &auth)], b"")?.0 == 200).then_some(())
        })
        .await;
    }
    // 45 s of traffic spread over both replicas (as a Service would), watching lastUsedAt.
    let mut values = std::collections::BTreeSet::new();
    let mut sent = 0u32;
    while started.elapsed() < Duration::from_secs(45) {
        for r in &replicas {
            let code = http(&r.addr, "GET", "/v1/auth", &[("Authorization", &auth)], b"").unwrap().0;
            assert_eq!(code, 200);
            sent += 1;
        }
        if let Some(t) = common::active(&get_key(&client, &ns.name, "svc").await).and_then(|k| k.last_used_at)
        {
            values.insert(t);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let per_replica: Vec<f64> = replicas
        .iter()
        .map(|r| metric_sum(&r.get("/metrics").unwrap().1, "keyward_verifier_usage_writes_total"))
        .collect();
    let writes: f64 = per_replica.iter().sum();
    eprintln!(
        "{sent} requests in {elapsed:.0} s: {writes} lastUsedAt writes ({per_replica:?}), {} values seen",
        values.len()
    );
    // At most one write per 10 s interval in total (plus the first), not one per replica.
    let most = (elapsed / 10.0).floor() + 1.0;
    assert!(writes <= most, "{writes} writes in {elapsed:.0} s: at most {most}");
    assert!(writes >= 3.0, "last use keeps being written under traffic: {writes}");
    assert!(values.len() >= 3, "lastUsedAt advanced under traffic: {values:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verifier_that_loses_its_watch_goes_unready_and_recovers() {
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    /// A TCP proxy to the API server that the test can cut (live connections closed, new
    /// ones closed at once) and restore.
    struct Proxy {
        port: u16,
        up: Arc<AtomicBool>,
        live: Arc<Mutex<Vec<TcpStream>>>,
    }
    impl Proxy {
        fn start(upstream: String) -> Proxy {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let (up, live) = (Arc::new(AtomicBool::new(true)), Arc::new(Mutex::new(Vec::<TcpStream>::new())));
            let (u, l) = (up.clone(), live.clone());
            std::thread::spawn(move || {
                for client in listener.incoming().flatten() {
                    if !u.load(Ordering::SeqCst) {
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(&upstream) else { continue };
                    let mut live = l.lock().unwrap();
                    live.extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                    for (mut from, mut to) in
                        [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                    {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = from.shutdown(Shutdown::Both);
                            let _ = to.shutdown(Shutdown::Both);
                        });
                    }
                }
            });
            Proxy { port, up, live }
        }
        fn cut(&self) {
            self.up.store(false, Ordering::SeqCst);
            for s in self.live.lock().unwrap().drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        fn restore(&self) {
            self.up.store(true, Ordering::SeqCst);
        }
    }
    fn gauge(metrics: &str, name: &str, resource: &str) -> Option<f64> {
        let prefix = format!("{name}{{resource=\"{resource}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
    }

    let client = client().await;
    let ns = TestNamespace::new(&client, "stale").await;
    let policy = ns.policy(&client, "p", json!({"expiry": {"maxLifetime": "PT1H"}})).await;
    let _controller = common::controller_for(&ns.name, &[], "info");
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "team-a"})).await;
    let key = common::eventually("the first key in the Secret", Duration::from_secs(30), || async {
        secret_data(&client, &ns.name, "svc").await?.get("api-key").cloned()
    })
    .await;

    // The verifier reaches the API server only through the proxy (same credentials).
    let mut kubeconfig: serde_json::Value = serde_json::from_str(&common::kubectl(&[
        "config",
        "view",
        "--raw",
        "--minify",
        "--flatten",
        "-o",
        "json",
    ]))
    .unwrap();
    let server = kubeconfig["clusters"][0]["cluster"]["server"].as_str().unwrap().to_string();
    let upstream = server.trim_start_matches("https://").trim_end_matches('/').to_string();
    let proxy = Proxy::start(upstream);
    kubeconfig["clusters"][0]["cluster"]["server"] = json!(format!("https://127.0.0.1:{}", proxy.port));
    let path = std::env::temp_dir().join(format!("keyward-proxied-{}.kubeconfig", rand::random::<u64>()));
    std::fs::write(&path, kubeconfig.to_string()).unwrap();
    let verifier = common::KeywardProcess::start(
        &[
            "verifier",
            "--namespace",
            &ns.name,
            "--kubeconfig",
            path.to_str().unwrap(),
            "--max-staleness",
            "PT5S",
        ],
        "info",
    );
    verifier.wait_ready().await;
    let _ = std::fs::remove_file(&path);
    let key_id = common::eventually("the key to verify", Duration::from_secs(30), || async {
        let v = verify_json(&verifier.addr, &key);
        (v["code"] == "VALID").then(|| v["keyId"].as_str().unwrap().to_string())
    })
    .await;
    let metrics = verifier.get("/metrics").unwrap().1;
    assert_eq!(gauge(&metrics, "keyward_verifier_watch_healthy", "apikeys"), Some(1.0), "{metrics}");
    assert_eq!(gauge(&metrics, "keyward_verifier_watch_healthy", "keypolicies"), Some(1.0), "{metrics}");

    // Cut: the watches fail; after --max-staleness (not before) the verifier goes unready
    // and answers 503 with Retry-After instead of verifying against a stale index.
    proxy.cut();
    let cut = tokio::time::Instant::now();
    common::eventually("/readyz to answer 503 after the cut", Duration::from_secs(60), || async {
        (verifier.get("/readyz")?.0 == 503).then_some(())
    })
    .await;
    let unready_after = cut.elapsed();
    assert!(unready_after >= Duration::from_secs(5), "unready only after --max-staleness: {unready_after:?}");
    let body = json!({"key": key}).to_string();
    let (code, head, _) =
        http(&verifier.addr, "POST", "/v1/verify", &[("Content-Type", "application/json")], body.as_bytes())
            .unwrap();
    assert!(code == 503 && head.contains("retry-after: 1"), "{code} {head}");
    let auth = format!("Bearer {key}");
    assert_eq!(http(&verifier.addr, "GET", "/v1/auth", &[("Authorization", &auth)], b"").unwrap().0, 503);
    let metrics = verifier.get("/metrics").unwrap().1;
    assert_eq!(gauge(&metrics, "keyward_verifier_watch_healthy", "apikeys"), Some(0.0), "{metrics}");
    assert!(
        gauge(&metrics, "keyward_verifier_watch_errors_total", "apikeys").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    assert!(verifier.logs().contains("watch failing for longer than --max-staleness"), "{}", verifier.logs());

    // Revoked while the verifier cannot see it; once the proxy is back, the verifier lists
    // again, is ready, and already knows.
    common::revoke_keys(&client, &ns.name, "svc", &[&key_id]).await;
    proxy.restore();
    common::eventually("/readyz to answer 200 after the restore", Duration::from_secs(90), || async {
        (verifier.get("/readyz")?.0 == 200).then_some(())
    })
    .await;
    eprintln!("unready {unready_after:?} after the cut; ready again {:?} after it", cut.elapsed());
    assert_eq!(verify_json(&verifier.addr, &key)["code"], "REVOKED");
    let metrics = verifier.get("/metrics").unwrap().1;
    assert_eq!(gauge(&metrics, "keyward_verifier_watch_healthy", "apikeys"), Some(1.0), "{metrics}");
    assert_eq!(gauge(&metrics, "keyward_verifier_watch_healthy", "keypolicies"), Some(1.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_verifier_goes_unready_first_and_keeps_answering_for_the_shutdown_delay() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "drain").await;
    let policy = ns.policy(&client, "p", json!({"expiry": {"maxLifetime": "P1D"}})).await;
    let _controller = common::controller_for(&ns.name, &[], "info");
    let mut verifier = common::KeywardProcess::start(
        &["verifier", "--namespace", &ns.name, "--shutdown-delay", "PT4S"],
        "info",
    );
    verifier.wait_ready().await;
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "team-a"})).await;
    let key = common::eventually("the key", Duration::from_secs(30), || async {
        secret_data(&client, &ns.name, "svc").await?.get("api-key").cloned()
    })
    .await;
    common::eventually("the verifier to know the key", Duration::from_secs(10), || async {
        (verify_json(&verifier.addr, &key)["code"] == "VALID").then_some(())
    })
    .await;
    let stopping = std::time::Instant::now();
    verifier.signal("TERM");
    common::eventually("/readyz to fail", Duration::from_secs(2), || async {
        (verifier.get("/readyz")?.0 == 503).then_some(())
    })
    .await;
    // Unready, yet still answering: a proxy that has not heard yet loses nothing.
    let mut answered = 0;
    while stopping.elapsed() < Duration::from_secs(3) {
        assert_eq!(verify_json(&verifier.addr, &key)["code"], "VALID", "answered while draining");
        answered += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered >= 10, "{answered}");
    let status = verifier.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}");
    assert!(stopping.elapsed() >= Duration::from_secs(4), "stopped only after the delay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_are_returned_required_per_route_and_changes_take_effect_within_five_seconds() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "scopes").await;
    let policy = ns.policy(&client, "p", json!({"expiry": {"maxLifetime": "P1D"}})).await;
    let _controller = common::controller_for(&ns.name, &[], "info");
    let verifier = common::verifier_for(&ns.name);
    verifier.wait_ready().await;
    // The schema refuses a malformed scope (no CEL needed).
    let bad: keyward::api::ApiKey = serde_json::from_value(json!({
        "apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey", "metadata": {"name": "bad"},
        "spec": {"owner": "x", "scopes": ["orders read"]}
    }))
    .unwrap();
    let refused = kube::Api::<keyward::api::ApiKey>::namespaced(client.clone(), &ns.name)
        .create(&Default::default(), &bad)
        .await;
    assert!(refused.is_err_and(|e| e.to_string().contains("scopes")), "a malformed scope is refused");
    ns.apikey(
        &client,
        "svc",
        json!({"policy": policy, "owner": "team-a", "scopes": ["orders:read", "audit"]}),
    )
    .await;
    let key = common::eventually("the key", Duration::from_secs(30), || async {
        secret_data(&client, &ns.name, "svc").await?.get("api-key").cloned()
    })
    .await;
    let v = common::eventually("the verifier to know the key", Duration::from_secs(10), || async {
        let v = verify_json(&verifier.addr, &key);
        (v["code"] == "VALID").then_some(v)
    })
    .await;
    assert_eq!(v["scopes"], json!(["audit", "orders:read"]));
    let auth = |path: &str, require: Option<&str>| {
        let mut headers = vec![("Authorization", format!("Bearer {key}"))];
        headers.extend(require.map(|r| ("X-Keyward-Require-Scope", r.to_string())));
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        http(&verifier.addr, "GET", path, &headers, b"").expect("an answer")
    };
    let (code, head, _) = auth("/v1/auth", None);
    assert_eq!(code, 200, "no scope required: as before");
    assert!(head.contains("x-keyward-scopes: audit orders:read"), "{head}");
    for (path, require) in
        [("/v1/auth?scope=orders:read", None), ("/v1/auth/orders", Some("orders:read, audit"))]
    {
        assert_eq!(auth(path, require).0, 200, "{path} {require:?}");
    }
    for (path, require) in [
        ("/v1/auth?scope=orders:write", None),
        ("/v1/auth/orders?scope=orders%3Aread", Some("orders:write")),
        ("/v1/auth", Some("not a scope")),
    ] {
        let (code, head, _) = auth(path, require);
        assert_eq!(code, 403, "{path} {require:?}");
        assert!(head.contains("x-keyward-code: insufficient_scope"), "{head}");
        assert!(head.contains(r#"error="insufficient_scope""#), "{head}");
    }
    // Through nginx running the example: the upstream gets the key's scopes (never a
    // client's forged list), and /admin/ requires the scope "admin".
    let nginx = nginx(&verifier.addr).await;
    let get = |path: &str, extra: &[(&str, &str)]| {
        let bearer = format!("Bearer {key}");
        let mut headers = vec![("Authorization", bearer.as_str())];
        headers.extend_from_slice(extra);
        http(&nginx.front, "GET", path, &headers, b"").map_or((0, String::new()), |(c, _, b)| (c, b))
    };
    let (code, body) = get("/orders", &[("X-Keyward-Scopes", "admin")]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("scopes=audit orders:read authorization=\n"), "{body}");
    for path in ["/admin/users", "/ADMIN/users", "/Admin", "//admin/users", "/x/../admin/users"] {
        assert_eq!(get(path, &[]).0, 403, "{path} requires the scope admin");
    }
    // A scope added, then all removed: each visible within 5 s.
    let scopes = json!({"spec": {"scopes": ["orders:read", "orders:write", "admin"]}});
    common::patch_key(&client, &ns.name, "svc", scopes).await;
    common::eventually("the added scope", Duration::from_secs(5), || async {
        (auth("/v1/auth?scope=orders:write", None).0 == 200).then_some(())
    })
    .await;
    common::eventually("the added scope through nginx", Duration::from_secs(5), || async {
        (get("/admin/users", &[]).0 == 200).then_some(())
    })
    .await;
    common::patch_key(&client, &ns.name, "svc", json!({"spec": {"scopes": null}})).await;
    common::eventually("the removed scope", Duration::from_secs(5), || async {
        (auth("/v1/auth?scope=orders:read", None).0 == 403).then_some(())
    })
    .await;
    assert_eq!(auth("/v1/auth", None).0, 200, "the key itself still verifies");
}

/// Caddy (from Debian) running `examples/proxies/Caddyfile` (addresses replaced) in front
/// of an upstream (a second Caddy site) that echoes the identity headers it receives.
async fn caddy(verifier: &str) -> Proxy {
    let dir = std::env::temp_dir().join(format!("keyward-caddy-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let (front, upstream) = (common::free_port(), common::free_port());
    let site = example_with(
        "proxies/Caddyfile",
        &[
            ("keyward-verifier.keyward-system.svc:8081", verifier.to_string()),
            ("payments.payments.svc:8080", format!("127.0.0.1:{upstream}")),
            (":8080 {", format!("http://127.0.0.1:{front} {{")),
        ],
    );
    let echo = ["Owner", "Namespace", "ApiKey", "Key-Id", "Client-Id", "Scopes"]
        .map(|h| format!("{}={{http.request.header.X-Keyward-{h}}}", h.to_lowercase()))
        .join(" ");
    let conf = format!(
        "{{\n\tadmin off\n\tauto_https off\n}}\n{site}\nhttp://127.0.0.1:{upstream} {{\n\trespond \"upstream ok {echo} authorization={{http.request.header.Authorization}} x-api-key={{http.request.header.X-Api-Key}}\"\n}}\n"
    );
    std::fs::write(dir.join("Caddyfile"), conf).unwrap();
    let child = std::process::Command::new("caddy")
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(dir.join("Caddyfile"))
        .env("XDG_DATA_HOME", &dir)
        .env("XDG_CONFIG_HOME", &dir)
        .env("HOME", &dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("caddy.log")).unwrap())
        .spawn()
        .expect("caddy from Debian (hack/test.sh installs it)");
    Proxy::listening("caddy", child, front, dir).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_forward_auth_passes_only_the_verifiers_identity_and_never_the_key() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "caddy").await;
    let policy = ns.policy(&client, "p", json!({"expiry": {"maxLifetime": "P1D"}})).await;
    let _controller = common::controller_for(&ns.name, &[], "info");
    let verifier = common::verifier_for(&ns.name);
    verifier.wait_ready().await;
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "team-a", "scopes": ["orders:read"]})).await;
    let key = common::eventually("the key", Duration::from_secs(30), || async {
        secret_data(&client, &ns.name, "svc").await?.get("api-key").cloned()
    })
    .await;
    common::eventually("the verifier to know the key", Duration::from_secs(10), || async {
        (verify_json(&verifier.addr, &key)["code"] == "VALID").then_some(())
    })
    .await;
    let caddy = caddy(&verifier.addr).await;
    let forged = [
        ("X-Keyward-Owner", "someone-else"),
        ("X-Keyward-Namespace", "other"),
        ("X-Keyward-Scopes", "admin"),
        ("X-Keyward-Key-Id", "forged"),
    ];
    let bearer = format!("Bearer {key}");
    for (method, key_header) in
        [("GET", ("Authorization", bearer.as_str())), ("POST", ("X-Api-Key", key.as_str()))]
    {
        let mut headers = vec![key_header];
        headers.extend_from_slice(&forged);
        let (code, _, body) = http(&caddy.front, method, "/orders/42", &headers, b"{}").expect("an answer");
        assert_eq!(code, 200, "{method}: {body}");
        assert!(
            body.starts_with(&format!("upstream ok owner=team-a namespace={} apikey=svc key-id=", ns.name)),
            "{body}"
        );
        assert!(
            body.contains("scopes=orders:read ") && !body.contains("forged") && !body.contains("admin"),
            "{body}"
        );
        assert!(body.contains("authorization= x-api-key="), "the key does not reach the upstream: {body}");
        assert!(!body.contains(&key), "{body}");
    }
    let unknown = keyward::keys::KeyFormat::default().generate().expose().to_string();
    for headers in [vec![("Authorization", format!("Bearer {unknown}"))], vec![]] {
        let mut h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        h.extend_from_slice(&forged);
        let (code, head, body) = http(&caddy.front, "GET", "/orders/42", &h, b"").expect("an answer");
        assert_eq!(code, 401, "{head}");
        assert!(
            head.contains(r#"www-authenticate: bearer realm="keyward""#) && !body.contains("upstream ok"),
            "{body}"
        );
    }
}
