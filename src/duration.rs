//! ISO 8601 durations (`P90D`, `PT10M`, `P1Y2M`, `P2W`) and the lowercase vendor form
//! (`p3m`, `p6m`, `p1y`), with calendar months and years added to an instant.
//!
//! Parsing uses the `iso8601` crate's grammar; this module adds what keyward needs on
//! top: the whole input must be consumed, an empty time part (`PT`) is refused, and
//! adding to an instant is checked (no panic on overflow).

use std::fmt;

use chrono::{DateTime, Months, TimeDelta, Utc};

/// Longest accepted input; anything longer is not a duration a human wrote.
const MAX_LEN: usize = 64;

/// A parsed duration: calendar months (years × 12 + months), days (weeks × 7 + days)
/// and an exact remainder in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IsoDuration {
    months: u64,
    days: u64,
    millis: u64,
}

/// Why a duration was refused. The message names the input and the expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// The text is not an ISO 8601 duration.
    #[error("{input:?} is not an ISO 8601 duration (expected e.g. P90D, PT10M, P1Y2M or p3m)")]
    Malformed {
        /// What was given (truncated).
        input: String,
    },
    /// A negative duration was given.
    #[error("{input:?} is negative; durations must be positive")]
    Negative {
        /// What was given (truncated).
        input: String,
    },
    /// The duration or the resulting instant does not fit.
    #[error("{input:?} is too large")]
    Overflow {
        /// What was given (truncated).
        input: String,
    },
}

fn shown(input: &str) -> String {
    input.chars().take(MAX_LEN).collect()
}

impl IsoDuration {
    /// Parse `P…` (any case). Zero (`PT0S`) parses; callers decide whether zero is allowed.
    pub fn parse(input: &str) -> Result<Self, DurationError> {
        let text = input.trim();
        let malformed = || DurationError::Malformed { input: shown(input) };
        if text.starts_with('-') {
            return Err(DurationError::Negative { input: shown(input) });
        }
        if text.is_empty() || text.len() > MAX_LEN || !text.is_ascii() {
            return Err(malformed());
        }
        let upper = text.to_ascii_uppercase();
        // "PT" with nothing after it is accepted by the grammar as zero; it is a typo.
        if upper.ends_with('T') {
            return Err(malformed());
        }
        let (rest, parsed) = iso8601::parsers::parse_duration(upper.as_bytes()).map_err(|_| {
            if upper.contains('-') && !upper.contains('T') {
                DurationError::Negative { input: shown(input) }
            } else {
                malformed()
            }
        })?;
        if !rest.is_empty() {
            return Err(malformed());
        }
        let overflow = || DurationError::Overflow { input: shown(input) };
        let d = match parsed {
            iso8601::Duration::Weeks(w) => IsoDuration { months: 0, days: u64::from(w) * 7, millis: 0 },
            iso8601::Duration::YMDHMS { year, month, day, hour, minute, second, millisecond } => {
                let millis = (u64::from(hour) * 3600 + u64::from(minute) * 60 + u64::from(second))
                    .checked_mul(1000)
                    .and_then(|ms| ms.checked_add(u64::from(millisecond)))
                    .ok_or_else(overflow)?;
                IsoDuration { months: u64::from(year) * 12 + u64::from(month), days: u64::from(day), millis }
            }
        };
        // Refuse anything that cannot be added to an instant at all (> ~260k years).
        d.add_to(DateTime::<Utc>::UNIX_EPOCH).map_err(|_| overflow())?;
        Ok(d)
    }

    /// A duration of whole seconds (for tests and computed values).
    pub fn from_secs(secs: u64) -> Self {
        IsoDuration { months: 0, days: 0, millis: secs.saturating_mul(1000) }
    }

    /// True for `PT0S`, `P0D` and the like.
    pub fn is_zero(&self) -> bool {
        self.months == 0 && self.days == 0 && self.millis == 0
    }

    /// `start + self`, with calendar months (chrono: the day is clamped to the end of a
    /// shorter month, e.g. Jan 31 + P1M = Feb 28/29).
    pub fn add_to(&self, start: DateTime<Utc>) -> Result<DateTime<Utc>, DurationError> {
        let overflow = || DurationError::Overflow { input: self.to_string() };
        let months = u32::try_from(self.months).map_err(|_| overflow())?;
        let days = i64::try_from(self.days).map_err(|_| overflow())?;
        let millis = i64::try_from(self.millis).map_err(|_| overflow())?;
        start
            .checked_add_months(Months::new(months))
            .and_then(|t| t.checked_add_signed(TimeDelta::try_days(days)?))
            .and_then(|t| t.checked_add_signed(TimeDelta::try_milliseconds(millis)?))
            .ok_or_else(overflow)
    }

    /// `end - self`, with calendar months: the instant from which this duration reaches `end`.
    pub fn sub_from(&self, end: DateTime<Utc>) -> Result<DateTime<Utc>, DurationError> {
        let overflow = || DurationError::Overflow { input: self.to_string() };
        let months = u32::try_from(self.months).map_err(|_| overflow())?;
        let days = i64::try_from(self.days).map_err(|_| overflow())?;
        let millis = i64::try_from(self.millis).map_err(|_| overflow())?;
        end.checked_sub_months(Months::new(months))
            .and_then(|t| t.checked_sub_signed(TimeDelta::try_days(days)?))
            .and_then(|t| t.checked_sub_signed(TimeDelta::try_milliseconds(millis)?))
            .ok_or_else(overflow)
    }

    /// The exact length of this duration when it starts at `start`.
    pub fn length_from(&self, start: DateTime<Utc>) -> Result<TimeDelta, DurationError> {
        Ok(self.add_to(start)? - start)
    }
}

impl std::str::FromStr for IsoDuration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        IsoDuration::parse(s)
    }
}

/// Canonical ISO 8601 form: `P1Y2M3DT4H5M6.789S`, `PT0S` for zero.
impl fmt::Display for IsoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_zero() {
            return f.write_str("PT0S");
        }
        f.write_str("P")?;
        let (years, months) = (self.months / 12, self.months % 12);
        if years > 0 {
            write!(f, "{years}Y")?;
        }
        if months > 0 {
            write!(f, "{months}M")?;
        }
        if self.days > 0 {
            write!(f, "{}D", self.days)?;
        }
        if self.millis > 0 {
            let secs = self.millis / 1000;
            let (h, m, s, ms) = (secs / 3600, secs / 60 % 60, secs % 60, self.millis % 1000);
            f.write_str("T")?;
            if h > 0 {
                write!(f, "{h}H")?;
            }
            if m > 0 {
                write!(f, "{m}M")?;
            }
            match (s, ms) {
                (0, 0) => {}
                (s, 0) => write!(f, "{s}S")?,
                (s, ms) => write!(f, "{s}.{ms:03}S")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, mo: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, 0, 0, 0).unwrap()
    }

    #[test]
    fn parses_iso_forms() {
        let cases = [
            ("P90D", (0, 90, 0)),
            ("PT10M", (0, 0, 600_000)),
            ("P1Y2M", (14, 0, 0)),
            ("P2W", (0, 14, 0)),
            ("PT30S", (0, 0, 30_000)),
            ("PT1.5S", (0, 0, 1_500)),
            ("P1DT12H", (0, 1, 43_200_000)),
            ("PT0S", (0, 0, 0)),
            (" P7D ", (0, 7, 0)),
        ];
        for (text, (months, days, millis)) in cases {
            assert_eq!(IsoDuration::parse(text), Ok(IsoDuration { months, days, millis }), "{text}");
        }
    }

    #[test]
    fn parses_lowercase_vendor_form() {
        assert_eq!(IsoDuration::parse("p3m").unwrap(), IsoDuration::parse("P3M").unwrap());
        assert_eq!(IsoDuration::parse("p6m").unwrap().months, 6);
        assert_eq!(IsoDuration::parse("p1y").unwrap().months, 12);
        assert_eq!(IsoDuration::parse("pt10m").unwrap().millis, 600_000);
    }

    #[test]
    fn refuses_bad_inputs_without_panicking() {
        for bad in [
            "",
            " ",
            "P",
            "PT",
            "p",
            "banana",
            "90D",
            "P90",
            "PT10",
            "P1.5D",
            "P3Mbanana",
            "P1D2H",
            "P1H",
            "PP1D",
            "P-1D",
            "P1DT",
            "ΡT1S",
            "P1D\u{0}",
            "PT1M1H",
        ] {
            assert!(
                matches!(
                    IsoDuration::parse(bad),
                    Err(DurationError::Malformed { .. } | DurationError::Negative { .. })
                ),
                "{bad:?} should be refused, got {:?}",
                IsoDuration::parse(bad)
            );
        }
        assert!(matches!(IsoDuration::parse("-P1D"), Err(DurationError::Negative { .. })));
        assert!(matches!(IsoDuration::parse("P-1D"), Err(DurationError::Negative { .. })));
    }

    #[test]
    fn refuses_overflow() {
        for huge in ["P99999999999999999999Y", "P4294967295Y", "PT4294967295H", "P4294967295W"] {
            let err = IsoDuration::parse(huge).unwrap_err();
            assert!(
                matches!(err, DurationError::Overflow { .. } | DurationError::Malformed { .. }),
                "{huge}: {err:?}"
            );
        }
        let long = format!("P{}D", "1".repeat(200));
        assert!(IsoDuration::parse(&long).is_err());
        // Large but representable: fine to parse, and adding near the end of time overflows cleanly.
        let d = IsoDuration::parse("P1000Y").unwrap();
        assert!(d.add_to(DateTime::<Utc>::MAX_UTC).is_err());
    }

    #[test]
    fn error_messages_name_the_input_and_the_form() {
        let msg = IsoDuration::parse("banana").unwrap_err().to_string();
        assert!(msg.contains("\"banana\"") && msg.contains("P90D"), "{msg}");
    }

    #[test]
    fn calendar_months_from_start() {
        let p1m = IsoDuration::parse("P1M").unwrap();
        assert_eq!(p1m.add_to(at(2026, 1, 31)).unwrap(), at(2026, 2, 28));
        assert_eq!(p1m.add_to(at(2028, 1, 31)).unwrap(), at(2028, 2, 29));
        assert_eq!(p1m.add_to(at(2026, 3, 15)).unwrap(), at(2026, 4, 15));
        let p1y2m = IsoDuration::parse("P1Y2M").unwrap();
        assert_eq!(p1y2m.add_to(at(2026, 11, 23)).unwrap(), at(2028, 1, 23));
        let p3m = IsoDuration::parse("p3m").unwrap();
        assert_eq!(p3m.length_from(at(2026, 1, 1)).unwrap(), TimeDelta::days(90));
        assert_eq!(p3m.length_from(at(2026, 7, 1)).unwrap(), TimeDelta::days(92));
        assert_eq!(p3m.sub_from(at(2026, 4, 1)).unwrap(), at(2026, 1, 1));
        let mixed = IsoDuration::parse("P1MT1H").unwrap();
        assert_eq!(mixed.add_to(at(2026, 1, 1)).unwrap(), at(2026, 2, 1) + TimeDelta::hours(1));
    }

    #[test]
    fn display_is_canonical() {
        for (input, shown) in [
            ("P90D", "P90D"),
            ("p1y2m", "P1Y2M"),
            ("PT90M", "PT1H30M"),
            ("PT0S", "PT0S"),
            ("P2W", "P14D"),
            ("PT1.05S", "PT1.050S"),
        ] {
            assert_eq!(IsoDuration::parse(input).unwrap().to_string(), shown);
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_string(s in ".{0,80}") {
            let _ = IsoDuration::parse(&s);
        }

        #[test]
        fn display_round_trips(months in 0u64..2400, days in 0u64..10_000, secs in 0u64..10_000_000) {
            let d = IsoDuration { months, days, millis: secs * 1000 };
            proptest::prop_assert_eq!(IsoDuration::parse(&d.to_string()).unwrap(), d);
        }

        #[test]
        fn add_then_sub_is_identity_without_months(days in 0u64..10_000, secs in 0u64..10_000_000, start in 0i64..4_000_000_000) {
            let d = IsoDuration { months: 0, days, millis: secs * 1000 };
            let t = DateTime::<Utc>::from_timestamp(start, 0).unwrap();
            proptest::prop_assert_eq!(d.sub_from(d.add_to(t).unwrap()).unwrap(), t);
        }
    }
}
