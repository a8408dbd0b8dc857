//! Key material: generation from the OS CSPRNG, the `keyFormat` encodings, the CRC32
//! checksum suffix (GitHub-token style), hashing, key IDs and previews.
//!
//! A key is `<prefix><body><checksum>`: `body` encodes `randomBytes` random bytes
//! (base62, base64url or hex) and `checksum` is the CRC32 of `<prefix><body>` in a
//! fixed width (6 base62 or base64url characters, 8 hex digits). Scanners and the
//! verifier reject a malformed key without any lookup.
//!
//! [`SecretKey`] holds material: it is zeroed on drop and its `Debug` is redacted, so
//! it cannot reach a log line by accident.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::TryRngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::api::{KeyEncoding, KeyFormatSpec};

const BASE62: &str = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Longest key accepted anywhere (prefix 16 + 64 bytes in hex + checksum, with room).
pub const MAX_KEY_LEN: usize = 192;

/// How keys of one policy look.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyFormat {
    /// Literal prefix, `[a-z0-9_]{0,16}`.
    pub prefix: String,
    /// Random bytes per key (16..=64).
    pub random_bytes: usize,
    /// Encoding of the random part.
    pub encoding: KeyEncoding,
    /// Whether a CRC32 suffix is appended.
    pub checksum: bool,
}

impl From<&KeyFormatSpec> for KeyFormat {
    fn from(spec: &KeyFormatSpec) -> Self {
        KeyFormat {
            prefix: spec.prefix.clone(),
            random_bytes: spec.random_bytes as usize,
            encoding: spec.encoding,
            checksum: spec.checksum,
        }
    }
}

impl Default for KeyFormat {
    fn default() -> Self {
        KeyFormat::from(&KeyFormatSpec::default())
    }
}

/// Why a string is not a key of a given format. Never contains the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Empty or longer than [`MAX_KEY_LEN`].
    #[error("key is empty or too long")]
    Length,
    /// Does not start with the policy's prefix.
    #[error("key does not have the expected prefix")]
    Prefix,
    /// Characters outside the encoding, or the wrong number of random bytes.
    #[error("key body is not valid for its encoding")]
    Body,
    /// The CRC32 suffix does not match.
    #[error("key checksum does not match")]
    Checksum,
}

/// Key material. Zeroed on drop; `Debug` never shows it.
pub struct SecretKey(Zeroizing<String>);

impl SecretKey {
    /// Wrap existing material (e.g. read back from the consumer Secret).
    pub fn from_string(s: String) -> Self {
        SecretKey(Zeroizing::new(s))
    }
    /// The key itself. Only for writing into the Secret or hashing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// What may be shown about a key: its ID, hash and preview.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyFacts {
    /// Short identifier ([`KEY_ID_LEN`] hex characters of the key's SHA-256).
    pub key_id: String,
    /// `sha256:<hex>`.
    pub hash: String,
    /// Prefix and the first 4 characters of the random part.
    pub preview: String,
}

/// Hex digits of a key ID: the first 64 bits of the key's SHA-256. Among a million keys
/// the chance that any two share an ID is about n²/2⁶⁵ ≈ 3·10⁻⁸ (40 bits, the width
/// before, gave 0.4); and an ID only ever names a key of its own ApiKey, where the
/// controller also never issues two keys with one ID.
pub const KEY_ID_LEN: usize = 16;
/// Key IDs issued by earlier keyward versions were 10 hex digits; revocations may still
/// name them.
pub const LEGACY_KEY_ID_LEN: usize = 10;

/// The key ID within a `sha256:<hex>` hash (its first [`KEY_ID_LEN`] hex digits).
pub fn key_id_of(hash: &str) -> &str {
    let hex = hash.strip_prefix("sha256:").unwrap_or(hash);
    hex.get(..KEY_ID_LEN).unwrap_or(hex)
}

/// `sha256:<hex>` of a key.
pub fn hash(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

fn random_bytes(n: usize) -> Zeroizing<Vec<u8>> {
    let mut buf = Zeroizing::new(vec![0u8; n]);
    // The OS CSPRNG; failure means the OS cannot produce randomness, which nothing can recover.
    OsRng.try_fill_bytes(&mut buf).expect("the operating system's random number generator failed");
    buf
}

fn encode(encoding: KeyEncoding, bytes: &[u8]) -> String {
    match encoding {
        KeyEncoding::Base62 => base_x::encode(BASE62, bytes),
        KeyEncoding::Base64url => URL_SAFE_NO_PAD.encode(bytes),
        KeyEncoding::Hex => hex::encode(bytes),
    }
}

fn decode(encoding: KeyEncoding, text: &str) -> Option<Zeroizing<Vec<u8>>> {
    let bytes = match encoding {
        KeyEncoding::Base62 => base_x::decode(BASE62, text).ok()?,
        KeyEncoding::Base64url => URL_SAFE_NO_PAD.decode(text).ok()?,
        KeyEncoding::Hex => {
            if text.bytes().any(|b| b.is_ascii_uppercase()) {
                return None;
            }
            hex::decode(text).ok()?
        }
    };
    Some(Zeroizing::new(bytes))
}

/// Width of the checksum suffix for an encoding.
fn checksum_width(encoding: KeyEncoding) -> usize {
    match encoding {
        KeyEncoding::Base62 | KeyEncoding::Base64url => 6,
        KeyEncoding::Hex => 8,
    }
}

fn checksum(encoding: KeyEncoding, text: &str) -> String {
    let crc = crc32fast::hash(text.as_bytes());
    match encoding {
        KeyEncoding::Base62 => {
            let alphabet = BASE62.as_bytes();
            let mut out = [b'0'; 6];
            let mut n = crc;
            for slot in out.iter_mut().rev() {
                *slot = alphabet[(n % 62) as usize];
                n /= 62;
            }
            String::from_utf8_lossy(&out).into_owned()
        }
        KeyEncoding::Base64url => URL_SAFE_NO_PAD.encode(crc.to_be_bytes()),
        KeyEncoding::Hex => format!("{crc:08x}"),
    }
}

impl KeyFormat {
    /// A fresh key from the OS CSPRNG.
    pub fn generate(&self) -> SecretKey {
        let bytes = random_bytes(self.random_bytes);
        let mut key = Zeroizing::new(String::with_capacity(self.prefix.len() + self.random_bytes * 2 + 8));
        key.push_str(&self.prefix);
        key.push_str(&encode(self.encoding, &bytes));
        if self.checksum {
            let sum = checksum(self.encoding, &key);
            key.push_str(&sum);
        }
        SecretKey(key)
    }

    /// Check that `key` is well-formed for this format (prefix, encoding, length,
    /// checksum). No lookup, no allocation of the decoded bytes beyond a zeroed buffer.
    pub fn check(&self, key: &str) -> Result<(), Malformed> {
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(Malformed::Length);
        }
        let rest = key.strip_prefix(self.prefix.as_str()).ok_or(Malformed::Prefix)?;
        let body = if self.checksum {
            let width = checksum_width(self.encoding);
            if rest.len() <= width || !rest.is_char_boundary(rest.len() - width) {
                return Err(Malformed::Body);
            }
            let (body, sum) = rest.split_at(rest.len() - width);
            if checksum(self.encoding, &key[..key.len() - width]) != sum {
                return Err(Malformed::Checksum);
            }
            body
        } else {
            rest
        };
        match decode(self.encoding, body) {
            Some(bytes) if bytes.len() == self.random_bytes => Ok(()),
            _ => Err(Malformed::Body),
        }
    }

    /// ID, hash and preview of a key of this format.
    pub fn facts(&self, key: &SecretKey) -> KeyFacts {
        let text = key.expose();
        let hash = hash(text);
        let body = text.strip_prefix(self.prefix.as_str()).unwrap_or(text);
        let preview: String = body.chars().take(4).collect();
        KeyFacts { key_id: key_id_of(&hash).to_string(), hash, preview: format!("{}{preview}", self.prefix) }
    }
}

/// A new client ID: `kwc_` and 22 base62 characters (128 random bits; stable for an
/// ApiKey's life).
pub fn new_client_id() -> String {
    let bytes = random_bytes(16);
    let mut id = base_x::encode(BASE62, &bytes);
    while id.len() < 22 {
        id.insert(0, '0');
    }
    format!("kwc_{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(prefix: &str, bytes: usize, encoding: KeyEncoding, checksum: bool) -> KeyFormat {
        KeyFormat { prefix: prefix.into(), random_bytes: bytes, encoding, checksum }
    }

    #[test]
    fn generated_keys_check_in_every_format() {
        for encoding in [KeyEncoding::Base62, KeyEncoding::Base64url, KeyEncoding::Hex] {
            for bytes in [16, 32, 64] {
                for checksum in [true, false] {
                    let f = fmt("kw_", bytes, encoding, checksum);
                    for _ in 0..50 {
                        let k = f.generate();
                        assert!(k.expose().starts_with("kw_"));
                        assert!(k.expose().len() <= MAX_KEY_LEN);
                        assert_eq!(f.check(k.expose()), Ok(()), "{encoding:?} {bytes} {checksum}");
                    }
                }
            }
        }
    }

    #[test]
    fn keys_are_unique_and_random() {
        let f = KeyFormat::default();
        let keys: std::collections::HashSet<String> =
            (0..1000).map(|_| f.generate().expose().to_string()).collect();
        assert_eq!(keys.len(), 1000);
    }

    #[test]
    fn malformed_keys_are_rejected_without_lookup() {
        let f = KeyFormat::default();
        let k = f.generate();
        let key = k.expose();
        assert_eq!(f.check(""), Err(Malformed::Length));
        assert_eq!(f.check(&"a".repeat(MAX_KEY_LEN + 1)), Err(Malformed::Length));
        assert_eq!(f.check(&key.replacen("kw_", "xx_", 1)), Err(Malformed::Prefix));
        // Flip one character of the body: the checksum catches it.
        let mut chars: Vec<char> = key.chars().collect();
        chars[5] = if chars[5] == 'a' { 'b' } else { 'a' };
        let tampered: String = chars.into_iter().collect();
        assert_eq!(f.check(&tampered), Err(Malformed::Checksum));
        assert_eq!(f.check("kw_"), Err(Malformed::Body));
        assert_eq!(f.check("kw_!!!!!!!!!!!!!!!"), Err(Malformed::Checksum));
        assert!(f.check("kw_ééééééé").is_err());
        assert!(f.check("kw_éééééé\u{301}").is_err());
        // A valid checksum over a too-short body.
        let short = fmt("kw_", 16, KeyEncoding::Base62, true).generate();
        assert_eq!(f.check(short.expose()), Err(Malformed::Body));
    }

    #[test]
    fn facts_never_contain_the_key() {
        let f = KeyFormat::default();
        let k = f.generate();
        let facts = f.facts(&k);
        assert!(facts.hash.starts_with("sha256:") && facts.hash.len() == 7 + 64);
        assert_eq!(facts.key_id.len(), KEY_ID_LEN);
        assert_eq!(facts.preview.len(), 3 + 4);
        assert!(k.expose().starts_with(&facts.preview));
        assert!(!facts.hash.contains(&k.expose()[3..]));
        assert_eq!(format!("{k:?}"), "SecretKey(<redacted>)");
    }

    #[test]
    fn checksum_is_fixed_width() {
        assert_eq!(checksum(KeyEncoding::Base62, "").len(), 6);
        assert_eq!(checksum(KeyEncoding::Base62, "x").len(), 6);
        assert_eq!(checksum(KeyEncoding::Base64url, "x").len(), 6);
        assert_eq!(checksum(KeyEncoding::Hex, "x").len(), 8);
    }

    #[test]
    fn client_ids() {
        let a = new_client_id();
        assert!(a.starts_with("kwc_") && a.len() == 26, "{a}");
        assert_ne!(a, new_client_id());
    }

    proptest::proptest! {
        #[test]
        fn check_never_panics(s in ".{0,200}") {
            for encoding in [KeyEncoding::Base62, KeyEncoding::Base64url, KeyEncoding::Hex] {
                let _ = fmt("kw_", 32, encoding, true).check(&s);
                let _ = fmt("", 16, encoding, false).check(&s);
            }
        }
    }
}
