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

const MAX_NETWORKS: usize = 100_000;
const IDLE_FORGET: Duration = Duration::from_secs(60);
const RATE: u32 = 100;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(rate: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: rate,
            last: now,
        }
    }

    fn take(&mut self, rate: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

trait Limiter {
    fn allow(&self, client: IpAddr, now: Instant) -> bool;
}

impl Limiter for RateLimiter {
    fn allow(&self, client: IpAddr, now: Instant) -> bool {
        RateLimiter::allow(self, client, now)
    }
}

/// A plain map per shard (foldhash), each bounded to its share; a full shard first forgets
/// buckets idle past `IDLE_FORGET`, then the least recently seen quarter.
struct Sharded {
    shards: Vec<Mutex<HashMap<u128, Bucket, foldhash::fast::RandomState>>>,
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
        let rate = f64::from(RATE);
        let shard = &self.shards[self.hasher.hash_one(key) as usize % SHARDS];
        let mut map = match shard.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(b) = map.get_mut(&key) {
            return b.take(rate, now);
        }
        if map.len() >= MAX_NETWORKS / SHARDS {
            map.retain(|_, b| now.saturating_duration_since(b.last) < IDLE_FORGET);
            if map.len() >= MAX_NETWORKS / SHARDS {
                let mut seen: Vec<Instant> = map.values().map(|b| b.last).collect();
                let quarter = seen.len() / 4;
                let (_, cutoff, _) = seen.select_nth_unstable(quarter);
                let cutoff = *cutoff;
                map.retain(|_, b| b.last > cutoff);
            }
        }
        let mut b = Bucket::full(rate, now);
        let allowed = b.take(rate, now);
        map.insert(key, b);
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
