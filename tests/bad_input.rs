//! Bad-input matrix (issue 7): one row per invalid ApiKey or KeyPolicy input — every
//! spec field with a wrong type, an out-of-range or malformed value, huge strings,
//! names that are not names, unknown or excluding policies, foreign Secrets, owner
//! limits, duplicate descriptions, two defaults, Disabled expiry without
//! acknowledgement. Each row is either refused by the API server at admission (the CRD
//! schema: types, enums, patterns, bounds) or accepted and answered with the documented
//! condition and a Warning Event (v1.20 ignores the CRDs' CEL rules, so the controller
//! validates too). Around every row the namespace's Secrets and other ApiKeys, and the
//! row's valid policies, are snapshotted: nothing but the object under test changes,
//! and no condition, status or Event text carries key material.
//!
//! One test: one cluster-wide controller (KeyPolicy status is only written by a
//! cluster-wide instance) serves every row. Rows run concurrently, each in a namespace
//! of its own with a Ready bystander ApiKey; the two-defaults row runs alone afterwards,
//! since a second default breaks default resolution for everyone.

mod common;

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use common::{KeywardProcess, TestNamespace, client, eventually, get_key, ready, wait_key};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use keyward::api::{ApiKey, KeyPolicy, find_condition};
use keyward::controller::CLUSTER_EVENTS_NAMESPACE;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

/// Placeholder for the row's namespace in row JSON (`$NS-p` is the row's valid policy).
const NS: &str = "$NS";
/// How long a condition or Event may take to appear.
const WAIT: Duration = Duration::from_secs(45);
/// Rows in flight at once (2-core machine, one debug-build controller).
const PARALLEL: usize = 10;
/// Key material a foreign Secret holds: it must never surface in any message.
const FOREIGN_KEY: &str = "kw_F0reignMaterialThatKeywardMustNeverRepeat0000";

/// Something a row needs in place (and settled) before its "before" snapshot.
enum Setup {
    /// KeyPolicy `$NS-<suffix>` with this spec, waited until it reports `Accepted`.
    Policy(&'static str, Value),
    /// ApiKey with this spec, waited until Ready with its key in its Secret.
    Key(&'static str, Value),
    /// A Secret keyward does not own.
    Secret(Value),
}

/// What the row does to the object under test.
enum Apply {
    /// Create ApiKey `bad` from `{"metadata": …, "spec": …}`.
    Key(Value),
    /// Create KeyPolicies `$NS-bad`, `$NS-bad2`, … (all under test), then ApiKey `bad`
    /// with spec `key` (which uses them, by name or as default).
    Policy { specs: Vec<Value>, key: Value },
    /// Create ApiKey `bad` with `spec`, wait until it is Ready, then merge-patch it.
    Patch { spec: Value, patch: Value },
}

/// The documented outcome.
enum Expect {
    /// Refused at admission; the error contains this.
    Refused(&'static str),
    /// ApiKey `bad`: `Ready` with this status and reason, its message containing
    /// `mentions`; with `False`, a Warning Event with the reason.
    Key { status: &'static str, reason: &'static str, mentions: &'static str },
    /// Every KeyPolicy under test: `Accepted=False` with `reason` and a Warning Event;
    /// ApiKey `bad`: `Ready=False` with `key_reason` and a Warning Event. Both messages
    /// contain `mentions`.
    Policy { reason: &'static str, key_reason: &'static str, mentions: &'static str },
    /// ApiKey `bad` keeps its valid key (`Ready=True`) but can issue no new one:
    /// `Stalled=True` with this reason, its message containing `mentions`, and a Warning
    /// Event with the reason.
    Stalled { reason: &'static str, mentions: &'static str },
    /// ApiKey `bad` gets a key with its lifetime clamped to the policy's bounds:
    /// `Ready=True`, `LifetimeClamped=True` whose message contains `mentions`, and a
    /// Warning Event `LifetimeOutOfBounds`.
    Clamped(&'static str),
}

struct Row {
    name: &'static str,
    setup: Vec<Setup>,
    apply: Apply,
    expect: Expect,
}

fn row(name: &'static str, apply: Apply, expect: Expect) -> Row {
    Row { name, setup: vec![], apply, expect }
}

fn with(setup: Vec<Setup>, mut r: Row) -> Row {
    r.setup = setup;
    r
}

/// ApiKey `bad` with this spec.
fn key(spec: Value) -> Apply {
    Apply::Key(json!({ "spec": spec }))
}

/// ApiKey `bad` with the row's valid policy, owner `o`, and `extra` spec fields.
fn key_with(extra: Value) -> Apply {
    key(merge(json!({"policy": format!("{NS}-p"), "owner": "o"}), extra))
}

/// KeyPolicy `$NS-bad` with this spec and ApiKey `bad` naming it.
fn policy(spec: Value) -> Apply {
    Apply::Policy { specs: vec![spec], key: json!({"policy": format!("{NS}-bad"), "owner": "o"}) }
}

/// A valid ApiKey `bad` (row policy, owner `o`), Ready before `patch` is applied.
fn patch(patch: Value) -> Apply {
    Apply::Patch { spec: json!({"policy": format!("{NS}-p"), "owner": "o"}), patch }
}

/// Refused at admission with an error containing `what`, or one of its ` | `-separated
/// alternatives (the wording of servers the suite runs on).
fn refused(what: &'static str) -> Expect {
    Expect::Refused(what)
}

fn blocked(reason: &'static str, mentions: &'static str) -> Expect {
    Expect::Key { status: "False", reason, mentions }
}

fn stalled(reason: &'static str, mentions: &'static str) -> Expect {
    Expect::Stalled { reason, mentions }
}

fn active() -> Expect {
    Expect::Key { status: "True", reason: "KeyActive", mentions: "" }
}

fn rejected(reason: &'static str, mentions: &'static str) -> Expect {
    Expect::Policy { reason, key_reason: "PolicyInvalid", mentions }
}

fn merge(mut base: Value, extra: Value) -> Value {
    base.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    base
}

/// A Secret `name` that keyward does not own (optionally dressed up with its labels).
fn foreign(name: &str, labels: Value) -> Setup {
    Setup::Secret(json!({
        "metadata": {"name": name, "labels": labels, "annotations": {"owner": "someone else"}},
        "type": "Opaque",
        "stringData": {"api-key": FOREIGN_KEY, "note": "not keyward's"}
    }))
}

/// The valid policy every row's bystander (and most bad ApiKeys) use: one-day keys,
/// no warning thresholds, so nothing changes on its own while a row runs.
fn row_policy() -> Value {
    json!({"expiry": {"maxLifetime": "P1D"}, "notifications": {"before": []}})
}

fn rows() -> Vec<Row> {
    let huge = "x".repeat(100_000);
    let p = format!("{NS}-p");
    let owner_limit = Setup::Policy("one", merge(row_policy(), json!({"limits": {"maxKeysPerOwner": 1}})));
    vec![
        // ── ApiKey: refused by the CRD schema ──────────────────────────────────────
        row("spec: not an object", Apply::Key(json!({"spec": "banana"})), refused("must be of type object")),
        row("owner: missing", key(json!({"policy": p})), refused("spec.owner: Required value")),
        row(
            "owner: number",
            key_with(json!({"owner": 5})),
            refused("spec.owner in body must be of type string"),
        ),
        row("owner: empty", key_with(json!({"owner": ""})), refused("at least 1 chars long")),
        row(
            "owner: 100 KB",
            key_with(json!({"owner": huge})),
            refused(
                "spec.owner: Too long: may not be more than 253 bytes | spec.owner in body should be at most 253 chars long",
            ),
        ),
        row("description: number", key_with(json!({"description": 42})), refused("must be of type string")),
        row(
            "description: 100 KB",
            key_with(json!({"description": huge})),
            refused(
                "spec.description: Too long: may not be more than 1024 bytes | should be at most 1024 chars long",
            ),
        ),
        row(
            "policy: list",
            key_with(json!({"policy": ["a"]})),
            refused("spec.policy in body must be of type string"),
        ),
        row("secretName: empty", key_with(json!({"secretName": ""})), refused("at least 1 chars long")),
        row(
            "secretName: 300 chars",
            key_with(json!({"secretName": "s".repeat(300)})),
            refused(
                "spec.secretName: Too long: may not be more than 253 bytes | should be at most 253 chars long",
            ),
        ),
        row(
            "lifetime: number",
            key_with(json!({"lifetime": 90})),
            refused("spec.lifetime in body must be of type string"),
        ),
        row(
            "secretTemplate: string",
            key_with(json!({"secretTemplate": "x"})),
            refused("must be of type object"),
        ),
        row(
            "secretTemplate.labels: number value",
            key_with(json!({"secretTemplate": {"labels": {"a": 1}}})),
            refused("must be of type string"),
        ),
        row(
            "consumers: string",
            key_with(json!({"consumers": "Deployment/x"})),
            refused("must be of type array"),
        ),
        row(
            "consumers: unknown kind",
            key_with(json!({"consumers": [{"kind": "CronJob", "name": "x"}]})),
            refused("Unsupported value: \"CronJob\""),
        ),
        row(
            "consumers: missing name",
            key_with(json!({"consumers": [{"kind": "Deployment"}]})),
            refused("Required value"),
        ),
        row(
            "consumers: empty name",
            key_with(json!({"consumers": [{"kind": "Deployment", "name": ""}]})),
            refused("at least 1 chars long"),
        ),
        row("revokedKeys: number", key_with(json!({"revokedKeys": [1]})), refused("must be of type string")),
        row(
            "revokedKeys: duplicate",
            key_with(json!({"revokedKeys": ["0123456789", "0123456789"]})),
            refused("Duplicate value"),
        ),
        row(
            "rotate annotation: 300 KB",
            Apply::Key(json!({
                "metadata": {"annotations": {"keyward.dev/rotate": "r".repeat(300_000)}},
                "spec": {"policy": p, "owner": "o"}
            })),
            refused(
                "metadata.annotations: Too long: may not be more than 262144 bytes | Too long: must have at most 262144 bytes",
            ),
        ),
        // ── ApiKey: accepted, refused by the controller ────────────────────────────
        row("owner: blank", key_with(json!({"owner": "   "})), blocked("InvalidSpec", "spec.owner")),
        row(
            "lifetime: banana",
            key_with(json!({"lifetime": "banana"})),
            blocked("InvalidSpec", "spec.lifetime"),
        ),
        row("lifetime: P", key_with(json!({"lifetime": "P"})), blocked("InvalidSpec", "spec.lifetime")),
        row("lifetime: -P1D", key_with(json!({"lifetime": "-P1D"})), blocked("InvalidSpec", "negative")),
        row("lifetime: 100 KB", key_with(json!({"lifetime": huge})), blocked("InvalidSpec", "spec.lifetime")),
        row(
            "lifetime: P99999999Y",
            key_with(json!({"lifetime": "P99999999Y"})),
            blocked("InvalidSpec", "too large"),
        ),
        row(
            "lifetime: PT0S",
            key_with(json!({"lifetime": "PT0S"})),
            Expect::Clamped("keys are issued for PT1M"),
        ),
        row(
            "lifetime: PT30S < minLifetime",
            key_with(json!({"lifetime": "PT30S"})),
            Expect::Clamped("bounds PT1M to P1D"),
        ),
        row(
            "lifetime: P2D > maxLifetime",
            key_with(json!({"lifetime": "P2D"})),
            Expect::Clamped("keys are issued for P1D"),
        ),
        row(
            "policy: unknown",
            key(json!({"policy": format!("{NS}-nope"), "owner": "o"})),
            blocked("PolicyNotFound", "does not exist"),
        ),
        row(
            "policy: subresource path",
            key(json!({"policy": format!("{NS}-p/status"), "owner": "o"})),
            blocked("InvalidSpec", "spec.policy"),
        ),
        row(
            "policy: 100 KB",
            key(json!({"policy": huge, "owner": "o"})),
            blocked("InvalidSpec", "spec.policy"),
        ),
        with(
            vec![Setup::Policy(
                "narrow",
                json!({"namespaceSelector": {"matchLabels": {"keyward.dev/test": "elsewhere"}}}),
            )],
            row(
                "policy: namespaceSelector excludes",
                key(json!({"policy": format!("{NS}-narrow"), "owner": "o"})),
                blocked("PolicyNotAllowed", "namespaceSelector"),
            ),
        ),
        row(
            "secretName: not a DNS name",
            key_with(json!({"secretName": "Bad_Name!"})),
            blocked("InvalidSpec", "spec.secretName"),
        ),
        row(
            "secretName: path traversal",
            key_with(json!({"secretName": "../../kube-system/secrets/x"})),
            blocked("InvalidSpec", "spec.secretName"),
        ),
        with(
            vec![foreign("foreign", json!({"team": "other"}))],
            row(
                "secretName: foreign Secret",
                key_with(json!({"secretName": "foreign"})),
                blocked("SecretConflict", "\"foreign\""),
            ),
        ),
        with(
            vec![foreign(
                "spoof",
                json!({"app.kubernetes.io/managed-by": "keyward", "keyward.dev/api-key": "bad"}),
            )],
            row(
                "secretName: keyward labels, no owner",
                key_with(json!({"secretName": "spoof"})),
                blocked("SecretConflict", "\"spoof\""),
            ),
        ),
        row(
            "secretName: another ApiKey's Secret",
            key_with(json!({"secretName": "bystander"})),
            blocked("SecretConflict", "\"bystander\""),
        ),
        row(
            "consumers: subresource name",
            key_with(json!({"consumers": [{"kind": "Deployment", "name": "checkout/scale"}]})),
            blocked("InvalidSpec", "spec.consumers[0].name"),
        ),
        row(
            "secretTemplate.labels: bad key",
            key_with(json!({"secretTemplate": {"labels": {"bad key": "v"}}})),
            blocked("InvalidSpec", "spec.secretTemplate.labels"),
        ),
        row(
            "secretTemplate.labels: 64-char value",
            key_with(json!({"secretTemplate": {"labels": {"k": "v".repeat(64)}}})),
            blocked("InvalidSpec", "spec.secretTemplate.labels"),
        ),
        row(
            "secretTemplate.annotations: bad key",
            key_with(json!({"secretTemplate": {"annotations": {"a/b/c": "v"}}})),
            blocked("InvalidSpec", "spec.secretTemplate.annotations"),
        ),
        with(
            vec![owner_limit, Setup::Key("a-first", json!({"policy": format!("{NS}-one"), "owner": "team"}))],
            row(
                "owner: more keys than maxKeysPerOwner",
                key(json!({"policy": format!("{NS}-one"), "owner": "team"})),
                blocked("OwnerKeyLimitExceeded", "may hold 1"),
            ),
        ),
        with(
            vec![Setup::Key("a-first", json!({"policy": p, "owner": "team", "description": "checkout"}))],
            row(
                "description: duplicate (padded)",
                key(json!({"policy": p, "owner": " team ", "description": "  checkout "})),
                blocked("DuplicateDescription", "unique per owner"),
            ),
        ),
        // ── ApiKey: accepted, harmless ─────────────────────────────────────────────
        row(
            "revokedKeys: unknown IDs",
            key_with(json!({"revokedKeys": ["0000000000", "not-a-key-id"]})),
            active(),
        ),
        row(
            "rotate annotation: empty",
            Apply::Key(
                json!({"metadata": {"annotations": {"keyward.dev/rotate": ""}}, "spec": {"policy": p, "owner": "o"}}),
            ),
            active(),
        ),
        row("unknown field (pruned)", key_with(json!({"lifetme": "PT1S"})), active()),
        // ── ApiKey: a Ready key edited into a bad state (its Secret is never touched) ──
        row(
            "patch: lifetime banana",
            patch(json!({"spec": {"lifetime": "banana"}})),
            stalled("InvalidSpec", "spec.lifetime"),
        ),
        row(
            "patch: unknown policy",
            patch(json!({"spec": {"policy": format!("{NS}-nope")}})),
            stalled("PolicyNotFound", "does not exist"),
        ),
        with(
            vec![foreign("foreign", json!({}))],
            row(
                "patch: secretName to foreign",
                patch(json!({"spec": {"secretName": "foreign"}})),
                // The ApiKey's Secret is now one it may not write: it cannot say that
                // consumers of that Secret hold its key.
                blocked("SecretConflict", "\"foreign\""),
            ),
        ),
        row(
            "patch: blank rotate annotation",
            patch(
                json!({"metadata": {"annotations": {"keyward.dev/rotate": "   "}}, "spec": {"description": "touched"}}),
            ),
            active(),
        ),
        row("patch: owner number", patch(json!({"spec": {"owner": 5}})), refused("must be of type string")),
        // ── KeyPolicy: refused by the CRD schema ───────────────────────────────────
        row("default: string", policy(json!({"default": "yes"})), refused("must be of type boolean")),
        row(
            "expiry.mode: Off",
            policy(json!({"expiry": {"mode": "Off"}})),
            refused("Unsupported value: \"Off\""),
        ),
        row(
            "expiry.acknowledgeRisk: string",
            policy(json!({"expiry": {"mode": "Disabled", "acknowledgeRisk": "true"}})),
            refused("must be of type boolean"),
        ),
        row(
            "expiry.maxLifetime: number",
            policy(json!({"expiry": {"maxLifetime": 90}})),
            refused("must be of type string"),
        ),
        row(
            "keyFormat.prefix: KW-",
            policy(json!({"keyFormat": {"prefix": "KW-"}})),
            refused("should match"),
        ),
        row(
            "keyFormat.prefix: 17 chars",
            policy(json!({"keyFormat": {"prefix": "k".repeat(17)}})),
            refused("should match"),
        ),
        row(
            "keyFormat.randomBytes: 8",
            policy(json!({"keyFormat": {"randomBytes": 8}})),
            refused("greater than or equal to 16"),
        ),
        row(
            "keyFormat.randomBytes: 65",
            policy(json!({"keyFormat": {"randomBytes": 65}})),
            refused("less than or equal to 64"),
        ),
        row(
            "keyFormat.randomBytes: string",
            policy(json!({"keyFormat": {"randomBytes": "32"}})),
            refused("must be of type integer"),
        ),
        row(
            "keyFormat.encoding: base32",
            policy(json!({"keyFormat": {"encoding": "base32"}})),
            refused("Unsupported value"),
        ),
        row(
            "keyFormat.checksum: string",
            policy(json!({"keyFormat": {"checksum": "yes"}})),
            refused("must be of type boolean"),
        ),
        row(
            "limits.maxKeysPerOwner: 0",
            policy(json!({"limits": {"maxKeysPerOwner": 0}})),
            refused("greater than or equal to 1"),
        ),
        row(
            "limits.maxKeysPerOwner: 1001",
            policy(json!({"limits": {"maxKeysPerOwner": 1001}})),
            refused("less than or equal to 1000"),
        ),
        row(
            "limits.maxKeysPerOwner: 1.5",
            policy(json!({"limits": {"maxKeysPerOwner": 1.5}})),
            refused("must be of type integer"),
        ),
        row(
            "limits.uniqueDescriptionPerOwner: string",
            policy(json!({"limits": {"uniqueDescriptionPerOwner": "no"}})),
            refused("must be of type boolean"),
        ),
        row(
            "rotation.automatic: string",
            policy(json!({"rotation": {"automatic": "no"}})),
            refused("must be of type boolean"),
        ),
        row(
            "rotation.secondaryAt: number",
            policy(json!({"rotation": {"secondaryAt": 50}})),
            refused("must be of type string"),
        ),
        row(
            "notifications.before: string",
            policy(json!({"notifications": {"before": "P1D"}})),
            refused("must be of type array"),
        ),
        row(
            "notifications.webhooks: no url",
            policy(json!({"notifications": {"webhooks": [{"secretRef": {"namespace": "a", "name": "b"}}]}})),
            refused("Required value"),
        ),
        row(
            "notifications.webhooks: empty url",
            policy(json!({"notifications": {"webhooks": [{"url": ""}]}})),
            refused("at least 1 chars long"),
        ),
        row(
            "notifications.webhooks: 3000-char url",
            policy(
                json!({"notifications": {"webhooks": [{"url": format!("https://{}", "h".repeat(3000))}]}}),
            ),
            refused("url: Too long: may not be more than 2048 bytes | should be at most 2048 chars long"),
        ),
        row(
            "notifications.webhooks: secretRef without name",
            policy(
                json!({"notifications": {"webhooks": [{"url": "https://x", "secretRef": {"namespace": "a"}}]}}),
            ),
            refused("Required value"),
        ),
        row(
            "namespaceSelector: expression without operator",
            policy(json!({"namespaceSelector": {"matchExpressions": [{"key": "a"}]}})),
            refused("Required value"),
        ),
        row(
            "namespaceSelector.matchLabels: number",
            policy(json!({"namespaceSelector": {"matchLabels": {"a": 1}}})),
            refused("must be of type string"),
        ),
        // ── KeyPolicy: accepted, rejected by the controller ────────────────────────
        row(
            "expiry.maxLifetime: banana",
            policy(json!({"expiry": {"maxLifetime": "banana"}})),
            rejected("InvalidDuration", "expiry.maxLifetime"),
        ),
        row(
            "expiry.maxLifetime: P",
            policy(json!({"expiry": {"maxLifetime": "P"}})),
            rejected("InvalidDuration", "expiry.maxLifetime"),
        ),
        row(
            "expiry.maxLifetime: PT0S",
            policy(json!({"expiry": {"maxLifetime": "PT0S"}})),
            rejected("InvalidDuration", "expiry.maxLifetime"),
        ),
        row(
            "expiry.maxLifetime: 100 KB",
            policy(json!({"expiry": {"maxLifetime": huge}})),
            rejected("InvalidDuration", "expiry.maxLifetime"),
        ),
        row(
            "expiry.maxLifetime: P99999999Y",
            policy(json!({"expiry": {"maxLifetime": "P99999999Y"}})),
            rejected("InvalidDuration", "too large"),
        ),
        row(
            "expiry.minLifetime: -P1D",
            policy(json!({"expiry": {"minLifetime": "-P1D"}})),
            rejected("InvalidDuration", "expiry.minLifetime"),
        ),
        row(
            "expiry.minLifetime > maxLifetime",
            policy(json!({"expiry": {"minLifetime": "P2D", "maxLifetime": "P1D"}})),
            rejected("InvalidSpec", "expiry.minLifetime"),
        ),
        row(
            "expiry.inactivityTimeout: PT",
            policy(json!({"expiry": {"inactivityTimeout": "PT"}})),
            rejected("InvalidDuration", "expiry.inactivityTimeout"),
        ),
        row(
            "expiry.inactivityTimeout: PT0S",
            policy(json!({"expiry": {"inactivityTimeout": "PT0S"}})),
            rejected("InvalidDuration", "expiry.inactivityTimeout"),
        ),
        row(
            "expiry.mode Disabled, no acknowledgeRisk",
            policy(json!({"expiry": {"mode": "Disabled"}})),
            // The CRD's CEL rule (every supported server runs it; the controller still
            // refuses it as RiskNotAcknowledged where a server does not).
            refused(
                "spec.expiry.acknowledgeRisk: Invalid value: expiry.mode Disabled requires expiry.acknowledgeRisk: true | spec.expiry.acknowledgeRisk: Invalid value: \"object\": expiry.mode Disabled requires expiry.acknowledgeRisk: true",
            ),
        ),
        row(
            "rotation.secondaryAt: 150%",
            policy(json!({"rotation": {"secondaryAt": "150%"}})),
            rejected("InvalidSpec", "rotation.secondaryAt"),
        ),
        row(
            "rotation.secondaryAt: 0%",
            policy(json!({"rotation": {"secondaryAt": "0%"}})),
            rejected("InvalidSpec", "rotation.secondaryAt"),
        ),
        row(
            "rotation.secondaryAt: half",
            policy(json!({"rotation": {"secondaryAt": "half"}})),
            rejected("InvalidDuration", "rotation.secondaryAt"),
        ),
        row(
            "rotation.flipBefore: 10m",
            policy(json!({"rotation": {"flipBefore": "10m"}})),
            rejected("InvalidDuration", "rotation.flipBefore"),
        ),
        row(
            "rotation.flipBefore: -PT1M",
            policy(json!({"rotation": {"flipBefore": "-PT1M"}})),
            rejected("InvalidDuration", "rotation.flipBefore"),
        ),
        row(
            "notifications.before: x",
            policy(json!({"notifications": {"before": ["P7D", "x"]}})),
            rejected("InvalidDuration", "notifications.before[1]"),
        ),
        row(
            "notifications.webhooks: ftp url",
            policy(json!({"notifications": {"webhooks": [{"url": "ftp://example.com/hook"}]}})),
            rejected("InvalidSpec", "webhooks[0].url"),
        ),
        row(
            "notifications.webhooks: url with space",
            policy(json!({"notifications": {"webhooks": [{"url": "https://exa mple.com"}]}})),
            rejected("InvalidSpec", "webhooks[0].url"),
        ),
        row(
            "namespaceSelector: unknown operator",
            policy(
                json!({"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "Banana", "values": ["x"]}]}}),
            ),
            rejected("InvalidSpec", "matchExpressions[0]"),
        ),
        row(
            "namespaceSelector: In without values",
            policy(json!({"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}})),
            rejected("InvalidSpec", "matchExpressions[0]"),
        ),
    ]
}

/// Rows that change default resolution for the whole cluster: run alone, after the rest.
fn serial_rows() -> Vec<Row> {
    vec![row(
        "default: two defaults",
        Apply::Policy {
            specs: vec![json!({"default": true}), json!({"default": true})],
            key: json!({"owner": "o"}),
        },
        Expect::Policy {
            reason: "MultipleDefaults",
            key_reason: "PolicyNotFound",
            mentions: "marked default",
        },
    )]
}

/// `$NS` replaced by the row's namespace.
fn fill(v: &Value, ns: &str) -> Value {
    serde_json::from_str(&v.to_string().replace(NS, ns)).unwrap()
}

fn resource(kind: &str) -> ApiResource {
    match kind {
        "ApiKey" => ApiResource::erase::<ApiKey>(&()),
        _ => ApiResource::erase::<KeyPolicy>(&()),
    }
}

/// Create an object as a user would (no client-side typing): the API server's answer.
async fn create(client: &Client, ns: Option<&str>, kind: &str, obj: Value) -> Result<(), String> {
    let ar = resource(kind);
    let api: Api<DynamicObject> = match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    let mut obj = obj;
    obj["apiVersion"] = json!(ar.api_version);
    obj["kind"] = json!(ar.kind);
    let obj: DynamicObject = serde_json::from_value(obj).expect("object JSON");
    api.create(&PostParams::default(), &obj).await.map(drop).map_err(|e| e.to_string())
}

/// Wait until ApiKey `name` is Ready and its Secret carries the active key.
async fn settled(client: &Client, ns: &str, name: &str) {
    let id = wait_key(client, ns, name, WAIT, |k| {
        ready(k).filter(|(s, _)| s == "True")?;
        common::active(k).map(|a| a.key_id)
    })
    .await;
    eventually(&format!("{ns}/{name}'s Secret to carry key {id}"), WAIT, || async {
        let data = common::secret_data(client, ns, name).await?;
        (data.get("key-id") == Some(&id)).then_some(())
    })
    .await;
}

/// The ApiKey's `Ready` condition once it reflects the current generation with `reason`.
async fn key_condition(client: &Client, ns: &str, reason: &str) -> (ApiKey, keyward::api::Condition) {
    key_condition_of(client, ns, "Ready", reason).await
}

async fn key_condition_of(
    client: &Client,
    ns: &str,
    type_: &str,
    reason: &str,
) -> (ApiKey, keyward::api::Condition) {
    wait_key(client, ns, "bad", WAIT, |k| {
        let c = find_condition(&k.status.as_ref()?.conditions, type_)?;
        (c.observed_generation == k.metadata.generation && c.reason == reason).then(|| (k.clone(), c.clone()))
    })
    .await
}

/// The note of a Warning Event `reason` regarding `kind`/`name`, in `ns`.
async fn warning(client: &Client, ns: &str, kind: &str, name: &str, reason: &str) -> String {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    eventually(&format!("a Warning {reason} about {kind} {name} in {ns}"), WAIT, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items.into_iter().find_map(|e| {
            let r = e.regarding.as_ref()?;
            let hit = e.type_.as_deref() == Some("Warning")
                && e.reason.as_deref() == Some(reason)
                && r.kind.as_deref() == Some(kind)
                && r.name.as_deref() == Some(name);
            hit.then(|| e.note.unwrap_or_default())
        })
    })
    .await
}

/// Every Warning Event reason regarding ApiKey `bad` in `ns`.
async fn warnings_about_bad(client: &Client, ns: &str) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let list = events.list(&ListParams::default()).await.expect("list Events");
    list.items
        .into_iter()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("bad"))
        .map(|e| e.reason.unwrap_or_default())
        .collect()
}

/// What must not change: every Secret in the namespace (service-account tokens aside),
/// every ApiKey but `bad` (whole objects, resourceVersion included), and the spec and
/// `Accepted` condition of the row's valid policies (their `keyCount` counts the bad
/// ApiKey too, by design).
async fn snapshot(client: &Client, ns: &str, policies: &[String]) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for s in secrets.list(&ListParams::default()).await.expect("list Secrets").items {
        if s.type_.as_deref() != Some("kubernetes.io/service-account-token") {
            out.insert(format!("Secret/{}", s.name_any()), serde_json::to_value(&s).unwrap());
        }
    }
    let keys: Api<ApiKey> = Api::namespaced(client.clone(), ns);
    for k in keys.list(&ListParams::default()).await.expect("list ApiKeys").items {
        if k.name_any() != "bad" {
            out.insert(format!("ApiKey/{}", k.name_any()), serde_json::to_value(&k).unwrap());
        }
    }
    for name in policies {
        let p = Api::<KeyPolicy>::all(client.clone()).get(name).await.expect("read KeyPolicy");
        let c = p.status.as_ref().and_then(|s| find_condition(&s.conditions, "Accepted").cloned());
        out.insert(format!("KeyPolicy/{name}"), json!({"spec": p.spec, "accepted": c}));
    }
    out
}

/// Key material in the namespace's Secrets (and the foreign one), to look for in texts.
async fn material(client: &Client, ns: &str) -> Vec<String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut found = vec![FOREIGN_KEY.to_string()];
    for s in secrets.list(&ListParams::default()).await.expect("list Secrets").items {
        for (k, v) in s.data.unwrap_or_default() {
            if ["api-key", "primary", "secondary"].contains(&k.as_str()) {
                found.push(String::from_utf8_lossy(&v.0).into_owned());
            }
        }
    }
    found
}

/// The start of a (possibly huge) error, for failure messages.
fn short(text: &str) -> String {
    text.chars().take(300).collect()
}

/// Panic if `text` holds any of `material`, or anything shaped like a `kw_` key.
fn assert_no_material(what: &str, text: &str, material: &[String]) {
    for m in material.iter().filter(|m| m.len() >= 16) {
        assert!(!text.contains(m.as_str()), "{what} contains key material");
    }
    for (i, _) in text.match_indices("kw_") {
        let run = text[i + 3..].chars().take_while(|c| c.is_ascii_alphanumeric()).count();
        assert!(run < 16, "{what} contains a key-shaped string: {}", &text[i..i + 3 + run.min(8)]);
    }
}

/// Namespace UID, so the row's KeyPolicies are garbage-collected with its namespace
/// even when the row panics.
async fn owned_by_namespace(client: &Client, ns: &str) -> Value {
    let uid = Api::<Namespace>::all(client.clone()).get(ns).await.expect("read namespace").uid();
    json!([{"apiVersion": "v1", "kind": "Namespace", "name": ns, "uid": uid}])
}

/// Run one row: the outcome, for the table, or a panic naming what went wrong. The
/// KeyPolicies under test are deleted whatever happens (and would also be garbage-
/// collected with the namespace).
async fn run(client: Client, row: Row) -> String {
    let ns = TestNamespace::new(&client, "bi").await;
    let n = ns.name.clone();
    let mut valid_policies = vec![ns.policy(&client, "p", row_policy()).await];
    let mut settle = vec!["bystander".to_string()];
    ns.apikey(&client, "bystander", json!({"policy": valid_policies[0], "owner": "bystander"})).await;
    for s in &row.setup {
        match s {
            Setup::Policy(suffix, spec) => {
                valid_policies.push(ns.policy(&client, suffix, fill(spec, &n)).await)
            }
            Setup::Key(name, spec) => {
                ns.apikey(&client, name, fill(spec, &n)).await;
                settle.push(name.to_string());
            }
            Setup::Secret(obj) => {
                let secret: Secret = serde_json::from_value(fill(obj, &n)).expect("Secret JSON");
                Api::<Secret>::namespaced(client.clone(), &n)
                    .create(&PostParams::default(), &secret)
                    .await
                    .unwrap();
            }
        }
    }
    for name in &settle {
        settled(&client, &n, name).await;
    }
    for p in &valid_policies {
        common::policy_accepted(&client, p, None, WAIT).await;
    }
    if let Apply::Patch { spec, .. } = &row.apply {
        ns.apikey(&client, "bad", fill(spec, &n)).await;
        settled(&client, &n, "bad").await;
    }
    // The KeyPolicies under test are deleted even when the check panics.
    let mut under_test = vec![];
    let checked =
        AssertUnwindSafe(check(&client, &ns, &row, &valid_policies, &mut under_test)).catch_unwind().await;
    for p in &under_test {
        let _ = Api::<KeyPolicy>::all(client.clone()).delete(p, &DeleteParams::default()).await;
    }
    drop(ns);
    checked.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Apply the row's bad input to its settled namespace and check the outcome.
async fn check(
    client: &Client,
    ns: &TestNamespace,
    row: &Row,
    valid_policies: &[String],
    policies_under_test: &mut Vec<String>,
) -> String {
    let (client, n) = (client.clone(), ns.name.clone());
    let before = snapshot(&client, &n, valid_policies).await;

    // Apply the bad input.
    let admitted = match &row.apply {
        Apply::Key(obj) => {
            let mut obj = fill(obj, &n);
            obj["metadata"]["name"] = json!("bad");
            create(&client, Some(&n), "ApiKey", obj).await
        }
        Apply::Policy { specs, key } => {
            let owners = owned_by_namespace(&client, &n).await;
            let mut result = Ok(());
            for (i, spec) in specs.iter().enumerate() {
                let name = format!("{n}-bad{}", if i == 0 { String::new() } else { (i + 1).to_string() });
                let obj =
                    json!({"metadata": {"name": name, "ownerReferences": owners}, "spec": fill(spec, &n)});
                result = create(&client, None, "KeyPolicy", obj).await;
                if result.is_err() {
                    break;
                }
                policies_under_test.push(name);
            }
            match result {
                Ok(()) => {
                    ns.apikey(&client, "bad", fill(key, &n)).await;
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        Apply::Patch { patch, .. } => Api::<ApiKey>::namespaced(client.clone(), &n)
            .patch("bad", &PatchParams::default(), &Patch::Merge(fill(patch, &n)))
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
    };

    // The documented outcome.
    let mut texts: Vec<(String, String)> = vec![];
    let outcome = match (&row.expect, admitted) {
        (Expect::Refused(want), Err(e)) => {
            assert!(
                want.split(" | ").any(|w| e.contains(w)),
                "refused, but the error lacks {want:?}: {}",
                short(&e)
            );
            texts.push(("admission error".into(), e));
            format!("refused at admission: …{want}…")
        }
        (Expect::Refused(want), Ok(())) => panic!("admitted, expected a refusal containing {want:?}"),
        (_, Err(e)) => panic!("refused at admission: {}", short(&e)),
        (Expect::Key { status, reason, mentions }, Ok(())) => {
            let (key, c) = key_condition(&client, &n, reason).await;
            assert_eq!(c.status, *status, "{:#?}", key.status);
            assert!(c.message.contains(mentions), "message should contain {mentions:?}: {}", c.message);
            assert!(c.message.len() <= 1024, "huge input echoed: {} bytes", c.message.len());
            texts.push(("ApiKey status".into(), serde_json::to_string(&key.status).unwrap()));
            if *status == "True" {
                settled(&client, &n, "bad").await;
                let s = get_key(&client, &n, "bad").await.status.unwrap_or_default();
                assert!(s.keys.len() == 1 && s.rotation_request.is_none(), "no rotation: {s:#?}");
                let warned = warnings_about_bad(&client, &n).await;
                assert!(warned.is_empty(), "no warnings for a harmless input: {warned:?}");
                format!("accepted: Ready=True {reason}")
            } else {
                if matches!(row.apply, Apply::Key(_)) {
                    let s = key.status.as_ref().unwrap();
                    let none = s.keys.is_empty() && s.active_slot.is_none() && s.client_id.is_none();
                    assert!(none, "a refused key has no key: {s:#?}");
                }
                let note = warning(&client, &n, "ApiKey", "bad", reason).await;
                texts.push(("Event note".into(), note));
                format!("Ready=False {reason} + Warning")
            }
        }
        (Expect::Stalled { reason, mentions }, Ok(())) => {
            let (key, c) = key_condition_of(&client, &n, "Stalled", reason).await;
            assert_eq!(c.status, "True", "{:#?}", key.status);
            assert!(c.message.contains(mentions), "message should contain {mentions:?}: {}", c.message);
            assert!(c.message.len() <= 1024, "huge input echoed: {} bytes", c.message.len());
            let ready = find_condition(&key.status.as_ref().unwrap().conditions, "Ready").unwrap();
            assert_eq!(
                (ready.status.as_str(), ready.reason.as_str()),
                ("True", "KeyActive"),
                "the key stays valid"
            );
            assert!(ready.message.contains("no new key is issued"), "{}", ready.message);
            texts.push(("ApiKey status".into(), serde_json::to_string(&key.status).unwrap()));
            texts.push(("Event note".into(), warning(&client, &n, "ApiKey", "bad", reason).await));
            format!("Ready=True, Stalled=True {reason} + Warning")
        }
        (Expect::Clamped(mentions), Ok(())) => {
            let (key, c) = key_condition_of(&client, &n, "LifetimeClamped", "LifetimeOutOfBounds").await;
            assert_eq!(c.status, "True", "{:#?}", key.status);
            assert!(c.message.contains(mentions), "message should contain {mentions:?}: {}", c.message);
            let (key, _) = key_condition(&client, &n, "KeyActive").await;
            assert_eq!(key.status.as_ref().unwrap().keys.len(), 1, "a key, clamped");
            texts.push(("ApiKey status".into(), serde_json::to_string(&key.status).unwrap()));
            texts.push((
                "Event note".into(),
                warning(&client, &n, "ApiKey", "bad", "LifetimeOutOfBounds").await,
            ));
            "Ready=True, LifetimeClamped=True + Warning".into()
        }
        (Expect::Policy { reason, key_reason, mentions }, Ok(())) => {
            for p in policies_under_test.iter() {
                let (policy, c) = common::policy_accepted(&client, p, Some(reason), WAIT).await;
                assert_eq!(c.status, "False", "{:#?}", policy.status);
                assert!(c.message.contains(mentions), "message should contain {mentions:?}: {}", c.message);
                assert!(c.message.len() <= 1024, "huge input echoed: {} bytes", c.message.len());
                texts.push(("KeyPolicy status".into(), serde_json::to_string(&policy.status).unwrap()));
                texts.push((
                    "Event note".into(),
                    warning(&client, CLUSTER_EVENTS_NAMESPACE, "KeyPolicy", p, reason).await,
                ));
            }
            let (key, c) = key_condition(&client, &n, key_reason).await;
            assert_eq!(c.status, "False", "{:#?}", key.status);
            assert!(c.message.contains(mentions), "message should contain {mentions:?}: {}", c.message);
            texts.push(("ApiKey status".into(), serde_json::to_string(&key.status).unwrap()));
            texts.push(("Event note".into(), warning(&client, &n, "ApiKey", "bad", key_reason).await));
            format!("Accepted=False {reason} + Warning; ApiKey Ready=False {key_reason} + Warning")
        }
    };

    // Nothing else changed; no Secret for a refused key; no key material in any text.
    let after = snapshot(&client, &n, valid_policies).await;
    let ready_now = matches!(row.expect, Expect::Key { status: "True", .. } | Expect::Clamped(_));
    for (id, was) in &before {
        let now = after.get(id);
        assert!(now == Some(was), "{id} changed:\nbefore: {was}\nafter: {now:?}");
    }
    for (id, obj) in after.iter().filter(|(id, _)| !before.contains_key(*id)) {
        let own = obj["metadata"]["labels"]["keyward.dev/api-key"] == "bad" && id == "Secret/bad";
        assert!(ready_now && own, "{id} appeared: {obj}");
    }
    let material = material(&client, &n).await;
    for (what, text) in &texts {
        assert_no_material(what, text, &material);
    }
    outcome
}

/// Run rows `PARALLEL` at a time; (name, outcome or failure) in table order.
async fn run_all(client: &Client, rows: Vec<Row>) -> Vec<(&'static str, Result<String, String>)> {
    let names: Vec<&'static str> = rows.iter().map(|r| r.name).collect();
    let results: Vec<_> =
        futures::stream::iter(rows.into_iter().map(|r| tokio::spawn(run(client.clone(), r))))
            .buffered(PARALLEL)
            .collect()
            .await;
    names
        .into_iter()
        .zip(results)
        .map(|(name, r)| {
            let r = r.map_err(|e| match e.try_into_panic() {
                Ok(p) => p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
                Err(e) => e.to_string(),
            });
            (name, r)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_bad_input_gets_its_documented_answer_and_changes_nothing_else() {
    let client = client().await;
    let started = std::time::Instant::now();
    // Cluster-wide (KeyPolicy status), without leader election (another instance on
    // the cluster would otherwise make this one a standby).
    let keyward = KeywardProcess::start(&["controller", "--leader-elect", "false"], "info");
    keyward.wait_ready().await;

    let mut results = run_all(&client, rows()).await;
    results.extend(run_all(&client, serial_rows()).await);
    // With the two extra defaults deleted, a single remaining default is accepted again.
    let policies: Api<KeyPolicy> = Api::all(client.clone());
    eventually("a single remaining default to be accepted again", WAIT, || async {
        let list = policies.list(&ListParams::default()).await.ok()?;
        let defaults: Vec<&KeyPolicy> = list.items.iter().filter(|p| p.spec.default).collect();
        let [only] = defaults.as_slice() else { return Some(()) };
        let reason = find_condition(&only.status.as_ref()?.conditions, "Accepted")?.reason.clone();
        (reason != "MultipleDefaults").then_some(())
    })
    .await;

    eprintln!("\nbad-input matrix: {} rows in {:.0?}", results.len(), started.elapsed());
    for (name, r) in &results {
        match r {
            Ok(outcome) => eprintln!("  {name:<48} {outcome}"),
            Err(e) => eprintln!("  {name:<48} FAILED: {}", e.lines().next().unwrap_or_default()),
        }
    }
    let failed: Vec<String> =
        results.iter().filter_map(|(n, r)| r.as_ref().err().map(|e| format!("{n}: {e}"))).collect();
    assert!(
        failed.is_empty(),
        "{} of {} rows failed:\n{}\ncontroller log: {}",
        failed.len(),
        results.len(),
        failed.join("\n\n"),
        keyward.log.display()
    );
}
