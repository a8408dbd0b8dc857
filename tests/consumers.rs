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

/// Pods that stay Pending: no node has this label.
fn unschedulable() -> serde_json::Value {
    json!({"nodeSelector": {"keyward.dev/test-nowhere": "true"}})
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
