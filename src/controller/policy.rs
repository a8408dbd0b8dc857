//! KeyPolicies: which one an ApiKey uses (named, else the single default; the
//! namespaceSelector honoured), and the KeyPolicy reconcile (`Accepted`,
//! `maxLifetimeSince`, `keyCount`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::context::Context;
use super::status::{STATUS_MANAGER, now};
use crate::api::{
    ApiKey, Condition, FALSE, KeyPolicy, TRUE, conditions as c, policy_conditions as pc, set_condition,
};
use crate::error::{Error, Result};
use crate::lifecycle::Rules;

/// Why an ApiKey cannot proceed: a `Ready` reason and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    /// One of [`crate::api::conditions`].
    pub reason: &'static str,
    /// Human-readable.
    pub message: String,
}

/// Blocked with `reason` and `message`.
pub fn blocked(reason: &'static str, message: impl Into<String>) -> Blocked {
    Blocked { reason, message: message.into() }
}

/// Does `labels` match `selector` (matchLabels and matchExpressions)? An empty
/// selector matches everything; an unknown operator matches nothing.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    by_labels && by_expressions
}

/// The policy an ApiKey uses, as far as it could be found and parsed.
#[derive(Debug, Default)]
pub struct Resolved {
    /// The policy, when one was found.
    pub policy: Option<KeyPolicy>,
    /// Its rules, when it is valid (also when it does not allow the namespace: its caps
    /// and expiries still apply to the keys already issued under it).
    pub rules: Option<Rules>,
    /// Why no new key may be issued under it.
    pub blocked: Option<Blocked>,
}

fn unusable(b: Blocked) -> Resolved {
    Resolved { blocked: Some(b), ..Default::default() }
}

/// Keep a policy read from the API until the cache has its generation, so that no later
/// reconcile plans with an older one (a key issued under a raised owner limit must not
/// then be judged by the cached, lower one).
fn remember_live(ctx: &Context, p: KeyPolicy) -> KeyPolicy {
    let mut live = ctx.live_policies.lock().unwrap_or_else(|e| e.into_inner());
    live.insert(p.name_any(), p.clone());
    p
}

/// The cached policy, or the copy read from the API when that is a later generation of
/// the same object (forgotten once the cache has caught up, or the object was replaced).
fn newest(ctx: &Context, cached: &KeyPolicy) -> KeyPolicy {
    let mut live = ctx.live_policies.lock().unwrap_or_else(|e| e.into_inner());
    let name = cached.name_any();
    match live.get(&name) {
        Some(l)
            if l.metadata.uid == cached.metadata.uid
                && matches!((l.metadata.generation, cached.metadata.generation), (Some(a), Some(b)) if a > b) =>
        {
            l.clone()
        }
        Some(_) => {
            live.remove(&name);
            cached.clone()
        }
        None => cached.clone(),
    }
}

/// The policy an ApiKey uses and its rules, and why it cannot issue keys under it.
pub async fn resolve(ctx: &Context, key: &ApiKey, now: DateTime<Utc>) -> Result<Resolved> {
    // From the watch cache (policy changes re-trigger the ApiKeys that use them); only
    // what the cache lacks is confirmed by reading the API, so a policy created just
    // before its ApiKeys is never reported missing. The first key, though, is issued only
    // on an up-to-date answer: a policy applied together with its ApiKey (a second
    // default, a narrower namespaceSelector, a new keyFormat) may reach this cache after
    // the ApiKey does, and a key issued under the old one could not be taken back.
    let first = key.status.as_ref().is_none_or(|s| s.keys.is_empty());
    let policies: Api<KeyPolicy> = Api::all(ctx.client.clone());
    let policy = match &key.spec.policy {
        Some(name) => match ctx.policies.get(&ObjectRef::new(name)).filter(|_| !first) {
            Some(p) => newest(ctx, &p),
            None => match policies
                .get_opt(name)
                .await
                .map_err(Error::kube(format!("reading KeyPolicy {name}")))?
            {
                Some(p) => remember_live(ctx, p),
                None => {
                    return Ok(unusable(blocked(
                        c::POLICY_NOT_FOUND,
                        format!("KeyPolicy {name:?} does not exist"),
                    )));
                }
            },
        },
        None => {
            let cached: Vec<KeyPolicy> =
                ctx.policies.state().iter().map(|p| newest(ctx, p)).filter(|p| p.spec.default).collect();
            // Two defaults in the cache refuse a first key as they are (no read per
            // retry of an ApiKey that cannot get one); one or none is confirmed.
            let mut defaults = if cached.is_empty() || (first && cached.len() == 1) {
                let list =
                    policies.list(&Default::default()).await.map_err(Error::kube("listing KeyPolicies"))?;
                list.items.into_iter().map(|p| remember_live(ctx, p)).filter(|p| p.spec.default).collect()
            } else {
                cached
            };
            match defaults.len() {
                0 => {
                    return Ok(unusable(blocked(
                        c::POLICY_NOT_FOUND,
                        "spec.policy is not set and no KeyPolicy is marked default",
                    )));
                }
                1 => defaults.remove(0),
                _ => {
                    let names: Vec<String> = defaults.iter().map(|p| p.name_any()).collect();
                    return Ok(unusable(blocked(
                        c::POLICY_NOT_FOUND,
                        format!(
                            "spec.policy is not set and {} KeyPolicies are marked default ({}); name one",
                            names.len(),
                            names.join(", ")
                        ),
                    )));
                }
            }
        }
    };
    let name = policy.name_any();
    // Validity first: a broken selector is the policy's fault, not the namespace's.
    let rules = match Rules::from_policy(&policy, now) {
        Ok(rules) => rules,
        Err(p) => {
            let b = blocked(c::POLICY_INVALID, format!("KeyPolicy {name:?} is not accepted: {}", p.message));
            return Ok(Resolved { policy: Some(policy), rules: None, blocked: Some(b) });
        }
    };
    if let Some(selector) = &policy.spec.namespace_selector {
        let ns = key.namespace().unwrap_or_default();
        let namespace = Api::<Namespace>::all(ctx.client.clone())
            .get_opt(&ns)
            .await
            .map_err(Error::kube(format!("reading namespace {ns}")))?;
        let labels = namespace.map(|n| n.labels().clone()).unwrap_or_default();
        if !selector_matches(selector, &labels) {
            let b = blocked(
                c::POLICY_NOT_ALLOWED,
                format!("KeyPolicy {name:?} does not allow namespace {ns:?} (namespaceSelector)"),
            );
            return Ok(Resolved { policy: Some(policy), rules: Some(rules), blocked: Some(b) });
        }
    }
    Ok(Resolved { policy: Some(policy), rules: Some(rules), blocked: None })
}

/// Reconcile a KeyPolicy: validate it, record since when its `maxLifetime` applies,
/// count its ApiKeys. Writes status only when something changed.
pub async fn reconcile(obj: Arc<KeyPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let api: Api<KeyPolicy> = Api::all(ctx.client.clone());
    let name = obj.name_any();
    let Some(policy) = api.get_opt(&name).await.map_err(Error::kube(format!("reading KeyPolicy {name}")))?
    else {
        return Ok(Action::await_change());
    };
    let now = now();
    let old = policy.status.clone().unwrap_or_default();
    let mut status = old.clone();
    let observed = crate::lifecycle::observed_expiry(&policy.spec);
    if status.observed_max_lifetime.as_deref() != Some(observed.as_str()) {
        // First sight counts from the policy's creation; a later change from now.
        let since = match status.observed_max_lifetime {
            None => policy.meta().creation_timestamp.as_ref().map_or(now, |t| {
                DateTime::<Utc>::from_timestamp(t.0.as_second(), t.0.subsec_nanosecond() as u32)
                    .unwrap_or(now)
            }),
            Some(_) => now,
        };
        status.max_lifetime_since = Some(since);
        status.observed_max_lifetime = Some(observed);
    }
    let generation = policy.meta().generation;
    let other_defaults: Vec<String> = if policy.spec.default {
        ctx.policies
            .state()
            .iter()
            .filter(|p| p.spec.default && p.name_any() != name)
            .map(|p| p.name_any())
            .collect()
    } else {
        vec![]
    };
    let accepted = match Rules::from_spec(&policy.spec, status.max_lifetime_since.unwrap_or(now)) {
        Err(p) => Condition::new(pc::ACCEPTED, FALSE, p.reason, p.message, generation, now),
        Ok(_) if !other_defaults.is_empty() => Condition::new(
            pc::ACCEPTED,
            FALSE,
            pc::MULTIPLE_DEFAULTS,
            format!(
                "also marked default: {}; ApiKeys without spec.policy cannot choose",
                other_defaults.join(", ")
            ),
            generation,
            now,
        ),
        // Used all the same: advice, not a refusal (short lifetimes are legitimate, and
        // minFlipLead changes no schedule).
        Ok(rules) => match (rules.min_flip_lead_invalid.clone(), rules.short_flip_lead()) {
            (Some(why), _) => {
                Condition::new(pc::ACCEPTED, TRUE, pc::MIN_FLIP_LEAD_INVALID, why, generation, now)
            }
            (None, Some(why)) => {
                Condition::new(pc::ACCEPTED, TRUE, pc::FLIP_LEAD_BELOW_MINIMUM, why, generation, now)
            }
            (None, None) => Condition::new(pc::ACCEPTED, TRUE, pc::VALID, "policy is valid", generation, now),
        },
    };
    // A Warning Event for a refusal, and for a policy used despite advice.
    let warn = accepted.status == FALSE || accepted.reason != pc::VALID;
    let changed_reason = crate::api::find_condition(&old.conditions, pc::ACCEPTED)
        .map(|c| (&c.reason, &c.message))
        != Some((&accepted.reason, &accepted.message));
    set_condition(&mut status.conditions, accepted.clone());
    status.observed_generation = generation;
    status.key_count = ctx.count_using(&name, policy.spec.default && other_defaults.is_empty()) as u32;
    if status != old {
        let mut updated = policy.clone();
        updated.status = Some(status);
        let pp = PostParams { field_manager: Some(STATUS_MANAGER.into()), ..Default::default() };
        api.replace_status(&name, &pp, &updated)
            .await
            .map_err(Error::kube(format!("writing KeyPolicy {name} status")))?;
        ctx.metrics.count_write("keypolicies/status");
        if warn && changed_reason {
            ctx.warn(&policy, &accepted.reason, &accepted.message).await;
        }
    }
    // keyCount follows ApiKeys without a trigger per ApiKey change: refresh it each minute.
    Ok(Action::requeue(Duration::from_secs(60)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn selectors() {
        let empty = LabelSelector::default();
        assert!(selector_matches(&empty, &labels(&[])));
        let by_label = LabelSelector { match_labels: Some(labels(&[("team", "a")])), ..Default::default() };
        assert!(selector_matches(&by_label, &labels(&[("team", "a"), ("x", "y")])));
        assert!(!selector_matches(&by_label, &labels(&[("team", "b")])));
        let expr = |op: &str, values: &[&str]| LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "env".into(),
                operator: op.into(),
                values: Some(values.iter().map(|s| s.to_string()).collect()),
            }]),
            ..Default::default()
        };
        assert!(selector_matches(&expr("In", &["prod", "stage"]), &labels(&[("env", "prod")])));
        assert!(!selector_matches(&expr("In", &["prod"]), &labels(&[])));
        assert!(selector_matches(&expr("NotIn", &["prod"]), &labels(&[])));
        assert!(!selector_matches(&expr("NotIn", &["prod"]), &labels(&[("env", "prod")])));
        assert!(selector_matches(&expr("Exists", &[]), &labels(&[("env", "")])));
        assert!(selector_matches(&expr("DoesNotExist", &[]), &labels(&[])));
        assert!(!selector_matches(&expr("Banana", &[]), &labels(&[("env", "x")])));
    }
}
