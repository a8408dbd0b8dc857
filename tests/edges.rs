//! The promise at the edges, on the real API server: a policy shrunk below an ApiKey's
//! explicit lifetime still caps and rotates its keys, two rotations seconds apart never
//! end a key consumers may still hold, and an ApiKey whose policy is deleted stops
//! issuing but keeps revoking and expiring (and says so).

mod common;

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use common::{TestNamespace, client, get_key, ready, secret_data, wait_key};
use keyward::api::{ApiKey, ExpiryReason, KeyPolicy, KeyState, find_condition};
use kube::api::Api;
use serde_json::json;

/// Is the key with this material valid at `at`, by the ApiKey's status?
fn verifies(key: &ApiKey, material: &str, at: DateTime<Utc>) -> bool {
    let hash = keyward::keys::hash(material);
    key.status.iter().flat_map(|s| &s.keys).any(|k| {
        k.hash == hash
            && matches!(k.state, KeyState::Active | KeyState::Standby)
            && k.effective_expires_at.is_none_or(|t| t > at)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_shrink_below_explicit_lifetime_still_caps_and_rotates() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "shrink").await;
    let policy = ns
        .policy(
            &client,
            "p",
            json!({"expiry": {"maxLifetime": "PT1H", "minLifetime": "PT1S"}, "rotation": {"flipBefore": "PT3S"},
                   "notifications": {"before": []}}),
        )
        .await;
    let _keyward = common::controller_for(&ns.name, &[], "info");
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "a", "lifetime": "PT50M"})).await;
    let first = wait_key(&client, &ns.name, "svc", Duration::from_secs(30), common::active).await;
    // The policy shrinks to 16 s, below the ApiKey's explicit 50 minutes.
    let (changed, capped) =
        common::shrink_policy(&client, &policy, "PT16S", &ns.name, "svc", &first.key_id).await;
    let end = capped.effective_expires_at.unwrap();
    assert!(end <= changed + TimeDelta::seconds(22), "capped retroactively at the change + 16 s: {end}");
    // Sample the Secret for 60 s (several 16 s rotations): it never holds a dead key.
    let started = tokio::time::Instant::now();
    let (mut samples, mut dead, mut keys) = (0, Vec::new(), std::collections::BTreeSet::new());
    while started.elapsed() < Duration::from_secs(60) {
        let data = secret_data(&client, &ns.name, "svc").await.unwrap();
        let material = data["api-key"].clone();
        let key = get_key(&client, &ns.name, "svc").await;
        // Judged at the time the Secret was read, against the status read after it.
        let at = Utc::now() - TimeDelta::milliseconds(200);
        samples += 1;
        keys.insert(material.clone());
        if !verifies(&key, &material, at) {
            dead.push((started.elapsed(), key.status.clone()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(dead.is_empty(), "{} of {samples} samples held a dead key: {:#?}", dead.len(), dead.first());
    assert!(keys.len() >= 4, "rotated on under the shrunk policy: {} keys", keys.len());
    let key = get_key(&client, &ns.name, "svc").await;
    assert_eq!(ready(&key).unwrap(), ("True".into(), "KeyActive".into()));
    let clamped = find_condition(&key.status.as_ref().unwrap().conditions, "LifetimeClamped").unwrap();
    assert!(clamped.message.contains("keys are issued for PT16S"), "{}", clamped.message);
    let stalled = find_condition(&key.status.as_ref().unwrap().conditions, "Stalled").unwrap();
    assert_eq!(stalled.status, "False", "{stalled:?}");
    eprintln!("{samples} samples, {} keys, 0 dead", keys.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rotations_seconds_apart_leave_earlier_keys_valid_through_their_drain() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "rotate2").await;
    let policy = ns
        .policy(
            &client,
            "p",
            json!({"expiry": {"maxLifetime": "PT1H"}, "rotation": {"flipBefore": "PT12S"}, "notifications": {"before": []}}),
        )
        .await;
    let _keyward = common::controller_for(&ns.name, &[], "info");
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "a"})).await;
    let k0 = wait_key(&client, &ns.name, "svc", Duration::from_secs(30), common::active).await;
    let m0 = secret_data(&client, &ns.name, "svc").await.unwrap()["api-key"].clone();
    common::request_rotation(&client, &ns.name, "svc", "first").await;
    let k1 = wait_key(&client, &ns.name, "svc", Duration::from_secs(20), |k| {
        common::active(k).filter(|a| a.key_id != k0.key_id)
    })
    .await;
    let flipped = k1.activated_at.unwrap();
    // A second request two seconds later: consumers may still hold k0 until 12 s after
    // the first flip, so the rotation waits (and says so) instead of replacing k0.
    tokio::time::sleep(Duration::from_secs(2)).await;
    common::request_rotation(&client, &ns.name, "svc", "second").await;
    let waiting = wait_key(&client, &ns.name, "svc", Duration::from_secs(20), |k| {
        let s = k.status.as_ref()?;
        (s.next_action.as_deref() == Some("Rotate")).then(|| k.clone())
    })
    .await;
    let s = waiting.status.as_ref().unwrap();
    assert!(s.details.as_deref().unwrap_or_default().contains(&k0.key_id), "{:?}", s.details);
    let at = s.next_action_at.unwrap();
    assert!(at >= flipped + TimeDelta::seconds(11), "waits for the drain: {at} vs flip {flipped}");
    // Until then k0 stays valid; sample it.
    while Utc::now() < flipped + TimeDelta::seconds(11) {
        let key = get_key(&client, &ns.name, "svc").await;
        assert!(
            verifies(&key, &m0, Utc::now() - TimeDelta::milliseconds(200)),
            "k0 valid through its drain: {:#?}",
            key.status
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Then the second rotation runs: k1 drains in turn, valid for 12 s more.
    let k2 = wait_key(&client, &ns.name, "svc", Duration::from_secs(30), |k| {
        common::active(k).filter(|a| a.key_id != k1.key_id && a.key_id != k0.key_id)
    })
    .await;
    let key = get_key(&client, &ns.name, "svc").await;
    let drained =
        key.status.unwrap().keys.into_iter().find(|k| k.key_id == k1.key_id).expect("k1 still in status");
    assert_eq!(drained.state, KeyState::Standby);
    let drain_end = drained.effective_expires_at.unwrap();
    assert!(
        drain_end >= k2.activated_at.unwrap() + TimeDelta::seconds(11),
        "k1 drains for flipBefore: {drain_end}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_policy_stops_issuing_but_revocation_and_expiry_still_run() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "nopolicy").await;
    let policy = ns
        .policy(
            &client,
            "p",
            json!({"expiry": {"maxLifetime": "PT30S", "minLifetime": "PT1S"}, "rotation": {"flipBefore": "PT5S"},
                   "notifications": {"before": []}}),
        )
        .await;
    let _keyward = common::controller_for(&ns.name, &[], "info");
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "a"})).await;
    // Wait for the standby (15 s in), then delete the policy.
    let key = wait_key(&client, &ns.name, "svc", Duration::from_secs(40), |k| {
        (k.status.as_ref()?.keys.len() == 2).then(|| k.clone())
    })
    .await;
    let standby =
        key.status.as_ref().unwrap().keys.iter().find(|k| k.state == KeyState::Standby).unwrap().clone();
    Api::<KeyPolicy>::all(client.clone()).delete(&policy, &Default::default()).await.unwrap();
    // The ApiKey hears of it at once (not at its next timer), keeps its valid key, and
    // says what is blocked and what still happens.
    let stalled = wait_key(&client, &ns.name, "svc", Duration::from_secs(10), |k| {
        let c = find_condition(&k.status.as_ref()?.conditions, "Stalled")?;
        (c.status == "True" && c.reason == "PolicyNotFound").then(|| k.clone())
    })
    .await;
    let (status, reason) = ready(&stalled).unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("True", "KeyActive"), "consumers still hold a valid key");
    let details = stalled.status.as_ref().unwrap().details.clone().unwrap();
    assert!(details.contains("does not exist; no new key is issued"), "{details}");
    assert!(
        stalled.status.as_ref().unwrap().next_action.is_some(),
        "what still happens is scheduled: {details}"
    );
    // Revocation still runs while blocked.
    common::revoke_keys(&client, &ns.name, "svc", &[standby.key_id.as_str()]).await;
    let revoked = wait_key(&client, &ns.name, "svc", Duration::from_secs(10), |k| {
        k.status
            .as_ref()?
            .keys
            .iter()
            .find(|x| x.key_id == standby.key_id && x.state == KeyState::Revoked)
            .cloned()
    })
    .await;
    assert_eq!(revoked.expiry_reason, Some(ExpiryReason::Revoked));
    // Expiry still runs, and nothing new is issued: at the end the ApiKey says why.
    let gone = wait_key(&client, &ns.name, "svc", Duration::from_secs(45), |k| {
        ready(k).filter(|(s, _)| s == "False").map(|_| k.clone())
    })
    .await;
    assert_eq!(ready(&gone).unwrap().1, "PolicyNotFound");
    let ids: Vec<String> = gone.status.unwrap().keys.iter().map(|k| k.key_id.clone()).collect();
    assert!(
        ids.iter()
            .all(|id| *id == standby.key_id
                || key.status.as_ref().unwrap().keys.iter().any(|k| &k.key_id == id)),
        "nothing issued: {ids:?}"
    );
}
