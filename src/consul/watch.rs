//! The HTTP backend: one watcher per asked (service, datacenter), kept fresh by Consul blocking
//! queries; nodes and prepared queries fetched on demand and kept for their TTL. Every view is
//! replaced whole (readers hold an `Arc` of the old one until they are done), and the last known
//! view keeps being served while Consul is unreachable, for up to `consul.stale_for`.
//!
//! Views beyond the blocking budget learn of health changes from a datacenter-wide change feed
//! ([`Feed`]): blocking queries on `/v1/health/state/critical` and `/warning`, whose successive
//! results are diffed to find the services whose health changed; only those views are patched
//! (or, when a patch cannot be exact, fetched again).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::{BoxFuture, FutureExt, Shared};
use rand::Rng;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::catalog::{
    service_id_key, CatalogNodeJson, HealthEntry, Instance, NodeView, QueryExecuteJson, QueryView,
    ServiceView, Status,
};
use super::client::{ClientError, ConsulClient, REQUEST_TIMEOUT};
use super::inventory::Inventory;
use super::{Backend, LookupError};
use crate::config::ConsulConfig;
use crate::metrics::Metrics;

/// Token bucket of a watcher's loop (Consul's advice for blocking queries): a burst of two
/// requests, then one per interval while the service keeps changing. Bounds our load on Consul
/// under churn while a single change still shows within one round trip.
const WATCH_BURST: u32 = 2;
const WATCH_REFILL: Duration = Duration::from_millis(250);

/// Backoff after failed requests: doubling from the base up to the cap, with ±50% jitter. The
/// cap keeps recovery "within seconds" of Consul's return.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(3);

/// A watcher without a blocking slot (the connection budget is spent) looks for a free one
/// this often; meanwhile its view is refreshed on demand.
const SLOT_RETRY: Duration = Duration::from_secs(5);

/// How long the first queries for a service wait for its first fetch before SERVFAIL (the
/// fetch goes on; later queries get its result). Within glibc's 5 s per try.
const FIRST_FETCH_WAIT: Duration = REQUEST_TIMEOUT;

/// Shortest time between the starts of two requests of one change feed. Under churn (Consul
/// answers a blocking query on a check state at once when any check anywhere changed) this
/// is the feed's period: it bounds our load on Consul and the CPU spent decoding and diffing
/// the state lists, at the price of up to this much added delay between a flip and its view's
/// refresh (the target is under 2 s). When nothing changes the blocking query just waits.
const FEED_INTERVAL: Duration = Duration::from_millis(500);

/// How long a feed waits before asking again after the agent refused the endpoint (404, or
/// 403 without `node:read`/`service:read` on everything): views then refresh on their TTL.
const FEED_UNSUPPORTED_RETRY: Duration = Duration::from_secs(60);

/// The check states the feeds watch. DNS cares about every status transition: critical
/// instances are never served, warning ones are served unless `only_passing`, with their
/// warning weight. A check in neither list is passing, so the two lists are the whole health
/// picture, and they are small compared to `/v1/health/state/any` (every check). The order is
/// the order of [`HealthLists::lists`].
const FEED_STATES: [&str; 2] = ["critical", "warning"];

/// Bound on remembered node and prepared-query answers (each map on its own); beyond it the
/// least recently fetched are forgotten (counted in `limit_drops_total{limit="on_demand"}`).
/// Only names the inventory found in Consul, or unchecked lookups within their budget, get an
/// entry, so this is a backstop: a catalog of more nodes than this, all asked, refetches some.
pub const MAX_ON_DEMAND: usize = 10_000;

/// Bound on service views watched at once (one watcher task, view and `Watch` each, about
/// 3.5 KiB at 10 instances: 70 MiB at the bound). Only services the inventory found in Consul
/// get a watcher, and idle ones stop after `consul.watch_idle`; beyond the bound a new service
/// gets SERVFAIL, counted in `limit_drops_total{limit="watchers"}`. Twice the 10,000 services
/// the forwarder is measured at.
pub const MAX_WATCHERS: usize = 20_000;

/// Bound on `consul_healthy_instances{service}` series: one per watched service up to this
/// many (about 370 B each, and as many lines in every scrape of every host), none beyond it
/// (counted in `limit_drops_total{limit="service_series"}`).
pub const MAX_SERVICE_SERIES: usize = 1_000;

pub(super) fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << failures.min(10));
    let capped = exp.min(BACKOFF_CAP);
    capped.mul_f64(rand::rng().random_range(0.5..1.5))
}

#[derive(Clone, Debug)]
enum ViewState {
    Pending,
    Ready(Arc<ServiceView>),
    NoDatacenter,
    Failed(String),
}

struct Watch {
    state: watch::Sender<ViewState>,
    /// Set while the watcher has no blocking query: queries then wake it through `demand`
    /// when the view is older than its TTL.
    on_demand: AtomicBool,
    demand: tokio::sync::Notify,
    /// The change feed saw a health change of this service that it could not patch in (a check
    /// the view does not know) while the watcher had no blocking query: refresh with one
    /// non-blocking fetch, without claiming a blocking slot.
    changed: tokio::sync::Notify,
    /// A query came after the first fetch: the service is worth a blocking watch.
    asked_again: AtomicBool,
    last_asked: Mutex<Instant>,
    last_confirmed: Mutex<Option<Instant>>,
    /// This view's `consul_healthy_instances` series: see [`ServiceSeries`].
    series: AtomicU8,
}

/// [`Watch::series`]: not asked for yet, created, or refused at the bound.
const SERIES_NONE: u8 = 0;
const SERIES_CREATED: u8 = 1;
const SERIES_REFUSED: u8 = 2;

/// The `consul_healthy_instances{service}` series, at most [`MAX_SERVICE_SERIES`] of them, for
/// local-datacenter views only (the label has no datacenter, and two views must not share one
/// series).
struct ServiceSeries {
    metrics: Arc<Metrics>,
    created: AtomicUsize,
}

impl ServiceSeries {
    fn set(&self, service: &str, local: bool, w: &Watch, healthy: usize) {
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

    fn remove(&self, service: &str, w: &Watch) {
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
    fn touch(&self) {
        *lock(&self.last_asked) = Instant::now();
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// One log line when Consul becomes unreachable, one when it is back: not one per query or
/// per watcher.
#[derive(Default)]
pub struct OutageLog {
    down: AtomicBool,
    since: Mutex<Option<Instant>>,
}

impl OutageLog {
    pub fn failed(&self, error: &ClientError) {
        if !self.down.swap(true, Ordering::SeqCst) {
            *lock(&self.since) = Some(Instant::now());
            tracing::warn!(error = %error, "Consul unreachable: serving the last known views until it is back");
        }
    }

    /// Is Consul known to be unreachable right now?
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    pub fn ok(&self) {
        if self.down.swap(false, Ordering::SeqCst) {
            let took = lock(&self.since)
                .take()
                .map(|t| t.elapsed())
                .unwrap_or_default();
            tracing::info!(outage_s = took.as_secs_f64(), "Consul reachable again");
        }
    }
}

/// Watchers by (service, datacenter); `None` is the local datacenter.
type WatchMap = Arc<Mutex<HashMap<(String, Option<String>), Arc<Watch>>>>;

type SharedResult<V> = Shared<BoxFuture<'static, Result<V, LookupError>>>;

/// Values fetched on demand, kept `ttl` fresh, served stale up to `stale_for` when a refresh
/// fails; concurrent misses share one fetch.
struct OnDemand<V: Clone + Send + Sync + 'static> {
    slots: Mutex<HashMap<String, Slot<V>>>,
    /// `limit_drops_total{limit="on_demand"}`.
    forgotten: prometheus::IntCounter,
}

struct Slot<V: Clone> {
    value: Option<(V, Instant)>,
    inflight: Option<SharedResult<V>>,
}

impl<V: Clone + Send + Sync + 'static> OnDemand<V> {
    fn new(metrics: &Metrics) -> Self {
        OnDemand {
            slots: Mutex::new(HashMap::new()),
            forgotten: metrics.limit_drops.with_label_values(&["on_demand"]),
        }
    }

    /// Is there a fetched answer for `key` (fresh or not)?
    fn remembers(&self, key: &str) -> bool {
        lock(&self.slots)
            .get(key)
            .is_some_and(|slot| slot.value.is_some())
    }

    /// Keeps at most [`MAX_ON_DEMAND`] entries: past it, forgets the least recently fetched
    /// (never one with a fetch in flight) down to nine tenths of it, so the sort runs once per
    /// tenth of the bound, not per insert.
    fn bound(slots: &mut HashMap<String, Slot<V>>, forgotten: &prometheus::IntCounter) {
        if slots.len() <= MAX_ON_DEMAND {
            return;
        }
        let mut idle: Vec<(Option<Instant>, String)> = slots
            .iter()
            .filter(|(_, s)| s.inflight.is_none())
            .map(|(k, s)| (s.value.as_ref().map(|(_, at)| *at), k.clone()))
            .collect();
        // Entries without a value (failed fetches) sort first, then the oldest.
        idle.sort_unstable();
        let excess = slots.len().saturating_sub(MAX_ON_DEMAND / 10 * 9);
        for (_, key) in idle.into_iter().take(excess) {
            slots.remove(&key);
            forgotten.inc();
        }
    }

    async fn get(
        self: &Arc<Self>,
        key: String,
        ttl: impl Fn(&V) -> Duration,
        stale_for: Duration,
        fetch: impl FnOnce() -> BoxFuture<'static, Result<V, LookupError>>,
    ) -> Result<V, LookupError> {
        let (shared, previous) = {
            let mut slots = lock(&self.slots);
            let slot = slots.entry(key.clone()).or_insert(Slot {
                value: None,
                inflight: None,
            });
            if let Some((v, at)) = &slot.value {
                if at.elapsed() < ttl(v) {
                    return Ok(v.clone());
                }
            }
            let previous = slot.value.clone();
            let shared = match &slot.inflight {
                Some(s) => s.clone(),
                None => {
                    let this = self.clone();
                    let k = key.clone();
                    let fut = fetch();
                    let task = tokio::spawn(async move {
                        let r = fut.await;
                        let mut slots = lock(&this.slots);
                        if let Some(slot) = slots.get_mut(&k) {
                            slot.inflight = None;
                            if let Ok(v) = &r {
                                slot.value = Some((v.clone(), Instant::now()));
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
                    slot.inflight = Some(s.clone());
                    Self::bound(&mut slots, &self.forgotten);
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

/// Settings the watchers use, copied out of the config.
#[derive(Clone, Debug)]
struct Settings {
    watch_wait: Duration,
    watch_idle: Duration,
    stale_for: Duration,
    only_passing: bool,
    node_ttl: Duration,
    default_service_ttl: Duration,
    config: Arc<ConsulConfig>,
}

impl Settings {
    fn service_ttl(&self, service: &str) -> Duration {
        self.config.service_ttl_for(service)
    }
}

pub struct HttpBackend {
    client: Arc<ConsulClient>,
    settings: Settings,
    watches: WatchMap,
    nodes: Arc<OnDemand<Option<Arc<NodeView>>>>,
    queries: Arc<OnDemand<Option<Arc<QueryView>>>>,
    /// `consul.datacenter`, or what `/v1/agent/self` reports once it has answered.
    datacenter: Arc<Mutex<Option<String>>>,
    outage: Arc<OutageLog>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// Bumped when the client fails over to another agent: watchers drop their (possibly hung)
    /// blocking query and ask the new agent at once.
    failovers: watch::Receiver<u64>,
    /// The change feeds start with the first local-datacenter view (a forwarder nobody asks
    /// Consul names costs Consul nothing).
    feeds_started: AtomicBool,
    watcher_context: Arc<WatcherContext>,
    /// What exists in Consul: names it does not have are answered without a request.
    inventory: Arc<Inventory>,
}

/// How often the current agent is probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Probes the current agent; when it fails, moves to the next one and tells the watchers.
async fn probe_agents(
    client: Arc<ConsulClient>,
    outage: Arc<OutageLog>,
    failovers: watch::Sender<u64>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
        match client.probe_current().await {
            Some(Err(e)) => {
                outage.failed(&e);
                if client.fail_over() {
                    failovers.send_modify(|g| *g += 1);
                }
            }
            Some(Ok(())) => outage.ok(),
            None => {}
        }
    }
}

impl HttpBackend {
    pub fn new(
        client: ConsulClient,
        config: &ConsulConfig,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> HttpBackend {
        let client = Arc::new(client);
        let datacenter = Arc::new(Mutex::new(config.datacenter.clone()));
        if config.datacenter.is_none() {
            tokio::spawn(discover_datacenter(
                client.clone(),
                datacenter.clone(),
                shutdown.clone(),
            ));
        }
        let outage = Arc::new(OutageLog::default());
        let (failover_tx, failovers) = watch::channel(0u64);
        let inventory = Arc::new(Inventory::new(
            client.clone(),
            outage.clone(),
            config.watch_wait,
            config.watch_idle,
            failovers.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(probe_agents(
            client.clone(),
            outage.clone(),
            failover_tx,
            shutdown.clone(),
        ));
        let settings = Settings {
            watch_wait: config.watch_wait,
            watch_idle: config.watch_idle,
            stale_for: config.stale_for,
            only_passing: config.only_passing,
            node_ttl: config.node_ttl,
            default_service_ttl: config.service_ttl_for(""),
            config: Arc::new(config.clone()),
        };
        let watches: WatchMap = Arc::new(Mutex::new(HashMap::new()));
        let watcher_context = Arc::new(WatcherContext {
            client: client.clone(),
            settings: settings.clone(),
            watches: watches.clone(),
            outage: outage.clone(),
            metrics: metrics.clone(),
            series: Arc::new(ServiceSeries {
                metrics: metrics.clone(),
                created: AtomicUsize::new(0),
            }),
            shutdown: shutdown.clone(),
        });
        HttpBackend {
            inventory,
            failovers,
            feeds_started: AtomicBool::new(false),
            watcher_context,
            client,
            settings,
            watches,
            nodes: Arc::new(OnDemand::new(&metrics)),
            queries: Arc::new(OnDemand::new(&metrics)),
            datacenter,
            outage,
            metrics,
            shutdown,
        }
    }

    /// A deferred check of the budget for lookups the inventory could not settle, spent only
    /// when the lookup really goes to Consul (not when a remembered answer serves it).
    fn unchecked_budget(&self, checked: bool) -> impl FnOnce() -> Result<(), LookupError> + Send {
        let inventory = self.inventory.clone();
        move || {
            if checked || inventory.allow_unchecked() {
                Ok(())
            } else {
                Err(LookupError::Unavailable(
                    "the budget for unchecked Consul lookups is spent (limit_drops_total)".into(),
                ))
            }
        }
    }

    /// The watch for `key`, started if new: `None` when it is new and [`MAX_WATCHERS`] run
    /// already, or when `checked` is false (the inventory could not tell whether the service
    /// exists) and the budget for such lookups is spent.
    fn watch_for(&self, key: (String, Option<String>), checked: bool) -> Option<Arc<Watch>> {
        let mut watches = lock(&self.watches);
        if let Some(w) = watches.get(&key) {
            return Some(w.clone());
        }
        if watches.len() >= MAX_WATCHERS {
            self.metrics
                .limit_drops
                .with_label_values(&["watchers"])
                .inc();
            return None;
        }
        if !checked && !self.inventory.allow_unchecked() {
            return None;
        }
        let (tx, _) = watch::channel(ViewState::Pending);
        let w = Arc::new(Watch {
            state: tx,
            on_demand: AtomicBool::new(false),
            demand: tokio::sync::Notify::new(),
            changed: tokio::sync::Notify::new(),
            asked_again: AtomicBool::new(false),
            last_asked: Mutex::new(Instant::now()),
            last_confirmed: Mutex::new(None),
            series: AtomicU8::new(SERIES_NONE),
        });
        watches.insert(key.clone(), w.clone());
        self.metrics.consul_watchers.inc();
        let local = key.1.is_none();
        let task = Watcher {
            key,
            watch: w.clone(),
            cx: self.watcher_context.clone(),
            failovers: self.failovers.clone(),
        };
        tokio::spawn(task.run());
        if local && !self.feeds_started.swap(true, Ordering::SeqCst) {
            let shared = FeedShared {
                watches: self.watches.clone(),
                lists: Arc::new(Mutex::new(HealthLists::default())),
                metrics: self.metrics.clone(),
                series: self.watcher_context.series.clone(),
                only_passing: self.settings.only_passing,
            };
            for (list, state) in FEED_STATES.into_iter().enumerate() {
                let feed = Feed {
                    state,
                    list,
                    client: self.client.clone(),
                    outage: self.outage.clone(),
                    shared: shared.clone(),
                    watch_wait: self.settings.watch_wait,
                    shutdown: self.shutdown.clone(),
                    failovers: self.failovers.clone(),
                };
                tokio::spawn(feed.run());
            }
        }
        Some(w)
    }
}

/// One on-demand GET: the body converted, `None` for a 404 or a `null` body. "No such
/// datacenter" is final (NXDOMAIN); any other failure marks an outage (stale data or SERVFAIL).
async fn fetch_one<J: serde::de::DeserializeOwned, V>(
    client: &ConsulClient,
    outage: &OutageLog,
    endpoint: &'static str,
    segments: &[&str],
    params: &[(&'static str, String)],
    convert: impl FnOnce(J) -> V,
) -> Result<Option<V>, LookupError> {
    match client.get::<J>(endpoint, segments, params, None).await {
        Ok(r) => {
            outage.ok();
            Ok(r.value.map(convert))
        }
        Err(ClientError::NoSuchDatacenter) => Err(LookupError::NoSuchDatacenter),
        Err(ClientError::NotFound) => Ok(None),
        Err(e) => {
            outage.failed(&e);
            Err(LookupError::Unavailable(e.to_string()))
        }
    }
}

/// Asks `/v1/agent/self` for the agent's datacenter until it answers (with backoff), so names
/// without a datacenter label and names that spell out the local one share one view.
async fn discover_datacenter(
    client: Arc<ConsulClient>,
    slot: Arc<Mutex<Option<String>>>,
    shutdown: CancellationToken,
) {
    #[derive(serde::Deserialize)]
    struct AgentSelf {
        #[serde(rename = "Config")]
        config: AgentConfig,
    }
    #[derive(serde::Deserialize)]
    struct AgentConfig {
        #[serde(rename = "Datacenter")]
        datacenter: String,
    }
    let mut failures = 0;
    loop {
        let fetched = client
            .get::<AgentSelf>("agent_self", &["v1", "agent", "self"], &[], None)
            .await;
        if let Ok(r) = fetched {
            if let Some(agent) = r.value {
                let dc = agent.config.datacenter.to_ascii_lowercase();
                tracing::info!(datacenter = %dc, "Consul agent's datacenter");
                *lock(&slot) = Some(dc);
                return;
            }
        }
        failures += 1;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff(failures)) => {}
        }
    }
}

/// One entry of `/v1/health/state/<state>`: which check, where, and its last write.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StateCheckJson {
    node: String,
    #[serde(rename = "CheckID", default)]
    check_id: String,
    /// Empty (or absent) for a node check, which affects every service on the node.
    #[serde(rename = "ServiceID", default)]
    service_id: Option<String>,
    #[serde(default)]
    service_name: Option<String>,
    #[serde(default)]
    modify_index: u64,
}

/// What a feed remembers of a check in its state: enough to tell a rewrite, to name the views
/// it affects once it leaves the state, and to find the instance it belongs to.
#[derive(Debug, PartialEq, Eq)]
struct SeenCheck {
    modify_index: u64,
    /// Lowercased service name; `None` for a node check.
    service: Option<String>,
    /// [`service_id_key`] of the check's `ServiceID` (0 for a node check).
    service_id: u64,
}

impl SeenCheck {
    /// Does this check (listed on the instance's node) count towards the instance's health?
    /// Node checks count for every instance on the node.
    fn applies_to(&self, instance: &Instance) -> bool {
        self.service.is_none() || self.service_id == instance.service_id
    }
}

/// The checks in one state: lowercased node -> check ID -> what was seen.
type SeenChecks = HashMap<String, HashMap<String, SeenCheck>>;

fn seen_checks(list: Vec<StateCheckJson>) -> SeenChecks {
    let mut out: SeenChecks = HashMap::new();
    for c in list {
        let service_id = c.service_id.filter(|id| !id.is_empty());
        let seen = SeenCheck {
            modify_index: c.modify_index,
            service_id: service_id.as_deref().map_or(0, service_id_key),
            service: service_id.map(|_| c.service_name.unwrap_or_default().to_ascii_lowercase()),
        };
        out.entry(c.node.to_ascii_lowercase())
            .or_default()
            .insert(c.check_id, seen);
    }
    out
}

/// The checks one round of a feed found changed, by what they affect.
#[derive(Debug, Default, PartialEq, Eq)]
struct Changes {
    /// Service -> the instances whose service checks changed, as (node, service ID key).
    services: HashMap<String, HashSet<(String, u64)>>,
    /// Nodes whose node checks changed.
    nodes: HashSet<String>,
}

impl Changes {
    fn note(&mut self, node: &str, seen: &SeenCheck) {
        match &seen.service {
            Some(s) => {
                self.services
                    .entry(s.clone())
                    .or_default()
                    .insert((node.to_owned(), seen.service_id));
            }
            None => {
                self.nodes.insert(node.to_owned());
            }
        }
    }
}

/// The checks that entered the state, left it, or were rewritten in it (a new `ModifyIndex`:
/// the check may have been elsewhere in between, which a view fetched meanwhile may show).
fn diff(old: &SeenChecks, new: &SeenChecks) -> Changes {
    let mut changes = Changes::default();
    for (node, checks) in new {
        let before = old.get(node);
        for (id, seen) in checks {
            if before.and_then(|b| b.get(id)) != Some(seen) {
                changes.note(node, seen);
            }
        }
    }
    for (node, checks) in old {
        let after = new.get(node);
        for (id, seen) in checks {
            if !after.is_some_and(|a| a.contains_key(id)) {
                changes.note(node, seen);
            }
        }
    }
    changes
}

/// The latest list of each feed (`None` until its first result and after a failure).
#[derive(Default)]
struct HealthLists {
    lists: [Option<SeenChecks>; FEED_STATES.len()],
}

impl HealthLists {
    /// Every non-passing check of the datacenter, when both lists are known.
    fn complete(&self) -> Option<[&SeenChecks; FEED_STATES.len()]> {
        let [critical, warning] = &self.lists;
        Some([critical.as_ref()?, warning.as_ref()?])
    }
}

/// An instance's status by the feeds' lists: critical when one of its checks (its service's
/// or its node's) is in the critical list, else warning when one is in the warning list, else
/// passing (every check in neither list is passing).
fn listed_status(lists: [&SeenChecks; FEED_STATES.len()], instance: &Instance) -> Status {
    let [critical, warning] = lists;
    let listed_in = |list: &SeenChecks| {
        list.get(&instance.node)
            .is_some_and(|checks| checks.values().any(|c| c.applies_to(instance)))
    };
    if listed_in(critical) {
        Status::Critical
    } else if listed_in(warning) {
        Status::Warning
    } else {
        Status::Passing
    }
}

/// `view` with every instance's status recomputed from the lists, or `None` when nothing
/// changes.
fn patched(view: &ServiceView, lists: [&SeenChecks; FEED_STATES.len()]) -> Option<ServiceView> {
    let mut changed = false;
    let instances = view
        .instances
        .iter()
        .map(|inst| {
            let status = listed_status(lists, inst);
            changed |= status != inst.status;
            Instance {
                status,
                ..inst.clone()
            }
        })
        .collect();
    changed.then(|| ServiceView::new(instances, &view.datacenter))
}

/// What the feeds need to reach the views.
#[derive(Clone)]
struct FeedShared {
    watches: WatchMap,
    lists: Arc<Mutex<HealthLists>>,
    metrics: Arc<Metrics>,
    series: Arc<ServiceSeries>,
    only_passing: bool,
}

/// How one round of the feeds touched the views.
#[derive(Debug, Default)]
struct Applied {
    patched: usize,
    refreshed: usize,
}

impl FeedShared {
    /// Brings the views without a blocking query up to date with the lists: every one of them
    /// when `changes` is `None` (a feed's first result), else those named by `changes`. A view
    /// is patched in place when every changed check belongs to an instance it has (each
    /// instance's status follows from the lists); a view that lacks one (an instance
    /// registered since its fetch), or any view while a list is missing, is refreshed with one
    /// fetch instead.
    fn apply(&self, changes: Option<&Changes>) -> Applied {
        let lists = lock(&self.lists);
        let complete = lists.complete();
        let watches = lock(&self.watches);
        let mut applied = Applied::default();
        for ((service, dc), w) in watches.iter() {
            if dc.is_some() || !w.on_demand.load(Ordering::SeqCst) {
                continue;
            }
            let current = match &*w.state.borrow() {
                ViewState::Ready(view) => Some(view.clone()),
                _ => None,
            };
            let Some(view) = current else {
                continue;
            };
            let knows_all = match changes {
                None => true,
                Some(c) => match affects(c, service, &view) {
                    Affected::No => continue,
                    Affected::Known => true,
                    Affected::Unknown => false,
                },
            };
            match complete {
                Some(lists) if knows_all => {
                    if let Some(new) = patched(&view, lists) {
                        self.install(service, w, &view, new);
                        applied.patched += 1;
                    }
                }
                // Only a diff says something happened; without one there is nothing to fetch.
                _ if changes.is_some() => {
                    w.changed.notify_one();
                    applied.refreshed += 1;
                }
                _ => {}
            }
        }
        applied
    }

    /// Replaces `old` by `new` unless the watcher replaced it meanwhile (its fetch is newer).
    fn install(&self, service: &str, w: &Watch, old: &Arc<ServiceView>, new: ServiceView) {
        let healthy = new.healthy_count(self.only_passing);
        let new = Arc::new(new);
        let replaced = w.state.send_if_modified(|state| match state {
            ViewState::Ready(current) if Arc::ptr_eq(current, old) => {
                *state = ViewState::Ready(new);
                true
            }
            _ => false,
        });
        if replaced {
            self.metrics.consul_health_changes.inc();
            // The feeds patch local-datacenter views only.
            self.series.set(service, true, w, healthy);
        }
    }
}

enum Affected {
    No,
    /// Changed, and every changed check belongs to an instance of the view: a patch is exact.
    Known,
    /// Changed, through a service check of an instance the view does not have (registered
    /// since its fetch, perhaps just turned healthy).
    Unknown,
}

fn affects(changes: &Changes, service: &str, view: &ServiceView) -> Affected {
    let mut affected = false;
    if let Some(changed) = changes.services.get(service) {
        affected = true;
        let has = |(node, service_id): &(String, u64)| {
            view.instances
                .iter()
                .any(|i| i.service_id == *service_id && i.node == *node)
        };
        if !changed.iter().all(has) {
            return Affected::Unknown;
        }
    }
    if !affected && !changes.nodes.is_empty() {
        affected = view
            .instances
            .iter()
            .any(|i| changes.nodes.contains(&i.node));
    }
    if affected {
        Affected::Known
    } else {
        Affected::No
    }
}

/// A datacenter-wide change feed: a blocking query on `/v1/health/state/<state>` of the local
/// datacenter, at most one request per [`FEED_INTERVAL`]. Each result is diffed with the one
/// before, and the views whose health changed and which have no blocking query of their own
/// are patched from the lists (see [`FeedShared::apply`]). So every view, not only the ones
/// within the blocking budget, follows health changes within about one interval, with one
/// connection per feed and no request per change.
struct Feed {
    state: &'static str,
    /// This feed's place in [`HealthLists::lists`].
    list: usize,
    client: Arc<ConsulClient>,
    /// A feed's answer ends an outage as a watcher's does: after an agent restart the feed
    /// may be the first to get through, and the "reachable again" line must not wait for
    /// the next probe.
    outage: Arc<OutageLog>,
    shared: FeedShared,
    watch_wait: Duration,
    shutdown: CancellationToken,
    failovers: watch::Receiver<u64>,
}

impl Feed {
    async fn run(mut self) {
        let segments = ["v1", "health", "state", self.state];
        let mut index: u64 = 0;
        let mut failures: u32 = 0;
        let mut refused_logged = false;
        // The feed keeps its blocking slot from one request to the next: given back after
        // each, it went to a service watcher, and the feed then polled every FEED_INTERVAL
        // while nothing changed (two requests a second to the agent for nothing).
        let mut slot = None;
        loop {
            let started = Instant::now();
            // Without a free blocking slot (a tiny budget) the feed polls instead.
            if slot.is_none() && index > 0 {
                slot = self.client.try_blocking_slot();
            }
            let blocking = slot.as_ref().map(|_| (index, self.watch_wait));
            let request =
                self.client
                    .get::<Vec<StateCheckJson>>("health_state", &segments, &[], blocking);
            self.failovers.borrow_and_update();
            let result = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.failovers.changed() => {
                    index = 0;
                    lock(&self.shared.lists).lists[self.list] = None;
                    continue;
                }
                r = request => r,
            };
            let pause = match result {
                Ok(r) => {
                    self.outage.ok();
                    failures = 0;
                    index = if r.index < index { 0 } else { r.index.max(1) };
                    // Decoding into maps, diffing and patching walk every listed check and
                    // every view: off the runtime's workers, so queries never queue behind it.
                    let shared = self.shared.clone();
                    let list = self.list;
                    let listed = r.value.unwrap_or_default();
                    let applied = tokio::task::spawn_blocking(move || {
                        let new = seen_checks(listed);
                        let changes = {
                            let mut lists = lock(&shared.lists);
                            let changes = lists.lists[list].as_ref().map(|old| diff(old, &new));
                            lists.lists[list] = Some(new);
                            changes
                        };
                        shared.apply(changes.as_ref())
                    })
                    .await
                    .unwrap_or_default();
                    if applied.patched + applied.refreshed > 0 {
                        tracing::debug!(
                            state = self.state,
                            patched = applied.patched,
                            refreshed = applied.refreshed,
                            "health changes applied"
                        );
                    }
                    FEED_INTERVAL.saturating_sub(started.elapsed())
                }
                Err(e) => {
                    index = 0;
                    // Failing or refused: the slot serves a watcher better meanwhile.
                    slot = None;
                    lock(&self.shared.lists).lists[self.list] = None;
                    failures = failures.saturating_add(1);
                    let refused = matches!(
                        e,
                        ClientError::NotFound | ClientError::Status { status: 403, .. }
                    );
                    if refused {
                        if !refused_logged {
                            refused_logged = true;
                            tracing::warn!(
                                error = %e,
                                state = self.state,
                                "the agent refuses /v1/health/state: views without a blocking \
                                 query follow health changes only on their TTL"
                            );
                        }
                        FEED_UNSUPPORTED_RETRY
                    } else {
                        // Outages are logged by the watchers and the probe, not here.
                        tracing::debug!(error = %e, state = self.state, "change feed request failed");
                        backoff(failures)
                    }
                }
            };
            if !pause.is_zero() {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// What every watcher shares, behind one `Arc`: a watcher's task holds its fields for as long
/// as the service is watched (10,000 of them in issue 8's target), so they cost one pointer.
struct WatcherContext {
    client: Arc<ConsulClient>,
    settings: Settings,
    watches: WatchMap,
    outage: Arc<OutageLog>,
    metrics: Arc<Metrics>,
    series: Arc<ServiceSeries>,
    shutdown: CancellationToken,
}

struct Watcher {
    key: (String, Option<String>),
    watch: Arc<Watch>,
    cx: Arc<WatcherContext>,
    failovers: watch::Receiver<u64>,
}

impl Watcher {
    async fn run(mut self) {
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

#[async_trait]
impl Backend for HttpBackend {
    fn ready(&self) -> Result<(), String> {
        if self.client.has_answered() {
            Ok(())
        } else {
            Err("Consul has not answered yet".to_owned())
        }
    }

    async fn local_datacenter(&self) -> Option<String> {
        // Never asked on the query path: `discover_datacenter` fills it in the background.
        lock(&self.datacenter).clone()
    }

    async fn service(
        &self,
        service: &str,
        dc: Option<&str>,
    ) -> Result<Arc<ServiceView>, LookupError> {
        let key = (service.to_owned(), dc.map(str::to_owned));
        // A watched service is answered from its view, which its watcher keeps exact (a
        // deregistered service's view empties): the inventory only decides what new state a
        // name may create, so a list gone wrong cannot hide a service that is being served.
        let watched = lock(&self.watches).contains_key(&key);
        let checked = watched || self.inventory.service(service, dc).await.checked()?;
        let Some(w) = self.watch_for(key, checked) else {
            return Err(LookupError::Unavailable(
                "a bound on Consul lookups was reached (limit_drops_total)".into(),
            ));
        };
        w.touch();
        let mut rx = w.state.subscribe();
        let waited = tokio::time::timeout(
            FIRST_FETCH_WAIT,
            rx.wait_for(|s| !matches!(s, ViewState::Pending)),
        )
        .await;
        let state = match waited {
            Ok(Ok(state)) => state.clone(),
            _ => {
                return Err(LookupError::Unavailable(
                    "Consul has not answered yet".into(),
                ))
            }
        };
        match state {
            ViewState::Ready(view) => {
                let confirmed = *lock(&w.last_confirmed);
                if w.on_demand.load(Ordering::SeqCst)
                    && (!w.asked_again.load(Ordering::SeqCst)
                        || confirmed
                            .is_none_or(|at| at.elapsed() >= self.settings.service_ttl(service)))
                {
                    // Served now from the current view; the refresh serves the next queries.
                    w.demand.notify_one();
                }
                match confirmed {
                    Some(at) if at.elapsed() > self.settings.stale_for => {
                        Err(LookupError::Unavailable(
                            "the last view is older than consul.stale_for".into(),
                        ))
                    }
                    _ => Ok(view),
                }
            }
            ViewState::NoDatacenter => Err(LookupError::NoSuchDatacenter),
            ViewState::Failed(e) => Err(LookupError::Unavailable(e)),
            ViewState::Pending => Err(LookupError::Unavailable(
                "Consul has not answered yet".into(),
            )),
        }
    }

    async fn node(
        &self,
        node: &str,
        dc: Option<&str>,
    ) -> Result<Option<Arc<NodeView>>, LookupError> {
        let key = format!("{node}|{}", dc.unwrap_or(""));
        // A remembered answer goes on being served and refreshed, as a watched service does.
        let checked =
            self.nodes.remembers(&key) || self.inventory.node(node, dc).await.checked()?;
        let client = self.client.clone();
        let outage = self.outage.clone();
        let budget = self.unchecked_budget(checked);
        let node_name = node.to_owned();
        let params: Vec<(&'static str, String)> =
            dc.map(|d| vec![("dc", d.to_owned())]).unwrap_or_default();
        let node_ttl = self.settings.node_ttl;
        self.nodes
            .get(
                key,
                move |_| node_ttl,
                self.settings.stale_for,
                move || {
                    async move {
                        budget()?;
                        fetch_one(
                            &client,
                            &outage,
                            "catalog_node",
                            &["v1", "catalog", "node", &node_name],
                            &params,
                            |n: CatalogNodeJson| Arc::new(NodeView::from_json(&n.node)),
                        )
                        .await
                    }
                    .boxed()
                },
            )
            .await
    }

    async fn query(
        &self,
        name: &str,
        dc: Option<&str>,
    ) -> Result<Option<Arc<QueryView>>, LookupError> {
        let key = format!("{name}|{}", dc.unwrap_or(""));
        let checked =
            self.queries.remembers(&key) || self.inventory.query(name, dc).await.checked()?;
        let client = self.client.clone();
        let outage = self.outage.clone();
        let budget = self.unchecked_budget(checked);
        let query_name = name.to_owned();
        let params: Vec<(&'static str, String)> =
            dc.map(|d| vec![("dc", d.to_owned())]).unwrap_or_default();
        let default_ttl = self.settings.default_service_ttl;
        self.queries
            .get(
                key,
                move |v: &Option<Arc<QueryView>>| {
                    v.as_ref().and_then(|q| q.ttl).unwrap_or(default_ttl)
                },
                self.settings.stale_for,
                move || {
                    async move {
                        budget()?;
                        fetch_one(
                            &client,
                            &outage,
                            "query_execute",
                            &["v1", "query", &query_name, "execute"],
                            &params,
                            |q: QueryExecuteJson| {
                                let ttl = q
                                    .dns
                                    .as_ref()
                                    .and_then(|d| humantime::parse_duration(&d.ttl).ok());
                                Arc::new(QueryView {
                                    service: Arc::new(ServiceView::from_entries(
                                        &q.nodes,
                                        &q.datacenter.to_ascii_lowercase(),
                                    )),
                                    ttl,
                                })
                            },
                        )
                        .await
                    }
                    .boxed()
                },
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_metrics() -> Arc<Metrics> {
        Metrics::new(&prometheus::Registry::new()).expect("metrics")
    }

    fn new_watch() -> Watch {
        Watch {
            state: watch::channel(ViewState::Pending).0,
            on_demand: AtomicBool::new(false),
            demand: tokio::sync::Notify::new(),
            changed: tokio::sync::Notify::new(),
            asked_again: AtomicBool::new(false),
            last_asked: Mutex::new(Instant::now()),
            last_confirmed: Mutex::new(None),
            series: AtomicU8::new(SERIES_NONE),
        }
    }

    #[test]
    fn remembered_answers_are_bounded_and_the_oldest_forgotten_first() {
        let metrics = test_metrics();
        let forgotten = metrics.limit_drops.with_label_values(&["on_demand"]);
        let start = Instant::now();
        let mut slots: HashMap<String, Slot<u32>> = HashMap::new();
        for i in 0..=MAX_ON_DEMAND {
            let at = start + Duration::from_millis(i as u64);
            slots.insert(
                format!("n{i}"),
                Slot {
                    value: Some((0, at)),
                    inflight: None,
                },
            );
        }
        // One failed fetch (no value) goes first.
        slots.insert(
            "failed".into(),
            Slot {
                value: None,
                inflight: None,
            },
        );
        OnDemand::bound(&mut slots, &forgotten);
        assert_eq!(slots.len(), MAX_ON_DEMAND / 10 * 9);
        assert_eq!(forgotten.get() as usize, MAX_ON_DEMAND + 2 - slots.len());
        assert!(!slots.contains_key("failed"));
        assert!(!slots.contains_key("n0"), "the oldest is forgotten");
        assert!(
            slots.contains_key(&format!("n{MAX_ON_DEMAND}")),
            "the newest is kept"
        );
        // Under the bound nothing is touched.
        let before = slots.len();
        OnDemand::bound(&mut slots, &forgotten);
        assert_eq!(slots.len(), before);
    }

    #[test]
    fn per_service_series_stop_at_their_bound_and_free_their_place() {
        let metrics = test_metrics();
        let series = ServiceSeries {
            metrics: metrics.clone(),
            created: AtomicUsize::new(0),
        };
        let watches: Vec<Watch> = (0..=MAX_SERVICE_SERIES).map(|_| new_watch()).collect();
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
        let remote = new_watch();
        series.remove("s0", &watches[0]);
        series.set("s0", false, &remote, 1);
        assert_eq!(count(&metrics), MAX_SERVICE_SERIES - 1);
        // The freed place goes to the next view that asks.
        let late = new_watch();
        series.set("late", true, &late, 2);
        assert_eq!(count(&metrics), MAX_SERVICE_SERIES);
    }

    fn seen(list: &[(&str, &str, Option<&str>, u64)]) -> SeenChecks {
        seen_checks(
            list.iter()
                .map(|(node, id, service, modify_index)| StateCheckJson {
                    node: (*node).to_owned(),
                    check_id: (*id).to_owned(),
                    service_id: service.map(|s| format!("{}-1", s.to_ascii_lowercase())),
                    service_name: service.map(str::to_owned),
                    modify_index: *modify_index,
                })
                .collect(),
        )
    }

    #[test]
    fn diff_names_entered_left_and_rewritten_checks() {
        let old = seen(&[
            ("N1", "service:a-1", Some("A"), 5),
            ("n2", "serfHealth", None, 3),
            ("n4", "service:c-1", Some("c"), 4),
        ]);
        let new = seen(&[
            ("n1", "service:a-1", Some("a"), 7),
            ("n3", "service:b-1", Some("b"), 8),
            ("n4", "service:c-1", Some("c"), 4),
        ]);
        let changes = diff(&old, &new);
        let services: Vec<(&str, Vec<(String, u64)>)> = {
            let mut v: Vec<_> = changes
                .services
                .iter()
                .map(|(s, c)| (s.as_str(), c.iter().cloned().collect()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            services,
            vec![
                ("a", vec![("n1".to_owned(), service_id_key("a-1"))]),
                ("b", vec![("n3".to_owned(), service_id_key("b-1"))]),
            ]
        );
        assert_eq!(changes.nodes, HashSet::from(["n2".to_owned()]));
        assert_eq!(diff(&new, &new), Changes::default());
    }

    #[test]
    fn a_patch_recomputes_each_instance_from_the_lists() {
        // Two instances of `a` on n1 and n2, and one of `b` on n1 (whose checks must not
        // count for `a`'s instance there).
        let entries: Vec<HealthEntry> = serde_json::from_str(
            r#"[
              {"Node": {"Node": "n1", "Address": "10.0.0.1"}, "Service": {"ID": "a-1", "Service": "a", "Port": 80},
               "Checks": [{"CheckID": "serfHealth", "Status": "passing"}, {"CheckID": "service:a-1", "Status": "passing", "ServiceID": "a-1"}]},
              {"Node": {"Node": "n2", "Address": "10.0.0.2"}, "Service": {"ID": "a-2", "Service": "a", "Port": 80},
               "Checks": [{"CheckID": "serfHealth", "Status": "passing"}, {"CheckID": "service:a-2", "Status": "passing", "ServiceID": "a-2"}]}
            ]"#,
        )
        .expect("entries");
        let view = ServiceView::from_entries(&entries, "dc1");
        let critical = seen(&[
            ("n2", "serfHealth", None, 9),
            ("n1", "service:b-1", Some("b"), 9),
        ]);
        let warning = seen(&[("n1", "service:a-1", Some("a"), 9)]);
        let new = patched(&view, [&critical, &warning]).expect("changed");
        let statuses: Vec<Status> = new.instances.iter().map(|i| i.status).collect();
        assert_eq!(statuses, vec![Status::Warning, Status::Critical]);
        assert!(patched(&new, [&critical, &warning]).is_none());
        let none = SeenChecks::new();
        let back = patched(&new, [&none, &none]).expect("changed");
        assert!(back.same_data(&view));

        // A check of an instance the view has (a second check registered since the fetch
        // included) patches exactly; one of an instance it lacks needs a fetch.
        let note = |node: &str, id: &str| {
            let mut changes = Changes::default();
            let listed = seen(&[(node, id, Some("a"), 1)]);
            for (n, checks) in &listed {
                for c in checks.values() {
                    changes.note(n, c);
                }
            }
            changes
        };
        let known = note("n1", "service:a-1-extra");
        assert!(matches!(affects(&known, "a", &view), Affected::Known));
        let mut unknown = known;
        unknown
            .services
            .entry("a".into())
            .or_default()
            .insert(("n3".into(), service_id_key("a-3")));
        assert!(matches!(affects(&unknown, "a", &view), Affected::Unknown));
        assert!(matches!(affects(&unknown, "b", &view), Affected::No));
        let mut node_change = Changes::default();
        node_change.nodes.insert("n2".into());
        assert!(matches!(affects(&node_change, "a", &view), Affected::Known));
        node_change.nodes = HashSet::from(["n9".to_owned()]);
        assert!(matches!(affects(&node_change, "a", &view), Affected::No));
    }
}
