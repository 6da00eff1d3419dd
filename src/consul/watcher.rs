//! The watcher of one service view: a loop of blocking queries on `/v1/health/service/<name>`
//! (Consul's rules: index resets, a token bucket, backoff with jitter), or refreshes on demand
//! when no blocking slot of the connection budget is free. Each result replaces the view whole.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::catalog::{HealthEntry, ServiceView};
use super::client::{ClientError, ConsulClient};
use super::outage::OutageLog;
use super::retry::{backoff, BACKOFF_CAP};
use super::views::{ServiceSeries, ViewState, Watch, WatchMap};
use crate::config::ConsulConfig;
use crate::lock::lock;
use crate::metrics::Metrics;

/// Token bucket of a watcher's loop (Consul's advice for blocking queries): a burst of two
/// requests, then one per interval while the service keeps changing. Bounds our load on Consul
/// under churn while a single change still shows within one round trip.
pub(super) const WATCH_BURST: u32 = 2;
pub(super) const WATCH_REFILL: Duration = Duration::from_millis(250);

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
    pub(super) config: Arc<ConsulConfig>,
}

impl Settings {
    pub(super) fn service_ttl(&self, service: &str) -> Duration {
        self.config.service_ttl_for(service)
    }
}

/// What every watcher shares, behind one `Arc`: a watcher's task holds its fields for as long
/// as the service is watched (10,000 of them in issue 8's target), so they cost one pointer.
pub(super) struct WatcherContext {
    pub(super) client: Arc<ConsulClient>,
    pub(super) settings: Settings,
    pub(super) watches: WatchMap,
    pub(super) outage: Arc<OutageLog>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) series: Arc<ServiceSeries>,
    pub(super) shutdown: CancellationToken,
}

pub(super) struct Watcher {
    pub(super) key: (String, Option<String>),
    pub(super) watch: Arc<Watch>,
    pub(super) cx: Arc<WatcherContext>,
    pub(super) failovers: watch::Receiver<u64>,
}

impl Watcher {
    pub(super) async fn run(mut self) {
        let segments = ["v1", "health", "service", self.key.0.as_str()];
        let mut index: u64 = 0;
        let mut failures: u32 = 0;
        let mut tokens = WATCH_BURST;
        let mut refilled = Instant::now();
        let mut params = Vec::new();
        if let Some(dc) = &self.key.1 {
            params.push(("dc", dc.clone()));
        }
        loop {
            if lock(&self.watch.last_asked).elapsed() > self.cx.settings.watch_idle {
                break;
            }
            // Token bucket.
            let refill = (refilled.elapsed().as_millis() / WATCH_REFILL.as_millis().max(1)) as u32;
            if refill > 0 {
                tokens = (tokens + refill).min(WATCH_BURST);
                refilled = Instant::now();
            }
            if tokens == 0 {
                let wait = WATCH_REFILL.saturating_sub(refilled.elapsed());
                tokio::select! {
                    _ = self.cx.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
            tokens -= 1;
            // A blocking query needs a slot of the connection budget. Without one the view is
            // refreshed on demand: when a query finds it older than its TTL, or when the change
            // feed saw one of its checks change.
            // Blocking slots go to services asked more than once: a name asked once (a cold
            // start asks thousands) keeps no connection; the next query makes it a watch.
            let mut refresh = false;
            if index > 0 && !self.watch.asked_again.load(Ordering::SeqCst) {
                self.watch.on_demand.store(true, Ordering::SeqCst);
                tokio::select! {
                    _ = self.cx.shutdown.cancelled() => break,
                    _ = self.watch.demand.notified() => {
                        self.watch.asked_again.store(true, Ordering::SeqCst);
                    }
                    // A health change is not a query: the service stays without a watch.
                    _ = self.watch.changed.notified() => refresh = true,
                    _ = tokio::time::sleep(SLOT_RETRY) => continue,
                }
            }
            let slot = if index > 0 && !refresh {
                self.cx.client.try_blocking_slot()
            } else {
                None
            };
            if index > 0 && slot.is_none() && !refresh {
                self.watch.on_demand.store(true, Ordering::SeqCst);
                tokio::select! {
                    _ = self.cx.shutdown.cancelled() => break,
                    _ = self.watch.demand.notified() => {}
                    _ = self.watch.changed.notified() => {}
                    // Look again for a free slot (and for idleness) now and then.
                    _ = tokio::time::sleep(SLOT_RETRY) => continue,
                }
            }
            self.watch
                .on_demand
                .store(slot.is_none() && index > 0, Ordering::SeqCst);
            let blocking = slot.as_ref().map(|_| (index, self.cx.settings.watch_wait));
            // Boxed: the request's state machine is most of a watcher's size, and only the
            // watchers with a request in flight need it (10,000 idle watchers carried ~1.7 KiB
            // each of it; issue 8's memory target).
            let request = Box::pin(self.cx.client.get::<Vec<HealthEntry>>(
                "health_service",
                &segments,
                &params,
                blocking,
            ));
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
            drop(slot);
            match result {
                Ok(r) => {
                    self.cx.outage.ok();
                    failures = 0;
                    *lock(&self.watch.last_confirmed) = Some(Instant::now());
                    let entries = r.value.unwrap_or_default();
                    // Consul's rules: an index going backwards resets; below 1 is treated as 1.
                    let new_index = if r.index < index { 0 } else { r.index.max(1) };
                    let dc = entries
                        .first()
                        .map(|e| e.node.datacenter.to_ascii_lowercase())
                        .filter(|d| !d.is_empty())
                        .or_else(|| self.key.1.clone())
                        .unwrap_or_default();
                    let view = ServiceView::from_entries(&entries, &dc);
                    let changed = match &*self.watch.state.borrow() {
                        ViewState::Ready(old) => !old.same_data(&view),
                        _ => true,
                    };
                    if changed {
                        self.cx.series.set(
                            &self.key.0,
                            self.key.1.is_none(),
                            &self.watch,
                            view.healthy_count(self.cx.settings.only_passing),
                        );
                        if matches!(&*self.watch.state.borrow(), ViewState::Ready(..)) {
                            self.cx.metrics.consul_health_changes.inc();
                        }
                        self.watch
                            .state
                            .send_replace(ViewState::Ready(Arc::new(view)));
                    }
                    index = new_index;
                }
                Err(ClientError::NoSuchDatacenter) => {
                    self.cx.outage.ok();
                    self.watch.state.send_replace(ViewState::NoDatacenter);
                    failures = failures.saturating_add(1);
                    index = 0;
                    tokio::select! {
                        _ = self.cx.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(self.cx.settings.default_service_ttl.max(BACKOFF_CAP)) => {}
                    }
                }
                Err(e) => {
                    self.cx.outage.failed(&e);
                    failures = failures.saturating_add(1);
                    index = 0;
                    if matches!(
                        &*self.watch.state.borrow(),
                        ViewState::Pending | ViewState::Failed(_)
                    ) {
                        self.watch
                            .state
                            .send_replace(ViewState::Failed(e.to_string()));
                    }
                    tokio::select! {
                        _ = self.cx.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff(failures)) => {}
                    }
                }
            }
        }
        let mut watches = lock(&self.cx.watches);
        if watches
            .get(&self.key)
            .is_some_and(|w| Arc::ptr_eq(w, &self.watch))
        {
            watches.remove(&self.key);
            self.cx.metrics.consul_watchers.dec();
            self.cx.series.remove(&self.key.0, &self.watch);
        }
    }
}
