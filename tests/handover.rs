//! Handover on the real API server, with keyward's controller and verifier under
//! traffic from callers that choose which key they send: the `Handover` condition, the
//! still-in-use warning (Event, webhook, metric), early retirement of drained keys
//! (`rotation.retireDrainedAfter`), no usage data without a verifier, and last uses that
//! reach status at once for a new key and on a verifier's shutdown.
//!
//! Both processes run with `--usage-flush-interval PT2S`, so a key is quiet after 4 s
//! without a use.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use common::hooks::{events_with_reason, receiver};
use common::{KeywardProcess, TestNamespace, client, get_key, http, secret_data, verify_json, wait_key};
use keyward::api::{ApiKey, ExpiryReason, KeyState, KeyStatus, Slot, find_condition};
use kube::Client;
use serde_json::json;

const FLUSH: &str = "PT2S";

/// The `Handover` condition's (status, reason, message).
fn handover(key: &ApiKey) -> Option<(String, String, String)> {
    let c = find_condition(&key.status.as_ref()?.conditions, "Handover")?;
    Some((c.status.to_string(), c.reason.to_string(), c.message.to_string()))
}

fn slot(key: &ApiKey, slot: Slot) -> Option<KeyStatus> {
    key.status.as_ref()?.keys.iter().find(|k| k.slot == slot).cloned()
}

/// A caller that sends the key it is given to the verifier's `/v1/auth` every 200 ms,
/// counting rejections of keys that were valid when sent.
struct Caller {
    key: Arc<Mutex<Option<String>>>,
    rejected: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Caller {
    fn start(verifier: &str) -> Caller {
        let key: Arc<Mutex<Option<String>>> = Arc::default();
        let rejected: Arc<Mutex<Vec<String>>> = Arc::default();
        let (k, r, addr) = (key.clone(), rejected.clone(), verifier.to_string());
        let task = tokio::spawn(async move {
            loop {
                let current = k.lock().unwrap().clone();
                if let Some(current) = current {
                    let a = addr.clone();
                    let bearer = format!("Bearer {current}");
                    let code = tokio::task::spawn_blocking(move || {
                        http(&a, "GET", "/v1/auth", &[("Authorization", &bearer)], b"").map(|r| r.0)
                    })
                    .await
                    .unwrap();
                    if code != Some(200) {
                        r.lock().unwrap().push(format!("{code:?}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Caller { key, rejected, task }
    }

    fn send(&self, key: &str) {
        *self.key.lock().unwrap() = Some(key.to_string());
    }

    fn stop(&self) {
        *self.key.lock().unwrap() = None;
    }

    fn rejected(&self) -> Vec<String> {
        self.rejected.lock().unwrap().clone()
    }
}

impl Drop for Caller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The key material of `field` (`primary`, `secondary`, `api-key`) in the ApiKey's Secret.
async fn material(client: &Client, ns: &str, secret: &str, field: &str) -> Option<String> {
    secret_data(client, ns, secret).await?.get(field).cloned()
}

fn controller(ns: &str) -> KeywardProcess {
    common::controller_for(ns, &["--usage-flush-interval", FLUSH], "info")
}

fn verifier(ns: &str) -> KeywardProcess {
    KeywardProcess::start(&["verifier", "--namespace", ns, "--usage-flush-interval", FLUSH], "info")
}

fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

/// (a) and (b): 90 s keys, the Secondary at 9 s, the flip at 50 s (40 s before the
/// Primary ends, so consumers should have moved by 70 s: half of flipBefore), one
/// warning threshold 30 s before a key's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_caller_left_on_the_old_key_is_warned_about_until_it_switches_and_one_that_switched_is_not() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "handover").await;
    let (url, hook) = receiver(0).await;
    let policy = ns
        .policy(
            &client,
            "p",
            json!({
                "expiry": {"maxLifetime": "PT90S", "minLifetime": "PT1S"},
                "rotation": {"secondaryAt": "10%", "flipBefore": "PT40S"},
                "notifications": {"before": ["PT30S"], "webhooks": [{"url": url}]}
            }),
        )
        .await;
    let keyward = controller(&ns.name);
    let verifier = verifier(&ns.name);
    verifier.wait_ready().await;
    ns.apikey(&client, "stuck", json!({"policy": policy, "owner": "partner-a"})).await;
    ns.apikey(&client, "switched", json!({"policy": policy, "owner": "partner-b"})).await;
    let (stuck, switched) = (Caller::start(&verifier.addr), Caller::start(&verifier.addr));
    for (name, caller) in [("stuck", &stuck), ("switched", &switched)] {
        let key = common::eventually("the first key", Duration::from_secs(30), || {
            material(&client, &ns.name, name, "api-key")
        })
        .await;
        caller.send(&key);
    }
    // Before the flip: the Primary is used, the Secondary is not.
    let (status, _, message) = wait_key(&client, &ns.name, "stuck", Duration::from_secs(40), |k| {
        handover(k).filter(|h| h.1 == "NewKeyNotYetUsed")
    })
    .await;
    assert_eq!(status, "False");
    assert!(message.contains("has not been used yet") && message.contains("is in use"), "{message}");
    let details = get_key(&client, &ns.name, "stuck").await.status.unwrap().details.unwrap();
    assert!(details.contains("load the Secondary key"), "details say what to do: {details}");

    // The flip. "switched" reads api-key before each request (a mounted Secret); "stuck"
    // keeps sending the Primary (an external system nobody reloaded).
    let flipped = wait_key(&client, &ns.name, "switched", Duration::from_secs(70), |k| {
        (k.status.as_ref()?.active_slot == Some(Slot::Secondary)).then(|| slot(k, Slot::Secondary))?
    })
    .await;
    // `api-key` follows the status's flip (or precedes it): read it once it holds the
    // Secondary's material, as a reader of the mounted Secret would after the flip.
    // Read at once, it could still be the Primary, and "switched" would never switch.
    let new_key =
        common::eventually("api-key holding the Secondary key", Duration::from_secs(30), || async {
            let (api_key, secondary) = (
                material(&client, &ns.name, "switched", "api-key").await?,
                material(&client, &ns.name, "switched", "secondary").await?,
            );
            (api_key == secondary).then_some(api_key)
        })
        .await;
    switched.send(&new_key);
    let switched_at = Utc::now();
    let old = slot(&get_key(&client, &ns.name, "stuck").await, Slot::Primary).unwrap();
    let old_end = old.effective_expires_at.unwrap();

    // (a) The stuck caller: OldKeyStillInUse (after the flip plus the 20 s allowance),
    // with a KeyStillInUse Event, webhook and metric, before the Primary ends.
    let (_, _, message) = wait_key(&client, &ns.name, "stuck", Duration::from_secs(40), |k| {
        handover(k).filter(|h| h.1 == "OldKeyStillInUse")
    })
    .await;
    assert!(Utc::now() < old_end, "seen before the old key's end ({old_end})");
    assert!(message.contains(&old.key_id) && message.contains("is still used"), "{message}");
    let event = common::eventually("a KeyStillInUse Event", Duration::from_secs(10), || async {
        events_with_reason(&client, &ns.name, "KeyStillInUse")
            .await
            .into_iter()
            .find(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("stuck"))
    })
    .await;
    let note = event.note.unwrap_or_default();
    assert!(note.contains(&old.key_id) && note.contains("someone has not switched"), "{note}");
    let body = common::eventually("a KeyStillInUse webhook", Duration::from_secs(10), || {
        let hook = hook.clone();
        async move {
            let r = hook.lock().unwrap();
            r.accepted.iter().map(|(b, _)| b.clone()).find(|b| b["type"] == "KeyStillInUse")
        }
    })
    .await;
    assert_eq!(body["apiKey"]["name"], "stuck");
    assert_eq!(body["keyId"], old.key_id.as_str());
    assert_eq!(body["handover"], "OldKeyStillInUse");
    assert!(body["lastUsedAt"].is_string() && body["successor"]["keyId"].is_string(), "{body}");
    let metrics = keyward.get("/metrics").unwrap().1;
    assert_eq!(gauge(&metrics, "keyward_apikeys_old_key_in_use"), Some(1.0), "{metrics}");
    assert!(metrics.contains("keyward_key_last_used_timestamp_seconds{"), "{metrics}");

    // It switches: the condition clears once the Primary is quiet (4 s), still before
    // the Primary ends, and the gauge drops.
    let stuck_new = material(&client, &ns.name, "stuck", "api-key").await.unwrap();
    stuck.send(&stuck_new);
    wait_key(&client, &ns.name, "stuck", Duration::from_secs(15), |k| {
        handover(k).filter(|h| h.1 == "NewKeyInUse" && h.0 == "True")
    })
    .await;
    assert!(Utc::now() < old_end, "cleared before the old key's end ({old_end})");
    common::eventually("the gauge to drop", Duration::from_secs(10), || async {
        (gauge(&keyward.get("/metrics")?.1, "keyward_apikeys_old_key_in_use") == Some(0.0)).then_some(())
    })
    .await;
    assert_eq!(verify_json(&verifier.addr, &stuck_new)["code"], "VALID", "the key it switched to verifies");

    // (b) The caller that followed the flip: NewKeyInUse, no KeyStillInUse for it.
    let (status, _, _) = wait_key(&client, &ns.name, "switched", Duration::from_secs(15), |k| {
        handover(k).filter(|h| h.1 == "NewKeyInUse")
    })
    .await;
    assert_eq!(status, "True");
    assert!(flipped.activated_at.unwrap() <= switched_at);
    let about_switched = events_with_reason(&client, &ns.name, "KeyStillInUse")
        .await
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("switched"))
        .count();
    assert_eq!(about_switched, 0, "no still-in-use warning for a caller that switched");
    let hooks: Vec<serde_json::Value> =
        hook.lock().unwrap().accepted.iter().map(|(b, _)| b.clone()).collect();
    assert!(
        !hooks.iter().any(|b| b["type"] == "KeyStillInUse" && b["apiKey"]["name"] == "switched"),
        "{hooks:?}"
    );
    let notified = get_key(&client, &ns.name, "stuck").await.status.unwrap().notified;
    assert_eq!(
        notified.iter().filter(|n| n.kind.as_deref() == Some("KeyStillInUse")).count(),
        1,
        "one threshold, one warning: {notified:?}"
    );
    assert!(stuck.rejected().is_empty(), "no valid key refused: {:?}", stuck.rejected());
    assert!(switched.rejected().is_empty(), "no valid key refused: {:?}", switched.rejected());
}

/// (c) 5-minute keys with `retireDrainedAfter: PT10S` and `flipBefore: PT20S`; the
/// Secondary exists from 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_key_is_retired_early_and_a_key_in_use_never_is() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "drained").await;
    let policy = ns
        .policy(
            &client,
            "p",
            json!({
                "expiry": {"maxLifetime": "PT5M", "minLifetime": "PT1S"},
                "rotation": {"secondaryAt": "10%", "flipBefore": "PT20S", "retireDrainedAfter": "PT10S"}
            }),
        )
        .await;
    let _keyward = controller(&ns.name);
    let verifier = verifier(&ns.name);
    verifier.wait_ready().await;
    ns.apikey(&client, "early", json!({"policy": policy, "owner": "partner-a"})).await;
    ns.apikey(&client, "both", json!({"policy": policy, "owner": "partner-b"})).await;
    let (early, both_old, both_new) =
        (Caller::start(&verifier.addr), Caller::start(&verifier.addr), Caller::start(&verifier.addr));
    let both_primary = common::eventually("the first key", Duration::from_secs(30), || {
        material(&client, &ns.name, "both", "api-key")
    })
    .await;
    both_old.send(&both_primary);
    // The callers load the Secondary as soon as it exists.
    let mut secondaries = Vec::new();
    for (name, caller) in [("early", &early), ("both", &both_new)] {
        let key = common::eventually("the Secondary key", Duration::from_secs(60), || {
            material(&client, &ns.name, name, "secondary")
        })
        .await;
        caller.send(&key);
        secondaries.push(key);
    }
    let early_primary = material(&client, &ns.name, "early", "primary").await.unwrap();
    let before = get_key(&client, &ns.name, "early").await;
    let primary = slot(&before, Slot::Primary).unwrap();
    let scheduled_end = primary.expires_at.unwrap();

    // "early": its Primary was never used, the Secondary is: keyward flips at once and
    // the Primary ends flipBefore later, Drained, minutes before its scheduled end.
    let key = wait_key(&client, &ns.name, "early", Duration::from_secs(60), |k| {
        let p = slot(k, Slot::Primary)?;
        (p.state == KeyState::Expired).then(|| k.clone())
    })
    .await;
    let (p, s) = (slot(&key, Slot::Primary).unwrap(), slot(&key, Slot::Secondary).unwrap());
    assert_eq!(p.expiry_reason, Some(ExpiryReason::Drained), "{:#?}", key.status);
    let ended = p.effective_expires_at.unwrap();
    let flipped = s.activated_at.unwrap();
    assert!(
        ended - flipped >= TimeDelta::seconds(20),
        "ended flipBefore after the flip: {flipped} → {ended}"
    );
    assert!(scheduled_end - ended > TimeDelta::minutes(3), "long before its scheduled end {scheduled_end}");
    assert_eq!(
        material(&client, &ns.name, "early", "api-key").await.as_deref(),
        Some(secondaries[0].as_str())
    );
    assert_eq!(verify_json(&verifier.addr, &early_primary)["code"], "EXPIRED");
    assert_eq!(verify_json(&verifier.addr, &secondaries[0])["code"], "VALID");
    assert!(!events_with_reason(&client, &ns.name, "KeyRetiring").await.is_empty());

    // "both": its Primary is still used (and in api-key): never retired early.
    let key = get_key(&client, &ns.name, "both").await;
    let p = slot(&key, Slot::Primary).unwrap();
    assert_eq!((p.state, p.cap), (KeyState::Active, None), "{:#?}", key.status);
    assert_eq!(material(&client, &ns.name, "both", "api-key").await, Some(both_primary.clone()));
    assert_eq!(verify_json(&verifier.addr, &both_primary)["code"], "VALID");
    for c in [&early, &both_old, &both_new] {
        assert!(c.rejected().is_empty(), "no valid key refused: {:?}", c.rejected());
    }
    // The "both" Primary's caller stops: quiet for 10 s while the Secondary is used, it
    // drains too.
    both_old.stop();
    let key = wait_key(&client, &ns.name, "both", Duration::from_secs(40), |k| {
        let p = slot(k, Slot::Primary)?;
        (p.cap.is_some_and(|c| c.reason == ExpiryReason::Drained)).then(|| k.clone())
    })
    .await;
    assert_eq!(key.status.unwrap().active_slot, Some(Slot::Secondary));
}

/// (d) No verifier: `NoUsageData`, and nothing is retired early: the Primary of a 40 s
/// key (the Secondary from 4 s, the flip at 30 s) runs to its scheduled end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_verifier_there_is_no_usage_data_and_nothing_is_retired() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "nousage").await;
    let policy = ns
        .policy(
            &client,
            "p",
            json!({
                "expiry": {"maxLifetime": "PT40S", "minLifetime": "PT1S"},
                "rotation": {"secondaryAt": "10%", "flipBefore": "PT10S", "retireDrainedAfter": "PT5S"}
            }),
        )
        .await;
    let _keyward = controller(&ns.name);
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "team"})).await;
    let (status, _, message) = wait_key(&client, &ns.name, "svc", Duration::from_secs(40), |k| {
        handover(k).filter(|h| h.1 == "NoUsageData")
    })
    .await;
    assert_eq!(status, "Unknown");
    assert!(message.contains("no verifier reports usage"), "{message}");
    let first = slot(&get_key(&client, &ns.name, "svc").await, Slot::Primary).unwrap();
    assert_eq!((first.cap, first.effective_expires_at), (None, first.expires_at));
    // It ends, and its slot is regenerated at once (half-way through the Secondary's life
    // has passed): the Event says why it ended.
    wait_key(&client, &ns.name, "svc", Duration::from_secs(60), |k| {
        slot(k, Slot::Primary).filter(|p| p.key_id != first.key_id)
    })
    .await;
    let note = common::eventually("the KeyExpired Event", Duration::from_secs(10), || async {
        let expired = events_with_reason(&client, &ns.name, "KeyExpired").await;
        expired.into_iter().filter_map(|e| e.note).find(|n| n.contains(&first.key_id))
    })
    .await;
    assert!(note.contains("(MaxLifetime)"), "{note}");
    assert!(Utc::now() >= first.expires_at.unwrap(), "not before its scheduled end");
    assert!(events_with_reason(&client, &ns.name, "KeyRetiring").await.is_empty());
}

/// Last uses reach status at once for a key's first use (even right after the same
/// verifier wrote the other key), and on a verifier's shutdown (interval or not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_keys_first_use_and_the_last_use_before_a_restart_reach_status() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "lastuse").await;
    let policy = ns
        .policy(
            &client,
            "p",
            json!({"expiry": {"maxLifetime": "PT10M", "minLifetime": "PT1S"}, "rotation": {"secondaryAt": "PT5S"}}),
        )
        .await;
    let _keyward = controller(&ns.name);
    // A one-minute interval, as in production.
    let mut verifier = KeywardProcess::start(&["verifier", "--namespace", &ns.name], "info");
    verifier.wait_ready().await;
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "team"})).await;
    let secondary = common::eventually("the Secondary key", Duration::from_secs(30), || {
        material(&client, &ns.name, "svc", "secondary")
    })
    .await;
    let primary = material(&client, &ns.name, "svc", "primary").await.unwrap();
    let used = |k: &ApiKey, s| slot(k, s).and_then(|k| k.last_used_at);
    assert_eq!(verify_json(&verifier.addr, &primary)["code"], "VALID");
    wait_key(&client, &ns.name, "svc", Duration::from_secs(10), |k| used(k, Slot::Primary)).await;
    // The Secondary's first use, seconds after this verifier wrote the Primary's.
    let first: DateTime<Utc> = Utc::now();
    assert_eq!(verify_json(&verifier.addr, &secondary)["code"], "VALID");
    let at = wait_key(&client, &ns.name, "svc", Duration::from_secs(10), |k| used(k, Slot::Secondary)).await;
    assert!(at >= first - TimeDelta::seconds(1), "{at} vs {first}");
    // Another use of each, inside the minute: written on shutdown.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let last = Utc::now();
    assert_eq!(verify_json(&verifier.addr, &primary)["code"], "VALID");
    assert_eq!(verify_json(&verifier.addr, &secondary)["code"], "VALID");
    let exit = verifier.terminate().await;
    assert!(exit.success(), "{exit:?}");
    let key = get_key(&client, &ns.name, "svc").await;
    for s in [Slot::Primary, Slot::Secondary] {
        let t = used(&key, s).unwrap();
        assert!(
            t >= last - TimeDelta::milliseconds(500),
            "{s:?}: the use at {last} was written on shutdown: {t}"
        );
    }
}
