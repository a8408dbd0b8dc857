//! Scale (issue 16) on the real API server: the controller's per-ApiKey work must not
//! grow with the number of ApiKeys. Its indexes count every ApiKey they hand out
//! (`keyward_controller_index_visits_total`); a reconcile or event of one ApiKey that
//! touched every ApiKey would show here as hundreds of visits.

mod common;

use std::time::Duration;

use common::{TestNamespace, client, get_key, metric_sum};
use keyward::api::ApiKey;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

const KEYS: usize = 150;

fn visits(controller: &common::KeywardProcess) -> f64 {
    metric_sum(&controller.get("/metrics").expect("metrics").1, "keyward_controller_index_visits_total")
}

/// The visits once they stop changing (two seconds without a visit), or a panic after `timeout`.
async fn settled_visits(controller: &common::KeywardProcess, what: &str, timeout: Duration) -> f64 {
    common::eventually(what, timeout, || async {
        let before = visits(controller);
        tokio::time::sleep(Duration::from_secs(2)).await;
        (visits(controller) == before).then_some(before)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_one_apikey_among_many_visits_only_its_owners_keys() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "scale").await;
    let policy = ns
        .policy(&client, "p", json!({"expiry": {"maxLifetime": "P1D"}, "limits": {"maxKeysPerOwner": 5}}))
        .await;
    let controller = common::controller_for(&ns.name, &[], "warn");
    let api: Api<ApiKey> = Api::namespaced(client.clone(), &ns.name);
    // KEYS ApiKeys, each with an owner of its own, except three of "shared".
    for i in 0..KEYS {
        let owner = if i < 3 { "shared".to_string() } else { format!("team-{i}") };
        let key: ApiKey = serde_json::from_value(json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": format!("k{i}")}, "spec": {"policy": policy, "owner": owner}
        }))
        .unwrap();
        api.create(&PostParams::default(), &key).await.expect("create ApiKey");
    }
    common::eventually("every ApiKey to hold a key", Duration::from_secs(180), || async {
        let list = api.list(&Default::default()).await.ok()?;
        let ready = list.items.iter().filter(|k| common::active(k).is_some()).count();
        (ready == KEYS).then_some(())
    })
    .await;
    // Settled: nothing left to do, so nothing visits.
    let settled = settled_visits(&controller, "the controller to settle", Duration::from_secs(60)).await;

    // Edit one ApiKey of "shared": its reconcile checks its owner's limit and the edit
    // re-checks the owner's other ApiKeys. Three ApiKeys concern it, not KEYS.
    common::patch_key(&client, &ns.name, "k0", json!({"spec": {"description": "edited"}})).await;
    let generation = get_key(&client, &ns.name, "k0").await.metadata.generation;
    common::eventually("the edit reconciled", Duration::from_secs(30), || async {
        let k = get_key(&client, &ns.name, "k0").await;
        let observed = k.status?.conditions.iter().find(|c| c.type_ == "Ready")?.observed_generation;
        (observed == generation).then_some(())
    })
    .await;
    // Let the re-checks of the two other "shared" ApiKeys run too.
    let after = settled_visits(&controller, "the re-checks to settle", Duration::from_secs(30)).await;
    let delta = after - settled;
    eprintln!("{KEYS} ApiKeys: one edit visited {delta} through the indexes");
    assert!(delta >= 3.0, "the owner's ApiKeys are visited: {delta}");
    assert!(delta <= 20.0, "one edit visited {delta} ApiKeys of {KEYS}: a scan, not an index");
}
