//! The key lifecycle as a pure function: given the policy's rules, the ApiKey's spec,
//! its status, which key material the consumer Secret holds, and `now`, run every step
//! that is due (in order, so a controller that was down catches up) and say what comes
//! next and when. No I/O: the controller supplies new key material through [`Mint`].
//!
//! Steps, in priority order, repeated until none is due:
//! 1. revoke keys listed in `spec.revokedKeys`;
//! 2. expire keys past their effective expiry (an active key that dies of inactivity
//!    retires the whole ApiKey until a rotation is requested);
//! 3. a new `keyward.dev/rotate` value: new key in the standby slot, flip at once, the
//!    old active key stays valid for `flipBefore` (`Rotated`); it waits while the
//!    standby slot holds a key consumers may still hold (in `api-key`, or drained by a
//!    flip less than `flipBefore` ago);
//! 4. the first key, in the primary slot;
//! 5. no valid active key: flip to a valid standby, else issue one and flip;
//! 6. the active key's material is gone from the Secret: move consumers to a key whose
//!    material is there (issue one if needed), keep the old hash until it expires;
//! 7. the standby slot: (re)issue it when due (`secondaryAt` into the active key's life,
//!    and never before its previous key has expired), at once when it was revoked, and
//!    at once when a waiting standby would end with or before the active key (a
//!    retroactive cap can give both the same end) while a fresh one would outlive it;
//! 8. flip to the newer standby `flipBefore` before the active key's expiry, capped at
//!    half of the two keys' overlap;
//! 9. early retirement (`rotation.retireDrainedAfter`): once the newer key has been used
//!    and the older one has been quiet that long ([`handover::drained`]), flip to the
//!    newer key at once if the older one is active, and cap the older key `flipBefore`
//!    after consumers left it (`Drained`). The cap stays only while that holds: a use of
//!    the older key before it ends lifts it again.
//!
//! While issuance is blocked ([`Input::may_issue`] false) steps 1, 2, 5 (flip to a valid
//! standby), 6 (flip to a standby whose material is there) and 8 run; nothing is issued.
//! An ApiKey that lost its place under its owner's limits ([`Input::retire`]) has every
//! valid key capped at `now` (`OwnerLimit`), so step 2 ends them.

pub mod handover;
pub mod notify;
mod rules;

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};

pub use rules::{Lifetime, PolicyProblem, Rules, SecondaryAt, observed_expiry, parse_secondary_at};

use crate::api::{ApiKeyStatus, ExpiryCap, ExpiryReason, KeyState, KeyStatus, PolicyBinding, Slot};
use crate::duration::IsoDuration;
use crate::keys::KeyFacts;

/// Everything the engine reads besides the status.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    /// The policy's rules.
    pub rules: &'a Rules,
    /// Lifetime of newly issued keys (validated against the policy).
    pub lifetime: IsoDuration,
    /// `spec.revokedKeys`.
    pub revoked: &'a [String],
    /// The `keyward.dev/rotate` annotation's value.
    pub rotate_request: Option<&'a str>,
    /// The current time.
    pub now: DateTime<Utc>,
    /// Whether new keys may be issued. False while the ApiKey is blocked (policy gone,
    /// owner limit, foreign Secret, …): the safety steps (revocation, expiry, the
    /// policy cap, flips to a key already issued) still run; nothing new is issued.
    pub may_issue: bool,
    /// The ApiKey lost its place under its owner's limits: every valid key ends now
    /// (`OwnerLimit`). Implies `may_issue` false.
    pub retire: bool,
    /// Since when the ApiKey is under its current policy (`status.policy.since`): it
    /// moved to another policy, or another became the default. A retroactive cap, and idle time, count from here as from
    /// the policy's own `maxLifetimeSince`. None: as long as the ApiKey has been there.
    pub policy_since: Option<DateTime<Utc>>,
}

/// Hashes of the key material the consumer Secret holds per slot (`primary`,
/// `secondary`), updated as keys are minted, and of what it holds in `api-key`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Material {
    /// Hash of `data.api-key`: a key whose hash this is keeps its place in status
    /// until `api-key` has moved on (unless revoked), and counts as having its material
    /// (the controller restores its slot field from `api-key`).
    pub api_key: Option<String>,
    /// Hash of `data.primary`.
    pub primary: Option<String>,
    /// Hash of `data.secondary`.
    pub secondary: Option<String>,
}

impl Material {
    /// Hash of the material in `slot`.
    pub fn get(&self, slot: Slot) -> Option<&str> {
        match slot {
            Slot::Primary => self.primary.as_deref(),
            Slot::Secondary => self.secondary.as_deref(),
        }
    }
    fn set(&mut self, slot: Slot, hash: String) {
        match slot {
            Slot::Primary => self.primary = Some(hash),
            Slot::Secondary => self.secondary = Some(hash),
        }
    }
}

/// Source of new key material. The engine only ever sees the public facts.
pub trait Mint {
    /// A new key for `slot` (the implementation keeps the material for the Secret).
    fn mint(&mut self, slot: Slot) -> KeyFacts;
}

/// Something that happened to the keys (becomes an Event and a metric).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Happening {
    /// A key was issued.
    Created {
        /// Its slot.
        slot: Slot,
        /// Its ID.
        key_id: String,
    },
    /// Consumers moved to another key.
    Flipped {
        /// The new active slot.
        to: Slot,
        /// The new active key.
        key_id: String,
    },
    /// A key stopped verifying.
    Expired {
        /// Its slot.
        slot: Slot,
        /// Its ID.
        key_id: String,
        /// Why.
        reason: ExpiryReason,
    },
    /// A key was revoked.
    Revoked {
        /// Its slot.
        slot: Slot,
        /// Its ID.
        key_id: String,
    },
    /// A requested rotation ran.
    Rotated,
    /// The Secret lacked a key's material; a key was issued or flipped to in its place.
    Repaired {
        /// The slot whose material was missing.
        slot: Slot,
    },
    /// A drained key is retired early (`rotation.retireDrainedAfter`): it ends at `at`.
    Retiring {
        /// Its slot.
        slot: Slot,
        /// Its ID.
        key_id: String,
        /// When it stops verifying.
        at: DateTime<Utc>,
    },
    /// A key being retired early was used again: it keeps its scheduled end.
    RetirementCancelled {
        /// Its slot.
        slot: Slot,
        /// Its ID.
        key_id: String,
    },
}

/// What the controller does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextAction {
    /// Issue the standby key.
    CreateStandby,
    /// Move consumers to the standby key.
    Flip,
    /// Replace an expired key in its slot.
    Regenerate,
    /// A key stops verifying.
    Expire,
    /// A requested rotation, once consumers have left the key it would replace.
    Rotate,
}

impl NextAction {
    /// Name in `status.nextAction`.
    pub fn as_str(self) -> &'static str {
        match self {
            NextAction::CreateStandby => "CreateStandby",
            NextAction::Flip => "Flip",
            NextAction::Regenerate => "Regenerate",
            NextAction::Expire => "Expire",
            NextAction::Rotate => "Rotate",
        }
    }
}

/// The next scheduled step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Next {
    /// What.
    pub action: NextAction,
    /// When.
    pub at: DateTime<Utc>,
}

/// Whether consumers hold a valid key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// The active key is valid.
    Ready,
    /// The active key expired for inactivity; nothing is issued until a rotation is requested.
    ExpiredInactive,
    /// No valid key and none will be issued automatically.
    Expired,
}

/// Result of [`advance`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// What happened, in order.
    pub happenings: Vec<Happening>,
    /// The next step, if any.
    pub next: Option<Next>,
    /// Whether consumers hold a valid key.
    pub health: Health,
    /// One sentence: what happens next and why.
    pub details: String,
}

/// Whether `k` is neither expired nor revoked.
pub fn is_valid(k: &KeyStatus) -> bool {
    matches!(k.state, KeyState::Active | KeyState::Standby)
}

fn key(status: &ApiKeyStatus, slot: Slot) -> Option<&KeyStatus> {
    status.keys.iter().find(|k| k.slot == slot)
}

fn key_mut(status: &mut ApiKeyStatus, slot: Slot) -> Option<&mut KeyStatus> {
    status.keys.iter_mut().find(|k| k.slot == slot)
}

/// Whether the Secret holds `k`'s material: in its slot field, or in `api-key` (from
/// where the controller restores a slot field that was edited away).
fn has_material(material: &Material, k: &KeyStatus) -> bool {
    material.get(k.slot) == Some(k.hash.as_str()) || material.api_key.as_deref() == Some(k.hash.as_str())
}

/// End of a key's life not counting inactivity: `min(expiresAt, cap)`.
pub fn ceiling(k: &KeyStatus) -> Option<DateTime<Utc>> {
    match (k.expires_at, k.cap) {
        (Some(e), Some(c)) => Some(e.min(c.at)),
        (e, c) => e.or(c.map(|c| c.at)),
    }
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Slot::Primary => "Primary",
            Slot::Secondary => "Secondary",
        })
    }
}

struct Engine<'a, 'm> {
    input: &'a Input<'a>,
    status: &'a mut ApiKeyStatus,
    material: &'a mut Material,
    mint: &'m mut dyn Mint,
    happenings: Vec<Happening>,
}

/// Record in `status.policy` that the ApiKey is under the policy `name` at `now`: the
/// same one as recorded keeps its time; another one is a move, from `now`. An ApiKey
/// that has keys but no record yet (made before keyward recorded this) gets its oldest
/// key's creation, which moves no cap. Returns since when it is under the policy.
pub fn bind_policy(status: &mut ApiKeyStatus, name: &str, now: DateTime<Utc>) -> DateTime<Utc> {
    let since = match &status.policy {
        Some(b) if b.name == name => b.since,
        Some(_) => now,
        None => status.keys.iter().map(|k| k.created_at).min().unwrap_or(now),
    };
    status.policy = Some(PolicyBinding { name: name.to_string(), since });
    since
}

/// Run every due step on `status` (see the module docs) and say what comes next.
pub fn advance(
    input: &Input,
    status: &mut ApiKeyStatus,
    material: &mut Material,
    mint: &mut dyn Mint,
) -> Outcome {
    let mut engine = Engine { input, status, material, mint, happenings: Vec::new() };
    // Each step changes state so that it is no longer due; the bound is a safety net.
    for _ in 0..32 {
        engine.refresh();
        if !engine.step() {
            break;
        }
    }
    engine.refresh();
    engine.status.keys.sort_by_key(|k| k.slot);
    let (health, next, details) = engine.summarize();
    Outcome { happenings: engine.happenings, next, health, details }
}

impl Engine<'_, '_> {
    fn now(&self) -> DateTime<Utc> {
        self.input.now
    }

    fn rules(&self) -> &Rules {
        self.input.rules
    }

    /// Since when the current policy's `maxLifetime` applies to this ApiKey: the later
    /// of the policy's own change and the ApiKey's move under it.
    fn rules_since(&self) -> DateTime<Utc> {
        let since = self.input.rules.max_lifetime_since;
        self.input.policy_since.map_or(since, |moved| moved.max(since))
    }

    /// Recompute the policy cap and the effective expiry of every valid key.
    fn refresh(&mut self) {
        let rules = self.input.rules;
        if self.input.retire {
            let now = self.now();
            for k in self.status.keys.iter_mut().filter(|k| is_valid(k)) {
                if ceiling(k).is_none_or(|c| c > now) {
                    k.cap = Some(ExpiryCap { at: now, reason: ExpiryReason::OwnerLimit });
                    k.effective_expires_at = Some(now);
                    k.expiry_reason = Some(ExpiryReason::OwnerLimit);
                }
            }
        }
        if rules.frozen {
            // No usable policy: keep every end as last computed, except an inactivity
            // deadline, which cannot be moved by use without the policy's timeout: a
            // key in use must not die of a stale one (its ceiling still applies); and an
            // early retirement, which without the policy could not be cancelled by use.
            self.lift_drained_cap_of_a_used_key();
            for k in self.status.keys.iter_mut().filter(|k| is_valid(k)) {
                if matches!(k.expiry_reason, Some(ExpiryReason::Inactivity | ExpiryReason::Drained)) {
                    k.effective_expires_at = ceiling(k);
                    k.expiry_reason = k
                        .cap
                        .map(|c| c.reason)
                        .filter(|_| ceiling(k) == k.cap.map(|c| c.at))
                        .or(k.expires_at.map(|_| ExpiryReason::MaxLifetime));
                }
            }
            return;
        }
        self.keep_rotated_key_while_held();
        self.lift_drained_cap_of_a_used_key();
        let since = self.rules_since();
        // A cap newly applied to the key consumers hold (a shrink, a move, a policy seen
        // late) leaves them a whole flip lead from now (`flipBefore`, at most a quarter of
        // the shortest lifetime), however far in the past it lands; once applied it is
        // kept (a cap only ever comes earlier), so later reconciles never move it on.
        let held_floor = self.standby_margin().map(|margin| self.now() + margin / 2);
        // Idle time counts from when the current rules reached this ApiKey (a move, or a
        // recorded policy change such as a new `inactivityTimeout`), plus the lead.
        let rules_reached = self
            .input
            .policy_since
            .max(rules.max_lifetime_since_recorded.then_some(rules.max_lifetime_since))
            .and_then(|t| rules.flip_before.add_to(t).ok());
        for k in self.status.keys.iter_mut().filter(|k| is_valid(k)) {
            if rules.enforced {
                let base = k.created_at.max(since);
                let held = self.material.api_key.as_deref() == Some(k.hash.as_str());
                if let Ok(policy_cap) = rules.max_lifetime.add_to(base)
                    && let policy_cap = held_floor.filter(|_| held).map_or(policy_cap, |f| policy_cap.max(f))
                    && ceiling(k).is_none_or(|c| policy_cap < c)
                {
                    k.cap = Some(ExpiryCap { at: policy_cap, reason: ExpiryReason::PolicyChange });
                }
            }
            let mut effective = k.expires_at.map(|t| (t, ExpiryReason::MaxLifetime));
            if let Some(cap) = k.cap
                && effective.is_none_or(|(t, _)| cap.at < t)
            {
                effective = Some((cap.at, cap.reason));
            }
            if k.state == KeyState::Active
                && rules.enforced
                && let Some(timeout) = rules.inactivity_timeout
                // Consumers take up to flipBefore to start using a newly active key (a
                // flip, a rotation, the first key): its idle time counts from then, so
                // it cannot die unused (retiring the ApiKey) before they could use it.
                && let Some(from) = k
                    .last_used_at
                    .max(k.activated_at.map(|a| rules.flip_before.add_to(a).unwrap_or(a)))
                    .max(rules_reached)
                && let Ok(deadline) = timeout.add_to(from)
                && effective.is_none_or(|(t, _)| deadline < t)
            {
                effective = Some((deadline, ExpiryReason::Inactivity));
            }
            k.effective_expires_at = effective.map(|(t, _)| t);
            k.expiry_reason = effective.map(|(_, r)| r);
        }
    }

    /// A key being retired early (`Drained`) keeps that cap only while the retirement
    /// still holds ([`handover::drained`]): once it is used again (or the policy no longer
    /// retires drained keys), the cap goes and its scheduled end applies.
    fn lift_drained_cap_of_a_used_key(&mut self) {
        let after = self.rules().retire_drained_after;
        let pair = handover::pair(self.status).map(|(o, n)| (o.key_id.clone(), n.clone()));
        for k in self.status.keys.iter_mut().filter(|k| is_valid(k)) {
            if k.cap.is_none_or(|c| c.reason != ExpiryReason::Drained) {
                continue;
            }
            let holds = match (&pair, &after) {
                (Some((older, newer)), Some(after)) => {
                    *older == k.key_id && handover::drained(k, newer, after)
                }
                _ => false,
            };
            if !holds {
                k.cap = None;
                self.happenings
                    .push(Happening::RetirementCancelled { slot: k.slot, key_id: k.key_id.clone() });
            }
        }
    }

    /// A key a rotation (or an early retirement) moved consumers off stays valid
    /// `flipBefore` after it left `api-key`, not after the flip: when the write that
    /// moves `api-key` failed, its `Rotated` or `Drained` cap moves with the retry (never
    /// past its own end).
    fn keep_rotated_key_while_held(&mut self) {
        let now = self.now();
        let Some(in_api_key) = self.material.api_key.clone() else { return };
        let active = self.status.active_slot;
        let Ok(until) = self.rules().flip_before.add_to(now) else { return };
        let Some(k) = self.status.keys.iter_mut().find(|k| {
            k.hash == in_api_key
                && Some(k.slot) != active
                && is_valid(k)
                && k.effective_expires_at.is_some_and(|t| t > now)
        }) else {
            return;
        };
        let Some(cap) = k
            .cap
            .filter(|c| matches!(c.reason, ExpiryReason::Rotated | ExpiryReason::Drained) && c.at < until)
        else {
            return;
        };
        // The policy cap, if lower, is applied again right after (see `refresh`).
        let limit = k.expires_at.map_or(until, |e| e.min(until));
        if limit > cap.at {
            k.cap = Some(ExpiryCap { at: limit, reason: cap.reason });
        }
    }

    /// Apply the first due step; false when nothing is due.
    fn step(&mut self) -> bool {
        self.revoke()
            || self.expire()
            || (self.input.may_issue && self.rotate_on_request())
            || (!self.retired()
                && (self.first_key()
                    || self.replace_invalid_active()
                    || self.repair_active()
                    || self.standby()
                    || self.flip_when_due()
                    || self.retire_drained()))
    }

    /// Step 9: retire the older key early once it has drained (see the module docs). The
    /// cap is `flipBefore` after consumers left it (now, when this flips them), never
    /// earlier, and only ever shortens its life.
    fn retire_drained(&mut self) -> bool {
        let Some(after) = self.rules().retire_drained_after else { return false };
        let Some((older, newer)) = handover::pair(self.status).map(|(o, n)| (o.clone(), n.clone())) else {
            return false;
        };
        if !handover::drained(&older, &newer, &after)
            || older.cap.is_some_and(|c| c.reason == ExpiryReason::Drained)
        {
            return false;
        }
        let now = self.now();
        // Consumers still hold an active older key: move them first (a newer key that has
        // been active before, or whose material is gone, cannot take them).
        if older.state == KeyState::Active
            && (newer.activated_at.is_some() || !has_material(self.material, &newer))
        {
            return false;
        }
        // A whole `flipBefore` from now, also for a key consumers left long ago: the
        // drain of a flip made now, and for a caller that still uses the key the time in
        // which its use cancels the retirement (while `api-key` still holds the key, the
        // end follows, see `keep_rotated_key_while_held`).
        let Ok(end) = self.rules().flip_before.add_to(now) else { return false };
        if ceiling(&older).is_some_and(|c| c <= end) {
            return false;
        }
        if older.state == KeyState::Active {
            self.activate(newer.slot);
        }
        if let Some(k) = key_mut(self.status, older.slot) {
            k.cap = Some(ExpiryCap { at: end, reason: ExpiryReason::Drained });
        }
        self.happenings.push(Happening::Retiring { slot: older.slot, key_id: older.key_id.clone(), at: end });
        true
    }

    fn revoke(&mut self) -> bool {
        let now = self.now();
        let revoked = self.input.revoked;
        let Some(k) = self.status.keys.iter_mut().find(|k| is_valid(k) && revoked.contains(&k.key_id)) else {
            return false;
        };
        k.state = KeyState::Revoked;
        k.effective_expires_at = Some(now);
        k.expiry_reason = Some(ExpiryReason::Revoked);
        self.happenings.push(Happening::Revoked { slot: k.slot, key_id: k.key_id.clone() });
        true
    }

    fn expire(&mut self) -> bool {
        let now = self.now();
        let Some(k) = self
            .status
            .keys
            .iter_mut()
            .find(|k| is_valid(k) && k.effective_expires_at.is_some_and(|t| t <= now))
        else {
            return false;
        };
        let was_active = k.state == KeyState::Active;
        let reason = k.expiry_reason.unwrap_or(ExpiryReason::MaxLifetime);
        k.state = KeyState::Expired;
        self.happenings.push(Happening::Expired { slot: k.slot, key_id: k.key_id.clone(), reason });
        if was_active && reason == ExpiryReason::Inactivity {
            // An abandoned ApiKey is retired whole: its other key goes too, unless callers
            // use that one (an external system loaded with the standby early): then the
            // ApiKey is not abandoned, and consumers flip to it (step 5).
            let timeout = self.input.rules.inactivity_timeout;
            let material = &*self.material;
            let in_use = |k: &KeyStatus| {
                has_material(material, k)
                    && k.last_used_at.zip(timeout).is_some_and(|(u, t)| t.add_to(u).is_ok_and(|d| d > now))
            };
            for other in self.status.keys.iter_mut().filter(|k| is_valid(k) && !in_use(k)) {
                other.state = KeyState::Expired;
                other.effective_expires_at = Some(now);
                other.expiry_reason = Some(ExpiryReason::Inactivity);
                self.happenings.push(Happening::Expired {
                    slot: other.slot,
                    key_id: other.key_id.clone(),
                    reason: ExpiryReason::Inactivity,
                });
            }
        }
        true
    }

    fn active(&self) -> Option<&KeyStatus> {
        self.status.active_slot.and_then(|s| key(self.status, s))
    }

    /// The active key died of inactivity and no other key is left (it went too, unless
    /// in use): nothing more until a rotation is requested.
    fn retired(&self) -> bool {
        self.active().is_some_and(|k| {
            k.state == KeyState::Expired && k.expiry_reason == Some(ExpiryReason::Inactivity)
        }) && !self.status.keys.iter().any(is_valid)
    }

    fn rotate_on_request(&mut self) -> bool {
        let Some(request) = self.input.rotate_request.filter(|r| !r.trim().is_empty()) else { return false };
        if self.status.rotation_request.as_deref() == Some(request) || self.rotation_waits().is_some() {
            return false;
        }
        self.status.rotation_request = Some(request.to_string());
        let now = self.now();
        let cut = self.rules().flip_before.add_to(now).unwrap_or(now);
        if let Some(slot) = self.status.active_slot
            && let Some(a) = key_mut(self.status, slot).filter(|k| is_valid(k))
            && ceiling(a).is_none_or(|c| cut < c)
        {
            a.cap = Some(ExpiryCap { at: cut, reason: ExpiryReason::Rotated });
        }
        let target = self.status.active_slot.map_or(Slot::Primary, Slot::other);
        self.issue(target);
        self.activate(target);
        self.happenings.push(Happening::Rotated);
        true
    }

    /// A requested rotation not run yet.
    fn rotation_pending(&self) -> Option<&str> {
        let request = self.input.rotate_request.filter(|r| !r.trim().is_empty())?;
        (self.status.rotation_request.as_deref() != Some(request)).then_some(request)
    }

    /// Until when a rotation must wait: the standby slot holds a valid key that consumers
    /// may still hold (it is in `api-key`, or the flip away from it was less than
    /// `flipBefore` ago), which a rotation would replace. None: it may run now.
    fn rotation_waits(&self) -> Option<(DateTime<Utc>, KeyStatus)> {
        let active = self.active()?;
        let other = key(self.status, active.slot.other()).filter(|k| is_valid(k))?;
        if self.material.api_key.as_deref() == Some(other.hash.as_str()) {
            return Some((self.now(), other.clone()));
        }
        other.activated_at?;
        let drained = self.rules().flip_before.add_to(active.activated_at?).ok()?;
        let until = other.effective_expires_at.map_or(drained, |end| drained.min(end));
        (until > self.now()).then(|| (until, other.clone()))
    }

    fn first_key(&mut self) -> bool {
        if !self.input.may_issue {
            return false;
        }
        if !self.status.keys.is_empty() {
            return false;
        }
        self.issue(Slot::Primary);
        self.activate(Slot::Primary);
        true
    }

    fn replace_invalid_active(&mut self) -> bool {
        if self.active().is_some_and(is_valid) {
            return false;
        }
        let other = self.status.active_slot.map_or(Slot::Primary, Slot::other);
        let ends_soon = |k: &KeyStatus| {
            let lead = self.standby_margin().unwrap_or_default();
            ceiling(k).is_some_and(|end| end < self.now() + lead)
        };
        if let Some(k) = key(self.status, other)
            && is_valid(k)
            && has_material(self.material, k)
            && !(self.input.may_issue
                && self.active().is_some_and(|a| a.state == KeyState::Revoked)
                && ends_soon(k))
        {
            self.activate(other);
            return true;
        }
        let active_revoked = self.active().is_some_and(|k| k.state == KeyState::Revoked);
        if self.input.may_issue && (self.rules().automatic || !self.rules().enforced || active_revoked) {
            // The other slot may hold a draining key consumers still use (its material
            // gone, so it cannot be flipped to): a revoked active key's slot takes the
            // new key instead.
            let target = match (self.status.active_slot, key(self.status, other)) {
                (Some(slot), Some(k)) if active_revoked && is_valid(k) => slot,
                _ => other,
            };
            self.issue(target);
            self.activate(target);
            return true;
        }
        false
    }

    fn repair_active(&mut self) -> bool {
        let Some(slot) = self.status.active_slot else { return false };
        if self.active().is_none_or(|k| has_material(self.material, k)) {
            return false;
        }
        let other = slot.other();
        if !key(self.status, other).is_some_and(|k| is_valid(k) && has_material(self.material, k)) {
            if !self.input.may_issue {
                return false;
            }
            self.happenings.push(Happening::Repaired { slot });
            self.issue(other);
        } else {
            self.happenings.push(Happening::Repaired { slot });
        }
        self.activate(other);
        true
    }

    /// The end a key issued at `at` would have (None: never).
    fn fresh_ceiling(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let rules = self.rules();
        if !rules.enforced {
            return None;
        }
        let lifetime = self.input.lifetime.add_to(at).ok();
        let cap = rules.max_lifetime.add_to(at.max(self.rules_since())).ok();
        match (lifetime, cap) {
            (Some(l), Some(c)) => Some(l.min(c)),
            (l, c) => l.or(c),
        }
    }

    /// The lead a standby needs over the active key: a standby must outlive the active
    /// key by twice the flip lead, so that after consumers move to it (a lead before the
    /// active key ends) its own successor can be issued once the old key has drained and
    /// still be flipped to a whole lead before the standby ends. The lead is `flipBefore`,
    /// at most a quarter of the shortest lifetime a new key gets.
    fn standby_margin(&self) -> Option<chrono::TimeDelta> {
        let rules = self.rules();
        let base = self.now();
        let span = |d: IsoDuration| d.add_to(base).ok().map(|t| t - base);
        let shortest = span(self.input.lifetime)?.min(span(rules.max_lifetime)?);
        Some(span(rules.flip_before)?.min(shortest / 4) * 2)
    }

    /// When a waiting standby that would not outlive the active key by the margin (one
    /// policy change capped both, or both were issued at one instant) is replaced: as
    /// soon as a fresh key would; None when no key issued before the active key ends would
    /// outlive it at all.
    fn replacement_at(&self, active_end: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let rules = self.rules();
        let target = active_end + self.standby_margin()?;
        let earliest = [self.input.lifetime.sub_from(target).ok(), rules.max_lifetime.sub_from(target).ok()];
        let mut at = earliest.into_iter().flatten().max()?.max(self.now());
        let after_since = self.rules_since() + chrono::TimeDelta::seconds(1);
        if self.fresh_ceiling(at).is_some_and(|fresh| fresh < target) && after_since > at {
            // Capped from maxLifetimeSince: a key issued before then gets no later end.
            at = after_since;
        }
        (at < active_end && self.fresh_ceiling(at).is_none_or(|fresh| fresh > active_end)).then_some(at)
    }

    /// When the standby slot is (re)issued next, and as what step; None: it is not on
    /// any schedule. The one schedule both [`Self::standby`] and the summary read.
    fn standby_due(&self) -> Option<(DateTime<Utc>, NextAction)> {
        let active = self.active().filter(|k| is_valid(k))?;
        let now = self.now();
        let scheduled = if self.rules().automatic && !self.rules().frozen && ceiling(active).is_some() {
            self.rules().secondary_due(active.created_at, ceiling(active))
        } else {
            None
        };
        match key(self.status, active.slot.other()) {
            Some(s) if is_valid(s) && s.activated_at.is_none() => {
                // A waiting standby must have its material (or it could never be flipped
                // to) and must outlive the active key, or consumers would flip to a key
                // that dies with the one they leave (both capped by one policy change).
                if !has_material(self.material, s) {
                    return Some((now, NextAction::Regenerate));
                }
                // Only a standby that a policy cap shortened, or that was issued together
                // with the active key, is judged by the margin; one issued on schedule is
                // never replaced unless it would die with the active key (an external
                // system may have been loaded with it).
                let capped = s.cap.is_some_and(|c| c.reason == ExpiryReason::PolicyChange);
                let together = s.created_at <= active.created_at;
                match (ceiling(s), ceiling(active), self.standby_margin()) {
                    (Some(s_end), Some(a_end), Some(margin))
                        if s_end <= a_end || ((capped || together) && s_end < a_end + margin) =>
                    {
                        self.replacement_at(a_end).map(|at| (at, NextAction::Regenerate))
                    }
                    _ => None,
                }
            }
            // Draining: its slot is regenerated on schedule once it has ended.
            Some(s) if is_valid(s) => {
                let end = s.effective_expires_at?;
                scheduled.map(|due| (due.max(end), NextAction::Regenerate))
            }
            previous => {
                let revoked = previous.is_some_and(|k| k.state == KeyState::Revoked);
                let due = if revoked { Some(now) } else { scheduled }?;
                let action =
                    if previous.is_some() { NextAction::Regenerate } else { NextAction::CreateStandby };
                Some((due, action))
            }
        }
    }

    fn standby(&mut self) -> bool {
        if !self.input.may_issue || self.standby_due().is_none_or(|(at, _)| at > self.now()) {
            return false;
        }
        let Some(slot) = self.status.active_slot else { return false };
        let other = slot.other();
        match key(self.status, other) {
            Some(s) if is_valid(s) && s.activated_at.is_some() => return false,
            Some(s)
                if !is_valid(s)
                    && s.state != KeyState::Revoked
                    && self.material.api_key.as_deref() == Some(s.hash.as_str()) =>
            {
                // Still in api-key: replace it once consumers have moved on (next reconcile).
                return false;
            }
            Some(s) if is_valid(s) && !has_material(self.material, s) => {
                self.happenings.push(Happening::Repaired { slot: other });
            }
            _ => {}
        }
        self.issue(other);
        true
    }

    /// When consumers move from `active` to the newer `standby`.
    fn flip_at(&self, active: &KeyStatus, standby: &KeyStatus) -> Option<DateTime<Utc>> {
        let end = ceiling(active)?;
        let by_flip_before = self.rules().flip_before.sub_from(end).ok()?;
        let mid_overlap = standby.created_at + (end - standby.created_at) / 2;
        Some(by_flip_before.max(mid_overlap))
    }

    fn newer_standby(&self) -> Option<(KeyStatus, KeyStatus)> {
        let active = self.active().filter(|k| is_valid(k))?.clone();
        let standby = key(self.status, active.slot.other())?;
        (is_valid(standby) && standby.activated_at.is_none() && has_material(self.material, standby))
            .then(|| (active, standby.clone()))
    }

    fn flip_when_due(&mut self) -> bool {
        let Some((active, standby)) = self.newer_standby() else { return false };
        if self.flip_at(&active, &standby).is_some_and(|t| t <= self.now()) {
            self.activate(standby.slot);
            return true;
        }
        false
    }

    /// A fresh key in `slot`, as standby (replacing whatever the slot held).
    fn issue(&mut self, slot: Slot) {
        let facts = self.mint.mint(slot);
        let now = self.now();
        let expires_at = if self.rules().enforced { self.input.lifetime.add_to(now).ok() } else { None };
        let fresh = KeyStatus {
            slot,
            key_id: facts.key_id.clone(),
            hash: facts.hash.clone(),
            preview: facts.preview,
            created_at: now,
            expires_at,
            effective_expires_at: expires_at,
            cap: None,
            activated_at: None,
            last_used_at: None,
            state: KeyState::Standby,
            expiry_reason: expires_at.map(|_| ExpiryReason::MaxLifetime),
        };
        self.status.keys.retain(|k| k.slot != slot);
        self.status.keys.push(fresh);
        self.material.set(slot, facts.hash);
        self.happenings.push(Happening::Created { slot, key_id: facts.key_id });
    }

    /// Make `slot` the active key; the previous active key (if still valid) drains as standby.
    fn activate(&mut self, slot: Slot) {
        let now = self.now();
        for k in self.status.keys.iter_mut() {
            if k.slot == slot {
                k.state = KeyState::Active;
                k.activated_at = Some(now);
            } else if k.state == KeyState::Active {
                k.state = KeyState::Standby;
            }
        }
        let first = self.status.active_slot.is_none();
        self.status.active_slot = Some(slot);
        if !first {
            let key_id = key(self.status, slot).map(|k| k.key_id.clone()).unwrap_or_default();
            self.happenings.push(Happening::Flipped { to: slot, key_id });
        }
    }

    fn summarize(&self) -> (Health, Option<Next>, String) {
        let Some(active) = self.active() else {
            return (Health::Expired, None, "no key has been issued".into());
        };
        if self.retired() {
            let when = active.effective_expires_at.map(ts).unwrap_or_default();
            return (
                Health::ExpiredInactive,
                None,
                format!(
                    "the active key {} expired for inactivity at {when}; set annotation keyward.dev/rotate to issue a new key",
                    active.key_id
                ),
            );
        }
        if !is_valid(active) && !self.input.may_issue {
            let when = active.effective_expires_at.map(ts).unwrap_or_default();
            return (
                Health::Expired,
                None,
                format!(
                    "no valid key: the active key {} ended at {when} and no new key can be issued",
                    active.key_id
                ),
            );
        }
        if !is_valid(active) {
            let when = active.effective_expires_at.map(ts).unwrap_or_default();
            return (
                Health::Expired,
                None,
                format!(
                    "no valid key: the active key {} ended at {when} and rotation is not automatic; set annotation keyward.dev/rotate to issue a new key",
                    active.key_id
                ),
            );
        }
        let mut candidates: Vec<(DateTime<Utc>, NextAction, String)> = Vec::new();
        let other = key(self.status, active.slot.other());
        if let Some((a, s)) = self.newer_standby()
            && let Some(at) = self.flip_at(&a, &s)
        {
            candidates.push((
                at,
                NextAction::Flip,
                format!(
                    "moves consumers to the {} key {} at {}, before the {} key {} expires at {}",
                    s.slot,
                    s.key_id,
                    ts(at),
                    a.slot,
                    a.key_id,
                    ceiling(&a).map(ts).unwrap_or_default()
                ),
            ));
        }
        if let Some((at, action)) = self.standby_due().filter(|_| self.input.may_issue) {
            let slot = active.slot.other();
            let text = match (action, other.filter(|s| is_valid(s))) {
                (NextAction::Regenerate, Some(s)) if s.activated_at.is_some() => format!(
                    "regenerates the {} key at {} (key {} stops verifying at {})",
                    s.slot,
                    ts(at),
                    s.key_id,
                    s.effective_expires_at.map(ts).unwrap_or_default()
                ),
                (_, Some(s)) => format!(
                    "replaces the waiting {} key {} at {}: it would not outlive the active key {} (ends {})",
                    s.slot,
                    s.key_id,
                    ts(at),
                    active.key_id,
                    ceiling(active).map(ts).unwrap_or_default()
                ),
                (action, None) => {
                    let verb = if action == NextAction::CreateStandby { "creates" } else { "regenerates" };
                    let why = match (other.map(|k| k.state), self.rules().secondary_at) {
                        (Some(KeyState::Revoked), _) => format!(
                            "its key {} was revoked",
                            other.map(|k| k.key_id.as_str()).unwrap_or_default()
                        ),
                        (_, SecondaryAt::Percent(p)) => format!("{p}% into the {} key's life", active.slot),
                        (_, SecondaryAt::After(d)) => {
                            format!("{d} after the {} key was created", active.slot)
                        }
                    };
                    format!("{verb} the {slot} key at {} ({why})", ts(at))
                }
            };
            candidates.push((at, action, text));
        }
        if self.input.may_issue
            && let Some(request) = self.rotation_pending()
            && let Some((until, held)) = self.rotation_waits()
        {
            candidates.push((
                until,
                NextAction::Rotate,
                format!(
                    "rotates at {} as requested ({request:?}): consumers may still hold the {} key {} until then",
                    ts(until),
                    held.slot,
                    held.key_id
                ),
            ));
        }
        // A draining key stops verifying at its end (whether or not its slot is regenerated then).
        if let Some(s) = other.filter(|s| is_valid(s) && s.activated_at.is_some())
            && let Some(end) = s.effective_expires_at
        {
            candidates.push((
                end,
                NextAction::Expire,
                format!("the {} key {} stops verifying at {}", s.slot, s.key_id, ts(end)),
            ));
        }
        if let Some(end) = active.effective_expires_at {
            let text = if active.expiry_reason == Some(ExpiryReason::Inactivity) {
                format!("the active key {} expires {} for inactivity unless used", active.key_id, ts(end))
            } else {
                format!("the active key {} expires at {}", active.key_id, ts(end))
            };
            candidates.push((end, NextAction::Expire, text));
        }
        let (next, text) = match candidates.into_iter().min_by_key(|(at, _, _)| *at) {
            Some((at, action, text)) => (Some(Next { action, at }), text),
            None => (None, "keys never expire: the policy has expiry disabled".into()),
        };
        // After a flip that left too little lead, that; else whether this ApiKey's keys
        // can get too little (a shorter spec.lifetime than the policy was judged at).
        let note =
            self.short_flip_lead(active).or_else(|| self.rules().lifetime_flip_note(&self.input.lifetime));
        match note {
            Some(note) => (Health::Ready, next, format!("{text}; {note}")),
            None => (Health::Ready, next, text),
        }
    }

    /// When the last flip left consumers less than `minFlipLead` before the key they left
    /// ends (while that key still verifies): what to know. Derived from status alone, so
    /// it reads the same on every reconcile until that key ends.
    fn short_flip_lead(&self, active: &KeyStatus) -> Option<String> {
        if self.rules().frozen {
            return None;
        }
        let flipped = active.activated_at?;
        let left =
            key(self.status, active.slot.other()).filter(|k| is_valid(k) && k.activated_at.is_some())?;
        let end = left.effective_expires_at?;
        let min = self.rules().min_flip_lead;
        let lead = end - flipped;
        (min.add_to(flipped).ok()? > end).then(|| {
            format!(
                "the flip to the {} key {} at {} came {} before the {} key {} ends, less than \
                 rotation.minFlipLead {min}: consumers that read a mounted Secret may send that key after it ends",
                active.slot,
                active.key_id,
                ts(flipped),
                rules::whole_seconds(lead),
                left.slot,
                left.key_id,
            )
        })
    }
}

#[cfg(test)]
mod tests;
