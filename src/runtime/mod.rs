//! What every keyward process stands on, below both the controller and the verifier
//! (neither imports the other): the check that the CRDs are installed, the shutdown
//! signal, and the health server.

pub mod health;

use kube::api::ListParams;
use kube::{Api, Client, Resource};

use crate::api::{ApiKey, KeyPolicy};
use crate::error::{Error, Result};

/// `K` in `namespace`, or in all namespaces.
pub fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Fail with a one-line explanation when a CRD is missing, before anything starts.
/// Uses a one-item list of the kind (no CRD read permission needed).
pub async fn ensure_crds(client: &Client, server: &str) -> Result<()> {
    ensure_crds_in(client, server, None).await
}

/// [`ensure_crds`], probing ApiKeys in `namespace` only (for namespace-scoped RBAC).
pub async fn ensure_crds_in(client: &Client, server: &str, namespace: Option<&str>) -> Result<()> {
    let probe = ListParams::default().limit(1);
    let missing = |kind, plural| {
        move |e: kube::Error| match &e {
            kube::Error::Api(s) if s.code == 404 => {
                Error::CrdMissing { kind, plural, server: server.to_string() }
            }
            _ => Error::kube(format!("listing {plural}.keyward.dev"))(e),
        }
    };
    Api::<KeyPolicy>::all(client.clone())
        .list_metadata(&probe)
        .await
        .map_err(missing("KeyPolicy", "keypolicies"))?;
    scoped::<ApiKey>(client, namespace).list_metadata(&probe).await.map_err(missing("ApiKey", "apikeys"))?;
    Ok(())
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
}
