//! Per-client-network response rate limiting for UDP (`server.rate_limit`): a token bucket per
//! /24 (IPv4) or /56 (IPv6). Over the limit, a query gets an empty TC=1 reply: a real client
//! retries over TCP and is answered, while a spoofed source (the victim of an amplification
//! attack) gets nothing bigger than its own query. A query whose reply would be an error
//! (REFUSED to a client outside `server.allow`, FORMERR, ...) is dropped instead: TCP would give
//! a real client the same error, so TC=1 helps nobody but a reflection attack (see
//! `Handler::handle_miss`). `network_key` also keys the per-network TCP connection cap.
//!
//! The buckets live in quick_cache (already the answer cache's map), by value, each updated in
//! place under its shard's lock. Per `allow` call (`benches/rate_limit.rs`, release): 111 ns for
//! a known network and 1.4 µs for a new one past the bound, against moka's 573 ns and 10.4 µs
//! (a bucket behind a mutex per entry). A plain sharded map did 69 ns and 0.7 µs, but would make
//! us own its eviction. moka's time-to-idle bought nothing a client can see: a bucket idle for a
//! second is full again, exactly like a new one.

use std::net::IpAddr;
use std::time::Instant;

use ipnet::IpNet;
use quick_cache::sync::{EntryAction, EntryResult};

use crate::token_bucket::{Rate, TokenBucket};

/// Client networks remembered at once. Beyond it quick_cache's S3-FIFO forgets first the
/// networks seen only once (a spoofed flood's sources) and keeps those that keep coming back.
/// A forgotten network that comes back idle is served as it would have been: its bucket would
/// have refilled.
const MAX_TRACKED_NETWORKS: usize = 100_000;

pub struct RateLimiter {
    /// Responses per second, also the burst.
    rate: u32,
    exempt: Vec<IpNet>,
    buckets: quick_cache::sync::Cache<u128, TokenBucket>,
}

/// The key of a client's network: the /24 of an IPv4 address, the /56 of an IPv6 one.
pub fn network_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => (1u128 << 64) | u128::from(u32::from(v4) & 0xffff_ff00),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => network_key(IpAddr::V4(v4)),
            None => u128::from(v6) & !((1u128 << 72) - 1),
        },
    }
}

impl RateLimiter {
    /// `None` when `rate` is 0 (off).
    pub fn new(rate: u32, exempt: Vec<IpNet>) -> Option<RateLimiter> {
        (rate > 0).then(|| RateLimiter {
            rate,
            exempt,
            buckets: quick_cache::sync::Cache::new(MAX_TRACKED_NETWORKS),
        })
    }

    /// May `client` be answered now? Takes a token when it may.
    pub fn allow(&self, client: IpAddr, now: Instant) -> bool {
        if self.exempt.iter().any(|n| n.contains(&client)) {
            return true;
        }
        // Responses per second, and as many at once.
        let rate = Rate {
            per_second: f64::from(self.rate),
            burst: f64::from(self.rate),
        };
        let key = network_key(client);
        match self.buckets.entry(&key, None, |_, b| {
            EntryAction::Retain(b.take(rate, now).is_ok())
        }) {
            EntryResult::Retained(allowed) => allowed,
            EntryResult::Vacant(slot) => {
                let mut b = TokenBucket::full(rate, now);
                let allowed = b.take(rate, now).is_ok();
                // Refused only if the placeholder was removed meanwhile, which nothing here does.
                let _ = slot.insert(b);
                allowed
            }
            // The callback always retains and there is no timeout: never returned.
            EntryResult::Removed(..) | EntryResult::Replaced(..) | EntryResult::Timeout => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn networks_are_slash24_and_slash56() {
        assert_eq!(network_key(ip("192.0.2.1")), network_key(ip("192.0.2.254")));
        assert_ne!(network_key(ip("192.0.2.1")), network_key(ip("192.0.3.1")));
        assert_eq!(
            network_key(ip("2001:db8:0:ff::1")),
            network_key(ip("2001:db8:0:ff:1::2"))
        );
        assert_ne!(
            network_key(ip("2001:db8:0:100::1")),
            network_key(ip("2001:db8:0:ff::1"))
        );
        assert_eq!(
            network_key(ip("::ffff:192.0.2.9")),
            network_key(ip("192.0.2.1"))
        );
    }

    #[test]
    fn bucket_allows_rate_then_refills() {
        let l = RateLimiter::new(10, vec!["127.0.0.0/8".parse().expect("net")]).expect("on");
        let t0 = Instant::now();
        let allowed = (0..30).filter(|_| l.allow(ip("192.0.2.1"), t0)).count();
        assert_eq!(allowed, 10, "a burst of `rate`");
        assert!(!l.allow(ip("192.0.2.77"), t0), "same /24 shares the bucket");
        assert!(l.allow(ip("192.0.3.1"), t0), "another network has its own");
        assert!(
            l.allow(ip("192.0.2.1"), t0 + Duration::from_millis(150)),
            "refills at `rate` per second"
        );
        assert!((0..1000).all(|_| l.allow(ip("127.0.0.1"), t0)), "exempt");
        assert!(RateLimiter::new(0, vec![]).is_none());
    }

    #[test]
    fn buckets_stay_bounded_and_new_networks_start_full() {
        let l = RateLimiter::new(2, vec![]).expect("on");
        let t0 = Instant::now();
        for n in 0..(2 * MAX_TRACKED_NETWORKS as u32) {
            let client = IpAddr::V4(std::net::Ipv4Addr::from(n << 8));
            assert!(l.allow(client, t0), "a new network has its burst");
        }
        assert!(
            l.buckets.len() <= MAX_TRACKED_NETWORKS,
            "{}",
            l.buckets.len()
        );
        let busy = ip("198.51.100.1");
        assert!(l.allow(busy, t0) && l.allow(busy, t0));
        assert!(!l.allow(busy, t0), "empty after the burst");
    }
}
