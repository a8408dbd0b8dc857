//! What triggers a reconcile, decided without I/O from the watch events: which changes
//! of an ApiKey matter (its spec, the rotate annotation, as much of its last uses as its
//! policy reads; never this controller's own writes), and which KeyPolicy changes reach
//! the ApiKeys that use them.

use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use super::context::OwnWrites;
use super::index;
use super::known::Known;
use crate::api::{ApiKey, KeyPolicy, ROTATE_ANNOTATION};

/// What of the verifier's `lastUsedAt` writes an ApiKey's reconcile depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum UsageView {
    /// Every last use: the policy expires keys for inactivity (a use moves a deadline
    /// the verifier reads back from `effectiveExpiresAt`) or retires drained keys early
    /// (a use decides or cancels a retirement), or the policy is not cached.
    Every,
    /// Only the handover state the last uses give at the moment of the event (a new
    /// key's first use, the old key used after consumers moved, used again after a
    /// quiet spell); a key going quiet is a timer (`Handover`'s next change).
    Handover(&'static str),
}

/// What about an ApiKey should trigger a reconcile: its spec (generation), the rotate
/// annotation, and as much of the verifier's `lastUsedAt` writes as `usage` says. A
/// steady stream of uses therefore costs nothing unless the policy makes each use
/// matter. This controller's own status writes do not trigger: their effects are
/// scheduled by `nextActionAt`.
pub(super) fn apikey_trigger(key: &ApiKey, usage: UsageView) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.meta().generation.hash(&mut h);
    key.annotations().get(ROTATE_ANNOTATION).hash(&mut h);
    match usage {
        UsageView::Every => {
            for k in key.status.iter().flat_map(|s| &s.keys) {
                k.last_used_at.map(|t| t.timestamp_micros()).hash(&mut h);
            }
        }
        UsageView::Handover(reason) => reason.hash(&mut h),
    }
    h.finish()
}

/// Whether a new version `k` of an ApiKey, remembered as `now` (and as `before` until
/// now), triggers a reconcile: the first sight of it, or a change of what triggers one
/// ([`apikey_trigger`]) that is not this controller's own status write (the echo), whose
/// effects the reconcile that wrote it has scheduled already (`nextActionAt`). Without
/// the echo rule every new ApiKey was reconciled twice: its first status changes the
/// handover state the trigger includes.
/// A new generation or another object under the same name (deleted and created again
/// while the watch was down) always triggers: no write of this controller makes either.
pub(super) fn triggers(
    before: Option<&index::Indexed>,
    now: &index::Indexed,
    k: &ApiKey,
    own: &OwnWrites,
    live: bool,
) -> bool {
    let echo = if live { own.echo_cached(k) } else { own.is_echo(k) };
    let Some(b) = before else { return true };
    b.generation != now.generation || b.incarnation != now.incarnation || (b.trigger != now.trigger && !echo)
}

/// [`UsageView`] of `key` under its cached policy, at `now`.
pub(super) fn usage_view(
    policies: &Store<KeyPolicy>,
    key: &ApiKey,
    usage: crate::lifecycle::handover::Usage,
    now: chrono::DateTime<chrono::Utc>,
) -> UsageView {
    let found: Vec<_> = policies_of(policies, key).iter().filter_map(|r| policies.get(r)).collect();
    let every = |p: &KeyPolicy| {
        p.spec.expiry.inactivity_timeout.is_some() || p.spec.rotation.retire_drained_after.is_some()
    };
    if found.len() != 1 || found.iter().any(|p| every(p)) {
        return UsageView::Every;
    }
    let (Some(status), Ok(rules)) =
        (key.status.as_ref(), crate::lifecycle::Rules::from_policy(&found[0], now))
    else {
        return UsageView::Every;
    };
    UsageView::Handover(crate::lifecycle::handover::evaluate(&rules, status, now, usage).reason)
}

/// Which KeyPolicy events change what ApiKeys do: a new generation, a deletion, and (after
/// a re-list) every policy that was known before and is missing now, i.e. deleted while
/// the watch was down. Keeps the last version of each policy (policies are few).
#[derive(Default)]
pub(super) struct PolicyChanges {
    known: Known<KeyPolicy>,
}

impl PolicyChanges {
    pub(super) fn on(
        &mut self,
        ev: std::result::Result<watcher::Event<KeyPolicy>, watcher::Error>,
    ) -> Vec<std::result::Result<KeyPolicy, watcher::Error>> {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => return vec![Err(e)],
        };
        let (before, gone) = self.known.on(&ev, KeyPolicy::clone);
        match ev {
            watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                let same = |o: &KeyPolicy| {
                    o.meta().generation == p.meta().generation && o.meta().uid == p.meta().uid
                };
                match before {
                    Some(o) if same(&o) => vec![],
                    // No longer default: the ApiKeys that used it as their default hear it too.
                    Some(o) if o.spec.default && !p.spec.default => vec![Ok(o), Ok(p)],
                    _ => vec![Ok(p)],
                }
            }
            _ => gone.into_iter().map(|(_, p)| Ok(p)).collect(),
        }
    }
}

/// The policy `key` uses: the one it names, else the cached defaults.
fn policies_of(policies: &Store<KeyPolicy>, key: &ApiKey) -> Vec<ObjectRef<KeyPolicy>> {
    policies_named(policies, key.spec.policy.as_deref())
}

/// The policy an ApiKey naming `policy` uses: that one, else the cached defaults.
pub(super) fn policies_named(policies: &Store<KeyPolicy>, policy: Option<&str>) -> Vec<ObjectRef<KeyPolicy>> {
    match policy {
        Some(name) => vec![ObjectRef::new(name)],
        None => policies
            .state()
            .iter()
            .filter(|p| p.spec.default)
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(status: serde_json::Value) -> ApiKey {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": "k", "namespace": "n", "generation": 1},
            "spec": {"owner": "a"},
            "status": status,
        }))
        .unwrap()
    }

    fn active(extra: serde_json::Value) -> serde_json::Value {
        let mut k = serde_json::json!({"slot": "Primary", "keyId": "k1", "hash": "h", "preview": "kw_x",
            "createdAt": "2026-11-23T00:00:00Z", "expiresAt": "2026-11-24T00:00:00Z", "state": "Active"});
        k.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::json!({"keys": [k]})
    }

    #[test]
    fn last_use_triggers_a_reconcile_and_own_status_writes_do_not() {
        let trigger = |extra| apikey_trigger(&key(active(extra)), UsageView::Every);
        let base = trigger(serde_json::json!({}));
        let used = trigger(serde_json::json!({"lastUsedAt": "2026-11-23T01:00:00Z"}));
        let later = trigger(serde_json::json!({"lastUsedAt": "2026-11-23T01:01:00Z"}));
        let own = trigger(serde_json::json!({"effectiveExpiresAt": "2026-11-23T02:00:00Z"}));
        assert_ne!(base, used);
        assert_ne!(used, later);
        assert_eq!(base, own, "the controller's own status writes do not trigger");
    }

    fn policy(name: &str, generation: i64) -> KeyPolicy {
        let mut p = KeyPolicy::new(name, Default::default());
        p.metadata.generation = Some(generation);
        p
    }

    #[test]
    fn policy_deletions_are_seen_also_across_a_watch_gap() {
        let names = |out: Vec<std::result::Result<KeyPolicy, watcher::Error>>| -> Vec<String> {
            out.into_iter().map(|p| p.unwrap().name_any()).collect()
        };
        let mut c = PolicyChanges::default();
        assert!(names(c.on(Ok(watcher::Event::Init))).is_empty());
        assert_eq!(names(c.on(Ok(watcher::Event::InitApply(policy("a", 1))))), ["a"]);
        assert_eq!(names(c.on(Ok(watcher::Event::InitApply(policy("b", 1))))), ["b"]);
        assert!(names(c.on(Ok(watcher::Event::InitDone))).is_empty());
        assert!(names(c.on(Ok(watcher::Event::Apply(policy("a", 1))))).is_empty(), "status-only change");
        assert_eq!(names(c.on(Ok(watcher::Event::Apply(policy("a", 2))))), ["a"], "spec change");
        assert_eq!(names(c.on(Ok(watcher::Event::Delete(policy("a", 2))))), ["a"], "deletion");
        // The watch restarts; b was deleted meanwhile and c created.
        c.on(Ok(watcher::Event::Init));
        assert_eq!(names(c.on(Ok(watcher::Event::InitApply(policy("c", 1))))), ["c"]);
        assert_eq!(names(c.on(Ok(watcher::Event::InitDone))), ["b"], "deleted during the gap");
        assert_eq!(c.known.known.len(), 1, "pruned");
    }

    fn named(ns: &str, name: &str, owner: &str) -> ApiKey {
        let mut k = key(serde_json::json!({}));
        k.metadata.name = Some(name.into());
        k.metadata.namespace = Some(ns.into());
        k.spec.owner = owner.into();
        k
    }

    #[test]
    fn apikey_deletions_during_a_watch_gap_are_seen_and_their_state_pruned() {
        let mut known = index::KeyIndex::default();
        let of = |k: &ApiKey| index::Indexed::of(k, 0);
        let gone = |out: index::Seen| -> Vec<(String, String)> {
            out.gone.into_iter().map(|(id, s)| (id, s.owner.to_string())).collect()
        };
        known.on(&watcher::Event::Init, of);
        for (ns, name) in [("a", "k1"), ("a", "k2"), ("b", "k1")] {
            known.on(&watcher::Event::InitApply(named(ns, name, "team")), of);
        }
        assert!(gone(known.on(&watcher::Event::<ApiKey>::InitDone, of)).is_empty());
        let before = known.on(&watcher::Event::Apply(named("a", "k1", "team")), of).before;
        assert_eq!(
            before.map(|b| b.owner.to_string()).as_deref(),
            Some("team"),
            "what was kept before the update"
        );
        assert_eq!(
            gone(known.on(&watcher::Event::Delete(named("a", "k2", "team")), of)),
            [("ApiKey/a/k2".to_string(), "team".to_string())]
        );
        // The watch restarts: b/k1 was deleted meanwhile, a/k3 created.
        known.on(&watcher::Event::Init, of);
        known.on(&watcher::Event::InitApply(named("a", "k1", "team")), of);
        known.on(&watcher::Event::InitApply(named("a", "k3", "other")), of);
        assert_eq!(
            gone(known.on(&watcher::Event::<ApiKey>::InitDone, of)),
            [("ApiKey/b/k1".to_string(), "team".to_string())],
            "deleted during the gap, with its owner for the limit re-check"
        );
        assert_eq!(known.len(), 2);
        assert!(known.same_owner("b", "team").is_empty(), "the indexes forget it too");
        assert_eq!(known.same_owner("a", "team").len(), 1);
    }

    #[test]
    fn the_echo_of_its_own_status_write_triggers_no_reconcile_another_writer_does() {
        let own = OwnWrites::default();
        let version = |k: &ApiKey, rv: &str| {
            let mut k = k.clone();
            k.metadata.resource_version = Some(rv.into());
            k
        };
        let mut created = named("a", "k1", "team");
        created.metadata.uid = Some("uid-1".into());
        created.metadata.generation = Some(1);
        let created = version(&created, "1");
        let first = index::Indexed::of(&created, 1);
        assert!(triggers(None, &first, &created, &own, true), "first sight");
        // This controller writes the first status (the handover state moves): its echo,
        // in a re-list first (the record stays: the cache has it only at the list's end).
        let written = version(&created, "2");
        own.wrote(&written);
        let after = index::Indexed::of(&written, 2);
        assert!(!triggers(Some(&first), &after, &written, &own, false), "own echo, re-listed");
        assert!(!own.cache_is_current(&created), "the cache may still hold the older version");
        assert!(!triggers(Some(&first), &after, &written, &own, true), "own echo");
        assert!(own.cache_is_current(&written), "the cache holds what was written");
        // The verifier writes lastUsedAt next, moving the handover state again.
        let used = version(&written, "3");
        let later = index::Indexed::of(&used, 3);
        assert!(triggers(Some(&after), &later, &used, &own, true), "another writer's change");
        assert!(!triggers(Some(&later), &later.clone(), &used, &own, true), "nothing that triggers changed");
        // A version this controller wrote that carries a new generation (written on top of
        // a fresh read) or is another object of the same name always triggers.
        let mut edited = version(&used, "4");
        edited.metadata.generation = Some(2);
        own.wrote(&edited);
        assert!(triggers(Some(&later), &index::Indexed::of(&edited, 3), &edited, &own, true));
        let mut again = version(&created, "5");
        again.metadata.uid = Some("uid-2".into());
        own.wrote(&again);
        assert!(triggers(Some(&later), &index::Indexed::of(&again, 3), &again, &own, true));
    }

    #[test]
    fn last_use_triggers_only_a_change_of_the_handover_state_without_a_policy_that_reads_each_use() {
        let policies = {
            let (reader, mut writer) = kube::runtime::reflector::store::<KeyPolicy>();
            let mut p = policy("p", 1);
            p.spec.default = true;
            writer.apply_watcher_event(&watcher::Event::InitApply(p));
            writer.apply_watcher_event(&watcher::Event::InitDone);
            reader
        };
        let usage = crate::lifecycle::handover::Usage::default();
        let two = |primary_used: Option<&str>, secondary_used: Option<&str>| {
            let mut status = active(serde_json::json!({}));
            let mut standby = status["keys"][0].clone();
            standby["slot"] = "Secondary".into();
            standby["keyId"] = "k2".into();
            standby["state"] = "Standby".into();
            standby["createdAt"] = "2026-11-23T12:00:00Z".into();
            if let Some(u) = primary_used {
                status["keys"][0]["lastUsedAt"] = u.into();
            }
            if let Some(u) = secondary_used {
                standby["lastUsedAt"] = u.into();
            }
            status["keys"].as_array_mut().unwrap().push(standby);
            key(status)
        };
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-23T13:00:00Z").unwrap().to_utc();
        let fire = |k: &ApiKey| apikey_trigger(k, usage_view(&policies, k, usage, now));
        let base = fire(&two(Some("2026-11-23T12:59:00Z"), None));
        assert_eq!(base, fire(&two(Some("2026-11-23T12:59:30Z"), None)), "a steady stream of uses: nothing");
        assert_ne!(
            base,
            fire(&two(Some("2026-11-23T12:59:30Z"), Some("2026-11-23T12:59:40Z"))),
            "a first use"
        );
        let mut rotated = two(None, None);
        rotated.annotations_mut().insert(ROTATE_ANNOTATION.into(), "1".into());
        assert_ne!(fire(&two(None, None)), fire(&rotated), "a rotation request still does");
        // A policy that reads each use (inactivity, early retirement): every use.
        let mut every = policy("p", 2);
        every.spec.default = true;
        every.spec.rotation.retire_drained_after = Some("P7D".into());
        let (reader, mut writer) = kube::runtime::reflector::store::<KeyPolicy>();
        writer.apply_watcher_event(&watcher::Event::InitApply(every));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let k = two(Some("2026-11-23T12:59:00Z"), None);
        assert_eq!(usage_view(&reader, &k, usage, now), UsageView::Every);
    }
}
