//! Parsing names under the Consul domains the way Consul's own DNS interface does
//! (`agent/dns.go`): strip the longest matching domain, scan the labels right to left for the
//! first kind label, and read what stands before and after it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::{Name, RecordType};

/// What a name under a Consul domain asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ConsulName {
    /// `[tag.]service.service[.dc]` or RFC 2782 `_service._tag[.service][.dc]`.
    Service {
        service: String,
        tag: Option<String>,
        dc: Option<String>,
    },
    /// `node.node[.dc]` (node names may contain dots).
    Node { node: String, dc: Option<String> },
    /// `<hex>.addr[.dc]`: an address spelled in hex, answered locally.
    Addr { ip: IpAddr },
    /// `name.query[.dc]`: a prepared query.
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
            ConsulName::Service { service, tag, dc } => {
                valid_name_label(service) && tag.as_deref().is_none_or(valid_tag) && dc_ok(dc)
            }
            ConsulName::Node { node, dc } => valid_dotted_name(node) && dc_ok(dc),
            ConsulName::Query { query, dc } => valid_dotted_name(query) && dc_ok(dc),
            ConsulName::Addr { .. } | ConsulName::Apex | ConsulName::Invalid => true,
        }
    }
}

fn parse_labels_unchecked(labels: &[String], qtype: RecordType) -> ConsulName {
    if labels.is_empty() {
        return ConsulName::Apex;
    }
    // RFC 2782 with exactly two `_` labels in front: `_web._tcp[.service][.dc]`.
    if labels.len() >= 2 && labels[0].starts_with('_') && labels[1].starts_with('_') {
        let rest = &labels[2..];
        let dc = match rest {
            [] if qtype == RecordType::SRV => Some(None),
            [kind] if kind == "service" => Some(None),
            [kind, dc] if kind == "service" => Some(Some(dc.clone())),
            [dc] if qtype == RecordType::SRV && !dc.starts_with('_') => Some(Some(dc.clone())),
            // Not the two-underscore form after all (more `_` labels): parse it the usual way.
            _ => None,
        };
        if let Some(dc) = dc {
            let service = labels[0][1..].to_owned();
            let tag = &labels[1][1..];
            if service.is_empty() || tag.is_empty() {
                return ConsulName::Invalid;
            }
            let tag = match tag {
                "tcp" | "udp" => None,
                t => Some(t.to_owned()),
            };
            return ConsulName::Service { service, tag, dc };
        }
    }
    let Some(kind_at) = labels.iter().rposition(|l| {
        matches!(
            l.as_str(),
            "service" | "connect" | "ingress" | "virtual" | "node" | "query" | "addr"
        )
    }) else {
        return ConsulName::Invalid;
    };
    let dc = match &labels[kind_at + 1..] {
        [] => None,
        [dc] => Some(dc.clone()),
        _ => return ConsulName::Invalid,
    };
    let before = &labels[..kind_at];
    if before.is_empty() {
        return ConsulName::Invalid;
    }
    match labels[kind_at].as_str() {
        "service" => {
            let (service, tags) = before
                .split_last()
                .map_or((String::new(), &[][..]), |(s, t)| (s.clone(), t));
            ConsulName::Service {
                service,
                tag: (!tags.is_empty()).then(|| tags.join(".")),
                dc,
            }
        }
        "node" => ConsulName::Node {
            node: before.join("."),
            dc,
        },
        "query" => ConsulName::Query {
            query: before.join("."),
            dc,
        },
        "addr" if before.len() == 1 => {
            decode_hex_ip(&before[0]).map_or(ConsulName::Invalid, |ip| ConsulName::Addr { ip })
        }
        // connect, ingress and virtual need Consul's service mesh: not served here.
        _ => ConsulName::Invalid,
    }
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
        ConsulName::Service {
            service: service.into(),
            tag: tag.map(Into::into),
            dc: dc.map(Into::into),
        }
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
        assert_eq!(p("_web._udp.service.consul.", SRV), svc("web", None, None));
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
                dc: None
            }
        );
        assert_eq!(
            p("n1.node.dc1.consul.", A),
            ConsulName::Node {
                node: "n1".into(),
                dc: Some("dc1".into())
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
        assert_eq!(p("web.service.a.b.consul.", A), ConsulName::Invalid);
        assert_eq!(p("web.connect.consul.", A), ConsulName::Invalid);
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
            let cases: [(Vec<&[u8]>, RecordType); 9] = [
                (vec![bad, b"service"], A),
                (vec![b"web", b"service", bad], A),
                (vec![bad, b"node"], A),
                (vec![b"n1", bad, b"node"], A),
                (vec![b"n1", b"node", bad], A),
                (vec![bad, b"query"], A),
                (vec![b"q", b"query", bad], A),
                (vec![b"_web", b"_tcp", b"service", bad], SRV),
                (vec![b"_web", b"_tcp", bad], SRV),
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
