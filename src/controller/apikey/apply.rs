//! Apply: carry out a [`Plan`], the one place of an ApiKey reconcile's writes, in the
//! order of the [module docs](super) (Secret slot fields, status, `api-key`), then the
//! consumer rollouts, Events, metrics and the pending warnings' deliveries.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::plan::{Plan, Prepared, Write};
use super::{gauges, happenings};
use crate::api::{ApiKey, conditions as c};
use crate::controller::context::Context;
use crate::controller::secret::{self, SECRET_MANAGER};
use crate::controller::status::write_status;
use crate::controller::{consumers, warnings};
use crate::error::{Error, Result};

/// Blocked objects are looked at again this often (e.g. a foreign Secret may go away).
const BLOCKED_RETRY: Duration = Duration::from_secs(300);

/// Carry out `plan`: the three writes in order, rollouts, Events, metrics, warnings.
pub(super) async fn apply(
    ctx: &Arc<Context>,
    api: &Api<ApiKey>,
    key: &ApiKey,
    p: &Prepared,
    plan: Plan,
    now: DateTime<Utc>,
) -> Result<Action> {
    let old = key.status.clone().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &key.namespace().unwrap_or_default());
    let mut current = p.secret.clone();
    let mut stored = None;
    let mut failed = None;
    for write in plan.writes() {
        match write {
            Write::Secret(contents) => {
                let want = secret::desired(key, &p.secret_name, current.as_ref(), contents);
                if secret::differs(current.as_ref(), &want) {
                    match apply_secret(ctx, &secrets, current.as_ref(), want).await {
                        Ok(s) => current = Some(s),
                        // Before status: nothing else may be written. After it: the
                        // warnings it recorded are still delivered (below).
                        Err(e) if stored.is_none() => return Err(e),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
            }
            Write::Status(status) => stored = Some(write_status(ctx, api, key, &old, status.clone()).await?),
        }
    }
    // Where each consumer's rollout stands, when they could all be looked at (a failure,
    // or no active key to roll to, leaves the gauges and warnings as they were).
    let mut rollouts = None;
    if failed.is_none()
        && let Some((key_id, changed)) = &plan.roll
    {
        match consumers::roll(ctx, key, key_id, *changed).await {
            Ok(r) => rollouts = Some(r),
            Err(e) => failed = Some(e),
        }
    }
    let stored = stored.flatten();
    if plan.adopted > 0 {
        tracing::info!(apikey = %key.name_any(), namespace = ?key.namespace(), adopted = plan.adopted, "adopted key material written before an interrupted reconcile");
    }
    // Gauges of this controller's ApiKeys only: one that left this shard meanwhile is the
    // other shard's to export (its gauges were dropped here when it left).
    let exported = ctx.reconciles(key);
    let rollout_check = match &rollouts {
        Some(r) => consumers::follow_rollouts(ctx, key, &plan.status, r, exported, now).await,
        None => None,
    };
    if exported {
        gauges::export(ctx, key, &plan.status, plan.old_key_in_use, &p.consumers);
    }
    happenings::record(ctx, key, &plan.happenings).await;
    for (reason, message) in &plan.news {
        ctx.warn(key, reason, message).await;
    }
    let ns = key.namespace().unwrap_or_default();
    for problem in &plan.consumer_news {
        let related = Some(problem.reference(&ns));
        ctx.event_related(key, EventType::Warning, c::CONSUMER_CANNOT_FOLLOW, &problem.message, related)
            .await;
    }
    for n in &plan.fired {
        ctx.metrics.count_notification(n.kind, "raised");
    }
    if let Some(b) = &p.blocked {
        ctx.metrics.count_blocked(b.reason);
    }
    // Last, the warnings still to be delivered (recorded in the status just written).
    let retry =
        warnings::deliver(ctx, api, stored.as_ref().unwrap_or(key), p.policy.as_ref(), now, plan.step_at)
            .await?;
    if let Some(e) = failed {
        return Err(e);
    }
    let next =
        [plan.step_at, plan.warn_at, plan.handover_at, retry, rollout_check].into_iter().flatten().min();
    Ok(match (next, &p.blocked) {
        (Some(at), Some(_)) => Action::requeue(until(at, now).min(BLOCKED_RETRY)),
        (Some(at), None) => Action::requeue(until(at, now)),
        (None, Some(_)) => Action::requeue(BLOCKED_RETRY),
        (None, None) => Action::await_change(),
    })
}

/// How long until `at` (at least a millisecond, so an overdue step runs at once).
fn until(at: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (at - now).to_std().unwrap_or_default().max(Duration::from_millis(1))
}

/// Create the Secret, or server-side apply it (resourceVersion as a precondition, so a
/// Secret replaced meanwhile is not overwritten). Returns what the server stored.
async fn apply_secret(
    ctx: &Context,
    api: &Api<Secret>,
    current: Option<&Secret>,
    mut want: Secret,
) -> Result<Secret> {
    let name = want.name_any();
    let stored = match current {
        None => {
            let pp = PostParams { field_manager: Some(SECRET_MANAGER.into()), ..Default::default() };
            api.create(&pp, &want).await.map_err(Error::kube(format!("creating Secret {name}")))?
        }
        Some(have) => {
            want.metadata.resource_version = have.resource_version();
            let pp = PatchParams::apply(SECRET_MANAGER).force();
            api.patch(&name, &pp, &Patch::Apply(&want))
                .await
                .map_err(Error::kube(format!("applying Secret {name}")))?
        }
    };
    ctx.own_writes.wrote(&stored);
    ctx.metrics.count_write("secrets");
    Ok(stored)
}
