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

/// `spec.revokedKeys` as a sorted list.
fn revoked(key: &keyward::api::ApiKey) -> Vec<String> {
    let mut ids = key.spec.revoked_keys.clone();
    ids.sort();
    ids
}

fn sorted(ids: &[&str]) -> Vec<String> {
    let mut ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    ids.sort();
    ids
}

/// Both keys of the ApiKey once neither is among `gone` (revoked keys' slots regenerated).
async fn two_fresh_keys(client: &kube::Client, ns: &str, gone: &[String]) -> (String, String) {
    wait_key(client, ns, "svc", Duration::from_secs(30), |k| {
        let keys = &k.status.as_ref()?.keys;
        let ids: Vec<String> = keys.iter().map(|k| k.key_id.clone()).collect();
        (ids.len() == 2 && !ids.iter().any(|id| gone.contains(id))).then(|| (ids[0].clone(), ids[1].clone()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_second_key_keeps_the_first_and_gitops_entries() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "cli-revoke").await;
    let policy = ns
        .policy(&client, "p", json!({"expiry": {"maxLifetime": "PT1H"}, "rotation": {"secondaryAt": "PT1S"}}))
        .await;
    let _keyward = common::controller_for(&ns.name, &[], "info");
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "payments"})).await;
    let api: kube::Api<keyward::api::ApiKey> = kube::Api::namespaced(client.clone(), &ns.name);

    // A GitOps tool owns one revocation of its own (server-side apply, its own manager).
    let gitops = |ids: Vec<&str>| {
        json!({"apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
               "metadata": {"name": "svc", "namespace": ns.name}, "spec": {"revokedKeys": ids}})
    };
    let gitops_pp = kube::api::PatchParams::apply("gitops");
    api.patch("svc", &gitops_pp, &kube::api::Patch::Apply(gitops(vec!["00000000deadbeef"]))).await.unwrap();

    // Revoke one key, then the other, with the CLI: both stay revoked, and so does the
    // GitOps entry.
    let mut gone = vec!["00000000deadbeef".to_string()];
    let (a, b) = two_fresh_keys(&client, &ns.name, &gone).await;
    for id in [&a, &b] {
        let (ok, out, err) = kubectl_keyward(&["revoke", "-n", &ns.name, "svc", id]);
        assert!(ok && out.contains("revoked"), "{out}{err}");
        gone.push(id.clone());
        two_fresh_keys(&client, &ns.name, &gone).await;
    }
    let key = get_key(&client, &ns.name, "svc").await;
    assert_eq!(
        revoked(&key),
        sorted(&["00000000deadbeef", &a, &b]),
        "the second revoke un-revoked the first"
    );

    // The GitOps tool drops its entry: only its own goes, the CLI's stay.
    api.patch("svc", &gitops_pp, &kube::api::Patch::Apply(gitops(vec![]))).await.unwrap();
    let key = get_key(&client, &ns.name, "svc").await;
    assert_eq!(revoked(&key), sorted(&[&a, &b]), "the CLI took over the GitOps entry");

    // Two revokes at once (each read-then-apply): neither is lost.
    let (c, d) = two_fresh_keys(&client, &ns.name, &gone).await;
    let spawn = |id: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(["revoke", "-n", &ns.name, "svc", id])
            .output()
    };
    let (out_c, out_d) = std::thread::scope(|s| {
        let t = s.spawn(|| spawn(&c));
        let out_d = spawn(&d);
        (t.join().unwrap(), out_d)
    });
    for out in [out_c.unwrap(), out_d.unwrap()] {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let key = get_key(&client, &ns.name, "svc").await;
    assert_eq!(revoked(&key), sorted(&[&a, &b, &c, &d]), "a concurrent revoke was lost");

    // Revoking an ID that is already revoked (its slot since regenerated) is a no-op, not
    // an error; an unknown ID is still one line and a non-zero exit.
    let (ok, out, err) = kubectl_keyward(&["revoke", "-n", &ns.name, "svc", &a]);
    assert!(ok && out.contains("already revoked"), "{out}{err}");
    let (ok, _, err) = kubectl_keyward(&["revoke", "-n", &ns.name, "svc", "0000000000"]);
    assert!(!ok && err.contains("is not a key of ApiKey") && err.trim().lines().count() == 1, "{err}");
    assert_eq!(revoked(&get_key(&client, &ns.name, "svc").await), sorted(&[&a, &b, &c, &d]));
}
