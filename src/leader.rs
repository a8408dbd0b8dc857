//! Leader election on a `coordination.k8s.io/v1` Lease: one writer among the
//! controller's replicas. A replica takes the Lease when it is free or its holder has
//! not renewed it within `leaseDurationSeconds`, renews it every third of that, and
//! releases it on a clean shutdown so a successor takes over at once. Every write
//! carries the Lease's resourceVersion, so two candidates never both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::error::{Error, Result};

/// Field manager of the Lease writes.
pub const LEASE_MANAGER: &str = "keyward/leader";

/// Which Lease, held by whom, for how long.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity (unique per process).
    pub identity: String,
    /// How long a holder's claim lasts without renewal.
    pub duration: Duration,
}

/// A candidate for the Lease.
pub struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

impl Elector {
    /// A candidate for `cfg`.
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Elector { api: Api::namespaced(client, &cfg.namespace), cfg }
    }

    /// Time between renewals (a third of the lease duration).
    pub fn renew_every(&self) -> Duration {
        self.cfg.duration / 3
    }

    fn spec(&self, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(self.cfg.duration.as_secs().max(1) as i32),
            acquire_time: acquired.or_else(|| Some(now())),
            renew_time: Some(now()),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Take or renew the Lease once. Ok(true): this replica leads now.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let pp = PostParams { field_manager: Some(LEASE_MANAGER.into()), ..Default::default() };
        let what = || format!("Lease {}/{}", self.cfg.namespace, self.cfg.name);
        let Some(lease) =
            self.api.get_opt(&self.cfg.name).await.map_err(Error::kube(format!("reading {}", what())))?
        else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.cfg.name.clone()), ..Default::default() },
                spec: Some(self.spec(None, 0)),
            };
            return match self.api.create(&pp, &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(Error::kube(format!("creating {}", what()))(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.cfg.identity;
        let expired = holder.is_empty()
            || spec.renew_time.as_ref().is_none_or(|t| {
                let secs = i64::from(spec.lease_duration_seconds.unwrap_or(15));
                t.0.as_second() + secs < Timestamp::now().as_second()
            });
        if !mine && !expired {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine { spec.acquire_time.clone() } else { None };
        let mut next = lease.clone();
        next.spec = Some(self.spec(acquired, transitions));
        match self.api.replace(&self.cfg.name, &pp, &next).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(Error::kube(format!("updating {}", what()))(e)),
        }
    }

    /// Wait until this replica leads.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %crate::error::chain(&e), "leader election"),
            }
            tokio::time::sleep(self.renew_every()).await;
        }
    }

    /// Renew until a renewal has not succeeded for a whole lease duration; then return
    /// (leadership is lost and the caller must stop writing).
    pub async fn hold(&self) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.renew_every()).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!(lease = %self.cfg.name, "another replica took the lease");
                    return;
                }
                Err(e) => tracing::warn!(error = %crate::error::chain(&e), "cannot renew the lease"),
            }
            // Stop a little before the lease runs out, so two replicas never write at once.
            if last_ok.elapsed() + self.renew_every() >= self.cfg.duration {
                tracing::error!(lease = %self.cfg.name, "lease not renewed in time");
                return;
            }
        }
    }

    /// Give the Lease up (clean hand-over on shutdown).
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await else { return };
        let Some(spec) = lease.spec.as_mut() else { return };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        let pp = PostParams { field_manager: Some(LEASE_MANAGER.into()), ..Default::default() };
        match self.api.replace(&self.cfg.name, &pp, &lease).await {
            Ok(_) => tracing::info!(lease = %self.cfg.name, "lease released"),
            Err(e) => tracing::warn!(error = %e, "cannot release the lease"),
        }
    }
}
