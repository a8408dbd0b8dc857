//! Expiry warnings, decided purely from status: which `notifications.before`
//! threshold of the active key's effective expiry has passed, whether it already
//! fired (`status.notified`, so each fires once across restarts), and when the next
//! one is due. A key created after some thresholds already passed gets one warning
//! (the nearest), not one per past threshold, and only when it means something: while
//! its successor is on schedule (automatic rotation, nothing blocked) a threshold the
//! key was born inside is not news (a 30-day key under a 30-day threshold), so it waits
//! for the next threshold; if the successor goes off schedule, it fires then.

use chrono::{DateTime, Utc};

use super::Rules;
use crate::api::{ApiKeyStatus, KeyState, Notified, Slot};

/// Threshold name recorded for the one-time warning about a key that never expires.
pub const NON_EXPIRING: &str = "NonExpiring";

/// A warning to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
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

/// Decide the warnings for the active key at `now`, recording fired ones in
/// `status.notified` (and forgetting entries of keys no longer in status).
/// `successor_on_schedule`: a new key will be issued and flipped to before this one ends
/// without anyone acting (automatic rotation under an enforced policy, not blocked).
pub fn evaluate(
    rules: &Rules,
    status: &mut ApiKeyStatus,
    now: DateTime<Utc>,
    successor_on_schedule: bool,
) -> Warnings {
    let mut out = Warnings::default();
    let ids: Vec<String> = status.keys.iter().map(|k| k.key_id.clone()).collect();
    status.notified.retain(|n| ids.contains(&n.key_id));
    let Some(active) = status
        .active_slot
        .and_then(|s| status.keys.iter().find(|k| k.slot == s && k.state == KeyState::Active))
    else {
        return out;
    };
    let standby_ready = status
        .keys
        .iter()
        .any(|k| k.slot != active.slot && k.state == KeyState::Standby && k.activated_at.is_none());
    let notice = |threshold: &str| Notice {
        key_id: active.key_id.clone(),
        slot: active.slot,
        threshold: threshold.to_string(),
        expires_at: active.effective_expires_at,
        standby_ready,
    };
    let recorded: Vec<&Notified> = status.notified.iter().filter(|n| n.key_id == active.key_id).collect();
    let Some(end) = active.effective_expires_at else {
        if !rules.enforced && recorded.iter().all(|n| n.threshold != NON_EXPIRING) {
            out.fire.push(notice(NON_EXPIRING));
        }
        return record(status, out, now);
    };
    // Thresholds are sorted longest first, so the passed ones are a prefix.
    let at = |d: &crate::duration::IsoDuration| d.sub_from(end).ok();
    let passed: Vec<&(String, crate::duration::IsoDuration)> =
        rules.notify_before.iter().take_while(|(_, d)| at(d).is_some_and(|t| t <= now)).collect();
    out.next = rules.notify_before.get(passed.len()).and_then(|(_, d)| at(d));
    if let Some((text, d)) = passed.last() {
        out.expiring = Some((text.clone(), end));
        let length = |d: &crate::duration::IsoDuration| d.add_to(reference()).ok();
        let already = recorded.iter().any(|n| {
            n.threshold == *text
                || rules.notify_before.iter().any(|(t, rd)| *t == n.threshold && length(rd) <= length(d))
        });
        let born_inside = at(d).is_some_and(|t| t <= active.activated_at.unwrap_or(active.created_at));
        if !already && (!born_inside || !successor_on_schedule) {
            out.fire.push(notice(text));
        }
    }
    record(status, out, now)
}

/// The warning `n` records, as it reads now (the key's current end and standby), while
/// its key is still in status.
pub fn notice_for(status: &ApiKeyStatus, n: &Notified) -> Option<Notice> {
    let key = status.keys.iter().find(|k| k.key_id == n.key_id)?;
    Some(Notice {
        key_id: key.key_id.clone(),
        slot: key.slot,
        threshold: n.threshold.clone(),
        expires_at: key.effective_expires_at,
        standby_ready: status
            .keys
            .iter()
            .any(|k| k.slot != key.slot && k.state == KeyState::Standby && k.activated_at.is_none()),
    })
}

fn record(status: &mut ApiKeyStatus, out: Warnings, now: DateTime<Utc>) -> Warnings {
    for n in &out.fire {
        status.notified.push(Notified {
            key_id: n.key_id.clone(),
            threshold: n.threshold.clone(),
            at: now,
            pending: vec![],
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

    fn rules() -> Rules {
        Rules::from_spec(&KeyPolicySpec::default(), t0()).unwrap()
    }

    #[test]
    fn each_threshold_fires_once_in_order() {
        let rules = rules();
        let mut status = status_expiring_in(60, 30);
        let w = evaluate(&rules, &mut status, t0(), true);
        assert!(w.fire.is_empty() && w.expiring.is_none());
        assert_eq!(w.next, Some(t0() + TimeDelta::days(30)));
        let fired: Vec<(i64, Vec<String>)> = [30, 31, 53, 59, 59]
            .into_iter()
            .map(|d| {
                let w = evaluate(&rules, &mut status, t0() + TimeDelta::days(d), true);
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
        let w = evaluate(&rules, &mut status, t0(), false);
        assert_eq!(w.fire.iter().map(|n| n.threshold.as_str()).collect::<Vec<_>>(), ["P7D"]);
        assert_eq!(w.expiring.as_ref().unwrap().0, "P7D");
        assert_eq!(w.next, Some(t0() + TimeDelta::days(4)));
        assert!(evaluate(&rules, &mut status, t0() + TimeDelta::hours(1), false).fire.is_empty());
    }

    #[test]
    fn a_threshold_a_key_is_born_inside_is_not_news_while_its_successor_is_on_schedule() {
        // The demo's case: a 30-day key under a 30-day threshold.
        let rules = rules();
        let mut status = status_expiring_in(30, 0);
        let w = evaluate(&rules, &mut status, t0(), true);
        assert!(w.fire.is_empty(), "no warning at birth: {:?}", w.fire);
        assert_eq!(w.expiring.as_ref().unwrap().0, "P30D", "the condition still says where the key stands");
        // The next threshold, which the key was not born inside, fires as usual.
        let w = evaluate(&rules, &mut status, t0() + TimeDelta::days(23), true);
        assert_eq!(w.fire.iter().map(|n| n.threshold.as_str()).collect::<Vec<_>>(), ["P7D"]);
        // Born inside, and then the successor goes off schedule (blocked): it fires then.
        let mut status = status_expiring_in(30, 0);
        assert!(evaluate(&rules, &mut status, t0(), true).fire.is_empty());
        let w = evaluate(&rules, &mut status, t0() + TimeDelta::days(2), false);
        assert_eq!(w.fire.iter().map(|n| n.threshold.as_str()).collect::<Vec<_>>(), ["P30D"]);
    }

    #[test]
    fn a_larger_threshold_never_fires_after_a_smaller_one() {
        let rules = rules();
        let mut status = status_expiring_in(5, 0);
        evaluate(&rules, &mut status, t0(), false);
        // Used heavily: the inactivity deadline moved the expiry out to 20 days.
        status.keys[0].effective_expires_at = Some(t0() + TimeDelta::days(20));
        assert!(evaluate(&rules, &mut status, t0() + TimeDelta::days(1), false).fire.is_empty());
    }

    #[test]
    fn forgotten_with_the_key_and_once_for_non_expiring() {
        let rules = rules();
        let mut status = status_expiring_in(5, 0);
        evaluate(&rules, &mut status, t0(), false);
        status.keys[0].key_id = "k2".into();
        evaluate(&rules, &mut status, t0(), false);
        assert!(status.notified.iter().all(|n| n.key_id == "k2"), "{:?}", status.notified);

        let mut spec = KeyPolicySpec::default();
        spec.expiry.mode = crate::api::ExpiryMode::Disabled;
        spec.expiry.acknowledge_risk = true;
        let disabled = Rules::from_spec(&spec, t0()).unwrap();
        let mut status = status_expiring_in(5, 0);
        status.keys[0].effective_expires_at = None;
        assert_eq!(evaluate(&disabled, &mut status, t0(), false).fire[0].threshold, NON_EXPIRING);
        assert!(evaluate(&disabled, &mut status, t0(), false).fire.is_empty());
    }
}
