//! The one retry policy of every API call ferrolb retries: exponential backoff with a
//! cap and jitter, so that a persistent failure (a missing RBAC rule, an API server
//! down) costs a request every half a minute, not every tick, and speakers on many nodes
//! do not retry in step.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

/// The first delay.
pub const FIRST: Duration = Duration::from_millis(100);
/// The longest delay.
pub const CAP: Duration = Duration::from_secs(30);

/// Delays that double from [`FIRST`] to [`CAP`], each drawn between half and all of its
/// step ("equal jitter"). Also a kube-runtime backoff, so the watches use it too.
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new(FIRST, CAP)
    }
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            cap: cap.max(first),
            failures: 0,
        }
    }

    /// The delay before the next try, after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step();
        self.failures = self.failures.saturating_add(1);
        let half = step / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// Without jitter: what [`Backoff::next_delay`] draws up to.
    fn step(&self) -> Duration {
        self.first
            .saturating_mul(1 << self.failures.min(20))
            .min(self.cap)
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.next_delay())
    }
}

impl kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {
        Backoff::reset(self);
    }
}

/// Keys (a Service, a pool) whose write failed, each tried again when its own backoff
/// ends.
pub struct Retries<K> {
    /// When each is due; `None` once handed out, until scheduled again.
    due: BTreeMap<K, Option<Instant>>,
    backoff: BTreeMap<K, Backoff>,
}

impl<K> Default for Retries<K> {
    fn default() -> Self {
        Retries {
            due: BTreeMap::new(),
            backoff: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Clone> Retries<K> {
    /// Tries `key` again after its next delay, which is returned for the log.
    pub fn schedule(&mut self, key: K) -> Duration {
        let delay = self.backoff.entry(key.clone()).or_default().next_delay();
        self.due.insert(key, Some(Instant::now() + delay));
        delay
    }

    /// Forgets `key`'s failures.
    pub fn succeeded(&mut self, key: &K) {
        self.due.remove(key);
        self.backoff.remove(key);
    }

    /// Whether `key` failed and its delay has not ended yet: do not try it now.
    pub fn waiting(&self, key: &K) -> bool {
        matches!(self.due.get(key), Some(Some(at)) if *at > Instant::now())
    }

    /// Waits for the next retry that is due.
    pub async fn next(&mut self) -> K {
        let Some((key, when)) = self
            .due
            .iter()
            .filter_map(|(k, w)| w.map(|w| (k.clone(), w)))
            .min_by_key(|(_, w)| *w)
        else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(when).await;
        self.due.insert(key.clone(), None);
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_jitter_below_each_step() {
        let mut b = Backoff::default();
        let mut steps = Vec::new();
        for _ in 0..16 {
            let step = b.step();
            let d = b.next_delay();
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} outside [{:?}, {step:?}]",
                step / 2
            );
            steps.push(step);
        }
        assert_eq!(steps[0], FIRST);
        assert_eq!(steps[1], FIRST * 2);
        assert_eq!(steps[4], FIRST * 16);
        // 100 ms doubled 9 times passes 30 s: capped from there on.
        assert!(steps[8] < CAP);
        assert!(steps[9..].iter().all(|s| *s == CAP));
        assert_eq!(b.failures(), 16);
        b.reset();
        assert!(b.next_delay() <= FIRST);
    }

    #[test]
    fn jitter_spreads_retries_of_many_nodes() {
        let delays: std::collections::BTreeSet<Duration> = (0..50)
            .map(|_| Backoff::default().nth(5).unwrap())
            .collect();
        assert!(
            delays.len() > 40,
            "only {} distinct delays of 50",
            delays.len()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_waits_for_its_own_delay_and_success_forgets_it() {
        let mut r: Retries<&str> = Retries::default();
        let first = r.schedule("a");
        assert!(r.waiting(&"a"));
        assert!(!r.waiting(&"b"));
        // Failing again doubles the step.
        let started = Instant::now();
        assert_eq!(r.next().await, "a");
        assert!(started.elapsed() >= first);
        assert!(!r.waiting(&"a"));
        let second = r.schedule("a");
        assert!(second >= FIRST, "{second:?}");
        r.succeeded(&"a");
        assert!(!r.waiting(&"a"));
        assert!(r.schedule("a") <= FIRST, "a success starts over");
    }
}
