//! Env-var consumers: each workload in `spec.consumers[]` carries the active key's ID
//! in its pod template annotation `keyward.dev/key-id`, applied with its own field
//! manager only when it differs, so every flip rolls each workload out exactly once.
//! Their rollouts are then followed ([`follow_rollouts`]): a gauge while pending, a
//! Warning when old pods would outlive the key they hold.

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::EventType;
use serde_json::json;

use super::context::Context;
use super::known::object_id;
use crate::api::{ApiKey, ApiKeyStatus, ConsumerKind, KEY_ID_ANNOTATION, conditions as c};
use crate::error::{Error, Result};
use crate::lifecycle;

/// How often a rollout still in progress is looked at again while the key its old pods
/// hold is valid (the metric, and the Warning before that key ends).
pub const ROLLOUT_POLL: std::time::Duration = std::time::Duration::from_secs(15);

/// Field manager of the consumer annotation.
pub const CONSUMER_MANAGER: &str = "keyward/consumers";

fn resource(kind: ConsumerKind) -> ApiResource {
    match kind {
        ConsumerKind::Deployment => ApiResource::erase::<Deployment>(&()),
        ConsumerKind::StatefulSet => ApiResource::erase::<StatefulSet>(&()),
        ConsumerKind::DaemonSet => ApiResource::erase::<DaemonSet>(&()),
    }
}

/// Where one consumer's rollout to the active key stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rollout {
    /// The workload's kind.
    pub kind: ConsumerKind,
    /// Its name.
    pub name: String,
    /// Why pods on an older pod template remain (they hold the key of their start).
    pub old_pods: Option<String>,
    /// Why not every pod on the current template is available yet.
    pub unavailable: Option<String>,
    /// When keyward last changed the template's key ID (its field manager's entry in
    /// `managedFields`): None when it never did (the annotation came from elsewhere).
    pub patched_at: Option<DateTime<Utc>>,
}

impl Rollout {
    /// Why it has not finished (None: every pod runs the current template, available).
    pub fn pending(&self) -> Option<&str> {
        self.old_pods.as_deref().or(self.unavailable.as_deref())
    }
}

fn count(v: &serde_json::Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

/// Where a workload's pods stand against its current pod template, as `kubectl rollout
/// status` judges it: (why pods on an older template remain, why not every current pod
/// is available); (None, None): done. A rollout that cannot finish by itself (a paused
/// Deployment, `updateStrategy: OnDelete`) says so.
pub fn progress(kind: ConsumerKind, obj: &serde_json::Value) -> (Option<String>, Option<String>) {
    let (spec, status) = (&obj["spec"], &obj["status"]);
    let generation = count(&obj["metadata"]["generation"]);
    let want = spec["replicas"].as_i64().unwrap_or(1);
    let of =
        |done: i64, want: i64, what: &str| (done < want).then(|| format!("{done} of {want} pods {what}"));
    let unseen = count(&status["observedGeneration"]) < generation;
    let not_seen = "its controller has not seen the new template yet";
    // StatefulSets and DaemonSets: an update that waits for pods deleted by hand, or one
    // their controller has not seen yet (`behind`: pods not on the current template).
    let waiting = |behind: bool| {
        if spec["updateStrategy"]["type"] == "OnDelete" && (unseen || behind) {
            Some("updateStrategy OnDelete: it waits for its pods to be deleted by hand".to_string())
        } else {
            unseen.then(|| not_seen.to_string())
        }
    };
    match kind {
        ConsumerKind::Deployment => {
            let paused = spec["paused"] == true;
            let updated = if unseen { 0 } else { count(&status["updatedReplicas"]) };
            // Pods shutting down still call with their key (`terminatingReplicas`, 1.33+).
            let old = count(&status["replicas"]) - updated + count(&status["terminatingReplicas"]);
            let old_pods = if unseen && !paused {
                Some(not_seen.to_string())
            } else {
                of(updated, want, "updated")
                    .or_else(|| (old > 0).then(|| format!("{old} old pods still running")))
                    .map(|m| if paused { format!("the Deployment is paused; {m}") } else { m })
            };
            (old_pods, of(count(&status["availableReplicas"]), updated, "available"))
        }
        ConsumerKind::StatefulSet => {
            let revisions = status["currentRevision"] != status["updateRevision"];
            let old_pods = waiting(revisions).or_else(|| {
                of(count(&status["updatedReplicas"]), want, "updated")
                    .or_else(|| revisions.then(|| "the update is not complete".to_string()))
            });
            (old_pods, of(count(&status["readyReplicas"]), want, "ready"))
        }
        ConsumerKind::DaemonSet => {
            let desired = count(&status["desiredNumberScheduled"]);
            let behind = count(&status["updatedNumberScheduled"]) < desired;
            let old_pods =
                waiting(behind).or_else(|| of(count(&status["updatedNumberScheduled"]), desired, "updated"));
            (old_pods, of(count(&status["numberAvailable"]), desired, "available"))
        }
    }
}

/// The workload as an Event's related object.
pub fn reference(
    kind: ConsumerKind,
    name: &str,
    namespace: &str,
) -> k8s_openapi::api::core::v1::ObjectReference {
    let ar = resource(kind);
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(ar.api_version),
        kind: Some(ar.kind),
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        ..Default::default()
    }
}

/// When keyward's consumer field manager last wrote the object.
fn patched_at(obj: &DynamicObject) -> Option<DateTime<Utc>> {
    let entries = obj.metadata.managed_fields.iter().flatten();
    let ours = entries.filter(|m| m.manager.as_deref() == Some(CONSUMER_MANAGER));
    ours.filter_map(|m| m.time.as_ref()).filter_map(|t| DateTime::from_timestamp(t.0.as_second(), 0)).max()
}

fn rollout(kind: ConsumerKind, name: &str, obj: &DynamicObject) -> Rollout {
    let (old_pods, unavailable) = progress(kind, &serde_json::to_value(obj).unwrap_or_default());
    Rollout { kind, name: name.to_string(), old_pods, unavailable, patched_at: patched_at(obj) }
}

/// Make every consumer's pod template carry `key_id`, and say where each rollout stands.
/// A missing workload is reported (when `report_missing`) as a Warning, not an error. A
/// workload already carrying `key_id` is left alone (a rollout in progress is never
/// restarted or stacked).
pub async fn roll(ctx: &Context, key: &ApiKey, key_id: &str, report_missing: bool) -> Result<Vec<Rollout>> {
    let ns = key.namespace().unwrap_or_default();
    let mut rollouts = Vec::new();
    for consumer in &key.spec.consumers {
        let ar = resource(consumer.kind);
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &ar);
        let what = format!("{:?} {}/{}", consumer.kind, ns, consumer.name);
        let Some(obj) = api.get_opt(&consumer.name).await.map_err(Error::kube(format!("reading {what}")))?
        else {
            if report_missing {
                ctx.warn(key, "ConsumerNotFound", &format!("{what} does not exist; it was not rolled out"))
                    .await;
            }
            continue;
        };
        let current = obj.data["spec"]["template"]["metadata"]["annotations"][KEY_ID_ANNOTATION].as_str();
        if current == Some(key_id) {
            rollouts.push(rollout(consumer.kind, &consumer.name, &obj));
            continue;
        }
        let patch = json!({
            "apiVersion": ar.api_version, "kind": ar.kind,
            "metadata": {"name": consumer.name},
            "spec": {"template": {"metadata": {"annotations": {KEY_ID_ANNOTATION: key_id}}}}
        });
        let patched = api
            .patch(&consumer.name, &PatchParams::apply(CONSUMER_MANAGER).force(), &Patch::Apply(&patch))
            .await
            .map_err(Error::kube(format!("rolling out {what}")))?;
        ctx.metrics.count_write("consumers");
        tracing::info!(apikey = %key.name_any(), consumer = %what, key_id, "rolled out consumer");
        rollouts.push(rollout(consumer.kind, &consumer.name, &patched));
    }
    Ok(rollouts)
}

/// Env consumers still rolling out to the active key: the gauge (since keyward changed
/// their template, else the flip), and a Warning, once per workload and key, when pods on
/// an older template remain while the key they hold has a quarter of its drain left. Only
/// for a rollout keyward started at the flip: a workload keyward changed later (listed
/// mid-life) has pods that may have started with either key. When to look again: every
/// [`ROLLOUT_POLL`] (and at the warning's moment) while old pods remain and that
/// key drains, else every minute while anything is pending, so the gauge goes when done.
pub async fn follow_rollouts(
    ctx: &Context,
    key: &ApiKey,
    status: &ApiKeyStatus,
    rollouts: &[Rollout],
    exported: bool,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let ns = key.namespace().unwrap_or_default();
    let active = status.active_slot.and_then(|s| status.keys.iter().find(|k| k.slot == s))?;
    let flipped = active.activated_at.unwrap_or(now);
    let since = |r: &Rollout| r.patched_at.map_or(flipped, |t| t.max(flipped));
    let pending: Vec<&Rollout> = rollouts.iter().filter(|r| r.pending().is_some()).collect();
    if exported {
        let gauges = pending
            .iter()
            .map(|r| (r.kind.as_str(), r.name.clone(), since(r).timestamp_millis() as f64 / 1000.0));
        ctx.metrics.set_rollouts_pending(&ns, &key.name_any(), gauges.collect());
    }
    if pending.is_empty() {
        return None;
    }
    let slow = now + chrono::TimeDelta::seconds(60);
    let draining = status
        .keys
        .iter()
        .find(|k| k.slot == active.slot.other() && lifecycle::is_valid(k) && k.activated_at.is_some())
        .and_then(|l| l.effective_expires_at.map(|e| (l, e)));
    let old: Vec<&&Rollout> = pending.iter().filter(|r| r.old_pods.is_some()).collect();
    let Some((left, end)) = draining.filter(|_| !old.is_empty()) else { return Some(slow) };
    let warn_at = end - (end - flipped) / 4;
    if now >= warn_at {
        // Started at the flip: keyward's change came with it (its time is to the second).
        let at_flip =
            |r: &Rollout| r.patched_at.is_some_and(|t| t <= flipped + chrono::TimeDelta::seconds(60));
        for r in old.iter().filter(|r| at_flip(r)) {
            let id = format!("{}|{:?}|{}|{}", object_id(key), r.kind, r.name, active.key_id);
            if ctx.rollout_warned(&id, &active.key_id) {
                continue;
            }
            let message = format!(
                "{} {ns}/{} has not finished rolling out to key {} ({}); its pods still on the old template \
                 hold key {}, which stops verifying at {}",
                r.kind.as_str(),
                r.name,
                active.key_id,
                r.old_pods.as_deref().unwrap_or_default(),
                left.key_id,
                end.to_rfc3339_opts(SecondsFormat::Secs, true),
            );
            let related = reference(r.kind, &r.name, &ns);
            if ctx
                .event_related(
                    key,
                    EventType::Warning,
                    c::CONSUMER_ROLLOUT_INCOMPLETE,
                    &message,
                    Some(related),
                )
                .await
            {
                ctx.rollout_warning_sent(id);
            }
        }
    }
    let poll = now + chrono::TimeDelta::from_std(ROLLOUT_POLL).unwrap_or_default();
    Some(if warn_at > now { poll.min(warn_at) } else { poll.min(end) }.max(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollouts_tell_old_pods_from_pods_not_yet_available() {
        let d = |spec: serde_json::Value, status: serde_json::Value| {
            progress(
                ConsumerKind::Deployment,
                &json!({"metadata": {"generation": 3}, "spec": spec, "status": status}),
            )
        };
        let done =
            json!({"observedGeneration": 3, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3});
        assert_eq!(d(json!({"replicas": 3}), done.clone()), (None, None));
        assert_eq!(d(json!({"replicas": 0}), json!({"observedGeneration": 3})), (None, None), "no pods");
        let unseen = d(json!({"replicas": 3}), json!({"observedGeneration": 2}));
        assert!(unseen.0.unwrap().contains("not seen"));
        let paused =
            d(json!({"replicas": 3, "paused": true}), json!({"observedGeneration": 2, "replicas": 3}));
        assert_eq!(paused.0.as_deref(), Some("the Deployment is paused; 0 of 3 pods updated"));
        let surge =
            json!({"observedGeneration": 3, "replicas": 4, "updatedReplicas": 3, "availableReplicas": 3});
        assert_eq!(d(json!({"replicas": 3}), surge).0.as_deref(), Some("1 old pods still running"));
        let terminating = json!({"observedGeneration": 3, "replicas": 3, "updatedReplicas": 3,
                                 "availableReplicas": 3, "terminatingReplicas": 1});
        assert_eq!(d(json!({"replicas": 3}), terminating).0.as_deref(), Some("1 old pods still running"));
        // Every pod on the current template, one not available: not an old pod.
        let starting =
            json!({"observedGeneration": 3, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 1});
        assert_eq!(d(json!({"replicas": 3}), starting), (None, Some("1 of 3 pods available".into())));

        let s = |spec: serde_json::Value, status: serde_json::Value| {
            progress(
                ConsumerKind::StatefulSet,
                &json!({"metadata": {"generation": 2}, "spec": spec, "status": status}),
            )
        };
        let sts_done = json!({"observedGeneration": 2, "updatedReplicas": 2, "readyReplicas": 2,
                              "currentRevision": "r2", "updateRevision": "r2"});
        assert_eq!(s(json!({"replicas": 2}), sts_done.clone()), (None, None));
        let rolling = json!({"observedGeneration": 2, "updatedReplicas": 1, "readyReplicas": 2,
                             "currentRevision": "r1", "updateRevision": "r2"});
        assert_eq!(s(json!({"replicas": 2}), rolling.clone()).0.as_deref(), Some("1 of 2 pods updated"));
        let on_delete = s(json!({"replicas": 2, "updateStrategy": {"type": "OnDelete"}}), rolling);
        assert!(on_delete.0.unwrap().contains("OnDelete"), "never finishes by itself");
        assert_eq!(s(json!({"replicas": 2, "updateStrategy": {"type": "OnDelete"}}), sts_done), (None, None));

        let ds = |status: serde_json::Value| {
            progress(
                ConsumerKind::DaemonSet,
                &json!({"metadata": {"generation": 1}, "spec": {}, "status": status}),
            )
        };
        let ds_rolling = json!({"observedGeneration": 1, "desiredNumberScheduled": 4, "updatedNumberScheduled": 2,
                                "numberAvailable": 4});
        assert_eq!(ds(ds_rolling).0.as_deref(), Some("2 of 4 pods updated"));
        let ds_done = json!({"observedGeneration": 1, "desiredNumberScheduled": 4, "updatedNumberScheduled": 4,
                             "numberAvailable": 4});
        assert_eq!(ds(ds_done), (None, None));
    }
}
