//! Command line: one binary, also installed as `kubectl-keyward`. Every flag also
//! reads an environment variable (`KEYWARD_…`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kube::Client;
use kube::config::{Config, KubeConfigOptions, Kubeconfig};

use crate::error::{Error, Result};

/// keyward: the whole life of API keys on Kubernetes.
#[derive(Parser, Debug)]
#[command(name = "keyward", version, about, propagate_version = true)]
pub struct Cli {
    /// Kubeconfig file (default: in-cluster, then $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true, env = "KEYWARD_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use.
    #[arg(long, global = true, env = "KEYWARD_CONTEXT")]
    pub context: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controller: issue, stagger, flip, regenerate and expire keys.
    Controller {
        /// Address for /metrics, /healthz and /readyz.
        #[arg(long, env = "KEYWARD_METRICS_ADDR", default_value = "0.0.0.0:8080")]
        metrics_addr: String,
        /// Manage ApiKeys in this namespace only (default: all namespaces). KeyPolicy
        /// status is then left to a cluster-wide instance.
        #[arg(long, env = "KEYWARD_NAMESPACE")]
        namespace: Option<String>,
        /// Elect one writer among replicas with a coordination.k8s.io Lease.
        #[arg(long, env = "KEYWARD_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
        leader_elect: bool,
        /// Lease name (default: keyward-controller, or keyward-controller-<namespace>).
        #[arg(long, env = "KEYWARD_LEASE_NAME")]
        lease_name: Option<String>,
        /// Lease namespace (default: $POD_NAMESPACE, else --namespace, else default).
        #[arg(long, env = "KEYWARD_LEASE_NAMESPACE")]
        lease_namespace: Option<String>,
        /// How long a leader's claim lasts without renewal (ISO 8601).
        #[arg(long, env = "KEYWARD_LEASE_DURATION", default_value = "PT15S", value_parser = parse_interval)]
        lease_duration: std::time::Duration,
        /// ApiKeys reconciled at once (each holds at most one API request in flight).
        #[arg(long, env = "KEYWARD_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
        concurrency: u16,
        /// The verifiers' `--usage-flush-interval` (ISO 8601): a key whose last recorded
        /// use is older than twice this counts as quiet in the handover state.
        #[arg(long, env = "KEYWARD_USAGE_FLUSH_INTERVAL", default_value = "PT1M", value_parser = parse_interval)]
        usage_flush_interval: std::time::Duration,
        /// Watch pods (needs get/list/watch on pods) and warn, on each ApiKey, about pods
        /// that read its Secret in a way no rotation reaches: a subPath mount, or env
        /// vars in a workload not listed in spec.consumers.
        #[arg(long, env = "KEYWARD_WATCH_CONSUMERS")]
        watch_consumers: bool,
        /// Reconcile only the ApiKeys this label selector matches (a shard, e.g.
        /// keyward.dev/shard=a; the rest: "keyward.dev/shard notin (a,b)"). Every ApiKey
        /// in scope is still watched, for owner limits. Empty: all.
        #[arg(long, env = "KEYWARD_WATCH_LABEL_SELECTOR")]
        watch_label_selector: Option<String>,
        /// Write KeyPolicy status (keyCount, the single default); one controller in a
        /// cluster should. Default: true when cluster-wide and not a shard.
        #[arg(long, env = "KEYWARD_MANAGE_POLICIES", action = clap::ArgAction::Set)]
        manage_policies: Option<bool>,
    },
    /// Run the verifier: answer "is this key valid?" over HTTP and record last use.
    Verifier {
        /// Address for /v1/verify, /v1/auth, /metrics, /healthz and /readyz.
        #[arg(long, env = "KEYWARD_LISTEN", default_value = "0.0.0.0:8081")]
        listen: String,
        /// Address for Envoy's gRPC `ext_authz` (`envoy.service.auth.v3.Authorization`)
        /// and `grpc.health.v1` (default: no gRPC listener; the chart uses 0.0.0.0:9001).
        #[arg(long, env = "KEYWARD_GRPC_LISTEN")]
        grpc_listen: Option<String>,
        /// Index ApiKeys of this namespace only (default: all namespaces).
        #[arg(long, env = "KEYWARD_NAMESPACE")]
        namespace: Option<String>,
        /// Least time between two lastUsedAt writes for one ApiKey (ISO 8601).
        #[arg(long, env = "KEYWARD_USAGE_FLUSH_INTERVAL", default_value = "PT1M", value_parser = parse_interval)]
        usage_flush_interval: std::time::Duration,
        /// How long a watch may keep failing (no successful list or event since its first
        /// error) before the verifier goes unready and answers 503 rather than verify
        /// against a possibly stale index (ISO 8601). A quiet, healthy watch is never stale.
        #[arg(long, env = "KEYWARD_MAX_STALENESS", default_value = "PT1M", value_parser = parse_interval)]
        max_staleness: std::time::Duration,
        /// On SIGTERM, keep answering this long while unready (ISO 8601), so Service
        /// endpoints and proxies stop sending before the listener closes (a rolling update
        /// without failed requests). The chart sets PT5S.
        #[arg(long, env = "KEYWARD_SHUTDOWN_DELAY", default_value = "PT0S", value_parser = parse_interval)]
        shutdown_delay: std::time::Duration,
    },
    /// Show ApiKeys: owner, active key, expiry, standby, next action, warnings.
    Status {
        /// Namespace (default: the kubeconfig context's).
        #[arg(short, long, env = "KEYWARD_NAMESPACE")]
        namespace: Option<String>,
        /// All namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// One ApiKey.
        name: Option<String>,
    },
    /// Request a rotation: a new key becomes active at once, the old one stays valid for flipBefore.
    Rotate {
        /// Namespace (default: the kubeconfig context's).
        #[arg(short, long, env = "KEYWARD_NAMESPACE")]
        namespace: Option<String>,
        /// The ApiKey.
        name: String,
    },
    /// Revoke one key of an ApiKey at once (adds it to spec.revokedKeys).
    Revoke {
        /// Namespace (default: the kubeconfig context's).
        #[arg(short, long, env = "KEYWARD_NAMESPACE")]
        namespace: Option<String>,
        /// The ApiKey.
        name: String,
        /// The key ID (`keyward status` shows them).
        key_id: String,
    },
    /// Print the CustomResourceDefinitions as YAML (`keyward crds | kubectl apply -f -`).
    Crds {
        /// Kubernetes version of the target cluster (`1.20`, `v1.31.2`). CEL validation
        /// rules are left out below 1.25, where they are unknown. Default: a current cluster.
        #[arg(long, env = "KEYWARD_KUBE_VERSION", value_parser = parse_kube_minor)]
        kube_version: Option<u32>,
    },
    /// Print the API reference of ApiKey and KeyPolicy as Markdown, generated from the
    /// CRD schemas (the checked-in docs/api-reference.md; hack/generate.sh writes it).
    ApiReference,
}

/// A client as kubectl would resolve it (or from `--kubeconfig`/`--context`), and
/// the API server URL for messages.
pub async fn connect(kubeconfig: Option<&PathBuf>, context: Option<&str>) -> Result<(Client, String)> {
    let options = KubeConfigOptions { context: context.map(str::to_string), ..Default::default() };
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| Error::Config(format!("reading {}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kc, &options).await.map_err(|e| Error::Config(e.to_string()))?
        }
        None if context.is_some() => {
            Config::from_kubeconfig(&options).await.map_err(|e| Error::Config(e.to_string()))?
        }
        None => Config::infer().await.map_err(|e| Error::Config(crate::error::chain(&e)))?,
    };
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|e| Error::Config(e.to_string()))?;
    Ok((client, server))
}

/// An ISO 8601 duration without calendar parts, as a std Duration.
pub fn parse_interval(text: &str) -> std::result::Result<std::time::Duration, String> {
    let d = crate::duration::IsoDuration::parse(text).map_err(|e| e.to_string())?;
    let epoch = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
    d.length_from(epoch).map_err(|e| e.to_string())?.to_std().map_err(|e| e.to_string())
}

/// `1.20`, `v1.20.2` or `1.31+` → the minor version (20, 31).
pub fn parse_kube_minor(text: &str) -> std::result::Result<u32, String> {
    let t = text.trim().trim_start_matches('v');
    let mut parts = t.split('.');
    let major = parts.next().unwrap_or("");
    let minor: String = parts.next().unwrap_or("").chars().take_while(char::is_ascii_digit).collect();
    match (major, minor.parse::<u32>()) {
        ("1", Ok(m)) => Ok(m),
        _ => Err(format!("{text:?} is not a Kubernetes version like 1.20 or v1.31.2")),
    }
}

/// The shard selector and whether this controller writes KeyPolicy status, from the flags
/// (an empty selector is none). A namespaced controller sees one namespace's ApiKeys, too
/// few to count a policy's keys: it may not write KeyPolicy status.
pub fn sharding(
    namespace: Option<&str>,
    selector: Option<String>,
    manage_policies: Option<bool>,
) -> Result<(Option<String>, bool), String> {
    let selector = selector.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let manage = manage_policies.unwrap_or(namespace.is_none() && selector.is_none());
    if manage && namespace.is_some() {
        return Err("--manage-policies needs a cluster-wide controller (no --namespace): \
                    KeyPolicy keyCount counts the ApiKeys of every namespace"
            .into());
    }
    Ok((selector, manage))
}

/// The Lease a controller elects on, from its flags and environment. Shards (a
/// selector) default to a Lease of their own.
pub fn lease_config(
    namespace: Option<&str>,
    selector: Option<&str>,
    name: Option<String>,
    lease_namespace: Option<String>,
    duration: std::time::Duration,
) -> crate::leader::LeaseConfig {
    let name = name.unwrap_or_else(|| {
        let mut name = match namespace {
            Some(ns) => format!("keyward-controller-{ns}"),
            None => "keyward-controller".into(),
        };
        // At most 19 + 63 (a namespace) + 17 characters, well within a Lease name's 253.
        if let Some(sel) = selector {
            name = format!("{name}-{}", crate::controller::shard::lease_suffix(sel));
        }
        name
    });
    let lease_namespace = lease_namespace
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .or_else(|| namespace.map(str::to_string))
        .unwrap_or_else(|| "default".into());
    let host =
        std::env::var("POD_NAME").or_else(|_| std::env::var("HOSTNAME")).unwrap_or_else(|_| "keyward".into());
    let identity = format!("{host}-{:08x}", rand::random::<u32>());
    crate::leader::LeaseConfig { name, namespace: lease_namespace, identity, duration }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_versions() {
        assert_eq!(parse_kube_minor("1.20"), Ok(20));
        assert_eq!(parse_kube_minor("v1.31.2"), Ok(31));
        assert_eq!(parse_kube_minor("1.28+"), Ok(28));
        for bad in ["", "2.0", "banana", "1.", "v1.x"] {
            assert!(parse_kube_minor(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn one_cluster_wide_unsharded_controller_writes_policy_status_by_default() {
        let sel = |s: &str| Some(s.to_string());
        assert_eq!(sharding(None, None, None), Ok((None, true)));
        assert_eq!(sharding(None, sel("keyward.dev/shard=a"), None), Ok((sel("keyward.dev/shard=a"), false)));
        assert_eq!(
            sharding(None, sel("!keyward.dev/shard"), Some(true)),
            Ok((sel("!keyward.dev/shard"), true))
        );
        assert_eq!(sharding(Some("t"), None, None), Ok((None, false)));
        assert_eq!(
            sharding(None, sel("  "), None),
            Ok((None, true)),
            "an empty selector (an unset Helm value)"
        );
        assert!(sharding(Some("t"), None, Some(true)).unwrap_err().contains("cluster-wide"));

        let lease = |ns, sel| lease_config(ns, sel, None, None, std::time::Duration::from_secs(15)).name;
        assert_eq!(lease(None, None), "keyward-controller");
        assert_eq!(lease(Some("t"), None), "keyward-controller-t");
        let (a, b) = (lease(None, Some("keyward.dev/shard=a")), lease(None, Some("keyward.dev/shard=b")));
        assert!(a.starts_with("keyward-controller-shard-") && a != b, "{a} {b}");
        assert!(lease(Some(&"n".repeat(63)), Some("x=y")).len() <= 253);
    }
}
