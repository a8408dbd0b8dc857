//! Leader election: two controllers against one API server — exactly one reconciles;
//! SIGKILL the leader and the other takes over within the lease duration, without a
//! double rotation; SIGTERM hands over at once; a leader whose API calls hang (SIGSTOP)
//! is replaced and, resumed, exits without writing anything.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{KeywardProcess, TestNamespace, client, get_key, metric_sum};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use keyward::api::{ApiKey, KeyPolicy};
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;

fn candidate(ns: &TestNamespace) -> KeywardProcess {
    common::controller_for(&ns.name, &["--lease-duration", "PT4S"], "info")
}

fn leads(k: &KeywardProcess) -> bool {
    k.get("/metrics").is_some_and(|(_, m)| metric_sum(&m, "keyward_leader") == 1.0)
}

/// Two candidates for one lease, both ready.
async fn two_candidates(ns: &TestNamespace) -> (KeywardProcess, KeywardProcess) {
    let (a, b) = (candidate(ns), candidate(ns));
    a.wait_ready().await;
    b.wait_ready().await;
    (a, b)
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
    let (a, b) = two_candidates(&ns).await;
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

/// Every object the controller of `ns` may write, by "kind/namespace/name": its
/// resourceVersion. Any create, update or delete changes the map.
async fn written(client: &Client, ns: &str, policy: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let lp = ListParams::default();
    let mut put = |kind: &str, namespace: &str, name: String, rv: Option<String>| {
        out.insert(format!("{kind}/{namespace}/{name}"), rv.unwrap_or_default());
    };
    for o in Api::<ApiKey>::namespaced(client.clone(), ns).list(&lp).await.unwrap() {
        put("ApiKey", ns, o.name_any(), o.resource_version());
    }
    for o in Api::<Secret>::namespaced(client.clone(), ns).list(&lp).await.unwrap() {
        put("Secret", ns, o.name_any(), o.resource_version());
    }
    for o in Api::<Lease>::namespaced(client.clone(), ns).list(&lp).await.unwrap() {
        put("Lease", ns, o.name_any(), o.resource_version());
    }
    for o in Api::<Event>::namespaced(client.clone(), ns).list(&lp).await.unwrap() {
        put("Event", ns, o.name_any(), o.resource_version());
    }
    // The policy, and its Events (kept in kube-system, shared with other tests).
    let p = Api::<KeyPolicy>::all(client.clone()).get(policy).await.unwrap();
    put("KeyPolicy", "", p.name_any(), p.resource_version());
    for o in Api::<Event>::namespaced(client.clone(), "kube-system").list(&lp).await.unwrap() {
        if o.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(policy) {
            put("Event", "kube-system", o.name_any(), o.resource_version());
        }
    }
    out
}

/// Key ID → every (slot, createdAt in ms) it was listed with.
type Listed = BTreeMap<String, BTreeSet<(String, i64)>>;

/// Every key ever listed in ApiKey `ns/name`'s status, from a watch (which sees every
/// version of the object): key ID → every (slot, createdAt in ms) it was listed with.
/// Stops when dropped.
fn record_keys(client: &Client, ns: &str, name: &str) -> (Arc<Mutex<Listed>>, AbortOnDrop) {
    let keys: Arc<Mutex<Listed>> = Default::default();
    let api = Api::<ApiKey>::namespaced(client.clone(), ns);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let sink = keys.clone();
    let task = tokio::spawn(async move {
        let mut versions = std::pin::pin!(watcher(api, cfg).applied_objects());
        while let Some(key) = versions.next().await {
            let Ok(key) = key else { continue };
            for k in key.status.iter().flat_map(|s| s.keys.iter()) {
                let entry = (format!("{:?}", k.slot), k.created_at.timestamp_millis());
                sink.lock().unwrap().entry(k.key_id.clone()).or_default().insert(entry);
            }
        }
    });
    (keys, AbortOnDrop(task))
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_api_calls_hang_is_replaced_and_never_writes_beside_its_successor() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "hang").await;
    // A key every 4 s (lifetime 8 s, the secondary at half-life).
    let policy =
        ns.policy(&client, "p", json!({"expiry": {"maxLifetime": "PT8S", "minLifetime": "PT1S"}})).await;
    let (a, b) = two_candidates(&ns).await;
    let first = common::eventually("one leader", Duration::from_secs(30), || async {
        match (leads(&a), leads(&b)) {
            (true, false) => Some(a.addr.clone()),
            (false, true) => Some(b.addr.clone()),
            _ => None,
        }
    })
    .await;
    let (mut leader, successor) = if first == a.addr { (a, b) } else { (b, a) };
    let (issued, _watch) = record_keys(&client, &ns.name, "svc");
    ns.apikey(&client, "svc", json!({"policy": policy, "owner": "a"})).await;
    let ids = |key: &ApiKey| -> BTreeSet<String> {
        key.status.iter().flat_map(|s| s.keys.iter()).map(|k| k.key_id.clone()).collect()
    };
    // The first leader issues the primary and then the secondary.
    let before_pause = common::wait_key(&client, &ns.name, "svc", Duration::from_secs(30), |k| {
        let ids = ids(k);
        (ids.len() >= 2).then_some(ids)
    })
    .await;
    assert!(reconciles(&leader) > 0.0 && reconciles(&successor) == 0.0, "only the leader reconciles");

    // Freeze the leader: everything it has in flight, renewals included, hangs.
    let paused = Instant::now();
    leader.signal("STOP");
    common::eventually("the successor to take over", Duration::from_secs(20), || async {
        leads(&successor).then_some(())
    })
    .await;
    let takeover = paused.elapsed();
    eprintln!("takeover after SIGSTOP of the leader: {takeover:?}");
    // Not before the lease duration (4 s) less one renewal period (0.67 s) since the last
    // renewal the standby saw; within the lease duration plus two renewal periods.
    assert!(takeover >= Duration::from_secs(3), "no early takeover: {takeover:?}");
    assert!(takeover < Duration::from_secs(8), "takeover within the lease duration: {takeover:?}");
    // The successor writes: it issues a key of its own.
    common::wait_key(&client, &ns.name, "svc", Duration::from_secs(20), |k| {
        ids(k).iter().any(|id| !before_pause.contains(id)).then_some(())
    })
    .await;
    assert!(reconciles(&successor) > 0.0, "the successor reconciles");

    // Freeze the successor too, so whatever is written from here on can only come from the
    // old leader; once the successor's last requests have landed, take stock.
    successor.signal("STOP");
    let before =
        common::eventually("the frozen successor's last writes to land", Duration::from_secs(10), || {
            let client = client.clone();
            let (ns, policy) = (ns.name.clone(), policy.clone());
            async move {
                let first = written(&client, &ns, &policy).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                let second = written(&client, &ns, &policy).await;
                (first == second).then_some(second)
            }
        })
        .await;
    // Let the next rotation fall due, so the old leader has work waiting when it resumes
    // (its requeue timers fire at once) and nobody else does it first. Meanwhile the
    // frozen successor's claim runs out too.
    let due = get_key(&client, &ns.name, "svc").await.status.and_then(|s| s.next_action_at);
    if let Some(due) = due {
        common::eventually("the next rotation to fall due", Duration::from_secs(15), || async move {
            (chrono::Utc::now() > due + chrono::Duration::milliseconds(300)).then_some(())
        })
        .await;
    }
    // Resume the old leader: it finds its renew deadline long gone and exits at once,
    // without a single write (the Lease included), though a rotation is overdue and the
    // Lease is free by anybody's clock.
    let resumed = Instant::now();
    leader.signal("CONT");
    let after =
        common::eventually("the resumed leader to exit (or to write)", Duration::from_secs(20), || {
            let exited = leader.exited();
            let (client, ns, policy, before) =
                (client.clone(), ns.name.clone(), policy.clone(), before.clone());
            async move {
                let now = written(&client, &ns, &policy).await;
                (exited || now != before).then_some(now)
            }
        })
        .await;
    let logs = leader.logs();
    let changed: Vec<_> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .chain(before.keys().filter(|k| !after.contains_key(*k)).cloned())
        .collect();
    assert!(changed.is_empty(), "the resumed leader wrote {changed:?}; its log:\n{logs}");
    let status = leader.wait_exit(Duration::from_secs(10)).await;
    eprintln!("the resumed leader exited after {:?}: {status}", resumed.elapsed());
    successor.signal("CONT");
    assert!(!status.success(), "a leader that lost its lease exits with an error: {status}");
    assert!(logs.contains("lost the leader lease"), "it says why:\n{logs}");
    eprintln!(
        "writes the resumed leader's gate refused before it exited: {}",
        logs.matches("refused a write").count()
    );

    // One writer at a time over the whole run: the keys of a slot a lifetime (8 s) apart,
    // never two for the same step (two writers would each issue one).
    let listed = issued.lock().unwrap().clone();
    eprintln!("keys issued: {listed:?}");
    let keys: BTreeMap<&String, &(String, i64)> = listed
        .iter()
        .map(|(id, seen)| {
            assert_eq!(seen.len(), 1, "key {id} issued once: {listed:?}");
            (id, seen.first().unwrap())
        })
        .collect();
    for slot in keys.values().map(|(s, _)| s).collect::<BTreeSet<_>>() {
        let mut times: Vec<i64> = keys.values().filter(|(s, _)| s == slot).map(|(_, t)| *t).collect();
        times.sort();
        for pair in times.windows(2) {
            assert!(pair[1] - pair[0] >= 4_000, "two {slot} keys {} ms apart: {keys:?}", pair[1] - pair[0]);
        }
    }
    assert!(keys.len() >= 3, "keys were issued before and after the takeover: {keys:?}");
}

/// The Lease `name` in `ns`, as a holder with a clock `year`s away writes it.
fn skewed_lease(name: &str, renewed: &str) -> Lease {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"holderIdentity": "skewed", "leaseDurationSeconds": 2, "renewTime": renewed,
                 "acquireTime": renewed, "leaseTransitions": 0}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_with_a_skewed_clock_keeps_the_lease_while_it_renews_and_loses_it_when_it_stops() {
    use keyward::leader::{Elector, LeaseConfig};
    let client = client().await;
    let ns = TestNamespace::new(&client, "skew").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    // A holder whose clock is 25 years behind, then one 73 years ahead: its renewTime says
    // nothing about whether it is alive; only whether the record changes does.
    for (name, year) in [("behind", 2001), ("ahead", 2099)] {
        let start = format!("{year}-01-01T00:00:00.000000Z");
        leases.create(&Default::default(), &skewed_lease(name, &start)).await.unwrap();
        let renewer = {
            let leases = leases.clone();
            AbortOnDrop(tokio::spawn(async move {
                for i in 1u32.. {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let Ok(mut lease) = leases.get(name).await else { continue };
                    let t = format!("{year}-01-01T00:{:02}:{:02}.000000Z", i / 60 % 60, i % 60);
                    lease.spec.as_mut().unwrap().renew_time = Some(serde_json::from_value(json!(t)).unwrap());
                    let _ = leases.replace(name, &Default::default(), &lease).await;
                }
            }))
        };
        let cfg = LeaseConfig {
            name: name.into(),
            namespace: ns.name.clone(),
            identity: "candidate".into(),
            duration: Duration::from_secs(2),
        };
        let candidate = Elector::new(client.clone(), cfg);
        // Three lease durations of renewals: the candidate never takes over.
        let early = tokio::time::timeout(Duration::from_secs(6), candidate.acquire()).await;
        assert!(early.is_err(), "{name}: took the Lease of a holder that renews it");
        let holder = leases.get(name).await.unwrap().spec.unwrap().holder_identity;
        assert_eq!(holder.as_deref(), Some("skewed"), "{name}");
        // The holder stops: the candidate takes over one lease duration after it last saw
        // the record change (the last renewal was at most 300 ms before this).
        drop(renewer);
        let stopped = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), candidate.acquire())
            .await
            .unwrap_or_else(|_| panic!("{name}: a holder that stopped renewing keeps the Lease"));
        let took = stopped.elapsed();
        eprintln!("clock {name}: took over {took:?} after the holder stopped renewing");
        assert!(took >= Duration::from_millis(1500), "{name}: waited the lease duration: {took:?}");
        assert!(took < Duration::from_secs(4), "{name}: took over in time: {took:?}");
        assert!(candidate.is_leading());
        let holder = leases.get(name).await.unwrap().spec.unwrap().holder_identity;
        assert_eq!(holder.as_deref(), Some("candidate"), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gated_client_refuses_writes_once_the_renew_deadline_has_passed() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use keyward::leader::{Elector, LeaseConfig};
    let client = client().await;
    let ns = TestNamespace::new(&client, "gate").await;
    let cfg = LeaseConfig {
        name: "gate".into(),
        namespace: ns.name.clone(),
        identity: "me".into(),
        duration: Duration::from_secs(1),
    };
    let elector = Elector::new(client.clone(), cfg);
    tokio::time::timeout(Duration::from_secs(10), elector.acquire()).await.expect("a free Lease is taken");
    let gated: Api<ConfigMap> = Api::namespaced(elector.gated_client(client.clone()), &ns.name);
    let cm =
        |name: &str| -> ConfigMap { serde_json::from_value(json!({"metadata": {"name": name}})).unwrap() };
    gated.create(&Default::default(), &cm("while-leading")).await.expect("the leader writes");
    // Nobody renews (no hold()): the gate closes two thirds of a second after the
    // acquisition started, and stays closed.
    common::eventually("the renew deadline to pass", Duration::from_secs(5), || async {
        (!elector.is_leading()).then_some(())
    })
    .await;
    let refused = gated.create(&Default::default(), &cm("after-the-deadline")).await;
    let err = refused.expect_err("a write after the renew deadline");
    assert!(err.to_string().contains("not the leader"), "{err}");
    let names: Vec<String> = gated
        .list(&ListParams::default())
        .await
        .expect("reads pass")
        .items
        .iter()
        .map(|c| c.name_any())
        .collect();
    assert!(names.contains(&"while-leading".to_string()), "{names:?}");
    let raw: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    assert!(raw.get_opt("after-the-deadline").await.unwrap().is_none(), "never written");
    assert!(raw.get_opt("while-leading").await.unwrap().is_some());
}
