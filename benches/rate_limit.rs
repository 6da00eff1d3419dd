//! The cost of one `RateLimiter::allow` call, for the bucket maps it could be built on
//! (`cargo bench --bench rate_limit`).
//!
//! - `hit`: the same client network again and again (a busy client: one bucket found and updated).
//! - `new_networks`: every call from a network not seen before (a spoofed-source flood), past the
//!   100,000-network bound, so evictions are part of the cost.
//!
//! `shipped` is the limiter itself (quick_cache); `sharded_map` is the plain-map alternative, kept
//! so the choice can be checked again. Both keep the limiter's rules: a token bucket per network
//! (`network_key`), burst = rate, at most 100,000 networks. moka, which the limiter used before,
//! was measured by this bench at commit 022fcc9 (figures in ARCHITECTURE.md).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};

use consul_dns_forwarder::ratelimit::{network_key, RateLimiter};
use consul_dns_forwarder::token_bucket::{Rate, TokenBucket};

const MAX_NETWORKS: usize = 100_000;
const IDLE_FORGET: Duration = Duration::from_secs(60);
const RATE: u32 = 100;

/// The limiter's rule: burst = rate.
const BUCKET: Rate = Rate {
    per_second: RATE as f64,
    burst: RATE as f64,
};

trait Limiter {
    fn allow(&self, client: IpAddr, now: Instant) -> bool;
}

impl Limiter for RateLimiter {
    fn allow(&self, client: IpAddr, now: Instant) -> bool {
        RateLimiter::allow(self, client, now)
    }
}

/// A network's bucket and when it was last seen, by network key.
type Shard = HashMap<u128, (TokenBucket, Instant), foldhash::fast::RandomState>;

/// A plain map per shard (foldhash), each bounded to its share; a full shard first forgets
/// buckets idle past `IDLE_FORGET`, then the least recently seen quarter.
struct Sharded {
    shards: Vec<Mutex<Shard>>,
    /// Picks the shard, keyed per process so that clients cannot aim at one.
    hasher: foldhash::fast::RandomState,
}

const SHARDS: usize = 16;

impl Sharded {
    fn new() -> Sharded {
        Sharded {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(Default::default())))
                .collect(),
            hasher: Default::default(),
        }
    }
}

impl Limiter for Sharded {
    fn allow(&self, client: IpAddr, now: Instant) -> bool {
        let key = network_key(client);
        let shard = &self.shards[self.hasher.hash_one(key) as usize % SHARDS];
        let mut map = match shard.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some((b, seen)) = map.get_mut(&key) {
            *seen = now;
            return b.take(BUCKET, now).is_ok();
        }
        if map.len() >= MAX_NETWORKS / SHARDS {
            map.retain(|_, (_, seen)| now.saturating_duration_since(*seen) < IDLE_FORGET);
            if map.len() >= MAX_NETWORKS / SHARDS {
                let mut seen: Vec<Instant> = map.values().map(|(_, seen)| *seen).collect();
                let quarter = seen.len() / 4;
                let (_, cutoff, _) = seen.select_nth_unstable(quarter);
                let cutoff = *cutoff;
                map.retain(|_, (_, seen)| *seen > cutoff);
            }
        }
        let mut b = TokenBucket::full(BUCKET, now);
        let allowed = b.take(BUCKET, now).is_ok();
        map.insert(key, (b, now));
        allowed
    }
}

fn candidates() -> Vec<(&'static str, Box<dyn Limiter>)> {
    vec![
        (
            "shipped",
            Box::new(RateLimiter::new(RATE, vec![]).expect("on")) as Box<dyn Limiter>,
        ),
        ("sharded_map", Box::new(Sharded::new())),
    ]
}

fn bench_allow(c: &mut Criterion) {
    let mut g = c.benchmark_group("rate_limit");
    let start = Instant::now();
    for (label, limiter) in candidates() {
        let client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let mut tick = 0u64;
        g.bench_function(format!("hit/{label}"), |b| {
            b.iter(|| {
                // Time moves so the bucket refills and both outcomes stay in the mix.
                tick += 1;
                limiter.allow(black_box(client), start + Duration::from_micros(tick * 100))
            })
        });
        let mut network = 0u32;
        g.bench_function(format!("new_networks/{label}"), |b| {
            b.iter(|| {
                // A new /24 per call, cycling through 2^24 of them: far past the bound.
                network = network.wrapping_add(1) & 0x00ff_ffff;
                tick += 1;
                let client = IpAddr::V4(Ipv4Addr::from(network << 8));
                limiter.allow(black_box(client), start + Duration::from_micros(tick))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_allow);
criterion_main!(benches);
