//! examples/ applies cleanly (server-side dry run), keyward reconciles it, and a
//! GitOps re-apply shows no diff: keyward never writes to what the manifests own.

mod common;

use std::time::Duration;

use common::{client, kubectl, try_kubectl};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Node;
use kube::Api;

fn examples() -> String {
    format!("{}/examples", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_apply_reconcile_and_reapply_without_a_diff() {
    let client = client().await;
    // Server-side dry run needs the namespace to exist.
    kubectl(&["apply", "-f", &format!("{}/00-namespace.yaml", examples())]);
    let dry = kubectl(&["apply", "--dry-run=server", "-f", &examples()]);
    assert!(dry.contains("(server dry run)"), "{dry}");
    kubectl(&["apply", "-f", &examples()]);
    let _keyward = common::controller_for("keyward-demo", &[], "info");
    for name in ["checkout", "reporting"] {
        common::wait_ready(&client, "keyward-demo", name, Duration::from_secs(60)).await;
    }
    // The consumer was rolled out (keyward's own field manager), which is not a diff.
    common::eventually("the checkout Deployment to carry the key ID", Duration::from_secs(30), || async {
        let out = try_kubectl(&[
            "get",
            "deployment",
            "-n",
            "keyward-demo",
            "checkout",
            "-o",
            "jsonpath={.spec.template.metadata.annotations.keyward\\.dev/key-id}",
        ])
        .ok()?;
        (!out.trim().is_empty()).then_some(())
    })
    .await;
    // On a cluster with a node, the example consumer runs from an image already on it
    // (nothing is pulled from a registry) and its rolled-out template becomes available.
    if node_ready(&client).await {
        let deployments = Api::<Deployment>::namespaced(client.clone(), "keyward-demo");
        common::eventually(
            "the checkout Deployment's rolled-out pod to be available",
            Duration::from_secs(180),
            || async {
                let d = deployments.get("checkout").await.ok()?;
                let s = d.status.as_ref()?;
                let want = d.spec.as_ref()?.replicas.unwrap_or(1);
                (s.observed_generation == d.metadata.generation
                    && s.updated_replicas == Some(want)
                    && s.available_replicas == Some(want)
                    && s.replicas == Some(want))
                .then_some(())
            },
        )
        .await;
    } else {
        eprintln!("no Ready node: the example Deployment's pod was not started");
    }
    // `kubectl diff` exits 0 when re-applying would change nothing, 1 when it would.
    let out = std::process::Command::new("kubectl").args(["diff", "-f", &examples()]).output().unwrap();
    assert!(
        out.status.success(),
        "re-applying examples/ would change something:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let again = kubectl(&["apply", "-f", &examples()]);
    assert!(again.lines().all(|l| l.ends_with("unchanged")), "{again}");
}

/// Whether some node is Ready (hack/cluster.sh's, or the cluster's in KUBECONFIG).
async fn node_ready(client: &kube::Client) -> bool {
    let nodes = Api::<Node>::all(client.clone()).list(&Default::default()).await.expect("list nodes");
    nodes.items.iter().any(|n| {
        n.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    })
}
