//! The one token bucket behind every rate in the crate: per client network (`ratelimit`), per
//! Consul watcher (Consul's advice for blocking-query loops) and for lookups the Consul
//! inventory could not vouch for.

use std::time::{Duration, Instant};

/// How fast tokens come back, and how many can be saved up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

/// Small and `Copy`, so that a map can hold one per key by value. The rate is passed to each
/// call instead of stored: a hundred thousand buckets share one.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    /// A bucket with its whole burst available.
    pub fn full(rate: Rate, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: rate.burst,
            refilled: now,
        }
    }

    /// Refills for the time since the last call, then takes a token, or says how long until
    /// one is due.
    pub fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        // Callers on other threads may pass an `Instant` read a moment before ours: time
        // never runs backwards here, so no interval is refilled twice.
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.refilled = self.refilled.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - self.tokens) / rate.per_second;
        Err(Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_interval_and_a_quiet_spell_refills_only_the_burst() {
        let rate = Rate {
            per_second: 4.0,
            burst: 2.0,
        };
        let start = Instant::now();
        let mut bucket = TokenBucket::full(rate, start);
        assert_eq!(bucket.take(rate, start), Ok(()));
        assert_eq!(bucket.take(rate, start), Ok(()));
        assert_eq!(bucket.take(rate, start), Err(Duration::from_millis(250)));
        let later = start + Duration::from_millis(250);
        assert_eq!(bucket.take(rate, later), Ok(()));
        assert!(bucket.take(rate, later).is_err());
        let much_later = later + Duration::from_secs(100);
        assert_eq!(bucket.take(rate, much_later), Ok(()));
        assert_eq!(bucket.take(rate, much_later), Ok(()));
        assert!(bucket.take(rate, much_later).is_err());
    }

    #[test]
    fn an_earlier_instant_refills_nothing_and_is_not_counted_again() {
        let rate = Rate {
            per_second: 1.0,
            burst: 1.0,
        };
        let start = Instant::now();
        let mut bucket = TokenBucket::full(rate, start + Duration::from_secs(1));
        assert_eq!(bucket.take(rate, start), Ok(()));
        assert!(bucket.take(rate, start).is_err());
        // One second after the bucket's own clock, not after the earlier `start`.
        assert!(bucket.take(rate, start + Duration::from_secs(1)).is_err());
        assert_eq!(bucket.take(rate, start + Duration::from_secs(2)), Ok(()));
    }

    #[test]
    fn a_zero_rate_never_refills() {
        let rate = Rate {
            per_second: 0.0,
            burst: 1.0,
        };
        let start = Instant::now();
        let mut bucket = TokenBucket::full(rate, start);
        assert_eq!(bucket.take(rate, start), Ok(()));
        assert_eq!(
            bucket.take(rate, start + Duration::from_secs(3600)),
            Err(Duration::MAX)
        );
    }
}
