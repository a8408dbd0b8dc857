//! Secondary indexes over the ApiKeys the watch has seen, kept by the watch itself (every
//! apply, deletion and re-list), so that nothing in a reconcile or an event handler scans
//! every ApiKey: the ApiKeys of one owner (owner limits), the ApiKeys naming one policy or
//! none (a policy change, `keyCount`).
//! The controller counts the ApiKeys handed out (`keyward_controller_index_visits_total`),
//! for the test that fails when one reconcile touches every ApiKey.

use std::collections::{BTreeSet, HashMap};

use kube::runtime::reflector::ObjectRef;

use crate::api::ApiKey;

/// What the index keeps of an ApiKey.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Indexed {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// `spec.owner`.
    pub owner: String,
    /// The Secret it writes (`spec.secretName`, else its name).
    pub secret: String,
    /// `spec.policy` (None: the default policy).
    pub policy: Option<String>,
}

/// The indexes.
#[derive(Default, Debug)]
pub struct KeyIndex {
    of: HashMap<String, Indexed>,
    by_owner: HashMap<(String, String), BTreeSet<String>>,
    by_policy: HashMap<Option<String>, BTreeSet<(String, String)>>,
    by_secret: HashMap<(String, String), BTreeSet<String>>,
}

impl KeyIndex {
    /// Index (or re-index) the ApiKey `id` as `now`.
    pub fn apply(&mut self, id: &str, now: Indexed) {
        if self.of.get(id) == Some(&now) {
            return;
        }
        self.remove(id);
        self.by_owner.entry((now.namespace.clone(), now.owner.clone())).or_default().insert(now.name.clone());
        self.by_policy
            .entry(now.policy.clone())
            .or_default()
            .insert((now.namespace.clone(), now.name.clone()));
        self.by_secret
            .entry((now.namespace.clone(), now.secret.clone()))
            .or_default()
            .insert(now.name.clone());
        self.of.insert(id.to_string(), now);
    }

    /// Forget the ApiKey `id` (deleted, also while the watch was down).
    pub fn remove(&mut self, id: &str) {
        let Some(old) = self.of.remove(id) else { return };
        let owner = (old.namespace.clone(), old.owner.clone());
        if let Some(names) = self.by_owner.get_mut(&owner) {
            names.remove(&old.name);
            if names.is_empty() {
                self.by_owner.remove(&owner);
            }
        }
        let secret = (old.namespace.clone(), old.secret.clone());
        if let Some(names) = self.by_secret.get_mut(&secret) {
            names.remove(&old.name);
            if names.is_empty() {
                self.by_secret.remove(&secret);
            }
        }
        if let Some(keys) = self.by_policy.get_mut(&old.policy) {
            keys.remove(&(old.namespace, old.name));
            if keys.is_empty() {
                self.by_policy.remove(&old.policy);
            }
        }
    }

    /// The ApiKeys of `owner` in `namespace`.
    pub fn same_owner(&self, namespace: &str, owner: &str) -> Vec<ObjectRef<ApiKey>> {
        let names = self.by_owner.get(&(namespace.to_string(), owner.to_string()));
        names.into_iter().flatten().map(|n| ObjectRef::new(n).within(namespace)).collect()
    }

    /// The ApiKeys that write Secret `secret` in `namespace` (one, unless two ApiKeys
    /// name the same Secret, of which only the owner writes it).
    pub fn using_secret(&self, namespace: &str, secret: &str) -> Vec<ObjectRef<ApiKey>> {
        let names = self.by_secret.get(&(namespace.to_string(), secret.to_string()));
        names.into_iter().flatten().map(|n| ObjectRef::new(n).within(namespace)).collect()
    }

    /// The ApiKeys naming `policy` (None: those naming none, which use the default).
    pub fn naming(&self, policy: Option<&str>) -> Vec<ObjectRef<ApiKey>> {
        let keys = self.by_policy.get(&policy.map(str::to_owned));
        keys.into_iter().flatten().map(|(ns, n)| ObjectRef::new(n).within(ns)).collect()
    }

    /// How many ApiKeys name `policy` (None: name none), without visiting them.
    pub fn count_naming(&self, policy: Option<&str>) -> usize {
        self.by_policy.get(&policy.map(str::to_owned)).map_or(0, BTreeSet::len)
    }

    /// Every ApiKey (once per start of the pod watch, see `watch_pods`).
    pub fn all(&self) -> Vec<ObjectRef<ApiKey>> {
        self.of.values().map(|k| ObjectRef::new(&k.name).within(&k.namespace)).collect()
    }

    /// ApiKeys indexed.
    pub fn len(&self) -> usize {
        self.of.len()
    }

    /// True when none is indexed.
    pub fn is_empty(&self) -> bool {
        self.of.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, name: &str, owner: &str, policy: Option<&str>) -> Indexed {
        Indexed {
            namespace: ns.into(),
            name: name.into(),
            owner: owner.into(),
            secret: name.into(),
            policy: policy.map(str::to_owned),
        }
    }

    fn names(refs: Vec<ObjectRef<ApiKey>>) -> Vec<String> {
        refs.into_iter().map(|r| format!("{}/{}", r.namespace.unwrap_or_default(), r.name)).collect()
    }

    #[test]
    fn the_indexes_follow_applies_moves_and_removals() {
        let mut ix = KeyIndex::default();
        ix.apply("a/k1", key("a", "k1", "team", Some("p")));
        ix.apply("a/k2", key("a", "k2", "team", None));
        ix.apply("b/k1", key("b", "k1", "team", Some("p")));
        for i in 0..1000 {
            ix.apply(&format!("c/x{i}"), key("c", &format!("x{i}"), &format!("o{i}"), Some("q")));
        }
        assert_eq!(names(ix.same_owner("a", "team")), ["a/k1", "a/k2"], "one namespace only");
        assert_eq!(names(ix.naming(Some("p"))), ["a/k1", "b/k1"]);
        assert_eq!(names(ix.naming(None)), ["a/k2"]);
        assert_eq!((ix.count_naming(Some("q")), ix.count_naming(Some("p"))), (1000, 2));
        assert_eq!(names(ix.using_secret("a", "k2")), ["a/k2"]);

        // A move between policies and owners, then a deletion.
        ix.apply("a/k1", key("a", "k1", "other", None));
        assert_eq!(names(ix.same_owner("a", "team")), ["a/k2"]);
        assert_eq!(names(ix.naming(None)), ["a/k1", "a/k2"]);
        assert_eq!(names(ix.naming(Some("p"))), ["b/k1"]);
        ix.remove("a/k2");
        ix.remove("a/unknown");
        assert!(ix.same_owner("a", "team").is_empty());
        assert_eq!(names(ix.naming(None)), ["a/k1"]);
        assert_eq!(ix.len(), 1002);
        assert!(!ix.by_owner.contains_key(&("a".into(), "team".into())), "empty sets are pruned");
    }
}
