//! `KeyFormat::check` (prefix, length, alphabet, CRC32 suffix) on any input, and real
//! keys of a format chosen by the fuzzer.
//!
//! - Any string, against the default format and the fuzzer's one: never panics, gives
//!   the same answer twice, and accepts only non-empty ASCII of at most `MAX_KEY_LEN`
//!   bytes that starts with the prefix.
//! - A key generated in the fuzzer's format (prefix `[a-z0-9_]{0,16}`, 16..=64 random
//!   bytes, base62/base64url/hex, with or without checksum) passes `check`, fits
//!   `MAX_KEY_LEN`, and has facts (ID, hash, preview) that fit the key; a hex checksum is
//!   the CRC32 of everything before it.
//! - Replacing one character of such a key by any other character makes `check` fail
//!   when the key has a checksum (CRC32 catches every single-byte change), and always
//!   when the new character is outside the prefix's or the encoding's alphabet.
//!
//! The key's random part comes from the OS (`KeyFormat::generate`); a failure prints the
//! format, the key and the change, so it can be replayed by hand.
#![no_main]

use keyward::api::KeyEncoding;
use keyward::keys::{KeyFormat, MAX_KEY_LEN, SecretKey};
use libfuzzer_sys::fuzz_target;

const PREFIX_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789_";

fuzz_target!(|data: &[u8]| {
    let format = format_from(data);
    let text = String::from_utf8_lossy(data);

    // Arbitrary input, as is and behind the prefix.
    for candidate in [text.to_string(), format!("{}{text}", format.prefix)] {
        for f in [&KeyFormat::default(), &format] {
            let verdict = f.check(&candidate);
            assert_eq!(verdict, f.check(&candidate), "check is deterministic");
            if verdict.is_ok() {
                assert!(!candidate.is_empty() && candidate.len() <= MAX_KEY_LEN && candidate.is_ascii());
                assert!(candidate.starts_with(&f.prefix));
                facts_fit(f, &SecretKey::from_string(candidate.clone()));
            }
        }
    }

    // A real key of the fuzzer's format.
    let key = format.generate();
    let material = key.expose();
    assert_eq!(format.check(material), Ok(()), "{format:?} refused its own key {material:?}");
    assert!(material.len() <= MAX_KEY_LEN && material.is_ascii(), "{format:?}: {material:?}");
    facts_fit(&format, &key);
    if format.checksum && format.encoding == KeyEncoding::Hex {
        let (signed, sum) = material.split_at(material.len() - 8);
        assert_eq!(sum, format!("{:08x}", crc32fast::hash(signed.as_bytes())), "{material:?}");
    }

    // One character replaced: where and by what, from the input's last bytes.
    let chars: Vec<char> = material.chars().collect();
    let at = usize::from(data.last().copied().unwrap_or(0)) * 7 % chars.len();
    let by = text.chars().rev().nth(1).unwrap_or('!');
    if by == chars[at] {
        return;
    }
    let mut changed = chars.clone();
    changed[at] = by;
    let changed: String = changed.into_iter().collect();
    let in_prefix = at < format.prefix.len();
    if format.checksum || in_prefix || !in_alphabet(format.encoding, by) {
        assert!(
            format.check(&changed).is_err(),
            "{format:?}: {material:?} with {by:?} at {at} still checks: {changed:?}"
        );
    }
});

/// A format from the input's first bytes; the prefix from the policy's alphabet.
fn format_from(data: &[u8]) -> KeyFormat {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let prefix_len = usize::from(byte(0)) % 17;
    let prefix =
        (0..prefix_len).map(|i| char::from(PREFIX_CHARS[usize::from(byte(4 + i)) % PREFIX_CHARS.len()]));
    KeyFormat {
        prefix: prefix.collect(),
        random_bytes: 16 + usize::from(byte(1)) % 49,
        encoding: [KeyEncoding::Base62, KeyEncoding::Base64url, KeyEncoding::Hex][usize::from(byte(2)) % 3],
        checksum: byte(3) & 1 == 0,
    }
}

fn in_alphabet(encoding: KeyEncoding, c: char) -> bool {
    match encoding {
        KeyEncoding::Base62 => c.is_ascii_alphanumeric(),
        KeyEncoding::Base64url => c.is_ascii_alphanumeric() || c == '-' || c == '_',
        KeyEncoding::Hex => c.is_ascii_digit() || ('a'..='f').contains(&c),
    }
}

/// ID, hash and preview describe the key without containing it.
fn facts_fit(format: &KeyFormat, key: &SecretKey) {
    let facts = format.facts(key);
    let material = key.expose();
    assert_eq!(facts.key_id.len(), keyward::keys::KEY_ID_LEN);
    assert!(facts.key_id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(facts.hash, keyward::keys::hash(material));
    assert!(facts.hash.starts_with(&format!("sha256:{}", facts.key_id)));
    assert!(material.starts_with(&facts.preview), "{material:?} preview {:?}", facts.preview);
    assert!(facts.preview.len() <= format.prefix.len() + 4);
}
