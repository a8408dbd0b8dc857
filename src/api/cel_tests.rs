//! Every CEL rule (`x-kubernetes-validations`) of the CRDs, checked with a CEL engine.
//!
//! No API server that runs CEL rules (1.25+) can run here, so the rules are evaluated
//! with the `cel` crate plus the Kubernetes CEL libraries (`kube-cel`, from the kube-rs
//! project): each rule is found by walking the generated schema (1.28+ rendering), must
//! compile and stay within the cost budget, must hold for every valid object we ship or
//! test with (the examples, and every row the bad-input matrix in `tests/bad_input.rs`
//! expects the API server to accept), and must fail for the matrix's inputs that a CEL
//! rule refuses on newer clusters (and the controller refuses on older ones). Each row
//! is checked twice: rule by rule with `self` (and `oldSelf`) bound here, and as a whole
//! object by `kube_cel::Validator`, which walks the schema and applies its defaults the
//! way the API server does.

use std::sync::Arc;

use kube::CustomResourceExt;
use kube_cel::cel::{Context, Program, Value as Cel};
use kube_cel::{KubeCelExt, ScopeContext, Validator, analyze_rule, apply_defaults, compile_schema};
use serde_json::{Map, Value, json};

use super::{ApiKey, CrdRendering, KeyPolicy, OWNER_IMMUTABLE_MESSAGE, crd_values};

/// The bad-input matrix; row names quoted below must exist there.
const BAD_INPUT: &str = include_str!("../../tests/bad_input.rs");

/// One step from a schema node to a child.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    /// A property.
    Field(String),
    /// Every item of a list.
    Items,
    /// Every value of a map (`additionalProperties`).
    Values,
}

/// A rule as it stands in the rendered CRD, with where it is attached.
#[derive(Debug)]
struct FoundRule {
    /// `ApiKey` or `KeyPolicy`.
    kind: String,
    /// From the object root to the node the rule is attached to.
    path: Vec<Step>,
    /// The `x-kubernetes-validations` entry.
    entry: Map<String, Value>,
    /// The schema of that node.
    schema: Value,
}

impl FoundRule {
    fn rule(&self) -> &str {
        self.entry["rule"].as_str().unwrap()
    }
    fn message(&self) -> &str {
        self.entry["message"].as_str().unwrap()
    }
    /// `.spec.expiry`, `.spec.consumers[*]`.
    fn path_text(&self) -> String {
        self.path
            .iter()
            .map(|s| match s {
                Step::Field(f) => format!(".{f}"),
                Step::Items => "[*]".into(),
                Step::Values => "[*]".into(),
            })
            .collect()
    }
    /// A transition rule: compares with the stored object, so it only runs on updates.
    fn is_transition(&self) -> bool {
        Program::compile(self.rule()).unwrap().references().has_variable("oldSelf")
    }
    /// The field path the API server reports when the rule fails (`fieldPath` on 1.28+).
    fn error_path(&self) -> String {
        let base = self.path_text().trim_start_matches('.').to_string();
        match self.entry.get("fieldPath").and_then(Value::as_str) {
            Some(fp) => format!("{base}{fp}"),
            None => base,
        }
    }
}

/// The top-level schema of a kind in the 1.28+ rendering.
fn root_schema(kind: &str) -> Value {
    static CRDS: std::sync::OnceLock<Vec<Value>> = std::sync::OnceLock::new();
    CRDS.get_or_init(|| crd_values(CrdRendering::CelWithReasons).unwrap())
        .iter()
        .find(|crd| crd["spec"]["names"]["kind"] == kind)
        .map(|crd| crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone())
        .unwrap_or_else(|| panic!("no CRD for {kind}"))
}

/// Every rule of both CRDs, found by walking their schemas.
fn all_rules() -> Vec<FoundRule> {
    fn walk(kind: &str, schema: &Value, path: Vec<Step>, out: &mut Vec<FoundRule>) {
        for entry in schema.get("x-kubernetes-validations").and_then(Value::as_array).into_iter().flatten() {
            out.push(FoundRule {
                kind: kind.to_string(),
                path: path.clone(),
                entry: entry.as_object().unwrap().clone(),
                schema: schema.clone(),
            });
        }
        for (name, child) in schema.get("properties").and_then(Value::as_object).into_iter().flatten() {
            walk(kind, child, [path.clone(), vec![Step::Field(name.clone())]].concat(), out);
        }
        if let Some(items) = schema.get("items") {
            walk(kind, items, [path.clone(), vec![Step::Items]].concat(), out);
        }
        if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
            walk(kind, values, [path, vec![Step::Values]].concat(), out);
        }
    }
    let mut out = vec![];
    for kind in ["KeyPolicy", "ApiKey"] {
        walk(kind, &root_schema(kind), vec![], &mut out);
    }
    out
}

/// The values at `path` in `object` (none when a field on the way is absent: the API
/// server runs a rule only where its node exists).
fn values_at<'a>(object: &'a Value, path: &[Step]) -> Vec<&'a Value> {
    let mut here = vec![object];
    for step in path {
        here = here
            .into_iter()
            .flat_map(|v| -> Vec<&Value> {
                match step {
                    Step::Field(f) => v.get(f).into_iter().collect(),
                    Step::Items => v.as_array().into_iter().flatten().collect(),
                    Step::Values => v.as_object().into_iter().flat_map(|m| m.values()).collect(),
                }
            })
            .collect();
    }
    here
}

/// JSON as the API server hands it to CEL (integers are `int`).
fn to_cel(value: &Value) -> Cel {
    match value {
        Value::Null => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Cel::Int(i),
            None => Cel::Float(n.as_f64().unwrap()),
        },
        Value::String(s) => Cel::String(Arc::new(s.clone())),
        Value::Array(items) => Cel::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(map) => Cel::from(
            map.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect::<std::collections::HashMap<_, _>>(),
        ),
    }
}

/// `rule` with `self` (and `oldSelf`) bound, in a context with the Kubernetes libraries.
fn evaluate(rule: &str, this: &Value, old: Option<&Value>) -> Result<bool, String> {
    let program = Program::compile(rule).map_err(|e| e.to_string())?;
    let mut ctx = Context::default().with_all();
    ctx.add_variable_from_value("self", to_cel(this));
    if let Some(old) = old {
        ctx.add_variable_from_value("oldSelf", to_cel(old));
    }
    match program.execute(&ctx) {
        Ok(Cel::Bool(b)) => Ok(b),
        Ok(other) => Err(format!("not a bool: {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// A whole object of `kind` with this spec (and metadata, for the annotation rows).
fn object(kind: &str, spec: &Value) -> Value {
    let metadata = spec.get("$metadata").cloned().unwrap_or_else(|| json!({"name": "x"}));
    let mut spec = spec.clone();
    if let Some(m) = spec.as_object_mut() {
        m.remove("$metadata");
    }
    json!({"apiVersion": "keyward.dev/v1alpha1", "kind": kind, "metadata": metadata, "spec": spec})
}

/// The result of each rule of `kind` on `new` (defaulted, as the API server does before
/// validating), each node where the rule applies: (rule, path, result).
fn run_rules<'r>(
    rules: &'r [FoundRule],
    kind: &str,
    new: &Value,
    old: Option<&Value>,
) -> Vec<(&'r FoundRule, Result<bool, String>)> {
    let schema = root_schema(kind);
    let new = apply_defaults(&schema, new);
    let old = old.map(|o| apply_defaults(&schema, o));
    let mut out = vec![];
    for rule in rules.iter().filter(|r| r.kind == kind) {
        let olds = old.as_ref().map(|o| values_at(o, &rule.path));
        for (i, this) in values_at(&new, &rule.path).into_iter().enumerate() {
            // Transition rules run only on updates, with the stored value at the same place.
            let old_here = olds.as_ref().and_then(|o| o.get(i).copied());
            if rule.is_transition() && old_here.is_none() {
                continue;
            }
            out.push((rule, evaluate(rule.rule(), this, old_here)));
        }
    }
    out
}

/// Every object the API server must accept on every version: (what, kind, spec, old spec
/// for updates). `$NS-p`-style names from the matrix are written out as plain names.
fn valid_rows() -> Vec<(String, &'static str, Value, Option<Value>)> {
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
fn invalid_rows() -> Vec<(&'static str, bool, &'static str, Value, Option<Value>, &'static str)> {
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

#[test]
fn every_rule_is_found_compiles_and_stays_in_budget() {
    let rules = all_rules();
    let table: Vec<(String, String, &str)> =
        rules.iter().map(|r| (r.kind.clone(), r.path_text(), r.rule())).collect();
    assert_eq!(
        table,
        [
            (
                "KeyPolicy".to_string(),
                ".spec.expiry".to_string(),
                "self.mode != 'Disabled' || self.acknowledgeRisk"
            ),
            ("ApiKey".to_string(), ".spec.owner".to_string(), "self == oldSelf"),
        ],
        "a rule was added or moved: give it valid and invalid rows below"
    );
    for kind in ["KeyPolicy", "ApiKey"] {
        let compiled = compile_schema(&root_schema(kind));
        assert!(!compiled.has_errors(), "{kind}: {:?}", compiled.compilation_errors());
    }
    for rule in &rules {
        let where_ = format!("{} {}: {}", rule.kind, rule.path_text(), rule.rule());
        Program::compile(rule.rule()).unwrap_or_else(|e| panic!("{where_} does not compile: {e}"));
        // Only `self`/`oldSelf`; no unbounded list or string that the cost estimate
        // would refuse when the CRD is created.
        let warnings = analyze_rule(rule.rule(), &compile_schema(&rule.schema), ScopeContext::CrdValidation);
        assert!(warnings.is_empty(), "{where_}: {warnings:?}");
        // The API server needs a message for a readable error and refuses line breaks.
        assert!(!rule.message().is_empty() && !rule.message().contains('\n'), "{where_}");
        assert!(!rule.rule().contains('\n'), "{where_}");
        assert_eq!(rule.entry.get("reason").and_then(Value::as_str), Some("FieldValueInvalid"), "{where_}");
        // fieldPath (1.28+) must name a property of the node: the API server checks it.
        if let Some(fp) = rule.entry.get("fieldPath").and_then(Value::as_str) {
            let field = fp.strip_prefix('.').unwrap_or_else(|| panic!("{where_}: fieldPath {fp:?}"));
            assert!(rule.schema["properties"].get(field).is_some(), "{where_}: fieldPath {fp:?}");
        }
    }
    // The owner rule is a transition rule; transition rules need a scalar or a node that
    // is not inside a list without keys (the API server cannot pair old and new there).
    let owner = rules.iter().find(|r| r.kind == "ApiKey").unwrap();
    assert!(owner.is_transition());
    assert_eq!(owner.message(), OWNER_IMMUTABLE_MESSAGE);
    assert!(rules.iter().filter(|r| r.is_transition()).all(|r| !r.path.contains(&Step::Items)));
}

/// What goes wrong with `rules` on the valid rows: each rule result other than `true`,
/// and each rule evaluated on fewer than two valid objects.
fn valid_failures(rules: &[FoundRule]) -> Vec<String> {
    let mut failures = vec![];
    let mut reached = vec![0usize; rules.len()];
    for (what, kind, spec, old) in valid_rows() {
        let new = object(kind, &spec);
        let old = old.map(|o| object(kind, &o));
        for (rule, result) in run_rules(rules, kind, &new, old.as_ref()) {
            if result != Ok(true) {
                failures.push(format!("{what}: {} {} gives {result:?}", rule.path_text(), rule.rule()));
            }
            reached[rules.iter().position(|r| std::ptr::eq(r, rule)).unwrap()] += 1;
        }
    }
    for (rule, n) in rules.iter().zip(reached) {
        if n < 2 {
            failures.push(format!("{} {} ran on only {n} valid objects", rule.path_text(), rule.rule()));
        }
    }
    failures
}

/// What goes wrong with `rules` on the invalid rows: each row that is not refused by
/// exactly its rule (false, every other rule true).
fn invalid_misses(rules: &[FoundRule]) -> Vec<String> {
    let mut misses = vec![];
    for (what, _, kind, spec, old, expected) in invalid_rows() {
        let new = object(kind, &spec);
        let old = old.map(|o| object(kind, &o));
        let results = run_rules(rules, kind, &new, old.as_ref());
        let wanted = results.iter().any(|(r, res)| r.path_text() == expected && *res == Ok(false));
        let others = results.iter().all(|(r, res)| r.path_text() == expected || *res == Ok(true));
        if !(wanted && others) {
            misses.push(format!("{what}: {results:?}"));
        }
    }
    misses
}

#[test]
fn valid_objects_pass_every_rule() {
    let rules = all_rules();
    let failures = valid_failures(&rules);
    assert!(failures.is_empty(), "{failures:#?}");
    // The same objects, validated whole by kube-cel (its own walk and defaulting).
    let validator = Validator::new();
    for (what, kind, spec, old) in valid_rows() {
        if let Some(row) = what.strip_prefix("matrix ") {
            let row: String = serde_json::from_str(row).unwrap();
            assert!(BAD_INPUT.contains(&row), "{row:?} is no longer in tests/bad_input.rs");
        }
        let new = object(kind, &spec);
        let old = old.map(|o| object(kind, &o));
        if let Err(errors) = validator.validate(&root_schema(kind), &new, old.as_ref()) {
            panic!("{what}: kube-cel's validator refuses it: {errors:?}");
        }
    }
}

#[test]
fn invalid_inputs_fail_exactly_their_rule() {
    let rules = all_rules();
    let misses = invalid_misses(&rules);
    assert!(misses.is_empty(), "{misses:#?}");
    let validator = Validator::new();
    for (what, in_matrix, kind, spec, old, expected) in invalid_rows() {
        if in_matrix {
            assert!(BAD_INPUT.contains(&format!("{what:?}")), "{what:?} is no longer in tests/bad_input.rs");
        }
        // As a whole object: one error, with the rule's message, reason and field path.
        let new = object(kind, &spec);
        let old = old.map(|o| object(kind, &o));
        let rule = rules.iter().find(|r| r.path_text() == expected).unwrap();
        let errors = validator.validate(&root_schema(kind), &new, old.as_ref()).unwrap_err();
        assert_eq!(errors.len(), 1, "{what}: {errors:?}");
        assert_eq!(errors[0].message, rule.message(), "{what}");
        assert_eq!(errors[0].reason.as_deref(), Some("FieldValueInvalid"), "{what}");
        assert_eq!(errors[0].field_path, rule.error_path(), "{what}");
    }
    // The field paths users see on 1.28+ (1.25–1.27 report the rule's node instead).
    let paths: Vec<String> = rules.iter().map(FoundRule::error_path).collect();
    assert_eq!(paths, ["spec.expiry.acknowledgeRisk", "spec.owner"]);
}

/// The tables above would catch a rule that refuses valid objects, accepts invalid ones
/// or cannot be evaluated (a misspelt field, a missing default).
#[test]
fn the_tables_catch_broken_rules() {
    let mutations = [
        ("self.mode != 'Disabled' || self.acknowledgeRisk", "self.mode != 'Disabled'", true, false),
        (
            "self.mode != 'Disabled' || self.acknowledgeRisk",
            "self.mode == 'Disabled' || self.acknowledgeRisk",
            true,
            true,
        ),
        (
            "self.mode != 'Disabled' || self.acknowledgeRisk",
            "self.mode != 'Disabled' || self.acknowledgedRisk",
            true,
            true,
        ),
        ("self.mode != 'Disabled' || self.acknowledgeRisk", "true", false, true),
        ("self == oldSelf", "self != oldSelf", true, true),
        ("self == oldSelf", "self.size() > 0", false, true),
        ("self == oldSelf", "self.trim() == oldSelf.trim()", false, true),
    ];
    for (rule, broken, valid_fails, invalid_misses_) in mutations {
        let mut rules = all_rules();
        let target = rules.iter_mut().find(|r| r.rule() == rule).unwrap();
        target.entry.insert("rule".into(), json!(broken));
        assert_eq!(!valid_failures(&rules).is_empty(), valid_fails, "{broken}");
        let misses = invalid_misses(&rules).len();
        assert_eq!(misses > 0, invalid_misses_, "{broken}");
    }
}

#[test]
fn the_owner_rule_runs_only_on_updates() {
    let rules = all_rules();
    let spec = json!({"owner": "team-a"});
    // Create: no stored object, so the transition rule does not run (nothing to compare).
    let created = run_rules(&rules, "ApiKey", &object("ApiKey", &spec), None);
    assert!(created.is_empty(), "{created:?}");
    // Status writes and metadata edits leave the owner as it was.
    let mut with_status = object("ApiKey", &spec);
    with_status["status"] = json!({"clientId": "c", "conditions": []});
    with_status["metadata"]["annotations"] = json!({"keyward.dev/rotate": "1"});
    let results = run_rules(&rules, "ApiKey", &with_status, Some(&object("ApiKey", &spec)));
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].1, Ok(true));
    // The engine itself: changed and unchanged owners, directly.
    assert_eq!(evaluate("self == oldSelf", &json!("a"), Some(&json!("a"))), Ok(true));
    assert_eq!(evaluate("self == oldSelf", &json!("a"), Some(&json!("b"))), Ok(false));
}

/// The rules are the same in every rendering that has rules, and the types' own CRDs
/// (what the walk above sees) are those of the 1.28+ rendering.
#[test]
fn the_checked_rules_are_the_ones_installed() {
    fn rules_of(values: &[Value]) -> Vec<(String, String)> {
        let mut out = vec![];
        fn walk(v: &Value, out: &mut Vec<(String, String)>) {
            match v {
                Value::Object(m) => {
                    for r in m.get("x-kubernetes-validations").and_then(Value::as_array).into_iter().flatten()
                    {
                        out.push((r["rule"].as_str().unwrap().into(), r["message"].as_str().unwrap().into()));
                    }
                    m.values().for_each(|c| walk(c, out));
                }
                Value::Array(a) => a.iter().for_each(|c| walk(c, out)),
                _ => {}
            }
        }
        values.iter().for_each(|v| walk(v, &mut out));
        out
    }
    let newest = rules_of(&crd_values(CrdRendering::CelWithReasons).unwrap());
    assert_eq!(newest, rules_of(&crd_values(CrdRendering::Cel).unwrap()));
    let types =
        [serde_json::to_value(KeyPolicy::crd()).unwrap(), serde_json::to_value(ApiKey::crd()).unwrap()];
    assert_eq!(newest, rules_of(&types));
    let walked: Vec<(String, String)> =
        all_rules().iter().map(|r| (r.rule().to_string(), r.message().to_string())).collect();
    assert_eq!(newest, walked);
}
