//! Status: its field manager and its clock ([`now`]) for ApiKeys and KeyPolicies, and
//! the ApiKey status write, one place for every writer of this controller: the ApiKey
//! reconcile ([`super::apikey`]) and the expiry warnings' delivery records
//! ([`super::warnings`]).

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use kube::api::{Api, PostParams};

use super::context::Context;
use crate::api::{ApiKey, ApiKeyStatus};
use crate::error::{Error, Result};

/// Field manager of ApiKey and KeyPolicy status.
pub const STATUS_MANAGER: &str = "keyward/status";

/// The current time, to the millisecond (status timestamps stay readable).
pub fn now() -> DateTime<Utc> {
    let t = Utc::now();
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

/// Replace the status when it differs (resourceVersion precondition: a concurrent
/// writer, such as the verifier's `lastUsedAt`, makes this a conflict and a retry).
/// Returns the ApiKey as stored, when it was written.
pub(super) async fn write_status(
    ctx: &Context,
    api: &Api<ApiKey>,
    key: &ApiKey,
    old: &ApiKeyStatus,
    status: ApiKeyStatus,
) -> Result<Option<ApiKey>> {
    if *old == status {
        return Ok(None);
    }
    let mut updated = key.clone();
    updated.status = Some(status);
    let pp = PostParams { field_manager: Some(STATUS_MANAGER.into()), ..Default::default() };
    let stored = api.replace_status(&key.name_any(), &pp, &updated).await.map_err(|e| {
        if matches!(&e, kube::Error::Api(s) if s.code == 409) {
            ctx.own_writes.stale(key);
        }
        Error::kube(format!("writing ApiKey {} status", key.name_any()))(e)
    })?;
    ctx.own_writes.wrote(&stored);
    ctx.metrics.count_write("apikeys/status");
    Ok(Some(stored))
}
