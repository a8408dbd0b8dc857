//! The verifier's in-memory index: `sha256(key) → entry` for every key in every
//! ApiKey's status, the revoked key IDs from `spec.revokedKeys`, and the key formats of
//! all KeyPolicies (malformed keys are refused before any lookup). Pure: fed by watch
//! events, asked at request time (expiry is judged against the clock then).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use serde::Serialize;

use crate::api::{ApiKey, KeyState, Slot};
use crate::keys::{self, KeyFormat, MAX_KEY_LEN};

/// What the index knows about one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The ApiKey's namespace.
    pub namespace: String,
    /// The ApiKey's name.
    pub name: String,
    /// Its owner.
    pub owner: String,
    /// Its client ID.
    pub client_id: String,
    /// The key's ID.
    pub key_id: String,
    /// The key's slot.
    pub slot: Slot,
    /// When it stops verifying (None: never).
    pub expires_at: Option<DateTime<Utc>>,
    /// Its state in status.
    pub state: KeyState,
}

/// Verification result codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Hash)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Code {
    /// The key is valid now.
    Valid,
    /// Well-formed, but no ApiKey has it.
    NotFound,
    /// Past its effective expiry.
    Expired,
    /// Revoked.
    Revoked,
    /// Not a key of any policy's format (prefix, length, encoding, checksum).
    Malformed,
}

impl Code {
    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Valid => "VALID",
            Code::NotFound => "NOT_FOUND",
            Code::Expired => "EXPIRED",
            Code::Revoked => "REVOKED",
            Code::Malformed => "MALFORMED",
        }
    }
}

/// The answer for one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The code.
    pub code: Code,
    /// The entry, when the key is known.
    pub entry: Option<Entry>,
}

/// The index.
#[derive(Default, Debug)]
pub struct Index {
    by_hash: HashMap<String, Entry>,
    hashes_of: HashMap<(String, String), Vec<String>>,
    revoked: HashMap<String, (String, String)>,
    revoked_of: HashMap<(String, String), Vec<String>>,
    formats: Vec<KeyFormat>,
}

impl Index {
    /// Number of keys indexed.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// True when no key is indexed.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The known key formats.
    pub fn formats(&self) -> &[KeyFormat] {
        &self.formats
    }

    /// Replace the known key formats (one per KeyPolicy, deduplicated).
    pub fn set_formats(&mut self, mut formats: Vec<KeyFormat>) {
        formats.sort_by(|a, b| b.prefix.len().cmp(&a.prefix.len()).then_with(|| a.prefix.cmp(&b.prefix)));
        formats.dedup();
        self.formats = formats;
    }

    /// Forget an ApiKey's keys.
    pub fn remove(&mut self, namespace: &str, name: &str) {
        let id = (namespace.to_string(), name.to_string());
        for h in self.hashes_of.remove(&id).unwrap_or_default() {
            self.by_hash.remove(&h);
        }
        for k in self.revoked_of.remove(&id).unwrap_or_default() {
            self.revoked.remove(&k);
        }
    }

    /// Index (or re-index) an ApiKey's keys and revocations.
    pub fn upsert(&mut self, key: &ApiKey) {
        let namespace = key.namespace().unwrap_or_default();
        let name = key.name_any();
        self.remove(&namespace, &name);
        let id = (namespace.clone(), name.clone());
        let revoked = key.spec.revoked_keys.clone();
        for k in &revoked {
            self.revoked.insert(k.clone(), id.clone());
        }
        self.revoked_of.insert(id.clone(), revoked);
        let Some(status) = &key.status else { return };
        let mut hashes = Vec::new();
        for k in &status.keys {
            let Some(hex) = k.hash.strip_prefix("sha256:") else { continue };
            let entry = Entry {
                namespace: namespace.clone(),
                name: name.clone(),
                owner: key.spec.owner.clone(),
                client_id: status.client_id.clone().unwrap_or_default(),
                key_id: k.key_id.clone(),
                slot: k.slot,
                expires_at: k.effective_expires_at,
                state: k.state,
            };
            self.by_hash.insert(hex.to_string(), entry);
            hashes.push(hex.to_string());
        }
        self.hashes_of.insert(id, hashes);
    }

    /// Is `key` valid at `now`?
    pub fn verify(&self, key: &str, now: DateTime<Utc>) -> Verdict {
        let malformed = Verdict { code: Code::Malformed, entry: None };
        if key.is_empty() || key.len() > MAX_KEY_LEN || !self.formats.iter().any(|f| f.check(key).is_ok()) {
            return malformed;
        }
        let hash = keys::hash(key);
        let hex = &hash["sha256:".len()..];
        match self.by_hash.get(hex) {
            Some(e) => {
                let code = match e.state {
                    KeyState::Revoked => Code::Revoked,
                    _ if self.revoked.contains_key(&e.key_id) => Code::Revoked,
                    KeyState::Expired => Code::Expired,
                    _ if e.expires_at.is_some_and(|t| t <= now) => Code::Expired,
                    _ => Code::Valid,
                };
                Verdict { code, entry: Some(e.clone()) }
            }
            // A revoked key whose slot was already regenerated is no longer in status;
            // its ID (derived from its hash) is still in spec.revokedKeys.
            None if self.revoked.contains_key(&hex[..10]) => Verdict { code: Code::Revoked, entry: None },
            None => Verdict { code: Code::NotFound, entry: None },
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;
    use crate::api::{ApiKeySpec, ApiKeyStatus, KeyStatus};

    fn apikey(
        keys: Vec<(&str, KeyState, Option<DateTime<Utc>>)>,
        revoked: Vec<String>,
    ) -> (ApiKey, Vec<String>) {
        let format = KeyFormat::default();
        let mut material = Vec::new();
        let mut statuses = Vec::new();
        for (i, (_, state, expires)) in keys.iter().enumerate() {
            let k = format.generate();
            let facts = format.facts(&k);
            material.push(k.expose().to_string());
            statuses.push(KeyStatus {
                slot: if i == 0 { Slot::Primary } else { Slot::Secondary },
                key_id: facts.key_id,
                hash: facts.hash,
                preview: facts.preview,
                created_at: Utc::now(),
                expires_at: *expires,
                effective_expires_at: *expires,
                cap: None,
                activated_at: None,
                last_used_at: None,
                state: *state,
                expiry_reason: None,
            });
        }
        let mut key = ApiKey::new(
            "svc",
            ApiKeySpec { owner: "team".into(), revoked_keys: revoked, ..Default::default() },
        );
        key.metadata.namespace = Some("ns".into());
        key.status =
            Some(ApiKeyStatus { client_id: Some("kwc_x".into()), keys: statuses, ..Default::default() });
        (key, material)
    }

    #[test]
    fn codes() {
        let now = Utc::now();
        let later = Some(now + TimeDelta::seconds(60));
        let (key, m) = apikey(
            vec![("a", KeyState::Active, later), ("b", KeyState::Standby, Some(now - TimeDelta::seconds(1)))],
            vec![],
        );
        let mut index = Index::default();
        index.set_formats(vec![KeyFormat::default()]);
        index.upsert(&key);
        assert_eq!(index.len(), 2);
        let v = index.verify(&m[0], now);
        assert_eq!(v.code, Code::Valid);
        assert_eq!(v.entry.unwrap().owner, "team");
        assert_eq!(index.verify(&m[1], now).code, Code::Expired, "judged against the clock");
        assert_eq!(index.verify(KeyFormat::default().generate().expose(), now).code, Code::NotFound);
        for bad in ["", "kw_short", "nope", &"x".repeat(5000), &m[0][..m[0].len() - 1]] {
            assert_eq!(index.verify(bad, now).code, Code::Malformed, "{bad:.20}");
        }
        // Revocation in spec is effective before the controller acts.
        let id = key.status.as_ref().unwrap().keys[0].key_id.clone();
        let mut revoked = key.clone();
        revoked.spec.revoked_keys = vec![id];
        index.upsert(&revoked);
        assert_eq!(index.verify(&m[0], now).code, Code::Revoked);
        // ...and after its slot was regenerated (no longer in status).
        revoked.status.as_mut().unwrap().keys.remove(0);
        index.upsert(&revoked);
        assert_eq!(index.verify(&m[0], now).code, Code::Revoked);
        index.remove("ns", "svc");
        assert!(index.is_empty());
        assert_eq!(index.verify(&m[0], now).code, Code::NotFound);
    }

    #[test]
    fn unknown_prefixes_are_malformed_without_lookup() {
        let mut index = Index::default();
        let other = KeyFormat { prefix: "acme_".into(), ..KeyFormat::default() };
        index.set_formats(vec![other.clone()]);
        assert_eq!(index.verify(KeyFormat::default().generate().expose(), Utc::now()).code, Code::Malformed);
        assert_eq!(index.verify(other.generate().expose(), Utc::now()).code, Code::NotFound);
    }
}
