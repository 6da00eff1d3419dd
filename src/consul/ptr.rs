//! PTR answers for the addresses Consul knows, as Consul's DNS gives them (`agent/dns.go`,
//! `handlePtr`): within the local datacenter, a node whose `Address` is the address answers
//! `<node>.node.<dc>.<domain>`; otherwise a service instance whose own `Address` is the address
//! answers `<service>.service.<dc>.<domain>`. Tagged addresses (`lan_ipv6`, `wan`, ...) are not
//! matched, as in Consul. An address Consul does not know is forwarded upstream (Consul itself
//! recurses, or says NXDOMAIN when it has no recursors).
//!
//! The addresses sit in [`AddressIndex`]es: the nodes' one is built from the inventory's local
//! node list (`/v1/catalog/nodes`, the same blocking request stream), the services' one from the
//! watched views of the local datacenter, rebuilt when asked and older than
//! [`SERVICE_INDEX_REFRESH`]. Both are bounded by [`MAX_PTR_ADDRESSES`].

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::PTR;
use hickory_proto::rr::{Name, RData, Record};

use super::catalog::ServiceView;
use super::views::{ViewState, WatchMap};
use crate::answer::{Answer, Question};
use crate::lock::lock;
use crate::metrics::{Metrics, PTR_LIMIT_LABEL};

/// Bound on the addresses one index holds (nodes, and services, each): 24 B of heap per address
/// plus its name (34 B per node named `node-00001`, `benches/ptr_memory.rs`), so a few MiB each
/// at the bound, ten times the 10,000-node catalog the forwarder is measured at. Beyond it the
/// highest addresses are left out (their PTR questions are forwarded), counted once per index
/// built in
/// `limit_drops_total{limit="ptr_addresses"}`.
pub const MAX_PTR_ADDRESSES: usize = 100_000;

/// How old the service-address index may be before a PTR question rebuilds it from the views:
/// a service address registered (or gone) since is answered (or forwarded) after at most this
/// long, and a flood of PTR questions rebuilds it at most once per interval.
pub(crate) const SERVICE_INDEX_REFRESH: Duration = Duration::from_secs(1);

/// Longest name kept in an index: a longer one cannot make a DNS name anyway.
const MAX_NAME_LEN: usize = 255;

/// One element of `/v1/catalog/nodes`, as far as DNS needs it: the name (the inventory's list)
/// and the address (the PTR index).
#[derive(Debug, serde::Deserialize)]
pub struct NodeAddressJson {
    #[serde(rename = "Node")]
    pub(crate) node: String,
    #[serde(rename = "Address", default)]
    pub(crate) address: String,
}

impl NodeAddressJson {
    pub fn name(&self) -> &str {
        &self.node
    }

    pub fn address(&self) -> &str {
        &self.address
    }
}

/// Addresses and the name each one answers, sorted by address, every name in one string: about
/// 24 B per address plus its name, where a `HashMap<IpAddr, String>` costs about 2.7 times that
/// (`benches/ptr_memory.rs`).
#[derive(Debug, Default)]
pub struct AddressIndex {
    entries: Vec<Entry>,
    names: String,
}

#[derive(Debug)]
struct Entry {
    ip: IpAddr,
    at: u32,
    len: u8,
}

impl AddressIndex {
    /// The index of `items`: (address, what orders names of one address, name). When several
    /// names share an address, the first by order key (case-insensitively), then name, wins,
    /// as Consul answers the first node in its name order. Returns how many addresses were left
    /// out by [`MAX_PTR_ADDRESSES`].
    pub fn build<'a>(items: impl IntoIterator<Item = (IpAddr, &'a str, &'a str)>) -> (Self, usize) {
        let mut items: Vec<(IpAddr, &str, &str)> = items
            .into_iter()
            .filter(|(_, _, name)| !name.is_empty() && name.len() <= MAX_NAME_LEN)
            .collect();
        items.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| lowercase_cmp(a.1, b.1))
                .then_with(|| a.2.cmp(b.2))
        });
        items.dedup_by_key(|item| item.0);
        let dropped = items.len().saturating_sub(MAX_PTR_ADDRESSES);
        items.truncate(MAX_PTR_ADDRESSES);
        let mut index = AddressIndex {
            entries: Vec::with_capacity(items.len()),
            names: String::with_capacity(items.iter().map(|i| i.2.len()).sum()),
        };
        for (ip, _, name) in items {
            // Both fit: at most MAX_PTR_ADDRESSES names of at most MAX_NAME_LEN bytes.
            let (Ok(at), Ok(len)) = (u32::try_from(index.names.len()), u8::try_from(name.len()))
            else {
                break;
            };
            index.names.push_str(name);
            index.entries.push(Entry { ip, at, len });
        }
        (index, dropped)
    }

    /// The index of a node list (`/v1/catalog/nodes`): the nodes whose `Address` is an IP.
    pub fn from_nodes(nodes: &[NodeAddressJson]) -> (Self, usize) {
        AddressIndex::build(nodes.iter().filter_map(|n| {
            let ip = n.address.trim().parse::<IpAddr>().ok()?;
            Some((ip, n.node.as_str(), n.node.as_str()))
        }))
    }

    /// The name `ip` answers, if any.
    pub fn get(&self, ip: IpAddr) -> Option<&str> {
        let i = self.entries.binary_search_by(|e| e.ip.cmp(&ip)).ok()?;
        let e = &self.entries[i];
        let at = usize::try_from(e.at).ok()?;
        self.names.get(at..at + usize::from(e.len))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn lowercase_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    a.bytes()
        .map(|c| c.to_ascii_lowercase())
        .cmp(b.bytes().map(|c| c.to_ascii_lowercase()))
}

/// What Consul calls an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PtrName {
    Node(String),
    Service(String),
}

/// The PTR answer for `found`: `<name>.node.<dc>.<domain>` or `<name>.service.<dc>.<domain>`,
/// authoritative, as Consul's. `None` when the name cannot make a DNS name (the question is then
/// forwarded, as for an address Consul does not know).
pub(crate) fn answer(
    q: &Question,
    found: &PtrName,
    dc: &str,
    domain: &Name,
    ttl: u32,
) -> Option<Answer> {
    let (name, kind) = match found {
        PtrName::Node(n) => (n, "node"),
        PtrName::Service(s) => (s, "service"),
    };
    let target = Name::from_ascii(format!("{name}.{kind}.{dc}"))
        .ok()?
        .append_domain(domain)
        .ok()?;
    let mut answer = Answer::rcode(ResponseCode::NoError);
    answer.authoritative = true;
    answer.answers.push(Record::from_rdata(
        q.name.clone(),
        ttl,
        RData::PTR(PTR(target)),
    ));
    Some(answer)
}

/// Counts an index cut by [`MAX_PTR_ADDRESSES`].
pub(crate) fn count_dropped(metrics: &Metrics, dropped: usize) {
    if dropped > 0 {
        metrics
            .limit_drops
            .with_label_values(&[PTR_LIMIT_LABEL])
            .inc();
    }
}

/// The service addresses of the watched views of the local datacenter, rebuilt when asked and
/// older than [`SERVICE_INDEX_REFRESH`] (one rebuild at a time; the others use the index they
/// find meanwhile).
pub(super) struct ServiceAddresses {
    current: ArcSwap<Built>,
    rebuilding: AtomicBool,
}

struct Built {
    /// `None`: never built.
    at: Option<Instant>,
    index: AddressIndex,
}

impl ServiceAddresses {
    pub(super) fn new() -> ServiceAddresses {
        ServiceAddresses {
            current: ArcSwap::from_pointee(Built {
                at: None,
                index: AddressIndex::default(),
            }),
            rebuilding: AtomicBool::new(false),
        }
    }

    /// The service `ip` is the own address of, among the watched local views.
    pub(super) fn lookup(
        &self,
        ip: IpAddr,
        watches: &WatchMap,
        metrics: &Metrics,
    ) -> Option<String> {
        let mut built = self.current.load_full();
        let due = built
            .at
            .is_none_or(|at| at.elapsed() >= SERVICE_INDEX_REFRESH);
        if due && !self.rebuilding.swap(true, Ordering::SeqCst) {
            let (index, dropped) = service_index(watches);
            count_dropped(metrics, dropped);
            built = Arc::new(Built {
                at: Some(Instant::now()),
                index,
            });
            self.current.store(built.clone());
            self.rebuilding.store(false, Ordering::SeqCst);
        }
        built.index.get(ip).map(str::to_owned)
    }
}

/// The index of every instance with an IP of its own in the watched views of the local
/// datacenter, named by its service (as the view is keyed: lowercased) and ordered by node, as
/// Consul goes through instances by node.
fn service_index(watches: &WatchMap) -> (AddressIndex, usize) {
    let views: Vec<(String, Arc<ServiceView>)> = lock(watches)
        .iter()
        // A `.connect` view's instances are sidecars, a peer's are not ours to name.
        .filter(|(key, _)| key.is_plain_local())
        .filter_map(|(key, w)| match &*w.state.borrow() {
            ViewState::Ready(view) => Some((key.service.clone(), view.clone())),
            _ => None,
        })
        .collect();
    AddressIndex::build(views.iter().flat_map(|(service, view)| {
        view.instances.iter().filter_map(move |i| {
            let ip = i.addrs.own_ip()?;
            Some((ip, &*i.node, service.as_str()))
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::{DNSClass, RecordType};

    /// `text` as an address (tests write them as text).
    fn ip(text: &str) -> IpAddr {
        text.parse::<IpAddr>()
            .unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn one_name_per_address_the_first_in_consul_order() {
        let (index, dropped) = AddressIndex::build([
            (ip("10.0.0.2"), "zeta", "zeta"),
            (ip("10.0.0.1"), "b", "b"),
            (ip("10.0.0.1"), "A", "A"),
            (ip("2001:db8::1"), "v6", "v6"),
            (ip("10.0.0.3"), "", ""),
        ]);
        assert_eq!(dropped, 0);
        assert_eq!(index.len(), 3);
        assert_eq!(index.get(ip("10.0.0.1")), Some("A"));
        assert_eq!(index.get(ip("10.0.0.2")), Some("zeta"));
        assert_eq!(index.get(ip("2001:db8::1")), Some("v6"));
        assert_eq!(index.get(ip("10.0.0.3")), None, "an empty name is no name");
        assert_eq!(index.get(ip("10.0.0.9")), None);
    }

    #[test]
    fn nodes_with_hostnames_or_garbage_addresses_are_left_out() {
        let nodes: Vec<NodeAddressJson> = serde_json::from_str(
            r#"[{"Node":"web-1","Address":"10.1.10.11","Datacenter":"dc1","TaggedAddresses":{"lan":"10.1.10.11","lan_ipv6":"2001:db8::11"},"Meta":{}},
                {"Node":"db","Address":"db.example.com"},
                {"Node":"v6","Address":"2001:DB8::6"},
                {"Node":"none"}]"#,
        )
        .expect("json");
        let (index, _) = AddressIndex::from_nodes(&nodes);
        assert_eq!(index.len(), 2);
        assert_eq!(index.get(ip("10.1.10.11")), Some("web-1"));
        assert_eq!(index.get(ip("2001:db8::6")), Some("v6"));
        assert_eq!(
            index.get(ip("2001:db8::11")),
            None,
            "tagged addresses are not matched, as in Consul"
        );
    }

    #[test]
    fn the_bound_keeps_the_lowest_addresses_and_says_how_many_it_left_out() {
        let names: Vec<(IpAddr, String)> = (0..MAX_PTR_ADDRESSES as u32 + 5)
            .map(|n| {
                (
                    IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n)),
                    format!("n{n}"),
                )
            })
            .collect();
        let (index, dropped) =
            AddressIndex::build(names.iter().map(|(ip, n)| (*ip, n.as_str(), n.as_str())));
        assert_eq!(dropped, 5);
        assert_eq!(index.len(), MAX_PTR_ADDRESSES);
        assert_eq!(index.get(names[0].0), Some("n0"));
        assert_eq!(index.get(names[MAX_PTR_ADDRESSES].0), None);
    }

    #[test]
    fn answers_name_the_node_or_service_in_the_main_domain() {
        let q = Question {
            name: Name::from_ascii("2.0.0.127.in-addr.arpa.").expect("name"),
            qtype: RecordType::PTR,
            qclass: DNSClass::IN,
        };
        let domain = Name::from_ascii("consul.").expect("name");
        let a = answer(&q, &PtrName::Node("Foo2".into()), "dc1", &domain, 7).expect("answer");
        assert!(a.authoritative);
        assert_eq!(a.rcode, ResponseCode::NoError);
        assert_eq!(a.answers.len(), 1);
        assert_eq!(a.answers[0].name, q.name);
        assert_eq!(a.answers[0].ttl, 7);
        match &a.answers[0].data {
            RData::PTR(p) => assert_eq!(p.0.to_ascii(), "Foo2.node.dc1.consul."),
            other => panic!("PTR expected: {other:?}"),
        }
        let a = answer(&q, &PtrName::Service("db".into()), "dc1", &domain, 5).expect("answer");
        match &a.answers[0].data {
            RData::PTR(p) => assert_eq!(p.0.to_ascii(), "db.service.dc1.consul."),
            other => panic!("PTR expected: {other:?}"),
        }
        let long = "x".repeat(250);
        assert_eq!(
            answer(&q, &PtrName::Node(long), "dc1", &domain, 5),
            None,
            "too long for a DNS name"
        );
    }
}
