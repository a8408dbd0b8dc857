//! The verifier's in-memory index: `sha256(key) → entry` for every key in every
//! ApiKey's status, each ApiKey's own `spec.revokedKeys`, and the key formats of all
//! KeyPolicies (a key of no current format is malformed unless a status holds it).
//! Pure: fed by watch events, asked at request time (expiry is judged against the
//! clock then).
//!
//! Tenancy: a key is judged only by the ApiKey whose status holds its hash. Another
//! ApiKey listing the same key ID in its `revokedKeys` changes nothing for it, and
//! removing an ApiKey removes only its own entries, even when (material copied between
//! Secrets) two ApiKeys list one hash: the key stays with the one that issued it first.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use serde::Serialize;

use crate::api::{ApiKey, KeyState, Slot};
use sha2::{Digest as _, Sha256};

use crate::keys::{KEY_ID_LEN, KeyFormat, LEGACY_KEY_ID_LEN, MAX_KEY_LEN};

/// The ApiKey a key belongs to; shared by its keys' entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The ApiKey's namespace (one copy per namespace, shared by its ApiKeys).
    pub namespace: Arc<str>,
    /// The ApiKey's name (the same copy as the index's own).
    pub name: Arc<str>,
    /// Its owner (unique only within the namespace).
    pub owner: Short,
    /// Its client ID.
    pub client_id: Short,
    /// Its `spec.revokedKeys`.
    pub revoked: Box<[String]>,
    /// Its `spec.scopes` (sorted, well-formed ones only).
    pub scopes: Box<[String]>,
    /// The ApiKey's resourceVersion this view was built from.
    pub resource_version: Option<Short>,
}

impl Holder {
    fn is(&self, namespace: &str, name: &str) -> bool {
        *self.namespace == *namespace && *self.name == *name
    }
}

/// Bytes a [`Short`] keeps in place.
const INLINE: usize = 22;

/// A short string kept in place: key IDs (16 characters), client IDs, resourceVersions
/// and most owners fit, and cost no allocation of their own (a `String` costs 24 bytes
/// and a heap chunk of at least 32). A longer one goes to the heap.
#[derive(Clone, PartialEq, Eq)]
pub struct Short(Repr);

#[derive(Clone, PartialEq, Eq)]
enum Repr {
    /// The first `len` bytes are the text, the rest zero.
    Inline {
        len: u8,
        bytes: [u8; INLINE],
    },
    Heap(Box<str>),
}

impl Short {
    /// The text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // A whole `str` was copied in, so this is UTF-8.
            Repr::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            Repr::Heap(s) => s,
        }
    }
}

impl From<&str> for Short {
    fn from(s: &str) -> Self {
        let mut bytes = [0; INLINE];
        match (bytes.get_mut(..s.len()), u8::try_from(s.len())) {
            (Some(b), Ok(len)) => {
                b.copy_from_slice(s.as_bytes());
                Short(Repr::Inline { len, bytes })
            }
            _ => Short(Repr::Heap(s.into())),
        }
    }
}

impl std::ops::Deref for Short {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Short {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Short {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the index knows about one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The ApiKey that holds it.
    pub apikey: Arc<Holder>,
    /// The key's ID.
    pub key_id: Short,
    /// The key's slot.
    pub slot: Slot,
    /// Its position in `status.keys` (for the verifier's JSON patch).
    pub position: u32,
    /// When it was issued.
    pub created_at: DateTime<Utc>,
    /// When it stops verifying (None: never).
    pub expires_at: Option<DateTime<Utc>>,
    /// Its last use as status records it.
    pub last_used_at: Option<DateTime<Utc>>,
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
    /// Not a key of any current policy's format (prefix, length, encoding, checksum)
    /// and held by no ApiKey, or sent ambiguously (two different keys in one request).
    Malformed,
    /// Valid, but without a scope the caller (the proxy, per route) requires.
    InsufficientScope,
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
            Code::InsufficientScope => "INSUFFICIENT_SCOPE",
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

type Id = (String, String);

/// A namespace's ApiKeys' hashes, by name.
type ByName = HashMap<Arc<str>, Box<[Digest]>>;

/// A key's SHA-256, as the index keeps it (32 bytes in place, not 71 characters of text
/// on the heap: the index holds each twice).
type Digest = [u8; 32];

/// The digest of a status `hash` (`sha256:<64 hex digits>`); None if it is not one.
fn digest_of(hash: &str) -> Option<Digest> {
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hash.strip_prefix("sha256:")?, &mut digest).ok()?;
    Some(digest)
}

/// The index.
#[derive(Default, Debug)]
pub struct Index {
    by_hash: HashMap<Digest, Entry>,
    /// Each ApiKey's hashes, in `status.keys` order, by namespace and name: the keys are
    /// the very copies its `Holder` shares (one per namespace, one per name).
    hashes_of: HashMap<Arc<str>, ByName>,
    /// Each ApiKey's revoked IDs, and how many ApiKeys list each ID: only used for a key
    /// that is in no status any more (its slot was regenerated), to say `REVOKED`
    /// rather than `NOT_FOUND`; a key in a status is judged by its own ApiKey alone.
    revoked_of: HashMap<Id, Vec<String>>,
    revoked_ids: HashMap<String, usize>,
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

    /// Whether the index holds this ApiKey (with keys or revocations).
    pub fn contains(&self, namespace: &str, name: &str) -> bool {
        self.hashes(namespace, name).is_some()
            || self.revoked_of.contains_key(&(namespace.to_string(), name.to_string()))
    }

    /// An ApiKey's hashes, in `status.keys` order.
    fn hashes(&self, namespace: &str, name: &str) -> Option<&[Digest]> {
        self.hashes_of.get(namespace)?.get(name).map(|h| &h[..])
    }

    /// The keys an ApiKey holds, in `status.keys` order.
    pub fn keys_of(&self, namespace: &str, name: &str) -> Vec<&Entry> {
        self.hashes(namespace, name)
            .into_iter()
            .flatten()
            .filter_map(|h| self.by_hash.get(h).filter(|e| e.apikey.is(namespace, name)))
            .collect()
    }

    /// Forget an ApiKey's keys and revocations (and nothing of any other ApiKey).
    pub fn remove(&mut self, namespace: &str, name: &str) {
        if let Some(names) = self.hashes_of.get_mut(namespace) {
            for h in names.remove(name).unwrap_or_default() {
                if self.by_hash.get(&h).is_some_and(|e| e.apikey.is(namespace, name)) {
                    self.by_hash.remove(&h);
                }
            }
            if names.is_empty() {
                self.hashes_of.remove(namespace);
            }
        }
        for k in self.revoked_of.remove(&(namespace.to_string(), name.to_string())).unwrap_or_default() {
            if let Some(n) = self.revoked_ids.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    self.revoked_ids.remove(&k);
                }
            }
        }
    }

    /// Index (or re-index) an ApiKey's keys and revocations.
    pub fn upsert(&mut self, key: &ApiKey) {
        let (namespace, name) = (key.metadata.namespace.as_deref().unwrap_or_default(), key.name_any());
        self.remove(namespace, &name);
        // Being deleted: its keys end now. Its place under the owner's limit is already
        // free (the controller skips it), so a finalizer holding it must not keep them.
        if key.metadata.deletion_timestamp.is_some() {
            return;
        }
        let mut revoked = key.spec.revoked_keys.clone();
        revoked.sort();
        revoked.dedup();
        for k in &revoked {
            *self.revoked_ids.entry(k.clone()).or_default() += 1;
        }
        if !revoked.is_empty() {
            self.revoked_of.insert((namespace.to_string(), name.clone()), revoked.clone());
        }
        let Some(status) = &key.status else { return };
        // The namespace's one copy, when another ApiKey of it is indexed.
        let namespace: Arc<str> =
            self.hashes_of.get_key_value(namespace).map_or_else(|| namespace.into(), |(ns, _)| ns.clone());
        let name: Arc<str> = name.into();
        let holder = Arc::new(Holder {
            namespace: namespace.clone(),
            name: name.clone(),
            owner: key.owner().into(),
            client_id: status.client_id.as_deref().unwrap_or_default().into(),
            revoked: revoked.into(),
            scopes: {
                let mut scopes: Vec<String> =
                    key.spec.scopes.iter().filter(|s| crate::api::valid_scope(s)).cloned().collect();
                scopes.sort();
                scopes.dedup();
                scopes.into()
            },
            resource_version: key.metadata.resource_version.as_deref().map(Short::from),
        });
        let mut hashes = Vec::with_capacity(status.keys.len());
        for (position, k) in status.keys.iter().enumerate() {
            let Some(digest) = digest_of(&k.hash) else { continue };
            let entry = Entry {
                apikey: holder.clone(),
                key_id: k.key_id.as_str().into(),
                slot: k.slot,
                position: u32::try_from(position).unwrap_or(u32::MAX),
                created_at: k.created_at,
                expires_at: k.effective_expires_at,
                last_used_at: k.last_used_at,
                state: k.state,
            };
            // One hash in two ApiKeys (material copied into another Secret): the key
            // stays with the ApiKey that issued it first.
            let taken = self
                .by_hash
                .get(&digest)
                .is_some_and(|e| !e.apikey.is(&namespace, &name) && e.created_at <= k.created_at);
            if !taken {
                self.by_hash.insert(digest, entry);
            }
            hashes.push(digest);
        }
        if !hashes.is_empty() {
            self.hashes_of.entry(namespace).or_default().insert(name, hashes.into());
        }
    }

    /// Is `key` valid at `now`?
    pub fn verify(&self, key: &str, now: DateTime<Utc>) -> Verdict {
        let malformed = Verdict { code: Code::Malformed, entry: None };
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return malformed;
        }
        let formed = self.formats.iter().any(|f| f.check(key).is_ok());
        let digest: Digest = Sha256::digest(key.as_bytes()).into();
        let found = self.by_hash.get(&digest);
        // A revoked key whose slot was already regenerated is in no status any more
        // (and so valid nowhere); its ID (derived from its hash) is still listed.
        let revoked_gone = found.is_none() && !self.revoked_ids.is_empty() && {
            let hex = hex::encode(digest);
            [KEY_ID_LEN, LEGACY_KEY_ID_LEN].iter().any(|&n| self.revoked_ids.contains_key(&hex[..n]))
        };
        // A key of no current format is still answered when a status holds it (or its
        // ID is revoked): its policy's keyFormat was changed, or the policy deleted.
        if !formed && found.is_none() && !revoked_gone {
            return malformed;
        }
        match found {
            Some(e) => {
                let code = match e.state {
                    KeyState::Revoked => Code::Revoked,
                    // Only the ApiKey that holds the key can revoke it.
                    _ if e.apikey.revoked.iter().any(|r| *r == *e.key_id) => Code::Revoked,
                    KeyState::Expired => Code::Expired,
                    _ if e.expires_at.is_some_and(|t| t <= now) => Code::Expired,
                    _ => Code::Valid,
                };
                Verdict { code, entry: Some(e.clone()) }
            }
            None if revoked_gone => Verdict { code: Code::Revoked, entry: None },
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
        assert_eq!(v.entry.unwrap().apikey.owner.as_str(), "team");
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
    }

    #[test]
    fn an_apikey_being_deleted_holds_no_valid_key() {
        // Its place under the owner's limit is already free (the controller skips it),
        // so a finalizer holding it in deletion must not keep its keys working.
        let now = Utc::now();
        let (mut key, m) = apikey(vec![("a", KeyState::Active, Some(now + TimeDelta::seconds(60)))], vec![]);
        let mut index = Index::default();
        index.set_formats(vec![KeyFormat::default()]);
        index.upsert(&key);
        assert_eq!(index.verify(&m[0], now).code, Code::Valid);
        key.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
        index.upsert(&key);
        assert_eq!(index.verify(&m[0], now).code, Code::NotFound);
        assert!(index.is_empty());
        assert_eq!(index.verify(&m[0], now).code, Code::NotFound);
    }

    fn moved(mut key: ApiKey, namespace: &str, name: &str) -> ApiKey {
        key.metadata.namespace = Some(namespace.into());
        key.metadata.name = Some(name.into());
        key
    }

    fn index_of(keys: &[&ApiKey]) -> Index {
        let mut index = Index::default();
        index.set_formats(vec![KeyFormat::default()]);
        keys.iter().for_each(|k| index.upsert(k));
        index
    }

    #[test]
    fn another_namespace_listing_a_key_id_revokes_nothing_of_ours() {
        let now = Utc::now();
        let later = Some(now + TimeDelta::seconds(60));
        let (a, ma) = apikey(vec![("a", KeyState::Active, later)], vec![]);
        let a = moved(a, "tenant-a", "checkout");
        let a_id = a.status.as_ref().unwrap().keys[0].key_id.clone();
        // Tenant B lists A's (public) key ID, twice over, in two ApiKeys.
        let (b, mb) = apikey(vec![("b", KeyState::Active, later)], vec![a_id.clone()]);
        let b1 = moved(b.clone(), "tenant-b", "x");
        let b2 = moved(b, "tenant-b", "y");
        let mut index = index_of(&[&a, &b1, &b2]);
        assert_eq!(index.verify(&ma[0], now).code, Code::Valid, "A's key is judged by A alone");
        let v = index.verify(&mb[0], now);
        assert_eq!(v.code, Code::Valid);
        // Two ApiKeys listing one ID: removing one leaves the other's revocation in place.
        let (c, mc) = apikey(vec![("c", KeyState::Active, later)], vec![]);
        let c = moved(c, "tenant-c", "c");
        let c_id = c.status.as_ref().unwrap().keys[0].key_id.clone();
        let mut c_revoked = c.clone();
        c_revoked.spec.revoked_keys = vec![c_id.clone()];
        let mut b_lists_c = moved(c.clone(), "tenant-b", "z");
        b_lists_c.status = None;
        b_lists_c.spec.revoked_keys = vec![c_id];
        index.upsert(&c_revoked);
        index.upsert(&b_lists_c);
        assert_eq!(index.verify(&mc[0], now).code, Code::Revoked);
        index.remove("tenant-b", "z");
        assert_eq!(index.verify(&mc[0], now).code, Code::Revoked, "C's own revocation stays");
        index.upsert(&c);
        assert_eq!(index.verify(&mc[0], now).code, Code::Valid, "and goes when C lifts it");
        assert_eq!(index.verify(&ma[0], now).code, Code::Valid);
    }

    #[test]
    fn a_copied_hash_stays_with_the_apikey_that_issued_it_first() {
        let now = Utc::now();
        let later = Some(now + TimeDelta::seconds(60));
        let (a, m) = apikey(vec![("a", KeyState::Active, later)], vec![]);
        let a = moved(a, "tenant-a", "checkout");
        let mut copy = moved(a.clone(), "tenant-b", "copy");
        copy.status.as_mut().unwrap().keys[0].created_at += TimeDelta::seconds(5);
        copy.spec.owner = "payments".into();
        for order in [[&a, &copy], [&copy, &a]] {
            let mut index = index_of(&order);
            assert_eq!(
                index.verify(&m[0], now).entry.unwrap().apikey.namespace.as_ref(),
                "tenant-a",
                "either order"
            );
            // B revoking its copy, or deleting it, leaves A's key alone.
            let mut revoked = copy.clone();
            revoked.spec.revoked_keys = vec![copy.status.as_ref().unwrap().keys[0].key_id.clone()];
            index.upsert(&revoked);
            assert_eq!(index.verify(&m[0], now).code, Code::Valid);
            index.remove("tenant-b", "copy");
            assert_eq!(index.verify(&m[0], now).code, Code::Valid);
            assert_eq!(index.keys_of("tenant-a", "checkout").len(), 1);
        }
    }

    #[test]
    fn a_key_outlives_its_format() {
        // Issued under a policy whose keyFormat then changed, or which was deleted: its
        // keys stay valid until they end (the controller keeps their expiries).
        let now = Utc::now();
        let (key, m) = apikey(vec![("a", KeyState::Active, Some(now + TimeDelta::seconds(60)))], vec![]);
        let mut index = Index::default();
        index.set_formats(vec![KeyFormat::default()]);
        index.upsert(&key);
        let acme = KeyFormat { prefix: "acme_".into(), ..KeyFormat::default() };
        for formats in [vec![acme.clone()], vec![]] {
            index.set_formats(formats);
            assert_eq!(index.verify(&m[0], now).code, Code::Valid);
            assert_eq!(index.verify(&m[0], now + TimeDelta::seconds(61)).code, Code::Expired);
            // Anything else of that old format is malformed now.
            assert_eq!(index.verify(KeyFormat::default().generate().expose(), now).code, Code::Malformed);
        }
        // Revoked, then its slot regenerated: still REVOKED, not MALFORMED.
        let mut revoked = key.clone();
        revoked.spec.revoked_keys = vec![key.status.as_ref().unwrap().keys[0].key_id.clone()];
        revoked.status.as_mut().unwrap().keys.clear();
        index.upsert(&revoked);
        assert_eq!(index.verify(&m[0], now).code, Code::Revoked);
        index.set_formats(vec![acme]);
        index.remove("ns", "svc");
        assert_eq!(index.verify(&m[0], now).code, Code::Malformed);
    }

    #[test]
    fn unknown_prefixes_are_malformed() {
        let mut index = Index::default();
        let other = KeyFormat { prefix: "acme_".into(), ..KeyFormat::default() };
        index.set_formats(vec![other.clone()]);
        assert_eq!(index.verify(KeyFormat::default().generate().expose(), Utc::now()).code, Code::Malformed);
        assert_eq!(index.verify(other.generate().expose(), Utc::now()).code, Code::NotFound);
    }

    #[test]
    fn a_short_string_is_kept_in_place_and_a_long_one_whole() {
        assert_eq!(size_of::<Short>(), size_of::<String>());
        assert_eq!(size_of::<Option<Short>>(), size_of::<String>());
        let long = "o".repeat(300);
        let cases = [
            "",
            "a",
            "0123456789abcdef",
            "kwc_0123456789abcdefgh",
            "kwc_0123456789abcdefghi",
            "Zoë 🔑 team",
            &long,
        ];
        for s in cases {
            let t = Short::from(s);
            assert_eq!(t.as_str(), s);
            assert_eq!(format!("{t}"), s);
            assert_eq!(format!("{t:?}"), format!("{s:?}"));
            assert_eq!(matches!(t.0, Repr::Inline { .. }), s.len() <= INLINE, "{s}");
        }
        // A multi-byte character across the inline limit goes to the heap whole.
        let edge = format!("{}é", "x".repeat(INLINE - 1));
        assert_eq!(Short::from(edge.as_str()).as_str(), edge);
    }

    #[test]
    fn an_apikeys_namespace_and_name_are_kept_once() {
        let later = Some(Utc::now() + TimeDelta::seconds(60));
        let (a, ma) = apikey(vec![("a", KeyState::Active, later), ("b", KeyState::Standby, later)], vec![]);
        let (b, mb) = apikey(vec![("c", KeyState::Active, later)], vec![]);
        let (a, b) = (moved(a, "shop", "checkout"), moved(b, "shop", "cart"));
        let mut index = index_of(&[&a, &b]);
        let now = Utc::now();
        let (ea, eb) = (index.verify(&ma[1], now).entry.unwrap(), index.verify(&mb[0], now).entry.unwrap());
        assert!(Arc::ptr_eq(&ea.apikey.namespace, &eb.apikey.namespace), "one copy per namespace");
        let (ns, names) = index.hashes_of.get_key_value("shop").unwrap();
        assert!(Arc::ptr_eq(ns, &ea.apikey.namespace));
        let (name, hashes) = names.get_key_value("checkout").unwrap();
        assert!(Arc::ptr_eq(name, &ea.apikey.name), "one copy per name");
        assert_eq!(hashes.len(), 2);
        assert_eq!(index.keys_of("shop", "checkout").iter().map(|e| e.position).collect::<Vec<_>>(), [0, 1]);
        // Re-indexed, then removed: nothing of either is left behind.
        index.upsert(&a);
        assert_eq!(index.keys_of("shop", "checkout").len(), 2);
        index.remove("shop", "checkout");
        assert!(index.contains("shop", "cart") && !index.contains("shop", "checkout"));
        index.remove("shop", "cart");
        assert!(index.is_empty() && index.hashes_of.is_empty(), "{:?}", index.hashes_of);
    }
}
