//! What one reconcile of an ApiKey tells about what happened: one Event (the most
//! significant happening, the others in its note) and a lifecycle counter per happening.

use std::collections::BTreeMap;

use chrono::SecondsFormat;
use kube::runtime::events::EventType;

use crate::api::{ApiKey, ExpiryReason};
use crate::controller::context::Context;
use crate::lifecycle::Happening;

/// Events and metrics for what happened. Only key IDs, never material.
///
/// One Event per reconcile (a rotation is issue + flip, a scheduled regeneration is
/// expiry + issue): its reason is the most significant happening, its note lists them
/// all in order, and it is a Warning when any of them is. Metrics count each happening.
pub(super) async fn record(ctx: &Context, key: &ApiKey, happenings: &[Happening]) {
    if let Some((type_, reason, note)) = summarize(happenings) {
        ctx.event(key, type_, reason, &note).await;
    }
    let mut seen: BTreeMap<&'static str, u64> = BTreeMap::new();
    for h in happenings {
        *seen.entry(describe(h).2).or_default() += 1;
    }
    for (reason, n) in seen {
        ctx.metrics.count_lifecycle(reason, n);
    }
}

/// The one Event for `happenings`: (type, reason, note), None when nothing happened.
fn summarize(happenings: &[Happening]) -> Option<(EventType, &'static str, String)> {
    let described: Vec<_> = happenings.iter().map(describe).collect();
    let (_, _, reason, _) = described.iter().min_by_key(|d| d.0)?;
    let type_ = if described.iter().any(|d| d.1) { EventType::Warning } else { EventType::Normal };
    Some((type_, reason, described.iter().map(|d| d.3.as_str()).collect::<Vec<_>>().join("; ")))
}

/// A happening's (rank: lower is more significant, Warning?, Event reason, note).
fn describe(h: &Happening) -> (usize, bool, &'static str, String) {
    match h {
        Happening::Repaired { slot } => (
            0,
            true,
            "SecretRepaired",
            format!(
                "the Secret lacked the {slot} key's material (deleted or edited); issued or flipped to a key that is there"
            ),
        ),
        Happening::Revoked { slot, key_id } => {
            (1, false, "KeyRevoked", format!("{slot} key {key_id} revoked"))
        }
        Happening::Rotated => {
            (2, false, "KeyRotated", "rotation requested by annotation keyward.dev/rotate".to_string())
        }
        Happening::Expired { slot, key_id, reason } => (
            3,
            *reason == ExpiryReason::Inactivity,
            "KeyExpired",
            format!("{slot} key {key_id} expired ({reason:?})"),
        ),
        Happening::Retiring { slot, key_id, at } => (
            4,
            false,
            "KeyRetiring",
            format!(
                "{slot} key {key_id} has drained (its successor is in use and it is not): it stops verifying at {} (rotation.retireDrainedAfter)",
                at.to_rfc3339_opts(SecondsFormat::Secs, true)
            ),
        ),
        Happening::RetirementCancelled { slot, key_id } => (
            5,
            true,
            "KeyRetirementCancelled",
            format!(
                "{slot} key {key_id} was used again before its early retirement: it keeps its scheduled end"
            ),
        ),
        Happening::Flipped { to, key_id } => {
            (6, false, "KeyFlipped", format!("consumers moved to the {to} key {key_id}"))
        }
        Happening::Created { slot, key_id } => {
            (7, false, "KeyCreated", format!("issued {slot} key {key_id}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_reconcile_names_the_most_significant_happening() {
        use crate::api::Slot;
        let created = Happening::Created { slot: Slot::Secondary, key_id: "k2".into() };
        let flipped = Happening::Flipped { to: Slot::Secondary, key_id: "k2".into() };
        let (t, reason, note) = summarize(&[Happening::Rotated, created.clone(), flipped]).unwrap();
        assert_eq!((t, reason), (EventType::Normal, "KeyRotated"));
        assert_eq!(
            note,
            "rotation requested by annotation keyward.dev/rotate; issued Secondary key k2; \
             consumers moved to the Secondary key k2"
        );
        let idle =
            Happening::Expired { slot: Slot::Primary, key_id: "k1".into(), reason: ExpiryReason::Inactivity };
        let (t, reason, _) = summarize(&[created, idle]).unwrap();
        assert_eq!((t, reason), (EventType::Warning, "KeyExpired"));
        assert_eq!(summarize(&[]), None);
    }
}
