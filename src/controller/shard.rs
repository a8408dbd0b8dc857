//! Sharding: several controllers, each reconciling the ApiKeys its label selector matches
//! (`--watch-label-selector`, as Flux shards its controllers), each on a Lease of its own.
//!
//! A shard still watches and caches every ApiKey in its scope: an owner's limits
//! (`maxKeysPerOwner`, unique descriptions) and a Secret's owner span ApiKeys that may
//! sit in other shards, and a shard that saw only its own would let an owner past its
//! limit by spreading ApiKeys over shards. What the selector decides is which ApiKeys this
//! shard *writes*: a second, metadata-only watch with the selector (the API server's own
//! selector semantics) keeps the members, and a reconcile of any other ApiKey does nothing.
//!
//! Moving an ApiKey between shards is a label change. The shard it leaves sees it leave its
//! selector and stops; the shard it joins sees it arrive and reconciles it at once. A
//! shard plans each reconcile from a fresh read by its selector and the ApiKey's name
//! (`apikey::reconcile`), never from its cache, which may lag the other shard's writes; the
//! writes carry the resourceVersions of that read (Secret and status), so of two shards
//! that read it as theirs at the same moment the slower gets a conflict and reads again;
//! key material written by one and not yet recorded is adopted by the next reconcile, as
//! after any interrupted one.

use std::sync::Mutex;

use kube::core::PartialObjectMeta;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

use super::known::{Known, object_id};
use crate::api::ApiKey;

/// The ApiKeys this controller reconciles.
pub struct Shard {
    /// The label selector, as given.
    pub selector: String,
    members: Mutex<Known<()>>,
}

/// What one event of the member watch changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// ApiKeys that joined (to reconcile now).
    pub joined: Vec<ObjectRef<ApiKey>>,
    /// ApiKeys that left (deleted, or relabelled out), by id and namespace/name.
    pub left: Vec<(String, String, String)>,
}

impl Shard {
    /// A shard of the ApiKeys matching `selector`.
    pub fn new(selector: impl Into<String>) -> Self {
        Shard { selector: selector.into(), members: Mutex::new(Known::default()) }
    }

    /// Follow one event of the member watch.
    pub fn on(&self, ev: &watcher::Event<PartialObjectMeta<ApiKey>>) -> Change {
        let mut members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        let (before, gone) = members.on(ev, |_| ());
        let mut change = Change::default();
        if let watcher::Event::Apply(m) | watcher::Event::InitApply(m) = ev
            && before.is_none()
        {
            let ns = m.metadata.namespace.clone().unwrap_or_default();
            change.joined.push(ObjectRef::new(m.metadata.name.as_deref().unwrap_or_default()).within(&ns));
        }
        for (id, ()) in gone {
            // ids are Kind/namespace/name.
            let mut parts = id.splitn(3, '/').skip(1);
            let (ns, name) = (parts.next().unwrap_or_default().to_string(), parts.next().unwrap_or_default());
            change.left.push((id.clone(), ns, name.to_string()));
        }
        change
    }

    /// Whether `key` is this shard's to reconcile.
    pub fn owns(&self, key: &ApiKey) -> bool {
        let members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        members.known.contains_key(&object_id(key))
    }

    /// How many ApiKeys are this shard's.
    pub fn len(&self) -> usize {
        self.members.lock().unwrap_or_else(|p| p.into_inner()).known.len()
    }

    /// True when no ApiKey is this shard's.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The Lease a shard elects on when none is named: one per selector (shards must not
/// share one, or only one of them would ever run).
pub fn lease_suffix(selector: &str) -> String {
    use sha2::Digest;
    // `==` is `=`: one shard spelled either way is one shard. (Whitespace is kept: it
    // separates words, `a notin (b)` is not `anotin (b)`.)
    let digest = sha2::Sha256::digest(selector.trim().replace("==", "=").as_bytes());
    format!("shard-{}", &hex::encode(digest)[..10])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(ns: &str, name: &str) -> PartialObjectMeta<ApiKey> {
        let metadata = kube::api::ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            ..Default::default()
        };
        PartialObjectMeta { types: None, metadata, _phantom: std::marker::PhantomData }
    }

    fn key(ns: &str, name: &str) -> ApiKey {
        let mut k = ApiKey::new(name, Default::default());
        k.metadata.namespace = Some(ns.into());
        k
    }

    #[test]
    fn members_join_once_and_leave_when_deleted_relabelled_or_missed_by_a_relist() {
        let shard = Shard::new("keyward.io/shard=a");
        let joined = shard.on(&watcher::Event::Apply(meta("t", "k1")));
        assert_eq!(joined.joined, [ObjectRef::new("k1").within("t")]);
        assert!(shard.owns(&key("t", "k1")));
        assert!(!shard.owns(&key("t", "k2")), "another shard's ApiKey");
        assert!(!shard.owns(&key("u", "k1")), "same name, other namespace");
        // A member's later change is not a join (its own watch triggers it).
        assert_eq!(shard.on(&watcher::Event::Apply(meta("t", "k1"))), Change::default());

        // Relabelled out: the selector's watch reports a deletion.
        let left = shard.on(&watcher::Event::Delete(meta("t", "k1")));
        assert_eq!(left.left, [("ApiKey/t/k1".to_string(), "t".to_string(), "k1".to_string())]);
        assert!(!shard.owns(&key("t", "k1")));

        // A re-list: k2 and k3 listed, k4 (left while the watch was down) is gone.
        shard.on(&watcher::Event::Apply(meta("t", "k4")));
        shard.on(&watcher::Event::Init);
        let k2 = shard.on(&watcher::Event::InitApply(meta("t", "k2")));
        assert_eq!(k2.joined, [ObjectRef::new("k2").within("t")]);
        shard.on(&watcher::Event::InitApply(meta("t", "k3")));
        let done = shard.on(&watcher::Event::InitDone);
        assert_eq!(done.left.iter().map(|l| l.2.as_str()).collect::<Vec<_>>(), ["k4"]);
        assert_eq!(shard.len(), 2);
    }

    #[test]
    fn each_selector_has_its_own_lease() {
        let a = lease_suffix("keyward.io/shard=a");
        assert_ne!(a, lease_suffix("keyward.io/shard=b"));
        assert_eq!(a, lease_suffix(" keyward.io/shard=a "));
        assert_eq!(a, lease_suffix("keyward.io/shard==a"), "== is =");
        assert!(a.len() <= 16 && a.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
    }
}
