//! What kube's Controller calls for each kind: one reconcile and one error policy per
//! kind, each around the reconciler of its own file. Every reconcile is counted and
//! timed; a failure is counted by reason and retried with a per-object backoff that
//! resets on success.

use std::sync::Arc;
use std::time::Instant;

use kube::ResourceExt;
use kube::runtime::controller::Action;

use super::context::Context;
use super::known::object_id;
use super::{apikey, policy};
use crate::api::{ApiKey, KeyPolicy};
use crate::error::{Error, Result};
use crate::metrics::{FailureLabels, KindLabels};

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

pub(super) async fn reconcile_apikey(key: Arc<ApiKey>, ctx: Arc<Context>) -> Result<Action> {
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

pub(super) async fn reconcile_policy(policy: Arc<KeyPolicy>, ctx: Arc<Context>) -> Result<Action> {
    if !ctx.manage_policies {
        return Ok(Action::await_change());
    }
    let result = timed(&ctx, "KeyPolicy", policy::reconcile(policy.clone(), ctx.clone())).await;
    if result.is_ok() {
        ctx.succeeded(&object_id(policy.as_ref()));
    }
    result
}

pub(super) fn error_policy_apikey(key: Arc<ApiKey>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failures
        .get_or_create(&FailureLabels { kind: "ApiKey", reason: err.metric_label() })
        .inc();
    let delay = ctx.backoff(object_id(key.as_ref()), err);
    tracing::warn!(apikey = %key.name_any(), namespace = ?key.namespace(), error = %crate::error::chain(err), retry_in = ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

pub(super) fn error_policy_policy(policy: Arc<KeyPolicy>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failures
        .get_or_create(&FailureLabels { kind: "KeyPolicy", reason: err.metric_label() })
        .inc();
    let delay = ctx.backoff(object_id(policy.as_ref()), err);
    tracing::warn!(keypolicy = %policy.name_any(), error = %crate::error::chain(err), retry_in = ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}
