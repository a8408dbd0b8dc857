//! The CRDs install on a real API server, are served, default and validate as
//! documented, and show their docs and printer columns through kubectl. `keyward crds
//! --kube-version` and the chart pick the rendering each Kubernetes version accepts
//! (1.28+: CEL rules with `reason`/`fieldPath`; 1.25–1.27: without; older: no rules).
//! The CEL rules themselves are evaluated offline by a CEL engine in
//! `src/api/cel_tests.rs`, and `tests/cel_live.rs` shows the live API server agrees on
//! every row; here the `owner` transition rule refuses a real owner change.

mod common;

use common::{TestNamespace, client, kubectl, kubectl_eventually};
use keyward::api::{ApiKey, KeyPolicy};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use std::process::Command;

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

/// Kubernetes versions around each boundary, and the rendering (by its file under
/// `crds/`) each must get.
const VERSIONS: &[(&str, &str)] = &[
    ("1.20.2", "keyward-crds-pre-1.25.yaml"),
    ("1.24.17", "keyward-crds-pre-1.25.yaml"),
    ("1.25.0", "keyward-crds-1.25-1.27.yaml"),
    ("1.27.0", "keyward-crds-1.25-1.27.yaml"),
    ("1.27.3-eks-2d98532", "keyward-crds-1.25-1.27.yaml"),
    ("1.28.0", "keyward-crds.yaml"),
    ("1.33.1", "keyward-crds.yaml"),
];

fn checked_in(file: &str) -> String {
    std::fs::read_to_string(format!("{}/crds/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The CRD documents of a YAML stream, without the chart's labels and annotations, with
/// every number as a float (helm writes `maximum: 64.0` as `64`).
fn crd_docs(yaml: &str) -> Vec<serde_json::Value> {
    fn floats(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Number(n) => *v = serde_json::json!(n.as_f64().unwrap()),
            serde_json::Value::Array(items) => items.iter_mut().for_each(floats),
            serde_json::Value::Object(map) => map.values_mut().for_each(floats),
            _ => {}
        }
    }
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|v: &serde_json::Value| v["kind"] == "CustomResourceDefinition")
        .map(|mut v| {
            let meta = v["metadata"].as_object_mut().unwrap();
            meta.remove("labels");
            meta.remove("annotations");
            floats(&mut v);
            v
        })
        .collect()
}

#[test]
fn keyward_crds_picks_the_rendering_by_kube_version() {
    for (version, file) in VERSIONS {
        let out = Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(["crds", "--kube-version", version])
            .output()
            .unwrap();
        assert!(out.status.success(), "{version}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8(out.stdout).unwrap() == checked_in(file), "{version} should print {file}");
    }
    let rules = |file: &str| checked_in(file).matches("x-kubernetes-validations").count();
    assert_eq!(rules("keyward-crds-pre-1.25.yaml"), 0);
    assert_eq!(rules("keyward-crds-1.25-1.27.yaml"), rules("keyward-crds.yaml"));
    assert!(!checked_in("keyward-crds-1.25-1.27.yaml").contains("reason: FieldValue"));
    assert!(!checked_in("keyward-crds-1.25-1.27.yaml").contains("fieldPath"));
    assert!(checked_in("keyward-crds.yaml").contains("reason: FieldValueInvalid"));
}

#[test]
fn the_chart_installs_the_rendering_each_version_accepts() {
    let chart = format!("{}/charts/keyward", env!("CARGO_MANIFEST_DIR"));
    for (version, file) in VERSIONS {
        let out = Command::new("helm")
            .args(["template", "t", &chart, "--kube-version", version, "--show-only", "templates/crds.yaml"])
            .output()
            .expect("helm (hack/cluster.sh tools installs it)");
        assert!(out.status.success(), "{version}: {}", String::from_utf8_lossy(&out.stderr));
        let rendered = crd_docs(&String::from_utf8(out.stdout).unwrap());
        assert_eq!(rendered.len(), 2, "{version}");
        assert!(
            rendered == crd_docs(&checked_in(file)),
            "helm template --kube-version {version} should install {file}"
        );
    }
}

/// The CRDs installed for this server are the rendering for its version. On 1.25+ the API
/// server refuses an owner change by the CRD's transition rule (a real patch, not a dry
/// run: the stored owner stays); on an older cluster it lets the change through, and the
/// controller refuses it (`src/controller/apikey/plan.rs`).
#[tokio::test]
async fn the_installed_rendering_matches_the_server() {
    let client = client().await;
    let minor = common::server_minor(&client).await;
    let crds: Api<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    > = Api::all(client.clone());
    let installed = crds.get("apikeys.keyward.dev").await.unwrap();
    let schema = serde_json::to_string(&installed.spec.versions[0].schema).unwrap();
    assert_eq!(
        schema.contains("x-kubernetes-validations"),
        minor >= keyward::api::CEL_MIN_MINOR,
        "1.{minor}"
    );
    // The owner rule is in every rendering that has rules, with the message the
    // controller uses too.
    for file in ["keyward-crds.yaml", "keyward-crds-1.25-1.27.yaml"] {
        let text = checked_in(file);
        assert!(text.contains(&format!("message: {}", keyward::api::OWNER_IMMUTABLE_MESSAGE)), "{file}");
        assert!(text.contains("rule: self == oldSelf"), "{file}");
    }
    let ns = TestNamespace::new(&client, "owner").await;
    let keys: Api<ApiKey> = Api::namespaced(client.clone(), &ns.name);
    let key: ApiKey =
        serde_json::from_value(apikey("owned", serde_json::json!({"owner": "team-a"}))).unwrap();
    keys.create(&PostParams::default(), &key).await.unwrap();
    let patch = serde_json::json!({"spec": {"owner": "team-b"}});
    if minor < keyward::api::CEL_MIN_MINOR {
        // Here the API server itself lets an owner change through (a dry run shows it):
        // that is why the controller refuses it on such clusters.
        let dry = PatchParams { dry_run: true, ..Default::default() };
        let changed =
            keys.patch("owned", &dry, &Patch::Merge(&patch)).await.expect("1.20 does not run CEL rules");
        assert_eq!(changed.spec.owner, "team-b");
        return;
    }
    // A real patch, as `kubectl edit` or a GitOps sync would send it: refused by the rule.
    let refused = keys.patch("owned", &PatchParams::default(), &Patch::Merge(&patch)).await;
    let Err(kube::Error::Api(status)) = refused else { panic!("an owner change went through: {refused:?}") };
    let causes = status.details.as_ref().map(|d| d.causes.clone()).unwrap_or_default();
    let [cause] = &causes[..] else { panic!("one cause: {status:?}") };
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"), "{status:?}");
    assert_eq!(
        (cause.reason.as_str(), cause.field.as_str()),
        ("FieldValueInvalid", "spec.owner"),
        "{status:?}"
    );
    assert!(cause.message.ends_with(keyward::api::OWNER_IMMUTABLE_MESSAGE), "{status:?}");
    eprintln!("1.{minor}: owner change refused: {}", status.message);
    assert_eq!(keys.get("owned").await.unwrap().spec.owner, "team-a", "the stored owner stays");
    // Other edits still go through: the rule compares the owner only.
    let described = serde_json::json!({"spec": {"description": "edited"}});
    keys.patch("owned", &PatchParams::default(), &Patch::Merge(&described)).await.expect("edit description");
}
