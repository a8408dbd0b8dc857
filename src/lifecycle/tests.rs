//! Table tests over time and property tests for the lifecycle's invariants.

use chrono::{TimeDelta, TimeZone};
use proptest::prelude::*;

use super::*;
use crate::api::KeyPolicySpec;

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
    t0() + TimeDelta::milliseconds((s * 1000.0) as i64)
}

fn rules_with(edit: impl FnOnce(&mut KeyPolicySpec)) -> Rules {
    let mut spec = KeyPolicySpec::default();
    spec.expiry.max_lifetime = "PT30S".into();
    spec.expiry.min_lifetime = "PT1S".into();
    edit(&mut spec);
    Rules::from_spec(&spec, t0() - TimeDelta::days(1)).unwrap()
}

/// An ApiKey being driven through time, as the controller would.
struct Sim {
    rules: Rules,
    lifetime: IsoDuration,
    revoked: Vec<String>,
    rotate: Option<String>,
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
        };
        let before = self.status.clone();
        let out = advance(&input, &mut self.status, &mut self.material, &mut self.mint);
        if let Some(in_api_key) = &self.material.api_key {
            let gone = before
                .keys
                .iter()
                .find(|k| &k.hash == in_api_key && !self.status.keys.iter().any(|n| n.hash == k.hash));
            if let Some(k) = gone {
                assert!(self.revoked.contains(&k.key_id), "hash {} left status while in api-key", k.hash);
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
