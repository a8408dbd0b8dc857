use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Condition;

/// Cluster-wide rules for API keys: lifetimes, rotation, warnings, limits, key format.
#[allow(clippy::duplicated_attributes)] // repeated `type_ = ...` in printcolumn(...) is not a duplicate
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "keyward.dev",
    version = "v1alpha1",
    kind = "KeyPolicy",
    plural = "keypolicies",
    shortname = "kpol",
    category = "keyward",
    status = "KeyPolicyStatus",
    doc = "KeyPolicy sets the rules for the ApiKeys that use it: maximum and minimum lifetime, \
           inactivity expiry, when the secondary key is created and consumers flip, expiry \
           warnings, per-owner limits and the key format. Cluster-scoped; one policy may be \
           the default for ApiKeys that name none.",
    printcolumn(name = "Default", type_ = "boolean", json_path = ".spec.default"),
    printcolumn(name = "Max Lifetime", type_ = "string", json_path = ".spec.expiry.maxLifetime"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.expiry.mode"),
    printcolumn(name = "Keys", type_ = "integer", json_path = ".status.keyCount"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].reason"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct KeyPolicySpec {
    /// Use this policy for ApiKeys that name no policy. When two policies are default,
    /// both report `Accepted=False` and neither is used as the default.
    #[serde(default)]
    pub default: bool,
    /// Namespaces whose ApiKeys may use this policy. Empty or absent: all namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Key lifetimes and expiry.
    #[serde(default)]
    pub expiry: ExpirySpec,
    /// When the secondary key is created and when consumers move to the newer key.
    #[serde(default)]
    pub rotation: RotationSpec,
    /// Warnings before a key's effective expiry.
    #[serde(default)]
    pub notifications: NotificationSpec,
    /// Per-owner limits within a namespace.
    #[serde(default)]
    pub limits: LimitSpec,
    /// How key material is generated and encoded.
    #[serde(default)]
    pub key_format: KeyFormatSpec,
}

/// Whether keys expire.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ExpiryMode {
    /// Keys expire after their lifetime (and, when set, after inactivity).
    #[default]
    Enforced,
    /// Keys never expire and are not rotated automatically. Requires `acknowledgeRisk: true`.
    Disabled,
}

/// Key lifetimes and expiry. Durations are ISO 8601 (`P90D`, `PT10M`, `P1Y2M`) or the
/// lowercase vendor form (`p3m`, `p6m`); months and years are calendar months and years.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'Disabled' || self.acknowledgeRisk")
    .message("expiry.mode Disabled requires expiry.acknowledgeRisk: true")
    .reason(Reason::FieldValueInvalid)
    .field_path(".acknowledgeRisk"))]
pub struct ExpirySpec {
    /// `Enforced` (default) or `Disabled`. `Disabled` needs `acknowledgeRisk: true`.
    #[serde(default)]
    pub mode: ExpiryMode,
    /// Must be true to switch expiry off; otherwise the policy is not accepted.
    #[serde(default)]
    pub acknowledge_risk: bool,
    /// Longest life of a key from its creation (default `P90D`). Shrinking it caps
    /// existing keys retroactively; lengthening it never extends an existing key.
    #[serde(default = "default_max_lifetime")]
    pub max_lifetime: String,
    /// Shortest life an ApiKey may ask for (default `PT1M`).
    #[serde(default = "default_min_lifetime")]
    pub min_lifetime: String,
    /// The active key expires when it has not been used for this long. Absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactivity_timeout: Option<String>,
}

impl Default for ExpirySpec {
    fn default() -> Self {
        ExpirySpec {
            mode: ExpiryMode::Enforced,
            acknowledge_risk: false,
            max_lifetime: default_max_lifetime(),
            min_lifetime: default_min_lifetime(),
            inactivity_timeout: None,
        }
    }
}

fn default_max_lifetime() -> String {
    "P90D".into()
}
fn default_min_lifetime() -> String {
    "PT1M".into()
}

/// When the secondary key is created and when consumers move to the newer key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotationSpec {
    /// When the first secondary key is created: a percentage of the primary's
    /// lifetime (`50%`, default) or a duration after the primary's creation (`P45D`).
    #[serde(default = "default_secondary_at")]
    pub secondary_at: String,
    /// Consumers move to the newer key this long before the older one expires
    /// (default `PT10M`: headroom for the kubelet to refresh mounted Secrets).
    /// Capped at half the overlap of the two keys.
    #[serde(default = "default_flip_before")]
    pub flip_before: String,
    /// The least time consumers should get between a flip and the end of the key they
    /// leave: a mounted Secret reaches a pod only at the kubelet's next sync (its default
    /// `syncFrequency` is one minute, plus jitter). Default `PT2M` (see
    /// docs/consuming-keys.md); `PT0S`: no minimum. Advisory, it changes no schedule: a
    /// policy whose flips can come later than this before a key's end is still used, with
    /// `Accepted` reason `FlipLeadBelowMinimum` (a value that does not parse:
    /// `MinFlipLeadInvalid`, and the default applies), and an ApiKey whose keys can, or
    /// whose last flip did, says so in `details`.
    #[serde(default = "default_min_flip_lead")]
    pub min_flip_lead: String,
    /// `false`: keys expire and are replaced only when a rotation is requested.
    #[serde(default = "default_true")]
    pub automatic: bool,
    /// Early retirement of drained keys (opt-in; absent: never). Once the newer of an
    /// ApiKey's two keys has been used and the older one has not been used for this long
    /// (the newer key's last use at least this long after the older key's), keyward moves
    /// `api-key` to the newer key at once (if it is not there yet) and ends the older key
    /// `flipBefore` after that (`expiryReason: Drained`), instead of at its scheduled
    /// expiry. Never a key still used, still in `api-key` or inside its drain window;
    /// a use of the older key before it ends cancels its retirement. Trade-off: a caller
    /// that calls less often than this looks idle (see docs/handover.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_drained_after: Option<String>,
}

impl Default for RotationSpec {
    fn default() -> Self {
        RotationSpec {
            secondary_at: default_secondary_at(),
            flip_before: default_flip_before(),
            min_flip_lead: default_min_flip_lead(),
            automatic: true,
            retire_drained_after: None,
        }
    }
}

fn default_secondary_at() -> String {
    "50%".into()
}
fn default_flip_before() -> String {
    "PT10M".into()
}
fn default_min_flip_lead() -> String {
    "PT2M".into()
}
fn default_true() -> bool {
    true
}

/// Warnings before a key's effective expiry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotificationSpec {
    /// Thresholds before the effective expiry at which owners are warned
    /// (default `[P30D, P7D, P1D]`). Each fires once per key.
    #[serde(default = "default_before")]
    pub before: Vec<String>,
    /// Endpoints that receive a signed JSON POST at each threshold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<WebhookSpec>,
}

impl Default for NotificationSpec {
    fn default() -> Self {
        NotificationSpec { before: default_before(), webhooks: vec![] }
    }
}

fn default_before() -> Vec<String> {
    vec!["P30D".into(), "P7D".into(), "P1D".into()]
}

/// A webhook receiver for expiry warnings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSpec {
    /// `http://` or `https://` URL that receives the POST.
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// Secret holding the HMAC-SHA256 signing key; when set, each POST carries
    /// `X-Keyward-Signature: sha256=<hex hmac of the body>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
}

/// A key inside a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Namespace of the Secret.
    pub namespace: String,
    /// Name of the Secret.
    pub name: String,
    /// Data key inside the Secret (default `signing-key`).
    #[serde(default = "default_signing_key")]
    pub key: String,
}

fn default_signing_key() -> String {
    "signing-key".into()
}

/// Per-owner limits within a namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitSpec {
    /// Most ApiKeys one owner may hold per namespace (default 2). The oldest win;
    /// later ones get `Ready=False OwnerKeyLimitExceeded` and no key.
    #[serde(default = "default_max_keys")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_keys_per_owner: u32,
    /// Descriptions must be unique per owner and namespace (default true).
    #[serde(default = "default_true")]
    pub unique_description_per_owner: bool,
}

impl Default for LimitSpec {
    fn default() -> Self {
        LimitSpec { max_keys_per_owner: default_max_keys(), unique_description_per_owner: true }
    }
}

fn default_max_keys() -> u32 {
    2
}

/// Encoding of the random part of a key.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KeyEncoding {
    /// `[0-9A-Za-z]`.
    #[default]
    Base62,
    /// URL-safe base64 without padding.
    Base64url,
    /// Lowercase hexadecimal.
    Hex,
}

/// How key material is generated and encoded.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyFormatSpec {
    /// Prefix of every key (default `kw_`): `[a-z0-9_]{0,16}`. Lets scanners and
    /// verifiers recognise keys.
    #[serde(default = "default_prefix")]
    #[schemars(regex(pattern = r"^[a-z0-9_]{0,16}$"))]
    pub prefix: String,
    /// Random bytes per key from the OS CSPRNG (default 32, 16..=64).
    #[serde(default = "default_random_bytes")]
    #[schemars(range(min = 16, max = 64))]
    pub random_bytes: u32,
    /// `base62` (default), `base64url` or `hex`.
    #[serde(default)]
    pub encoding: KeyEncoding,
    /// Append a CRC32 checksum (GitHub-token style) so malformed keys are rejected
    /// without a lookup (default true).
    #[serde(default = "default_true")]
    pub checksum: bool,
}

impl Default for KeyFormatSpec {
    fn default() -> Self {
        KeyFormatSpec {
            prefix: default_prefix(),
            random_bytes: default_random_bytes(),
            encoding: KeyEncoding::Base62,
            checksum: true,
        }
    }
}

fn default_prefix() -> String {
    "kw_".into()
}
fn default_random_bytes() -> u32 {
    32
}

/// Observed state of a KeyPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyPolicyStatus {
    /// `Accepted`: whether the policy is valid and usable.
    #[serde(default)]
    #[schemars(schema_with = "super::condition::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` last processed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When `expiry.maxLifetime`, `expiry.mode` or `expiry.inactivityTimeout` last
    /// changed; the cap of a shortened policy, and the idle time of a new timeout, count
    /// from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime_since: Option<DateTime<Utc>>,
    /// The `expiry.maxLifetime` in force since `maxLifetimeSince` (with
    /// `, inactivityTimeout <t>` when one is set; `Disabled` while expiry is off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_max_lifetime: Option<String>,
    /// Number of ApiKeys using this policy.
    #[serde(default)]
    pub key_count: u32,
}

/// `KeyPolicy` condition type and reasons.
pub mod policy_conditions {
    /// The policy is valid and may be used.
    pub const ACCEPTED: &str = "Accepted";
    /// Reason: everything checks out.
    pub const VALID: &str = "Valid";
    /// Reason: a duration field does not parse or is out of range.
    pub const INVALID_DURATION: &str = "InvalidDuration";
    /// Reason: another policy is also marked default.
    pub const MULTIPLE_DEFAULTS: &str = "MultipleDefaults";
    /// Reason: `expiry.mode: Disabled` without `acknowledgeRisk: true`.
    pub const RISK_NOT_ACKNOWLEDGED: &str = "RiskNotAcknowledged";
    /// Reason: another field is invalid.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// Valid, but flips come later than `rotation.minFlipLead` before a key's end
    /// (`Accepted` stays True: the policy is used).
    pub const FLIP_LEAD_BELOW_MINIMUM: &str = "FlipLeadBelowMinimum";
    /// Valid, but `rotation.minFlipLead` does not parse: the default applies (advisory,
    /// `Accepted` stays True).
    pub const MIN_FLIP_LEAD_INVALID: &str = "MinFlipLeadInvalid";
}
