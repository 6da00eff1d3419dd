//! The answer cache's TTL policy for the benchmarks that build a cache (`hot_path`,
//! `cache_memory`): no floor, a one-day cap, five minutes for negative answers, an hour of stale
//! serving. Include with `#[path = "support/policy.rs"] mod policy;`.

use std::time::Duration;

use consul_dns_forwarder::cache::TtlPolicy;

pub fn policy() -> TtlPolicy {
    TtlPolicy {
        min_ttl: Duration::ZERO,
        max_ttl: Duration::from_secs(86_400),
        negative_ttl: Duration::from_secs(300),
        negative_min_ttl: Duration::ZERO,
        stale_for: Duration::from_secs(3600),
    }
}
