//! `IsoDuration::parse` on any UTF-8: never panics, and what it accepts behaves.
//!
//! - Accepted input is short ASCII; a refusal's message stays short whatever the input.
//! - Case and surrounding white space do not matter (the vendor form `p3m` is `P3M`).
//! - `Display` is canonical: it parses back to the same value and prints the same text.
//! - Adding to or subtracting from fixed instants (including the ends of chrono's range)
//!   never panics; a non-zero duration always moves an instant forward, zero never.
//! - Without calendar months, `sub_from(add_to(t)) == t`.
//! - The simple forms `P<n>D`, `P<n>W`, `PT<n>H`, `PT<n>M`, `PT<n>S` have the exact length
//!   `n` units, and are accepted for any `n` a person would write.
#![no_main]

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use keyward::duration::IsoDuration;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let parsed = IsoDuration::parse(text);

    // Case and white space around it change nothing.
    assert_eq!(IsoDuration::parse(&text.to_ascii_lowercase()).ok(), parsed.clone().ok(), "{text:?}");
    assert_eq!(IsoDuration::parse(&format!(" \t{text}\n")).ok(), parsed.clone().ok(), "{text:?}");
    assert_eq!(text.parse::<IsoDuration>(), parsed, "{text:?}");

    // Every simple form of n below a million, in at most 10 characters, is accepted (P90D, p2w, PT999999S).
    if text.trim().len() <= 10 && simple_form(text.trim()).is_some_and(|(n, _)| n < 1_000_000) {
        assert!(parsed.is_ok(), "{text:?} refused: {parsed:?}");
    }

    let d = match parsed {
        Ok(d) => d,
        Err(e) => {
            // The message names the input truncated: bounded whatever was sent.
            let msg = e.to_string();
            assert!(msg.len() < 1024, "error message of {} bytes for {} input bytes", msg.len(), data.len());
            return;
        }
    };
    let trimmed = text.trim();
    assert!(trimmed.is_ascii() && !trimmed.is_empty() && trimmed.len() <= 64, "accepted {text:?}");
    assert!(!trimmed.starts_with('-'), "accepted a negative duration {text:?}");

    // Display is canonical and round-trips.
    let shown = d.to_string();
    assert_eq!(IsoDuration::parse(&shown), Ok(d), "{text:?} is shown as {shown:?}");
    assert_eq!(IsoDuration::parse(&shown).unwrap().to_string(), shown);
    assert_eq!(d.is_zero(), shown == "PT0S", "{text:?}");
    // Calendar months or years appear before the time part.
    let has_months = shown.split('T').next().is_some_and(|date| date.contains('Y') || date.contains('M'));

    // parse() promises the duration can be added to the epoch.
    assert!(d.add_to(DateTime::<Utc>::UNIX_EPOCH).is_ok(), "{text:?}");
    for start in instants() {
        let (end, back) = (d.add_to(start), d.sub_from(start));
        if let Ok(end) = end {
            // Positive stays positive, zero stays put.
            if d.is_zero() {
                assert_eq!(end, start);
            } else {
                assert!(end > start, "{text:?} from {start} gives {end}");
            }
            assert_eq!(d.length_from(start), Ok(end - start));
            if !has_months {
                assert_eq!(d.sub_from(end), Ok(start), "{text:?} from {start}");
            }
        }
        if let Ok(back) = back {
            assert!(if d.is_zero() { back == start } else { back < start }, "{text:?} before {start}");
        }
    }

    // The simple forms: exactly n units.
    if let Some((n, unit_secs)) = simple_form(trimmed) {
        let expected =
            i64::try_from(n).ok().and_then(|n| n.checked_mul(unit_secs)).and_then(TimeDelta::try_seconds);
        assert_eq!(d.length_from(DateTime::<Utc>::UNIX_EPOCH).ok(), expected, "{text:?}");
    }
});

fn instants() -> [DateTime<Utc>; 6] {
    [
        DateTime::<Utc>::UNIX_EPOCH,
        Utc.with_ymd_and_hms(2026, 1, 31, 0, 0, 0).unwrap(),
        Utc.with_ymd_and_hms(2028, 2, 29, 23, 59, 59).unwrap() + TimeDelta::milliseconds(999),
        Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap(),
        DateTime::<Utc>::MAX_UTC,
        DateTime::<Utc>::MIN_UTC,
    ]
}

/// `P<n>D`, `P<n>W`, `PT<n>H`, `PT<n>M`, `PT<n>S` (any case): `n` and the unit in seconds.
fn simple_form(text: &str) -> Option<(u64, i64)> {
    if !text.is_ascii() {
        return None;
    }
    let upper = text.to_ascii_uppercase();
    let rest = upper.strip_prefix('P')?;
    let (time, rest) = match rest.strip_prefix('T') {
        Some(rest) => (true, rest),
        None => (false, rest),
    };
    let (digits, unit) = rest.split_at(rest.len().checked_sub(1)?);
    let unit_secs = match (time, unit) {
        (false, "W") => 7 * 86_400,
        (false, "D") => 86_400,
        (true, "H") => 3_600,
        (true, "M") => 60,
        (true, "S") => 1,
        _ => return None,
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, unit_secs))
}
