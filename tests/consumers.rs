//! Consumers that cannot follow a rotation (issue 13 item 3), on the real API server with
//! its controller-manager: a pod that mounts an ApiKey's Secret with `subPath`, and a
//! Deployment that reads it as an env var without being listed in `spec.consumers`, each
//! get exactly one Warning naming the workload and the fix, a False condition and a
//! metric; fixing both clears them. The pods never need to run (they are unschedulable):
//! what matters is what their spec says.

mod common;

use std::time::Duration;

use common::hooks::events_with_reason;
use common::{TestNamespace, client, get_key, metric_sum, wait_key};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;

const REASON: &str = "ConsumerCannotFollowRotation";

fn follow(k: &keyward::api::ApiKey) -> Option<keyward::api::Condition> {
    keyward::api::find_condition(&k.status.as_ref()?.conditions, "ConsumersFollowRotation").cloned()
}

/// Pods that stay Pending (no node has this label), without a ServiceAccount token: on
/// v1.20 a pod that mounts one is refused (500, "No API token found") until the
/// namespace's token exists, which its controller can create well after the
/// ServiceAccount on a loaded machine.
fn unschedulable() -> serde_json::Value {
    json!({"nodeSelector": {"keyward.dev/test-nowhere": "true"}, "automountServiceAccountToken": false})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subpath_mounts_and_unlisted_env_consumers_are_warned_once_and_cleared_when_fixed() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "consumers").await;
    let policy = ns.policy(&client, "p", json!({"expiry": {"maxLifetime": "P1D"}})).await;
    let controller = common::controller_for(&ns.name, &["--watch-consumers"], "info");
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "team"})).await;
    let c = wait_key(&client, &ns.name, "svc", Duration::from_secs(30), follow).await;
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "ConsumersFollowRotation"), "{c:?}");

    // A pod mounting one file of the Secret with subPath; a Deployment reading it as env.
    let mut spec = unschedulable();
    spec["volumes"] = json!([{"name": "key", "secret": {"secretName": "svc"}}]);
    spec["containers"] = json!([{"name": "app", "image": "busybox",
        "volumeMounts": [{"name": "key", "mountPath": "/etc/api-key", "subPath": "api-key"}]}]);
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "reader"}, "spec": spec})).unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    pods.create(&PostParams::default(), &pod).await.expect("create pod");
    let mut template = unschedulable();
    template["containers"] = json!([{"name": "app", "image": "busybox",
        "env": [{"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "svc", "key": "api-key"}}}]}]);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "api"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "api"}},
                 "template": {"metadata": {"labels": {"app": "api"}}, "spec": template}}
    }))
    .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    deployments.create(&PostParams::default(), &deployment).await.expect("create Deployment");

    let pod_name = format!("Pod {}/reader", ns.name);
    let deployment_name = format!("Deployment {}/api", ns.name);
    let c = wait_key(&client, &ns.name, "svc", Duration::from_secs(90), |k| {
        follow(k).filter(|c| c.message.contains(&pod_name) && c.message.contains(&deployment_name))
    })
    .await;
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", REASON), "{c:?}");
    assert!(
        c.message.contains("subPath at /etc/api-key") && c.message.contains("without subPath"),
        "{}",
        c.message
    );
    assert!(
        c.message.contains("(container app) reads the Secret as environment variables")
            && c.message.contains("spec.consumers"),
        "{}",
        c.message
    );
    let metrics = controller.get("/metrics").unwrap().1;
    assert_eq!(metric_sum(&metrics, "keyward_apikey_consumers_not_following"), 2.0, "{metrics}");
    common::eventually("a Warning naming each", Duration::from_secs(10), || async {
        let events = events_with_reason(&client, &ns.name, REASON).await;
        let names =
            |w: &str| events.iter().filter(|e| e.note.as_deref().unwrap_or_default().contains(w)).count();
        (names(&pod_name) == 1 && names(&deployment_name) == 1).then_some(())
    })
    .await;

    // Fixed: the pod goes, the Deployment is listed (keyward now rolls it on each flip).
    pods.delete("reader", &DeleteParams::default().grace_period(0)).await.expect("delete pod");
    common::patch_key(
        &client,
        &ns.name,
        "svc",
        json!({"spec": {"consumers": [{"kind": "Deployment", "name": "api"}]}}),
    )
    .await;
    let c = wait_key(&client, &ns.name, "svc", Duration::from_secs(60), |k| {
        follow(k).filter(|c| c.status == "True")
    })
    .await;
    assert_eq!(c.reason, "ConsumersFollowRotation");
    let metrics = controller.get("/metrics").unwrap().1;
    assert_eq!(metric_sum(&metrics, "keyward_apikey_consumers_not_following"), 0.0, "{metrics}");
    // Over the whole test, still exactly one Warning naming each workload.
    let events = events_with_reason(&client, &ns.name, REASON).await;
    for w in [&pod_name, &deployment_name] {
        let n = events.iter().filter(|e| e.note.as_deref().unwrap_or_default().contains(w.as_str())).count();
        assert_eq!(n, 1, "{w}: {events:#?}");
    }
    assert!(get_key(&client, &ns.name, "svc").await.status.is_some());
}

/// The gauge of one consumer's pending rollout, if present.
fn rollout_gauge(metrics: &str, name: &str) -> Option<f64> {
    let prefix = "keyward_consumer_rollout_pending_since_timestamp_seconds{";
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix) && l.contains(&format!("name=\"{name}\"")))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Issue 13 item 5: listed consumers that have not finished rolling out when the key
/// their old pods hold is about to end (here two paused Deployments, their pods
/// unschedulable) each get one Warning naming them (the workload as related object, so
/// the recorder does not fold them into one), in the last quarter of the drain, and their
/// rollout lag is exported (since the flip) until they finish; a consumer whose rollout
/// finished gets neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_still_rolling_out_when_the_old_key_ends_are_warned_and_their_lag_exported() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "rollouts").await;
    // 40 s keys: the first flip 8 s before the first key ends (at 32 s), the warning from
    // a quarter of those 8 s before the end.
    let policy = ns
        .policy(
            &client,
            "p",
            json!({"expiry": {"maxLifetime": "PT40S", "minLifetime": "PT1S"},
                   "rotation": {"flipBefore": "PT8S", "minFlipLead": "PT1S"}, "notifications": {"before": []}}),
        )
        .await;
    let controller = common::controller_for(&ns.name, &[], "info");
    let consumers = json!([{"kind": "Deployment", "name": "paused-a"}, {"kind": "Deployment", "name": "paused-b"},
                           {"kind": "Deployment", "name": "idle"}]);
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "team", "consumers": consumers})).await;
    let first = wait_key(&client, &ns.name, "svc", Duration::from_secs(30), common::active).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    for (name, replicas, paused) in [("paused-a", 1, true), ("paused-b", 2, true), ("idle", 0, false)] {
        let mut template = unschedulable();
        template["containers"] = json!([{"name": "app", "image": "busybox",
            "env": [{"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "svc", "key": "api-key"}}}]}]);
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"replicas": replicas, "paused": paused, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name},
                                               "annotations": {"keyward.dev/key-id": first.key_id}},
                                  "spec": template}}
        }))
        .unwrap();
        deployments.create(&PostParams::default(), &d).await.expect("create Deployment");
    }

    // The flip rolls all three; the paused ones cannot finish.
    let flipped = wait_key(&client, &ns.name, "svc", Duration::from_secs(60), |k| {
        common::active(k).filter(|a| a.key_id != first.key_id)
    })
    .await;
    let events =
        common::eventually("two ConsumerRolloutIncomplete Warnings", Duration::from_secs(60), || async {
            let events = events_with_reason(&client, &ns.name, "ConsumerRolloutIncomplete").await;
            (events.len() >= 2).then_some(events)
        })
        .await;
    let old_end = get_key(&client, &ns.name, "svc")
        .await
        .status
        .unwrap()
        .keys
        .iter()
        .find(|k| k.key_id == first.key_id)
        .and_then(|k| k.effective_expires_at);
    let flip_at = flipped.activated_at.unwrap();
    for name in ["paused-a", "paused-b"] {
        let mine: Vec<_> = events
            .iter()
            .filter(|e| e.related.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect();
        assert_eq!(mine.len(), 1, "one Warning about {name}: {events:#?}");
        let note = mine[0].note.clone().unwrap_or_default();
        let says =
            format!("Deployment {}/{name} has not finished rolling out to key {}", ns.name, flipped.key_id);
        assert!(note.starts_with(&says) && note.contains("the Deployment is paused"), "{note}");
        assert!(note.contains(&format!("hold key {}, which stops verifying at", first.key_id)), "{note}");
        assert!(mine[0].series.is_none(), "not repeated: {:?}", mine[0].series);
        // Sent in the last quarter of the drain (flip → old key's end), not before.
        let sent = mine[0].event_time.as_ref().map(|t| t.0.as_millisecond()).unwrap_or_default();
        if let Some(end) = old_end {
            let quarter = flip_at + (end - flip_at) * 3 / 4;
            assert!(
                sent + 1000 >= quarter.timestamp_millis(),
                "{name}: sent {sent}, the quarter from {quarter}"
            );
        }
    }
    assert!(events.iter().all(|e| e.related.as_ref().and_then(|r| r.name.as_deref()) != Some("idle")));
    let metrics = controller.get("/metrics").unwrap().1;
    let since = rollout_gauge(&metrics, "paused-a").expect("paused-a's rollout is pending");
    let activated = flip_at.timestamp_millis() as f64 / 1000.0;
    assert!((since - activated).abs() < 2.0, "since the flip: {since} vs {activated}");
    assert_eq!(rollout_gauge(&metrics, "idle"), None, "a finished rollout is not pending: {metrics}");

    // Resumed and scaled to nothing, paused-a finishes: its gauge goes (looked at again
    // while anything is pending), paused-b's stays; still one Warning each.
    deployments
        .patch(
            "paused-a",
            &Default::default(),
            &kube::api::Patch::Merge(json!({"spec": {"paused": false, "replicas": 0}})),
        )
        .await
        .unwrap();
    common::eventually(
        "paused-a's gauge to go once its rollout finished",
        Duration::from_secs(90),
        || async {
            let m = controller.get("/metrics")?.1;
            (rollout_gauge(&m, "paused-a").is_none() && rollout_gauge(&m, "paused-b").is_some()).then_some(())
        },
    )
    .await;
    let n = events_with_reason(&client, &ns.name, "ConsumerRolloutIncomplete").await.len();
    assert_eq!(n, 2, "one Warning per workload and key");
}
