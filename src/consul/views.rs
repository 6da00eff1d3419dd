//! The table of watched service views: one entry per asked view ([`ViewKey`]) with its
//! current view, what the watcher and the feeds need to coordinate, and its
//! `consul_healthy_instances` series (bounded).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::catalog::ServiceView;
use super::freshness::{Freshness, Vouching};
use super::name::ViewKey;
use super::StillServed;
use crate::atomic_instant::AtomicInstant;
use crate::metrics::Metrics;

/// Bound on `consul_healthy_instances{service}` series: one per watched service up to this
/// many (about 370 B each, and as many lines in every scrape of every host), none beyond it
/// (counted in `limit_drops_total{limit="service_series"}`).
pub(crate) const MAX_SERVICE_SERIES: usize = 1_000;

/// How precisely a watch remembers when it was last asked: it only matters against
/// `consul.watch_idle` (minutes), and a write per answer would move the watch's cache line
/// between every core answering the service.
const ASKED_GRANULARITY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub(super) enum ViewState {
    Pending,
    Ready(Arc<ServiceView>),
    NoDatacenter,
    Failed(String),
}

pub(super) struct Watch {
    pub(super) state: watch::Sender<ViewState>,
    /// Set while the watcher has no blocking query: queries then wake it through `demand`
    /// when the view is older than its TTL.
    pub(super) on_demand: AtomicBool,
    pub(super) demand: tokio::sync::Notify,
    /// The change feed saw a health change of this service that it could not patch in (a check
    /// the view does not know) while the watcher had no blocking query: refresh with one
    /// non-blocking fetch, without claiming a blocking slot.
    pub(super) changed: tokio::sync::Notify,
    /// A query came after the first fetch: the service is worth a blocking watch.
    pub(super) asked_again: AtomicBool,
    /// Read only to tell a watch gone idle (`consul.watch_idle`, minutes), so written at most
    /// once per `ASKED_GRANULARITY`.
    pub(super) last_asked: AtomicInstant,
    pub(super) last_confirmed: AtomicInstant,
    /// The catalog index of the view's scope (`/v1/catalog/services`, which moves with every
    /// registration and deregistration there) when the view was last known current; a higher
    /// one means instances may have come or gone since: see `HttpBackend::service`.
    pub(super) catalog_seen: AtomicU64,
    /// The same for the node list (`/v1/catalog/nodes`, which moves with every node change, an
    /// address among them).
    pub(super) nodes_seen: AtomicU64,
    /// Woken after each of the watcher's requests, whatever its outcome.
    pub(super) fetched: tokio::sync::Notify,
    /// This view's `consul_healthy_instances` series: see [`ServiceSeries`].
    pub(super) series: AtomicU8,
    /// `X-Consul-Index` of the response the view last came from (0: none yet), for `explain`,
    /// and to tell a catalog list's move the view's fetch already holds (`HttpBackend::service`).
    pub(super) index: AtomicU64,
    /// The view as the watcher's last fetch made (or confirmed) it: a different current view
    /// was patched by the change feed since (`explain` says which).
    pub(super) fetched_view: Mutex<Weak<ServiceView>>,
    /// Its watcher stopped (idle, or shutting down): nothing keeps this view fresh any more,
    /// and a later query starts a new watch. Never cleared.
    pub(super) retired: AtomicBool,
    /// Without a blocking query, whether the feeds and catalog lists vouch for the view.
    pub(super) freshness: Freshness,
}

/// [`Watch::series`]: not asked for yet, created, or refused at the bound.
pub(super) const SERIES_NONE: u8 = 0;
pub(super) const SERIES_CREATED: u8 = 1;
pub(super) const SERIES_REFUSED: u8 = 2;

/// The `consul_healthy_instances{service}` series, at most [`MAX_SERVICE_SERIES`] of them, for
/// local-datacenter views only (the label has no datacenter, and two views must not share one
/// series).
pub(super) struct ServiceSeries {
    pub(super) metrics: Arc<Metrics>,
    pub(super) created: AtomicUsize,
}

impl ServiceSeries {
    pub(super) fn set(&self, service: &str, local: bool, w: &Watch, healthy: usize) {
        if !local {
            return;
        }
        if w.series.load(Ordering::SeqCst) == SERIES_NONE {
            let reserved = self
                .created
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n < MAX_SERVICE_SERIES).then_some(n + 1)
                })
                .is_ok();
            if reserved {
                w.series.store(SERIES_CREATED, Ordering::SeqCst);
            } else {
                w.series.store(SERIES_REFUSED, Ordering::SeqCst);
                self.metrics
                    .limit_drops
                    .with_label_values(&["service_series"])
                    .inc();
            }
        }
        if w.series.load(Ordering::SeqCst) == SERIES_CREATED {
            self.metrics
                .consul_healthy_instances
                .with_label_values(&[service])
                .set(i64::try_from(healthy).unwrap_or(i64::MAX));
        }
    }

    pub(super) fn remove(&self, service: &str, w: &Watch) {
        if w.series.swap(SERIES_NONE, Ordering::SeqCst) == SERIES_CREATED {
            let _ = self
                .metrics
                .consul_healthy_instances
                .remove_label_values(&[service]);
            self.created.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Watch {
    /// A view nobody has fetched yet.
    pub(super) fn new() -> Watch {
        Watch {
            state: watch::channel(ViewState::Pending).0,
            on_demand: AtomicBool::new(false),
            demand: tokio::sync::Notify::new(),
            changed: tokio::sync::Notify::new(),
            asked_again: AtomicBool::new(false),
            last_asked: AtomicInstant::new(Instant::now()),
            last_confirmed: AtomicInstant::none(),
            catalog_seen: AtomicU64::new(0),
            nodes_seen: AtomicU64::new(0),
            fetched: tokio::sync::Notify::new(),
            series: AtomicU8::new(SERIES_NONE),
            index: AtomicU64::new(0),
            fetched_view: Mutex::new(Weak::new()),
            retired: AtomicBool::new(false),
            freshness: Freshness::default(),
        }
    }

    pub(super) fn touch(&self) {
        self.last_asked
            .store_coarse(Instant::now(), ASKED_GRANULARITY);
    }
}

/// The check behind `HttpBackend::serving`: one view of one watch, served while the watch has
/// a running watcher, the same view (the state channel's version unchanged since the view was
/// seen in it), and either a blocking query of its own with a confirmation within `stale_for`,
/// or the feeds' and catalog lists' word that it is current (`freshness`).
pub(super) struct ServedView {
    watch: Arc<Watch>,
    /// Subscribed when `view` was the state: any later state (a new view, a patch, a failure
    /// with no view) changes the version.
    seen: watch::Receiver<ViewState>,
    stale_for: Duration,
    /// The bounds on the feeds' word.
    vouching: Vouching,
}

impl ServedView {
    /// `None` unless `view` is `watch`'s state now.
    pub(super) fn new(
        watch: Arc<Watch>,
        view: &Arc<ServiceView>,
        stale_for: Duration,
        vouching: Vouching,
    ) -> Option<ServedView> {
        // Subscribed before the state is read: a state sent in between changes the version.
        let seen = watch.state.subscribe();
        let same = matches!(&*seen.borrow(), ViewState::Ready(v) if Arc::ptr_eq(v, view));
        same.then_some(ServedView {
            watch,
            seen,
            stale_for,
            vouching,
        })
    }
}

impl StillServed for ServedView {
    fn still_served(&self, now: Instant) -> bool {
        let w = &self.watch;
        if w.retired.load(Ordering::SeqCst) || !matches!(self.seen.has_changed(), Ok(false)) {
            return false;
        }
        if w.on_demand.load(Ordering::SeqCst) {
            if !w.freshness.current(now, self.vouching) {
                return false;
            }
        } else {
            let confirmed = w.last_confirmed.load();
            if confirmed.is_none_or(|at| now.saturating_duration_since(at) > self.stale_for) {
                return false;
            }
        }
        w.last_asked.store_coarse(now, ASKED_GRANULARITY);
        true
    }
}

/// Watchers by view: service, datacenter (`None`: the local one), kind and tenancy.
pub(super) type WatchMap = Arc<Mutex<HashMap<ViewKey, Arc<Watch>>>>;

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn test_metrics() -> Arc<Metrics> {
        Metrics::new(&prometheus::Registry::new()).expect("metrics")
    }

    /// A ready watch with a blocking query, confirmed now, and its view.
    fn ready_watch() -> (Arc<Watch>, Arc<ServiceView>) {
        let w = Arc::new(Watch::new());
        let view = Arc::new(ServiceView::new(Vec::new(), "dc1"));
        w.state.send_replace(ViewState::Ready(view.clone()));
        w.last_confirmed.store(Instant::now());
        (w, view)
    }

    const STALE_FOR: Duration = Duration::from_secs(60);
    const VOUCHING: Vouching = Vouching {
        alive_within: STALE_FOR,
        refetch_after: STALE_FOR,
    };

    #[test]
    fn a_served_view_is_served_until_anything_about_it_changes() {
        let (w, view) = ready_watch();
        let other = Arc::new(ServiceView::new(Vec::new(), "dc1"));
        assert!(ServedView::new(w.clone(), &other, STALE_FOR, VOUCHING).is_none());
        let served = ServedView::new(w.clone(), &view, STALE_FOR, VOUCHING).expect("current");
        let later = Instant::now() + Duration::from_secs(5);
        assert!(served.still_served(later));
        assert_eq!(
            w.last_asked.load(),
            Some(later),
            "the query counts as asked"
        );
        // Stale: confirmed longer ago than stale_for.
        assert!(!served.still_served(later + STALE_FOR));
        // Without a blocking query, and back.
        w.on_demand.store(true, Ordering::SeqCst);
        assert!(!served.still_served(later));
        w.on_demand.store(false, Ordering::SeqCst);
        assert!(served.still_served(later));
        // Any new state, even the same view sent again, ends it for good.
        w.state.send_replace(ViewState::Ready(view.clone()));
        assert!(!served.still_served(later));
        let again = ServedView::new(w.clone(), &view, STALE_FOR, VOUCHING).expect("current");
        assert!(again.still_served(later));
        // The watcher stopped.
        w.retired.store(true, Ordering::SeqCst);
        assert!(!again.still_served(later));
        // Never confirmed.
        let (fresh, view) = ready_watch();
        fresh.last_confirmed.clear();
        let never = ServedView::new(fresh, &view, STALE_FOR, VOUCHING).expect("current");
        assert!(!never.still_served(Instant::now()));
    }

    #[test]
    fn per_service_series_stop_at_their_bound_and_free_their_place() {
        let metrics = test_metrics();
        let series = ServiceSeries {
            metrics: metrics.clone(),
            created: AtomicUsize::new(0),
        };
        let watches: Vec<Watch> = (0..=MAX_SERVICE_SERIES).map(|_| Watch::new()).collect();
        for (i, w) in watches.iter().enumerate() {
            series.set(&format!("s{i}"), true, w, 3);
        }
        let count = |m: &Metrics| {
            prometheus::core::Collector::collect(&m.consul_healthy_instances)[0]
                .get_metric()
                .len()
        };
        assert_eq!(count(&metrics), MAX_SERVICE_SERIES);
        let drops = metrics.limit_drops.with_label_values(&["service_series"]);
        assert_eq!(drops.get(), 1);
        // Refused once, counted once: later updates of the same view add nothing.
        series.set(
            &format!("s{MAX_SERVICE_SERIES}"),
            true,
            &watches[MAX_SERVICE_SERIES],
            4,
        );
        assert_eq!(drops.get(), 1);
        // A remote view never gets one (the label has no datacenter).
        let remote = Watch::new();
        series.remove("s0", &watches[0]);
        series.set("s0", false, &remote, 1);
        assert_eq!(count(&metrics), MAX_SERVICE_SERIES - 1);
        // The freed place goes to the next view that asks.
        let late = Watch::new();
        series.set("late", true, &late, 2);
        assert_eq!(count(&metrics), MAX_SERVICE_SERIES);
    }
}
