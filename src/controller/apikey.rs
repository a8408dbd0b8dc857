//! Reconcile one ApiKey: dereference (the cached ApiKey unless this controller wrote
//! it since, the policy, the Secret) → validate → run the pure lifecycle → apply the
//! Secret → write status → Events.
//!
//! Write order keeps the invariants across crashes:
//! 1. new key material goes into the Secret's slot field (`primary`/`secondary`) first
//!    (a restart adopts it instead of issuing a second key for the same step);
//! 2. then status, with the new hashes (optimistic concurrency on resourceVersion);
//! 3. only then `api-key` moves to the active key, so a key is in `api-key` only after
//!    its hash is in status.
//!
//! An ApiKey's first Secret skips step 1: status first, then the Secret is created
//! whole (nobody can hold a key before it exists; a crash in between costs one unused
//! hash, and the next reconcile issues anew as for a deleted Secret).
//!
//! Nothing is written when nothing changed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use super::consumers;
use super::context::{Context, object_id};
use super::policy::{self, Blocked, blocked};
use super::secret::{self, Contents, Minter};
use super::{SECRET_MANAGER, STATUS_MANAGER, now};
use crate::api::{
    ApiKey, ApiKeyStatus, Condition, ExpiryReason, FALSE, ROTATE_ANNOTATION, TRUE, conditions as c,
    find_condition, set_condition,
};
use crate::error::{Error, Result};
use crate::keys;
use crate::lifecycle::{self, Happening, Health, Input, handover, notify};

/// Blocked objects are looked at again this often (e.g. a foreign Secret may go away).
const BLOCKED_RETRY: Duration = Duration::from_secs(300);

/// Reconcile one ApiKey.
pub async fn reconcile(obj: Arc<ApiKey>, ctx: Arc<Context>) -> Result<Action> {
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let api: Api<ApiKey> = Api::namespaced(ctx.client.clone(), &ns);
    // Which version to plan from. A shard: a fresh read, and only while the ApiKey still
    // matches the shard's selector (one list by selector and name), as its cache may lag
    // another shard's writes and its member watch a label change, and a plan made from
    // either could write an older key back into the Secret (see `shard`). Otherwise the
    // cached object, unless this controller wrote a newer version than the cache holds
    // (or lost a write conflict): then a fresh read.
    let key = if let Some(selector) = ctx.shard_selector() {
        let lp = ListParams::default().labels(selector).fields(&format!("metadata.name={name}"));
        let listed = api.list(&lp).await.map_err(Error::kube(format!("reading ApiKey {ns}/{name}")))?;
        let Some(mut fresh) = listed.items.into_iter().next() else { return Ok(Action::await_change()) };
        fresh.metadata.managed_fields = None;
        fresh
    } else if ctx.own_writes.cache_is_current(obj.as_ref()) {
        obj.as_ref().clone()
    } else {
        let fresh = api.get_opt(&name).await.map_err(Error::kube(format!("reading ApiKey {ns}/{name}")))?;
        let Some(fresh) = fresh else { return Ok(Action::await_change()) };
        fresh
    };
    if key.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let now = now();
    if let Some(due) = key.status.as_ref().and_then(|s| s.next_action_at)
        && due <= now
    {
        ctx.metrics.step_lateness.observe((now - due).num_milliseconds() as f64 / 1e3);
    }
    let prepared = prepare(&ctx, &key, now).await?;
    run(&ctx, &api, &key, prepared, now).await
}

/// Workloads named in `ConsumersFollowRotation` (and warned about one by one); more are
/// counted. Bounds the status and the Events whatever a namespace's pods do.
const MAX_LISTED_CONSUMERS: usize = 10;

/// What a reconcile works with. A blocked ApiKey (`blocked`) is still run: its keys are
/// revoked, capped, expired and flipped to as usual; only new keys are not issued.
struct Prepared {
    /// The policy, when one was found.
    policy: Option<crate::api::KeyPolicy>,
    /// Its rules; frozen rules when there is no usable policy.
    rules: lifecycle::Rules,
    /// The lifetime of a key issued now.
    lifetime: lifecycle::Lifetime,
    secret_name: String,
    /// The Secret when this ApiKey owns it (a foreign one is never read or written).
    secret: Option<Secret>,
    /// A Secret of that name that this ApiKey does not own exists.
    foreign_secret: bool,
    /// Why no new key may be issued.
    blocked: Option<Blocked>,
    /// The ApiKey lost its place under its owner's limits: its keys end now.
    retire: bool,
    /// How the verifier's usage data is read (handover).
    usage: handover::Usage,
    /// Pods reading the Secret in a way no rotation reaches.
    consumers: super::pods::Consumers,
}

/// Dereference and validate. Whatever the user has to fix becomes `blocked` (the first
/// of: spec, policy, owner limits, Secret conflict), never a reason to skip the keys'
/// safety steps.
async fn prepare(ctx: &Context, key: &ApiKey, now: DateTime<Utc>) -> Result<Prepared> {
    let mut block = spec_problem(&key.spec);
    let policy_name_ok = key.spec.policy.as_deref().is_none_or(dns_subdomain);
    let resolved = if policy_name_ok { policy::resolve(ctx, key, now).await? } else { Default::default() };
    block = block.or(resolved.blocked);
    // Owner limits apply whatever else is wrong: another problem (an invalid field) must
    // not keep keys alive that lost their place.
    let mut retire = false;
    if let Some(found) = &resolved.policy {
        let limited;
        (limited, retire) = owner_limits(ctx, key, found).await?;
        block = block.or(limited);
    }
    let rules = resolved.rules.unwrap_or_else(lifecycle::Rules::frozen);
    let lifetime = match rules.lifetime(key.spec.lifetime.as_deref(), now) {
        Ok(l) => l,
        Err((reason, message)) => {
            block = block.or(Some(blocked(reason, message)));
            lifecycle::Lifetime { duration: rules.max_lifetime, clamped: None }
        }
    };
    let secret_name = key.spec.secret_name.clone().unwrap_or_else(|| key.name_any());
    let ns = key.namespace().unwrap_or_default();
    let mut secret = None;
    let mut foreign_secret = false;
    if dns_subdomain(&secret_name) {
        secret = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&secret_name)
            .await
            .map_err(Error::kube(format!("reading Secret {ns}/{secret_name}")))?;
        if secret.as_ref().is_some_and(|s| !secret::owned_by(s, key)) {
            secret = None;
            foreign_secret = true;
            block = block.or(Some(blocked(
                c::SECRET_CONFLICT,
                format!(
                    "Secret {secret_name:?} exists and is not owned by this ApiKey; keyward leaves it untouched (choose another spec.secretName)"
                ),
            )));
        }
    }
    // A foreign Secret is not this ApiKey's key: its readers are none of its business.
    let consumers = if foreign_secret {
        super::pods::Consumers::NotWatched
    } else {
        ctx.consumer_problems(key, &secret_name)
    };
    Ok(Prepared {
        policy: resolved.policy,
        rules,
        lifetime,
        secret_name,
        secret,
        foreign_secret,
        blocked: block,
        retire,
        usage: ctx.usage,
        consumers,
    })
}

/// Longest piece of user input quoted in a message.
const SHOWN: usize = 64;

fn shown(text: &str) -> String {
    text.chars().take(SHOWN).collect()
}

/// A lowercase RFC 1123 subdomain (the name of a Secret, KeyPolicy or workload).
fn dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// The name part of a label key or a label value: up to 63 of `[A-Za-z0-9_.-]`,
/// alphanumeric at both ends (`empty_ok` for label values).
fn label_name(text: &str, empty_ok: bool) -> bool {
    let b = text.as_bytes();
    if b.is_empty() {
        return empty_ok;
    }
    b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A label or annotation key: `[prefix/]name`, the prefix a DNS subdomain.
fn qualified_name(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => dns_subdomain(prefix) && label_name(name, false),
        None => label_name(key, false),
    }
}

/// Spec fields that become object names or Secret metadata, checked before any of them
/// reaches an API path or a write. The CRD schema only bounds their length (and
/// v1.20 has no CEL): unchecked, `p/status` would address a subresource, and a name
/// or label the API server refuses would fail every write with `ApplyFailed`.
fn spec_problem(spec: &crate::api::ApiKeySpec) -> Option<Blocked> {
    let invalid = |message: String| Some(blocked(c::INVALID_SPEC, message));
    if spec.owner.trim().is_empty() {
        return invalid("spec.owner must not be empty".into());
    }
    let mut names: Vec<(String, &str)> = Vec::new();
    names.extend(spec.policy.as_deref().map(|n| ("spec.policy".to_string(), n)));
    names.extend(spec.secret_name.as_deref().map(|n| ("spec.secretName".to_string(), n)));
    for (i, consumer) in spec.consumers.iter().enumerate() {
        names.push((format!("spec.consumers[{i}].name"), &consumer.name));
    }
    if let Some((field, name)) = names.into_iter().find(|(_, n)| !dns_subdomain(n)) {
        return invalid(format!(
            "{field} {:?} is not a valid object name (a lowercase RFC 1123 subdomain of at most 253 characters)",
            shown(name)
        ));
    }
    let Some(template) = &spec.secret_template else { return None };
    for (k, v) in &template.labels {
        if !qualified_name(k) || !label_name(v, true) {
            return invalid(format!(
                "spec.secretTemplate.labels: {:?}: {:?} is not a valid label (key [prefix/]name, value up to 63 characters of [A-Za-z0-9_.-])",
                shown(k),
                shown(v)
            ));
        }
    }
    if let Some(k) = template.annotations.keys().find(|k| !qualified_name(k)) {
        return invalid(format!(
            "spec.secretTemplate.annotations: {:?} is not a valid annotation key",
            shown(k)
        ));
    }
    let size: usize = template.annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > 256 * 1024 {
        return invalid(format!("spec.secretTemplate.annotations total {size} bytes, more than 256 KiB"));
    }
    None
}

/// The per-owner limits of the policy, over the ApiKeys of this owner in the namespace
/// (from the watch cache, plus this ApiKey itself), oldest first by (creationTimestamp,
/// name). Also whether the ApiKey lost a place it had: refused while it holds valid
/// keys, which then end. That verdict is never taken from the cache alone (an ApiKey
/// deleted a moment ago may still be in it): it is confirmed on a fresh list and a fresh
/// read of the policy.
async fn owner_limits(
    ctx: &Context,
    key: &ApiKey,
    policy: &crate::api::KeyPolicy,
) -> Result<(Option<Blocked>, bool)> {
    let ns = key.namespace().unwrap_or_default();
    let owned: Vec<_> =
        ctx.keys_of_owner(&ns, key.owner()).iter().filter_map(|r| ctx.apikeys.get(r)).collect();
    let cached = owner_verdict(owned.iter().map(|k| k.as_ref()), key, policy);
    let holds_keys = key.status.iter().flat_map(|s| &s.keys).any(lifecycle::is_valid);
    if cached.is_none() || !holds_keys {
        return Ok((cached, false));
    }
    let listed = Api::<ApiKey>::namespaced(ctx.client.clone(), &ns)
        .list(&Default::default())
        .await
        .map_err(Error::kube(format!("listing the ApiKeys of namespace {ns}")))?;
    // Nor on a cached policy: a limit raised together with this ApiKey (its first key
    // was issued on a live read) may not have reached the cache yet.
    let name = policy.name_any();
    let Some(policy) = Api::<crate::api::KeyPolicy>::all(ctx.client.clone())
        .get_opt(&name)
        .await
        .map_err(Error::kube(format!("reading KeyPolicy {name}")))?
    else {
        return Ok((cached, false));
    };
    // The default moved elsewhere meanwhile: this is not the ApiKey's policy any more.
    if key.spec.policy.is_none() && !policy.spec.default {
        return Ok((cached, false));
    }
    let verdict = owner_verdict(listed.items.iter(), key, &policy);
    let retire = verdict.as_ref().is_some_and(|b| b.reason == c::OWNER_KEY_LIMIT_EXCEEDED);
    Ok((verdict, retire))
}

/// [`policy::owner_verdict`] for `key` among `keys` (any that is `key` itself is
/// replaced by `key`).
fn owner_verdict<'a>(
    keys: impl Iterator<Item = &'a ApiKey>,
    key: &ApiKey,
    policy: &crate::api::KeyPolicy,
) -> Option<Blocked> {
    let owner = key.owner();
    let ns = key.namespace();
    let owned = |k: &ApiKey| policy::OwnedKey {
        created: k
            .meta()
            .creation_timestamp
            .as_ref()
            .and_then(|t| DateTime::from_timestamp(t.0.as_second(), 0)),
        name: k.name_any(),
        description: k.spec.description.as_deref().unwrap_or_default().trim().to_string(),
        holds_keys: k.status.iter().flat_map(|s| &s.keys).any(lifecycle::is_valid),
    };
    let mut owned_keys: Vec<policy::OwnedKey> = keys
        .filter(|k| k.namespace() == ns && k.owner() == owner && k.meta().deletion_timestamp.is_none())
        .filter(|k| k.name_any() != key.name_any())
        .map(owned)
        .collect();
    owned_keys.push(owned(key));
    let limits = &policy.spec.limits;
    policy::owner_verdict(
        owned_keys,
        &key.name_any(),
        owner,
        limits.max_keys_per_owner as usize,
        limits.unique_description_per_owner,
    )
}

/// A reconcile failed (API error, missing permission): say so on the ApiKey as
/// `Synced=False ApplyFailed` and a Warning Event, when that news is new. `Ready` is
/// left alone: it says whether consumers hold a valid key, which a failed write does
/// not change. Best effort: if even that write fails, the log and the failure metric
/// carry it.
pub async fn report_failure(ctx: &Context, key: &ApiKey, err: &Error) {
    let ns = key.namespace().unwrap_or_default();
    let api: Api<ApiKey> = Api::namespaced(ctx.client.clone(), &ns);
    let Ok(Some(fresh)) = api.get_opt(&key.name_any()).await else { return };
    let message: String = crate::error::chain(err).chars().take(512).collect();
    let news = fresh
        .status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, c::SYNCED))
        .is_none_or(|r| r.reason != c::APPLY_FAILED || r.message != message);
    if !news {
        return;
    }
    let old = fresh.status.clone().unwrap_or_default();
    let mut status = old.clone();
    set_condition(
        &mut status.conditions,
        Condition::new(c::SYNCED, FALSE, c::APPLY_FAILED, message.clone(), fresh.meta().generation, now()),
    );
    if let Err(e) = write_status(ctx, &api, &fresh, &old, status).await {
        tracing::warn!(error = %crate::error::chain(&e), "cannot record the failure on the ApiKey");
    }
    ctx.warn(&fresh, c::APPLY_FAILED, &message).await;
}

/// The conditions that say whether new keys can be issued (`Stalled`) and whether
/// `spec.lifetime` had to be clamped (`LifetimeClamped`); the Warning Events for what is
/// new among them.
fn issuance_conditions(
    status: &mut ApiKeyStatus,
    p: &Prepared,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Vec<(&'static str, String)> {
    let mut news = Vec::new();
    let before = |t: &str| {
        find_condition(&status.conditions, t).map(|c| (c.reason.to_string(), c.message.to_string()))
    };
    let (stalled_before, clamped_before) = (before(c::STALLED), before(c::LIFETIME_CLAMPED));
    let stalled = match &p.blocked {
        Some(b) => {
            if stalled_before != Some((b.reason.to_string(), b.message.clone())) {
                news.push((b.reason, b.message.clone()));
            }
            Condition::new(c::STALLED, TRUE, b.reason, b.message.clone(), generation, now)
        }
        None => Condition::new(
            c::STALLED,
            FALSE,
            c::NOT_BLOCKED,
            "new keys are issued on schedule",
            generation,
            now,
        ),
    };
    set_condition(&mut status.conditions, stalled);
    match &p.lifetime.clamped {
        Some(message) => {
            if clamped_before.map(|(_, m)| m) != Some(message.clone()) {
                news.push((c::LIFETIME_OUT_OF_BOUNDS, message.clone()));
            }
            set_condition(
                &mut status.conditions,
                Condition::new(
                    c::LIFETIME_CLAMPED,
                    TRUE,
                    c::LIFETIME_OUT_OF_BOUNDS,
                    message.clone(),
                    generation,
                    now,
                ),
            );
        }
        None => status.conditions.retain(|x| x.type_ != c::LIFETIME_CLAMPED),
    }
    news
}

/// Everything one reconcile writes, in write order (see the module docs), decided
/// without I/O by [`plan`] and carried out by [`apply`].
#[derive(Debug)]
struct Plan {
    /// 1. New material into its slot fields, before status (`api-key` untouched).
    slots_first: Option<Contents>,
    /// 2. The status (written when it differs from the stored one).
    status: ApiKeyStatus,
    /// 3. `api-key` to the active key, once its hash is in status.
    active: Option<Contents>,
    /// The key ID env-var consumers must run with, and whether it changed now.
    roll: Option<(String, bool)>,
    /// What happened (Events, metrics).
    happenings: Vec<Happening>,
    /// Warning Events for conditions that are news.
    news: Vec<(&'static str, String)>,
    /// Consumers newly found unable to follow a rotation (a Warning each, related to the
    /// workload).
    consumer_news: Vec<super::pods::Problem>,
    /// Warnings that fired (metrics; their delivery is recorded in `status`).
    fired: Vec<notify::Notice>,
    /// The next lifecycle step, the next warning threshold, and when the handover state
    /// changes with time alone.
    step_at: Option<DateTime<Utc>>,
    warn_at: Option<DateTime<Utc>>,
    handover_at: Option<DateTime<Utc>>,
    /// The older key is still in use after consumers moved, with a threshold before its
    /// expiry passed (the `apikeys_old_key_in_use` gauge).
    old_key_in_use: bool,
    /// Keys adopted from the Secret (written before an interrupted reconcile).
    adopted: usize,
}

/// One write of a reconcile.
#[derive(Debug)]
enum Write<'a> {
    /// Apply the consumer Secret with these contents.
    Secret(&'a Contents),
    /// Replace the status (when it differs from the stored one).
    Status(&'a ApiKeyStatus),
}

impl Plan {
    /// The writes, in the one order that keeps the invariants across a crash after any
    /// of them (see the module docs).
    fn writes(&self) -> Vec<Write<'_>> {
        let mut out = Vec::new();
        out.extend(self.slots_first.as_ref().map(Write::Secret));
        out.push(Write::Status(&self.status));
        out.extend(self.active.as_ref().map(Write::Secret));
        out
    }
}

/// Decide what this reconcile writes: the lifecycle's steps (new keys minted by
/// `minter`), conditions, details, warnings and the Secret contents of each step.
fn plan(key: &ApiKey, p: &Prepared, now: DateTime<Utc>) -> Plan {
    let old = key.status.clone().unwrap_or_default();
    let mut status = old.clone();
    let generation = key.meta().generation;
    let existing = p.secret.as_ref();
    let mut material = secret::material_of(existing);
    let client_id =
        old.client_id.clone().or_else(|| secret::client_id_of(existing)).unwrap_or_else(keys::new_client_id);
    status.client_id = Some(client_id.clone());

    let known: Vec<String> = old.keys.iter().map(|k| k.hash.clone()).collect();
    let mut minter = Minter::new(&p.rules.format, existing, known, &key.spec.revoked_keys);
    let input = Input {
        rules: &p.rules,
        lifetime: p.lifetime.duration,
        revoked: &key.spec.revoked_keys,
        rotate_request: key.annotations().get(ROTATE_ANNOTATION).map(String::as_str),
        now,
        may_issue: p.blocked.is_none(),
        retire: p.retire,
    };
    let outcome = lifecycle::advance(&input, &mut status, &mut material, &mut minter);
    if status.keys.is_empty() && old.client_id.is_none() {
        // Blocked before its first key: no client ID either (it comes with the first key).
        status.client_id = None;
    }
    // Whether callers moved to the newer key, from the verifier's usage data.
    let handover = handover::evaluate(&p.rules, &status, now, p.usage);
    // A blocked ApiKey says what is blocked (new keys) and what still happens; an owner
    // with something to do about the handover reads it here too.
    let mut details = match &p.blocked {
        Some(b) if old.keys.is_empty() && status.keys.is_empty() => b.message.clone(),
        Some(b) => format!("{}; no new key is issued: {}", b.message, outcome.details),
        None => outcome.details.clone(),
    };
    if matches!(handover.reason, c::NEW_KEY_NOT_YET_USED | c::OLD_KEY_STILL_IN_USE) {
        details = format!("{details}; {}", handover.message);
    }

    // Ready: whether consumers hold a valid key. While the Secret cannot be written
    // (invalid spec, foreign or missing Secret), they hold the key already in api-key.
    let invalid_spec = p.blocked.as_ref().is_some_and(|b| b.reason == c::INVALID_SPEC);
    let may_write_secret = !p.foreign_secret && !invalid_spec && (p.blocked.is_none() || p.secret.is_some());
    // The active key after this reconcile's steps (nothing below changes the keys).
    let active = status.active_slot.and_then(|s| status.keys.iter().find(|k| k.slot == s)).cloned();
    let stuck = !may_write_secret
        && !old.keys.is_empty()
        && material.api_key != active.as_ref().map(|k| k.hash.clone());
    let ready = match (outcome.health, &p.blocked) {
        (Health::Ready, Some(b)) if stuck => Condition::new(
            c::READY,
            FALSE,
            b.reason,
            format!("{details}; the Secret cannot be written, so api-key does not hold the active key"),
            generation,
            now,
        ),
        (Health::Ready, _) => Condition::new(c::READY, TRUE, c::KEY_ACTIVE, details.clone(), generation, now),
        (Health::ExpiredInactive, _) => {
            Condition::new(c::READY, FALSE, c::KEY_EXPIRED_INACTIVE, details.clone(), generation, now)
        }
        (Health::Expired, Some(b)) => {
            Condition::new(c::READY, FALSE, b.reason, details.clone(), generation, now)
        }
        (Health::Expired, None) => {
            Condition::new(c::READY, FALSE, c::KEY_EXPIRED, details.clone(), generation, now)
        }
    };
    set_condition(&mut status.conditions, ready);
    let mut news = issuance_conditions(&mut status, p, generation, now);
    // The owner is recorded at the first reconcile and kept: an edit is refused here as
    // the CEL rule refuses it (from creation on) on clusters that run CEL.
    if status.owner.is_none() && !key.spec.owner.trim().is_empty() {
        status.owner = Some(key.spec.owner.trim().to_string());
    }
    let synced = match status.owner.as_deref().filter(|o| *o != key.spec.owner.trim()) {
        Some(owner) => {
            let message = format!(
                "{}: the keys stay issued to {owner:?}; set spec.owner back to {owner:?}, or create a new ApiKey for {:?}",
                crate::api::OWNER_IMMUTABLE_MESSAGE,
                shown(key.spec.owner.trim())
            );
            let before = find_condition(&old.conditions, c::SYNCED);
            if before.is_none_or(|b| b.reason != c::OWNER_IMMUTABLE || b.message != message) {
                news.push((c::OWNER_IMMUTABLE, message.clone()));
            }
            Condition::new(c::SYNCED, FALSE, c::OWNER_IMMUTABLE, message, generation, now)
        }
        None => Condition::new(c::SYNCED, TRUE, c::APPLIED, "everything was written", generation, now),
    };
    set_condition(&mut status.conditions, synced);
    set_condition(
        &mut status.conditions,
        Condition::new(
            c::HANDOVER,
            handover.status,
            handover.reason,
            handover.message.clone(),
            generation,
            now,
        ),
    );
    // Pods that read the Secret in a way no rotation reaches: a Warning per new one.
    let mut consumer_news = Vec::new();
    if let super::pods::Consumers::Known(problems) = &p.consumers {
        let before = find_condition(&old.conditions, c::CONSUMERS_FOLLOW)
            .filter(|b| b.reason == c::CONSUMER_CANNOT_FOLLOW)
            .map(|b| b.message.split("; ").map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_default();
        // The first MAX_LISTED are named (and warned about) one by one; the rest counted,
        // so neither the status nor the Events grow with what a namespace's pods do.
        let listed = &problems[..problems.len().min(MAX_LISTED_CONSUMERS)];
        consumer_news.extend(listed.iter().filter(|p| !before.contains(&p.message)).cloned());
        let condition = if problems.is_empty() {
            let message =
                "no pod reads the Secret through a subPath mount or as env vars outside spec.consumers";
            Condition::new(c::CONSUMERS_FOLLOW, TRUE, c::CONSUMERS_FOLLOW_ROTATION, message, generation, now)
        } else {
            let mut message = listed.iter().map(|p| p.message.as_str()).collect::<Vec<_>>().join("; ");
            if problems.len() > listed.len() {
                message.push_str(&format!("; and {} more", problems.len() - listed.len()));
            }
            Condition::new(c::CONSUMERS_FOLLOW, FALSE, c::CONSUMER_CANNOT_FOLLOW, message, generation, now)
        };
        set_condition(&mut status.conditions, condition);
    } else if p.consumers == super::pods::Consumers::NotWatched {
        // Pods not watched (any more), or a foreign Secret: nothing is claimed. (While
        // the pod watch has not listed, what was said before stands.)
        status.conditions.retain(|c| c.type_ != c::CONSUMERS_FOLLOW);
    }
    let on_schedule = p.blocked.is_none() && p.rules.automatic && p.rules.enforced && !p.rules.frozen;
    let warnings = notify::evaluate(&p.rules, &mut status, now, on_schedule, &handover);
    super::warnings::address(&mut status, &warnings.fire, p.policy.as_ref());
    let expiring = match &warnings.expiring {
        Some((threshold, end)) => Condition::new(
            c::EXPIRING,
            TRUE,
            c::EXPIRING_SOON,
            format!(
                "the active key expires at {} (within {threshold})",
                end.to_rfc3339_opts(SecondsFormat::Secs, true)
            ),
            generation,
            now,
        ),
        None => Condition::new(
            c::EXPIRING,
            FALSE,
            c::NOT_EXPIRING,
            "no warning threshold has passed",
            generation,
            now,
        ),
    };
    set_condition(&mut status.conditions, expiring);
    status.observed_generation = generation;
    status.next_action = outcome.next.as_ref().map(|n| n.action.as_str().to_string());
    status.next_action_at = outcome.next.as_ref().map(|n| n.at);
    status.details = Some(details);

    // The Secret is written only when this ApiKey owns it (or may create it), and not
    // while a spec field it is built from is invalid.
    let slots = secret::slot_material(existing, &minter.minted, |slot| {
        status.keys.iter().find(|k| k.slot == slot).map(|k| k.hash.clone())
    });
    // The first Secret of an ApiKey skips step 1 (see the module docs).
    let first = p.secret.is_none() && old.keys.is_empty();
    let slots_first = (may_write_secret && !first && (!minter.minted.is_empty() || p.secret.is_none()))
        .then(|| Contents { slots: slots.clone(), active: None, client_id: client_id.clone() });
    let ready_active = active.as_ref().filter(|_| outcome.health == Health::Ready);
    let contents_active = ready_active.filter(|_| may_write_secret).and_then(|a| {
        let material = slots.get(&a.slot)?;
        let expires = lifecycle::ceiling(a).map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true));
        Some(Contents {
            slots: slots.clone(),
            active: Some((material.clone(), a.key_id.clone(), expires)),
            client_id: client_id.clone(),
        })
    });
    // Env-var consumers roll out once per change of the active key.
    let changed =
        outcome.happenings.iter().any(|h| matches!(h, Happening::Flipped { .. } | Happening::Created { .. }));
    let roll = ready_active.filter(|_| !invalid_spec).map(|a| (a.key_id.clone(), changed));
    let old_key_in_use = old_key_in_use(&p.rules, &status, &handover, now);
    Plan {
        slots_first,
        status,
        active: contents_active,
        roll,
        happenings: outcome.happenings,
        news,
        consumer_news,
        fired: warnings.fire,
        step_at: outcome.next.as_ref().map(|n| n.at),
        warn_at: warnings.next,
        handover_at: handover.next,
        old_key_in_use,
        adopted: minter.adopted,
    }
}

async fn run(
    ctx: &Arc<Context>,
    api: &Api<ApiKey>,
    key: &ApiKey,
    p: Prepared,
    now: DateTime<Utc>,
) -> Result<Action> {
    let plan = plan(key, &p, now);
    apply(ctx, api, key, &p, plan, now).await
}

/// Carry out `plan`: the three writes in order, rollouts, Events, metrics, warnings.
async fn apply(
    ctx: &Arc<Context>,
    api: &Api<ApiKey>,
    key: &ApiKey,
    p: &Prepared,
    plan: Plan,
    now: DateTime<Utc>,
) -> Result<Action> {
    let old = key.status.clone().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &key.namespace().unwrap_or_default());
    let mut current = p.secret.clone();
    let mut stored = None;
    let mut failed = None;
    for write in plan.writes() {
        match write {
            Write::Secret(contents) => {
                let want = secret::desired(key, &p.secret_name, current.as_ref(), contents);
                if secret::differs(current.as_ref(), &want) {
                    match apply_secret(ctx, &secrets, current.as_ref(), want).await {
                        Ok(s) => current = Some(s),
                        // Before status: nothing else may be written. After it: the
                        // warnings it recorded are still delivered (below).
                        Err(e) if stored.is_none() => return Err(e),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
            }
            Write::Status(status) => stored = Some(write_status(ctx, api, key, &old, status.clone()).await?),
        }
    }
    // Where each consumer's rollout stands, when they could all be looked at (a failure,
    // or no active key to roll to, leaves the gauges and warnings as they were).
    let mut rollouts = None;
    if failed.is_none()
        && let Some((key_id, changed)) = &plan.roll
    {
        match consumers::roll(ctx, key, key_id, *changed).await {
            Ok(r) => rollouts = Some(r),
            Err(e) => failed = Some(e),
        }
    }
    let stored = stored.flatten();
    if plan.adopted > 0 {
        tracing::info!(apikey = %key.name_any(), namespace = ?key.namespace(), adopted = plan.adopted, "adopted key material written before an interrupted reconcile");
    }
    // Gauges of this controller's ApiKeys only: one that left this shard meanwhile is the
    // other shard's to export (its gauges were dropped here when it left).
    let exported = ctx.reconciles(key);
    let rollout_check = match &rollouts {
        Some(r) => follow_rollouts(ctx, key, &plan.status, r, exported, now).await,
        None => None,
    };
    if exported {
        export_expiry(ctx, key, &plan.status);
        export_usage(ctx, key, &plan.status, plan.old_key_in_use);
    }
    if exported && let super::pods::Consumers::Known(problems) = &p.consumers {
        ctx.metrics.set_consumers_not_following(
            &key.namespace().unwrap_or_default(),
            &key.name_any(),
            problems.len(),
        );
    }
    record(ctx, key, &plan.happenings).await;
    for (reason, message) in &plan.news {
        ctx.warn(key, reason, message).await;
    }
    let ns = key.namespace().unwrap_or_default();
    for problem in &plan.consumer_news {
        let related = Some(problem.reference(&ns));
        ctx.event_related(key, EventType::Warning, c::CONSUMER_CANNOT_FOLLOW, &problem.message, related)
            .await;
    }
    for n in &plan.fired {
        ctx.metrics.count_notification(n.kind, "raised");
    }
    if let Some(b) = &p.blocked {
        ctx.metrics.count_blocked(b.reason);
    }
    // Last, the warnings still to be delivered (recorded in the status just written).
    let retry = super::warnings::deliver(
        ctx,
        api,
        stored.as_ref().unwrap_or(key),
        p.policy.as_ref(),
        now,
        plan.step_at,
    )
    .await?;
    if let Some(e) = failed {
        return Err(e);
    }
    let next =
        [plan.step_at, plan.warn_at, plan.handover_at, retry, rollout_check].into_iter().flatten().min();
    Ok(match (next, &p.blocked) {
        (Some(at), Some(_)) => Action::requeue(until(at, now).min(BLOCKED_RETRY)),
        (Some(at), None) => Action::requeue(until(at, now)),
        (None, Some(_)) => Action::requeue(BLOCKED_RETRY),
        (None, None) => Action::await_change(),
    })
}

/// Env consumers still rolling out to the active key: the gauge (since keyward changed
/// their template, else the flip), and a Warning, once per workload and key, when pods on
/// an older template remain while the key they hold has a quarter of its drain left. Only
/// for a rollout keyward started at the flip: a workload keyward changed later (listed
/// mid-life) has pods that may have started with either key. When to look again: every
/// [`consumers::ROLLOUT_POLL`] (and at the warning's moment) while old pods remain and that
/// key drains, else every minute while anything is pending, so the gauge goes when done.
async fn follow_rollouts(
    ctx: &Context,
    key: &ApiKey,
    status: &ApiKeyStatus,
    rollouts: &[consumers::Rollout],
    exported: bool,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let ns = key.namespace().unwrap_or_default();
    let active = status.active_slot.and_then(|s| status.keys.iter().find(|k| k.slot == s))?;
    let flipped = active.activated_at.unwrap_or(now);
    let since = |r: &consumers::Rollout| r.patched_at.map_or(flipped, |t| t.max(flipped));
    let pending: Vec<&consumers::Rollout> = rollouts.iter().filter(|r| r.pending().is_some()).collect();
    if exported {
        let gauges = pending
            .iter()
            .map(|r| (r.kind.as_str(), r.name.clone(), since(r).timestamp_millis() as f64 / 1000.0));
        ctx.metrics.set_rollouts_pending(&ns, &key.name_any(), gauges.collect());
    }
    if pending.is_empty() {
        return None;
    }
    let slow = now + chrono::TimeDelta::seconds(60);
    let draining = status
        .keys
        .iter()
        .find(|k| k.slot == active.slot.other() && lifecycle::is_valid(k) && k.activated_at.is_some())
        .and_then(|l| l.effective_expires_at.map(|e| (l, e)));
    let old: Vec<&&consumers::Rollout> = pending.iter().filter(|r| r.old_pods.is_some()).collect();
    let Some((left, end)) = draining.filter(|_| !old.is_empty()) else { return Some(slow) };
    let warn_at = end - (end - flipped) / 4;
    if now >= warn_at {
        // Started at the flip: keyward's change came with it (its time is to the second).
        let at_flip = |r: &consumers::Rollout| {
            r.patched_at.is_some_and(|t| t <= flipped + chrono::TimeDelta::seconds(60))
        };
        for r in old.iter().filter(|r| at_flip(r)) {
            let id = format!("{}|{:?}|{}|{}", object_id(key), r.kind, r.name, active.key_id);
            if ctx.rollout_warned(&id, &active.key_id) {
                continue;
            }
            let message = format!(
                "{} {ns}/{} has not finished rolling out to key {} ({}); its pods still on the old template \
                 hold key {}, which stops verifying at {}",
                r.kind.as_str(),
                r.name,
                active.key_id,
                r.old_pods.as_deref().unwrap_or_default(),
                left.key_id,
                end.to_rfc3339_opts(SecondsFormat::Secs, true),
            );
            let related = consumers::reference(r.kind, &r.name, &ns);
            if ctx
                .event_related(
                    key,
                    EventType::Warning,
                    c::CONSUMER_ROLLOUT_INCOMPLETE,
                    &message,
                    Some(related),
                )
                .await
            {
                ctx.rollout_warning_sent(id);
            }
        }
    }
    let poll = now + chrono::TimeDelta::from_std(consumers::ROLLOUT_POLL).unwrap_or_default();
    Some(if warn_at > now { poll.min(warn_at) } else { poll.min(end) }.max(now))
}

/// The active and waiting standby keys' expiries as gauges (for alerts such as "expires
/// within a week and no standby is ready").
fn export_expiry(ctx: &Context, key: &ApiKey, status: &ApiKeyStatus) {
    use crate::api::KeyState;
    use crate::metrics::KeyLabels;
    let labels =
        |role| KeyLabels { namespace: key.namespace().unwrap_or_default(), apikey: key.name_any(), role };
    for (role, k) in [
        ("active", status.keys.iter().find(|k| k.state == KeyState::Active)),
        ("standby", status.keys.iter().find(|k| k.state == KeyState::Standby && k.activated_at.is_none())),
    ] {
        match k.and_then(|k| k.effective_expires_at) {
            Some(t) => {
                ctx.metrics.key_expiry.get_or_create(&labels(role)).set(t.timestamp_millis() as f64 / 1000.0);
            }
            None => {
                ctx.metrics.key_expiry.remove(&labels(role));
            }
        }
    }
}

/// Whether the older key is still in use after consumers moved and the first warning
/// threshold before its expiry has passed.
fn old_key_in_use(
    rules: &lifecycle::Rules,
    status: &ApiKeyStatus,
    handover: &handover::Handover,
    now: DateTime<Utc>,
) -> bool {
    let Some((key_id, _)) = &handover.still_in_use else { return false };
    let end = status.keys.iter().find(|k| k.key_id == *key_id).and_then(|k| k.effective_expires_at);
    let longest = rules.notify_before.first();
    match (end, longest) {
        (Some(end), Some((_, d))) => d.sub_from(end).is_ok_and(|t| t <= now),
        _ => false,
    }
}

/// Each valid key's last use as a gauge by slot, and whether the ApiKey's older key is
/// still in use close to its expiry.
fn export_usage(ctx: &Context, key: &ApiKey, status: &ApiKeyStatus, old_key_in_use: bool) {
    use crate::metrics::SlotLabels;
    let (ns, name) = (key.namespace().unwrap_or_default(), key.name_any());
    for slot in [crate::api::Slot::Primary, crate::api::Slot::Secondary] {
        let labels = SlotLabels {
            namespace: ns.clone(),
            apikey: name.clone(),
            slot: if slot == crate::api::Slot::Primary { "Primary" } else { "Secondary" },
        };
        let used = status
            .keys
            .iter()
            .find(|k| k.slot == slot && lifecycle::is_valid(k))
            .and_then(|k| k.last_used_at);
        match used {
            Some(t) => {
                ctx.metrics.key_last_used.get_or_create(&labels).set(t.timestamp_millis() as f64 / 1000.0);
            }
            None => {
                ctx.metrics.key_last_used.remove(&labels);
            }
        }
    }
    ctx.metrics.set_old_key_in_use(&ns, &name, old_key_in_use);
}

/// How long until `at` (at least a millisecond, so an overdue step runs at once).
fn until(at: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (at - now).to_std().unwrap_or_default().max(Duration::from_millis(1))
}

/// Create the Secret, or server-side apply it (resourceVersion as a precondition, so a
/// Secret replaced meanwhile is not overwritten). Returns what the server stored.
async fn apply_secret(
    ctx: &Context,
    api: &Api<Secret>,
    current: Option<&Secret>,
    mut want: Secret,
) -> Result<Secret> {
    let name = want.name_any();
    let stored = match current {
        None => {
            let pp = PostParams { field_manager: Some(SECRET_MANAGER.into()), ..Default::default() };
            api.create(&pp, &want).await.map_err(Error::kube(format!("creating Secret {name}")))?
        }
        Some(have) => {
            want.metadata.resource_version = have.resource_version();
            let pp = PatchParams::apply(SECRET_MANAGER).force();
            api.patch(&name, &pp, &Patch::Apply(&want))
                .await
                .map_err(Error::kube(format!("applying Secret {name}")))?
        }
    };
    ctx.own_writes.wrote(&stored);
    ctx.metrics.count_write("secrets");
    Ok(stored)
}

/// Replace the status when it differs (resourceVersion precondition: a concurrent
/// writer, such as the verifier's `lastUsedAt`, makes this a conflict and a retry).
/// Returns the ApiKey as stored, when it was written.
pub(super) async fn write_status(
    ctx: &Context,
    api: &Api<ApiKey>,
    key: &ApiKey,
    old: &ApiKeyStatus,
    status: ApiKeyStatus,
) -> Result<Option<ApiKey>> {
    if *old == status {
        return Ok(None);
    }
    let mut updated = key.clone();
    updated.status = Some(status);
    let pp = PostParams { field_manager: Some(STATUS_MANAGER.into()), ..Default::default() };
    let stored = api.replace_status(&key.name_any(), &pp, &updated).await.map_err(|e| {
        if matches!(&e, kube::Error::Api(s) if s.code == 409) {
            ctx.own_writes.stale(key);
        }
        Error::kube(format!("writing ApiKey {} status", key.name_any()))(e)
    })?;
    ctx.own_writes.wrote(&stored);
    ctx.metrics.count_write("apikeys/status");
    Ok(Some(stored))
}

/// Events and metrics for what happened. Only key IDs, never material.
///
/// One Event per reconcile (a rotation is issue + flip, a scheduled regeneration is
/// expiry + issue): its reason is the most significant happening, its note lists them
/// all in order, and it is a Warning when any of them is. Metrics count each happening.
async fn record(ctx: &Context, key: &ApiKey, happenings: &[Happening]) {
    if let Some((type_, reason, note)) = summarize(happenings) {
        ctx.event(key, type_, reason, &note).await;
    }
    let mut seen: BTreeMap<&'static str, u64> = BTreeMap::new();
    for h in happenings {
        *seen.entry(describe(h).2).or_default() += 1;
    }
    for (reason, n) in seen {
        ctx.metrics.count_lifecycle(reason, n);
    }
}

/// The one Event for `happenings`: (type, reason, note), None when nothing happened.
fn summarize(happenings: &[Happening]) -> Option<(EventType, &'static str, String)> {
    let described: Vec<_> = happenings.iter().map(describe).collect();
    let (_, _, reason, _) = described.iter().min_by_key(|d| d.0)?;
    let type_ = if described.iter().any(|d| d.1) { EventType::Warning } else { EventType::Normal };
    Some((type_, reason, described.iter().map(|d| d.3.as_str()).collect::<Vec<_>>().join("; ")))
}

/// A happening's (rank: lower is more significant, Warning?, Event reason, note).
fn describe(h: &Happening) -> (usize, bool, &'static str, String) {
    match h {
        Happening::Repaired { slot } => (
            0,
            true,
            "SecretRepaired",
            format!(
                "the Secret lacked the {slot} key's material (deleted or edited); issued or flipped to a key that is there"
            ),
        ),
        Happening::Revoked { slot, key_id } => {
            (1, false, "KeyRevoked", format!("{slot} key {key_id} revoked"))
        }
        Happening::Rotated => {
            (2, false, "KeyRotated", "rotation requested by annotation keyward.dev/rotate".to_string())
        }
        Happening::Expired { slot, key_id, reason } => (
            3,
            *reason == ExpiryReason::Inactivity,
            "KeyExpired",
            format!("{slot} key {key_id} expired ({reason:?})"),
        ),
        Happening::Retiring { slot, key_id, at } => (
            4,
            false,
            "KeyRetiring",
            format!(
                "{slot} key {key_id} has drained (its successor is in use and it is not): it stops verifying at {} (rotation.retireDrainedAfter)",
                at.to_rfc3339_opts(SecondsFormat::Secs, true)
            ),
        ),
        Happening::RetirementCancelled { slot, key_id } => (
            5,
            true,
            "KeyRetirementCancelled",
            format!(
                "{slot} key {key_id} was used again before its early retirement: it keeps its scheduled end"
            ),
        ),
        Happening::Flipped { to, key_id } => {
            (6, false, "KeyFlipped", format!("consumers moved to the {to} key {key_id}"))
        }
        Happening::Created { slot, key_id } => {
            (7, false, "KeyCreated", format!("issued {slot} key {key_id}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_reconcile_names_the_most_significant_happening() {
        use crate::api::Slot;
        let created = Happening::Created { slot: Slot::Secondary, key_id: "k2".into() };
        let flipped = Happening::Flipped { to: Slot::Secondary, key_id: "k2".into() };
        let (t, reason, note) = summarize(&[Happening::Rotated, created.clone(), flipped]).unwrap();
        assert_eq!((t, reason), (EventType::Normal, "KeyRotated"));
        assert_eq!(
            note,
            "rotation requested by annotation keyward.dev/rotate; issued Secondary key k2; \
             consumers moved to the Secondary key k2"
        );
        let idle =
            Happening::Expired { slot: Slot::Primary, key_id: "k1".into(), reason: ExpiryReason::Inactivity };
        let (t, reason, _) = summarize(&[created, idle]).unwrap();
        assert_eq!((t, reason), (EventType::Warning, "KeyExpired"));
        assert_eq!(summarize(&[]), None);
    }

    /// The stored ApiKey and its Secret, as the writes of [`apply`] leave them.
    #[derive(Clone)]
    struct World {
        key: ApiKey,
        secret: Option<Secret>,
    }

    impl World {
        fn prepared(&self, rules: &lifecycle::Rules) -> Prepared {
            Prepared {
                policy: None,
                rules: rules.clone(),
                lifetime: lifecycle::Lifetime { duration: rules.max_lifetime, clamped: None },
                secret_name: "svc".into(),
                secret: self.secret.clone(),
                foreign_secret: false,
                blocked: None,
                retire: false,
                usage: Default::default(),
                consumers: Default::default(),
            }
        }

        /// The first `writes` of the plan's writes (a crash after them).
        fn write(&mut self, plan: &Plan, writes: usize) {
            for write in plan.writes().into_iter().take(writes) {
                match write {
                    Write::Secret(c) => {
                        self.secret = Some(secret::desired(&self.key, "svc", self.secret.as_ref(), c));
                    }
                    Write::Status(status) => self.key.status = Some(status.clone()),
                }
            }
        }

        fn data(&self, field: &str) -> Option<String> {
            let bytes = self.secret.as_ref()?.data.as_ref()?.get(field)?;
            String::from_utf8(bytes.0.clone()).ok()
        }

        /// The promise, checked on what is stored: the key in `api-key` verifies (its
        /// hash is in status, valid at `now`), and every slot field's key is either in
        /// status or will be adopted by the next reconcile, never lost.
        fn check(&self, now: DateTime<Utc>, when: &str) {
            let keys = self.key.status.as_ref().map(|s| s.keys.clone()).unwrap_or_default();
            if let Some(held) = self.data(secret::data::API_KEY) {
                let hash = keys::hash(&held);
                let k = keys.iter().find(|k| k.hash == hash);
                assert!(
                    k.is_some_and(
                        |k| lifecycle::is_valid(k) && k.effective_expires_at.is_none_or(|t| t > now)
                    ),
                    "{when}: the key in api-key does not verify: {k:?}"
                );
            }
            // The active key and a waiting standby can be moved to: their material is in
            // the Secret (except before the first Secret exists, which is created whole
            // after status). A draining key's may be gone.
            if self.secret.is_some() {
                let held: Vec<String> = [secret::data::API_KEY, "primary", "secondary"]
                    .into_iter()
                    .filter_map(|f| self.data(f).map(|m| keys::hash(&m)))
                    .collect();
                let movable = |k: &&crate::api::KeyStatus| {
                    lifecycle::is_valid(k)
                        && (k.state == crate::api::KeyState::Active || k.activated_at.is_none())
                };
                for k in keys.iter().filter(movable) {
                    assert!(
                        held.contains(&k.hash),
                        "{when}: key {} is in status but not in the Secret",
                        k.key_id
                    );
                }
            }
        }
    }

    #[test]
    fn a_crash_between_any_two_writes_never_leaves_a_consumer_with_a_key_that_does_not_verify() {
        use chrono::TimeDelta;
        let mut spec = crate::api::KeyPolicySpec::default();
        spec.expiry.max_lifetime = "PT30S".into();
        spec.expiry.min_lifetime = "PT1S".into();
        spec.rotation.flip_before = "PT5S".into();
        spec.notifications.before = vec![];
        let t0 = DateTime::parse_from_rfc3339("2026-11-23T00:00:00Z").unwrap().to_utc();
        let rules = lifecycle::Rules::from_spec(&spec, t0 - TimeDelta::days(1)).unwrap();
        let mut key: ApiKey = serde_json::from_value(serde_json::json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": "svc", "namespace": "n", "uid": "u-1", "generation": 1},
            "spec": {"owner": "team"},
        }))
        .unwrap();
        let mut world = World { key: key.clone(), secret: None };
        let mut issued = std::collections::BTreeSet::new();
        for step in 0..200u32 {
            let now = t0 + TimeDelta::milliseconds(i64::from(step) * 500);
            if step == 90 {
                // A rotation request in the middle.
                key.annotations_mut().insert(ROTATE_ANNOTATION.into(), "r1".into());
                world.key.metadata.annotations = key.metadata.annotations.clone();
            }
            let plan = plan(&world.key, &world.prepared(&rules), now);
            let writes = plan.writes().len();
            // A crash after each prefix of the writes; the next reconcile (same instant)
            // must repair from whatever was stored. The run goes on from one of them.
            let mut outcomes = Vec::new();
            for crash_after in 0..=writes {
                let when = format!("step {step}, crash after {crash_after} of {writes} writes");
                let mut crashed = world.clone();
                crashed.write(&plan, crash_after);
                crashed.check(now, &when);
                let again = plan_of(&crashed, &rules, now);
                if crash_after >= 1 && plan.slots_first.is_some() {
                    let hashes = |s: &ApiKeyStatus| s.keys.iter().map(|k| k.hash.clone()).collect::<Vec<_>>();
                    assert_eq!(
                        hashes(&again.status),
                        hashes(&plan.status),
                        "{when}: material written before the crash is adopted, not issued again"
                    );
                }
                crashed.write(&again, usize::MAX);
                crashed.check(now, &format!("{when}, then recovered"));
                outcomes.push(crashed);
            }
            world = outcomes.swap_remove(step as usize % (writes + 1));
            issued.extend(world.key.status.iter().flat_map(|s| &s.keys).map(|k| k.key_id.clone()));
        }
        // 100 s of 30 s keys with a standby each half-life and one rotation: each key
        // once, and nothing issued twice for one step (a rotation adds one).
        assert!((7..=9).contains(&issued.len()), "{} keys issued: {issued:?}", issued.len());
    }

    #[test]
    fn consumers_that_cannot_follow_are_named_up_to_a_bound_and_warned_about_once() {
        let mut spec = crate::api::KeyPolicySpec::default();
        spec.expiry.max_lifetime = "P1D".into();
        let now = DateTime::parse_from_rfc3339("2026-11-23T00:00:00Z").unwrap().to_utc();
        let rules = lifecycle::Rules::from_spec(&spec, now).unwrap();
        let key: ApiKey = serde_json::from_value(serde_json::json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": "svc", "namespace": "n", "uid": "u-1", "generation": 1},
            "spec": {"owner": "team"},
        }))
        .unwrap();
        let mut world = World { key, secret: None };
        use super::super::pods::{Consumers, Problem, Workload};
        let problem = |i: usize| Problem {
            workload: Workload { api_version: "v1".into(), kind: "Pod".into(), name: format!("p{i:02}") },
            message: format!("Pod n/p{i:02} (container c) mounts the Secret with subPath at /k"),
        };
        let mut prepared = world.prepared(&rules);
        prepared.consumers = Consumers::Known((0..12).map(problem).collect());
        let first = plan(&world.key, &prepared, now);
        assert_eq!(first.consumer_news.len(), MAX_LISTED_CONSUMERS, "a Warning each for the named ones");
        let c = find_condition(&first.status.conditions, c::CONSUMERS_FOLLOW).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), (FALSE, c::CONSUMER_CANNOT_FOLLOW));
        assert!(
            c.message.contains("p09") && !c.message.contains("p10") && c.message.ends_with("; and 2 more")
        );
        // The next reconcile (status stored): the same problems are no news.
        world.key.status = Some(first.status.clone());
        assert!(plan(&world.key, &prepared, now).consumer_news.is_empty());
        // One fixed, a new one: only the new one is news; all fixed: True.
        prepared.consumers = Consumers::Known((1..13).map(problem).collect());
        let news: Vec<String> =
            plan(&world.key, &prepared, now).consumer_news.iter().map(|p| p.workload.name.clone()).collect();
        assert_eq!(news, ["p10"]);
        // Before the pod watch has listed (a restart): what was said stands, no news.
        prepared.consumers = Consumers::NotKnown;
        let unknown = plan(&world.key, &prepared, now);
        assert!(unknown.consumer_news.is_empty());
        let said = |plan: &Plan| find_condition(&plan.status.conditions, c::CONSUMERS_FOLLOW).cloned();
        assert_eq!(said(&unknown), said(&first));
        prepared.consumers = Consumers::Known(vec![]);
        let c = plan(&world.key, &prepared, now).status.conditions;
        assert_eq!(find_condition(&c, c::CONSUMERS_FOLLOW).unwrap().status, TRUE);
        // A controller that does not watch pods claims nothing.
        prepared.consumers = Consumers::NotWatched;
        let c = plan(&world.key, &prepared, now).status.conditions;
        assert!(find_condition(&c, c::CONSUMERS_FOLLOW).is_none());
    }

    fn plan_of(world: &World, rules: &lifecycle::Rules, now: DateTime<Utc>) -> Plan {
        plan(&world.key, &world.prepared(rules), now)
    }

    fn spec(extra: serde_json::Value) -> crate::api::ApiKeySpec {
        let mut v = serde_json::json!({"owner": "team"});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn names_and_secret_metadata_are_checked_before_use() {
        use serde_json::json;
        for ok in [
            json!({}),
            json!({"policy": "standard", "secretName": "svc.key-1"}),
            json!({"consumers": [{"kind": "Deployment", "name": "checkout"}]}),
            json!({"secretTemplate": {"labels": {"app.kubernetes.io/part-of": "shop", "empty": ""},
                                      "annotations": {"example.com/Note_1": "any text / at all"}}}),
        ] {
            assert_eq!(spec_problem(&spec(ok.clone())), None, "{ok}");
        }
        let long = "a".repeat(254);
        for (bad, field) in [
            (json!({"owner": "  "}), "spec.owner"),
            (json!({"policy": "standard/status"}), "spec.policy"),
            (json!({"policy": long}), "spec.policy"),
            (json!({"secretName": "Bad_Name"}), "spec.secretName"),
            (json!({"secretName": "-x"}), "spec.secretName"),
            (json!({"secretName": "a..b"}), "spec.secretName"),
            (
                json!({"consumers": [{"kind": "Deployment", "name": "ok"}, {"kind": "Deployment", "name": "x/scale"}]}),
                "spec.consumers[1].name",
            ),
            (json!({"secretTemplate": {"labels": {"bad key": "v"}}}), "labels"),
            (json!({"secretTemplate": {"labels": {"k": "v".repeat(64)}}}), "labels"),
            (json!({"secretTemplate": {"labels": {"Bad.Prefix/k": "v"}}}), "labels"),
            (json!({"secretTemplate": {"annotations": {"/x": "v"}}}), "annotations"),
            (json!({"secretTemplate": {"annotations": {"k": "v".repeat(300 * 1024)}}}), "256 KiB"),
        ] {
            let b = spec_problem(&spec(bad.clone())).unwrap_or_else(|| panic!("{bad} should be refused"));
            assert_eq!(b.reason, c::INVALID_SPEC);
            assert!(b.message.contains(field), "{} should name {field}", b.message);
            assert!(b.message.len() < 400, "input is quoted truncated: {}", b.message.len());
        }
    }
}
