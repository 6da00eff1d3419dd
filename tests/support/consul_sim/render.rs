//! The simulator's catalog records as Consul's JSON shows them: `Node`, `Service` and check
//! objects, borrowed from the state and serialized straight to bytes.
//!
//! Why not `serde_json::Value`: a `/v1/health/service` body built as a tree of maps costs
//! a few hundred allocations per instance. The benchmark's cold start (10,000 names, each
//! fetched once) spent 3.5 s of the simulator's CPU on them, beside dnsperf on the client's
//! core, and so measured the simulator rather than the forwarder. Endpoints that need a
//! `Value` (to add fields or nest it) convert with `serde_json::to_value`.

use std::collections::BTreeMap;

use serde::Serialize;

use super::state::{check_output, dc_of, CheckRec, Instance, NodeRec, Scope, State, SvcRec};
use super::{SimKind, SimService};

/// Consul's `Node` (structs.Node), `omitempty` fields left out when empty.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct NodeOut<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    node: &'a str,
    address: &'a str,
    datacenter: &'a str,
    /// `lan` and `wan` (= the address) on every node, then what was registered.
    tagged_addresses: BTreeMap<&'a str, &'a str>,
    meta: &'a BTreeMap<String, String>,
    create_index: u64,
    modify_index: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer_name: Option<&'a str>,
    /// Enterprise builds only.
    #[serde(skip_serializing_if = "Option::is_none")]
    partition: Option<&'a str>,
}

/// A service's `ServiceAddress{Address, Port}` (Go field names: no JSON tags).
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct AddressOut<'a> {
    address: &'a str,
    port: u16,
}

/// A sidecar's `Proxy`, with the defaults Consul fills in.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ProxyOut<'a> {
    destination_service_name: &'a str,
    #[serde(rename = "DestinationServiceID")]
    destination_service_id: &'a str,
    local_service_address: &'a str,
    local_service_port: u16,
    mode: &'a str,
    /// `null`.
    upstreams: (),
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ConnectOut {
    native: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct WeightsOut {
    passing: u32,
    warning: u32,
}

/// Consul's `NodeService`: the registration with its mesh and tenancy fields.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct ServiceOut<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    service: &'a str,
    /// `None` is `null`: see [`service`]'s `null_tags`.
    tags: Option<&'a [String]>,
    address: &'a str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    tagged_addresses: BTreeMap<&'a str, AddressOut<'a>>,
    meta: &'a BTreeMap<String, String>,
    port: u16,
    weights: WeightsOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy: Option<ProxyOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connect: Option<ConnectOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer_name: Option<&'a str>,
    /// Enterprise builds only, both.
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partition: Option<&'a str>,
    create_index: u64,
    modify_index: u64,
}

/// A check as the health endpoints show it.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct CheckOut<'a> {
    node: &'a str,
    #[serde(rename = "CheckID")]
    check_id: &'a str,
    name: &'a str,
    status: &'static str,
    notes: &'a str,
    output: &'a str,
    #[serde(rename = "ServiceID")]
    service_id: &'a str,
    service_name: &'a str,
    service_tags: &'a [String],
    create_index: u64,
    modify_index: u64,
}

/// One `{Node, Service, Checks}` entry of the health endpoints and prepared queries.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct EntryOut<'a> {
    node: NodeOut<'a>,
    service: ServiceOut<'a>,
    checks: Vec<CheckOut<'a>>,
}

pub(super) fn node<'a>(st: &State, n: &'a NodeRec) -> NodeOut<'a> {
    let mut tagged = BTreeMap::new();
    for key in ["lan", "wan"] {
        tagged.insert(key, n.node.address.as_str());
    }
    for (key, addr) in &n.node.tagged_addresses {
        tagged.insert(key.as_str(), addr.as_str());
    }
    NodeOut {
        id: &n.id,
        node: &n.node.name,
        address: &n.node.address,
        datacenter: dc_of(&n.node),
        tagged_addresses: tagged,
        meta: &n.node.meta,
        create_index: n.create,
        modify_index: n.modify,
        peer_name: n.peer.as_deref(),
        partition: st.enterprise.then(|| Scope::norm(&n.partition)),
    }
}

/// `null_tags`: the prepared-query and catalog-node samples show `null` for an instance
/// without tags; the health endpoint shows `[]`.
pub(super) fn service<'a>(st: &'a State, s: &'a SvcRec, null_tags: bool) -> ServiceOut<'a> {
    let svc = &s.svc;
    let node = st.nodes.get(&svc.node);
    let mut tagged = BTreeMap::new();
    let address = |address: &'a str, port: u16| AddressOut { address, port };
    if !svc.address.is_empty() {
        for key in ["lan", "wan"] {
            tagged.insert(key, address(&svc.address, svc.port));
        }
    }
    for (key, a) in &svc.tagged_addresses {
        tagged.insert(key.as_str(), address(&a.address, a.port));
    }
    let peer = node.and_then(|n| n.peer.as_deref());
    if let Some(destination) = s.mesh.connect_destination(&svc.service) {
        let key = (
            peer.unwrap_or_default().to_string(),
            destination.to_ascii_lowercase(),
        );
        if let Some(vip) = st.virtual_ips.get(&key) {
            tagged.insert("consul-virtual", address(vip, svc.port));
        }
    }
    let (kind, proxy) = match &s.mesh.kind {
        SimKind::Typical => (None, None),
        SimKind::ConnectProxy { destination } => (
            Some("connect-proxy"),
            Some(ProxyOut {
                destination_service_name: destination,
                destination_service_id: "",
                local_service_address: "",
                local_service_port: 0,
                mode: "",
                upstreams: (),
            }),
        ),
        SimKind::IngressGateway { .. } => (Some("ingress-gateway"), None),
    };
    ServiceOut {
        id: &svc.id,
        service: &svc.service,
        tags: (!(svc.tags.is_empty() && null_tags)).then_some(svc.tags.as_slice()),
        address: &svc.address,
        tagged_addresses: tagged,
        meta: &svc.meta,
        port: svc.port,
        weights: WeightsOut {
            passing: svc.weights.0,
            warning: svc.weights.1,
        },
        kind,
        proxy,
        connect: s.mesh.connect_native.then_some(ConnectOut { native: true }),
        peer_name: peer,
        namespace: st.enterprise.then(|| Scope::norm(&s.mesh.namespace)),
        partition: st
            .enterprise
            .then(|| Scope::norm(node.map_or(&None, |n| &n.partition))),
        create_index: s.create,
        modify_index: s.modify,
    }
}

/// `svc` is `None` for a node check (empty `ServiceID`/`ServiceName`, as Consul).
pub(super) fn check<'a>(
    node: &'a str,
    id: &'a str,
    c: &'a CheckRec,
    svc: Option<&'a SimService>,
) -> CheckOut<'a> {
    let (service_id, service_name, service_tags) = match svc {
        Some(s) => (s.id.as_str(), s.service.as_str(), s.tags.as_slice()),
        None => ("", "", &[][..]),
    };
    CheckOut {
        node,
        check_id: id,
        name: &c.name,
        status: c.status.as_str(),
        notes: &c.notes,
        output: c.output.as_deref().unwrap_or(check_output(id, c.status)),
        service_id,
        service_name,
        service_tags,
        create_index: c.create,
        modify_index: c.modify,
    }
}

pub(super) fn entry<'a>(st: &'a State, inst: &Instance<'a>, null_tags: bool) -> EntryOut<'a> {
    let node_name = inst.node.node.name.as_str();
    EntryOut {
        node: node(st, inst.node),
        service: service(st, inst.svc, null_tags),
        checks: inst
            .checks()
            .map(|(id, c, is_svc)| check(node_name, id, c, is_svc.then_some(&inst.svc.svc)))
            .collect(),
    }
}
