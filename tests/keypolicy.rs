//! KeyPolicy status from a cluster-wide controller: `Accepted` with its reasons,
//! `maxLifetimeSince` and `keyCount`. One test (it runs the only cluster-wide
//! keyward of the suite, and marks policies default).

mod common;

use std::time::Duration;

use common::{KeywardProcess, TestNamespace, client};
use keyward::api::KeyPolicy;
use kube::Client;
use kube::api::{Api, DeleteParams};
use serde_json::json;

async fn accepted(client: &Client, name: &str) -> (String, String, KeyPolicy) {
    let (p, c) = common::policy_accepted(client, name, None, Duration::from_secs(60)).await;
    (c.status.to_string(), c.reason.to_string(), p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_report_accepted_since_and_key_count() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "policy").await;
    let valid = ns.policy(&client, "valid", json!({"expiry": {"maxLifetime": "P30D"}})).await;
    let bad_duration = ns.policy(&client, "baddur", json!({"expiry": {"maxLifetime": "banana"}})).await;
    // Servers that run the CRD's CEL rules refuse a Disabled policy without
    // acknowledgeRisk at admission; on older ones the controller refuses it.
    let cel = common::server_minor(&client).await >= keyward::api::CEL_MIN_MINOR;
    let no_ack_spec = json!({"expiry": {"mode": "Disabled"}});
    let no_ack = if cel {
        let obj: KeyPolicy = serde_json::from_value(json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "KeyPolicy",
            "metadata": {"name": format!("{}-noack", ns.name)}, "spec": no_ack_spec
        }))
        .unwrap();
        let refused =
            Api::<KeyPolicy>::all(client.clone()).create(&Default::default(), &obj).await.unwrap_err();
        assert!(
            refused.to_string().contains("expiry.mode Disabled requires expiry.acknowledgeRisk: true"),
            "{refused}"
        );
        None
    } else {
        Some(ns.policy(&client, "noack", no_ack_spec).await)
    };
    let ack =
        ns.policy(&client, "ack", json!({"expiry": {"mode": "Disabled", "acknowledgeRisk": true}})).await;
    ns.apikey(&client, "one", json!({"policy": valid, "owner": "a"})).await;
    ns.apikey(&client, "two", json!({"policy": valid, "owner": "b"})).await;
    let _keyward = KeywardProcess::start(&["controller"], "info");

    let (s, r, p) = accepted(&client, &valid).await;
    assert_eq!((s.as_str(), r.as_str()), ("True", "Valid"));
    let status = p.status.clone().unwrap();
    assert_eq!(status.observed_max_lifetime.as_deref(), Some("P30D"));
    let created = p.metadata.creation_timestamp.as_ref().unwrap().0.as_second();
    assert_eq!(status.max_lifetime_since.unwrap().timestamp(), created, "first sight counts from creation");
    common::eventually("keyCount 2", Duration::from_secs(90), || async {
        let p = Api::<KeyPolicy>::all(client.clone()).get(&valid).await.ok()?;
        (p.status?.key_count == 2).then_some(())
    })
    .await;

    // A deleted ApiKey leaves the count at once (the same watch event, not a refresh).
    Api::<keyward::api::ApiKey>::namespaced(client.clone(), &ns.name)
        .delete("two", &DeleteParams::default())
        .await
        .unwrap();
    common::eventually("keyCount 1 after a deletion", Duration::from_secs(10), || async {
        let p = Api::<KeyPolicy>::all(client.clone()).get(&valid).await.ok()?;
        (p.status?.key_count == 1).then_some(())
    })
    .await;

    let (s, r, _) = accepted(&client, &bad_duration).await;
    assert_eq!((s.as_str(), r.as_str()), ("False", "InvalidDuration"));
    if let Some(no_ack) = &no_ack {
        let (s, r, _) = accepted(&client, no_ack).await;
        assert_eq!((s.as_str(), r.as_str()), ("False", "RiskNotAcknowledged"));
    }
    let (s, _, _) = accepted(&client, &ack).await;
    assert_eq!(s, "True");

    // One-minute keys flip 15 s before they end, less than the default minFlipLead (2 min):
    // accepted and used, with the reason, a Warning Event, and a note on the ApiKey.
    let short =
        ns.policy(&client, "short", json!({"expiry": {"maxLifetime": "PT1M", "minLifetime": "PT1S"}})).await;
    let (s, r, p) = accepted(&client, &short).await;
    assert_eq!((s.as_str(), r.as_str()), ("True", "FlipLeadBelowMinimum"));
    let message =
        keyward::api::find_condition(&p.status.unwrap().conditions, "Accepted").unwrap().message.clone();
    assert!(
        message.contains("flip as little as PT15S before they end") && message.contains("minFlipLead PT2M"),
        "{message}"
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "kube-system");
    common::eventually("a FlipLeadBelowMinimum Warning", Duration::from_secs(30), || async {
        let found = events.list(&Default::default()).await.ok()?.items.into_iter().any(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(short.as_str())
                && e.reason.as_deref() == Some("FlipLeadBelowMinimum")
                && e.type_.as_deref() == Some("Warning")
        });
        found.then_some(())
    })
    .await;
    ns.apikey(&client, "quick", json!({"policy": short, "owner": "q"})).await;
    common::wait_ready(&client, &ns.name, "quick", Duration::from_secs(60)).await;
    // From the start the ApiKey says its keys can flip with too little lead; the flip at
    // 45 s leaves the first key 15 s: then it says that, until that key ends.
    let details = common::get_key(&client, &ns.name, "quick").await.status.unwrap().details.unwrap();
    assert!(details.contains("lifetime PT1M flip as little as PT15S before they end"), "{details}");
    let details = common::wait_key(&client, &ns.name, "quick", Duration::from_secs(90), |k| {
        let details = k.status.as_ref()?.details.clone()?;
        details.contains("the flip to the Secondary key").then_some(details)
    })
    .await;
    assert!(details.contains("less than rotation.minFlipLead PT2M"), "{details}");
    // (Flips are scheduled to the millisecond and run a moment after: 14 or 15 s, rounded.)
    assert!(
        details.contains("came PT15S before the Primary key") || details.contains("came PT14S"),
        "{details}"
    );

    // Changing maxLifetime moves maxLifetimeSince to the change.
    let api: Api<KeyPolicy> = Api::all(client.clone());
    let before = chrono::Utc::now();
    api.patch(
        &valid,
        &Default::default(),
        &kube::api::Patch::Merge(json!({"spec": {"expiry": {"maxLifetime": "P7D"}}})),
    )
    .await
    .unwrap();
    let since = common::eventually("maxLifetimeSince to move", Duration::from_secs(30), || async {
        let s = api.get(&valid).await.ok()?.status?;
        (s.observed_max_lifetime.as_deref() == Some("P7D")).then_some(s.max_lifetime_since?)
    })
    .await;
    assert!(since >= before - chrono::TimeDelta::seconds(1), "{since} vs {before}");

    // Two defaults: both refuse; removing one restores the other.
    let others = common::default_policies(&client).await;
    let d1 = ns.policy(&client, "d1", json!({"default": true})).await;
    let d2 = ns.policy(&client, "d2", json!({"default": true})).await;
    for d in [&d1, &d2] {
        let (s, r, _) = common::eventually("MultipleDefaults", Duration::from_secs(30), || async {
            let got = accepted(&client, d).await;
            (got.1 == "MultipleDefaults").then_some(got)
        })
        .await;
        assert_eq!((s.as_str(), r.as_str()), ("False", "MultipleDefaults"));
    }
    api.delete(&d2, &DeleteParams::default()).await.unwrap();
    if others.is_empty() {
        common::eventually("the remaining default to be accepted", Duration::from_secs(30), || async {
            let got = accepted(&client, &d1).await;
            (got.0 == "True").then_some(())
        })
        .await;
    }
}
