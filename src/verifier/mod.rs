//! `keyward verifier`: answers "is this key valid?" for the services that receive
//! keys — `POST /v1/verify` (JSON) and `GET /v1/auth` (nginx `auth_request`, Envoy
//! `ext_authz` in HTTP mode) — from an in-memory index fed by watches, and writes each
//! key's last use to `status.keys[].lastUsedAt` at most once per flush interval (a
//! minute by default) per ApiKey.

mod http;
pub mod index;
pub mod request;
mod usage;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

pub use index::{Code, Entry, Holder, Index, Verdict};

use crate::api::{ApiKey, KeyPolicy};
use crate::error::Result;
use crate::health::Readiness;
use crate::keys::KeyFormat;
use crate::metrics::Metrics;

/// Largest accepted request body of `POST /v1/verify`.
pub const MAX_BODY: usize = 4096;
/// Field manager of the verifier's `lastUsedAt` writes.
pub const VERIFIER_MANAGER: &str = "keyward/verifier";

/// Options of `keyward verifier`.
#[derive(Clone, Debug)]
pub struct Options {
    /// Listen address (API, health, metrics).
    pub listen: String,
    /// Only index ApiKeys of this namespace.
    pub namespace: Option<String>,
    /// Least time between two `lastUsedAt` writes for one ApiKey.
    pub usage_interval: Duration,
}

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RequestLabels {
    /// `verify` or `auth`.
    pub endpoint: &'static str,
    /// The result code.
    pub code: &'static str,
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
}

impl VerifierMetrics {
    fn register(registry: &mut prometheus_client::registry::Registry) -> Arc<Self> {
        let m = VerifierMetrics {
            requests: Family::default(),
            latency: Histogram::new(exponential_buckets(0.00001, 2.0, 16)),
            index_keys: Gauge::default(),
            usage_writes: Counter::default(),
            usage_write_failures: Counter::default(),
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
        Arc::new(m)
    }
}

/// Run the verifier until SIGTERM/SIGINT; pending last-use writes are flushed on the way out.
pub async fn run(client: Client, server: &str, opts: Options) -> Result<()> {
    crate::controller::ensure_crds_in(&client, server, opts.namespace.as_deref()).await?;
    let mut registry = prometheus_client::registry::Registry::with_prefix("keyward");
    let vm = VerifierMetrics::register(&mut registry);
    let metrics = Metrics::with_registry(registry);
    let index = Arc::new(RwLock::new(Index::default()));
    let usage = Arc::new(usage::Usage::new(client.clone(), opts.usage_interval, vm.clone(), index.clone()));
    let ready = Readiness::default();

    let keys: Api<ApiKey> = match &opts.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let policies: Api<KeyPolicy> = Api::all(client.clone());
    let keys_synced = Readiness::default();
    let policies_synced = Readiness::default();
    let key_feed = feed_keys(keys, index.clone(), vm.clone(), keys_synced.clone());
    let policy_feed = feed_policies(policies, index.clone(), policies_synced.clone());
    let (ks, ps, r) = (keys_synced.clone(), policies_synced.clone(), ready.clone());
    let readiness = async move {
        while !(ks.get() && ps.get()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        r.set(true);
        tracing::info!("verifier index synced");
        futures::future::pending::<()>().await;
    };
    let flusher = usage.clone().run();
    let app = http::router(index.clone(), usage.clone(), vm.clone(), metrics.clone(), ready.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = async move {
        let mut rx = stop_rx;
        let _ = rx.wait_for(|s| *s).await;
    };
    let server = crate::health::serve(&opts.listen, app, stopped).await?;
    tokio::select! {
        _ = crate::controller::shutdown_signal() => {},
        _ = key_feed => tracing::error!("ApiKey watch ended"),
        _ = policy_feed => tracing::error!("KeyPolicy watch ended"),
        _ = readiness => {},
        _ = flusher => {},
    }
    ready.set(false);
    let _ = stop_tx.send(true);
    let _ = server.await;
    usage.flush_all().await;
    tracing::info!("verifier stopped");
    Ok(())
}

async fn feed_keys(api: Api<ApiKey>, index: Arc<RwLock<Index>>, vm: Arc<VerifierMetrics>, synced: Readiness) {
    let mut fresh: Option<Index> = None;
    let mut events = watcher(api, watcher::Config::default()).default_backoff().boxed();
    while let Some(event) = events.next().await {
        let Ok(event) = event else { continue };
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
                synced.set(true);
            }
            watcher::Event::Apply(k) => index.write().unwrap_or_else(|p| p.into_inner()).upsert(&k),
            watcher::Event::Delete(k) => index
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&k.namespace().unwrap_or_default(), &k.name_any()),
        }
        let len = index.read().unwrap_or_else(|p| p.into_inner()).len();
        vm.index_keys.set(len as i64);
    }
}

async fn feed_policies(api: Api<KeyPolicy>, index: Arc<RwLock<Index>>, synced: Readiness) {
    let (reader, writer) = kube::runtime::reflector::store();
    let mut events = watcher(api, watcher::Config::default()).default_backoff().reflect(writer).boxed();
    while let Some(event) = events.next().await {
        let Ok(event) = event else { continue };
        let formats: Vec<KeyFormat> =
            reader.state().iter().map(|p| KeyFormat::from(&p.spec.key_format)).collect();
        index.write().unwrap_or_else(|p| p.into_inner()).set_formats(formats);
        if matches!(event, watcher::Event::InitDone) {
            synced.set(true);
        }
    }
}
