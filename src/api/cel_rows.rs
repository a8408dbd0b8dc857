//! The rows the CEL rules of the CRDs are checked on: objects every API server must admit
//! and objects a CEL rule must refuse. Shared by the offline check with a CEL engine
//! (`src/api/cel_tests.rs`, a module of the library's unit tests) and by the check against
//! the live API server (`tests/cel_live.rs`, which mounts this file with `#[path]`), so
//! that both run on the same rows.

use serde_json::{Value, json};

/// A whole object of `kind` with this spec (and metadata, for the annotation rows).
pub fn object(kind: &str, spec: &Value) -> Value {
    let metadata = spec.get("$metadata").cloned().unwrap_or_else(|| json!({"name": "x"}));
    let mut spec = spec.clone();
    if let Some(m) = spec.as_object_mut() {
        m.remove("$metadata");
    }
    json!({"apiVersion": "keyward.dev/v1alpha1", "kind": kind, "metadata": metadata, "spec": spec})
}

/// Every object the API server must accept on every version: (what, kind, spec, old spec
/// for updates). `$NS-p`-style names from the matrix are written out as plain names.
pub fn valid_rows() -> Vec<(String, &'static str, Value, Option<Value>)> {
    let mut rows = vec![];
    // The examples users apply first.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for path in files.into_iter().filter(|p| p.extension().is_some_and(|e| e == "yaml")) {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc).unwrap();
            for kind in ["ApiKey", "KeyPolicy"] {
                if value["kind"] == kind {
                    let name = format!("{} ({kind} {})", path.display(), value["metadata"]["name"]);
                    let mut spec = value["spec"].clone();
                    spec["$metadata"] = value["metadata"].clone();
                    rows.push((name.clone(), kind, spec.clone(), None));
                    // Re-applying it unchanged is an update that every transition rule allows.
                    rows.push((format!("{name}, re-applied"), kind, spec.clone(), Some(spec)));
                }
            }
        }
    }
    assert!(rows.iter().filter(|r| r.1 == "ApiKey").count() >= 2, "examples/ has ApiKeys");
    assert!(rows.iter().filter(|r| r.1 == "KeyPolicy").count() >= 2, "examples/ has KeyPolicies");

    // Bad-input matrix: ApiKeys accepted at admission (the controller answers them).
    let huge = "x".repeat(100_000);
    let key = |extra: Value| {
        let mut spec = json!({"policy": "ns-p", "owner": "o"});
        spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        spec
    };
    let keys: Vec<(&str, Value)> = vec![
        ("owner: blank", key(json!({"owner": "   "}))),
        ("lifetime: banana", key(json!({"lifetime": "banana"}))),
        ("lifetime: P", key(json!({"lifetime": "P"}))),
        ("lifetime: -P1D", key(json!({"lifetime": "-P1D"}))),
        ("lifetime: 100 KB", key(json!({"lifetime": huge}))),
        ("lifetime: P99999999Y", key(json!({"lifetime": "P99999999Y"}))),
        ("lifetime: PT0S", key(json!({"lifetime": "PT0S"}))),
        ("lifetime: PT30S < minLifetime", key(json!({"lifetime": "PT30S"}))),
        ("lifetime: P2D > maxLifetime", key(json!({"lifetime": "P2D"}))),
        ("policy: unknown", key(json!({"policy": "ns-nope"}))),
        ("policy: subresource path", key(json!({"policy": "ns-p/status"}))),
        ("policy: 100 KB", key(json!({"policy": huge}))),
        ("policy: namespaceSelector excludes", key(json!({"policy": "ns-narrow"}))),
        ("secretName: not a DNS name", key(json!({"secretName": "Bad_Name!"}))),
        ("secretName: path traversal", key(json!({"secretName": "../../kube-system/secrets/x"}))),
        ("secretName: foreign Secret", key(json!({"secretName": "foreign"}))),
        ("secretName: keyward labels, no owner", key(json!({"secretName": "spoof"}))),
        ("secretName: another ApiKey's Secret", key(json!({"secretName": "bystander"}))),
        (
            "consumers: subresource name",
            key(json!({"consumers": [{"kind": "Deployment", "name": "checkout/scale"}]})),
        ),
        ("secretTemplate.labels: bad key", key(json!({"secretTemplate": {"labels": {"bad key": "v"}}}))),
        (
            "secretTemplate.labels: 64-char value",
            key(json!({"secretTemplate": {"labels": {"k": "v".repeat(64)}}})),
        ),
        (
            "secretTemplate.annotations: bad key",
            key(json!({"secretTemplate": {"annotations": {"a/b/c": "v"}}})),
        ),
        ("owner: more keys than maxKeysPerOwner", key(json!({"policy": "ns-one", "owner": "team"}))),
        ("description: duplicate (padded)", key(json!({"owner": " team ", "description": "  checkout "}))),
        ("revokedKeys: unknown IDs", key(json!({"revokedKeys": ["0000000000", "not-a-key-id"]}))),
        (
            "rotate annotation: empty",
            key(json!({"$metadata": {"name": "bad", "annotations": {"keyward.dev/rotate": ""}}})),
        ),
        ("unknown field (pruned)", key(json!({"lifetme": "PT1S"}))),
    ];
    for (name, spec) in keys {
        rows.push((format!("matrix {name:?}"), "ApiKey", spec, None));
    }
    // Edits of a Ready ApiKey (updates: transition rules run).
    let patches: Vec<(&str, Value)> = vec![
        ("patch: lifetime banana", json!({"lifetime": "banana"})),
        ("patch: unknown policy", json!({"policy": "ns-nope"})),
        ("patch: secretName to foreign", json!({"secretName": "foreign"})),
        (
            "patch: blank rotate annotation",
            json!({"description": "touched", "$metadata": {"name": "bad", "annotations": {"keyward.dev/rotate": "   "}}}),
        ),
    ];
    for (name, patch) in patches {
        rows.push((format!("matrix {name:?}"), "ApiKey", key(patch), Some(key(json!({})))));
    }

    // Bad-input matrix: KeyPolicies accepted at admission (the controller rejects them),
    // and the valid policies rows set up (named by text that finds them in the matrix).
    let policies: Vec<(&str, Value)> = vec![
        ("fn row_policy", json!({"expiry": {"maxLifetime": "P1D"}, "notifications": {"before": []}})),
        (
            "Setup::Policy(\"one\"",
            json!({"expiry": {"maxLifetime": "P1D"}, "notifications": {"before": []}, "limits": {"maxKeysPerOwner": 1}}),
        ),
        ("\"narrow\",", json!({"namespaceSelector": {"matchLabels": {"keyward.dev/test": "elsewhere"}}})),
        ("expiry.maxLifetime: banana", json!({"expiry": {"maxLifetime": "banana"}})),
        ("expiry.maxLifetime: P", json!({"expiry": {"maxLifetime": "P"}})),
        ("expiry.maxLifetime: PT0S", json!({"expiry": {"maxLifetime": "PT0S"}})),
        ("expiry.maxLifetime: 100 KB", json!({"expiry": {"maxLifetime": huge}})),
        ("expiry.maxLifetime: P99999999Y", json!({"expiry": {"maxLifetime": "P99999999Y"}})),
        ("expiry.minLifetime: -P1D", json!({"expiry": {"minLifetime": "-P1D"}})),
        ("expiry.minLifetime > maxLifetime", json!({"expiry": {"minLifetime": "P2D", "maxLifetime": "P1D"}})),
        ("expiry.inactivityTimeout: PT", json!({"expiry": {"inactivityTimeout": "PT"}})),
        ("expiry.inactivityTimeout: PT0S", json!({"expiry": {"inactivityTimeout": "PT0S"}})),
        ("rotation.secondaryAt: 150%", json!({"rotation": {"secondaryAt": "150%"}})),
        ("rotation.secondaryAt: 0%", json!({"rotation": {"secondaryAt": "0%"}})),
        ("rotation.secondaryAt: half", json!({"rotation": {"secondaryAt": "half"}})),
        ("rotation.flipBefore: 10m", json!({"rotation": {"flipBefore": "10m"}})),
        ("rotation.flipBefore: -PT1M", json!({"rotation": {"flipBefore": "-PT1M"}})),
        ("notifications.before: x", json!({"notifications": {"before": ["P7D", "x"]}})),
        (
            "notifications.webhooks: ftp url",
            json!({"notifications": {"webhooks": [{"url": "ftp://example.com/hook"}]}}),
        ),
        (
            "notifications.webhooks: url with space",
            json!({"notifications": {"webhooks": [{"url": "https://exa mple.com"}]}}),
        ),
        (
            "namespaceSelector: unknown operator",
            json!({"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "Banana", "values": ["x"]}]}}),
        ),
        (
            "namespaceSelector: In without values",
            json!({"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
        ),
        ("default: two defaults", json!({"default": true})),
    ];
    for (name, spec) in policies {
        rows.push((format!("matrix {name:?}"), "KeyPolicy", spec, None));
    }
    // Not matrix rows: the explicit forms around the Disabled rule.
    rows.push((
        "expiry Disabled, risk acknowledged".into(),
        "KeyPolicy",
        json!({"expiry": {"mode": "Disabled", "acknowledgeRisk": true}}),
        None,
    ));
    rows.push((
        "expiry Enforced, risk not acknowledged".into(),
        "KeyPolicy",
        json!({"expiry": {"mode": "Enforced"}}),
        None,
    ));
    rows.push(("empty KeyPolicy spec (all defaults)".into(), "KeyPolicy", json!({}), None));
    rows
}

/// Inputs a CEL rule refuses: (what, whether the name is a bad-input matrix row, kind,
/// spec, old spec for updates, where the rule expected to fail is attached).
#[allow(clippy::type_complexity)]
pub fn invalid_rows() -> Vec<(&'static str, bool, &'static str, Value, Option<Value>, &'static str)> {
    let disabled = ".spec.expiry";
    let owner = ".spec.owner";
    vec![
        (
            "expiry.mode Disabled, no acknowledgeRisk",
            true,
            "KeyPolicy",
            json!({"expiry": {"mode": "Disabled"}}),
            None,
            disabled,
        ),
        (
            "expiry.mode Disabled, acknowledgeRisk: false",
            false,
            "KeyPolicy",
            json!({"default": true, "expiry": {"mode": "Disabled", "acknowledgeRisk": false, "maxLifetime": "P1D"}}),
            None,
            disabled,
        ),
        (
            "owner: changed",
            false,
            "ApiKey",
            json!({"policy": "p", "owner": "team-b"}),
            Some(json!({"policy": "p", "owner": "team-a"})),
            owner,
        ),
        (
            "owner: changed with other fields",
            false,
            "ApiKey",
            json!({"policy": "p", "owner": "team-b", "description": "moved", "lifetime": "P1D"}),
            Some(json!({"policy": "p", "owner": "team-a"})),
            owner,
        ),
        // Exact comparison: owner limits compare trimmed owners, the rule does not.
        (
            "owner: padded",
            false,
            "ApiKey",
            json!({"policy": "p", "owner": " team-a "}),
            Some(json!({"policy": "p", "owner": "team-a"})),
            owner,
        ),
    ]
}
