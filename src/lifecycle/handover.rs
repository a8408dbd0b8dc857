//! Handover: whether callers have moved from the older of an ApiKey's two keys to the
//! newer one, judged purely from status (each key's `lastUsedAt`, written by the
//! verifier) and `now`.
//!
//! A key is *in use* when its last recorded use is at most [`Usage::quiet`] old (twice
//! the verifier's flush interval: a key in constant use never looks older than one
//! interval). Callers *should have moved* once the newer key became active plus the
//! propagation allowance ([`allowance`]: half of `flipBefore`, at most 5 minutes, the
//! time a mounted Secret or a rollout takes to follow a flip). Before that, the older
//! key's use is expected: it is what `api-key` held.

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};

use super::{Rules, is_valid};
use crate::api::{ApiKeyStatus, KeyStatus, conditions as c};

/// Before consumers move, how often at most the handover state is looked at again only
/// to see whether the older key went quiet.
pub const RECHECK_BEFORE_FLIP: TimeDelta = TimeDelta::hours(1);

/// The most the propagation allowance after a flip is.
pub const MAX_ALLOWANCE: TimeDelta = TimeDelta::minutes(5);

/// How usage data is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// A key whose last recorded use is older than this is quiet.
    pub quiet: TimeDelta,
}

impl Usage {
    /// For a verifier that writes each key's last use at most once per `flush_interval`.
    pub fn for_flush_interval(flush_interval: std::time::Duration) -> Usage {
        Usage { quiet: TimeDelta::from_std(flush_interval * 2).unwrap_or(TimeDelta::minutes(2)) }
    }
}

impl Default for Usage {
    fn default() -> Self {
        Usage::for_flush_interval(std::time::Duration::from_secs(60))
    }
}

/// The handover state of one ApiKey.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handover {
    /// The condition's reason (one of the `Handover` reasons in `api::conditions`).
    pub reason: &'static str,
    /// The condition's status: `True` (nothing to do), `False` or `Unknown`.
    pub status: &'static str,
    /// What the owner should know or do, naming the keys (no timestamps that move with
    /// every use, so a steady state writes nothing).
    pub message: String,
    /// The older key, when it is still used after callers should have moved: (key ID,
    /// its last use).
    pub still_in_use: Option<(String, DateTime<Utc>)>,
    /// When this state changes with time alone (a key in use goes quiet).
    pub next: Option<DateTime<Utc>>,
}

/// Half of `flipBefore`, at most [`MAX_ALLOWANCE`]: how long after a flip the older key's
/// use still counts as consumers catching up.
pub fn allowance(rules: &Rules, at: DateTime<Utc>) -> TimeDelta {
    let flip_before = rules.flip_before.add_to(at).map(|t| t - at).unwrap_or_default();
    (flip_before / 2).min(MAX_ALLOWANCE)
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The two valid keys, older first (by creation); None unless there are exactly two
/// created at different instants.
pub fn pair(status: &ApiKeyStatus) -> Option<(&KeyStatus, &KeyStatus)> {
    let mut valid = status.keys.iter().filter(|k| is_valid(k));
    let (a, b) = (valid.next()?, valid.next()?);
    match a.created_at.cmp(&b.created_at) {
        std::cmp::Ordering::Less => Some((a, b)),
        std::cmp::Ordering::Greater => Some((b, a)),
        std::cmp::Ordering::Equal => None,
    }
}

/// When consumers were moved to `newer` and should have left `older`: the newer key's
/// activation plus the allowance. None while the older key is still the active one.
pub fn moved_at(rules: &Rules, older: &KeyStatus, newer: &KeyStatus) -> Option<DateTime<Utc>> {
    let flip = newer.activated_at?;
    // The older key active again after the newer one (a revocation or repair moved
    // consumers back): they have not moved.
    if older.activated_at.is_some_and(|o| o > flip) {
        return None;
    }
    Some(flip + allowance(rules, flip))
}

/// The handover state at `now`.
pub fn evaluate(rules: &Rules, status: &ApiKeyStatus, now: DateTime<Utc>, usage: Usage) -> Handover {
    let Some((older, newer)) = pair(status) else {
        return Handover {
            reason: c::SINGLE_KEY,
            status: crate::api::TRUE,
            message: "fewer than two valid keys: nothing to hand over".into(),
            still_in_use: None,
            next: None,
        };
    };
    let in_use = |k: &KeyStatus| k.last_used_at.filter(|t| now - *t <= usage.quiet);
    let moved = moved_at(rules, older, newer);
    // When to look again whether the older key went quiet: after consumers moved, as soon
    // as it can have (it decides `OldKeyStillInUse` and the drain); before that at most
    // hourly, since each look is a reconcile and both keys are in use for half of every
    // key's life (any usage event that changes the state, and every lifecycle step and
    // warning threshold, look anyway).
    let recheck = if moved.is_some() { usage.quiet } else { usage.quiet.max(RECHECK_BEFORE_FLIP) };
    let quiet_at = |t: DateTime<Utc>| t + recheck + TimeDelta::milliseconds(1);
    let (o, n) = (older, newer);
    let ends = |k: &KeyStatus| k.effective_expires_at.map(|t| format!(" (it stops verifying at {})", ts(t)));
    let name = |k: &KeyStatus| format!("the {} key {}", k.slot, k.key_id);
    let state = |reason: &'static str, status: &'static str, message: String| Handover {
        reason,
        status,
        message,
        still_in_use: None,
        next: in_use(o).map(quiet_at),
    };
    if o.last_used_at.is_none() && n.last_used_at.is_none() {
        return Handover {
            next: None,
            ..state(
                c::NO_USAGE_DATA,
                crate::api::UNKNOWN,
                format!(
                    "neither {} nor {} has a recorded use: no verifier reports usage for this ApiKey",
                    name(o),
                    name(n)
                ),
            )
        };
    }
    if let (Some(moved), Some(used)) = (moved, in_use(o))
        && used > moved
    {
        return Handover {
            still_in_use: Some((o.key_id.clone(), used)),
            ..state(
                c::OLD_KEY_STILL_IN_USE,
                crate::api::FALSE,
                format!(
                    "{} is still used after consumers moved to {}{}: load the {} key into the systems that still call with the {} key",
                    name(o),
                    name(n),
                    ends(o).unwrap_or_default(),
                    n.slot,
                    o.slot
                ),
            )
        };
    }
    if n.last_used_at.is_none() {
        let old_use = if in_use(o).is_some() { "is in use" } else { "is not in use" };
        return state(
            c::NEW_KEY_NOT_YET_USED,
            crate::api::FALSE,
            format!(
                "{} has not been used yet; {}{} {old_use}: load the {} key into the systems that call with it",
                name(n),
                name(o),
                ends(o).unwrap_or_default(),
                n.slot
            ),
        );
    }
    if in_use(o).is_some() {
        let when = match moved {
            Some(_) => "consumers are still catching up with the flip".to_string(),
            None => "callers that read api-key move at the flip".to_string(),
        };
        return state(
            c::BOTH_KEYS_IN_USE,
            crate::api::FALSE,
            format!(
                "both keys are in use: {} and {}{}; {when}",
                name(n),
                name(o),
                ends(o).unwrap_or_default()
            ),
        );
    }
    state(
        c::NEW_KEY_IN_USE,
        crate::api::TRUE,
        format!("{} is in use and {} is not: callers have switched", name(n), name(o)),
    )
}

/// Whether the older key may be retired early under `rotation.retireDrainedAfter`
/// (`after`): the newer key's last use is at least `after` later than the older key's
/// (or than its creation, if it was never used). That one comparison holds both
/// facts: the older key has been quiet that long, and usage was being recorded all the
/// while (a verifier that stopped reporting makes neither key look used).
pub fn drained(older: &KeyStatus, newer: &KeyStatus, after: &crate::duration::IsoDuration) -> bool {
    let quiet_since = older.last_used_at.unwrap_or(older.created_at);
    match (newer.last_used_at, after.add_to(quiet_since)) {
        (Some(used), Ok(enough)) => used >= enough,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::api::{ExpiryReason, KeyPolicySpec, KeyState, Slot};
    use crate::duration::IsoDuration;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
    }

    fn min(m: i64) -> DateTime<Utc> {
        t0() + TimeDelta::minutes(m)
    }

    fn key(slot: Slot, id: &str, created: i64, state: KeyState) -> KeyStatus {
        KeyStatus {
            slot,
            key_id: id.into(),
            hash: format!("sha256:{id}"),
            preview: "kw_x".into(),
            created_at: min(created),
            expires_at: Some(min(created + 1000)),
            effective_expires_at: Some(min(created + 1000)),
            cap: None,
            activated_at: None,
            last_used_at: None,
            state,
            expiry_reason: Some(ExpiryReason::MaxLifetime),
        }
    }

    /// Primary `p1` (created at 0, active since 0), Secondary `s1` (created at 500).
    fn before_flip() -> ApiKeyStatus {
        let mut p = key(Slot::Primary, "p1", 0, KeyState::Active);
        p.activated_at = Some(min(0));
        ApiKeyStatus {
            active_slot: Some(Slot::Primary),
            keys: vec![p, key(Slot::Secondary, "s1", 500, KeyState::Standby)],
            ..Default::default()
        }
    }

    /// The same after the flip to `s1` at minute 990.
    fn after_flip() -> ApiKeyStatus {
        let mut s = before_flip();
        s.active_slot = Some(Slot::Secondary);
        s.keys[0].state = KeyState::Standby;
        s.keys[1].state = KeyState::Active;
        s.keys[1].activated_at = Some(min(990));
        s
    }

    fn rules() -> Rules {
        Rules::from_spec(&KeyPolicySpec::default(), t0()).unwrap()
    }

    fn used(status: &mut ApiKeyStatus, id: &str, at: DateTime<Utc>) {
        status.keys.iter_mut().find(|k| k.key_id == id).unwrap().last_used_at = Some(at);
    }

    #[test]
    fn each_state_from_the_keys_last_uses() {
        let (r, u) = (rules(), Usage::default());
        let one =
            ApiKeyStatus { keys: vec![key(Slot::Primary, "p1", 0, KeyState::Active)], ..Default::default() };
        assert_eq!(evaluate(&r, &one, min(1), u).reason, c::SINGLE_KEY);

        let mut s = before_flip();
        assert_eq!(evaluate(&r, &s, min(600), u).reason, c::NO_USAGE_DATA);
        used(&mut s, "p1", min(599));
        let h = evaluate(&r, &s, min(600), u);
        assert_eq!((h.reason, h.status), (c::NEW_KEY_NOT_YET_USED, "False"));
        assert!(
            h.message.contains("s1 has not been used yet") && h.message.contains("is in use"),
            "{}",
            h.message
        );
        assert_eq!(
            h.next,
            Some(min(599 + 60) + TimeDelta::milliseconds(1)),
            "looked at again within the hour"
        );
        used(&mut s, "s1", min(600));
        assert_eq!(evaluate(&r, &s, min(600), u).reason, c::BOTH_KEYS_IN_USE, "expected before the flip");
        let h = evaluate(&r, &s, min(700), u);
        assert_eq!((h.reason, h.status, h.next), (c::NEW_KEY_IN_USE, "True", None));
    }

    #[test]
    fn the_old_key_used_after_the_flip_and_its_allowance_is_still_in_use_until_quiet() {
        let (r, u) = (rules(), Usage::default());
        // flipBefore PT10M: the allowance is 5 minutes.
        let mut s = after_flip();
        used(&mut s, "s1", min(991));
        used(&mut s, "p1", min(994));
        assert_eq!(evaluate(&r, &s, min(995), u).reason, c::BOTH_KEYS_IN_USE, "inside the allowance");
        used(&mut s, "p1", min(996));
        let h = evaluate(&r, &s, min(996), u);
        assert_eq!((h.reason, h.status), (c::OLD_KEY_STILL_IN_USE, "False"));
        assert_eq!(h.still_in_use, Some(("p1".into(), min(996))));
        assert!(
            h.message.contains("p1 is still used") && h.message.contains("stops verifying at"),
            "{}",
            h.message
        );
        // Quiet for twice the flush interval: it clears.
        let h = evaluate(&r, &s, min(999), u);
        assert_eq!((h.reason, h.still_in_use), (c::NEW_KEY_IN_USE, None));
    }

    #[test]
    fn drained_needs_the_newer_key_used_a_whole_quiet_period_after_the_older() {
        let after = IsoDuration::parse("PT1H").unwrap();
        let s = before_flip();
        let (mut o, mut n) = (s.keys[0].clone(), s.keys[1].clone());
        assert!(!drained(&o, &n, &after), "no usage data: never");
        o.last_used_at = Some(min(600));
        n.last_used_at = Some(min(659));
        assert!(!drained(&o, &n, &after));
        n.last_used_at = Some(min(660));
        assert!(drained(&o, &n, &after));
        // Never used: quiet since it was created.
        o.last_used_at = None;
        n.last_used_at = Some(min(59));
        assert!(!drained(&o, &n, &after));
        n.last_used_at = Some(min(60));
        assert!(drained(&o, &n, &after));
        // The verifier stopped reporting: the newer key's last use is old too, so the
        // older key's silence proves nothing.
        o.last_used_at = Some(min(600));
        n.last_used_at = Some(min(601));
        assert!(!drained(&o, &n, &after));
    }
}
