//! The offline CEL check agrees with the live API server. `src/api/cel_tests.rs` evaluates
//! every CEL rule of the CRDs with a CEL engine over the rows of `src/api/cel_rows.rs`;
//! here the same rows go to the API server, with the CRDs as installed for it
//! (`common::client`): every valid row is admitted (a dry-run create; a row with an old
//! spec stores the old object, then updates it to the new one as a dry run, so transition
//! rules run), and every invalid row is refused as a CEL rule refuses it: `422 Invalid`,
//! one cause, with the rule's reason, its message and its field path (`fieldPath`
//! included), as the installed CRD states them.

mod common;

#[path = "../src/api/cel_rows.rs"]
mod cel_rows;

use cel_rows::{invalid_rows, object, valid_rows};
use common::{TestNamespace, client};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use keyward::api::{ApiKey, KeyPolicy};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, PostParams};
use kube::core::Status;
use serde_json::{Value, json};

/// The API server's answer to a row.
enum Answer {
    Admitted,
    Refused(Box<Status>),
}

/// The API for objects of `kind` (ApiKeys in the test's namespace).
fn api(client: &kube::Client, ns: &TestNamespace, kind: &str) -> Api<DynamicObject> {
    match kind {
        "ApiKey" => Api::namespaced_with(client.clone(), &ns.name, &ApiResource::erase::<ApiKey>(&())),
        _ => Api::all_with(client.clone(), &ApiResource::erase::<KeyPolicy>(&())),
    }
}

/// Row `spec` as a whole object named for row `index`: ApiKeys in the test's namespace,
/// KeyPolicies (cluster-scoped) under a name no other test uses.
fn row_object(ns: &TestNamespace, index: usize, kind: &str, spec: &Value) -> DynamicObject {
    let mut obj = object(kind, spec);
    let meta = obj["metadata"].as_object_mut().unwrap();
    if kind == "ApiKey" {
        meta.insert("name".into(), json!(format!("row-{index}")));
        meta.insert("namespace".into(), json!(ns.name));
    } else {
        meta.insert("name".into(), json!(format!("{}-row-{index}", ns.name)));
        meta.insert("labels".into(), json!({"keyward.dev/test": "true"}));
    }
    serde_json::from_value(obj).expect("row object")
}

/// Send row `index`: a dry-run create, or for a row with an old spec, the old object
/// stored and a dry-run update (PUT) to the new one. The stored KeyPolicy (a default one,
/// for the example re-applied) is deleted at once.
async fn send(
    client: &kube::Client,
    ns: &TestNamespace,
    index: usize,
    kind: &str,
    spec: &Value,
    old: Option<&Value>,
) -> Answer {
    let api = api(client, ns, kind);
    let dry = PostParams { dry_run: true, ..Default::default() };
    let mut new = row_object(ns, index, kind, spec);
    let answer = match old {
        None => api.create(&dry, &new).await,
        Some(old) => {
            let stored = api
                .create(&PostParams::default(), &row_object(ns, index, kind, old))
                .await
                .unwrap_or_else(|e| panic!("row {index}: storing the old object: {e}"));
            let name = new.metadata.name.clone().unwrap();
            if kind == "KeyPolicy" {
                ns.track_policy(&name);
            }
            new.metadata.resource_version = stored.metadata.resource_version;
            let answer = api.replace(&name, &dry, &new).await;
            if kind == "KeyPolicy" {
                api.delete(&name, &DeleteParams::default()).await.expect("delete the row's KeyPolicy");
            }
            answer
        }
    };
    match answer {
        Ok(_) => Answer::Admitted,
        Err(kube::Error::Api(status)) => Answer::Refused(status),
        Err(e) => panic!("row {index}: no answer from the API server: {e}"),
    }
}

/// The rule attached at `at` (`.spec.owner`) in the installed CRD of `kind`: (reason,
/// message, the field path the API server names).
async fn installed_rule(client: &kube::Client, kind: &str, at: &str) -> (String, String, String) {
    let crd = match kind {
        "ApiKey" => "apikeys.keyward.dev",
        _ => "keypolicies.keyward.dev",
    };
    let crd = Api::<CustomResourceDefinition>::all(client.clone()).get(crd).await.expect("read the CRD");
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap()["openAPIV3Schema"].clone();
    let node = at.split('.').skip(1).fold(schema, |node, field| node["properties"][field].clone());
    let rules = node["x-kubernetes-validations"].as_array().cloned().unwrap_or_default();
    assert_eq!(rules.len(), 1, "one rule installed at {kind} {at}: {rules:?}");
    let rule = &rules[0];
    let field = format!("{}{}", &at[1..], rule["fieldPath"].as_str().unwrap_or_default());
    let reason = rule["reason"].as_str().unwrap_or("FieldValueInvalid").to_string();
    (reason, rule["message"].as_str().unwrap().to_string(), field)
}

/// What is wrong with a refusal expected from a rule: nothing, or what differs.
fn refused_by_rule(
    status: &Status,
    (reason, message, field): &(String, String, String),
) -> Result<String, String> {
    let causes = status.details.as_ref().map(|d| d.causes.clone()).unwrap_or_default();
    let one = match &causes[..] {
        [one] => one,
        _ => return Err(format!("not one cause: {status:?}")),
    };
    let as_expected = status.code == 422
        && status.reason == "Invalid"
        && status.message.contains(message.as_str())
        && one.reason == *reason
        && one.field == *field
        && one.message.ends_with(message.as_str());
    let seen = format!(
        "{} {}: cause {} at {}: {:?}",
        status.code, status.reason, one.reason, one.field, one.message
    );
    if as_expected { Ok(seen) } else { Err(format!("expected {reason} at {field}: {message:?}; got {seen}")) }
}

#[tokio::test]
async fn the_offline_cel_rows_agree_with_the_live_api_server() {
    let client = client().await;
    let minor = common::server_minor(&client).await;
    if minor < keyward::api::CEL_MIN_MINOR {
        eprintln!(
            "skipped: 1.{minor} runs no CEL rules (the controller checks them there: tests/bad_input.rs)"
        );
        return;
    }
    let ns = TestNamespace::new(&client, "cellive").await;
    let (mut lines, mut disagreements) = (vec![], vec![]);
    let valid = valid_rows();
    for (index, (what, kind, spec, old)) in valid.iter().enumerate() {
        let update = if old.is_some() { "update" } else { "create" };
        match send(&client, &ns, index, kind, spec, old.as_ref()).await {
            Answer::Admitted => lines.push(format!("admitted  {kind:<9} {update}  {what}")),
            Answer::Refused(status) => {
                disagreements.push(format!("{what}: valid offline, refused: {status:?}"))
            }
        }
    }
    for (offset, (what, _, kind, spec, old, at)) in invalid_rows().into_iter().enumerate() {
        let rule = installed_rule(&client, kind, at).await;
        let update = if old.is_some() { "update" } else { "create" };
        match send(&client, &ns, valid.len() + offset, kind, &spec, old.as_ref()).await {
            Answer::Admitted => disagreements.push(format!("{what}: refused offline by {at}, admitted")),
            Answer::Refused(status) => match refused_by_rule(&status, &rule) {
                Ok(seen) => lines.push(format!("refused   {kind:<9} {update}  {what}: {seen}")),
                Err(e) => disagreements.push(format!("{what}: {e}")),
            },
        }
    }
    eprintln!("the rows of src/api/cel_rows.rs on the live API server (1.{minor}):\n{}", lines.join("\n"));
    assert!(
        disagreements.is_empty(),
        "the live API server disagrees with the offline check:\n{disagreements:#?}"
    );
    assert_eq!(lines.len(), valid.len() + invalid_rows().len());
}
