//! Sharding (issue 16): two controllers on the real API server, each reconciling the
//! ApiKeys its `--watch-label-selector` matches and elected on a Lease of its own. Every
//! ApiKey is reconciled by exactly one of them (the Events each publishes name it), an
//! owner's limit holds across shards, an ApiKey labelled for a shard that does not exist
//! falls to the catch-all one, and an ApiKey relabelled into the other shard is
//! reconciled there from then on.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{KeywardProcess, TestNamespace, client, eventually, get_key, metric_sum};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use keyward::api::ApiKey;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

const LABEL: &str = "keyward.dev/shard";

fn shard(ns: &str, selector: &str, instance: &str) -> KeywardProcess {
    KeywardProcess::start_with_env(
        &["controller", "--namespace", ns, "--watch-label-selector", selector, "--lease-duration", "PT4S"],
        "info",
        &[("POD_NAME", instance)],
    )
}

async fn apikey(client: &Client, ns: &str, name: &str, shard: Option<&str>, spec: serde_json::Value) {
    let labels: BTreeMap<&str, &str> = shard.map(|s| (LABEL, s)).into_iter().collect();
    let obj: ApiKey = serde_json::from_value(json!({
        "apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": name, "labels": labels}, "spec": spec
    }))
    .unwrap();
    Api::<ApiKey>::namespaced(client.clone(), ns).create(&PostParams::default(), &obj).await.unwrap();
}

/// The instances that published Events about ApiKey `name`, with each Event's time.
async fn publishers(client: &Client, ns: &str, name: &str) -> Vec<(String, chrono::DateTime<chrono::Utc>)> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let fields = format!("regarding.name={name},regarding.kind=ApiKey");
    let list = events.list(&ListParams::default().fields(&fields)).await.unwrap();
    list.items
        .into_iter()
        .map(|e| {
            let at = e
                .event_time
                .as_ref()
                .and_then(|t| chrono::DateTime::from_timestamp_micros(t.0.as_microsecond()))
                .unwrap_or_default();
            (e.reporting_instance.unwrap_or_default(), at)
        })
        .collect()
}

fn members(p: &KeywardProcess) -> Option<f64> {
    p.get("/metrics").map(|(_, m)| metric_sum(&m, "keyward_controller_shard_apikeys"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_apikey_is_reconciled_by_exactly_one_shard() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "shards").await;
    let policy = ns
        .policy(&client, "p", json!({"expiry": {"maxLifetime": "P1D"}, "limits": {"maxKeysPerOwner": 1}}))
        .await;
    // The chart's layout: one shard by label, and the rest (no label, or a value no shard
    // serves) on another.
    let a = shard(&ns.name, &format!("{LABEL}=a"), "shard-a");
    let rest = shard(&ns.name, &format!("{LABEL} notin (a)"), "shard-rest");
    a.wait_ready().await;
    rest.wait_ready().await;

    let cases = [("a1", Some("a")), ("a2", Some("a")), ("r1", None), ("r2", None), ("z1", Some("gone"))];
    for (name, label) in cases {
        apikey(&client, &ns.name, name, label, json!({"policy": policy, "owner": name})).await;
    }
    // One owner's ApiKeys in both shards: the older one (shard a) holds the only place.
    apikey(&client, &ns.name, "x1", Some("a"), json!({"policy": policy, "owner": "x"})).await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // distinct creation seconds
    apikey(&client, &ns.name, "x2", None, json!({"policy": policy, "owner": "x"})).await;

    for (name, _) in cases {
        common::wait_ready(&client, &ns.name, name, Duration::from_secs(60)).await;
    }
    common::wait_ready(&client, &ns.name, "x1", Duration::from_secs(60)).await;
    let (status, why) = common::wait_key(&client, &ns.name, "x2", Duration::from_secs(60), |k| {
        common::ready(k).filter(|r| r.0 == "False")
    })
    .await;
    assert_eq!((status.as_str(), why.as_str()), ("False", "OwnerKeyLimitExceeded"), "the limit spans shards");
    assert!(get_key(&client, &ns.name, "x2").await.status.unwrap().keys.is_empty(), "x2 holds no key");

    // Each ApiKey's Events come from its shard only.
    let expected = |name: &str| if ["a1", "a2", "x1"].contains(&name) { "shard-a" } else { "shard-rest" };
    for name in ["a1", "a2", "r1", "r2", "x1", "x2", "z1"] {
        let by = eventually(&format!("Events about {name}"), Duration::from_secs(30), || async {
            let by = publishers(&client, &ns.name, name).await;
            (!by.is_empty()).then_some(by)
        })
        .await;
        assert!(
            by.iter().all(|(instance, _)| instance == expected(name)),
            "{name} is shard {}'s only, yet: {by:?}",
            expected(name)
        );
    }
    // Two Leases, both held: the shards do not wait on each other.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let held: Vec<(String, String)> = leases
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|l| (l.name_any(), l.spec.and_then(|s| s.holder_identity).unwrap_or_default()))
        .collect();
    assert_eq!(held.len(), 2, "one Lease per shard: {held:?}");
    for instance in ["shard-a", "shard-rest"] {
        assert!(held.iter().any(|(_, h)| h.starts_with(instance)), "{instance} holds its Lease: {held:?}");
    }
    assert_eq!((members(&a), members(&rest)), (Some(3.0), Some(4.0)));

    // Move r1 into shard a: both shards see it, then a rotation of r1 is shard a's.
    let moved_at = chrono::Utc::now();
    common::patch_key(&client, &ns.name, "r1", json!({"metadata": {"labels": {LABEL: "a"}}})).await;
    eventually("r1 to move to shard a", Duration::from_secs(30), || async {
        (members(&a) == Some(4.0) && members(&rest) == Some(3.0)).then_some(())
    })
    .await;
    let before = common::active(&get_key(&client, &ns.name, "r1").await).unwrap().key_id;
    common::request_rotation(&client, &ns.name, "r1", "after-move").await;
    common::wait_key(&client, &ns.name, "r1", Duration::from_secs(60), |k| {
        common::active(k).filter(|a| a.key_id != before).map(|_| ())
    })
    .await;
    let after: Vec<(String, chrono::DateTime<chrono::Utc>)> =
        eventually("an Event about r1's rotation", Duration::from_secs(30), || async {
            let after: Vec<_> = publishers(&client, &ns.name, "r1")
                .await
                .into_iter()
                .filter(|(_, t)| *t >= moved_at)
                .collect();
            (!after.is_empty()).then_some(after)
        })
        .await;
    assert!(after.iter().all(|(i, _)| i == "shard-a"), "after the move, r1 is shard a's only: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_selector_or_a_namespaced_policy_writer_is_refused_at_start() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "shardflags").await;
    let mut bad = shard(&ns.name, "keyward.dev/shard in (a", "bad");
    assert!(!bad.wait_exit(Duration::from_secs(60)).await.success());
    assert!(bad.logs().contains("--watch-label-selector"), "the error names the flag: {}", bad.logs());

    let mut writer =
        KeywardProcess::start(&["controller", "--namespace", &ns.name, "--manage-policies", "true"], "info");
    assert!(!writer.wait_exit(Duration::from_secs(60)).await.success());
    assert!(writer.logs().contains("--manage-policies needs a cluster-wide controller"), "{}", writer.logs());
}
