//! Env-var consumers: each workload in `spec.consumers[]` carries the active key's ID
//! in its pod template annotation `keyward.dev/key-id`, applied with its own field
//! manager only when it differs, so every flip rolls each workload out exactly once.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use serde_json::json;

use super::Context;
use crate::api::{ApiKey, ConsumerKind, KEY_ID_ANNOTATION};
use crate::error::{Error, Result};

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
    /// Why it has not finished (None: every pod runs the current template).
    pub pending: Option<String>,
    /// keyward had rolled it before (its template carried a key ID): pods still on the
    /// old template hold an older key. A workload that never carried one started with
    /// whatever key the Secret held then.
    pub rolled_before: bool,
}

fn count(v: &serde_json::Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

/// Why a workload's pods do not all run its current pod template yet, as `kubectl
/// rollout status` judges it (None: done). A rollout that cannot finish by itself (a
/// paused Deployment, a StatefulSet or DaemonSet with `updateStrategy: OnDelete`) says so.
pub fn pending(kind: ConsumerKind, obj: &serde_json::Value) -> Option<String> {
    let (spec, status) = (&obj["spec"], &obj["status"]);
    let generation = count(&obj["metadata"]["generation"]);
    let manual = |what: &str| format!("{what}: it waits for its pods to be deleted by hand");
    if kind != ConsumerKind::Deployment && spec["updateStrategy"]["type"] == "OnDelete" {
        let updated = match kind {
            ConsumerKind::DaemonSet => {
                count(&status["updatedNumberScheduled"]) < count(&status["desiredNumberScheduled"])
            }
            _ => status["currentRevision"] != status["updateRevision"],
        };
        if count(&status["observedGeneration"]) < generation || updated {
            return Some(manual("updateStrategy OnDelete"));
        }
    }
    if count(&status["observedGeneration"]) < generation {
        return Some(if spec["paused"] == true {
            "the Deployment is paused".into()
        } else {
            "its controller has not seen the new template yet".into()
        });
    }
    let of =
        |done: i64, want: i64, what: &str| (done < want).then(|| format!("{done} of {want} pods {what}"));
    match kind {
        ConsumerKind::Deployment => {
            let want = spec["replicas"].as_i64().unwrap_or(1);
            let updated = count(&status["updatedReplicas"]);
            let paused = (spec["paused"] == true).then(|| "the Deployment is paused".to_string());
            of(updated, want, "updated")
                .map(|m| paused.clone().map_or(m.clone(), |p| format!("{p}; {m}")))
                .or_else(|| {
                    let old = count(&status["replicas"]) - updated;
                    (old > 0).then(|| format!("{old} old pods still running"))
                })
                .or_else(|| of(count(&status["availableReplicas"]), updated, "available"))
        }
        ConsumerKind::StatefulSet => {
            let want = spec["replicas"].as_i64().unwrap_or(1);
            of(count(&status["updatedReplicas"]), want, "updated")
                .or_else(|| of(count(&status["readyReplicas"]), want, "ready"))
                .or_else(|| {
                    (status["currentRevision"] != status["updateRevision"])
                        .then(|| "the update is not complete".into())
                })
        }
        ConsumerKind::DaemonSet => {
            let want = count(&status["desiredNumberScheduled"]);
            of(count(&status["updatedNumberScheduled"]), want, "updated")
                .or_else(|| of(count(&status["numberAvailable"]), want, "available"))
        }
    }
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
            let pending = pending(consumer.kind, &serde_json::to_value(&obj).unwrap_or_default());
            rollouts.push(Rollout {
                kind: consumer.kind,
                name: consumer.name.clone(),
                pending,
                rolled_before: true,
            });
            continue;
        }
        let patch = json!({
            "apiVersion": ar.api_version, "kind": ar.kind,
            "metadata": {"name": consumer.name},
            "spec": {"template": {"metadata": {"annotations": {KEY_ID_ANNOTATION: key_id}}}}
        });
        api.patch(&consumer.name, &PatchParams::apply(CONSUMER_MANAGER).force(), &Patch::Apply(&patch))
            .await
            .map_err(Error::kube(format!("rolling out {what}")))?;
        ctx.metrics.count_write("consumers");
        tracing::info!(apikey = %key.name_any(), consumer = %what, key_id, "rolled out consumer");
        let pending = Some("its rollout just started".to_string());
        let rolled_before = current.is_some();
        rollouts.push(Rollout { kind: consumer.kind, name: consumer.name.clone(), pending, rolled_before });
    }
    Ok(rollouts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollouts_are_pending_until_every_pod_runs_the_current_template() {
        let d = |spec: serde_json::Value, status: serde_json::Value| {
            pending(
                ConsumerKind::Deployment,
                &json!({"metadata": {"generation": 3}, "spec": spec, "status": status}),
            )
        };
        let done =
            json!({"observedGeneration": 3, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3});
        assert_eq!(d(json!({"replicas": 3}), done.clone()), None);
        assert_eq!(
            d(json!({"replicas": 0}), json!({"observedGeneration": 3})),
            None,
            "no pods, nothing to roll"
        );
        assert!(d(json!({"replicas": 3}), json!({"observedGeneration": 2})).unwrap().contains("not seen"));
        let paused = d(
            json!({"replicas": 3, "paused": true}),
            json!({"observedGeneration": 3, "replicas": 3, "updatedReplicas": 0}),
        );
        assert_eq!(paused.as_deref(), Some("the Deployment is paused; 0 of 3 pods updated"));
        let surge =
            json!({"observedGeneration": 3, "replicas": 4, "updatedReplicas": 3, "availableReplicas": 3});
        assert_eq!(d(json!({"replicas": 3}), surge).as_deref(), Some("1 old pods still running"));
        let starting =
            json!({"observedGeneration": 3, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 1});
        assert_eq!(d(json!({"replicas": 3}), starting).as_deref(), Some("1 of 3 pods available"));

        let s = |spec: serde_json::Value, status: serde_json::Value| {
            pending(
                ConsumerKind::StatefulSet,
                &json!({"metadata": {"generation": 2}, "spec": spec, "status": status}),
            )
        };
        let sts_done = json!({"observedGeneration": 2, "updatedReplicas": 2, "readyReplicas": 2,
                              "currentRevision": "r2", "updateRevision": "r2"});
        assert_eq!(s(json!({"replicas": 2}), sts_done.clone()), None);
        let rolling = json!({"observedGeneration": 2, "updatedReplicas": 1, "readyReplicas": 2,
                             "currentRevision": "r1", "updateRevision": "r2"});
        assert_eq!(s(json!({"replicas": 2}), rolling.clone()).as_deref(), Some("1 of 2 pods updated"));
        let on_delete = s(json!({"replicas": 2, "updateStrategy": {"type": "OnDelete"}}), rolling);
        assert!(on_delete.unwrap().contains("OnDelete"), "never finishes by itself");
        assert_eq!(s(json!({"replicas": 2, "updateStrategy": {"type": "OnDelete"}}), sts_done), None);

        let ds = |status: serde_json::Value| {
            pending(
                ConsumerKind::DaemonSet,
                &json!({"metadata": {"generation": 1}, "spec": {}, "status": status}),
            )
        };
        let ds_rolling =
            json!({"observedGeneration": 1, "desiredNumberScheduled": 4, "updatedNumberScheduled": 2});
        assert_eq!(ds(ds_rolling).as_deref(), Some("2 of 4 pods updated"));
        let ds_done = json!({"observedGeneration": 1, "desiredNumberScheduled": 4, "updatedNumberScheduled": 4,
                             "numberAvailable": 4});
        assert_eq!(ds(ds_done), None);
    }
}
