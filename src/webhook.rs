//! Expiry-warning webhooks: a JSON POST per receiver, signed with HMAC-SHA256
//! (`X-Keyward-Signature: sha256=<hex>`) when the policy names a signing key. One
//! attempt per call: the controller keeps what is still to be delivered in status and
//! retries across reconciles (see `controller::apikey::deliver_warnings`).

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use sha2::Sha256;

/// Time allowed for one attempt.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// The ApiKey a notification is about.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// The JSON body of a notification.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Payload {
    /// The same for every delivery of one warning (`<namespace>/<apikey>/<keyId>/<threshold>`):
    /// delivery is at least once, so a receiver may see a warning twice and drop repeats.
    pub id: String,
    /// `KeyExpiringSoon`, `NonExpiringKey` or `KeyStillInUse` (the key is still used
    /// after consumers moved to its successor).
    #[serde(rename = "type")]
    pub type_: String,
    /// The ApiKey.
    pub api_key: ApiKeyRef,
    /// Its owner.
    pub owner: String,
    /// The key's ID (never the key).
    pub key_id: String,
    /// `Primary` or `Secondary`.
    pub slot: String,
    /// The key's effective expiry; absent for keys that never expire.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// The threshold that passed (`P7D`).
    pub threshold: String,
    /// Whether a valid standby key is ready for consumers.
    pub standby_ready: bool,
    /// The key's last recorded use (absent: none recorded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<DateTime<Utc>>,
    /// The newer valid key, if there is one: whether callers have started using it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub successor: Option<SuccessorRef>,
    /// The ApiKey's handover state (the `Handover` condition's reason).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handover: Option<String>,
    /// Present when a cap moved the key's end earlier (`PolicyChange`): why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// With `reason`: the expiry the key had before (absent: it had none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_expires_at: Option<DateTime<Utc>>,
}

/// The successor of the key a notification is about.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SuccessorRef {
    /// Its ID.
    pub key_id: String,
    /// `Primary` or `Secondary`.
    pub slot: String,
    /// Its last recorded use (absent: not used yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<DateTime<Utc>>,
}

/// `sha256=<hex HMAC-SHA256 of body>`.
pub fn sign(key: &[u8], body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// An HTTP(S) client for webhook receivers (system trust roots).
#[derive(Clone)]
pub struct Sender {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Sender {
    /// A client trusting the system's CA certificates.
    pub fn new() -> std::io::Result<Self> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Sender { client: Client::builder(TokioExecutor::new()).build(https) })
    }

    /// POST `body` to `url` once (signed with `signing_key`, when given).
    pub async fn post(&self, url: &str, body: Bytes, signing_key: Option<&[u8]>) -> Result<(), String> {
        let mut req = hyper::Request::post(url)
            .header("content-type", "application/json")
            .header("user-agent", concat!("keyward/", env!("CARGO_PKG_VERSION")));
        if let Some(key) = signing_key {
            req = req.header("x-keyward-signature", sign(key, &body));
        }
        let req = req.body(Full::new(body)).map_err(|e| format!("bad request: {e}"))?;
        match tokio::time::timeout(ATTEMPT_TIMEOUT, self.client.request(req)).await {
            Err(_) => Err(format!("no answer within {ATTEMPT_TIMEOUT:?}")),
            Ok(Err(e)) => Err(format!("cannot reach receiver: {e}")),
            Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
            Ok(Ok(resp)) => Err(format!("receiver answered {}", resp.status())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn payload_shape() {
        let p = Payload {
            id: "ns/svc/abc/P7D".into(),
            type_: "KeyExpiringSoon".into(),
            api_key: ApiKeyRef { namespace: "ns".into(), name: "svc".into() },
            owner: "team".into(),
            key_id: "abc".into(),
            slot: "Primary".into(),
            expires_at: None,
            threshold: "P7D".into(),
            standby_ready: true,
            last_used_at: None,
            successor: Some(SuccessorRef {
                key_id: "def".into(),
                slot: "Secondary".into(),
                last_used_at: None,
            }),
            handover: Some("NewKeyNotYetUsed".into()),
            reason: None,
            previous_expires_at: None,
        };
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["successor"]["keyId"], "def");
        assert!(v["successor"].get("lastUsedAt").is_none() && v.get("lastUsedAt").is_none());
        assert_eq!(v["handover"], "NewKeyNotYetUsed");
        assert_eq!(v["type"], "KeyExpiringSoon");
        assert_eq!(v["id"], "ns/svc/abc/P7D");
        assert_eq!(v["apiKey"]["name"], "svc");
        assert_eq!(v["standbyReady"], true);
        assert!(v.get("expiresAt").is_none());
    }
}
