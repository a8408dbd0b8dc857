//! Last use per key, kept in memory and written to `status.keys[].lastUsedAt` at most
//! once per interval per ApiKey, batched (both slots in one JSON patch), with a `test`
//! on the key ID so a regenerated slot never inherits the old key's last use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

use super::{Entry, VERIFIER_MANAGER, VerifierMetrics};
use crate::api::ApiKey;

type Id = (String, String);

/// Pending last uses and the time of each ApiKey's last write.
pub struct Usage {
    client: Client,
    interval: Duration,
    vm: Arc<VerifierMetrics>,
    pending: Mutex<HashMap<Id, HashMap<String, DateTime<Utc>>>>,
    written: Mutex<HashMap<Id, Instant>>,
}

impl Usage {
    /// Write at most once per `interval` per ApiKey.
    pub fn new(client: Client, interval: Duration, vm: Arc<VerifierMetrics>) -> Self {
        Usage { client, interval, vm, pending: Mutex::default(), written: Mutex::default() }
    }

    /// Remember that `entry`'s key was used at `now` (memory only).
    pub fn record(&self, entry: &Entry, now: DateTime<Utc>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending
            .entry((entry.namespace.clone(), entry.name.clone()))
            .or_default()
            .insert(entry.key_id.clone(), now);
    }

    /// Flush what is due, every 200 ms, forever.
    pub async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.flush(false).await;
        }
    }

    /// Write everything pending, due or not (on shutdown).
    pub async fn flush_all(&self) {
        self.flush(true).await;
    }

    async fn flush(&self, all: bool) {
        let due: Vec<(Id, HashMap<String, DateTime<Utc>>)> = {
            let written = self.written.lock().unwrap_or_else(|p| p.into_inner());
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let ids: Vec<Id> = pending
                .keys()
                .filter(|id| all || written.get(*id).is_none_or(|t| t.elapsed() >= self.interval))
                .cloned()
                .collect();
            ids.into_iter().filter_map(|id| pending.remove(&id).map(|p| (id, p))).collect()
        };
        for (id, uses) in due {
            match self.write(&id, &uses).await {
                Ok(true) => {
                    self.written.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Instant::now());
                    self.vm.usage_writes.inc();
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(namespace = %id.0, apikey = %id.1, error = %e, "cannot record last use; will retry");
                    let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                    let slot = pending.entry(id).or_default();
                    for (k, t) in uses {
                        let e = slot.entry(k).or_insert(t);
                        *e = (*e).max(t);
                    }
                }
            }
        }
    }

    /// One JSON patch for an ApiKey: for each used key still in status, `test` its ID
    /// and set `lastUsedAt` when later than what is there. Ok(false): nothing to write.
    async fn write(&self, id: &Id, uses: &HashMap<String, DateTime<Utc>>) -> Result<bool, kube::Error> {
        let api: Api<ApiKey> = Api::namespaced(self.client.clone(), &id.0);
        let Some(key) = api.get_opt(&id.1).await? else { return Ok(false) };
        let Some(status) = key.status else { return Ok(false) };
        let mut ops = Vec::new();
        for (i, k) in status.keys.iter().enumerate() {
            let Some(used) = uses.get(&k.key_id) else { continue };
            if k.last_used_at.is_some_and(|t| t >= *used) {
                continue;
            }
            ops.push(serde_json::json!({"op": "test", "path": format!("/status/keys/{i}/keyId"), "value": k.key_id}));
            ops.push(serde_json::json!({
                "op": "add", "path": format!("/status/keys/{i}/lastUsedAt"),
                "value": used.to_rfc3339_opts(SecondsFormat::Millis, true)
            }));
        }
        if ops.is_empty() {
            return Ok(false);
        }
        let patch: json_patch::Patch =
            serde_json::from_value(serde_json::Value::Array(ops)).expect("valid JSON patch");
        let pp = PatchParams { field_manager: Some(VERIFIER_MANAGER.into()), ..Default::default() };
        match api.patch_status(&id.1, &pp, &Patch::<()>::Json(patch)).await {
            Ok(_) => Ok(true),
            // The key was regenerated meanwhile: its old last use no longer matters.
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
