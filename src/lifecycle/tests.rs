//! Table tests over time and property tests for the lifecycle's invariants.

use chrono::{TimeDelta, TimeZone};
use proptest::prelude::*;

use super::*;
use crate::api::{KeyPolicySpec, Notified};

/// Deterministic key facts: `k1`, `k2`, … with hash `sha256:<n>`.
#[derive(Default)]
struct FakeMint {
    minted: u32,
}

impl Mint for FakeMint {
    fn mint(&mut self, _slot: Slot) -> KeyFacts {
        self.minted += 1;
        KeyFacts {
            key_id: format!("k{}", self.minted),
            hash: format!("sha256:{}", self.minted),
            preview: "kw_abcd".into(),
        }
    }
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 0, 0, 0).unwrap()
}

fn secs(s: f64) -> DateTime<Utc> {
    t0() + TimeDelta::milliseconds((s * 1000.0).round() as i64)
}

/// Seconds since t0 of `t`, rounded up to the millisecond (the Sim's resolution), so
/// that a step due at `t` is due at the returned time.
fn secs_of(t: DateTime<Utc>) -> f64 {
    let us = (t - t0()).num_microseconds().unwrap_or(i64::MAX);
    (us + 999).div_euclid(1000) as f64 / 1000.0
}

fn rules_with(edit: impl FnOnce(&mut KeyPolicySpec)) -> Rules {
    let mut spec = KeyPolicySpec::default();
    spec.expiry.max_lifetime = "PT30S".into();
    spec.expiry.min_lifetime = "PT1S".into();
    // Seconds-long keys: no minimum lead (its notes are tested on their own).
    spec.rotation.min_flip_lead = "PT0S".into();
    edit(&mut spec);
    Rules::from_spec(&spec, t0() - TimeDelta::days(1)).unwrap()
}

/// An ApiKey being driven through time, as the controller would.
struct Sim {
    rules: Rules,
    lifetime: IsoDuration,
    revoked: Vec<String>,
    rotate: Option<String>,
    may_issue: bool,
    retire: bool,
    /// Since when the ApiKey is under its current policy (a move), as status records it.
    policy_since: Option<DateTime<Utc>>,
    status: ApiKeyStatus,
    material: Material,
    mint: FakeMint,
    log: Vec<(f64, Happening)>,
}

impl Sim {
    fn new(rules: Rules) -> Self {
        let lifetime = rules.max_lifetime;
        Sim {
            rules,
            lifetime,
            revoked: vec![],
            rotate: None,
            may_issue: true,
            retire: false,
            policy_since: None,
            status: ApiKeyStatus::default(),
            material: Material::default(),
            mint: FakeMint::default(),
            log: vec![],
        }
    }

    /// One reconcile at `s` seconds: advance, then (as the controller's last write)
    /// put the active key into `api-key`. Checks that no hash left status while its
    /// key was in `api-key`, unless revoked.
    fn once(&mut self, s: f64) -> Outcome {
        let input = Input {
            rules: &self.rules,
            lifetime: self.lifetime,
            revoked: &self.revoked,
            rotate_request: self.rotate.as_deref(),
            now: secs(s),
            may_issue: self.may_issue && !self.retire,
            retire: self.retire,
            policy_since: self.policy_since,
        };
        let before = self.status.clone();
        let out = advance(&input, &mut self.status, &mut self.material, &mut self.mint);
        if let Some(in_api_key) = &self.material.api_key {
            let gone = before
                .keys
                .iter()
                .find(|k| &k.hash == in_api_key && !self.status.keys.iter().any(|n| n.hash == k.hash));
            if let Some(k) = gone {
                assert!(
                    self.revoked.contains(&k.key_id),
                    "hash {} left status while in api-key at {s} s: {:?}\nbefore: {:#?}\nafter: {:#?}",
                    k.hash,
                    out.happenings,
                    before.keys,
                    self.status.keys
                );
            }
        }
        // The controller's Secret write: a slot field edited away is restored from
        // api-key when api-key holds that slot's key; then api-key moves to the active key.
        for k in &self.status.keys {
            if self.material.get(k.slot) != Some(k.hash.as_str())
                && self.material.api_key.as_deref() == Some(k.hash.as_str())
            {
                self.material.set(k.slot, k.hash.clone());
            }
        }
        if let Some(a) = self.status.active_slot.and_then(|slot| key(&self.status, slot)) {
            self.material.api_key = Some(a.hash.clone());
        }
        self.log.extend(out.happenings.iter().cloned().map(|h| (s, h)));
        out
    }

    /// Reconcile at `s`, and again at once while the next step is already due (the
    /// controller requeues immediately).
    fn at(&mut self, s: f64) -> Outcome {
        let mut out = self.once(s);
        for _ in 0..4 {
            match &out.next {
                Some(n) if n.at <= secs(s) => {
                    let mut again = self.once(s);
                    let mut all = std::mem::take(&mut out.happenings);
                    all.append(&mut again.happenings);
                    again.happenings = all;
                    out = again;
                }
                _ => break,
            }
        }
        // What the summary says is next is a step that will run when due: a step that
        // stays overdue would have the controller requeue every millisecond.
        if let Some(n) = &out.next {
            assert!(n.at > secs(s), "{:?} still due at {s} s after reconciling: {}", n.action, out.details);
        }
        out
    }

    fn slot(&self, slot: Slot) -> &KeyStatus {
        key(&self.status, slot).unwrap()
    }

    fn active(&self) -> &KeyStatus {
        self.slot(self.status.active_slot.unwrap())
    }

    fn valid_count(&self) -> usize {
        self.status.keys.iter().filter(|k| is_valid(k)).count()
    }
}

#[test]
fn two_full_cycles_on_schedule() {
    // L = 30 s, secondary at 50 %, flipBefore 10 min capped at half the overlap (7.5 s).
    let mut sim = Sim::new(rules_with(|_| {}));
    type Row<'a> = (f64, Slot, &'a str, Option<(NextAction, f64)>);
    let table: &[Row] = &[
        (0.0, Slot::Primary, "k1", Some((NextAction::CreateStandby, 15.0))),
        (15.0, Slot::Primary, "k1", Some((NextAction::Flip, 22.5))),
        (22.5, Slot::Secondary, "k2", Some((NextAction::Regenerate, 30.0))),
        (30.0, Slot::Secondary, "k2", Some((NextAction::Flip, 37.5))),
        (37.5, Slot::Primary, "k3", Some((NextAction::Regenerate, 45.0))),
        (45.0, Slot::Primary, "k3", Some((NextAction::Flip, 52.5))),
        (52.5, Slot::Secondary, "k4", Some((NextAction::Regenerate, 60.0))),
        (60.0, Slot::Secondary, "k4", Some((NextAction::Flip, 67.5))),
    ];
    for &(at, slot, key_id, next) in table {
        let out = sim.at(at);
        assert_eq!(out.health, Health::Ready, "t={at}");
        assert_eq!(sim.status.active_slot, Some(slot), "t={at}: {:#?}", sim.status);
        assert_eq!(sim.active().key_id, key_id, "t={at}");
        let got = out.next.map(|n| (n.action, (n.at - t0()).num_milliseconds() as f64 / 1000.0));
        assert_eq!(got, next, "t={at}: {}", out.details);
        if at >= 15.0 {
            assert_eq!(sim.valid_count(), 2, "two valid keys at t={at}");
        }
    }
    assert_eq!(sim.mint.minted, 5, "one key per slot per lifetime, no extras");
    // P1 is [0, 30], S1 is [15, 45], P2 is [30, 60].
    let p2 = sim.slot(Slot::Primary);
    assert_eq!((p2.key_id.as_str(), p2.created_at, p2.expires_at), ("k5", secs(60.0), Some(secs(90.0))));
}

#[test]
fn details_say_what_happens_next() {
    let mut sim = Sim::new(rules_with(|_| {}));
    let out = sim.at(0.0);
    assert_eq!(
        out.details,
        "creates the Secondary key at 2026-11-23T00:00:15Z (50% into the Primary key's life)"
    );
    let out = sim.at(15.0);
    assert!(
        out.details.starts_with("moves consumers to the Secondary key k2 at 2026-11-23T00:00:22Z"),
        "{}",
        out.details
    );
}

#[test]
fn a_flip_with_less_lead_than_the_minimum_says_so_until_the_key_left_ends() {
    // L = 30 s: the flip at 22.5 s leaves k1 7.5 s (said rounded), less than the default
    // minFlipLead (2 min).
    let mut sim = Sim::new(rules_with(|s| s.rotation.min_flip_lead = "PT2M".into()));
    // Before any flip: these keys' flips can give too little (told from the start).
    let before = sim.at(0.0).details;
    assert!(
        before.ends_with(
            "; keys of this ApiKey's lifetime PT30S flip as little as PT8S before they end, less than \
             rotation.minFlipLead PT2M: consumers that read a mounted Secret may send a key after it ends"
        ),
        "{before}"
    );
    sim.at(15.0);
    let out = sim.at(22.5);
    assert!(
        out.details.ends_with(
            "; the flip to the Secondary key k2 at 2026-11-23T00:00:22Z came PT8S before the Primary key k1 \
             ends, less than rotation.minFlipLead PT2M: consumers that read a mounted Secret may send that key \
             after it ends"
        ),
        "{}",
        out.details
    );
    assert_eq!(sim.at(25.0).details, out.details, "the same words on every reconcile (no status churn)");
    // k1 ended and its slot was regenerated: back to the general note until the next flip.
    assert!(sim.at(30.0).details.contains("keys of this ApiKey's lifetime"), "{}", sim.at(30.0).details);
    assert!(sim.at(37.5).details.contains("the flip to the Primary key k3"));

    // Enough lead (a minimum of 5 s), or no minimum: no note.
    for min in ["PT5S", "PT0S"] {
        let mut sim = Sim::new(rules_with(|s| s.rotation.min_flip_lead = min.into()));
        for t in [0.0, 15.0, 22.5, 25.0] {
            assert!(!sim.at(t).details.contains("minFlipLead"), "{min} t={t}");
        }
    }
}

#[test]
fn a_noop_advance_changes_nothing() {
    let mut sim = Sim::new(rules_with(|_| {}));
    for t in [0.0, 15.0, 22.5, 30.0, 31.0] {
        sim.at(t);
        let before = sim.status.clone();
        let out = sim.at(t);
        assert!(out.happenings.is_empty(), "t={t}: {:?}", out.happenings);
        assert_eq!(sim.status, before, "t={t}");
    }
}

#[test]
fn catch_up_after_downtime_runs_overdue_steps_once() {
    let mut sim = Sim::new(rules_with(|_| {}));
    sim.at(0.0);
    // Down for three lifetimes: P1 expired long ago, no standby was ever made.
    let out = sim.at(100.0);
    assert_eq!(out.health, Health::Ready);
    let a = sim.active();
    assert_eq!(a.created_at, secs(100.0), "a fresh key, valid from now");
    assert!(a.effective_expires_at.unwrap() > secs(100.0));
    assert_eq!(sim.mint.minted, 2, "one new key, not one per missed step");
    // The expired key stays in status until its slot is regenerated on schedule.
    assert_eq!(sim.slot(Slot::Primary).state, KeyState::Expired);
    assert_eq!(out.next.unwrap(), Next { action: NextAction::Regenerate, at: secs(115.0) });
}

#[test]
fn catch_up_mid_cycle_keeps_the_schedule() {
    let mut sim = Sim::new(rules_with(|_| {}));
    sim.at(0.0);
    // Missed the secondary (15 s) and the flip (22.5 s); P1 is still valid at 25 s.
    // The late secondary is made now; the flip waits for half the remaining overlap.
    let out = sim.at(25.0);
    assert_eq!(sim.slot(Slot::Secondary).created_at, secs(25.0));
    assert_eq!(sim.status.active_slot, Some(Slot::Primary));
    assert_eq!(out.next.unwrap(), Next { action: NextAction::Flip, at: secs(27.5) });
    sim.at(27.5);
    assert_eq!(sim.status.active_slot, Some(Slot::Secondary));
    assert_eq!(sim.slot(Slot::Primary).state, KeyState::Standby, "P1 drains until 30 s");
    assert_eq!(sim.mint.minted, 2);
}

#[test]
fn revoking_the_active_key_flips_at_once_and_regenerates_its_slot() {
    let mut sim = Sim::new(rules_with(|_| {}));
    sim.at(0.0);
    sim.at(16.0);
    sim.revoked.push("k1".into());
    let out = sim.at(17.0);
    assert_eq!(sim.status.active_slot, Some(Slot::Secondary));
    assert_eq!(sim.active().key_id, "k2");
    let p = sim.slot(Slot::Primary);
    assert_eq!((p.key_id.as_str(), p.state), ("k3", KeyState::Standby), "revoked slot regenerated");
    assert!(out.happenings.contains(&Happening::Revoked { slot: Slot::Primary, key_id: "k1".into() }));
}

#[test]
fn revoking_the_only_key_issues_a_new_one() {
    let mut sim = Sim::new(rules_with(|_| {}));
    sim.at(0.0);
    sim.revoked.push("k1".into());
    let out = sim.at(1.0);
    assert_eq!(out.health, Health::Ready);
    assert_eq!(sim.active().key_id, "k2");
    let p = sim.slot(Slot::Primary);
    assert_eq!((p.key_id.as_str(), p.state), ("k3", KeyState::Standby), "the revoked slot is regenerated");
}

#[test]
fn requested_rotation_flips_at_once_and_keeps_the_old_key_for_flip_before() {
    let mut sim = Sim::new(rules_with(|s| s.rotation.flip_before = "PT5S".into()));
    sim.at(0.0);
    sim.at(15.0);
    sim.rotate = Some("2026-11-23T00:00:17Z".into());
    let out = sim.at(17.0);
    assert!(out.happenings.contains(&Happening::Rotated));
    assert_eq!(sim.active().key_id, "k3", "a new key replaces the standby and is active");
    let old = sim.slot(Slot::Primary);
    assert_eq!(old.state, KeyState::Standby);
    assert_eq!(old.effective_expires_at, Some(secs(22.0)));
    assert_eq!(old.expiry_reason, Some(ExpiryReason::Rotated));
    // The same annotation value does not rotate again.
    let out = sim.at(18.0);
    assert!(out.happenings.is_empty());
    sim.at(22.0);
    assert_eq!(sim.slot(Slot::Primary).state, KeyState::Expired);
}

#[test]
fn secret_lost_gets_a_fresh_key_and_keeps_valid_hashes() {
    let mut sim = Sim::new(rules_with(|_| {}));
    sim.at(0.0);
    sim.at(16.0);
    // The Secret was deleted: no material for either slot.
    sim.material = Material::default();
    let out = sim.at(17.0);
    assert_eq!(out.health, Health::Ready);
    let a = sim.active().clone();
    assert_eq!(
        (a.slot, a.key_id.as_str()),
        (Slot::Secondary, "k3"),
        "fresh key in the standby slot, active now"
    );
    assert_eq!(sim.material.get(Slot::Secondary), Some(a.hash.as_str()));
    let p = sim.slot(Slot::Primary);
    assert_eq!(
        (p.key_id.as_str(), p.state),
        ("k1", KeyState::Standby),
        "old active hash kept until it expires"
    );
    assert!(out.happenings.contains(&Happening::Repaired { slot: Slot::Primary }));
}

#[test]
fn inactivity_retires_the_api_key_until_rotation() {
    let mut sim = Sim::new(rules_with(|s| {
        s.expiry.max_lifetime = "PT1H".into();
        s.expiry.inactivity_timeout = Some("PT10S".into());
        s.rotation.flip_before = "PT2S".into();
    }));
    sim.at(0.0);
    // Used at 8 s: survives past 10 s.
    sim.status.keys[0].last_used_at = Some(secs(8.0));
    let out = sim.at(12.0);
    assert_eq!(out.health, Health::Ready);
    assert_eq!(out.details, "the active key k1 expires 2026-11-23T00:00:18Z for inactivity unless used");
    let out = sim.at(18.0);
    assert_eq!(out.health, Health::ExpiredInactive);
    assert_eq!(sim.active().expiry_reason, Some(ExpiryReason::Inactivity));
    assert_eq!(sim.mint.minted, 1, "not regenerated");
    assert!(sim.at(100.0).happenings.is_empty());
    sim.rotate = Some("1".into());
    let out = sim.at(101.0);
    assert_eq!(out.health, Health::Ready);
    assert_eq!(sim.active().key_id, "k2");
}

#[test]
fn a_key_activated_by_a_flip_has_flip_before_to_be_used_before_its_idle_time_counts() {
    let mut sim = Sim::new(rules_with(|s| {
        s.expiry.max_lifetime = "PT60S".into();
        s.expiry.inactivity_timeout = Some("PT10S".into());
        s.rotation.flip_before = "PT8S".into();
    }));
    sim.at(0.0);
    // k1 in use; k2 issued at 30 s, consumers moved to it at 52 s (8 s before k1 ends).
    for t in [5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0, 45.0, 50.0] {
        sim.status.keys.iter_mut().filter(|k| k.key_id == "k1").for_each(|k| k.last_used_at = Some(secs(t)));
        sim.at(t);
    }
    sim.at(52.0);
    let k2 = sim.active();
    assert_eq!((k2.key_id.as_str(), k2.activated_at), ("k2", Some(secs(52.0))));
    // Unused yet: its idle deadline is 52 + 8 + 10 s, not 52 + 10 s.
    assert_eq!(k2.effective_expires_at, Some(secs(70.0)));
    assert_eq!(sim.at(62.5).health, Health::Ready, "not retired before consumers could use it");
    sim.status.keys.iter_mut().filter(|k| k.key_id == "k2").for_each(|k| k.last_used_at = Some(secs(63.0)));
    assert_eq!(sim.at(71.0).health, Health::Ready);
    assert_eq!(sim.active().effective_expires_at, Some(secs(73.0)), "then counted from its last use");
}

#[test]
fn a_rotation_never_retires_the_apikey_while_consumers_still_use_the_key_they_leave() {
    let mut sim = Sim::new(rules_with(|s| {
        s.expiry.max_lifetime = "PT600S".into();
        s.expiry.inactivity_timeout = Some("PT10S".into());
        s.rotation.flip_before = "PT30S".into();
    }));
    sim.at(0.0);
    for t in [5.0, 10.0, 15.0, 20.0] {
        sim.status.keys.iter_mut().for_each(|k| k.last_used_at = Some(secs(t)));
        sim.at(t);
    }
    sim.rotate = Some("r".into());
    sim.at(21.0);
    let (k1, k2) = (sim.slot(Slot::Primary).clone(), sim.active().clone());
    assert_eq!((k1.key_id.as_str(), k2.key_id.as_str()), ("k1", "k2"));
    // Consumers keep using k1 while they move (it is valid until 21 + 30 s).
    for t in [25.0, 29.0, 32.0, 40.0, 50.0] {
        sim.status.keys.iter_mut().filter(|k| k.key_id == "k1").for_each(|k| k.last_used_at = Some(secs(t)));
        let out = sim.at(t);
        assert_eq!(out.health, Health::Ready, "at {t} s: {}", out.details);
        assert_eq!(sim.slot(Slot::Primary).state, KeyState::Standby, "k1 still valid at {t} s");
    }
}

#[test]
fn shortened_policy_caps_existing_keys_and_longer_never_extends() {
    let mut sim = Sim::new(rules_with(|s| s.expiry.max_lifetime = "PT1H".into()));
    sim.at(0.0);
    assert_eq!(sim.active().effective_expires_at, Some(secs(3600.0)));
    // At 100 s the policy shrinks to 5 minutes: the key now ends at 400 s.
    let mut short = rules_with(|s| s.expiry.max_lifetime = "PT5M".into());
    short.max_lifetime_since = secs(100.0);
    sim.rules = short;
    sim.at(101.0);
    let a = sim.active();
    assert_eq!(a.expires_at, Some(secs(3600.0)), "expiresAt is never rewritten");
    assert_eq!(a.effective_expires_at, Some(secs(400.0)));
    assert_eq!(a.expiry_reason, Some(ExpiryReason::PolicyChange));
    // Lengthened again at 200 s: the cap stays.
    let mut long = rules_with(|s| s.expiry.max_lifetime = "PT2H".into());
    long.max_lifetime_since = secs(200.0);
    sim.rules = long;
    sim.at(201.0);
    assert_eq!(sim.active().effective_expires_at, Some(secs(400.0)));
}

#[test]
fn non_automatic_rotation_lets_keys_expire() {
    let mut sim = Sim::new(rules_with(|s| s.rotation.automatic = false));
    let out = sim.at(0.0);
    assert_eq!(out.next.unwrap().action, NextAction::Expire);
    let out = sim.at(30.0);
    assert_eq!(out.health, Health::Expired);
    assert_eq!(sim.mint.minted, 1);
    sim.rotate = Some("now".into());
    assert_eq!(sim.at(31.0).health, Health::Ready);
}

#[test]
fn disabled_expiry_never_expires_or_rotates() {
    let mut sim = Sim::new(rules_with(|s| {
        s.expiry.mode = crate::api::ExpiryMode::Disabled;
        s.expiry.acknowledge_risk = true;
    }));
    let out = sim.at(0.0);
    assert_eq!(out.next, None);
    assert_eq!(out.details, "keys never expire: the policy has expiry disabled");
    assert!(sim.at(1e7).happenings.is_empty());
    assert_eq!(sim.active().expires_at, None);
}

#[test]
fn secondary_at_as_duration() {
    let mut sim = Sim::new(rules_with(|s| s.rotation.secondary_at = "PT5S".into()));
    assert_eq!(sim.at(0.0).next.unwrap(), Next { action: NextAction::CreateStandby, at: secs(5.0) });
}

#[derive(Clone, Debug)]
enum Op {
    Wait(u32),
    Revoke(bool),
    Rotate,
    LoseSecret,
    Use,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u32..20_000).prop_map(Op::Wait),
        1 => (0u32..200_000).prop_map(Op::Wait),
        1 => any::<bool>().prop_map(Op::Revoke),
        1 => Just(Op::Rotate),
        1 => Just(Op::LoseSecret),
        2 => Just(Op::Use),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// At every observation: consumers hold a valid key whose hash is in status and
    /// whose material is in the Secret; a hash leaves status only once it has left
    /// `api-key` (or was revoked); a repeated advance changes nothing.
    #[test]
    fn invariants_hold_under_any_schedule(
        ops in proptest::collection::vec(op(), 1..60),
        inactivity in proptest::option::of(5u32..120),
    ) {
        let mut sim = Sim::new(rules_with(|s| {
            s.expiry.inactivity_timeout = inactivity.map(|i| format!("PT{i}S"));
        }));
        let mut now_ms: u64 = 0;
        let mut rotations = 0;
        sim.at(0.0);
        for op in ops {
            match op {
                Op::Wait(ms) => now_ms += u64::from(ms),
                Op::Revoke(active) => {
                    let slot = sim.status.active_slot.unwrap();
                    let slot = if active { slot } else { slot.other() };
                    if let Some(k) = key(&sim.status, slot) { sim.revoked.push(k.key_id.clone()); }
                }
                Op::Rotate => { rotations += 1; sim.rotate = Some(format!("r{rotations}")); }
                Op::LoseSecret => sim.material = Material::default(),
                Op::Use => {
                    let now = secs(now_ms as f64 / 1000.0);
                    for k in sim.status.keys.iter_mut().filter(|k| k.state == KeyState::Active) {
                        k.last_used_at = Some(now);
                    }
                }
            }
            let now = now_ms as f64 / 1000.0;
            let minted_before = sim.mint.minted;
            let out = sim.at(now);
            prop_assert!(sim.mint.minted - minted_before <= 3, "at most three keys per advance: {:?}", out.happenings);
            match out.health {
                Health::Ready => {
                    let a = sim.active().clone();
                    prop_assert_eq!(a.state, KeyState::Active);
                    prop_assert!(a.effective_expires_at.is_none_or(|t| t > secs(now)), "active key valid");
                    prop_assert_eq!(sim.material.get(a.slot), Some(a.hash.as_str()), "its material is in the Secret");
                    prop_assert!(!sim.revoked.contains(&a.key_id));
                    let next = out.next.clone().unwrap();
                    prop_assert!(next.at > secs(now), "next step is in the future");
                }
                Health::ExpiredInactive => prop_assert!(inactivity.is_some()),
                Health::Expired => prop_assert!(false, "automatic rotation never leaves consumers without a key"),
            }
            let settled = sim.status.clone();
            let again = sim.at(now);
            prop_assert!(again.happenings.is_empty(), "a repeated advance does nothing: {:?}", again.happenings);
            prop_assert_eq!(&sim.status, &settled);
        }
    }

    /// However sparsely the controller looks, it never issues more keys than one that
    /// looks at every scheduled step.
    #[test]
    fn sparse_observation_never_issues_extra_keys(gaps in proptest::collection::vec(1u32..90_000, 1..40)) {
        let mut dense = Sim::new(rules_with(|_| {}));
        let mut sparse = Sim::new(rules_with(|_| {}));
        dense.at(0.0);
        sparse.at(0.0);
        let mut now_ms = 0u64;
        for gap in gaps {
            now_ms += u64::from(gap);
            let end = now_ms as f64 / 1000.0;
            // Dense: every scheduled step on time.
            loop {
                let next = dense.at((dense.log.last().map_or(0.0, |(t, _)| *t)).max(0.0));
                match next.next {
                    Some(n) if n.at <= secs(end) => { dense.at((n.at - t0()).num_milliseconds() as f64 / 1000.0); }
                    _ => break,
                }
            }
            dense.at(end);
            sparse.at(end);
            prop_assert!(sparse.mint.minted <= dense.mint.minted,
                "sparse {} > dense {}", sparse.mint.minted, dense.mint.minted);
        }
    }
}

#[test]
fn both_keys_capped_by_one_change_get_a_successor_that_outlives_them() {
    // 1-hour keys; the standby exists (made at 1800 s). At 1900 s the policy shrinks to
    // 10 minutes: both keys are capped at 2500 s. The waiting standby would die with
    // the active key, so it is replaced by one that outlives it, in time to flip.
    let mut sim = Sim::new(rules_with(|s| {
        s.expiry.max_lifetime = "PT1H".into();
        s.rotation.flip_before = "PT1M".into();
    }));
    sim.at(0.0);
    sim.at(1800.0);
    assert_eq!(sim.slot(Slot::Secondary).key_id, "k2");
    let mut short = rules_with(|s| {
        s.expiry.max_lifetime = "PT10M".into();
        s.rotation.flip_before = "PT1M".into();
    });
    short.max_lifetime_since = secs(1900.0);
    sim.rules = short;
    sim.lifetime = sim.rules.max_lifetime;
    let out = sim.at(1900.0);
    assert_eq!(sim.active().effective_expires_at, Some(secs(2500.0)));
    assert_eq!(sim.slot(Slot::Secondary).effective_expires_at, Some(secs(2500.0)), "both capped alike");
    // A key issued now would end at 2500 s too. The replacement must outlive the active
    // key by twice the flip lead (2 × 60 s), so it is issued at 2500 + 120 - 600 = 2020 s.
    assert_eq!(
        out.next.unwrap(),
        Next { action: NextAction::Regenerate, at: secs(2020.0) },
        "{}",
        out.details
    );
    assert!(out.details.contains("would not outlive the active key"), "{}", out.details);
    let out = sim.at(2020.0);
    let standby = sim.slot(Slot::Secondary).clone();
    assert_eq!(standby.key_id, "k3", "the capped waiting standby was replaced: {}", out.details);
    assert_eq!(standby.effective_expires_at, Some(secs(2620.0)), "a fresh key: 10 minutes from 2020 s");
    let next = out.next.unwrap();
    assert_eq!(next.action, NextAction::Flip);
    // And so the flip happens flipBefore before the active key ends.
    assert_eq!(next.at, secs(2440.0), "{next:?}");
    sim.at((next.at - t0()).num_milliseconds() as f64 / 1000.0);
    assert_eq!(sim.active().key_id, "k3");
    assert_eq!(sim.mint.minted, 3);
}

#[test]
fn a_standby_capped_with_the_active_key_is_replaced_even_when_both_predate_the_change() {
    // Keys made at 0 s and 100 s under PT1H; the policy shrinks at 50 s (recorded
    // since then): a cap at 50 + 600 s for the first and 100 + 600 s for the second is
    // fine (the standby outlives); but a change recorded at 200 s caps both at 800 s.
    let mut sim = Sim::new(rules_with(|s| {
        s.expiry.max_lifetime = "PT1H".into();
        s.rotation.secondary_at = "PT100S".into();
        s.rotation.flip_before = "PT30S".into();
    }));
    sim.at(0.0);
    sim.at(100.0);
    let mut short = rules_with(|s| {
        s.expiry.max_lifetime = "PT10M".into();
        s.rotation.secondary_at = "PT100S".into();
        s.rotation.flip_before = "PT30S".into();
    });
    short.max_lifetime_since = secs(200.0);
    sim.rules = short;
    let out = sim.at(200.0);
    // Replaced once a fresh key outlives the active key (ending at 800 s) by twice the
    // flip lead (30 s): 800 + 60 - 600 = 260 s.
    assert_eq!(
        out.next.unwrap(),
        Next { action: NextAction::Regenerate, at: secs(260.0) },
        "{}",
        out.details
    );
    let out = sim.at(260.0);
    let (a, s) = (sim.active().clone(), sim.slot(Slot::Secondary).clone());
    assert_eq!(a.effective_expires_at, Some(secs(800.0)));
    assert!(ceiling(&s).unwrap() > ceiling(&a).unwrap(), "{}: {s:?}", out.details);
}

#[test]
fn switching_expiry_on_caps_keys_from_the_switch() {
    use crate::api::ExpiryMode;
    let mut spec = KeyPolicySpec::default();
    spec.expiry.mode = ExpiryMode::Disabled;
    let disabled = observed_expiry(&spec);
    spec.expiry.mode = ExpiryMode::Enforced;
    assert_ne!(disabled, observed_expiry(&spec), "the switch moves maxLifetimeSince");
    assert_eq!(observed_expiry(&spec), spec.expiry.max_lifetime, "unchanged for enforced policies");
    // Keys made while expiry was off get their cap from the switch, not from their birth.
    let mut sim = Sim::new(rules_with(|s| {
        s.expiry.mode = ExpiryMode::Disabled;
        s.expiry.acknowledge_risk = true;
    }));
    sim.at(0.0);
    let mut on = rules_with(|_| {});
    on.max_lifetime_since = secs(1000.0);
    sim.rules = on;
    let out = sim.at(1000.0);
    assert_eq!(out.health, Health::Ready);
    assert_eq!(sim.active().key_id, "k1", "not expired by a cap in the past");
    assert_eq!(sim.active().effective_expires_at, Some(secs(1030.0)));
    assert_eq!(sim.active().expiry_reason, Some(ExpiryReason::PolicyChange));
}

#[test]
fn a_rotation_never_replaces_a_key_consumers_may_still_hold() {
    // flipBefore 5 s: after a flip, consumers may hold the previous key for 5 s.
    let mut sim = Sim::new(rules_with(|s| s.rotation.flip_before = "PT5S".into()));
    sim.at(0.0);
    sim.at(15.0);
    sim.rotate = Some("a".into());
    sim.at(16.0);
    assert_eq!(sim.active().key_id, "k3");
    let drained = sim.slot(Slot::Primary).clone();
    assert_eq!((drained.key_id.as_str(), drained.effective_expires_at), ("k1", Some(secs(21.0))));
    // A second rotation 2 s later must not replace k1, which consumers may still hold.
    sim.rotate = Some("b".into());
    let out = sim.at(18.0);
    assert!(!out.happenings.contains(&Happening::Rotated), "{:?}", out.happenings);
    assert_eq!(sim.slot(Slot::Primary).key_id, "k1");
    assert_eq!(sim.slot(Slot::Primary).state, KeyState::Standby, "k1 stays valid through its drain");
    let next = out.next.unwrap();
    assert_eq!((next.action, next.at), (NextAction::Rotate, secs(21.0)), "{}", out.details);
    assert!(out.details.contains("consumers may still hold the Primary key k1"), "{}", out.details);
    // At 21 s the rotation runs: k1 has drained (and expires), a new key replaces it.
    let out = sim.at(21.0);
    assert!(out.happenings.contains(&Happening::Rotated));
    assert_eq!(sim.active().key_id, "k4");
    assert_eq!(sim.slot(Slot::Secondary).effective_expires_at, Some(secs(26.0)), "k3 drains 5 s");
}

#[test]
fn a_rotation_waits_while_api_key_still_holds_the_key_it_would_replace() {
    let mut sim = Sim::new(rules_with(|s| s.rotation.flip_before = "PT5S".into()));
    sim.at(0.0);
    sim.at(15.0);
    sim.at(25.0);
    assert_eq!(sim.active().key_id, "k2");
    // The flip to k2 happened at 25 s, but its api-key write failed: api-key holds k1.
    sim.material.api_key = Some(sim.slot(Slot::Primary).hash.clone());
    let input = Input {
        rules: &sim.rules,
        lifetime: sim.lifetime,
        revoked: &[],
        rotate_request: Some("now"),
        now: secs(26.0),
        may_issue: true,
        retire: false,
        policy_since: None,
    };
    let out = advance(&input, &mut sim.status, &mut sim.material, &mut sim.mint);
    assert!(!out.happenings.contains(&Happening::Rotated), "{:?}", out.happenings);
    assert_eq!(sim.slot(Slot::Primary).key_id, "k1", "k1's hash stays while it is in api-key");
    assert_eq!(out.next.unwrap(), Next { action: NextAction::Rotate, at: secs(26.0) });
}

#[test]
fn a_rotated_key_stays_valid_flip_before_after_it_left_api_key() {
    let mut sim = Sim::new(rules_with(|s| s.rotation.flip_before = "PT5S".into()));
    sim.at(0.0);
    sim.rotate = Some("r".into());
    sim.at(2.0);
    assert_eq!(sim.slot(Slot::Primary).effective_expires_at, Some(secs(7.0)));
    // The api-key write of that rotation failed; the retry 3 s later moves it.
    sim.material.api_key = Some(sim.slot(Slot::Primary).hash.clone());
    sim.at(5.0);
    let k1 = sim.slot(Slot::Primary);
    assert_eq!(
        (k1.key_id.as_str(), k1.effective_expires_at),
        ("k1", Some(secs(10.0))),
        "valid 5 s after it left"
    );
    assert_eq!(k1.expiry_reason, Some(ExpiryReason::Rotated));
}

#[test]
fn a_blocked_apikey_still_revokes_caps_expires_and_flips_but_issues_nothing() {
    let mut sim = Sim::new(rules_with(|s| s.rotation.flip_before = "PT5S".into()));
    sim.at(0.0);
    sim.at(15.0);
    sim.may_issue = false;
    // The flip to the issued standby still happens on schedule (25 s).
    let out = sim.at(20.0);
    assert_eq!(out.next.as_ref().map(|n| n.action), Some(NextAction::Flip));
    sim.at(25.0);
    assert_eq!(sim.active().key_id, "k2");
    // Expiry still runs; regeneration does not.
    let out = sim.at(30.0);
    assert_eq!(sim.slot(Slot::Primary).state, KeyState::Expired);
    assert_eq!(sim.mint.minted, 2, "nothing issued while blocked");
    assert_eq!(out.next.unwrap(), Next { action: NextAction::Expire, at: secs(45.0) });
    assert_eq!(out.details, "the active key k2 expires at 2026-11-23T00:00:45Z");
    // Revocation still runs; with nothing to flip to, consumers have no valid key.
    sim.revoked.push("k2".into());
    let out = sim.at(31.0);
    assert_eq!(sim.active().state, KeyState::Revoked);
    assert_eq!(out.health, Health::Expired);
    assert_eq!(sim.mint.minted, 2);
    // A rotation request waits for the block to end, then runs.
    sim.rotate = Some("r".into());
    assert!(sim.at(32.0).happenings.is_empty());
    sim.may_issue = true;
    let out = sim.at(33.0);
    assert_eq!(out.health, Health::Ready);
    assert!(out.happenings.contains(&Happening::Rotated), "{:?}", out.happenings);
}

#[test]
fn an_apikey_that_loses_its_place_under_an_owner_limit_has_its_keys_expired_at_once() {
    let mut sim = Sim::new(rules_with(|s| s.rotation.flip_before = "PT5S".into()));
    sim.at(0.0);
    sim.at(15.0);
    assert_eq!(sim.status.keys.len(), 2, "an active key and a standby");
    sim.retire = true;
    let out = sim.at(16.0);
    assert_eq!(out.health, Health::Expired);
    for k in &sim.status.keys {
        assert_eq!(k.state, KeyState::Expired, "{}", k.key_id);
        assert_eq!(k.expiry_reason, Some(ExpiryReason::OwnerLimit), "{}", k.key_id);
        assert_eq!(k.effective_expires_at, Some(secs(16.0)), "{}", k.key_id);
    }
    assert_eq!(sim.mint.minted, 2, "nothing issued for an ApiKey without a place");
    // A rotation does not bring it back while it has no place; regaining it does.
    sim.rotate = Some("r".into());
    assert_eq!(sim.at(20.0).health, Health::Expired);
    sim.retire = false;
    assert_eq!(sim.at(21.0).health, Health::Ready);
    assert_eq!(sim.mint.minted, 3);
}

#[test]
fn without_a_policy_keys_run_out_as_last_computed() {
    let mut sim = Sim::new(rules_with(|s| s.rotation.flip_before = "PT5S".into()));
    sim.at(0.0);
    sim.at(15.0);
    sim.rules = Rules::frozen();
    sim.may_issue = false;
    let out = sim.at(16.0);
    // The flip to the issued standby happens before the active key's recorded end
    // (default flipBefore, capped at half the overlap), and nothing else is scheduled.
    assert_eq!(out.next.as_ref().map(|n| (n.action, n.at)), Some((NextAction::Flip, secs(22.5))));
    sim.at(22.5);
    assert_eq!(sim.active().key_id, "k2");
    let out = sim.at(30.0);
    assert_eq!(sim.slot(Slot::Primary).state, KeyState::Expired, "expiry still runs");
    assert_eq!(out.next.unwrap(), Next { action: NextAction::Expire, at: secs(45.0) });
    assert_eq!(sim.at(45.0).health, Health::Expired);
    assert_eq!(sim.mint.minted, 2);
}

/// Ops of the edge property test.
#[derive(Clone, Debug)]
enum EdgeOp {
    /// Let this many ms pass, running every scheduled step on time.
    Wait(u32),
    /// Set `maxLifetime` to this many seconds (recorded as changed now when different),
    /// or switch expiry off (None).
    Policy(Option<u32>),
    /// Move the ApiKey to another policy with this `maxLifetime` (None: expiry off) whose
    /// `maxLifetimeSince` lies in the past: an edit of `spec.policy`, or another policy
    /// made the default (the same to the lifecycle: the resolved policy changes).
    Move(Option<u32>),
    Revoke(bool),
    Rotate,
    /// The Secret lost a slot's material (edited or deleted).
    LoseSlot(bool),
    /// The next reconcile's `api-key` write fails (retried 1 s later).
    FailApiKeyWrite,
    Use,
    /// A caller uses the older (false) or newer (true) of two valid keys (an external
    /// system loaded with it).
    UseKey(bool),
}

fn edge_op() -> impl Strategy<Value = EdgeOp> {
    prop_oneof![
        8 => (0u32..20_000).prop_map(EdgeOp::Wait),
        2 => proptest::option::weighted(0.8, 20u32..120).prop_map(EdgeOp::Policy),
        2 => proptest::option::weighted(0.8, 20u32..120).prop_map(EdgeOp::Move),
        1 => any::<bool>().prop_map(EdgeOp::Revoke),
        2 => Just(EdgeOp::Rotate),
        1 => any::<bool>().prop_map(EdgeOp::LoseSlot),
        1 => Just(EdgeOp::FailApiKeyWrite),
        2 => Just(EdgeOp::Use),
        3 => any::<bool>().prop_map(EdgeOp::UseKey),
    ]
}

/// A Sim whose consumers are modelled: they may use any key that was in `api-key`
/// within the last `flipBefore` (the propagation allowance), or until the end that key
/// had when it left `api-key` if that came sooner (a flip is at most half-way through
/// the two keys' overlap, so a late standby gives a shorter lead).
struct Consumers {
    /// (hash, key ID, last moment it was in api-key, its end at that moment).
    held: Vec<(String, String, f64, Option<DateTime<Utc>>)>,
}

impl Consumers {
    fn saw(&mut self, sim: &Sim, at: f64) {
        if let Some(h) = &sim.material.api_key {
            let k = sim.status.keys.iter().find(|k| &k.hash == h);
            let id = k.map(|k| k.key_id.clone()).unwrap_or_default();
            let end = k.and_then(|k| k.effective_expires_at);
            self.held.retain(|(x, _, _, _)| x != h);
            self.held.push((h.clone(), id, at, end));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Policy edits (shrink, lengthen, expiry on/off), rotations (also seconds apart),
    /// revocations, lost Secret material and failed `api-key` writes, with the
    /// controller running every scheduled step on time: every key a consumer may still
    /// hold (in `api-key` within the last `flipBefore`) verifies, unless it was revoked
    /// or its ApiKey was retired; a hash leaves status only after its key left
    /// `api-key` (checked in `Sim::once`); at most one key per slot per advance.
    ///
    /// With early retirement (`retireDrainedAfter`) in the mix, and callers using either
    /// key: a key retired early (`Drained`) was quiet for `retireDrainedAfter` before its
    /// retirement was decided, and not used since.
    #[test]
    fn a_key_a_consumer_may_hold_always_verifies(
        ops in proptest::collection::vec(edge_op(), 1..50),
        retire in proptest::option::weighted(0.5, 1u32..15),
    ) {
        run_edge_ops(ops, retire)?;
    }
}

/// The edge property's run (see `a_key_a_consumer_may_hold_always_verifies`).
fn run_edge_ops(ops: Vec<EdgeOp>, retire: Option<u32>) -> Result<(), TestCaseError> {
    let flip = 5.0;
    let rules_for = |max: Option<u32>, since: DateTime<Utc>| {
        let mut r = rules_with(|s| {
            s.rotation.flip_before = "PT5S".into();
            s.rotation.retire_drained_after = retire.map(|r| format!("PT{r}S"));
            s.notifications.before = vec!["PT20S".into(), "PT10S".into(), "PT3S".into()];
            match max {
                Some(m) => s.expiry.max_lifetime = format!("PT{m}S"),
                None => {
                    s.expiry.mode = crate::api::ExpiryMode::Disabled;
                    s.expiry.acknowledge_risk = true;
                }
            }
        });
        r.max_lifetime_since = since;
        r
    };
    let mut policy = Some(30u32);
    let mut sim = Sim::new(rules_for(policy, t0() - TimeDelta::days(1)));
    let mut consumers = Consumers { held: vec![] };
    let mut now = 0.0f64;
    let mut rotations = 0;
    // The key in api-key at the last move, when it moved, and the end it had then.
    let mut moved: Option<Moved> = None;
    let mut warnings = Warned::default();
    sim.at(0.0);
    consumers.saw(&sim, 0.0);
    for op in ops {
        let op_name = format!("{op:?}");
        let mut fail_write = false;
        match op {
            EdgeOp::Wait(ms) => {
                let end = now + f64::from(ms) / 1000.0;
                loop {
                    let next = sim.at(now).next.map(|n| secs_of(n.at));
                    consumers.saw(&sim, now);
                    check(&sim, &consumers, now, flip)?;
                    check_move(&sim, moved.as_ref(), now, flip)?;
                    warnings.check(&mut sim, now)?;
                    match next {
                        Some(t) if t <= now => prop_assert!(
                            false,
                            "a step due at {t} s did not run at {now} s: {:#?}",
                            sim.status
                        ),
                        Some(t) if t <= end => now = t,
                        _ => break,
                    }
                }
                now = end;
            }
            EdgeOp::Policy(max) => {
                if max != policy {
                    policy = max;
                    sim.rules = rules_for(max, secs(now));
                    sim.lifetime = sim.rules.max_lifetime;
                }
            }
            EdgeOp::Move(max) => {
                moved = sim.material.api_key.as_ref().map(|h| {
                    let k = sim.status.keys.iter().find(|k| &k.hash == h);
                    Moved {
                        hash: h.clone(),
                        key_id: k.map(|k| k.key_id.clone()).unwrap_or_default(),
                        at: now,
                        end: k.and_then(|k| k.effective_expires_at),
                    }
                });
                policy = max;
                sim.rules = rules_for(max, t0() - TimeDelta::days(1));
                sim.lifetime = sim.rules.max_lifetime;
                sim.policy_since = Some(secs(now));
            }
            EdgeOp::Revoke(active) => {
                if let Some(slot) = sim.status.active_slot {
                    let slot = if active { slot } else { slot.other() };
                    if let Some(k) = key(&sim.status, slot) {
                        sim.revoked.push(k.key_id.clone());
                    }
                }
            }
            EdgeOp::Rotate => {
                rotations += 1;
                sim.rotate = Some(format!("r{rotations}"));
            }
            EdgeOp::LoseSlot(primary) => {
                if primary {
                    sim.material.primary = None
                } else {
                    sim.material.secondary = None
                }
            }
            EdgeOp::FailApiKeyWrite => fail_write = true,
            EdgeOp::Use => {
                for k in sim.status.keys.iter_mut().filter(|k| k.state == KeyState::Active) {
                    k.last_used_at = Some(secs(now));
                }
            }
            EdgeOp::UseKey(newer) => {
                let id = super::handover::pair(&sim.status)
                    .map(|(o, n)| if newer { n.key_id.clone() } else { o.key_id.clone() });
                for k in sim.status.keys.iter_mut().filter(|k| Some(&k.key_id) == id.as_ref()) {
                    k.last_used_at = Some(secs(now));
                }
            }
        }
        let minted_before = sim.mint.minted;
        eprintln!("op {op_name} at {now}: log so far {:?}", sim.log.iter().rev().take(6).collect::<Vec<_>>());
        if fail_write {
            // The reconcile writes the Secret's slots and status, not api-key; the
            // controller retries 1 s later.
            let api_key = sim.material.api_key.clone();
            sim.at(now);
            sim.material.api_key = api_key;
            check(&sim, &consumers, now, flip)?;
            now += 1.0;
        }
        sim.at(now);
        consumers.saw(&sim, now);
        prop_assert!(sim.mint.minted - minted_before <= 3, "at most one key per slot and step");
        check(&sim, &consumers, now, flip)?;
        check_move(&sim, moved.as_ref(), now, flip)?;
        warnings.check(&mut sim, now)?;
        if let Some(r) = retire {
            for k in sim.status.keys.iter().filter(|k| k.expiry_reason == Some(ExpiryReason::Drained)) {
                let decided = sim.log.iter().rev().find_map(|(t, h)| match h {
                    Happening::Retiring { key_id, .. } if *key_id == k.key_id => Some(*t),
                    _ => None,
                });
                let quiet_since = secs_of(k.last_used_at.unwrap_or(k.created_at));
                prop_assert!(
                    decided.is_some_and(|d| quiet_since <= d - f64::from(r) + 1e-6),
                    "key {} retired early (decided at {decided:?} s) was used at {quiet_since} s: {:#?}",
                    k.key_id,
                    sim.status
                );
            }
        }
    }
    Ok(())
}

/// The key in `api-key` when the ApiKey moved to another policy, and the end it had.
struct Moved {
    hash: String,
    key_id: String,
    at: f64,
    end: Option<DateTime<Utc>>,
}

/// The key in `api-key` when the ApiKey moved to another policy verifies for at least
/// `flipBefore` after the move, whatever the new policy's cap, unless it was to end
/// sooner anyway (the end it had before the move), or was revoked, retired or ended by
/// inactivity (which no move causes).
fn check_move(sim: &Sim, moved: Option<&Moved>, now: f64, flip: f64) -> Result<(), TestCaseError> {
    let Some(Moved { hash, key_id: id, at, end }) = moved else { return Ok(()) };
    if now >= at + flip - 1e-6 || sim.revoked.contains(id) || end.is_some_and(|e| secs(now) >= e) {
        return Ok(());
    }
    let k = sim.status.keys.iter().find(|k| &k.hash == hash);
    // What the move may not do is cut the key short; its own expiry still comes.
    let natural_end = |k: &KeyStatus| k.expires_at.is_some_and(|t| t <= secs(now));
    if k.is_some_and(|k| k.expiry_reason == Some(ExpiryReason::Inactivity) || natural_end(k)) {
        return Ok(());
    }
    prop_assert!(
        k.is_some_and(|k| is_valid(k) && k.effective_expires_at.is_none_or(|t| t > secs(now))),
        "at {now} s the key {id}, in api-key when the ApiKey moved at {at} s, no longer verifies: {:#?}",
        sim.status
    );
    Ok(())
}

/// The expiry warnings decided after each step, as the controller decides them.
#[derive(Default)]
struct Warned {
    /// (key ID, its new end) of every warning about an end moved earlier.
    moved: std::collections::HashSet<(String, Option<DateTime<Utc>>)>,
}

impl Warned {
    /// Every end a cap moved earlier is warned about once (none twice for the same
    /// end), as soon as one of its thresholds has passed, unless callers already left
    /// the key (nothing to do).
    fn check(&mut self, sim: &mut Sim, now: f64) -> Result<(), TestCaseError> {
        let usage = super::handover::Usage { quiet: TimeDelta::seconds(2) };
        let h = super::handover::evaluate(&sim.rules, &sim.status, secs(now), usage);
        let on_schedule = sim.may_issue && sim.rules.automatic && !sim.rules.frozen;
        let w = super::notify::evaluate(&sim.rules, &mut sim.status, secs(now), on_schedule, &h);
        for n in w.fire.iter().filter(|n| n.moved.is_some()) {
            prop_assert!(
                self.moved.insert((n.key_id.clone(), n.expires_at)),
                "the move of {}'s end to {:?} was warned about twice (at {now} s)",
                n.key_id,
                n.expires_at
            );
        }
        if let Some(active) = sim.status.active_slot.and_then(|s| key(&sim.status, s))
            && active.state == KeyState::Active
            && w.expiring.is_some()
            && h.reason != crate::api::conditions::NEW_KEY_IN_USE
        {
            let recorded: Vec<&Notified> = sim
                .status
                .notified
                .iter()
                .filter(|n| {
                    n.key_id == active.key_id && super::notify::kind_of(n) != super::notify::KEY_STILL_IN_USE
                })
                .collect();
            prop_assert!(
                super::notify::moved_earlier(active, &recorded).is_none(),
                "at {now} s the end of {} moved to {:?} without a warning: {:#?}",
                active.key_id,
                active.effective_expires_at,
                sim.status
            );
        }
        Ok(())
    }
}

/// Every key consumers may hold at `now` verifies (unless revoked or retired).
fn check(sim: &Sim, consumers: &Consumers, now: f64, flip: f64) -> Result<(), TestCaseError> {
    let in_api_key = sim.material.api_key.as_deref();
    for (hash, id, last, end) in &consumers.held {
        let current = Some(hash.as_str()) == in_api_key;
        let until_end = end.is_some_and(|e| secs(now) >= e);
        if (!current && (now - last >= flip - 1e-6 || until_end)) || sim.revoked.contains(id) {
            continue;
        }
        let k = sim.status.keys.iter().find(|k| &k.hash == hash);
        let retired = sim.status.active_slot.and_then(|s| key(&sim.status, s)).is_some_and(|a| {
            a.state == KeyState::Expired && a.expiry_reason == Some(ExpiryReason::Inactivity)
        });
        if retired || k.is_some_and(|k| k.expiry_reason == Some(ExpiryReason::Inactivity)) {
            continue;
        }
        prop_assert!(
            k.is_some_and(|k| is_valid(k) && k.effective_expires_at.is_none_or(|t| t > secs(now))),
            "at {now} s consumers may hold key {id} (in api-key until {last} s, ending then at {end:?}), which does not verify: {:#?}",
            sim.status
        );
    }
    Ok(())
}

#[test]
fn without_a_policy_a_key_in_use_never_dies_of_a_stale_inactivity_deadline() {
    let mut sim = Sim::new(rules_with(|s| {
        s.expiry.max_lifetime = "PT1H".into();
        s.expiry.inactivity_timeout = Some("PT10S".into());
    }));
    sim.at(0.0);
    sim.status.keys[0].last_used_at = Some(secs(8.0));
    sim.at(9.0);
    assert_eq!(sim.active().expiry_reason, Some(ExpiryReason::Inactivity));
    // The policy goes away: the inactivity deadline cannot follow use any more, so it no
    // longer applies; the key runs to its ceiling and the ApiKey is not retired.
    sim.rules = Rules::frozen();
    sim.may_issue = false;
    let out = sim.at(30.0);
    assert_eq!(out.health, Health::Ready, "{}", out.details);
    assert_eq!(sim.active().effective_expires_at, Some(secs(3600.0)));
}

#[test]
fn a_standby_issued_on_schedule_is_never_replaced_for_being_short() {
    // secondaryAt 10% with flipBefore a quarter of the life: the standby outlives the
    // active key by only 3 s, less than twice the lead (15 s). An external system may
    // have been loaded with it, so it stays.
    let mut sim = Sim::new(rules_with(|s| {
        s.rotation.secondary_at = "10%".into();
        s.rotation.flip_before = "PT7.5S".into();
    }));
    sim.at(0.0);
    let out = sim.at(3.0);
    let standby = sim.slot(Slot::Secondary).key_id.clone();
    assert_eq!(out.next.as_ref().map(|n| n.action), Some(NextAction::Flip), "{}", out.details);
    sim.at(16.0);
    assert_eq!(sim.slot(Slot::Secondary).key_id, standby);
    assert_eq!(sim.mint.minted, 2);
}

/// `retireDrainedAfter` PT10S on 60 s keys (flipBefore PT5S): the Secondary exists from
/// 30 s; a caller that switches to it at once makes the Primary drain.
fn retiring_sim() -> Sim {
    let mut sim = Sim::new(rules_with(|s| {
        s.expiry.max_lifetime = "PT60S".into();
        s.rotation.flip_before = "PT5S".into();
        s.rotation.retire_drained_after = Some("PT10S".into());
    }));
    sim.at(0.0);
    sim.at(30.0);
    assert_eq!(sim.valid_count(), 2);
    sim
}

fn use_key(sim: &mut Sim, slot: Slot, at: f64) {
    sim.status.keys.iter_mut().find(|k| k.slot == slot).unwrap().last_used_at = Some(secs(at));
}

#[test]
fn a_drained_active_key_is_flipped_off_at_once_and_ends_flip_before_later() {
    let mut sim = retiring_sim();
    use_key(&mut sim, Slot::Primary, 29.0);
    use_key(&mut sim, Slot::Secondary, 31.0);
    sim.at(31.0);
    assert_eq!(sim.status.active_slot, Some(Slot::Primary), "the Primary was used 2 s ago");
    use_key(&mut sim, Slot::Secondary, 38.9);
    sim.at(38.9);
    assert_eq!(sim.status.active_slot, Some(Slot::Primary), "quiet for 9.9 s only");
    use_key(&mut sim, Slot::Secondary, 39.0);
    let out = sim.at(39.0);
    assert_eq!(sim.status.active_slot, Some(Slot::Secondary), "flipped at once: {:?}", out.happenings);
    assert_eq!(sim.material.api_key.as_deref(), Some(sim.slot(Slot::Secondary).hash.as_str()));
    let p = sim.slot(Slot::Primary);
    assert_eq!(
        p.cap,
        Some(ExpiryCap { at: secs(44.0), reason: ExpiryReason::Drained }),
        "flipBefore after the flip"
    );
    assert_eq!(p.effective_expires_at, Some(secs(44.0)));
    assert!(matches!(out.happenings.last(), Some(Happening::Retiring { slot: Slot::Primary, .. })));
    let out = sim.at(44.0);
    assert_eq!(sim.slot(Slot::Primary).state, KeyState::Expired);
    assert_eq!(sim.slot(Slot::Primary).expiry_reason, Some(ExpiryReason::Drained));
    assert!(out.happenings.iter().all(|h| !matches!(h, Happening::Created { .. })), "{:?}", out.happenings);
    // Its slot is regenerated on the normal schedule: half-way through the Secondary's life.
    let next = sim.at(44.0).next.unwrap();
    assert_eq!((next.action, next.at), (NextAction::Regenerate, secs(60.0)));
}

#[test]
fn a_retirement_is_cancelled_when_the_older_key_is_used_again_before_it_ends() {
    let mut sim = retiring_sim();
    use_key(&mut sim, Slot::Secondary, 40.0);
    sim.at(40.0);
    assert_eq!(
        sim.slot(Slot::Primary).expiry_reason,
        Some(ExpiryReason::Drained),
        "never used: quiet since 0 s"
    );
    use_key(&mut sim, Slot::Primary, 42.0);
    let out = sim.at(42.0);
    assert!(
        out.happenings.contains(&Happening::RetirementCancelled { slot: Slot::Primary, key_id: "k1".into() })
    );
    let p = sim.slot(Slot::Primary);
    assert_eq!((p.cap, p.effective_expires_at, p.state), (None, Some(secs(60.0)), KeyState::Standby));
    assert_eq!(sim.status.active_slot, Some(Slot::Secondary), "consumers stay on the newer key");
    sim.at(45.0);
    assert!(is_valid(sim.slot(Slot::Primary)), "it keeps its scheduled end");
}

#[test]
fn no_early_retirement_without_the_policy_or_without_usage_data() {
    let mut sim = retiring_sim();
    sim.at(50.0);
    assert_eq!(sim.status.active_slot, Some(Slot::Primary), "no usage data: nothing retired");
    assert_eq!(sim.slot(Slot::Primary).cap, None);
    let mut sim = Sim::new(rules_with(|s| s.expiry.max_lifetime = "PT60S".into()));
    sim.at(0.0);
    sim.at(30.0);
    use_key(&mut sim, Slot::Secondary, 44.0);
    sim.at(44.0);
    assert_eq!((sim.status.active_slot, sim.slot(Slot::Primary).cap), (Some(Slot::Primary), None));
}

#[test]
fn an_early_retirement_without_a_usable_policy_is_lifted() {
    let mut sim = retiring_sim();
    use_key(&mut sim, Slot::Secondary, 40.0);
    sim.at(40.0);
    assert_eq!(sim.slot(Slot::Primary).expiry_reason, Some(ExpiryReason::Drained));
    // The policy is deleted: the retirement could no longer be cancelled by a use, so it
    // is lifted and the key keeps its scheduled end.
    sim.rules = Rules::frozen();
    let out = sim.at(41.0);
    assert!(
        out.happenings.contains(&Happening::RetirementCancelled { slot: Slot::Primary, key_id: "k1".into() })
    );
    let p = sim.slot(Slot::Primary);
    assert_eq!((p.cap, p.effective_expires_at), (None, Some(secs(60.0))));
    sim.at(46.0);
    assert!(is_valid(sim.slot(Slot::Primary)));
}

#[test]
fn a_retirement_decided_again_gives_a_returning_caller_a_whole_flip_before() {
    let mut sim = retiring_sim();
    use_key(&mut sim, Slot::Secondary, 40.0);
    sim.at(40.0);
    use_key(&mut sim, Slot::Primary, 42.0);
    sim.at(42.0);
    assert_eq!(sim.slot(Slot::Primary).cap, None, "cancelled");
    // Quiet again for 10 s while the Secondary is used: retired again, flipBefore from now
    // (not from the flip at 40 s, which would end it at once).
    use_key(&mut sim, Slot::Secondary, 52.0);
    sim.at(52.0);
    let p = sim.slot(Slot::Primary);
    assert_eq!(p.cap, Some(ExpiryCap { at: secs(57.0), reason: ExpiryReason::Drained }));
    assert!(is_valid(p));
}

#[test]
fn an_idle_active_key_does_not_take_a_standby_in_use_with_it() {
    // 60 s keys, the Secondary from 30 s, 10 s inactivity: the Primary is idle from 12 s
    // (flipBefore PT2S after its activation) but the Secondary, loaded early into an
    // external system, is in use.
    let mut sim = Sim::new(rules_with(|s| {
        s.expiry.max_lifetime = "PT60S".into();
        s.expiry.inactivity_timeout = Some("PT10S".into());
        s.rotation.flip_before = "PT2S".into();
        s.rotation.secondary_at = "PT5S".into();
    }));
    sim.at(0.0);
    sim.at(5.0);
    assert_eq!(sim.valid_count(), 2);
    use_key(&mut sim, Slot::Secondary, 9.0);
    let out = sim.at(12.0);
    assert_eq!(out.health, Health::Ready, "{:?}", out.happenings);
    assert!(out.happenings.contains(&Happening::Expired {
        slot: Slot::Primary,
        key_id: "k1".into(),
        reason: ExpiryReason::Inactivity
    }));
    assert_eq!(sim.status.active_slot, Some(Slot::Secondary), "consumers moved to the key in use");
    assert_ne!(sim.slot(Slot::Primary).key_id, "k1", "its slot is regenerated on schedule");
    assert!(is_valid(sim.slot(Slot::Secondary)));
    // Nobody uses the standby: the ApiKey is abandoned and retired whole, as before.
    let mut idle = Sim::new(sim.rules.clone());
    idle.at(0.0);
    idle.at(5.0);
    assert_eq!(idle.at(12.0).health, Health::ExpiredInactive);
    assert_eq!(idle.valid_count(), 0);
}

/// Rules with a one-hour maxLifetime, 20 s flipBefore, and `since` as maxLifetimeSince.
fn hour_rules(edit: impl FnOnce(&mut KeyPolicySpec), since: DateTime<Utc>) -> Rules {
    let mut r = rules_with(|s| {
        s.expiry.max_lifetime = "PT1H".into();
        s.rotation.flip_before = "PT20S".into();
        edit(s);
    });
    r.max_lifetime_since = since;
    r
}

/// The key in `api-key` now, as consumers hold it.
fn held(sim: &Sim) -> KeyStatus {
    let h = sim.material.api_key.clone().unwrap();
    sim.status.keys.iter().find(|k| k.hash == h).unwrap().clone()
}

/// Whether the key consumers held (`k`) still verifies at `s`.
fn still_verifies(sim: &Sim, k: &KeyStatus, s: f64) -> bool {
    sim.status
        .keys
        .iter()
        .find(|x| x.hash == k.hash)
        .is_some_and(|x| is_valid(x) && x.effective_expires_at.is_none_or(|t| t > secs(s)))
}

#[test]
fn a_move_to_a_policy_with_an_inactivity_timeout_counts_idle_time_from_the_move() {
    let old = t0() - TimeDelta::days(1);
    let mut sim = Sim::new(hour_rules(|_| {}, old));
    sim.at(0.0);
    let k = held(&sim);
    for key in sim.status.keys.iter_mut() {
        key.last_used_at = Some(secs(1300.0));
    }
    sim.at(1300.0);
    // At 2000 s the ApiKey moves to a policy with a ten-minute inactivityTimeout: its
    // last use (1300 s) is over ten minutes before, but idle time counts from the move.
    sim.rules = hour_rules(|s| s.expiry.inactivity_timeout = Some("PT10M".into()), old);
    sim.policy_since = Some(secs(2000.0));
    sim.at(2000.0);
    assert!(still_verifies(&sim, &k, 2001.0), "{:#?}", sim.status.keys);
    assert_eq!(sim.active().effective_expires_at, Some(secs(2000.0 + 20.0 + 600.0)));
}

#[test]
fn switching_expiry_on_counts_idle_time_from_the_switch() {
    let timeout = |s: &mut KeyPolicySpec| s.expiry.inactivity_timeout = Some("PT10M".into());
    let mut sim = Sim::new(hour_rules(
        |s| {
            s.expiry.mode = crate::api::ExpiryMode::Disabled;
            s.expiry.acknowledge_risk = true;
            timeout(s);
        },
        t0(),
    ));
    sim.at(0.0);
    let k = held(&sim);
    // The policy controller records the switch (observedMaxLifetime moves) at 5000 s.
    sim.rules = hour_rules(timeout, secs(5000.0));
    sim.at(5000.0);
    assert!(still_verifies(&sim, &k, 5001.0), "{:#?}", sim.status.keys);
}

#[test]
fn an_inactivity_timeout_added_to_a_policy_counts_idle_time_from_its_addition() {
    let mut spec = KeyPolicySpec::default();
    let before = observed_expiry(&spec);
    spec.expiry.inactivity_timeout = Some("PT10M".into());
    assert_ne!(observed_expiry(&spec), before, "adding a timeout moves maxLifetimeSince");
    let mut sim = Sim::new(hour_rules(|_| {}, t0() - TimeDelta::days(1)));
    sim.at(0.0);
    let k = held(&sim);
    sim.rules = hour_rules(|s| s.expiry.inactivity_timeout = Some("PT10M".into()), secs(1000.0));
    sim.at(1000.0);
    assert!(still_verifies(&sim, &k, 1001.0), "{:#?}", sim.status.keys);
    // A maxLifetimeSince that only stands in for an unrecorded one (now) is not counted
    // from: the key would never go idle.
    let mut unrecorded = hour_rules(|s| s.expiry.inactivity_timeout = Some("PT10M".into()), secs(1000.0));
    unrecorded.max_lifetime_since_recorded = false;
    sim.rules = unrecorded;
    sim.at(1001.0);
    assert_eq!(sim.active().effective_expires_at, Some(secs(20.0 + 600.0)), "from its activation");
}

#[test]
fn a_cap_landing_in_the_past_leaves_the_key_in_api_key_flip_before_from_now() {
    // The first reconcile after an upgrade that is also a move (no status.policy yet: the
    // ApiKey counts as under the policy since its oldest key), or a typo in spec.policy
    // fixed after the policy was shrunk (the same name: no move): either way the new cap
    // lies in the past.
    let old = t0() - TimeDelta::days(1);
    let mut sim = Sim::new(hour_rules(|_| {}, old));
    sim.at(0.0);
    let k = held(&sim);
    sim.rules = hour_rules(|s| s.expiry.max_lifetime = "PT90S".into(), old);
    sim.lifetime = sim.rules.max_lifetime;
    sim.policy_since = Some(bind_policy(&mut sim.status, "strict", secs(100.0)));
    assert_eq!(sim.policy_since, Some(t0()), "no record: since its oldest key");
    sim.at(100.0);
    assert!(still_verifies(&sim, &k, 119.0), "{:#?}", sim.status.keys);
    let capped = sim.status.keys.iter().find(|x| x.key_id == k.key_id).unwrap();
    assert_eq!(
        capped.effective_expires_at,
        Some(secs(120.0)),
        "flipBefore from the reconcile that capped it"
    );
    // Later reconciles keep that end: the floor never moves on.
    sim.at(110.0);
    let capped = sim.status.keys.iter().find(|x| x.key_id == k.key_id).unwrap();
    assert_eq!(capped.effective_expires_at, Some(secs(120.0)));
}
