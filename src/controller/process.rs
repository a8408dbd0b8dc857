//! The controller process around its reconciles: the health and metrics server, and the
//! leader's lease (waited for, renewed in a task of its own, released on the way out).

use std::sync::Arc;

use kube::Client;

use crate::error::Result;
use crate::leader::{Elector, LeaseConfig};
use crate::metrics::Metrics;
use crate::runtime::health::{self, Readiness};
use crate::runtime::shutdown_signal;

/// The health and metrics server, serving until [`HealthServer::stop`].
pub(super) struct HealthServer {
    stop_tx: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

impl HealthServer {
    /// Bind `addr` and serve `/healthz`, `/readyz` (`ready`) and `/metrics`.
    pub(super) async fn start(addr: &str, metrics: &Arc<Metrics>, ready: &Readiness) -> Result<Self> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let server = health::serve(addr, health::router(metrics.clone(), ready.clone()), stopped()).await?;
        Ok(HealthServer { stop_tx, server })
    }

    /// Stop serving, and return once the server has stopped.
    pub(super) async fn stop(self) {
        let _ = self.stop_tx.send(true);
        let _ = self.server.await;
    }
}

/// This process as the leader: the lease it holds (None: no leader election, it always
/// writes) and the task that renews it.
pub(super) struct Leader {
    elector: Option<Arc<Elector>>,
    holding: Option<tokio::task::JoinHandle<()>>,
}

impl Leader {
    /// Become the leader (at once without leader election), and the client to write
    /// through from now on. None: SIGTERM/SIGINT came first.
    pub(super) async fn elect(
        client: Client,
        lease: Option<LeaseConfig>,
        metrics: &Arc<Metrics>,
        ready: &Readiness,
    ) -> Option<(Client, Leader)> {
        let elector = lease.map(|cfg| Arc::new(Elector::new(client.clone(), cfg)));
        if let Some(e) = &elector {
            // A standby replica is healthy and ready; it just does not write.
            ready.set(true);
            tracing::info!("waiting to become the leader");
            tokio::select! {
                _ = e.acquire() => tracing::info!("became the leader"),
                _ = shutdown_signal() => return None,
            }
        }
        metrics.leader.set(1);
        // From here on the controller writes through a client that refuses writes once the
        // lease's renew deadline has passed, whatever the renewal task is doing.
        let client = match &elector {
            Some(e) => e.gated_client(client),
            None => client,
        };
        // Renew in a task of its own. On loss, exit at once: in-flight reconciles are not
        // drained (they could write beside the next leader).
        let holding = elector.clone().map(|e| {
            let (metrics, ready) = (metrics.clone(), ready.clone());
            tokio::spawn(async move {
                e.hold().await;
                metrics.leader.set(0);
                ready.set(false);
                tracing::error!(
                    "lost the leader lease; exiting at once so a restart can rejoin the election"
                );
                eprintln!(
                    "keyward: lost the leader lease; exiting at once so a restart can rejoin the election"
                );
                std::process::exit(1);
            })
        });
        Some((client, Leader { elector, holding }))
    }

    /// Stop renewing, no longer ready, and release the lease (the next leader need not
    /// wait for it to expire).
    pub(super) async fn step_down(self, metrics: &Metrics, ready: &Readiness) {
        if let Some(h) = self.holding {
            h.abort();
            let _ = h.await;
        }
        metrics.leader.set(0);
        ready.set(false);
        if let Some(e) = &self.elector {
            e.release().await;
        }
    }
}
