//! `keyward controller` on a cluster without keyward's CRDs exits non-zero with one
//! line that says what is missing and how to install it. This test deletes the CRDs
//! (and with them every ApiKey and KeyPolicy), so it is ignored by default and run by
//! `hack/test.sh` on the local control plane only, after the other tests.

mod common;

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DeleteParams};

#[tokio::test]
#[ignore = "deletes keyward's CRDs; hack/test.sh runs it on the local control plane"]
async fn controller_explains_missing_crds_in_one_line() {
    let client = Client::try_default().await.expect("cluster from KUBECONFIG");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in ["apikeys.keyward.dev", "keypolicies.keyward.dev"] {
        let _ = crds.delete(name, &DeleteParams::foreground()).await;
    }
    common::eventually("CRDs gone", Duration::from_secs(120), || {
        let crds = crds.clone();
        async move {
            let a = crds.get_opt("apikeys.keyward.dev").await.ok()?;
            let p = crds.get_opt("keypolicies.keyward.dev").await.ok()?;
            (a.is_none() && p.is_none()).then_some(())
        }
    })
    .await;

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["controller", "--metrics-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "error")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out).await.expect("exits promptly").unwrap();
    // Put the CRDs back before asserting, so a failure leaves the cluster usable.
    common::install_crds(&client).await;

    assert!(!out.status.success(), "must exit non-zero");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line, not a panic or a backtrace:\n{stderr}");
    let line = lines[0];
    assert!(line.starts_with("keyward: "), "{line}");
    assert!(line.contains("CRD") && line.contains("keyward.dev"), "{line}");
    assert!(line.contains("keyward crds | kubectl apply -f -"), "says how to fix it: {line}");
    assert!(!line.contains("panicked"), "{line}");
}
