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
            warnings.push(e.message.to_string());
        }
        if let Some(r) = find_condition(&status.conditions, c::READY).filter(|r| r.status != "True") {
            warnings.push(r.message.to_string());
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

/// One ApiKey in detail (pure, for `keyward status NAME`): its conditions, each key with
/// its last use, and a timeline `width` columns wide of both slots' validity windows, the
/// time each key held `api-key`, the last uses, now and the next step.
pub fn describe(key: &ApiKey, now: DateTime<Utc>, width: usize) -> String {
    use std::fmt::Write;
    let status = key.status.clone().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ApiKey {}/{}   owner {}   policy {}",
        key.namespace().unwrap_or_default(),
        key.name_any(),
        key.owner(),
        key.spec.policy.as_deref().unwrap_or("(default)")
    );
    for t in [c::READY, c::HANDOVER, c::EXPIRING, c::STALLED] {
        if let Some(cond) = find_condition(&status.conditions, t) {
            let _ = writeln!(out, "{t:<9} {:<7} {}: {}", cond.status, cond.reason, cond.message);
        }
    }
    if let (Some(a), Some(t)) = (&status.next_action, status.next_action_at) {
        let _ = writeln!(out, "Next      {a} at {}", short(Some(t)));
    }
    let _ = writeln!(out);
    let rows: Vec<[String; 6]> = status
        .keys
        .iter()
        .map(|k| {
            let state = if k.state == KeyState::Standby && k.activated_at.is_some() {
                "Draining".to_string()
            } else {
                format!("{:?}", k.state)
            };
            [
                format!("{:?}", k.slot),
                k.key_id.clone(),
                state,
                short(Some(k.created_at)),
                short(k.effective_expires_at)
                    + &k.expiry_reason.map(|r| format!(" ({r:?})")).unwrap_or_default(),
                k.last_used_at
                    .map_or("never".into(), |t| format!("{} ({} ago)", short(Some(t)), ago(now - t))),
            ]
        })
        .collect();
    let head = ["SLOT", "KEY", "STATE", "CREATED", "ENDS", "LAST USED"].map(String::from);
    let widths: Vec<usize> = (0..6)
        .map(|i| std::iter::once(&head).chain(&rows).map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in std::iter::once(&head).chain(&rows) {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    if !status.keys.is_empty() {
        let _ = writeln!(out);
        out.push_str(&timeline(&status, now, width));
    }
    out
}

fn ago(d: chrono::TimeDelta) -> String {
    let s = d.num_seconds().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Both slots on one time axis (see [`describe`]): `#` while the key was in `api-key`,
/// `=` while it was valid otherwise, `-` after its end, `*` its last use, `|` now, `>`
/// the next step.
fn timeline(status: &crate::api::ApiKeyStatus, now: DateTime<Utc>, width: usize) -> String {
    let label = 22;
    let cols = width.saturating_sub(label + 1).max(20);
    let end_of = |k: &crate::api::KeyStatus| k.effective_expires_at.or(k.expires_at);
    let start = status.keys.iter().map(|k| k.created_at).min().unwrap_or(now).min(now);
    let end = status
        .keys
        .iter()
        .filter_map(end_of)
        .chain(status.next_action_at)
        .chain(std::iter::once(now))
        .max()
        .unwrap_or(now);
    let span = (end - start).num_milliseconds().max(1) as f64;
    let col = |t: DateTime<Utc>| {
        let x = (t - start).num_milliseconds() as f64 / span * (cols - 1) as f64;
        (x.round().max(0.0) as usize).min(cols - 1)
    };
    let mut out = String::new();
    for k in &status.keys {
        let mut bar = vec![' '; cols];
        let (from, to) = (col(k.created_at), end_of(k).map_or(cols - 1, col));
        for c in bar.iter_mut().take(cols).skip(from) {
            *c = '-';
        }
        for c in bar.iter_mut().take(to + 1).skip(from) {
            *c = '=';
        }
        if let Some(a) = k.activated_at {
            // Held api-key from its activation until the other key's later activation.
            let other =
                status.keys.iter().find(|o| o.slot != k.slot).and_then(|o| o.activated_at).filter(|o| *o > a);
            let until = other.map_or(to, |o| col(o).min(to));
            for c in bar.iter_mut().take(until + 1).skip(col(a)) {
                *c = '#';
            }
        }
        bar[col(now)] = '|';
        if let Some(u) = k.last_used_at {
            bar[col(u)] = '*';
        }
        let name = format!("{:?} {}", k.slot, k.key_id.chars().take(10).collect::<String>());
        out.push_str(&format!("{name:<label$} {}\n", bar.iter().collect::<String>().trim_end()));
    }
    let mut axis = vec![' '; cols];
    axis[col(now)] = '^';
    let mut marks = format!("now {}", short(Some(now)));
    if let (Some(a), Some(t)) = (&status.next_action, status.next_action_at) {
        axis[col(t)] = '>';
        marks.push_str(&format!("   > next: {a} at {}", short(Some(t))));
    }
    out.push_str(&format!("{:<label$} {}\n", "", axis.iter().collect::<String>().trim_end()));
    out.push_str(&format!("{:<label$} {} … {}\n", "", short(Some(start)), short(Some(end))));
    out.push_str(&format!("{:<label$} ^ {marks}\n", ""));
    out.push_str(&format!("{:<label$} # in api-key   = valid   - after its end   * last use   | now\n", ""));
    out
}

/// The terminal's width: `COLUMNS`, else `stty size` on the controlling terminal, else 100.
pub fn terminal_width() -> usize {
    if let Some(w) = std::env::var("COLUMNS").ok().and_then(|c| c.trim().parse().ok()) {
        return w;
    }
    let tty = std::fs::File::open("/dev/tty").ok();
    let size = tty.and_then(|t| std::process::Command::new("stty").arg("size").stdin(t).output().ok());
    size.and_then(|o| String::from_utf8(o.stdout).ok()?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(100)
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
        let key = Api::<ApiKey>::namespaced(client, &ns).get(name).await.map_err(not_found(&ns, name))?;
        return Ok(describe(&key, Utc::now(), terminal_width()));
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
    fn one_apikey_in_detail_shows_last_uses_the_handover_and_a_timeline_that_fits_the_width() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let h = |n: i64| t0 + chrono::TimeDelta::hours(n);
        let mut key = ApiKey::new("checkout", ApiKeySpec { owner: "payments".into(), ..Default::default() });
        key.metadata.namespace = Some("shop".into());
        let k = |slot, id: &str, created: i64, state, activated: Option<i64>, used: Option<i64>| KeyStatus {
            slot,
            key_id: id.into(),
            hash: "sha256:x".into(),
            preview: "kw_abcd".into(),
            created_at: h(created),
            expires_at: Some(h(created + 90)),
            effective_expires_at: Some(h(created + 90)),
            cap: None,
            activated_at: activated.map(h),
            last_used_at: used.map(h),
            state,
            expiry_reason: Some(crate::api::ExpiryReason::MaxLifetime),
        };
        key.status = Some(ApiKeyStatus {
            active_slot: Some(Slot::Primary),
            keys: vec![
                k(Slot::Primary, "p1", 0, KeyState::Active, Some(0), Some(59)),
                k(Slot::Secondary, "s1", 45, KeyState::Standby, None, None),
            ],
            next_action: Some("Flip".into()),
            next_action_at: Some(h(89)),
            conditions: vec![Condition::new(
                "Handover",
                "False",
                "NewKeyNotYetUsed",
                "the Secondary key s1 has not been used yet",
                None,
                t0,
            )],
            ..Default::default()
        });
        for width in [60, 80, 160] {
            let out = describe(&key, h(60), width);
            assert!(out.contains("Handover  False   NewKeyNotYetUsed: the Secondary key s1"), "{out}");
            assert!(out.contains("Next      Flip at 2027-01-19T01:00:00Z"), "{out}");
            let p1 = out
                .lines()
                .find(|l| l.starts_with("Primary ") && l.contains(" p1 ") && l.contains("Active"))
                .unwrap();
            assert!(p1.contains("(1h0m ago)"), "last use and how long ago: {p1}");
            let bars: Vec<&str> = out
                .lines()
                .filter(|l| l.starts_with("Primary p1") || l.starts_with("Secondary s1"))
                .collect();
            assert_eq!(bars.len(), 2, "{out}");
            assert!(bars[0].contains('#') && bars[0].contains('*') && !bars[0][23..].contains(' '), "{out}");
            assert!(
                bars[1].contains('=') && !bars[1].contains('#') && bars[1][23..].starts_with(' '),
                "{out}"
            );
            let now_col = bars[1].find('|').unwrap();
            assert_eq!(
                bars[0].find('|').or(bars[0].find('*')).map(|c| c.abs_diff(now_col) <= 1),
                Some(true),
                "{out}"
            );
            let axis = out.lines().rev().take(4).collect::<Vec<_>>();
            assert!(
                bars.iter().chain(&axis[3..]).all(|l| l.chars().count() <= width.max(43)),
                "the bars fit {width} columns: {out}"
            );
        }
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
