//! The state every reconcile shares ([`Context`]), and what the controller keeps per
//! object: its own writes ([`OwnWrites`]), the retry backoff, the rollout warnings sent.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};

use super::known::object_id;
use super::warnings::retries::Retries;
use super::{index, pods, shard};
use crate::api::{ApiKey, KeyPolicy};
use crate::error::Error;
use crate::metrics::Metrics;

/// Shared state of every reconcile.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Event recorder (events.k8s.io).
    pub recorder: Recorder,
    /// Who publishes the Events (also those about cluster-scoped objects).
    pub reporter: Reporter,
    /// Process metrics.
    pub metrics: Arc<Metrics>,
    /// Cache of KeyPolicies.
    pub policies: Store<KeyPolicy>,
    /// Cache of ApiKeys.
    pub apikeys: Store<ApiKey>,
    /// Whether this instance writes KeyPolicy status (cluster-wide instances only).
    pub manage_policies: bool,
    /// Webhook sender for expiry warnings.
    pub webhooks: crate::webhook::Sender,
    /// Failed attempts of the expiry-warning deliveries still pending.
    pub(super) retries: Retries,
    /// Permits to wait on warning receivers (see [`super::warnings::DELIVERING`]).
    pub(super) delivering: tokio::sync::Semaphore,
    /// Consecutive failures per object, for the retry backoff (reset on success).
    pub(super) failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    /// The resourceVersion of this controller's last write to each ApiKey status and
    /// Secret (see [`OwnWrites`]).
    pub own_writes: OwnWrites,
    /// How the verifier's usage data is read (handover).
    pub usage: crate::lifecycle::handover::Usage,
    /// ApiKeys by owner and by policy, kept by the ApiKey watch.
    pub(super) index: std::sync::Mutex<index::KeyIndex>,
    /// What pods do with Secrets, kept by the pod watch (None: not watching pods).
    pub(super) consumers: Option<std::sync::Mutex<pods::ConsumerIndex>>,
    /// The ApiKeys this controller reconciles, when it is a shard (None: all).
    pub(super) shard: Option<shard::Shard>,
    /// Consumer rollouts already warned about (ApiKey id | kind | name | key ID).
    pub(super) rollouts_warned: std::sync::Mutex<std::collections::HashSet<String>>,
    /// KeyPolicies read from the API that the cache had not caught up with (see
    /// [`super::policy::resolve`]).
    pub(super) live_policies: std::sync::Mutex<std::collections::HashMap<String, KeyPolicy>>,
}

impl Context {
    /// The shard's label selector (None: not a shard).
    pub fn shard_selector(&self) -> Option<&str> {
        self.shard.as_ref().map(|s| s.selector.as_str())
    }

    /// Whether this controller reconciles `key` (a shard reconciles its members only).
    pub fn reconciles(&self, key: &ApiKey) -> bool {
        self.shard.as_ref().is_none_or(|s| s.owns(key))
    }

    pub(super) fn index(&self) -> std::sync::MutexGuard<'_, index::KeyIndex> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ApiKeys of `owner` in `namespace`.
    pub fn keys_of_owner(&self, namespace: &str, owner: &str) -> Vec<ObjectRef<ApiKey>> {
        let refs = self.index().same_owner(namespace, owner);
        self.metrics.index_visits.inc_by(refs.len() as u64);
        refs
    }

    /// The ApiKeys that use `policy`: those naming it, and when it is a default those
    /// naming none.
    pub fn keys_using(&self, policy: &KeyPolicy) -> Vec<ObjectRef<ApiKey>> {
        let index = self.index();
        let mut refs = index.naming(Some(&policy.name_any()));
        if policy.spec.default {
            refs.extend(index.naming(None));
        }
        self.metrics.index_visits.inc_by(refs.len() as u64);
        refs
    }

    /// What cannot follow a rotation of `key`'s Secret `secret`.
    pub fn consumer_problems(&self, key: &ApiKey, secret: &str) -> pods::Consumers {
        let Some(index) = self.consumers.as_ref() else { return pods::Consumers::NotWatched };
        let index = index.lock().unwrap_or_else(|p| p.into_inner());
        if !index.synced {
            return pods::Consumers::NotKnown;
        }
        pods::Consumers::Known(index.problems(
            &key.namespace().unwrap_or_default(),
            secret,
            &key.spec.consumers,
        ))
    }

    /// How many ApiKeys name `policy`, with (`and_unnamed`) those naming none.
    pub fn count_using(&self, policy: &str, and_unnamed: bool) -> usize {
        let index = self.index();
        index.count_naming(Some(policy)) + if and_unnamed { index.count_naming(None) } else { 0 }
    }
}

/// The resourceVersion this controller last wrote, per object. Its own writes then cost
/// no extra reads: a Secret watch event carrying that version is its own echo and
/// triggers nothing; a cached ApiKey carrying it is current, so the reconcile need not
/// read it again. A conflict forgets the version, forcing a fresh read next time.
#[derive(Default)]
pub struct OwnWrites(std::sync::Mutex<std::collections::HashMap<String, Option<String>>>);

impl OwnWrites {
    /// `obj` as stored by this controller's write.
    pub fn wrote<K: Resource<DynamicType = ()>>(&self, obj: &K) {
        self.lock().insert(object_id(obj), obj.resource_version());
    }

    /// Whether `obj` is exactly what this controller last wrote.
    pub fn is_echo<K: Resource<DynamicType = ()>>(&self, obj: &K) -> bool {
        let rv = obj.resource_version();
        rv.is_some() && self.lock().get(&object_id(obj)).is_some_and(|w| *w == rv)
    }

    /// [`Self::is_echo`] for a cached object whose echo the cache holds from now on (a
    /// live watch event, reflected before it is seen here): the record is then no longer
    /// needed and is dropped, so that settled ApiKeys cost none. Not for a re-list, whose
    /// objects reach the cache only when it ends.
    pub fn echo_cached<K: Resource<DynamicType = ()>>(&self, obj: &K) -> bool {
        let echo = self.is_echo(obj);
        if echo {
            self.lock().remove(&object_id(obj));
        }
        echo
    }

    /// Whether a cached `obj` is safe to act on: this controller has not written the
    /// object since that version (or ever, in this process's life).
    pub fn cache_is_current<K: Resource<DynamicType = ()>>(&self, obj: &K) -> bool {
        self.lock().get(&object_id(obj)).is_none_or(|w| *w == obj.resource_version())
    }

    /// Someone else wrote `obj` meanwhile (a conflict): read it fresh next time.
    pub fn stale<K: Resource<DynamicType = ()>>(&self, obj: &K) {
        self.lock().insert(object_id(obj), None);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Option<String>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Context {
    /// How long to wait before retrying `id` after `err`: 50 ms after a write conflict,
    /// else 250 ms doubling per consecutive failure up to 30 s.
    pub(super) fn backoff(&self, id: String, err: &Error) -> Duration {
        if matches!(err, Error::Kube { source: kube::Error::Api(s), .. } if s.code == 409) {
            return Duration::from_millis(50);
        }
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(id).or_default();
        *n = n.saturating_add(1);
        (Duration::from_millis(250) * 2u32.saturating_pow((*n - 1).min(7))).min(Duration::from_secs(30))
    }

    pub(super) fn succeeded(&self, id: &str) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    /// The object `id` (see [`object_id`]) is gone: drop what is kept about it.
    pub(super) fn forget(&self, id: &str) {
        self.succeeded(id);
        self.own_writes.lock().remove(id);
        self.retries.forget(id);
        let prefix = format!("{id}|");
        self.rollouts_warned.lock().unwrap_or_else(|p| p.into_inner()).retain(|w| !w.starts_with(&prefix));
    }

    /// Whether the rollout warning `id` (`ApiKey id|kind|name|key ID`) was sent; those of
    /// the same ApiKey about keys other than `active` are forgotten (a flip moved on).
    pub fn rollout_warned(&self, id: &str, active: &str) -> bool {
        let mut warned = self.rollouts_warned.lock().unwrap_or_else(|p| p.into_inner());
        let apikey = id.split('|').next().unwrap_or_default();
        warned.retain(|w| !w.starts_with(&format!("{apikey}|")) || w.ends_with(&format!("|{active}")));
        warned.contains(id)
    }

    /// The rollout warning `id` was published.
    pub fn rollout_warning_sent(&self, id: String) {
        self.rollouts_warned.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
    }
}
