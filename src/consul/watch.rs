//! The HTTP backend: one watcher per asked (service, datacenter), kept fresh by Consul blocking
//! queries; nodes and prepared queries fetched on demand and kept for their TTL. Every view is
//! replaced whole (readers hold an `Arc` of the old one until they are done), and the last known
//! view keeps being served while Consul is unreachable, for up to `consul.stale_for`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::{BoxFuture, FutureExt, Shared};
use rand::Rng;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::catalog::{
    CatalogNodeJson, HealthEntry, NodeView, QueryExecuteJson, QueryView, ServiceView,
};
use super::client::{ClientError, ConsulClient, REQUEST_TIMEOUT};
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

/// Bound on remembered nodes and prepared queries; beyond it the oldest are forgotten.
const MAX_ON_DEMAND: usize = 10_000;

fn backoff(failures: u32) -> Duration {
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
    /// A query came after the first fetch: the service is worth a blocking watch.
    asked_again: AtomicBool,
    last_asked: Mutex<Instant>,
    last_confirmed: Mutex<Option<Instant>>,
}

impl Watch {
    fn touch(&self) {
        *lock(&self.last_asked) = Instant::now();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
}

struct Slot<V: Clone> {
    value: Option<(V, Instant)>,
    inflight: Option<SharedResult<V>>,
}

impl<V: Clone + Send + Sync + 'static> OnDemand<V> {
    fn new() -> Self {
        OnDemand {
            slots: Mutex::new(HashMap::new()),
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
                    if slots.len() > MAX_ON_DEMAND {
                        let cutoff = stale_for;
                        slots.retain(|_, s| {
                            s.inflight.is_some()
                                || s.value
                                    .as_ref()
                                    .is_some_and(|(_, at)| at.elapsed() < cutoff)
                        });
                    }
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
        tokio::spawn(probe_agents(
            client.clone(),
            outage.clone(),
            failover_tx,
            shutdown.clone(),
        ));
        HttpBackend {
            failovers,
            client,
            settings: Settings {
                watch_wait: config.watch_wait,
                watch_idle: config.watch_idle,
                stale_for: config.stale_for,
                only_passing: config.only_passing,
                node_ttl: config.node_ttl,
                default_service_ttl: config.service_ttl_for(""),
                config: Arc::new(config.clone()),
            },
            watches: Arc::new(Mutex::new(HashMap::new())),
            nodes: Arc::new(OnDemand::new()),
            queries: Arc::new(OnDemand::new()),
            datacenter,
            outage,
            metrics,
            shutdown,
        }
    }

    /// The watch for `key`, started if new.
    fn watch_for(&self, key: (String, Option<String>)) -> Arc<Watch> {
        let mut watches = lock(&self.watches);
        if let Some(w) = watches.get(&key) {
            return w.clone();
        }
        let (tx, _) = watch::channel(ViewState::Pending);
        let w = Arc::new(Watch {
            state: tx,
            on_demand: AtomicBool::new(false),
            demand: tokio::sync::Notify::new(),
            asked_again: AtomicBool::new(false),
            last_asked: Mutex::new(Instant::now()),
            last_confirmed: Mutex::new(None),
        });
        watches.insert(key.clone(), w.clone());
        self.metrics.consul_watchers.inc();
        let task = Watcher {
            key,
            watch: w.clone(),
            client: self.client.clone(),
            settings: self.settings.clone(),
            watches: self.watches.clone(),
            outage: self.outage.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
            failovers: self.failovers.clone(),
        };
        tokio::spawn(task.run());
        w
    }
}

/// One on-demand GET: the body converted, `None` for a 404 or a `null` body. "No such
/// datacenter" is final (NXDOMAIN); any other failure marks an outage (stale data or SERVFAIL).
async fn fetch_one<J: serde::de::DeserializeOwned, V>(
    client: &ConsulClient,
    outage: &OutageLog,
    endpoint: &'static str,
    path: &str,
    params: &[(&'static str, String)],
    convert: impl FnOnce(J) -> V,
) -> Result<Option<V>, LookupError> {
    match client.get::<J>(endpoint, path, params, None).await {
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
            .get::<AgentSelf>("agent_self", "/v1/agent/self", &[], None)
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

struct Watcher {
    key: (String, Option<String>),
    watch: Arc<Watch>,
    client: Arc<ConsulClient>,
    settings: Settings,
    watches: WatchMap,
    outage: Arc<OutageLog>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    failovers: watch::Receiver<u64>,
}

impl Watcher {
    async fn run(mut self) {
        let mut index: u64 = 0;
        let mut failures: u32 = 0;
        let mut tokens = WATCH_BURST;
        let mut refilled = Instant::now();
        let path = format!("/v1/health/service/{}", self.key.0);
        let mut params = Vec::new();
        if let Some(dc) = &self.key.1 {
            params.push(("dc", dc.clone()));
        }
        loop {
            if lock(&self.watch.last_asked).elapsed() > self.settings.watch_idle {
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
                    _ = self.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
            tokens -= 1;
            // A blocking query needs a slot of the connection budget. Without one the view is
            // refreshed on demand: when a query finds it older than its TTL.
            // Blocking slots go to services asked more than once: a name asked once (a cold
            // start asks thousands) keeps no connection; the next query makes it a watch.
            if index > 0 && !self.watch.asked_again.load(Ordering::SeqCst) {
                self.watch.on_demand.store(true, Ordering::SeqCst);
                tokio::select! {
                    _ = self.shutdown.cancelled() => break,
                    _ = self.watch.demand.notified() => {
                        self.watch.asked_again.store(true, Ordering::SeqCst);
                    }
                    _ = tokio::time::sleep(SLOT_RETRY) => continue,
                }
            }
            let slot = if index > 0 {
                self.client.try_blocking_slot()
            } else {
                None
            };
            if index > 0 && slot.is_none() {
                self.watch.on_demand.store(true, Ordering::SeqCst);
                tokio::select! {
                    _ = self.shutdown.cancelled() => break,
                    _ = self.watch.demand.notified() => {}
                    // Look again for a free slot (and for idleness) now and then.
                    _ = tokio::time::sleep(SLOT_RETRY) => continue,
                }
            }
            self.watch
                .on_demand
                .store(slot.is_none() && index > 0, Ordering::SeqCst);
            let blocking = slot.as_ref().map(|_| (index, self.settings.watch_wait));
            let request =
                self.client
                    .get::<Vec<HealthEntry>>("health_service", &path, &params, blocking);
            self.failovers.borrow_and_update();
            let result = tokio::select! {
                _ = self.shutdown.cancelled() => break,
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
                    self.outage.ok();
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
                        self.metrics
                            .consul_healthy_instances
                            .with_label_values(&[self.key.0.as_str()])
                            .set(
                                i64::try_from(view.healthy_count(self.settings.only_passing))
                                    .unwrap_or(i64::MAX),
                            );
                        if matches!(&*self.watch.state.borrow(), ViewState::Ready(_)) {
                            self.metrics.consul_health_changes.inc();
                        }
                        self.watch
                            .state
                            .send_replace(ViewState::Ready(Arc::new(view)));
                    }
                    index = new_index;
                }
                Err(ClientError::NoSuchDatacenter) => {
                    self.outage.ok();
                    self.watch.state.send_replace(ViewState::NoDatacenter);
                    failures = failures.saturating_add(1);
                    index = 0;
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(self.settings.default_service_ttl.max(BACKOFF_CAP)) => {}
                    }
                }
                Err(e) => {
                    self.outage.failed(&e);
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
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff(failures)) => {}
                    }
                }
            }
        }
        let mut watches = lock(&self.watches);
        if watches
            .get(&self.key)
            .is_some_and(|w| Arc::ptr_eq(w, &self.watch))
        {
            watches.remove(&self.key);
            self.metrics.consul_watchers.dec();
            let _ = self
                .metrics
                .consul_healthy_instances
                .remove_label_values(&[self.key.0.as_str()]);
        }
    }
}

#[async_trait]
impl Backend for HttpBackend {
    async fn local_datacenter(&self) -> Option<String> {
        // Never asked on the query path: `discover_datacenter` fills it in the background.
        lock(&self.datacenter).clone()
    }

    async fn service(
        &self,
        service: &str,
        dc: Option<&str>,
    ) -> Result<Arc<ServiceView>, LookupError> {
        let w = self.watch_for((service.to_owned(), dc.map(str::to_owned)));
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
        let client = self.client.clone();
        let outage = self.outage.clone();
        let path = format!("/v1/catalog/node/{node}");
        let params: Vec<(&'static str, String)> =
            dc.map(|d| vec![("dc", d.to_owned())]).unwrap_or_default();
        let node_ttl = self.settings.node_ttl;
        self.nodes
            .get(
                format!("{node}|{}", dc.unwrap_or("")),
                move |_| node_ttl,
                self.settings.stale_for,
                move || {
                    async move {
                        fetch_one(
                            &client,
                            &outage,
                            "catalog_node",
                            &path,
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
        let client = self.client.clone();
        let outage = self.outage.clone();
        let path = format!("/v1/query/{name}/execute");
        let params: Vec<(&'static str, String)> =
            dc.map(|d| vec![("dc", d.to_owned())]).unwrap_or_default();
        let default_ttl = self.settings.default_service_ttl;
        self.queries
            .get(
                format!("{name}|{}", dc.unwrap_or("")),
                move |v: &Option<Arc<QueryView>>| {
                    v.as_ref().and_then(|q| q.ttl).unwrap_or(default_ttl)
                },
                self.settings.stale_for,
                move || {
                    async move {
                        fetch_one(
                            &client,
                            &outage,
                            "query_execute",
                            &path,
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
