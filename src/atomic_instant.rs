//! An [`Instant`] that many threads read and write without a lock: the watch times that every
//! Consul answer checks (`Watch::last_confirmed`, `Watch::last_asked`). Behind a mutex they cost
//! two lock round trips per answer, on a lock that every core answering the same service shares.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long before the first use the origin lies: every instant the process took before it
/// stores exactly (the process is younger than this when it first stores one).
const ORIGIN_LEAD: Duration = Duration::from_secs(24 * 3600);

/// The instant every stored one is counted from: `ORIGIN_LEAD` before the first use.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(|| {
        let now = Instant::now();
        now.checked_sub(ORIGIN_LEAD).unwrap_or(now)
    })
}

/// An optional instant, kept as nanoseconds after [`origin`] plus one (0: none). `u64`
/// nanoseconds last 584 years. An instant from before the origin would be kept as the origin.
#[derive(Debug)]
pub(crate) struct AtomicInstant(AtomicU64);

impl Default for AtomicInstant {
    /// Holding no instant.
    fn default() -> Self {
        AtomicInstant::none()
    }
}

impl AtomicInstant {
    /// Holding no instant.
    pub(crate) fn none() -> AtomicInstant {
        AtomicInstant(AtomicU64::new(0))
    }

    /// Holding `at`.
    pub(crate) fn new(at: Instant) -> AtomicInstant {
        AtomicInstant(AtomicU64::new(encode(at)))
    }

    pub(crate) fn load(&self) -> Option<Instant> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            n => Some(origin() + Duration::from_nanos(n - 1)),
        }
    }

    pub(crate) fn store(&self, at: Instant) {
        self.0.store(encode(at), Ordering::Release);
    }

    pub(crate) fn clear(&self) {
        self.0.store(0, Ordering::Release);
    }

    /// Stores `at` unless the instant held is less than `granularity` older: a time read only
    /// at that resolution (when a watch went idle) then costs no write, so no cache-line
    /// transfer between the cores answering from the same watch.
    pub(crate) fn store_coarse(&self, at: Instant, granularity: Duration) {
        let held = self.0.load(Ordering::Relaxed);
        let new = encode(at);
        if held == 0 || new.saturating_sub(held) >= nanos(granularity) {
            self.0.store(new, Ordering::Release);
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn encode(at: Instant) -> u64 {
    nanos(at.saturating_duration_since(origin())).saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_what_was_stored_to_the_nanosecond() {
        let t = AtomicInstant::none();
        assert_eq!(t.load(), None);
        let now = Instant::now();
        t.store(now);
        assert_eq!(t.load(), Some(now));
        let later = now + Duration::from_millis(1500);
        t.store(later);
        assert_eq!(t.load(), Some(later));
        t.clear();
        assert_eq!(t.load(), None);
        assert_eq!(AtomicInstant::new(later).load(), Some(later));
    }

    #[test]
    fn a_coarse_store_writes_only_past_its_granularity() {
        let now = Instant::now();
        let t = AtomicInstant::new(now);
        t.store_coarse(now + Duration::from_millis(999), Duration::from_secs(1));
        assert_eq!(t.load(), Some(now), "within the granularity: kept");
        let later = now + Duration::from_secs(1);
        t.store_coarse(later, Duration::from_secs(1));
        assert_eq!(t.load(), Some(later));
        let none = AtomicInstant::none();
        none.store_coarse(now, Duration::from_secs(1));
        assert_eq!(none.load(), Some(now), "a first store always writes");
    }
}
