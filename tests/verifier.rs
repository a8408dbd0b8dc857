//! The verifier end to end: real nginx (`auth_request`) in front of a tiny upstream,
//! keyward's controller and verifier, a client that reads `api-key` from the Secret
//! before every request (as a mounted file would) across flips and regenerations;
//! the JSON API and its limits; and last-use tracking feeding inactivity expiry.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::{TestNamespace, client, get_key, http, metric_sum, ready, secret_data, wait_key};
use keyward::api::KeyState;
use serde_json::json;

struct Nginx {
    child: std::process::Child,
    front: String,
    _dir: std::path::PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_binary() -> String {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("nginx from Debian (hack/test.sh installs it)")
        .to_string()
}

/// nginx with `auth_request` to the verifier in front of an upstream that says "upstream ok".
async fn nginx(verifier: &str) -> Nginx {
    let dir = std::env::temp_dir().join(format!("keyward-nginx-{}", rand::random::<u64>()));
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let (front, upstream) = (common::free_port(), common::free_port());
    let d = dir.display();
    let conf = format!(
        r#"daemon off; master_process off; worker_processes 1;
error_log {d}/error.log; pid {d}/nginx.pid;
events {{ worker_connections 512; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  server {{ listen 127.0.0.1:{upstream}; location / {{ return 200 "upstream ok owner=$http_x_owner\n"; }} }}
  server {{
    listen 127.0.0.1:{front};
    location = /_keyward {{
      internal;
      proxy_pass http://{verifier}/v1/auth;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
    }}
    location / {{
      auth_request /_keyward;
      auth_request_set $owner $upstream_http_x_keyward_owner;
      proxy_set_header X-Owner $owner;
      proxy_pass http://127.0.0.1:{upstream};
    }}
  }}
}}
"#
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = std::process::Command::new(nginx_binary())
        .args(["-p", &dir.display().to_string(), "-c", &dir.join("nginx.conf").display().to_string()])
        .spawn()
        .expect("start nginx");
    let front = format!("127.0.0.1:{front}");
    let f = front.clone();
    common::eventually("nginx to listen", Duration::from_secs(20), || {
        let f = f.clone();
        async move { std::net::TcpStream::connect(&f).ok().map(|_| ()) }
    })
    .await;
    Nginx { child, front, _dir: dir }
}

fn through_nginx(front: &str, key: &str) -> u16 {
    let auth = format!("Bearer {key}");
    match http(front, "GET", "/orders", &[("Authorization", &auth)], b"") {
        Some((code, _, body)) => {
            if code == 200 {
                assert!(body.starts_with("upstream ok owner=team-a"), "{body}");
            }
            code
        }
        None => 0,
    }
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
    let key = get_key(&client, &ns.name, "svc").await;
    let status = key.status.unwrap();
    let standby = status.keys.iter().find(|k| k.state == KeyState::Standby).expect("a standby key").clone();
    let data = secret_data(&client, &ns.name, "svc").await.unwrap();
    let standby_material = data[standby.slot.data_key()].clone();
    assert_eq!(through_nginx(&nginx.front, &standby_material), 200, "the standby verifies too");
    let revoked_at = tokio::time::Instant::now();
    common::revoke_keys(&client, &ns.name, "svc", &[standby.key_id.as_str()]).await;
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
    let answer = |k: &str| {
        let (code, _, body) = post(json!({"key": k}).to_string().as_bytes()).unwrap();
        assert_eq!(code, 200);
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
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
    assert!(head.contains("x-keyward-owner: team-a") && head.contains("x-keyward-key-id:"), "{head}");
    let (code, head, _) = http(&verifier.addr, "GET", "/v1/auth", &[], b"").unwrap();
    assert_eq!(code, 401);
    assert!(head.contains("x-keyward-code: malformed"), "{head}");
    let huge = "k".repeat(100_000);
    let code = http(&verifier.addr, "GET", "/v1/auth", &[("X-Api-Key", &huge)], b"").map_or(0, |r| r.0);
    assert!(code == 431 || code == 400 || code == 401 || code == 0, "oversized header refused: {code}");
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
        .policy(&client, "p", json!({"expiry": {"maxLifetime": "PT1H", "inactivityTimeout": "PT90S"}}))
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
