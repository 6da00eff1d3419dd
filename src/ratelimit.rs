//! Per-client-network response rate limiting for UDP (`server.rate_limit`): a token bucket per
//! /24 (IPv4) or /56 (IPv6). Over the limit, a query gets an empty TC=1 reply: a real client
//! retries over TCP and is answered, while a spoofed source (the victim of an amplification
//! attack) gets nothing bigger than its own query. A query whose reply would be an error
//! (REFUSED to a client outside `server.allow`, FORMERR, ...) is dropped instead: TCP would give
//! a real client the same error, so TC=1 helps nobody but a reflection attack (see
//! `Handler::handle_miss`). `network_key` also keys the per-network TCP connection cap.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;

/// Client networks remembered at once; the least recently seen are forgotten first.
const MAX_TRACKED_NETWORKS: u64 = 100_000;

/// A network not seen for this long starts again with a full bucket.
const IDLE_FORGET: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

pub struct RateLimiter {
    /// Responses per second, also the burst.
    rate: u32,
    exempt: Vec<IpNet>,
    buckets: moka::sync::Cache<u128, Arc<Mutex<Bucket>>>,
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
            buckets: moka::sync::Cache::builder()
                .max_capacity(MAX_TRACKED_NETWORKS)
                .time_to_idle(IDLE_FORGET)
                .build(),
        })
    }

    /// May `client` be answered now? Takes a token when it may.
    pub fn allow(&self, client: IpAddr, now: Instant) -> bool {
        if self.exempt.iter().any(|n| n.contains(&client)) {
            return true;
        }
        let rate = f64::from(self.rate);
        let bucket = self.buckets.get_with(network_key(client), || {
            Arc::new(Mutex::new(Bucket {
                tokens: rate,
                last: now,
            }))
        });
        let mut b = match bucket.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(rate);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
