//! Expiry warnings, delivered at least once. A warning that fires is recorded in
//! `status.notified` together with where it must go (`pending`: its Warning Event and
//! every webhook of the policy), in the same status write that records it; after the
//! reconcile's other writes each pending delivery is attempted, and it leaves `pending`
//! in a later status write only once it succeeded, or was given up on
//! [`DELIVERY_WINDOW`] after the warning fired. A crash, an API error or a receiver that
//! is down for minutes therefore delays a warning, never loses it; a delivery whose
//! success was not recorded is made again (receivers drop repeats by the payload's
//! `id`). Retries back off from 1 s to 30 s per delivery (kept in memory: after a
//! restart they start over), so a receiver that comes back hears within 30 s.

pub(super) mod retries;

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use super::context::Context;
use super::known::object_id;
use super::status::write_status;
use crate::api::{ApiKey, ApiKeyStatus, KeyPolicy, SecretKeyRef, WARNING_EVENT};
use crate::error::Result;
use crate::lifecycle::notify::{self, Notice};
use crate::webhook;

/// Reconciles that may wait on receivers at once (the others retry a second later).
pub const DELIVERING: usize = 4;
/// A delivery still failing this long after its warning fired is given up on (with a
/// Warning Event and the `failed` metric).
pub const DELIVERY_WINDOW: TimeDelta = TimeDelta::hours(24);

/// Record where each warning that fired now must be delivered: its Warning Event and the
/// policy's webhooks.
pub fn address(status: &mut ApiKeyStatus, fired: &[Notice], policy: Option<&KeyPolicy>) {
    let targets: Vec<String> = std::iter::once(WARNING_EVENT.to_string())
        .chain(policy.iter().flat_map(|p| &p.spec.notifications.webhooks).map(|h| h.url.clone()))
        .collect();
    for f in fired {
        for n in status.notified.iter_mut().filter(|n| n.key_id == f.key_id && n.threshold == f.threshold) {
            if n.pending.is_empty() {
                n.pending = targets.clone();
            }
        }
    }
}

/// The note of a warning (its Event reason and webhook `type` is `n.kind`): what it is
/// about, and the handover facts (each key's last use) that say what to do.
fn describe(n: &Notice, policy: Option<&KeyPolicy>) -> String {
    let ts = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, true);
    let used = |t: Option<DateTime<Utc>>| {
        t.map_or("has no recorded use".to_string(), |t| format!("was last used at {}", ts(t)))
    };
    let when = n.expires_at.map(ts).unwrap_or_default();
    let successor = n.successor.as_ref().map(|s| {
        let state = match s.last_used_at {
            Some(t) => format!("is in use (last used at {})", ts(t)),
            None => {
                format!("has not been used yet: load it into the systems that call with key {}", n.key_id)
            }
        };
        format!("the {} key {} {state}", s.slot, s.key_id)
    });
    match n.kind {
        notify::NON_EXPIRING_KEY => {
            let policy = policy.map(|p| p.name_any()).unwrap_or_default();
            format!("{} key {} never expires: KeyPolicy {policy} has expiry disabled", n.slot, n.key_id)
        }
        notify::KEY_STILL_IN_USE => format!(
            "{} key {} {} after consumers moved to {}; it stops verifying at {when} (within {}): someone has not switched",
            n.slot,
            n.key_id,
            used(n.last_used_at),
            successor.unwrap_or_else(|| "its successor".into()),
            n.threshold
        ),
        _ => {
            let standby = match successor {
                Some(s) => s,
                None if n.standby_ready => "a standby key is ready".into(),
                None => "no standby key is ready yet".into(),
            };
            // An end a cap moved earlier says so, with the end it had before.
            let moved = n.moved.map_or(String::new(), |(before, reason)| {
                let before = before.map_or("never".to_string(), |t| format!("at {}", ts(t)));
                format!(", earlier than before ({reason:?}: it was to expire {before})")
            });
            format!(
                "{} key {} expires at {when}{moved} (within {}) and {}; {standby}",
                n.slot,
                n.key_id,
                n.threshold,
                used(n.last_used_at)
            )
        }
    }
}

/// How one delivery ended this time.
enum Outcome {
    Delivered,
    /// Failed; try again later.
    Failed(String),
    /// Cannot be made any more (the policy no longer lists the webhook).
    Dropped(String),
}

/// One pending delivery that is due.
struct Job {
    /// Index in `status.notified`.
    at: usize,
    target: String,
    delivery: String,
    notice: Notice,
    kind: &'static str,
    note: String,
}

/// Attempt every pending delivery of `key` (as stored) that is due, all at once (each
/// bounded by [`webhook::ATTEMPT_TIMEOUT`]), then record in its status those that ended.
/// Nothing is attempted when a lifecycle step is due before they could all time out
/// (`step_at`): a slow receiver never delays a flip or a regeneration. Returns when to
/// try again.
pub async fn deliver(
    ctx: &Arc<Context>,
    api: &Api<ApiKey>,
    key: &ApiKey,
    policy: Option<&KeyPolicy>,
    now: DateTime<Utc>,
    step_at: Option<DateTime<Utc>>,
) -> Result<Option<DateTime<Utc>>> {
    let Some(old) = key.status.as_ref() else { return Ok(None) };
    if old.notified.iter().all(|n| n.pending.is_empty()) {
        return Ok(None);
    }
    let budget = TimeDelta::from_std(webhook::ATTEMPT_TIMEOUT).unwrap_or_default() + TimeDelta::seconds(1);
    if let Some(step) = step_at.filter(|t| *t < now + budget) {
        return Ok(Some(step));
    }
    let object = object_id(key);
    let mut status = old.clone();
    let mut retry: Option<DateTime<Utc>> = None;
    let mut jobs = Vec::new();
    for (i, n) in status.notified.iter_mut().enumerate().filter(|(_, n)| !n.pending.is_empty()) {
        let Some(notice) = notify::notice_for(old, n) else {
            // Its key left status (regenerated): the warning is moot.
            let kind = notify::kind_of(n);
            for _ in n.pending.drain(..) {
                ctx.metrics.count_notification(kind, "dropped");
            }
            continue;
        };
        let (kind, note) = (notice.kind, describe(&notice, policy));
        for target in &n.pending {
            let delivery = format!("{}/{}/{}/{target}", n.key_id, notice.kind, n.threshold);
            match ctx.retries.waiting(&object, &delivery, now) {
                Some(at) => retry = Some(retry.map_or(at, |r| r.min(at))),
                None => jobs.push(Job {
                    at: i,
                    target: target.clone(),
                    delivery,
                    notice: notice.clone(),
                    kind,
                    note: note.clone(),
                }),
            }
        }
    }
    if jobs.is_empty() {
        return Ok(retry);
    }
    // At most DELIVERING reconciles wait on receivers at once: slow or dead receivers
    // must not take every reconcile worker from the other ApiKeys' lifecycle steps.
    let Ok(_permit) = ctx.delivering.try_acquire() else {
        let soon = now + TimeDelta::seconds(1);
        return Ok(Some(retry.map_or(soon, |r| r.min(soon))));
    };
    let bounded = |j| async move {
        tokio::time::timeout(webhook::ATTEMPT_TIMEOUT, attempt(ctx, key, policy, j))
            .await
            .unwrap_or_else(|_| Outcome::Failed(format!("no answer within {:?}", webhook::ATTEMPT_TIMEOUT)))
    };
    let outcomes = futures::future::join_all(jobs.iter().map(bounded)).await;
    let mut done = Vec::new();
    for (job, outcome) in jobs.iter().zip(outcomes) {
        let n = &mut status.notified[job.at];
        let (target, kind) = (job.target.as_str(), job.kind);
        let ended = match outcome {
            Outcome::Delivered => {
                let failed = ctx.retries.done(&object, &job.delivery);
                ctx.metrics.count_notification(kind, "delivered");
                if failed > 0 && target != WARNING_EVENT {
                    let note = format!(
                        "webhook {target} received the {kind} warning for key {} ({}) after {} attempts",
                        n.key_id,
                        n.threshold,
                        failed + 1
                    );
                    ctx.event(key, EventType::Normal, "NotificationDelivered", &note).await;
                }
                true
            }
            Outcome::Dropped(why) => {
                ctx.retries.done(&object, &job.delivery);
                ctx.metrics.count_notification(kind, "dropped");
                tracing::info!(apikey = %key.name_any(), namespace = ?key.namespace(), target, why, "warning delivery dropped");
                true
            }
            Outcome::Failed(e) if now - n.at >= DELIVERY_WINDOW => {
                let failed = ctx.retries.done(&object, &job.delivery) + 1;
                ctx.metrics.count_notification(kind, "failed");
                let note = format!(
                    "gave up delivering the {kind} warning for key {} ({}) to {target} after {failed} attempts in {} h: {e}",
                    n.key_id,
                    n.threshold,
                    DELIVERY_WINDOW.num_hours()
                );
                ctx.warn(key, "NotificationFailed", &note).await;
                true
            }
            Outcome::Failed(e) => {
                let (attempts, at) = ctx.retries.failed(&object, &job.delivery, now);
                ctx.metrics.count_notification(kind, "retried");
                if attempts == 1 {
                    tracing::warn!(apikey = %key.name_any(), namespace = ?key.namespace(), target, error = %e, "warning delivery failed; retrying");
                }
                retry = Some(retry.map_or(at, |r| r.min(at)));
                false
            }
        };
        if ended {
            n.pending.retain(|t| t != target);
            done.push((n.key_id.clone(), n.threshold.clone(), target.to_string()));
        }
    }
    record_ended(ctx, api, key, old, status, &done).await?;
    Ok(retry)
}

/// Write the status without the deliveries that ended. On a write conflict (the verifier
/// wrote `lastUsedAt` meanwhile) the ApiKey is read again and the same targets are taken
/// out of its fresh status, so what was delivered is not delivered again.
async fn record_ended(
    ctx: &Context,
    api: &Api<ApiKey>,
    key: &ApiKey,
    old: &ApiKeyStatus,
    status: ApiKeyStatus,
    done: &[(String, String, String)],
) -> Result<()> {
    let conflict = |e: &crate::error::Error| matches!(e, crate::error::Error::Kube { source: kube::Error::Api(s), .. } if s.code == 409);
    let mut attempt = write_status(ctx, api, key, old, status).await.map(drop);
    for _ in 0..5 {
        match &attempt {
            Err(e) if conflict(e) => {}
            _ => break,
        }
        let fresh = api.get(&key.name_any()).await.map_err(crate::error::Error::kube("reading ApiKey"))?;
        let old = fresh.status.clone().unwrap_or_default();
        let mut status = old.clone();
        for n in status.notified.iter_mut() {
            n.pending
                .retain(|t| !done.iter().any(|(k, th, d)| *k == n.key_id && *th == n.threshold && d == t));
        }
        // Written on top of a version no plan was made from (another writer's change,
        // perhaps a spec edit during a watch gap): not an echo to ignore, and the next
        // reconcile reads the ApiKey fresh.
        attempt = write_status(ctx, api, &fresh, &old, status)
            .await
            .map(|stored| stored.iter().for_each(|s| ctx.own_writes.stale(s)));
    }
    attempt
}

/// One attempt of `job`.
async fn attempt(ctx: &Context, key: &ApiKey, policy: Option<&KeyPolicy>, job: &Job) -> Outcome {
    if job.target == WARNING_EVENT {
        return match ctx.event(key, EventType::Warning, job.kind, &job.note).await {
            true => Outcome::Delivered,
            false => Outcome::Failed("the API server refused the Event".into()),
        };
    }
    // Expiry warnings keep the `<ns>/<apikey>/<keyId>/<threshold>` form; other kinds
    // name themselves before the threshold.
    let kind = match job.notice.kind {
        notify::KEY_STILL_IN_USE => format!("{}/", job.notice.kind),
        _ => String::new(),
    };
    let id = format!(
        "{}/{}/{}/{kind}{}",
        key.namespace().unwrap_or_default(),
        key.name_any(),
        job.notice.key_id,
        job.notice.threshold
    );
    post(ctx, key, policy, &job.target, &job.notice, job.kind, &id).await
}

/// One POST of a warning to the webhook `url` of `policy`.
async fn post(
    ctx: &Context,
    key: &ApiKey,
    policy: Option<&KeyPolicy>,
    url: &str,
    n: &Notice,
    kind: &str,
    id: &str,
) -> Outcome {
    let Some(hook) = policy.iter().flat_map(|p| &p.spec.notifications.webhooks).find(|h| h.url == url) else {
        return Outcome::Dropped("the policy no longer lists this webhook".into());
    };
    let payload = webhook::Payload {
        id: id.to_string(),
        type_: kind.to_string(),
        api_key: webhook::ApiKeyRef { namespace: key.namespace().unwrap_or_default(), name: key.name_any() },
        owner: key.owner().to_string(),
        key_id: n.key_id.clone(),
        slot: n.slot.to_string(),
        expires_at: n.expires_at,
        threshold: n.threshold.clone(),
        standby_ready: n.standby_ready,
        last_used_at: n.last_used_at,
        successor: n.successor.as_ref().map(|s| webhook::SuccessorRef {
            key_id: s.key_id.clone(),
            slot: s.slot.to_string(),
            last_used_at: s.last_used_at,
        }),
        handover: n.handover.clone(),
        reason: n.moved.map(|(_, r)| format!("{r:?}")),
        previous_expires_at: n.moved.and_then(|(t, _)| t),
    };
    let Ok(body) = serde_json::to_vec(&payload) else { return Outcome::Dropped("unserializable".into()) };
    let signing = match signing_key(ctx, hook.secret_ref.as_ref()).await {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(e),
    };
    match ctx.webhooks.post(url, bytes::Bytes::from(body), signing.as_deref()).await {
        Ok(()) => Outcome::Delivered,
        Err(e) => Outcome::Failed(e),
    }
}

/// The HMAC signing key named by a webhook's `secretRef`.
async fn signing_key(
    ctx: &Context,
    r: Option<&SecretKeyRef>,
) -> std::result::Result<Option<Vec<u8>>, String> {
    let Some(r) = r else { return Ok(None) };
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), &r.namespace)
        .get_opt(&r.name)
        .await
        .map_err(|e| format!("cannot read signing key Secret {}/{}: {e}", r.namespace, r.name))?
        .ok_or_else(|| format!("signing key Secret {}/{} does not exist", r.namespace, r.name))?;
    secret
        .data
        .and_then(|d| d.get(&r.key).map(|b| b.0.clone()))
        .map(Some)
        .ok_or_else(|| format!("signing key Secret {}/{} has no key {:?}", r.namespace, r.name, r.key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Notified, Slot};

    #[test]
    fn a_warning_that_fires_is_addressed_to_its_event_and_every_webhook_once() {
        let policy: KeyPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "KeyPolicy", "metadata": {"name": "p"},
            "spec": {"notifications": {"webhooks": [{"url": "http://a/hook"}, {"url": "http://b/hook"}]}}
        }))
        .unwrap();
        let t0 = DateTime::<Utc>::UNIX_EPOCH;
        let entry = |id: &str, pending: Vec<String>| Notified {
            key_id: id.into(),
            threshold: "P7D".into(),
            at: t0,
            pending,
            kind: None,
            expires_at: None,
            reason: None,
            previous_expires_at: None,
        };
        let mut status = ApiKeyStatus {
            notified: vec![entry("k1", vec!["http://a/hook".into()]), entry("k2", vec![])],
            ..Default::default()
        };
        let fired = |id: &str| Notice {
            key_id: id.into(),
            slot: Slot::Primary,
            threshold: "P7D".into(),
            expires_at: None,
            standby_ready: false,
            kind: notify::KEY_EXPIRING_SOON,
            last_used_at: None,
            successor: None,
            handover: None,
            moved: None,
        };
        address(&mut status, &[fired("k2")], Some(&policy));
        assert_eq!(status.notified[1].pending, ["Event", "http://a/hook", "http://b/hook"]);
        // A warning still being delivered keeps what is left of its deliveries.
        address(&mut status, &[fired("k1")], Some(&policy));
        assert_eq!(status.notified[0].pending, ["http://a/hook"]);
    }
}
