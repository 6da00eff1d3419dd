//! What exists in Consul: the datacenters, each asked datacenter's services and nodes, and the
//! prepared queries. Names come from clients, and a client can make up any number of them; with
//! the inventory, a name Consul does not have is answered NXDOMAIN here, without a request, a
//! watcher or a metric series of its own, and a name that appears later is answered as soon as
//! the catalog shows it.
//!
//! The service and node lists are kept by blocking queries (stale reads unless
//! `consul.allow_stale = false`, like Consul's own DNS interface: any server answers, and one
//! request per change); the datacenter list (Consul offers no blocking there) and the
//! prepared-query list are polled. A lookup the inventory cannot settle (a list not loaded
//! because Consul is away, the agent refusing the prepared query list, a list the token only
//! partly sees) goes to Consul as before, within a small budget shared by all such lookups, so a
//! flood of made-up names costs Consul a few requests a second at most.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::IgnoredAny;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::client::{next_index, ClientError, ConsulClient, REQUEST_TIMEOUT};
use super::freshness::{CatalogPulse, ListPulse};
use super::name::{Tenancy, ViewKey};
use super::outage::OutageLog;
use super::ptr::{count_dropped, AddressIndex, NodeAddressJson};
use super::retry::backoff;
use super::LookupError;
use crate::lock::lock;
use crate::metrics::Metrics;
use crate::token_bucket::{Rate, TokenBucket};

/// Shortest time between the starts of two requests of one list. Under churn a blocking query
/// returns at once; this bounds the requests (and the decoding of a list of 10,000 services) to
/// two a second, while a new service still shows within about this long.
const LIST_INTERVAL: Duration = Duration::from_millis(500);

/// How often a list is fetched again when no blocking slot of the connection budget is free
/// (a tiny `consul.max_connections`, or a cold start's fetches holding every slot), while it
/// waits in line for the next slot given back: the delay before a newly registered name is
/// answered, and before a registration or deregistration reaches the views without a blocking
/// query. One second keeps that under the 2 s the views promise (with the view's own fetch
/// after it), at one list request a second.
const LIST_POLL: Duration = Duration::from_secs(1);

/// How long a catalog list's non-blocking request (its first load, or a poll) may take. The
/// node list of a 100,000-node catalog is 25 MB of JSON (1.3 s from the benchmark's simulator
/// on an idle core). At `REQUEST_TIMEOUT` (2 s) the benchmark saw every list's first load
/// abandoned and asked again, twice in a row, the service list waiting behind the node list on
/// the simulator's one thread, and names past the unchecked budget were SERVFAIL for the whole
/// run (5 of 29 runs); at 10 s, 0 of 15. A hung agent is still caught within seconds by the
/// probe (`agent::probe_agents`).
const LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the datacenter list is fetched (`/v1/catalog/datacenters` cannot block). New
/// datacenters join a federation rarely, and by hand.
const DATACENTERS_REFRESH: Duration = Duration::from_secs(30);

/// How often the prepared-query list is fetched (`/v1/query` cannot block). A query created
/// since is answered after at most this long.
const QUERIES_REFRESH: Duration = Duration::from_secs(10);

/// How long to wait before asking again for a list the agent refused (403 for a token without
/// `query:read`, 404 on an agent without the endpoint): lookups of that kind go unchecked, within
/// the budget below, meanwhile.
const REFUSED_RETRY: Duration = Duration::from_secs(300);

/// Remote datacenters (and cluster peers, namespaces, partitions: every scope but the local
/// default one) whose lists are kept at once. Bounded by what Consul reports anyway (its
/// datacenters, peerings, namespaces and partitions); this keeps a federation of hundreds from
/// costing two blocking queries each.
pub(crate) const MAX_REMOTE_DATACENTERS: usize = 16;

/// How often the lists of cluster peers, namespaces and partitions are fetched (none of them
/// can block). They change by hand, rarely; a new one is answered after at most this long.
const TENANCY_REFRESH: Duration = Duration::from_secs(30);

/// Lists of peers and namespaces kept at once: one per partition asked (and the partition
/// list). Partitions are checked against their own list first, so only real ones count.
const MAX_TENANCY_LISTS: usize = 16;

/// How long a lookup waits for a list's first load before going unchecked. Within glibc's 5 s
/// per try, like a service's first fetch.
const FIRST_LOAD_WAIT: Duration = REQUEST_TIMEOUT;

/// The budget of lookups the inventory could not check (see the module doc): a burst of this
/// many, then this many per second. A real name asked while the lists are away still gets
/// through (every later query for it is served by its watcher or its remembered answer); a
/// flood of made-up names costs Consul at most this rate.
const UNCHECKED: Rate = Rate {
    per_second: 2.0,
    burst: 20.0,
};

/// What the inventory says of a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Consul has it: look it up.
    Exists,
    /// The datacenter label names no datacenter Consul knows: NXDOMAIN, no request.
    NoSuchDatacenter,
    /// Consul's lists are complete and do not have it: NXDOMAIN, no request.
    NoSuchName,
    /// The lists cannot tell: ask Consul, within the budget for unchecked lookups.
    Unchecked,
}

impl Verdict {
    /// Whether the name was checked (`Ok(false)`: unchecked, so within the budget), or the
    /// lookup's NXDOMAIN when Consul does not have the name.
    pub(crate) fn checked(self) -> Result<bool, LookupError> {
        match self {
            Verdict::Exists => Ok(true),
            Verdict::Unchecked => Ok(false),
            Verdict::NoSuchDatacenter => Err(LookupError::NoSuchDatacenter),
            Verdict::NoSuchName => Err(LookupError::NoSuchName),
        }
    }
}

/// The names of one list: exact names, and (prepared-query templates) prefixes that match
/// every name they begin.
#[derive(Debug, Default)]
pub(crate) struct Names {
    exact: HashSet<String>,
    prefixes: Vec<String>,
    /// False when Consul said the token does not see every item
    /// (`X-Consul-Results-Filtered-By-ACLs`): a missing name may still exist.
    complete: bool,
    /// Prepared queries only: the names, IDs and template prefixes whose results Consul sorts
    /// by round-trip time (`Service.Near`).
    sorted: HashSet<String>,
    /// The local datacenter's node list only: the nodes' addresses, for PTR answers. Loaded,
    /// kept while Consul is away and replaced with the names, by the same request.
    addresses: AddressIndex,
}

impl Names {
    fn new(exact: impl IntoIterator<Item = String>, complete: bool) -> Names {
        Names {
            exact: exact.into_iter().map(|n| n.to_ascii_lowercase()).collect(),
            prefixes: Vec::new(),
            complete,
            sorted: HashSet::new(),
            addresses: AddressIndex::default(),
        }
    }

    /// Does Consul sort prepared query `name`'s result (lowercased)? By its exact name or ID,
    /// else by the longest template prefix it matches, as Consul resolves a name; `None` when
    /// the list has no such query.
    fn sorted(&self, name: &str) -> Option<bool> {
        if self.exact.contains(name) {
            return Some(self.sorted.contains(name));
        }
        self.prefixes
            .iter()
            .filter(|p| name.starts_with(p.as_str()))
            .max_by_key(|p| p.len())
            .map(|p| self.sorted.contains(p))
    }

    /// The node whose `Address` is `ip` (local node list only).
    pub(crate) fn node_at(&self, ip: std::net::IpAddr) -> Option<&str> {
        self.addresses.get(ip)
    }

    /// The verdict on `name` (lowercased).
    pub(crate) fn verdict(&self, name: &str) -> Verdict {
        if self.exact.contains(name) || self.prefixes.iter().any(|p| name.starts_with(p)) {
            Verdict::Exists
        } else if self.complete {
            Verdict::NoSuchName
        } else {
            Verdict::Unchecked
        }
    }
}

#[derive(Clone, Debug)]
enum List {
    /// Not loaded yet; the first request is on its way.
    Pending,
    Ready(Arc<Names>),
    /// Loaded once, but the last refresh failed (Consul away): names in it still exist (their
    /// last known state keeps being served), but a name missing from it may have been
    /// registered since, so a miss is unchecked, never NXDOMAIN because Consul is away.
    Stale(Arc<Names>),
    /// Never loaded (Consul away, or the agent refuses the list).
    Unavailable,
}

impl List {
    /// The verdict on `name`, `None` when there is no list to tell.
    fn verdict(&self, name: &str) -> Option<Verdict> {
        match self {
            List::Ready(names) => Some(names.verdict(name)),
            List::Stale(names) => Some(match names.verdict(name) {
                Verdict::Exists => Verdict::Exists,
                _ => Verdict::Unchecked,
            }),
            List::Pending | List::Unavailable => None,
        }
    }
}

fn new_list() -> watch::Sender<List> {
    watch::channel(List::Pending).0
}

/// The two lists of one datacenter.
struct DatacenterLists {
    services: watch::Sender<List>,
    /// Both lists' `X-Consul-Index` and liveness: the service list's moves with every
    /// registration, deregistration and instance change in the scope (Consul's services
    /// table), the node list's with every node change (its address included).
    pulse: Arc<CatalogPulse>,
    nodes: watch::Sender<List>,
    last_asked: Mutex<Instant>,
    stop: CancellationToken,
}

impl DatacenterLists {
    fn new(stop: CancellationToken) -> DatacenterLists {
        DatacenterLists {
            services: new_list(),
            pulse: Arc::new(CatalogPulse::default()),
            nodes: new_list(),
            last_asked: Mutex::new(Instant::now()),
            stop,
        }
    }
}

/// The two kinds of catalog list kept by blocking queries.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Services,
    Nodes,
}

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Services => "catalog_services",
            Kind::Nodes => "catalog_nodes",
        }
    }

    fn segments(self) -> &'static [&'static str] {
        match self {
            Kind::Services => &["v1", "catalog", "services"],
            Kind::Nodes => &["v1", "catalog", "nodes"],
        }
    }
}

/// What a pair of catalog lists is kept for: a datacenter (`None`: the local one) and a tenancy
/// (`/v1/catalog/services?peer=p1` lists what a peer exports to us).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct ListScope {
    dc: Option<String>,
    tenancy: Tenancy,
}

/// The lists that say which cluster peers, namespaces and partitions exist. Peers and
/// namespaces belong to a partition (`None`: the token's own).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum TenancyKind {
    Peers,
    Namespaces,
    Partitions,
}

impl TenancyKind {
    fn what(self) -> &'static str {
        match self {
            TenancyKind::Peers => "cluster peer",
            TenancyKind::Namespaces => "namespace",
            TenancyKind::Partitions => "admin partition",
        }
    }

    fn endpoint(self) -> (&'static str, &'static [&'static str]) {
        match self {
            TenancyKind::Peers => ("peerings", &["v1", "peerings"]),
            TenancyKind::Namespaces => ("namespaces", &["v1", "namespaces"]),
            TenancyKind::Partitions => ("partitions", &["v1", "partitions"]),
        }
    }
}

/// A list of peers or namespaces of a partition (`None`: the token's own), or of partitions.
type TenancyListKey = (TenancyKind, Option<String>);

/// One element of `/v1/peerings`, `/v1/namespaces` or `/v1/partitions`: only the name is kept.
#[derive(serde::Deserialize)]
struct NamedJson {
    #[serde(rename = "Name", default)]
    name: String,
}

/// One element of `/v1/query`: the ways a query can be named in DNS.
#[derive(serde::Deserialize)]
struct QueryDefinitionJson {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "Template", default)]
    template: Option<QueryTemplateJson>,
    #[serde(rename = "Service", default)]
    service: Option<QueryServiceJson>,
}

#[derive(serde::Deserialize)]
struct QueryServiceJson {
    #[serde(rename = "Near", default)]
    near: String,
}

impl QueryDefinitionJson {
    /// Does Consul sort this query's results by round-trip time? `Near` names a node or
    /// `_agent` (here: the agent the forwarder asks, as for Consul's DNS on that host). `_ip`
    /// sorts from the requester's address, which over HTTP is the forwarder's own, so nothing
    /// is sorted; Consul shuffles instead.
    fn sorted(&self) -> bool {
        self.service
            .as_ref()
            .is_some_and(|s| !s.near.is_empty() && s.near != "_ip")
    }
}

#[derive(serde::Deserialize)]
struct QueryTemplateJson {
    #[serde(rename = "Type", default)]
    kind: String,
}

/// The prepared-query list as names: IDs and names match exactly; a `name_prefix_match`
/// template matches every name that begins with its name (the empty name matches all, as in
/// Consul).
fn query_names(list: Vec<QueryDefinitionJson>, complete: bool) -> Names {
    let mut names = Names::new(Vec::new(), complete);
    for q in list {
        let sorted = q.sorted();
        let name = q.name.to_ascii_lowercase();
        let mut keys = Vec::with_capacity(2);
        if q.template.is_some_and(|t| t.kind == "name_prefix_match") {
            names.prefixes.push(name.clone());
            keys.push(name);
        } else if !name.is_empty() {
            names.exact.insert(name.clone());
            keys.push(name);
        }
        if !q.id.is_empty() {
            let id = q.id.to_ascii_lowercase();
            names.exact.insert(id.clone());
            keys.push(id);
        }
        if sorted {
            names.sorted.extend(keys);
        }
    }
    names
}

/// What the list tasks share.
struct Shared {
    client: Arc<ConsulClient>,
    /// While Consul is known to be unreachable every list is treated as stale, even one whose
    /// own blocking query has not noticed yet.
    outage: Arc<OutageLog>,
    watch_wait: Duration,
    failovers: watch::Receiver<u64>,
    metrics: Arc<Metrics>,
}

/// The local node list's addresses as a PTR question finds them, without waiting.
pub(crate) enum NodeAddresses {
    /// The first load is on its way: wait for it ([`Inventory::node_addresses`]).
    Loading,
    /// Loaded (perhaps stale: the last known addresses are kept while Consul is away).
    Known(Arc<Names>),
    /// Never loaded: nothing is known.
    Unknown,
}

pub(crate) struct Inventory {
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// Remote lists not asked for this long stop (`consul.watch_idle`).
    idle: Duration,
    started: AtomicBool,
    datacenters: watch::Sender<List>,
    queries: watch::Sender<List>,
    local: Arc<DatacenterLists>,
    remote: Arc<Mutex<HashMap<ListScope, Arc<DatacenterLists>>>>,
    /// Peers, namespaces and partitions, each list started with the first name that needs it.
    tenancy_lists: Mutex<HashMap<TenancyListKey, watch::Sender<List>>>,
    unchecked: Mutex<TokenBucket>,
}

impl Inventory {
    pub(crate) fn new(
        client: Arc<ConsulClient>,
        outage: Arc<OutageLog>,
        watch_wait: Duration,
        idle: Duration,
        failovers: watch::Receiver<u64>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Inventory {
        Inventory {
            shared: Arc::new(Shared {
                client,
                outage,
                watch_wait,
                failovers,
                metrics: metrics.clone(),
            }),
            metrics,
            idle,
            started: AtomicBool::new(false),
            datacenters: new_list(),
            queries: new_list(),
            local: Arc::new(DatacenterLists::new(shutdown.child_token())),
            remote: Arc::new(Mutex::new(HashMap::new())),
            tenancy_lists: Mutex::new(HashMap::new()),
            unchecked: Mutex::new(TokenBucket::full(UNCHECKED, Instant::now())),
            shutdown,
        }
    }

    /// Starts the local lists with the first Consul lookup (a forwarder nobody asks Consul
    /// names costs Consul nothing).
    fn start(&self) {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        tokio::spawn(poll_datacenters(
            self.shared.clone(),
            self.datacenters.clone(),
            self.shutdown.clone(),
        ));
        tokio::spawn(poll_queries(
            self.shared.clone(),
            self.queries.clone(),
            self.shutdown.clone(),
        ));
        self.spawn_lists(None, &self.local);
    }

    fn spawn_lists(&self, scope: Option<&ListScope>, lists: &Arc<DatacenterLists>) {
        for kind in [Kind::Services, Kind::Nodes] {
            let list = match kind {
                Kind::Services => lists.services.clone(),
                Kind::Nodes => lists.nodes.clone(),
            };
            let task = ListTask {
                shared: self.shared.clone(),
                pulse: lists.pulse.clone(),
                kind,
                scope: scope.cloned().unwrap_or_default(),
                list,
                stop: lists.stop.clone(),
            };
            tokio::spawn(task.run());
        }
        if let Some(scope) = scope {
            // A remote scope's lists stop once nobody asked for it in `idle`.
            tokio::spawn(reap_when_idle(
                scope.clone(),
                lists.clone(),
                self.remote.clone(),
                self.idle,
            ));
        }
    }

    /// The catalog lists' indexes and liveness in the scope of `dc` and `tenancy` (`None` when
    /// no list of that scope is kept). Never starts a list.
    pub(crate) fn catalog_pulse(
        &self,
        dc: Option<&str>,
        tenancy: &Tenancy,
    ) -> Option<Arc<CatalogPulse>> {
        if dc.is_none() && tenancy.is_default() {
            return Some(self.local.pulse.clone());
        }
        let scope = ListScope {
            dc: dc.map(str::to_owned),
            tenancy: tenancy.clone(),
        };
        lock(&self.remote).get(&scope).map(|l| l.pulse.clone())
    }

    /// The (service list, node list) indexes in the scope of `dc` and `tenancy` (0 while none
    /// was read, or when no list of that scope is kept): they move with every registration,
    /// deregistration and node change there. Never starts a list.
    pub(crate) fn catalog_indexes(&self, dc: Option<&str>, tenancy: &Tenancy) -> (u64, u64) {
        self.catalog_pulse(dc, tenancy)
            .map_or((0, 0), |p| (p.services.index(), p.nodes.index()))
    }

    /// The lists of `scope` (the local datacenter's default tenancy when both are absent),
    /// started if new. `None` when [`MAX_REMOTE_DATACENTERS`] remote scopes are kept already.
    fn lists(&self, dc: Option<&str>, tenancy: &Tenancy) -> Option<Arc<DatacenterLists>> {
        if dc.is_none() && tenancy.is_default() {
            return Some(self.local.clone());
        }
        let scope = ListScope {
            dc: dc.map(str::to_owned),
            tenancy: tenancy.clone(),
        };
        let lists = {
            let mut remote = lock(&self.remote);
            if let Some(lists) = remote.get(&scope) {
                *lock(&lists.last_asked) = Instant::now();
                return Some(lists.clone());
            }
            if remote.len() >= MAX_REMOTE_DATACENTERS {
                return None;
            }
            let lists = Arc::new(DatacenterLists::new(self.shutdown.child_token()));
            remote.insert(scope.clone(), lists.clone());
            lists
        };
        self.spawn_lists(Some(&scope), &lists);
        Some(lists)
    }

    /// The list of `kind` (peers and namespaces: of `partition`), started if new; `None` when
    /// [`MAX_TENANCY_LISTS`] are kept already.
    fn tenancy_list(
        &self,
        kind: TenancyKind,
        partition: Option<&str>,
    ) -> Option<watch::Sender<List>> {
        let key = (kind, partition.map(str::to_owned));
        let mut lists = lock(&self.tenancy_lists);
        if let Some(list) = lists.get(&key) {
            return Some(list.clone());
        }
        if lists.len() >= MAX_TENANCY_LISTS {
            return None;
        }
        let list = new_list();
        lists.insert(key, list.clone());
        tokio::spawn(poll_tenancy(
            self.shared.clone(),
            kind,
            partition.map(str::to_owned),
            list.clone(),
            self.shutdown.clone(),
        ));
        Some(list)
    }

    /// Do the peer, namespace and partition of `tenancy` exist? The partition is checked
    /// first, so a made-up one starts no list of its peers or namespaces.
    async fn tenancy(&self, tenancy: &Tenancy) -> Verdict {
        let partition = tenancy.partition();
        let checks = [
            (TenancyKind::Partitions, None, partition),
            (TenancyKind::Namespaces, partition, tenancy.ns()),
            (TenancyKind::Peers, partition, tenancy.peer()),
        ];
        let mut overall = Verdict::Exists;
        for (kind, of, name) in checks {
            let Some(name) = name else { continue };
            let v = match self.tenancy_list(kind, of) {
                Some(list) => verdict(&list, name, &self.shared.outage).await,
                None => Verdict::Unchecked,
            };
            match v {
                Verdict::Exists => {}
                Verdict::Unchecked => overall = Verdict::Unchecked,
                other => return other,
            }
        }
        overall
    }

    async fn datacenter(&self, dc: Option<&str>) -> Verdict {
        let Some(dc) = dc else {
            return Verdict::Exists;
        };
        match verdict(&self.datacenters, dc, &self.shared.outage).await {
            Verdict::NoSuchName => Verdict::NoSuchDatacenter,
            v => v,
        }
    }

    /// Does the service of `key` exist in its datacenter and tenancy? (For `.connect` and
    /// `.ingress` too: the service they front is in the same list.)
    pub(crate) async fn service(&self, key: &ViewKey) -> Verdict {
        let dc = key.dc.as_deref();
        self.catalog(Kind::Services, &key.service, dc, &key.tenancy)
            .await
    }

    /// Does node `name` exist in `dc` and `tenancy`?
    pub(crate) async fn node(&self, name: &str, dc: Option<&str>, tenancy: &Tenancy) -> Verdict {
        self.catalog(Kind::Nodes, name, dc, tenancy).await
    }

    /// Is `name` a prepared query (by name, ID or template)? Only the local datacenter's list
    /// is kept: a query in another datacenter is checked against that datacenter's existence.
    pub(crate) async fn query(&self, name: &str, dc: Option<&str>) -> Verdict {
        self.start();
        match self.datacenter(dc).await {
            Verdict::Exists if dc.is_none() => {}
            Verdict::Exists => return Verdict::Unchecked,
            other => return other,
        }
        verdict(&self.queries, name, &self.shared.outage).await
    }

    /// Does Consul sort prepared query `name`'s results (by its `Near`)? `None` when the list
    /// cannot tell (not loaded, refused, or the query is not in it).
    pub(crate) fn query_sorted(&self, name: &str) -> Option<bool> {
        match &*self.queries.borrow() {
            List::Ready(names) | List::Stale(names) => names.sorted(name),
            List::Pending | List::Unavailable => None,
        }
    }

    async fn catalog(
        &self,
        kind: Kind,
        name: &str,
        dc: Option<&str>,
        tenancy: &Tenancy,
    ) -> Verdict {
        self.start();
        match self.datacenter(dc).await {
            Verdict::Exists => {}
            other => return other,
        }
        if !tenancy.is_default() {
            match self.tenancy(tenancy).await {
                // An unchecked tenancy (its list refused) still gets its own catalog lists,
                // which are as exact for a peer or namespace that does not exist (empty).
                Verdict::Exists | Verdict::Unchecked => {}
                other => return other,
            }
        }
        let Some(lists) = self.lists(dc, tenancy) else {
            return Verdict::Unchecked;
        };
        let list = match kind {
            Kind::Services => &lists.services,
            Kind::Nodes => &lists.nodes,
        };
        verdict(list, name, &self.shared.outage).await
    }

    /// The local node list's addresses now (the lists start with the first question that
    /// needs them).
    pub(crate) fn node_addresses_now(&self) -> NodeAddresses {
        self.start();
        match &*self.local.nodes.borrow() {
            List::Pending => NodeAddresses::Loading,
            List::Ready(names) | List::Stale(names) => NodeAddresses::Known(names.clone()),
            List::Unavailable => NodeAddresses::Unknown,
        }
    }

    /// The local node list's addresses, waiting up to [`FIRST_LOAD_WAIT`] for its first load;
    /// `None` when it could not be loaded.
    pub(crate) async fn node_addresses(&self) -> Option<Arc<Names>> {
        self.start();
        let mut rx = self.local.nodes.subscribe();
        let waited = tokio::time::timeout(
            FIRST_LOAD_WAIT,
            rx.wait_for(|s| !matches!(s, List::Pending)),
        )
        .await;
        match waited {
            Ok(Ok(state)) => match &*state {
                List::Ready(names) | List::Stale(names) => Some(names.clone()),
                List::Pending | List::Unavailable => None,
            },
            _ => None,
        }
    }

    /// May an unchecked lookup go to Consul now? Counted in `limit_drops_total` when not.
    pub(crate) fn allow_unchecked(&self) -> bool {
        let allowed = lock(&self.unchecked)
            .take(UNCHECKED, Instant::now())
            .is_ok();
        if !allowed {
            self.metrics
                .limit_drops
                .with_label_values(&["unverified_lookups"])
                .inc();
        }
        allowed
    }
}

/// The verdict of `list` on `name`, waiting up to [`FIRST_LOAD_WAIT`] for its first load;
/// unchecked when there is no list to tell.
async fn verdict(list: &watch::Sender<List>, name: &str, outage: &OutageLog) -> Verdict {
    let mut rx = list.subscribe();
    let state = match tokio::time::timeout(
        FIRST_LOAD_WAIT,
        rx.wait_for(|s| !matches!(s, List::Pending)),
    )
    .await
    {
        Ok(Ok(state)) => state.clone(),
        _ => return Verdict::Unchecked,
    };
    let state = match state {
        List::Ready(names) if outage.is_down() => List::Stale(names),
        other => other,
    };
    state.verdict(name).unwrap_or(Verdict::Unchecked)
}

/// A failed load makes a loaded list stale (see [`List::Stale`]) and a pending one
/// unavailable, so lookups stop waiting for it.
fn mark_failed(list: &watch::Sender<List>) {
    list.send_if_modified(|state| match state {
        List::Pending => {
            *state = List::Unavailable;
            true
        }
        List::Ready(names) => {
            *state = List::Stale(names.clone());
            true
        }
        List::Stale(_) | List::Unavailable => false,
    });
}

/// Stops a remote scope's lists once nobody asked for it in `idle`.
async fn reap_when_idle(
    scope: ListScope,
    lists: Arc<DatacenterLists>,
    remote: Arc<Mutex<HashMap<ListScope, Arc<DatacenterLists>>>>,
    idle: Duration,
) {
    loop {
        let since = lock(&lists.last_asked).elapsed();
        if since >= idle {
            break;
        }
        tokio::select! {
            _ = lists.stop.cancelled() => return,
            _ = tokio::time::sleep(idle - since) => {}
        }
    }
    lists.stop.cancel();
    let mut remote = lock(&remote);
    if remote.get(&scope).is_some_and(|l| Arc::ptr_eq(l, &lists)) {
        remote.remove(&scope);
    }
}

/// Keeps one catalog list of one scope by blocking queries.
struct ListTask {
    shared: Arc<Shared>,
    /// Where the lists' indexes and liveness are published, for views' freshness.
    pulse: Arc<CatalogPulse>,
    kind: Kind,
    scope: ListScope,
    list: watch::Sender<List>,
    stop: CancellationToken,
}

impl ListTask {
    async fn run(self) {
        self.keep().await;
        // Stopped: what the list said no longer holds for anyone still following it.
        self.pulse().fail();
    }

    async fn keep(&self) {
        let mut failovers = self.shared.failovers.clone();
        let params = self.scope.tenancy.params(self.scope.dc.as_deref());
        let mut index: u64 = 0;
        let mut failures: u32 = 0;
        // Kept between requests, as a feed keeps its own: given back after each, a service
        // watcher would take it and the list would poll.
        let mut slot = None;
        loop {
            let started = Instant::now();
            // One of the slots kept for lists and feeds (`client::SHARED_BLOCKING_SLOTS`), taken
            // from the start: a list without one polls, and a node list at 100,000 nodes is
            // 25 MB of JSON a poll.
            if slot.is_none() {
                slot = self.shared.client.try_shared_slot();
            }
            // The first request (index 0) is a plain one, slot or not.
            let blocking = slot
                .as_ref()
                .filter(|_| index > 0)
                .map(|_| (index, self.shared.watch_wait));
            let asked_at = index;
            failovers.borrow_and_update();
            let request = self.fetch(&params, blocking);
            let result = tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = failovers.changed() => {
                    index = 0;
                    self.pulse().fail();
                    continue;
                }
                r = request => r,
            };
            let succeeded = result.is_ok();
            let pause = match result {
                Ok((names, new_index)) => {
                    // An answer ends an outage, as a watcher's or a feed's does; failures are
                    // logged by the watchers and the probe.
                    self.shared.outage.ok();
                    failures = 0;
                    index = next_index(index, new_index);
                    self.pulse().beat(new_index, Instant::now());
                    self.list.send_replace(List::Ready(Arc::new(names)));
                    // Polling only when a blocking query was due and no slot was free.
                    if blocking.is_none() && asked_at > 0 {
                        LIST_POLL
                    } else {
                        LIST_INTERVAL.saturating_sub(started.elapsed())
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, list = self.kind.endpoint(), "catalog list request failed");
                    index = 0;
                    slot = None;
                    failures = failures.saturating_add(1);
                    mark_failed(&self.list);
                    self.pulse().fail();
                    backoff(failures)
                }
            };
            let queue = succeeded && slot.is_none() && index > 0;
            tokio::select! {
                _ = self.stop.cancelled() => return,
                queued = self.shared.client.sleep_queued_for_slot(pause, queue) => {
                    slot = slot.or(queued);
                }
            }
        }
    }

    /// This list's half of the catalog pulse.
    fn pulse(&self) -> &ListPulse {
        match self.kind {
            Kind::Services => &self.pulse.services,
            Kind::Nodes => &self.pulse.nodes,
        }
    }

    async fn fetch(
        &self,
        params: &[(&'static str, String)],
        blocking: Option<(u64, Duration)>,
    ) -> Result<(Names, u64), ClientError> {
        let client = &self.shared.client;
        let (segments, endpoint) = (self.kind.segments(), self.kind.endpoint());
        match self.kind {
            Kind::Services => {
                let r = client
                    .get_within::<HashMap<String, IgnoredAny>>(
                        endpoint,
                        segments,
                        params,
                        blocking,
                        LIST_TIMEOUT,
                    )
                    .await?;
                let names = r.value.unwrap_or_default().into_keys();
                Ok((Names::new(names, !r.filtered), r.index))
            }
            Kind::Nodes => {
                let r = client
                    .get_within::<Vec<NodeAddressJson>>(
                        endpoint,
                        segments,
                        params,
                        blocking,
                        LIST_TIMEOUT,
                    )
                    .await?;
                let nodes = r.value.unwrap_or_default();
                // Consul's PTR answers come from the local datacenter only.
                let addresses = if self.scope == ListScope::default() {
                    let (index, dropped) = AddressIndex::from_nodes(&nodes);
                    count_dropped(&self.shared.metrics, dropped);
                    index
                } else {
                    AddressIndex::default()
                };
                let mut names = Names::new(nodes.into_iter().map(|n| n.node), !r.filtered);
                names.addresses = addresses;
                Ok((names, r.index))
            }
        }
    }
}

/// Keeps the datacenter list (`/v1/catalog/datacenters`, which cannot block).
async fn poll_datacenters(
    shared: Arc<Shared>,
    list: watch::Sender<List>,
    shutdown: CancellationToken,
) {
    let fetch = || async {
        let r = shared
            .client
            .get::<Vec<String>>(
                "catalog_datacenters",
                &["v1", "catalog", "datacenters"],
                &[],
                None,
            )
            .await?;
        Ok(Names::new(r.value.unwrap_or_default(), true))
    };
    poll("datacenter", DATACENTERS_REFRESH, &list, &shutdown, fetch).await;
}

/// Keeps the local prepared-query list (`/v1/query`, which cannot block).
async fn poll_queries(shared: Arc<Shared>, list: watch::Sender<List>, shutdown: CancellationToken) {
    let fetch = || async {
        let r = shared
            .client
            .get::<Vec<QueryDefinitionJson>>("query_list", &["v1", "query"], &[], None)
            .await?;
        Ok(query_names(r.value.unwrap_or_default(), !r.filtered))
    };
    poll("prepared query", QUERIES_REFRESH, &list, &shutdown, fetch).await;
}

/// Keeps the list of cluster peers (`/v1/peerings`), namespaces (`/v1/namespaces`) or admin
/// partitions (`/v1/partitions`), polled (none can block). An agent without the endpoint (404:
/// Consul CE has no namespaces or partitions, Consul before 1.13 no peering) has none of them:
/// an empty, complete list, so such names are NXDOMAIN as Consul CE's own DNS answers them.
async fn poll_tenancy(
    shared: Arc<Shared>,
    kind: TenancyKind,
    partition: Option<String>,
    list: watch::Sender<List>,
    shutdown: CancellationToken,
) {
    let params: Vec<(&str, String)> = partition.map(|p| ("partition", p)).into_iter().collect();
    let fetch = || async {
        let (endpoint, segments) = kind.endpoint();
        match shared
            .client
            .get::<Vec<NamedJson>>(endpoint, segments, &params, None)
            .await
        {
            Ok(r) => {
                let names = r.value.unwrap_or_default().into_iter().map(|n| n.name);
                Ok(Names::new(names, !r.filtered))
            }
            Err(ClientError::NotFound) => Ok(Names::new(Vec::new(), true)),
            Err(e) => Err(e),
        }
    };
    poll(kind.what(), TENANCY_REFRESH, &list, &shutdown, fetch).await;
}

/// Fetches a list every `refresh` (after failures, with backoff) until shutdown. An agent that
/// refuses the list (403 for a token without the ACL, 404 on an agent without the endpoint)
/// is logged once and asked again after [`REFUSED_RETRY`]; meanwhile the list is unavailable
/// and lookups of its kind go unchecked, within their budget.
async fn poll<F, Fut>(
    what: &'static str,
    refresh: Duration,
    list: &watch::Sender<List>,
    shutdown: &CancellationToken,
    fetch: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Names, ClientError>>,
{
    let mut failures: u32 = 0;
    let mut refused_logged = false;
    loop {
        let pause = match fetch().await {
            Ok(names) => {
                failures = 0;
                list.send_replace(List::Ready(Arc::new(names)));
                refresh
            }
            Err(e @ (ClientError::NotFound | ClientError::Status { status: 403, .. })) => {
                if !refused_logged {
                    refused_logged = true;
                    tracing::warn!(
                        error = %e,
                        list = what,
                        "the agent refuses this list (the token lacks the ACL to read it): \
                         such names are looked up one by one, within a budget"
                    );
                }
                list.send_replace(List::Unavailable);
                REFUSED_RETRY
            }
            Err(e) => {
                tracing::debug!(error = %e, list = what, "list request failed");
                failures = failures.saturating_add(1);
                mark_failed(list);
                backoff(failures)
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_from_complete_and_partial_lists() {
        let names = Names::new(["Web".to_owned(), "db".to_owned()], true);
        assert_eq!(names.verdict("web"), Verdict::Exists);
        assert_eq!(names.verdict("nope"), Verdict::NoSuchName);
        let partial = Names::new(["web".to_owned()], false);
        assert_eq!(partial.verdict("web"), Verdict::Exists);
        assert_eq!(partial.verdict("nope"), Verdict::Unchecked);
    }

    #[test]
    fn a_stale_list_still_confirms_names_but_never_denies_one() {
        let list = watch::channel(List::Ready(Arc::new(Names::new(["web".to_owned()], true)))).0;
        mark_failed(&list);
        let state = list.borrow().clone();
        assert_eq!(state.verdict("web"), Some(Verdict::Exists));
        assert_eq!(state.verdict("new"), Some(Verdict::Unchecked));
        let pending = new_list();
        mark_failed(&pending);
        assert_eq!(pending.borrow().verdict("web"), None);
    }

    #[test]
    fn prepared_queries_match_by_name_id_and_template_prefix() {
        let list: Vec<QueryDefinitionJson> = serde_json::from_str(
            r#"[
              {"ID": "8F246B77-F3E1-FF88-5B48-8EC93ABF3E05", "Name": "Geo-DB", "Template": {"Type": "", "Regexp": ""}},
              {"ID": "ee4b0d5c-0000-0000-0000-000000000000", "Name": "web-", "Template": {"Type": "name_prefix_match", "Regexp": "^web-(.*)$"}},
              {"ID": "aa", "Name": ""}
            ]"#,
        )
        .expect("json");
        let names = query_names(list, true);
        assert_eq!(names.verdict("geo-db"), Verdict::Exists);
        assert_eq!(
            names.verdict("8f246b77-f3e1-ff88-5b48-8ec93abf3e05"),
            Verdict::Exists
        );
        assert_eq!(names.verdict("web-east"), Verdict::Exists);
        assert_eq!(names.verdict("aa"), Verdict::Exists);
        assert_eq!(names.verdict("geo"), Verdict::NoSuchName);
        // The empty template name matches every name, as Consul's catch-all template does.
        let catch_all: Vec<QueryDefinitionJson> = serde_json::from_str(
            r#"[{"ID": "x", "Name": "", "Template": {"Type": "name_prefix_match"}}]"#,
        )
        .expect("json");
        assert_eq!(
            query_names(catch_all, true).verdict("anything"),
            Verdict::Exists
        );
    }

    #[test]
    fn a_query_with_near_is_sorted_by_name_id_and_longest_template() {
        let list: Vec<QueryDefinitionJson> = serde_json::from_str(
            r#"[
              {"ID": "id-near", "Name": "near", "Service": {"Service": "db", "Near": "_agent"}},
              {"ID": "id-ip", "Name": "by-ip", "Service": {"Service": "db", "Near": "_ip"}},
              {"ID": "id-plain", "Name": "plain", "Service": {"Service": "db", "Near": ""}},
              {"ID": "t1", "Name": "web-", "Template": {"Type": "name_prefix_match"}, "Service": {"Near": "node-1"}},
              {"ID": "t2", "Name": "web-east-", "Template": {"Type": "name_prefix_match"}, "Service": {"Near": ""}}
            ]"#,
        )
        .expect("json");
        let names = query_names(list, true);
        assert_eq!(names.sorted("near"), Some(true));
        assert_eq!(names.sorted("id-near"), Some(true));
        assert_eq!(names.sorted("by-ip"), Some(false), "_ip: Consul shuffles");
        assert_eq!(names.sorted("plain"), Some(false));
        assert_eq!(names.sorted("web-west-1"), Some(true));
        assert_eq!(
            names.sorted("web-east-1"),
            Some(false),
            "the longest prefix wins"
        );
        assert_eq!(names.sorted("other"), None);
    }

    #[test]
    fn the_unchecked_budget_refills_at_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(UNCHECKED, start);
        let burst = (0..100)
            .filter(|_| bucket.take(UNCHECKED, start).is_ok())
            .count();
        assert_eq!(burst as f64, UNCHECKED.burst);
        let later = start + Duration::from_secs(1);
        let refilled = (0..100)
            .filter(|_| bucket.take(UNCHECKED, later).is_ok())
            .count();
        assert_eq!(refilled as f64, UNCHECKED.per_second);
    }
}
