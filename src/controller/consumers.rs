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

/// Field manager of the consumer annotation.
pub const CONSUMER_MANAGER: &str = "keyward/consumers";

fn resource(kind: ConsumerKind) -> ApiResource {
    match kind {
        ConsumerKind::Deployment => ApiResource::erase::<Deployment>(&()),
        ConsumerKind::StatefulSet => ApiResource::erase::<StatefulSet>(&()),
        ConsumerKind::DaemonSet => ApiResource::erase::<DaemonSet>(&()),
    }
}

/// Make every consumer's pod template carry `key_id`. A missing workload is reported
/// (when `report_missing`) as a Warning, not an error.
pub async fn roll(ctx: &Context, key: &ApiKey, key_id: &str, report_missing: bool) -> Result<()> {
    let ns = key.namespace().unwrap_or_default();
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
    }
    Ok(())
}
