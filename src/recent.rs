//! Recent upstream exchanges, per server, for the status page: "how is this upstream doing
//! now", which totals since the start cannot say (a server that failed for an hour last week
//! and is fine now would still look bad, and a fresh outage would hide behind a good history).
//!
//! A fixed ring of the last [`RECENT_EXCHANGES`] attempts, of which only those in the last
//! [`RECENT_WINDOW`] count: the memory is bounded whatever the query rate, and a quiet server's
//! old figures fade instead of lingering.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::lock::lock;

/// Attempts remembered per upstream server (per forward zone it serves).
pub(crate) const RECENT_EXCHANGES: usize = 128;

/// Only attempts this recent count in the figures.
pub(crate) const RECENT_WINDOW: Duration = Duration::from_secs(60);

/// The upstream exchange an answer came from, kept with its cache entry for `explain`: a few
/// bytes, copied, no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Exchanged {
    pub(crate) server: SocketAddr,
    /// How long the server took, in microseconds (saturating at about 71 minutes).
    pub(crate) micros: u32,
}

impl Exchanged {
    pub(crate) fn new(server: SocketAddr, took: Duration) -> Exchanged {
        Exchanged {
            server,
            micros: u32::try_from(took.as_micros()).unwrap_or(u32::MAX),
        }
    }
}

/// One attempt at a server.
#[derive(Clone, Copy, Debug)]
struct Attempt {
    at: Instant,
    /// How long the server took to reply; none when it did not (timeout, I/O error).
    replied_in: Option<Duration>,
    /// No reply, or an rcode that moves on to the next server (SERVFAIL, REFUSED, ...).
    failed: bool,
}

/// The last attempts at one server, oldest overwritten first.
#[derive(Debug, Default)]
pub(crate) struct RecentExchanges(Mutex<Ring>);

#[derive(Debug)]
struct Ring {
    slots: [Option<Attempt>; RECENT_EXCHANGES],
    next: usize,
}

impl Default for Ring {
    fn default() -> Ring {
        Ring {
            slots: [None; RECENT_EXCHANGES],
            next: 0,
        }
    }
}

/// What the attempts within [`RECENT_WINDOW`] of `now` add up to.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct RecentFigures {
    pub(crate) attempts: usize,
    pub(crate) failures: usize,
    /// Over the attempts that got a reply.
    pub(crate) mean_latency: Option<Duration>,
    pub(crate) max_latency: Option<Duration>,
}

impl RecentExchanges {
    /// Records one attempt that ended at `at`.
    pub(crate) fn record(&self, at: Instant, replied_in: Option<Duration>, failed: bool) {
        let mut ring = lock(&self.0);
        let next = ring.next;
        ring.slots[next] = Some(Attempt {
            at,
            replied_in,
            failed: failed || replied_in.is_none(),
        });
        ring.next = (next + 1) % RECENT_EXCHANGES;
    }

    /// The figures of the attempts within [`RECENT_WINDOW`] before `now`.
    pub(crate) fn figures(&self, now: Instant) -> RecentFigures {
        let ring = lock(&self.0);
        let mut f = RecentFigures::default();
        let mut total = Duration::ZERO;
        let mut replies = 0u32;
        let recent = ring
            .slots
            .iter()
            .flatten()
            .filter(|a| now.saturating_duration_since(a.at) <= RECENT_WINDOW);
        for a in recent {
            f.attempts += 1;
            f.failures += usize::from(a.failed);
            if let Some(took) = a.replied_in {
                total += took;
                replies += 1;
                f.max_latency = f.max_latency.max(Some(took));
            }
        }
        f.mean_latency = (replies > 0).then(|| total / replies);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn figures_cover_only_the_window() {
        let recent = RecentExchanges::default();
        let start = Instant::now();
        // An old outage: three timeouts.
        for _ in 0..3 {
            recent.record(start, None, false);
        }
        assert_eq!(
            recent.figures(start),
            RecentFigures {
                attempts: 3,
                failures: 3,
                mean_latency: None,
                max_latency: None
            },
            "timeouts are failures without a latency"
        );
        let later = start + RECENT_WINDOW + Duration::from_secs(1);
        recent.record(later, Some(10 * MS), false);
        recent.record(later, Some(30 * MS), false);
        recent.record(later, Some(50 * MS), true);
        assert_eq!(
            recent.figures(later),
            RecentFigures {
                attempts: 3,
                failures: 1,
                mean_latency: Some(30 * MS),
                max_latency: Some(50 * MS)
            },
            "a minute on, the outage is forgotten"
        );
        assert_eq!(
            recent.figures(later + RECENT_WINDOW + MS),
            RecentFigures::default()
        );
    }

    #[test]
    fn the_ring_keeps_only_the_last_attempts() {
        let recent = RecentExchanges::default();
        let now = Instant::now();
        for _ in 0..RECENT_EXCHANGES {
            recent.record(now, None, true);
        }
        for _ in 0..10 {
            recent.record(now, Some(MS), false);
        }
        let f = recent.figures(now);
        assert_eq!(f.attempts, RECENT_EXCHANGES);
        assert_eq!(f.failures, RECENT_EXCHANGES - 10);
        assert_eq!(f.mean_latency, Some(MS));
    }
}
