//! What the controller remembers of every ApiKey the watch has seen, and secondary
//! indexes over it, kept by the watch itself (every apply, deletion and re-list), so that
//! nothing in a reconcile or an event handler scans every ApiKey: the ApiKeys of one owner
//! (owner limits), the ApiKeys naming one policy or none (a policy change, `keyCount`),
//! the ApiKeys writing one Secret (a pod's change).
//! One record per ApiKey, its strings shared between the record and the indexes (a heap
//! profile at 5,000 ApiKeys found 1.6 KB per ApiKey in a separate "seen" map, this index's
//! own copy and a one-element B-tree per owner and per Secret; see docs/benchmarks.md).
//! The controller counts the ApiKeys handed out (`keyward_controller_index_visits_total`),
//! for the test that fails when one reconcile touches every ApiKey.

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::sync::Arc;

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

use super::known::Known;
use crate::api::ApiKey;

/// What is remembered of an ApiKey: enough to act on its deletion (also one that happened
/// while the watch was down, when the cache no longer has it), on a move between policies
/// or owners, and to tell whether a new version should trigger a reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Indexed {
    /// Its namespace.
    pub namespace: Arc<str>,
    /// Its name.
    pub name: Arc<str>,
    /// `spec.owner`.
    pub owner: Arc<str>,
    /// The Secret it writes (`spec.secretName`, else its name: then the same string).
    pub secret: Arc<str>,
    /// `spec.policy` (None: the default policy).
    pub policy: Option<Arc<str>>,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// Which object of that name it is (its uid, hashed): one deleted and created again
    /// while the watch was down is another ApiKey.
    pub incarnation: u64,
    /// What of it triggers a reconcile, hashed (see `apikey_trigger`).
    pub trigger: u64,
}

impl Indexed {
    /// What to remember of `k`, whose trigger hash is `trigger`.
    pub fn of(k: &ApiKey, trigger: u64) -> Self {
        let name: Arc<str> = k.name_any().into();
        let secret = match k.spec.secret_name.as_deref() {
            Some(s) if s != &*name => s.into(),
            _ => name.clone(),
        };
        Indexed {
            namespace: k.namespace().unwrap_or_default().into(),
            name,
            owner: k.owner().into(),
            secret,
            policy: k.spec.policy.as_deref().map(Into::into),
            generation: k.metadata.generation,
            incarnation: {
                use std::hash::{BuildHasher, BuildHasherDefault};
                BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
                    .hash_one(k.metadata.uid.as_deref())
            },
            trigger,
        }
    }
}

/// What one event of the ApiKey watch changed (see [`KeyIndex::on`]).
pub struct Seen {
    /// What was remembered of the applied ApiKey before this event.
    pub before: Option<Indexed>,
    /// What is remembered of it now.
    pub now: Option<Indexed>,
    /// The ApiKeys gone, by id, with what was remembered of them.
    pub gone: Vec<(String, Indexed)>,
}

/// Names in one namespace under one owner or one Secret: nearly always one, so one
/// without a set.
#[derive(Debug)]
enum Names {
    One(Arc<str>),
    Many(BTreeSet<Arc<str>>),
}

impl Names {
    fn insert(&mut self, name: Arc<str>) {
        match self {
            Names::One(n) if *n == name => {}
            Names::One(n) => *self = Names::Many([n.clone(), name].into()),
            Names::Many(set) => drop(set.insert(name)),
        }
    }

    /// Remove `name`; whether none is left.
    fn remove(&mut self, name: &str) -> bool {
        match self {
            Names::One(n) => &**n == name,
            Names::Many(set) => {
                set.remove(name);
                if set.len() == 1
                    && let Some(last) = set.pop_first()
                {
                    *self = Names::One(last);
                }
                false
            }
        }
    }

    fn refs(&self, namespace: &str) -> Vec<ObjectRef<ApiKey>> {
        let one = |n: &Arc<str>| ObjectRef::new(n).within(namespace);
        match self {
            Names::One(n) => vec![one(n)],
            Names::Many(set) => set.iter().map(one).collect(),
        }
    }
}

type Pair = (Arc<str>, Arc<str>);

/// The record of every ApiKey seen, and the indexes.
#[derive(Default)]
pub struct KeyIndex {
    known: Known<Indexed>,
    by_owner: HashMap<Pair, Names>,
    by_policy: HashMap<Option<Arc<str>>, BTreeSet<Pair>>,
    by_secret: HashMap<Pair, Names>,
}

/// Remove `name` from the names under `at`, and the entry once none is left.
fn unlist(map: &mut HashMap<Pair, Names>, at: Pair, name: &str) {
    if map.get_mut(&at).is_some_and(|names| names.remove(name)) {
        map.remove(&at);
    }
}

impl KeyIndex {
    /// Follow one event of the ApiKey watch, remembering `remember(k)` of an applied
    /// ApiKey: what was remembered of it before and now, and the ApiKeys gone (deleted, or
    /// after a re-list every one not listed again) with what was remembered of them.
    pub fn on(&mut self, ev: &watcher::Event<ApiKey>, remember: impl Fn(&ApiKey) -> Indexed) -> Seen {
        let (before, gone) = self.known.on(ev, remember);
        let mut now = None;
        if let watcher::Event::Apply(k) | watcher::Event::InitApply(k) = ev {
            now = self.known.get(&super::known::object_id(k)).cloned();
            if before.as_ref().map(Self::key_of) != now.as_ref().map(Self::key_of) {
                before.iter().for_each(|b| self.unindex(b));
                now.iter().for_each(|n| self.index(n));
            }
        }
        gone.iter().for_each(|(_, g)| self.unindex(g));
        Seen { before, now, gone }
    }

    /// What the indexes are built from.
    fn key_of(k: &Indexed) -> (&str, &str, &str, &str, Option<&str>) {
        (&k.namespace, &k.name, &k.owner, &k.secret, k.policy.as_deref())
    }

    fn index(&mut self, k: &Indexed) {
        let owner = (k.namespace.clone(), k.owner.clone());
        self.by_owner.entry(owner).or_insert_with(|| Names::One(k.name.clone())).insert(k.name.clone());
        let secret = (k.namespace.clone(), k.secret.clone());
        self.by_secret.entry(secret).or_insert_with(|| Names::One(k.name.clone())).insert(k.name.clone());
        self.by_policy.entry(k.policy.clone()).or_default().insert((k.namespace.clone(), k.name.clone()));
    }

    fn unindex(&mut self, old: &Indexed) {
        unlist(&mut self.by_owner, (old.namespace.clone(), old.owner.clone()), &old.name);
        unlist(&mut self.by_secret, (old.namespace.clone(), old.secret.clone()), &old.name);
        if let Some(keys) = self.by_policy.get_mut(&old.policy) {
            keys.remove(&(old.namespace.clone(), old.name.clone()));
            if keys.is_empty() {
                self.by_policy.remove(&old.policy);
            }
        }
    }

    /// The ApiKeys of `owner` in `namespace`.
    pub fn same_owner(&self, namespace: &str, owner: &str) -> Vec<ObjectRef<ApiKey>> {
        self.by_owner.get(&(namespace.into(), owner.into())).map_or_else(Vec::new, |n| n.refs(namespace))
    }

    /// The ApiKeys that write Secret `secret` in `namespace` (one, unless two ApiKeys
    /// name the same Secret, of which only the owner writes it).
    pub fn using_secret(&self, namespace: &str, secret: &str) -> Vec<ObjectRef<ApiKey>> {
        self.by_secret.get(&(namespace.into(), secret.into())).map_or_else(Vec::new, |n| n.refs(namespace))
    }

    /// The ApiKeys naming `policy` (None: those naming none, which use the default).
    pub fn naming(&self, policy: Option<&str>) -> Vec<ObjectRef<ApiKey>> {
        let keys = self.by_policy.get(&policy.map(Into::into));
        keys.into_iter().flatten().map(|(ns, n)| ObjectRef::new(n).within(ns)).collect()
    }

    /// How many ApiKeys name `policy` (None: name none), without visiting them.
    pub fn count_naming(&self, policy: Option<&str>) -> usize {
        self.by_policy.get(&policy.map(Into::into)).map_or(0, BTreeSet::len)
    }

    /// Every ApiKey (once per start of the pod watch, see `watch_pods`).
    pub fn all(&self) -> Vec<ObjectRef<ApiKey>> {
        self.known.values().map(|k| ObjectRef::new(&k.name).within(&k.namespace)).collect()
    }

    /// ApiKeys remembered.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// True when none is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, name: &str, owner: &str, policy: Option<&str>) -> ApiKey {
        let mut spec = serde_json::json!({"owner": owner});
        if let Some(p) = policy {
            spec["policy"] = p.into();
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": name, "namespace": ns}, "spec": spec
        }))
        .unwrap()
    }

    fn names(refs: Vec<ObjectRef<ApiKey>>) -> Vec<String> {
        refs.into_iter().map(|r| format!("{}/{}", r.namespace.unwrap_or_default(), r.name)).collect()
    }

    #[test]
    fn the_indexes_follow_applies_moves_and_removals() {
        fn apply(ix: &mut KeyIndex, k: ApiKey) {
            ix.on(&watcher::Event::Apply(k), |k| Indexed::of(k, 0));
        }
        let mut ix = KeyIndex::default();
        apply(&mut ix, key("a", "k1", "team", Some("p")));
        apply(&mut ix, key("a", "k2", "team", None));
        apply(&mut ix, key("b", "k1", "team", Some("p")));
        for i in 0..1000 {
            apply(&mut ix, key("c", &format!("x{i}"), &format!("o{i}"), Some("q")));
        }
        assert_eq!(names(ix.same_owner("a", "team")), ["a/k1", "a/k2"], "one namespace only");
        assert_eq!(names(ix.naming(Some("p"))), ["a/k1", "b/k1"]);
        assert_eq!(names(ix.naming(None)), ["a/k2"]);
        assert_eq!((ix.count_naming(Some("q")), ix.count_naming(Some("p"))), (1000, 2));
        assert_eq!(names(ix.using_secret("a", "k2")), ["a/k2"]);

        // A move between policies and owners, then deletions.
        apply(&mut ix, key("a", "k1", "other", None));
        assert_eq!(names(ix.same_owner("a", "team")), ["a/k2"]);
        assert_eq!(names(ix.same_owner("a", "other")), ["a/k1"]);
        assert_eq!(names(ix.naming(None)), ["a/k1", "a/k2"]);
        assert_eq!(names(ix.naming(Some("p"))), ["b/k1"]);
        ix.on(&watcher::Event::Delete(key("a", "k2", "team", None)), |k| Indexed::of(k, 0));
        ix.on(&watcher::Event::Delete(key("a", "unknown", "team", None)), |k| Indexed::of(k, 0));
        assert!(ix.same_owner("a", "team").is_empty());
        assert_eq!(names(ix.naming(None)), ["a/k1"]);
        assert_eq!(ix.len(), 1002);
        assert!(!ix.by_owner.contains_key(&("a".into(), "team".into())), "empty entries are pruned");
        assert!(!ix.by_secret.contains_key(&("a".into(), "k2".into())));
    }

    #[test]
    fn two_apikeys_sharing_a_secret_or_an_owner_are_both_listed_until_each_leaves() {
        let mut ix = KeyIndex::default();
        let shared = |name: &str| {
            let mut k = key("a", name, "team", None);
            k.spec.secret_name = Some("s".into());
            k
        };
        for name in ["k1", "k2", "k3"] {
            ix.on(&watcher::Event::Apply(shared(name)), |k| Indexed::of(k, 0));
        }
        assert_eq!(names(ix.using_secret("a", "s")), ["a/k1", "a/k2", "a/k3"]);
        for (gone, left) in [("k2", vec!["a/k1", "a/k3"]), ("k1", vec!["a/k3"]), ("k3", vec![])] {
            ix.on(&watcher::Event::Delete(shared(gone)), |k| Indexed::of(k, 0));
            assert_eq!(names(ix.using_secret("a", "s")), left);
            assert_eq!(names(ix.same_owner("a", "team")), left);
        }
        assert!(ix.by_secret.is_empty() && ix.by_owner.is_empty() && ix.by_policy.is_empty());
    }

    #[test]
    fn a_secret_named_as_the_apikey_shares_its_string() {
        let k = Indexed::of(&key("a", "k1", "team", None), 1);
        assert!(Arc::ptr_eq(&k.name, &k.secret));
    }
}
