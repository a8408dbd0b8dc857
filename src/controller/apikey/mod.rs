//! Reconcile one ApiKey: dereference (the cached ApiKey unless this controller wrote
//! it since, the policy, the Secret) → validate → run the pure lifecycle → apply the
//! Secret → write status → Events.
//!
//! Write order keeps the invariants across crashes:
//! 1. new key material goes into the Secret's slot field (`primary`/`secondary`) first
//!    (a restart adopts it instead of issuing a second key for the same step);
//! 2. then status, with the new hashes (optimistic concurrency on resourceVersion);
//! 3. only then `api-key` moves to the active key, so a key is in `api-key` only after
//!    its hash is in status.
//!
//! An ApiKey's first Secret skips step 1: status first, then the Secret is created
//! whole (nobody can hold a key before it exists; a crash in between costs one unused
//! hash, and the next reconcile issues anew as for a deleted Secret).
//!
//! Nothing is written when nothing changed.
//!
//! One reconcile, top to bottom, in three files: [`reconcile`] reads (here, in
//! `prepare`, with the spec checks of [`validate`] and the
//! [`owner_limits`](mod@owner_limits)), [`plan`](mod@plan) decides without I/O,
//! [`apply`](mod@apply) writes, in the order above. What it tells besides:
//! [`happenings`] (its Event), [`gauges`] (its metrics).

mod apply;
mod gauges;
mod happenings;
mod owner_limits;
mod plan;
mod validate;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use self::apply::apply;
use self::owner_limits::owner_limits;
use self::plan::{Prepared, plan};
use self::validate::{dns_subdomain, spec_problem};
use super::context::Context;
use super::policy::{self, blocked};
use super::status::{now, write_status};
use super::{pods, secret};
use crate::api::{ApiKey, Condition, FALSE, conditions as c, find_condition, set_condition};
use crate::error::{Error, Result};
use crate::lifecycle;

/// Reconcile one ApiKey.
pub async fn reconcile(obj: Arc<ApiKey>, ctx: Arc<Context>) -> Result<Action> {
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let api: Api<ApiKey> = Api::namespaced(ctx.client.clone(), &ns);
    // Which version to plan from. A shard: a fresh read, and only while the ApiKey still
    // matches the shard's selector (one list by selector and name), as its cache may lag
    // another shard's writes and its member watch a label change, and a plan made from
    // either could write an older key back into the Secret (see `shard`). Otherwise the
    // cached object, unless this controller wrote a newer version than the cache holds
    // (or lost a write conflict): then a fresh read.
    let key = if let Some(selector) = ctx.shard_selector() {
        let lp = ListParams::default().labels(selector).fields(&format!("metadata.name={name}"));
        let listed = api.list(&lp).await.map_err(Error::kube(format!("reading ApiKey {ns}/{name}")))?;
        let Some(mut fresh) = listed.items.into_iter().next() else { return Ok(Action::await_change()) };
        fresh.metadata.managed_fields = None;
        fresh
    } else if ctx.own_writes.cache_is_current(obj.as_ref()) {
        obj.as_ref().clone()
    } else {
        let fresh = api.get_opt(&name).await.map_err(Error::kube(format!("reading ApiKey {ns}/{name}")))?;
        let Some(fresh) = fresh else { return Ok(Action::await_change()) };
        fresh
    };
    if key.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let now = now();
    if let Some(due) = key.status.as_ref().and_then(|s| s.next_action_at)
        && due <= now
    {
        ctx.metrics.step_lateness.observe((now - due).num_milliseconds() as f64 / 1e3);
    }
    let prepared = prepare(&ctx, &key, now).await?;
    run(&ctx, &api, &key, prepared, now).await
}

/// Dereference and validate. Whatever the user has to fix becomes `blocked` (the first
/// of: spec, policy, owner limits, Secret conflict), never a reason to skip the keys'
/// safety steps.
async fn prepare(ctx: &Context, key: &ApiKey, now: DateTime<Utc>) -> Result<Prepared> {
    let mut block = spec_problem(&key.spec);
    let policy_name_ok = key.spec.policy.as_deref().is_none_or(dns_subdomain);
    let resolved = if policy_name_ok { policy::resolve(ctx, key, now).await? } else { Default::default() };
    let policy_allowed =
        resolved.blocked.as_ref().is_none_or(|b| b.reason != crate::api::conditions::POLICY_NOT_ALLOWED);
    block = block.or(resolved.blocked);
    // Owner limits apply whatever else is wrong: another problem (an invalid field) must
    // not keep keys alive that lost their place.
    let mut retire = false;
    if let Some(found) = &resolved.policy {
        let limited;
        (limited, retire) = owner_limits(ctx, key, found).await?;
        block = block.or(limited);
    }
    let rules = resolved.rules.unwrap_or_else(lifecycle::Rules::frozen);
    let lifetime = match rules.lifetime(key.spec.lifetime.as_deref(), now) {
        Ok(l) => l,
        Err((reason, message)) => {
            block = block.or(Some(blocked(reason, message)));
            lifecycle::Lifetime { duration: rules.max_lifetime, clamped: None }
        }
    };
    let secret_name = key.spec.secret_name.clone().unwrap_or_else(|| key.name_any());
    let ns = key.namespace().unwrap_or_default();
    let mut secret = None;
    let mut foreign_secret = false;
    if dns_subdomain(&secret_name) {
        secret = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&secret_name)
            .await
            .map_err(Error::kube(format!("reading Secret {ns}/{secret_name}")))?;
        if secret.as_ref().is_some_and(|s| !secret::owned_by(s, key)) {
            secret = None;
            foreign_secret = true;
            block = block.or(Some(blocked(
                c::SECRET_CONFLICT,
                format!(
                    "Secret {secret_name:?} exists and is not owned by this ApiKey; keyward leaves it untouched (choose another spec.secretName)"
                ),
            )));
        }
    }
    // A foreign Secret is not this ApiKey's key: its readers are none of its business.
    let consumers =
        if foreign_secret { pods::Consumers::NotWatched } else { ctx.consumer_problems(key, &secret_name) };
    Ok(Prepared {
        policy: resolved.policy,
        policy_allowed,
        rules,
        lifetime,
        secret_name,
        secret,
        foreign_secret,
        blocked: block,
        retire,
        usage: ctx.usage,
        consumers,
    })
}

/// A reconcile failed (API error, missing permission): say so on the ApiKey as
/// `Synced=False ApplyFailed` and a Warning Event, when that news is new. `Ready` is
/// left alone: it says whether consumers hold a valid key, which a failed write does
/// not change. Best effort: if even that write fails, the log and the failure metric
/// carry it.
pub async fn report_failure(ctx: &Context, key: &ApiKey, err: &Error) {
    let ns = key.namespace().unwrap_or_default();
    let api: Api<ApiKey> = Api::namespaced(ctx.client.clone(), &ns);
    let Ok(Some(fresh)) = api.get_opt(&key.name_any()).await else { return };
    let message: String = crate::error::chain(err).chars().take(512).collect();
    let news = fresh
        .status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, c::SYNCED))
        .is_none_or(|r| r.reason != c::APPLY_FAILED || r.message != message);
    if !news {
        return;
    }
    let old = fresh.status.clone().unwrap_or_default();
    let mut status = old.clone();
    set_condition(
        &mut status.conditions,
        Condition::new(c::SYNCED, FALSE, c::APPLY_FAILED, message.clone(), fresh.meta().generation, now()),
    );
    if let Err(e) = write_status(ctx, &api, &fresh, &old, status).await {
        tracing::warn!(error = %crate::error::chain(&e), "cannot record the failure on the ApiKey");
    }
    ctx.warn(&fresh, c::APPLY_FAILED, &message).await;
}

async fn run(
    ctx: &Arc<Context>,
    api: &Api<ApiKey>,
    key: &ApiKey,
    p: Prepared,
    now: DateTime<Utc>,
) -> Result<Action> {
    let plan = plan(key, &p, now);
    apply(ctx, api, key, &p, plan, now).await
}
