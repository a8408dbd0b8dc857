//! The `keyward controller` binary against the real API server: health endpoints,
//! metrics, a reported malformed duration, and a clean stop on SIGTERM.

mod common;

use std::time::Duration;

use common::{TestNamespace, client, eventually};
use k8s_openapi::api::events::v1::Event;
use keyward::api::ApiKey;
use kube::api::{Api, ListParams, PostParams};

#[tokio::test]
async fn controller_serves_health_reports_bad_durations_and_stops_on_sigterm() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "ctl").await;
    let policy = ns.policy(&client, "p", serde_json::json!({})).await;
    let mut keyward = common::controller_for(&ns.name, &[], "info");
    keyward.wait_ready().await;
    assert_eq!(keyward.get("/healthz").unwrap().0, 200);

    let keys: Api<ApiKey> = Api::namespaced(client.clone(), &ns.name);
    let key: ApiKey = serde_json::from_value(serde_json::json!({
        "apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": "bad-lifetime"},
        "spec": {"owner": "team-a", "lifetime": "banana", "policy": policy}
    }))
    .unwrap();
    keys.create(&PostParams::default(), &key).await.unwrap();

    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let note = eventually("an InvalidSpec Warning Event", Duration::from_secs(60), || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items.into_iter().find(|e| e.reason.as_deref() == Some("InvalidSpec")).map(|e| {
                assert_eq!(e.type_.as_deref(), Some("Warning"));
                assert_eq!(e.regarding.as_ref().and_then(|r| r.name.as_deref()), Some("bad-lifetime"));
                e.note.unwrap_or_default()
            })
        }
    })
    .await;
    assert!(note.contains("spec.lifetime") && note.contains("\"banana\""), "{note}");

    let (code, metrics) = keyward.get("/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("keyward_reconciles_total{kind=\"ApiKey\"}"), "{metrics}");
    assert!(metrics.contains("keyward_blocked_reconciles_total{reason=\"InvalidSpec\"}"), "{metrics}");

    let status = keyward.terminate().await;
    assert!(status.success(), "clean exit on SIGTERM: {status:?}\n{}", keyward.logs());
    assert!(keyward.logs().contains("controller stopped"), "{}", keyward.logs());
}
