//! examples/ applies cleanly (server-side dry run), keyward reconciles it, and a
//! GitOps re-apply shows no diff: keyward never writes to what the manifests own.

mod common;

use std::time::Duration;

use common::{client, kubectl, try_kubectl};

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
