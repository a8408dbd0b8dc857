//! Integration-test harness: a client for the cluster in `KUBECONFIG` (the local
//! control plane from `hack/cluster.sh`, or any cluster you point it at), keyward's
//! CRDs installed once per test binary, one namespace per test, and waits with
//! timeouts on conditions (never bare sleeps).
#![allow(dead_code)]

pub mod hooks;

use std::future::Future;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap as PbHeaderMap, HeaderValue as PbHeader};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request as PbRequest};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{Condition, await_condition};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::OnceCell;

/// Field manager for everything the tests write.
pub const TEST_MANAGER: &str = "keyward-tests";

static CRDS: OnceCell<()> = OnceCell::const_new();

/// A client for the test cluster, with keyward's CRDs installed and established.
pub async fn client() -> Client {
    let client = Client::try_default().await.unwrap_or_else(|e| {
        panic!(
            "no Kubernetes cluster for the integration tests ({e}). Run `hack/test.sh`, \
             which starts the local control plane, or set KUBECONFIG."
        )
    });
    let c = client.clone();
    CRDS.get_or_init(|| async move { install_crds(&c).await }).await;
    client
}

/// The API server's minor version (20 for v1.20.2).
pub async fn server_minor(client: &Client) -> u32 {
    let info = client.apiserver_version().await.expect("API server version");
    info.minor.trim_end_matches('+').parse().expect("numeric minor version")
}

/// Server-side apply keyward's CRDs (as `keyward crds` prints them for this server)
/// and wait until both are established.
pub async fn install_crds(client: &Client) {
    let minor = server_minor(client).await;
    let yaml = keyward::api::crds_yaml(Some(minor)).expect("render CRDs");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply(TEST_MANAGER).force();
    for doc in serde_yaml::Deserializer::from_str(&yaml) {
        let value: serde_json::Value = serde::Deserialize::deserialize(doc).expect("valid YAML");
        let Some(name) = value["metadata"]["name"].as_str().map(str::to_string) else { continue };
        crds.patch(&name, &pp, &Patch::Apply(&value)).await.expect("apply CRD");
        wait_for(&crds, &name, Duration::from_secs(60), kube::runtime::conditions::is_crd_established())
            .await;
    }
}

/// Wait until `cond` holds for object `name`, or panic after `timeout` with the last
/// state seen.
pub async fn wait_for<K>(api: &Api<K>, name: &str, timeout: Duration, cond: impl Condition<K>) -> K
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, cond)).await {
        Ok(Ok(Some(obj))) => obj,
        Ok(Ok(None)) => panic!("{name} was deleted while waiting"),
        Ok(Err(e)) => panic!("watch on {name} failed: {e}"),
        Err(_) => {
            panic!("timed out after {timeout:?} waiting on {name}; last seen: {:#?}", api.get_opt(name).await)
        }
    }
}

/// Poll `check` every 100 ms until it returns `Some`, or panic with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A namespace of its own for one test, deleted when dropped (with the cluster-scoped
/// KeyPolicies the test made through it).
pub struct TestNamespace {
    /// Its name: `kw-<test>-<random>`.
    pub name: String,
    policies: std::sync::Mutex<Vec<String>>,
}

/// The labels of keyward's own namespace (docs/operations.md): Pod Security Admission
/// refuses every pod there that breaks the restricted Pod Security Standard.
pub const POD_SECURITY_ENFORCE: (&str, &str) = ("pod-security.kubernetes.io/enforce", "restricted");
/// Added for the tests: enforcement checks pods only, `warn` also names the violations
/// of a Deployment's pod template when it is applied (kubectl prints them).
pub const POD_SECURITY_WARN: (&str, &str) = ("pod-security.kubernetes.io/warn", "restricted");

impl TestNamespace {
    /// Create `kw-<prefix>-<random>` labelled `keyward.dev/test=<prefix>`.
    pub async fn new(client: &Client, prefix: &str) -> Self {
        Self::with_labels(client, prefix, &[]).await
    }

    /// A namespace like keyward's own: [`Self::new`], labelled to enforce (and warn on)
    /// the restricted Pod Security Standard.
    pub async fn restricted(client: &Client, prefix: &str) -> Self {
        Self::with_labels(client, prefix, &[POD_SECURITY_ENFORCE, POD_SECURITY_WARN]).await
    }

    async fn with_labels(client: &Client, prefix: &str, labels: &[(&str, &str)]) -> Self {
        let name = format!("kw-{}-{:06x}", prefix, rand::random::<u32>() & 0xff_ffff);
        let mut all = serde_json::json!({"keyward.dev/test": prefix});
        for (k, v) in labels {
            all[*k] = serde_json::json!(v);
        }
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name, "labels": all}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        // Pods are refused until the namespace's default ServiceAccount exists (its
        // controller can lag on a loaded machine): wait for it, so a test's first pod is
        // not refused for that.
        let accounts = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), &name);
        eventually(&format!("ServiceAccount {name}/default"), Duration::from_secs(60), || async {
            accounts.get_opt("default").await.ok().flatten().map(drop)
        })
        .await;
        TestNamespace { name, policies: Default::default() }
    }
}

impl TestNamespace {
    /// Create KeyPolicy `<namespace>-<suffix>` with `spec`; deleted with the namespace.
    pub async fn policy(&self, client: &Client, suffix: &str, spec: serde_json::Value) -> String {
        let name = format!("{}-{suffix}", self.name);
        let obj: keyward::api::KeyPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "KeyPolicy",
            "metadata": {"name": name, "labels": {"keyward.dev/test": "true"}}, "spec": spec
        }))
        .expect("KeyPolicy JSON");
        Api::<keyward::api::KeyPolicy>::all(client.clone())
            .create(&PostParams::default(), &obj)
            .await
            .expect("create KeyPolicy");
        self.track_policy(&name);
        name
    }

    /// Delete KeyPolicy `name`, which the test created itself, with the namespace (if the
    /// test has not deleted it already).
    pub fn track_policy(&self, name: &str) {
        self.policies.lock().unwrap().push(name.to_string());
    }

    /// Create ApiKey `name` in this namespace with `spec` (and optional annotations).
    pub async fn apikey(&self, client: &Client, name: &str, spec: serde_json::Value) -> keyward::api::ApiKey {
        let obj: keyward::api::ApiKey = serde_json::from_value(serde_json::json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": name}, "spec": spec
        }))
        .expect("ApiKey JSON");
        Api::<keyward::api::ApiKey>::namespaced(client.clone(), &self.name)
            .create(&PostParams::default(), &obj)
            .await
            .expect("create ApiKey")
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let name = self.name.clone();
        let policies = std::mem::take(&mut *self.policies.lock().unwrap());
        // Drop cannot await, and the test's client lives on the test's (now blocked)
        // runtime: delete from a helper thread with its own runtime and client.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let client = Client::try_default().await.ok()?;
                let kp = Api::<keyward::api::KeyPolicy>::all(client.clone());
                for p in policies {
                    let _ = kp.delete(&p, &DeleteParams::background()).await;
                }
                Api::<Namespace>::all(client).delete(&name, &DeleteParams::background()).await.ok()
            })
        })
        .join();
    }
}

/// Run `kubectl` (from PATH, as `hack/test.sh` sets it up): stdout, or stderr on failure.
pub fn try_kubectl(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("kubectl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run kubectl ({e}); `hack/cluster.sh tools` installs it"));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Run `kubectl` and return stdout, panicking with stderr on failure.
pub fn kubectl(args: &[&str]) -> String {
    try_kubectl(args).unwrap_or_else(|e| panic!("kubectl {} failed: {e}", args.join(" ")))
}

/// Run `kubectl` until it succeeds (e.g. while the API server publishes a new CRD's
/// OpenAPI schema, a few seconds after the CRD is established).
pub async fn kubectl_eventually(args: &[&str]) -> String {
    let what = format!("kubectl {} to succeed", args.join(" "));
    eventually(&what, Duration::from_secs(60), || async { try_kubectl(args).ok() }).await
}

/// A `keyward` process (the real binary) run by a test, logging to a file.
pub struct KeywardProcess {
    child: Option<std::process::Child>,
    /// Its health/metrics address.
    pub addr: String,
    /// Where its stderr goes.
    pub log: std::path::PathBuf,
}

/// A free loopback port for a child process to listen on (bound, then released for it to
/// take). Chosen below Linux's ephemeral range (32768–60999): a port from there, once
/// released, can be handed at once to another test's `bind(0)` listener or outgoing
/// connection, and the child would fail to listen while its port answers for someone
/// else (seen: a proxy test reaching another test's HTTPS server).
pub fn free_port() -> u16 {
    loop {
        let port = 20_000 + rand::random::<u16>() % 10_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl KeywardProcess {
    /// Start `keyward <args…> --metrics-addr 127.0.0.1:<free>` with `RUST_LOG=log_level`.
    pub fn start(args: &[&str], log_level: &str) -> Self {
        Self::start_with_env(args, log_level, &[])
    }

    /// [`Self::start`] with extra environment variables (e.g. `POD_NAME`, which names the
    /// instance in the Events it publishes).
    pub fn start_with_env(args: &[&str], log_level: &str, env: &[(&str, &str)]) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::env::temp_dir().join(format!("keyward-test-{}.log", rand::random::<u64>()));
        let file = std::fs::File::create(&log).unwrap();
        let flag = if args.first() == Some(&"verifier") { "--listen" } else { "--metrics-addr" };
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(args)
            .args([flag, addr.as_str()])
            .env("RUST_LOG", log_level)
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start keyward");
        KeywardProcess { child: Some(child), addr, log }
    }

    /// GET `path` on its health server: (status code, body), or None if not reachable.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&self.addr, path)
    }

    /// Wait until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let what = format!("keyward on {} to be ready (log: {})", self.addr, self.log.display());
        eventually(&what, Duration::from_secs(60), || async {
            (self.get("/readyz")?.0 == 200).then_some(())
        })
        .await;
    }

    /// Send SIGTERM and wait for the exit status (panics after 30 s).
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        eventually("keyward to exit after SIGTERM", Duration::from_secs(30), || {
            let status = child.try_wait().unwrap();
            async move { status }
        })
        .await
    }

    /// Its process ID while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Send `signal` (`STOP`, `CONT`, …) with `kill(1)`: SIGSTOP freezes the process, so
    /// every API call it has in flight hangs, until SIGCONT.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().expect("running").to_string();
        let status = std::process::Command::new("kill").args([format!("-{signal}"), pid.clone()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {pid}");
    }

    /// Wait until the process exits by itself: its exit status (panics after `timeout`).
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("started");
        let what = format!("keyward (log: {}) to exit", self.log.display());
        eventually(&what, timeout, || {
            let status = child.try_wait().unwrap();
            async move { status }
        })
        .await
    }

    /// Whether the process has exited (e.g. a controller that lost its lease).
    pub fn exited(&mut self) -> bool {
        self.child.as_mut().is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Everything it logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for KeywardProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Minimal HTTP/1.0 GET over loopback: (status code, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    http(addr, "GET", path, &[], b"").map(|(code, _, body)| (code, body))
}

/// Minimal HTTP/1.0 request over loopback: (status code, response head, body).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<(u16, String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n", body.len())
        .into_bytes();
    for (k, v) in headers {
        req.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    s.write_all(&req).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) =
        text.split_once("\r\n\r\n").map(|(h, b)| (h.to_string(), b.to_string())).unwrap_or_default();
    Some((code, head.to_ascii_lowercase(), body))
}

/// The Secret's data as text, or None when it does not exist.
pub async fn secret_data(
    client: &Client,
    ns: &str,
    name: &str,
) -> Option<std::collections::BTreeMap<String, String>> {
    let secret = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .expect("read Secret")?;
    Some(
        secret
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8(v.0).expect("UTF-8 Secret data")))
            .collect(),
    )
}

/// The material of `key` once the Secret's `api-key` holds it (its hash reaches status
/// before its material reaches the Secret).
pub async fn api_key_material(
    client: &Client,
    ns: &str,
    name: &str,
    key: &keyward::api::KeyStatus,
) -> String {
    eventually(&format!("api-key of {ns}/{name} to hold {}", key.key_id), Duration::from_secs(30), || async {
        let material = secret_data(client, ns, name).await?.get("api-key")?.clone();
        (keyward::keys::hash(&material) == key.hash).then_some(material)
    })
    .await
}

/// GET an ApiKey.
pub async fn get_key(client: &Client, ns: &str, name: &str) -> keyward::api::ApiKey {
    Api::<keyward::api::ApiKey>::namespaced(client.clone(), ns).get(name).await.expect("read ApiKey")
}

/// Poll the ApiKey until `check` holds (returns its result), or panic after `timeout`
/// showing the last status.
pub async fn wait_key<T>(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
    mut check: impl FnMut(&keyward::api::ApiKey) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let key = get_key(client, ns, name).await;
        if let Some(v) = check(&key) {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting on ApiKey {ns}/{name}; status: {:#?}", key.status);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `Ready` condition's (status, reason).
pub fn ready(key: &keyward::api::ApiKey) -> Option<(String, String)> {
    let status = key.status.as_ref()?;
    keyward::api::find_condition(&status.conditions, "Ready")
        .map(|c| (c.status.to_string(), c.reason.to_string()))
}

/// Sum of a counter family in Prometheus text (all label sets), 0 when absent.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The active key's status entry.
pub fn active(key: &keyward::api::ApiKey) -> Option<keyward::api::KeyStatus> {
    let status = key.status.as_ref()?;
    let slot = status.active_slot?;
    status.keys.iter().find(|k| k.slot == slot).cloned()
}

/// Merge-patch an ApiKey (as a user or GitOps tool would).
pub async fn patch_key(
    client: &Client,
    ns: &str,
    name: &str,
    patch: serde_json::Value,
) -> keyward::api::ApiKey {
    Api::<keyward::api::ApiKey>::namespaced(client.clone(), ns)
        .patch(name, &kube::api::PatchParams::default(), &Patch::Merge(patch))
        .await
        .expect("patch ApiKey")
}

/// Request a rotation (annotation `keyward.dev/rotate` = `value`).
pub async fn request_rotation(client: &Client, ns: &str, name: &str, value: &str) {
    patch_key(
        client,
        ns,
        name,
        serde_json::json!({"metadata": {"annotations": {"keyward.dev/rotate": value}}}),
    )
    .await;
}

/// Set `spec.revokedKeys`.
pub async fn revoke_keys(client: &Client, ns: &str, name: &str, key_ids: &[&str]) {
    patch_key(client, ns, name, serde_json::json!({"spec": {"revokedKeys": key_ids}})).await;
}

/// `keyward controller --namespace <ns>` plus `extra` flags (e.g. a short lease).
pub fn controller_for(ns: &str, extra: &[&str], log_level: &str) -> KeywardProcess {
    let mut args = vec!["controller", "--namespace", ns];
    args.extend_from_slice(extra);
    KeywardProcess::start(&args, log_level)
}

/// `keyward verifier --namespace <ns>`.
pub fn verifier_for(ns: &str) -> KeywardProcess {
    KeywardProcess::start(&["verifier", "--namespace", ns], "info")
}

/// KeyPolicy `name` and its `Accepted` condition, once that reflects the current
/// generation (and has `reason`, when given); panics after `timeout`.
pub async fn policy_accepted(
    client: &Client,
    name: &str,
    reason: Option<&str>,
    timeout: Duration,
) -> (keyward::api::KeyPolicy, keyward::api::Condition) {
    let api: Api<keyward::api::KeyPolicy> = Api::all(client.clone());
    eventually(&format!("KeyPolicy {name} Accepted {reason:?}"), timeout, || async {
        let p = api.get(name).await.ok()?;
        let c = keyward::api::find_condition(&p.status.as_ref()?.conditions, "Accepted")?.clone();
        let current = c.observed_generation == p.metadata.generation;
        (current && reason.is_none_or(|r| r == c.reason)).then_some((p, c))
    })
    .await
}

/// The names of the KeyPolicies marked default in the cluster.
pub async fn default_policies(client: &Client) -> Vec<String> {
    Api::<keyward::api::KeyPolicy>::all(client.clone())
        .list(&Default::default())
        .await
        .expect("list KeyPolicies")
        .items
        .iter()
        .filter(|p| p.spec.default)
        .map(kube::ResourceExt::name_any)
        .collect()
}

/// Wait until the ApiKey reports `Ready=True`.
pub async fn wait_ready(client: &Client, ns: &str, name: &str, timeout: Duration) {
    wait_key(client, ns, name, timeout, |k| ready(k).filter(|(s, _)| s == "True").map(|_| ())).await;
}

/// Set KeyPolicy `policy`'s `maxLifetime` to `max` and wait until the key `key_id` of
/// ApiKey `ns/name` is capped by it (`PolicyChange`): (when the change was made, the key).
pub async fn shrink_policy(
    client: &Client,
    policy: &str,
    max: &str,
    ns: &str,
    name: &str,
    key_id: &str,
) -> (chrono::DateTime<chrono::Utc>, keyward::api::KeyStatus) {
    let policies = Api::<keyward::api::KeyPolicy>::all(client.clone());
    // A shrink of a policy already seen: record its first sight as a controller with
    // --manage-policies does (one may run beside the test, e.g. tests/keypolicy.rs', and
    // a first sight after the shrink would count the new maxLifetime from creation).
    let p = policies.get(policy).await.expect("read KeyPolicy");
    if p.status.as_ref().and_then(|s| s.observed_max_lifetime.as_ref()).is_none() {
        let seen = serde_json::json!({"status": {
            "observedMaxLifetime": keyward::lifecycle::observed_expiry(&p.spec),
            "maxLifetimeSince": p.metadata.creation_timestamp.as_ref().expect("created").0.to_string(),
        }});
        policies
            .patch_status(policy, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(seen))
            .await
            .expect("record the policy's first sight");
    }
    let changed = chrono::Utc::now();
    policies
        .patch(
            policy,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"expiry": {"maxLifetime": max}}})),
        )
        .await
        .expect("patch KeyPolicy");
    let capped = wait_key(client, ns, name, Duration::from_secs(20), |k| {
        k.status
            .as_ref()?
            .keys
            .iter()
            .find(|x| x.key_id == key_id && x.expiry_reason == Some(keyward::api::ExpiryReason::PolicyChange))
            .cloned()
    })
    .await;
    (changed, capped)
}

/// POST /v1/verify: the answer as JSON.
pub fn verify_json(verifier: &str, key: &str) -> serde_json::Value {
    let body = serde_json::json!({"key": key}).to_string();
    let (code, _, body) =
        http(verifier, "POST", "/v1/verify", &[("Content-Type", "application/json")], body.as_bytes())
            .expect("an answer");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// An Envoy gRPC `Check` of a request with `headers`, sent as Envoy's header map or (`raw`) as
/// `header_map` entries, for a route requiring `scope` (context extension).
pub fn check_request(headers: &[(&str, &str)], raw: bool, scope: Option<&str>) -> CheckRequest {
    let mut http = HttpRequest { method: "POST".into(), path: "/orders/42?x=1".into(), ..Default::default() };
    if raw {
        let headers = headers
            .iter()
            .map(|(k, v)| PbHeader {
                key: k.to_lowercase(),
                raw_value: v.as_bytes().to_vec(),
                ..Default::default()
            })
            .collect();
        http.header_map = Some(PbHeaderMap { headers });
    } else {
        http.headers = headers.iter().map(|(k, v)| (k.to_lowercase(), v.to_string())).collect();
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(PbRequest { http: Some(http), ..Default::default() }),
            context_extensions: scope.map(|s| ("scope".to_string(), s.to_string())).into_iter().collect(),
            ..Default::default()
        }),
    }
}

/// The API server's version as `helm template --kube-version` takes it (`v1.37.2`).
pub async fn server_version(client: &Client) -> String {
    client.apiserver_version().await.expect("API server version").git_version
}

/// The chart rendered by `helm template <release> charts/keyward -n <namespace>
/// --kube-version <version>` with `--set` `sets`: the YAML stream.
pub fn chart_template(release: &str, namespace: &str, version: &str, sets: &[&str]) -> String {
    let chart = format!("{}/charts/keyward", env!("CARGO_MANIFEST_DIR"));
    let mut args = vec!["template", release, chart.as_str(), "-n", namespace, "--kube-version", version];
    for s in sets {
        args.extend(["--set", s]);
    }
    let out = std::process::Command::new("helm")
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run helm ({e}); `hack/cluster.sh tools` installs it"));
    assert!(out.status.success(), "helm {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8 YAML")
}

/// The documents of a YAML stream (empty ones left out).
pub fn yaml_docs(yaml: &str) -> Vec<serde_json::Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("valid YAML"))
        .filter(|v: &serde_json::Value| !v.is_null())
        .collect()
}
