//! Routine policy operations never take a working key, on the real API server: a move
//! to another policy (an edit of `spec.policy`, another default) whose
//! `maxLifetimeSince` lies in the past caps keys from the move, never from before it,
//! and the key in `api-key` keeps verifying for at least `flipBefore`; a retroactive
//! shrink warns the owner once, with the old and the new expiry; a blocked ApiKey never
//! writes slot material that status does not know into `api-key`.

mod common;

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use common::hooks::{events_with_reason, receiver};
use common::{TestNamespace, client, get_key, secret_data, wait_key};
use keyward::api::{ApiKey, KeyPolicy};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;

/// Strict: keys live 40 s, consumers move 10 s before the end, owners are warned 35 s
/// ahead. Standard: an hour.
fn strict() -> serde_json::Value {
    json!({"expiry": {"maxLifetime": "PT40S", "minLifetime": "PT1S"}, "rotation": {"flipBefore": "PT10S"},
           "notifications": {"before": ["PT35S"]}})
}

fn standard(default: bool) -> serde_json::Value {
    json!({"default": default, "expiry": {"maxLifetime": "PT1H", "minLifetime": "PT1S"},
           "rotation": {"flipBefore": "PT10S"}, "notifications": {"before": []}})
}

/// Wait (on the clock) until the active key is older than the strict policy's 40 s, and
/// return the key in `api-key` and its ID.
async fn key_older_than_strict(client: &Client, ns: &str) -> (String, String) {
    let first = wait_key(client, ns, "svc", Duration::from_secs(60), common::active).await;
    let old_enough = first.created_at + TimeDelta::seconds(45);
    common::eventually(
        "the key to be older than the strict policy allows",
        Duration::from_secs(60),
        || async { (Utc::now() > old_enough).then_some(()) },
    )
    .await;
    (common::api_key_material(client, ns, "svc", &first).await, first.key_id)
}

/// The verifier answers VALID for `material` every 250 ms until `flip_before` after
/// `moved`; then the owner's KeyExpiringSoon warning says the end moved (PolicyChange).
async fn keeps_verifying_and_warns(
    client: &Client,
    ns: &str,
    verifier: &str,
    material: &str,
    moved: chrono::DateTime<Utc>,
    to: &str,
    event_note: bool,
) {
    let until = moved + TimeDelta::seconds(10);
    let mut answers = 0;
    while Utc::now() < until {
        let answer = common::verify_json(verifier, material);
        assert_eq!(
            answer["code"],
            "VALID",
            "{:.1} s after the move: {answer}",
            (Utc::now() - moved).as_seconds_f64()
        );
        answers += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(answers >= 10, "{answers} answers in the flipBefore after the move");
    let key = get_key(client, ns, "svc").await;
    let binding = key.status.as_ref().and_then(|s| s.policy.clone()).expect("status.policy");
    assert_eq!(binding.name, to);
    assert!(binding.since >= moved - TimeDelta::seconds(2), "under {to} since the move: {binding:?}");
    // The warning is recorded once (status.notified drives the Event and the webhooks),
    // with the reason and the end it moved to, and delivered.
    let recorded =
        common::eventually("the warning about the moved end, delivered", Duration::from_secs(60), || async {
            let key = get_key(client, ns, "svc").await;
            let status = key.status?;
            let moved: Vec<_> = status
                .notified
                .iter()
                .filter(|n| n.reason == Some(keyward::api::ExpiryReason::PolicyChange))
                .cloned()
                .collect();
            (moved.len() == 1 && moved[0].pending.is_empty()).then_some(moved)
        })
        .await;
    assert!(recorded[0].previous_expires_at.is_some_and(|t| recorded[0].expires_at.is_some_and(|e| e < t)));
    let notes: Vec<String> =
        events_with_reason(client, ns, "KeyExpiringSoon").await.into_iter().filter_map(|e| e.note).collect();
    assert!(notes.iter().all(|n| !n.contains(material)), "no key material in an Event");
    if event_note {
        // Only when no other KeyExpiringSoon came first: the Event recorder folds a second
        // Event of the same reason about the same object into the first one's series.
        let moved: Vec<&String> =
            notes.iter().filter(|n| n.contains("earlier than before (PolicyChange")).collect();
        assert_eq!(moved.len(), 1, "one Event says the end moved: {notes:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_to_an_older_stricter_policy_keeps_the_key_in_api_key_valid_for_flip_before() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "move").await;
    // Both made together: the strict policy's maxLifetimeSince lies well before the move.
    let standard = ns.policy(&client, "standard", standard(false)).await;
    let strict = ns.policy(&client, "strict", strict()).await;
    let _controller = common::controller_for(&ns.name, &[], "info");
    let verifier = common::verifier_for(&ns.name);
    verifier.wait_ready().await;
    ns.apikey(&client, "svc", json!({"policy": standard, "owner": "team-a"})).await;
    let (material, _) = key_older_than_strict(&client, &ns.name).await;

    let moved = Utc::now();
    common::patch_key(&client, &ns.name, "svc", json!({"spec": {"policy": strict}})).await;
    keeps_verifying_and_warns(&client, &ns.name, &verifier.addr, &material, moved, &strict, true).await;
}

/// Changes which KeyPolicy is the cluster's default: run alone (hack/test.sh runs it with
/// the other tests that change the whole cluster), on a cluster with no other default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "changes the cluster's default KeyPolicy: run alone (hack/test.sh)"]
async fn a_change_of_the_default_policy_keeps_the_key_in_api_key_valid_for_flip_before() {
    let client = client().await;
    let policies: Api<KeyPolicy> = Api::all(client.clone());
    let others = common::default_policies(&client).await;
    assert!(
        others.is_empty(),
        "this test changes the cluster's default KeyPolicy; another is default already: {others:?}"
    );
    let ns = TestNamespace::new(&client, "default-move").await;
    let standard = ns.policy(&client, "standard", standard(true)).await;
    let strict = ns.policy(&client, "strict", strict()).await;
    let _controller = common::controller_for(&ns.name, &[], "info");
    let verifier = common::verifier_for(&ns.name);
    verifier.wait_ready().await;
    ns.apikey(&client, "svc", json!({"owner": "team-a"})).await;
    let (material, _) = key_older_than_strict(&client, &ns.name).await;

    // The admin makes the stricter policy the single default.
    let moved = Utc::now();
    let default = |on: bool| Patch::Merge(json!({"spec": {"default": on}}));
    policies.patch(&standard, &PatchParams::default(), &default(false)).await.unwrap();
    policies.patch(&strict, &PatchParams::default(), &default(true)).await.unwrap();
    // Between the two patches the ApiKey may see no default (or two): blocked, its
    // default one-day warning can fire first, and its Event then carries the series.
    keeps_verifying_and_warns(&client, &ns.name, &verifier.addr, &material, moved, &strict, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retroactive_shrink_warns_the_owner_once_with_the_new_expiry() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "shrinkwarn").await;
    let (url, received) = receiver(0).await;
    let policy = ns
        .policy(
            &client,
            "p",
            json!({"expiry": {"maxLifetime": "P1D", "minLifetime": "PT1S"},
                   "notifications": {"before": ["PT23H59M30S"], "webhooks": [{"url": url}]}}),
        )
        .await;
    let _controller = common::controller_for(&ns.name, &[], "info");
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "team-a"})).await;
    let first = wait_key(&client, &ns.name, "svc", Duration::from_secs(60), common::active).await;
    let issued = first.expires_at.expect("a one-day key");
    // Born 30 s before its threshold would pass: not news yet.
    let (_, capped) = common::shrink_policy(&client, &policy, "PT1H", &ns.name, "svc", &first.key_id).await;
    let new_end = capped.effective_expires_at.unwrap();
    assert!(new_end < issued - TimeDelta::hours(22), "capped to an hour: {new_end}");

    // One webhook and one Event, with the old and the new expiry and the reason.
    let payload = common::eventually("the webhook about the moved end", Duration::from_secs(60), || async {
        received.lock().unwrap().accepted.first().map(|(body, _)| body.clone())
    })
    .await;
    assert_eq!(payload["type"], "KeyExpiringSoon", "{payload}");
    assert_eq!(payload["reason"], "PolicyChange", "{payload}");
    assert_eq!(payload["keyId"], first.key_id.as_str(), "{payload}");
    let at = |v: &serde_json::Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    assert_eq!(at(&payload["previousExpiresAt"]), issued, "{payload}");
    assert_eq!(at(&payload["expiresAt"]), new_end, "{payload}");
    let events = events_with_reason(&client, &ns.name, "KeyExpiringSoon").await;
    let notes: Vec<String> = events.into_iter().filter_map(|e| e.note).collect();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("earlier than before (PolicyChange"), "{}", notes[0]);
    // Recorded, so it never fires again for this end.
    let key = get_key(&client, &ns.name, "svc").await;
    let notified = &key.status.as_ref().unwrap().notified;
    assert_eq!(notified.len(), 1, "{notified:?}");
    assert_eq!(notified[0].reason, Some(keyward::api::ExpiryReason::PolicyChange));
    assert_eq!(notified[0].expires_at, Some(new_end));
    assert_eq!(received.lock().unwrap().accepted.len(), 1);
}

/// The controller's reconcile count, from its metrics.
fn reconciles(controller: &common::KeywardProcess) -> f64 {
    let (_, text) = controller.get("/metrics").expect("metrics");
    common::metric_sum(&text, "keyward_reconciles_total")
}

/// Wait until the controller has reconciled again since it had done `before` reconciles,
/// then once more after a new generation (the first may have read what was there before).
async fn reconciled_after(client: &Client, ns: &str, controller: &common::KeywardProcess, before: f64) {
    common::eventually("another reconcile", Duration::from_secs(60), || async {
        (reconciles(controller) > before).then_some(())
    })
    .await;
    let before = reconciles(controller);
    // A new generation (a description) makes the next reconcile read all afresh.
    common::patch_key(client, ns, "svc", json!({"spec": {"description": "poked"}})).await;
    common::eventually("a reconcile of the new generation", Duration::from_secs(60), || async {
        (reconciles(controller) > before).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_apikey_never_writes_unknown_material_into_api_key() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "blockedmat").await;
    let policy = ns.policy(&client, "p", standard(false)).await;
    let controller = common::controller_for(&ns.name, &[], "info");
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "team-a"})).await;
    let first = wait_key(&client, &ns.name, "svc", Duration::from_secs(60), common::active).await;
    // Blocked: the policy is gone.
    Api::<KeyPolicy>::all(client.clone()).delete(&policy, &DeleteParams::default()).await.unwrap();
    wait_key(&client, &ns.name, "svc", Duration::from_secs(60), |k: &ApiKey| {
        let stalled = keyward::api::find_condition(&k.status.as_ref()?.conditions, "Stalled")?;
        (stalled.status == "True" && stalled.reason == "PolicyNotFound").then_some(())
    })
    .await;
    // The active slot and api-key edited to two different well-formed keys, neither known.
    let slot = first.slot.data_key();
    let (in_slot, in_api_key) = {
        let format = keyward::keys::KeyFormat::default();
        (format.generate().expose().to_string(), format.generate().expose().to_string())
    };
    // The Secret is named after the ApiKey (no secretName).
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns.name);
    let patch = json!({"stringData": {slot: in_slot, "api-key": in_api_key}});
    let before = reconciles(&controller);
    secrets.patch("svc", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    reconciled_after(&client, &ns.name, &controller, before).await;

    let data = secret_data(&client, &ns.name, "svc").await.unwrap();
    assert_ne!(data["api-key"], in_slot, "the slot's unknown key was written into api-key");
    let key = get_key(&client, &ns.name, "svc").await;
    let known: Vec<&str> = key.status.iter().flat_map(|s| &s.keys).map(|k| k.hash.as_str()).collect();
    let api_key_hash = keyward::keys::hash(&data["api-key"]);
    assert!(
        api_key_hash == keyward::keys::hash(&in_api_key) || known.contains(&api_key_hash.as_str()),
        "api-key holds a key status does not know, and keyward wrote it"
    );
}
