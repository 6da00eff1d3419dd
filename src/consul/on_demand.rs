//! Answers fetched on demand (nodes, prepared queries), kept for their TTL, served stale up to
//! `consul.stale_for` when a refresh fails; concurrent misses share one fetch; bounded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};

use super::LookupError;
use crate::lock::lock;
use crate::metrics::Metrics;

/// Bound on remembered node and prepared-query answers (each map on its own); beyond it the
/// least recently fetched are forgotten (counted in `limit_drops_total{limit="on_demand"}`).
/// Only names the inventory found in Consul, or unchecked lookups within their budget, get an
/// entry, so this is a backstop: a catalog of more nodes than this, all asked, refetches some.
pub(crate) const MAX_ON_DEMAND: usize = 10_000;

pub(super) type SharedResult<V> = Shared<BoxFuture<'static, Result<V, LookupError>>>;

/// Values fetched on demand, kept `ttl` fresh, served stale up to `stale_for` when a refresh
/// fails; concurrent misses share one fetch.
pub(super) struct OnDemand<V: Clone + Send + Sync + 'static> {
    pub(super) entries: Mutex<HashMap<String, Entry<V>>>,
    /// `limit_drops_total{limit="on_demand"}`.
    pub(super) forgotten: prometheus::IntCounter,
}

pub(super) struct Entry<V: Clone> {
    pub(super) value: Option<(V, Instant)>,
    pub(super) inflight: Option<SharedResult<V>>,
}

impl<V: Clone + Send + Sync + 'static> OnDemand<V> {
    pub(super) fn new(metrics: &Metrics) -> Self {
        OnDemand {
            entries: Mutex::new(HashMap::new()),
            forgotten: metrics.limit_drops.with_label_values(&["on_demand"]),
        }
    }

    /// Is there a fetched answer for `key` (fresh or not)?
    pub(super) fn remembers(&self, key: &str) -> bool {
        lock(&self.entries)
            .get(key)
            .is_some_and(|entry| entry.value.is_some())
    }

    /// Keeps at most [`MAX_ON_DEMAND`] entries: past it, forgets the least recently fetched
    /// (never one with a fetch in flight) down to nine tenths of it, so the sort runs once per
    /// tenth of the bound, not per insert.
    pub(super) fn bound(
        entries: &mut HashMap<String, Entry<V>>,
        forgotten: &prometheus::IntCounter,
    ) {
        if entries.len() <= MAX_ON_DEMAND {
            return;
        }
        let mut idle: Vec<(Option<Instant>, String)> = entries
            .iter()
            .filter(|(_, s)| s.inflight.is_none())
            .map(|(k, s)| (s.value.as_ref().map(|(_, at)| *at), k.clone()))
            .collect();
        // Entries without a value (failed fetches) sort first, then the oldest.
        idle.sort_unstable();
        let excess = entries.len().saturating_sub(MAX_ON_DEMAND / 10 * 9);
        for (_, key) in idle.into_iter().take(excess) {
            entries.remove(&key);
            forgotten.inc();
        }
    }

    pub(super) async fn get(
        self: &Arc<Self>,
        key: String,
        ttl: impl Fn(&V) -> Duration,
        stale_for: Duration,
        fetch: impl FnOnce() -> BoxFuture<'static, Result<V, LookupError>>,
    ) -> Result<V, LookupError> {
        let (shared, previous) = {
            let mut entries = lock(&self.entries);
            let entry = entries.entry(key.clone()).or_insert(Entry {
                value: None,
                inflight: None,
            });
            if let Some((v, at)) = &entry.value {
                if at.elapsed() < ttl(v) {
                    return Ok(v.clone());
                }
            }
            let previous = entry.value.clone();
            let shared = match &entry.inflight {
                Some(s) => s.clone(),
                None => {
                    let this = self.clone();
                    let k = key.clone();
                    let fut = fetch();
                    let task = tokio::spawn(async move {
                        let r = fut.await;
                        let mut entries = lock(&this.entries);
                        if let Some(entry) = entries.get_mut(&k) {
                            entry.inflight = None;
                            if let Ok(v) = &r {
                                entry.value = Some((v.clone(), Instant::now()));
                            }
                        }
                        r
                    });
                    let s: SharedResult<V> = async move {
                        task.await.unwrap_or_else(|_| {
                            Err(LookupError::Unavailable("fetch task failed".into()))
                        })
                    }
                    .boxed()
                    .shared();
                    entry.inflight = Some(s.clone());
                    Self::bound(&mut entries, &self.forgotten);
                    s
                }
            };
            (shared, previous)
        };
        match shared.await {
            Ok(v) => Ok(v),
            Err(LookupError::Unavailable(e)) => match previous {
                Some((v, at)) if at.elapsed() < stale_for => Ok(v),
                _ => Err(LookupError::Unavailable(e)),
            },
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_metrics() -> Arc<Metrics> {
        Metrics::new(&prometheus::Registry::new()).expect("metrics")
    }

    #[test]
    fn remembered_answers_are_bounded_and_the_oldest_forgotten_first() {
        let metrics = test_metrics();
        let forgotten = metrics.limit_drops.with_label_values(&["on_demand"]);
        let start = Instant::now();
        let mut entries: HashMap<String, Entry<u32>> = HashMap::new();
        for i in 0..=MAX_ON_DEMAND {
            let at = start + Duration::from_millis(i as u64);
            entries.insert(
                format!("n{i}"),
                Entry {
                    value: Some((0, at)),
                    inflight: None,
                },
            );
        }
        // One failed fetch (no value) goes first.
        entries.insert(
            "failed".into(),
            Entry {
                value: None,
                inflight: None,
            },
        );
        OnDemand::bound(&mut entries, &forgotten);
        assert_eq!(entries.len(), MAX_ON_DEMAND / 10 * 9);
        assert_eq!(forgotten.get() as usize, MAX_ON_DEMAND + 2 - entries.len());
        assert!(!entries.contains_key("failed"));
        assert!(!entries.contains_key("n0"), "the oldest is forgotten");
        assert!(
            entries.contains_key(&format!("n{MAX_ON_DEMAND}")),
            "the newest is kept"
        );
        // Under the bound nothing is touched.
        let before = entries.len();
        OnDemand::bound(&mut entries, &forgotten);
        assert_eq!(entries.len(), before);
    }
}
