//! The HTTP backend: one watcher per asked view (service, datacenter, kind, tenancy: a
//! [`ViewKey`]), kept fresh by Consul blocking
//! queries; nodes and prepared queries fetched on demand and kept for their TTL. Every view is
//! replaced whole (readers hold an `Arc` of the old one until they are done), and the last known
//! view keeps being served while Consul is unreachable, for up to `consul.stale_for`.
//!
//! Views beyond the blocking budget learn of health changes from a datacenter-wide change feed
//! ([`Feed`]): blocking queries on `/v1/health/state/critical` and `/warning`, whose successive
//! results are diffed to find the services whose health changed; only those views are patched
//! (or, when a patch cannot be exact, fetched again).
//!
//! The parts live beside this file: [`super::views`] (the watched views), [`super::watcher`],
//! [`super::feed`], [`super::freshness`] (when a view without a blocking query is current without
//! a fetch), [`super::on_demand`], [`super::agent`], [`super::outage`], and
//! [`super::inventory`] (what exists).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::FutureExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::addrs::WanTranslation;
use super::agent::{discover_datacenter, probe_agents};
use super::catalog::{CatalogNodeJson, NodeView, QueryExecuteJson, QueryView, ServiceView};
use super::client::{blocking_timeout, ClientError, ConsulClient, REQUEST_TIMEOUT};
use super::feed::{
    feed_scope, stop_when_unused, Feed, FeedShared, HealthLists, RunningFeeds, FEED_STATES,
};
use super::freshness::{FeedPulse, Sources, Vouching};
use super::inventory::{Inventory, NodeAddresses, MAX_REMOTE_DATACENTERS};
use super::name::{Tenancy, ViewKey};
use super::on_demand::OnDemand;
use super::outage::OutageLog;
use super::ptr::{PtrName, ServiceAddresses};
use super::views::{ServedView, ServiceSeries, ViewState, Watch, WatchMap};
use super::watcher::{Settings, Watcher, WatcherContext};
use super::{Backend, LookupError, StillServed};
use crate::config::ConsulConfig;
use crate::explain::details::DetailEntry;
use crate::explain::gather::{AgentState, KeptView, ViewPeek};
use crate::lock::lock;
use crate::metrics::Metrics;

/// How long the first queries for a service wait for its first fetch before SERVFAIL (the
/// fetch goes on; later queries get its result). Within glibc's 5 s per try.
pub(super) const FIRST_FETCH_WAIT: Duration = REQUEST_TIMEOUT;

/// How long a query waits for a view without a blocking query of its own to be fetched again
/// after the catalog of its scope changed (a registration or deregistration there). One
/// request's round trip normally; past it (Consul slow or away) the view as it is is served.
const CATALOG_REFRESH_WAIT: Duration = Duration::from_secs(1);

/// Bound on service views watched at once (one watcher task, view and `Watch` each, about
/// 3.5 KiB at 10 instances: 70 MiB at the bound). Only services the inventory found in Consul
/// get a watcher, and idle ones stop after `consul.watch_idle`; beyond the bound a new service
/// gets SERVFAIL, counted in `limit_drops_total{limit="watchers"}`. Twice the 10,000 services
/// the forwarder is measured at.
pub(crate) const MAX_WATCHERS: usize = 20_000;

/// How precisely a view the feeds vouch for records that it was confirmed: it is compared with
/// TTLs of seconds, and a write per query would move the watch between the answering cores.
const CONFIRMED_GRANULARITY: Duration = Duration::from_millis(100);

pub(crate) struct HttpBackend {
    pub(super) client: Arc<ConsulClient>,
    pub(super) settings: Settings,
    pub(super) watches: WatchMap,
    pub(super) nodes: Arc<OnDemand<Option<Arc<NodeView>>>>,
    pub(super) queries: Arc<OnDemand<Option<Arc<QueryView>>>>,
    /// `consul.datacenter`, or what `/v1/agent/self` reports once it has answered.
    pub(super) datacenter: Arc<Mutex<Option<String>>>,
    pub(super) outage: Arc<OutageLog>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) shutdown: CancellationToken,
    /// Bumped when the client fails over to another agent: watchers drop their (possibly hung)
    /// blocking query and ask the new agent at once.
    pub(super) failovers: watch::Receiver<u64>,
    /// The change feeds by datacenter. The local datacenter's start with its first view (a
    /// forwarder nobody asks Consul names costs Consul nothing) and then run for good; another
    /// datacenter's run while it has views, at most [`MAX_REMOTE_DATACENTERS`] of them.
    pub(super) feeds: RunningFeeds,
    pub(super) watcher_context: Arc<WatcherContext>,
    /// What exists in Consul: names it does not have are answered without a request.
    pub(super) inventory: Arc<Inventory>,
    /// The watched views' service addresses, for PTR answers (the nodes' are the inventory's).
    pub(super) service_addresses: ServiceAddresses,
}

impl HttpBackend {
    pub(crate) fn new(
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
            vouching: Vouching::new(config.watch_wait, blocking_timeout(config.watch_wait)),
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
            datacenter: datacenter.clone(),
        });
        HttpBackend {
            inventory,
            service_addresses: ServiceAddresses::new(),
            failovers,
            feeds: RunningFeeds::default(),
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

    /// `consul.translate_wan_addrs` and the agent's datacenter (if known yet), for the views
    /// built from on-demand answers.
    fn wan_translation(&self) -> (bool, Option<String>) {
        (
            self.settings.config.translate_wan_addrs,
            lock(&self.datacenter).clone(),
        )
    }

    /// A deferred check of the budget for lookups the inventory could not settle, spent only
    /// when the lookup really goes to Consul (not when a remembered answer serves it).
    pub(super) fn unchecked_budget(
        &self,
        checked: bool,
    ) -> impl FnOnce() -> Result<(), LookupError> + Send {
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

    /// A node or prepared-query answer from its on-demand cache, fetched with one request
    /// when it is missing or older than `ttl` (within the unchecked budget unless `checked`).
    async fn fetch_remembered<J, V>(
        &self,
        cache: &Arc<OnDemand<Option<Arc<V>>>>,
        key: String,
        checked: bool,
        ttl: impl Fn(&Option<Arc<V>>) -> Duration,
        fetch: OneFetch<impl FnOnce(J) -> Arc<V> + Send + 'static>,
    ) -> Result<Option<Arc<V>>, LookupError>
    where
        J: serde::de::DeserializeOwned + Send + 'static,
        V: Send + Sync + 'static,
    {
        let client = self.client.clone();
        let outage = self.outage.clone();
        let budget = self.unchecked_budget(checked);
        let OneFetch {
            endpoint,
            segments,
            params,
            convert,
        } = fetch;
        cache
            .get(key, ttl, self.settings.stale_for, move || {
                async move {
                    budget()?;
                    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
                    fetch_one(&client, &outage, endpoint, &segments, &params, convert).await
                }
                .boxed()
            })
            .await
    }

    /// The watch for `key`, started if new: `None` when it is new and [`MAX_WATCHERS`] run
    /// already, or when `checked` is false (the inventory could not tell whether the service
    /// exists) and the budget for such lookups is spent.
    /// `view`, or, when `w` has no blocking query and the catalog of its scope changed since
    /// it was last current (an instance registered, deregistered or changed, or a node changed:
    /// the change feed only sees health), the view fetched again. Consul is asked at most once
    /// per catalog change and view, however many queries come, and only for views someone asks
    /// for.
    async fn after_catalog_change(
        &self,
        key: &ViewKey,
        w: &Watch,
        view: Arc<ServiceView>,
    ) -> Arc<ServiceView> {
        if !w.on_demand.load(Ordering::SeqCst) {
            return view;
        }
        let (services, nodes) = self
            .inventory
            .catalog_indexes(key.dc.as_deref(), &key.tenancy);
        // A list index at or below the view's own `X-Consul-Index` is a change the view's last
        // fetch already holds (that fetch read Consul's state at an index at least as high): it
        // was made while the list's answer was on its way, e.g. for the other list's move, or
        // for the same list's previous index. Fetching again for it would fetch the same view,
        // and only at the next query for it, however late that comes.
        let fetched = w.index.load(Ordering::SeqCst);
        let services_moved =
            w.catalog_seen.fetch_max(services, Ordering::SeqCst) < services && services > fetched;
        // A node list that had not answered when the view was fetched (0) is taken at its first
        // index, as `freshness::same_index` does, rather than fetch every view of a cold start
        // twice.
        let nodes_before = w.nodes_seen.fetch_max(nodes, Ordering::SeqCst);
        let nodes_moved = nodes_before != 0 && nodes_before < nodes && nodes > fetched;
        if !services_moved && !nodes_moved {
            return view;
        }
        let fetched = w.fetched.notified();
        tokio::pin!(fetched);
        fetched.as_mut().enable();
        w.changed.notify_one();
        let _ = tokio::time::timeout(CATALOG_REFRESH_WAIT, fetched).await;
        let current = match &*w.state.borrow() {
            ViewState::Ready(current) => Some(current.clone()),
            _ => None,
        };
        current.unwrap_or(view)
    }

    pub(super) fn watch_for(&self, key: ViewKey, checked: bool) -> Option<Arc<Watch>> {
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
        let w = Arc::new(Watch::new());
        // The first fetch is at least as new as the catalog indexes known now.
        let (services, nodes) = self
            .inventory
            .catalog_indexes(key.dc.as_deref(), &key.tenancy);
        w.catalog_seen.store(services, Ordering::SeqCst);
        w.nodes_seen.store(nodes, Ordering::SeqCst);
        watches.insert(key.clone(), w.clone());
        self.metrics.consul_watchers.inc();
        // The feeds' table is taken after the watch table is let go (see `stop_when_unused`).
        drop(watches);
        let feed = self.start_feeds_for(&key);
        let catalog = self
            .inventory
            .catalog_pulse(key.dc.as_deref(), &key.tenancy);
        // Before the watcher starts: its first request records what it is based on.
        if let (Some(feed), Some(catalog)) = (feed, catalog) {
            w.freshness.follow(Sources { feed, catalog });
        }
        let task = Watcher {
            key,
            watch: w.clone(),
            cx: self.watcher_context.clone(),
            failovers: self.failovers.clone(),
        };
        tokio::spawn(task.run());
        Some(w)
    }

    /// Starts the change feeds of `key`'s datacenter unless they run; what they publish for
    /// views to follow, or `None` when no feed can patch the view.
    fn start_feeds_for(&self, key: &ViewKey) -> Option<Arc<FeedPulse>> {
        let local_dc = lock(&self.datacenter).clone();
        let scope = feed_scope(key, local_dc.as_deref())?;
        let mut running = lock(&self.feeds);
        if let Some(pulse) = running.get(&scope) {
            return Some(pulse.clone());
        }
        if scope.is_some() && running.keys().flatten().count() >= MAX_REMOTE_DATACENTERS {
            // That datacenter's views follow their TTLs and the catalog's changes.
            self.metrics
                .limit_drops
                .with_label_values(&["remote_feeds"])
                .inc();
            return None;
        }
        let stop = self.shutdown.child_token();
        let pulse = Arc::new(FeedPulse::default());
        running.insert(scope.clone(), pulse.clone());
        let remote = scope.is_some();
        let shared = FeedShared {
            scope,
            local_dc: self.datacenter.clone(),
            watches: self.watches.clone(),
            lists: Arc::new(Mutex::new(HealthLists::default())),
            metrics: self.metrics.clone(),
            series: self.watcher_context.series.clone(),
            only_passing: self.settings.only_passing,
            pulse: pulse.clone(),
        };
        for (list, state) in FEED_STATES.into_iter().enumerate() {
            let feed = Feed {
                state,
                list,
                client: self.client.clone(),
                outage: self.outage.clone(),
                shared: shared.clone(),
                watch_wait: self.settings.watch_wait,
                shutdown: stop.clone(),
                failovers: self.failovers.clone(),
            };
            tokio::spawn(feed.run());
        }
        if remote {
            tokio::spawn(stop_when_unused(
                shared,
                stop,
                self.feeds.clone(),
                self.settings.watch_idle,
            ));
        }
        Some(pulse)
    }
}

/// One non-blocking request for an on-demand answer: the endpoint's metric label, its path
/// segments (each encoded as one), its parameters (`dc` and the like), and how to turn the
/// JSON into the value.
struct OneFetch<C> {
    endpoint: &'static str,
    segments: Vec<String>,
    params: Vec<(&'static str, String)>,
    convert: C,
}

/// One on-demand GET: the body converted, `None` for a 404 or a `null` body. "No such
/// datacenter" is final (NXDOMAIN); any other failure marks an outage (stale data or SERVFAIL).
pub(super) async fn fetch_one<J: serde::de::DeserializeOwned, V>(
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

#[async_trait]
impl Backend for HttpBackend {
    fn peek_service(&self, key: &ViewKey) -> Result<ViewPeek, String> {
        self.peek(key)
    }

    async fn service_details(&self, key: &ViewKey) -> Result<Vec<DetailEntry>, String> {
        self.details(key).await
    }

    fn kept_views(&self, max: usize) -> (Vec<KeptView>, usize) {
        self.kept(max)
    }

    fn agents(&self) -> Vec<AgentState> {
        self.agent_states()
    }

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

    async fn service(&self, key: &ViewKey) -> Result<Arc<ServiceView>, LookupError> {
        // A watched service is answered from its view, which its watcher keeps exact (a
        // deregistered service's view empties): the inventory only decides what new state a
        // name may create, so a list gone wrong cannot hide a service that is being served.
        let watched = lock(&self.watches).contains_key(key);
        let checked = watched || self.inventory.service(key).await.checked()?;
        let service = key.service.as_str();
        let Some(w) = self.watch_for(key.clone(), checked) else {
            return Err(LookupError::Unavailable(
                "a bound on Consul lookups was reached (limit_drops_total)".into(),
            ));
        };
        w.touch();
        let mut rx = w.state.subscribe();
        // Cloned out of the channel's read guard, which must not live across an await.
        let state = {
            let waited = tokio::time::timeout(
                FIRST_FETCH_WAIT,
                rx.wait_for(|s| !matches!(s, ViewState::Pending)),
            )
            .await;
            match waited {
                Ok(Ok(state)) => Some(state.clone()),
                _ => None,
            }
        };
        let Some(state) = state else {
            return Err(LookupError::Unavailable(
                "Consul has not answered yet".into(),
            ));
        };
        match state {
            ViewState::Ready(view) => {
                let view = self.after_catalog_change(key, &w, view).await;
                let now = Instant::now();
                if w.on_demand.load(Ordering::SeqCst)
                    && w.freshness.current(now, self.settings.vouching)
                {
                    // Known current without a request: its TTL starts over.
                    w.last_confirmed.store_coarse(now, CONFIRMED_GRANULARITY);
                }
                let confirmed = w.last_confirmed.load();
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

    /// A view with a blocking query of its own (so nothing to wake on demand and no catalog
    /// change to wait for), ready and confirmed within `stale_for`: what `service` returns at
    /// once for it. The check holds the watch itself, so the hot path skips the table.
    fn serving(&self, key: &ViewKey, view: &Arc<ServiceView>) -> Option<Box<dyn StillServed>> {
        let w = lock(&self.watches).get(key).cloned()?;
        let served = ServedView::new(w, view, self.settings.stale_for, self.settings.vouching)?;
        served
            .still_served(Instant::now())
            .then(|| Box::new(served) as Box<dyn StillServed>)
    }

    async fn node(
        &self,
        node: &str,
        dc: Option<&str>,
        tenancy: &Tenancy,
    ) -> Result<Option<Arc<NodeView>>, LookupError> {
        // Validated labels hold no `|`.
        let part = |l: Option<&str>| l.unwrap_or_default().to_owned();
        let key = format!(
            "{node}|{}|{}|{}|{}",
            dc.unwrap_or(""),
            part(tenancy.peer()),
            part(tenancy.ns()),
            part(tenancy.partition())
        );
        // A remembered answer goes on being served and refreshed, as a watched service does.
        let checked =
            self.nodes.remembers(&key) || self.inventory.node(node, dc, tenancy).await.checked()?;
        let node_ttl = self.settings.node_ttl;
        let (translate, local_dc) = self.wan_translation();
        let asked_dc = dc.or(local_dc.as_deref()).unwrap_or_default().to_owned();
        let fetch = OneFetch {
            endpoint: "catalog_node",
            segments: vec!["v1".into(), "catalog".into(), "node".into(), node.into()],
            params: tenancy.params(dc),
            convert: move |n: CatalogNodeJson| {
                let wan = WanTranslation {
                    enabled: translate,
                    local_dc: local_dc.as_deref(),
                };
                Arc::new(NodeView::from_json(&n.node, wan, &asked_dc))
            },
        };
        self.fetch_remembered(&self.nodes, key, checked, move |_| node_ttl, fetch)
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
        let default_ttl = self.settings.default_service_ttl;
        let (translate, local_dc) = self.wan_translation();
        let ttl =
            move |v: &Option<Arc<QueryView>>| v.as_ref().and_then(|q| q.ttl).unwrap_or(default_ttl);
        // Consul sorts by round-trip time only within the agent's datacenter (a failover
        // result comes shuffled); a query the list does not show is taken as sorted, its
        // order kept as a cached Consul answer would keep it.
        let sorted = dc.is_none() && self.inventory.query_sorted(name).unwrap_or(true);
        let fetch = OneFetch {
            endpoint: "query_execute",
            segments: vec!["v1".into(), "query".into(), name.into(), "execute".into()],
            params: dc.map(|d| vec![("dc", d.to_owned())]).unwrap_or_default(),
            convert: move |q: QueryExecuteJson| {
                let ttl = q
                    .dns
                    .as_ref()
                    .and_then(|d| humantime::parse_duration(&d.ttl).ok());
                let datacenter = q.datacenter.to_ascii_lowercase();
                let in_local_dc = local_dc.as_deref().is_none_or(|l| l == datacenter);
                let wan = WanTranslation {
                    enabled: translate,
                    local_dc: local_dc.as_deref(),
                };
                Arc::new(QueryView {
                    service: Arc::new(ServiceView::from_entries_translated(
                        &q.nodes,
                        &datacenter,
                        wan,
                    )),
                    ttl,
                    keeps_order: sorted && in_local_dc,
                })
            },
        };
        self.fetch_remembered(&self.queries, key, checked, ttl, fetch)
            .await
    }

    fn may_know_address(&self, ip: IpAddr) -> bool {
        match self.inventory.node_addresses_now() {
            NodeAddresses::Loading => true,
            NodeAddresses::Known(names) if names.node_at(ip).is_some() => true,
            NodeAddresses::Known(_) | NodeAddresses::Unknown => self.service_at(ip).is_some(),
        }
    }

    async fn address_name(&self, ip: IpAddr) -> Option<PtrName> {
        let names = self.inventory.node_addresses().await;
        if let Some(node) = names.as_ref().and_then(|n| n.node_at(ip)) {
            return Some(PtrName::Node(node.to_owned()));
        }
        self.service_at(ip).map(PtrName::Service)
    }
}

impl HttpBackend {
    fn service_at(&self, ip: IpAddr) -> Option<String> {
        self.service_addresses
            .lookup(ip, &self.watches, &self.metrics)
    }
}
