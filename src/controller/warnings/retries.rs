//! How the deliveries of expiry warnings are retried: failed attempts per delivery
//! (kept in memory), backing off from 1 s to 30 s.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(30);

/// Per delivery: failed attempts so far, and when the next one is due.
type Attempts = HashMap<String, (u32, DateTime<Utc>)>;

/// Failed attempts per pending delivery (by ApiKey, then delivery), and when the next
/// one is due.
#[derive(Default)]
pub struct Retries(Mutex<HashMap<String, Attempts>>);

impl Retries {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Attempts>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When the next attempt of `delivery` is due, if it is still waiting at `now`.
    pub(super) fn waiting(&self, object: &str, delivery: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.lock().get(object)?.get(delivery).map(|r| r.1).filter(|at| *at > now)
    }

    /// One more failed attempt: (attempts so far, when to try again).
    pub(super) fn failed(&self, object: &str, delivery: &str, now: DateTime<Utc>) -> (u32, DateTime<Utc>) {
        let mut all = self.lock();
        let entry =
            all.entry(object.to_string()).or_default().entry(delivery.to_string()).or_insert((0, now));
        entry.0 += 1;
        let wait = (FIRST_RETRY * 2u32.saturating_pow(entry.0.saturating_sub(1).min(6))).min(LAST_RETRY);
        entry.1 = now + TimeDelta::from_std(wait).unwrap_or(TimeDelta::seconds(30));
        *entry
    }

    /// `delivery` ended: the failed attempts it took.
    pub(super) fn done(&self, object: &str, delivery: &str) -> u32 {
        let mut all = self.lock();
        let Some(of) = all.get_mut(object) else { return 0 };
        let failed = of.remove(delivery).map_or(0, |r| r.0);
        if of.is_empty() {
            all.remove(object);
        }
        failed
    }

    /// The ApiKey `object` is gone.
    pub fn forget(&self, object: &str) {
        self.lock().remove(object);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_thirty_seconds_and_end_when_done() {
        let r = Retries::default();
        let t0 = DateTime::<Utc>::UNIX_EPOCH;
        let waits: Vec<i64> = (0..8).map(|_| (r.failed("o", "d", t0).1 - t0).num_seconds()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(r.waiting("o", "d", t0), Some(t0 + TimeDelta::seconds(30)));
        assert_eq!(r.waiting("o", "d", t0 + TimeDelta::seconds(30)), None, "due");
        assert_eq!(r.done("o", "d"), 8);
        assert_eq!(r.waiting("o", "d", t0), None);
        assert!(r.lock().is_empty(), "nothing kept for an ended delivery");
    }
}
