//! What answers the Consul names that are not services: a node (`<node>.node.consul`), a
//! prepared query (`<q>.query.consul`), an address (`<hex>.addr.consul`) and a reverse name
//! (`x.in-addr.arpa`). Read after the question was asked through the handler, so a node or
//! query is the one the handler fetched (kept for its TTL), never a second fetch.

use std::net::IpAddr;

use hickory_proto::rr::RecordType;
use serde::Serialize;

use super::status_name;
use crate::consul::catalog::{NodeView, QueryView};
use crate::consul::name::Tenancy;
use crate::consul::ptr::PtrName;
use crate::consul::Backend;

/// Node meta pairs and query instances shown at most (the rest are counted).
pub(crate) const MAX_LISTED: usize = 100;

/// What answers a node, prepared query, address or reverse name.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NameAnswer {
    pub node: Option<NodeAnswer>,
    pub query: Option<QueryAnswer>,
    /// The address an `.addr` name spells (answered as it is, without asking Consul).
    pub addr: Option<String>,
    pub ptr: Option<PtrAnswer>,
    /// What answers it, in a sentence.
    pub summary: String,
}

/// A node's addresses as each question type gets them (`Address` or a tagged address).
#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeAnswer {
    pub node: String,
    /// What A questions get (`Address`, or `tagged_addresses.lan_ipv4` / `wan_ipv4`).
    pub ipv4: Option<String>,
    /// What AAAA questions get (a tagged `lan_ipv6` / `wan_ipv6`, or an IPv6 `Address`).
    pub ipv6: Option<String>,
    /// The CNAME target when the address is a hostname.
    pub host: Option<String>,
    /// The address this question's type gets.
    pub used: Option<String>,
    /// Node meta, `key=value`, as its TXT records carry it.
    pub meta: Vec<String>,
    pub meta_count: usize,
    /// Meta reaches TXT questions, and A/AAAA answers' additional section when
    /// `consul.node_meta_txt` is on.
    pub meta_txt_in_additional: bool,
}

/// A prepared query's result as Consul returned it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct QueryAnswer {
    pub query: String,
    pub instance_count: usize,
    /// In the order Consul returned them.
    pub instances: Vec<QueryInstance>,
    /// Consul sorted the result (`Near`): answers keep its order; else every answer shuffles.
    pub keeps_order: bool,
    /// The query's own `DNS.TTL`, when set.
    pub ttl_seconds: Option<u64>,
    pub filters: String,
}

/// One instance of a prepared query's result.
#[derive(Clone, Debug, Default, Serialize)]
pub struct QueryInstance {
    pub node: String,
    pub address: String,
    pub port: u16,
    pub status: String,
}

/// What a reverse name's address matched.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PtrAnswer {
    pub address: String,
    /// `node`, `service`, or none: Consul does not know it, so the question is forwarded.
    pub matched: Option<String>,
    pub name: Option<String>,
    pub forwarded: bool,
}

/// A node as read, for `qtype`.
pub(crate) async fn node(
    backend: &dyn Backend,
    node: &str,
    dc: Option<&str>,
    tenancy: &Tenancy,
    qtype: RecordType,
    meta_txt: bool,
) -> NameAnswer {
    match backend.node(node, dc, tenancy).await {
        Ok(Some(view)) => {
            let n = node_answer(&view, qtype, meta_txt);
            NameAnswer {
                summary: format!(
                    "node {}: {}",
                    n.node,
                    n.used.as_deref().map_or_else(
                        || "no address of the family asked for".to_owned(),
                        |a| format!("answered with {a}")
                    )
                ),
                node: Some(n),
                ..NameAnswer::default()
            }
        }
        Ok(None) => summary_only("Consul has no such node: NXDOMAIN"),
        Err(e) => summary_only(&format!("the node could not be read: {e}")),
    }
}

pub(crate) fn node_answer(view: &NodeView, qtype: RecordType, meta_txt: bool) -> NodeAnswer {
    let a = &view.addrs;
    NodeAnswer {
        node: view.name.clone(),
        ipv4: a.v4.map(|ip| ip.to_string()),
        ipv6: a.v6.map(|ip| ip.to_string()),
        host: a.host.as_deref().map(str::to_owned),
        used: a
            .ip_for(qtype)
            .map(|ip| ip.to_string())
            .or_else(|| a.host_for(qtype).map(|h| h.to_string())),
        meta: view
            .meta
            .iter()
            .take(MAX_LISTED)
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
        meta_count: view.meta.len(),
        meta_txt_in_additional: meta_txt,
    }
}

/// A prepared query's result as read.
pub(crate) async fn query(backend: &dyn Backend, name: &str, dc: Option<&str>) -> NameAnswer {
    match backend.query(name, dc).await {
        Ok(Some(view)) => {
            let q = query_answer(name, &view);
            NameAnswer {
                summary: format!(
                    "prepared query {name}: {} instance(s) as Consul returned them",
                    q.instance_count
                ),
                query: Some(q),
                ..NameAnswer::default()
            }
        }
        Ok(None) => summary_only("Consul has no such prepared query: NXDOMAIN"),
        Err(e) => summary_only(&format!("the prepared query could not be run: {e}")),
    }
}

pub(crate) fn query_answer(name: &str, view: &QueryView) -> QueryAnswer {
    let instances = &view.service.instances;
    QueryAnswer {
        query: name.to_owned(),
        instance_count: instances.len(),
        instances: instances
            .iter()
            .take(MAX_LISTED)
            .map(|i| QueryInstance {
                node: i.node.to_string(),
                address: i
                    .addrs
                    .ip_for(RecordType::ANY)
                    .map(|ip| ip.to_string())
                    .or_else(|| i.addrs.host.as_deref().map(str::to_owned))
                    .unwrap_or_default(),
                port: i.port,
                status: status_name(i.status).to_owned(),
            })
            .collect(),
        keeps_order: view.keeps_order,
        ttl_seconds: view.ttl.map(|t| t.as_secs()),
        filters: "the query's own filters (service, tags, OnlyPassing, Near, failover) are \
                  applied by Consul; the forwarder does not filter its result again"
            .to_owned(),
    }
}

/// An `.addr` name: the address it spells.
pub(crate) fn addr(ip: IpAddr) -> NameAnswer {
    NameAnswer {
        addr: Some(ip.to_string()),
        summary: format!("the name spells {ip}: answered as it is, without asking Consul"),
        ..NameAnswer::default()
    }
}

/// A reverse name: what Consul calls the address, else forwarded.
pub(crate) async fn ptr(backend: &dyn Backend, ip: IpAddr) -> NameAnswer {
    let found = backend.address_name(ip).await;
    let (matched, name) = match &found {
        Some(PtrName::Node(n)) => (Some("node"), Some(n.clone())),
        Some(PtrName::Service(s)) => (Some("service"), Some(s.clone())),
        None => (None, None),
    };
    NameAnswer {
        summary: match (&matched, &name) {
            (Some(kind), Some(name)) => format!("{ip} is {kind} {name} in the local datacenter"),
            _ => format!("Consul does not know {ip}: the question is forwarded"),
        },
        ptr: Some(PtrAnswer {
            address: ip.to_string(),
            matched: matched.map(str::to_owned),
            name,
            forwarded: found.is_none(),
        }),
        ..NameAnswer::default()
    }
}

fn summary_only(summary: &str) -> NameAnswer {
    NameAnswer {
        summary: summary.to_owned(),
        ..NameAnswer::default()
    }
}
