//! The watcher of one service view: a loop of blocking queries on `/v1/health/service/<name>`
//! (or `/connect/`, `/ingress/`, with the view's `dc`, `peer`, `ns`, `partition`)
//! (Consul's rules: index resets, a token bucket, backoff with jitter), or refreshes on demand
//! when no blocking slot of the connection budget is free. Each result replaces the view whole.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::addrs::WanTranslation;
use super::catalog::{HealthEntry, ServiceView};
use super::client::{next_index, ClientError, ConsulClient};
use super::freshness::Vouching;
use super::name::ViewKey;
use super::outage::OutageLog;
use super::retry::{backoff, BACKOFF_CAP};
use super::views::{ServiceSeries, ViewState, Watch, WatchMap};
use crate::config::ConsulConfig;
use crate::lock::lock;
use crate::metrics::Metrics;
use crate::token_bucket::{Rate, TokenBucket};

/// Token bucket of a watcher's loop (Consul's advice for blocking queries): a burst of two
/// requests, then one per 250 ms while the service keeps changing. Bounds our load on Consul
/// under churn while a single change still shows within one round trip.
const WATCH_RATE: Rate = Rate {
    per_second: 4.0,
    burst: 2.0,
};

/// A watcher without a blocking slot (the connection budget is spent) looks for a free one
/// this often; meanwhile its view is refreshed on demand.
pub(super) const SLOT_RETRY: Duration = Duration::from_secs(5);

/// Settings the watchers use, copied out of the config.
#[derive(Clone, Debug)]
pub(super) struct Settings {
    pub(super) watch_wait: Duration,
    pub(super) watch_idle: Duration,
    pub(super) stale_for: Duration,
    pub(super) only_passing: bool,
    pub(super) node_ttl: Duration,
    pub(super) default_service_ttl: Duration,
    /// The bounds on the word of the feeds and catalog lists for a view without a blocking
    /// query (`freshness::Vouching`).
    pub(super) vouching: Vouching,
    pub(super) config: Arc<ConsulConfig>,
}

impl Settings {
    pub(super) fn service_ttl(&self, service: &str) -> Duration {
        self.config.service_ttl_for(service)
    }
}

/// What every watcher shares, behind one `Arc`: a watcher's task holds its fields for as long
/// as the service is watched (tens of thousands of them at scale), so they cost one pointer.
pub(super) struct WatcherContext {
    pub(super) client: Arc<ConsulClient>,
    pub(super) settings: Settings,
    pub(super) watches: WatchMap,
    pub(super) outage: Arc<OutageLog>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) series: Arc<ServiceSeries>,
    pub(super) shutdown: CancellationToken,
    /// The agent's datacenter, once known: views of other ones get WAN addresses with
    /// `consul.translate_wan_addrs`.
    pub(super) datacenter: Arc<Mutex<Option<String>>>,
}

pub(super) struct Watcher {
    pub(super) key: ViewKey,
    pub(super) watch: Arc<Watch>,
    pub(super) cx: Arc<WatcherContext>,
    pub(super) failovers: watch::Receiver<u64>,
}

/// What a watcher does next, once its turn has come.
enum Turn {
    /// Shutting down, or idle: the watcher ends.
    Stop,
    /// Nothing to ask yet: go round the loop again (idleness and the bucket are checked anew).
    Again,
    /// Ask Consul: a blocking query when it holds a blocking slot, else one fetch.
    Ask(Option<OwnedSemaphorePermit>),
}

/// The view `entries` make (addresses translated by `wan`), installed in `watch` unless it holds
/// the same data already; the per-service series and the change counter follow.
pub(super) fn install_entries(
    watch: &Watch,
    key: &ViewKey,
    entries: &[HealthEntry],
    series: &ServiceSeries,
    metrics: &Metrics,
    only_passing: bool,
    wan: WanTranslation<'_>,
) {
    let dc = entries
        .first()
        .map(|e| e.node.datacenter.to_ascii_lowercase())
        .filter(|d| !d.is_empty())
        .or_else(|| key.dc.clone())
        .unwrap_or_default();
    let view = ServiceView::from_entries_translated(entries, &dc, wan);
    let (changed, was_ready) = match &*watch.state.borrow() {
        ViewState::Ready(old) => (!old.same_data(&view), true),
        _ => (true, false),
    };
    if !changed {
        // The view served (perhaps one the change feed patched) is what Consul says now.
        if let ViewState::Ready(current) = &*watch.state.borrow() {
            *lock(&watch.fetched_view) = Arc::downgrade(current);
        }
        return;
    }
    series.set(
        &key.service,
        key.is_plain_local(),
        watch,
        view.healthy_count(only_passing),
    );
    if was_ready {
        metrics.consul_health_changes.inc();
    }
    let view = Arc::new(view);
    *lock(&watch.fetched_view) = Arc::downgrade(&view);
    watch.state.send_replace(ViewState::Ready(view));
}

impl Watcher {
    pub(super) async fn run(mut self) {
        let mut index: u64 = 0;
        let mut failures: u32 = 0;
        let mut bucket = TokenBucket::full(WATCH_RATE, Instant::now());
        loop {
            if self
                .watch
                .last_asked
                .load()
                .map_or(Duration::ZERO, |at| at.elapsed())
                > self.cx.settings.watch_idle
            {
                break;
            }
            if let Err(wait) = bucket.take(WATCH_RATE, Instant::now()) {
                tokio::select! {
                    _ = self.cx.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
            let slot = match self.wait_for_turn(index).await {
                Turn::Stop => break,
                Turn::Again => continue,
                Turn::Ask(slot) => slot,
            };
            // A block, so that the request's result and basis are not kept in the task (every
            // watcher's, 10,000 at scale) through the pause and the waits after it.
            let pause = {
                let blocking = slot.as_ref().map(|_| (index, self.cx.settings.watch_wait));
                // Read before the request leaves: what the feeds and catalog said by then is in it.
                let basis = self.watch.freshness.basis();
                // Boxed: the request's state machine is most of a watcher's size, and only the
                // watchers with a request in flight need it. So are its path and parameters,
                // and the blocking slot it holds (given back when the request ends or is
                // dropped).
                let (key, client) = (&self.key, &self.cx.client);
                let request = Box::pin(async move {
                    let _slot = slot;
                    let (endpoint, segments) = key.endpoint();
                    let params = key.params();
                    client
                        .get::<Vec<HealthEntry>>(endpoint, &segments, &params, blocking)
                        .await
                });
                self.failovers.borrow_and_update();
                let result = tokio::select! {
                    _ = self.cx.shutdown.cancelled() => break,
                    _ = self.failovers.changed() => {
                        // The agent was replaced: ask the new one now, without backoff.
                        index = 0;
                        continue;
                    }
                    r = request => r,
                };
                match result {
                    Ok(r) => {
                        self.cx.outage.ok();
                        failures = 0;
                        self.watch.last_confirmed.store(Instant::now());
                        let local_dc = lock(&self.cx.datacenter).clone();
                        install_entries(
                            &self.watch,
                            &self.key,
                            &r.value.unwrap_or_default(),
                            &self.cx.series,
                            &self.cx.metrics,
                            self.cx.settings.only_passing,
                            WanTranslation {
                                enabled: self.cx.settings.config.translate_wan_addrs,
                                local_dc: local_dc.as_deref(),
                            },
                        );
                        self.watch.freshness.settle(basis, r.index);
                        index = next_index(index, r.index);
                        // Before `fetched` wakes anyone: `HttpBackend::after_catalog_change`
                        // compares the catalog lists' indexes with it.
                        self.watch.index.store(r.index, Ordering::SeqCst);
                        self.watch.fetched.notify_waiters();
                        continue;
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        index = 0;
                        let pause = self.failed(&e, failures);
                        self.watch.fetched.notify_waiters();
                        pause
                    }
                }
            };
            tokio::select! {
                _ = self.cx.shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        self.forget();
    }

    /// Waits until the watcher should ask Consul. A blocking query needs a slot of the
    /// connection budget; without one the view is refreshed on demand: when a query finds it
    /// older than its TTL, or when the change feed saw one of its checks change. Blocking slots
    /// go to services asked more than once: a name asked once (a cold start asks thousands)
    /// keeps no connection; the next query makes it a watch.
    async fn wait_for_turn(&self, index: u64) -> Turn {
        if index == 0 {
            // The first fetch, or after a reset: at once, without a slot.
            self.watch.on_demand.store(false, Ordering::SeqCst);
            return Turn::Ask(None);
        }
        let w = &self.watch;
        let mut refresh = false;
        if !w.asked_again.load(Ordering::SeqCst) {
            w.on_demand.store(true, Ordering::SeqCst);
            tokio::select! {
                _ = self.cx.shutdown.cancelled() => return Turn::Stop,
                _ = w.demand.notified() => w.asked_again.store(true, Ordering::SeqCst),
                // A health change is not a query: the service stays without a watch.
                _ = w.changed.notified() => refresh = true,
                _ = tokio::time::sleep(SLOT_RETRY) => return Turn::Again,
            }
        }
        let slot = if refresh {
            None
        } else {
            self.cx.client.try_blocking_slot()
        };
        if slot.is_none() && !refresh {
            w.on_demand.store(true, Ordering::SeqCst);
            tokio::select! {
                _ = self.cx.shutdown.cancelled() => return Turn::Stop,
                _ = w.demand.notified() => {}
                _ = w.changed.notified() => {}
                // Look again for a free slot (and for idleness) now and then.
                _ = tokio::time::sleep(SLOT_RETRY) => return Turn::Again,
            }
        }
        w.on_demand.store(slot.is_none(), Ordering::SeqCst);
        Turn::Ask(slot)
    }

    /// Records a failed request in the view and the outage log; returns the pause before the
    /// next one.
    fn failed(&self, e: &ClientError, failures: u32) -> Duration {
        if matches!(e, ClientError::NoSuchDatacenter) {
            self.cx.outage.ok();
            self.watch.state.send_replace(ViewState::NoDatacenter);
            return self.cx.settings.default_service_ttl.max(BACKOFF_CAP);
        }
        self.cx.outage.failed(e);
        if matches!(
            &*self.watch.state.borrow(),
            ViewState::Pending | ViewState::Failed(_)
        ) {
            self.watch
                .state
                .send_replace(ViewState::Failed(e.to_string()));
        }
        backoff(failures)
    }

    /// Removes this watcher's entry (unless a newer watcher replaced it) and its series, and
    /// retires its watch: answers encoded from its view stop being served.
    fn forget(&self) {
        self.watch.retired.store(true, Ordering::SeqCst);
        let mut watches = lock(&self.cx.watches);
        if watches
            .get(&self.key)
            .is_some_and(|w| Arc::ptr_eq(w, &self.watch))
        {
            watches.remove(&self.key);
            self.cx.metrics.consul_watchers.dec();
            self.cx.series.remove(&self.key.service, &self.watch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::views::tests::test_metrics;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn a_result_replaces_the_view_only_when_its_data_changed() {
        let metrics = test_metrics();
        let series = ServiceSeries {
            metrics: metrics.clone(),
            created: AtomicUsize::new(0),
        };
        let w = Watch::new();
        let key = ViewKey::new("web".into(), None, Default::default(), Default::default());
        let entries = |status: &str| -> Vec<HealthEntry> {
            serde_json::from_str(&format!(
                r#"[{{"Node": {{"Node": "n1", "Address": "10.0.0.1", "Datacenter": "DC1"}},
                     "Service": {{"ID": "web-1", "Service": "web", "Port": 80}},
                     "Checks": [{{"CheckID": "service:web-1", "Status": "{status}", "ServiceID": "web-1"}}]}}]"#
            ))
            .expect("entries")
        };
        let install = |entries: &[HealthEntry]| {
            install_entries(
                &w,
                &key,
                entries,
                &series,
                &metrics,
                false,
                Default::default(),
            )
        };
        install(&entries("passing"));
        let first = match &*w.state.borrow() {
            ViewState::Ready(v) => v.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(first.datacenter, "dc1");
        assert_eq!(
            metrics.consul_health_changes.get(),
            0,
            "the first view is no change"
        );
        // The same data again: the view (and its Arc) stays.
        install(&entries("passing"));
        assert!(matches!(&*w.state.borrow(), ViewState::Ready(v) if Arc::ptr_eq(v, &first)));
        // A health change: replaced, counted, and the series follows.
        install(&entries("critical"));
        assert_eq!(metrics.consul_health_changes.get(), 1);
        assert_eq!(
            metrics
                .consul_healthy_instances
                .with_label_values(&["web"])
                .get(),
            0
        );
    }
}
