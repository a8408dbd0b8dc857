//! The per-owner limits of a KeyPolicy (`limits.maxKeysPerOwner`,
//! `limits.uniqueDescriptionPerOwner`): the verdict over an owner's ApiKeys (pure), and
//! how an ApiKey's reconcile reaches it (the watch cache, confirmed on the API before
//! any keys end).

use chrono::{DateTime, Utc};
use kube::api::Api;
use kube::{Resource, ResourceExt};

use crate::api::{ApiKey, conditions as c};
use crate::controller::context::Context;
use crate::controller::policy::{Blocked, blocked};
use crate::error::{Error, Result};
use crate::lifecycle;

/// One ApiKey of an owner, for the per-owner limits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct OwnedKey {
    /// Creation time (older wins).
    pub created: Option<DateTime<Utc>>,
    /// Name (tie-breaker).
    pub name: String,
    /// Description (trimmed; empty counts as none).
    pub description: String,
    /// Whether it holds valid keys (then a duplicate description never refuses it).
    pub holds_keys: bool,
}

/// Admit an owner's ApiKeys oldest first: a key without keys yet whose description an
/// admitted key already has is a `DuplicateDescription` (when descriptions must be
/// unique: a hygiene rule checked at admission, so an edit of one ApiKey's description
/// never refuses another that already serves keys), and beyond `max` admitted keys the
/// rest are `OwnerKeyLimitExceeded`. Refused keys do not take a place. The verdict for
/// `name`.
pub fn owner_verdict(
    mut keys: Vec<OwnedKey>,
    name: &str,
    owner: &str,
    max: usize,
    unique: bool,
) -> Option<Blocked> {
    keys.sort();
    let mut admitted: Vec<&OwnedKey> = Vec::new();
    for k in &keys {
        let verdict = if unique
            && !k.holds_keys
            && !k.description.is_empty()
            && admitted.iter().any(|a| a.description == k.description)
        {
            let older = admitted
                .iter()
                .find(|a| a.description == k.description)
                .map(|a| a.name.clone())
                .unwrap_or_default();
            Some(blocked(
                c::DUPLICATE_DESCRIPTION,
                format!(
                    "owner {owner:?} already has ApiKey {older:?} with this description; descriptions are unique per owner"
                ),
            ))
        } else if admitted.len() >= max {
            let names: Vec<&str> = admitted.iter().map(|a| a.name.as_str()).collect();
            Some(blocked(
                c::OWNER_KEY_LIMIT_EXCEEDED,
                format!(
                    "owner {owner:?} may hold {max} ApiKeys in this namespace and holds {}: the oldest win",
                    names.join(", ")
                ),
            ))
        } else {
            admitted.push(k);
            None
        };
        if k.name == name {
            return verdict;
        }
    }
    None
}

/// The per-owner limits of the policy, over the ApiKeys of this owner in the namespace
/// (from the watch cache, plus this ApiKey itself), oldest first by (creationTimestamp,
/// name). Also whether the ApiKey lost a place it had: refused while it holds valid
/// keys, which then end. That verdict is never taken from the cache alone (an ApiKey
/// deleted a moment ago may still be in it): it is confirmed on a fresh list and a fresh
/// read of the policy.
pub(super) async fn owner_limits(
    ctx: &Context,
    key: &ApiKey,
    policy: &crate::api::KeyPolicy,
) -> Result<(Option<Blocked>, bool)> {
    let ns = key.namespace().unwrap_or_default();
    let owned: Vec<_> =
        ctx.keys_of_owner(&ns, key.owner()).iter().filter_map(|r| ctx.apikeys.get(r)).collect();
    let cached = verdict_among(owned.iter().map(|k| k.as_ref()), key, policy);
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
    let verdict = verdict_among(listed.items.iter(), key, &policy);
    let retire = verdict.as_ref().is_some_and(|b| b.reason == c::OWNER_KEY_LIMIT_EXCEEDED);
    Ok((verdict, retire))
}

/// [`owner_verdict`] for `key` among `keys` (any that is `key` itself is
/// replaced by `key`).
fn verdict_among<'a>(
    keys: impl Iterator<Item = &'a ApiKey>,
    key: &ApiKey,
    policy: &crate::api::KeyPolicy,
) -> Option<Blocked> {
    let owner = key.owner();
    let ns = key.namespace();
    let owned = |k: &ApiKey| OwnedKey {
        created: k
            .meta()
            .creation_timestamp
            .as_ref()
            .and_then(|t| DateTime::from_timestamp(t.0.as_second(), 0)),
        name: k.name_any(),
        description: k.spec.description.as_deref().unwrap_or_default().trim().to_string(),
        holds_keys: k.status.iter().flat_map(|s| &s.keys).any(lifecycle::is_valid),
    };
    let mut owned_keys: Vec<OwnedKey> = keys
        .filter(|k| k.namespace() == ns && k.owner() == owner && k.meta().deletion_timestamp.is_none())
        .filter(|k| k.name_any() != key.name_any())
        .map(owned)
        .collect();
    owned_keys.push(owned(key));
    let limits = &policy.spec.limits;
    owner_verdict(
        owned_keys,
        &key.name_any(),
        owner,
        limits.max_keys_per_owner as usize,
        limits.unique_description_per_owner,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(name: &str, secs: i64, description: &str) -> OwnedKey {
        OwnedKey {
            created: DateTime::from_timestamp(secs, 0),
            name: name.into(),
            description: description.into(),
            holds_keys: false,
        }
    }

    #[test]
    fn a_duplicate_description_never_refuses_an_apikey_that_serves_keys() {
        // "b" serves keys; an edit gives the older "a" the same description.
        let mut b = owned("b", 2, "refunds");
        b.holds_keys = true;
        let keys = vec![owned("a", 1, "refunds"), b];
        assert_eq!(owner_verdict(keys.clone(), "b", "o", 2, true), None);
        assert_eq!(owner_verdict(keys, "a", "o", 2, true), None);
    }

    #[test]
    fn oldest_keys_of_an_owner_win() {
        let keys = vec![owned("c", 3, ""), owned("a", 1, "x"), owned("b", 2, "x"), owned("d", 4, "")];
        assert_eq!(owner_verdict(keys.clone(), "a", "o", 2, true), None);
        assert_eq!(owner_verdict(keys.clone(), "b", "o", 2, true).unwrap().reason, c::DUPLICATE_DESCRIPTION);
        assert_eq!(owner_verdict(keys.clone(), "c", "o", 2, true), None, "the duplicate takes no place");
        let d = owner_verdict(keys.clone(), "d", "o", 2, true).unwrap();
        assert_eq!(d.reason, c::OWNER_KEY_LIMIT_EXCEEDED);
        assert!(d.message.contains("a, c"), "{}", d.message);
        assert_eq!(
            owner_verdict(keys.clone(), "b", "o", 2, false),
            None,
            "duplicates allowed when not unique"
        );
        assert_eq!(owner_verdict(keys, "c", "o", 2, false).unwrap().reason, c::OWNER_KEY_LIMIT_EXCEEDED);
    }
}
