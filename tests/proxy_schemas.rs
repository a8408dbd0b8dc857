//! The proxy examples no binary here can run, checked against their published schemas:
//! the Envoy bootstraps (`examples/proxies/envoy-*.yaml`) against Envoy's v3 API, the
//! `.proto` files the `envoy-types` crate ships, compiled here with `protox` and read
//! with `prost-reflect` (every `@type` resolved, unknown fields and bad enum names
//! refused, as `envoy --mode validate` would for these; field-level rules of
//! protoc-gen-validate, such as required fields, are not checked); the Traefik and Istio
//! examples against the JSON schemas vendored in `tests/schemas/` (see its README).

use std::path::PathBuf;

use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, ReflectMessage};
use serde::Deserialize;

/// The triple of the machine this runs on (`rustc -vV`'s `host`), the rustc beside the
/// cargo that built this test.
fn host_triple() -> String {
    let rustc = PathBuf::from(env!("CARGO")).with_file_name("rustc");
    let rustc = if rustc.exists() { rustc } else { PathBuf::from("rustc") };
    let out = std::process::Command::new(rustc).arg("-vV").output().expect("rustc -vV");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().find_map(|l| l.strip_prefix("host: ")).expect("rustc -vV names its host").to_string()
}

/// The `proto/` directory of the `envoy-types` crate this build uses. Offline and for
/// this platform only: the sources of crates only other platforms use (never built
/// here) need not be on the machine.
fn envoy_protos() -> PathBuf {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline", "--filter-platform", &host_triple()])
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .output()
        .expect("cargo metadata");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let manifest = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "envoy-types")
        .and_then(|p| p["manifest_path"].as_str())
        .expect("envoy-types in the dependency graph");
    PathBuf::from(manifest).parent().unwrap().join("proto")
}

/// Envoy's API: the bootstrap and every extension the examples name.
fn envoy_pool() -> DescriptorPool {
    let root = envoy_protos();
    let includes: Vec<PathBuf> = [
        "data-plane-api",
        "xds",
        "googleapis",
        "protoc-gen-validate",
        "cel-spec/proto",
        "opentelemetry-proto",
        "client_model",
    ]
    .iter()
    .map(|d| root.join(d))
    .filter(|d| d.exists())
    .collect();
    let files = [
        "envoy/config/bootstrap/v3/bootstrap.proto",
        "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
        "envoy/extensions/filters/http/ext_authz/v3/ext_authz.proto",
        "envoy/extensions/filters/http/header_mutation/v3/header_mutation.proto",
        "envoy/extensions/filters/http/router/v3/router.proto",
        "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
    ];
    let set = protox::compile(files, includes).expect("Envoy's protos compile");
    DescriptorPool::from_file_descriptor_set(set).expect("a descriptor pool")
}

/// Parse `yaml` as a `message` of `pool`, strictly.
fn parse(pool: &DescriptorPool, message: &str, yaml: &str) -> Result<DynamicMessage, String> {
    let value: serde_json::Value = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
    let desc = pool.get_message_by_name(message).expect(message);
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    DynamicMessage::deserialize_with_options(desc, value, &options).map_err(|e| e.to_string())
}

fn example(name: &str) -> String {
    std::fs::read_to_string(format!("{}/examples/proxies/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn the_envoy_examples_are_valid_envoy_v3_bootstraps_and_ask_keyward_its_way() {
    let pool = envoy_pool();
    const BOOTSTRAP: &str = "envoy.config.bootstrap.v3.Bootstrap";
    for name in ["envoy-grpc.yaml", "envoy-http.yaml"] {
        let text = example(name);
        let msg = parse(&pool, BOOTSTRAP, &text).unwrap_or_else(|e| panic!("{name}: {e}"));
        // Round trip through protobuf JSON: every typed_config resolved to its message.
        let json = serde_json::to_value(&msg).unwrap().to_string();
        assert!(json.contains("envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"), "{name}");
        assert_eq!(msg.descriptor().full_name(), BOOTSTRAP);
        match name {
            "envoy-grpc.yaml" => {
                // The per-route scope is the context extension the verifier reads, and
                // the verifier is asked on the chart's gRPC port.
                let ext = keyward::verifier::request::SCOPE_EXTENSION;
                assert!(json.contains(&format!(r#""contextExtensions":{{"{ext}":"admin"}}"#)), "{json}");
                assert!(json.contains(r#""portValue":9001"#) && json.contains("grpcHealthCheck"), "{json}");
            }
            _ => {
                assert!(json.contains(r#""pathPrefix":"/v1/auth""#), "{json}");
                assert!(json.contains(r#""key":"x-keyward-require-scope","value":"admin""#), "{json}");
                assert!(json.contains(r#""requestHeadersToRemove":["authorization","x-api-key"]"#), "{json}");
            }
        }
    }
    // The check refuses what Envoy would: a misspelled field, an unknown @type, a bad enum.
    let grpc = example("envoy-grpc.yaml");
    for (from, to) in [
        ("failure_mode_allow: false", "failure_mode_alow: false"),
        ("ext_authz.v3.ExtAuthzPerRoute", "ext_authz.v3.ExtAuthzPerRoot"),
        ("transport_api_version: V3", "transport_api_version: V4"),
    ] {
        assert!(grpc.contains(from), "{from}");
        let broken = grpc.replace(from, to);
        let err = parse(&pool, BOOTSTRAP, &broken).expect_err(to);
        eprintln!("{to}: refused: {err}");
    }
}

/// The documents of a multi-document YAML file.
fn documents(text: &str) -> Vec<serde_json::Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
        .filter(|v: &serde_json::Value| !v.is_null())
        .collect()
}

/// A validator for `tests/schemas/<file>`.
fn schema(file: &str) -> jsonschema::Validator {
    let path = format!("{}/tests/schemas/{file}", env!("CARGO_MANIFEST_DIR"));
    let schema: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    jsonschema::validator_for(&schema).expect(file)
}

fn errors(v: &jsonschema::Validator, doc: &serde_json::Value) -> Vec<String> {
    v.iter_errors(doc).map(|e| format!("{} at {}", e, e.instance_path())).collect()
}

#[test]
fn the_traefik_and_istio_examples_match_their_published_schemas() {
    let traefik = schema("traefik-middlewarespec.schema.json");
    let docs = documents(&example("traefik.yaml"));
    assert_eq!(docs.len(), 3);
    for doc in &docs {
        assert_eq!(
            (doc["apiVersion"].as_str(), doc["kind"].as_str()),
            (Some("traefik.io/v1alpha1"), Some("Middleware"))
        );
        assert_eq!(errors(&traefik, &doc["spec"]), Vec::<String>::new(), "{doc}");
        if let Some(address) = doc["spec"]["forwardAuth"]["address"].as_str() {
            assert!(
                address.starts_with("http://keyward-verifier.keyward-system.svc:8081/v1/auth"),
                "{address}"
            );
            assert_eq!(doc["spec"]["forwardAuth"]["trustForwardHeader"], false);
        }
    }
    let istio = schema("istio-authorizationpolicy.schema.json");
    let docs = documents(&example("istio.yaml"));
    assert_eq!(docs.len(), 2);
    for doc in &docs {
        assert_eq!(errors(&istio, doc), Vec::<String>::new(), "{doc}");
        assert_eq!(doc["spec"]["action"], "CUSTOM");
    }
    // A misspelled field is refused by both.
    let mut bad = documents(&example("traefik.yaml")).remove(0);
    bad["spec"]["forwardAuth"]["adress"] = bad["spec"]["forwardAuth"]["address"].take();
    assert!(!errors(&traefik, &bad["spec"]).is_empty(), "adress refused");
    let mut bad = documents(&example("istio.yaml")).remove(0);
    bad["spec"]["provider"]["nmae"] = serde_json::json!("keyward-grpc");
    assert!(!errors(&istio, &bad).is_empty(), "nmae refused");
}
