//! What one watch has seen ([`Known`]), so that no deletion is missed, also one that
//! happened while the watch was down; objects are known by [`object_id`], as is all the
//! controller keeps per object.

use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

/// The objects of one watch, by [`object_id`], with what is remembered of each, so that a
/// deletion is never missed: after a re-list (Init … InitDone) every object known before
/// and not listed again was deleted while the watch was down.
pub(super) struct Known<V> {
    pub(super) known: std::collections::HashMap<String, V>,
    listed: Option<std::collections::HashSet<String>>,
}

impl<V> Default for Known<V> {
    fn default() -> Self {
        Known { known: Default::default(), listed: None }
    }
}

impl<V> Known<V> {
    /// What is remembered of object `id`.
    pub(super) fn get(&self, id: &str) -> Option<&V> {
        self.known.get(id)
    }

    /// What is remembered of every object.
    pub(super) fn values(&self) -> impl Iterator<Item = &V> {
        self.known.values()
    }

    /// Objects remembered.
    pub(super) fn len(&self) -> usize {
        self.known.len()
    }

    /// Follow one event; `remember` says what to keep of an object. Returns what was kept
    /// of an applied object before this event, and the objects gone (the deleted one, or
    /// after a re-list every one not listed again) with what was kept of them.
    pub(super) fn on<K: Resource<DynamicType = ()>>(
        &mut self,
        ev: &watcher::Event<K>,
        remember: impl Fn(&K) -> V,
    ) -> (Option<V>, Vec<(String, V)>) {
        match ev {
            watcher::Event::Init => {
                self.listed = Some(Default::default());
                (None, vec![])
            }
            watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                let id = object_id(o);
                if let Some(listed) = self.listed.as_mut() {
                    listed.insert(id.clone());
                }
                (self.known.insert(id, remember(o)), vec![])
            }
            watcher::Event::Delete(o) => {
                let id = object_id(o);
                let gone = self.known.remove(&id).unwrap_or_else(|| remember(o));
                (None, vec![(id, gone)])
            }
            watcher::Event::InitDone => {
                let listed = self.listed.take().unwrap_or_default();
                let gone: Vec<String> =
                    self.known.keys().filter(|id| !listed.contains(*id)).cloned().collect();
                (None, gone.into_iter().filter_map(|id| self.known.remove(&id).map(|v| (id, v))).collect())
            }
        }
    }
}

/// How the controller names an object in what it keeps per object: `Kind/namespace/name`.
pub(super) fn object_id<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!("{}/{}/{}", K::kind(&()), obj.namespace().unwrap_or_default(), obj.name_any())
}
