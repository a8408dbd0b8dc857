//! Leader election: two controllers against one API server — exactly one reconciles;
//! SIGKILL the leader and the other takes over within the lease duration, without a
//! double rotation; SIGTERM hands over at once.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{KeywardProcess, TestNamespace, client, get_key, metric_sum};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use serde_json::json;

fn candidate(ns: &TestNamespace) -> KeywardProcess {
    common::controller_for(&ns.name, &["--lease-duration", "PT4S"], "info")
}

fn leads(k: &KeywardProcess) -> bool {
    k.get("/metrics").is_some_and(|(_, m)| metric_sum(&m, "keyward_leader") == 1.0)
}

fn reconciles(k: &KeywardProcess) -> f64 {
    k.get("/metrics").map_or(0.0, |(_, m)| metric_sum(&m, "keyward_reconciles_total"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_reconciles_and_a_killed_leader_is_replaced_in_time() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "leader").await;
    let policy =
        ns.policy(&client, "p", json!({"expiry": {"maxLifetime": "PT8S", "minLifetime": "PT1S"}})).await;
    let a = candidate(&ns);
    let b = candidate(&ns);
    a.wait_ready().await;
    b.wait_ready().await;
    let (first, _) = common::eventually("one leader", Duration::from_secs(30), || async {
        match (leads(&a), leads(&b)) {
            (true, false) => Some((a.addr.clone(), b.addr.clone())),
            (false, true) => Some((b.addr.clone(), a.addr.clone())),
            _ => None,
        }
    })
    .await;
    let (leader, standby) = if first == a.addr { (a, b) } else { (b, a) };
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "a"})).await;
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut observe = |key: &keyward::api::ApiKey| {
        for k in key.status.iter().flat_map(|s| s.keys.iter()) {
            seen.insert(k.key_id.clone());
        }
    };
    // Let a few cycles run under the first leader.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        observe(&get_key(&client, &ns.name, "svc").await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(reconciles(&leader) > 0.0, "the leader reconciles");
    assert_eq!(reconciles(&standby), 0.0, "the standby does not");

    // SIGKILL the leader: the standby takes over within the lease duration (4 s) plus
    // one renewal interval.
    let killed = Instant::now();
    drop(leader);
    common::eventually("the standby to take over", Duration::from_secs(20), || async {
        leads(&standby).then_some(())
    })
    .await;
    let handover = killed.elapsed();
    eprintln!("takeover after SIGKILL: {handover:?}");
    assert!(handover < Duration::from_secs(8), "takeover within the lease duration: {handover:?}");
    // The killed process comes back and waits as a standby.
    let leader = candidate(&ns);
    leader.wait_ready().await;
    assert!(!leads(&leader), "the restarted process waits as standby");
    let resumed = Instant::now();
    while resumed.elapsed() < Duration::from_secs(10) {
        observe(&get_key(&client, &ns.name, "svc").await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // No double rotation: every key issued shows up once among the Events' notes
    // ("issued <slot> key <id>"; one Event per reconcile, whatever its headline reason),
    // and the count matches one key per half-lifetime (4 s) over the whole run.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let created: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.note)
        .flat_map(|note| {
            note.split("; ").filter(|p| p.starts_with("issued ")).map(str::to_string).collect::<Vec<_>>()
        })
        .collect();
    let distinct: BTreeSet<&String> = created.iter().collect();
    assert_eq!(distinct.len(), created.len(), "no key issued twice: {created:?}");
    let elapsed = started.elapsed().as_secs_f64();
    let expected = elapsed / 4.0 + 1.0;
    assert!(
        (seen.len() as f64) <= expected + 1.5,
        "{} keys in {elapsed:.0} s, expected about {expected:.0}: no double rotation",
        seen.len()
    );
    // SIGTERM releases the lease: the waiting process takes over at once.
    let mut standby = standby;
    let released = Instant::now();
    assert!(standby.terminate().await.success());
    common::eventually("a quick hand-over after SIGTERM", Duration::from_secs(10), || async {
        leads(&leader).then_some(())
    })
    .await;
    eprintln!("hand-over after SIGTERM: {:?}", released.elapsed());
    assert!(released.elapsed() < Duration::from_secs(4), "released, not waited out");
}
