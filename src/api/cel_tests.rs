//! Every CEL rule (`x-kubernetes-validations`) of the CRDs, checked with a CEL engine.
//!
//! The fast check, without an API server: the rules are evaluated with the `cel` crate
//! plus the Kubernetes CEL libraries (`kube-cel`, from the kube-rs project): each rule is
//! found by walking the generated schema (1.28+ rendering), must compile and stay within
//! the cost budget, must hold for every valid object we ship or test with (the examples,
//! and every row the bad-input matrix in `tests/bad_input.rs` expects the API server to
//! accept), and must fail for the matrix's inputs that a CEL rule refuses on newer
//! clusters (and the controller refuses on older ones). Each row is checked twice: rule by
//! rule with `self` (and `oldSelf`) bound here, and as a whole object by
//! `kube_cel::Validator`, which walks the schema and applies its defaults the way the API
//! server does. The rows live in `cel_rows.rs`; `tests/cel_live.rs` sends the same rows to
//! a live API server and checks that it agrees on every one.

use std::sync::Arc;

use kube::CustomResourceExt;
use kube_cel::cel::{Context, Program, Value as Cel};
use kube_cel::{KubeCelExt, ScopeContext, Validator, analyze_rule, apply_defaults, compile_schema};
use serde_json::{Map, Value, json};

use super::cel_rows::{invalid_rows, object, valid_rows};
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
