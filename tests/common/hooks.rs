//! Webhook receivers on loopback (axum) and the Events a test looks for.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, ListParams};

/// The Events in `ns` with `reason`.
pub async fn events_with_reason(client: &Client, ns: &str, reason: &str) -> Vec<Event> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect()
}

/// What one webhook receiver saw.
#[derive(Default)]
pub struct Received {
    /// Requests answered with an error, to simulate an unreliable receiver.
    pub fail_first: usize,
    /// Requests seen.
    pub seen: usize,
    /// Accepted bodies with their signature header.
    pub accepted: Vec<(serde_json::Value, Option<String>)>,
}

async fn receive(State(state): State<Arc<Mutex<Received>>>, headers: HeaderMap, body: String) -> StatusCode {
    let mut r = state.lock().unwrap();
    r.seen += 1;
    if r.seen <= r.fail_first {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let sig = headers.get("x-keyward-signature").and_then(|v| v.to_str().ok()).map(str::to_string);
    r.accepted.push((serde_json::from_str(&body).expect("JSON body"), sig.map(|s| format!("{s}\n{body}"))));
    StatusCode::NO_CONTENT
}

/// A receiver on a free loopback port that fails its first `fail_first` requests: its
/// URL and what it saw.
pub async fn receiver(fail_first: usize) -> (String, Arc<Mutex<Received>>) {
    let state = Arc::new(Mutex::new(Received { fail_first, ..Default::default() }));
    let app = axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, state)
}

/// A receiver on `port` (which may have been down until now).
pub async fn receiver_on(port: u16) -> Arc<Mutex<Received>> {
    let state = Arc::new(Mutex::new(Received::default()));
    let app = axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(state.clone());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    state
}
