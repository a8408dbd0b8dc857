//! Validate: the spec checks of an ApiKey, without I/O. A field the API server would
//! refuse, or that would address something else, becomes `InvalidSpec` before it reaches
//! an API path or a write.

use crate::api::conditions as c;
use crate::controller::policy::{Blocked, blocked};

/// Longest piece of user input quoted in a message.
const SHOWN: usize = 64;

pub(super) fn shown(text: &str) -> String {
    text.chars().take(SHOWN).collect()
}

/// A lowercase RFC 1123 subdomain (the name of a Secret, KeyPolicy or workload).
pub(super) fn dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// The name part of a label key or a label value: up to 63 of `[A-Za-z0-9_.-]`,
/// alphanumeric at both ends (`empty_ok` for label values).
fn label_name(text: &str, empty_ok: bool) -> bool {
    let b = text.as_bytes();
    if b.is_empty() {
        return empty_ok;
    }
    b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A label or annotation key: `[prefix/]name`, the prefix a DNS subdomain.
fn qualified_name(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => dns_subdomain(prefix) && label_name(name, false),
        None => label_name(key, false),
    }
}

/// Spec fields that become object names or Secret metadata, checked before any of them
/// reaches an API path or a write. The CRD schema only bounds their length (and
/// v1.20 has no CEL): unchecked, `p/status` would address a subresource, and a name
/// or label the API server refuses would fail every write with `ApplyFailed`.
pub(super) fn spec_problem(spec: &crate::api::ApiKeySpec) -> Option<Blocked> {
    let invalid = |message: String| Some(blocked(c::INVALID_SPEC, message));
    if spec.owner.trim().is_empty() {
        return invalid("spec.owner must not be empty".into());
    }
    let mut names: Vec<(String, &str)> = Vec::new();
    names.extend(spec.policy.as_deref().map(|n| ("spec.policy".to_string(), n)));
    names.extend(spec.secret_name.as_deref().map(|n| ("spec.secretName".to_string(), n)));
    for (i, consumer) in spec.consumers.iter().enumerate() {
        names.push((format!("spec.consumers[{i}].name"), &consumer.name));
    }
    if let Some((field, name)) = names.into_iter().find(|(_, n)| !dns_subdomain(n)) {
        return invalid(format!(
            "{field} {:?} is not a valid object name (a lowercase RFC 1123 subdomain of at most 253 characters)",
            shown(name)
        ));
    }
    let Some(template) = &spec.secret_template else { return None };
    for (k, v) in &template.labels {
        if !qualified_name(k) || !label_name(v, true) {
            return invalid(format!(
                "spec.secretTemplate.labels: {:?}: {:?} is not a valid label (key [prefix/]name, value up to 63 characters of [A-Za-z0-9_.-])",
                shown(k),
                shown(v)
            ));
        }
    }
    if let Some(k) = template.annotations.keys().find(|k| !qualified_name(k)) {
        return invalid(format!(
            "spec.secretTemplate.annotations: {:?} is not a valid annotation key",
            shown(k)
        ));
    }
    let size: usize = template.annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > 256 * 1024 {
        return invalid(format!("spec.secretTemplate.annotations total {size} bytes, more than 256 KiB"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: serde_json::Value) -> crate::api::ApiKeySpec {
        let mut v = serde_json::json!({"owner": "team"});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn names_and_secret_metadata_are_checked_before_use() {
        use serde_json::json;
        for ok in [
            json!({}),
            json!({"policy": "standard", "secretName": "svc.key-1"}),
            json!({"consumers": [{"kind": "Deployment", "name": "checkout"}]}),
            json!({"secretTemplate": {"labels": {"app.kubernetes.io/part-of": "shop", "empty": ""},
                                      "annotations": {"example.com/Note_1": "any text / at all"}}}),
        ] {
            assert_eq!(spec_problem(&spec(ok.clone())), None, "{ok}");
        }
        let long = "a".repeat(254);
        for (bad, field) in [
            (json!({"owner": "  "}), "spec.owner"),
            (json!({"policy": "standard/status"}), "spec.policy"),
            (json!({"policy": long}), "spec.policy"),
            (json!({"secretName": "Bad_Name"}), "spec.secretName"),
            (json!({"secretName": "-x"}), "spec.secretName"),
            (json!({"secretName": "a..b"}), "spec.secretName"),
            (
                json!({"consumers": [{"kind": "Deployment", "name": "ok"}, {"kind": "Deployment", "name": "x/scale"}]}),
                "spec.consumers[1].name",
            ),
            (json!({"secretTemplate": {"labels": {"bad key": "v"}}}), "labels"),
            (json!({"secretTemplate": {"labels": {"k": "v".repeat(64)}}}), "labels"),
            (json!({"secretTemplate": {"labels": {"Bad.Prefix/k": "v"}}}), "labels"),
            (json!({"secretTemplate": {"annotations": {"/x": "v"}}}), "annotations"),
            (json!({"secretTemplate": {"annotations": {"k": "v".repeat(300 * 1024)}}}), "256 KiB"),
        ] {
            let b = spec_problem(&spec(bad.clone())).unwrap_or_else(|| panic!("{bad} should be refused"));
            assert_eq!(b.reason, c::INVALID_SPEC);
            assert!(b.message.contains(field), "{} should name {field}", b.message);
            assert!(b.message.len() < 400, "input is quoted truncated: {}", b.message.len());
        }
    }
}
