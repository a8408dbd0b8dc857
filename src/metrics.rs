//! Prometheus metrics (text format on `/metrics`), following Prometheus naming
//! conventions: `keyward_` prefix, base units, `_total` counters.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the reconcile counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `ApiKey` or `KeyPolicy`.
    pub kind: &'static str,
}

/// Labels of the failure counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// `ApiKey` or `KeyPolicy`.
    pub kind: &'static str,
    /// Short error class (see `Error::metric_label`).
    pub reason: &'static str,
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

/// Labels of the API write counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    /// `secrets`, `apikeys/status`, `keypolicies/status`, `events`, …
    pub resource: &'static str,
}

/// Labels of reason counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// An Event or condition reason.
    pub reason: &'static str,
}

/// Labels of the notification counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NotifyLabels {
    /// `KeyExpiringSoon` or `NonExpiringKey`.
    pub kind: &'static str,
    /// `raised` (Event sent), `delivered` or `failed` (webhook).
    pub result: &'static str,
}

/// Labels of a per-ApiKey gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiKeyLabels {
    /// The ApiKey's namespace.
    pub namespace: String,
    /// The ApiKey's name.
    pub apikey: String,
}

/// Labels of the per-key expiry gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    /// The ApiKey's namespace.
    pub namespace: String,
    /// The ApiKey's name.
    pub apikey: String,
    /// `active`, or `standby` for a key waiting to become active.
    pub role: &'static str,
}

/// Labels of the per-key last-use gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SlotLabels {
    /// The ApiKey's namespace.
    pub namespace: String,
    /// The ApiKey's name.
    pub apikey: String,
    /// `Primary` or `Secondary`.
    pub slot: &'static str,
}

/// Labels of the per-consumer rollout gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    /// The ApiKey's namespace (also the workload's).
    pub namespace: String,
    /// The ApiKey's name.
    pub apikey: String,
    /// `Deployment`, `StatefulSet` or `DaemonSet`.
    pub kind: &'static str,
    /// The workload's name.
    pub name: String,
}

type F64Gauge = prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>;

/// All metrics of one process, shared as `Arc`.
pub struct Metrics {
    /// Effective expiry of each ApiKey's active and waiting standby key (Unix seconds).
    pub key_expiry: Family<KeyLabels, F64Gauge>,
    /// Last recorded use of each ApiKey's valid keys, by slot (Unix seconds).
    pub key_last_used: Family<SlotLabels, F64Gauge>,
    /// ApiKeys whose older key is still used after consumers moved off it, with a
    /// warning threshold before its expiry passed.
    pub old_key_in_use: prometheus_client::metrics::gauge::Gauge,
    old_key_in_use_set: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
    /// 1 while this replica holds the leader Lease (or runs without election).
    pub leader: prometheus_client::metrics::gauge::Gauge,
    /// Expiry warnings raised and webhook deliveries, by kind and result.
    pub notifications: Family<NotifyLabels, Counter>,
    /// Writes to the Kubernetes API, by resource (a no-op reconcile adds none).
    pub api_writes: Family<ResourceLabels, Counter>,
    /// Lifecycle happenings (`KeyCreated`, `KeyFlipped`, `KeyExpired`, `KeyRevoked`, …).
    pub lifecycle_events: Family<ReasonLabels, Counter>,
    /// Reconciles that stopped on input the user has to fix, by Ready reason.
    pub blocked: Family<ReasonLabels, Counter>,
    registry: Registry,
    /// Reconciles run, by kind.
    pub reconciles: Family<KindLabels, Counter>,
    /// Reconciles that failed, by kind and reason.
    pub reconcile_failures: Family<FailureLabels, Counter>,
    /// Reconcile durations in seconds, by kind.
    pub reconcile_duration: Family<KindLabels, Histogram, fn() -> Histogram>,
    /// Lists the controller's ApiKey watch completed: one at start, one more each time
    /// the watch could not resume (what changed meanwhile is seen only at the list's end).
    pub apikey_lists: Counter,
    /// How late (seconds after `nextActionAt`) each reconcile that found an ApiKey's
    /// scheduled step due started.
    pub step_lateness: Histogram,
    /// Workloads reading an ApiKey's Secret in a way no rotation reaches (absent at 0).
    pub consumers_not_following: Family<ApiKeyLabels, prometheus_client::metrics::gauge::Gauge>,
    /// ApiKeys the controller's indexes handed out (owner limits, policy changes): one
    /// reconcile or event adds what it concerns, never every ApiKey.
    pub index_visits: Counter,
    /// ApiKeys this controller reconciles, when it is a shard (`--watch-label-selector`).
    pub shard_apikeys: prometheus_client::metrics::gauge::Gauge,
    /// Since when (the flip, Unix seconds) each `spec.consumers` workload has been rolling
    /// out to the active key; absent once every pod runs it. Lag: `time() - this`.
    pub consumer_rollout_pending: Family<ConsumerLabels, F64Gauge>,
    consumer_rollout_set: std::sync::Mutex<std::collections::HashMap<(String, String), Vec<ConsumerLabels>>>,
}

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Arc<Self> {
        Self::with_registry(Registry::with_prefix("keyward"))
    }

    /// Register every metric into `registry` (which may already hold a component's own).
    pub fn with_registry(mut registry: Registry) -> Arc<Self> {
        let reconciles = Family::<KindLabels, Counter>::default();
        let reconcile_failures = Family::<FailureLabels, Counter>::default();
        let reconcile_duration =
            Family::<KindLabels, Histogram, fn() -> Histogram>::new_with_constructor(duration_histogram);
        let api_writes = Family::<ResourceLabels, Counter>::default();
        let lifecycle_events = Family::<ReasonLabels, Counter>::default();
        let blocked = Family::<ReasonLabels, Counter>::default();
        let notifications = Family::<NotifyLabels, Counter>::default();
        let leader = prometheus_client::metrics::gauge::Gauge::default();
        let key_expiry = Family::default();
        let key_last_used = Family::default();
        let old_key_in_use = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "key_last_used_timestamp_seconds",
            "Last recorded use of each ApiKey's valid keys, by slot",
            key_last_used.clone(),
        );
        registry.register(
            "apikeys_old_key_in_use",
            "ApiKeys whose older key is still used after consumers moved off it, close to its expiry",
            old_key_in_use.clone(),
        );
        registry.register(
            "key_expiry_timestamp_seconds",
            "Effective expiry of each ApiKey's active and waiting standby key",
            key_expiry.clone(),
        );
        registry.register("leader", "1 while this replica is the leader", leader.clone());
        registry.register(
            "notifications",
            "Expiry warnings raised and webhook deliveries",
            notifications.clone(),
        );
        registry.register("api_writes", "Writes to the Kubernetes API", api_writes.clone());
        registry.register("lifecycle_events", "Key lifecycle happenings by reason", lifecycle_events.clone());
        registry.register(
            "blocked_reconciles",
            "Reconciles stopped on invalid input, by reason",
            blocked.clone(),
        );
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register("reconcile_failures", "Reconciles that failed", reconcile_failures.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            reconcile_duration.clone(),
        );
        let apikey_lists = Counter::default();
        registry.register(
            "apikey_watch_lists",
            "Lists the ApiKey watch completed (one at start; more when the watch could not resume)",
            apikey_lists.clone(),
        );
        // 10 ms to about 4 minutes.
        let step_lateness = Histogram::new(exponential_buckets(0.01, 2.5, 12));
        registry.register(
            "step_lateness_seconds",
            "How late after its nextActionAt a reconcile found an ApiKey's scheduled step due",
            step_lateness.clone(),
        );
        let consumers_not_following = Family::default();
        registry.register(
            "apikey_consumers_not_following",
            "Workloads reading an ApiKey's Secret through a subPath mount, or as env vars outside spec.consumers",
            consumers_not_following.clone(),
        );
        let index_visits = Counter::default();
        registry.register(
            "controller_index_visits",
            "ApiKeys handed out by the controller's indexes (owner, policy)",
            index_visits.clone(),
        );
        let shard_apikeys = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "controller_shard_apikeys",
            "ApiKeys this shard reconciles (its --watch-label-selector's matches)",
            shard_apikeys.clone(),
        );
        let consumer_rollout_pending = Family::default();
        registry.register(
            "consumer_rollout_pending_since_timestamp_seconds",
            "Since when (the flip) each spec.consumers workload has been rolling out to the active key; absent when done",
            consumer_rollout_pending.clone(),
        );
        Arc::new(Metrics {
            consumer_rollout_pending,
            consumer_rollout_set: Default::default(),
            index_visits,
            shard_apikeys,
            consumers_not_following,
            leader,
            key_expiry,
            key_last_used,
            old_key_in_use,
            old_key_in_use_set: Default::default(),
            registry,
            notifications,
            api_writes,
            lifecycle_events,
            blocked,
            reconciles,
            reconcile_failures,
            reconcile_duration,
            step_lateness,
            apikey_lists,
        })
    }

    /// Count one write to `resource`.
    pub fn count_write(&self, resource: &'static str) {
        self.api_writes.get_or_create(&ResourceLabels { resource }).inc();
    }

    /// Count `n` lifecycle happenings of `reason`.
    pub fn count_lifecycle(&self, reason: &'static str, n: u64) {
        self.lifecycle_events.get_or_create(&ReasonLabels { reason }).inc_by(n);
    }

    /// Count a notification outcome.
    pub fn count_notification(&self, kind: &'static str, result: &'static str) {
        self.notifications.get_or_create(&NotifyLabels { kind, result }).inc();
    }

    /// Count a reconcile blocked for `reason`.
    pub fn count_blocked(&self, reason: &'static str) {
        self.blocked.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Whether the ApiKey `namespace/name` has an older key still in use close to its
    /// expiry (the `apikeys_old_key_in_use` gauge counts those that do).
    pub fn set_old_key_in_use(&self, namespace: &str, name: &str, in_use: bool) {
        let mut set = self.old_key_in_use_set.lock().unwrap_or_else(|p| p.into_inner());
        let id = (namespace.to_string(), name.to_string());
        if in_use {
            set.insert(id);
        } else {
            set.remove(&id);
        }
        self.old_key_in_use.set(set.len() as i64);
    }

    /// The ApiKey `namespace/name` is gone: drop its per-key series.
    pub fn forget_apikey(&self, namespace: &str, name: &str) {
        for role in ["active", "standby"] {
            self.key_expiry.remove(&KeyLabels { namespace: namespace.into(), apikey: name.into(), role });
        }
        for slot in ["Primary", "Secondary"] {
            self.key_last_used.remove(&SlotLabels { namespace: namespace.into(), apikey: name.into(), slot });
        }
        self.set_old_key_in_use(namespace, name, false);
        self.set_consumers_not_following(namespace, name, 0);
        self.set_rollouts_pending(namespace, name, vec![]);
    }

    /// The ApiKey's consumers still rolling out, each with since when; every other
    /// consumer's gauge of this ApiKey is dropped.
    pub fn set_rollouts_pending(
        &self,
        namespace: &str,
        name: &str,
        pending: Vec<(&'static str, String, f64)>,
    ) {
        let mut set = self.consumer_rollout_set.lock().unwrap_or_else(|p| p.into_inner());
        let id = (namespace.to_string(), name.to_string());
        let labels: Vec<ConsumerLabels> = pending
            .into_iter()
            .map(|(kind, workload, since)| {
                let l =
                    ConsumerLabels { namespace: namespace.into(), apikey: name.into(), kind, name: workload };
                self.consumer_rollout_pending.get_or_create(&l).set(since);
                l
            })
            .collect();
        for old in set.remove(&id).unwrap_or_default() {
            if !labels.contains(&old) {
                self.consumer_rollout_pending.remove(&old);
            }
        }
        if !labels.is_empty() {
            set.insert(id, labels);
        }
    }

    /// Set (or, at 0, drop) the ApiKey's count of consumers that cannot follow a rotation.
    pub fn set_consumers_not_following(&self, namespace: &str, name: &str, n: usize) {
        let labels = ApiKeyLabels { namespace: namespace.into(), apikey: name.into() };
        if n == 0 {
            self.consumers_not_following.remove(&labels);
        } else {
            self.consumers_not_following.get_or_create(&labels).set(n as i64);
        }
    }

    /// The registry, for components that add their own metrics at start-up.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.reconciles.get_or_create(&KindLabels { kind: "ApiKey" }).inc();
        m.reconcile_failures.get_or_create(&FailureLabels { kind: "ApiKey", reason: "kube" }).inc();
        m.reconcile_duration.get_or_create(&KindLabels { kind: "ApiKey" }).observe(0.004);
        m.step_lateness.observe(0.3);
        let text = m.render();
        assert!(text.contains("keyward_step_lateness_seconds_bucket{le=\"0.390625\"} 1"), "{text}");
        assert!(text.contains("keyward_step_lateness_seconds_bucket{le=\"0.15625\"} 0"), "{text}");
        assert!(text.contains("keyward_reconciles_total{kind=\"ApiKey\"} 1"), "{text}");
        assert!(text.contains("keyward_reconcile_failures_total{kind=\"ApiKey\",reason=\"kube\"} 1"));
        assert!(text.contains("keyward_reconcile_duration_seconds_count{kind=\"ApiKey\"} 1"));
        assert!(text.ends_with("# EOF\n"));
    }
}
