//! The Helm chart: lint and template every option (two Deployments, two ServiceAccounts,
//! a PodDisruptionBudget, anti-affinity, split RBAC); install it on the real API server,
//! into a namespace that enforces the restricted Pod Security Standard (its pods admitted),
//! and prove with `kubectl auth can-i` that each ServiceAccount (the controller's, the
//! verifier's) can do its job and nothing more, cluster-wide and with `watchNamespace`;
//! then run the real binary as controller and as verifier, each with its own
//! ServiceAccount's token, through a whole rotation while serving traffic, and show that
//! removing one rule fails with a clear condition.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use common::{KeywardProcess, TestNamespace, client, kubectl, ready, wait_key};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

fn chart() -> String {
    format!("{}/charts/keyward", env!("CARGO_MANIFEST_DIR"))
}

fn helm(args: &[&str]) -> (bool, String) {
    let out = Command::new("helm").args(args).output().expect("helm (hack/cluster.sh tools installs it)");
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

/// A release installed under a random name in a namespace of its own, labelled as
/// keyward's namespace is (`pod-security.kubernetes.io/enforce: restricted`); uninstalled
/// (and its namespace deleted) when dropped.
struct Release {
    name: String,
    namespace: String,
    _ns: TestNamespace,
}

impl Release {
    /// `helm install` the chart with `--set` `sets`. Its pods never pull their image (no
    /// registry is reached from a test; they need not run: the tests run keyward as the
    /// release's ServiceAccounts).
    async fn install(client: &kube::Client, sets: &[&str]) -> Release {
        let ns = TestNamespace::restricted(client, "helm").await;
        let release = Release {
            name: format!("kw{:06x}", rand::random::<u32>() & 0xff_ffff),
            namespace: ns.name.clone(),
            _ns: ns,
        };
        let path = chart();
        let mut args = vec![
            "install",
            release.name.as_str(),
            path.as_str(),
            "-n",
            release.namespace.as_str(),
            "--take-ownership",
            "--set",
            "image.pullPolicy=Never",
        ];
        for s in sets {
            args.extend(["--set", s]);
        }
        let (ok, out) = helm(&args);
        assert!(ok, "{out}");
        release
    }

    /// The controller's objects and ServiceAccount: `<fullname>`.
    fn controller(&self) -> String {
        format!("{}-keyward", self.name)
    }

    /// The verifier's objects and ServiceAccount: `<fullname>-verifier`.
    fn verifier(&self) -> String {
        format!("{}-keyward-verifier", self.name)
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = helm(&["uninstall", &self.name, "-n", &self.namespace]);
    }
}

/// `helm template` with `sets` for a Kubernetes version: the rendered objects.
fn render(version: &str, sets: &[&str]) -> (String, Vec<Value>) {
    let path = chart();
    let mut args = vec!["template", "t", path.as_str(), "--kube-version", version];
    for s in sets {
        args.extend(["--set", s]);
    }
    let (ok, out) = helm(&args);
    assert!(ok, "{sets:?}: {out}");
    let docs = serde_yaml::Deserializer::from_str(&out)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .filter(|v: &Value| v.get("kind").is_some())
        .collect();
    (out, docs)
}

/// The rendered object of this kind and name, if any.
fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

/// The names of the rendered objects of a kind.
fn names(docs: &[Value], kind: &str) -> BTreeSet<String> {
    docs.iter()
        .filter(|d| d["kind"] == kind)
        .filter_map(|d| d["metadata"]["name"].as_str().map(str::to_string))
        .collect()
}

/// Whether a matchLabels selector matches a label set.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector.as_object().is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

#[test]
fn chart_lints_and_renders_every_option() {
    let (ok, out) = helm(&["lint", "--strict", &chart()]);
    assert!(ok, "{out}");
    for (version, sets) in [
        ("1.20.2", vec![]),
        (
            "1.31.0",
            vec!["serviceMonitor.enabled=true,prometheusRule.enabled=true,networkPolicy.enabled=true"],
        ),
        ("1.31.0", vec!["watchNamespace=payments,crds.enabled=false,verifier.enabled=false"]),
        ("1.31.0", vec!["watchNamespace=payments,verifier.replicas=1,controller.leaderElect=false"]),
        ("1.31.0", vec!["verifier.grpcPort=null"]),
    ] {
        let (out, docs) = render(version, &sets);
        let scoped = sets.iter().any(|s| s.contains("watchNamespace"));
        let verifier = !sets.iter().any(|s| s.contains("verifier.enabled=false"));
        let crds = !sets.iter().any(|s| s.contains("crds.enabled=false"));
        let cel = out.contains("x-kubernetes-validations");
        // gRPC ext_authz: on by default, on the verifier's Service as port "grpc".
        let grpc = verifier && !sets.iter().any(|s| s.contains("grpcPort=null"));
        assert_eq!(out.contains("--grpc-listen=0.0.0.0:9001"), grpc, "{sets:?}");
        if verifier {
            let svc = object(&docs, "Service", "t-keyward-verifier").unwrap();
            let grpc_port = svc["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "grpc" && p["appProtocol"] == "grpc" && p["targetPort"] == "grpc");
            assert_eq!(grpc_port, grpc, "{svc:#}");
        }
        assert_eq!(cel, version != "1.20.2" && crds, "CEL rules by version");
        assert_eq!(out.contains("kind: CustomResourceDefinition"), crds, "crds.enabled");
        if scoped {
            assert!(
                out.contains("kind: Role\n")
                    && out.contains("namespace: payments")
                    && out.contains("--namespace=payments")
            );
            // KeyPolicy status is left to a cluster-wide installation.
            let cluster = object(&docs, "ClusterRole", "t-keyward-cluster").unwrap();
            assert!(!cluster["rules"].to_string().contains("keypolicies/status"), "{cluster:#}");
        }
        if sets.iter().any(|s| s.contains("serviceMonitor")) {
            assert!(
                out.contains("kind: ServiceMonitor")
                    && out.contains("kind: PrometheusRule")
                    && out.contains("kind: NetworkPolicy")
            );
            // Both components are scraped, each NetworkPolicy admits its own port.
            let sm = object(&docs, "ServiceMonitor", "t-keyward").expect("ServiceMonitor");
            let ports: BTreeSet<_> = sm["spec"]["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|e| e["port"].as_str())
                .collect();
            assert_eq!(ports, BTreeSet::from(["metrics", "verifier"]), "{sm:#}");
            assert_eq!(
                names(&docs, "NetworkPolicy"),
                BTreeSet::from(["t-keyward".into(), "t-keyward-verifier".into()])
            );
            let rule = object(&docs, "PrometheusRule", "t-keyward").unwrap().to_string();
            assert!(rule.contains("KeywardVerifierDown") && rule.contains("KeywardControllerDown"), "{rule}");
            assert!(!rule.contains("KeywardControllerShardDown"), "no shards, no shard alert: {rule}");
        }
        for needle in [
            "runAsNonRoot: true",
            "readOnlyRootFilesystem: true",
            "allowPrivilegeEscalation: false",
            "RuntimeDefault",
        ] {
            assert!(out.contains(needle), "restricted Pod Security: {needle}");
        }

        // Two Deployments, each under its own ServiceAccount, neither selecting the
        // other's pods; each Service selects one component's pods.
        let expected: BTreeSet<String> = if verifier {
            ["t-keyward".into(), "t-keyward-verifier".into()].into()
        } else {
            ["t-keyward".into()].into()
        };
        for kind in ["Deployment", "ServiceAccount", "Service"] {
            assert_eq!(names(&docs, kind), expected, "{kind}s with {sets:?}");
        }
        let pods = |name: &str| object(&docs, "Deployment", name).map(|d| d["spec"]["template"].clone());
        let controller = pods("t-keyward").unwrap();
        assert_eq!(controller["spec"]["serviceAccountName"], "t-keyward");
        assert_eq!(controller["spec"]["containers"].as_array().unwrap().len(), 1, "controller only");
        let deployment_selector = |name: &str| {
            object(&docs, "Deployment", name).unwrap()["spec"]["selector"]["matchLabels"].clone()
        };
        // The controller's selector is chart 0.1's (immutable): upgrades keep working.
        assert_eq!(
            deployment_selector("t-keyward"),
            json!({"app.kubernetes.io/name": "keyward", "app.kubernetes.io/instance": "t"})
        );
        let service_selector =
            |name: &str| object(&docs, "Service", name).unwrap()["spec"]["selector"].clone();
        assert!(selects(&service_selector("t-keyward"), &controller["metadata"]["labels"]));
        for template in docs.iter().filter(|d| d["kind"] == "Deployment") {
            let podspec = &template["spec"]["template"]["spec"];
            assert_eq!(podspec["securityContext"]["runAsNonRoot"], true);
            assert_eq!(podspec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
            for c in podspec["containers"].as_array().unwrap() {
                let sc = &c["securityContext"];
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{c:#}");
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{c:#}");
                assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{c:#}");
                assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
                assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
                assert!(c["resources"]["requests"].is_object(), "{c:#}");
            }
        }
        let pdb = object(&docs, "PodDisruptionBudget", "t-keyward-verifier");
        if verifier {
            let v = pods("t-keyward-verifier").unwrap();
            assert_eq!(v["spec"]["serviceAccountName"], "t-keyward-verifier");
            assert_eq!(v["spec"]["containers"][0]["args"][0], "verifier");
            assert!(!selects(&deployment_selector("t-keyward"), &v["metadata"]["labels"]), "overlap");
            assert!(!selects(&deployment_selector("t-keyward-verifier"), &controller["metadata"]["labels"]));
            assert!(selects(&deployment_selector("t-keyward-verifier"), &v["metadata"]["labels"]));
            assert!(selects(&service_selector("t-keyward-verifier"), &v["metadata"]["labels"]));
            assert!(!selects(&service_selector("t-keyward-verifier"), &controller["metadata"]["labels"]));
            assert!(!selects(&service_selector("t-keyward"), &v["metadata"]["labels"]));
            let anti = &v["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
                [0];
            assert_eq!(anti["podAffinityTerm"]["topologyKey"], "kubernetes.io/hostname", "{v:#}");
            assert!(selects(
                &anti["podAffinityTerm"]["labelSelector"]["matchLabels"],
                &v["metadata"]["labels"]
            ));
            // The verifier's RBAC never names Secrets, Events or Leases.
            for kind in ["Role", "ClusterRole"] {
                for name in ["t-keyward-verifier", "t-keyward-verifier-cluster"] {
                    if let Some(role) = object(&docs, kind, name) {
                        let text = role["rules"].to_string();
                        for never in ["secrets", "events", "leases", "update", "create", "delete", "*"] {
                            assert!(!text.contains(never), "{kind} {name} grants {never}: {text}");
                        }
                    }
                }
            }
            if sets.iter().any(|s| s.contains("verifier.replicas=1")) {
                assert!(pdb.is_none(), "a PDB on one replica would block node drains");
            } else {
                let pdb = pdb.expect("the verifier's PodDisruptionBudget");
                let api = if version == "1.20.2" { "policy/v1beta1" } else { "policy/v1" };
                assert_eq!(pdb["apiVersion"], api);
                assert_eq!(pdb["spec"]["minAvailable"], 1);
                assert!(selects(&pdb["spec"]["selector"]["matchLabels"], &v["metadata"]["labels"]));
                let replicas =
                    &object(&docs, "Deployment", "t-keyward-verifier").unwrap()["spec"]["replicas"];
                assert_eq!(*replicas, json!(2), "verifier.replicas default");
            }
        } else {
            assert!(pdb.is_none());
            assert!(names(&docs, "ClusterRole").iter().all(|n| !n.contains("verifier")));
        }
        let leader = object(&docs, "Role", "t-keyward-leader").is_some();
        assert_eq!(leader, !sets.iter().any(|s| s.contains("leaderElect=false")), "Lease Role");
    }

    // Overrides: the verifier's affinity and disruption budget.
    let (_, docs) = render(
        "1.31.0",
        &["verifier.podDisruptionBudget.maxUnavailable=1", "verifier.affinity.nodeAffinity.x=y"],
    );
    let pdb = object(&docs, "PodDisruptionBudget", "t-keyward-verifier").unwrap();
    assert_eq!(pdb["spec"], json!({"maxUnavailable": 1, "selector": pdb["spec"]["selector"]}));
    let v = object(&docs, "Deployment", "t-keyward-verifier").unwrap();
    assert_eq!(v["spec"]["template"]["spec"]["affinity"], json!({"nodeAffinity": {"x": "y"}}));

    // Shards: one Deployment each, no Deployment selecting another's pods; the metrics
    // Service and the NetworkPolicy cover every controller pod; KeyPolicy status is
    // written by "<fullname>" alone, which keeps the unlabelled ApiKeys.
    let (_, docs) = render(
        "1.31.0",
        &["controller.shards={a,b}", "networkPolicy.enabled=true", "prometheusRule.enabled=true"],
    );
    // An alert per shard without a leader; the main controller's alert counts its own pods only.
    let rule = object(&docs, "PrometheusRule", "t-keyward").unwrap().to_string();
    for needle in [
        r#"pod=~\"t-keyward-shard-a-.+\""#,
        r#"pod=~\"t-keyward-shard-b-.+\""#,
        r#"pod=~\"t-keyward-[a-z0-9]+-[a-z0-9]+\""#,
    ] {
        assert!(rule.contains(needle), "{needle} in {rule}");
    }
    let all = ["t-keyward", "t-keyward-shard-a", "t-keyward-shard-b", "t-keyward-verifier"];
    assert_eq!(names(&docs, "Deployment"), all.iter().map(|n| n.to_string()).collect());
    let deployment = |name: &str| object(&docs, "Deployment", name).unwrap();
    let labels = |name: &str| deployment(name)["spec"]["template"]["metadata"]["labels"].clone();
    let service = object(&docs, "Service", "t-keyward").unwrap()["spec"]["selector"].clone();
    let policy =
        object(&docs, "NetworkPolicy", "t-keyward").unwrap()["spec"]["podSelector"]["matchLabels"].clone();
    for name in all {
        for other in all {
            let selector = &deployment(other)["spec"]["selector"]["matchLabels"];
            assert_eq!(selects(selector, &labels(name)), name == other, "{other} selects {name}'s pods");
        }
        let controller = name != "t-keyward-verifier";
        assert_eq!(selects(&service, &labels(name)), controller, "metrics Service and {name}");
        assert_eq!(selects(&policy, &labels(name)), controller, "NetworkPolicy and {name}");
    }
    let args = |name: &str| deployment(name)["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    for (name, has, lacks) in [
        (
            "t-keyward",
            // The unsharded controller's Lease (binary default): an upgrade hands over.
            vec![
                "--watch-label-selector=keyward.dev/shard notin (a,b)",
                "--manage-policies=true",
                "--lease-name=keyward-controller\"",
            ],
            vec!["--manage-policies=false"],
        ),
        (
            "t-keyward-shard-a",
            vec![
                "--watch-label-selector=keyward.dev/shard=a",
                "--lease-name=t-keyward-shard-a",
                "--manage-policies=false",
            ],
            vec!["--manage-policies=true"],
        ),
    ] {
        for needle in has {
            assert!(args(name).contains(needle), "{name}: {needle} in {}", args(name));
        }
        for needle in lacks {
            assert!(!args(name).contains(needle), "{name}: no {needle} in {}", args(name));
        }
    }

    // values.schema.json refuses what it does not know; the verifier never gets the
    // controller's ServiceAccount.
    for (set, says) in [
        ("replicaCount=-1", "replicaCount"),
        ("verifier.replicas=-1", "replicas"),
        ("verifier.podDisruptionBudget.minAvailable=x", "minAvailable"),
        ("verifier.serviceAccount.bogus=1", "bogus"),
        ("verifier.serviceAccount.name=t-keyward", "must not run with the controller's rights"),
        ("bogus=1", "bogus"),
        ("controller.shards={a,a}", "equal"),
        ("controller.shards={Shard_A}", "does not match pattern"),
    ] {
        let (ok, out) = helm(&["template", "t", &chart(), "--set", set]);
        assert!(!ok && out.contains(says), "{set}: {out}");
    }
}

/// The install notes ask for the Pod Security label when the release's namespace lacks it
/// (the chart looks the namespace up), and do not when the namespace has it.
#[tokio::test]
async fn the_install_notes_ask_for_the_pod_security_label_only_where_it_is_missing() {
    let client = client().await;
    let (labelled, open) =
        (TestNamespace::restricted(&client, "notes").await, TestNamespace::new(&client, "notesopen").await);
    for (ns, asks) in [(&labelled, false), (&open, true)] {
        let args = [
            "install",
            "kwnotes",
            &chart(),
            "-n",
            &ns.name,
            "--dry-run=server",
            "--set",
            "crds.enabled=false",
        ];
        let (ok, out) = helm(&args);
        assert!(ok, "{out}");
        let notes = out.split_once("NOTES:").unwrap_or_else(|| panic!("no notes: {out}")).1;
        let hint =
            format!("kubectl label namespace {} pod-security.kubernetes.io/enforce=restricted", ns.name);
        assert_eq!(notes.contains(&hint), asks, "{}: {notes}", ns.name);
    }
}

const VERBS: [&str; 8] = ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"];
const HEADINGS: [&str; 8] = ["get", "list", "watch", "create", "update", "patch", "delete", "delcol"];

/// One row of an `auth can-i` matrix: a resource (`resource.group`, a subresource) in a
/// namespace (None: cluster-scoped), and the verbs the controller's and the verifier's
/// ServiceAccounts may use on it (every other verb must be denied).
struct Row {
    resource: &'static str,
    subresource: Option<&'static str>,
    namespace: Option<String>,
    controller: &'static [&'static str],
    verifier: &'static [&'static str],
}

fn row(
    resource: &'static str,
    namespace: Option<&str>,
    controller: &'static [&'static str],
    verifier: &'static [&'static str],
) -> Row {
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s)),
        None => (resource, None),
    };
    Row { resource, subresource, namespace: namespace.map(str::to_string), controller, verifier }
}

/// `kubectl auth can-i <verb> <resource> [--subresource s] --as=<user> [-n ns]`: exit 0
/// and "yes", or exit 1 and "no"; anything else (e.g. a resource type the server does
/// not know, which kubectl answers "no" with a warning) is an error.
fn can_i(verb: &str, row: &Row, user: &str) -> Result<bool, String> {
    let r#as = format!("--as={user}");
    let mut args = vec!["auth", "can-i", verb, row.resource, r#as.as_str()];
    if let Some(s) = row.subresource {
        args.extend(["--subresource", s]);
    }
    // A cluster-scoped resource is asked about at cluster scope (namespace "": -A);
    // with a namespace kubectl warns that it is not namespaced.
    match &row.namespace {
        Some(ns) => args.extend(["-n", ns.as_str()]),
        None => args.push("-A"),
    }
    let out = Command::new("kubectl").args(&args).output().map_err(|e| e.to_string())?;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    match (out.status.code(), stdout.trim(), stderr.trim()) {
        (Some(0), "yes", "") => Ok(true),
        (Some(1), "no", "") => Ok(false),
        (code, o, e) => Err(format!("kubectl {}: exit {code:?}, stdout {o:?}, stderr {e:?}", args.join(" "))),
    }
}

/// Ask every (ServiceAccount, row, verb) cell (a few kubectl at a time), print the
/// matrix, and return every cell that differs from the expectation.
fn check_matrix(title: &str, release: &Release, rows: &[Row]) -> Vec<String> {
    let accounts = [("controller", release.controller()), ("verifier", release.verifier())];
    let cells: Vec<(usize, usize, usize)> = (0..rows.len())
        .flat_map(|r| (0..accounts.len()).flat_map(move |a| (0..VERBS.len()).map(move |v| (r, a, v))))
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let answers = std::sync::Mutex::new(BTreeMap::new());
    std::thread::scope(|s| {
        for _ in 0..6 {
            s.spawn(|| {
                while let Some(&(r, a, v)) =
                    cells.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                {
                    let user = format!("system:serviceaccount:{}:{}", release.namespace, accounts[a].1);
                    let answer = can_i(VERBS[v], &rows[r], &user);
                    answers.lock().unwrap().insert((r, a, v), answer);
                }
            });
        }
    });
    let answers = answers.into_inner().unwrap();
    let mut mismatches = Vec::new();
    let mut table = format!(
        "\n`kubectl auth can-i` matrix, {title} (Y allowed, - denied, ! not as expected)\n{:<47} {:<21}",
        "resource", "namespace"
    );
    for (who, _) in &accounts {
        table += &format!(" | {who:<10} {}", HEADINGS.join(" "));
    }
    for (r, row) in rows.iter().enumerate() {
        let name =
            format!("{}{}", row.resource, row.subresource.map(|s| format!("/{s}")).unwrap_or_default());
        table += &format!("\n{name:<47} {:<21}", row.namespace.as_deref().unwrap_or("(cluster)"));
        for (a, (who, sa)) in accounts.iter().enumerate() {
            let allowed = if a == 0 { row.controller } else { row.verifier };
            table += &format!(" | {:<10}", "");
            for (v, verb) in VERBS.iter().enumerate() {
                let want = allowed.contains(verb);
                let cell = match &answers[&(r, a, v)] {
                    Ok(got) => {
                        if *got != want {
                            mismatches.push(format!(
                                "{title}: {who} ({sa}) {verb} {name} in {:?}: {}, expected {}",
                                row.namespace,
                                if *got { "allowed" } else { "denied" },
                                if want { "allowed" } else { "denied" }
                            ));
                        }
                        format!("{}{}", if *got { "Y" } else { "-" }, if *got != want { "!" } else { "" })
                    }
                    Err(e) => {
                        mismatches.push(format!("{title}: {e}"));
                        "?".to_string()
                    }
                };
                table += &format!(" {cell:<width$}", width = HEADINGS[v].len());
            }
        }
    }
    eprintln!("{table}\n");
    mismatches
}

const READ: &[&str] = &["get", "list", "watch"];
const NONE: &[&str] = &[];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_accounts_can_do_their_job_and_nothing_more() {
    // kubectl resolves apikeys.keyward.dev through discovery: the CRDs must be there.
    let client = client().await;
    let mut mismatches = Vec::new();

    // Cluster-wide: namespaced resources in the release namespace (a ClusterRole reaches
    // every namespace), the Lease also elsewhere.
    let release = Release::install(&client, &["crds.enabled=false"]).await;
    let ns = Some(release.namespace.as_str());
    let rows = [
        row("apikeys.keyward.dev", ns, READ, READ),
        row("apikeys.keyward.dev/status", ns, &["update"], &["patch"]),
        row("keypolicies.keyward.dev", None, READ, READ),
        row("keypolicies.keyward.dev/status", None, &["update"], NONE),
        row("secrets", ns, &["get", "list", "watch", "create", "patch"], NONE),
        row("events", ns, NONE, NONE),
        row("events.events.k8s.io", ns, &["create", "patch"], NONE),
        // KeyPolicy Events go to kube-system (see src/controller/mod.rs).
        row("events.events.k8s.io", Some("kube-system"), &["create", "patch"], NONE),
        row("configmaps", ns, NONE, NONE),
        // controller.watchConsumers (default on): the pod watch.
        row("pods", ns, &["list", "watch"], NONE),
        row("pods/exec", ns, NONE, NONE),
        row("deployments.apps", ns, &["get", "patch"], NONE),
        row("statefulsets.apps", ns, &["get", "patch"], NONE),
        row("daemonsets.apps", ns, &["get", "patch"], NONE),
        row("leases.coordination.k8s.io", ns, &["get", "create", "update"], NONE),
        row("leases.coordination.k8s.io", Some("default"), NONE, NONE),
        row("namespaces", None, &["get"], NONE),
        row("customresourcedefinitions.apiextensions.k8s.io", None, NONE, NONE),
        row("serviceaccounts", ns, NONE, NONE),
        row("serviceaccounts/token", ns, NONE, NONE),
        row("roles.rbac.authorization.k8s.io", ns, NONE, NONE),
        row("rolebindings.rbac.authorization.k8s.io", ns, NONE, NONE),
        row("clusterroles.rbac.authorization.k8s.io", None, NONE, NONE),
        row("clusterrolebindings.rbac.authorization.k8s.io", None, NONE, NONE),
    ];
    mismatches.extend(check_matrix(&format!("cluster-wide release {}", release.name), &release, &rows));

    // watchNamespace: namespaced rights in that namespace only; no KeyPolicy status.
    let watched = TestNamespace::new(&client, "helmscoped").await;
    let scoped =
        Release::install(&client, &[&format!("watchNamespace={}", watched.name), "crds.enabled=false"]).await;
    let (w, home) = (Some(watched.name.as_str()), Some(scoped.namespace.as_str()));
    let rows = [
        row("apikeys.keyward.dev", w, READ, READ),
        row("apikeys.keyward.dev", home, NONE, NONE),
        row("apikeys.keyward.dev/status", w, &["update"], &["patch"]),
        row("apikeys.keyward.dev/status", home, NONE, NONE),
        row("keypolicies.keyward.dev", None, READ, READ),
        row("keypolicies.keyward.dev/status", None, NONE, NONE),
        row("secrets", w, &["get", "list", "watch", "create", "patch"], NONE),
        row("secrets", home, NONE, NONE),
        row("events.events.k8s.io", w, &["create", "patch"], NONE),
        row("events.events.k8s.io", Some("kube-system"), NONE, NONE),
        row("deployments.apps", w, &["get", "patch"], NONE),
        row("deployments.apps", home, NONE, NONE),
        row("pods", w, &["list", "watch"], NONE),
        row("pods", home, NONE, NONE),
        row("namespaces", None, &["get"], NONE),
        row("leases.coordination.k8s.io", home, &["get", "create", "update"], NONE),
        row("leases.coordination.k8s.io", w, NONE, NONE),
    ];
    mismatches.extend(check_matrix(&format!("watchNamespace release {}", scoped.name), &scoped, &rows));
    assert!(mismatches.is_empty(), "{} cells not as expected:\n{}", mismatches.len(), mismatches.join("\n"));
}

/// A kubeconfig for the local cluster that authenticates with a ServiceAccount's token.
fn sa_kubeconfig(release: &Release, sa: &str) -> std::path::PathBuf {
    let token = kubectl(&["create", "token", sa, "-n", &release.namespace, "--duration=1h"]);
    let cluster = kubectl(&["config", "view", "--raw", "--minify", "-o", "jsonpath={.clusters[0].cluster}"]);
    let cluster: Value = serde_json::from_str(&cluster).unwrap();
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "sa", "user": {"token": token.trim()}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}],
        "current-context": "sa"
    });
    let path = std::env::temp_dir().join(format!("keyward-sa-{sa}.kubeconfig"));
    std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_installs_and_its_rbac_runs_a_full_rotation() {
    let client = client().await;
    let release = Release::install(&client, &[]).await;
    let (sa, vsa) = (release.controller(), release.verifier());
    for (kind, name) in [
        ("deployment", sa.clone()),
        ("deployment", vsa.clone()),
        ("service", sa.clone()),
        ("service", vsa.clone()),
        ("serviceaccount", sa.clone()),
        ("serviceaccount", vsa.clone()),
        ("poddisruptionbudget", vsa.clone()),
        ("role", format!("{sa}-leader")),
        ("clusterrole", sa.clone()),
        ("clusterrole", format!("{sa}-cluster")),
        ("clusterrole", vsa.clone()),
        ("clusterrole", format!("{vsa}-cluster")),
        ("clusterrole", format!("{sa}-view")),
        ("crd", "apikeys.keyward.dev".to_string()),
    ] {
        kubectl(&["get", kind, &name, "-n", &release.namespace]);
    }
    let view = kubectl(&["get", "clusterrole", &format!("{sa}-view"), "-o", "jsonpath={.metadata.labels}"]);
    assert!(view.contains("aggregate-to-view"), "{view}");
    // The release's namespace enforces the restricted Pod Security Standard, and the
    // ReplicaSets create every pod of the chart there: PodSecurity admits them (their image
    // is not on the node, so they do not start; that is not what is checked here).
    let selector = ListParams::default().labels(&format!("app.kubernetes.io/instance={}", release.name));
    let (pods, replica_sets) = (
        Api::<Pod>::namespaced(client.clone(), &release.namespace),
        Api::<ReplicaSet>::namespaced(client.clone(), &release.namespace),
    );
    common::eventually("the release's 4 pods to be created", Duration::from_secs(60), || async {
        for rs in replica_sets.list(&selector).await.ok()?.items {
            let conditions = rs.status.iter().flat_map(|s| s.conditions.iter().flatten());
            let failed: Vec<_> = conditions.filter(|c| c.type_ == "ReplicaFailure").collect();
            assert!(failed.is_empty(), "ReplicaSet {} cannot create its pods: {failed:?}", rs.name_any());
        }
        (pods.list(&selector).await.ok()?.items.len() == 4).then_some(())
    })
    .await;
    eprintln!("the release's 4 pods were admitted in {} (enforce: restricted)", release.namespace);

    // No kubelet runs the pods here: run the same binary with each component's identity,
    // with the chart's arguments (the verifier cluster-wide; the controller confined to
    // the test's namespace, where other tests run controllers of their own).
    let (controller_kc, verifier_kc) = (sa_kubeconfig(&release, &sa), sa_kubeconfig(&release, &vsa));
    let (ckc, vkc) = (controller_kc.display().to_string(), verifier_kc.display().to_string());
    let ns = TestNamespace::new(&client, "helmrbac").await;
    let policy =
        ns.policy(&client, "p", json!({"expiry": {"maxLifetime": "PT8S", "minLifetime": "PT1S"}})).await;
    let controller = KeywardProcess::start(
        &[
            "controller",
            "--kubeconfig",
            &ckc,
            "--namespace",
            &ns.name,
            "--lease-namespace",
            &release.namespace,
        ],
        "info",
    );
    let verifier =
        KeywardProcess::start(&["verifier", "--kubeconfig", &vkc, "--usage-flush-interval", "PT1S"], "info");
    ns.apikey(
        &client,
        "svc",
        json!({"policy": policy, "owner": "a", "consumers": [{"kind": "Deployment", "name": "none"}]}),
    )
    .await;
    verifier.wait_ready().await;
    let first = common::eventually("the first key in the Secret", Duration::from_secs(30), || async {
        common::secret_data(&client, &ns.name, "svc").await?.get("api-key").cloned()
    })
    .await;
    let auth = format!("Bearer {first}");
    common::eventually("the verifier to accept the first key", Duration::from_secs(10), || async {
        (common::http(&verifier.addr, "GET", "/v1/auth", &[("Authorization", &auth)], b"")?.0 == 200)
            .then_some(())
    })
    .await;

    // A whole rotation under traffic: a client reads `api-key` from the Secret before
    // every request (as a mounted file would) until it has used three keys (P1, S1, P2:
    // two flips, P1 regenerated) and the verifier has recorded a last use in status.
    let started = tokio::time::Instant::now();
    let (mut sent, mut rejected) = (0u32, Vec::new());
    let (mut keys_used, mut ids_seen) = (Vec::<String>::new(), BTreeSet::new());
    let mut last_used = None;
    while keys_used.len() < 3 || last_used.is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "no whole rotation with a recorded last use in 90 s: {} keys used, lastUsedAt {last_used:?}, \
             status {:#?}\ncontroller log:\n{}\nverifier log:\n{}",
            keys_used.len(),
            common::get_key(&client, &ns.name, "svc").await.status,
            controller.logs(),
            verifier.logs()
        );
        let key = common::secret_data(&client, &ns.name, "svc").await.unwrap()["api-key"].clone();
        if keys_used.last() != Some(&key) {
            keys_used.push(key.clone());
        }
        let auth = format!("Bearer {key}");
        let code = common::http(&verifier.addr, "GET", "/v1/auth", &[("Authorization", &auth)], b"")
            .map_or(0, |(code, _, _)| code);
        sent += 1;
        if code != 200 {
            rejected.push((started.elapsed(), code));
        }
        let status = common::get_key(&client, &ns.name, "svc").await.status.unwrap_or_default();
        ids_seen.extend(status.keys.iter().map(|k| k.key_id.clone()));
        if let Some(k) = status.keys.iter().find(|k| k.last_used_at.is_some()) {
            last_used.get_or_insert((k.key_id.clone(), k.last_used_at));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        rejected.is_empty(),
        "{} of {sent} requests with the current key were rejected: {rejected:?}",
        rejected.len()
    );
    wait_key(&client, &ns.name, "svc", Duration::from_secs(30), |k| {
        ready(k).is_some_and(|r| r.0 == "True").then_some(())
    })
    .await;
    eprintln!(
        "{sent} requests in {:?}, {} keys used, {} issued, 0 rejected; lastUsedAt {last_used:?}",
        started.elapsed(),
        keys_used.len(),
        ids_seen.len()
    );
    for (who, p) in [("controller", &controller), ("verifier", &verifier)] {
        assert!(!p.logs().to_lowercase().contains("forbidden"), "{who} lacked a permission:\n{}", p.logs());
    }
    // The verifier's own token cannot read the key material.
    for args in [vec!["get", "secret", "svc", "-n", ns.name.as_str()], vec!["get", "secrets", "-A"]] {
        let denied = common::try_kubectl(&[&["--kubeconfig", vkc.as_str()][..], &args].concat());
        assert!(denied.as_ref().is_err_and(|e| e.contains("forbidden")), "{args:?}: {denied:?}");
    }

    // Remove the Secrets rule: the next step fails with a clear condition.
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let mut role = roles.get(&sa).await.unwrap();
    role.rules.get_or_insert_default().retain(|r| !r.resources.iter().flatten().any(|x| x == "secrets"));
    role.metadata.managed_fields = None;
    roles.replace(&sa, &Default::default(), &role).await.unwrap();
    common::request_rotation(&client, &ns.name, "svc", "1").await;
    let message = wait_key(&client, &ns.name, "svc", Duration::from_secs(30), |k| {
        let conditions = &k.status.as_ref()?.conditions;
        conditions
            .iter()
            .find(|c| c.status == "False" && c.reason == "ApplyFailed")
            .map(|c| c.message.clone())
    })
    .await;
    assert!(message.contains("forbidden") && message.contains("secrets"), "{message}");
}
