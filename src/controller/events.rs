//! Events: published about any object, namespaced or cluster-scoped; a failure to
//! publish is logged, never fatal.

use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource};

use super::context::Context;

/// Name of this controller in Events.
pub const CONTROLLER_NAME: &str = "keyward";
/// Namespace of the Events about KeyPolicies (cluster-scoped).
pub const CLUSTER_EVENTS_NAMESPACE: &str = "kube-system";

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
