//! The ApiKey controller: watches ApiKeys and the Secrets keyward owns
//! (label-filtered, so unrelated Secrets cost nothing), and reconciles each ApiKey.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};

use crate::api::{ApiKey, KeyPolicy, MANAGED_BY};
use crate::duration::IsoDuration;
use crate::error::{Error, Result};
use crate::health::{self, Readiness};
use crate::metrics::{FailureLabels, KindLabels, Metrics};

/// Name of this controller in Events and field managers.
pub const CONTROLLER_NAME: &str = "keyward";

/// Options of `keyward controller`.
#[derive(Clone, Debug)]
pub struct Options {
    /// Address of the health and metrics server.
    pub metrics_addr: String,
}

/// Shared state of every reconcile.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Event recorder (events.k8s.io).
    pub recorder: Recorder,
    /// Process metrics.
    pub metrics: Arc<Metrics>,
}

/// Fail with a one-line explanation when a CRD is missing, before anything starts.
/// Uses a one-item list of the kind (no CRD read permission needed).
pub async fn ensure_crds(client: &Client, server: &str) -> Result<()> {
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
    Api::<ApiKey>::all(client.clone()).list_metadata(&probe).await.map_err(missing("ApiKey", "apikeys"))?;
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

/// Run the controller until SIGTERM/SIGINT.
pub async fn run(client: Client, server: &str, opts: Options) -> Result<()> {
    ensure_crds(&client, server).await?;
    let metrics = Metrics::new();
    let ready = Readiness::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let server =
        health::serve(&opts.metrics_addr, health::router(metrics.clone(), ready.clone()), stopped()).await?;

    let reporter = Reporter {
        controller: CONTROLLER_NAME.into(),
        instance: std::env::var("POD_NAME").ok().or_else(|| std::env::var("HOSTNAME").ok()),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        metrics,
    });
    let secrets = Api::<Secret>::all(client.clone());
    let owned = watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    ready.set(true);
    tracing::info!("controller started");
    Controller::new(Api::<ApiKey>::all(client), watcher::Config::default())
        .owns(secrets, owned)
        .graceful_shutdown_on(shutdown_signal())
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(apikey = %obj, "reconciled"),
                Err(e) => tracing::debug!(error = %crate::error::chain(&e), "reconcile error"),
            }
        })
        .await;
    ready.set(false);
    let _ = stop_tx.send(true);
    let _ = server.await;
    tracing::info!("controller stopped");
    Ok(())
}

async fn reconcile(key: Arc<ApiKey>, ctx: Arc<Context>) -> Result<Action> {
    let labels = KindLabels { kind: "ApiKey" };
    ctx.metrics.reconciles.get_or_create(&labels).inc();
    let started = Instant::now();
    let result = validate_spec(&key);
    if let Err(e) = &result {
        ctx.metrics
            .reconcile_failures
            .get_or_create(&FailureLabels { kind: "ApiKey", reason: e.metric_label() })
            .inc();
        tracing::warn!(apikey = %key.name_any(), namespace = ?key.namespace(), error = %e, "invalid ApiKey spec");
        let event = Event {
            type_: EventType::Warning,
            reason: "InvalidSpec".into(),
            note: Some(e.to_string()),
            action: "Validate".into(),
            secondary: None,
        };
        if let Err(err) = ctx.recorder.publish(&event, &key.object_ref(&())).await {
            tracing::warn!(error = %err, "cannot publish event");
        }
    }
    ctx.metrics.reconcile_duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    Ok(Action::await_change())
}

/// Check the ApiKey's own fields (policy bounds are checked against the policy later).
pub fn validate_spec(key: &ApiKey) -> Result<()> {
    if key.spec.owner.trim().is_empty() {
        return Err(Error::InvalidSpec("spec.owner must not be empty".into()));
    }
    if let Some(lifetime) = &key.spec.lifetime {
        let d =
            IsoDuration::parse(lifetime).map_err(|e| Error::InvalidSpec(format!("spec.lifetime: {e}")))?;
        if d.is_zero() {
            return Err(Error::InvalidSpec("spec.lifetime must be longer than zero".into()));
        }
    }
    Ok(())
}

fn error_policy(_key: Arc<ApiKey>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failures
        .get_or_create(&FailureLabels { kind: "ApiKey", reason: err.metric_label() })
        .inc();
    tracing::warn!(error = %crate::error::chain(err), "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}
