//! keyward as pods on the local node (`hack/cluster.sh up` runs a kubelet, containerd and
//! kube-proxy): the Helm chart installed with the image built here (`hack/image.sh`),
//! exactly as on a user's cluster. Probes, the restricted security context as the
//! container runtime enforces it, a whole rotation driven by the in-cluster controller,
//! an upgrade to another image digest with no failed verification, uninstall, and leader
//! failover between real pods. Each release goes into a namespace that enforces the
//! restricted Pod Security Standard, as keyward's own does (docs/operations.md); the
//! consumers test's own pods (nginx, busybox) meet it too.
//!
//! `hack/test.sh` builds the image twice (two digests), imports both into the node and
//! runs these alone: `KEYWARD_TEST_IMAGE=<ref> KEYWARD_TEST_IMAGE_NEXT=<ref> cargo test
//! --test incluster -- --ignored --test-threads 1`. Without a node there is nothing to run
//! them on: they say so and pass.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{TestNamespace, client, eventually, get_key, secret_data, wait_key};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde_json::json;

/// The images to run: (first, next), or None (with the reason printed) to skip.
fn images() -> Option<(String, String)> {
    match (std::env::var("KEYWARD_TEST_IMAGE"), std::env::var("KEYWARD_TEST_IMAGE_NEXT")) {
        (Ok(a), Ok(b)) if !a.is_empty() && !b.is_empty() => Some((a, b)),
        _ => {
            eprintln!(
                "skipped: no node images (hack/test.sh sets KEYWARD_TEST_IMAGE and KEYWARD_TEST_IMAGE_NEXT when hack/cluster.sh has-node)"
            );
            None
        }
    }
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

/// A release of the chart managing only its own namespace (the tests' other namespaces
/// have controllers of their own), with the CRDs the harness installed.
struct Release {
    name: String,
    ns: String,
}

impl Release {
    fn image_sets(image: &str) -> Vec<String> {
        let (repo, tag) = image.rsplit_once(':').expect("image ref with a tag");
        vec![format!("image.repository={repo}"), format!("image.tag={tag}"), "image.pullPolicy=Never".into()]
    }

    fn helm(&self, verb: &str, image: &str, extra: &[&str]) {
        let chart = format!("{}/charts/keyward", env!("CARGO_MANIFEST_DIR"));
        let mut args: Vec<String> = [verb, &self.name, &chart, "-n", &self.ns, "--wait", "--timeout", "4m"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut sets = Self::image_sets(image);
        sets.extend([
            format!("watchNamespace={}", self.ns),
            "crds.enabled=false".into(),
            "controller.leaseDuration=PT6S".into(),
            "controller.logLevel=info".into(),
        ]);
        sets.extend(extra.iter().map(|s| s.to_string()));
        for s in sets {
            args.extend(["--set".into(), s]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out) = run("helm", &args);
        if !ok {
            let (_, pods) = run("kubectl", &["-n", &self.ns, "get", "pods", "-o", "wide"]);
            let (_, events) = run("kubectl", &["-n", &self.ns, "get", "events"]);
            panic!("helm {verb}: {out}\n{pods}\n{events}");
        }
    }

    fn fullname(&self) -> String {
        format!("{}-keyward", self.name)
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = run("helm", &["uninstall", &self.name, "-n", &self.ns, "--wait", "--timeout", "2m"]);
    }
}

async fn install(client: &Client, ns: &TestNamespace, image: &str, extra: &[&str]) -> Release {
    let release = Release { name: format!("kwic{:04x}", rand::random::<u16>()), ns: ns.name.clone() };
    release.helm("install", image, extra);
    // Every pod Ready: the probes passed on the node.
    let pods = Api::<Pod>::namespaced(client.clone(), &ns.name);
    let lp = ListParams::default().labels(&format!("app.kubernetes.io/instance={}", release.name));
    let listed = pods.list(&lp).await.unwrap().items;
    assert!(
        listed.len() >= 2,
        "controller and verifier pods: {:?}",
        listed.iter().map(|p| p.name_any()).collect::<Vec<_>>()
    );
    for p in &listed {
        let ready = p
            .status
            .iter()
            .flat_map(|s| s.conditions.iter().flatten())
            .any(|c| c.type_ == "Ready" && c.status == "True");
        assert!(ready, "pod {} Ready", p.name_any());
    }
    release
}

/// The verifier Service's ClusterIP address (kube-proxy routes it from this host too).
async fn verifier_addr(client: &Client, release: &Release) -> String {
    verifier_port(client, release, "verifier").await
}

/// The verifier Service's ClusterIP and its port `name`.
async fn verifier_port(client: &Client, release: &Release, name: &str) -> String {
    let svc = Api::<Service>::namespaced(client.clone(), &release.ns)
        .get(&format!("{}-verifier", release.fullname()))
        .await
        .unwrap();
    let ip = svc.spec.as_ref().and_then(|s| s.cluster_ip.clone()).expect("ClusterIP");
    let ports = svc.spec.as_ref().and_then(|s| s.ports.clone()).unwrap_or_default();
    let port = ports.iter().find(|p| p.name.as_deref() == Some(name)).map(|p| p.port).expect(name);
    format!("{ip}:{port}")
}

/// POST /v1/verify through the Service: the answer's code, or why there was none.
fn verify(addr: &str, key: &str) -> Result<String, String> {
    let body = json!({"key": key}).to_string();
    let (code, _, text) =
        common::http(addr, "POST", "/v1/verify", &[("Content-Type", "application/json")], body.as_bytes())
            .ok_or_else(|| "no answer".to_string())?;
    if code != 200 {
        return Err(format!("HTTP {code}: {text}"));
    }
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    Ok(v["code"].as_str().unwrap_or_default().to_string())
}

/// Wait until the verifier Service answers VALID for the key in ApiKey `name`'s Secret.
async fn verifier_answers(client: &Client, ns: &str, name: &str, addr: &str) {
    eventually("the verifier Service to answer VALID", Duration::from_secs(30), || async {
        let key = secret_data(client, ns, name).await?.get("api-key").cloned()?;
        (verify(addr, &key).ok()? == "VALID").then_some(())
    })
    .await;
}

/// Samples, every 100 ms until stopped: the key consumers hold (the Secret's `api-key`,
/// read fresh each time) must verify through the verifier Service. Failures are kept.
struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Sampler {
    fn start(client: &Client, ns: &str, names: &[&str], addr: String) -> Sampler {
        let (stop, samples) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let (client, ns) = (client.clone(), ns.to_string());
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let (s, n) = (stop.clone(), samples.clone());
        let task = tokio::spawn(async move {
            let mut failures = Vec::new();
            while !s.load(Ordering::Relaxed) {
                for name in &names {
                    let Some(key) =
                        secret_data(&client, &ns, name).await.and_then(|d| d.get("api-key").cloned())
                    else {
                        continue;
                    };
                    let addr = addr.clone();
                    let answer = tokio::task::spawn_blocking(move || verify(&addr, &key)).await.unwrap();
                    n.fetch_add(1, Ordering::Relaxed);
                    if answer.as_deref() != Ok("VALID") {
                        failures.push(format!("{:?} {name}: {answer:?}", chrono::Utc::now()));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            failures
        });
        Sampler { stop, samples, task }
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self.task.await.unwrap();
        (self.samples.load(Ordering::Relaxed), failures)
    }
}

/// The host PID of the running container of pod `name` (through containerd), once it runs.
async fn container_pid(client: &Client, ns: &str, name: &str) -> u32 {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let sock =
        std::env::var("KEYWARD_CONTAINERD_SOCK").expect("KEYWARD_CONTAINERD_SOCK (hack/cluster.sh env)");
    eventually(&format!("pod {name}'s running container"), Duration::from_secs(30), || async {
        let pod = pods.get(name).await.ok()?;
        let id = pod
            .status
            .iter()
            .flat_map(|s| s.container_statuses.iter().flatten())
            .filter(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
            .find_map(|c| c.container_id.as_deref()?.strip_prefix("containerd://").map(str::to_string))?;
        let (_, out) = run("ctr", &["--address", &sock, "-n", "k8s.io", "tasks", "ls"]);
        out.lines()
            .find(|l| l.starts_with(&id) && l.contains("RUNNING"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
    })
    .await
}

fn pods_of(client: &Client, ns: &str, component: &str) -> impl std::future::Future<Output = Vec<Pod>> {
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("app.kubernetes.io/component={component}"));
    async move {
        api.list(&lp)
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the node and images: hack/test.sh runs it"]
async fn the_chart_runs_a_rotation_in_pods_upgrades_without_a_failed_request_and_uninstalls_cleanly() {
    let Some((image, next)) = images() else { return };
    let client = client().await;
    let ns = TestNamespace::restricted(&client, "incluster").await;
    let release = install(&client, &ns, &image, &[]).await;

    // The runtime enforces the restricted security context: non-root UID, read-only root.
    let controller = pods_of(&client, &ns.name, "controller").await;
    let pid = container_pid(&client, &ns.name, &controller[0].name_any()).await;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(uid.split_whitespace().skip(1).collect::<Vec<_>>(), ["65532"; 4], "{uid}");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mounts.lines().find(|l| l.split_whitespace().nth(4) == Some("/")).unwrap();
    assert!(root.split_whitespace().nth(5).unwrap().split(',').any(|o| o == "ro"), "read-only root: {root}");

    // A whole rotation, driven by the controller in its pod, sampled through the Service.
    let policy = ns
        .policy(
            &client,
            "p",
            json!({"expiry": {"maxLifetime": "PT40S", "minLifetime": "PT1S"}, "rotation": {"flipBefore": "PT8S"},
                   "notifications": {"before": []}}),
        )
        .await;
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "team"})).await;
    let first = wait_key(&client, &ns.name, "svc", Duration::from_secs(60), common::active).await;
    let addr = verifier_addr(&client, &release).await;
    verifier_answers(&client, &ns.name, "svc", &addr).await;
    // Envoy's gRPC ext_authz through the Service's "grpc" port (appProtocol grpc).
    let grpc = verifier_port(&client, &release, "grpc").await;
    let key = secret_data(&client, &ns.name, "svc").await.unwrap()["api-key"].clone();
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}")).unwrap();
    let mut authz = AuthorizationClient::new(channel.connect().await.expect("the gRPC port"));
    let answer = authz.check(common::check_request(&[("X-Api-Key", &key)], false, None)).await;
    assert_eq!(answer.expect("a Check answer").into_inner().status.map(|s| s.code), Some(0), "OK over gRPC");
    let sampler = Sampler::start(&client, &ns.name, &["svc"], addr.clone());
    let mut seen = BTreeSet::from([first.key_id.clone()]);
    // Primary → standby → flip → the primary slot regenerated: three keys, two flips.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let key = get_key(&client, &ns.name, "svc").await;
        seen.extend(key.status.iter().flat_map(|s| &s.keys).map(|k| k.key_id.clone()));
        let active = common::active(&key).map(|k| k.key_id).unwrap_or_default();
        if seen.len() >= 3 && active != first.key_id {
            break;
        }
        assert!(Instant::now() < deadline, "a rotation cycle within 120 s: {seen:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Upgrade to another image digest while traffic flows.
    let before: BTreeSet<String> =
        pods_of(&client, &ns.name, "verifier").await.iter().map(|p| p.name_any()).collect();
    release.helm("upgrade", &next, &[]);
    let after = pods_of(&client, &ns.name, "verifier").await;
    assert!(after.iter().all(|p| !before.contains(&p.name_any())), "the verifier pods were replaced");
    for p in after.iter().chain(pods_of(&client, &ns.name, "controller").await.iter()) {
        let image = p.spec.as_ref().unwrap().containers[0].image.clone().unwrap_or_default();
        assert_eq!(image, next, "pod {} runs the new image", p.name_any());
    }
    // Keep sampling a little on the new pods, and through one more flip.
    let active_now = common::active(&get_key(&client, &ns.name, "svc").await).unwrap().key_id;
    wait_key(&client, &ns.name, "svc", Duration::from_secs(60), |k| {
        common::active(k).filter(|a| a.key_id != active_now).map(|_| ())
    })
    .await;
    let (samples, failures) = sampler.finish().await;
    assert!(samples > 100, "{samples} samples");
    assert!(failures.is_empty(), "{} of {samples} samples failed: {failures:#?}", failures.len());

    // Uninstall: CRDs, ApiKeys and their Secrets stay; everything of the release goes.
    let secret_before = secret_data(&client, &ns.name, "svc").await.unwrap();
    let (ok, out) = run("helm", &["uninstall", &release.name, "-n", &ns.name, "--wait", "--timeout", "2m"]);
    assert!(ok, "{out}");
    let (_, crds) =
        run("kubectl", &["get", "crd", "apikeys.keyward.dev", "keypolicies.keyward.dev", "-o", "name"]);
    assert_eq!(crds.lines().count(), 2, "CRDs stay: {crds}");
    assert!(get_key(&client, &ns.name, "svc").await.status.is_some(), "the ApiKey stays");
    assert_eq!(
        secret_data(&client, &ns.name, "svc").await.as_ref(),
        Some(&secret_before),
        "its Secret stays as it was"
    );
    let selector = format!("app.kubernetes.io/instance={}", release.name);
    let kinds = "deployments,services,serviceaccounts,roles,rolebindings,poddisruptionbudgets,configmaps";
    let (_, left) = run("kubectl", &["-n", &ns.name, "get", kinds, "-l", &selector, "-o", "name"]);
    assert!(left.trim().is_empty() || left.contains("No resources"), "left in the namespace: {left}");
    // ReplicaSets and their pods go as the garbage collector follows the Deployments.
    eventually("the release's ReplicaSets and pods to go", Duration::from_secs(90), || async {
        let (_, left) =
            run("kubectl", &["-n", &ns.name, "get", "replicasets,pods", "-l", &selector, "-o", "name"]);
        (left.trim().is_empty() || left.contains("No resources")).then_some(())
    })
    .await;
    let (_, cluster) =
        run("kubectl", &["get", "clusterroles,clusterrolebindings", "-l", &selector, "-o", "name"]);
    assert!(cluster.trim().is_empty() || cluster.contains("No resources"), "left cluster-wide: {cluster}");
    std::mem::forget(release); // already uninstalled
}

/// The Lease holder's pod name (identities are `<pod>-<random>`), when held.
async fn leader(client: &Client, ns: &str) -> Option<String> {
    let lease = Api::<Lease>::namespaced(client.clone(), ns)
        .get_opt(&format!("keyward-controller-{ns}"))
        .await
        .ok()??;
    let holder = lease.spec?.holder_identity?;
    holder.rsplit_once('-').map(|(pod, _)| pod.to_string())
}

/// Wait until a pod other than `old` holds the Lease: (the new leader, how long it took).
async fn takeover(client: &Client, ns: &str, old: &str, since: Instant) -> (String, Duration) {
    let new = eventually("another pod to take the Lease", Duration::from_secs(60), || async {
        leader(client, ns).await.filter(|l| l != old)
    })
    .await;
    (new, since.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the node and images: hack/test.sh runs it"]
async fn the_leader_pod_fails_over_within_the_lease_and_no_key_is_issued_twice() {
    let Some((image, _)) = images() else { return };
    let client = client().await;
    let ns = TestNamespace::restricted(&client, "failover").await;
    let release = install(&client, &ns, &image, &["replicaCount=2"]).await;
    let policy = ns
        .policy(&client, "p", json!({"expiry": {"maxLifetime": "P1D"}, "notifications": {"before": []}}))
        .await;
    ns.apikey(&client, "a0", json!({"policy": policy, "owner": "o0"})).await;
    wait_key(&client, &ns.name, "a0", Duration::from_secs(60), common::active).await;
    let addr = verifier_addr(&client, &release).await;
    verifier_answers(&client, &ns.name, "a0", &addr).await;
    let sampler = Sampler::start(&client, &ns.name, &["a0"], addr);
    let lease = Duration::from_secs(6);

    // 1. The leader pod is deleted (SIGTERM: it drains and releases the Lease).
    let first = eventually("a leader", Duration::from_secs(30), || leader(&client, &ns.name)).await;
    let since = Instant::now();
    let (ok, out) = run("kubectl", &["-n", &ns.name, "delete", "pod", &first, "--wait=false"]);
    assert!(ok, "{out}");
    // ApiKeys created during the failover are each issued exactly one key.
    for i in 1..=3 {
        ns.apikey(&client, &format!("a{i}"), json!({"policy": policy, "owner": format!("o{i}")})).await;
    }
    let (second, took) = takeover(&client, &ns.name, &first, since).await;
    eprintln!("deleted leader pod {first}: {second} took over after {took:?}");
    assert!(took <= lease + Duration::from_secs(3), "takeover within the lease duration: {took:?}");

    // 2. The new leader's container is killed (no SIGTERM, no release: the Lease expires).
    let pid = container_pid(&client, &ns.name, &second).await;
    let since = Instant::now();
    let killed_at = chrono::Utc::now();
    assert!(run("kill", &["-KILL", &pid.to_string()]).0);
    for i in 4..=6 {
        ns.apikey(&client, &format!("a{i}"), json!({"policy": policy, "owner": format!("o{i}")})).await;
    }
    let (third, took) = takeover(&client, &ns.name, &second, since).await;
    eprintln!("killed leader container {second}: {third} took over after {took:?}");
    assert!(took <= lease * 2, "takeover once the lease expired: {took:?}");

    for i in 0..=6 {
        let name = format!("a{i}");
        let key = wait_key(&client, &ns.name, &name, Duration::from_secs(60), common::active).await;
        let stored = get_key(&client, &ns.name, &name).await;
        let keys: Vec<_> = stored
            .status
            .iter()
            .flat_map(|s| &s.keys)
            .map(|k| (k.slot, k.key_id.clone(), k.state, k.created_at))
            .collect();
        assert_eq!(keys.len(), 1, "{name}: one key: {keys:?}");
        let data = secret_data(&client, &ns.name, &name).await.unwrap();
        assert_eq!(data.get("key-id"), Some(&key.key_id), "{name}: the Secret holds the key in status");
        for slot in ["primary", "secondary"] {
            if let Some(m) = data.get(slot) {
                assert_eq!(keyward::keys::hash(m), key.hash, "{name}: no second key in the Secret's {slot}");
            }
        }
        let created: Vec<String> =
            kube::Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns.name)
                .list(&Default::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str()))
                .filter_map(|e| e.note)
                .filter(|n| n.contains("issued "))
                .collect();
        // Events are best-effort: the killed leader may have died between writing a key's
        // status and recording its Event (seen for a2, created during the first
        // failover). Then the key is the one it issued before the kill, and the next
        // leader, finding it Active, records none.
        assert!(created.len() <= 1, "{name}: issued once: {created:?}");
        if created.is_empty() {
            eprintln!(
                "{name}: no issuance Event; its key created {}, the leader killed {killed_at}",
                key.created_at
            );
            assert!(key.created_at <= killed_at, "{name}: a key without an Event was issued before the kill");
        }
    }
    let (samples, failures) = sampler.finish().await;
    assert!(
        failures.is_empty(),
        "the verifier answered throughout: {} of {samples} failed: {failures:#?}",
        failures.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the node and images: hack/test.sh runs it"]
async fn the_charts_shards_run_as_pods_each_reconciling_its_own_apikeys() {
    let Some((image, _)) = images() else { return };
    let client = client().await;
    let ns = TestNamespace::restricted(&client, "shardpods").await;
    let release =
        install(&client, &ns, &image, &["replicaCount=1", "controller.shards={a}", "verifier.enabled=false"])
            .await;
    let policy = ns
        .policy(&client, "p", json!({"expiry": {"maxLifetime": "P1D"}, "notifications": {"before": []}}))
        .await;
    let keys: Api<keyward::api::ApiKey> = Api::namespaced(client.clone(), &ns.name);
    for (name, labels) in [("sharded", json!({"keyward.dev/shard": "a"})), ("rest", json!({}))] {
        let obj = serde_json::from_value(json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": name, "labels": labels}, "spec": {"policy": policy, "owner": name}
        }))
        .unwrap();
        keys.create(&Default::default(), &obj).await.unwrap();
    }
    let shard_pods = format!("{}-shard-a-", release.fullname());
    let main_pods = format!("{}-", release.fullname());
    let is_main = |instance: &str| instance.starts_with(&main_pods) && !instance.starts_with(&shard_pods);
    for (name, by_shard) in [("sharded", true), ("rest", false)] {
        wait_key(&client, &ns.name, name, Duration::from_secs(90), common::active).await;
        let fields = format!("regarding.name={name},regarding.kind=ApiKey");
        let instances: Vec<String> =
            eventually(&format!("Events about {name}"), Duration::from_secs(30), || async {
                let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns.name)
                    .list(&ListParams::default().fields(&fields))
                    .await
                    .ok()?;
                let by: Vec<String> = events.items.into_iter().filter_map(|e| e.reporting_instance).collect();
                (!by.is_empty()).then_some(by)
            })
            .await;
        let right = |i: &String| if by_shard { i.starts_with(&shard_pods) } else { is_main(i) };
        assert!(instances.iter().all(right), "{name} reconciled by its shard's pod only: {instances:?}");
    }
    // Two Leases, each held by its own Deployment's pod.
    let leases = Api::<Lease>::namespaced(client.clone(), &ns.name);
    let main_lease = format!("keyward-controller-{}", ns.name);
    for (lease, shard) in [(main_lease, false), (release.fullname() + "-shard-a", true)] {
        let holder = eventually(&format!("Lease {lease} held"), Duration::from_secs(30), || async {
            leases.get_opt(&lease).await.ok()??.spec?.holder_identity
        })
        .await;
        let right = if shard { holder.starts_with(&shard_pods) } else { is_main(&holder) };
        assert!(right, "{lease} held by {holder}");
    }
}

/// Create a namespaced object from JSON.
async fn create<K>(client: &Client, ns: &str, obj: serde_json::Value) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(obj).expect("object JSON");
    Api::<K>::namespaced(client.clone(), ns).create(&Default::default(), &obj).await.expect("create")
}

/// nginx in front of the verifier, as examples/nginx-auth-request.conf puts it: every
/// request is checked with `auth_request`; the access log records, per request, the
/// consumer, the key ID the verifier confirmed (`X-Keyward-Key-Id` of its answer; empty
/// on a refusal; never the key) and the answer, `|`-separated (fields may be empty).
fn nginx_conf(verifier: &str) -> String {
    format!(
        r#"worker_processes 1;
pid /tmp/nginx.pid;
error_log stderr warn;
events {{ worker_connections 256; }}
http {{
  log_format consumer '$msec|$http_x_consumer|$verified_key_id|$status';
  access_log off;
  client_body_temp_path /tmp/body;
  proxy_temp_path /tmp/proxy;
  server {{
    listen 8080;
    location = /_keyward {{
      internal;
      proxy_pass http://{verifier}/v1/auth;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Original-URI $request_uri;
    }}
    location / {{
      auth_request /_keyward;
      auth_request_set $verified_key_id $upstream_http_x_keyward_key_id;
      access_log /dev/stdout consumer;
      root /etc/kw;
      try_files /ok =404;
    }}
  }}
}}
"#
    )
}

/// A busybox pod spec that calls nginx every 200 ms with the key read by `read` (which
/// sets `k`); it exits at once on SIGTERM, as an application does.
fn consumer_pod(
    name: &str,
    nginx: &str,
    read: &str,
    volumes: serde_json::Value,
    env: serde_json::Value,
) -> serde_json::Value {
    let script = format!(
        "trap 'exit 0' TERM; while true; do {read}; timeout 3 wget -q -O /dev/null \
         --header \"X-Api-Key: $k\" --header 'X-Consumer: {name}' http://{nginx}/ 2>/dev/null; \
         sleep 0.2; done"
    );
    let mut container = json!({
        "name": "app", "image": "docker.io/library/busybox:keyward", "imagePullPolicy": "Never",
        "command": ["sh", "-c", script],
        "volumeMounts": [{"name": "keys", "mountPath": "/keys", "readOnly": true}]
    });
    if volumes.as_array().is_none_or(|v| v.is_empty()) {
        container.as_object_mut().unwrap().remove("volumeMounts");
    }
    for (k, v) in env.as_object().into_iter().flatten() {
        container[k] = v.clone();
    }
    restricted(json!({"terminationGracePeriodSeconds": 10, "containers": [container], "volumes": volumes}))
}

/// A test pod spec under the restricted Pod Security Standard, which its namespace
/// enforces as keyward's does: as nobody, no privilege escalation, no capabilities,
/// `RuntimeDefault` seccomp.
fn restricted(mut spec: serde_json::Value) -> serde_json::Value {
    spec["securityContext"] = json!({"runAsNonRoot": true, "runAsUser": 65534, "runAsGroup": 65534,
        "seccompProfile": {"type": "RuntimeDefault"}});
    for c in spec["containers"].as_array_mut().into_iter().flatten() {
        c["securityContext"] = json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}});
    }
    spec
}

/// One of nginx's access log lines: (time, consumer, verified key ID, HTTP status).
fn parse_access(line: &str) -> Option<(f64, String, String, u16)> {
    let f: Vec<&str> = line.trim().split('|').collect();
    let [at, consumer, id, status] = f[..] else { return None };
    Some((at.parse().ok()?, consumer.to_string(), id.to_string(), status.parse().ok()?))
}

/// The `p` quantile of sorted samples (the lower one between two).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).floor() as usize]
}

/// Issue 13: every way a pod consumes a key, on the node, calling real nginx that checks
/// each request with the verifier Service (`auth_request`): a Secret volume and a
/// projected volume read before each request, `env.valueFrom.secretKeyRef` in a
/// Deployment and `envFrom` in a StatefulSet, both listed in `spec.consumers`. Across two
/// flips (two-minute keys, flips 30 s before the key left ends): no request rejected by
/// any consumer, old pods included; each env consumer rolled out exactly once per flip;
/// the propagation of each flip to each consumer measured and printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the node and images: hack/test.sh runs it"]
async fn every_way_a_pod_reads_its_key_follows_two_flips_through_nginx() {
    use k8s_openapi::api::apps::v1::{ControllerRevision, Deployment, ReplicaSet, StatefulSet};
    use k8s_openapi::api::core::v1::ConfigMap;
    let Some((image, _)) = images() else { return };
    let client = client().await;
    let ns = TestNamespace::restricted(&client, "consume").await;
    let release = install(&client, &ns, &image, &["replicaCount=1", "verifier.replicas=1"]).await;
    let verifier = verifier_addr(&client, &release).await;
    let policy = ns
        .policy(
            &client,
            "p",
            json!({"expiry": {"maxLifetime": "PT2M", "minLifetime": "PT1S"},
                   "rotation": {"flipBefore": "PT30S", "minFlipLead": "PT20S"}, "notifications": {"before": []}}),
        )
        .await;
    let consumers =
        json!([{"kind": "Deployment", "name": "env"}, {"kind": "StatefulSet", "name": "envfrom"}]);
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "team", "consumers": consumers})).await;
    let first = wait_key(&client, &ns.name, "svc", Duration::from_secs(60), common::active).await;

    let labels = |app: &str| json!({"app": app});
    create::<ConfigMap>(
        &client,
        &ns.name,
        json!({"metadata": {"name": "nginx"}, "data": {"nginx.conf": nginx_conf(&verifier), "ok": "ok\n"}}),
    )
    .await;
    create::<Deployment>(
        &client,
        &ns.name,
        json!({
            "metadata": {"name": "nginx"},
            "spec": {"replicas": 1, "selector": {"matchLabels": labels("nginx")}, "template": {
                "metadata": {"labels": labels("nginx")},
                "spec": restricted(json!({"containers": [{"name": "nginx", "image": "docker.io/library/nginx:keyward",
                    "imagePullPolicy": "Never", "args": ["-c", "/etc/kw/nginx.conf", "-g", "daemon off;"],
                    "volumeMounts": [{"name": "conf", "mountPath": "/etc/kw"}]}],
                    "volumes": [{"name": "conf", "configMap": {"name": "nginx"}}]}))}}
        }),
    )
    .await;
    let svc: Service = create(
        &client,
        &ns.name,
        json!({
            "metadata": {"name": "nginx"},
            "spec": {"selector": labels("nginx"), "ports": [{"port": 8080, "targetPort": 8080}]}
        }),
    )
    .await;
    let nginx = format!("{}:8080", svc.spec.and_then(|s| s.cluster_ip).expect("ClusterIP"));

    // The consumers, each template already carrying the active key's ID (as keyward
    // would put it), so that every ReplicaSet or revision after the first is a flip's.
    let annotations = json!({"keyward.dev/key-id": first.key_id});
    let secret_volume = json!([{"name": "keys", "secret": {"secretName": "svc"}}]);
    let projected = json!([{"name": "keys", "projected": {"sources": [{"secret": {"name": "svc"}}]}}]);
    let from_file = "k=$(cat /keys/api-key)";
    let env = json!({"env": [
        {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "svc", "key": "api-key"}}}]});
    let env_from = json!({"envFrom": [{"secretRef": {"name": "svc"}}]});
    let pods = [
        ("volume", consumer_pod("volume", &nginx, from_file, secret_volume, json!({}))),
        ("projected", consumer_pod("projected", &nginx, from_file, projected, json!({}))),
        ("env", consumer_pod("env", &nginx, "k=$API_KEY", json!([]), env)),
        (
            "envfrom",
            consumer_pod(
                "envfrom",
                &nginx,
                // A shell drops variables whose names are not identifiers (`api-key`) from
                // what it passes on; the container's own environment still has them.
                "k=$(tr '\\0' '\\n' </proc/1/environ | sed -n 's/^api-key=//p')",
                json!([]),
                env_from,
            ),
        ),
    ];
    for (name, pod) in pods {
        let template = json!({"metadata": {"labels": labels(name), "annotations": annotations}, "spec": pod});
        let spec = json!({"replicas": 1, "selector": {"matchLabels": labels(name)}, "template": template});
        if name == "envfrom" {
            let mut spec = spec;
            spec["serviceName"] = json!("envfrom");
            create::<StatefulSet>(&client, &ns.name, json!({"metadata": {"name": name}, "spec": spec})).await;
        } else {
            create::<Deployment>(&client, &ns.name, json!({"metadata": {"name": name}, "spec": spec})).await;
        }
    }

    let access_log = || {
        let (ok, out) = run("kubectl", &["-n", &ns.name, "logs", "deployment/nginx", "--tail=-1"]);
        if ok { out.lines().filter_map(parse_access).collect::<Vec<_>>() } else { vec![] }
    };
    let names = ["volume", "projected", "env", "envfrom"];
    eventually("every consumer's requests through nginx", Duration::from_secs(120), || async {
        let log = access_log();
        names.iter().all(|n| log.iter().any(|(_, c, _, s)| c == n && *s == 200)).then_some(())
    })
    .await;

    // Two flips from here (KEYWARD_CONSUMER_FLIPS for a longer measurement), then until
    // the key the last flip left has ended and every consumer has called with the active one.
    let want: usize = std::env::var("KEYWARD_CONSUMER_FLIPS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let started = Instant::now();
    let mut flips: Vec<(String, chrono::DateTime<chrono::Utc>, String)> = Vec::new(); // (to, when, from)
    let mut active = first.key_id.clone();
    let mut left_ends = None;
    loop {
        let key = get_key(&client, &ns.name, "svc").await;
        if let Some(a) = common::active(&key)
            && a.key_id != active
        {
            flips.push((a.key_id.clone(), a.activated_at.expect("activatedAt"), active.clone()));
            let left = key.status.iter().flat_map(|s| &s.keys).find(|k| k.key_id == active);
            left_ends = left.and_then(|k| k.effective_expires_at);
            active = a.key_id.clone();
        }
        // A consumer that restarts to follow (the StatefulSet's pod, gone before its
        // successor starts) may not be back before the next flip on a loaded node: the
        // measurement goes on, flip after flip, until each consumer has called with the
        // active key. It stops at least 10 s before the next flip (30 s before the active
        // key ends), so that the rollouts counted below are those of the flips recorded.
        let now = chrono::Utc::now();
        let next_flip = common::active(&key)
            .and_then(|a| a.effective_expires_at)
            .map(|end| end - chrono::TimeDelta::seconds(30));
        if flips.len() >= want
            && left_ends.is_none_or(|end| now > end + chrono::TimeDelta::seconds(5))
            && next_flip.is_none_or(|at| now + chrono::TimeDelta::seconds(10) < at)
        {
            let log = access_log();
            if names.iter().all(|n| log.iter().any(|(_, c, id, s)| c == n && *id == active && *s == 200)) {
                break;
            }
        }
        let limit = Duration::from_secs(240 + 90 * want as u64);
        assert!(started.elapsed() < limit, "{want} flips within {limit:?}: {flips:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let log = access_log();
    let rejected: Vec<_> = log.iter().filter(|(_, _, _, s)| *s != 200).collect();
    // Rollouts: ReplicaSets of the env Deployment, revisions of the StatefulSet.
    let owned_by = |refs: &Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>,
                    name: &str| { refs.iter().flatten().any(|o| o.name == name) };
    let replica_sets =
        Api::<ReplicaSet>::namespaced(client.clone(), &ns.name).list(&Default::default()).await.unwrap();
    let env_rollouts = replica_sets
        .items
        .iter()
        .filter(|r| owned_by(&r.metadata.owner_references, "env"))
        .count()
        .saturating_sub(1);
    let revisions = Api::<ControllerRevision>::namespaced(client.clone(), &ns.name)
        .list(&Default::default())
        .await
        .unwrap();
    let sts_rollouts = revisions
        .items
        .iter()
        .filter(|r| owned_by(&r.metadata.owner_references, "envfrom"))
        .count()
        .saturating_sub(1);

    // Per consumer: how long after each flip it first called with the new key, and last
    // with the old one (an env consumer's old pod until it is gone).
    eprintln!(
        "consumers on the node (kubelet syncFrequency 10s), seconds after each flip:\n\
         consumer   requests rejected flips rollouts new-key p50/max (s)  old-key-last p50/max (s)"
    );
    let secs = |at: &chrono::DateTime<chrono::Utc>| at.timestamp_millis() as f64 / 1000.0;
    for name in names {
        let mine: Vec<_> = log.iter().filter(|(_, c, _, _)| c == name).collect();
        let mut first_new = Vec::new();
        let mut last_old = Vec::new();
        // Flips this consumer did not follow although it called with a key other than the
        // one the flip left. A consumer that restarts to follow may have no pod from just
        // after a flip until past the next one on a loaded node (CI saw a StatefulSet's
        // pod do so): it held no key then; a call it made with the old key after that
        // key ended is in `rejected`.
        let mut missed = Vec::new();
        for (i, (to, at, from)) in flips.iter().enumerate() {
            let next = flips.get(i + 1).map_or(f64::INFINITY, |f| secs(&f.1));
            let at = secs(at);
            if let Some(t) = mine.iter().filter(|(_, _, id, _)| id == to).map(|e| e.0).reduce(f64::min) {
                first_new.push(t - at);
            } else if mine.iter().any(|e| e.0 >= at && e.0 < next && e.2 != *from) {
                missed.push(to.clone());
            }
            if let Some(t) = mine.iter().filter(|(_, _, id, _)| id == from).map(|e| e.0).reduce(f64::max) {
                last_old.push(t - at);
            }
        }
        first_new.sort_by(f64::total_cmp);
        last_old.sort_by(f64::total_cmp);
        let rollouts = match name {
            "env" => env_rollouts.to_string(),
            "envfrom" => sts_rollouts.to_string(),
            _ => "-".into(),
        };
        eprintln!(
            "{name:<10} {:>8} {:>8} {:>5} {rollouts:>8} {:>8.1} / {:<8.1} {:>8.1} / {:<8.1}",
            mine.len(),
            mine.iter().filter(|(_, _, _, s)| *s != 200).count(),
            first_new.len(),
            percentile(&first_new, 0.5),
            percentile(&first_new, 1.0),
            percentile(&last_old, 0.5),
            percentile(&last_old, 1.0),
        );
        // The longest stretch without a call: a restart's, for the env and envFrom ones.
        let gap = mine.windows(2).map(|w| w[1].0 - w[0].0).fold(0.0, f64::max);
        eprintln!("{name:<10} longest stretch without a call {gap:.1} s");
        assert!(
            missed.is_empty(),
            "{name} called during a flip to {missed:?} and never with that key: {flips:?}"
        );
        if let Some((to, _, _)) = flips.last() {
            assert!(
                mine.iter().any(|(_, _, id, _)| id == to),
                "{name} followed the last flip to {to}: {flips:?}"
            );
        }
    }
    assert!(rejected.is_empty(), "no request rejected: {rejected:?}");
    assert_eq!(env_rollouts, flips.len(), "the env Deployment rolled out once per flip");
    assert_eq!(sts_rollouts, flips.len(), "the envFrom StatefulSet rolled out once per flip");
}
