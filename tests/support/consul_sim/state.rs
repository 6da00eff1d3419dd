//! The simulated catalog, its raft-index bookkeeping, and every JSON body.
//!
//! Index rules (what makes blocking queries behave like Consul's):
//! - every change bumps the global raft index by exactly one; a write that
//!   changes nothing (same status, identical node) is not a change;
//! - each service name remembers the index at which its
//!   `/v1/health/service/<name>` result last changed; a node change (address,
//!   meta, node check) counts as a change of every service on that node;
//! - the services table index (registrations/deregistrations) and nodes table
//!   index serve `/v1/catalog/services` and `/v1/catalog/node/<node>`;
//! - the checks table index (any check written or deleted, anywhere) is what
//!   `/v1/health/state/<state>` returns, as Consul's `ChecksInState` does: under
//!   churn it moves with every flip, whatever the state asked for.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{json, Map, Value};

use super::render;
use super::{SimKind, SimMesh, SimNode, SimQuery, SimService, Status, AGENT_NODE, DATACENTER};

pub(super) struct CheckRec {
    pub name: String,
    pub status: Status,
    pub notes: String,
    pub create: u64,
    pub modify: u64,
    /// `Output` set by a test (`None`: what Consul's own checks print, see `check_output`).
    pub output: Option<String>,
}

pub(super) struct NodeRec {
    pub node: SimNode,
    /// The cluster peer the node was imported from, and its admin partition (`None`: the
    /// default one): a node belongs to one of each, its instances with it.
    pub peer: Option<String>,
    pub partition: Option<String>,
    pub id: String,
    pub create: u64,
    pub modify: u64,
    pub checks: BTreeMap<String, CheckRec>,
}

impl NodeRec {
    /// A node registered at index `idx`, with the passing `serfHealth` check every agent's node
    /// has.
    fn registered(node: SimNode, idx: u64) -> NodeRec {
        let serf = CheckRec {
            name: check_name("serfHealth", None),
            status: Status::Passing,
            notes: String::new(),
            create: idx,
            modify: idx,
            output: None,
        };
        NodeRec {
            id: uuid_from(&node.name),
            node,
            peer: None,
            partition: None,
            create: idx,
            modify: idx,
            checks: BTreeMap::from([("serfHealth".to_string(), serf)]),
        }
    }
}

pub(super) struct SvcRec {
    pub svc: SimService,
    /// Connect role and namespace (`SimMesh::default()`: a plain service in `default`).
    pub mesh: SimMesh,
    pub create: u64,
    pub modify: u64,
    pub checks: BTreeMap<String, CheckRec>,
}

/// A prepared query: its generated ID and its definition (read through `Deref`).
pub(super) struct QueryRec {
    pub id: String,
    def: SimQuery,
}

impl std::ops::Deref for QueryRec {
    type Target = SimQuery;
    fn deref(&self) -> &SimQuery {
        &self.def
    }
}

pub(super) struct State {
    /// Global raft index.
    pub index: u64,
    /// Last change to the nodes table.
    pub nodes_index: u64,
    /// Last registration/deregistration/modification of any service instance.
    pub services_index: u64,
    /// Last write or deletion of any check (node or service).
    pub checks_index: u64,
    pub nodes: BTreeMap<String, NodeRec>,
    /// Keyed by instance ID.
    pub services: BTreeMap<String, SvcRec>,
    /// Instance IDs by lowercased service name, so a lookup does not scan the whole catalog
    /// (tests register ten thousand services).
    pub by_name: HashMap<String, BTreeSet<String>>,
    /// Instance keys by node name: a node check's flip touches the node's services without a
    /// scan (the churn test flips a hundred node checks a second among 55,000 instances, under
    /// the state's lock).
    pub by_node: HashMap<String, BTreeSet<String>>,
    /// Lowercased service name -> index of its last result change. Kept after
    /// the last instance is removed, like Consul's per-service index entry.
    pub service_index: HashMap<String, u64>,
    pub queries: Vec<QueryRec>,
    /// Network coordinates, reduced to a distance on a line from the agent (at 0): nodes
    /// listed here are sorted by `Near`; the others have no coordinate, as a node whose agent
    /// has not sent one yet.
    pub coordinates: HashMap<String, f64>,
    /// Cluster peerings (`/v1/peerings`), by name.
    pub peerings: BTreeSet<String>,
    /// Consul Enterprise: admin partitions and (partition, namespace) pairs beyond the
    /// built-in `default` ones. Consul CE has neither (`enterprise` off).
    pub enterprise: bool,
    pub partitions: BTreeSet<String>,
    pub namespaces: BTreeSet<(String, String)>,
    /// Virtual IPs by (peer, service), given out from 240.0.0.1 on in registration order of
    /// the service's first Connect instance, as Consul's state store does. Kept after the
    /// instances go (Consul frees them only with the last one; tests do not need that).
    pub virtual_ips: BTreeMap<(String, String), String>,
}

/// Which instances a request selects: its `peer`, `ns` and `partition` parameters (empty
/// or absent: local, `default`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Scope {
    pub peer: String,
    pub ns: String,
    pub partition: String,
}

impl Scope {
    pub(super) fn norm(s: &Option<String>) -> &str {
        match s.as_deref() {
            None | Some("") | Some("default") => "default",
            Some(other) => other,
        }
    }

    fn of_default(s: &str) -> &str {
        if s.is_empty() {
            "default"
        } else {
            s
        }
    }

    /// Does a node of `peer`/`partition` belong to this scope?
    pub fn has_node(&self, n: &NodeRec) -> bool {
        n.peer.as_deref().unwrap_or("") == self.peer
            && Self::norm(&n.partition) == Self::of_default(&self.partition)
    }

    pub fn has(&self, i: &Instance<'_>) -> bool {
        self.has_node(i.node) && Self::norm(&i.svc.mesh.namespace) == Self::of_default(&self.ns)
    }
}

/// A service instance joined with its node, what health endpoints and DNS work on.
pub(super) struct Instance<'a> {
    pub svc: &'a SvcRec,
    pub node: &'a NodeRec,
}

impl<'a> Instance<'a> {
    /// Node checks first, then the instance's own checks (the order the agreed
    /// API specifies; Consul's order is not something clients may rely on).
    pub fn checks(&self) -> impl Iterator<Item = (&'a String, &'a CheckRec, bool)> + 'a {
        let (node, svc) = (self.node, self.svc);
        node.checks
            .iter()
            .map(|(id, c)| (id, c, false))
            .chain(svc.checks.iter().map(|(id, c)| (id, c, true)))
    }

    pub fn worst(&self) -> Status {
        self.checks()
            .map(|(_, c, _)| c.status)
            .max_by_key(|s| s.rank())
            .unwrap_or(Status::Passing)
    }

    /// The service's (address, `lan_ipv4`, `lan_ipv6`).
    pub fn service_addresses(&self) -> [&str; 3] {
        let s = &self.svc.svc;
        let tag = |k: &str| s.tagged_addresses.get(k).map_or("", |a| a.address.as_str());
        [&s.address, tag("lan_ipv4"), tag("lan_ipv6")]
    }
}

/// The node's (address, `lan_ipv4`, `lan_ipv6`).
pub(super) fn node_addresses(n: &SimNode) -> [&str; 3] {
    let tag = |k: &str| n.tagged_addresses.get(k).map_or("", String::as_str);
    [&n.address, tag("lan_ipv4"), tag("lan_ipv6")]
}

/// The datacenter a node is in.
pub(super) fn dc_of(n: &SimNode) -> &str {
    if n.datacenter.is_empty() {
        DATACENTER
    } else {
        &n.datacenter
    }
}

/// Consul's name for a check it creates itself; anything else is named by its ID.
fn check_name(check_id: &str, svc: Option<&SimService>) -> String {
    match (check_id, svc) {
        (_, Some(s)) => format!("Service '{}' check", s.service),
        ("serfHealth", None) => "Serf Health Status".into(),
        ("_node_maintenance", None) => "Node Maintenance Mode".into(),
        (other, None) => other.into(),
    }
}

fn check_notes(check_id: &str) -> String {
    if check_id == "_node_maintenance" {
        "Maintenance mode is enabled for this node, but no reason was provided. \
         This is a default message."
            .into()
    } else {
        String::new()
    }
}

/// The `Output` Consul shows; serfHealth has fixed texts, others are empty here.
pub(super) fn check_output(check_id: &str, status: Status) -> &'static str {
    match (check_id, status) {
        ("serfHealth", Status::Critical) => "Agent not live or unreachable",
        ("serfHealth", _) => "Agent alive and reachable",
        _ => "",
    }
}

/// A stable UUID-shaped ID derived from a name (Consul node and query IDs are UUIDs).
pub(super) fn uuid_from(name: &str) -> String {
    let mut h1: u64 = 0xcbf2_9ce4_8422_2325;
    let mut h2: u64 = 0x8422_2325_cbf2_9ce4;
    for b in name.bytes() {
        h1 = (h1 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        h2 = (h2 ^ u64::from(b))
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(7);
    }
    let hex = format!("{h1:016x}{h2:016x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A rendered record ([`render`]) as a `Value`, for endpoints that nest it or add to it.
fn to_value(record: impl serde::Serialize) -> Value {
    serde_json::to_value(record).expect("a rendered record is JSON")
}

impl State {
    pub fn new() -> Self {
        State {
            // A fresh cluster is never at index 0 (clients treat 0 as a bug).
            index: 1,
            nodes_index: 1,
            services_index: 1,
            checks_index: 1,
            nodes: BTreeMap::new(),
            services: BTreeMap::new(),
            by_name: HashMap::new(),
            by_node: HashMap::new(),
            service_index: HashMap::new(),
            queries: Vec::new(),
            coordinates: HashMap::new(),
            peerings: BTreeSet::new(),
            enterprise: false,
            partitions: BTreeSet::new(),
            namespaces: BTreeSet::new(),
            virtual_ips: BTreeMap::new(),
        }
    }

    pub fn bump(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    fn touch_service(&mut self, name: &str, idx: u64) {
        self.service_index.insert(name.to_ascii_lowercase(), idx);
    }

    fn unindex(&mut self, service: &str, node: &str, id: &str) {
        if let Some(ids) = self.by_node.get_mut(node) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_node.remove(node);
            }
        }
        let key = service.to_ascii_lowercase();
        if let Some(ids) = self.by_name.get_mut(&key) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_name.remove(&key);
            }
        }
    }

    fn touch_services_on_node(&mut self, node: &str, idx: u64) {
        let names: BTreeSet<String> = self
            .by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.services.get(id))
            .map(|s| s.svc.service.clone())
            .collect();
        for n in names {
            self.touch_service(&n, idx);
        }
    }

    pub fn add_node(&mut self, node: SimNode) {
        self.add_node_in(node, None, None);
    }

    /// [`State::add_node`] for a node of cluster peer `peer` and partition `partition`.
    pub fn add_node_in(&mut self, node: SimNode, peer: Option<&str>, partition: Option<&str>) {
        let (peer, partition) = (peer.map(str::to_owned), partition.map(str::to_owned));
        let same = |n: &NodeRec| n.node == node && n.peer == peer && n.partition == partition;
        if self.nodes.get(&node.name).is_some_and(same) {
            return;
        }
        let idx = self.bump();
        self.nodes_index = idx;
        let name = node.name.clone();
        match self.nodes.get_mut(&name) {
            Some(rec) => {
                rec.node = node;
                rec.modify = idx;
            }
            None => {
                self.checks_index = idx;
                self.nodes
                    .insert(name.clone(), NodeRec::registered(node, idx));
            }
        }
        if let Some(rec) = self.nodes.get_mut(&name) {
            rec.peer = peer;
            rec.partition = partition;
        }
        self.touch_services_on_node(&name, idx);
    }

    /// Sets a node's tagged addresses beyond `lan` and `wan` (which always carry its address),
    /// replacing the ones it had: a change of the node, like its address.
    pub fn set_node_tagged_addresses(&mut self, node: &str, tagged: BTreeMap<String, String>) {
        let Some(rec) = self.nodes.get(node) else {
            panic!("consul_sim: set_node_tagged_addresses: unknown node {node:?}");
        };
        if rec.node.tagged_addresses == tagged {
            return;
        }
        let idx = self.bump();
        self.nodes_index = idx;
        let rec = self.nodes.get_mut(node).expect("checked above");
        rec.node.tagged_addresses = tagged;
        rec.modify = idx;
        self.touch_services_on_node(node, idx);
    }

    /// Deregisters a node with its checks and service instances, as Consul's
    /// `/v1/catalog/deregister` with only `Node` does. Unknown nodes are ignored.
    pub fn remove_node(&mut self, node: &str) {
        let Some(rec) = self.nodes.remove(node) else {
            return;
        };
        let idx = self.bump();
        self.nodes_index = idx;
        self.checks_index = idx;
        let ids: Vec<String> = self
            .services
            .values()
            .filter(|s| s.svc.node == rec.node.name)
            .map(|s| s.svc.id.clone())
            .collect();
        if !ids.is_empty() {
            self.services_index = idx;
        }
        for id in ids {
            if let Some(old) = self.services.remove(&id) {
                self.unindex(&old.svc.service, &old.svc.node, &id);
                self.touch_service(&old.svc.service, idx);
            }
        }
    }

    pub fn add_service(&mut self, svc: SimService, status: Status) {
        self.add_service_with(svc, SimMesh::default(), status);
    }

    /// [`State::add_service`] with a Connect role and namespace. A Connect-capable instance
    /// (a sidecar proxy, or Connect-native) gets its service's virtual IP, as in Consul.
    pub fn add_service_with(&mut self, svc: SimService, mesh: SimMesh, status: Status) {
        assert!(
            self.nodes.contains_key(&svc.node),
            "consul_sim: add_service({}): node {:?} not added (call add_node first)",
            svc.id,
            svc.node
        );
        let idx = self.bump();
        self.services_index = idx;
        self.checks_index = idx;
        if let Some(destination) = mesh.connect_destination(&svc.service) {
            let peer = self.nodes[&svc.node].peer.clone().unwrap_or_default();
            let key = (peer, destination.to_ascii_lowercase());
            let next = self.virtual_ips.len() + 1;
            self.virtual_ips
                .entry(key)
                .or_insert_with(|| format!("240.0.{}.{}", next / 256, next % 256));
        }
        self.put_service(svc, mesh, status, idx);
    }

    /// Registers `svc` (replacing an instance with its ID, whose create indexes it keeps, as
    /// Consul does) with one service check in `status`, at index `idx`.
    fn put_service(&mut self, svc: SimService, mesh: SimMesh, status: Status, idx: u64) {
        let check_id = format!("service:{}", svc.id);
        let old = self.services.remove(&svc.id);
        if let Some(o) = &old {
            self.unindex(&o.svc.service, &o.svc.node, &o.svc.id);
            self.touch_service(&o.svc.service, idx);
        }
        let (create, check_create) = match &old {
            Some(o) => (
                o.create,
                o.checks.get(&check_id).map(|c| c.create).unwrap_or(idx),
            ),
            None => (idx, idx),
        };
        let mut checks = BTreeMap::new();
        checks.insert(
            check_id.clone(),
            CheckRec {
                name: check_name(&check_id, Some(&svc)),
                status,
                notes: String::new(),
                create: check_create,
                modify: idx,
                output: None,
            },
        );
        let name = svc.service.clone();
        self.by_name
            .entry(name.to_ascii_lowercase())
            .or_default()
            .insert(svc.id.clone());
        self.by_node
            .entry(svc.node.clone())
            .or_default()
            .insert(svc.id.clone());
        self.services.insert(
            svc.id.clone(),
            SvcRec {
                svc,
                mesh,
                create,
                modify: idx,
                checks,
            },
        );
        self.touch_service(&name, idx);
    }

    pub fn remove_service(&mut self, id: &str) {
        if let Some(old) = self.services.remove(id) {
            self.unindex(&old.svc.service, &old.svc.node, id);
            let idx = self.bump();
            self.services_index = idx;
            self.checks_index = idx;
            self.touch_service(&old.svc.service, idx);
        }
    }

    pub fn set_service_check(&mut self, id: &str, status: Status) {
        self.set_service_check_output(id, status, None);
    }

    /// [`State::set_service_check`], with the check's `Output` when `output` is given.
    pub fn set_service_check_output(&mut self, id: &str, status: Status, output: Option<&str>) {
        let check_id = format!("service:{id}");
        let Some(rec) = self.services.get(id) else {
            panic!("consul_sim: set_service_check: unknown service instance {id:?}");
        };
        let current = rec.checks.get(&check_id);
        if current.map(|c| c.status) == Some(status)
            && output.is_none_or(|o| current.and_then(|c| c.output.as_deref()) == Some(o))
        {
            return;
        }
        let idx = self.bump();
        self.checks_index = idx;
        let rec = self.services.get_mut(id).expect("checked above");
        let name = rec.svc.service.clone();
        let check = rec.checks.entry(check_id.clone()).or_insert(CheckRec {
            name: check_name(&check_id, Some(&rec.svc)),
            status,
            notes: String::new(),
            create: idx,
            modify: idx,
            output: None,
        });
        check.status = status;
        check.modify = idx;
        if let Some(o) = output {
            check.output = Some(o.to_owned());
        }
        self.touch_service(&name, idx);
    }

    pub fn set_node_check(&mut self, node: &str, check_id: &str, status: Status) {
        let Some(rec) = self.nodes.get(node) else {
            panic!("consul_sim: set_node_check: unknown node {node:?}");
        };
        if rec.checks.get(check_id).map(|c| c.status) == Some(status) {
            return;
        }
        let idx = self.bump();
        self.checks_index = idx;
        let rec = self.nodes.get_mut(node).expect("checked above");
        let check = rec.checks.entry(check_id.to_string()).or_insert(CheckRec {
            name: check_name(check_id, None),
            status,
            notes: check_notes(check_id),
            create: idx,
            modify: idx,
            output: None,
        });
        check.status = status;
        check.modify = idx;
        self.touch_services_on_node(node, idx);
    }

    pub fn add_query(&mut self, q: SimQuery) {
        self.bump();
        self.queries.retain(|old| old.name != q.name);
        self.queries.push(QueryRec {
            id: uuid_from(&format!("query/{}", q.name)),
            def: q,
        });
    }

    /// Registers a Consul server on `node` (which must exist): the `consul` service Consul
    /// keeps for its servers, ID `consul` on every server, port 8300, no service check (only
    /// the node's `serfHealth` decides its health), and the meta Consul writes for it.
    pub fn add_server(&mut self, node: &str) {
        assert!(
            self.nodes.contains_key(node),
            "consul_sim: add_server: node {node:?} not added"
        );
        let idx = self.bump();
        self.services_index = idx;
        let meta: BTreeMap<String, String> = [
            ("grpc_port", "8502"),
            ("non_voter", "false"),
            ("raft_version", "3"),
            ("read_replica", "false"),
            ("serf_protocol_current", "2"),
            ("serf_protocol_max", "5"),
            ("serf_protocol_min", "1"),
            ("version", "1.21.0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let svc = SimService {
            id: "consul".into(),
            service: "consul".into(),
            node: node.to_string(),
            address: String::new(),
            port: 8300,
            tags: Vec::new(),
            weights: (1, 1),
            meta,
            ..Default::default()
        };
        // Keyed apart from other instances: every server's instance has the ID `consul`.
        let key = format!("consul@{node}");
        self.by_name
            .entry("consul".into())
            .or_default()
            .insert(key.clone());
        self.by_node
            .entry(node.to_string())
            .or_default()
            .insert(key.clone());
        self.services.insert(
            key,
            SvcRec {
                svc,
                mesh: SimMesh::default(),
                create: idx,
                modify: idx,
                checks: BTreeMap::new(),
            },
        );
        self.touch_service("consul", idx);
    }

    /// What `/v1/query/<q>/execute` returns, as Consul's `PreparedQuery.Execute`: the
    /// service's instances with the query's tag, without any critical check (checks in
    /// `IgnoreCheckIDs` do not count) or, with `OnlyPassing`, any check not passing; shuffled,
    /// then sorted by distance from `Near` when it names a node with a coordinate (`_agent`
    /// is the agent; `_ip` the node at the requester's address, 127.0.0.1 here), nodes without
    /// one last.
    pub fn execute(&self, q: &QueryRec) -> Vec<Instance<'_>> {
        use rand::seq::SliceRandom;
        let counts = |id: &str| !q.ignore_check_ids.iter().any(|i| i == id);
        let mut insts: Vec<Instance<'_>> = self
            .instances(DATACENTER, &q.service)
            .into_iter()
            .filter(|i| q.tag.as_deref().is_none_or(|t| has_tag(&i.svc.svc, t)))
            .filter(|i| {
                i.checks().all(|(id, c, _)| {
                    !counts(id)
                        || match c.status {
                            Status::Passing => true,
                            Status::Warning => !q.only_passing,
                            Status::Critical => false,
                        }
                })
            })
            .collect();
        insts.shuffle(&mut rand::rng());
        let source = match q.near.as_str() {
            "" => None,
            "_agent" => Some(AGENT_NODE.to_string()),
            "_ip" => self
                .nodes
                .values()
                .find(|n| n.node.address == "127.0.0.1")
                .map(|n| n.node.name.clone()),
            node => Some(node.to_string()),
        };
        let origin = source.and_then(|s| {
            if s == AGENT_NODE {
                Some(0.0)
            } else {
                self.coordinates.get(&s).copied()
            }
        });
        if let Some(origin) = origin {
            let distance = |i: &Instance<'_>| {
                self.coordinates
                    .get(&i.node.node.name)
                    .map_or(f64::INFINITY, |c| (c - origin).abs())
            };
            insts.sort_by(|a, b| distance(a).total_cmp(&distance(b)));
        }
        insts
    }

    /// Registers many instances as one write (one index bump, like a Consul
    /// transaction): nodes new to the catalog are added with `serfHealth`
    /// passing, without the per-node scan of [`State::add_node`], so ten
    /// thousand instances take milliseconds, not minutes.
    pub fn add_many(&mut self, items: Vec<(SimNode, SimService, Status)>) {
        if items.is_empty() {
            return;
        }
        let idx = self.bump();
        self.nodes_index = idx;
        self.services_index = idx;
        self.checks_index = idx;
        let mut changed_nodes = BTreeSet::new();
        for (node, svc, status) in items {
            match self.nodes.get_mut(&node.name) {
                Some(rec) => {
                    if rec.node != node {
                        changed_nodes.insert(node.name.clone());
                        rec.node = node;
                        rec.modify = idx;
                    }
                }
                None => {
                    self.nodes
                        .insert(node.name.clone(), NodeRec::registered(node, idx));
                }
            }
            assert!(
                self.nodes.contains_key(&svc.node),
                "consul_sim: add_many({}): its node {:?} is not in the batch or the catalog",
                svc.id,
                svc.node
            );
            self.put_service(svc, SimMesh::default(), status, idx);
        }
        for n in changed_nodes {
            self.touch_services_on_node(&n, idx);
        }
    }

    pub fn free_instance_id(&self, service: &str) -> String {
        (1..)
            .map(|n| format!("{service}-{n}"))
            .find(|id| !self.services.contains_key(id))
            .expect("unbounded range")
    }

    /// `X-Consul-Index` of `/v1/health/service/<name>`. A name never seen falls
    /// back to the services table index (Consul watches the table for it to
    /// appear), so the value is always >= 1.
    pub fn service_idx(&self, name: &str) -> u64 {
        self.service_index
            .get(&name.to_ascii_lowercase())
            .copied()
            .unwrap_or(self.services_index)
            .max(1)
    }

    /// `X-Consul-Index` of `/v1/catalog/node/<node>` (nodes + services tables).
    pub fn node_idx(&self) -> u64 {
        self.nodes_index.max(self.services_index).max(1)
    }

    /// The datacenters: ours first, then the others its nodes are in (Consul sorts by
    /// round-trip time, its own first).
    pub fn datacenters(&self) -> Vec<&str> {
        let others: BTreeSet<&str> = self
            .nodes
            .values()
            .map(|n| dc_of(&n.node))
            .filter(|dc| *dc != DATACENTER)
            .collect();
        std::iter::once(DATACENTER).chain(others).collect()
    }

    /// Instances of `name` in `dc` (case-insensitive, as Consul's catalog index is),
    /// sorted by node then ID.
    pub fn instances(&self, dc: &str, name: &str) -> Vec<Instance<'_>> {
        let mut v: Vec<Instance<'_>> = self
            .by_name
            .get(&name.to_ascii_lowercase())
            .into_iter()
            .flatten()
            .filter_map(|id| self.services.get(id))
            .filter_map(|s| {
                self.nodes
                    .get(&s.svc.node)
                    .filter(|node| dc_of(&node.node) == dc)
                    .map(|node| Instance { svc: s, node })
            })
            .collect();
        v.sort_by(|a, b| {
            (&a.node.node.name, &a.svc.svc.id).cmp(&(&b.node.node.name, &b.svc.svc.id))
        });
        v
    }

    /// What `/v1/health/<kind>/<name>` returns in `dc` and `scope`, sorted by node then ID:
    /// the service's instances (`service`); its Connect-capable ones, the sidecar proxies whose
    /// destination it is and its own instances when Connect-native (`connect`); the ingress
    /// gateways that route to it (`ingress`).
    pub fn health_instances(
        &self,
        kind: &str,
        dc: &str,
        name: &str,
        scope: &Scope,
    ) -> Vec<Instance<'_>> {
        let mut v: Vec<Instance<'_>> = match kind {
            "service" => self.instances(dc, name),
            _ => self
                .services
                .values()
                .filter(|s| match kind {
                    "connect" => s
                        .mesh
                        .connect_destination(&s.svc.service)
                        .is_some_and(|d| d.eq_ignore_ascii_case(name)),
                    _ => matches!(&s.mesh.kind, SimKind::IngressGateway { services }
                        if services.iter().any(|x| x.eq_ignore_ascii_case(name))),
                })
                .filter_map(|s| {
                    let node = self.nodes.get(&s.svc.node)?;
                    (dc_of(&node.node) == dc).then_some(Instance { svc: s, node })
                })
                .collect(),
        };
        v.retain(|i| scope.has(i));
        v.sort_by(|a, b| {
            (&a.node.node.name, &a.svc.svc.id).cmp(&(&b.node.node.name, &b.svc.svc.id))
        });
        v
    }

    /// Instances with the given tag (case-insensitive) and without a critical
    /// check: what DNS and prepared queries (default `OnlyPassing=false`) serve.
    /// Local ones only (no peer, default namespace and partition).
    pub fn healthy_instances(&self, dc: &str, name: &str, tag: Option<&str>) -> Vec<Instance<'_>> {
        let local = Scope::default();
        self.instances(dc, name)
            .into_iter()
            .filter(|i| local.has(i))
            .filter(|i| i.worst() != Status::Critical)
            .filter(|i| tag.is_none_or(|t| has_tag(&i.svc.svc, t)))
            .collect()
    }

    /// By name (case-insensitive, DNS lowercases it) or by ID.
    pub fn find_query(&self, name_or_id: &str) -> Option<&QueryRec> {
        self.queries
            .iter()
            .find(|q| q.name.eq_ignore_ascii_case(name_or_id) || q.id == name_or_id)
    }

    fn node_json(&self, n: &NodeRec) -> Value {
        to_value(render::node(self, n))
    }

    fn service_json(&self, s: &SvcRec, null_tags: bool) -> Value {
        to_value(render::service(self, s, null_tags))
    }

    fn check_json(node: &str, id: &str, c: &CheckRec, svc: Option<&SimService>) -> Value {
        to_value(render::check(node, id, c, svc))
    }

    /// Body of `/v1/health/state/<state>`: every check (node and service) whose
    /// status is `state` (`None` = `any`), ordered by node then check ID like
    /// Consul's checks table.
    /// Local checks only (no peer's, default namespace and partition), like Consul without
    /// `peer`/`ns`/`partition`.
    pub fn health_state_json(&self, dc: &str, state: Option<Status>) -> Value {
        let wanted = |c: &CheckRec| state.is_none_or(|s| c.status == s);
        let local = Scope::default();
        let in_dc = |s: &SvcRec| {
            self.nodes.get(&s.svc.node).is_some_and(|node| {
                dc_of(&node.node) == dc && local.has(&Instance { svc: s, node })
            })
        };
        let mut rows: Vec<(&str, &str, Value)> = Vec::new();
        let local_nodes = self.nodes.values().filter(|n| local.has_node(n));
        for n in local_nodes.filter(|n| dc_of(&n.node) == dc) {
            for (id, c) in n.checks.iter().filter(|(_, c)| wanted(c)) {
                rows.push((
                    &n.node.name,
                    id,
                    Self::check_json(&n.node.name, id, c, None),
                ));
            }
        }
        // Checks in the state first: a 10,000-service churn test asks for these lists twice a
        // second, and the datacenter test looks the node up.
        let with_wanted = |s: &&SvcRec| s.checks.values().any(wanted);
        for s in self
            .services
            .values()
            .filter(with_wanted)
            .filter(|s| in_dc(s))
        {
            for (id, c) in s.checks.iter().filter(|(_, c)| wanted(c)) {
                rows.push((
                    &s.svc.node,
                    id,
                    Self::check_json(&s.svc.node, id, c, Some(&s.svc)),
                ));
            }
        }
        rows.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        Value::Array(rows.into_iter().map(|(_, _, v)| v).collect())
    }

    /// One `{Node, Service, Checks}` entry.
    pub fn entry_json(&self, inst: &Instance<'_>, null_tags: bool) -> Value {
        to_value(render::entry(self, inst, null_tags))
    }

    /// Body of `/v1/health/<kind>/<name>` in `dc` and `scope` (see
    /// [`State::health_instances`]): `passing` drops any entry with a non-passing check
    /// (Consul's `filterNonPassing`), `tags` must all match.
    pub fn health_json(
        &self,
        kind: &str,
        (dc, scope): (&str, &Scope),
        name: &str,
        passing: bool,
        tags: &[String],
    ) -> Vec<render::EntryOut<'_>> {
        self.health_instances(kind, dc, name, scope)
            .iter()
            .filter(|i| !passing || i.worst() == Status::Passing)
            .filter(|i| tags.iter().all(|t| has_tag(&i.svc.svc, t)))
            .map(|i| render::entry(self, i, false))
            .collect()
    }

    pub fn catalog_json(&self) -> Value {
        let names: BTreeSet<&str> = self
            .services
            .values()
            .map(|s| s.svc.service.as_str())
            .collect();
        Value::Object(
            names
                .into_iter()
                .map(|n| {
                    let entries = self
                        .instances(DATACENTER, n)
                        .into_iter()
                        .filter(|i| i.svc.svc.service == n)
                        .map(|i| self.entry_json(&i, false))
                        .collect();
                    (n.to_string(), Value::Array(entries))
                })
                .collect(),
        )
    }

    /// The node named `name`, as Consul finds it: case-insensitively.
    pub fn node_named(&self, name: &str) -> Option<&NodeRec> {
        self.nodes
            .values()
            .find(|n| n.node.name.eq_ignore_ascii_case(name))
    }

    /// Body of `/v1/catalog/node/<node>`; `null` for an unknown node (as Consul).
    pub fn catalog_node_json(&self, dc: &str, scope: &Scope, node: &str) -> Value {
        let Some(n) = self.nodes.values().find(|n| {
            n.node.name.eq_ignore_ascii_case(node) && dc_of(&n.node) == dc && scope.has_node(n)
        }) else {
            return Value::Null;
        };
        let services: Map<String, Value> = self
            .services
            .values()
            .filter(|s| s.svc.node == n.node.name)
            .filter(|s| scope.has(&Instance { svc: s, node: n }))
            .map(|s| (s.svc.id.clone(), self.service_json(s, true)))
            .collect();
        json!({ "Node": self.node_json(n), "Services": services })
    }

    /// Body of `/v1/catalog/nodes`: every node, sorted by name (as Consul's memdb index).
    pub fn catalog_nodes_json(&self, dc: &str, scope: &Scope) -> Vec<render::NodeOut<'_>> {
        self.nodes
            .values()
            .filter(|n| dc_of(&n.node) == dc && scope.has_node(n))
            .map(|n| render::node(self, n))
            .collect()
    }

    /// Body of `/v1/peerings`, in the shape of Consul's docs (1.13+); `Partition` in
    /// Enterprise builds only. Every peering is `ACTIVE` here.
    pub fn peerings_json(&self) -> Value {
        Value::Array(
            self.peerings
                .iter()
                .map(|name| {
                    let mut v = json!({
                        "ID": uuid_from(&format!("peering/{name}")),
                        "Name": name,
                        "State": "ACTIVE",
                        "PeerID": uuid_from(&format!("peer/{name}")),
                        "PeerServerName": "server.dc1.consul",
                        "PeerServerAddresses": ["10.0.0.1:8300"],
                        "CreateIndex": 1,
                        "ModifyIndex": 1,
                    });
                    if self.enterprise {
                        v["Partition"] = json!("default");
                    }
                    v
                })
                .collect(),
        )
    }

    /// Body of `/v1/partitions` (Enterprise): `default` and those added.
    pub fn partitions_json(&self) -> Value {
        let mut v = vec![json!({
            "Name": "default",
            "Description": "Builtin Default Partition",
            "CreateIndex": 1,
            "ModifyIndex": 1,
        })];
        v.extend(
            self.partitions.iter().map(
                |p| json!({ "Name": p, "Description": "", "CreateIndex": 1, "ModifyIndex": 1 }),
            ),
        );
        Value::Array(v)
    }

    /// Body of `/v1/namespaces?partition=<partition>` (Enterprise): `default` and those added
    /// to that partition.
    pub fn namespaces_json(&self, partition: &str) -> Value {
        let mut v = vec![json!({
            "Name": "default",
            "Description": "Builtin Default Namespace",
            "Partition": partition,
            "CreateIndex": 1,
            "ModifyIndex": 1,
        })];
        v.extend(
            self.namespaces
                .iter()
                .filter(|(p, _)| p == partition)
                .map(|(p, ns)| {
                    json!({
                        "Name": ns,
                        "Description": "",
                        "Partition": p,
                        "CreateIndex": 1,
                        "ModifyIndex": 1,
                    })
                }),
        );
        Value::Array(v)
    }

    /// Body of `/v1/query`: the definitions, in the shape of Consul's `PreparedQuery`. Every
    /// query is [`DATACENTER`]'s.
    pub fn query_list_json(&self, dc: &str) -> Value {
        Value::Array(
            self.queries
                .iter()
                .filter(|_| dc == DATACENTER)
                .map(|q| {
                    json!({
                        "ID": q.id,
                        "Name": q.name,
                        "Session": "",
                        "Token": "",
                        "Template": { "Type": "", "Regexp": "", "RemoveEmptyTags": false },
                        "Service": {
                            "Service": q.service,
                            "Failover": { "NearestN": 0, "Datacenters": null },
                            "OnlyPassing": q.only_passing,
                            "IgnoreCheckIDs": if q.ignore_check_ids.is_empty() {
                                Value::Null
                            } else {
                                json!(q.ignore_check_ids)
                            },
                            "Near": q.near,
                            "Tags": q.tag.iter().collect::<Vec<_>>(),
                            "NodeMeta": null,
                            "ServiceMeta": null,
                        },
                        "DNS": { "TTL": q.dns_ttl.clone().unwrap_or_default() },
                        "CreateIndex": 1,
                        "ModifyIndex": 1,
                    })
                })
                .collect(),
        )
    }

    /// Body of `/v1/catalog/services`: service name -> its distinct tags.
    pub fn catalog_services_json(&self, dc: &str, scope: &Scope) -> Value {
        let mut map: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        let in_scope = |s: &SvcRec| {
            self.nodes.get(&s.svc.node).is_some_and(|node| {
                dc_of(&node.node) == dc && scope.has(&Instance { svc: s, node })
            })
        };
        for s in self.services.values().filter(|s| in_scope(s)) {
            map.entry(&s.svc.service)
                .or_default()
                .extend(s.svc.tags.iter().map(String::as_str));
        }
        json!(map)
    }

    /// Body of `/v1/query/<name or id>/execute` (the real wire shape: Service,
    /// Nodes, DNS, Datacenter, Failovers at the top level), with [`State::execute`]'s result.
    pub fn query_execute_json(&self, q: &QueryRec) -> Value {
        let insts = self.execute(q);
        let nodes: Vec<Value> = insts.iter().map(|i| self.entry_json(i, true)).collect();
        json!({
            "Service": q.service,
            "Nodes": nodes,
            "DNS": { "TTL": q.dns_ttl.clone().unwrap_or_default() },
            "Datacenter": DATACENTER,
            "Failovers": 0,
        })
    }

    /// Body of `/v1/agent/self`: the sample's shape with this agent's identity.
    pub fn agent_self_json(&self) -> Value {
        json!({
            "Config": {
                "Datacenter": DATACENTER,
                "NodeName": AGENT_NODE,
                "NodeID": uuid_from(AGENT_NODE),
                "Server": true,
                "Revision": "deadbeef",
                "Version": "1.0.0",
            },
            "DebugConfig": {},
            "Coord": { "Adjustment": 0, "Error": 1.5, "Vec": [0, 0, 0, 0, 0, 0, 0, 0] },
            "Member": {
                "Name": AGENT_NODE,
                "Addr": "127.0.0.1",
                "Port": 8301,
                "Tags": {
                    "bootstrap": "1",
                    "dc": DATACENTER,
                    "id": uuid_from(AGENT_NODE),
                    "port": "8300",
                    "role": "consul",
                    "vsn": "1",
                    "vsn_max": "1",
                    "vsn_min": "1",
                },
                "Status": 1,
                "ProtocolMin": 1,
                "ProtocolMax": 2,
                "ProtocolCur": 2,
                "DelegateMin": 2,
                "DelegateMax": 4,
                "DelegateCur": 4,
            },
            "Meta": {},
        })
    }
}

/// Consul compares tags case-insensitively (`serviceTagFilter` lowercases both).
pub(super) fn has_tag(svc: &SimService, tag: &str) -> bool {
    svc.tags.iter().any(|t| t.eq_ignore_ascii_case(tag))
}
