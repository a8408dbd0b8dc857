//! The CRDs install on a real API server, are served, default and validate as
//! documented, and show their docs and printer columns through kubectl.

mod common;

use common::{TestNamespace, client, kubectl, kubectl_eventually};
use keyward::api::{ApiKey, KeyPolicy};
use kube::api::{Api, DynamicObject, PostParams};

fn policy(name: &str, spec: serde_json::Value) -> KeyPolicy {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "keyward.dev/v1alpha1", "kind": "KeyPolicy",
        "metadata": {"name": name}, "spec": spec
    }))
    .unwrap()
}

fn apikey(name: &str, spec: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": name}, "spec": spec
    })
}

#[tokio::test]
async fn crds_are_served_with_printer_columns() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "served").await;
    let keys: Api<ApiKey> = Api::namespaced(client.clone(), &ns.name);
    let key: ApiKey =
        serde_json::from_value(apikey("columns", serde_json::json!({"owner": "team-a"}))).unwrap();
    keys.create(&PostParams::default(), &key).await.expect("create ApiKey");
    assert_eq!(keys.list(&Default::default()).await.unwrap().items.len(), 1);

    let table = kubectl_eventually(&["get", "apikeys", "-n", &ns.name]).await;
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "OWNER", "ACTIVE", "EXPIRES", "NEXT", "READY", "AGE"], "{table}");
    assert!(table.contains("team-a"), "{table}");
    // The short names work too.
    assert!(kubectl(&["get", "ak", "-n", &ns.name]).contains("columns"));
    let policies = kubectl(&["get", "kpol"]);
    assert!(policies.is_empty() || policies.starts_with("NAME"), "{policies}");
}

#[tokio::test]
async fn valid_objects_are_accepted_and_defaulted() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "valid").await;
    let policies: Api<KeyPolicy> = Api::all(client.clone());
    let name = format!("{}-policy", ns.name);
    let created = policies
        .create(
            &PostParams::default(),
            &policy(&name, serde_json::json!({"expiry": {"maxLifetime": "P30D"}})),
        )
        .await
        .expect("create KeyPolicy");
    // Server-side defaults from the schema.
    assert_eq!(created.spec.expiry.max_lifetime, "P30D");
    assert_eq!(created.spec.expiry.min_lifetime, "PT1M");
    assert_eq!(created.spec.rotation.secondary_at, "50%");
    assert_eq!(created.spec.rotation.flip_before, "PT10M");
    assert_eq!(created.spec.notifications.before, ["P30D", "P7D", "P1D"]);
    assert_eq!(created.spec.limits.max_keys_per_owner, 2);
    assert_eq!(created.spec.key_format.prefix, "kw_");
    assert_eq!(created.spec.key_format.random_bytes, 32);
    assert!(created.spec.key_format.checksum);
    assert!(!created.spec.default);

    let keys: Api<ApiKey> = Api::namespaced(client.clone(), &ns.name);
    let key: ApiKey = serde_json::from_value(apikey(
        "full",
        serde_json::json!({
            "policy": name, "owner": "payments", "description": "checkout service",
            "secretName": "checkout-key", "lifetime": "p3m",
            "secretTemplate": {"labels": {"team": "payments"}, "annotations": {"a": "b"}},
            "consumers": [{"kind": "Deployment", "name": "checkout"}],
            "revokedKeys": ["abc123"]
        }),
    ))
    .unwrap();
    let got = keys.create(&PostParams::default(), &key).await.expect("create ApiKey");
    assert_eq!(got.spec, key.spec, "the server keeps every field as sent");
    policies.delete(&name, &Default::default()).await.unwrap();
}

#[tokio::test]
async fn invalid_objects_are_refused_by_the_schema() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "invalid").await;
    let keys: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns.name, &kube::discovery::ApiResource::erase::<ApiKey>(&()));
    let cases = [
        ("no-owner", serde_json::json!({"description": "x"}), "owner"),
        ("empty-owner", serde_json::json!({"owner": ""}), "owner"),
        ("bad-kind", serde_json::json!({"owner": "a", "consumers": [{"kind": "Pod", "name": "x"}]}), "kind"),
        ("bad-type", serde_json::json!({"owner": "a", "lifetime": 5}), "lifetime"),
    ];
    for (name, spec, field) in cases {
        let obj = apikey(name, spec);
        let err =
            keys.create(&PostParams::default(), &serde_json::from_value(obj).unwrap()).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(field), "{name}: error should name {field}: {msg}");
    }
    let policies: Api<DynamicObject> =
        Api::all_with(client.clone(), &kube::discovery::ApiResource::erase::<KeyPolicy>(&()));
    let cases = [
        ("prefix", serde_json::json!({"keyFormat": {"prefix": "UPPER"}}), "prefix"),
        ("bytes-low", serde_json::json!({"keyFormat": {"randomBytes": 8}}), "randomBytes"),
        ("bytes-high", serde_json::json!({"keyFormat": {"randomBytes": 65}}), "randomBytes"),
        ("encoding", serde_json::json!({"keyFormat": {"encoding": "base32"}}), "encoding"),
        ("mode", serde_json::json!({"expiry": {"mode": "Sometimes"}}), "mode"),
        ("limit", serde_json::json!({"limits": {"maxKeysPerOwner": 0}}), "maxKeysPerOwner"),
    ];
    for (suffix, spec, field) in cases {
        let obj =
            serde_json::to_value(policy(&format!("{}-{suffix}", ns.name), serde_json::json!({}))).unwrap();
        let mut obj = obj;
        obj["spec"] = spec;
        let obj: DynamicObject = serde_json::from_value(obj).unwrap();
        let err = policies.create(&PostParams::default(), &obj).await.unwrap_err();
        assert!(err.to_string().contains(field), "{suffix}: {err}");
    }
}

#[tokio::test]
async fn kubectl_explain_shows_field_docs() {
    let _ = client().await;
    let spec = kubectl_eventually(&["explain", "apikey.spec"]).await;
    for needle in ["owner", "Who holds the key", "revokedKeys", "secretTemplate", "consumers"] {
        assert!(spec.contains(needle), "kubectl explain apikey.spec lacks {needle:?}:\n{spec}");
    }
    let expiry = kubectl_eventually(&["explain", "keypolicy.spec.expiry"]).await;
    for needle in ["maxLifetime", "inactivityTimeout", "acknowledgeRisk", "P90D"] {
        assert!(expiry.contains(needle), "kubectl explain keypolicy.spec.expiry lacks {needle:?}:\n{expiry}");
    }
    let lifetime = kubectl_eventually(&["explain", "apikey.spec.lifetime"]).await;
    assert!(lifetime.contains("<string>"), "optional fields keep their type:\n{lifetime}");
}
