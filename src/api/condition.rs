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
    pub type_: Text,
    /// `True`, `False` or `Unknown`.
    pub status: Text,
    /// Machine-readable CamelCase reason for the last transition.
    pub reason: Text,
    /// Human-readable explanation. Never contains key material.
    pub message: Text,
    /// When `status` last changed.
    pub last_transition_time: DateTime<Utc>,
    /// The `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A condition's text: the same few words recur in every object (types, statuses,
/// reasons, most messages), so the cached objects share one copy of each instead of a
/// heap string per field per object (at 5,000 ApiKeys their conditions were two thirds
/// of each cached ApiKey). Text without digits (no times, counts or IDs) is interned in
/// a process-wide table of at most [`INTERNED_MAX`] entries of at most [`INTERNED_LEN`]
/// bytes, kept for the process's life; anything else is an owned string.
/// Equal, hashed and ordered by its text alone, however it is held.
#[derive(Clone)]
pub struct Text(TextRepr);

#[derive(Clone)]
enum TextRepr {
    Shared(&'static str),
    Owned(Box<str>),
}

/// Most distinct texts interned.
pub const INTERNED_MAX: usize = 4096;
/// Longest text interned, in bytes.
pub const INTERNED_LEN: usize = 160;

fn intern(text: &str) -> Option<&'static str> {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static TABLE: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    if text.len() > INTERNED_LEN || text.bytes().any(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut table = TABLE.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(shared) = table.get(text) {
        return Some(shared);
    }
    if table.len() >= INTERNED_MAX {
        return None;
    }
    let shared: &'static str = Box::leak(text.into());
    table.insert(shared);
    Some(shared)
}

impl Text {
    /// The text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            TextRepr::Shared(s) => s,
            TextRepr::Owned(s) => s,
        }
    }
}

impl From<&str> for Text {
    fn from(text: &str) -> Self {
        Text(intern(text).map_or_else(|| TextRepr::Owned(text.into()), TextRepr::Shared))
    }
}

impl From<String> for Text {
    fn from(text: String) -> Self {
        Text(intern(&text).map_or_else(|| TextRepr::Owned(text.into_boxed_str()), TextRepr::Shared))
    }
}

impl Default for Text {
    fn default() -> Self {
        Text(TextRepr::Shared(""))
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Text) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Text {}

impl std::hash::Hash for Text {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl PartialOrd for Text {
    fn partial_cmp(&self, other: &Text) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Text {
    fn cmp(&self, other: &Text) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Text {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<Text> for &str {
    fn eq(&self, other: &Text) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<Text> for String {
    fn eq(&self, other: &Text) -> bool {
        self == other.as_str()
    }
}

impl Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Text::from)
    }
}

impl JsonSchema for Text {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        String::schema_name()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        String::json_schema(generator)
    }

    fn inline_schema() -> bool {
        true
    }
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
        message: impl Into<Text>,
        generation: Option<i64>,
        now: DateTime<Utc>,
    ) -> Self {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
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

    #[test]
    fn recurring_text_is_shared_text_with_digits_is_owned() {
        let ptr = |t: &Text| t.as_str().as_ptr();
        let a = Text::from("fewer than two valid keys: nothing to hand over".to_string());
        let b = Text::from("fewer than two valid keys: nothing to hand over");
        assert_eq!(ptr(&a), ptr(&b), "one copy");
        let t1 = Text::from("creates the Secondary key at 2027-01-08T07:06:36Z");
        let t2 = Text::from("creates the Secondary key at 2027-01-08T07:06:36Z");
        assert_ne!(ptr(&t1), ptr(&t2), "times are not interned");
        assert_eq!(t1, t2);
        let (owned, shared) = (Text(TextRepr::Owned("same".into())), Text::from("same"));
        assert_eq!(owned, shared, "equal by text, however held");
        assert_eq!(owned.cmp(&shared), std::cmp::Ordering::Equal);
        let long = "x".repeat(INTERNED_LEN + 1);
        assert_ne!(ptr(&Text::from(long.as_str())), ptr(&Text::from(long.as_str())));
        let json = serde_json::to_string(&Condition::new("Ready", TRUE, "KeyActive", "ok", None, Utc::now()))
            .unwrap();
        let back: Condition = serde_json::from_str(&json).unwrap();
        assert_eq!(
            (back.type_.as_str(), back.status.as_str(), back.message.as_str()),
            ("Ready", "True", "ok")
        );
    }
}
