//! `keyward status`, `keyward rotate`, `keyward revoke` (also as `kubectl keyward …`).

use chrono::{DateTime, SecondsFormat, Utc};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::api::{ApiKey, KeyState, ROTATE_ANNOTATION, conditions as c, find_condition};
use crate::error::{Error, Result};

/// Field manager of the command line's writes.
pub const CLI_MANAGER: &str = "keyward/cli";

fn short(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(|| "never".into(), |t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
}

/// One table row per ApiKey (pure, for `keyward status`).
pub fn table(keys: &[ApiKey], with_namespace: bool) -> String {
    let mut rows: Vec<Vec<String>> = vec![
        ["NAMESPACE", "NAME", "OWNER", "READY", "ACTIVE", "EXPIRES", "STANDBY", "NEXT", "WARNINGS"]
            .map(String::from)
            .to_vec(),
    ];
    for k in keys {
        let status = k.status.clone().unwrap_or_default();
        let ready = find_condition(&status.conditions, c::READY).map_or("Unknown".to_string(), |r| {
            if r.status == "True" { "True".into() } else { format!("False ({})", r.reason) }
        });
        let active = status.active_slot.and_then(|s| status.keys.iter().find(|x| x.slot == s));
        let standby = status.keys.iter().find(|x| Some(x.slot) != status.active_slot);
        let next = match (&status.next_action, status.next_action_at) {
            (Some(a), Some(t)) => format!("{a} {}", short(Some(t))),
            _ => "-".into(),
        };
        let mut warnings = Vec::new();
        if let Some(e) = find_condition(&status.conditions, c::EXPIRING).filter(|e| e.status == "True") {
            warnings.push(e.message.clone());
        }
        if let Some(r) = find_condition(&status.conditions, c::READY).filter(|r| r.status != "True") {
            warnings.push(r.message.clone());
        }
        rows.push(vec![
            k.namespace().unwrap_or_default(),
            k.name_any(),
            k.owner().to_string(),
            ready,
            active.map_or("-".into(), |a| format!("{:?} {} {}…", a.slot, a.key_id, a.preview)),
            active.map_or("-".into(), |a| short(a.effective_expires_at)),
            standby.map_or("-".into(), |s| {
                let state = if s.state == KeyState::Standby && s.activated_at.is_some() {
                    "Draining".into()
                } else {
                    format!("{:?}", s.state)
                };
                format!("{:?} {} {state}", s.slot, s.key_id)
            }),
            next,
            if warnings.is_empty() { "-".into() } else { warnings.join("; ") },
        ]);
    }
    let skip = usize::from(!with_namespace);
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> =
            row.iter().enumerate().skip(skip).map(|(i, cell)| format!("{cell:<w$}", w = widths[i])).collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    out
}

fn not_found(ns: &str, name: &str) -> impl FnOnce(kube::Error) -> Error {
    let (ns, name) = (ns.to_string(), name.to_string());
    move |e| match &e {
        kube::Error::Api(s) if s.code == 404 => Error::InvalidSpec(format!("ApiKey {ns}/{name} not found")),
        _ => Error::kube(format!("reading ApiKey {ns}/{name}"))(e),
    }
}

/// `keyward status`: the table for one ApiKey, a namespace, or all namespaces.
pub async fn status(
    client: Client,
    namespace: Option<&str>,
    all: bool,
    name: Option<&str>,
) -> Result<String> {
    let ns = namespace.map_or_else(|| client.default_namespace().to_string(), str::to_string);
    let keys = if let Some(name) = name {
        vec![Api::<ApiKey>::namespaced(client, &ns).get(name).await.map_err(not_found(&ns, name))?]
    } else if all {
        Api::<ApiKey>::all(client)
            .list(&ListParams::default())
            .await
            .map_err(Error::kube("listing ApiKeys"))?
            .items
    } else {
        Api::<ApiKey>::namespaced(client, &ns)
            .list(&ListParams::default())
            .await
            .map_err(Error::kube("listing ApiKeys"))?
            .items
    };
    if keys.is_empty() {
        return Ok(if all {
            "No ApiKeys found.\n".into()
        } else {
            format!("No ApiKeys found in namespace {ns}.\n")
        });
    }
    Ok(table(&keys, all))
}

/// `keyward rotate`: set `keyward.dev/rotate` to a new value (now).
pub async fn rotate(client: Client, namespace: Option<&str>, name: &str) -> Result<String> {
    let ns = namespace.map_or_else(|| client.default_namespace().to_string(), str::to_string);
    let api: Api<ApiKey> = Api::namespaced(client, &ns);
    api.get(name).await.map_err(not_found(&ns, name))?;
    let value = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    let patch = json!({"metadata": {"annotations": {ROTATE_ANNOTATION: value}}});
    let pp = PatchParams { field_manager: Some(CLI_MANAGER.into()), ..Default::default() };
    api.patch(name, &pp, &Patch::Merge(patch)).await.map_err(not_found(&ns, name))?;
    Ok(format!("apikey {ns}/{name}: rotation requested ({ROTATE_ANNOTATION}={value})\n"))
}

/// The key IDs in `spec.revokedKeys` that `manager` owns through server-side apply (from
/// `metadata.managedFields`; a set's items appear there as `v:"<id>"`), in list order.
pub fn revocations_owned_by(key: &ApiKey, manager: &str) -> Vec<String> {
    let mut owned: Vec<String> = Vec::new();
    for entry in key.metadata.managed_fields.iter().flatten() {
        if entry.manager.as_deref() != Some(manager) || entry.operation.as_deref() != Some("Apply") {
            continue;
        }
        let Some(items) =
            entry.fields_v1.as_ref().and_then(|f| f.0.get("f:spec")?.get("f:revokedKeys")?.as_object())
        else {
            continue;
        };
        for field in items.keys() {
            if let Some(id) = field.strip_prefix("v:").and_then(|v| serde_json::from_str::<String>(v).ok())
                && !owned.contains(&id)
            {
                owned.push(id);
            }
        }
    }
    owned.sort_by_key(|id| key.spec.revoked_keys.iter().position(|r| r == id));
    owned
}

/// What `keyward revoke` applies: the IDs it already owns plus `key_id`, guarded by the
/// ApiKey's resourceVersion (an apply that lost a race fails with 409 and is retried).
/// Applying only its own IDs leaves every other manager's entries to their managers: a
/// GitOps tool that drops an ID of its own drops it, unless the CLI revoked it too.
pub fn revocation_apply(key: &ApiKey, key_id: &str) -> serde_json::Value {
    let mut ids = revocations_owned_by(key, CLI_MANAGER);
    if !ids.iter().any(|id| id == key_id) {
        ids.push(key_id.to_string());
    }
    json!({
        "apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {
            "name": key.name_any(), "namespace": key.namespace(),
            "resourceVersion": key.resource_version(),
        },
        "spec": {"revokedKeys": ids}
    })
}

/// Attempts of `keyward revoke` when the ApiKey changes between its read and its apply.
const REVOKE_ATTEMPTS: u32 = 10;

/// `keyward revoke`: add a key ID to `spec.revokedKeys` (server-side apply, own field
/// manager; `revokedKeys` is a set, so other managers' IDs stay, and the CLI's earlier
/// revocations are re-applied with the new one so none is dropped).
pub async fn revoke(client: Client, namespace: Option<&str>, name: &str, key_id: &str) -> Result<String> {
    let ns = namespace.map_or_else(|| client.default_namespace().to_string(), str::to_string);
    let api: Api<ApiKey> = Api::namespaced(client, &ns);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let key = api.get(name).await.map_err(not_found(&ns, name))?;
        let listed = key.spec.revoked_keys.iter().any(|k| k == key_id);
        if listed && revocations_owned_by(&key, CLI_MANAGER).iter().any(|k| k == key_id) {
            return Ok(format!("apikey {ns}/{name}: key {key_id} already revoked\n"));
        }
        // A key ID another manager already revoked (its slot perhaps regenerated since) is
        // taken into the CLI's set too: the operator's revocation outlives theirs.
        let known: Vec<String> =
            key.status.iter().flat_map(|s| s.keys.iter().map(|k| k.key_id.clone())).collect();
        if !listed && !known.iter().any(|k| k == key_id) {
            return Err(Error::InvalidSpec(format!(
                "{key_id:?} is not a key of ApiKey {ns}/{name} (its keys: {})",
                if known.is_empty() { "none".into() } else { known.join(", ") }
            )));
        }
        let patch = revocation_apply(&key, key_id);
        match api.patch(name, &PatchParams::apply(CLI_MANAGER), &Patch::Apply(patch)).await {
            Ok(_) => return Ok(format!("apikey {ns}/{name}: key {key_id} revoked\n")),
            // The resourceVersion precondition failed: someone wrote in between; read again.
            Err(kube::Error::Api(s))
                if s.code == 409 && s.message.contains("has been modified") && attempt < REVOKE_ATTEMPTS =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(25 * u64::from(attempt))).await;
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                return Err(Error::InvalidSpec(format!("ApiKey {ns}/{name} not found")));
            }
            Err(e) => return Err(Error::kube(format!("revoking key {key_id} of ApiKey {ns}/{name}"))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ApiKeySpec, ApiKeyStatus, Condition, KeyStatus, Slot};

    #[test]
    fn table_shows_owner_keys_expiry_next_and_warnings() {
        let t = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let mut key = ApiKey::new("checkout", ApiKeySpec { owner: "payments".into(), ..Default::default() });
        key.metadata.namespace = Some("shop".into());
        let k = |slot, id: &str, state| KeyStatus {
            slot,
            key_id: id.into(),
            hash: "sha256:x".into(),
            preview: "kw_abcd".into(),
            created_at: t,
            expires_at: Some(t),
            effective_expires_at: Some(t),
            cap: None,
            activated_at: None,
            last_used_at: None,
            state,
            expiry_reason: None,
        };
        key.status = Some(ApiKeyStatus {
            active_slot: Some(Slot::Primary),
            keys: vec![
                k(Slot::Primary, "aaaa", KeyState::Active),
                k(Slot::Secondary, "bbbb", KeyState::Standby),
            ],
            next_action: Some("Flip".into()),
            next_action_at: Some(t),
            conditions: vec![
                Condition::new("Ready", "True", "KeyActive", "ok", None, t),
                Condition::new("Expiring", "True", "KeyExpiringSoon", "the active key expires soon", None, t),
            ],
            ..Default::default()
        });
        let out = table(&[key], false);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("NAME") && lines[0].contains("WARNINGS"), "{out}");
        for needle in [
            "checkout",
            "payments",
            "Primary aaaa kw_abcd…",
            "Secondary bbbb Standby",
            "Flip 2027-01-15T08:00:00Z",
            "expires soon",
        ] {
            assert!(lines[1].contains(needle), "{needle} missing: {out}");
        }
        assert!(table(&[], true).starts_with("NAMESPACE"));
    }

    #[test]
    fn revoke_applies_the_clis_earlier_ids_plus_the_new_one_and_no_one_elses() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
        let entry = |manager: &str, operation: &str, ids: &[&str]| {
            let items: serde_json::Map<String, serde_json::Value> =
                ids.iter().map(|id| (format!("v:{}", json!(id)), json!({}))).collect();
            ManagedFieldsEntry {
                manager: Some(manager.into()),
                operation: Some(operation.into()),
                fields_v1: Some(FieldsV1(json!({"f:spec": {"f:revokedKeys": items, "f:owner": {}}}))),
                ..Default::default()
            }
        };
        let mut key = ApiKey::new(
            "svc",
            ApiKeySpec {
                revoked_keys: vec![
                    "gitops1".into(),
                    "cli2".into(),
                    "both".into(),
                    "cli1".into(),
                    "edit".into(),
                ],
                ..Default::default()
            },
        );
        key.metadata.namespace = Some("shop".into());
        key.metadata.resource_version = Some("42".into());
        key.metadata.managed_fields = Some(vec![
            entry("gitops", "Apply", &["gitops1", "both"]),
            entry(CLI_MANAGER, "Apply", &["cli1", "cli2", "both"]),
            entry(CLI_MANAGER, "Update", &["edit"]),
            entry("kubectl-edit", "Update", &["edit"]),
        ]);
        assert_eq!(revocations_owned_by(&key, CLI_MANAGER), ["cli2", "both", "cli1"]);
        assert_eq!(revocations_owned_by(&key, "nobody"), Vec::<String>::new());

        let patch = revocation_apply(&key, "new");
        assert_eq!(patch["spec"]["revokedKeys"], json!(["cli2", "both", "cli1", "new"]));
        assert_eq!(patch["metadata"]["resourceVersion"], json!("42"), "guards against a concurrent revoke");
        assert_eq!(patch["metadata"]["namespace"], json!("shop"));
        // Taking over another manager's ID co-owns it; an ID the CLI owns is not repeated.
        assert_eq!(
            revocation_apply(&key, "gitops1")["spec"]["revokedKeys"],
            json!(["cli2", "both", "cli1", "gitops1"])
        );
        assert_eq!(revocation_apply(&key, "cli1")["spec"]["revokedKeys"], json!(["cli2", "both", "cli1"]));
    }
}
