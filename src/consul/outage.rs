//! One log line when Consul becomes unreachable, one when it is back: not one per query or per
//! watcher. Also the inventory's signal that its lists may be out of date.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use super::client::ClientError;
use crate::lock::lock;

/// One log line when Consul becomes unreachable, one when it is back: not one per query or
/// per watcher.
#[derive(Default)]
pub(crate) struct OutageLog {
    pub(super) down: AtomicBool,
    pub(super) since: Mutex<Option<Instant>>,
}

impl OutageLog {
    pub(crate) fn failed(&self, error: &ClientError) {
        if !self.down.swap(true, Ordering::SeqCst) {
            *lock(&self.since) = Some(Instant::now());
            tracing::warn!(error = %error, "Consul unreachable: serving the last known views until it is back");
        }
    }

    /// Is Consul known to be unreachable right now?
    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    pub(crate) fn ok(&self) {
        if self.down.swap(false, Ordering::SeqCst) {
            let took = lock(&self.since)
                .take()
                .map(|t| t.elapsed())
                .unwrap_or_default();
            tracing::info!(outage_s = took.as_secs_f64(), "Consul reachable again");
        }
    }
}
