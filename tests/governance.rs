//! Governance on the real API server with seconds-scale policies: inactivity expiry,
//! retroactive policy tightening, per-owner limits, expiry warnings with signed
//! webhooks (to receivers the test runs on loopback), and consumer rollouts.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use common::hooks::{Received, events_with_reason, receiver, receiver_on};
use common::{TestNamespace, active, client, get_key, ready, wait_key};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use keyward::api::{ApiKey, ExpiryReason, KeyPolicy, KeyState, KeyStatus};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn reason(key: &ApiKey) -> String {
    ready(key).map(|(_, r)| r).unwrap_or_default()
}

/// Write `lastUsedAt = now` on the active key, as the verifier would (status replace
/// with resourceVersion; retried on conflict).
async fn mark_used(client: &Client, ns: &str, name: &str) {
    let api: Api<ApiKey> = Api::namespaced(client.clone(), ns);
    for _ in 0..20 {
        let mut key = api.get(name).await.unwrap();
        let Some(slot) = key.status.as_ref().and_then(|s| s.active_slot) else { return };
        for k in key.status.as_mut().unwrap().keys.iter_mut().filter(|k| k.slot == slot) {
            k.last_used_at = Some(Utc::now());
        }
        let pp = PostParams { field_manager: Some("keyward-tests/verifier".into()), ..Default::default() };
        match api.replace_status(name, &pp, &key).await {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => panic!("mark used: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactivity_expires_unused_keys_and_spares_used_ones() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "inactive").await;
    let policy = ns
        .policy(&client, "p", json!({"expiry": {"maxLifetime": "PT1H", "inactivityTimeout": "PT6S"}, "rotation": {"flipBefore": "PT1S"}}))
        .await;
    let _keyward = common::controller_for(&ns.name, &[], "info");
    ns.apikey(&client, "used", json!({"policy": policy, "owner": "a"})).await;
    ns.apikey(&client, "idle", json!({"policy": policy, "owner": "b"})).await;
    let idle =
        wait_key(&client, &ns.name, "idle", Duration::from_secs(30), |k| active(k).map(|_| k.clone())).await;
    let details = idle.status.as_ref().unwrap().details.clone().unwrap();
    assert!(details.contains("for inactivity unless used"), "{details}");

    let started = tokio::time::Instant::now();
    let mut idle_died = false;
    while started.elapsed() < Duration::from_secs(16) {
        mark_used(&client, &ns.name, "used").await;
        let idle = get_key(&client, &ns.name, "idle").await;
        if reason(&idle) == "KeyExpiredInactive" {
            idle_died = true;
            let a = active(&idle).unwrap();
            assert_eq!((a.state, a.expiry_reason), (KeyState::Expired, Some(ExpiryReason::Inactivity)));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(idle_died, "the unused key expired for inactivity");
    let used = get_key(&client, &ns.name, "used").await;
    assert_eq!(ready(&used).unwrap(), ("True".to_string(), "KeyActive".to_string()), "{:#?}", used.status);
    assert_eq!(
        active(&used).unwrap().expiry_reason,
        Some(ExpiryReason::Inactivity),
        "still bounded by inactivity"
    );
    // Not regenerated until a rotation is requested; then it lives again.
    let idle = get_key(&client, &ns.name, "idle").await;
    assert_eq!(idle.status.as_ref().unwrap().keys.len(), 1, "no new key for an abandoned ApiKey");
    common::request_rotation(&client, &ns.name, "idle", "revive").await;
    wait_key(&client, &ns.name, "idle", Duration::from_secs(20), |k| {
        (reason(k) == "KeyActive").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shortened_policy_caps_live_keys_and_a_longer_one_never_extends() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "retro").await;
    let policy =
        ns.policy(&client, "p", json!({"expiry": {"maxLifetime": "PT1H", "minLifetime": "PT1S"}})).await;
    let _keyward = common::controller_for(&ns.name, &[], "info");
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "a"})).await;
    let first = wait_key(&client, &ns.name, "svc", Duration::from_secs(30), active).await;
    let (changed, capped) =
        common::shrink_policy(&client, &policy, "PT20S", &ns.name, "svc", &first.key_id).await;
    let policies: Api<KeyPolicy> = Api::all(client.clone());
    assert_eq!(capped.expires_at, first.expires_at, "expiresAt is never rewritten");
    let end = capped.effective_expires_at.unwrap();
    assert!(
        end >= changed + TimeDelta::seconds(19) && end <= changed + TimeDelta::seconds(25),
        "capped at change + 20 s: {end}"
    );
    policies
        .patch(
            &policy,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"expiry": {"maxLifetime": "PT2H"}}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let key = get_key(&client, &ns.name, "svc").await;
    let same = key.status.unwrap().keys.into_iter().find(|x| x.key_id == first.key_id).unwrap();
    assert_eq!(same.effective_expires_at, Some(end), "lengthening never extends a key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_limits_refuse_a_third_key_and_duplicate_descriptions() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "limits").await;
    let policy = ns.policy(&client, "p", json!({"expiry": {"maxLifetime": "P1D"}})).await;
    let _keyward = common::controller_for(&ns.name, &[], "info");
    for name in ["a1", "a2", "a3"] {
        ns.apikey(&client, name, json!({"policy": policy, "owner": "team", "description": name})).await;
        // Distinct creation seconds, so "oldest" is unambiguous.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    ns.apikey(&client, "d1", json!({"policy": policy, "owner": "dup", "description": "checkout"})).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ns.apikey(&client, "d2", json!({"policy": policy, "owner": "dup", "description": "checkout"})).await;

    for (name, want) in [
        ("a1", "KeyActive"),
        ("a2", "KeyActive"),
        ("a3", "OwnerKeyLimitExceeded"),
        ("d1", "KeyActive"),
        ("d2", "DuplicateDescription"),
    ] {
        let key =
            wait_key(&client, &ns.name, name, Duration::from_secs(30), |k| ready(k).map(|_| k.clone())).await;
        assert_eq!(reason(&key), want, "{name}: {:#?}", key.status);
        if want != "KeyActive" {
            assert!(key.status.as_ref().unwrap().keys.is_empty(), "{name} gets no key");
            assert!(common::secret_data(&client, &ns.name, name).await.is_none(), "{name} gets no Secret");
        }
    }
    // Deleting a winner admits the next one.
    Api::<ApiKey>::namespaced(client.clone(), &ns.name).delete("a1", &DeleteParams::default()).await.unwrap();
    wait_key(&client, &ns.name, "a3", Duration::from_secs(30), |k| (reason(k) == "KeyActive").then_some(()))
        .await;
    assert!(!events_with_reason(&client, &ns.name, "OwnerKeyLimitExceeded").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warnings_fire_once_per_threshold_with_signed_retried_webhooks() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "notify").await;
    let (signed_url, signed) = receiver(0).await;
    let (flaky_url, flaky) = receiver(2).await;
    let dead_url = format!("http://127.0.0.1:{}/hook", common::free_port());
    let signing_key = "s3cret-signing-key";
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "hook-signing"}, "stringData": {"signing-key": signing_key}
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let policy = ns
        .policy(
            &client,
            "p",
            json!({
                "expiry": {"maxLifetime": "PT30S", "minLifetime": "PT1S"},
                "notifications": {
                    "before": ["PT25S", "PT15S"],
                    "webhooks": [
                        {"url": signed_url, "secretRef": {"namespace": ns.name, "name": "hook-signing"}},
                        {"url": flaky_url},
                        {"url": dead_url}
                    ]
                }
            }),
        )
        .await;
    let _keyward = common::controller_for(&ns.name, &[], "info");
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "payments"})).await;
    // P1 passes 25 s-before at 5 s and 15 s-before at 15 s; S1 becomes active at the
    // flip (22.5 s) with its 25 s-before threshold already passed, which is no news while
    // its successor is on schedule; its 15 s-before passes at 30 s, P2's at 45 s.
    // Entries of a key leave status with the key, so collect them over time.
    let mut expected: BTreeSet<(String, String)> = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while expected.len() < 4 {
        assert!(tokio::time::Instant::now() < deadline, "four warnings within 90 s: {expected:?}");
        let status = get_key(&client, &ns.name, "svc").await.status.unwrap_or_default();
        let now: Vec<(String, String)> =
            status.notified.iter().map(|n| (n.key_id.clone(), n.threshold.clone())).collect();
        let distinct: BTreeSet<&(String, String)> = now.iter().collect();
        assert_eq!(distinct.len(), now.len(), "each (key, threshold) recorded once: {:?}", status.notified);
        expected.extend(now);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got = |r: &Arc<Mutex<Received>>| -> BTreeMap<(String, String), usize> {
        let mut m = BTreeMap::new();
        for (body, _) in &r.lock().unwrap().accepted {
            let k = (
                body["keyId"].as_str().unwrap().to_string(),
                body["threshold"].as_str().unwrap().to_string(),
            );
            *m.entry(k).or_default() += 1;
        }
        m
    };
    common::eventually("both receivers to get every warning", Duration::from_secs(30), || async {
        let s = got(&signed);
        let f = got(&flaky);
        expected.iter().all(|k| s.contains_key(k) && f.contains_key(k)).then_some(())
    })
    .await;
    for (what, r) in [("signed", &signed), ("flaky", &flaky)] {
        for (k, n) in got(r) {
            if expected.contains(&k) {
                assert_eq!(n, 1, "{what}: exactly one POST for {k:?}");
            }
        }
    }
    assert!(flaky.lock().unwrap().seen >= 3, "the flaky receiver failed twice, then accepted");
    for (body, sig) in &signed.lock().unwrap().accepted {
        let (sig, raw) = sig.as_ref().expect("signed").split_once('\n').unwrap();
        assert_eq!(sig, keyward::webhook::sign(signing_key.as_bytes(), raw.as_bytes()), "HMAC verifies");
        assert_eq!(body["type"], "KeyExpiringSoon");
        assert_eq!(body["apiKey"]["name"], "svc");
        assert_eq!(body["owner"], "payments");
        assert_eq!(
            body["id"],
            format!(
                "{}/svc/{}/{}",
                ns.name,
                body["keyId"].as_str().unwrap(),
                body["threshold"].as_str().unwrap()
            )
        );
        assert!(body["expiresAt"].is_string() && body["standbyReady"].is_boolean());
    }
    assert!(!events_with_reason(&client, &ns.name, "KeyExpiringSoon").await.is_empty());
    // The dead receiver's deliveries stay pending in status (retried, until a day after
    // the warning), the others left; and it never delayed the flip (scheduled half-way
    // through the keys' overlap: S1 created at +15 s, P1 ending at +30 s → flip at +22.5 s).
    let pending = get_key(&client, &ns.name, "svc").await.status.unwrap().notified;
    assert!(pending.iter().any(|n| n.pending == [dead_url.clone()]), "{pending:?}");
    assert!(pending.iter().all(|n| n.pending.iter().all(|t| *t == dead_url)), "{pending:?}");
    let key = get_key(&client, &ns.name, "svc").await;
    let flipped: Vec<KeyStatus> = key
        .status
        .unwrap()
        .keys
        .into_iter()
        .filter(|k| k.activated_at.is_some_and(|a| a - k.created_at > TimeDelta::seconds(1)))
        .collect();
    assert!(!flipped.is_empty(), "a key became active by a flip");
    for k in flipped {
        // Created half-way through the previous key's 30 s, so that key ends 15 s later.
        let scheduled = k.created_at + TimeDelta::milliseconds(7500);
        let lateness = (k.activated_at.unwrap() - scheduled).num_milliseconds();
        assert!(lateness.abs() < 3000, "flip on time despite a dead receiver: {lateness} ms late");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_receiver_down_for_two_minutes_still_gets_each_warning_once_it_is_back() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "outage").await;
    let port = common::free_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let policy = ns
        .policy(
            &client,
            "p",
            json!({"expiry": {"maxLifetime": "PT10M", "minLifetime": "PT1S"},
                   "notifications": {"before": ["PT9M50S"], "webhooks": [{"url": url}]}}),
        )
        .await;
    let mut keyward = common::controller_for(&ns.name, &[], "info");
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "payments"})).await;
    // The warning fires 10 s in, while nobody listens on the receiver's port.
    let (fired_at, key_id) = wait_key(&client, &ns.name, "svc", Duration::from_secs(60), |k| {
        let n = k.status.as_ref()?.notified.first()?;
        n.pending.contains(&url).then(|| (tokio::time::Instant::now(), n.key_id.clone()))
    })
    .await;
    common::eventually("failed attempts to be retried", Duration::from_secs(30), || async {
        let (_, metrics) = keyward.get("/metrics")?;
        (common::metric_sum(
            &metrics,
            "keyward_notifications_total{kind=\"KeyExpiringSoon\",result=\"retried\"}",
        ) >= 2.0)
            .then_some(())
    })
    .await;
    // A restart in the middle of the outage forgets nothing: what is pending is in status.
    keyward.terminate().await;
    keyward = common::controller_for(&ns.name, &[], "info");
    // The receiver stays down for two minutes in all: this wait is the outage itself.
    tokio::time::sleep(
        (fired_at + Duration::from_secs(120)).saturating_duration_since(tokio::time::Instant::now()),
    )
    .await;
    let pending = get_key(&client, &ns.name, "svc").await.status.unwrap().notified;
    assert!(pending.iter().any(|n| n.pending.contains(&url)), "still pending after the outage: {pending:?}");
    let received = receiver_on(port).await;
    // Backoff is at most 30 s.
    common::eventually(
        "the warning to reach the receiver that came back",
        Duration::from_secs(60),
        || async { (!received.lock().unwrap().accepted.is_empty()).then_some(()) },
    )
    .await;
    wait_key(&client, &ns.name, "svc", Duration::from_secs(30), |k| {
        k.status.as_ref()?.notified.iter().all(|n| n.pending.is_empty()).then_some(())
    })
    .await;
    let accepted = received.lock().unwrap().accepted.clone();
    assert_eq!(accepted.len(), 1, "one delivery: {accepted:?}");
    assert_eq!(accepted[0].0["keyId"], key_id.as_str());
    assert_eq!(accepted[0].0["threshold"], "PT9M50S");
    assert!(!events_with_reason(&client, &ns.name, "NotificationDelivered").await.is_empty());
    drop(keyward);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_roll_out_once_per_flip() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "consumers").await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let dep: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "checkout"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "checkout"}},
            "template": {
                "metadata": {"labels": {"app": "checkout"}},
                // Its pods need not run (only the template is watched): no node takes them,
                // so no kubelet tries to pull this image from a registry.
                "spec": {"nodeSelector": {"keyward.dev/test-nowhere": "true"},
                         "automountServiceAccountToken": false,
                         "containers": [{"name": "app", "image": "registry.invalid/checkout:1"}]}
            }
        }
    }))
    .unwrap();
    deployments.create(&PostParams::default(), &dep).await.unwrap();
    let policy =
        ns.policy(&client, "p", json!({"expiry": {"maxLifetime": "PT12S", "minLifetime": "PT1S"}})).await;
    let _keyward = common::controller_for(&ns.name, &[], "info");
    ns.apikey(
        &client,
        "svc",
        json!({"policy": policy, "owner": "a", "consumers": [
            {"kind": "Deployment", "name": "checkout"}, {"kind": "Deployment", "name": "missing"}
        ]}),
    )
    .await;
    // Watch the pod template annotation and the Deployment's generation for 30 s.
    let mut annotations: Vec<String> = Vec::new();
    let mut active_ids: Vec<String> = Vec::new();
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        let d = deployments.get("checkout").await.unwrap();
        let a = d
            .spec
            .unwrap()
            .template
            .metadata
            .and_then(|m| m.annotations)
            .and_then(|a| a.get("keyward.dev/key-id").cloned());
        if let Some(a) = a
            && annotations.last() != Some(&a)
        {
            annotations.push(a);
        }
        if let Some(k) = active(&get_key(&client, &ns.name, "svc").await)
            && active_ids.last() != Some(&k.key_id)
        {
            active_ids.push(k.key_id);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(active_ids.len() >= 4, "several flips in 30 s: {active_ids:?}");
    // Each value the template carried was an active key, in the same order, and the
    // Deployment changed once per flip (its generation counts template changes).
    let generation = deployments.get("checkout").await.unwrap().metadata.generation.unwrap();
    assert_eq!(generation, 1 + annotations.len() as i64, "one rollout per change: {annotations:?}");
    assert!(annotations.len() + 1 >= active_ids.len(), "no flip missed: {annotations:?} vs {active_ids:?}");
    let in_order: Vec<&String> = active_ids.iter().filter(|id| annotations.contains(id)).collect();
    assert_eq!(in_order, annotations.iter().collect::<Vec<_>>(), "annotations follow the active key");
    assert!(
        !events_with_reason(&client, &ns.name, "ConsumerNotFound").await.is_empty(),
        "missing consumer is a Warning"
    );
    let key = get_key(&client, &ns.name, "svc").await;
    assert_eq!(ready(&key).unwrap().0, "True", "a missing consumer is not a failure");
}
