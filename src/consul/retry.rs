//! Backoff after failed Consul requests, shared by every loop that asks Consul.

use std::time::Duration;

use rand::Rng;

/// Backoff after failed requests: doubling from the base up to the cap, with ±50% jitter. The
/// cap keeps recovery "within seconds" of Consul's return.
pub(super) const BACKOFF_BASE: Duration = Duration::from_millis(200);
pub(super) const BACKOFF_CAP: Duration = Duration::from_secs(3);

pub(super) fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << failures.min(10));
    let capped = exp.min(BACKOFF_CAP);
    capped.mul_f64(rand::rng().random_range(0.5..1.5))
}
