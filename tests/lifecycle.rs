//! The key lifecycle on the real API server, with seconds-scale policies: whole
//! primary/secondary cycles, restarts and catch-up, no-op reconciles, revocation,
//! requested rotation, Secret repair, bad input, and no key material anywhere but
//! the Secret. Each test runs its own `keyward controller --namespace <its namespace>`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{
    KeywardProcess, TestNamespace, active, client, get_key, metric_sum, ready, secret_data, wait_key,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use keyward::api::{ApiKey, ExpiryReason, KeyState, KeyStatus, Slot};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// A controller for the test's namespace. A short lease lets a restarted controller
/// take over quickly after its predecessor was killed.
fn controller(ns: &TestNamespace, log_level: &str) -> KeywardProcess {
    common::controller_for(&ns.name, &["--lease-duration", "PT2S"], log_level)
}

fn is_ready(key: &ApiKey) -> bool {
    ready(key).is_some_and(|(s, _)| s == "True")
}

/// The invariant observed from outside: the Secret's `api-key` hashes to a key in
/// status that is valid (Active or Standby, not past its effective expiry). The
/// Secret is read before status: keyward writes status first, then `api-key`.
async fn observe(client: &Client, ns: &str, name: &str, secret: &str) -> Option<(ApiKey, String)> {
    let data = secret_data(client, ns, secret).await?;
    let api_key = data.get("api-key")?.clone();
    let key = get_key(client, ns, name).await;
    let now = Utc::now();
    let hash = keyward::keys::hash(&api_key);
    let entry =
        key.status.as_ref().and_then(|s| s.keys.iter().find(|k| k.hash == hash)).unwrap_or_else(|| {
            panic!("api-key's hash {hash} is not in status: {:#?}", key.status);
        });
    assert!(
        matches!(entry.state, KeyState::Active | KeyState::Standby),
        "api-key holds a {:?} key",
        entry.state
    );
    assert!(
        entry.effective_expires_at.is_none_or(|t| t > now),
        "api-key holds an expired key: {entry:?} at {now}"
    );
    Some((key, hash))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_full_cycles_keep_a_valid_key_in_the_secret() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "cycles").await;
    let policy =
        ns.policy(&client, "p", json!({"expiry": {"maxLifetime": "PT24S", "minLifetime": "PT1S"}})).await;
    let _keyward = controller(&ns, "info");
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "team-a"})).await;

    let mut seen: BTreeMap<String, (Slot, DateTime<Utc>)> = BTreeMap::new();
    let (mut observations, mut with_two_valid, mut after_first_standby) = (0, 0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        if let Some((key, _)) = observe(&client, &ns.name, "svc", "svc").await {
            observations += 1;
            let status = key.status.unwrap();
            for k in &status.keys {
                seen.entry(k.key_id.clone()).or_insert((k.slot, k.created_at));
            }
            if seen.len() >= 2 {
                after_first_standby += 1;
                if status
                    .keys
                    .iter()
                    .filter(|k| matches!(k.state, KeyState::Active | KeyState::Standby))
                    .count()
                    == 2
                {
                    with_two_valid += 1;
                }
            }
        }
        let per_slot = |slot| seen.values().filter(|(s, _)| *s == slot).count();
        if per_slot(Slot::Primary) >= 3 && per_slot(Slot::Secondary) >= 3 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "two full cycles did not complete: {seen:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Exactly one key per slot per half-lifetime: P1 S1 P2 S2 P3 S3, 12 s apart.
    let mut created: Vec<(DateTime<Utc>, Slot)> = seen.values().map(|(s, t)| (*t, *s)).collect();
    created.sort();
    assert_eq!(created.len(), 6, "no extra keys: {created:?}");
    for pair in created.windows(2) {
        assert_ne!(pair[0].1, pair[1].1, "slots alternate: {created:?}");
        let gap = (pair[1].0 - pair[0].0).num_milliseconds();
        assert!(
            (9_000..=15_000).contains(&gap),
            "keys 12 s apart (half the lifetime), got {gap} ms: {created:?}"
        );
    }
    assert!(observations > 100, "{observations} observations");
    assert!(
        with_two_valid * 100 >= after_first_standby * 90,
        "two valid keys at almost every moment: {with_two_valid}/{after_first_standby}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_catch_up_without_extra_keys() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "restart").await;
    let policy =
        ns.policy(&client, "p", json!({"expiry": {"maxLifetime": "PT12S", "minLifetime": "PT1S"}})).await;
    let mut keyward = controller(&ns, "info");
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "team-a"})).await;
    let p1 =
        wait_key(&client, &ns.name, "svc", Duration::from_secs(60), |k| active(k).filter(|_| is_ready(k)))
            .await;
    drop(keyward); // SIGKILL, mid-cycle: the secondary is due at +6 s.

    // Restart after the secondary was due but before P1 expires.
    common::eventually("the secondary's due time to pass", Duration::from_secs(30), || async {
        (Utc::now() > p1.created_at + chrono::TimeDelta::milliseconds(7500)).then_some(())
    })
    .await;
    keyward = controller(&ns, "info");
    let key = wait_key(&client, &ns.name, "svc", Duration::from_secs(30), |k| {
        k.status.as_ref().filter(|s| s.keys.len() == 2).map(|_| k.clone())
    })
    .await;
    let status = key.status.unwrap();
    assert_eq!(
        status.keys.iter().filter(|k| k.key_id != p1.key_id).count(),
        1,
        "one catch-up key: {status:#?}"
    );
    observe(&client, &ns.name, "svc", "svc").await.expect("Secret");

    // Down again for longer than a whole lifetime: every key has expired meanwhile.
    let ids_before: BTreeSet<String> = status.keys.iter().map(|k| k.key_id.clone()).collect();
    let latest_end = status.keys.iter().filter_map(|k| k.effective_expires_at).max().unwrap();
    keyward.terminate().await;
    common::eventually("every key to expire while keyward is down", Duration::from_secs(60), || async {
        (Utc::now() > latest_end + chrono::TimeDelta::seconds(2)).then_some(())
    })
    .await;
    let restarted_at = Utc::now();
    let _keyward = controller(&ns, "info");
    let key = wait_key(&client, &ns.name, "svc", Duration::from_secs(30), |k| {
        active(k).filter(|a| a.created_at >= restarted_at && is_ready(k)).map(|_| k.clone())
    })
    .await;
    let fresh: Vec<&KeyStatus> =
        key.status.as_ref().unwrap().keys.iter().filter(|k| !ids_before.contains(&k.key_id)).collect();
    assert_eq!(fresh.len(), 1, "one new key after a long pause, not one per missed step: {:#?}", key.status);
    // Every key expired while keyward was down, so api-key held an expired key until now;
    // it moves to the fresh key right after status records it.
    let fresh_hash = fresh[0].hash.clone();
    common::eventually("api-key to hold the fresh key", Duration::from_secs(10), || async {
        let data = secret_data(&client, &ns.name, "svc").await?;
        (keyward::keys::hash(data.get("api-key")?) == fresh_hash).then_some(())
    })
    .await;
    observe(&client, &ns.name, "svc", "svc").await.expect("Secret");
    // And the schedule resumes: the other slot is regenerated half a lifetime later.
    let next = key.status.as_ref().unwrap().next_action_at.unwrap();
    assert!(next > restarted_at + chrono::TimeDelta::seconds(4), "next step at {next}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noop_reconcile_writes_nothing() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "noop").await;
    let policy = ns.policy(&client, "p", json!({"expiry": {"maxLifetime": "P1D"}})).await;
    let keyward = controller(&ns, "info");
    keyward.wait_ready().await;
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "team-a"})).await;
    common::wait_ready(&client, &ns.name, "svc", Duration::from_secs(60)).await;
    let metrics = |k: &KeywardProcess| k.get("/metrics").expect("metrics").1;
    // Settle: the reconciles caused by keyward's own writes.
    let settled = common::eventually("writes to settle", Duration::from_secs(30), || async {
        let before = metric_sum(&metrics(&keyward), "keyward_api_writes_total");
        tokio::time::sleep(Duration::from_secs(2)).await;
        (metric_sum(&metrics(&keyward), "keyward_api_writes_total") == before).then_some(before)
    })
    .await;
    let key_rv = get_key(&client, &ns.name, "svc").await.metadata.resource_version;
    let reconciles = metric_sum(&metrics(&keyward), "keyward_reconciles_total");

    // Touch the owned Secret: keyward reconciles the ApiKey, and finds nothing to do.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let touched = secrets
        .patch(
            "svc",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"touched": "1"}}})),
        )
        .await
        .unwrap();
    common::eventually("a reconcile after the touch", Duration::from_secs(30), || async {
        (metric_sum(&metrics(&keyward), "keyward_reconciles_total") > reconciles).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        metric_sum(&metrics(&keyward), "keyward_api_writes_total"),
        settled,
        "a no-op reconcile writes nothing"
    );
    assert_eq!(get_key(&client, &ns.name, "svc").await.metadata.resource_version, key_rv);
    assert_eq!(
        secrets.get("svc").await.unwrap().metadata.resource_version,
        touched.metadata.resource_version
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_flips_at_once_and_rotation_keeps_the_old_key_for_flip_before() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "revoke").await;
    let policy = ns
        .policy(
            &client,
            "p",
            json!({"expiry": {"maxLifetime": "PT1H"}, "rotation": {"secondaryAt": "PT2S", "flipBefore": "PT30S"}}),
        )
        .await;
    let _keyward = controller(&ns, "info");
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "team-a", "secretName": "svc-key"})).await;
    let (first, standby) = wait_key(&client, &ns.name, "svc", Duration::from_secs(60), |k| {
        let s = k.status.as_ref()?;
        let a = active(k)?;
        let b = s.keys.iter().find(|x| x.slot != a.slot && x.state == KeyState::Standby)?;
        Some((a, b.clone()))
    })
    .await;

    // Revoke the active key: api-key moves to the standby at once.
    common::revoke_keys(&client, &ns.name, "svc", &[first.key_id.as_str()]).await;
    let hash = common::eventually("api-key to leave the revoked key", Duration::from_secs(10), || async {
        let (_, hash) = observe(&client, &ns.name, "svc", "svc-key").await?;
        (hash != first.hash).then_some(hash)
    })
    .await;
    assert_eq!(hash, standby.hash, "flipped to the standby");
    let key = get_key(&client, &ns.name, "svc").await;
    let status = key.status.unwrap();
    assert!(status.keys.iter().all(|k| k.key_id != first.key_id || k.state == KeyState::Revoked));
    assert_eq!(status.keys.len(), 2, "the revoked slot is regenerated");

    // Requested rotation: a new active key, the old one valid for flipBefore more.
    let before = active(&get_key(&client, &ns.name, "svc").await).unwrap();
    let requested = Utc::now();
    common::request_rotation(&client, &ns.name, "svc", "1").await;
    let key = wait_key(&client, &ns.name, "svc", Duration::from_secs(10), |k| {
        active(k).filter(|a| a.key_id != before.key_id).map(|_| k.clone())
    })
    .await;
    let status = key.status.unwrap();
    let new = active(&get_key(&client, &ns.name, "svc").await).unwrap();
    assert!(new.created_at >= requested - chrono::TimeDelta::seconds(1));
    let old = status.keys.iter().find(|k| k.key_id == before.key_id).expect("old key kept");
    assert_eq!(old.state, KeyState::Standby);
    assert_eq!(old.expiry_reason, Some(ExpiryReason::Rotated));
    let end = old.effective_expires_at.unwrap();
    assert!(
        (end - requested).num_seconds() >= 28 && (end - requested).num_seconds() <= 33,
        "valid ~30 s more: {end}"
    );
    common::eventually("api-key to hold the new key", Duration::from_secs(10), || async {
        let (_, hash) = observe(&client, &ns.name, "svc", "svc-key").await?;
        (hash == new.hash).then_some(())
    })
    .await;
    // The same annotation value does not rotate again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(active(&get_key(&client, &ns.name, "svc").await).unwrap().key_id, new.key_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_secret_is_repaired_and_old_hashes_stay_valid() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "repair").await;
    let policy = ns.policy(&client, "p", json!({"expiry": {"maxLifetime": "PT1H"}})).await;
    let _keyward = controller(&ns, "info");
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "team-a"})).await;
    let first =
        wait_key(&client, &ns.name, "svc", Duration::from_secs(60), |k| active(k).filter(|_| is_ready(k)))
            .await;
    common::eventually("the Secret", Duration::from_secs(10), || async {
        secret_data(&client, &ns.name, "svc").await?.get("api-key").cloned()
    })
    .await;
    Api::<Secret>::namespaced(client.clone(), &ns.name).delete("svc", &Default::default()).await.unwrap();
    let hash = common::eventually("a recreated Secret with a fresh key", Duration::from_secs(20), || async {
        let (_, hash) = observe(&client, &ns.name, "svc", "svc").await?;
        (hash != first.hash).then_some(hash)
    })
    .await;
    let key = get_key(&client, &ns.name, "svc").await;
    let old = key.status.as_ref().unwrap().keys.iter().find(|k| k.key_id == first.key_id).cloned();
    assert_eq!(old.map(|k| k.state), Some(KeyState::Standby), "the old hash stays valid until its expiry");
    assert_eq!(active(&key).unwrap().hash, hash);
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    common::eventually("a SecretRepaired Warning", Duration::from_secs(10), || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("SecretRepaired") && e.type_.as_deref() == Some("Warning"))
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_condition_and_changes_nothing_else() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "badinput").await;
    let good =
        ns.policy(&client, "good", json!({"expiry": {"maxLifetime": "P30D", "minLifetime": "P1D"}})).await;
    let elsewhere = ns
        .policy(
            &client,
            "elsewhere",
            json!({"namespaceSelector": {"matchLabels": {"keyward.dev/never": "true"}}}),
        )
        .await;
    let broken = ns.policy(&client, "broken", json!({"expiry": {"maxLifetime": "banana"}})).await;
    // A Secret keyward does not own, in the way of one ApiKey.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let foreign: Secret = serde_json::from_value(json!({
        "metadata": {"name": "taken"}, "stringData": {"password": "hunter2"}
    }))
    .unwrap();
    let foreign = secrets.create(&PostParams::default(), &foreign).await.unwrap();
    let _keyward = controller(&ns, "info");

    let cases = [
        ("no-policy", json!({"policy": format!("{}-missing", ns.name), "owner": "a"}), "PolicyNotFound"),
        ("not-allowed", json!({"policy": elsewhere, "owner": "a"}), "PolicyNotAllowed"),
        ("broken-policy", json!({"policy": broken, "owner": "a"}), "PolicyInvalid"),
        ("malformed", json!({"policy": good, "owner": "a", "lifetime": "banana"}), "InvalidSpec"),
        ("conflict", json!({"policy": good, "owner": "a", "secretName": "taken"}), "SecretConflict"),
    ];
    for (name, spec, _) in &cases {
        // One owner per case, so the per-owner limits stay out of the way.
        let mut spec = spec.clone();
        spec["owner"] = json!(format!("owner-{name}"));
        ns.apikey(&client, name, spec).await;
    }
    for (name, _, reason) in &cases {
        let key = wait_key(&client, &ns.name, name, Duration::from_secs(60), |k| {
            ready(k).filter(|(s, _)| s == "False").map(|_| k.clone())
        })
        .await;
        let (_, got) = ready(&key).unwrap();
        assert_eq!(&got, reason, "{name}: {:#?}", key.status);
        let status = key.status.unwrap();
        assert!(status.keys.is_empty() && status.client_id.is_none(), "{name}: no key issued");
        assert!(status.details.unwrap_or_default().len() > 10, "{name}: a message says why");
        if *name != "conflict" {
            assert!(secret_data(&client, &ns.name, name).await.is_none(), "{name}: no Secret");
        }
    }
    // A lifetime outside the policy's bounds is clamped when a key is issued (and said
    // so), not refused: the bounds belong to the moment of issuance.
    for (name, lifetime) in [("too-short", "PT1M"), ("too-long", "P1Y")] {
        ns.apikey(
            &client,
            name,
            json!({"policy": good, "owner": format!("owner-{name}"), "lifetime": lifetime}),
        )
        .await;
        let key = wait_key(&client, &ns.name, name, Duration::from_secs(60), |k| {
            let c = keyward::api::find_condition(&k.status.as_ref()?.conditions, "LifetimeClamped")?.clone();
            ready(k).filter(|(s, _)| s == "True").map(|_| (k.clone(), c))
        })
        .await;
        assert_eq!(key.1.reason, "LifetimeOutOfBounds", "{name}");
        assert!(key.1.message.contains("keys are issued for"), "{name}: {}", key.1.message);
    }
    let after = secrets.get("taken").await.unwrap();
    assert_eq!(
        after.metadata.resource_version, foreign.metadata.resource_version,
        "foreign Secret untouched"
    );
    assert_eq!(after.data, foreign.data);
    // Each reason also reached the user as a Warning Event.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    common::eventually("a Warning Event per bad ApiKey", Duration::from_secs(20), || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        cases
            .iter()
            .all(|(name, _, reason)| {
                list.items.iter().any(|e| {
                    e.reason.as_deref() == Some(*reason)
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(*name)
                })
            })
            .then_some(())
    })
    .await;
    // Fixing the input lets the key through.
    let keys: Api<ApiKey> = Api::namespaced(client.clone(), &ns.name);
    keys.patch("malformed", &PatchParams::default(), &Patch::Merge(json!({"spec": {"lifetime": "P7D"}})))
        .await
        .unwrap();
    common::wait_ready(&client, &ns.name, "malformed", Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_material_never_leaves_the_secret() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "leak").await;
    let policy = ns
        .policy(&client, "p", json!({"expiry": {"maxLifetime": "PT8S", "minLifetime": "PT1S"}, "rotation": {"flipBefore": "PT1S"}}))
        .await;
    let keyward = controller(&ns, "trace");
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "team-a"})).await;
    let keys: Api<ApiKey> = Api::namespaced(client.clone(), &ns.name);
    // Collect every key the Secret ever holds through a cycle, a revocation and a rotation.
    let mut material: BTreeSet<String> = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut revoked = false;
    let mut rotated = false;
    while tokio::time::Instant::now() < deadline {
        if let Some(data) = secret_data(&client, &ns.name, "svc").await {
            for k in ["api-key", "primary", "secondary"] {
                if let Some(v) = data.get(k) {
                    material.insert(v.clone());
                }
            }
        }
        let elapsed = 20 - deadline.duration_since(tokio::time::Instant::now()).as_secs();
        if elapsed >= 6
            && !revoked
            && let Some(a) = active(&get_key(&client, &ns.name, "svc").await)
        {
            let patch = json!({"spec": {"revokedKeys": [a.key_id]}});
            keys.patch("svc", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
            revoked = true;
        }
        if elapsed >= 10 && !rotated {
            common::request_rotation(&client, &ns.name, "svc", "x").await;
            rotated = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(material.len() >= 4, "saw several keys: {}", material.len());
    let logs = keyward.logs();
    assert!(logs.contains("TRACE") || logs.contains("DEBUG"), "the log ran at trace level");
    let status = serde_json::to_string(&get_key(&client, &ns.name, "svc").await).unwrap();
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let events = serde_json::to_string(&events.list(&ListParams::default()).await.unwrap().items).unwrap();
    for m in &material {
        // The random part alone must not appear either (e.g. without its prefix).
        let body = &m[3..m.len() - 6];
        let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, m.as_bytes());
        for (what, text) in [("logs", &logs), ("ApiKey", &status), ("events", &events)] {
            assert!(!text.contains(body), "key material found in {what}");
            assert!(!text.contains(&encoded), "base64 key material found in {what}");
        }
    }
}
