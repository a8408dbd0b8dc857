//! A KeyPolicy, validated and parsed into the rules the lifecycle engine applies.

use chrono::{DateTime, TimeDelta, Utc};

use crate::api::{ExpiryMode, KeyPolicy, KeyPolicySpec, policy_conditions as pc};
use crate::duration::IsoDuration;
use crate::keys::KeyFormat;

/// When the first secondary key is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecondaryAt {
    /// This percentage (1..=99) of the primary's lifetime after its creation.
    Percent(u32),
    /// This long after the primary's creation.
    After(IsoDuration),
}

/// A policy's rules, every duration parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct Rules {
    /// `expiry.mode: Enforced`.
    pub enforced: bool,
    /// `expiry.maxLifetime`.
    pub max_lifetime: IsoDuration,
    /// `expiry.minLifetime`.
    pub min_lifetime: IsoDuration,
    /// `expiry.inactivityTimeout`.
    pub inactivity_timeout: Option<IsoDuration>,
    /// `rotation.secondaryAt`.
    pub secondary_at: SecondaryAt,
    /// `rotation.flipBefore`.
    pub flip_before: IsoDuration,
    /// `rotation.minFlipLead` (zero: no minimum; the default when it does not parse).
    pub min_flip_lead: IsoDuration,
    /// Why `rotation.minFlipLead` did not parse (advisory: the policy is still used).
    pub min_flip_lead_invalid: Option<String>,
    /// `rotation.automatic`.
    pub automatic: bool,
    /// `rotation.retireDrainedAfter`: end the older key early once it has been quiet this
    /// long while the newer one is used. None: never.
    pub retire_drained_after: Option<IsoDuration>,
    /// Since when the current `maxLifetime` applies (retroactive tightening counts from here).
    pub max_lifetime_since: DateTime<Utc>,
    /// Whether `max_lifetime_since` is the one the policy controller recorded (false:
    /// `now` stands in for it until then, which an inactivity deadline must not count from).
    pub max_lifetime_since_recorded: bool,
    /// `notifications.before`, parsed, longest first, with their original text.
    pub notify_before: Vec<(String, IsoDuration)>,
    /// `keyFormat`.
    pub format: KeyFormat,
    /// No usable policy (deleted or invalid): keep every key's end as last computed,
    /// schedule nothing new; flips use the default `flipBefore`.
    pub frozen: bool,
}

/// What `status.observedMaxLifetime` records, so `maxLifetimeSince` moves on every
/// change that can shorten keys: the `maxLifetime` while expiry is enforced, and
/// `Disabled` while it is not (switching expiry on caps keys from that moment, not
/// from when the policy was made), with the `inactivityTimeout` when there is one (a
/// timeout added or changed counts idle time from that moment, not from a last use
/// before it).
pub fn observed_expiry(spec: &KeyPolicySpec) -> String {
    match (spec.expiry.mode, &spec.expiry.inactivity_timeout) {
        (ExpiryMode::Enforced, None) => spec.expiry.max_lifetime.clone(),
        (ExpiryMode::Enforced, Some(t)) => format!("{}, inactivityTimeout {t}", spec.expiry.max_lifetime),
        (ExpiryMode::Disabled, _) => "Disabled".into(),
    }
}

/// Why a policy cannot be used: a reason constant and a message naming the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyProblem {
    /// One of [`crate::api::policy_conditions`].
    pub reason: &'static str,
    /// Human-readable, names the field.
    pub message: String,
}

fn problem(reason: &'static str, message: impl Into<String>) -> PolicyProblem {
    PolicyProblem { reason, message: message.into() }
}

fn positive(field: &str, text: &str) -> Result<IsoDuration, PolicyProblem> {
    let d = IsoDuration::parse(text).map_err(|e| problem(pc::INVALID_DURATION, format!("{field}: {e}")))?;
    if d.is_zero() {
        return Err(problem(pc::INVALID_DURATION, format!("{field} must be longer than zero")));
    }
    Ok(d)
}

/// Parse `rotation.secondaryAt`: `NN%` (1..=99) or a positive duration.
pub fn parse_secondary_at(text: &str) -> Result<SecondaryAt, PolicyProblem> {
    let t = text.trim();
    if let Some(num) = t.strip_suffix('%') {
        return match num.trim().parse::<u32>() {
            Ok(p) if (1..=99).contains(&p) => Ok(SecondaryAt::Percent(p)),
            _ => Err(problem(
                pc::INVALID_SPEC,
                format!("rotation.secondaryAt: {t:?} must be a percentage from 1% to 99% or a duration"),
            )),
        };
    }
    positive("rotation.secondaryAt", t).map(SecondaryAt::After)
}

/// A duration as whole seconds (rounded), for messages.
pub(crate) fn whole_seconds(d: TimeDelta) -> IsoDuration {
    IsoDuration::from_secs(((d.num_milliseconds() + 500) / 1000).max(0) as u64)
}

/// A reference instant for comparing durations that contain calendar months.
fn reference() -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH
}

impl Rules {
    /// Validate a policy. `now` stands in for `maxLifetimeSince` until the policy
    /// controller has recorded it for the current `maxLifetime`.
    pub fn from_policy(policy: &KeyPolicy, now: DateTime<Utc>) -> Result<Rules, PolicyProblem> {
        let spec = &policy.spec;
        let recorded = policy
            .status
            .as_ref()
            .filter(|s| s.observed_max_lifetime.as_deref() == Some(observed_expiry(spec).as_str()))
            .and_then(|s| s.max_lifetime_since);
        let mut rules = Rules::from_spec(spec, recorded.unwrap_or(now))?;
        rules.max_lifetime_since_recorded = recorded.is_some();
        Ok(rules)
    }

    /// Validate a policy spec.
    pub fn from_spec(
        spec: &KeyPolicySpec,
        max_lifetime_since: DateTime<Utc>,
    ) -> Result<Rules, PolicyProblem> {
        let e = &spec.expiry;
        if e.mode == ExpiryMode::Disabled && !e.acknowledge_risk {
            return Err(problem(
                pc::RISK_NOT_ACKNOWLEDGED,
                "expiry.mode Disabled requires expiry.acknowledgeRisk: true (keys would never expire)",
            ));
        }
        let max_lifetime = positive("expiry.maxLifetime", &e.max_lifetime)?;
        let min_lifetime = positive("expiry.minLifetime", &e.min_lifetime)?;
        if min_lifetime.add_to(reference()).ok() > max_lifetime.add_to(reference()).ok() {
            return Err(problem(
                pc::INVALID_SPEC,
                format!(
                    "expiry.minLifetime ({}) is longer than expiry.maxLifetime ({})",
                    e.min_lifetime, e.max_lifetime
                ),
            ));
        }
        let inactivity_timeout =
            e.inactivity_timeout.as_deref().map(|t| positive("expiry.inactivityTimeout", t)).transpose()?;
        let secondary_at = parse_secondary_at(&spec.rotation.secondary_at)?;
        let flip_before = IsoDuration::parse(&spec.rotation.flip_before)
            .map_err(|err| problem(pc::INVALID_DURATION, format!("rotation.flipBefore: {err}")))?;
        // Advisory: a value that does not parse is reported (`Accepted` reason
        // `MinFlipLeadInvalid`) and the default applies; it never stops the policy.
        let (min_flip_lead, min_flip_lead_invalid) = match IsoDuration::parse(&spec.rotation.min_flip_lead) {
            Ok(d) => (d, None),
            Err(err) => {
                let default = crate::api::RotationSpec::default().min_flip_lead;
                let parsed = IsoDuration::parse(&default).expect("the default minFlipLead parses");
                (parsed, Some(format!("rotation.minFlipLead: {err}; the default {default} applies")))
            }
        };
        let retire_drained_after = spec
            .rotation
            .retire_drained_after
            .as_deref()
            .map(|t| positive("rotation.retireDrainedAfter", t))
            .transpose()?;
        let mut notify_before = Vec::new();
        for (i, text) in spec.notifications.before.iter().enumerate() {
            let d = positive(&format!("notifications.before[{i}]"), text)?;
            notify_before.push((text.clone(), d));
        }
        notify_before.sort_by_key(|(_, d)| std::cmp::Reverse(d.add_to(reference()).ok()));
        for (i, hook) in spec.notifications.webhooks.iter().enumerate() {
            let url = hook.url.trim();
            let ok = (url.starts_with("http://") || url.starts_with("https://"))
                && url.len() > "https://".len()
                && !url.contains(char::is_whitespace);
            if !ok {
                return Err(problem(
                    pc::INVALID_SPEC,
                    format!("notifications.webhooks[{i}].url must be an http:// or https:// URL"),
                ));
            }
        }
        let prefix_ok = spec.key_format.prefix.len() <= 16
            && spec
                .key_format
                .prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !prefix_ok {
            return Err(problem(pc::INVALID_SPEC, "keyFormat.prefix must match [a-z0-9_]{0,16}"));
        }
        if !(16..=64).contains(&spec.key_format.random_bytes) {
            return Err(problem(pc::INVALID_SPEC, "keyFormat.randomBytes must be from 16 to 64"));
        }
        if spec.limits.max_keys_per_owner == 0 {
            return Err(problem(pc::INVALID_SPEC, "limits.maxKeysPerOwner must be at least 1"));
        }
        let expressions = spec.namespace_selector.iter().flat_map(|s| s.match_expressions.iter().flatten());
        for (i, e) in expressions.enumerate() {
            let values = e.values.as_ref().map_or(0, Vec::len);
            let ok = match e.operator.as_str() {
                "In" | "NotIn" => values > 0,
                "Exists" | "DoesNotExist" => values == 0,
                _ => false,
            };
            if !ok {
                let op: String = e.operator.chars().take(64).collect();
                return Err(problem(
                    pc::INVALID_SPEC,
                    format!(
                        "namespaceSelector.matchExpressions[{i}]: operator {op:?} with {values} values; \
                         In and NotIn need values, Exists and DoesNotExist take none"
                    ),
                ));
            }
        }
        Ok(Rules {
            enforced: e.mode == ExpiryMode::Enforced,
            max_lifetime,
            min_lifetime,
            inactivity_timeout,
            secondary_at,
            flip_before,
            min_flip_lead,
            min_flip_lead_invalid,
            automatic: spec.rotation.automatic,
            retire_drained_after,
            max_lifetime_since,
            max_lifetime_since_recorded: true,
            notify_before,
            format: KeyFormat::from(&spec.key_format),
            frozen: false,
        })
    }

    /// Rules for an ApiKey whose policy cannot be used: the keys it has run out as last
    /// computed (expiry, revocation and flips to an issued key still happen), with the
    /// default `flipBefore` and warning thresholds; nothing is scheduled or issued anew.
    pub fn frozen() -> Rules {
        let mut rules = Rules::from_spec(&KeyPolicySpec::default(), DateTime::<Utc>::MIN_UTC)
            .expect("the default policy is valid");
        rules.frozen = true;
        rules.automatic = false;
        rules
    }

    /// The least lead consumers get at the scheduled flips of keys issued for `lifetime`:
    /// `flipBefore`, capped at half the overlap of the two keys. The overlaps alternate,
    /// as a slot is issued again only once its previous key ended: the standby's offset d
    /// into the active key's life, then L − d, then d…; so the least is min(d, L − d) / 2.
    /// None when keys do not expire or rotate only on request (such flips give
    /// `flipBefore`).
    pub fn flip_lead(&self, lifetime: &IsoDuration) -> Option<TimeDelta> {
        if !self.enforced || !self.automatic {
            return None;
        }
        let start = reference();
        let life = lifetime.length_from(start).ok()?;
        let offset = (self.secondary_due(start, Some(start + life))? - start).clamp(TimeDelta::zero(), life);
        let flip_before = self.flip_before.length_from(start).ok()?;
        Some(flip_before.min(offset.min(life - offset) / 2))
    }

    /// Why flips under this policy can leave consumers less than `minFlipLead` (None:
    /// they cannot), for keys of `maxLifetime` (shorter `spec.lifetime`s: see
    /// [`Rules::lifetime_flip_note`]), and what to change.
    pub fn short_flip_lead(&self) -> Option<String> {
        if self.frozen {
            return None;
        }
        let min = self.min_flip_lead.length_from(reference()).ok()?;
        let flip_before = self.flip_before.length_from(reference()).ok()?;
        match self.flip_lead(&self.max_lifetime) {
            Some(lead) if lead < min => {
                let fix = if lead >= flip_before {
                    "raise rotation.flipBefore"
                } else {
                    "lengthen expiry.maxLifetime or move rotation.secondaryAt toward 50%"
                };
                Some(format!(
                    "keys of expiry.maxLifetime {} flip as little as {} before they end (rotation.flipBefore {}, \
                     capped at half the shorter overlap of two keys, which rotation.secondaryAt {} sets), less \
                     than rotation.minFlipLead {}: a consumer that reads a mounted Secret may still send a key \
                     after it ends; {fix}, or lower minFlipLead where kubelets sync faster",
                    self.max_lifetime,
                    whole_seconds(lead),
                    self.flip_before,
                    match self.secondary_at {
                        SecondaryAt::Percent(p) => format!("{p}%"),
                        SecondaryAt::After(d) => d.to_string(),
                    },
                    self.min_flip_lead,
                ))
            }
            None if flip_before < min => Some(format!(
                "rotation.flipBefore {} is less than rotation.minFlipLead {}: after a requested rotation, a \
                 consumer that reads a mounted Secret may still send the old key after it ends; raise \
                 rotation.flipBefore",
                self.flip_before, self.min_flip_lead
            )),
            _ => None,
        }
    }

    /// For an ApiKey whose keys are issued for `lifetime`: their scheduled flips can give
    /// less than `minFlipLead` (None: they cannot). Stable for a given policy and
    /// lifetime, so it can stand in `details` without rewriting status.
    pub fn lifetime_flip_note(&self, lifetime: &IsoDuration) -> Option<String> {
        if self.frozen {
            return None;
        }
        let min = self.min_flip_lead.length_from(reference()).ok()?;
        let lead = self.flip_lead(lifetime).filter(|lead| *lead < min)?;
        Some(format!(
            "keys of this ApiKey's lifetime {lifetime} flip as little as {} before they end, less than \
             rotation.minFlipLead {}: consumers that read a mounted Secret may send a key after it ends",
            whole_seconds(lead),
            self.min_flip_lead
        ))
    }

    /// When the standby of a primary created at `created` and expiring at `expires` is due.
    pub fn secondary_due(
        &self,
        created: DateTime<Utc>,
        expires: Option<DateTime<Utc>>,
    ) -> Option<DateTime<Utc>> {
        match self.secondary_at {
            SecondaryAt::Percent(p) => {
                let life = expires? - created;
                let part = TimeDelta::milliseconds(life.num_milliseconds() * i64::from(p) / 100);
                Some(created + part)
            }
            SecondaryAt::After(d) => d.add_to(created).ok(),
        }
    }

    /// The lifetime of a key issued at `now`: the ApiKey's `lifetime` (or the policy's
    /// maximum when absent), clamped to the policy's bounds as of `now` (calendar months
    /// make the same text longer or shorter by the month). The bounds are checked when
    /// a key is issued, never against keys already issued. Err: (reason, message) for
    /// a lifetime that does not parse.
    pub fn lifetime(
        &self,
        requested: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Lifetime, (&'static str, String)> {
        use crate::api::conditions as c;
        let Some(text) = requested else {
            return Ok(Lifetime { duration: self.max_lifetime, clamped: None });
        };
        let d = IsoDuration::parse(text).map_err(|e| (c::INVALID_SPEC, format!("spec.lifetime: {e}")))?;
        if !self.enforced {
            return Ok(Lifetime { duration: d, clamped: None });
        }
        let (lo, hi, want) = (self.min_lifetime.add_to(now), self.max_lifetime.add_to(now), d.add_to(now));
        let bound = match (lo, hi, want) {
            (Ok(lo), _, Ok(want)) if want < lo => self.min_lifetime,
            (_, Ok(hi), Ok(want)) if want > hi => self.max_lifetime,
            (_, _, Ok(_)) => return Ok(Lifetime { duration: d, clamped: None }),
            _ => self.max_lifetime,
        };
        Ok(Lifetime {
            duration: bound,
            clamped: Some(format!(
                "spec.lifetime {text} is outside the policy's bounds {} to {} for a key issued at {}: keys are issued for {bound}",
                self.min_lifetime,
                self.max_lifetime,
                now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )),
        })
    }
}

/// The lifetime new keys get, and why it differs from `spec.lifetime` when it does.
#[derive(Clone, Debug, PartialEq)]
pub struct Lifetime {
    /// The lifetime of a key issued now.
    pub duration: IsoDuration,
    /// Set when `spec.lifetime` was outside the policy's bounds (the message says so).
    pub clamped: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ExpirySpec, WebhookSpec};

    fn spec() -> KeyPolicySpec {
        KeyPolicySpec::default()
    }

    fn selector(
        operator: &str,
        values: &[&str],
    ) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
        serde_json::from_value(serde_json::json!({
            "matchExpressions": [{"key": "env", "operator": operator, "values": values}]
        }))
        .unwrap()
    }

    #[test]
    fn flip_lead_below_the_minimum_is_found_from_the_policy_geometry() {
        let rules = |edit: &dyn Fn(&mut KeyPolicySpec)| {
            let mut s = KeyPolicySpec::default();
            edit(&mut s);
            Rules::from_spec(&s, reference()).unwrap()
        };
        // The defaults: P90D, 50%, flipBefore 10 min, minimum 2 min.
        let default = rules(&|_| {});
        assert_eq!(default.flip_lead(&default.max_lifetime), Some(TimeDelta::minutes(10)));
        assert_eq!(default.short_flip_lead(), None);
        // One-minute keys at 50%: half the 30 s overlap.
        let short = rules(&|s| s.expiry.max_lifetime = "PT1M".into());
        assert_eq!(short.flip_lead(&short.max_lifetime), Some(TimeDelta::seconds(15)));
        let why = short.short_flip_lead().unwrap();
        assert!(
            why.starts_with("keys of expiry.maxLifetime PT1M flip as little as PT15S before they end"),
            "{why}"
        );
        assert!(why.contains("less than rotation.minFlipLead PT2M") && why.contains("toward 50%"), "{why}");
        // The overlaps alternate between d and L - d (a slot is issued again only once its
        // key ended): 10% of six minutes flips with 162 s, then 18 s. Also a late one.
        let early = rules(&|s| {
            s.expiry.max_lifetime = "PT6M".into();
            s.rotation.secondary_at = "10%".into();
        });
        assert_eq!(early.flip_lead(&early.max_lifetime), Some(TimeDelta::seconds(18)));
        assert!(early.short_flip_lead().unwrap().contains("secondaryAt 10%"));
        let late = rules(&|s| {
            s.expiry.max_lifetime = "PT1H".into();
            s.rotation.secondary_at = "95%".into();
        });
        assert_eq!(late.flip_lead(&late.max_lifetime), Some(TimeDelta::seconds(90)));
        assert_eq!(rules(&|s| s.rotation.secondary_at = "P45D".into()).short_flip_lead(), None);
        let beyond = rules(&|s| s.rotation.secondary_at = "P100D".into());
        assert_eq!(
            beyond.flip_lead(&beyond.max_lifetime),
            Some(TimeDelta::zero()),
            "a standby after the end"
        );
        // flipBefore itself is the limit: the advice says to raise it.
        let tight = rules(&|s| s.rotation.flip_before = "PT1M".into());
        assert!(tight.short_flip_lead().unwrap().contains("raise rotation.flipBefore"));
        // No minimum; keys that never expire or rotate only on request (flipBefore counts).
        let no_min = rules(&|s| {
            s.expiry.max_lifetime = "PT1M".into();
            s.rotation.min_flip_lead = "PT0S".into();
        });
        assert_eq!(no_min.short_flip_lead(), None);
        let disabled = rules(&|s| {
            s.expiry.mode = ExpiryMode::Disabled;
            s.expiry.acknowledge_risk = true;
            s.rotation.flip_before = "PT1M".into();
        });
        assert!(disabled.short_flip_lead().unwrap().starts_with("rotation.flipBefore PT1M is less than"));
        let manual = rules(&|s| {
            s.expiry.max_lifetime = "PT1M".into();
            s.rotation.automatic = false;
        });
        assert_eq!(manual.short_flip_lead(), None, "requested rotations give flipBefore (10 min)");
        // An ApiKey's shorter lifetime is told on the ApiKey.
        let five = IsoDuration::parse("PT5M").unwrap();
        assert!(
            default.lifetime_flip_note(&five).unwrap().contains("lifetime PT5M flip as little as PT1M15S")
        );
        assert_eq!(default.lifetime_flip_note(&default.max_lifetime), None);
        assert_eq!(Rules::frozen().short_flip_lead(), None, "no policy, no advice");
        // Advisory: a minimum that does not parse leaves the policy usable, on the default.
        for bad in ["2 minutes", "", "120s"] {
            let mut spec = KeyPolicySpec::default();
            spec.rotation.min_flip_lead = bad.into();
            let r = Rules::from_spec(&spec, reference()).expect("still a usable policy");
            assert_eq!(r.min_flip_lead, IsoDuration::from_secs(120));
            assert!(r.min_flip_lead_invalid.unwrap().starts_with("rotation.minFlipLead"), "{bad:?}");
        }
    }

    #[test]
    fn defaults_are_valid() {
        let r = Rules::from_spec(&spec(), reference()).unwrap();
        assert!(r.enforced && r.automatic);
        assert_eq!(r.max_lifetime, IsoDuration::parse("P90D").unwrap());
        assert_eq!(r.secondary_at, SecondaryAt::Percent(50));
        assert_eq!(r.flip_before, IsoDuration::parse("PT10M").unwrap());
        let order: Vec<&str> = r.notify_before.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(order, ["P30D", "P7D", "P1D"]);
    }

    #[test]
    fn bad_policies_name_the_field() {
        type Edit = Box<dyn Fn(&mut KeyPolicySpec)>;
        let cases: Vec<(Edit, &str, &str)> = vec![
            (
                Box::new(|s| s.expiry.max_lifetime = "banana".into()),
                pc::INVALID_DURATION,
                "expiry.maxLifetime",
            ),
            (Box::new(|s| s.expiry.max_lifetime = "PT0S".into()), pc::INVALID_DURATION, "expiry.maxLifetime"),
            (Box::new(|s| s.expiry.min_lifetime = "P".into()), pc::INVALID_DURATION, "expiry.minLifetime"),
            (Box::new(|s| s.expiry.min_lifetime = "P1Y".into()), pc::INVALID_SPEC, "expiry.minLifetime"),
            (
                Box::new(|s| s.expiry.inactivity_timeout = Some("-P1D".into())),
                pc::INVALID_DURATION,
                "inactivityTimeout",
            ),
            (Box::new(|s| s.rotation.secondary_at = "150%".into()), pc::INVALID_SPEC, "rotation.secondaryAt"),
            (Box::new(|s| s.rotation.secondary_at = "0%".into()), pc::INVALID_SPEC, "rotation.secondaryAt"),
            (
                Box::new(|s| s.rotation.secondary_at = "half".into()),
                pc::INVALID_DURATION,
                "rotation.secondaryAt",
            ),
            (
                Box::new(|s| s.rotation.flip_before = "10m".into()),
                pc::INVALID_DURATION,
                "rotation.flipBefore",
            ),
            (
                Box::new(|s| s.notifications.before = vec!["P7D".into(), "x".into()]),
                pc::INVALID_DURATION,
                "notifications.before[1]",
            ),
            (
                Box::new(|s| {
                    s.notifications.webhooks = vec![WebhookSpec { url: "ftp://x".into(), secret_ref: None }]
                }),
                pc::INVALID_SPEC,
                "webhooks[0].url",
            ),
            (Box::new(|s| s.key_format.prefix = "Bad".into()), pc::INVALID_SPEC, "keyFormat.prefix"),
            (Box::new(|s| s.key_format.random_bytes = 8), pc::INVALID_SPEC, "keyFormat.randomBytes"),
            (
                Box::new(|s| s.namespace_selector = Some(selector("Banana", &["x"]))),
                pc::INVALID_SPEC,
                "matchExpressions[0]",
            ),
            (
                Box::new(|s| s.namespace_selector = Some(selector("In", &[]))),
                pc::INVALID_SPEC,
                "matchExpressions[0]",
            ),
            (
                Box::new(|s| s.namespace_selector = Some(selector("Exists", &["x"]))),
                pc::INVALID_SPEC,
                "matchExpressions[0]",
            ),
            (
                Box::new(|s| s.expiry = ExpirySpec { mode: ExpiryMode::Disabled, ..Default::default() }),
                pc::RISK_NOT_ACKNOWLEDGED,
                "acknowledgeRisk",
            ),
        ];
        for (edit, reason, field) in cases {
            let mut s = spec();
            edit(&mut s);
            let p = Rules::from_spec(&s, reference()).unwrap_err();
            assert_eq!(p.reason, reason, "{p:?}");
            assert!(p.message.contains(field), "{p:?} should name {field}");
        }
        let mut ok = spec();
        ok.namespace_selector = Some(selector("NotIn", &["prod"]));
        assert!(Rules::from_spec(&ok, reference()).is_ok());
        ok.expiry.mode = ExpiryMode::Disabled;
        ok.expiry.acknowledge_risk = true;
        assert!(!Rules::from_spec(&ok, reference()).unwrap().enforced);
    }

    #[test]
    fn secondary_due_by_percent_or_duration() {
        let mut s = spec();
        let r = Rules::from_spec(&s, reference()).unwrap();
        let t0 = reference();
        assert_eq!(r.secondary_due(t0, Some(t0 + TimeDelta::seconds(30))), Some(t0 + TimeDelta::seconds(15)));
        s.rotation.secondary_at = "PT5S".into();
        let r = Rules::from_spec(&s, reference()).unwrap();
        assert_eq!(r.secondary_due(t0, None), Some(t0 + TimeDelta::seconds(5)));
    }

    #[test]
    fn lifetime_bounds() {
        use crate::api::conditions as c;
        let r = Rules::from_spec(&spec(), reference()).unwrap();
        let now = reference();
        let ok = |text: &str, at| r.lifetime(Some(text), at).unwrap();
        assert_eq!(r.lifetime(None, now).unwrap(), Lifetime { duration: r.max_lifetime, clamped: None });
        assert_eq!(ok("P30D", now).clamped, None);
        // Calendar months: p3m is 90 days from January 1st, 92 days from July 1st, where
        // a key issued gets the policy's 90 days instead (and never an error that would
        // stop a Ready key from being rotated depending on the month).
        assert_eq!(ok("p3m", now), Lifetime { duration: IsoDuration::parse("p3m").unwrap(), clamped: None });
        let july = chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 7, 1, 0, 0, 0).unwrap();
        let clamped = ok("p3m", july);
        assert_eq!(clamped.duration, r.max_lifetime);
        assert!(clamped.clamped.unwrap().contains("keys are issued for P90D"));
        assert_eq!(ok("PT30S", now).duration, r.min_lifetime);
        assert_eq!(ok("P1Y", now).duration, r.max_lifetime);
        assert_eq!(r.lifetime(Some("banana"), now).unwrap_err().0, c::INVALID_SPEC);
    }
}
