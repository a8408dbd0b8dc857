//! The fixture both verifier targets share: an index holding one key of the default
//! format (the one in their seeds) for ApiKey `shop/checkout`, with `scopes`.

use keyward::api::ApiKey;
use keyward::keys::{KeyFormat, SecretKey};
use keyward::verifier::Index;

/// The key the index holds.
pub const HELD: &str = "kw_2bBbumlcWNIwiRMY8fBK4h4l6DsIRIFKsOpaOPWnBiZ4MA8LS";

/// An index holding [`HELD`] for an ApiKey with `scopes`.
pub fn index(scopes: &[&str]) -> Index {
    let format = KeyFormat::default();
    let facts = format.facts(&SecretKey::from_string(HELD.into()));
    let held: ApiKey = serde_json::from_value(serde_json::json!({
        "apiVersion": "keyward.dev/v1alpha1",
        "kind": "ApiKey",
        "metadata": { "name": "checkout", "namespace": "shop" },
        "spec": { "owner": "payments", "scopes": scopes },
        "status": { "keys": [{
            "slot": "Primary", "state": "Active", "keyId": facts.key_id, "hash": facts.hash,
            "preview": facts.preview, "createdAt": "2026-01-01T00:00:00Z",
        }] },
    }))
    .expect("an ApiKey");
    let mut index = Index::default();
    index.set_formats(vec![format]);
    index.upsert(&held);
    assert_eq!(index.len(), 1);
    index
}
