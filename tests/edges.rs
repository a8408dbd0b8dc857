//! The promise at the edges, on the real API server: a policy shrunk below an ApiKey's
//! explicit lifetime still caps and rotates its keys, two rotations seconds apart never
//! end a key consumers may still hold, and an ApiKey whose policy is deleted stops
//! issuing but keeps revoking and expiring (and says so). Owner limits are a security
//! control: an ApiKey that loses its place has its keys ended; an owner edit is refused
//! by the controller where the API server has no CEL rules.

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
    let m0 = common::api_key_material(&client, &ns.name, "svc", &k0).await;
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

/// The keys of `key` that would verify now, by its status.
fn valid_ids(key: &ApiKey) -> Vec<String> {
    let now = Utc::now();
    key.status
        .iter()
        .flat_map(|s| &s.keys)
        .filter(|k| {
            matches!(k.state, KeyState::Active | KeyState::Standby)
                && k.effective_expires_at.is_none_or(|t| t > now)
        })
        .map(|k| k.key_id.clone())
        .collect()
}

/// `Ready` is False with `reason` and every key ended for the owner limit.
async fn retired(client: &kube::Client, ns: &str, name: &str, reason: &str) -> ApiKey {
    wait_key(client, ns, name, Duration::from_secs(30), |k| {
        let keys = &k.status.as_ref()?.keys;
        let ended = !keys.is_empty()
            && keys
                .iter()
                .all(|x| x.state == KeyState::Expired && x.expiry_reason == Some(ExpiryReason::OwnerLimit));
        (ended && ready(k).is_some_and(|(s, r)| s == "False" && r == reason)).then(|| k.clone())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_owner_limit_ends_the_keys_of_the_apikey_that_lost_its_place() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "limitdown").await;
    let policy = ns
        .policy(&client, "p", json!({"expiry": {"maxLifetime": "P1D"}, "notifications": {"before": []}}))
        .await;
    let _keyward = common::controller_for(&ns.name, &[], "info");
    ns.apikey(&client, "older", json!({"policy": policy, "owner": "team"})).await;
    // Distinct creation seconds, so "oldest" is unambiguous.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ns.apikey(&client, "newer", json!({"policy": policy, "owner": "team"})).await;
    let older = wait_key(&client, &ns.name, "older", Duration::from_secs(30), common::active).await;
    wait_key(&client, &ns.name, "newer", Duration::from_secs(30), common::active).await;
    let older_material = secret_data(&client, &ns.name, "older").await.unwrap()["api-key"].clone();

    Api::<KeyPolicy>::all(client.clone())
        .patch(
            &policy,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"limits": {"maxKeysPerOwner": 1}}})),
        )
        .await
        .unwrap();
    let newer = retired(&client, &ns.name, "newer", "OwnerKeyLimitExceeded").await;
    assert!(valid_ids(&newer).is_empty(), "no key of the refused ApiKey verifies");
    // The one that keeps its place is untouched.
    let kept = get_key(&client, &ns.name, "older").await;
    assert_eq!(ready(&kept).unwrap(), ("True".to_string(), "KeyActive".to_string()));
    assert_eq!(common::active(&kept).map(|k| k.key_id), Some(older.key_id.clone()));
    assert!(verifies(&kept, &older_material, Utc::now()));
    let events: Vec<String> =
        kube::Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns.name)
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("newer"))
            .filter_map(|e| e.note)
            .collect();
    assert!(events.iter().any(|n| n.contains("expired (OwnerLimit)")), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_second_apikey_that_sorts_first_takes_the_place_and_the_other_ends() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "samesec").await;
    let policy = ns
        .policy(
            &client,
            "p",
            json!({"expiry": {"maxLifetime": "P1D"}, "limits": {"maxKeysPerOwner": 1}, "notifications": {"before": []}}),
        )
        .await;
    let _keyward = common::controller_for(&ns.name, &[], "info");
    // "b" gets its key before "a" exists; "a" is then created in the same second, so it
    // sorts first by (creationTimestamp, name) and takes the only place.
    for attempt in 0..10 {
        let (a, b) = (format!("a{attempt}"), format!("b{attempt}"));
        let millis = Utc::now().timestamp_subsec_millis();
        tokio::time::sleep(Duration::from_millis(u64::from(1000 - millis) + 5)).await;
        let created = ns.apikey(&client, &b, json!({"policy": policy, "owner": format!("o{attempt}")})).await;
        let second = created.metadata.creation_timestamp.clone().unwrap();
        wait_key(&client, &ns.name, &b, Duration::from_secs(30), common::active).await;
        let a_key = ns.apikey(&client, &a, json!({"policy": policy, "owner": format!("o{attempt}")})).await;
        if a_key.metadata.creation_timestamp != Some(second) {
            continue; // not the same second on this loaded machine: try again
        }
        wait_key(&client, &ns.name, &a, Duration::from_secs(30), common::active).await;
        retired(&client, &ns.name, &b, "OwnerKeyLimitExceeded").await;
        let a_now = get_key(&client, &ns.name, &a).await;
        assert_eq!(ready(&a_now).unwrap().0, "True");
        return;
    }
    panic!("could not create two ApiKeys in the same second in 10 tries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_edit_is_refused_by_the_controller_where_cel_is_not_run() {
    let client = client().await;
    if common::server_minor(&client).await >= 25 {
        return; // the API server refuses the edit itself (tests/crds.rs checks the rule)
    }
    let ns = TestNamespace::new(&client, "ownerfix").await;
    let policy = ns
        .policy(&client, "p", json!({"expiry": {"maxLifetime": "P1D"}, "notifications": {"before": []}}))
        .await;
    let _keyward = common::controller_for(&ns.name, &[], "info");
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "payments"})).await;
    let first = wait_key(&client, &ns.name, "svc", Duration::from_secs(30), common::active).await;
    common::patch_key(&client, &ns.name, "svc", json!({"spec": {"owner": "intruder"}})).await;
    let refused = wait_key(&client, &ns.name, "svc", Duration::from_secs(30), |k| {
        let c = find_condition(&k.status.as_ref()?.conditions, "Synced")?;
        (c.status == "False" && c.reason == "OwnerImmutable").then(|| (k.clone(), c.message.clone()))
    })
    .await;
    let (key, message) = refused;
    assert!(message.starts_with(keyward::api::OWNER_IMMUTABLE_MESSAGE), "{message}");
    assert_eq!(key.status.as_ref().unwrap().owner.as_deref(), Some("payments"));
    assert_eq!(key.owner(), "payments", "the verifier and the limits keep the recorded owner");
    assert_eq!(common::active(&key).map(|k| k.key_id), Some(first.key_id), "the keys are untouched");
    assert_eq!(ready(&key).unwrap().0, "True");
    // An ApiKey that never got a key (its policy does not exist) cannot change owner
    // either: the owner is recorded at its first reconcile, as CEL refuses it from creation.
    ns.apikey(&client, "early", json!({"policy": "no-such-policy", "owner": "someone"})).await;
    wait_key(&client, &ns.name, "early", Duration::from_secs(30), |k| {
        (k.status.as_ref()?.owner.as_deref() == Some("someone")).then_some(())
    })
    .await;
    common::patch_key(&client, &ns.name, "early", json!({"spec": {"owner": "payments", "policy": policy}}))
        .await;
    let early = wait_key(&client, &ns.name, "early", Duration::from_secs(30), |k| {
        let c = find_condition(&k.status.as_ref()?.conditions, "Synced")?;
        (c.reason == "OwnerImmutable" && common::active(k).is_some()).then(|| k.clone())
    })
    .await;
    assert_eq!(early.owner(), "someone", "it does not join payments' ApiKeys");
    // Setting it back clears the condition.
    common::patch_key(&client, &ns.name, "svc", json!({"spec": {"owner": "payments"}})).await;
    wait_key(&client, &ns.name, "svc", Duration::from_secs(30), |k| {
        let c = find_condition(&k.status.as_ref()?.conditions, "Synced")?;
        (c.status == "True").then_some(())
    })
    .await;
}
