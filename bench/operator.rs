//! Operator benchmarks against the real API server (the local control plane from
//! `hack/cluster.sh`, or any cluster in `KUBECONFIG`), with the release `keyward`
//! binary as the controller. Each scenario prints Markdown table rows for the README.
//!
//! ```text
//! cargo bench --bench operator -- provision [N…]        (default 1000 5000)
//! cargo bench --bench operator -- memory [N…]           (default 1000 5000 10000)
//! cargo bench --bench operator -- bare NAMESPACE        (a child of `memory`, see `bare`)
//! cargo bench --bench operator -- precision [N] [MIN]   (default 500 keys, 5 minutes)
//! cargo bench --bench operator -- catchup [N]           (default 1000)
//! cargo bench --bench operator -- cost [N]              (default 200)
//! cargo bench --bench operator -- scale [N…]            (default 1000 5000 20000 50000)
//! cargo bench --bench operator -- all
//! ```
//!
//! Every scenario runs in fresh namespaces that are deleted afterwards; the controller
//! is namespaced (`--namespace`), so no other keyward may be running cluster-wide.
//! This is a benchmark, not a test: it reports what it measures and never fails on a
//! target; it panics only when the cluster misbehaves (a key never becomes Ready).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::{KeywardProcess, TestNamespace};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use keyward::api::ApiKey;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;

/// Requests in flight, for the floor and for applying ApiKeys alike.
const CONCURRENCY: usize = 32;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and then
    // there is nothing to do. Everything else is the scenario and its numbers.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("operator benchmarks run under `cargo bench --bench operator -- <scenario>` only");
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let nums: Vec<usize> = args.iter().skip(1).filter_map(|a| a.parse().ok()).collect();
    let client = common::client().await;
    match args.first().map(String::as_str).unwrap_or("all") {
        "provision" => provision(&client, &or(nums, &[1000, 5000])).await,
        "memory" => memory(&client, &or(nums, &[1000, 5000, 10000])).await,
        "bare" => bare(&client, args.get(1).expect("bare NAMESPACE")).await,
        "precision" => {
            let n = or(nums, &[500, 5]);
            precision(&client, n[0], n.get(1).copied().unwrap_or(5)).await
        }
        "catchup" => catchup(&client, or(nums, &[1000])[0]).await,
        "cost" => cost(&client, or(nums, &[200])[0]).await,
        "scale" => {
            let minutes =
                std::env::var("KEYWARD_SCALE_MINUTES").ok().and_then(|m| m.parse().ok()).unwrap_or(2);
            scale(&client, &or(nums, &[1000, 5000, 20000, 50000]), minutes).await
        }
        "pods" => {
            let n = or(nums, &[1000, 1000]);
            pods(&client, n[0], n.get(1).copied().unwrap_or(1000)).await
        }
        "all" => {
            provision(&client, &[1000, 5000]).await;
            memory(&client, &[1000, 5000, 10000]).await;
            precision(&client, 500, 5).await;
            catchup(&client, 1000).await;
            cost(&client, 200).await;
        }
        other => {
            panic!(
                "unknown scenario {other}: provision | memory | precision | catchup | cost | pods | scale | all"
            )
        }
    }
}

fn or(given: Vec<usize>, default: &[usize]) -> Vec<usize> {
    if given.is_empty() { default.to_vec() } else { given }
}

/// A namespace with a policy (`expiry` as given) and a release controller for it.
struct Bed {
    ns: TestNamespace,
    policy: String,
    controller: Option<KeywardProcess>,
}

impl Bed {
    async fn new(client: &Client, prefix: &str, expiry: serde_json::Value) -> Bed {
        let ns = TestNamespace::new(client, prefix).await;
        let policy = ns.policy(client, "p", json!({"expiry": expiry})).await;
        Bed { ns, policy, controller: None }
    }

    /// Stop the controller, delete the namespace and wait until it is gone.
    async fn finish(mut self, client: &Client) {
        drop(self.controller.take());
        clean_up(client, vec![self.ns]).await;
    }

    async fn start_controller(&mut self) -> &KeywardProcess {
        self.start_controller_with(&[]).await
    }

    async fn start_controller_with(&mut self, extra: &[&str]) -> &KeywardProcess {
        let c = common::controller_for(&self.ns.name, extra, "warn");
        c.wait_ready().await;
        self.controller.insert(c)
    }

    fn metrics(&self) -> String {
        self.controller.as_ref().and_then(|c| c.get("/metrics")).map(|m| m.1).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.controller.as_ref().and_then(KeywardProcess::pid).expect("controller running")
    }

    /// Create ApiKeys for `range` and wait until a watch has seen them all `Ready=True`.
    async fn add_ready_keys(
        &self,
        client: &Client,
        range: std::ops::Range<usize>,
        lifetime: impl Fn(usize) -> Option<String>,
    ) {
        let (ready, watch) = track_ready(client, &self.ns.name, Some(range.start)).await;
        let n = range.len();
        self.create_keys(client, range, lifetime).await;
        until("every ApiKey Ready", &ready, Duration::from_secs(3600), |r| r.len() >= n).await;
        watch.abort();
    }

    /// Restart the controller and wait until it has reconciled `n` ApiKeys; how many it
    /// had reconciled then.
    async fn restart(&mut self, n: usize) -> f64 {
        self.controller.as_mut().expect("controller running").terminate().await;
        self.start_controller().await;
        common::eventually("every ApiKey reconciled after restart", Duration::from_secs(600), || async {
            let r =
                by_label(&self.metrics(), "keyward_reconciles_total").get("ApiKey").copied().unwrap_or(0.0);
            (r >= n as f64).then_some(r)
        })
        .await
    }

    /// Create ApiKeys `k-<i>` for `range` (one owner each), `CONCURRENCY` at a time.
    async fn create_keys(
        &self,
        client: &Client,
        range: std::ops::Range<usize>,
        lifetime: impl Fn(usize) -> Option<String>,
    ) {
        let api = Api::<ApiKey>::namespaced(client.clone(), &self.ns.name);
        let batch = range.start.to_string();
        let batch = &batch;
        futures::stream::iter(range)
            .map(|i| {
                let mut spec = json!({"policy": self.policy, "owner": format!("team-{i}")});
                if let Some(l) = lifetime(i) {
                    spec["lifetime"] = json!(l);
                }
                let key: ApiKey = serde_json::from_value(json!({
                    "apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
                    "metadata": {"name": format!("k-{i}"), "labels": {BATCH: batch}}, "spec": spec
                }))
                .unwrap();
                let api = api.clone();
                async move { api.create(&PostParams::default(), &key).await.map(drop) }
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect::<()>()
            .await
            .expect("create ApiKeys");
    }
}

/// Delete the namespaces (and their policies) and wait until they are gone, so the
/// next measurement does not share the API server with a namespace deletion.
async fn clean_up(client: &Client, spaces: Vec<TestNamespace>) {
    let names: Vec<String> = spaces.iter().map(|ns| ns.name.clone()).collect();
    drop(spaces);
    let api = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone());
    for name in names {
        common::eventually(&format!("namespace {name} to be deleted"), Duration::from_secs(1800), || async {
            api.get_opt(&name).await.ok()?.is_none().then_some(())
        })
        .await;
    }
}

/// Label of the ApiKeys `create_keys` makes: the first index of their batch.
const BATCH: &str = "bench.keyward.dev/batch";

/// Watches a namespace's ApiKeys (those of the batch starting at `batch`, or all) and
/// calls `on_key` with each new version and the time it arrived.
fn watch_keys<S: Send + 'static>(
    client: &Client,
    ns: &str,
    state: Arc<Mutex<S>>,
    on_key: impl Fn(&mut S, &ApiKey, DateTime<Utc>) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    watch_batch(client, ns, None, state, on_key, None)
}

/// `watch_keys`, returning once the watch's first list is done: a change it sees later
/// arrived on the watch, not replayed after a long list (50,000 ApiKeys take ~30 s),
/// which would count as lateness.
async fn watch_keys_listed<S: Send + 'static>(
    client: &Client,
    ns: &str,
    batch: Option<usize>,
    state: Arc<Mutex<S>>,
    on_key: impl Fn(&mut S, &ApiKey, DateTime<Utc>) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = watch_batch(client, ns, batch, state, on_key, Some(tx));
    rx.await.expect("the watch lists");
    task
}

fn watch_batch<S: Send + 'static>(
    client: &Client,
    ns: &str,
    batch: Option<usize>,
    state: Arc<Mutex<S>>,
    on_key: impl Fn(&mut S, &ApiKey, DateTime<Utc>) + Send + 'static,
    mut listed_tx: Option<tokio::sync::oneshot::Sender<()>>,
) -> tokio::task::JoinHandle<()> {
    let api = Api::<ApiKey>::namespaced(client.clone(), ns);
    let mut config = watcher::Config::default();
    if let Some(b) = batch {
        config = config.labels(&format!("{BATCH}={b}"));
    }
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
        let mut listed = false;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Apply(key) | watcher::Event::InitApply(key)) => {
                    on_key(&mut state.lock().unwrap(), &key, Utc::now())
                }
                Ok(watcher::Event::Init) if listed => {
                    OBSERVER_RELISTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(watcher::Event::InitDone) => {
                    listed = true;
                    listed_tx.take().map(|tx| tx.send(()));
                }
                _ => {}
            }
        }
    })
}

/// Lists that this process's ApiKey watches had to start again (an expired watch): what
/// changed meanwhile is seen late, which the lateness numbers would then include.
static OBSERVER_RELISTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The `q` quantile of the controller's `keyward_step_lateness_seconds` between two
/// scrapes, as the upper bound of its bucket.
fn lateness_bucket(before: &str, after: &str, q: f64) -> f64 {
    let name = "keyward_step_lateness_seconds_bucket";
    let (b, a) = (by_label(before, name), by_label(after, name));
    let mut buckets: Vec<(f64, f64)> = a
        .iter()
        .map(|(le, n)| (le.parse().unwrap_or(f64::INFINITY), n - b.get(le).copied().unwrap_or(0.0)))
        .collect();
    buckets.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = buckets.last().map_or(0.0, |x| x.1);
    buckets.into_iter().find(|x| x.1 >= total * q && total > 0.0).map_or(f64::NAN, |x| x.0)
}

fn is_ready(key: &ApiKey) -> bool {
    common::ready(key).is_some_and(|(s, _)| s == "True")
}

/// Wait (polling local state, 50 ms) until `done` holds, or panic after `timeout`.
async fn until<S>(what: &str, state: &Arc<Mutex<S>>, timeout: Duration, done: impl Fn(&S) -> bool) {
    let state = state.clone();
    common::eventually(what, timeout, || {
        let ok = done(&state.lock().unwrap());
        async move { ok.then_some(()) }
    })
    .await;
}

/// Names of the ApiKeys seen `Ready=True`.
async fn track_ready(
    client: &Client,
    ns: &str,
    batch: Option<usize>,
) -> (Arc<Mutex<HashSet<String>>>, tokio::task::JoinHandle<()>) {
    let ready = Arc::new(Mutex::new(HashSet::new()));
    let task = watch_keys_listed(client, ns, batch, ready.clone(), |set, key, _| {
        if is_ready(key) {
            set.insert(key.name_any());
        }
    })
    .await;
    (ready, task)
}

/// CPU seconds used so far by the processes named `names` (kube-apiserver, etcd,
/// keyward) on this machine: what limits a run on the local control plane.
fn cpu_seconds(names: &[&str]) -> f64 {
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        if let Some((comm, used)) = cpu_of_stat(&stat)
            && names.contains(&comm)
        {
            total += used;
        }
    }
    total
}

/// CPU seconds used so far by process `pid`.
fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    cpu_of_stat(&stat).map_or(0.0, |c| c.1)
}

/// A `/proc/<pid>/stat` line's command name and CPU seconds (user + system).
fn cpu_of_stat(stat: &str) -> Option<(&str, f64)> {
    let tick = 100.0; // USER_HZ on Linux
    let (comm, rest) = stat.split_once(") ")?;
    let comm = comm.rsplit_once('(').map_or("", |c| c.1);
    let f: Vec<&str> = rest.split(' ').collect();
    // After "pid (comm) ": state is field 0, utime 11, stime 12.
    let ticks: f64 = f.get(11..13).into_iter().flatten().filter_map(|v| v.parse::<f64>().ok()).sum();
    Some((comm, ticks / tick))
}

/// CPU seconds used so far by the control plane: API server, etcd, kube-controller-manager
/// (its command name is cut to 15 characters).
fn plane_cpu() -> [f64; 3] {
    [cpu_seconds(&["kube-apiserver"]), cpu_seconds(&["etcd"]), cpu_seconds(&["kube-controller"])]
}

/// CPU used by the API server + etcd and by keyward while `f` runs.
struct Cpu([f64; 2]);

impl Cpu {
    fn start() -> Cpu {
        Cpu([cpu_seconds(&["kube-apiserver", "etcd"]), cpu_seconds(&["keyward"])])
    }

    fn report(&self) -> String {
        let now = Cpu::start();
        format!("API server + etcd {:.0} s, keyward {:.1} s", now.0[0] - self.0[0], now.0[1] - self.0[1])
    }
}

/// Sum of `name` per value of its single label.
fn by_label(metrics: &str, name: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines().filter(|l| l.starts_with(&format!("{name}{{"))) {
        let Some((labels, value)) = line.rsplit_once(' ') else { continue };
        let label = labels.split('"').nth(1).unwrap_or_default().to_string();
        *out.entry(label).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
    }
    out
}

/// An unlabelled metric's value (0 when absent).
fn scalar(metrics: &str, name: &str) -> f64 {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0.0)
}

fn writes(metrics: &str) -> BTreeMap<String, f64> {
    by_label(metrics, "keyward_api_writes_total")
}

/// `after - before` per label, as "secrets 2.00, apikeys/status 1.00" divided by `per`.
fn per_unit(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, per: f64) -> (f64, String) {
    let mut total = 0.0;
    let mut parts = Vec::new();
    for (k, v) in after {
        let d = v - before.get(k).copied().unwrap_or(0.0);
        if d > 0.0 {
            total += d;
            parts.push(format!("{k} {:.2}", d / per));
        }
    }
    (total / per, parts.join(", "))
}

/// Provisioning: N ApiKeys applied at once → all Ready, against the floor (the same
/// client creating N ApiKeys, N Secrets and N status writes itself, same concurrency).
async fn provision(client: &Client, sizes: &[usize]) {
    println!(
        "| provisioning N | floor (ApiKey + Secret + status, {CONCURRENCY} in flight) | keyward (apply → all Ready) | ratio | keyward writes per key | CPU during keyward's run |"
    );
    println!("|---|---|---|---|---|---|");
    for &n in sizes {
        let floor = floor(client, n).await;
        let mut bed = Bed::new(client, "bench-prov", json!({"maxLifetime": "P90D"})).await;
        bed.start_controller().await;
        let before = writes(&bed.metrics());
        let cpu = Cpu::start();
        let start = Instant::now();
        bed.add_ready_keys(client, 0..n, |_| None).await;
        let took = start.elapsed();
        let cpu = cpu.report();
        let (w, detail) = settled_writes(&bed, &before, n).await;
        println!(
            "| {n} | {:.1} s | {:.1} s | {:.2}× | {w:.2} ({detail}) | {cpu} |",
            floor.0.as_secs_f64(),
            took.as_secs_f64(),
            took.as_secs_f64() / floor.0.as_secs_f64(),
        );
        println!("floor {n}: CPU {}", floor.1);
        drop(bed.controller.take());
        clean_up(client, vec![floor.2, bed.ns]).await;
    }
}

/// The floor: what the same client takes to write what keyward writes for N keys, at
/// least (ApiKey create, Secret create with an owner reference, status replace).
async fn floor(client: &Client, n: usize) -> (Duration, String, TestNamespace) {
    let ns = TestNamespace::new(client, "bench-floor").await;
    let keys = Api::<ApiKey>::namespaced(client.clone(), &ns.name);
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns.name);
    let cpu = Cpu::start();
    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let (keys, secrets) = (keys.clone(), secrets.clone());
            async move {
                let key: ApiKey = serde_json::from_value(json!({
                    "apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
                    "metadata": {"name": format!("k-{i}")},
                    "spec": {"policy": "none", "owner": format!("team-{i}")}
                }))
                .unwrap();
                let mut key = keys.create(&PostParams::default(), &key).await?;
                let material = keyward::keys::KeyFormat::default().generate();
                let secret: Secret = serde_json::from_value(json!({
                    "metadata": {
                        "name": key.name_any(),
                        "labels": {"app.kubernetes.io/managed-by": "keyward"},
                        "ownerReferences": [{"apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
                            "name": key.name_any(), "uid": key.uid(), "controller": true}]
                    },
                    "stringData": {"api-key": material.expose(), "primary": material.expose()}
                }))
                .unwrap();
                secrets.create(&PostParams::default(), &secret).await?;
                let now = Utc::now();
                key.status = Some(
                    serde_json::from_value(json!({
                        "clientId": "kwc_floor", "activeSlot": "Primary",
                        "keys": [{"slot": "Primary", "keyId": "0123456789", "hash": "sha256:00",
                            "preview": "kw_abcd", "createdAt": now, "expiresAt": now, "state": "Active"}],
                        "nextAction": "CreateSecondary", "nextActionAt": now,
                        "conditions": [{"type": "Ready", "status": "True", "reason": "KeyActive",
                            "message": "floor", "lastTransitionTime": now}]
                    }))
                    .unwrap(),
                );
                keys.replace_status(&key.name_any(), &PostParams::default(), &key).await.map(drop)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<()>()
        .await
        .expect("floor writes (is a cluster-wide keyward running? the benchmark needs none)");
    (start.elapsed(), cpu.report(), ns)
}

/// The catch-up floor: the same client rewriting, for each of the floor's N ApiKeys, its
/// Secret (a new key) and its status (no precondition, so no conflict retries).
async fn rewrite_floor(client: &Client, ns: &TestNamespace, n: usize) -> Duration {
    let keys = Api::<ApiKey>::namespaced(client.clone(), &ns.name);
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns.name);
    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let (keys, secrets) = (keys.clone(), secrets.clone());
            async move {
                let name = format!("k-{i}");
                let material = keyward::keys::KeyFormat::default().generate();
                let data =
                    json!({"stringData": {"api-key": material.expose(), "primary": material.expose()}});
                secrets.patch(&name, &PatchParams::default(), &Patch::Merge(&data)).await?;
                let now = Utc::now();
                let status = json!({"status": {"keys": [{"slot": "Primary", "keyId": "1123456789",
                    "hash": "sha256:01", "preview": "kw_abce", "createdAt": now, "expiresAt": now,
                    "state": "Active"}], "nextActionAt": now}});
                keys.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await.map(drop)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<()>()
        .await
        .expect("catch-up floor writes");
    start.elapsed()
}

/// Controller RSS with N keys (cumulative), then with 100 unrelated 1 MiB Secrets.
async fn memory(client: &Client, sizes: &[usize]) {
    println!("| ApiKeys (all Ready) | controller RSS |");
    println!("|---|---|");
    let mut bed = Bed::new(client, "bench-mem", json!({"maxLifetime": "P90D"})).await;
    bed.start_controller().await;
    let empty_rss = settled_rss(&bed).await;
    println!("| 0 | {empty_rss:.1} MiB |");
    let mut have = 0;
    for &n in sizes {
        bed.add_ready_keys(client, have..n, |_| None).await;
        have = n;
        println!("| {n} | {:.1} MiB |", settled_rss(&bed).await);
    }
    let before = settled_rss(&bed).await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &bed.ns.name);
    let blob = "x".repeat(1024 * 1024 - 64);
    futures::stream::iter(0..100)
        .map(|i| {
            let s: Secret = serde_json::from_value(
                json!({"metadata": {"name": format!("unrelated-{i}")}, "stringData": {"blob": blob}}),
            )
            .unwrap();
            let secrets = secrets.clone();
            async move { secrets.create(&PostParams::default(), &s).await.map(drop) }
        })
        .buffer_unordered(8)
        .try_collect::<()>()
        .await
        .expect("create unrelated Secrets");
    let after = settled_rss(&bed).await;
    println!("| {have} + 100 unrelated 1 MiB Secrets | {after:.1} MiB ({:+.1} MiB) |", after - before);
    // Steady state without the provisioning burst's leftovers: a restarted controller
    // that has listed and reconciled every ApiKey once.
    bed.restart(have).await;
    let restarted = settled_rss(&bed).await;
    println!("| {have} + the Secrets, controller restarted | {restarted:.1} MiB |");
    // What kube-runtime's Controller alone costs for the same ApiKeys, against keyward's
    // controller restarted (both above their own start in an empty namespace).
    let empty = TestNamespace::new(client, "bench-bare").await;
    let bare_empty = bare_rss(&empty.name, 0).await;
    clean_up(client, vec![empty]).await;
    let bare_full = bare_rss(&bed.ns.name, have).await;
    let per_key = |full: f64, base: f64| (full - base) * 1024.0 / have as f64;
    println!(
        "| {have}, kube-runtime's Controller alone (`bare`: the same watch, a schedule per ApiKey, no keyward logic) | {bare_full:.1} MiB ({:.2} KB per ApiKey above its empty {bare_empty:.1} MiB; keyward restarted: {:.2} KB) |",
        per_key(bare_full, bare_empty),
        per_key(restarted, empty_rss),
    );
    bed.finish(client).await;
}

/// kube-runtime's `Controller` over the ApiKeys of `ns` with nothing of keyward's: the
/// watch keyward runs (managedFields and kubectl's last-applied copy dropped as keyward
/// drops them), its store, and a reconcile that only counts (printing the count) and
/// schedules the ApiKey an hour ahead, as keyward schedules each ApiKey's next step.
/// The floor of memory per ApiKey for a controller built on kube-runtime's `Controller`.
async fn bare(client: &Client, ns: &str) {
    use kube::runtime::controller::{Action, Controller};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let api = Api::<ApiKey>::namespaced(client.clone(), ns);
    let (reader, writer) = kube::runtime::reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(keyward::controller::drop_unread_fields)
        .reflect(writer)
        .applied_objects();
    println!("reconciled 0");
    Controller::for_stream(stream, reader)
        .run(
            |_key, reconciled: Arc<AtomicUsize>| async move {
                println!("reconciled {}", reconciled.fetch_add(1, Ordering::Relaxed) + 1);
                Ok::<_, kube::Error>(Action::requeue(Duration::from_secs(3600)))
            },
            |_key, _err, _ctx| Action::requeue(Duration::from_secs(3600)),
            Arc::new(AtomicUsize::new(0)),
        )
        .for_each(|_| async {})
        .await;
}

/// Settled RSS (MiB) of a `bare` controller over `ns`, once it has reconciled `n` ApiKeys.
async fn bare_rss(ns: &str, n: usize) -> f64 {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(std::env::current_exe().expect("bench executable"))
        .args(["--bench", "bare", ns])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the bare controller");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
    let reconciled = |l: &str| l.strip_prefix("reconciled ").and_then(|c| c.parse::<usize>().ok());
    while let Some(line) = lines.next_line().await.expect("bare controller output") {
        if reconciled(&line).is_some_and(|c| c >= n) {
            break;
        }
    }
    // Keep reading, so that the child never blocks on a full pipe.
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let rss = settled_rss_of(child.id().expect("bare controller running")).await;
    drain.abort();
    rss
}

/// What watching pods (`--watch-consumers`) costs the controller: `keys` Ready ApiKeys
/// and `pods` pods (Pending: no node matches them), each reading one ApiKey's Secret as a
/// volume, every tenth with subPath (a consumer that cannot follow); RSS of a controller
/// restarted without, then with, the pod watch, once it has found every subPath pod.
async fn pods(client: &Client, keys: usize, pods: usize) {
    use k8s_openapi::api::core::v1::Pod;
    let mut bed = Bed::new(client, "bench-pods", json!({"maxLifetime": "P90D"})).await;
    bed.start_controller().await;
    bed.add_ready_keys(client, 0..keys, |_| None).await;
    let api = Api::<Pod>::namespaced(client.clone(), &bed.ns.name);
    futures::stream::iter(0..pods)
        .map(|i| {
            let mount = if i % 10 == 0 {
                json!({"name": "key", "mountPath": "/etc/api-key", "subPath": "api-key"})
            } else {
                json!({"name": "key", "mountPath": "/etc/keys"})
            };
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": format!("p-{i}")},
                "spec": {"nodeSelector": {"keyward.dev/bench-nowhere": "true"},
                         "volumes": [{"name": "key", "secret": {"secretName": format!("k-{}", i % keys)}}],
                         "containers": [{"name": "app", "image": "busybox:keyward", "volumeMounts": [mount]}]}
            }))
            .unwrap();
            let api = api.clone();
            async move { api.create(&PostParams::default(), &pod).await.map(drop) }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<()>()
        .await
        .expect("create pods");
    bed.restart(keys).await;
    let without = settled_rss(&bed).await;
    bed.controller.as_mut().expect("controller running").terminate().await;
    bed.start_controller_with(&["--watch-consumers"]).await;
    let subpaths = pods.div_ceil(10).min(keys) as f64;
    common::eventually("every subPath consumer found", Duration::from_secs(600), || async {
        let found = common::metric_sum(&bed.metrics(), "keyward_apikey_consumers_not_following");
        (found >= subpaths).then_some(())
    })
    .await;
    let with = settled_rss(&bed).await;
    println!("| scenario | controller RSS |");
    println!("|---|---|");
    println!("| {keys} ApiKeys + {pods} pods, restarted, no pod watch | {without:.1} MiB |");
    println!(
        "| the same with `--watch-consumers` (every subPath pod found) | {with:.1} MiB ({:+.1} MiB, {:.2} KB per pod) |",
        with - without,
        (with - without) * 1024.0 / pods as f64
    );
    bed.finish(client).await;
}

/// VmRSS of process `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib / 1024.0
}

/// The largest of 10 RSS samples of the controller over 5 s.
async fn settled_rss(bed: &Bed) -> f64 {
    settled_rss_of(bed.pid()).await
}

/// The largest of 10 RSS samples of process `pid` over 5 s.
async fn settled_rss_of(pid: u32) -> f64 {
    let mut max: f64 = 0.0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        max = max.max(rss_mib(pid));
    }
    max
}

/// Per ApiKey, the last `nextActionAt` seen; lateness samples (seconds) by step.
#[derive(Default)]
struct Schedule {
    next: HashMap<String, (Option<String>, DateTime<Utc>)>,
    late: BTreeMap<String, Vec<f64>>,
    /// Steps seen more than 5 s late: when they were due, how late.
    very_late: Vec<(DateTime<Utc>, f64)>,
    record: bool,
}

impl Schedule {
    /// A new version of `key` arrived at `now`: if it moved past a due `nextActionAt`,
    /// that step ran; record how late its result was visible.
    fn observe(&mut self, key: &ApiKey, now: DateTime<Utc>) {
        let Some(status) = &key.status else { return };
        let Some(at) = status.next_action_at else { return };
        let step = (status.next_action.clone(), at);
        if let Some((what, due)) = self.next.insert(key.name_any(), step)
            && due != at
            && due <= now
            && self.record
        {
            let late = (now - due).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
            if late > 5.0 {
                self.very_late.push((due, late));
            }
            self.late.entry(what.unwrap_or_default()).or_default().push(late);
        }
    }
}

fn quantiles(v: &mut [f64]) -> String {
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    format!("{} | {:.3} s | {:.3} s | {:.3} s", v.len(), q(0.5), q(0.99), v[v.len() - 1])
}

/// Timing precision: N keys with lifetimes spread over 60–120 s rotate for `minutes`;
/// each step's lateness = when its result was visible on a watch − its `nextActionAt`.
async fn precision(client: &Client, n: usize, minutes: usize) {
    let mut bed = Bed::new(client, "bench-time", json!({"maxLifetime": "PT2M", "minLifetime": "PT1M"})).await;
    bed.start_controller().await;
    let sched = Arc::new(Mutex::new(Schedule::default()));
    let watch = watch_keys(client, &bed.ns.name, sched.clone(), |s, k, now| s.observe(k, now));
    bed.add_ready_keys(client, 0..n, |i| Some(format!("PT{}S", 60 + (i * 7919) % 61))).await;
    let before = writes(&bed.metrics());
    sched.lock().unwrap().record = true;
    tokio::time::sleep(Duration::from_secs(60 * minutes as u64)).await;
    watch.abort();
    let mut sched = std::mem::take(&mut *sched.lock().unwrap());
    let mut all: Vec<f64> = sched.late.values().flatten().copied().collect();
    let (w, detail) = per_unit(&before, &writes(&bed.metrics()), all.len() as f64);
    println!("| step ({n} keys, lifetimes 60–120 s, {minutes} min) | steps | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    for (what, v) in sched.late.iter_mut() {
        println!("| {what} | {} |", quantiles(v));
    }
    println!("| all | {} |", quantiles(&mut all));
    println!("writes per scheduled step: {w:.2} ({detail})");
    bed.finish(client).await;
}

/// Catch-up: N keys of a minute's lifetime per 1,000 ApiKeys (so that provisioning ends
/// well inside the first keys' lifetime: at one minute, 10,000 keys need several writes
/// each per minute just to stay on schedule, more than this API server takes); the
/// controller stops until every key of every ApiKey is past its expiry, then starts: time
/// until each ApiKey has been seen Ready with a future `nextActionAt`. Against the floor:
/// the same client rewriting N Secrets and N statuses (what a catch-up writes at least).
async fn catchup(client: &Client, n: usize) {
    let (floor, floor_cpu) = {
        let (_, _, ns) = floor(client, n).await;
        let cpu = plane_cpu()[0];
        let took = rewrite_floor(client, &ns, n).await;
        let cpu = plane_cpu()[0] - cpu;
        clean_up(client, vec![ns]).await;
        (took, cpu)
    };
    let lifetime = format!("PT{}M", n.div_ceil(1000).max(1));
    let mut bed =
        Bed::new(client, "bench-catchup", json!({"maxLifetime": lifetime, "minLifetime": lifetime})).await;
    bed.start_controller().await;
    bed.add_ready_keys(client, 0..n, |_| None).await;
    bed.controller.as_mut().unwrap().terminate().await;
    let api = Api::<ApiKey>::namespaced(client.clone(), &bed.ns.name);
    let stopped = api.list(&Default::default()).await.expect("list ApiKeys").items;
    let latest = stopped
        .iter()
        .flat_map(|k| k.status.iter().flat_map(|s| s.keys.iter().filter_map(|e| e.expires_at)))
        .max()
        .expect("keys");
    let versions: HashMap<String, Option<String>> =
        stopped.iter().map(|k| (k.name_any(), k.resource_version())).collect();
    let wait = (latest - Utc::now()).to_std().unwrap_or_default() + Duration::from_secs(5);
    tokio::time::sleep(wait).await;
    let caught = Arc::new(Mutex::new(HashSet::new()));
    let start = Instant::now();
    let watch = watch_keys(client, &bed.ns.name, caught.clone(), move |set, k, now| {
        let moved = versions.get(&k.name_any()).is_some_and(|v| *v != k.resource_version());
        let on_schedule = k.status.as_ref().and_then(|s| s.next_action_at).is_some_and(|t| t > now);
        if moved && on_schedule && is_ready(k) {
            set.insert(k.name_any());
        }
    });
    let before = BTreeMap::new();
    let cpu_before = plane_cpu();
    bed.start_controller().await;
    until("every ApiKey back on schedule", &caught, Duration::from_secs(1800), |s| s.len() >= n).await;
    let took = start.elapsed();
    // What bounds the catch-up: CPU seconds each part used during it (of 2 per second here).
    let cpu_after = plane_cpu();
    let cpu = [cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1], cpu_of(bed.pid())];
    watch.abort();
    let (w, detail) = settled_writes(&bed, &before, n).await;
    println!(
        "| catch-up: {n} ApiKeys ({lifetime} keys), every key expired | floor (Secret + status rewritten, {CONCURRENCY} in flight; API server CPU s) | all back on schedule | ratio | writes per ApiKey | CPU s during catch-up: API server, etcd, controller |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| controller stopped {:.0} s | {:.1} s ({floor_cpu:.0}) | {:.1} s | {:.2}× | {w:.2} ({detail}) | {:.0}, {:.0}, {:.1} |",
        wait.as_secs_f64(),
        floor.as_secs_f64(),
        took.as_secs_f64(),
        took.as_secs_f64() / floor.as_secs_f64(),
        cpu[0],
        cpu[1],
        cpu[2],
    );
    bed.finish(client).await;
}

/// API cost: writes per requested rotation, then per no-op reconcile (a restarted
/// controller re-reconciling N settled ApiKeys).
async fn cost(client: &Client, n: usize) {
    let mut bed = Bed::new(client, "bench-cost", json!({"maxLifetime": "P90D"})).await;
    bed.start_controller().await;
    bed.add_ready_keys(client, 0..n, |_| None).await;
    let before = writes(&bed.metrics());
    let rotated = Arc::new(Mutex::new(HashSet::new()));
    let watch = watch_keys(client, &bed.ns.name, rotated.clone(), |set, k, _| {
        if k.status.as_ref().and_then(|s| s.rotation_request.as_deref()) == Some("bench-1") && is_ready(k) {
            set.insert(k.name_any());
        }
    });
    let ns = bed.ns.name.as_str();
    futures::stream::iter(0..n)
        .map(|i| async move { common::request_rotation(client, ns, &format!("k-{i}"), "bench-1").await })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
    until("every rotation done", &rotated, Duration::from_secs(900), |s| s.len() >= n).await;
    watch.abort();
    let (per_rotation, detail) = settled_writes(&bed, &before, n).await;
    println!("| API cost ({n} ApiKeys) | writes |");
    println!("|---|---|");
    println!("| per requested rotation | {per_rotation:.2} ({detail}) |");
    let reconciled = bed.restart(n).await;
    let (total, detail) = settled_writes(&bed, &BTreeMap::new(), 1).await;
    println!(
        "| per no-op reconcile | {:.2} ({total} writes in {reconciled} reconciles after a restart{}) |",
        total / reconciled,
        if detail.is_empty() { String::new() } else { format!(": {detail}") }
    );
    bed.finish(client).await;
}

/// One size of the `scale` scenario.
struct ScaleRow {
    n: usize,
    floor: f64,
    keyward: f64,
    /// Controller RSS (MiB): no ApiKeys, right after the burst, after a restart.
    controller: [f64; 3],
    /// Verifier RSS (MiB): no ApiKeys, every key indexed.
    verifier: [f64; 2],
    restart: f64,
    restart_writes: f64,
    /// Lateness as watched: steps, steps per minute, p50, p99 (s).
    late: (usize, f64, f64, f64),
    /// Lateness as the controller started the steps: p50 and p99 bucket bounds (s).
    controller_late: [f64; 2],
    /// Re-lists of the watch measuring lateness during the window.
    relists: usize,
    /// CPU seconds during keyward's provisioning: API server, etcd, controller.
    cpu: [f64; 3],
}

impl ScaleRow {
    fn kb_per_key(&self, mib: f64, base: f64) -> f64 {
        (mib - base) * 1024.0 * 1024.0 / 1000.0 / self.n as f64
    }

    fn ratio(&self) -> f64 {
        self.keyward / self.floor
    }
}

/// Short-lived ApiKeys added to each size for the lateness measurement: lifetimes of
/// 60–120 s rotate about 2.5 steps per key per minute, so 200 of them make ~500 a minute.
const LATENESS_KEYS: usize = 200;

/// The curve: for each N (fresh namespaces each time) the floor and keyward provisioning
/// N ApiKeys at once, the CPU seconds of the API server, etcd and the controller during
/// it, the RSS of the controller (empty, after the burst, after a restart) and of a
/// verifier with every key indexed, the restart (every ApiKey reconciled, writes), and the
/// lateness of the steps of 200 short-lived ApiKeys rotating among the N for `minutes`.
/// Writes the table and a chart (`target/scale.svg`, or `$KEYWARD_SCALE_SVG`).
async fn scale(client: &Client, sizes: &[usize], minutes: u64) {
    let mut rows = Vec::new();
    let mut verifier_base = None;
    for &n in sizes {
        let floor_before = plane_cpu();
        let floor = floor(client, n).await;
        let floor_cpu = plane_cpu();
        clean_up(client, vec![floor.2]).await;
        let mut bed = Bed::new(client, "bench-scale", json!({"maxLifetime": "P90D"})).await;
        if verifier_base.is_none() {
            let v = common::verifier_for(&bed.ns.name);
            v.wait_ready().await;
            verifier_base = Some(settled_rss_of(v.pid().expect("verifier running")).await);
        }
        bed.start_controller().await;
        let empty = settled_rss(&bed).await;
        let (plane_before, controller_before) = (plane_cpu(), cpu_of(bed.pid()));
        let start = Instant::now();
        bed.add_ready_keys(client, 0..n, |_| None).await;
        let took = start.elapsed().as_secs_f64();
        let (plane_after, controller_after) = (plane_cpu(), cpu_of(bed.pid()));
        // API server, etcd, kube-controller-manager, controller.
        let cpu = [0, 1, 2].map(|i| plane_after[i] - plane_before[i]);
        let floor_cpu = [0, 1, 2].map(|i| floor_cpu[i] - floor_before[i]);
        let controller_cpu = controller_after - controller_before;
        let burst = settled_rss(&bed).await;
        let (per_key, detail) = settled_writes(&bed, &BTreeMap::new(), n).await;
        // Where the time per ApiKey goes as N grows: the API calls keyward made and the CPU
        // of each process, against the floor's.
        let metrics = bed.metrics();
        let reconciles = by_label(&metrics, "keyward_reconciles_total").get("ApiKey").copied().unwrap_or(0.0);
        let failures = common::metric_sum(&metrics, "keyward_reconcile_failures_total");
        let ms = |cpu: f64| cpu * 1000.0 / n as f64;
        println!(
            "{n}: provisioning: {:.2} reconciles and {per_key:.2} writes ({detail}) per ApiKey, {} failed reconciles; \
             CPU ms per ApiKey, floor vs keyward: API server {:.2} vs {:.2}, etcd {:.2} vs {:.2}, kube-controller-manager {:.2} vs {:.2}, controller {:.2}",
            reconciles / n as f64,
            failures as u64,
            ms(floor_cpu[0]),
            ms(cpu[0]),
            ms(floor_cpu[1]),
            ms(cpu[1]),
            ms(floor_cpu[2]),
            ms(cpu[2]),
            ms(controller_cpu),
        );
        // Restart: from the new process's start until it has reconciled every ApiKey.
        bed.controller.as_mut().expect("controller running").terminate().await;
        let start = Instant::now();
        bed.start_controller().await;
        common::eventually("every ApiKey reconciled after restart", Duration::from_secs(900), || async {
            let r =
                by_label(&bed.metrics(), "keyward_reconciles_total").get("ApiKey").copied().unwrap_or(0.0);
            (r >= n as f64).then_some(())
        })
        .await;
        let restart = start.elapsed().as_secs_f64();
        let (restart_writes, _) = settled_writes(&bed, &BTreeMap::new(), 1).await;
        let restarted = settled_rss(&bed).await;
        let verifier = common::verifier_for(&bed.ns.name);
        verifier.wait_ready().await;
        let indexed = settled_rss_of(verifier.pid().expect("verifier running")).await;
        drop(verifier);
        // Lateness of ~500 steps a minute among the N.
        let sched = Arc::new(Mutex::new(Schedule::default()));
        let watch =
            watch_keys_listed(client, &bed.ns.name, Some(n), sched.clone(), |s, k, now| s.observe(k, now))
                .await;
        bed.add_ready_keys(client, n..n + LATENESS_KEYS, |i| Some(format!("PT{}S", 60 + (i * 7919) % 61)))
            .await;
        sched.lock().unwrap().record = true;
        let relists = OBSERVER_RELISTS.load(std::sync::atomic::Ordering::Relaxed);
        let metrics_before = bed.metrics();
        tokio::time::sleep(Duration::from_secs(60 * minutes)).await;
        watch.abort();
        let metrics_after = bed.metrics();
        let controller_late = [0.5, 0.99].map(|q| lateness_bucket(&metrics_before, &metrics_after, q));
        let relists = OBSERVER_RELISTS.load(std::sync::atomic::Ordering::Relaxed) - relists;
        let lists = |m: &str| scalar(m, "keyward_apikey_watch_lists_total");
        println!(
            "{n}: the controller's ApiKey watch listed {} times in the window",
            lists(&metrics_after) - lists(&metrics_before)
        );
        let sched = std::mem::take(&mut *sched.lock().unwrap());
        if let (Some(first), Some(last)) = (sched.very_late.first(), sched.very_late.last()) {
            let worst = sched.very_late.iter().map(|v| v.1).fold(0.0, f64::max);
            println!(
                "{n}: {} steps seen > 5 s late, due {} … {}, the latest {worst:.1} s",
                sched.very_late.len(),
                first.0.format("%H:%M:%S"),
                last.0.format("%H:%M:%S")
            );
        }
        let mut late: Vec<f64> = sched.late.into_values().flatten().collect();
        late.sort_by(f64::total_cmp);
        let q = |p: f64| {
            late.get(((late.len() as f64 * p).ceil() as usize).max(1) - 1).copied().unwrap_or(f64::NAN)
        };
        let row = ScaleRow {
            n,
            floor: floor.0.as_secs_f64(),
            keyward: took,
            controller: [empty, burst, restarted],
            verifier: [verifier_base.unwrap_or_default(), indexed],
            restart,
            restart_writes,
            late: (late.len(), late.len() as f64 / minutes as f64, q(0.5), q(0.99)),
            controller_late,
            relists,
            cpu: [cpu[0], cpu[1], controller_cpu],
        };
        print_scale(std::slice::from_ref(&row), rows.is_empty());
        rows.push(row);
        bed.finish(client).await;
    }
    let path = std::env::var("KEYWARD_SCALE_SVG")
        .unwrap_or_else(|_| format!("{}/target/scale.svg", env!("CARGO_MANIFEST_DIR")));
    std::fs::write(&path, scale_svg(&rows)).expect("write the chart");
    println!("\nAll sizes:\n");
    print_scale(&rows, true);
    println!("\nchart: {path}");
}

fn print_scale(rows: &[ScaleRow], header: bool) {
    if header {
        println!(
            "| ApiKeys | floor | keyward | ratio | controller RSS empty → burst → restarted (KB/ApiKey after burst, restart) | verifier RSS (KB/key) | restart → all reconciled (writes) | lateness watched: steps/min, p50, p99 (watch re-lists) | lateness at the controller: p50, p99 (≤ bucket) | CPU s during provisioning: API server, etcd, controller |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
    }
    for r in rows {
        let [empty, burst, restarted] = r.controller;
        let [vbase, vind] = r.verifier;
        println!(
            "| {} | {:.1} s | {:.1} s | {:.2}× | {empty:.1} → {burst:.1} → {restarted:.1} MiB ({:.2}, {:.2}) | {vbase:.1} → {vind:.1} MiB ({:.2}) | {:.1} s ({}) | {:.0}, {:.3} s, {:.3} s ({}) | ≤ {:.2} s, ≤ {:.2} s | {:.0}, {:.0}, {:.1} |",
            r.n,
            r.floor,
            r.keyward,
            r.ratio(),
            r.kb_per_key(burst, empty),
            r.kb_per_key(restarted, empty),
            r.kb_per_key(vind, vbase),
            r.restart,
            r.restart_writes,
            r.late.1,
            r.late.2,
            r.late.3,
            r.relists,
            r.controller_late[0],
            r.controller_late[1],
            r.cpu[0],
            r.cpu[1],
            r.cpu[2],
        );
    }
}

/// Two small panels from the rows' own numbers: the provisioning ratio against its target
/// (1.5×), and KB per ApiKey (controller after the burst and after a restart, verifier)
/// against theirs (2 and 1). N on a log scale.
fn scale_svg(rows: &[ScaleRow]) -> String {
    let (w, h, pad) = (330.0, 240.0, 42.0);
    let ns: Vec<f64> = rows.iter().map(|r| (r.n as f64).log10()).collect();
    let (lo, hi) = (ns.iter().copied().fold(f64::MAX, f64::min), ns.iter().copied().fold(f64::MIN, f64::max));
    let x = |v: f64| pad + (v - lo) / (hi - lo).max(1e-9) * (w - 2.0 * pad);
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{h}" font-family="sans-serif" font-size="10">"#,
        2.0 * w
    );
    type Series<'a> = (&'a str, &'a str, Vec<f64>);
    let mut panel = |dx: f64, title: &str, series: Vec<Series>, targets: &[(f64, &str)]| {
        let top = series
            .iter()
            .flat_map(|s| s.2.iter().copied())
            .chain(targets.iter().map(|t| t.0))
            .fold(0.0, f64::max)
            * 1.15;
        let y = |v: f64| h - pad - v / top.max(1e-9) * (h - 2.0 * pad);
        out += &format!(
            r#"<g transform="translate({dx},0)"><text x="{pad}" y="16" font-size="12">{title}</text>"#
        );
        out += &format!(
            r##"<line x1="{pad}" y1="{0}" x2="{1}" y2="{0}" stroke="#888"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{0}" stroke="#888"/>"##,
            h - pad,
            w - pad
        );
        for i in 0..=4 {
            let v = top * i as f64 / 4.0;
            out +=
                &format!(r#"<text x="{}" y="{:.1}" text-anchor="end">{v:.1}</text>"#, pad - 4.0, y(v) + 3.0);
        }
        for (r, v) in rows.iter().zip(&ns) {
            out += &format!(
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}k</text>"#,
                x(*v),
                h - pad + 14.0,
                r.n as f64 / 1000.0
            );
        }
        out += &format!(
            r#"<text x="{}" y="{}" text-anchor="middle">ApiKeys (log scale)</text>"#,
            w / 2.0,
            h - 8.0
        );
        for (t, label) in targets {
            out += &format!(
                r##"<line x1="{pad}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#c00" stroke-dasharray="4 3"/><text x="{1}" y="{2:.1}" fill="#c00" text-anchor="end">{label}</text>"##,
                y(*t),
                w - pad,
                y(*t) - 3.0
            );
        }
        for (i, (name, color, vals)) in series.iter().enumerate() {
            let pts: Vec<String> =
                ns.iter().zip(vals).map(|(n, v)| format!("{:.1},{:.1}", x(*n), y(*v))).collect();
            out += &format!(
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                pts.join(" ")
            );
            for p in &pts {
                let (px, py) = p.split_once(',').unwrap_or_default();
                out += &format!(r#"<circle cx="{px}" cy="{py}" r="2.5" fill="{color}"/>"#);
            }
            out += &format!(
                r#"<text x="{}" y="{}" fill="{color}">{name}</text>"#,
                pad + 6.0,
                pad + 12.0 * i as f64
            );
        }
        out += "</g>";
    };
    panel(
        0.0,
        "provisioning time / floor",
        vec![("keyward / floor", "#06c", rows.iter().map(ScaleRow::ratio).collect())],
        &[(1.5, "target 1.5×")],
    );
    panel(
        w,
        "KB of RSS per ApiKey",
        vec![
            (
                "controller after burst",
                "#e80",
                rows.iter().map(|r| r.kb_per_key(r.controller[1], r.controller[0])).collect(),
            ),
            (
                "controller after restart",
                "#06c",
                rows.iter().map(|r| r.kb_per_key(r.controller[2], r.controller[0])).collect(),
            ),
            ("verifier", "#080", rows.iter().map(|r| r.kb_per_key(r.verifier[1], r.verifier[0])).collect()),
        ],
        &[(2.0, "controller target 2"), (1.0, "verifier target 1")],
    );
    out + "</svg>\n"
}

/// Writes since `before` per `n`, once the counters have not moved for 3 s.
async fn settled_writes(bed: &Bed, before: &BTreeMap<String, f64>, n: usize) -> (f64, String) {
    let mut last = writes(&bed.metrics());
    let mut still = 0;
    while still < 6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = writes(&bed.metrics());
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    per_unit(before, &last, n as f64)
}
