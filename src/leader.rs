//! Leader election on a `coordination.k8s.io/v1` Lease: one writer among the
//! controller's replicas, built the way client-go's `leaderelection` is, and stricter
//! about when the leader stops.
//!
//! - **Expiry by observed time.** A candidate never compares the holder's timestamps with
//!   its own wall clock (replicas' clocks may disagree by any amount). It remembers the
//!   Lease record it last observed and the instant, on its own monotonic clock, when it
//!   saw that record change; the holder's claim has run out only when the record has not
//!   changed for the holder's `leaseDurationSeconds` since then ([`holder_expired`]).
//! - **A deadline for the leader.** The leader renews every [`retry_period`] (a sixth of
//!   the lease duration `D`); each attempt is bounded by a timeout that ends at its renew
//!   deadline (a hung call is abandoned there). It leads only until the *start* of its last successful
//!   attempt plus the [`renew_deadline`] (`2D/3`). A standby observes that renewal after
//!   the attempt started, so it cannot take over before `start + D`: the leader has
//!   stopped `D/3` earlier (the margin for clock rates and scheduling).
//! - **No write after the deadline.** The controllers write through
//!   [`Elector::gated_client`], which refuses every write once the deadline has passed,
//!   whatever the renewal task is doing: a process resumed after a pause (or a
//!   renewal that hangs) finds its deadline gone before a single write leaves it. When
//!   [`Elector::hold`] returns, the caller exits at once rather than drain its work.
//! - Every Lease write carries the resourceVersion it was read at, so two candidates
//!   never both win, and a renewal that lost a race to a successor fails.
//!
//! What remains, as with any lease without fencing tokens: a write that passed the gate
//! just before the deadline and then sat in the process (paused mid-send) for longer
//! than the `D/3` margin could still land late.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use hyper::{Method, Request, Response};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::client::Body;
use tokio::time::Instant;

use crate::error::{Error, Result};

/// Field manager of the Lease writes.
pub const LEASE_MANAGER: &str = "keyward/leader";

/// Which Lease, held by whom, for how long.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity (unique per process).
    pub identity: String,
    /// How long a holder's claim lasts without renewal (whole seconds, at least one: the
    /// Lease records seconds).
    pub duration: Duration,
}

/// How long the leader may go without a successful renewal before it stops leading,
/// counted from the start of its last successful attempt: two thirds of the lease
/// duration, strictly shorter than it.
pub fn renew_deadline(lease: Duration) -> Duration {
    lease * 2 / 3
}

/// Time between renewal (and acquisition) attempts: a sixth of the lease duration, so a
/// leader has three more tries before its renew deadline after a success.
pub fn retry_period(lease: Duration) -> Duration {
    lease / 6
}

/// When an attempt that started at `start` is abandoned: the leader's renew `deadline`
/// (as client-go bounds each renewal by what is left of its renew deadline); without one
/// (acquiring), the renew deadline from `start`, since a slower acquisition would not
/// lead for a moment.
pub fn attempt_limit(start: Instant, lease: Duration, deadline: Option<Instant>) -> Instant {
    deadline.unwrap_or(start + renew_deadline(lease))
}

/// The Lease as a candidate compares it between two reads: any write changes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// `metadata.resourceVersion`.
    pub resource_version: Option<String>,
    /// The holder's claim.
    pub spec: LeaseSpec,
}

impl Record {
    /// The record of `lease`.
    pub fn of(lease: &Lease) -> Self {
        Record {
            resource_version: lease.metadata.resource_version.clone(),
            spec: lease.spec.clone().unwrap_or_default(),
        }
    }

    /// The holder, if any.
    pub fn holder(&self) -> Option<&str> {
        self.spec.holder_identity.as_deref().filter(|h| !h.is_empty())
    }

    /// The lease duration the record declares (its holder's claim), or `fallback` when it
    /// declares none.
    pub fn duration(&self, fallback: Duration) -> Duration {
        match self.spec.lease_duration_seconds {
            Some(s) if s > 0 => Duration::from_secs(s.unsigned_abs().into()),
            _ => fallback,
        }
    }
}

/// A record and the instant (local monotonic clock) it was first seen in this form.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    /// What was seen.
    pub record: Record,
    /// When this replica first saw it.
    pub at: Instant,
}

/// Remember `record`, read at `now`: the observation instant moves only when the record
/// changed since `prev`.
pub fn observe(prev: Option<&Observed>, record: Record, now: Instant) -> Observed {
    match prev {
        Some(p) if p.record == record => p.clone(),
        _ => Observed { record, at: now },
    }
}

/// Whether the holder's claim in `record` has run out for a candidate that saw the record
/// change last at `observed_at` (its own monotonic clock): the Lease has no holder, or the
/// record has not changed for `duration` since. The holder's `renewTime` is not consulted:
/// it comes from another clock.
pub fn holder_expired(record: &Record, observed_at: Instant, now: Instant, duration: Duration) -> bool {
    record.holder().is_none() || now >= observed_at + duration
}

/// Whether an HTTP method changes anything on the API server.
fn is_write(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Until when this replica may write: open from a successful acquisition until the renew
/// deadline of its last successful renewal. Once the deadline has passed it stays closed
/// (leadership never comes back to a process; a new one runs for election again).
#[derive(Clone, Debug, Default)]
pub struct Gate(Arc<Mutex<GateState>>);

#[derive(Debug, Default)]
struct GateState {
    until: Option<Instant>,
    ended: bool,
}

impl Gate {
    fn state(&self) -> MutexGuard<'_, GateState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this replica leads at `now`.
    pub fn is_open(&self, now: Instant) -> bool {
        let s = self.state();
        !s.ended && s.until.is_some_and(|u| now < u)
    }

    /// The current deadline while leading.
    pub fn deadline(&self) -> Option<Instant> {
        let s = self.state();
        if s.ended { None } else { s.until }
    }

    /// A successful acquisition or renewal that started at `start`: lead until
    /// `start + renew_deadline`, unless the deadline already passed at `now` (then the
    /// gate stays closed for good). Returns whether the gate is open.
    pub fn renewed(&self, start: Instant, renew_deadline: Duration, now: Instant) -> bool {
        let mut s = self.state();
        if s.ended {
            return false;
        }
        if s.until.is_some_and(|u| now >= u) {
            // Leadership lapsed before this success came back: it is over.
            s.ended = true;
            return false;
        }
        let until = start + renew_deadline;
        if now >= until {
            // Too late to count (an acquisition slower than the renew deadline): the
            // current deadline, if any, stands.
            return s.until.is_some();
        }
        s.until = Some(s.until.map_or(until, |u| u.max(until)));
        true
    }

    /// Stop leading now, for good.
    pub fn close(&self) {
        self.state().ended = true;
    }
}

/// A kube client service that refuses writes while the gate is closed.
#[derive(Clone)]
struct Gated {
    inner: Client,
    gate: Gate,
}

type Sent = std::result::Result<Response<Body>, kube::Error>;

impl tower_service::Service<Request<Body>> for Gated {
    type Response = Response<Body>;
    type Error = kube::Error;
    type Future = Pin<Box<dyn Future<Output = Sent> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<std::result::Result<(), kube::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let (inner, gate) = (self.inner.clone(), self.gate.clone());
        Box::pin(async move {
            // Checked when the request is about to be sent, not when it was built.
            if is_write(req.method()) && !gate.is_open(Instant::now()) {
                tracing::warn!(method = %req.method(), path = req.uri().path(), "refused a write: not the leader");
                return Err(kube::Error::Service("not the leader: the leader lease has run out".into()));
            }
            inner.send(req).await
        })
    }
}

/// How one attempt on the Lease ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// This replica holds the Lease (written just now).
    Holds,
    /// Another replica holds it.
    Other,
    /// The Lease changed between the read and the write; try again.
    Conflict,
}

/// A candidate for the Lease.
pub struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    observed: Mutex<Option<Observed>>,
    gate: Gate,
}

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

impl Elector {
    /// A candidate for `cfg`.
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Elector {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            observed: Mutex::new(None),
            gate: Gate::default(),
        }
    }

    /// The lease duration this replica claims (whole seconds, as the Lease records it).
    pub fn lease_duration(&self) -> Duration {
        Duration::from_secs(self.cfg.duration.as_secs().max(1))
    }

    /// Whether this replica leads now (its writes pass [`Elector::gated_client`]).
    pub fn is_leading(&self) -> bool {
        self.gate.is_open(Instant::now())
    }

    /// `client`, refusing every write (anything but GET/HEAD/OPTIONS) whenever this
    /// replica does not lead. Give it to everything that writes on the leader's behalf.
    pub fn gated_client(&self, client: Client) -> Client {
        let ns = client.default_namespace().to_string();
        Client::new(Gated { inner: client, gate: self.gate.clone() }, ns)
    }

    fn what(&self) -> String {
        format!("Lease {}/{}", self.cfg.namespace, self.cfg.name)
    }

    fn spec(&self, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.lease_duration().as_secs()).unwrap_or(i32::MAX)),
            acquire_time: acquired.or_else(|| Some(now_micro())),
            renew_time: Some(now_micro()),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Record what was read at `now`; the instant this replica first saw it so.
    fn observe(&self, lease: &Lease, now: Instant) -> Observed {
        let mut seen = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        let next = observe(seen.as_ref(), Record::of(lease), now);
        *seen = Some(next.clone());
        next
    }

    /// Read the Lease and write it if this replica holds it or (when `acquire`) may take it.
    async fn attempt(&self, acquire: bool) -> Result<Outcome> {
        let pp = PostParams { field_manager: Some(LEASE_MANAGER.into()), ..Default::default() };
        let lease = self
            .api
            .get_opt(&self.cfg.name)
            .await
            .map_err(Error::kube(format!("reading {}", self.what())))?;
        // The instant after the read: the record was written before it, never after.
        let read_at = Instant::now();
        let Some(lease) = lease else {
            if !acquire {
                return Ok(Outcome::Other);
            }
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.cfg.name.clone()), ..Default::default() },
                spec: Some(self.spec(None, 0)),
            };
            return match self.api.create(&pp, &lease).await {
                Ok(created) => {
                    self.observe(&created, Instant::now());
                    Ok(Outcome::Holds)
                }
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Outcome::Conflict),
                Err(e) => Err(Error::kube(format!("creating {}", self.what()))(e)),
            };
        };
        let seen = self.observe(&lease, read_at);
        let mine = seen.record.holder() == Some(self.cfg.identity.as_str());
        if !mine {
            let free = holder_expired(
                &seen.record,
                seen.at,
                Instant::now(),
                seen.record.duration(self.lease_duration()),
            );
            if !acquire || !free {
                return Ok(Outcome::Other);
            }
        }
        let spec = &seen.record.spec;
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine { spec.acquire_time.clone() } else { None };
        let mut next = lease;
        next.spec = Some(self.spec(acquired, transitions));
        // `next` keeps the resourceVersion it was read at: a precondition on the write.
        match self.api.replace(&self.cfg.name, &pp, &next).await {
            Ok(written) => {
                self.observe(&written, Instant::now());
                Ok(Outcome::Holds)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Outcome::Conflict),
            Err(e) => Err(Error::kube(format!("updating {}", self.what()))(e)),
        }
    }

    /// One attempt, abandoned at [`attempt_limit`]: how it ended, or None when it failed
    /// or timed out (logged).
    async fn bounded(&self, acquire: bool, start: Instant, deadline: Option<Instant>) -> Option<Outcome> {
        let limit = attempt_limit(start, self.lease_duration(), deadline);
        match tokio::time::timeout_at(limit, self.attempt(acquire)).await {
            Ok(Ok(outcome)) => Some(outcome),
            Ok(Err(e)) => {
                tracing::warn!(error = %crate::error::chain(&e), lease = %self.cfg.name, "leader election");
                None
            }
            Err(_) => {
                tracing::warn!(lease = %self.cfg.name, "leader election: the API server did not answer in time");
                None
            }
        }
    }

    /// Wait until this replica leads.
    pub async fn acquire(&self) {
        let lease = self.lease_duration();
        loop {
            let start = Instant::now();
            if self.bounded(true, start, None).await == Some(Outcome::Holds)
                && self.gate.renewed(start, renew_deadline(lease), Instant::now())
            {
                return;
            }
            tokio::time::sleep(retry_period(lease)).await;
        }
    }

    /// Renew while leading; return as soon as this replica no longer leads: another holds
    /// the Lease, or no renewal succeeded within the renew deadline (a renewal that
    /// hangs is abandoned at the deadline). The caller must stop writing at once; the
    /// gated client already refuses writes by then.
    pub async fn hold(&self) {
        let lease = self.lease_duration();
        while let Some(deadline) = self.gate.deadline() {
            let now = Instant::now();
            if now >= deadline {
                tracing::error!(lease = %self.cfg.name, "the leader lease was not renewed within its renew deadline");
                break;
            }
            tokio::time::sleep_until((now + retry_period(lease)).min(deadline)).await;
            let start = Instant::now();
            if start >= deadline {
                continue;
            }
            match self.bounded(false, start, Some(deadline)).await {
                Some(Outcome::Holds) => {
                    if !self.gate.renewed(start, renew_deadline(lease), Instant::now()) {
                        tracing::error!(lease = %self.cfg.name, "the leader lease was renewed too late");
                    }
                }
                Some(Outcome::Other) => {
                    tracing::error!(lease = %self.cfg.name, "another replica holds the leader lease");
                    break;
                }
                Some(Outcome::Conflict) | None => {}
            }
        }
        self.gate.close();
    }

    /// Give the Lease up (clean hand-over on shutdown, once nothing writes any more), so
    /// a successor takes over at once. Only while still leading, and bounded by the renew
    /// deadline.
    pub async fn release(&self) {
        let Some(deadline) = self.gate.deadline().filter(|d| Instant::now() < *d) else { return };
        // No write of ours may follow: the successor starts as soon as this lands.
        self.gate.close();
        let release = async {
            let mut lease = self.api.get_opt(&self.cfg.name).await.ok()??;
            let spec = lease.spec.as_mut()?;
            if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
                return None;
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            let pp = PostParams { field_manager: Some(LEASE_MANAGER.into()), ..Default::default() };
            Some(self.api.replace(&self.cfg.name, &pp, &lease).await)
        };
        match tokio::time::timeout_at(deadline, release).await {
            Ok(Some(Ok(_))) => tracing::info!(lease = %self.cfg.name, "lease released"),
            Ok(Some(Err(e))) => tracing::warn!(error = %e, "cannot release the lease"),
            Ok(None) => {}
            Err(_) => tracing::warn!(lease = %self.cfg.name, "releasing the lease timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    fn at(ts: &str) -> MicroTime {
        MicroTime(ts.parse().unwrap())
    }

    fn record(holder: Option<&str>, rv: u64, renewed: &str) -> Record {
        Record {
            resource_version: Some(rv.to_string()),
            spec: LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: Some(15),
                renew_time: Some(at(renewed)),
                ..Default::default()
            },
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_holder_whose_record_keeps_changing_never_expires_whatever_its_clock_says() {
        // The holder's clock is decades behind (or ahead of) ours: renewTime says nothing.
        for renewed in ["2001-01-01T00:00:00Z", "2099-12-31T23:59:59Z"] {
            let t0 = Instant::now();
            let mut seen: Option<Observed> = None;
            // Renewed every 2 s for ten minutes, observed every 500 ms.
            for step in 0..1200u64 {
                let now = t0 + ms(500 * step);
                let rv = 100 + step / 4;
                let obs = observe(seen.as_ref(), record(Some("a"), rv, renewed), now);
                assert!(!holder_expired(&obs.record, obs.at, now, D), "{renewed}: step {step}");
                seen = Some(obs);
            }
        }
    }

    #[test]
    fn a_record_that_stops_changing_expires_after_the_lease_duration_on_the_observers_clock() {
        // renewTime is "now" by the holder's clock, or far in the future: irrelevant.
        for renewed in [Timestamp::now().to_string(), "2099-01-01T00:00:00Z".to_string()] {
            let t0 = Instant::now();
            let first = observe(None, record(Some("a"), 7, &renewed), t0);
            assert_eq!(first.at, t0);
            // Seen again unchanged: the observation instant stays.
            let again = observe(Some(&first), record(Some("a"), 7, &renewed), t0 + ms(14_000));
            assert_eq!(again.at, t0);
            assert!(!holder_expired(&again.record, again.at, t0 + D - ms(1), D));
            assert!(holder_expired(&again.record, again.at, t0 + D, D));
            // One more renewal restarts the count from when it was seen.
            let renewal = observe(Some(&again), record(Some("a"), 8, &renewed), t0 + ms(14_500));
            assert_eq!(renewal.at, t0 + ms(14_500));
            assert!(!holder_expired(&renewal.record, renewal.at, t0 + D, D));
            assert!(holder_expired(&renewal.record, renewal.at, t0 + ms(14_500) + D, D));
        }
    }

    #[test]
    fn a_new_candidate_waits_a_whole_lease_duration_even_for_a_stale_looking_record() {
        // The record was renewed an hour ago by the wall clock: a new candidate still
        // counts from its own first sight.
        let t0 = Instant::now();
        let stale = Timestamp::from_second(Timestamp::now().as_second() - 3600).unwrap().to_string();
        let obs = observe(None, record(Some("a"), 3, &stale), t0);
        assert!(!holder_expired(&obs.record, obs.at, t0, D));
        assert!(!holder_expired(&obs.record, obs.at, t0 + D - ms(1), D));
        assert!(holder_expired(&obs.record, obs.at, t0 + D, D));
    }

    #[test]
    fn a_released_lease_is_free_at_once() {
        let t0 = Instant::now();
        for holder in [None, Some("")] {
            let obs = observe(None, record(holder, 9, "2001-01-01T00:00:00Z"), t0);
            assert!(holder_expired(&obs.record, obs.at, t0, D));
        }
    }

    #[test]
    fn any_change_of_the_record_counts_as_a_change() {
        let t0 = Instant::now();
        let base = record(Some("a"), 5, "2030-01-01T00:00:00Z");
        let first = observe(None, base.clone(), t0);
        let mut other_holder = base.clone();
        other_holder.spec.holder_identity = Some("b".into());
        let mut other_rv = base.clone();
        other_rv.resource_version = Some("6".into());
        let mut other_renew = base;
        other_renew.spec.renew_time = Some(at("2030-01-01T00:00:01Z"));
        for changed in [other_holder, other_rv, other_renew] {
            assert_eq!(observe(Some(&first), changed, t0 + ms(10)).at, t0 + ms(10));
        }
    }

    #[test]
    fn the_declared_duration_is_the_holders() {
        let mut r = record(Some("a"), 1, "2030-01-01T00:00:00Z");
        assert_eq!(r.duration(D), D);
        r.spec.lease_duration_seconds = Some(4);
        assert_eq!(r.duration(D), Duration::from_secs(4));
        for bad in [None, Some(0), Some(-3)] {
            r.spec.lease_duration_seconds = bad;
            assert_eq!(r.duration(D), D);
        }
    }

    /// The leader stops (start of its last successful renewal + renew deadline) strictly
    /// before any standby may take over (it saw that renewal at or after its start, and
    /// waits the lease duration), with a margin; attempts fit within the deadline.
    #[test]
    fn the_leader_stops_before_a_standby_may_start() {
        for secs in 1..=120u64 {
            let d = Duration::from_secs(secs);
            let (r, p) = (renew_deadline(d), retry_period(d));
            assert!(r < d, "{secs} s");
            assert!(d - r >= d / 3, "{secs} s: margin");
            assert!(p > Duration::ZERO && p * 3 < r, "{secs} s: retries within the deadline");
            let start = Instant::now();
            // The earliest a standby can see the renewal is `start`.
            let standby_start = start + d;
            assert!(start + r < standby_start);
            // Each renewal attempt ends by the deadline; an acquisition within the renew
            // deadline of its start.
            let deadline = start + r;
            for late in [0, secs * 100, secs * 500, secs * 600] {
                assert_eq!(attempt_limit(start + ms(late), d, Some(deadline)), deadline);
                assert_eq!(attempt_limit(start + ms(late), d, None), start + ms(late) + r);
            }
        }
    }

    #[test]
    fn the_gate_closes_at_the_deadline_and_never_reopens() {
        let t0 = Instant::now();
        let r = renew_deadline(D);
        let gate = Gate::default();
        assert!(!gate.is_open(t0), "closed before the first acquisition");
        assert!(gate.renewed(t0, r, t0 + ms(300)));
        assert!(gate.is_open(t0 + r - ms(1)));
        assert!(!gate.is_open(t0 + r), "closed at start + renew deadline");
        // A renewal that started at t0+1s and succeeded in time moves the deadline.
        assert!(gate.renewed(t0 + ms(1000), r, t0 + ms(1200)));
        assert!(gate.is_open(t0 + r + ms(999)));
        assert!(!gate.is_open(t0 + r + ms(1000)));
        // A success that comes back after the deadline does not bring leadership back.
        assert!(!gate.renewed(t0 + r, r, t0 + r + ms(1000)));
        assert!(!gate.is_open(t0 + r + ms(500)));
        assert_eq!(gate.deadline(), None);
        // An acquisition that took longer than the renew deadline does not open it; the
        // next, quick one does.
        let slow = Gate::default();
        assert!(!slow.renewed(t0, r, t0 + r));
        assert!(!slow.is_open(t0 + ms(1)));
        assert!(slow.renewed(t0 + r, r, t0 + r + ms(5)));
        assert!(slow.is_open(t0 + r + ms(5)));
        // close() is final.
        let closed = Gate::default();
        assert!(closed.renewed(t0, r, t0));
        closed.close();
        assert!(!closed.is_open(t0));
        assert!(!closed.renewed(t0, r, t0));
    }

    #[test]
    fn only_reads_pass_a_closed_gate() {
        for m in [Method::GET, Method::HEAD, Method::OPTIONS] {
            assert!(!is_write(&m));
        }
        for m in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            assert!(is_write(&m));
        }
    }
}
