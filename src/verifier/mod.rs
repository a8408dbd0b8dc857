//! `keyward verifier`: answers "is this key valid?" for the services that receive
//! keys — `POST /v1/verify` (JSON) and `GET /v1/auth` (nginx `auth_request`, Envoy
//! `ext_authz` in HTTP mode) — from an in-memory index fed by watches, and writes each
//! key's last use to `status.keys[].lastUsedAt` at most once per flush interval (a
//! minute by default) per ApiKey.

pub mod decision;
mod grpc;
mod http;
pub mod index;
pub mod request;
mod usage;
mod watch;

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

pub use index::{Code, Entry, Holder, Index, Verdict};
pub use watch::WatchHealth;

use crate::api::{ApiKey, KeyPolicy};
use crate::error::Result;
use crate::keys::KeyFormat;
use crate::metrics::Metrics;
use crate::runtime::health::Readiness;

/// Largest accepted request body of `POST /v1/verify`.
pub const MAX_BODY: usize = 4096;
/// Field manager of the verifier's `lastUsedAt` writes.
pub const VERIFIER_MANAGER: &str = "keyward/verifier";

/// Options of `keyward verifier`.
#[derive(Clone, Debug)]
pub struct Options {
    /// Listen address (API, health, metrics).
    pub listen: String,
    /// gRPC `ext_authz` and health listen address (None: no gRPC listener).
    pub grpc_listen: Option<String>,
    /// Only index ApiKeys of this namespace.
    pub namespace: Option<String>,
    /// Least time between two `lastUsedAt` writes for one ApiKey.
    pub usage_interval: Duration,
    /// How long a watch may fail (with no successful list or event since) before the
    /// verifier stops answering from its possibly stale index: `/readyz` and the
    /// verification endpoints then answer 503 until the watch lists again.
    pub max_staleness: Duration,
    /// After SIGTERM: unready at once, still answering for this long, then stop.
    pub shutdown_delay: Duration,
}

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RequestLabels {
    /// `http` or `grpc`.
    pub protocol: &'static str,
    /// `verify`, `auth` (HTTP) or `check` (gRPC `ext_authz`).
    pub endpoint: &'static str,
    /// The result code.
    pub code: &'static str,
}

/// Labels of the watch metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct WatchLabels {
    /// `apikeys` or `keypolicies`.
    pub resource: &'static str,
}

/// The verifier's metrics (registered into the process registry).
pub struct VerifierMetrics {
    /// Requests by endpoint and code.
    pub requests: Family<RequestLabels, Counter>,
    /// Time to answer, seconds.
    pub latency: Histogram,
    /// Keys in the index.
    pub index_keys: Gauge,
    /// `lastUsedAt` status writes.
    pub usage_writes: Counter,
    /// `lastUsedAt` writes that failed (other than a concurrent change).
    pub usage_write_failures: Counter,
    /// 1 while a watch has listed and has not been failing for longer than the bound.
    pub watch_healthy: Family<WatchLabels, Gauge>,
    /// Failed list or watch attempts.
    pub watch_errors: Family<WatchLabels, Counter>,
}

impl VerifierMetrics {
    fn register(registry: &mut prometheus_client::registry::Registry) -> Arc<Self> {
        let m = VerifierMetrics {
            requests: Family::default(),
            latency: Histogram::new(exponential_buckets(0.00001, 2.0, 16)),
            index_keys: Gauge::default(),
            usage_writes: Counter::default(),
            usage_write_failures: Counter::default(),
            watch_healthy: Family::default(),
            watch_errors: Family::default(),
        };
        registry.register(
            "verify_requests",
            "Verification requests by endpoint and code",
            m.requests.clone(),
        );
        registry.register("verify_duration_seconds", "Time to answer a verification", m.latency.clone());
        registry.register("verifier_index_keys", "Keys in the verifier's index", m.index_keys.clone());
        registry.register("verifier_usage_writes", "lastUsedAt status writes", m.usage_writes.clone());
        registry.register(
            "verifier_usage_write_failures",
            "lastUsedAt status writes that failed (retried with backoff)",
            m.usage_write_failures.clone(),
        );
        registry.register(
            "verifier_watch_healthy",
            "1 while the watch has listed and has not been failing for longer than --max-staleness",
            m.watch_healthy.clone(),
        );
        registry.register(
            "verifier_watch_errors",
            "Failed list or watch attempts (each followed by a backoff and a fresh list)",
            m.watch_errors.clone(),
        );
        for resource in [APIKEYS, KEYPOLICIES] {
            m.watch_healthy.get_or_create(&WatchLabels { resource }).set(0);
            let _ = m.watch_errors.get_or_create(&WatchLabels { resource });
        }
        Arc::new(m)
    }
}

/// `protocol` label of HTTP requests.
pub const HTTP: &str = "http";
/// `protocol` label of gRPC requests.
pub const GRPC: &str = "grpc";

/// Answers a key (and the scopes a route requires) from the index, records a valid
/// key's use and counts the request: what every endpoint of every protocol shares.
#[derive(Clone)]
pub struct Checker {
    index: Arc<RwLock<Index>>,
    usage: Arc<usage::Usage>,
    vm: Arc<VerifierMetrics>,
}

impl Checker {
    /// Verify `key`, requiring `scopes` of a valid key (else `INSUFFICIENT_SCOPE`); a
    /// valid key's use is recorded either way (the caller did hold a working key).
    pub fn check(
        &self,
        protocol: &'static str,
        endpoint: &'static str,
        key: &str,
        scopes: &[String],
        started: Instant,
    ) -> Verdict {
        let now = chrono::Utc::now();
        let mut verdict = self.index.read().unwrap_or_else(|p| p.into_inner()).verify(key, now);
        if verdict.code == Code::Valid
            && let Some(e) = &verdict.entry
        {
            self.usage.record(e, now);
            if scopes.iter().any(|s| e.apikey.scopes.binary_search(s).is_err()) {
                verdict.code = Code::InsufficientScope;
            }
        }
        self.vm
            .requests
            .get_or_create(&RequestLabels { protocol, endpoint, code: verdict.code.as_str() })
            .inc();
        self.vm.latency.observe(started.elapsed().as_secs_f64());
        verdict
    }

    /// The original request's URI as it may be logged: without its query (a client may
    /// send `?api_key=…`), and with any path segment that starts with a known key
    /// prefix replaced by `<redacted>`.
    pub fn loggable(&self, uri: &str) -> String {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        let prefixes: Vec<&str> = index.formats().iter().map(|f| f.prefix.as_str()).collect();
        request::loggable_uri(uri, &prefixes)
    }
}

/// `resource` label of the ApiKey watch.
const APIKEYS: &str = "apikeys";
/// `resource` label of the KeyPolicy watch.
const KEYPOLICIES: &str = "keypolicies";

/// Run the verifier until SIGTERM/SIGINT; pending last-use writes are flushed on the way out.
pub async fn run(client: Client, server: &str, opts: Options) -> Result<()> {
    crate::runtime::ensure_crds_in(&client, server, opts.namespace.as_deref()).await?;
    let mut registry = prometheus_client::registry::Registry::with_prefix("keyward");
    let vm = VerifierMetrics::register(&mut registry);
    let metrics = Metrics::with_registry(registry);
    let index = Arc::new(RwLock::new(Index::default()));
    let usage = Arc::new(usage::Usage::new(client.clone(), opts.usage_interval, vm.clone(), index.clone()));
    let ready = Readiness::default();
    // The index is current enough to answer from (see `keep_readiness`); `ready` follows
    // it, except that it goes false first when stopping.
    let trusted = Readiness::default();

    let keys: Api<ApiKey> = match &opts.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let policies: Api<KeyPolicy> = Api::all(client.clone());
    let keys_health = Arc::new(Mutex::new(WatchHealth::default()));
    let policies_health = Arc::new(Mutex::new(WatchHealth::default()));
    let key_feed = feed_keys(keys, index.clone(), vm.clone(), keys_health.clone());
    let policy_feed = feed_policies(policies, index.clone(), vm.clone(), policies_health.clone());
    let readiness = keep_readiness(
        [(APIKEYS, keys_health), (KEYPOLICIES, policies_health)],
        opts.max_staleness,
        [ready.clone(), trusted.clone()],
        vm.clone(),
    );
    let flusher = usage.clone().run();
    let checker = Checker { index: index.clone(), usage: usage.clone(), vm: vm.clone() };
    let app = http::router(checker.clone(), metrics.clone(), ready.clone(), trusted.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let server = crate::runtime::health::serve(&opts.listen, app, stopped(stop_rx.clone())).await?;
    let grpc_server = match &opts.grpc_listen {
        Some(addr) => {
            Some(grpc::serve(addr, checker, ready.clone(), trusted.clone(), stopped(stop_rx)).await?)
        }
        None => None,
    };
    tokio::pin!(key_feed, policy_feed);
    let signalled = tokio::select! {
        _ = crate::runtime::shutdown_signal() => true,
        _ = &mut key_feed => { tracing::error!("ApiKey watch ended"); false },
        _ = &mut policy_feed => { tracing::error!("KeyPolicy watch ended"); false },
        _ = readiness => false,
        _ = flusher => false,
    };
    ready.set(false);
    if signalled && !opts.shutdown_delay.is_zero() {
        // Unready, so the Service stops routing here; meanwhile answer what still
        // arrives, with the index still fed (a revocation now is seen at once). The
        // readiness loop is stopped: the answers keep the trust they had (the delay is
        // bounded by --max-staleness).
        tracing::info!(delay = ?opts.shutdown_delay, "stopping: unready, still answering for the shutdown delay");
        let delay = opts.shutdown_delay.min(opts.max_staleness);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {},
            _ = &mut key_feed => {},
            _ = &mut policy_feed => {},
        }
    }
    let _ = stop_tx.send(true);
    let _ = server.await;
    if let Some(g) = grpc_server {
        let _ = g.await;
    }
    usage.flush_all().await;
    tracing::info!("verifier stopped");
    Ok(())
}

/// Ready while both watches have listed and neither has been failing for
/// `max_staleness` or longer (checked every 100 ms); `watch_healthy` follows each.
async fn keep_readiness(
    watches: [(&'static str, Arc<Mutex<WatchHealth>>); 2],
    max_staleness: Duration,
    ready: [Readiness; 2],
    vm: Arc<VerifierMetrics>,
) {
    let (mut was_ready, mut ever_ready) = (false, false);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let mut all_current = true;
        for (resource, health) in &watches {
            let h = health.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let current = h.current(now, max_staleness);
            vm.watch_healthy.get_or_create(&WatchLabels { resource }).set(i64::from(current));
            if !current && was_ready {
                tracing::warn!(
                    resource,
                    failing_for_seconds = h.failing_for(now).unwrap_or_default().as_secs(),
                    last_success_seconds_ago =
                        h.last_success().map(|t| now.saturating_duration_since(t).as_secs()),
                    max_staleness_seconds = max_staleness.as_secs(),
                    "watch failing for longer than --max-staleness: not ready, answering 503 until it lists again"
                );
            }
            all_current &= current;
        }
        if all_current != was_ready {
            ready.iter().for_each(|r| r.set(all_current));
            if all_current && !ever_ready {
                tracing::info!("verifier index synced");
            } else if all_current {
                tracing::info!("verifier watches listed again: ready");
            }
            (was_ready, ever_ready) = (all_current, ever_ready || all_current);
        }
    }
}

async fn feed_keys(
    api: Api<ApiKey>,
    index: Arc<RwLock<Index>>,
    vm: Arc<VerifierMetrics>,
    health: Arc<Mutex<WatchHealth>>,
) {
    let errors = vm.watch_errors.get_or_create(&WatchLabels { resource: APIKEYS }).clone();
    let mut fresh: Option<Index> = None;
    watch::follow(api, APIKEYS, health, errors, |event| {
        match event {
            watcher::Event::Init => fresh = Some(Index::default()),
            watcher::Event::InitApply(k) => {
                if let Some(f) = fresh.as_mut() {
                    f.upsert(&k);
                }
            }
            watcher::Event::InitDone => {
                if let Some(mut f) = fresh.take() {
                    let mut idx = index.write().unwrap_or_else(|p| p.into_inner());
                    f.set_formats(idx.formats().to_vec());
                    *idx = f;
                }
            }
            watcher::Event::Apply(k) => index.write().unwrap_or_else(|p| p.into_inner()).upsert(&k),
            watcher::Event::Delete(k) => index
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&k.namespace().unwrap_or_default(), &k.name_any()),
        }
        let len = index.read().unwrap_or_else(|p| p.into_inner()).len();
        vm.index_keys.set(len as i64);
    })
    .await;
}

async fn feed_policies(
    api: Api<KeyPolicy>,
    index: Arc<RwLock<Index>>,
    vm: Arc<VerifierMetrics>,
    health: Arc<Mutex<WatchHealth>>,
) {
    let errors = vm.watch_errors.get_or_create(&WatchLabels { resource: KEYPOLICIES }).clone();
    let (reader, mut writer) = kube::runtime::reflector::store();
    watch::follow(api, KEYPOLICIES, health, errors, |event| {
        // The store keeps serving the last complete list while a re-list is under way.
        writer.apply_watcher_event(&event);
        if matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
            return;
        }
        let formats: Vec<KeyFormat> =
            reader.state().iter().map(|p| KeyFormat::from(&p.spec.key_format)).collect();
        index.write().unwrap_or_else(|p| p.into_inner()).set_formats(formats);
    })
    .await;
}
