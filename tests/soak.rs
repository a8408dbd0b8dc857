//! Fault-injection soak: keys rotate while the test SIGKILLs and restarts the
//! controller, the verifier, the API server and etcd at random moments, for a bounded
//! time. A checker samples every consumer Secret and the verifier throughout. It kills
//! the shared control plane, so it is ignored by default and run alone by
//! `hack/test.sh` on the local control plane.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use common::{KeywardProcess, TestNamespace, client, http};
use keyward::api::{ApiKey, KeyState, Slot};
use kube::Client;
use kube::api::Api;
use serde_json::json;

const KEYS: [&str; 3] = ["alpha", "beta", "gamma"];
/// Key lifetime: flips come 15 s before expiry (half of the keys' overlap), more than an
/// API server or etcd restart and the controller's retry take together.
const LIFETIME_SECS: i64 = 60;

fn cluster_dir() -> std::path::PathBuf {
    std::env::var("KEYWARD_CLUSTER_DIR").map(Into::into).unwrap_or_else(|_| {
        let cache = std::env::var("KEYWARD_CACHE").map(std::path::PathBuf::from).unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/keyward")
        });
        cache.join("cluster")
    })
}

fn kill_component(name: &str) {
    let pid = std::fs::read_to_string(cluster_dir().join(format!("{name}.pid")))
        .expect("pid file of the local control plane");
    std::process::Command::new("kill").args(["-9", pid.trim()]).status().unwrap();
}

fn restart_control_plane() {
    let script = format!("{}/hack/cluster.sh", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("bash").args([&script, "up"]).output().unwrap();
    assert!(out.status.success(), "control plane restart: {}", String::from_utf8_lossy(&out.stderr));
}

fn controller(ns: &str) -> KeywardProcess {
    common::controller_for(ns, &["--lease-duration", "PT3S"], "info")
}

fn verifier(ns: &str) -> KeywardProcess {
    common::verifier_for(ns)
}

#[derive(Default)]
struct Tally {
    samples: u64,
    skipped: u64,
    violations: Vec<String>,
    /// (slot, createdAt) per key ID, per ApiKey.
    keys: BTreeMap<String, BTreeMap<String, (Slot, DateTime<Utc>)>>,
}

/// One sample of every ApiKey: its Secret exists with a non-empty api-key whose hash is a
/// valid key in status, and the verifier accepts it (a key created in the last 5 s may
/// still be on its way through the verifier's watch after a restart).
async fn sample(client: &Client, ns: &str, verifier_addr: &str, tally: &mut Tally) {
    let keys: Api<ApiKey> = Api::namespaced(client.clone(), ns);
    for name in KEYS {
        let Ok(data) =
            tokio::time::timeout(Duration::from_secs(2), common::secret_data(client, ns, name)).await
        else {
            tally.skipped += 1;
            continue;
        };
        let Some(data) = data else {
            tally.violations.push(format!("{name}: Secret missing"));
            continue;
        };
        let Some(api_key) = data.get("api-key").filter(|k| !k.is_empty()).cloned() else {
            tally.violations.push(format!("{name}: api-key blank"));
            continue;
        };
        let Ok(Ok(key)) = tokio::time::timeout(Duration::from_secs(2), keys.get(name)).await else {
            tally.skipped += 1;
            continue;
        };
        tally.samples += 1;
        let status = key.status.unwrap_or_default();
        for k in &status.keys {
            tally
                .keys
                .entry(name.into())
                .or_default()
                .entry(k.key_id.clone())
                .or_insert((k.slot, k.created_at));
        }
        let hash = keyward::keys::hash(&api_key);
        let Some(entry) = status.keys.iter().find(|k| k.hash == hash) else {
            tally.violations.push(format!("{name}: api-key not in status"));
            continue;
        };
        if !matches!(entry.state, KeyState::Active | KeyState::Standby)
            || entry.effective_expires_at.is_some_and(|t| t <= Utc::now())
        {
            tally.violations.push(format!("{name}: api-key holds a {:?} key", entry.state));
            continue;
        }
        let auth = format!("Bearer {api_key}");
        let verdict = http(verifier_addr, "GET", "/v1/auth", &[("Authorization", &auth)], b"").map(|r| r.0);
        let young = Utc::now() - entry.created_at < TimeDelta::seconds(5);
        match verdict {
            Some(200) => {}
            Some(_) if young => {}
            // Restarting: not listening yet, or listening but not synced (503).
            None | Some(503) => tally.skipped += 1,
            Some(code) => {
                tally.violations.push(format!("{name}: verifier answered {code} for the current key"))
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kills the local control plane; hack/test.sh runs it alone"]
async fn keys_stay_valid_through_random_faults() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "soak").await;
    let policy = ns
        .policy(
            &client,
            "p",
            json!({"expiry": {"maxLifetime": format!("PT{LIFETIME_SECS}S"), "minLifetime": "PT1S"}}),
        )
        .await;
    let mut ctl = controller(&ns.name);
    let mut ver = verifier(&ns.name);
    ver.wait_ready().await;
    for name in KEYS {
        ns.apikey(&client, name, json!({"policy": policy, "owner": name})).await;
    }
    for name in KEYS {
        common::wait_ready(&client, &ns.name, name, Duration::from_secs(60)).await;
    }

    let mut tally = Tally::default();
    let mut restarts = 0;
    let mut faults: Vec<(u64, &str)> = Vec::new();
    let started = Instant::now();
    let mut next_fault = Duration::from_secs(8);
    let mut order = ["controller", "verifier", "kube-apiserver", "etcd"];
    for i in (1..order.len()).rev() {
        order.swap(i, rand::random::<u32>() as usize % (i + 1));
    }
    while started.elapsed() < Duration::from_secs(110) {
        if started.elapsed() >= next_fault && started.elapsed() < Duration::from_secs(85) {
            // Each component once (in random order), then at random.
            let which = if faults.len() < order.len() {
                order[faults.len()]
            } else {
                order[rand::random::<u32>() as usize % 4]
            };
            faults.push((started.elapsed().as_secs(), which));
            match which {
                "controller" => {
                    drop(ctl);
                    ctl = controller(&ns.name);
                }
                "verifier" => {
                    drop(ver);
                    ver = verifier(&ns.name);
                }
                component => {
                    kill_component(component);
                    tokio::time::sleep(Duration::from_millis(500 + u64::from(rand::random::<u16>() % 1500)))
                        .await;
                    restart_control_plane();
                }
            }
            next_fault =
                started.elapsed() + Duration::from_millis(10_000 + u64::from(rand::random::<u16>() % 6000));
        }
        // Like the kubelet: a controller that lost its lease during an outage exits and is restarted.
        if ctl.exited() {
            restarts += 1;
            ctl = controller(&ns.name);
        }
        sample(&client, &ns.name, &ver.addr, &mut tally).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Everything converges after the last fault.
    for name in KEYS {
        common::wait_ready(&client, &ns.name, name, Duration::from_secs(30)).await;
    }
    ver.wait_ready().await;
    sample(&client, &ns.name, &ver.addr, &mut tally).await;

    // No key was issued twice for one step: a slot is regenerated once per lifetime, so
    // two keys in one slot are never created much less than a lifetime apart.
    let mut per_key = Vec::new();
    for (name, keys) in &tally.keys {
        let mut by_slot: BTreeMap<Slot, BTreeSet<DateTime<Utc>>> = BTreeMap::new();
        for (slot, created) in keys.values() {
            by_slot.entry(*slot).or_default().insert(*created);
        }
        for (slot, times) in &by_slot {
            let times: Vec<&DateTime<Utc>> = times.iter().collect();
            for w in times.windows(2) {
                let gap = *w[1] - *w[0];
                if gap < TimeDelta::seconds(LIFETIME_SECS / 2) {
                    tally.violations.push(format!("{name}: two {slot:?} keys {gap} apart"));
                }
            }
        }
        per_key.push(format!("{name}: {} keys", keys.len()));
    }
    eprintln!(
        "soak: {} faults {:?}, {} controller restarts after a lost lease, {} samples ({} skipped while something restarted), {} violations; {}",
        faults.len(),
        faults,
        restarts,
        tally.samples,
        tally.skipped,
        tally.violations.len(),
        per_key.join(", ")
    );
    assert!(faults.len() >= 4, "faults were injected: {faults:?}");
    assert!(tally.samples > 300, "{} samples", tally.samples);
    assert!(tally.violations.is_empty(), "violations: {:?}", tally.violations);
}
