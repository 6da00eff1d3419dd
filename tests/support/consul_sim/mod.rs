//! An in-process simulator of a HashiCorp Consul agent, for tests.
//!
//! Why it exists: the project talks to Consul's HTTP health API (with blocking
//! queries) and is compared against Consul's own DNS interface, but no real
//! Consul can be installed where the tests run. This simulator reproduces the
//! parts of both that the project depends on, with the same JSON shapes, headers,
//! index semantics and DNS answers as a real agent with default configuration
//! (see `/work/shared/consul/` and `/work/shared/notes/consul-dns.md`), plus
//! fault injection (stop/restart, hang, fail) that a real agent cannot be made
//! to do on demand.
//!
//! Layout:
//! - [`state`]: the catalog (nodes, services, checks, prepared queries), the raft
//!   index bookkeeping and every JSON body.
//! - [`http`]: a small HTTP/1.1 server. It is hand-written rather than axum so
//!   that `stop()` can drop every open connection (including held blocking
//!   queries) at once, and so connections can be counted exactly.
//! - [`dns`]: the agent-style DNS port (UDP and TCP on one port).
//!
//! For scale tests: [`ConsulSim::add_many`] / [`ConsulSim::add_grid`] register
//! thousands of instances in one write, and [`ConsulSim::start_churn`] flips
//! checks at a given rate, logging when each flip became visible.
//!
//! Everything listens on 127.0.0.1 only.

mod dns;
mod http;
mod render;
mod state;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpSocket, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use state::State;

/// The datacenter every simulated object lives in (Consul's default name).
pub const DATACENTER: &str = "dc1";
/// The node name of the simulated agent (what `/v1/agent/self` reports).
pub const AGENT_NODE: &str = "agent-1";

/// A catalog node, as registered with Consul. `..Default::default()` fills the fields a test
/// does not care about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimNode {
    pub name: String,
    /// IPv4, IPv6 or a hostname (Consul accepts all three).
    pub address: String,
    pub meta: BTreeMap<String, String>,
    /// `TaggedAddresses` as registered (`lan_ipv4`, `lan_ipv6`, `wan`, `wan_ipv4`, `wan_ipv6`,
    /// ...), on top of the `lan` and `wan` (= `address`) every node shows.
    pub tagged_addresses: BTreeMap<String, String>,
    /// `""` = [`DATACENTER`]. A node of another datacenter is seen only with `?dc=` (as through
    /// a WAN-federated server), and its datacenter is listed in `/v1/catalog/datacenters`.
    pub datacenter: String,
}

/// A service's tagged address (Consul's `ServiceAddress`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimServiceAddress {
    pub address: String,
    pub port: u16,
}

/// A service instance, as registered with Consul. `..Default::default()` fills the fields a
/// test does not care about (weights 1/1, as Consul's default).
#[derive(Clone, Debug)]
pub struct SimService {
    /// Instance ID. The simulator treats IDs as unique across all nodes (real
    /// Consul only requires uniqueness per node) so that the ID alone can name
    /// an instance in `remove_service`/`set_service_check`.
    pub id: String,
    /// Service name.
    pub service: String,
    /// Node name; the node must have been added with [`ConsulSim::add_node`].
    pub node: String,
    /// `""` = use the node's address (as in Consul); else IPv4, IPv6 or a hostname.
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    /// `(passing, warning)`: the SRV weights Consul's DNS uses for an instance
    /// whose worst check is passing or warning respectively.
    pub weights: (u32, u32),
    pub meta: BTreeMap<String, String>,
    /// `TaggedAddresses` as registered; a service with an address of its own also shows `lan`
    /// and `wan` (= its address and port) unless registered here.
    pub tagged_addresses: BTreeMap<String, SimServiceAddress>,
}

impl Default for SimService {
    fn default() -> Self {
        SimService {
            id: String::new(),
            service: String::new(),
            node: String::new(),
            address: String::new(),
            port: 0,
            tags: Vec::new(),
            weights: (1, 1),
            meta: BTreeMap::new(),
            tagged_addresses: BTreeMap::new(),
        }
    }
}

impl SimNode {
    /// A node with no meta.
    pub fn new(name: &str, address: &str) -> SimNode {
        SimNode {
            name: name.to_owned(),
            address: address.to_owned(),
            ..Default::default()
        }
    }

    /// With one more node meta entry (a TXT record in node answers).
    pub fn meta(mut self, key: &str, value: &str) -> SimNode {
        self.meta.insert(key.to_owned(), value.to_owned());
        self
    }
}

impl SimService {
    /// An instance at its node's address, with no tags or meta and weights (1, 1).
    pub fn new(id: &str, service: &str, node: &str, port: u16) -> SimService {
        SimService {
            id: id.to_owned(),
            service: service.to_owned(),
            node: node.to_owned(),
            address: String::new(),
            port,
            tags: Vec::new(),
            ..Default::default()
        }
    }

    /// With these tags.
    pub fn tags(mut self, tags: &[&str]) -> SimService {
        self.tags = tags.iter().map(|t| t.to_string()).collect();
        self
    }
}

/// A prepared query's definition: the parts of Consul's `PreparedQuery` the simulator executes
/// (see [`ConsulSim::add_query`]).
#[derive(Clone, Debug, Default)]
pub struct SimQuery {
    pub name: String,
    pub service: String,
    /// `Service.Tags`, one tag at most here.
    pub tag: Option<String>,
    /// `DNS.TTL`, a Go duration such as `"10s"` (`None` = `""`: the DNS interface falls back
    /// to the service TTL).
    pub dns_ttl: Option<String>,
    /// `Service.OnlyPassing`: instances with a warning check are left out too.
    pub only_passing: bool,
    /// `Service.IgnoreCheckIDs`: checks that do not count for health.
    pub ignore_check_ids: Vec<String>,
    /// `Service.Near`: a node name, `_agent` or `_ip` (results sorted by distance from it).
    pub near: String,
}

/// An instance's role in the service mesh (Consul's `Kind`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SimKind {
    /// A plain service (`Kind: ""`).
    #[default]
    Typical,
    /// A sidecar proxy (`Kind: "connect-proxy"`) for `destination`
    /// (`Proxy.DestinationServiceName`).
    ConnectProxy { destination: String },
    /// An ingress gateway (`Kind: "ingress-gateway"`) routing to `services`. In Consul that
    /// list is the gateway's `ingress-gateway` config entry; the simulator keeps it on the
    /// registration.
    IngressGateway { services: Vec<String> },
}

/// What [`ConsulSim::add_service_with`] adds to a registration: its mesh role, whether it is
/// Connect-native (`Connect.Native`), and its Enterprise namespace (`None`: `default`). Peer
/// and partition belong to the node ([`ConsulSim::add_node_in`]).
#[derive(Clone, Debug, Default)]
pub struct SimMesh {
    pub kind: SimKind,
    pub connect_native: bool,
    pub namespace: Option<String>,
}

impl SimMesh {
    /// A sidecar proxy for `destination`.
    pub fn sidecar(destination: &str) -> SimMesh {
        SimMesh {
            kind: SimKind::ConnectProxy {
                destination: destination.into(),
            },
            ..SimMesh::default()
        }
    }

    /// A Connect-native service.
    pub fn native() -> SimMesh {
        SimMesh {
            connect_native: true,
            ..SimMesh::default()
        }
    }

    /// An ingress gateway routing to `services`.
    pub fn ingress(services: &[&str]) -> SimMesh {
        SimMesh {
            kind: SimKind::IngressGateway {
                services: services.iter().map(|s| s.to_string()).collect(),
            },
            ..SimMesh::default()
        }
    }

    /// A plain service in Enterprise namespace `ns`.
    pub fn in_namespace(ns: &str) -> SimMesh {
        SimMesh {
            namespace: Some(ns.into()),
            ..SimMesh::default()
        }
    }

    /// The service whose Connect instances this one is: a proxy's destination, or its own
    /// service when Connect-native.
    pub fn connect_destination<'a>(&'a self, service: &'a str) -> Option<&'a str> {
        match &self.kind {
            SimKind::ConnectProxy { destination } => Some(destination),
            _ if self.connect_native => Some(service),
            _ => None,
        }
    }
}

/// A health check status. Consul also knows `maintenance`, which it reports as
/// `critical` on the wire, so three values cover everything a client can see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Passing,
    Warning,
    Critical,
}

impl Status {
    /// The string Consul uses in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Passing => "passing",
            Status::Warning => "warning",
            Status::Critical => "critical",
        }
    }

    /// Severity, for "worst check" computations.
    fn rank(self) -> u8 {
        match self {
            Status::Passing => 0,
            Status::Warning => 1,
            Status::Critical => 2,
        }
    }
}

/// One instance made by [`ConsulSim::add_grid`].
#[derive(Clone, Debug)]
pub struct GridInstance {
    /// `""` for [`DATACENTER`], as in [`SimNode::datacenter`].
    pub datacenter: String,
    pub service: String,
    pub id: String,
    pub node: String,
    pub address: String,
}

/// Which check a churn target flips.
#[derive(Clone, Debug)]
pub enum ChurnCheck {
    /// The instance's own check `service:<id>`.
    Service(String),
    /// The node's `serfHealth` check: every instance on the node follows it.
    Node(String),
}

/// Something the churn generator flips; `service` is for the test's bookkeeping.
#[derive(Clone, Debug)]
pub struct ChurnTarget {
    pub service: String,
    pub check: ChurnCheck,
}

/// One applied flip: `targets[target]` became `status` at `at`.
#[derive(Clone, Copy, Debug)]
pub struct Flip {
    pub at: Instant,
    pub target: usize,
    pub status: Status,
}

/// How often the churn generator applies the flips that fell due: fine enough that a flip's
/// logged instant is within 10 ms of its schedule, coarse enough to batch 10 flips at 1,000/s.
pub const CHURN_TICK: Duration = Duration::from_millis(10);

/// A running churn generator (see [`ConsulSim::start_churn`]).
pub struct Churn {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Flip>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Churn {
    /// Flips applied so far, in order.
    pub fn flips(&self) -> Vec<Flip> {
        lock(&self.log).clone()
    }

    /// The most recent flip, if any.
    pub fn latest(&self) -> Option<Flip> {
        lock(&self.log).last().copied()
    }

    /// Number of flips applied so far.
    pub fn count(&self) -> usize {
        lock(&self.log).len()
    }

    /// Stops the generator and returns every flip it applied.
    pub fn stop(mut self) -> Vec<Flip> {
        self.halt();
        lock(&self.log).clone()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The simulator. Create with [`ConsulSim::start`]; dropping it stops
/// everything (HTTP and DNS) without waiting.
pub struct ConsulSim {
    inner: Arc<Inner>,
    dns_addr: SocketAddr,
    dns_cancel: CancellationToken,
}

/// Shared by the handle and every server task.
struct Inner {
    state: Mutex<State>,
    /// Carries the global raft index; every change sends, which wakes every
    /// held blocking query so it can re-check its own index.
    index_tx: watch::Sender<u64>,
    http_addr: SocketAddr,
    http: Mutex<HttpRuntime>,
    hang: AtomicBool,
    fail: AtomicBool,
    /// `/v1/query` answers 403, as for a token without `query:read`.
    query_list_denied: AtomicBool,
    /// `/v1/health/state/*` answers 403, as for a token without `node:read` on every node.
    health_state_denied: AtomicBool,
    /// How long `/v1/catalog/services` takes to answer (see `set_list_delay`).
    list_delay: Mutex<Duration>,
    /// How long `/v1/catalog/services` answers are in transit (see `set_list_transit`).
    list_transit: Mutex<Duration>,
    /// 0 = no limit (the default here, see `set_dns_udp_answer_limit`).
    udp_answer_limit: AtomicUsize,
    /// What a follower answering a `?stale` read reports in `X-Consul-LastContact` (ms since it
    /// last heard from the leader); see `set_follower_lag`.
    follower_lag_ms: AtomicU64,
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    /// Decoded path and raw target (path + query) of every HTTP request, in order.
    requests: Mutex<Vec<(String, String)>>,
    /// Every request line exactly as received (`GET /v1/... HTTP/1.1`), malformed ones too.
    request_lines: Mutex<Vec<String>>,
    last_token: Mutex<Option<String>>,
    dns_queries: AtomicUsize,
    open_connections: AtomicUsize,
    max_connections: AtomicUsize,
}

/// The HTTP server's current generation (between a start/restart and a stop).
#[derive(Default)]
struct HttpRuntime {
    running: Option<Generation>,
    /// While stopped: a socket bound to the HTTP port but not listening, so that
    /// connection attempts are refused (no listener) while no other test can
    /// take the port before `restart`.
    reserved: Option<TcpSocket>,
}

struct Generation {
    cancel: CancellationToken,
    /// Every task of this generation holds a clone of the matching sender;
    /// `recv()` returning `None` proves they have all ended (and so every
    /// socket of this generation is closed).
    done_rx: mpsc::Receiver<()>,
    done_tx: mpsc::Sender<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not turn every later call into a second panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Runs a catalog mutation; if it changed anything (it then bumped the raft
    /// index), wake every blocking query.
    fn mutate<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let (r, index) = {
            let mut st = self.state();
            let r = f(&mut st);
            (r, st.index)
        };
        self.index_tx.send_replace(index);
        r
    }

    fn spawn_http(self: &Arc<Self>, listener: TcpListener) {
        let (done_tx, done_rx) = mpsc::channel(1);
        let cancel = CancellationToken::new();
        tokio::spawn(http::accept_loop(
            self.clone(),
            listener,
            cancel.clone(),
            done_tx.clone(),
        ));
        lock(&self.http).running = Some(Generation {
            cancel,
            done_rx,
            done_tx,
        });
    }
}

/// Binds a TCP socket with SO_REUSEADDR, so a restart can take the port back
/// even though the connections closed by `stop` sit in TIME_WAIT on it.
fn bind_reuse(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let sock = TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    Ok(sock)
}

impl ConsulSim {
    /// Starts HTTP and the DNS port (UDP+TCP, one port number) on 127.0.0.1,
    /// OS-chosen ports. Datacenter `dc1`, agent node name `agent-1`.
    pub async fn start() -> ConsulSim {
        let listener = bind_reuse(SocketAddr::from(([127, 0, 0, 1], 0)))
            .and_then(|s| s.listen(1024))
            .expect("consul_sim: bind HTTP listener on 127.0.0.1");
        let http_addr = listener.local_addr().expect("local_addr");
        let (udp, tcp) = bind_dns_pair().await;
        let dns_addr = udp.local_addr().expect("local_addr");

        let state = State::new();
        let (index_tx, _) = watch::channel(state.index);
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            index_tx,
            http_addr,
            http: Mutex::new(HttpRuntime::default()),
            hang: AtomicBool::new(false),
            fail: AtomicBool::new(false),
            query_list_denied: AtomicBool::new(false),
            health_state_denied: AtomicBool::new(false),
            list_delay: Mutex::new(Duration::ZERO),
            list_transit: Mutex::new(Duration::ZERO),
            udp_answer_limit: AtomicUsize::new(0),
            follower_lag_ms: AtomicU64::new(0),
            stats: Stats::default(),
        });
        inner.spawn_http(listener);

        let dns_cancel = CancellationToken::new();
        tokio::spawn(dns::serve_udp(inner.clone(), udp, dns_cancel.clone()));
        tokio::spawn(dns::serve_tcp(inner.clone(), tcp, dns_cancel.clone()));

        ConsulSim {
            inner,
            dns_addr,
            dns_cancel,
        }
    }

    /// `http://127.0.0.1:PORT`, stable across stop/restart.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.inner.http_addr)
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.inner.http_addr
    }

    /// The agent-style DNS port (same number for UDP and TCP).
    pub fn dns_addr(&self) -> SocketAddr {
        self.dns_addr
    }

    /// Registers (or updates) a node. A new node gets the `serfHealth` check,
    /// passing, like every node a real agent joins. Re-adding an identical node
    /// is not a change (no index bump); changing its address or meta is, and it
    /// changes the result (and index) of every service on that node.
    pub fn add_node(&self, node: SimNode) {
        self.inner.mutate(|st| st.add_node(node));
    }

    /// Sets a node's tagged addresses besides `lan` and `wan` (which always carry its
    /// `Address`), as an agent registers them: `lan_ipv4`, `lan_ipv6`, `wan_ipv4`, `wan_ipv6`
    /// (a dual-stack node has both families). A change of the node, like a new address.
    /// Panics if the node is unknown.
    pub fn set_node_tagged_addresses(&self, node: &str, tagged: &[(&str, &str)]) {
        let tagged = tagged
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.inner
            .mutate(|st| st.set_node_tagged_addresses(node, tagged));
    }

    /// Deregisters a node, its checks and its service instances (Consul's
    /// `/v1/catalog/deregister` with only `Node`). Unknown nodes are ignored.
    pub fn remove_node(&self, node: &str) {
        self.inner.mutate(|st| st.remove_node(node));
    }

    /// Registers (or replaces) a service instance plus its service check
    /// `service:<id>` with `status`. Panics if the node is unknown: real Consul
    /// refuses a registration for a node it does not have, and a silent default
    /// would hide test mistakes.
    pub fn add_service(&self, svc: SimService, status: Status) {
        self.inner.mutate(|st| st.add_service(svc, status));
    }

    /// A node imported from cluster peer `peer` and/or in admin partition `partition`
    /// (Enterprise); its instances are listed only for those `peer`/`partition` parameters.
    pub fn add_node_in(&self, node: SimNode, peer: Option<&str>, partition: Option<&str>) {
        self.inner
            .mutate(|st| st.add_node_in(node, peer, partition));
    }

    /// [`ConsulSim::add_service`] with a mesh role and namespace (see [`SimMesh`]). A
    /// Connect-capable instance carries its service's virtual IP in
    /// `TaggedAddresses["consul-virtual"]` (from 240.0.0.1 on, one per service).
    pub fn add_service_with(&self, svc: SimService, mesh: SimMesh, status: Status) {
        self.inner
            .mutate(|st| st.add_service_with(svc, mesh, status));
    }

    /// A cluster peering named `name` (listed by `/v1/peerings`).
    pub fn add_peering(&self, name: &str) {
        self.inner.mutate(|st| {
            st.bump();
            st.peerings.insert(name.to_owned());
        });
    }

    /// Answer as Consul Enterprise (on) or CE (off, the default): CE refuses `ns` and
    /// `partition` parameters with 400 and has no `/v1/namespaces` or `/v1/partitions` (404);
    /// Enterprise filters by them and adds `Namespace`/`Partition` to its JSON.
    pub fn set_enterprise(&self, on: bool) {
        self.inner.mutate(|st| st.enterprise = on);
    }

    /// An Enterprise admin partition besides `default`.
    pub fn add_partition(&self, name: &str) {
        self.inner.mutate(|st| {
            st.bump();
            st.partitions.insert(name.to_owned());
        });
    }

    /// An Enterprise namespace of `partition` besides `default`.
    pub fn add_namespace(&self, partition: &str, name: &str) {
        self.inner.mutate(|st| {
            st.bump();
            st.namespaces
                .insert((partition.to_owned(), name.to_owned()));
        });
    }

    /// Deregisters an instance (and its checks). Unknown IDs are ignored.
    pub fn remove_service(&self, id: &str) {
        self.inner.mutate(|st| st.remove_service(id));
    }

    /// Sets the status of the check `service:<service_id>`. Setting the status
    /// it already has is not a change (Consul does not write it), so nothing
    /// wakes. Panics if the instance is unknown.
    pub fn set_service_check(&self, service_id: &str, status: Status) {
        self.inner
            .mutate(|st| st.set_service_check(service_id, status));
    }

    /// [`ConsulSim::set_service_check`] with the check's `Output` (what Consul shows of the
    /// check script's output).
    pub fn set_service_check_output(&self, service_id: &str, status: Status, output: &str) {
        self.inner
            .mutate(|st| st.set_service_check_output(service_id, status, Some(output)));
    }

    /// Sets (creating if absent) a node-level check such as `serfHealth` or
    /// `_node_maintenance`. Node checks apply to every service on the node, so
    /// this changes the result and index of all of them. Panics if the node is
    /// unknown.
    pub fn set_node_check(&self, node: &str, check_id: &str, status: Status) {
        self.inner
            .mutate(|st| st.set_node_check(node, check_id, status));
    }

    /// Convenience: node `node` at `addr` (added or updated) plus a passing
    /// instance `<service>-<n>` on it, where `n` is the first number from 1
    /// whose ID is not taken yet. Returns nothing to match the agreed API; use
    /// [`ConsulSim::add_simple_id`] to learn the ID.
    pub fn add_simple(&self, service: &str, node: &str, addr: &str, port: u16) {
        self.add_simple_id(service, node, addr, port);
    }

    /// Like [`ConsulSim::add_simple`], returning the instance ID it chose.
    pub fn add_simple_id(&self, service: &str, node: &str, addr: &str, port: u16) -> String {
        let id = self.inner.state().free_instance_id(service);
        self.add_instance(&id, service, node, addr, port, Status::Passing);
        id
    }

    /// Node `node` at `addr` (added or updated) plus instance `id` of `service` on it, at the
    /// node's address, with its check at `status`.
    pub fn add_instance(
        &self,
        id: &str,
        service: &str,
        node: &str,
        addr: &str,
        port: u16,
        status: Status,
    ) {
        self.add_node(SimNode::new(node, addr));
        self.add_service(SimService::new(id, service, node, port), status);
    }

    /// Registers many instances at once (nodes included) as a single write:
    /// one index bump, every blocking query woken once. Use it for catalogs of
    /// thousands of instances, where one [`ConsulSim::add_node`] per node
    /// would rescan the catalog each time.
    pub fn add_many(&self, items: Vec<(SimNode, SimService, Status)>) {
        self.inner.mutate(|st| st.add_many(items));
    }

    /// A catalog grid in one write: services `<prefix><s>` for `s` in
    /// `0..services`, each with `per_service` passing instances
    /// `<prefix><s>-<i>`, every instance on its own node `<prefix><s>-<i>.node`
    /// with its own IPv4 address from 10.0.0.1 upwards (so a DNS answer tells
    /// exactly which instances it holds). Returns the instances in order.
    pub fn add_grid(&self, prefix: &str, services: u32, per_service: u32) -> Vec<GridInstance> {
        self.add_grid_in("", prefix, services, per_service)
    }

    /// [`ConsulSim::add_grid`] in `datacenter` (`""`: ours), whose addresses start at
    /// 11.0.0.1 for another datacenter, so two grids never share one.
    pub fn add_grid_in(
        &self,
        datacenter: &str,
        prefix: &str,
        services: u32,
        per_service: u32,
    ) -> Vec<GridInstance> {
        let first: u32 = if datacenter.is_empty() {
            0x0a00_0000
        } else {
            0x0b00_0000
        };
        let mut out = Vec::new();
        let mut items = Vec::new();
        for s in 0..services {
            for i in 0..per_service {
                let n = s * per_service + i + 1;
                let address = std::net::Ipv4Addr::from(first + n).to_string();
                let g = GridInstance {
                    datacenter: datacenter.to_owned(),
                    service: format!("{prefix}{s}"),
                    id: format!("{prefix}{s}-{i}"),
                    node: format!("{prefix}{s}-{i}.node"),
                    address,
                };
                let mut node = SimNode::new(&g.node, &g.address);
                node.datacenter = g.datacenter.clone();
                items.push((
                    node,
                    SimService::new(&g.id, &g.service, &g.node, 80),
                    Status::Passing,
                ));
                out.push(g);
            }
        }
        self.add_many(items);
        out
    }

    /// Starts a churn generator: `per_second` check flips spread evenly over
    /// time, each target flipped in turn through a random permutation (so the
    /// same target flips again only after all others have, every
    /// `targets.len() / per_second` seconds). Each flip toggles the target's
    /// check between passing and critical; targets must start passing. Flips
    /// are applied in batches every [`CHURN_TICK`], each its own index bump, and
    /// logged with the instant they became visible to the HTTP API. Runs on its
    /// own thread, so the generator keeps its rate whatever the test runtime is
    /// doing; stopped by [`Churn::stop`] or by dropping the handle.
    pub fn start_churn(&self, targets: Vec<ChurnTarget>, per_second: u32) -> Churn {
        use rand::seq::SliceRandom;
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let inner = self.inner.clone();
        let (stop2, log2) = (stop.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            if targets.is_empty() || per_second == 0 {
                return;
            }
            let mut order: Vec<usize> = (0..targets.len()).collect();
            order.shuffle(&mut rand::rng());
            let mut status = vec![Status::Passing; targets.len()];
            let started = Instant::now();
            let mut done: u64 = 0;
            let mut next = 0usize;
            while !stop2.load(Ordering::SeqCst) {
                std::thread::sleep(CHURN_TICK);
                let due = (started.elapsed().as_secs_f64() * f64::from(per_second)) as u64;
                let mut batch = Vec::new();
                while done < due {
                    let t = order[next];
                    next = (next + 1) % order.len();
                    status[t] = match status[t] {
                        Status::Passing => Status::Critical,
                        _ => Status::Passing,
                    };
                    batch.push((t, status[t]));
                    done += 1;
                }
                if batch.is_empty() {
                    continue;
                }
                inner.mutate(|st| {
                    for &(t, s) in &batch {
                        match &targets[t].check {
                            ChurnCheck::Service(id) => st.set_service_check(id, s),
                            ChurnCheck::Node(node) => st.set_node_check(node, "serfHealth", s),
                        }
                    }
                });
                let at = Instant::now();
                lock(&log2).extend(batch.into_iter().map(|(t, s)| Flip {
                    at,
                    target: t,
                    status: s,
                }));
            }
        });
        Churn {
            stop,
            log,
            thread: Some(thread),
        }
    }

    /// The index `/v1/health/state/<state>` returns now (last check write).
    pub fn checks_index(&self) -> u64 {
        self.inner.state().checks_index
    }

    /// Creates a prepared query `name` (also reachable by its generated ID)
    /// over `service`, optionally restricted to `tag`, with `DNS.TTL` =
    /// `dns_ttl` (a Go duration such as `"10s"`; `None` = `""`, i.e. the DNS
    /// interface falls back to the service TTL, 0).
    pub fn add_prepared_query(
        &self,
        name: &str,
        service: &str,
        tag: Option<&str>,
        dns_ttl: Option<&str>,
    ) {
        self.add_query(SimQuery {
            name: name.into(),
            service: service.into(),
            tag: tag.map(Into::into),
            dns_ttl: dns_ttl.map(Into::into),
            ..SimQuery::default()
        });
    }

    /// Creates (or replaces) a prepared query with every option [`SimQuery`] has.
    pub fn add_query(&self, q: SimQuery) {
        self.inner.mutate(|st| st.add_query(q));
    }

    /// Gives `node` a network coordinate `rtt` away from the agent (distances between nodes
    /// are differences along one line), so prepared queries with `Near` sort by it. Not a
    /// catalog write: no index moves.
    pub fn set_node_rtt(&self, node: &str, rtt: Duration) {
        self.inner
            .state()
            .coordinates
            .insert(node.to_string(), rtt.as_secs_f64());
    }

    /// Registers a passing instance of `service` (as [`ConsulSim::add_simple`]: IDs
    /// `<service>-1`, `-2`, ... for a new service) on each node `n<i>` (`i` from 1) at
    /// `<prefix>.<i>`, node `n<i>` `rtts[i - 1]` away from the agent (`None`: no coordinate).
    /// For prepared queries with `Near`.
    pub fn add_at_rtts(&self, service: &str, prefix: &str, port: u16, rtts: &[Option<Duration>]) {
        for (i, rtt) in (1..).zip(rtts) {
            let node = format!("n{i}");
            self.add_simple(service, &node, &format!("{prefix}.{i}"), port);
            if let Some(rtt) = rtt {
                self.set_node_rtt(&node, *rtt);
            }
        }
    }

    /// Registers a Consul server: node `node` at `address` (with the meta Consul writes on
    /// every node) and the `consul` service Consul keeps for its servers. Their names are
    /// the domain's nameservers in Consul's DNS.
    pub fn add_server(&self, node: &str, address: &str) {
        self.add_node(SimNode {
            name: node.to_string(),
            address: address.to_string(),
            meta: [("consul-network-segment".to_string(), String::new())]
                .into_iter()
                .collect(),
            ..Default::default()
        });
        self.inner.mutate(|st| st.add_server(node));
    }

    /// Number of HTTP requests whose (percent-decoded) path starts with
    /// `prefix`, counted when the request head has been read (so hung and
    /// failed requests count too).
    pub fn requests(&self, prefix: &str) -> usize {
        lock(&self.inner.stats.requests)
            .iter()
            .filter(|(path, _)| path.starts_with(prefix))
            .count()
    }

    pub fn total_requests(&self) -> usize {
        lock(&self.inner.stats.requests).len()
    }

    /// Every request target (path and query string, as sent), in arrival
    /// order: lets tests check e.g. which `index=` a client sent.
    pub fn request_log(&self) -> Vec<String> {
        lock(&self.inner.stats.requests)
            .iter()
            .map(|(_, target)| target.clone())
            .collect()
    }

    /// Every HTTP request line exactly as received (method, raw target, version), in arrival
    /// order, including ones the simulator could not parse.
    pub fn request_lines(&self) -> Vec<String> {
        lock(&self.inner.stats.request_lines).clone()
    }

    /// Makes `/v1/query` (the prepared-query list) answer 403, as Consul does for a token
    /// without `query:read`.
    pub fn set_query_list_denied(&self, on: bool) {
        self.inner.query_list_denied.store(on, Ordering::SeqCst);
    }

    /// Makes `/v1/health/state/<state>` answer 403, as Consul does for a token that cannot read
    /// every node and service; a blocking query already waiting is refused when it wakes.
    pub fn set_health_state_denied(&self, on: bool) {
        self.inner.health_state_denied.store(on, Ordering::SeqCst);
    }

    /// Makes `/v1/catalog/services` answer `delay` late, as a large catalog on a loaded agent
    /// does (the list's bytes take that long to come).
    pub fn set_list_delay(&self, delay: Duration) {
        *self.inner.list_delay.lock().expect("list delay") = delay;
    }

    /// Makes `/v1/catalog/services` answers arrive `delay` after they were made, as over a slow
    /// link: the catalog can change meanwhile, so the index an answer carries is behind the
    /// state when it arrives (unlike `set_list_delay`, whose answer is made at the end).
    pub fn set_list_transit(&self, delay: Duration) {
        *self.inner.list_transit.lock().expect("list transit") = delay;
    }

    /// DNS messages received on the DNS port (UDP and TCP).
    pub fn dns_queries(&self) -> usize {
        self.inner.stats.dns_queries.load(Ordering::SeqCst)
    }

    /// Highest number of HTTP connections open at the same time so far.
    pub fn max_concurrent_connections(&self) -> usize {
        self.inner.stats.max_connections.load(Ordering::SeqCst)
    }

    /// Restarts the peak count from the connections open now, so a test can bound one phase
    /// (e.g. steady churn after a cold start).
    pub fn reset_connection_peak(&self) {
        let open = self.inner.stats.open_connections.load(Ordering::SeqCst);
        self.inner
            .stats
            .max_connections
            .store(open, Ordering::SeqCst);
    }

    /// HTTP connections open right now (a closed client connection is noticed
    /// promptly, even while its request is held as a blocking query).
    pub fn open_connections(&self) -> usize {
        self.inner.stats.open_connections.load(Ordering::SeqCst)
    }

    /// The `X-Consul-Token` header of the most recent request that had one.
    pub fn last_token(&self) -> Option<String> {
        lock(&self.inner.stats.last_token).clone()
    }

    /// Stops HTTP: the listener is closed (new connections are refused) and
    /// every open connection, including held blocking queries, is dropped
    /// without a response. Returns once all of them are closed. The catalog is
    /// kept. The DNS port keeps running (it is a different listener of the
    /// agent; stop it by dropping the simulator).
    pub async fn stop(&self) {
        let generation = lock(&self.inner.http).running.take();
        if let Some(mut g) = generation {
            g.cancel.cancel();
            drop(g.done_tx);
            // Bounded: cancelled tasks end at their next poll.
            let _ = tokio::time::timeout(Duration::from_secs(5), g.done_rx.recv()).await;
        }
        let mut rt = lock(&self.inner.http);
        if rt.reserved.is_none() {
            rt.reserved = bind_reuse(self.inner.http_addr).ok();
        }
    }

    /// Starts HTTP again on the same port with the same catalog. The raft index
    /// is bumped by one (a new leader commits an entry), so it never goes back;
    /// per-service indexes are unchanged because no service changed. A no-op if
    /// HTTP is running.
    pub async fn restart(&self) {
        if lock(&self.inner.http).running.is_some() {
            return;
        }
        let mut listener = None;
        for _ in 0..100 {
            let reserved = lock(&self.inner.http).reserved.take();
            let sock = match reserved {
                Some(s) => Ok(s),
                None => bind_reuse(self.inner.http_addr),
            };
            if let Ok(l) = sock.and_then(|s| s.listen(1024)) {
                listener = Some(l);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let listener = listener.unwrap_or_else(|| {
            panic!(
                "consul_sim: cannot listen on {} again after stop",
                self.inner.http_addr
            )
        });
        self.inner.mutate(|st| {
            st.bump();
        });
        self.inner.spawn_http(listener);
    }

    /// While on, every HTTP request is read (and counted) but never answered:
    /// it is held until the client gives up or the simulator stops. Turning it
    /// off does not release requests already held.
    pub fn set_hang(&self, on: bool) {
        self.inner.hang.store(on, Ordering::SeqCst);
    }

    /// While on, every HTTP request gets `500` with body
    /// `rpc error making call: No cluster leader`, what an agent answers while
    /// its servers have no leader.
    pub fn set_fail(&self, on: bool) {
        self.inner.fail.store(on, Ordering::SeqCst);
    }

    /// How far behind the leader the server answering `?stale` reads is: reads with `stale`
    /// then report it in `X-Consul-LastContact` (as a follower does); reads without it are the
    /// leader's (`X-Consul-LastContact: 0`, consistency `leader`).
    pub fn set_follower_lag(&self, lag: Duration) {
        let ms = u64::try_from(lag.as_millis()).unwrap_or(u64::MAX);
        self.inner.follower_lag_ms.store(ms, Ordering::SeqCst);
    }

    /// Opt-in: emulate Consul's `dns_config.udp_answer_limit` (real default 3,
    /// capped at 8 by Consul) for UDP queries without EDNS. `None` (the
    /// simulator's default, as agreed) = only the 512-byte silent trim applies.
    pub fn set_dns_udp_answer_limit(&self, limit: Option<usize>) {
        self.inner
            .udp_answer_limit
            .store(limit.unwrap_or(0), Ordering::SeqCst);
    }

    /// The catalog as `{"<service>": [entries exactly as
    /// /v1/health/service/<service> returns them, unfiltered]}`.
    pub fn catalog_json(&self) -> serde_json::Value {
        self.inner.state().catalog_json()
    }

    /// The global raft index (bumped by one on every change).
    pub fn current_index(&self) -> u64 {
        self.inner.state().index
    }

    /// The `X-Consul-Index` that `/v1/health/service/<service>` returns now.
    pub fn service_index(&self, service: &str) -> u64 {
        self.inner.state().service_idx(service)
    }
}

impl Drop for ConsulSim {
    fn drop(&mut self) {
        self.dns_cancel.cancel();
        if let Some(g) = lock(&self.inner.http).running.take() {
            g.cancel.cancel();
        }
    }
}

/// Binds UDP on an OS-chosen port and TCP on the same number, retrying with a
/// fresh port if TCP's is taken (the two port spaces are independent).
async fn bind_dns_pair() -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("consul_sim: bind DNS UDP socket");
        let addr = udp.local_addr().expect("local_addr");
        if let Ok(tcp) = bind_reuse(addr).and_then(|s| s.listen(128)) {
            return (udp, tcp);
        }
    }
    panic!("consul_sim: no port free for both UDP and TCP DNS");
}
