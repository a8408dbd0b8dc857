//! The consumer Secret: what keyward reads from it (which key material each slot
//! holds), the material it mints or adopts, and the Secret it applies.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::api::{API_KEY_LABEL, ApiKey, MANAGED_BY, SECRET_TYPE, Slot};
use crate::keys::{self, KeyFacts, KeyFormat, SecretKey};
use crate::lifecycle::{Material, Mint};

/// Field manager of the consumer Secrets.
pub const SECRET_MANAGER: &str = "keyward/secret";

/// Data keys of the consumer Secret.
pub mod data {
    /// The active key: what clients send.
    pub const API_KEY: &str = "api-key";
    /// The stable client ID.
    pub const CLIENT_ID: &str = "client-id";
    /// ID of the active key.
    pub const KEY_ID: &str = "key-id";
    /// When the active key expires at the latest (RFC 3339).
    pub const EXPIRES_AT: &str = "expires-at";
}

fn text(secret: Option<&Secret>, key: &str) -> Option<String> {
    let bytes = secret?.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// Whether `secret` is controlled by this ApiKey (controller ownerReference with its UID).
pub fn owned_by(secret: &Secret, key: &ApiKey) -> bool {
    let uid = key.meta().uid.as_deref();
    secret.owner_references().iter().any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid)
}

/// Hashes of what the Secret holds in each slot and in `api-key`.
pub fn material_of(secret: Option<&Secret>) -> Material {
    let h = |k: &str| text(secret, k).map(|t| keys::hash(SecretKey::from_string(t).expose()));
    Material {
        api_key: h(data::API_KEY),
        primary: h(Slot::Primary.data_key()),
        secondary: h(Slot::Secondary.data_key()),
    }
}

/// The client ID recorded in the Secret (adopted when status lost it).
pub fn client_id_of(secret: Option<&Secret>) -> Option<String> {
    text(secret, data::CLIENT_ID).filter(|c| c.starts_with("kwc_") && c.len() <= 64)
}

/// Mints keys for the lifecycle engine: adopts a well-formed key that a previous,
/// interrupted reconcile already wrote into the slot (so a crash between writing the
/// Secret and writing status never issues a second key for one step), otherwise
/// generates one from the OS CSPRNG. Keeps the material for the Secret.
pub struct Minter<'a> {
    format: &'a KeyFormat,
    existing: Option<&'a Secret>,
    known: Vec<String>,
    revoked: &'a [String],
    /// Material minted in this reconcile, by slot.
    pub minted: BTreeMap<Slot, SecretKey>,
    /// How many of the minted keys were adopted from the Secret.
    pub adopted: usize,
}

impl<'a> Minter<'a> {
    /// `known`: every hash in status before this reconcile.
    pub fn new(
        format: &'a KeyFormat,
        existing: Option<&'a Secret>,
        known: Vec<String>,
        revoked: &'a [String],
    ) -> Self {
        Minter { format, existing, known, revoked, minted: BTreeMap::new(), adopted: 0 }
    }

    fn adoptable(&self, slot: Slot) -> Option<SecretKey> {
        if self.minted.contains_key(&slot) {
            return None;
        }
        let candidate = SecretKey::from_string(text(self.existing, slot.data_key())?);
        self.format.check(candidate.expose()).ok()?;
        let facts = self.format.facts(&candidate);
        (!self.known.contains(&facts.hash) && !self.id_taken(&facts.key_id)).then_some(candidate)
    }

    /// Whether another key of this ApiKey (in status, minted now, or revoked) has this ID:
    /// an ID names one key of one ApiKey, so `revokedKeys` can never hit a second one.
    fn id_taken(&self, key_id: &str) -> bool {
        self.revoked.iter().any(|r| r == key_id) || self.known.iter().any(|h| keys::key_id_of(h) == key_id)
    }
}

impl Mint for Minter<'_> {
    fn mint(&mut self, slot: Slot) -> KeyFacts {
        let key = match self.adoptable(slot) {
            Some(k) => {
                self.adopted += 1;
                k
            }
            None => loop {
                let key = self.format.generate();
                if !self.id_taken(&self.format.facts(&key).key_id) {
                    break key;
                }
            },
        };
        let facts = self.format.facts(&key);
        self.known.push(facts.hash.clone());
        self.minted.insert(slot, key);
        facts
    }
}

/// Desired content of the consumer Secret's `data`.
#[derive(Clone, Debug, PartialEq)]
pub struct Contents {
    /// Material per slot: minted now, or kept from the current Secret.
    pub slots: BTreeMap<Slot, String>,
    /// `api-key` and the active key's facts (material, key ID, expiry); None keeps
    /// whatever `api-key` holds.
    pub active: Option<(String, String, Option<String>)>,
    /// The client ID.
    pub client_id: String,
}

/// Current material per slot in the Secret, overlaid with what was minted. A slot
/// field that lost its key (edited or removed) while `api-key` still holds that slot's
/// key (its hash is the slot's hash in status) is restored from `api-key`.
pub fn slot_material(
    existing: Option<&Secret>,
    minted: &BTreeMap<Slot, SecretKey>,
    status_hash: impl Fn(Slot) -> Option<String>,
) -> BTreeMap<Slot, String> {
    let in_api_key = text(existing, data::API_KEY);
    let mut slots = BTreeMap::new();
    for slot in [Slot::Primary, Slot::Secondary] {
        let mut value =
            minted.get(&slot).map(|k| k.expose().to_string()).or_else(|| text(existing, slot.data_key()));
        let want = status_hash(slot);
        if !minted.contains_key(&slot)
            && want.is_some()
            && value.as_deref().map(keys::hash) != want
            && in_api_key.as_deref().map(keys::hash) == want
        {
            value = in_api_key.clone();
        }
        if let Some(v) = value {
            slots.insert(slot, v);
        }
    }
    slots
}

/// The Secret keyward applies: type, labels, ownerReference and data. Data keys keyward
/// owns but has no value for are carried over from `existing` (never blanked).
pub fn desired(key: &ApiKey, name: &str, existing: Option<&Secret>, contents: &Contents) -> Secret {
    let mut labels = key.spec.secret_template.as_ref().map(|t| t.labels.clone()).unwrap_or_default();
    labels.insert("app.kubernetes.io/managed-by".into(), MANAGED_BY.into());
    labels.insert(API_KEY_LABEL.into(), key.name_any());
    let annotations = key.spec.secret_template.as_ref().map(|t| t.annotations.clone()).unwrap_or_default();
    let mut data: BTreeMap<String, ByteString> = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        data.insert(k.to_string(), ByteString(v.into_bytes()));
    };
    for (slot, value) in &contents.slots {
        put(slot.data_key(), value.clone());
    }
    put(data::CLIENT_ID, contents.client_id.clone());
    match &contents.active {
        Some((material, key_id, expires_at)) => {
            put(data::API_KEY, material.clone());
            put(data::KEY_ID, key_id.clone());
            if let Some(t) = expires_at {
                put(data::EXPIRES_AT, t.clone());
            }
        }
        None => {
            for k in [data::API_KEY, data::KEY_ID, data::EXPIRES_AT] {
                if let Some(v) = text(existing, k) {
                    put(k, v);
                }
            }
        }
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: key.namespace(),
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            owner_references: key.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some(SECRET_TYPE.into()),
        data: Some(data),
        ..Default::default()
    }
}

/// Whether applying `want` would change `have` (data, our labels and annotations, type,
/// ownerReference). Keys and labels others added are not ours to remove.
pub fn differs(have: Option<&Secret>, want: &Secret) -> bool {
    let Some(have) = have else { return true };
    let subset = |w: &Option<BTreeMap<String, String>>, h: &Option<BTreeMap<String, String>>| {
        w.iter().flatten().all(|(k, v)| h.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    let ours = [data::API_KEY, data::CLIENT_ID, data::KEY_ID, data::EXPIRES_AT, "primary", "secondary"];
    let value = |s: &Secret, k: &str| s.data.as_ref().and_then(|d| d.get(k)).cloned();
    ours.iter().any(|k| value(have, k) != value(want, k))
        || have.type_ != want.type_
        || !subset(&want.metadata.labels, &have.metadata.labels)
        || !subset(&want.metadata.annotations, &have.metadata.annotations)
        || want.metadata.owner_references.iter().flatten().any(|o| !have.owner_references().contains(o))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_already_used_by_this_apikey_is_never_issued_again() {
        let format = KeyFormat::default();
        let old = format.generate();
        let old_facts = format.facts(&old);
        let mut data = BTreeMap::new();
        data.insert(Slot::Secondary.data_key().to_string(), ByteString(old.expose().as_bytes().to_vec()));
        let secret = Secret { data: Some(data), ..Default::default() };
        // A key in the slot whose ID this ApiKey revoked is not adopted, and neither is
        // one whose ID a key in status has.
        let revoked = vec![old_facts.key_id.clone()];
        let mut minter = Minter::new(&format, Some(&secret), vec![], &revoked);
        assert!(minter.id_taken(&old_facts.key_id));
        assert_ne!(minter.mint(Slot::Secondary).key_id, old_facts.key_id);
        let other = format.facts(&format.generate());
        let known = vec![other.hash.clone()];
        let mut minter = Minter::new(&format, None, known, &[]);
        assert!(minter.id_taken(&other.key_id) && !minter.id_taken(&old_facts.key_id));
        let first = minter.mint(Slot::Primary);
        assert_eq!(first.key_id.len(), keys::KEY_ID_LEN);
        assert!(minter.id_taken(&first.key_id), "a key minted now takes its ID too");
    }

    #[test]
    fn a_slot_edited_away_is_restored_from_api_key() {
        let format = KeyFormat::default();
        let (active, other) = (format.generate(), format.generate());
        let mut data = BTreeMap::new();
        data.insert(data::API_KEY.to_string(), ByteString(active.expose().as_bytes().to_vec()));
        data.insert(Slot::Primary.data_key().to_string(), ByteString(b"edited".to_vec()));
        data.insert(Slot::Secondary.data_key().to_string(), ByteString(other.expose().as_bytes().to_vec()));
        let secret = Secret { data: Some(data), ..Default::default() };
        let hashes = |slot| {
            Some(match slot {
                Slot::Primary => keys::hash(active.expose()),
                Slot::Secondary => keys::hash(other.expose()),
            })
        };
        let slots = slot_material(Some(&secret), &BTreeMap::new(), hashes);
        assert_eq!(slots[&Slot::Primary], active.expose(), "restored from api-key");
        assert_eq!(slots[&Slot::Secondary], other.expose());
        // A slot whose status hash api-key does not hold is left as it is.
        let slots = slot_material(Some(&secret), &BTreeMap::new(), |_| Some("sha256:other".into()));
        assert_eq!(slots[&Slot::Primary], "edited");
    }
}
