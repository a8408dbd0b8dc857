//! Consumers that cannot follow a rotation (issue 13): a pod that mounts an ApiKey's
//! Secret with `subPath` (the kubelet never updates such a file), or reads it through
//! `env.valueFrom.secretKeyRef` / `envFrom.secretRef` (fixed at container start) in a
//! workload that is not listed in the ApiKey's `spec.consumers` (so no flip rolls it).
//!
//! Pure: [`findings`] reads one pod; [`ConsumerIndex`] keeps, per Secret, what the pods
//! that use it were found doing (never the pods themselves), fed by a pod watch.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::api::ConsumerRef;

/// How a pod reads a Secret, when that way never sees a rotation by itself.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Way {
    /// A `subPath` mount of a volume of the Secret (container, mount path).
    SubPath(String, String),
    /// `env[].valueFrom.secretKeyRef` or `envFrom[].secretRef` (container).
    Env(String),
}

/// The workload a pod belongs to: its controller (a ReplicaSet's Deployment), else itself.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Workload {
    /// Its apiVersion (from the owner reference).
    pub api_version: String,
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `ReplicaSet`, `Pod`, …
    pub kind: String,
    /// Its name.
    pub name: String,
}

/// One Secret used one way by one pod.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Finding {
    /// The Secret's name (in the pod's namespace).
    pub secret: String,
    /// How.
    pub way: Way,
    /// By which workload.
    pub workload: Workload,
}

/// The workload of `pod`: the controller owner (an `apps/v1` ReplicaSet whose name is a
/// Deployment's plus the pod's `pod-template-hash` counts as that Deployment), else the
/// pod itself.
fn workload(pod: &Pod) -> Workload {
    let owner = pod.owner_references().iter().find(|o| o.controller == Some(true));
    let of = |api_version: &str, kind: &str, name: &str| Workload {
        api_version: api_version.into(),
        kind: kind.into(),
        name: name.into(),
    };
    match owner {
        Some(o) if o.kind == "ReplicaSet" && o.api_version == "apps/v1" => {
            let hash = pod.labels().get("pod-template-hash");
            match hash.and_then(|h| o.name.strip_suffix(h.as_str())?.strip_suffix('-')) {
                Some(deployment) => of("apps/v1", "Deployment", deployment),
                None => of(&o.api_version, &o.kind, &o.name),
            }
        }
        Some(o) => of(&o.api_version, &o.kind, &o.name),
        None => of("v1", "Pod", &pod.name_any()),
    }
}

/// User text (a path, a container name) as it may appear in a condition: at most 128
/// characters, without `;` (which separates problems) or control characters.
fn shown(text: &str) -> String {
    let clean: String = text.chars().filter(|c| *c != ';' && !c.is_control()).take(128).collect();
    if text.chars().count() > 128 { format!("{clean}…") } else { clean }
}

/// What `pod` does with Secrets that will not follow a rotation. Nothing for a finished
/// pod, nor for a Job's pod: it starts anew each run and reads the key then.
pub fn findings(pod: &Pod) -> Vec<Finding> {
    let Some(spec) = &pod.spec else { return vec![] };
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return vec![];
    }
    let workload = workload(pod);
    if workload.kind == "Job" && workload.api_version.starts_with("batch/") {
        return vec![];
    }
    // Volume name → the Secrets it carries (a secret volume, or a projected one).
    let mut volumes: HashMap<&str, Vec<&str>> = HashMap::new();
    for v in spec.volumes.iter().flatten() {
        let mut secrets: Vec<&str> = Vec::new();
        secrets.extend(v.secret.as_ref().and_then(|s| s.secret_name.as_deref()));
        for source in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            secrets.extend(source.secret.as_ref().map(|s| s.name.as_str()));
        }
        if !secrets.is_empty() {
            volumes.insert(v.name.as_str(), secrets);
        }
    }
    let mut out = BTreeSet::new();
    let containers = spec.containers.iter().chain(spec.init_containers.iter().flatten());
    for c in containers {
        for m in c.volume_mounts.iter().flatten() {
            let sub_path = m.sub_path.as_deref().is_some_and(|s| !s.is_empty())
                || m.sub_path_expr.as_deref().is_some_and(|s| !s.is_empty());
            if sub_path && let Some(secrets) = volumes.get(m.name.as_str()) {
                for secret in secrets {
                    out.insert(Finding {
                        secret: secret.to_string(),
                        way: Way::SubPath(shown(&c.name), shown(&m.mount_path)),
                        workload: workload.clone(),
                    });
                }
            }
        }
        let env = c
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some(e.value_from.as_ref()?.secret_key_ref.as_ref()?.name.as_str()));
        let env_from = c.env_from.iter().flatten().filter_map(|e| Some(e.secret_ref.as_ref()?.name.as_str()));
        for secret in env.chain(env_from) {
            out.insert(Finding {
                secret: secret.to_string(),
                way: Way::Env(c.name.clone()),
                workload: workload.clone(),
            });
        }
    }
    out.into_iter().collect()
}

/// Whether keyward can roll `workload` (an `apps/v1` Deployment, StatefulSet or DaemonSet).
fn rollable(workload: &Workload) -> bool {
    workload.api_version == "apps/v1"
        && matches!(workload.kind.as_str(), "Deployment" | "StatefulSet" | "DaemonSet")
}

/// Whether `consumers` lists `workload`.
fn listed(consumers: &[ConsumerRef], workload: &Workload) -> bool {
    rollable(workload)
        && consumers.iter().any(|c| c.kind.as_str() == workload.kind && c.name == workload.name)
}

/// What the controller knows about the pods reading one ApiKey's Secret.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Consumers {
    /// Pods are not watched (`--watch-consumers` off): nothing is claimed.
    #[default]
    NotWatched,
    /// The pod watch has not listed yet (or cannot): what was said before stands.
    NotKnown,
    /// These workloads cannot follow a rotation (none: all can).
    Known(Vec<Problem>),
}

/// A workload that cannot follow a rotation, and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// The workload.
    pub workload: Workload,
    /// One sentence naming it, what it does and the fix.
    pub message: String,
}

impl Problem {
    /// A reference to the workload (the Warning Event's `related` object).
    pub fn reference(&self, namespace: &str) -> k8s_openapi::api::core::v1::ObjectReference {
        k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(self.workload.api_version.clone()),
            kind: Some(self.workload.kind.clone()),
            name: Some(self.workload.name.clone()),
            namespace: Some(namespace.into()),
            ..Default::default()
        }
    }
}

/// What the pods of each namespace were found doing with Secrets.
#[derive(Default, Debug)]
pub struct ConsumerIndex {
    /// Pod ("namespace/name") → its findings, for replacing and forgetting them.
    of: HashMap<String, (String, Vec<Finding>)>,
    /// (namespace, Secret) → pod → its findings about that Secret.
    by_secret: HashMap<(String, String), BTreeMap<String, Vec<Finding>>>,
    /// The pod watch has listed once: until then nothing is known (an empty index is
    /// not "no problem").
    pub synced: bool,
}

impl ConsumerIndex {
    /// Record `pod` (`id` "namespace/name") as now found doing `found`. Returns the
    /// Secrets whose findings changed.
    pub fn apply(&mut self, id: &str, namespace: &str, found: Vec<Finding>) -> Vec<(String, String)> {
        if self.of.get(id).is_some_and(|(_, f)| *f == found) {
            return vec![];
        }
        let mut changed = self.remove(id);
        for f in &found {
            let pods = self.by_secret.entry((namespace.to_string(), f.secret.clone())).or_default();
            pods.entry(id.to_string()).or_default().push(f.clone());
            changed.push((namespace.to_string(), f.secret.clone()));
        }
        if !found.is_empty() {
            self.of.insert(id.to_string(), (namespace.to_string(), found));
        }
        changed.sort();
        changed.dedup();
        changed
    }

    /// Forget the pod `id`; the Secrets whose findings changed.
    pub fn remove(&mut self, id: &str) -> Vec<(String, String)> {
        let Some((namespace, found)) = self.of.remove(id) else { return vec![] };
        let mut changed = Vec::new();
        for f in found {
            let key = (namespace.clone(), f.secret);
            if let Some(pods) = self.by_secret.get_mut(&key) {
                pods.remove(id);
                if pods.is_empty() {
                    self.by_secret.remove(&key);
                }
            }
            changed.push(key);
        }
        changed.sort();
        changed.dedup();
        changed
    }

    /// The pods known (with findings).
    pub fn pods(&self) -> impl Iterator<Item = &String> {
        self.of.keys()
    }

    /// What cannot follow a rotation of Secret `secret` in `namespace`, given the
    /// ApiKey's `consumers`: one per workload and way, sorted.
    pub fn problems(&self, namespace: &str, secret: &str, consumers: &[ConsumerRef]) -> Vec<Problem> {
        let mut out = BTreeSet::new();
        let pods = self.by_secret.get(&(namespace.to_string(), secret.to_string()));
        for f in pods.into_iter().flat_map(|p| p.values()).flatten() {
            let w = &f.workload;
            match &f.way {
                Way::SubPath(container, path) => out.insert((w.clone(), format!(
                    "{} {namespace}/{} (container {container}) mounts the Secret with subPath at {path}, which the kubelet never updates: mount the volume without subPath (a directory) and read the file from it",
                    w.kind, w.name
                ))),
                Way::Env(_) if listed(consumers, w) => false,
                Way::Env(container) if rollable(w) => out.insert((w.clone(), format!(
                    "{} {namespace}/{} (container {container}) reads the Secret as environment variables, fixed at container start, and is not in spec.consumers: list it there so each flip rolls it out, or mount the Secret as a volume",
                    w.kind, w.name
                ))),
                Way::Env(container) => out.insert((w.clone(), format!(
                    "{} {namespace}/{} (container {container}) reads the Secret as environment variables, fixed at container start, and keyward cannot roll a {}: mount the Secret as a volume and read the file",
                    w.kind, w.name, w.kind
                ))),
            };
        }
        // Sorted by message (kind, then name), as the condition lists them.
        let mut problems: Vec<Problem> =
            out.into_iter().map(|(workload, message)| Problem { workload, message }).collect();
        problems.sort_by(|a, b| a.message.cmp(&b.message));
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn subpath_mounts_and_env_reads_are_found_with_their_workload() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "api-5d8f-x1", "namespace": "shop", "labels": {"pod-template-hash": "5d8f"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "api-5d8f", "uid": "u", "controller": true}]},
            "spec": {
                "volumes": [
                    {"name": "key", "secret": {"secretName": "checkout"}},
                    {"name": "both", "projected": {"sources": [{"secret": {"name": "reporting"}}, {"configMap": {"name": "c"}}]}},
                    {"name": "other", "secret": {"secretName": "unrelated"}}
                ],
                "containers": [{
                    "name": "app",
                    "volumeMounts": [
                        {"name": "key", "mountPath": "/etc/key", "subPath": "api-key"},
                        {"name": "both", "mountPath": "/etc/both"},
                        {"name": "other", "mountPath": "/etc/other"}
                    ],
                    "env": [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "reporting", "key": "api-key"}}}, {"name": "X", "value": "1"}],
                    "envFrom": [{"secretRef": {"name": "checkout"}}]
                }]
            }
        }));
        let found = findings(&p);
        let deployment =
            Workload { api_version: "apps/v1".into(), kind: "Deployment".into(), name: "api".into() };
        assert!(found.iter().all(|f| f.workload == deployment), "{found:?}");
        let what: Vec<(&str, &Way)> = found.iter().map(|f| (f.secret.as_str(), &f.way)).collect();
        assert_eq!(
            what,
            [
                ("checkout", &Way::SubPath("app".into(), "/etc/key".into())),
                ("checkout", &Way::Env("app".into())),
                ("reporting", &Way::Env("app".into())),
            ]
        );
        // User text is cut and cannot smuggle in the problem separator.
        let mut long = p.clone();
        let mounts = long.spec.as_mut().unwrap().containers[0].volume_mounts.as_mut().unwrap();
        mounts[0].mount_path = format!("/a; b{}", "x".repeat(10_000));
        let found = findings(&long);
        let Way::SubPath(_, path) = &found[0].way else { panic!("{found:?}") };
        assert!(path.chars().count() <= 129 && !path.contains(';'), "{path}");
        // Finished pods and Jobs' pods are not consumers that need to follow.
        let mut done = p.clone();
        done.status = Some(serde_json::from_value(serde_json::json!({"phase": "Succeeded"})).unwrap());
        assert!(findings(&done).is_empty());
        let mut job = p.clone();
        job.metadata.owner_references = Some(vec![serde_json::from_value(serde_json::json!(
            {"apiVersion": "batch/v1", "kind": "Job", "name": "nightly-2911", "uid": "j", "controller": true}
        )).unwrap()]);
        assert!(findings(&job).is_empty());
        // A bare pod is its own workload; a volume mount without subPath is fine.
        let bare = pod(serde_json::json!({"metadata": {"name": "p", "namespace": "shop"},
            "spec": {"volumes": [{"name": "k", "secret": {"secretName": "checkout"}}],
                     "containers": [{"name": "c", "volumeMounts": [{"name": "k", "mountPath": "/k"}]}]}}));
        assert!(findings(&bare).is_empty());
    }

    #[test]
    fn problems_name_the_workload_and_the_fix_and_listed_env_consumers_are_fine() {
        let mut ix = ConsumerIndex::default();
        let f = |secret: &str, way: Way, kind: &str, name: &str| Finding {
            secret: secret.into(),
            way,
            workload: Workload { api_version: "apps/v1".into(), kind: kind.into(), name: name.into() },
        };
        let changed =
            ix.apply("shop/a-1", "shop", vec![f("checkout", Way::Env("c".into()), "Deployment", "a")]);
        assert_eq!(changed, [("shop".to_string(), "checkout".to_string())]);
        assert!(
            ix.apply("shop/a-1", "shop", vec![f("checkout", Way::Env("c".into()), "Deployment", "a")])
                .is_empty()
        );
        ix.apply("shop/a-2", "shop", vec![f("checkout", Way::Env("c".into()), "Deployment", "a")]);
        ix.apply("shop/p", "shop", vec![f("checkout", Way::SubPath("c".into(), "/k".into()), "Pod", "p")]);
        let problems = ix.problems("shop", "checkout", &[]);
        assert_eq!(problems.len(), 2, "one per workload and way, not per pod: {problems:?}");
        assert!(
            problems[0]
                .message
                .starts_with("Deployment shop/a (container c) reads the Secret as environment")
        );
        assert!(
            problems[1].message.starts_with("Pod shop/p (container c) mounts the Secret with subPath at /k")
        );
        assert_eq!(problems[1].reference("shop").kind.as_deref(), Some("Pod"));
        // A kind keyward cannot roll is told only the volume fix.
        ix.apply("shop/j", "shop", vec![f("checkout", Way::Env("c".into()), "ReplicaSet", "rs")]);
        let problems = ix.problems("shop", "checkout", &[]);
        assert!(
            problems.iter().any(|p| p.message.contains("keyward cannot roll a ReplicaSet")),
            "{problems:?}"
        );
        ix.remove("shop/j");
        let listed: Vec<ConsumerRef> =
            serde_json::from_value(serde_json::json!([{"kind": "Deployment", "name": "a"}])).unwrap();
        assert_eq!(ix.problems("shop", "checkout", &listed).len(), 1, "a listed env consumer is rolled");
        assert!(ix.problems("other", "checkout", &[]).is_empty(), "per namespace");
        assert_eq!(ix.remove("shop/p"), [("shop".to_string(), "checkout".to_string())]);
        ix.apply("shop/a-1", "shop", vec![]);
        ix.remove("shop/a-2");
        assert!(ix.problems("shop", "checkout", &[]).is_empty());
        assert_eq!(ix.pods().count(), 0);
    }
}
