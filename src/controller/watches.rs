//! The watches, one function each: what each one feeds (a cache, an index) and which
//! reconciles it asks for. [`super::run`] ties them to the controllers.

use std::sync::Arc;

use futures::channel::mpsc::UnboundedSender;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::reflector::store::Writer;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

use super::context::Context;
use super::known::{Known, object_id};
use super::status::now;
use super::triggers::{PolicyChanges, apikey_trigger, policies_named, triggers, usage_view};
use super::{index, pods};
use crate::api::{ApiKey, KeyPolicy, MANAGED_BY};
use crate::error::{Error, Result};
use crate::runtime::scoped;

/// kubectl's copy of the last applied object (client-side apply): never read, so not
/// cached.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The KeyPolicy watch that feeds the policy cache ([`Context::policies`]) and the
/// ApiKey controller. The cache is updated before the trigger is sent, so a triggered
/// reconcile never reads the policy as it was before the change. A policy's spec change
/// or deletion reaches the ApiKeys that use it (by name, or as default), also a deletion
/// that happened while the watch was down (see `PolicyChanges`).
pub(super) fn policy_changes(
    client: &Client,
    cache: Writer<KeyPolicy>,
) -> impl Stream<Item = std::result::Result<KeyPolicy, watcher::Error>> + Send + use<> {
    let mut changes = PolicyChanges::default();
    watcher(kube::Api::<KeyPolicy>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(cache)
        .flat_map(move |ev| futures::stream::iter(changes.on(ev)))
}

/// One watch on ApiKeys feeds the cache, the ApiKey controller (see `apikey_trigger`),
/// the owner-limit re-check when an ApiKey is deleted (`owner_tx`), and (cluster-wide)
/// keyCount when ApiKeys are created, deleted or move between policies (`count_tx`).
pub(super) fn apikey_events(
    ctx: &Arc<Context>,
    namespace: Option<&str>,
    cache: Writer<ApiKey>,
    owner_tx: UnboundedSender<ObjectRef<ApiKey>>,
    count_tx: UnboundedSender<ObjectRef<KeyPolicy>>,
) -> impl Stream<Item = std::result::Result<ApiKey, watcher::Error>> + Send + use<> {
    let count_keys = ctx.manage_policies;
    let (ctx, policies) = (ctx.clone(), ctx.policies.clone());
    let usage = ctx.usage;
    watcher(scoped::<ApiKey>(&ctx.client, namespace), watcher::Config::default())
        .default_backoff()
        .modify(drop_unread_fields)
        .reflect(cache)
        .filter_map(move |ev| {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => return futures::future::ready(Some(Err(e))),
            };
            let remember =
                |k: &ApiKey| index::Indexed::of(k, apikey_trigger(k, usage_view(&policies, k, usage, now())));
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
                    let created_or_edited = before
                        .as_ref()
                        .is_none_or(|b| b.generation != now.generation || b.incarnation != now.incarnation);
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
}

/// The Secrets keyward owns: a deleted or edited one is repaired; the echo of this
/// controller's own write triggers nothing.
pub(super) fn owned_secrets(
    ctx: &Arc<Context>,
    namespace: Option<&str>,
) -> impl Stream<Item = std::result::Result<Secret, watcher::Error>> + Send + use<> {
    let owned = watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    let echoes = ctx.clone();
    let mut known_secrets = Known::<()>::default();
    watcher(scoped::<Secret>(&ctx.client, namespace), owned).default_backoff().filter_map(move |ev| {
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
    })
}

/// Keep the shard's members ([`super::shard`]): one metadata-only watch with the
/// selector. A member that joins is reconciled at once; one that leaves is forgotten (its
/// retry state and gauges), the shard it joined exports them now.
pub(super) async fn watch_members(
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
pub(super) async fn watch_pods(
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
pub(super) async fn check_selector(client: &Client, namespace: Option<&str>, selector: &str) -> Result<()> {
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
