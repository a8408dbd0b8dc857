//! Warnings, decided purely from status.
//!
//! Expiry warnings: which `notifications.before` threshold of the active key's effective
//! expiry has passed, whether it already fired (`status.notified`, so each fires once
//! across restarts), and when the next one is due. A key created after some thresholds
//! already passed gets one warning (the nearest), not one per past threshold, and only
//! when it means something: while its successor is on schedule (automatic rotation,
//! nothing blocked) a threshold the key was born inside is not news (a 30-day key under a
//! 30-day threshold), so it waits for the next threshold; if the successor goes off
//! schedule, it fires then. Nor is a warning sent when there is nothing to do: the
//! successor is already in use and the expiring key is quiet (handover `NewKeyInUse`).
//!
//! A key whose end a cap moved earlier (a policy change: a shrink, a move to another
//! policy, a new default) is news whatever it was born inside: "born inside" is judged
//! against the expiry the key was issued with, and the nearest threshold passed after the
//! move fires once more, with the old and the new expiry and the reason.
//!
//! Still-in-use warnings (`KeyStillInUse`): while the handover finds the older key still
//! used after consumers moved off it, the same thresholds before that key's effective
//! expiry fire for it, each once; they stop when it goes quiet.

use chrono::{DateTime, Utc};

use super::Rules;
use super::handover::{self, Handover};
use crate::api::{ApiKeyStatus, ExpiryReason, KeyState, KeyStatus, Notified, Slot, conditions as c};
use crate::duration::IsoDuration;

/// Threshold name recorded for the one-time warning about a key that never expires.
pub const NON_EXPIRING: &str = "NonExpiring";
/// Warning kind (Event reason, webhook `type`): a threshold before a key's expiry passed.
pub const KEY_EXPIRING_SOON: &str = "KeyExpiringSoon";
/// Warning kind: the key never expires (expiry disabled).
pub const NON_EXPIRING_KEY: &str = "NonExpiringKey";
/// Warning kind: the key is still used after consumers moved to its successor.
pub const KEY_STILL_IN_USE: &str = "KeyStillInUse";

/// The other valid key, newer than the one warned about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Successor {
    /// Its ID.
    pub key_id: String,
    /// Its slot.
    pub slot: Slot,
    /// Its last recorded use.
    pub last_used_at: Option<DateTime<Utc>>,
}

/// A warning to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// [`KEY_EXPIRING_SOON`], [`NON_EXPIRING_KEY`] or [`KEY_STILL_IN_USE`].
    pub kind: &'static str,
    /// The key it is about.
    pub key_id: String,
    /// Its slot.
    pub slot: Slot,
    /// The threshold (`P7D`), or [`NON_EXPIRING`].
    pub threshold: String,
    /// The key's effective expiry (None: never).
    pub expires_at: Option<DateTime<Utc>>,
    /// Whether a valid standby key is ready for consumers.
    pub standby_ready: bool,
    /// The key's last recorded use.
    pub last_used_at: Option<DateTime<Utc>>,
    /// The newer valid key, if there is one, and its last use.
    pub successor: Option<Successor>,
    /// The handover state's reason (the `Handover` condition) when the warning was made.
    pub handover: Option<String>,
    /// The key's end moved earlier: the expiry it had before (the last one warned about,
    /// else the one it was issued with; None: it had none), and why it moved.
    pub moved: Option<(Option<DateTime<Utc>>, ExpiryReason)>,
}

/// Result of [`evaluate`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Warnings {
    /// Warnings to send now (already recorded in `status.notified`).
    pub fire: Vec<Notice>,
    /// The threshold currently passed for the active key: (threshold, expiry).
    pub expiring: Option<(String, DateTime<Utc>)>,
    /// When the next threshold passes.
    pub next: Option<DateTime<Utc>>,
}

fn reference() -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH
}

/// The kind a recorded warning is of.
pub fn kind_of(n: &Notified) -> &'static str {
    match n.kind.as_deref() {
        Some(KEY_STILL_IN_USE) => KEY_STILL_IN_USE,
        _ if n.threshold == NON_EXPIRING => NON_EXPIRING_KEY,
        _ => KEY_EXPIRING_SOON,
    }
}

/// The warning of `kind` about `key` for `threshold`, with the handover facts in `status`.
fn notice(status: &ApiKeyStatus, key: &KeyStatus, kind: &'static str, threshold: &str) -> Notice {
    let successor = handover::pair(status).filter(|(o, _)| o.key_id == key.key_id).map(|(_, n)| Successor {
        key_id: n.key_id.clone(),
        slot: n.slot,
        last_used_at: n.last_used_at,
    });
    Notice {
        kind,
        key_id: key.key_id.clone(),
        slot: key.slot,
        threshold: threshold.to_string(),
        expires_at: key.effective_expires_at,
        standby_ready: status
            .keys
            .iter()
            .any(|k| k.slot != key.slot && k.state == KeyState::Standby && k.activated_at.is_none()),
        last_used_at: key.last_used_at,
        successor,
        handover: crate::api::find_condition(&status.conditions, c::HANDOVER).map(|h| h.reason.to_string()),
        moved: None,
    }
}

/// Whether a cap moved `key`'s end earlier than the last end its owner was told of (the
/// latest expiry warning's, else the expiry it was issued with): that end and the reason.
pub(crate) fn moved_earlier(
    key: &KeyStatus,
    recorded: &[&Notified],
) -> Option<(Option<DateTime<Utc>>, ExpiryReason)> {
    let end = key.effective_expires_at?;
    // Only a policy cap moves a live key's end earlier; an owner-limit cap ends it at once.
    let reason = key.expiry_reason.filter(|r| *r == ExpiryReason::PolicyChange)?;
    let told = match recorded.iter().max_by_key(|n| n.at) {
        // The key never expired, and its owner was told so.
        Some(n) if n.threshold == NON_EXPIRING => None,
        // A warning recorded before ends were: nothing to compare with.
        Some(n) => Some(n.expires_at?),
        None => key.expires_at,
    };
    // A second of slack: ends are computed from second-precision times.
    told.is_none_or(|t| end + chrono::TimeDelta::seconds(1) < t).then_some((told, reason))
}

/// Of `rules`' thresholds before `end`, those passed at `now` (longest first), and when
/// the next one passes.
fn passed(
    rules: &Rules,
    end: DateTime<Utc>,
    now: DateTime<Utc>,
) -> (Vec<&(String, IsoDuration)>, Option<DateTime<Utc>>) {
    let at = |d: &IsoDuration| d.sub_from(end).ok();
    // Thresholds are sorted longest first, so the passed ones are a prefix.
    let passed: Vec<&(String, IsoDuration)> =
        rules.notify_before.iter().take_while(|(_, d)| at(d).is_some_and(|t| t <= now)).collect();
    let next = rules.notify_before.get(passed.len()).and_then(|(_, d)| at(d));
    (passed, next)
}

/// Whether a warning for threshold `d` (or a shorter one) is among `recorded`.
fn already(rules: &Rules, recorded: &[&Notified], text: &str, d: &IsoDuration) -> bool {
    let length = |d: &IsoDuration| d.add_to(reference()).ok();
    recorded.iter().any(|n| {
        n.threshold == text
            || rules.notify_before.iter().any(|(t, rd)| *t == n.threshold && length(rd) <= length(d))
    })
}

/// Decide the warnings at `now`, recording fired ones in `status.notified` (and
/// forgetting entries of keys no longer in status): the active key's expiry warnings,
/// and the still-in-use warnings of the older key per `handover`.
/// `successor_on_schedule`: a new key will be issued and flipped to before the active key
/// ends without anyone acting (automatic rotation under an enforced policy, not blocked).
pub fn evaluate(
    rules: &Rules,
    status: &mut ApiKeyStatus,
    now: DateTime<Utc>,
    successor_on_schedule: bool,
    handover: &Handover,
) -> Warnings {
    let mut out = Warnings::default();
    let ids: Vec<String> = status.keys.iter().map(|k| k.key_id.clone()).collect();
    status.notified.retain(|n| ids.contains(&n.key_id));
    still_in_use(rules, status, now, handover, &mut out);
    let Some(active) = status
        .active_slot
        .and_then(|s| status.keys.iter().find(|k| k.slot == s && k.state == KeyState::Active))
    else {
        return record(status, out, now);
    };
    let recorded: Vec<&Notified> = status
        .notified
        .iter()
        .filter(|n| n.key_id == active.key_id && kind_of(n) != KEY_STILL_IN_USE)
        .collect();
    let Some(end) = active.effective_expires_at else {
        if !rules.enforced && recorded.iter().all(|n| n.threshold != NON_EXPIRING) {
            out.fire.push(notice(status, active, NON_EXPIRING_KEY, NON_EXPIRING));
        }
        return record(status, out, now);
    };
    let (passed, next) = passed(rules, end, now);
    out.next = [out.next, next].into_iter().flatten().min();
    if let Some((text, d)) = passed.last() {
        out.expiring = Some((text.clone(), end));
        // Judged against the expiry the key was issued with: a cap that moved its end is
        // news, not a birth.
        let born_inside = active
            .expires_at
            .and_then(|issued| d.sub_from(issued).ok())
            .is_some_and(|t| t <= active.activated_at.unwrap_or(active.created_at));
        let moved = moved_earlier(active, &recorded);
        // Nothing to do: callers already use the successor, and nobody has used this key
        // since the successor was issued (a few quiet minutes prove nothing about a
        // caller that calls once a month).
        let moot = handover.reason == c::NEW_KEY_IN_USE
            && handover::pair(status).is_some_and(|(older, newer)| {
                older.key_id == active.key_id && older.last_used_at.is_none_or(|u| u < newer.created_at)
            });
        if moved.is_some() && !moot {
            out.fire.push(Notice { moved, ..notice(status, active, KEY_EXPIRING_SOON, text) });
        } else if !already(rules, &recorded, text, d) && (!born_inside || !successor_on_schedule) && !moot {
            out.fire.push(notice(status, active, KEY_EXPIRING_SOON, text));
        }
    }
    record(status, out, now)
}

/// The older key's still-in-use warnings (see the module docs).
fn still_in_use(
    rules: &Rules,
    status: &ApiKeyStatus,
    now: DateTime<Utc>,
    handover: &Handover,
    out: &mut Warnings,
) {
    let Some((key_id, _)) = &handover.still_in_use else { return };
    let Some(key) = status.keys.iter().find(|k| k.key_id == *key_id) else { return };
    let Some(end) = key.effective_expires_at else { return };
    let recorded: Vec<&Notified> =
        status.notified.iter().filter(|n| n.key_id == *key_id && kind_of(n) == KEY_STILL_IN_USE).collect();
    let (passed, next) = passed(rules, end, now);
    out.next = next;
    if let Some((text, d)) = passed.last()
        && !already(rules, &recorded, text, d)
    {
        out.fire.push(notice(status, key, KEY_STILL_IN_USE, text));
    }
}

/// The warning `n` records, as it reads now (the key's current end, standby and
/// handover), while its key is still in status.
pub fn notice_for(status: &ApiKeyStatus, n: &Notified) -> Option<Notice> {
    let key = status.keys.iter().find(|k| k.key_id == n.key_id)?;
    let moved = n.reason.map(|r| (n.previous_expires_at, r));
    Some(Notice { moved, ..notice(status, key, kind_of(n), &n.threshold) })
}

fn record(status: &mut ApiKeyStatus, out: Warnings, now: DateTime<Utc>) -> Warnings {
    for n in &out.fire {
        status.notified.push(Notified {
            key_id: n.key_id.clone(),
            threshold: n.threshold.clone(),
            at: now,
            pending: vec![],
            kind: (n.kind == KEY_STILL_IN_USE).then(|| KEY_STILL_IN_USE.to_string()),
            expires_at: n.expires_at,
            reason: n.moved.map(|(_, r)| r),
            previous_expires_at: n.moved.and_then(|(t, _)| t),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use chrono::{TimeDelta, TimeZone};

    use super::*;
    use crate::api::{ExpiryReason, KeyPolicySpec, KeyStatus};

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
    }

    fn status_expiring_in(days: i64, created_days_ago: i64) -> ApiKeyStatus {
        let end = t0() + TimeDelta::days(days);
        ApiKeyStatus {
            active_slot: Some(Slot::Primary),
            keys: vec![KeyStatus {
                slot: Slot::Primary,
                key_id: "k1".into(),
                hash: "sha256:1".into(),
                preview: "kw_abcd".into(),
                created_at: t0() - TimeDelta::days(created_days_ago),
                expires_at: Some(end),
                effective_expires_at: Some(end),
                cap: None,
                activated_at: Some(t0() - TimeDelta::days(created_days_ago)),
                last_used_at: None,
                state: KeyState::Active,
                expiry_reason: Some(ExpiryReason::MaxLifetime),
            }],
            ..Default::default()
        }
    }

    /// [`evaluate`] with the handover as the status shows it.
    fn ev(rules: &Rules, status: &mut ApiKeyStatus, now: DateTime<Utc>, on_schedule: bool) -> Warnings {
        let h = handover::evaluate(rules, status, now, handover::Usage::default());
        evaluate(rules, status, now, on_schedule, &h)
    }

    fn rules() -> Rules {
        Rules::from_spec(&KeyPolicySpec::default(), t0()).unwrap()
    }

    #[test]
    fn each_threshold_fires_once_in_order() {
        let rules = rules();
        let mut status = status_expiring_in(60, 30);
        let w = ev(&rules, &mut status, t0(), true);
        assert!(w.fire.is_empty() && w.expiring.is_none());
        assert_eq!(w.next, Some(t0() + TimeDelta::days(30)));
        let fired: Vec<(i64, Vec<String>)> = [30, 31, 53, 59, 59]
            .into_iter()
            .map(|d| {
                let w = ev(&rules, &mut status, t0() + TimeDelta::days(d), true);
                (d, w.fire.into_iter().map(|n| n.threshold).collect())
            })
            .collect();
        assert_eq!(
            fired,
            vec![
                (30, vec!["P30D".into()]),
                (31, vec![]),
                (53, vec!["P7D".into()]),
                (59, vec!["P1D".into()]),
                (59, vec![])
            ]
        );
        assert_eq!(status.notified.len(), 3);
    }

    #[test]
    fn a_short_lived_key_gets_one_warning_for_past_thresholds() {
        // Its successor is not on schedule (rotation blocked or manual): the nearest
        // past threshold fires at once.
        let rules = rules();
        let mut status = status_expiring_in(5, 0);
        let w = ev(&rules, &mut status, t0(), false);
        assert_eq!(w.fire.iter().map(|n| n.threshold.as_str()).collect::<Vec<_>>(), ["P7D"]);
        assert_eq!(w.expiring.as_ref().unwrap().0, "P7D");
        assert_eq!(w.next, Some(t0() + TimeDelta::days(4)));
        assert!(ev(&rules, &mut status, t0() + TimeDelta::hours(1), false).fire.is_empty());
    }

    #[test]
    fn a_threshold_a_key_is_born_inside_is_not_news_while_its_successor_is_on_schedule() {
        // The demo's case: a 30-day key under a 30-day threshold.
        let rules = rules();
        let mut status = status_expiring_in(30, 0);
        let w = ev(&rules, &mut status, t0(), true);
        assert!(w.fire.is_empty(), "no warning at birth: {:?}", w.fire);
        assert_eq!(w.expiring.as_ref().unwrap().0, "P30D", "the condition still says where the key stands");
        // The next threshold, which the key was not born inside, fires as usual.
        let w = ev(&rules, &mut status, t0() + TimeDelta::days(23), true);
        assert_eq!(w.fire.iter().map(|n| n.threshold.as_str()).collect::<Vec<_>>(), ["P7D"]);
        // Born inside, and then the successor goes off schedule (blocked): it fires then.
        let mut status = status_expiring_in(30, 0);
        assert!(ev(&rules, &mut status, t0(), true).fire.is_empty());
        let w = ev(&rules, &mut status, t0() + TimeDelta::days(2), false);
        assert_eq!(w.fire.iter().map(|n| n.threshold.as_str()).collect::<Vec<_>>(), ["P30D"]);
    }

    #[test]
    fn a_larger_threshold_never_fires_after_a_smaller_one() {
        let rules = rules();
        let mut status = status_expiring_in(5, 0);
        ev(&rules, &mut status, t0(), false);
        // Used heavily: the inactivity deadline moved the expiry out to 20 days.
        status.keys[0].effective_expires_at = Some(t0() + TimeDelta::days(20));
        assert!(ev(&rules, &mut status, t0() + TimeDelta::days(1), false).fire.is_empty());
    }

    #[test]
    fn forgotten_with_the_key_and_once_for_non_expiring() {
        let rules = rules();
        let mut status = status_expiring_in(5, 0);
        ev(&rules, &mut status, t0(), false);
        status.keys[0].key_id = "k2".into();
        ev(&rules, &mut status, t0(), false);
        assert!(status.notified.iter().all(|n| n.key_id == "k2"), "{:?}", status.notified);

        let mut spec = KeyPolicySpec::default();
        spec.expiry.mode = crate::api::ExpiryMode::Disabled;
        spec.expiry.acknowledge_risk = true;
        let disabled = Rules::from_spec(&spec, t0()).unwrap();
        let mut status = status_expiring_in(5, 0);
        status.keys[0].effective_expires_at = None;
        assert_eq!(ev(&disabled, &mut status, t0(), false).fire[0].threshold, NON_EXPIRING);
        assert!(ev(&disabled, &mut status, t0(), false).fire.is_empty());
    }

    /// `status_expiring_in(days, created_days_ago)` plus a waiting Secondary `k2`, created
    /// `standby_days_ago`.
    fn with_standby(mut status: ApiKeyStatus, standby_days_ago: i64) -> ApiKeyStatus {
        let mut k2 = status.keys[0].clone();
        k2.slot = Slot::Secondary;
        k2.key_id = "k2".into();
        k2.hash = "sha256:2".into();
        k2.created_at = t0() - TimeDelta::days(standby_days_ago);
        k2.expires_at = Some(t0() + TimeDelta::days(90));
        k2.effective_expires_at = k2.expires_at;
        k2.activated_at = None;
        k2.state = KeyState::Standby;
        status.keys.push(k2);
        status
    }

    #[test]
    fn no_expiry_warning_when_the_successor_is_in_use_and_the_expiring_key_is_quiet() {
        let rules = rules();
        let mut status = with_standby(status_expiring_in(10, 80), 35);
        status.keys[0].last_used_at = Some(t0() - TimeDelta::days(40));
        status.keys[1].last_used_at = Some(t0() - TimeDelta::seconds(10));
        let w = ev(&rules, &mut status, t0(), true);
        assert!(w.fire.is_empty(), "nothing to do: {:?}", w.fire);
        assert_eq!(w.expiring.as_ref().unwrap().0, "P30D", "the condition still says where the key stands");
        // A caller that calls once a month used the key after its successor was issued:
        // quiet for days proves nothing, so it is warned.
        let mut monthly = with_standby(status_expiring_in(10, 80), 35);
        monthly.keys[0].last_used_at = Some(t0() - TimeDelta::days(3));
        monthly.keys[1].last_used_at = Some(t0() - TimeDelta::seconds(10));
        assert_eq!(ev(&rules, &mut monthly, t0(), true).fire.len(), 1);
        // The expiring key is used again: the warning is news after all, with the facts.
        status.keys[0].last_used_at = Some(t0() + TimeDelta::hours(1));
        let w = ev(&rules, &mut status, t0() + TimeDelta::hours(1), true);
        assert_eq!(w.fire.len(), 1);
        let n = &w.fire[0];
        assert_eq!((n.kind, n.threshold.as_str()), (KEY_EXPIRING_SOON, "P30D"));
        assert_eq!(n.last_used_at, Some(t0() + TimeDelta::hours(1)));
        assert_eq!(
            n.successor,
            Some(Successor {
                key_id: "k2".into(),
                slot: Slot::Secondary,
                last_used_at: Some(t0() - TimeDelta::seconds(10))
            })
        );
    }

    #[test]
    fn a_key_still_used_after_the_flip_is_warned_about_at_each_threshold_until_quiet() {
        let rules = rules();
        // k1 ends in 10 days; consumers moved to k2 a day ago (flipBefore aside).
        let mut status = with_standby(status_expiring_in(10, 80), 35);
        status.active_slot = Some(Slot::Secondary);
        status.keys[0].state = KeyState::Standby;
        status.keys[1].state = KeyState::Active;
        status.keys[1].activated_at = Some(t0() - TimeDelta::days(1));
        status.keys[1].last_used_at = Some(t0());
        status.keys[0].last_used_at = Some(t0());
        let w = ev(&rules, &mut status, t0(), true);
        let fired: Vec<(&str, &str, &str)> =
            w.fire.iter().map(|n| (n.kind, n.key_id.as_str(), n.threshold.as_str())).collect();
        assert_eq!(fired, [(KEY_STILL_IN_USE, "k1", "P30D")], "the nearest passed threshold, once");
        assert_eq!(status.notified[0].kind.as_deref(), Some(KEY_STILL_IN_USE));
        assert_eq!(w.next, Some(t0() + TimeDelta::days(3)), "the P7D threshold of k1");
        assert!(ev(&rules, &mut status, t0(), true).fire.is_empty(), "once per threshold");
        // Still used at P7D: it fires again.
        let at = t0() + TimeDelta::days(3);
        status.keys[0].last_used_at = Some(at);
        status.keys[1].last_used_at = Some(at);
        let w = ev(&rules, &mut status, at, true);
        assert_eq!(w.fire.iter().map(|n| n.threshold.as_str()).collect::<Vec<_>>(), ["P7D"]);
        // Quiet by P1D: nothing more.
        let at = t0() + TimeDelta::days(9);
        status.keys[1].last_used_at = Some(at);
        assert!(ev(&rules, &mut status, at, true).fire.is_empty());
    }
}
