//! Parsing names under the Consul domains the way Consul's own DNS interface does
//! (`agent/dns.go`): strip the longest matching domain, scan the labels right to left for the
//! first kind label, and read what stands before and after it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::{Name, RecordType};

/// Which health endpoint answers a service name: `.service` (`/v1/health/service`), `.connect`
/// (`/v1/health/connect`: sidecar proxies and Connect-native instances) or `.ingress`
/// (`/v1/health/ingress`: the ingress gateways that route to the service).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ServiceKind {
    #[default]
    Service,
    Connect,
    Ingress,
}

/// Where a name points besides its datacenter: a cluster peer (`.peer`), and Consul
/// Enterprise's namespace (`.ns`) and admin partition (`.ap`). None of them is what a name
/// without those labels means (the agent's own partition and the default namespace), the
/// common case: one empty pointer, so names and view keys stay as small as before.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tenancy(Option<Box<TenancyLabels>>);

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct TenancyLabels {
    peer: Option<String>,
    ns: Option<String>,
    partition: Option<String>,
}

impl Tenancy {
    pub(crate) fn new(
        peer: Option<String>,
        ns: Option<String>,
        partition: Option<String>,
    ) -> Tenancy {
        if peer.is_none() && ns.is_none() && partition.is_none() {
            Tenancy(None)
        } else {
            Tenancy(Some(Box::new(TenancyLabels {
                peer,
                ns,
                partition,
            })))
        }
    }

    /// No peer, namespace or partition label.
    pub(crate) fn is_default(&self) -> bool {
        self.0.is_none()
    }

    pub(crate) fn peer(&self) -> Option<&str> {
        self.0.as_ref().and_then(|t| t.peer.as_deref())
    }

    pub(crate) fn ns(&self) -> Option<&str> {
        self.0.as_ref().and_then(|t| t.ns.as_deref())
    }

    pub(crate) fn partition(&self) -> Option<&str> {
        self.0.as_ref().and_then(|t| t.partition.as_deref())
    }

    /// The query parameters that select this tenancy in Consul's HTTP API (`peer`, `ns`,
    /// `partition`), after `dc` if given.
    pub(crate) fn params(&self, dc: Option<&str>) -> Vec<(&'static str, String)> {
        [
            ("dc", dc),
            ("peer", self.peer()),
            ("ns", self.ns()),
            ("partition", self.partition()),
        ]
        .into_iter()
        .filter_map(|(key, value)| value.map(|v| (key, v.to_owned())))
        .collect()
    }

    fn is_valid(&self) -> bool {
        [self.peer(), self.ns(), self.partition()]
            .into_iter()
            .all(|l| l.is_none_or(valid_name_label))
    }
}

/// What a service view is kept for: one per asked service, datacenter (`None`: the local
/// one), kind and tenancy.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ViewKey {
    pub(crate) service: String,
    pub(crate) dc: Option<String>,
    pub(crate) kind: ServiceKind,
    pub(crate) tenancy: Tenancy,
}

impl ViewKey {
    /// Takes the parsed name's strings: no allocation.
    pub(crate) fn new(
        service: String,
        dc: Option<String>,
        kind: ServiceKind,
        tenancy: Tenancy,
    ) -> ViewKey {
        ViewKey {
            service,
            dc,
            kind,
            tenancy,
        }
    }

    /// A `.service` lookup in the local datacenter without tenancy: the views the change feed
    /// patches and the `consul_healthy_instances` series follow.
    pub(crate) fn is_plain_local(&self) -> bool {
        self.dc.is_none() && self.kind == ServiceKind::Service && self.tenancy.is_default()
    }

    /// The request's metric label and path: `/v1/health/{service,connect,ingress}/<name>`.
    pub(crate) fn endpoint(&self) -> (&'static str, [&str; 4]) {
        let (label, kind) = match self.kind {
            ServiceKind::Service => ("health_service", "service"),
            ServiceKind::Connect => ("health_connect", "connect"),
            ServiceKind::Ingress => ("health_ingress", "ingress"),
        };
        (label, ["v1", "health", kind, self.service.as_str()])
    }

    /// The request's parameters: `dc`, `peer`, `ns`, `partition` as given.
    pub(crate) fn params(&self) -> Vec<(&'static str, String)> {
        self.tenancy.params(self.dc.as_deref())
    }
}

/// What a name under a Consul domain asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ConsulName {
    /// `[tag.]service.service[locality]`, RFC 2782 `_service._tag[.service][locality]`, and
    /// `service.connect[locality]`, `service.ingress[locality]` (no tag: Consul ignores the
    /// labels before the service there).
    Service {
        service: String,
        tag: Option<String>,
        kind: ServiceKind,
        dc: Option<String>,
        tenancy: Tenancy,
    },
    /// `service.virtual[.peer][locality]`: the virtual IP Consul gave the service (transparent
    /// proxy). Never another datacenter: Consul ignores a datacenter label there.
    Virtual { service: String, tenancy: Tenancy },
    /// `node.node[locality]` (node names may contain dots).
    Node {
        node: String,
        dc: Option<String>,
        tenancy: Tenancy,
    },
    /// `<hex>.addr[...]`: an address spelled in hex, answered locally.
    Addr { ip: IpAddr },
    /// `name.query[.dc]` or RFC 2782 `_name._tag.query[.dc]`: a prepared query.
    Query { query: String, dc: Option<String> },
    /// The domain itself (SOA, NS).
    Apex,
    /// Under the domain but meaningless: NXDOMAIN.
    Invalid,
}

/// A name split into its Consul domain and its meaning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// The matched domain, lowercased, fully qualified (`consul.` or an alternative domain).
    pub(crate) domain: Name,
    pub(crate) name: ConsulName,
}

/// Parses `qname` (already lowercased) against `domains`; `None` when it is under none of them.
pub fn parse(qname: &Name, qtype: RecordType, domains: &[Name]) -> Option<Parsed> {
    let domain = domains
        .iter()
        .filter(|d| d.zone_of(qname))
        .max_by_key(|d| d.num_labels())?
        .clone();
    let labels: Vec<String> = qname
        .iter()
        .take(usize::from(qname.num_labels() - domain.num_labels()))
        .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
        .collect();
    Some(Parsed {
        name: parse_labels(&labels, qtype),
        domain,
    })
}

/// Interprets the labels left of the domain, then checks every element that could reach Consul
/// against what Consul can hold in it ([`valid_name_label`]): a name that cannot exist there is
/// [`ConsulName::Invalid`] (NXDOMAIN, no request).
pub(crate) fn parse_labels(labels: &[String], qtype: RecordType) -> ConsulName {
    let parsed = parse_labels_unchecked(labels, qtype);
    if parsed.is_valid() {
        parsed
    } else {
        ConsulName::Invalid
    }
}

/// Longest node or prepared-query name accepted: a whole DNS name is at most 253 characters, so
/// nothing longer can be spelled in a question anyway.
const MAX_DOTTED_NAME: usize = 253;

/// Can this label be (part of) a service, node, prepared-query or datacenter name in Consul?
/// ASCII letters, digits, `-` and `_`, 1 to 63 bytes: the characters Consul's own DNS interface
/// can serve (it warns at registration that any other name "will not be discoverable via DNS"),
/// and the datacenter rule (`^[a-z0-9_-]+$`). Everything that could steer an HTTP request (`/`,
/// `.` inside a label, `?`, `#`, `%`, `&`, `=`, `+`, `;`, `:`, `@`, `\`, space, quotes, NUL,
/// non-ASCII bytes) is outside it. Names are lowercased before this check.
pub(crate) fn valid_name_label(label: &str) -> bool {
    (1..=63).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// A node or prepared-query name: labels joined by dots, each a [`valid_name_label`].
fn valid_dotted_name(name: &str) -> bool {
    name.len() <= MAX_DOTTED_NAME && name.split('.').all(valid_name_label)
}

/// A tag spelled in a name: visible ASCII labels joined by dots. Tags are matched inside the
/// forwarder and never sent to Consul; Consul tags may hold almost any character, so this only
/// keeps control bytes, spaces and non-ASCII out of what is compared and logged.
fn valid_tag(tag: &str) -> bool {
    tag.split('.')
        .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_graphic()))
}

impl ConsulName {
    fn is_valid(&self) -> bool {
        let dc_ok = |dc: &Option<String>| dc.as_deref().is_none_or(valid_name_label);
        match self {
            ConsulName::Service {
                service,
                tag,
                dc,
                tenancy,
                ..
            } => {
                valid_name_label(service)
                    && tag.as_deref().is_none_or(valid_tag)
                    && dc_ok(dc)
                    && tenancy.is_valid()
            }
            ConsulName::Virtual { service, tenancy } => {
                valid_name_label(service) && tenancy.is_valid()
            }
            ConsulName::Node { node, dc, tenancy } => {
                valid_dotted_name(node) && dc_ok(dc) && tenancy.is_valid()
            }
            ConsulName::Query { query, dc } => valid_dotted_name(query) && dc_ok(dc),
            ConsulName::Addr { .. } | ConsulName::Apex | ConsulName::Invalid => true,
        }
    }
}

/// The labels that name a kind of lookup; the rightmost one decides (Consul's `dispatch`).
/// A `match`, not a list: every label of every Consul name goes through it.
fn is_kind(label: &str) -> bool {
    matches!(
        label,
        "service" | "connect" | "ingress" | "virtual" | "node" | "query" | "addr"
    )
}

/// The labels that say what the label before them is, after the kind: datacenter, cluster
/// peer, namespace, admin partition; `port` (a v2-catalog port name, which Consul's DNS reads
/// and then ignores) and `sg` (an Enterprise sameness group, not served here).
const LOCALITY_KEYWORDS: [&str; 6] = ["dc", "peer", "ns", "ap", "port", "sg"];

/// Most `<value>.<keyword>` pairs after the kind: one each of `dc` or `peer`, `ns`, `ap`, and
/// `port`.
const MAX_LOCALITY_PAIRS: usize = 4;

/// The labels after the kind, as Consul's `parseLocality` reads them (the CE one, plus what
/// Consul Enterprise's docs add): none; one label (the datacenter, or for `.virtual` the peer);
/// `<value>.<keyword>` pairs in any order; or Enterprise's older `<namespace>.<datacenter>`.
/// Both a datacenter and a peer, or a keyword this does not know, make the name invalid.
#[derive(Debug, Default)]
struct Locality {
    dc: Option<String>,
    peer: Option<String>,
    ns: Option<String>,
    partition: Option<String>,
    /// One unlabelled label: a datacenter, except for `.virtual` where it is a peer.
    peer_or_dc: Option<String>,
}

impl Locality {
    fn parse(labels: &[String]) -> Option<Locality> {
        let keyword = |l: &str| LOCALITY_KEYWORDS.contains(&l);
        let mut loc = Locality::default();
        match labels {
            [] => {}
            [one] => loc.peer_or_dc = Some(one.clone()),
            [ns, dc] if !keyword(dc) => {
                loc.ns = Some(ns.clone());
                loc.dc = Some(dc.clone());
            }
            _ if labels.len().is_multiple_of(2) && labels.len() <= 2 * MAX_LOCALITY_PAIRS => {
                for pair in labels.chunks_exact(2) {
                    let value = Some(pair[0].clone());
                    // A repeated keyword overwrites, as in Consul.
                    match pair[1].as_str() {
                        "dc" => loc.dc = value,
                        "peer" => loc.peer = value,
                        "ns" => loc.ns = value,
                        "ap" => loc.partition = value,
                        "port" => {}
                        _ => return None,
                    }
                }
                if loc.dc.is_some() && loc.peer.is_some() {
                    return None;
                }
            }
            _ => return None,
        }
        Some(loc)
    }

    /// The datacenter a lookup goes to: the labelled one, else the single label.
    fn datacenter(&mut self) -> Option<String> {
        self.dc.take().or_else(|| self.peer_or_dc.take())
    }

    fn tenancy(self, peer: Option<String>) -> Tenancy {
        Tenancy::new(peer, self.ns, self.partition)
    }
}

/// Splits the labels at the kind: Consul scans right to left for the first kind label; for
/// SRV, a label starting with `_` counts as `service` and belongs to the labels before it
/// (`_web._tcp.consul`). Returns (kind, the labels before it, the labels after it).
fn split_at_kind(labels: &[String], qtype: RecordType) -> Option<(&str, &[String], &[String])> {
    labels.iter().enumerate().rev().find_map(|(i, l)| {
        if is_kind(l) {
            Some((l.as_str(), &labels[..i], &labels[i + 1..]))
        } else if qtype == RecordType::SRV && l.starts_with('_') {
            Some(("service", &labels[..=i], &labels[i + 1..]))
        } else {
            None
        }
    })
}

fn parse_labels_unchecked(labels: &[String], qtype: RecordType) -> ConsulName {
    if labels.is_empty() {
        return ConsulName::Apex;
    }
    let Some((kind, before, after)) = split_at_kind(labels, qtype) else {
        return ConsulName::Invalid;
    };
    if before.is_empty() {
        return ConsulName::Invalid;
    }
    match kind {
        "query" => return parse_query(before, after),
        "addr" => {
            // Consul reads nothing after `.addr` (its SRV targets for peers have no datacenter).
            return match before {
                [hex] => {
                    decode_hex_ip(hex).map_or(ConsulName::Invalid, |ip| ConsulName::Addr { ip })
                }
                _ => ConsulName::Invalid,
            };
        }
        _ => {}
    }
    if after.is_empty() && kind == "service" {
        // The common name, `[tag.]service.service`, on the shortest path.
        let (service, tag) = service_and_tag(before);
        return ConsulName::Service {
            service,
            tag,
            kind: ServiceKind::Service,
            dc: None,
            tenancy: Tenancy::default(),
        };
    }
    let Some(mut loc) = Locality::parse(after) else {
        return ConsulName::Invalid;
    };
    // Consul uses the last label as the service and drops any before it for the other kinds.
    let last = || before[before.len() - 1].clone();
    match kind {
        "service" => {
            let (service, tag) = service_and_tag(before);
            let dc = loc.datacenter();
            let peer = loc.peer.take();
            ConsulName::Service {
                service,
                tag,
                kind: ServiceKind::Service,
                // A peer's services have no datacenter of ours.
                dc: if peer.is_some() { None } else { dc },
                tenancy: loc.tenancy(peer),
            }
        }
        // Consul does not serve these from peers: a peer label is read and ignored.
        "connect" | "ingress" => ConsulName::Service {
            service: last(),
            tag: None,
            kind: if kind == "connect" {
                ServiceKind::Connect
            } else {
                ServiceKind::Ingress
            },
            dc: loc.datacenter(),
            tenancy: loc.tenancy(None),
        },
        // Virtual IPs are per datacenter: Consul ignores a datacenter label, and reads a single
        // label as the peer.
        "virtual" => {
            let peer = loc.peer.take().or_else(|| loc.peer_or_dc.take());
            ConsulName::Virtual {
                service: last(),
                tenancy: loc.tenancy(peer),
            }
        }
        "node" => {
            // Nodes live in the default namespace only.
            if loc.ns.as_deref().is_some_and(|ns| ns != "default") {
                return ConsulName::Invalid;
            }
            let dc = loc.datacenter();
            let peer = loc.peer.take();
            ConsulName::Node {
                node: before.join("."),
                dc: if peer.is_some() { None } else { dc },
                tenancy: loc.tenancy(peer),
            }
        }
        _ => ConsulName::Invalid,
    }
}

/// The service and tag of `[tag.]service` or RFC 2782 `_service._tag` (exactly two labels,
/// both starting with `_`): there `_tcp` (and an empty tag) means no tag, any other protocol
/// label is a tag (`_web._udp` asks for tag `udp`), as in Consul.
fn service_and_tag(before: &[String]) -> (String, Option<String>) {
    if let [service, tag] = before {
        if let (Some(service), Some(tag)) = (service.strip_prefix('_'), tag.strip_prefix('_')) {
            let tag = (!matches!(tag, "" | "tcp")).then(|| tag.to_owned());
            return (service.to_owned(), tag);
        }
    }
    let (service, tags) = before
        .split_last()
        .map_or((String::new(), &[][..]), |(s, t)| (s.clone(), t));
    (service, (!tags.is_empty()).then(|| tags.join(".")))
}

/// `name.query[.dc]`; with the first and the last label starting with `_`, RFC 2782
/// `_name._tag.query[.dc]` (the tag ignored), so SRV clients can ask for a prepared query.
/// Only a bare datacenter label follows (Consul's `parseDatacenter`, not its locality).
fn parse_query(before: &[String], after: &[String]) -> ConsulName {
    let dc = match after {
        [] => None,
        [dc] => Some(dc.clone()),
        _ => return ConsulName::Invalid,
    };
    let query = match before {
        [first, .., last] if first.starts_with('_') && last.starts_with('_') => {
            before[..before.len() - 1].join(".")[1..].to_owned()
        }
        _ => before.join("."),
    };
    ConsulName::Query { query, dc }
}

/// `7f000001` → 127.0.0.1; 32 hex digits → an IPv6 address.
pub(crate) fn decode_hex_ip(hex: &str) -> Option<IpAddr> {
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    match hex.len() {
        8 => u32::from_str_radix(hex, 16)
            .ok()
            .map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        32 => u128::from_str_radix(hex, 16)
            .ok()
            .map(|v| IpAddr::V6(Ipv6Addr::from(v))),
        _ => None,
    }
}

/// The `.addr` label of an address: 8 hex digits for IPv4, 32 for IPv6.
pub(crate) fn encode_hex_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{:08x}", u32::from(v4)),
        IpAddr::V6(v6) => format!("{:032x}", u128::from(v6)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn p(name: &str, qtype: RecordType) -> ConsulName {
        let domains = [
            Name::from_str("consul.").expect("d"),
            Name::from_str("alt.example.").expect("d"),
        ];
        parse(
            &Name::from_str(name).expect("name").to_lowercase(),
            qtype,
            &domains,
        )
        .expect("in domain")
        .name
    }

    fn svc(service: &str, tag: Option<&str>, dc: Option<&str>) -> ConsulName {
        scoped(ServiceKind::Service, service, tag, dc, Tenancy::default())
    }

    fn scoped(
        kind: ServiceKind,
        service: &str,
        tag: Option<&str>,
        dc: Option<&str>,
        tenancy: Tenancy,
    ) -> ConsulName {
        ConsulName::Service {
            service: service.into(),
            tag: tag.map(Into::into),
            kind,
            dc: dc.map(Into::into),
            tenancy,
        }
    }

    fn tenancy(peer: Option<&str>, ns: Option<&str>, partition: Option<&str>) -> Tenancy {
        let own = |l: Option<&str>| l.map(str::to_owned);
        Tenancy::new(own(peer), own(ns), own(partition))
    }

    #[test]
    fn service_forms() {
        use RecordType::*;
        assert_eq!(p("web.service.consul.", A), svc("web", None, None));
        assert_eq!(p("WEB.Service.CONSUL.", A), svc("web", None, None));
        assert_eq!(
            p("web.service.dc2.consul.", A),
            svc("web", None, Some("dc2"))
        );
        assert_eq!(p("v1.web.service.consul.", A), svc("web", Some("v1"), None));
        assert_eq!(
            p("v1.primary.db.service.consul.", A),
            svc("db", Some("v1.primary"), None)
        );
        assert_eq!(p("web.service.alt.example.", A), svc("web", None, None));
        // A service named like a kind: the rightmost kind label wins.
        assert_eq!(p("node.service.consul.", A), svc("node", None, None));
    }

    #[test]
    fn rfc2782_forms() {
        use RecordType::*;
        assert_eq!(p("_web._tcp.service.consul.", SRV), svc("web", None, None));
        // Only `_tcp` means "any tag": `_udp` is the tag `udp`, as in Consul.
        assert_eq!(
            p("_web._udp.service.consul.", SRV),
            svc("web", Some("udp"), None)
        );
        assert_eq!(p("_web._.service.consul.", SRV), svc("web", None, None));
        assert_eq!(
            p("_web._v1.service.consul.", SRV),
            svc("web", Some("v1"), None)
        );
        assert_eq!(
            p("_web._tcp.service.dc2.consul.", SRV),
            svc("web", None, Some("dc2"))
        );
        assert_eq!(p("_web._tcp.consul.", SRV), svc("web", None, None));
        assert_eq!(
            p("_web._tcp.dc2.consul.", SRV),
            svc("web", None, Some("dc2"))
        );
        assert_eq!(p("_web._tcp.consul.", A), ConsulName::Invalid);
        assert_eq!(
            p("_a._b._c.service.consul.", SRV),
            svc("_c", Some("_a._b"), None)
        );
    }

    #[test]
    fn node_addr_query_apex_invalid() {
        use RecordType::*;
        assert_eq!(
            p("foo.bar.node.consul.", A),
            ConsulName::Node {
                node: "foo.bar".into(),
                dc: None,
                tenancy: Tenancy::default(),
            }
        );
        assert_eq!(
            p("n1.node.dc1.consul.", A),
            ConsulName::Node {
                node: "n1".into(),
                dc: Some("dc1".into()),
                tenancy: Tenancy::default(),
            }
        );
        assert_eq!(
            p("7f000002.addr.dc1.consul.", A),
            ConsulName::Addr {
                ip: "127.0.0.2".parse().expect("ip")
            }
        );
        assert_eq!(
            p("20010db8000000000000000000000001.addr.consul.", AAAA),
            ConsulName::Addr {
                ip: "2001:db8::1".parse().expect("ip")
            }
        );
        assert_eq!(p("zz.addr.consul.", A), ConsulName::Invalid);
        assert_eq!(
            p("geo.query.consul.", A),
            ConsulName::Query {
                query: "geo".into(),
                dc: None
            }
        );
        assert_eq!(p("consul.", SOA), ConsulName::Apex);
        assert_eq!(p("foo.consul.", A), ConsulName::Invalid);
        assert_eq!(p("service.consul.", A), ConsulName::Invalid);
        assert_eq!(p("web.service.a.b.c.consul.", A), ConsulName::Invalid);
    }

    #[test]
    fn locality_labels() {
        use RecordType::*;
        let local = Tenancy::default;
        assert_eq!(
            p("v1.web.service.dc2.dc.alt.example.", A),
            svc("web", Some("v1"), Some("dc2"))
        );
        // (name, qtype, datacenter, (peer, namespace, partition)) of service `web`, no tag.
        type Case = (
            &'static str,
            RecordType,
            Option<&'static str>,
            [Option<&'static str>; 3],
        );
        let cases: [Case; 7] = [
            ("web.service.dc2.dc.consul.", A, Some("dc2"), [None; 3]),
            ("_web._tcp.dc2.dc.consul.", SRV, Some("dc2"), [None; 3]),
            // A peer's services: no datacenter.
            (
                "web.service.p1.peer.consul.",
                A,
                None,
                [Some("p1"), None, None],
            ),
            (
                "_web._tcp.service.p1.peer.consul.",
                SRV,
                None,
                [Some("p1"), None, None],
            ),
            // Enterprise: namespace and partition, in any order, with or without a datacenter.
            (
                "web.service.ns1.ns.ap1.ap.dc2.dc.consul.",
                A,
                Some("dc2"),
                [None, Some("ns1"), Some("ap1")],
            ),
            (
                "web.service.ap1.ap.ns1.ns.consul.",
                A,
                None,
                [None, Some("ns1"), Some("ap1")],
            ),
            (
                "web.service.ns1.ns.p1.peer.consul.",
                A,
                None,
                [Some("p1"), Some("ns1"), None],
            ),
        ];
        for (name, qtype, dc, [peer, ns, ap]) in cases {
            let want = scoped(ServiceKind::Service, "web", None, dc, tenancy(peer, ns, ap));
            assert_eq!(p(name, qtype), want, "{name}");
        }
        // Enterprise's older `<namespace>.<datacenter>`.
        assert_eq!(
            p("web.service.ns1.dc2.consul.", A),
            scoped(
                ServiceKind::Service,
                "web",
                None,
                Some("dc2"),
                tenancy(None, Some("ns1"), None)
            )
        );
        // A port name is read and ignored, as Consul's DNS does with the v1 catalog.
        assert_eq!(
            p("web.service.http.port.consul.", A),
            svc("web", None, None)
        );
        assert_eq!(
            p("web.service.dc2.dc.p1.peer.consul.", A),
            ConsulName::Invalid
        );
        assert_eq!(p("web.service.g1.sg.consul.", A), ConsulName::Invalid);
        assert_eq!(p("web.service.x.nope.y.dc.consul.", A), ConsulName::Invalid);
        assert_eq!(p("web.service.a.dc.b.consul.", A), ConsulName::Invalid);
        assert_eq!(
            p("web.service.a.dc.b.ns.c.ap.d.port.e.peer.consul.", A),
            ConsulName::Invalid
        );
        // Nodes: datacenter, peer, partition; the default namespace only.
        assert_eq!(
            p("n1.node.dc2.dc.consul.", A),
            ConsulName::Node {
                node: "n1".into(),
                dc: Some("dc2".into()),
                tenancy: local(),
            }
        );
        assert_eq!(
            p("n1.node.p1.peer.consul.", A),
            ConsulName::Node {
                node: "n1".into(),
                dc: None,
                tenancy: tenancy(Some("p1"), None, None),
            }
        );
        assert_eq!(
            p("n1.node.default.ns.ap1.ap.consul.", A),
            ConsulName::Node {
                node: "n1".into(),
                dc: None,
                tenancy: tenancy(None, Some("default"), Some("ap1")),
            }
        );
        assert_eq!(p("n1.node.ns1.ns.consul.", A), ConsulName::Invalid);
        // Prepared queries take a bare datacenter only.
        assert_eq!(p("geo.query.dc2.dc.consul.", A), ConsulName::Invalid);
    }

    #[test]
    fn connect_ingress_virtual_forms() {
        use RecordType::*;
        let connect =
            |dc: Option<&str>, t: Tenancy| scoped(ServiceKind::Connect, "web", None, dc, t);
        assert_eq!(
            p("web.connect.consul.", A),
            connect(None, Tenancy::default())
        );
        assert_eq!(
            p("WEB.Connect.consul.", SRV),
            connect(None, Tenancy::default())
        );
        // Consul takes the last label before the kind and drops the rest (no tags here).
        assert_eq!(
            p("v1.web.connect.consul.", A),
            connect(None, Tenancy::default())
        );
        assert_eq!(
            p("web.connect.dc2.consul.", A),
            connect(Some("dc2"), Tenancy::default())
        );
        assert_eq!(
            p("web.connect.dc2.dc.consul.", A),
            connect(Some("dc2"), Tenancy::default())
        );
        // Consul does not serve these from peers: the peer label is read and ignored.
        assert_eq!(
            p("web.connect.p1.peer.consul.", A),
            connect(None, Tenancy::default())
        );
        assert_eq!(
            p("web.connect.ns1.ns.consul.", A),
            connect(None, tenancy(None, Some("ns1"), None))
        );
        assert_eq!(
            p("web.ingress.dc2.consul.", SRV),
            scoped(
                ServiceKind::Ingress,
                "web",
                None,
                Some("dc2"),
                Tenancy::default()
            )
        );
        let virt = |t: Tenancy| ConsulName::Virtual {
            service: "web".into(),
            tenancy: t,
        };
        assert_eq!(p("web.virtual.consul.", A), virt(Tenancy::default()));
        // A single label is the peer; a datacenter label is ignored.
        assert_eq!(
            p("web.virtual.p1.consul.", A),
            virt(tenancy(Some("p1"), None, None))
        );
        assert_eq!(
            p("web.virtual.p1.peer.consul.", A),
            virt(tenancy(Some("p1"), None, None))
        );
        assert_eq!(p("web.virtual.dc2.dc.consul.", A), virt(Tenancy::default()));
        assert_eq!(
            p("web.virtual.ns1.ns.ap1.ap.p1.peer.consul.", A),
            virt(tenancy(Some("p1"), Some("ns1"), Some("ap1")))
        );
        assert_eq!(p("connect.consul.", A), ConsulName::Invalid);
    }

    #[test]
    fn prepared_query_rfc2782_and_addr_suffixes() {
        use RecordType::*;
        let query = |q: &str, dc: Option<&str>| ConsulName::Query {
            query: q.into(),
            dc: dc.map(Into::into),
        };
        assert_eq!(p("_geo._tcp.query.consul.", SRV), query("geo", None));
        assert_eq!(p("_geo._tcp.query.consul.", A), query("geo", None));
        assert_eq!(
            p("_geo._tcp.query.dc2.consul.", SRV),
            query("geo", Some("dc2"))
        );
        // Dots in a query name, RFC 2782 style: every label but the protocol.
        assert_eq!(p("_geo.db._tcp.query.consul.", SRV), query("geo.db", None));
        assert_eq!(p("geo.db.query.consul.", A), query("geo.db", None));
        assert_eq!(p("_geo.query.consul.", A), query("_geo", None));
        assert_eq!(p("_._tcp.query.consul.", SRV), ConsulName::Invalid);
        // `.addr` ignores what follows it (peer SRV targets are `<hex>.addr.<domain>`).
        let ip = ConsulName::Addr {
            ip: "127.0.0.2".parse().expect("ip"),
        };
        assert_eq!(p("7f000002.addr.consul.", A), ip);
        assert_eq!(p("7f000002.addr.dc1.dc.consul.", A), ip);
        assert_eq!(p("x.7f000002.addr.consul.", A), ConsulName::Invalid);
    }

    /// Labels as a client may send them: any byte. Built from raw wire labels, since most of
    /// these cannot be written in a master-file name.
    fn raw(labels: &[&[u8]], qtype: RecordType) -> ConsulName {
        let mut all: Vec<&[u8]> = labels.to_vec();
        all.push(b"consul");
        let name = Name::from_labels(all).expect("wire name").to_lowercase();
        parse(&name, qtype, &[Name::from_str("consul.").expect("d")])
            .expect("in domain")
            .name
    }

    #[test]
    fn names_consul_cannot_hold_are_invalid_in_every_position() {
        use RecordType::*;
        let hostile: [&[u8]; 16] = [
            b"a/b",
            b"..",
            b"a?b",
            b"a#b",
            b"a%2fb",
            b"a&b",
            b"a=b",
            b"a+b",
            b"a;b",
            b"a:b",
            b"a@b",
            b"a\\b",
            b"a\0b",
            b"a b",
            b"a\"b",
            b"caf\xc3\xa9",
        ];
        for bad in hostile {
            let cases: [(Vec<&[u8]>, RecordType); 20] = [
                (vec![bad, b"service"], A),
                (vec![b"web", b"service", bad, b"dc"], A),
                (vec![b"web", b"service", bad, b"peer"], A),
                (vec![b"web", b"service", bad, b"ns"], A),
                (vec![b"web", b"service", bad, b"ap"], A),
                (vec![b"web", b"service", b"ns1", bad], A),
                (vec![bad, b"connect"], A),
                (vec![bad, b"ingress"], SRV),
                (vec![bad, b"virtual"], A),
                (vec![b"web", b"virtual", bad], A),
                (vec![b"n1", b"node", bad, b"peer"], A),
                (vec![b"web", b"service", bad], A),
                (vec![bad, b"node"], A),
                (vec![b"n1", bad, b"node"], A),
                (vec![b"n1", b"node", bad], A),
                (vec![bad, b"query"], A),
                (vec![b"q", b"query", bad], A),
                (vec![b"_web", b"_tcp", b"service", bad], SRV),
                (vec![b"_web", b"_tcp", bad], SRV),
                (vec![bad, b"_tcp", b"query"], SRV),
            ];
            for (labels, qtype) in cases {
                let name = raw(&labels, qtype);
                assert_eq!(name, ConsulName::Invalid, "{labels:?} parsed as {name:?}");
            }
        }
        // The RFC 2782 service label with a hostile byte after its underscore.
        assert_eq!(
            raw(&[b"_we/b", b"_tcp", b"service"], SRV),
            ConsulName::Invalid
        );
        // A 63-byte label is a valid name; uppercase is lowercased first.
        let long = [b'a'; 63];
        assert_eq!(
            raw(&[&long, b"service"], A),
            svc(std::str::from_utf8(&long).expect("ascii"), None, None)
        );
        assert_eq!(raw(&[b"WEB", b"service"], A), svc("web", None, None));
        assert_eq!(
            raw(&[b"my_svc-2", b"service", b"dc_2"], A),
            svc("my_svc-2", None, Some("dc_2"))
        );
        // Tags never reach Consul: visible ASCII is kept, control bytes and spaces are not.
        assert_eq!(
            raw(&[b"v=1", b"web", b"service"], A),
            svc("web", Some("v=1"), None)
        );
        assert_eq!(raw(&[b"v 1", b"web", b"service"], A), ConsulName::Invalid);
    }

    #[test]
    fn not_in_domain() {
        let domains = [Name::from_str("consul.").expect("d")];
        assert!(parse(
            &Name::from_str("example.com.").expect("n"),
            RecordType::A,
            &domains
        )
        .is_none());
        assert!(parse(
            &Name::from_str("notconsul.").expect("n"),
            RecordType::A,
            &domains
        )
        .is_none());
    }

    #[test]
    fn hex_roundtrip() {
        for ip in ["127.0.0.2", "10.1.2.3", "2001:db8::1", "::1"] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(decode_hex_ip(&encode_hex_ip(ip)), Some(ip));
        }
        assert_eq!(encode_hex_ip("127.0.0.2".parse().expect("ip")), "7f000002");
    }
}
