//! Resolution failures remembered per question (RFC 9520): after an upstream answers SERVFAIL
//! or REFUSED, or none answers in time, the same question is not sent upstream again until a
//! short period has passed, however many clients ask meanwhile. The period starts at
//! `cache.failure_ttl` and doubles each time the question fails again right after the last
//! period ended (the failure persists), up to `cache.failure_ttl_max`; a success forgets it.
//!
//! The cache consults this only when it has no fresh answer, and prefers an expired answer
//! within its stale window (RFC 8767) to the remembered failure.

use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long failures are remembered (`cache.failure_ttl`, `cache.failure_ttl_max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailurePolicy {
    /// The first period after a failure.
    pub ttl: Duration,
    /// The longest period, reached by doubling while the failure persists.
    pub max_ttl: Duration,
}

impl Default for FailurePolicy {
    fn default() -> FailurePolicy {
        FailurePolicy {
            ttl: crate::config::DEFAULT_FAILURE_TTL,
            max_ttl: crate::config::DEFAULT_FAILURE_TTL_MAX,
        }
    }
}

/// Failures remembered at most: each question a client can make fail takes a slot, so the map
/// is bounded; beyond it the least useful are forgotten (S3-FIFO), which costs one more upstream
/// query for the question, nothing else.
pub(crate) const MAX_FAILURES: usize = 10_000;

#[derive(Clone)]
struct Failure {
    /// The question (the cache's key bytes), checked on every read: keys are hashes.
    question: Arc<[u8]>,
    /// The question is not asked upstream again before this.
    until: Instant,
    /// The length of the period that ends at `until`.
    period: Duration,
}

/// The remembered failures, keyed like the cache (a keyed hash of the question and CD).
pub(crate) struct Failures {
    map: quick_cache::sync::Cache<u64, Failure>,
    policy: FailurePolicy,
}

impl Failures {
    pub(crate) fn new(policy: FailurePolicy) -> Failures {
        Failures {
            map: quick_cache::sync::Cache::new(MAX_FAILURES),
            policy,
        }
    }

    /// Remembers that `question` failed at `now`; returns how long it will not be asked.
    pub(crate) fn record(&self, key: u64, question: &[u8], now: Instant) -> Duration {
        let previous = self.map.get(&key).filter(|f| *f.question == *question);
        let period = next_period(self.policy, previous.map(|f| (f.until, f.period)), now);
        self.map.insert(
            key,
            Failure {
                question: question.into(),
                until: now + period,
                period,
            },
        );
        period
    }

    /// Did `question` fail recently enough that it must not be asked again yet?
    pub(crate) fn active(&self, key: u64, question: &[u8], now: Instant) -> bool {
        self.map
            .get(&key)
            .is_some_and(|f| *f.question == *question && now < f.until)
    }

    /// Forgets the failure of a question that has just been answered.
    pub(crate) fn clear(&self, key: u64) {
        self.map.remove(&key);
    }
}

/// The period after a failure at `now`, given the last one (its end and length): the first
/// period, or twice the last (at most `max_ttl`) when this failure came within one period of
/// its end, i.e. the question was asked again as soon as it could be and failed again.
fn next_period(policy: FailurePolicy, last: Option<(Instant, Duration)>, now: Instant) -> Duration {
    match last {
        Some((until, period)) if now < until + period => {
            period.saturating_mul(2).clamp(policy.ttl, policy.max_ttl)
        }
        _ => policy.ttl,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: FailurePolicy = FailurePolicy {
        ttl: Duration::from_secs(5),
        max_ttl: Duration::from_secs(30),
    };

    #[test]
    fn periods_double_while_the_failure_persists_up_to_the_cap() {
        let failures = Failures::new(POLICY);
        let q = b"\x01x\x00\x00\x01\x00\x01";
        let mut now = Instant::now();
        let mut periods = Vec::new();
        for _ in 0..6 {
            assert!(
                !failures.active(7, q, now),
                "asked again once the period is over"
            );
            let period = failures.record(7, q, now);
            assert!(failures.active(7, q, now + period - Duration::from_millis(1)));
            periods.push(period.as_secs());
            now += period;
        }
        assert_eq!(periods, [5, 10, 20, 30, 30, 30]);
        // Not asked for a long while: the next failure starts over.
        now += Duration::from_secs(120);
        assert_eq!(failures.record(7, q, now), Duration::from_secs(5));
        // A success forgets it.
        failures.clear(7);
        assert!(!failures.active(7, q, now));
        assert_eq!(failures.record(7, q, now), Duration::from_secs(5));
    }

    #[test]
    fn another_question_under_the_same_key_is_not_failed() {
        let failures = Failures::new(POLICY);
        let now = Instant::now();
        failures.record(7, b"\x01a\x00\x00\x01\x00\x01", now);
        assert!(!failures.active(7, b"\x01b\x00\x00\x01\x00\x01", now));
        assert!(!failures.active(8, b"\x01a\x00\x00\x01\x00\x01", now));
    }

    #[test]
    fn a_first_period_above_the_cap_is_the_cap() {
        let policy = FailurePolicy {
            ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(7),
        };
        let now = Instant::now();
        let last = Some((now, Duration::from_secs(5)));
        assert_eq!(next_period(policy, last, now), Duration::from_secs(7));
        assert_eq!(next_period(policy, None, now), Duration::from_secs(5));
    }
}
