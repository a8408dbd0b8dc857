//! Following a watch, and knowing when its data may be stale.
//!
//! kube-runtime's watcher retries a failed watch by itself, but it resumes a watch
//! silently: a watch that came back and a watch that is idle both yield nothing, so
//! "no event" cannot tell healthy from broken. [`follow`] therefore restarts the watcher
//! after each error (after a backoff): the next success is then a complete re-list
//! (`InitDone`), which both proves the connection works and brings the data up to date.
//! [`WatchHealth`] turns that into "failing, without a success, since when", so an
//! idle but healthy watch is never stale and a broken one is stale after a bound.

use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::Api;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher;
use prometheus_client::metrics::counter::Counter;
use serde::de::DeserializeOwned;

/// What is known about one watch: whether it has listed once, and since when it has
/// been failing with no success (a complete list or a delivered change) since.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchHealth {
    synced: bool,
    last_success: Option<Instant>,
    failing_since: Option<Instant>,
}

impl WatchHealth {
    /// A complete (re)list arrived at `now`: the data is current.
    pub fn listed(&mut self, now: Instant) {
        self.synced = true;
        self.changed(now);
    }

    /// The watch delivered a change at `now`: it works.
    pub fn changed(&mut self, now: Instant) {
        self.last_success = Some(now);
        self.failing_since = None;
    }

    /// A list or watch attempt failed at `now`. Failing starts at the first failure
    /// after the last success; later failures do not move it.
    pub fn failed(&mut self, now: Instant) {
        self.failing_since.get_or_insert(now);
    }

    /// Whether it has listed at least once.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The last complete list or delivered change.
    pub fn last_success(&self) -> Option<Instant> {
        self.last_success
    }

    /// How long it has been failing without a success, at `now` (None: not failing).
    pub fn failing_for(&self, now: Instant) -> Option<Duration> {
        self.failing_since.map(|t| now.saturating_duration_since(t))
    }

    /// Whether its data can be trusted at `now`: it has listed, and it has not been
    /// failing for `max_staleness` or longer. Quiet is not failing: a healthy watch of
    /// objects that do not change yields nothing and stays current.
    pub fn current(&self, now: Instant, max_staleness: Duration) -> bool {
        self.synced && self.failing_for(now).is_none_or(|f| f < max_staleness)
    }
}

/// Objects per page of a (re-)list. kube's default, 500, leaves the verifier holding
/// about 0.2 KB per key more after listing 50,000 ApiKeys (the pages' memory, freed
/// but kept by the allocator among the index's); 100 costs about 15% more time to list.
/// See docs/benchmarks.md, "Where the verifier's memory per key goes".
const LIST_PAGE: u32 = 100;

/// Follow `api` forever: every event goes to `apply` (in watcher order, including the
/// `Init`…`InitDone` of each re-list), `health` records successes and failures (after
/// `apply`, so "current" never runs ahead of the data), `errors` counts failures. After
/// an error the watcher is dropped and, after a backoff (0.8 s doubling to 30 s, with
/// jitter; reset by a complete list), started again with a fresh list.
pub async fn follow<K>(
    api: Api<K>,
    resource: &'static str,
    health: Arc<Mutex<WatchHealth>>,
    errors: Counter,
    mut apply: impl FnMut(watcher::Event<K>),
) where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut backoff = watcher::DefaultBackoff::default();
    loop {
        let mut events = watcher(api.clone(), watcher::Config::default().page_size(LIST_PAGE)).boxed();
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    let (listed, changed) = match &event {
                        watcher::Event::InitDone => (true, false),
                        watcher::Event::Apply(_) | watcher::Event::Delete(_) => (false, true),
                        watcher::Event::Init | watcher::Event::InitApply(_) => (false, false),
                    };
                    apply(event);
                    let mut h = health.lock().unwrap_or_else(|p| p.into_inner());
                    if listed {
                        h.listed(Instant::now());
                        backoff.reset();
                    } else if changed {
                        h.changed(Instant::now());
                    }
                }
                Err(e) => {
                    errors.inc();
                    let mut h = health.lock().unwrap_or_else(|p| p.into_inner());
                    h.failed(Instant::now());
                    let failing = h.failing_for(Instant::now()).unwrap_or_default();
                    drop(h);
                    tracing::warn!(
                        resource,
                        error = %crate::error::chain(&e),
                        failing_for_seconds = failing.as_secs(),
                        "watch failed; listing again after a backoff"
                    );
                    break;
                }
            }
        }
        tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(30))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(60);

    #[test]
    fn a_watch_is_current_once_listed_and_stays_current_while_quiet() {
        let t0 = Instant::now();
        let mut h = WatchHealth::default();
        assert!(!h.current(t0, MAX), "not before the first list");
        h.failed(t0);
        assert!(!h.current(t0 + Duration::from_secs(1), MAX));
        h.listed(t0 + Duration::from_secs(2));
        assert!(h.synced());
        assert_eq!(h.failing_for(t0 + Duration::from_secs(2)), None);
        // Idle and healthy: no events for an hour is not staleness.
        assert!(h.current(t0 + Duration::from_secs(3600), MAX));
        assert_eq!(h.last_success(), Some(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn a_watch_failing_without_success_for_the_bound_is_stale_until_it_succeeds() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut h = WatchHealth::default();
        h.listed(s(0));
        // Quiet for 10 minutes, then the watch breaks: failing counts from the first
        // error, not from the last success.
        h.failed(s(600));
        h.failed(s(601));
        h.failed(s(640));
        assert_eq!(h.failing_for(s(650)), Some(Duration::from_secs(50)));
        assert!(h.current(s(659), MAX));
        assert!(!h.current(s(660), MAX), "60 s of errors with no success");
        assert!(!h.current(s(5000), MAX));
        // A complete re-list: current again, and failing starts over at the next error.
        h.listed(s(5001));
        assert!(h.current(s(5001), MAX));
        h.failed(s(5002));
        assert!(h.current(s(5061), MAX));
        assert!(!h.current(s(5062), MAX));
        // A delivered change also proves the watch works.
        h.changed(s(5063));
        assert!(h.current(s(9999), MAX));
    }

    #[test]
    fn a_watch_that_never_listed_is_never_current() {
        let t0 = Instant::now();
        let mut h = WatchHealth::default();
        h.changed(t0);
        assert!(!h.current(t0, MAX), "a change is not a list");
        assert!(!h.current(t0, Duration::ZERO));
    }
}
