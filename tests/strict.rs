//! Strict field validation (Kubernetes 1.27+) of everything keyward ships: the chart as
//! `helm template --kube-version <this server>` renders it (default values, and with the
//! NetworkPolicies, shards and `watchNamespace`; the ServiceMonitor and PrometheusRule
//! need the Prometheus operator's CRDs, which this cluster has not), every file in
//! `examples/` and every file in `crds/`. Each document goes to the live API server three
//! ways, each a server-side dry run: server-side apply with `fieldValidation=Strict` (the
//! raw response read for `Warning` headers), `kubectl apply --validate=strict`, and the
//! same with `--server-side` (kubectl's stderr read for `Warning:` lines). None may end in
//! an error or a warning. The namespace they go to enforces and warns on the restricted
//! Pod Security Standard, as keyward's does, so a pod template breaking it would warn too.
//! An unknown field shows that each way would catch one.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{TestNamespace, client};
use http_body_util::BodyExt;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

/// Field manager of these dry runs.
const MANAGER: &str = "keyward-tests-strict";

/// A YAML stream to check: where it comes from and its text.
struct Manifest {
    source: String,
    yaml: String,
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The YAML files of a directory of the repository, by name.
fn files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Everything to check, with namespaced objects in `ns` (the examples name `keyward-demo`,
/// which another test owns: their namespace is the only thing changed).
fn manifests(version: &str, ns: &str) -> Vec<Manifest> {
    let watch = format!("watchNamespace={ns}");
    let mut out: Vec<Manifest> = [
        vec![],
        vec!["networkPolicy.enabled=true", "controller.shards={a,b}"],
        vec![watch.as_str(), "crds.enabled=false", "verifier.replicas=1", "controller.leaderElect=false"],
    ]
    .into_iter()
    .map(|sets| Manifest {
        source: format!("helm template --kube-version {version} {}", sets.join(" ")),
        yaml: common::chart_template("kwstrict", ns, version, &sets),
    })
    .collect();
    for path in files("examples") {
        let yaml = std::fs::read_to_string(&path).unwrap();
        let yaml = yaml.replace("namespace: keyward-demo", &format!("namespace: {ns}"));
        out.push(Manifest { source: format!("examples/{}", path.file_name().unwrap().display()), yaml });
    }
    for path in files("crds") {
        let yaml = std::fs::read_to_string(&path).unwrap();
        out.push(Manifest { source: format!("crds/{}", path.file_name().unwrap().display()), yaml });
    }
    out
}

/// Where `doc` goes: its resource as the server serves it, and its namespace (`ns` when
/// namespaced and not named).
async fn resolve(client: &kube::Client, ns: &str, doc: &Value) -> (ApiResource, Option<String>) {
    let api_version = doc["apiVersion"].as_str().unwrap();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, doc["kind"].as_str().unwrap());
    let (resource, caps) =
        kube::discovery::pinned_kind(client, &gvk).await.expect("a kind the server serves");
    let namespace = match caps.scope {
        Scope::Namespaced => Some(doc["metadata"]["namespace"].as_str().unwrap_or(ns).to_string()),
        Scope::Cluster => None,
    };
    (resource, namespace)
}

/// Server-side apply of `doc` as a dry run, with `fieldValidation` Strict (else Warn): the
/// HTTP status, the `Warning` headers and the body.
async fn server_side_apply(
    client: &kube::Client,
    ns: &str,
    doc: &Value,
    strict: bool,
) -> (u16, Vec<String>, String) {
    let (resource, namespace) = resolve(client, ns, doc).await;
    let mut params = PatchParams::apply(MANAGER).force();
    params.dry_run = true;
    params = if strict { params.validation_strict() } else { params.validation_warn() };
    let name = doc["metadata"]["name"].as_str().unwrap();
    let request = kube::core::Request::new(DynamicObject::url_path(&resource, namespace.as_deref()))
        .patch(name, &params, &Patch::Apply(doc))
        .expect("a request");
    let response = client.send(request.map(kube::client::Body::from)).await.expect("an answer");
    let status = response.status().as_u16();
    let warnings = response
        .headers()
        .get_all("warning")
        .iter()
        .map(|w| String::from_utf8_lossy(w.as_bytes()).into())
        .collect();
    let body = response.into_body().collect().await.expect("the body").to_bytes();
    (status, warnings, String::from_utf8_lossy(&body).into())
}

/// `<resource>/<name>` (as kubectl names it) when `doc`'s object exists already without
/// kubectl's `last-applied-configuration` annotation (the CRDs, which the test harness
/// installs with server-side apply).
async fn exists_without_annotation(client: &kube::Client, ns: &str, doc: &Value) -> Option<String> {
    let (resource, namespace) = resolve(client, ns, doc).await;
    let api: Api<DynamicObject> = match &namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let name = doc["metadata"]["name"].as_str()?;
    let existing = api.get_opt(name).await.expect("read the object")?;
    let annotated = existing.annotations().contains_key("kubectl.kubernetes.io/last-applied-configuration");
    (!annotated).then(|| format!("{}/{name}", resource.plural))
}

/// `kubectl apply --validate=strict --dry-run=server` (`server_side`: also `--server-side
/// --force-conflicts`) of `yaml`: whether it succeeded, stdout, and its `Warning:` lines.
fn kubectl_apply(ns: &str, yaml: &str, server_side: bool) -> (bool, String, Vec<String>) {
    let file = std::env::temp_dir().join(format!("keyward-strict-{}.yaml", rand::random::<u64>()));
    std::fs::write(&file, yaml).unwrap();
    let path = file.display().to_string();
    let mut args = vec!["apply", "--validate=strict", "--dry-run=server", "-n", ns, "-f", path.as_str()];
    if server_side {
        args.extend(["--server-side", "--force-conflicts", "--field-manager", MANAGER]);
    }
    let out = Command::new("kubectl").args(&args).output().expect("kubectl");
    std::fs::remove_file(&file).ok();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut warnings: Vec<String> =
        stderr.lines().filter(|l| l.starts_with("Warning:")).map(String::from).collect();
    if !out.status.success() {
        warnings.push(stderr.into_owned());
    }
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), warnings)
}

/// kubectl's own note (not the API server's, and not about the manifest) when a
/// client-side apply meets an object that exists without its annotation: allowed for those
/// objects only (`exempt`, from [`exists_without_annotation`]).
fn kubectl_note_on_existing(line: &str, exempt: &[String]) -> bool {
    line.contains("is missing the kubectl.kubernetes.io/last-applied-configuration annotation")
        && exempt.iter().any(|r| line.starts_with(&format!("Warning: resource {r} is missing")))
}

#[tokio::test]
async fn the_chart_examples_and_crds_apply_strictly_without_an_error_or_a_warning() {
    let client = client().await;
    let version = common::server_version(&client).await;
    let ns = TestNamespace::restricted(&client, "strict").await;
    let mut problems = vec![];
    let (mut documents, mut set_aside, mut report) = (0, 0, vec![]);
    for manifest in manifests(&version, &ns.name) {
        let docs = common::yaml_docs(&manifest.yaml);
        let mut exempt = vec![];
        assert!(!docs.is_empty(), "{}: no documents", manifest.source);
        for doc in &docs {
            let what = format!("{} {}/{}", manifest.source, doc["kind"], doc["metadata"]["name"]);
            let (status, warnings, body) = server_side_apply(&client, &ns.name, doc, true).await;
            if !(200..300).contains(&status) || !warnings.is_empty() {
                problems.push(format!("{what}: server-side apply (Strict): {status} {warnings:?} {body}"));
            }
            exempt.extend(exists_without_annotation(&client, &ns.name, doc).await);
            documents += 1;
        }
        for server_side in [false, true] {
            let (ok, stdout, warnings) = kubectl_apply(&ns.name, &manifest.yaml, server_side);
            let mode = if server_side { "kubectl apply --server-side" } else { "kubectl apply" };
            let (notes, warnings): (Vec<_>, Vec<_>) =
                warnings.into_iter().partition(|w| !server_side && kubectl_note_on_existing(w, &exempt));
            set_aside += notes.len();
            if !ok || !warnings.is_empty() {
                problems.push(format!("{}: {mode} --validate=strict: {warnings:#?}", manifest.source));
            }
            let applied = stdout.lines().filter(|l| l.ends_with("(server dry run)")).count();
            if applied != docs.len() {
                problems.push(format!(
                    "{}: {mode}: {applied} of {} documents: {stdout}",
                    manifest.source,
                    docs.len()
                ));
            }
        }
        report.push(format!("{:<3} documents  {}", docs.len(), manifest.source));
    }
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
    eprintln!(
        "strict field validation on {version}: no error and no warning (server-side apply, kubectl apply, \
         kubectl apply --server-side), {documents} documents:\n{}\n(set aside: {set_aside} of kubectl's own notes \
         that an object the harness installed with server-side apply lacks its last-applied annotation)",
        report.join("\n")
    );
    assert!(documents > 40, "{documents} documents");
}

/// Each way above would catch a problem: an unknown field is refused (server-side apply
/// refuses it whatever the validation; kubectl with `--validate=strict`), and a Deployment
/// whose pods would break the restricted standard is applied with a warning, in the
/// `Warning` header and on kubectl's stderr.
#[tokio::test]
async fn each_way_refuses_an_unknown_field_and_shows_a_warning() {
    let client = client().await;
    let ns = TestNamespace::restricted(&client, "strictneg").await;
    let typo = json!({"apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": "typo"}, "spec": {"owner": "team", "lifetme": "P1D"}});
    let (status, _, body) = server_side_apply(&client, &ns.name, &typo, true).await;
    assert!(
        status >= 400 && body.contains("field not declared in schema") && body.contains("lifetme"),
        "{status} {body}"
    );
    eprintln!("unknown field, server-side apply: {status} {body}");
    for server_side in [false, true] {
        let (ok, _, warnings) = kubectl_apply(&ns.name, &serde_yaml::to_string(&typo).unwrap(), server_side);
        assert!(!ok && warnings.concat().contains("lifetme"), "server_side {server_side}: {warnings:?}");
        eprintln!("unknown field, kubectl (--server-side: {server_side}): {}", warnings.concat().trim());
    }

    // The example Deployment, its pods as root.
    let path = repo("examples/deployment-checkout.yaml");
    let mut deployment = common::yaml_docs(&std::fs::read_to_string(path).unwrap()).remove(0);
    deployment["metadata"]["namespace"] = json!(ns.name);
    deployment["spec"]["template"]["spec"]["securityContext"] = json!({"runAsUser": 0});
    // (The header quotes its text: `299 - "would violate PodSecurity \"restricted:latest\": …"`.)
    let violation = "would violate PodSecurity";
    let (status, warnings, body) = server_side_apply(&client, &ns.name, &deployment, true).await;
    assert!(status < 300 && warnings.iter().any(|w| w.contains(violation)), "{status} {warnings:?} {body}");
    eprintln!("pods as root, server-side apply: {status}, Warning: {warnings:?}");
    for server_side in [false, true] {
        let (ok, _, warnings) =
            kubectl_apply(&ns.name, &serde_yaml::to_string(&deployment).unwrap(), server_side);
        assert!(
            ok && warnings.iter().any(|w| w.contains(violation)),
            "server_side {server_side}: {warnings:?}"
        );
        eprintln!("pods as root, kubectl (--server-side: {server_side}): {}", warnings.concat());
    }
}
