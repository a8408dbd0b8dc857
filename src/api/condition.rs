use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A status condition, following the Kubernetes API conventions
/// (`metav1.Condition`): `lastTransitionTime` moves only when `status` changes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready`, `Expiring`, `Accepted`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable CamelCase reason for the last transition.
    pub reason: String,
    /// Human-readable explanation. Never contains key material.
    pub message: String,
    /// When `status` last changed.
    pub last_transition_time: DateTime<Utc>,
    /// The `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Condition status values.
pub const TRUE: &str = "True";
/// Condition status values.
pub const FALSE: &str = "False";
/// Condition status values.
pub const UNKNOWN: &str = "Unknown";

/// Condition schema helper: a list-map keyed by `type`.
pub(crate) fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = <Vec<Condition>>::json_schema(generator);
    super::list_map(&mut schema, "type");
    schema
}

impl Condition {
    /// A new condition whose transition time is `now`.
    pub fn new(
        type_: &str,
        status: &str,
        reason: &str,
        message: impl Into<String>,
        generation: Option<i64>,
        now: DateTime<Utc>,
    ) -> Self {
        Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message: message.into(),
            last_transition_time: now,
            observed_generation: generation,
        }
    }
}

/// Put `cond` into `conditions`, replacing the one of the same type. The previous
/// `lastTransitionTime` is kept when the status did not change.
pub fn set_condition(conditions: &mut Vec<Condition>, mut cond: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == cond.type_) {
        Some(existing) => {
            if existing.status == cond.status {
                cond.last_transition_time = existing.last_transition_time;
            }
            *existing = cond;
        }
        None => conditions.push(cond),
    }
}

/// The condition of the given type, if any.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let t1 = t0 + chrono::Duration::seconds(5);
        let t2 = t1 + chrono::Duration::seconds(5);
        let mut conds = vec![];
        set_condition(&mut conds, Condition::new("Ready", TRUE, "KeyActive", "a", Some(1), t0));
        set_condition(&mut conds, Condition::new("Ready", TRUE, "KeyActive", "b", Some(2), t1));
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, t0);
        assert_eq!(conds[0].message, "b");
        set_condition(&mut conds, Condition::new("Ready", FALSE, "SecretConflict", "c", Some(2), t2));
        assert_eq!(conds[0].last_transition_time, t2);
        set_condition(&mut conds, Condition::new("Expiring", FALSE, "NotExpiring", "", Some(2), t2));
        assert_eq!(conds.len(), 2);
        assert_eq!(find_condition(&conds, "Expiring").unwrap().reason, "NotExpiring");
    }
}
