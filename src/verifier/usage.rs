//! Last use per key, kept in memory and written to `status.keys[].lastUsedAt` at most
//! once per interval per key across all verifier replicas.
//!
//! Every replica sees the stored `lastUsedAt` through its index (the ApiKey watch) and
//! writes a key's latest use only once the stored one is at least an interval old, so a
//! second replica never repeats what the first one wrote, and a use newer than the
//! stored one is kept until it can be written (never lost). Each write is one
//! JSON patch per ApiKey (both slots at once) with a `test` on the `resourceVersion` its
//! decision was made from: when another replica (or the controller) wrote meanwhile,
//! the patch fails, and the decision is made again from the newer state. Errors back
//! off per ApiKey (1 s doubling to the interval); every map holds only ApiKeys with
//! something to write or written within the last interval.
//!
//! Two exceptions keep the handover state (which reads these writes) honest: the first
//! use of a key, or its first use after two intervals without one, is written at once,
//! even when this replica wrote the ApiKey's other key less than an interval ago
//! (callers starting on a new key, or coming back to a quiet one, are news: the latter
//! cancels an early retirement); and on shutdown every pending use is written, interval or not, so a restart
//! never makes a key look unused (only a crash loses the last interval's uses).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

use super::{Entry, Index, VERIFIER_MANAGER, VerifierMetrics};
use crate::api::ApiKey;

type Id = (String, String);

/// How often pending uses are looked at.
const TICK: Duration = Duration::from_millis(200);
/// First delay after a failed write; doubles up to the interval.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// A key's use that may need writing, and what to do with it now.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Write this use: never written, or the stored value is an interval old.
    Write,
    /// Keep it: newer than the stored value, which is less than an interval old (another
    /// replica wrote it, or this one); written once the interval has passed.
    Later,
    /// The stored value is as new or newer: forget this use.
    Drop,
}

/// Whether a use at `used` should be written at `now` over the stored `stored`: at most
/// once per `interval` (counted from the stored value), and never losing the latest use.
pub fn decide(
    used: DateTime<Utc>,
    stored: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    interval: Duration,
) -> Decision {
    let interval = TimeDelta::from_std(interval).unwrap_or(TimeDelta::MAX);
    match stored {
        Some(t) if used <= t => Decision::Drop,
        Some(t) if now - t < interval => Decision::Later,
        _ => Decision::Write,
    }
}

#[derive(Default)]
struct State {
    /// Latest use per key ID, per ApiKey.
    pending: HashMap<Id, HashMap<String, DateTime<Utc>>>,
    /// When this replica last wrote each ApiKey, and the keys that write recorded a use
    /// of (kept for one interval).
    written: HashMap<Id, (Instant, Vec<String>)>,
    /// After a failed write: not before, and the delay that led there.
    retry: HashMap<Id, (Instant, Duration)>,
}

/// One ApiKey's write: its JSON patch operations (the first tests the resourceVersion
/// they were computed from) and the uses they write.
struct Planned {
    id: Id,
    ops: Vec<serde_json::Value>,
    uses: HashMap<String, DateTime<Utc>>,
}

/// Pending last uses and this replica's writes.
pub struct Usage {
    client: Client,
    interval: Duration,
    vm: Arc<VerifierMetrics>,
    index: Arc<RwLock<Index>>,
    state: Mutex<State>,
}

impl Usage {
    /// Write a key's last use at most once per `interval`.
    pub fn new(
        client: Client,
        interval: Duration,
        vm: Arc<VerifierMetrics>,
        index: Arc<RwLock<Index>>,
    ) -> Self {
        Usage { client, interval, vm, index, state: Mutex::default() }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remember that `entry`'s key was used at `now` (memory only).
    pub fn record(&self, entry: &Entry, now: DateTime<Utc>) {
        if entry.last_used_at.is_some_and(|t| now <= t) {
            return;
        }
        let id = (entry.apikey.namespace.to_string(), entry.apikey.name.to_string());
        let mut state = self.state();
        let used = state.pending.entry(id).or_default().entry(entry.key_id.to_string()).or_insert(now);
        *used = (*used).max(now);
    }

    /// Look at pending uses every 200 ms, forever.
    pub async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(TICK).await;
            self.flush(false).await;
        }
    }

    /// Write everything that is due, ignoring backoff and this replica's own last write
    /// (on shutdown).
    pub async fn flush_all(&self) {
        self.flush(true).await;
    }

    /// Decide, from the index, what to write for each due ApiKey; drop what needs no write.
    fn plan(&self, all: bool) -> Vec<Planned> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        let mut state = self.state();
        let now = Instant::now();
        let wall = Utc::now();
        let interval = self.interval;
        state.written.retain(|_, (t, _)| t.elapsed() < interval);
        state.retry.retain(|id, _| index.contains(&id.0, &id.1));
        let State { pending, written, retry } = &mut *state;
        let mut planned = Vec::new();
        pending.retain(|id, uses| {
            let keys = index.keys_of(&id.0, &id.1);
            // News about a key: its first use, or a use after it was quiet (no use recorded
            // for two intervals), that this replica has not just written.
            let quiet = TimeDelta::from_std(interval * 2).unwrap_or(TimeDelta::MAX);
            let first_use = |key_id: &String| {
                keys.iter().any(|e| *e.key_id == **key_id && e.last_used_at.is_none_or(|t| wall - t > quiet))
                    && written.get(id).is_none_or(|(_, ids)| !ids.contains(key_id))
            };
            let backing_off = retry.get(id).is_some_and(|(at, _)| now < *at);
            if !all && (backing_off || (written.contains_key(id) && !uses.keys().any(first_use))) {
                return true;
            }
            let Some(version) =
                keys.first().and_then(|e| e.apikey.resource_version.as_deref().map(str::to_string))
            else {
                return false;
            };
            let mut ops = vec![
                serde_json::json!({"op": "test", "path": "/metadata/resourceVersion", "value": version}),
            ];
            let mut later = HashMap::new();
            uses.retain(|key_id, used| {
                let Some(e) = keys.iter().find(|e| *e.key_id == **key_id) else { return false };
                match decide(*used, e.last_used_at, wall, interval) {
                    Decision::Drop => return false,
                    // Shutting down: the newest use is written now or lost.
                    Decision::Later if all => {}
                    Decision::Later => {
                        later.insert(key_id.clone(), *used);
                        return false;
                    }
                    Decision::Write => {}
                }
                ops.push(serde_json::json!({
                    "op": "add", "path": format!("/status/keys/{}/lastUsedAt", e.position),
                    "value": used.to_rfc3339_opts(SecondsFormat::Millis, true)
                }));
                true
            });
            if ops.len() > 1 {
                planned.push(Planned { id: id.clone(), ops, uses: std::mem::take(uses) });
            }
            // Uses that must wait for the interval stay pending.
            *uses = later;
            !uses.is_empty()
        });
        planned
    }

    async fn flush(&self, all: bool) {
        for Planned { id, ops, uses } in self.plan(all) {
            match self.write(&id, ops).await {
                Ok(true) => {
                    let mut state = self.state();
                    state.written.insert(id.clone(), (Instant::now(), uses.into_keys().collect()));
                    state.retry.remove(&id);
                    self.vm.usage_writes.inc();
                }
                Ok(false) => {}
                Err(conflict) => {
                    // Put the uses back: they are decided again from the index's next view.
                    let mut state = self.state();
                    let delay = if conflict {
                        TICK
                    } else {
                        let last = state.retry.get(&id).map_or(FIRST_BACKOFF / 2, |r| r.1);
                        (last * 2).min(self.interval).max(FIRST_BACKOFF)
                    };
                    state.retry.insert(id.clone(), (Instant::now() + delay, delay));
                    let slot = state.pending.entry(id).or_default();
                    for (k, t) in uses {
                        let e = slot.entry(k).or_insert(t);
                        *e = (*e).max(t);
                    }
                }
            }
        }
    }

    /// Apply one ApiKey's patch. Ok(true): written; Ok(false): the ApiKey is gone;
    /// Err(true): it changed since the index saw it; Err(false): any other failure.
    async fn write(&self, id: &Id, ops: Vec<serde_json::Value>) -> Result<bool, bool> {
        let api: Api<ApiKey> = Api::namespaced(self.client.clone(), &id.0);
        let patch: json_patch::Patch =
            serde_json::from_value(serde_json::Value::Array(ops)).expect("valid JSON patch");
        let pp = PatchParams { field_manager: Some(VERIFIER_MANAGER.into()), ..Default::default() };
        match api.patch_status(&id.1, &pp, &Patch::<()>::Json(patch)).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 409 => Err(true),
            Err(e) => {
                tracing::warn!(namespace = %id.0, apikey = %id.1, error = %e, "cannot record last use; will retry");
                self.vm.usage_write_failures.inc();
                Err(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_use_is_written_at_most_once_an_interval_and_never_lost() {
        let t = Utc::now();
        let minute = Duration::from_secs(60);
        let ago = |s| t - TimeDelta::seconds(s);
        assert_eq!(decide(t, None, t, minute), Decision::Write, "never written");
        assert_eq!(decide(t, Some(ago(59)), t, minute), Decision::Later, "another replica wrote 59 s ago");
        assert_eq!(
            decide(ago(30), Some(ago(61)), t, minute),
            Decision::Write,
            "the stored value is a minute old"
        );
        assert_eq!(decide(t, Some(t + TimeDelta::seconds(1)), t, minute), Decision::Drop, "stored is newer");
        assert_eq!(decide(t, Some(t), t, minute), Decision::Drop);
    }
}
