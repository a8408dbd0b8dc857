//! The Helm chart: lint, template every option, install on the real API server, then
//! run the real binary with the chart's ServiceAccount token: its RBAC suffices for a
//! whole rotation cycle and for the verifier, and removing one rule fails with a clear
//! condition.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{KeywardProcess, TestNamespace, client, kubectl, ready, wait_key};
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::Api;
use serde_json::json;

fn chart() -> String {
    format!("{}/charts/keyward", env!("CARGO_MANIFEST_DIR"))
}

fn helm(args: &[&str]) -> (bool, String) {
    let out = Command::new("helm").args(args).output().expect("helm (hack/cluster.sh tools installs it)");
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

/// Uninstalls the release and deletes its namespace when dropped.
struct Release {
    name: String,
    namespace: String,
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = helm(&["uninstall", &self.name, "-n", &self.namespace]);
        let _ =
            Command::new("kubectl").args(["delete", "namespace", &self.namespace, "--wait=false"]).output();
    }
}

#[test]
fn chart_lints_and_renders_every_option() {
    let (ok, out) = helm(&["lint", "--strict", &chart()]);
    assert!(ok, "{out}");
    for (version, sets) in [
        ("1.20.2", vec![]),
        (
            "1.31.0",
            vec!["serviceMonitor.enabled=true,prometheusRule.enabled=true,networkPolicy.enabled=true"],
        ),
        ("1.31.0", vec!["watchNamespace=payments,crds.enabled=false,verifier.enabled=false"]),
    ] {
        let path = chart();
        let mut args = vec!["template", "t", path.as_str(), "--kube-version", version];
        for s in &sets {
            args.extend(["--set", s]);
        }
        let (ok, out) = helm(&args);
        assert!(ok, "{sets:?}: {out}");
        let cel = out.contains("x-kubernetes-validations");
        assert_eq!(
            cel,
            version != "1.20.2" && !sets.iter().any(|s| s.contains("crds.enabled=false")),
            "CEL rules by version"
        );
        if sets.iter().any(|s| s.contains("watchNamespace")) {
            assert!(
                out.contains("kind: Role\n")
                    && out.contains("namespace: payments")
                    && out.contains("--namespace=payments")
            );
            assert!(!out.contains("kind: CustomResourceDefinition"));
        }
        if sets.iter().any(|s| s.contains("serviceMonitor")) {
            assert!(
                out.contains("kind: ServiceMonitor")
                    && out.contains("kind: PrometheusRule")
                    && out.contains("kind: NetworkPolicy")
            );
        }
        for needle in [
            "runAsNonRoot: true",
            "readOnlyRootFilesystem: true",
            "allowPrivilegeEscalation: false",
            "RuntimeDefault",
        ] {
            assert!(out.contains(needle), "restricted Pod Security: {needle}");
        }
    }
    // values.schema.json refuses what it does not know.
    let (ok, out) = helm(&["template", "t", &chart(), "--set", "replicaCount=-1"]);
    assert!(!ok && out.contains("replicaCount"), "{out}");
    let (ok, out) = helm(&["template", "t", &chart(), "--set", "bogus=1"]);
    assert!(!ok, "{out}");
}

fn sa_kubeconfig(release: &Release, sa: &str) -> std::path::PathBuf {
    let token = kubectl(&["create", "token", sa, "-n", &release.namespace, "--duration=1h"]);
    let cluster = kubectl(&["config", "view", "--raw", "--minify", "-o", "jsonpath={.clusters[0].cluster}"]);
    let cluster: serde_json::Value = serde_json::from_str(&cluster).unwrap();
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "sa", "user": {"token": token.trim()}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}],
        "current-context": "sa"
    });
    let path = std::env::temp_dir().join(format!("keyward-sa-{}.kubeconfig", release.name));
    std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_installs_and_its_rbac_runs_a_full_rotation() {
    let client = client().await;
    let id = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let release = Release { name: format!("kw{id}"), namespace: format!("kw-helm-{id}") };
    let (ok, out) = helm(&[
        "install",
        &release.name,
        &chart(),
        "-n",
        &release.namespace,
        "--create-namespace",
        "--take-ownership",
    ]);
    assert!(ok, "{out}");
    let sa = format!("{}-keyward", release.name);
    for (kind, name) in [
        ("deployment", sa.clone()),
        ("service", sa.clone()),
        ("serviceaccount", sa.clone()),
        ("role", format!("{sa}-leader")),
        ("clusterrole", sa.clone()),
        ("clusterrole", format!("{sa}-view")),
        ("crd", "apikeys.keyward.dev".to_string()),
    ] {
        kubectl(&["get", kind, &name, "-n", &release.namespace]);
    }
    let view = kubectl(&["get", "clusterrole", &format!("{sa}-view"), "-o", "jsonpath={.metadata.labels}"]);
    assert!(view.contains("aggregate-to-view"), "{view}");

    // No kubelet runs the pods here: run the same binary with the chart's identity.
    let kubeconfig = sa_kubeconfig(&release, &sa);
    let kc = kubeconfig.display().to_string();
    let ns = TestNamespace::new(&client, "helmrbac").await;
    let policy =
        ns.policy(&client, "p", json!({"expiry": {"maxLifetime": "PT8S", "minLifetime": "PT1S"}})).await;
    let controller = KeywardProcess::start(
        &[
            "controller",
            "--kubeconfig",
            &kc,
            "--namespace",
            &ns.name,
            "--lease-namespace",
            &release.namespace,
        ],
        "info",
    );
    let verifier = KeywardProcess::start(&["verifier", "--kubeconfig", &kc, "--namespace", &ns.name], "info");
    ns.apikey(
        &client,
        "svc",
        json!({"policy": policy, "owner": "a", "consumers": [{"kind": "Deployment", "name": "none"}]}),
    )
    .await;
    // A full cycle: P1, S1, flip, P2 (and the verifier answers with the same identity).
    let mut seen = std::collections::BTreeSet::new();
    wait_key(&client, &ns.name, "svc", Duration::from_secs(60), |k| {
        seen.extend(k.status.iter().flat_map(|s| s.keys.iter().map(|x| x.key_id.clone())));
        (seen.len() >= 3 && ready(k).is_some_and(|r| r.0 == "True")).then_some(())
    })
    .await;
    verifier.wait_ready().await;
    let key = common::secret_data(&client, &ns.name, "svc").await.unwrap()["api-key"].clone();
    let auth = format!("Bearer {key}");
    common::eventually("the verifier to accept the key", Duration::from_secs(10), || async {
        (common::http(&verifier.addr, "GET", "/v1/auth", &[("Authorization", &auth)], b"")?.0 == 200)
            .then_some(())
    })
    .await;
    assert!(!controller.logs().contains("forbidden"), "no permission was missing:\n{}", controller.logs());

    // Remove the Secrets rule: the next step fails with a clear condition.
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let mut role = roles.get(&sa).await.unwrap();
    role.rules.get_or_insert_default().retain(|r| !r.resources.iter().flatten().any(|x| x == "secrets"));
    role.metadata.managed_fields = None;
    roles.replace(&sa, &Default::default(), &role).await.unwrap();
    common::request_rotation(&client, &ns.name, "svc", "1").await;
    let message = wait_key(&client, &ns.name, "svc", Duration::from_secs(30), |k| {
        let c = keyward::api::find_condition(&k.status.as_ref()?.conditions, "Ready")?;
        (c.reason == "ApplyFailed").then(|| c.message.clone())
    })
    .await;
    assert!(message.contains("forbidden") && message.contains("secrets"), "{message}");
}
