//! `kubectl keyward status|rotate|revoke` through kubectl's plugin mechanism (the
//! binary installed as `kubectl-keyward` on PATH), against the real API server.

mod common;

use std::time::Duration;

use common::{TestNamespace, active, client, get_key, wait_key};
use serde_json::json;

/// Run `kubectl keyward …` with the keyward binary installed as a kubectl plugin.
fn kubectl_keyward(args: &[&str]) -> (bool, String, String) {
    let dir = std::env::temp_dir().join(format!("keyward-plugin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plugin = dir.join("kubectl-keyward");
    if !plugin.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_keyward"), &plugin).unwrap();
    }
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default());
    let out = std::process::Command::new("kubectl")
        .arg("keyward")
        .args(args)
        .env("PATH", path)
        .output()
        .expect("kubectl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_keyward_status_rotate_and_revoke() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "cli").await;
    let policy = ns
        .policy(&client, "p", json!({"expiry": {"maxLifetime": "PT1H"}, "rotation": {"secondaryAt": "PT1S"}}))
        .await;
    let _keyward = common::controller_for(&ns.name, &[], "info");
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "payments"})).await;
    let first = wait_key(&client, &ns.name, "svc", Duration::from_secs(30), |k| {
        (k.status.as_ref()?.keys.len() == 2).then(|| active(k)).flatten()
    })
    .await;

    let (ok, out, err) = kubectl_keyward(&["status", "-n", &ns.name]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("NAME") && lines[0].contains("OWNER") && lines[0].contains("NEXT"), "{out}");
    assert!(
        lines[1].contains("svc") && lines[1].contains("payments") && lines[1].contains(&first.key_id),
        "{out}"
    );
    assert!(lines[1].contains(&first.preview), "{out}");

    let (ok, out, err) = kubectl_keyward(&["rotate", "-n", &ns.name, "svc"]);
    assert!(ok && out.contains("rotation requested"), "{out}{err}");
    let rotated = wait_key(&client, &ns.name, "svc", Duration::from_secs(20), |k| {
        active(k).filter(|a| a.key_id != first.key_id)
    })
    .await;

    let (ok, out, err) = kubectl_keyward(&["revoke", "-n", &ns.name, "svc", &rotated.key_id]);
    assert!(ok && out.contains("revoked"), "{out}{err}");
    wait_key(&client, &ns.name, "svc", Duration::from_secs(20), |k| {
        active(k).filter(|a| a.key_id != rotated.key_id)
    })
    .await;
    let key = get_key(&client, &ns.name, "svc").await;
    assert_eq!(key.spec.revoked_keys, vec![rotated.key_id.clone()]);
    let managers: Vec<String> =
        key.metadata.managed_fields.unwrap_or_default().into_iter().filter_map(|m| m.manager).collect();
    assert!(managers.contains(&"keyward/cli".to_string()), "{managers:?}");

    // Clear errors, non-zero exit, one line.
    for (args, needle) in [
        (vec!["status", "-n", &ns.name, "nope"], "not found"),
        (vec!["rotate", "-n", &ns.name, "nope"], "not found"),
        (vec!["revoke", "-n", &ns.name, "svc", "0000000000"], "is not a key of ApiKey"),
    ] {
        let (ok, _, err) = kubectl_keyward(&args);
        assert!(!ok, "{args:?} should fail");
        assert!(err.contains(needle) && err.trim().lines().count() == 1, "{args:?}: {err}");
    }
    let (ok, _, err) = std::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["status"])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .map(|o| (o.status.success(), (), String::from_utf8_lossy(&o.stderr).into_owned()))
        .unwrap();
    assert!(!ok && err.starts_with("keyward: no cluster configuration"), "{err}");
}
