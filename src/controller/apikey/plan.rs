//! Plan: what one reconcile of an ApiKey writes, decided without I/O from what was read
//! ([`Prepared`]): the lifecycle's steps, the conditions and the Secret contents of each
//! write, in the write order of the [module docs](super).

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::{Resource, ResourceExt};

use super::validate::shown;
use crate::api::{
    ApiKey, ApiKeyStatus, Condition, FALSE, ROTATE_ANNOTATION, TRUE, conditions as c, find_condition,
    set_condition,
};
use crate::controller::policy::Blocked;
use crate::controller::secret::{self, Contents, Minter};
use crate::controller::{pods, warnings};
use crate::keys;
use crate::lifecycle::{self, Happening, Health, Input, handover, notify};

/// Workloads named in `ConsumersFollowRotation` (and warned about one by one); more are
/// counted. Bounds the status and the Events whatever a namespace's pods do.
const MAX_LISTED_CONSUMERS: usize = 10;

/// What a reconcile works with. A blocked ApiKey (`blocked`) is still run: its keys are
/// revoked, capped, expired and flipped to as usual; only new keys are not issued.
pub(super) struct Prepared {
    /// The policy, when one was found.
    pub(super) policy: Option<crate::api::KeyPolicy>,
    /// Whether that policy's `namespaceSelector` allows the ApiKey's namespace. One that
    /// does not is no move: its rules still bound the keys, but the ApiKey stays recorded
    /// under the policy it had (parking on an excluded policy cannot dodge a shrink).
    pub(super) policy_allowed: bool,
    /// Its rules; frozen rules when there is no usable policy.
    pub(super) rules: lifecycle::Rules,
    /// The lifetime of a key issued now.
    pub(super) lifetime: lifecycle::Lifetime,
    pub(super) secret_name: String,
    /// The Secret when this ApiKey owns it (a foreign one is never read or written).
    pub(super) secret: Option<Secret>,
    /// A Secret of that name that this ApiKey does not own exists.
    pub(super) foreign_secret: bool,
    /// Why no new key may be issued.
    pub(super) blocked: Option<Blocked>,
    /// The ApiKey lost its place under its owner's limits: its keys end now.
    pub(super) retire: bool,
    /// How the verifier's usage data is read (handover).
    pub(super) usage: handover::Usage,
    /// Pods reading the Secret in a way no rotation reaches.
    pub(super) consumers: pods::Consumers,
}

/// The conditions that say whether new keys can be issued (`Stalled`) and whether
/// `spec.lifetime` had to be clamped (`LifetimeClamped`); the Warning Events for what is
/// new among them.
fn issuance_conditions(
    status: &mut ApiKeyStatus,
    p: &Prepared,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Vec<(&'static str, String)> {
    let mut news = Vec::new();
    let before = |t: &str| {
        find_condition(&status.conditions, t).map(|c| (c.reason.to_string(), c.message.to_string()))
    };
    let (stalled_before, clamped_before) = (before(c::STALLED), before(c::LIFETIME_CLAMPED));
    let stalled = match &p.blocked {
        Some(b) => {
            if stalled_before != Some((b.reason.to_string(), b.message.clone())) {
                news.push((b.reason, b.message.clone()));
            }
            Condition::new(c::STALLED, TRUE, b.reason, b.message.clone(), generation, now)
        }
        None => Condition::new(
            c::STALLED,
            FALSE,
            c::NOT_BLOCKED,
            "new keys are issued on schedule",
            generation,
            now,
        ),
    };
    set_condition(&mut status.conditions, stalled);
    match &p.lifetime.clamped {
        Some(message) => {
            if clamped_before.map(|(_, m)| m) != Some(message.clone()) {
                news.push((c::LIFETIME_OUT_OF_BOUNDS, message.clone()));
            }
            set_condition(
                &mut status.conditions,
                Condition::new(
                    c::LIFETIME_CLAMPED,
                    TRUE,
                    c::LIFETIME_OUT_OF_BOUNDS,
                    message.clone(),
                    generation,
                    now,
                ),
            );
        }
        None => status.conditions.retain(|x| x.type_ != c::LIFETIME_CLAMPED),
    }
    news
}

/// Everything one reconcile writes, in write order (see the [module docs](super)),
/// decided without I/O by [`plan`] and carried out by [`apply`](super::apply::apply).
#[derive(Debug)]
pub(super) struct Plan {
    /// 1. New material into its slot fields, before status (`api-key` untouched).
    pub(super) slots_first: Option<Contents>,
    /// 2. The status (written when it differs from the stored one).
    pub(super) status: ApiKeyStatus,
    /// 3. `api-key` to the active key, once its hash is in status.
    pub(super) active: Option<Contents>,
    /// The key ID env-var consumers must run with, and whether it changed now.
    pub(super) roll: Option<(String, bool)>,
    /// What happened (Events, metrics).
    pub(super) happenings: Vec<Happening>,
    /// Warning Events for conditions that are news.
    pub(super) news: Vec<(&'static str, String)>,
    /// Consumers newly found unable to follow a rotation (a Warning each, related to the
    /// workload).
    pub(super) consumer_news: Vec<pods::Problem>,
    /// Warnings that fired (metrics; their delivery is recorded in `status`).
    pub(super) fired: Vec<notify::Notice>,
    /// The next lifecycle step, the next warning threshold, and when the handover state
    /// changes with time alone.
    pub(super) step_at: Option<DateTime<Utc>>,
    pub(super) warn_at: Option<DateTime<Utc>>,
    pub(super) handover_at: Option<DateTime<Utc>>,
    /// The older key is still in use after consumers moved, with a threshold before its
    /// expiry passed (the `apikeys_old_key_in_use` gauge).
    pub(super) old_key_in_use: bool,
    /// Keys adopted from the Secret (written before an interrupted reconcile).
    pub(super) adopted: usize,
}

/// One write of a reconcile.
#[derive(Debug)]
pub(super) enum Write<'a> {
    /// Apply the consumer Secret with these contents.
    Secret(&'a Contents),
    /// Replace the status (when it differs from the stored one).
    Status(&'a ApiKeyStatus),
}

impl Plan {
    /// The writes, in the one order that keeps the invariants across a crash after any
    /// of them (see the [module docs](super)).
    pub(super) fn writes(&self) -> Vec<Write<'_>> {
        let mut out = Vec::new();
        out.extend(self.slots_first.as_ref().map(Write::Secret));
        out.push(Write::Status(&self.status));
        out.extend(self.active.as_ref().map(Write::Secret));
        out
    }
}

/// Decide what this reconcile writes: the lifecycle's steps (new keys minted by
/// `minter`), conditions, details, warnings and the Secret contents of each step.
pub(super) fn plan(key: &ApiKey, p: &Prepared, now: DateTime<Utc>) -> Plan {
    let old = key.status.clone().unwrap_or_default();
    let mut status = old.clone();
    let generation = key.meta().generation;
    let existing = p.secret.as_ref();
    let mut material = secret::material_of(existing);
    let client_id =
        old.client_id.clone().or_else(|| secret::client_id_of(existing)).unwrap_or_else(keys::new_client_id);
    status.client_id = Some(client_id.clone());

    let known: Vec<String> = old.keys.iter().map(|k| k.hash.clone()).collect();
    let mut minter = Minter::new(&p.rules.format, existing, known, &key.spec.revoked_keys);
    // Under which policy, since when (a move caps keys from the move, not from before).
    let policy_since = match &p.policy {
        Some(policy) if !p.rules.frozen && p.policy_allowed => {
            Some(lifecycle::bind_policy(&mut status, &policy.name_any(), now))
        }
        Some(policy) => status.policy.as_ref().filter(|b| b.name == policy.name_any()).map(|b| b.since),
        None => None,
    };
    let input = Input {
        rules: &p.rules,
        lifetime: p.lifetime.duration,
        revoked: &key.spec.revoked_keys,
        rotate_request: key.annotations().get(ROTATE_ANNOTATION).map(String::as_str),
        now,
        may_issue: p.blocked.is_none(),
        retire: p.retire,
        policy_since,
    };
    let outcome = lifecycle::advance(&input, &mut status, &mut material, &mut minter);
    if status.keys.is_empty() && old.client_id.is_none() {
        // Blocked before its first key: no client ID either (it comes with the first key).
        status.client_id = None;
    }
    // Whether callers moved to the newer key, from the verifier's usage data.
    let handover = handover::evaluate(&p.rules, &status, now, p.usage);
    // A blocked ApiKey says what is blocked (new keys) and what still happens; an owner
    // with something to do about the handover reads it here too.
    let mut details = match &p.blocked {
        Some(b) if old.keys.is_empty() && status.keys.is_empty() => b.message.clone(),
        Some(b) => format!("{}; no new key is issued: {}", b.message, outcome.details),
        None => outcome.details.clone(),
    };
    if matches!(handover.reason, c::NEW_KEY_NOT_YET_USED | c::OLD_KEY_STILL_IN_USE) {
        details = format!("{details}; {}", handover.message);
    }

    // Ready: whether consumers hold a valid key. While the Secret cannot be written
    // (invalid spec, foreign or missing Secret), they hold the key already in api-key.
    let invalid_spec = p.blocked.as_ref().is_some_and(|b| b.reason == c::INVALID_SPEC);
    let may_write_secret = !p.foreign_secret && !invalid_spec && (p.blocked.is_none() || p.secret.is_some());
    // The active key after this reconcile's steps (nothing below changes the keys).
    let active = status.active_slot.and_then(|s| status.keys.iter().find(|k| k.slot == s)).cloned();
    let stuck = !may_write_secret
        && !old.keys.is_empty()
        && material.api_key != active.as_ref().map(|k| k.hash.clone());
    let ready = match (outcome.health, &p.blocked) {
        (Health::Ready, Some(b)) if stuck => Condition::new(
            c::READY,
            FALSE,
            b.reason,
            format!("{details}; the Secret cannot be written, so api-key does not hold the active key"),
            generation,
            now,
        ),
        (Health::Ready, _) => Condition::new(c::READY, TRUE, c::KEY_ACTIVE, details.clone(), generation, now),
        (Health::ExpiredInactive, _) => {
            Condition::new(c::READY, FALSE, c::KEY_EXPIRED_INACTIVE, details.clone(), generation, now)
        }
        (Health::Expired, Some(b)) => {
            Condition::new(c::READY, FALSE, b.reason, details.clone(), generation, now)
        }
        (Health::Expired, None) => {
            Condition::new(c::READY, FALSE, c::KEY_EXPIRED, details.clone(), generation, now)
        }
    };
    set_condition(&mut status.conditions, ready);
    let mut news = issuance_conditions(&mut status, p, generation, now);
    // The owner is recorded at the first reconcile and kept: an edit is refused here as
    // the CEL rule refuses it (from creation on) on clusters that run CEL.
    if status.owner.is_none() && !key.spec.owner.trim().is_empty() {
        status.owner = Some(key.spec.owner.trim().to_string());
    }
    let synced = match status.owner.as_deref().filter(|o| *o != key.spec.owner.trim()) {
        Some(owner) => {
            let message = format!(
                "{}: the keys stay issued to {owner:?}; set spec.owner back to {owner:?}, or create a new ApiKey for {:?}",
                crate::api::OWNER_IMMUTABLE_MESSAGE,
                shown(key.spec.owner.trim())
            );
            let before = find_condition(&old.conditions, c::SYNCED);
            if before.is_none_or(|b| b.reason != c::OWNER_IMMUTABLE || b.message != message) {
                news.push((c::OWNER_IMMUTABLE, message.clone()));
            }
            Condition::new(c::SYNCED, FALSE, c::OWNER_IMMUTABLE, message, generation, now)
        }
        None => Condition::new(c::SYNCED, TRUE, c::APPLIED, "everything was written", generation, now),
    };
    set_condition(&mut status.conditions, synced);
    set_condition(
        &mut status.conditions,
        Condition::new(
            c::HANDOVER,
            handover.status,
            handover.reason,
            handover.message.clone(),
            generation,
            now,
        ),
    );
    // Pods that read the Secret in a way no rotation reaches: a Warning per new one.
    let mut consumer_news = Vec::new();
    if let pods::Consumers::Known(problems) = &p.consumers {
        let before = find_condition(&old.conditions, c::CONSUMERS_FOLLOW)
            .filter(|b| b.reason == c::CONSUMER_CANNOT_FOLLOW)
            .map(|b| b.message.split("; ").map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_default();
        // The first MAX_LISTED are named (and warned about) one by one; the rest counted,
        // so neither the status nor the Events grow with what a namespace's pods do.
        let listed = &problems[..problems.len().min(MAX_LISTED_CONSUMERS)];
        consumer_news.extend(listed.iter().filter(|p| !before.contains(&p.message)).cloned());
        let condition = if problems.is_empty() {
            let message =
                "no pod reads the Secret through a subPath mount or as env vars outside spec.consumers";
            Condition::new(c::CONSUMERS_FOLLOW, TRUE, c::CONSUMERS_FOLLOW_ROTATION, message, generation, now)
        } else {
            let mut message = listed.iter().map(|p| p.message.as_str()).collect::<Vec<_>>().join("; ");
            if problems.len() > listed.len() {
                message.push_str(&format!("; and {} more", problems.len() - listed.len()));
            }
            Condition::new(c::CONSUMERS_FOLLOW, FALSE, c::CONSUMER_CANNOT_FOLLOW, message, generation, now)
        };
        set_condition(&mut status.conditions, condition);
    } else if p.consumers == pods::Consumers::NotWatched {
        // Pods not watched (any more), or a foreign Secret: nothing is claimed. (While
        // the pod watch has not listed, what was said before stands.)
        status.conditions.retain(|c| c.type_ != c::CONSUMERS_FOLLOW);
    }
    let on_schedule = p.blocked.is_none() && p.rules.automatic && p.rules.enforced && !p.rules.frozen;
    let warnings = notify::evaluate(&p.rules, &mut status, now, on_schedule, &handover);
    warnings::address(&mut status, &warnings.fire, p.policy.as_ref());
    let expiring = match &warnings.expiring {
        Some((threshold, end)) => Condition::new(
            c::EXPIRING,
            TRUE,
            c::EXPIRING_SOON,
            format!(
                "the active key expires at {} (within {threshold})",
                end.to_rfc3339_opts(SecondsFormat::Secs, true)
            ),
            generation,
            now,
        ),
        None => Condition::new(
            c::EXPIRING,
            FALSE,
            c::NOT_EXPIRING,
            "no warning threshold has passed",
            generation,
            now,
        ),
    };
    set_condition(&mut status.conditions, expiring);
    status.observed_generation = generation;
    status.next_action = outcome.next.as_ref().map(|n| n.action.as_str().to_string());
    status.next_action_at = outcome.next.as_ref().map(|n| n.at);
    status.details = Some(details);

    // The Secret is written only when this ApiKey owns it (or may create it), and not
    // while a spec field it is built from is invalid.
    let slots = secret::slot_material(existing, &minter.minted, |slot| {
        status.keys.iter().find(|k| k.slot == slot).map(|k| k.hash.clone())
    });
    // The first Secret of an ApiKey skips step 1 (see the apikey module docs).
    let first = p.secret.is_none() && old.keys.is_empty();
    let slots_first = (may_write_secret && !first && (!minter.minted.is_empty() || p.secret.is_none()))
        .then(|| Contents { slots: slots.clone(), active: None, client_id: client_id.clone() });
    let ready_active = active.as_ref().filter(|_| outcome.health == Health::Ready);
    let contents_active = ready_active.filter(|_| may_write_secret).and_then(|a| {
        // Only the key status knows: a slot edited to other material (the Secret is not
        // the record) never reaches `api-key` under the active key's ID.
        let material = slots.get(&a.slot).filter(|m| keys::hash(m) == a.hash)?;
        let expires = lifecycle::ceiling(a).map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true));
        Some(Contents {
            slots: slots.clone(),
            active: Some((material.clone(), a.key_id.clone(), expires)),
            client_id: client_id.clone(),
        })
    });
    // Env-var consumers roll out once per change of the active key.
    let changed =
        outcome.happenings.iter().any(|h| matches!(h, Happening::Flipped { .. } | Happening::Created { .. }));
    let roll = ready_active.filter(|_| !invalid_spec).map(|a| (a.key_id.clone(), changed));
    let old_key_in_use = old_key_in_use(&p.rules, &status, &handover, now);
    Plan {
        slots_first,
        status,
        active: contents_active,
        roll,
        happenings: outcome.happenings,
        news,
        consumer_news,
        fired: warnings.fire,
        step_at: outcome.next.as_ref().map(|n| n.at),
        warn_at: warnings.next,
        handover_at: handover.next,
        old_key_in_use,
        adopted: minter.adopted,
    }
}

/// Whether the older key is still in use after consumers moved and the first warning
/// threshold before its expiry has passed.
fn old_key_in_use(
    rules: &lifecycle::Rules,
    status: &ApiKeyStatus,
    handover: &handover::Handover,
    now: DateTime<Utc>,
) -> bool {
    let Some((key_id, _)) = &handover.still_in_use else { return false };
    let end = status.keys.iter().find(|k| k.key_id == *key_id).and_then(|k| k.effective_expires_at);
    let longest = rules.notify_before.first();
    match (end, longest) {
        (Some(end), Some((_, d))) => d.sub_from(end).is_ok_and(|t| t <= now),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored ApiKey and its Secret, as the writes of [`apply`] leave them.
    #[derive(Clone)]
    struct World {
        key: ApiKey,
        secret: Option<Secret>,
    }

    impl World {
        fn prepared(&self, rules: &lifecycle::Rules) -> Prepared {
            Prepared {
                policy: None,
                policy_allowed: true,
                rules: rules.clone(),
                lifetime: lifecycle::Lifetime { duration: rules.max_lifetime, clamped: None },
                secret_name: "svc".into(),
                secret: self.secret.clone(),
                foreign_secret: false,
                blocked: None,
                retire: false,
                usage: Default::default(),
                consumers: Default::default(),
            }
        }

        /// The first `writes` of the plan's writes (a crash after them).
        fn write(&mut self, plan: &Plan, writes: usize) {
            for write in plan.writes().into_iter().take(writes) {
                match write {
                    Write::Secret(c) => {
                        self.secret = Some(secret::desired(&self.key, "svc", self.secret.as_ref(), c));
                    }
                    Write::Status(status) => self.key.status = Some(status.clone()),
                }
            }
        }

        fn data(&self, field: &str) -> Option<String> {
            let bytes = self.secret.as_ref()?.data.as_ref()?.get(field)?;
            String::from_utf8(bytes.0.clone()).ok()
        }

        /// The promise, checked on what is stored: the key in `api-key` verifies (its
        /// hash is in status, valid at `now`), and every slot field's key is either in
        /// status or will be adopted by the next reconcile, never lost.
        fn check(&self, now: DateTime<Utc>, when: &str) {
            let keys = self.key.status.as_ref().map(|s| s.keys.clone()).unwrap_or_default();
            if let Some(held) = self.data(secret::data::API_KEY) {
                let hash = keys::hash(&held);
                let k = keys.iter().find(|k| k.hash == hash);
                assert!(
                    k.is_some_and(
                        |k| lifecycle::is_valid(k) && k.effective_expires_at.is_none_or(|t| t > now)
                    ),
                    "{when}: the key in api-key does not verify: {k:?}"
                );
            }
            // The active key and a waiting standby can be moved to: their material is in
            // the Secret (except before the first Secret exists, which is created whole
            // after status). A draining key's may be gone.
            if self.secret.is_some() {
                let held: Vec<String> = [secret::data::API_KEY, "primary", "secondary"]
                    .into_iter()
                    .filter_map(|f| self.data(f).map(|m| keys::hash(&m)))
                    .collect();
                let movable = |k: &&crate::api::KeyStatus| {
                    lifecycle::is_valid(k)
                        && (k.state == crate::api::KeyState::Active || k.activated_at.is_none())
                };
                for k in keys.iter().filter(movable) {
                    assert!(
                        held.contains(&k.hash),
                        "{when}: key {} is in status but not in the Secret",
                        k.key_id
                    );
                }
            }
        }
    }

    #[test]
    fn a_crash_between_any_two_writes_never_leaves_a_consumer_with_a_key_that_does_not_verify() {
        use chrono::TimeDelta;
        let mut spec = crate::api::KeyPolicySpec::default();
        spec.expiry.max_lifetime = "PT30S".into();
        spec.expiry.min_lifetime = "PT1S".into();
        spec.rotation.flip_before = "PT5S".into();
        spec.notifications.before = vec![];
        let t0 = DateTime::parse_from_rfc3339("2026-11-23T00:00:00Z").unwrap().to_utc();
        let rules = lifecycle::Rules::from_spec(&spec, t0 - TimeDelta::days(1)).unwrap();
        let mut key: ApiKey = serde_json::from_value(serde_json::json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": "svc", "namespace": "n", "uid": "u-1", "generation": 1},
            "spec": {"owner": "team"},
        }))
        .unwrap();
        let mut world = World { key: key.clone(), secret: None };
        let mut issued = std::collections::BTreeSet::new();
        for step in 0..200u32 {
            let now = t0 + TimeDelta::milliseconds(i64::from(step) * 500);
            if step == 90 {
                // A rotation request in the middle.
                key.annotations_mut().insert(ROTATE_ANNOTATION.into(), "r1".into());
                world.key.metadata.annotations = key.metadata.annotations.clone();
            }
            let plan = plan(&world.key, &world.prepared(&rules), now);
            let writes = plan.writes().len();
            // A crash after each prefix of the writes; the next reconcile (same instant)
            // must repair from whatever was stored. The run goes on from one of them.
            let mut outcomes = Vec::new();
            for crash_after in 0..=writes {
                let when = format!("step {step}, crash after {crash_after} of {writes} writes");
                let mut crashed = world.clone();
                crashed.write(&plan, crash_after);
                crashed.check(now, &when);
                let again = plan_of(&crashed, &rules, now);
                if crash_after >= 1 && plan.slots_first.is_some() {
                    let hashes = |s: &ApiKeyStatus| s.keys.iter().map(|k| k.hash.clone()).collect::<Vec<_>>();
                    assert_eq!(
                        hashes(&again.status),
                        hashes(&plan.status),
                        "{when}: material written before the crash is adopted, not issued again"
                    );
                }
                crashed.write(&again, usize::MAX);
                crashed.check(now, &format!("{when}, then recovered"));
                outcomes.push(crashed);
            }
            world = outcomes.swap_remove(step as usize % (writes + 1));
            issued.extend(world.key.status.iter().flat_map(|s| &s.keys).map(|k| k.key_id.clone()));
        }
        // 100 s of 30 s keys with a standby each half-life and one rotation: each key
        // once, and nothing issued twice for one step (a rotation adds one).
        assert!((7..=9).contains(&issued.len()), "{} keys issued: {issued:?}", issued.len());
    }

    #[test]
    fn consumers_that_cannot_follow_are_named_up_to_a_bound_and_warned_about_once() {
        let mut spec = crate::api::KeyPolicySpec::default();
        spec.expiry.max_lifetime = "P1D".into();
        let now = DateTime::parse_from_rfc3339("2026-11-23T00:00:00Z").unwrap().to_utc();
        let rules = lifecycle::Rules::from_spec(&spec, now).unwrap();
        let key: ApiKey = serde_json::from_value(serde_json::json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": "svc", "namespace": "n", "uid": "u-1", "generation": 1},
            "spec": {"owner": "team"},
        }))
        .unwrap();
        let mut world = World { key, secret: None };
        use crate::controller::pods::{Consumers, Problem, Workload};
        let problem = |i: usize| Problem {
            workload: Workload { api_version: "v1".into(), kind: "Pod".into(), name: format!("p{i:02}") },
            message: format!("Pod n/p{i:02} (container c) mounts the Secret with subPath at /k"),
        };
        let mut prepared = world.prepared(&rules);
        prepared.consumers = Consumers::Known((0..12).map(problem).collect());
        let first = plan(&world.key, &prepared, now);
        assert_eq!(first.consumer_news.len(), MAX_LISTED_CONSUMERS, "a Warning each for the named ones");
        let c = find_condition(&first.status.conditions, c::CONSUMERS_FOLLOW).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), (FALSE, c::CONSUMER_CANNOT_FOLLOW));
        assert!(
            c.message.contains("p09") && !c.message.contains("p10") && c.message.ends_with("; and 2 more")
        );
        // The next reconcile (status stored): the same problems are no news.
        world.key.status = Some(first.status.clone());
        assert!(plan(&world.key, &prepared, now).consumer_news.is_empty());
        // One fixed, a new one: only the new one is news; all fixed: True.
        prepared.consumers = Consumers::Known((1..13).map(problem).collect());
        let news: Vec<String> =
            plan(&world.key, &prepared, now).consumer_news.iter().map(|p| p.workload.name.clone()).collect();
        assert_eq!(news, ["p10"]);
        // Before the pod watch has listed (a restart): what was said stands, no news.
        prepared.consumers = Consumers::NotKnown;
        let unknown = plan(&world.key, &prepared, now);
        assert!(unknown.consumer_news.is_empty());
        let said = |plan: &Plan| find_condition(&plan.status.conditions, c::CONSUMERS_FOLLOW).cloned();
        assert_eq!(said(&unknown), said(&first));
        prepared.consumers = Consumers::Known(vec![]);
        let c = plan(&world.key, &prepared, now).status.conditions;
        assert_eq!(find_condition(&c, c::CONSUMERS_FOLLOW).unwrap().status, TRUE);
        // A controller that does not watch pods claims nothing.
        prepared.consumers = Consumers::NotWatched;
        let c = plan(&world.key, &prepared, now).status.conditions;
        assert!(find_condition(&c, c::CONSUMERS_FOLLOW).is_none());
    }

    fn plan_of(world: &World, rules: &lifecycle::Rules, now: DateTime<Utc>) -> Plan {
        plan(&world.key, &world.prepared(rules), now)
    }
}
