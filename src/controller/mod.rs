//! The controllers: ApiKeys (watching the Secrets keyward owns, label-filtered so
//! unrelated Secrets cost nothing, and the KeyPolicies they use) and KeyPolicies.

mod apikey;
mod consumers;
pub mod index;
pub mod pods;
pub mod policy;
pub mod secret;
pub mod shard;
mod warnings;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};

use crate::api::{ApiKey, KeyPolicy, MANAGED_BY, ROTATE_ANNOTATION};
use crate::error::{Error, Result};
use crate::metrics::{FailureLabels, KindLabels, Metrics};
use crate::runtime::health::{self, Readiness};
use crate::runtime::{ensure_crds_in, scoped, shutdown_signal};

/// Name of this controller in Events.
pub const CONTROLLER_NAME: &str = "keyward";
/// Field manager of the consumer Secrets.
pub const SECRET_MANAGER: &str = "keyward/secret";
/// Field manager of ApiKey and KeyPolicy status.
pub const STATUS_MANAGER: &str = "keyward/status";
/// Namespace of the Events about KeyPolicies (cluster-scoped).
pub const CLUSTER_EVENTS_NAMESPACE: &str = "kube-system";
/// kubectl's copy of the last applied object (client-side apply): never read, so not
/// cached.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Options of `keyward controller`.
#[derive(Clone, Debug)]
pub struct Options {
    /// Address of the health and metrics server.
    pub metrics_addr: String,
    /// Watch ApiKeys and Secrets in this namespace only. KeyPolicy status (cluster-wide
    /// facts such as `keyCount` and the single default) is then left to a cluster-wide
    /// instance.
    pub namespace: Option<String>,
    /// Leader election (None: this process always writes).
    pub leader: Option<crate::leader::LeaseConfig>,
    /// ApiKeys reconciled at once. Bounded so that a burst (thousands of ApiKeys
    /// applied together, a catch-up) queues here instead of opening a connection per
    /// reconcile to the API server.
    pub concurrency: u16,
    /// The verifier's usage flush interval: a key whose last recorded use is older than
    /// twice this is quiet (handover state, see [`crate::lifecycle::handover`]).
    pub usage_flush_interval: Duration,
    /// Watch pods and warn about consumers that cannot follow a rotation ([`pods`]).
    pub watch_consumers: bool,
    /// Reconcile only the ApiKeys this label selector matches ([`shard`]).
    pub shard: Option<String>,
    /// Write KeyPolicy status (`keyCount`, the single default): one controller per
    /// cluster, cluster-wide.
    pub manage_policies: bool,
}

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
    retries: warnings::Retries,
    /// Permits to wait on warning receivers (see [`warnings::DELIVERING`]).
    delivering: tokio::sync::Semaphore,
    /// Consecutive failures per object, for the retry backoff (reset on success).
    failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    /// The resourceVersion of this controller's last write to each ApiKey status and
    /// Secret (see [`OwnWrites`]).
    pub own_writes: OwnWrites,
    /// How the verifier's usage data is read (handover).
    pub usage: crate::lifecycle::handover::Usage,
    /// ApiKeys by owner and by policy, kept by the ApiKey watch.
    index: std::sync::Mutex<index::KeyIndex>,
    /// What pods do with Secrets, kept by the pod watch (None: not watching pods).
    consumers: Option<std::sync::Mutex<pods::ConsumerIndex>>,
    /// The ApiKeys this controller reconciles, when it is a shard (None: all).
    shard: Option<shard::Shard>,
    /// Consumer rollouts already warned about (ApiKey id | kind | name | key ID).
    rollouts_warned: std::sync::Mutex<std::collections::HashSet<String>>,
    /// KeyPolicies read from the API that the cache had not caught up with (see
    /// [`policy::resolve`]).
    live_policies: std::sync::Mutex<std::collections::HashMap<String, KeyPolicy>>,
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

    fn index(&self) -> std::sync::MutexGuard<'_, index::KeyIndex> {
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
    fn backoff(&self, id: String, err: &Error) -> Duration {
        if matches!(err, Error::Kube { source: kube::Error::Api(s), .. } if s.code == 409) {
            return Duration::from_millis(50);
        }
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(id).or_default();
        *n = n.saturating_add(1);
        (Duration::from_millis(250) * 2u32.saturating_pow((*n - 1).min(7))).min(Duration::from_secs(30))
    }

    fn succeeded(&self, id: &str) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    /// The object `id` (see [`object_id`]) is gone: drop what is kept about it.
    fn forget(&self, id: &str) {
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

fn object_id<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!("{}/{}/{}", K::kind(&()), obj.namespace().unwrap_or_default(), obj.name_any())
}

impl Context {
    /// Publish an Event about `obj`; a failure to publish is logged, never fatal.
    /// Whether it was published.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: &str,
    ) -> bool {
        self.event_related(obj, type_, reason, note, None).await
    }

    /// [`Self::event`] with a `related` object. The recorder folds Events of one object,
    /// reason and related object into a series within minutes (keeping the first note):
    /// Events that must each be seen, such as one per workload, differ in `related`.
    pub async fn event_related<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: &str,
        related: Option<k8s_openapi::api::core::v1::ObjectReference>,
    ) -> bool {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: related,
        };
        let reference = obj.object_ref(&());
        let published = match reference.namespace {
            Some(_) => self.recorder.publish(&event, &reference).await,
            None => self.publish_cluster_scoped(&event, reference).await,
        };
        match published {
            Ok(()) => {
                self.metrics.count_write("events");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, reason, "cannot publish event");
                false
            }
        }
    }

    /// An Event about a cluster-scoped object (a KeyPolicy), in `kube-system`: kube-rs'
    /// Recorder writes those to `default`, which API servers before 1.22 refuse for
    /// events.k8s.io Events ("involvedObject.namespace does not match"); `kube-system`
    /// is accepted by every version.
    async fn publish_cluster_scoped(
        &self,
        ev: &Event,
        reference: k8s_openapi::api::core::v1::ObjectReference,
    ) -> kube::Result<()> {
        use k8s_openapi::api::events::v1::Event as K8sEvent;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
        let now = k8s_openapi::jiff::Timestamp::now();
        let instance = self.reporter.instance.clone().unwrap_or_else(|| self.reporter.controller.clone());
        let event = K8sEvent {
            metadata: kube::api::ObjectMeta {
                name: Some(format!(
                    "{}.{:x}",
                    reference.name.as_deref().unwrap_or(CONTROLLER_NAME),
                    now.as_nanosecond()
                )),
                namespace: Some(CLUSTER_EVENTS_NAMESPACE.into()),
                ..Default::default()
            },
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            note: ev.note.clone(),
            event_time: Some(MicroTime(now)),
            regarding: Some(reference),
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(instance),
            type_: Some(match ev.type_ {
                EventType::Normal => "Normal".into(),
                EventType::Warning => "Warning".into(),
            }),
            ..Default::default()
        };
        Api::<K8sEvent>::namespaced(self.client.clone(), CLUSTER_EVENTS_NAMESPACE)
            .create(&Default::default(), &event)
            .await
            .map(drop)
    }

    /// A Warning Event.
    pub async fn warn<K: Resource<DynamicType = ()>>(&self, obj: &K, reason: &str, note: &str) {
        let _ = self.event(obj, EventType::Warning, reason, note).await;
    }
}

/// The current time, to the millisecond (status timestamps stay readable).
pub fn now() -> DateTime<Utc> {
    let t = Utc::now();
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

/// What of the verifier's `lastUsedAt` writes an ApiKey's reconcile depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UsageView {
    /// Every last use: the policy expires keys for inactivity (a use moves a deadline
    /// the verifier reads back from `effectiveExpiresAt`) or retires drained keys early
    /// (a use decides or cancels a retirement), or the policy is not cached.
    Every,
    /// Only the handover state the last uses give at the moment of the event (a new
    /// key's first use, the old key used after consumers moved, used again after a
    /// quiet spell); a key going quiet is a timer (`Handover`'s next change).
    Handover(&'static str),
}

/// What about an ApiKey should trigger a reconcile: its spec (generation), the rotate
/// annotation, and as much of the verifier's `lastUsedAt` writes as `usage` says. A
/// steady stream of uses therefore costs nothing unless the policy makes each use
/// matter. This controller's own status writes do not trigger: their effects are
/// scheduled by `nextActionAt`.
fn apikey_trigger(key: &ApiKey, usage: UsageView) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.meta().generation.hash(&mut h);
    key.annotations().get(ROTATE_ANNOTATION).hash(&mut h);
    match usage {
        UsageView::Every => {
            for k in key.status.iter().flat_map(|s| &s.keys) {
                k.last_used_at.map(|t| t.timestamp_micros()).hash(&mut h);
            }
        }
        UsageView::Handover(reason) => reason.hash(&mut h),
    }
    h.finish()
}

/// Whether a new version `k` of an ApiKey, remembered as `now` (and as `before` until
/// now), triggers a reconcile: the first sight of it, or a change of what triggers one
/// ([`apikey_trigger`]) that is not this controller's own status write (the echo), whose
/// effects the reconcile that wrote it has scheduled already (`nextActionAt`). Without
/// the echo rule every new ApiKey was reconciled twice: its first status changes the
/// handover state the trigger includes.
/// A new generation or another object under the same name (deleted and created again
/// while the watch was down) always triggers: no write of this controller makes either.
fn triggers(
    before: Option<&index::Indexed>,
    now: &index::Indexed,
    k: &ApiKey,
    own: &OwnWrites,
    live: bool,
) -> bool {
    let echo = if live { own.echo_cached(k) } else { own.is_echo(k) };
    let Some(b) = before else { return true };
    b.generation != now.generation || b.incarnation != now.incarnation || (b.trigger != now.trigger && !echo)
}

/// [`UsageView`] of `key` under its cached policy, at `now`.
fn usage_view(
    policies: &Store<KeyPolicy>,
    key: &ApiKey,
    usage: crate::lifecycle::handover::Usage,
    now: chrono::DateTime<chrono::Utc>,
) -> UsageView {
    let found: Vec<_> = policies_of(policies, key).iter().filter_map(|r| policies.get(r)).collect();
    let every = |p: &KeyPolicy| {
        p.spec.expiry.inactivity_timeout.is_some() || p.spec.rotation.retire_drained_after.is_some()
    };
    if found.len() != 1 || found.iter().any(|p| every(p)) {
        return UsageView::Every;
    }
    let (Some(status), Ok(rules)) =
        (key.status.as_ref(), crate::lifecycle::Rules::from_policy(&found[0], now))
    else {
        return UsageView::Every;
    };
    UsageView::Handover(crate::lifecycle::handover::evaluate(&rules, status, now, usage).reason)
}

/// Which KeyPolicy events change what ApiKeys do: a new generation, a deletion, and (after
/// a re-list) every policy that was known before and is missing now, i.e. deleted while
/// the watch was down. Keeps the last version of each policy (policies are few).
#[derive(Default)]
struct PolicyChanges {
    known: Known<KeyPolicy>,
}

impl PolicyChanges {
    fn on(
        &mut self,
        ev: std::result::Result<watcher::Event<KeyPolicy>, watcher::Error>,
    ) -> Vec<std::result::Result<KeyPolicy, watcher::Error>> {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => return vec![Err(e)],
        };
        let (before, gone) = self.known.on(&ev, KeyPolicy::clone);
        match ev {
            watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                let same = |o: &KeyPolicy| {
                    o.meta().generation == p.meta().generation && o.meta().uid == p.meta().uid
                };
                match before {
                    Some(o) if same(&o) => vec![],
                    // No longer default: the ApiKeys that used it as their default hear it too.
                    Some(o) if o.spec.default && !p.spec.default => vec![Ok(o), Ok(p)],
                    _ => vec![Ok(p)],
                }
            }
            _ => gone.into_iter().map(|(_, p)| Ok(p)).collect(),
        }
    }
}

/// The objects of one watch, by [`object_id`], with what is remembered of each, so that a
/// deletion is never missed: after a re-list (Init … InitDone) every object known before
/// and not listed again was deleted while the watch was down.
struct Known<V> {
    known: std::collections::HashMap<String, V>,
    listed: Option<std::collections::HashSet<String>>,
}

impl<V> Default for Known<V> {
    fn default() -> Self {
        Known { known: Default::default(), listed: None }
    }
}

impl<V> Known<V> {
    /// What is remembered of object `id`.
    fn get(&self, id: &str) -> Option<&V> {
        self.known.get(id)
    }

    /// What is remembered of every object.
    fn values(&self) -> impl Iterator<Item = &V> {
        self.known.values()
    }

    /// Objects remembered.
    fn len(&self) -> usize {
        self.known.len()
    }

    /// Follow one event; `remember` says what to keep of an object. Returns what was kept
    /// of an applied object before this event, and the objects gone (the deleted one, or
    /// after a re-list every one not listed again) with what was kept of them.
    fn on<K: Resource<DynamicType = ()>>(
        &mut self,
        ev: &watcher::Event<K>,
        remember: impl Fn(&K) -> V,
    ) -> (Option<V>, Vec<(String, V)>) {
        match ev {
            watcher::Event::Init => {
                self.listed = Some(Default::default());
                (None, vec![])
            }
            watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                let id = object_id(o);
                if let Some(listed) = self.listed.as_mut() {
                    listed.insert(id.clone());
                }
                (self.known.insert(id, remember(o)), vec![])
            }
            watcher::Event::Delete(o) => {
                let id = object_id(o);
                let gone = self.known.remove(&id).unwrap_or_else(|| remember(o));
                (None, vec![(id, gone)])
            }
            watcher::Event::InitDone => {
                let listed = self.listed.take().unwrap_or_default();
                let gone: Vec<String> =
                    self.known.keys().filter(|id| !listed.contains(*id)).cloned().collect();
                (None, gone.into_iter().filter_map(|id| self.known.remove(&id).map(|v| (id, v))).collect())
            }
        }
    }
}

/// The policy `key` uses: the one it names, else the cached defaults.
fn policies_of(policies: &Store<KeyPolicy>, key: &ApiKey) -> Vec<ObjectRef<KeyPolicy>> {
    policies_named(policies, key.spec.policy.as_deref())
}

/// The policy an ApiKey naming `policy` uses: that one, else the cached defaults.
fn policies_named(policies: &Store<KeyPolicy>, policy: Option<&str>) -> Vec<ObjectRef<KeyPolicy>> {
    match policy {
        Some(name) => vec![ObjectRef::new(name)],
        None => policies
            .state()
            .iter()
            .filter(|p| p.spec.default)
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect(),
    }
}

/// Run the controllers until SIGTERM/SIGINT.
pub async fn run(client: Client, server: &str, opts: Options) -> Result<()> {
    ensure_crds_in(&client, server, opts.namespace.as_deref()).await?;
    if let Some(selector) = &opts.shard {
        check_selector(&client, opts.namespace.as_deref(), selector).await?;
    }
    let metrics = Metrics::new();
    let ready = Readiness::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let server =
        health::serve(&opts.metrics_addr, health::router(metrics.clone(), ready.clone()), stopped()).await?;
    let elector = opts.leader.clone().map(|cfg| Arc::new(crate::leader::Elector::new(client.clone(), cfg)));
    if let Some(e) = &elector {
        // A standby replica is healthy and ready; it just does not write.
        ready.set(true);
        tracing::info!("waiting to become the leader");
        tokio::select! {
            _ = e.acquire() => tracing::info!("became the leader"),
            _ = shutdown_signal() => {
                let _ = stop_tx.send(true);
                let _ = server.await;
                return Ok(());
            }
        }
    }
    metrics.leader.set(1);
    // Everything below writes through a client that refuses writes once the lease's renew
    // deadline has passed, whatever the renewal task is doing.
    let client = match &elector {
        Some(e) => e.gated_client(client),
        None => client,
    };
    // Renew in a task of its own. On loss, exit at once: in-flight reconciles are not
    // drained (they could write beside the next leader).
    let holding = elector.clone().map(|e| {
        let (metrics, ready) = (metrics.clone(), ready.clone());
        tokio::spawn(async move {
            e.hold().await;
            metrics.leader.set(0);
            ready.set(false);
            tracing::error!("lost the leader lease; exiting at once so a restart can rejoin the election");
            eprintln!("keyward: lost the leader lease; exiting at once so a restart can rejoin the election");
            std::process::exit(1);
        })
    });
    // SIGTERM/SIGINT: drain the reconciles (the lease is still renewed meanwhile), then
    // release the lease.
    let stop = shutdown_signal().boxed().shared();

    let (keys_api, secrets_api) = (
        scoped::<ApiKey>(&client, opts.namespace.as_deref()),
        scoped::<Secret>(&client, opts.namespace.as_deref()),
    );
    let policies_api = Api::<KeyPolicy>::all(client.clone());
    let (keys_reader, keys_writer) = reflector::store();
    let mut policy_ctl = Controller::new(policies_api.clone(), watcher::Config::default());
    // The KeyPolicies reconciles read: fed by the same watch that triggers ApiKeys on a
    // policy change, and updated before the trigger is sent, so a triggered reconcile
    // never reads the policy as it was before the change.
    let (policies, policies_writer) = reflector::store();
    // Fed by the one ApiKey watch below: the ApiKeys of a deleted ApiKey's owner (a place
    // is free), and (cluster-wide) the policies whose keyCount an ApiKey changed.
    let (owner_tx, owner_rx) = futures::channel::mpsc::unbounded::<ObjectRef<ApiKey>>();
    // And by the pod watch: the ApiKeys whose Secret a pod started or stopped reading in
    // a way no rotation reaches.
    let consumer_tx = owner_tx.clone();
    // And by the shard's member watch: the ApiKeys that joined this shard.
    let member_tx = owner_tx.clone();
    let (count_tx, count_rx) = futures::channel::mpsc::unbounded::<ObjectRef<KeyPolicy>>();
    let count_keys = opts.manage_policies;
    if count_keys {
        policy_ctl = policy_ctl.reconcile_on(count_rx);
    }

    let reporter = Reporter {
        controller: CONTROLLER_NAME.into(),
        instance: std::env::var("POD_NAME").ok().or_else(|| std::env::var("HOSTNAME").ok()),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter.clone()),
        reporter,
        client: client.clone(),
        metrics: metrics.clone(),
        policies: policies.clone(),
        apikeys: keys_reader.clone(),
        manage_policies: opts.manage_policies,
        failures: Default::default(),
        own_writes: Default::default(),
        retries: Default::default(),
        usage: crate::lifecycle::handover::Usage::for_flush_interval(opts.usage_flush_interval),
        index: Default::default(),
        consumers: opts.watch_consumers.then(Default::default),
        shard: opts.shard.clone().map(shard::Shard::new),
        rollouts_warned: Default::default(),
        live_policies: Default::default(),
        delivering: tokio::sync::Semaphore::new(warnings::DELIVERING),
        webhooks: crate::webhook::Sender::new().map_err(|e| {
            Error::Config(format!("cannot load the system's CA certificates for webhooks: {e}"))
        })?,
    });

    // A policy's spec change or deletion reaches the ApiKeys that use it (by name, or as
    // default), also a deletion that happened while the watch was down (see `PolicyChanges`).
    let policy_changes = {
        let mut changes = PolicyChanges::default();
        watcher(policies_api.clone(), watcher::Config::default())
            .default_backoff()
            .reflect(policies_writer)
            .flat_map(move |ev| futures::stream::iter(changes.on(ev)))
    };
    let keys_for_policy = ctx.clone();
    let owned = watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    // One watch on ApiKeys feeds the cache, the ApiKey controller (see `apikey_trigger`),
    // the owner-limit re-check when an ApiKey is deleted, and (cluster-wide) keyCount
    // when ApiKeys are created, deleted or move between policies.
    let key_stream = {
        let (ctx, policies) = (ctx.clone(), policies.clone());
        let usage = ctx.usage;
        watcher(keys_api.clone(), watcher::Config::default())
            .default_backoff()
            .modify(drop_unread_fields)
            .reflect(keys_writer)
            .filter_map(move |ev| {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => return futures::future::ready(Some(Err(e))),
                };
                let remember = |k: &ApiKey| {
                    index::Indexed::of(k, apikey_trigger(k, usage_view(&policies, k, usage, now())))
                };
                if matches!(ev, watcher::Event::InitDone) {
                    ctx.metrics.apikey_lists.inc();
                }
                let index::Seen { before, now, gone } = ctx.index().on(&ev, remember);
                // A live change, or one that happened while the watch was down (a re-list
                // shows it; the first list after a start triggers every ApiKey anyway).
                let live = matches!(ev, watcher::Event::Apply(_))
                    || (matches!(ev, watcher::Event::InitApply(_)) && before.is_some());
                let count = |policy: Option<&str>| {
                    if count_keys {
                        policies_named(&policies, policy)
                            .into_iter()
                            .for_each(|p| drop(count_tx.unbounded_send(p)));
                    }
                };
                // A live event is in the cache already; a re-list's only at its end.
                let cached = matches!(ev, watcher::Event::Apply(_));
                let out = match ev {
                    watcher::Event::Apply(k) | watcher::Event::InitApply(k) => {
                        let Some(now) = now else { return futures::future::ready(None) };
                        let created_or_edited = before.as_ref().is_none_or(|b| {
                            b.generation != now.generation || b.incarnation != now.incarnation
                        });
                        // A new or edited ApiKey can take another's place under the owner's
                        // limits (older, or same second and name first): re-check the others.
                        if created_or_edited && live {
                            ctx.keys_of_owner(&now.namespace, &now.owner)
                                .into_iter()
                                .filter(|r| *r.name != *now.name)
                                .for_each(|r| drop(owner_tx.unbounded_send(r)));
                        }
                        // keyCount: a new ApiKey, or one that may have moved between policies.
                        if created_or_edited {
                            count(now.policy.as_deref());
                            if let Some(b) = before.as_ref().filter(|b| b.policy != now.policy) {
                                count(b.policy.as_deref());
                            }
                        }
                        triggers(before.as_ref(), &now, &k, &ctx.own_writes, cached).then_some(Ok(k))
                    }
                    _ => None,
                };
                // Deleted (also while the watch was down): a place under the owner's limit
                // is free, keyCount drops, and the per-object state is forgotten.
                for (id, g) in gone {
                    ctx.forget(&id);
                    ctx.metrics.forget_apikey(&g.namespace, &g.name);
                    ctx.keys_of_owner(&g.namespace, &g.owner)
                        .into_iter()
                        .for_each(|r| drop(owner_tx.unbounded_send(r)));
                    count(g.policy.as_deref());
                }
                futures::future::ready(out)
            })
    };
    // The Secrets keyward owns: a deleted or edited one is repaired; the echo of this
    // controller's own write triggers nothing.
    let echoes = ctx.clone();
    let mut known_secrets = Known::<()>::default();
    let owned_secrets = watcher(secrets_api, owned).default_backoff().filter_map(move |ev| {
        if let Ok(ev) = &ev {
            known_secrets.on(ev, |_| ()).1.iter().for_each(|(id, ())| echoes.forget(id));
        }
        futures::future::ready(match ev {
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                (!echoes.own_writes.is_echo(&s)).then_some(Ok(s))
            }
            Ok(watcher::Event::Delete(s)) => Some(Ok(s)),
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
            Err(e) => Some(Err(e)),
        })
    });
    let apikeys = Controller::for_stream(key_stream, keys_reader)
        .with_config(kube::runtime::controller::Config::default().concurrency(opts.concurrency))
        .owns_stream(owned_secrets)
        .reconcile_on(owner_rx)
        .watches_stream(policy_changes, move |p: KeyPolicy| keys_for_policy.keys_using(&p))
        .graceful_shutdown_on(stop.clone())
        .run(reconcile_apikey, error_policy_apikey, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %crate::error::chain(&e), "ApiKey reconcile error");
            }
        });
    // Any policy change can change which policy is the single default: re-check all.
    let all_policies = policies.clone();
    let keypolicies = policy_ctl
        .watches(policies_api, watcher::Config::default(), move |_p: KeyPolicy| {
            all_policies.state().iter().map(|p| ObjectRef::from_obj(p.as_ref())).collect::<Vec<_>>()
        })
        .graceful_shutdown_on(stop.clone())
        .run(reconcile_policy, error_policy_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %crate::error::chain(&e), "KeyPolicy reconcile error");
            }
        });
    let member_watch = ctx
        .shard
        .is_some()
        .then(|| tokio::spawn(watch_members(ctx.clone(), opts.namespace.clone(), member_tx)));
    let pod_watch = opts
        .watch_consumers
        .then(|| tokio::spawn(watch_pods(ctx.clone(), opts.namespace.clone(), consumer_tx)));
    ready.set(true);
    if opts.namespace.is_none() && !opts.manage_policies {
        // Nothing else can tell: one controller in the cluster must run with --manage-policies.
        tracing::info!(
            "KeyPolicy status (keyCount, maxLifetimeSince) is left to a controller with --manage-policies"
        );
    }
    tracing::info!(namespace = ?opts.namespace, shard = ?opts.shard, "controller started");
    futures::join!(apikeys, keypolicies);
    for w in [pod_watch, member_watch].into_iter().flatten() {
        w.abort();
    }
    if let Some(h) = holding {
        h.abort();
        let _ = h.await;
    }
    metrics.leader.set(0);
    ready.set(false);
    if let Some(e) = &elector {
        e.release().await;
    }
    let _ = stop_tx.send(true);
    let _ = server.await;
    tracing::info!("controller stopped");
    Ok(())
}

/// What the ApiKey cache drops from each watched ApiKey. managedFields are half of a
/// cached ApiKey and never read; omitted (not emptied) they are also left alone by the
/// status replace. Nor is kubectl's copy of the last applied object read (as large as
/// the spec). Public for the memory benchmark's kube-runtime-only floor.
pub fn drop_unread_fields(k: &mut ApiKey) {
    k.metadata.managed_fields = None;
    if let Some(a) = k.metadata.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
}

/// A bad `--watch-label-selector` is a start-up error in the API server's words, not a
/// watch that fails forever.
async fn check_selector(client: &Client, namespace: Option<&str>, selector: &str) -> Result<()> {
    match scoped::<ApiKey>(client, namespace)
        .list_metadata(&ListParams::default().labels(selector).limit(1))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 400 => {
            Err(Error::Config(format!("--watch-label-selector {selector:?}: {}", s.message)))
        }
        Err(e) => Err(Error::kube("listing ApiKeys with --watch-label-selector".to_string())(e)),
    }
}

/// Keep the shard's members ([`shard`]): one metadata-only watch with the selector. A
/// member that joins is reconciled at once; one that leaves is forgotten (its retry
/// state and gauges), the shard it joined exports them now.
async fn watch_members(
    ctx: Arc<Context>,
    namespace: Option<String>,
    trigger: futures::channel::mpsc::UnboundedSender<ObjectRef<ApiKey>>,
) {
    use kube::core::PartialObjectMeta;
    let Some(shard) = ctx.shard.as_ref() else { return };
    // Metadata only: the members' names are all this watch needs.
    let api = scoped::<PartialObjectMeta<ApiKey>>(&ctx.client, namespace.as_deref());
    let config = watcher::Config::default().labels(&shard.selector);
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    while let Some(ev) = events.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(error = %e, "shard member watch failed; retrying (joining ApiKeys wait)");
                continue;
            }
        };
        let change = shard.on(&ev);
        for (id, ns, name) in &change.left {
            ctx.forget(id);
            ctx.metrics.forget_apikey(ns, name);
        }
        for r in change.joined {
            let _ = trigger.unbounded_send(r);
        }
        ctx.metrics.shard_apikeys.set(shard.len() as i64);
    }
}

/// Pods per page of the pod watch's lists.
const POD_PAGE: u32 = 50;

/// Follow the pods (of the watched namespace, or all) and keep [`Context::consumers`]:
/// what each pod does with Secrets, never the pods themselves. A change for a Secret
/// triggers the ApiKeys that write it.
async fn watch_pods(
    ctx: Arc<Context>,
    namespace: Option<String>,
    trigger: futures::channel::mpsc::UnboundedSender<ObjectRef<ApiKey>>,
) {
    let api = scoped::<k8s_openapi::api::core::v1::Pod>(&ctx.client, namespace.as_deref());
    let mut known = Known::<()>::default();
    // Pods are large and only what they do with Secrets is kept: list them in small
    // pages, so the first list's peak (which the allocator keeps) stays small; finished
    // pods never read a Secret again.
    let config =
        watcher::Config::default().page_size(POD_PAGE).fields("status.phase!=Succeeded,status.phase!=Failed");
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    while let Some(ev) = events.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(error = %e, "pod watch failed; retrying (consumer warnings may lag)");
                continue;
            }
        };
        let (_, gone) = known.on(&ev, |_| ());
        let Some(index) = ctx.consumers.as_ref() else { return };
        let mut changed = Vec::new();
        let first_sync;
        {
            let mut index = index.lock().unwrap_or_else(|p| p.into_inner());
            if let watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) = &ev {
                let ns = pod.namespace().unwrap_or_default();
                changed.extend(index.apply(&object_id(pod), &ns, pods::findings(pod)));
            }
            for (id, ()) in gone {
                changed.extend(index.remove(&id));
            }
            first_sync = matches!(ev, watcher::Event::InitDone) && !index.synced;
            index.synced |= first_sync;
        }
        // Known at last: every ApiKey says so (problems fixed while the controller was
        // down are cleared, new ones raised). Once per start.
        if first_sync {
            ctx.index().all().into_iter().for_each(|r| drop(trigger.unbounded_send(r)));
        }
        for (ns, secret) in changed {
            ctx.index().using_secret(&ns, &secret).into_iter().for_each(|r| drop(trigger.unbounded_send(r)));
        }
    }
}

async fn timed<F: std::future::Future<Output = Result<Action>>>(
    ctx: &Context,
    kind: &'static str,
    f: F,
) -> Result<Action> {
    let labels = KindLabels { kind };
    ctx.metrics.reconciles.get_or_create(&labels).inc();
    let started = Instant::now();
    let result = f.await;
    ctx.metrics.reconcile_duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    result
}

async fn reconcile_apikey(key: Arc<ApiKey>, ctx: Arc<Context>) -> Result<Action> {
    // Another shard's: it is triggered here too (by a policy, an owner, a Secret), and
    // left alone. Joining this shard triggers it again.
    if !ctx.reconciles(&key) {
        return Ok(Action::await_change());
    }
    let result = timed(&ctx, "ApiKey", apikey::reconcile(key.clone(), ctx.clone())).await;
    match &result {
        Ok(_) => ctx.succeeded(&object_id(key.as_ref())),
        Err(Error::Kube { source: kube::Error::Api(s), .. }) if s.code == 409 => {}
        Err(e) => apikey::report_failure(&ctx, &key, e).await,
    }
    result
}

async fn reconcile_policy(policy: Arc<KeyPolicy>, ctx: Arc<Context>) -> Result<Action> {
    if !ctx.manage_policies {
        return Ok(Action::await_change());
    }
    let result = timed(&ctx, "KeyPolicy", policy::reconcile(policy.clone(), ctx.clone())).await;
    if result.is_ok() {
        ctx.succeeded(&object_id(policy.as_ref()));
    }
    result
}

fn error_policy_apikey(key: Arc<ApiKey>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failures
        .get_or_create(&FailureLabels { kind: "ApiKey", reason: err.metric_label() })
        .inc();
    let delay = ctx.backoff(object_id(key.as_ref()), err);
    tracing::warn!(apikey = %key.name_any(), namespace = ?key.namespace(), error = %crate::error::chain(err), retry_in = ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

fn error_policy_policy(policy: Arc<KeyPolicy>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failures
        .get_or_create(&FailureLabels { kind: "KeyPolicy", reason: err.metric_label() })
        .inc();
    let delay = ctx.backoff(object_id(policy.as_ref()), err);
    tracing::warn!(keypolicy = %policy.name_any(), error = %crate::error::chain(err), retry_in = ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(status: serde_json::Value) -> ApiKey {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": "k", "namespace": "n", "generation": 1},
            "spec": {"owner": "a"},
            "status": status,
        }))
        .unwrap()
    }

    fn active(extra: serde_json::Value) -> serde_json::Value {
        let mut k = serde_json::json!({"slot": "Primary", "keyId": "k1", "hash": "h", "preview": "kw_x",
            "createdAt": "2026-11-23T00:00:00Z", "expiresAt": "2026-11-24T00:00:00Z", "state": "Active"});
        k.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::json!({"keys": [k]})
    }

    #[test]
    fn last_use_triggers_a_reconcile_and_own_status_writes_do_not() {
        let trigger = |extra| apikey_trigger(&key(active(extra)), UsageView::Every);
        let base = trigger(serde_json::json!({}));
        let used = trigger(serde_json::json!({"lastUsedAt": "2026-11-23T01:00:00Z"}));
        let later = trigger(serde_json::json!({"lastUsedAt": "2026-11-23T01:01:00Z"}));
        let own = trigger(serde_json::json!({"effectiveExpiresAt": "2026-11-23T02:00:00Z"}));
        assert_ne!(base, used);
        assert_ne!(used, later);
        assert_eq!(base, own, "the controller's own status writes do not trigger");
    }

    fn policy(name: &str, generation: i64) -> KeyPolicy {
        let mut p = KeyPolicy::new(name, Default::default());
        p.metadata.generation = Some(generation);
        p
    }

    #[test]
    fn policy_deletions_are_seen_also_across_a_watch_gap() {
        let names = |out: Vec<std::result::Result<KeyPolicy, watcher::Error>>| -> Vec<String> {
            out.into_iter().map(|p| p.unwrap().name_any()).collect()
        };
        let mut c = PolicyChanges::default();
        assert!(names(c.on(Ok(watcher::Event::Init))).is_empty());
        assert_eq!(names(c.on(Ok(watcher::Event::InitApply(policy("a", 1))))), ["a"]);
        assert_eq!(names(c.on(Ok(watcher::Event::InitApply(policy("b", 1))))), ["b"]);
        assert!(names(c.on(Ok(watcher::Event::InitDone))).is_empty());
        assert!(names(c.on(Ok(watcher::Event::Apply(policy("a", 1))))).is_empty(), "status-only change");
        assert_eq!(names(c.on(Ok(watcher::Event::Apply(policy("a", 2))))), ["a"], "spec change");
        assert_eq!(names(c.on(Ok(watcher::Event::Delete(policy("a", 2))))), ["a"], "deletion");
        // The watch restarts; b was deleted meanwhile and c created.
        c.on(Ok(watcher::Event::Init));
        assert_eq!(names(c.on(Ok(watcher::Event::InitApply(policy("c", 1))))), ["c"]);
        assert_eq!(names(c.on(Ok(watcher::Event::InitDone))), ["b"], "deleted during the gap");
        assert_eq!(c.known.known.len(), 1, "pruned");
    }

    fn named(ns: &str, name: &str, owner: &str) -> ApiKey {
        let mut k = key(serde_json::json!({}));
        k.metadata.name = Some(name.into());
        k.metadata.namespace = Some(ns.into());
        k.spec.owner = owner.into();
        k
    }

    #[test]
    fn apikey_deletions_during_a_watch_gap_are_seen_and_their_state_pruned() {
        let mut known = index::KeyIndex::default();
        let of = |k: &ApiKey| index::Indexed::of(k, 0);
        let gone = |out: index::Seen| -> Vec<(String, String)> {
            out.gone.into_iter().map(|(id, s)| (id, s.owner.to_string())).collect()
        };
        known.on(&watcher::Event::Init, of);
        for (ns, name) in [("a", "k1"), ("a", "k2"), ("b", "k1")] {
            known.on(&watcher::Event::InitApply(named(ns, name, "team")), of);
        }
        assert!(gone(known.on(&watcher::Event::<ApiKey>::InitDone, of)).is_empty());
        let before = known.on(&watcher::Event::Apply(named("a", "k1", "team")), of).before;
        assert_eq!(
            before.map(|b| b.owner.to_string()).as_deref(),
            Some("team"),
            "what was kept before the update"
        );
        assert_eq!(
            gone(known.on(&watcher::Event::Delete(named("a", "k2", "team")), of)),
            [("ApiKey/a/k2".to_string(), "team".to_string())]
        );
        // The watch restarts: b/k1 was deleted meanwhile, a/k3 created.
        known.on(&watcher::Event::Init, of);
        known.on(&watcher::Event::InitApply(named("a", "k1", "team")), of);
        known.on(&watcher::Event::InitApply(named("a", "k3", "other")), of);
        assert_eq!(
            gone(known.on(&watcher::Event::<ApiKey>::InitDone, of)),
            [("ApiKey/b/k1".to_string(), "team".to_string())],
            "deleted during the gap, with its owner for the limit re-check"
        );
        assert_eq!(known.len(), 2);
        assert!(known.same_owner("b", "team").is_empty(), "the indexes forget it too");
        assert_eq!(known.same_owner("a", "team").len(), 1);
    }

    #[test]
    fn the_echo_of_its_own_status_write_triggers_no_reconcile_another_writer_does() {
        let own = OwnWrites::default();
        let version = |k: &ApiKey, rv: &str| {
            let mut k = k.clone();
            k.metadata.resource_version = Some(rv.into());
            k
        };
        let mut created = named("a", "k1", "team");
        created.metadata.uid = Some("uid-1".into());
        created.metadata.generation = Some(1);
        let created = version(&created, "1");
        let first = index::Indexed::of(&created, 1);
        assert!(triggers(None, &first, &created, &own, true), "first sight");
        // This controller writes the first status (the handover state moves): its echo,
        // in a re-list first (the record stays: the cache has it only at the list's end).
        let written = version(&created, "2");
        own.wrote(&written);
        let after = index::Indexed::of(&written, 2);
        assert!(!triggers(Some(&first), &after, &written, &own, false), "own echo, re-listed");
        assert!(!own.cache_is_current(&created), "the cache may still hold the older version");
        assert!(!triggers(Some(&first), &after, &written, &own, true), "own echo");
        assert!(own.cache_is_current(&written), "the cache holds what was written");
        // The verifier writes lastUsedAt next, moving the handover state again.
        let used = version(&written, "3");
        let later = index::Indexed::of(&used, 3);
        assert!(triggers(Some(&after), &later, &used, &own, true), "another writer's change");
        assert!(!triggers(Some(&later), &later.clone(), &used, &own, true), "nothing that triggers changed");
        // A version this controller wrote that carries a new generation (written on top of
        // a fresh read) or is another object of the same name always triggers.
        let mut edited = version(&used, "4");
        edited.metadata.generation = Some(2);
        own.wrote(&edited);
        assert!(triggers(Some(&later), &index::Indexed::of(&edited, 3), &edited, &own, true));
        let mut again = version(&created, "5");
        again.metadata.uid = Some("uid-2".into());
        own.wrote(&again);
        assert!(triggers(Some(&later), &index::Indexed::of(&again, 3), &again, &own, true));
    }

    #[test]
    fn last_use_triggers_only_a_change_of_the_handover_state_without_a_policy_that_reads_each_use() {
        let policies = {
            let (reader, mut writer) = kube::runtime::reflector::store::<KeyPolicy>();
            let mut p = policy("p", 1);
            p.spec.default = true;
            writer.apply_watcher_event(&watcher::Event::InitApply(p));
            writer.apply_watcher_event(&watcher::Event::InitDone);
            reader
        };
        let usage = crate::lifecycle::handover::Usage::default();
        let two = |primary_used: Option<&str>, secondary_used: Option<&str>| {
            let mut status = active(serde_json::json!({}));
            let mut standby = status["keys"][0].clone();
            standby["slot"] = "Secondary".into();
            standby["keyId"] = "k2".into();
            standby["state"] = "Standby".into();
            standby["createdAt"] = "2026-11-23T12:00:00Z".into();
            if let Some(u) = primary_used {
                status["keys"][0]["lastUsedAt"] = u.into();
            }
            if let Some(u) = secondary_used {
                standby["lastUsedAt"] = u.into();
            }
            status["keys"].as_array_mut().unwrap().push(standby);
            key(status)
        };
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-23T13:00:00Z").unwrap().to_utc();
        let fire = |k: &ApiKey| apikey_trigger(k, usage_view(&policies, k, usage, now));
        let base = fire(&two(Some("2026-11-23T12:59:00Z"), None));
        assert_eq!(base, fire(&two(Some("2026-11-23T12:59:30Z"), None)), "a steady stream of uses: nothing");
        assert_ne!(
            base,
            fire(&two(Some("2026-11-23T12:59:30Z"), Some("2026-11-23T12:59:40Z"))),
            "a first use"
        );
        let mut rotated = two(None, None);
        rotated.annotations_mut().insert(ROTATE_ANNOTATION.into(), "1".into());
        assert_ne!(fire(&two(None, None)), fire(&rotated), "a rotation request still does");
        // A policy that reads each use (inactivity, early retirement): every use.
        let mut every = policy("p", 2);
        every.spec.default = true;
        every.spec.rotation.retire_drained_after = Some("P7D".into());
        let (reader, mut writer) = kube::runtime::reflector::store::<KeyPolicy>();
        writer.apply_watcher_event(&watcher::Event::InitApply(every));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let k = two(Some("2026-11-23T12:59:00Z"), None);
        assert_eq!(usage_view(&reader, &k, usage, now), UsageView::Every);
    }
}
