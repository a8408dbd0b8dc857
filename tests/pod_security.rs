//! Pod Security Admission in a namespace labelled as keyward's own
//! (`pod-security.kubernetes.io/enforce: restricted`, docs/operations.md): the chart's pods
//! are admitted there, and a pod that breaks the restricted standard in any one way is
//! refused by PodSecurity, while the same pod is admitted in a namespace without the label,
//! so it is the label that refuses it. Pods are created as server-side dry runs: admission
//! runs in full and no node is needed. (The in-cluster tests, tests/incluster.rs, run the
//! chart's pods for real in such a namespace.)

mod common;

use common::{TestNamespace, client};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

/// The chart as rendered for this server (default values, plus shards) into `ns`: its
/// ServiceAccounts (which the pods name) and, with the pod template of each Deployment, a
/// pod: (Deployment name, pod).
fn chart(version: &str, ns: &str) -> (Vec<ServiceAccount>, Vec<(String, Value)>) {
    let yaml = common::chart_template("psa", ns, version, &["controller.shards={a}"]);
    let docs = common::yaml_docs(&yaml);
    let accounts = docs
        .iter()
        .filter(|d| d["kind"] == "ServiceAccount")
        .map(|d| serde_json::from_value(d.clone()).expect("ServiceAccount"))
        .collect();
    let pods: Vec<(String, Value)> = docs
        .into_iter()
        .filter(|d| d["kind"] == "Deployment")
        .map(|d| {
            let name = d["metadata"]["name"].as_str().unwrap().to_string();
            let template = &d["spec"]["template"];
            let pod = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "labels": template["metadata"]["labels"]}, "spec": template["spec"]});
            (name, pod)
        })
        .collect();
    assert_eq!(pods.len(), 3, "controller, shard and verifier Deployments");
    (accounts, pods)
}

/// Dry-run create `pod` in `ns`: admitted, or the API server's refusal.
async fn admit(client: &kube::Client, ns: &str, pod: &Value) -> Result<(), kube::core::Status> {
    let pod: Pod = serde_json::from_value(pod.clone()).expect("Pod JSON");
    let dry = PostParams { dry_run: true, ..Default::default() };
    match Api::<Pod>::namespaced(client.clone(), ns).create(&dry, &pod).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) => Err(*status),
        Err(e) => panic!("no answer from the API server: {e}"),
    }
}

/// One way to break the restricted standard: (what, how, what PodSecurity says of it).
type Break = (&'static str, fn(&mut Value), &'static str);

/// Remove `field` from the pod's securityContext and from each container's.
fn unset(pod: &mut Value, field: &str) {
    let spec = &mut pod["spec"];
    let mut found = spec["securityContext"].as_object_mut().and_then(|sc| sc.remove(field)).is_some();
    for c in spec["containers"].as_array_mut().into_iter().flatten() {
        found |= c["securityContext"].as_object_mut().and_then(|sc| sc.remove(field)).is_some();
    }
    assert!(found, "the chart's pod sets {field}");
}

#[tokio::test]
async fn the_charts_pods_are_admitted_and_a_pod_breaking_restricted_is_refused() {
    let client = client().await;
    let version = common::server_version(&client).await;
    let keyward = TestNamespace::restricted(&client, "psa").await;
    let open = TestNamespace::new(&client, "psaopen").await;

    let (accounts, pods) = chart(&version, &keyward.name);
    // The pods run as the chart's ServiceAccounts, which must exist for a pod to be admitted.
    for ns in [&keyward, &open] {
        let api = Api::<ServiceAccount>::namespaced(client.clone(), &ns.name);
        for account in &accounts {
            let mut account = account.clone();
            account.metadata.namespace = Some(ns.name.clone());
            api.create(&PostParams::default(), &account).await.expect("create the chart's ServiceAccount");
        }
    }
    for (name, pod) in &pods {
        if let Err(status) = admit(&client, &keyward.name, pod).await {
            panic!("the chart's {name} pod is refused under restricted: {}", status.message);
        }
        eprintln!("the chart's {name} pod: admitted in {} (enforce: restricted)", keyward.name);
    }

    // The chart's controller pod, broken one way at a time (privileged is not among them:
    // hack/cluster.sh's API server refuses privileged pods everywhere, --allow-privileged=false).
    let (_, good) = pods.iter().find(|(name, _)| name == "psa-keyward").expect("the controller's pod");
    let breaks: Vec<Break> = vec![
        ("no runAsNonRoot", |p| unset(p, "runAsNonRoot"), "runAsNonRoot != true"),
        (
            "allowPrivilegeEscalation: true",
            |p| p["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = json!(true),
            "allowPrivilegeEscalation != false",
        ),
        ("capabilities not dropped", |p| unset(p, "capabilities"), "unrestricted capabilities"),
        ("no seccomp profile", |p| unset(p, "seccompProfile"), "seccompProfile"),
        (
            "a hostPath volume",
            |p| p["spec"]["volumes"] = json!([{"name": "host", "hostPath": {"path": "/etc"}}]),
            "restricted volume types",
        ),
    ];
    for (what, break_it, violation) in breaks {
        let mut pod = good.clone();
        break_it(&mut pod);
        let status = admit(&client, &keyward.name, &pod)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: admitted in {} (labelled enforce: restricted)", keyward.name));
        assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"), "{what}: {status:?}");
        assert!(
            status.message.contains(r#"violates PodSecurity "restricted:latest""#)
                && status.message.contains(violation),
            "{what}: {}",
            status.message
        );
        eprintln!("{what}: refused: {}", status.message);
        // Without the label, the same pod is admitted: the label is what refuses it.
        if let Err(status) = admit(&client, &open.name, &pod).await {
            panic!("{what}: refused in {} too (no label): {}", open.name, status.message);
        }
    }
}

/// The install instructions, and hack/run.sh, create keyward's namespace with the label
/// the tests above use.
#[test]
fn keywards_namespace_is_labelled_where_it_is_created() {
    let (key, value) = common::POD_SECURITY_ENFORCE;
    let label = format!("{key}={value}");
    for file in ["README.md", "docs/operations.md", "hack/run.sh", "charts/keyward/values.yaml"] {
        let text = std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert!(text.contains(&label), "{file} does not label keyward's namespace {label}");
    }
}
