use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Condition;

/// Annotation on an ApiKey: each new value requests one rotation.
pub const ROTATE_ANNOTATION: &str = "keyward.dev/rotate";
/// Pod-template annotation patched on consumers at each flip.
pub const KEY_ID_ANNOTATION: &str = "keyward.dev/key-id";
/// Label on every consumer Secret: the owning ApiKey's name.
pub const API_KEY_LABEL: &str = "keyward.dev/api-key";
/// `app.kubernetes.io/managed-by` value on everything keyward writes.
pub const MANAGED_BY: &str = "keyward";
/// Type of the consumer Secret.
pub const SECRET_TYPE: &str = "keyward.dev/api-key";

/// An API key with two staggered slots, issued into a Secret that workloads mount.
#[allow(clippy::duplicated_attributes)] // repeated `type_ = ...` in printcolumn(...) is not a duplicate
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "keyward.dev",
    version = "v1alpha1",
    kind = "ApiKey",
    plural = "apikeys",
    shortname = "ak",
    category = "keyward",
    namespaced,
    status = "ApiKeyStatus",
    doc = "ApiKey asks keyward for an API key. keyward generates it into a Secret \
           (`secretName`), creates a secondary key part-way through the primary's life, \
           moves consumers to the newer key before the older one expires, regenerates, \
           expires unused keys and warns the owner before expiry. Key material is only \
           ever in the Secret; status holds hashes and previews.",
    printcolumn(name = "Owner", type_ = "string", json_path = ".spec.owner"),
    printcolumn(name = "Active", type_ = "string", json_path = ".status.activeSlot"),
    printcolumn(
        name = "Expires",
        type_ = "string",
        json_path = ".status.keys[?(@.state==\"Active\")].effectiveExpiresAt"
    ),
    printcolumn(name = "Next", type_ = "string", json_path = ".status.nextAction"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeySpec {
    /// Name of the KeyPolicy to use. Absent: the single policy with `default: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Who holds the key (team, service, person). Limits count per owner and namespace.
    /// Fixed once the ApiKey exists: for another owner, create another ApiKey.
    #[schemars(schema_with = "owner_schema")]
    pub owner: String,
    /// What the key is for. Unique per owner when the policy says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// Name of the consumer Secret (default: the ApiKey's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
    /// Life of each key, ISO 8601 (`P30D`) or vendor form (`p3m`); within the policy's
    /// `minLifetime`..`maxLifetime`. Absent: the policy's `maxLifetime`. A key's expiry
    /// is fixed when it is created and never extended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<String>,
    /// Extra labels and annotations for the consumer Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_template: Option<SecretTemplate>,
    /// Workloads that read the key from environment variables: their pod template gets
    /// annotation `keyward.dev/key-id` at each flip, so they roll out once per flip.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<ConsumerRef>,
    /// Key IDs (`status.keys[].keyId`) revoked at once: they stop verifying immediately
    /// and their slot is regenerated. Declarative, so GitOps keeps it. A set, so
    /// `keyward revoke` (its own field manager) and a GitOps tool can both add IDs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "revoked_schema")]
    pub revoked_keys: Vec<String>,
    /// What the keys may do (`orders:read`, `billing/write`): 1 to 128 characters of
    /// `[A-Za-z0-9_.:/-]`, starting with a letter or digit; at most 64. Returned by the
    /// verifier on allow (`X-Keyward-Scopes`, JSON `scopes`); a proxy that requires a
    /// scope for a route refuses keys without it (403 `INSUFFICIENT_SCOPE`). A change
    /// takes effect in the verifier as soon as its watch delivers it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "scopes_schema")]
    pub scopes: Vec<String>,
}

/// Extra metadata for the consumer Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretTemplate {
    /// Labels added to the Secret (keyward's own labels take precedence).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to the Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Kind of a consumer workload.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConsumerKind {
    /// apps/v1 Deployment.
    Deployment,
    /// apps/v1 StatefulSet.
    StatefulSet,
    /// apps/v1 DaemonSet.
    DaemonSet,
}

impl ConsumerKind {
    /// The kind's name, as in `kind:` (also a metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            ConsumerKind::Deployment => "Deployment",
            ConsumerKind::StatefulSet => "StatefulSet",
            ConsumerKind::DaemonSet => "DaemonSet",
        }
    }
}

/// A workload in the ApiKey's namespace that consumes the key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerRef {
    /// `Deployment`, `StatefulSet` or `DaemonSet`.
    pub kind: ConsumerKind,
    /// Name of the workload.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// One of the two key slots.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema)]
pub enum Slot {
    /// The first key, regenerated at each of its expiries.
    Primary,
    /// The key created part-way through the primary's life.
    Secondary,
}

impl Slot {
    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::Primary => Slot::Secondary,
            Slot::Secondary => Slot::Primary,
        }
    }
    /// Data key of this slot in the consumer Secret.
    pub fn data_key(self) -> &'static str {
        match self {
            Slot::Primary => "primary",
            Slot::Secondary => "secondary",
        }
    }
}

/// State of a key.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum KeyState {
    /// In `api-key`: what consumers send.
    Active,
    /// Valid, waiting to become active.
    Standby,
    /// Past its effective expiry; no longer verifies.
    Expired,
    /// Listed in `spec.revokedKeys`; no longer verifies.
    Revoked,
}

/// Why a key expired (or will expire).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ExpiryReason {
    /// Reached `expiresAt`.
    MaxLifetime,
    /// Not used for `inactivityTimeout`.
    Inactivity,
    /// Listed in `spec.revokedKeys`.
    Revoked,
    /// Capped by a shortened policy.
    PolicyChange,
    /// Replaced by a requested rotation; valid for `flipBefore` more.
    Rotated,
    /// The ApiKey lost its place under its owner's limits (`maxKeysPerOwner` lowered, or
    /// an older ApiKey of the same owner seen late): its keys end at once.
    OwnerLimit,
    /// Retired early (`rotation.retireDrainedAfter`): the newer key was in use and this
    /// one had been quiet that long; it ended `flipBefore` after consumers left it.
    Drained,
}

/// Public facts about one key. Never the key itself.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyStatus {
    /// `Primary` or `Secondary`.
    pub slot: Slot,
    /// Identifier of this key: the first 16 hex digits of its SHA-256 (of `hash`), so the
    /// same material always has the same ID and a regenerated slot a new one.
    pub key_id: String,
    /// `sha256:<hex>` of the key.
    pub hash: String,
    /// Prefix plus the first 4 characters of the random part.
    pub preview: String,
    /// When the key was generated.
    pub created_at: DateTime<Utc>,
    /// Expiry fixed at creation; never extended. Absent: the policy has expiry disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// When the key actually stops verifying: the earliest of `expiresAt`, `cap` and, for
    /// the active key under an `inactivityTimeout`, its inactivity deadline. Absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_expires_at: Option<DateTime<Utc>>,
    /// An earlier end imposed after creation: a shortened policy, a requested rotation,
    /// an early retirement (lifted when the key is used again) or a lost place under the
    /// owner's limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap: Option<ExpiryCap>,
    /// When the key became active (inactivity counts from here until it is used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<DateTime<Utc>>,
    /// Last successful verification, written by the verifier at most once per
    /// `--usage-flush-interval` (default a minute); a key's first use, and its first use
    /// after two intervals without one, at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<DateTime<Utc>>,
    /// `Active`, `Standby`, `Expired` or `Revoked`.
    pub state: KeyState,
    /// Why the key expired or will expire first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry_reason: Option<ExpiryReason>,
}

/// An end imposed on a key after its creation.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExpiryCap {
    /// The key stops verifying at this instant at the latest.
    pub at: DateTime<Utc>,
    /// `PolicyChange`, `Rotated`, `Drained` or `OwnerLimit`.
    pub reason: ExpiryReason,
}

/// A warning that was sent, so each fires once.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Notified {
    /// The key warned about.
    pub key_id: String,
    /// The threshold (`P7D`) that fired.
    pub threshold: String,
    /// When it fired.
    pub at: DateTime<Utc>,
    /// Where it still has to be delivered: `Event` (the Warning Event on the ApiKey)
    /// and the policy's webhook URLs when it fired. Each leaves once delivered, or when
    /// given up on (a day after the warning fired). Delivery is at least once: one whose
    /// success was not recorded (a crash in between) is made again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
    /// What the warning is about. Absent: the key is close to its expiry
    /// (`KeyExpiringSoon`, or `NonExpiringKey`); `KeyStillInUse`: the key was still used
    /// after consumers moved to its successor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The key's effective expiry this warning was about. When a cap (a policy change)
    /// moves the key's end earlier than this, the nearest passed threshold fires again
    /// with the old and the new expiry. Absent on warnings recorded before this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Set when the warning is about an end a cap moved earlier: why (`PolicyChange`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<ExpiryReason>,
    /// With `reason`: the expiry the key had before the move (absent: it had none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_expires_at: Option<DateTime<Utc>>,
}

/// The KeyPolicy an ApiKey is under ([`ApiKeyStatus::policy`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyBinding {
    /// The KeyPolicy's name.
    pub name: String,
    /// Since when the ApiKey is under it (for an ApiKey that had keys before keyward
    /// recorded this: its oldest key's creation).
    pub since: DateTime<Utc>,
}

/// The delivery target of a warning's Warning Event in [`Notified::pending`].
pub const WARNING_EVENT: &str = "Event";

/// Observed state of an ApiKey.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyStatus {
    /// Client identifier, generated once and stable for the ApiKey's life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Slot whose key is in the Secret's `api-key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_slot: Option<Slot>,
    /// The keys of both slots (hashes and metadata only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "keys_schema")]
    pub keys: Vec<KeyStatus>,
    /// What keyward does next: `CreateStandby`, `Flip`, `Regenerate`, `Expire`, or
    /// `Rotate` (a requested rotation waiting until consumers have left the key it would
    /// replace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_action: Option<String>,
    /// When the next action is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_action_at: Option<DateTime<Utc>>,
    /// One sentence: what happens next and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<String>,
    /// Expiry warnings already sent (each key and threshold fires once).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notified: Vec<Notified>,
    /// The last `keyward.dev/rotate` annotation value acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_request: Option<String>,
    /// The owner the keys are issued to: recorded at the first reconcile and kept. `owner` is
    /// immutable; on clusters without CEL rules an edit of `spec.owner` is ignored
    /// (`Synced=False OwnerImmutable`), and the verifier and the owner limits use this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The KeyPolicy the keys are under, and since when: a move to another policy (an
    /// edit of `spec.policy`, another default) caps keys, and counts idle time, from that
    /// moment, never from before it. A policy that does not allow the namespace is no
    /// move: the ApiKey stays recorded under the one it had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyBinding>,
    /// `Ready`, `Stalled`, `Synced`, `Expiring`, `LifetimeClamped`, `Handover` and, with a
    /// controller that watches pods, `ConsumersFollowRotation`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::condition::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` last processed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl ApiKey {
    /// The owner this ApiKey's keys belong to: the one recorded with its first key
    /// (`status.owner`), else `spec.owner`; without surrounding whitespace.
    pub fn owner(&self) -> &str {
        self.status.as_ref().and_then(|s| s.owner.as_deref()).unwrap_or(&self.spec.owner).trim()
    }
}

/// Message of the CEL transition rule that keeps `spec.owner` fixed (reason
/// `FieldValueInvalid`, on clusters that run CEL rules); the controller refuses an owner
/// change with the same text on clusters that do not.
pub const OWNER_IMMUTABLE_MESSAGE: &str = "owner is immutable";

/// `spec.owner`: 1..=253 characters, and immutable (a CEL transition rule).
fn owner_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = String::json_schema(generator);
    schema.insert("minLength".into(), 1.into());
    schema.insert("maxLength".into(), 253.into());
    let rule = kube::core::Rule::new("self == oldSelf")
        .message(OWNER_IMMUTABLE_MESSAGE)
        .reason(kube::core::Reason::FieldValueInvalid);
    kube::core::validate(&mut schema, rule).expect("a CEL rule serializes");
    schema
}

fn revoked_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = <Vec<String>>::json_schema(generator);
    schema.insert("x-kubernetes-list-type".into(), "set".into());
    schema
}

/// The format of one scope (also checked by the verifier, which ignores others).
pub const SCOPE_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$";

/// Whether `scope` matches [`SCOPE_PATTERN`].
pub fn valid_scope(scope: &str) -> bool {
    let b = scope.as_bytes();
    (1..=128).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b':' | b'/' | b'-'))
}

fn scopes_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = <Vec<String>>::json_schema(generator);
    schema.insert("x-kubernetes-list-type".into(), "set".into());
    schema.insert("maxItems".into(), 64.into());
    schema.insert("items".into(), serde_json::json!({"type": "string", "pattern": SCOPE_PATTERN}));
    schema
}

fn keys_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = <Vec<KeyStatus>>::json_schema(generator);
    super::list_map(&mut schema, "slot");
    schema
}

/// `ApiKey` condition types and reasons.
pub mod conditions {
    /// The Secret holds a valid active key.
    pub const READY: &str = "Ready";
    /// A warning threshold before the active key's expiry has passed.
    pub const EXPIRING: &str = "Expiring";
    /// No new key can be issued until the user fixes something (the reason says what);
    /// the keys already issued still expire, are revoked and flipped to.
    pub const STALLED: &str = "Stalled";
    /// Whether the last reconcile could write everything it wanted (API errors).
    pub const SYNCED: &str = "Synced";
    /// `spec.lifetime` is outside the policy's bounds: keys are issued with the nearest
    /// bound instead.
    pub const LIFETIME_CLAMPED: &str = "LifetimeClamped";
    /// Whether callers have moved to the newest key, from the verifier's usage data
    /// (True: nothing to do; False: someone has not switched yet; Unknown: no usage data).
    pub const HANDOVER: &str = "Handover";
    /// Whether every pod that reads the Secret does so in a way a rotation reaches (set
    /// only by a controller that watches pods, `--watch-consumers`).
    pub const CONSUMERS_FOLLOW: &str = "ConsumersFollowRotation";
    /// ConsumersFollowRotation reason (True): no pod reads the Secret through a subPath
    /// mount, nor as env vars outside `spec.consumers`.
    pub const CONSUMERS_FOLLOW_ROTATION: &str = "ConsumersFollowRotation";
    /// ConsumersFollowRotation reason (False), also the Warning Event's: a pod reads the
    /// Secret in a way no rotation reaches (the message names each workload and the fix).
    pub const CONSUMER_CANNOT_FOLLOW: &str = "ConsumerCannotFollowRotation";
    /// Warning: a `spec.consumers` workload has not finished rolling out to the active
    /// key while the key its old pods hold has less than a quarter of its drain left.
    pub const CONSUMER_ROLLOUT_INCOMPLETE: &str = "ConsumerRolloutIncomplete";

    /// Ready reason: the Secret holds a valid active key.
    pub const KEY_ACTIVE: &str = "KeyActive";
    /// Ready reason: the named policy does not exist, or no single default policy.
    pub const POLICY_NOT_FOUND: &str = "PolicyNotFound";
    /// Ready reason: the policy's namespaceSelector excludes this namespace.
    pub const POLICY_NOT_ALLOWED: &str = "PolicyNotAllowed";
    /// Ready reason: the policy itself is not accepted.
    pub const POLICY_INVALID: &str = "PolicyInvalid";
    /// Ready reason: a spec field is malformed.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// Ready reason: `lifetime` is outside the policy's bounds.
    pub const LIFETIME_OUT_OF_BOUNDS: &str = "LifetimeOutOfBounds";
    /// Ready reason: a Secret of that name exists and is not owned by this ApiKey.
    pub const SECRET_CONFLICT: &str = "SecretConflict";
    /// Ready reason: the owner already holds `maxKeysPerOwner` older ApiKeys.
    pub const OWNER_KEY_LIMIT_EXCEEDED: &str = "OwnerKeyLimitExceeded";
    /// Ready reason: an older ApiKey of the same owner has this description.
    pub const DUPLICATE_DESCRIPTION: &str = "DuplicateDescription";
    /// Ready reason: the active key expired for inactivity; rotate to get a new one.
    pub const KEY_EXPIRED_INACTIVE: &str = "KeyExpiredInactive";
    /// Ready reason: no valid key (expired and not regenerated automatically).
    pub const KEY_EXPIRED: &str = "KeyExpired";
    /// Synced reason: the API server refused or failed a write.
    pub const APPLY_FAILED: &str = "ApplyFailed";
    /// Synced reason: `spec.owner` was edited; the change is ignored (`owner` is
    /// immutable) and the keys stay with `status.owner`.
    pub const OWNER_IMMUTABLE: &str = "OwnerImmutable";
    /// Synced reason: everything was written.
    pub const APPLIED: &str = "Applied";
    /// Stalled reason: nothing blocks issuing keys.
    pub const NOT_BLOCKED: &str = "NotBlocked";

    /// Expiring reason: a warning threshold has passed.
    pub const EXPIRING_SOON: &str = "KeyExpiringSoon";
    /// Expiring reason: no threshold has passed.
    pub const NOT_EXPIRING: &str = "NotExpiring";

    /// Handover reason (True): fewer than two valid keys; nothing to hand over.
    pub const SINGLE_KEY: &str = "SingleKey";
    /// Handover reason (True): the newer key is in use and the older one is quiet.
    pub const NEW_KEY_IN_USE: &str = "NewKeyInUse";
    /// Handover reason (False): both keys are in use, as expected before consumers move
    /// (and while a flip propagates).
    pub const BOTH_KEYS_IN_USE: &str = "BothKeysInUse";
    /// Handover reason (False): the newer key has not been used yet.
    pub const NEW_KEY_NOT_YET_USED: &str = "NewKeyNotYetUsed";
    /// Handover reason (False): the older key is still used after consumers moved off it
    /// (the flip plus the propagation allowance): someone has not switched.
    pub const OLD_KEY_STILL_IN_USE: &str = "OldKeyStillInUse";
    /// Handover reason (Unknown): neither key has a recorded use (no verifier reports).
    pub const NO_USAGE_DATA: &str = "NoUsageData";
}
