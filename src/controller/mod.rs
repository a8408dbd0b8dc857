//! The controllers: ApiKeys (watching the Secrets keyward owns, label-filtered so
//! unrelated Secrets cost nothing, and the KeyPolicies they use) and KeyPolicies.
//!
//! One file a job:
//! - [`run`] (here) starts the process as a list of steps; `process` holds the health
//!   server and the leader's lease, `watches` one function per watch (what it feeds and
//!   which reconciles it asks for), `triggers` what in a watch event asks for a
//!   reconcile (pure), `known` how no deletion is missed across a watch gap.
//! - `entry` is what kube's Controller calls (timing, failure metrics, backoff);
//!   [`Context`] (`context`) the state every reconcile shares; `events` the Events.
//! - `apikey` reconciles one ApiKey: dereference → validate → plan (pure) → apply, one
//!   file each; `status` holds the status write it shares with `warnings` (expiry
//!   warnings, delivered at least once); [`secret`] builds its Secret, `consumers` rolls
//!   the env-var consumers and follows their rollouts, [`pods`] finds the consumers that
//!   cannot follow a rotation.
//! - [`policy`] reconciles KeyPolicies and finds the policy of an ApiKey; [`index`]
//!   keeps ApiKeys by owner and policy, [`shard`] the members of a shard.

mod apikey;
mod consumers;
mod context;
mod entry;
mod events;
pub mod index;
mod known;
pub mod pods;
pub mod policy;
mod process;
pub mod secret;
pub mod shard;
mod status;
mod triggers;
mod warnings;
mod watches;

use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc::{UnboundedReceiver, unbounded};
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, Stream, StreamExt};
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher;
use kube::{Api, Client};

pub use context::{Context, OwnWrites};
pub use events::{CLUSTER_EVENTS_NAMESPACE, CONTROLLER_NAME};
pub use secret::SECRET_MANAGER;
pub use status::{STATUS_MANAGER, now};
pub use watches::drop_unread_fields;

use crate::api::{ApiKey, KeyPolicy};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::runtime::health::Readiness;
use crate::runtime::{ensure_crds_in, shutdown_signal};
use process::{HealthServer, Leader};

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

/// Run the controllers until SIGTERM/SIGINT.
pub async fn run(client: Client, server: &str, opts: Options) -> Result<()> {
    ensure_crds_in(&client, server, opts.namespace.as_deref()).await?;
    if let Some(selector) = &opts.shard {
        watches::check_selector(&client, opts.namespace.as_deref(), selector).await?;
    }
    let metrics = Metrics::new();
    let ready = Readiness::default();
    let health = HealthServer::start(&opts.metrics_addr, &metrics, &ready).await?;
    let Some((client, leader)) = Leader::elect(client, opts.leader.clone(), &metrics, &ready).await else {
        health.stop().await;
        return Ok(());
    };
    // SIGTERM/SIGINT: drain the reconciles (the lease is still renewed meanwhile), then
    // release the lease.
    let stop = shutdown_signal().boxed().shared();
    // The caches the reconciles read, each fed by a watch below.
    let (apikeys_cache, apikeys_feed) = reflector::store();
    let (policies_cache, policies_feed) = reflector::store();
    let ctx = Arc::new(context(client, &opts, metrics.clone(), apikeys_cache, policies_cache)?);
    // Fed by the one ApiKey watch: the ApiKeys of a deleted ApiKey's owner (a place is
    // free), and (cluster-wide) the policies whose keyCount an ApiKey changed.
    let (owner_tx, owner_rx) = unbounded::<ObjectRef<ApiKey>>();
    // And by the pod watch: the ApiKeys whose Secret a pod started or stopped reading in
    // a way no rotation reaches.
    let consumer_tx = owner_tx.clone();
    // And by the shard's member watch: the ApiKeys that joined this shard.
    let member_tx = owner_tx.clone();
    let (count_tx, count_rx) = unbounded::<ObjectRef<KeyPolicy>>();
    let apikey_events =
        watches::apikey_events(&ctx, opts.namespace.as_deref(), apikeys_feed, owner_tx, count_tx);
    let apikeys = apikey_controller(&ctx, &opts, apikey_events, owner_rx, policies_feed, stop.clone());
    let keypolicies = policy_controller(&ctx, count_rx, stop);
    let member_watch = ctx
        .shard
        .is_some()
        .then(|| tokio::spawn(watches::watch_members(ctx.clone(), opts.namespace.clone(), member_tx)));
    let pod_watch = opts
        .watch_consumers
        .then(|| tokio::spawn(watches::watch_pods(ctx.clone(), opts.namespace.clone(), consumer_tx)));
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
    leader.step_down(&metrics, &ready).await;
    health.stop().await;
    tracing::info!("controller stopped");
    Ok(())
}

/// The state every reconcile shares, around the caches `apikeys` and `policies`.
fn context(
    client: Client,
    opts: &Options,
    metrics: Arc<Metrics>,
    apikeys: reflector::Store<ApiKey>,
    policies: reflector::Store<KeyPolicy>,
) -> Result<Context> {
    let reporter = Reporter {
        controller: CONTROLLER_NAME.into(),
        instance: std::env::var("POD_NAME").ok().or_else(|| std::env::var("HOSTNAME").ok()),
    };
    Ok(Context {
        recorder: Recorder::new(client.clone(), reporter.clone()),
        reporter,
        client: client.clone(),
        metrics,
        policies,
        apikeys,
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
    })
}

/// The ApiKey controller: an ApiKey is reconciled when it changes (`apikey_events`, see
/// [`watches::apikey_events`]), when its Secret does ([`watches::owned_secrets`]), when
/// its policy does ([`watches::policy_changes`], which feeds the policy cache `policies`),
/// and when another watch asks (`retriggered`).
fn apikey_controller(
    ctx: &Arc<Context>,
    opts: &Options,
    apikey_events: impl Stream<Item = std::result::Result<ApiKey, watcher::Error>> + Send + 'static,
    retriggered: UnboundedReceiver<ObjectRef<ApiKey>>,
    policies: Writer<KeyPolicy>,
    stop: Shared<BoxFuture<'static, ()>>,
) -> impl Future<Output = ()> {
    let keys_for_policy = ctx.clone();
    Controller::for_stream(apikey_events, ctx.apikeys.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(opts.concurrency))
        .owns_stream(watches::owned_secrets(ctx, opts.namespace.as_deref()))
        .reconcile_on(retriggered)
        .watches_stream(watches::policy_changes(&ctx.client, policies), move |p: KeyPolicy| {
            keys_for_policy.keys_using(&p)
        })
        .graceful_shutdown_on(stop)
        .run(entry::reconcile_apikey, entry::error_policy_apikey, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %crate::error::chain(&e), "ApiKey reconcile error");
            }
        })
}

/// The KeyPolicy controller: a KeyPolicy is reconciled when any policy changes, and
/// (`--manage-policies`) when an ApiKey changed its keyCount (`recount`).
fn policy_controller(
    ctx: &Arc<Context>,
    recount: UnboundedReceiver<ObjectRef<KeyPolicy>>,
    stop: Shared<BoxFuture<'static, ()>>,
) -> impl Future<Output = ()> {
    let policies_api = Api::<KeyPolicy>::all(ctx.client.clone());
    let mut policy_ctl = Controller::new(policies_api.clone(), watcher::Config::default());
    if ctx.manage_policies {
        policy_ctl = policy_ctl.reconcile_on(recount);
    }
    // Any policy change can change which policy is the single default: re-check all.
    let all_policies = ctx.policies.clone();
    policy_ctl
        .watches(policies_api, watcher::Config::default(), move |_p: KeyPolicy| {
            all_policies.state().iter().map(|p| ObjectRef::from_obj(p.as_ref())).collect::<Vec<_>>()
        })
        .graceful_shutdown_on(stop)
        .run(entry::reconcile_policy, entry::error_policy_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %crate::error::chain(&e), "KeyPolicy reconcile error");
            }
        })
}
