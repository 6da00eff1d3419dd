//! Which address each kind of question gets for an instance or a node, as Consul's DNS chooses
//! it (`agent/translate_addr.go`, `nodeServiceRecords` and `makeRecordFromNode` in
//! `agent/dns.go`): from the address and the tagged addresses (`lan_ipv4`, `lan_ipv6`, and with
//! `translate_wan_addrs` for another datacenter `wan`, `wan_ipv4`, `wan_ipv6`).
//!
//! Resolved once, when a view is built, into [`Addrs`]: the A answer, the AAAA answer, the
//! hostname (CNAME) and which of them ANY and SRV get. A view keeps these, not the tagged
//! addresses: 16 bytes per instance more than one address took, whatever the tags, and
//! answering costs what it did before.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use hickory_proto::rr::RecordType;
use serde::Deserialize;

/// `TaggedAddresses` of a node (`map[string]string`, `A = String`) or of a service
/// (`map[string]ServiceAddress`, `A = ServiceAddressJson`): only the keys Consul's DNS reads
/// (`lan` never decides an answer; `wan` only with WAN translation; `consul-virtual`, the
/// virtual IP Consul writes into every Connect instance of a service, only for `.virtual`).
#[derive(Clone, Debug, Deserialize)]
#[serde(bound = "A: Deserialize<'de>")]
pub(crate) struct TaggedJson<A> {
    #[serde(default)]
    pub(crate) lan_ipv4: Option<A>,
    #[serde(default)]
    pub(crate) lan_ipv6: Option<A>,
    #[serde(default)]
    pub(crate) wan: Option<A>,
    #[serde(default)]
    pub(crate) wan_ipv4: Option<A>,
    #[serde(default)]
    pub(crate) wan_ipv6: Option<A>,
    #[serde(rename = "consul-virtual", default)]
    pub(crate) consul_virtual: Option<A>,
}

impl<A> Default for TaggedJson<A> {
    fn default() -> Self {
        TaggedJson {
            lan_ipv4: None,
            lan_ipv6: None,
            wan: None,
            wan_ipv4: None,
            wan_ipv6: None,
            consul_virtual: None,
        }
    }
}

/// A service's tagged address. The agent writes Go's field names (`Address`, `Port`); Consul's
/// docs write them in lowercase, which Go's decoder (and this one) accepts too.
#[derive(Clone, Debug, Default, Deserialize)]
pub(crate) struct ServiceAddressJson {
    #[serde(rename = "Address", alias = "address", default)]
    pub(crate) address: String,
    #[serde(rename = "Port", alias = "port", default)]
    pub(crate) port: u16,
}

/// The address inside a tagged-address value.
pub(crate) trait TaggedAddress {
    fn address(&self) -> &str;
}

impl TaggedAddress for String {
    fn address(&self) -> &str {
        self
    }
}

impl TaggedAddress for ServiceAddressJson {
    fn address(&self) -> &str {
        &self.address
    }
}

/// What a question accepts (Consul's `TranslateAddressAccept`): A an IPv4 address (or a name),
/// AAAA an IPv6 address (or a name), anything else (ANY, SRV) any of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Accept {
    V4,
    V6,
    Any,
}

/// One address's candidates: (default, IPv4, IPv6).
pub(crate) type Candidates<'a> = [&'a str; 3];

/// Consul's candidates (`TranslateAddress`, `TranslateServiceAddress`): the address, its
/// `lan_ipv4` and `lan_ipv6` tags; with WAN translation, the `wan`, `wan_ipv4` and `wan_ipv6`
/// tags instead where they are present. A family tag that is not an address of its family is
/// ignored: Consul's agent refuses to register one (`validateService`), so only a hand-made
/// catalog entry has it.
pub(crate) fn candidates<'a, A: TaggedAddress>(
    address: &'a str,
    tagged: &'a TaggedJson<A>,
    wan: bool,
) -> Candidates<'a> {
    let get = |t: &'a Option<A>| t.as_ref().map(TaggedAddress::address);
    let (mut def, mut v4, mut v6) = (
        address,
        get(&tagged.lan_ipv4).unwrap_or(""),
        get(&tagged.lan_ipv6).unwrap_or(""),
    );
    if wan {
        def = get(&tagged.wan).unwrap_or(def);
        v4 = get(&tagged.wan_ipv4).unwrap_or(v4);
        v6 = get(&tagged.wan_ipv6).unwrap_or(v6);
    }
    let v4 = if v4.trim().parse::<Ipv4Addr>().is_ok() {
        v4
    } else {
        ""
    };
    let v6 = if v6.trim().parse::<Ipv6Addr>().is_ok() {
        v6
    } else {
        ""
    };
    [def, v4, v6]
}

/// Consul's `translateAddressAccept`: the IPv6 tag when IPv6 is accepted, else the IPv4 tag when
/// IPv4 is, else the default address whatever its family. (Consul's third case tests
/// `accept & TranslateAddressAcceptAny`, which every accept value passes, since `Any` is all
/// bits set: so an A question for an IPv6 default gets that IPv6 address, which then makes no
/// record; no fallback to the node's IPv4.)
pub(crate) fn translate_accept<'a>(accept: Accept, [def, v4, v6]: Candidates<'a>) -> &'a str {
    match accept {
        Accept::V6 | Accept::Any if !v6.is_empty() => v6,
        Accept::V4 | Accept::Any if !v4.is_empty() => v4,
        _ => def,
    }
}

/// Where one kind of question reaches an instance (Consul's `nodeServiceRecords`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reached<'a> {
    Nothing,
    /// `via_node`: the node's own address (no service address, no translation), which SRV
    /// names `<node>.node.<dc>.<domain>`; otherwise `<hex>.addr.<dc>.<domain>`.
    Ip {
        ip: IpAddr,
        via_node: bool,
    },
    /// A hostname: a CNAME, or the SRV target itself.
    Host(&'a str),
}

/// No service address: the node's (its own address keeps the node-name SRV form, a tagged or
/// WAN one does not); a service IP; else the service's hostname. (Consul also answers the node's
/// address for a service whose address is the question's own name; that case is not kept.)
fn reach<'a>(
    accept: Accept,
    service: Candidates<'a>,
    node: Candidates<'a>,
    node_address: &str,
) -> Reached<'a> {
    let sa = translate_accept(accept, service).trim();
    let na = translate_accept(accept, node).trim();
    let (addr, from_node) = match (sa, na) {
        ("", "") => return Reached::Nothing,
        ("", na) => (na, true),
        (sa, _) => (sa, false),
    };
    match addr.parse::<IpAddr>() {
        Ok(ip) => Reached::Ip {
            ip,
            via_node: from_node && addr == node_address.trim(),
        },
        Err(_) => Reached::Host(addr),
    }
}

/// Which of an [`Addrs`]' answers ANY and SRV questions get (Consul's "any" translation prefers
/// the IPv6 tag, then the IPv4 tag, then the address).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AnyAddr {
    #[default]
    None,
    V4,
    V6,
    Host,
}

/// Where each kind of question reaches an instance or a node, resolved when the view is built.
/// One hostname is enough: with family tags that are addresses of their family, every question
/// that gets a name gets the same one (the service's address, else the node's).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Addrs {
    /// The A answer.
    pub v4: Option<Ipv4Addr>,
    /// The AAAA answer.
    pub v6: Option<Ipv6Addr>,
    /// Lowercased, without the trailing dot: the CNAME target of questions whose family has no
    /// address, and the SRV target when `any` is `Host`. Shared within a view.
    pub host: Option<Arc<str>>,
    /// What ANY and SRV get.
    pub any: AnyAddr,
    /// Where the addresses came from: whether SRV names the node, which one is the service's.
    pub origin: Origin,
}

/// Where an [`Addrs`]' addresses came from, where it matters. One byte for two facts that
/// exclude each other (a service with an address of its own is never reached at its node's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Origin {
    #[default]
    Other,
    /// ANY's address is the node's own `Address`: SRV names the target
    /// `<node>.node.<dc>.<domain>` rather than `<hex>.addr.<dc>.<domain>`.
    NodeAddress,
    /// `v4` is the service's own `Address` (what a reverse lookup of a service address matches).
    ServiceV4,
    /// `v6` is the service's own `Address`.
    ServiceV6,
}

impl Addrs {
    /// One address for every question: what an instance with no tagged addresses gets.
    /// `via_node`: it is its node's own address.
    pub fn ip(ip: IpAddr, via_node: bool) -> Addrs {
        let (v4, v6, any) = match ip {
            IpAddr::V4(v4) => (Some(v4), None, AnyAddr::V4),
            IpAddr::V6(v6) => (None, Some(v6), AnyAddr::V6),
        };
        Addrs {
            v4,
            v6,
            host: None,
            any,
            origin: if via_node {
                Origin::NodeAddress
            } else {
                Origin::Other
            },
        }
    }

    /// The choice for each kind of question, from the service's and the node's candidates;
    /// `intern` shares the hostname within a view.
    pub(crate) fn resolve(
        service: Candidates<'_>,
        node: Candidates<'_>,
        node_address: &str,
        intern: &mut dyn FnMut(&str) -> Arc<str>,
    ) -> Addrs {
        let [a, aaaa, any] =
            [Accept::V4, Accept::V6, Accept::Any].map(|q| reach(q, service, node, node_address));
        let v4 = match a {
            Reached::Ip {
                ip: IpAddr::V4(v4), ..
            } => Some(v4),
            _ => None,
        };
        let v6 = match aaaa {
            Reached::Ip {
                ip: IpAddr::V6(v6), ..
            } => Some(v6),
            _ => None,
        };
        let host = [a, aaaa, any].into_iter().find_map(|r| match r {
            Reached::Host(h) => Some(intern(h.trim_end_matches('.'))),
            _ => None,
        });
        // ANY's choice is always A's or AAAA's (it prefers the IPv6 tag, then what A gets): the
        // last arm is for completeness (tested over every combination below).
        let (any, via_node) = match any {
            Reached::Ip {
                ip: IpAddr::V4(ip),
                via_node,
            } if v4 == Some(ip) => (AnyAddr::V4, via_node),
            Reached::Ip {
                ip: IpAddr::V6(ip),
                via_node,
            } if v6 == Some(ip) => (AnyAddr::V6, via_node),
            Reached::Host(_) => (AnyAddr::Host, false),
            _ => (AnyAddr::None, false),
        };
        Addrs {
            v4,
            v6,
            host,
            any,
            origin: if via_node {
                Origin::NodeAddress
            } else {
                Origin::Other
            },
        }
    }

    /// Marks which answer is the service's own `address`, when one is.
    pub(crate) fn with_own(mut self, address: &str) -> Addrs {
        match address.trim().parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) if self.v4 == Some(ip) => self.origin = Origin::ServiceV4,
            Ok(IpAddr::V6(ip)) if self.v6 == Some(ip) => self.origin = Origin::ServiceV6,
            _ => {}
        }
        self
    }

    /// SRV names the target by the node (`<node>.node.<dc>.<domain>`).
    pub(crate) fn srv_by_node(&self) -> bool {
        self.origin == Origin::NodeAddress
    }

    /// The service's own address, when an answer has it.
    pub fn own_ip(&self) -> Option<IpAddr> {
        match self.origin {
            Origin::ServiceV4 => self.v4.map(IpAddr::V4),
            Origin::ServiceV6 => self.v6.map(IpAddr::V6),
            _ => None,
        }
    }

    /// The address a `qtype` question gets, if an address.
    pub(crate) fn ip_for(&self, qtype: RecordType) -> Option<IpAddr> {
        let v4 = || self.v4.map(IpAddr::V4);
        let v6 = || self.v6.map(IpAddr::V6);
        match (qtype, self.any) {
            (RecordType::A, _) => v4(),
            (RecordType::AAAA, _) => v6(),
            (_, AnyAddr::V4) => v4(),
            (_, AnyAddr::V6) => v6(),
            _ => None,
        }
    }

    /// The hostname a `qtype` question gets (a CNAME), when it gets no address.
    pub(crate) fn host_for(&self, qtype: RecordType) -> Option<&Arc<str>> {
        let by_name = match qtype {
            RecordType::A => self.v4.is_none(),
            RecordType::AAAA => self.v6.is_none(),
            _ => self.any == AnyAddr::Host,
        };
        self.host.as_ref().filter(|_| by_name)
    }
}

/// Consul's `translate_wan_addrs` for the views built now: addresses in a datacenter other than
/// the agent's are their WAN ones.
#[derive(Clone, Copy, Debug, Default)]
pub struct WanTranslation<'a> {
    /// `consul.translate_wan_addrs`.
    pub enabled: bool,
    /// The agent's datacenter; while it is unknown, nothing is translated.
    pub local_dc: Option<&'a str>,
}

impl WanTranslation<'_> {
    /// Are addresses in `dc` translated? (An entry without a datacenter is taken as local.)
    pub(crate) fn applies(&self, dc: &str) -> bool {
        self.enabled
            && !dc.is_empty()
            && self
                .local_dc
                .is_some_and(|local| !local.eq_ignore_ascii_case(dc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tagged(pairs: &[(&str, &str)]) -> TaggedJson<String> {
        let mut t = TaggedJson::default();
        for (k, v) in pairs {
            let slot = match *k {
                "lan_ipv4" => &mut t.lan_ipv4,
                "lan_ipv6" => &mut t.lan_ipv6,
                "wan" => &mut t.wan,
                "wan_ipv4" => &mut t.wan_ipv4,
                "wan_ipv6" => &mut t.wan_ipv6,
                other => panic!("{other}"),
            };
            *slot = Some((*v).to_owned());
        }
        t
    }

    fn resolve(service: Candidates<'_>, node: Candidates<'_>, node_address: &str) -> Addrs {
        Addrs::resolve(service, node, node_address, &mut |h| Arc::from(h))
    }

    #[test]
    fn translate_accept_follows_consul() {
        let c = ["10.0.0.1", "10.0.0.4", "fd00::6"];
        assert_eq!(translate_accept(Accept::V4, c), "10.0.0.4");
        assert_eq!(translate_accept(Accept::V6, c), "fd00::6");
        assert_eq!(translate_accept(Accept::Any, c), "fd00::6");
        let c = ["10.0.0.1", "10.0.0.4", ""];
        assert_eq!(translate_accept(Accept::Any, c), "10.0.0.4");
        // No tag of the family: the default, whatever its family.
        assert_eq!(translate_accept(Accept::V6, c), "10.0.0.1");
        let c = ["fd00::1", "", ""];
        assert_eq!(translate_accept(Accept::V4, c), "fd00::1");
        assert_eq!(translate_accept(Accept::V4, ["", "", ""]), "");
        assert_eq!(
            translate_accept(Accept::Any, ["db.example", "", ""]),
            "db.example"
        );
    }

    #[test]
    fn candidates_lan_and_wan() {
        let t = tagged(&[
            ("lan_ipv4", "10.0.0.4"),
            ("lan_ipv6", "fd00::6"),
            ("wan", "198.18.0.1"),
            ("wan_ipv6", "2001:db8::6"),
        ]);
        assert_eq!(
            candidates("10.0.0.1", &t, false),
            ["10.0.0.1", "10.0.0.4", "fd00::6"]
        );
        // WAN: each tag present replaces its LAN one; absent ones (wan_ipv4) keep it.
        assert_eq!(
            candidates("10.0.0.1", &t, true),
            ["198.18.0.1", "10.0.0.4", "2001:db8::6"]
        );
        // Family tags of the wrong family are ignored.
        let t = tagged(&[("lan_ipv4", "fd00::1"), ("lan_ipv6", "host.example")]);
        assert_eq!(candidates("10.0.0.1", &t, false), ["10.0.0.1", "", ""]);
        let s: TaggedJson<ServiceAddressJson> = serde_json::from_str(
            r#"{"lan_ipv6":{"Address":"fd00::9","Port":80},"wan":{"address":"198.18.0.2","port":8080},"lan":{"Address":"x","Port":1}}"#,
        )
        .expect("parses");
        assert_eq!(candidates("", &s, false), ["", "", "fd00::9"]);
        assert_eq!(candidates("", &s, true), ["198.18.0.2", "", "fd00::9"]);
        assert_eq!(s.wan.map(|w| w.port), Some(8080));
    }

    #[test]
    fn dual_stack_node() {
        let tags = tagged(&[("lan_ipv4", "10.0.0.1"), ("lan_ipv6", "fd00::1")]);
        let node = candidates("10.0.0.1", &tags, false);
        let a = resolve(["", "", ""], node, "10.0.0.1");
        assert_eq!(a.v4, Some("10.0.0.1".parse().expect("ip")));
        assert_eq!(a.v6, Some("fd00::1".parse().expect("ip")));
        // ANY and SRV prefer the IPv6 tag, which is not the node's own address: `.addr` form.
        assert_eq!((a.any, a.srv_by_node()), (AnyAddr::V6, false));
        assert_eq!(
            a.ip_for(RecordType::ANY),
            Some("fd00::1".parse().expect("ip"))
        );
        assert_eq!(
            a.ip_for(RecordType::A),
            Some("10.0.0.1".parse().expect("ip"))
        );
        assert_eq!(a.host_for(RecordType::AAAA), None);
    }

    #[test]
    fn service_ipv6_on_an_ipv4_node_gets_no_a_record() {
        let a = resolve(["fd00::5", "", ""], ["10.0.0.1", "", ""], "10.0.0.1").with_own("fd00::5");
        assert_eq!((a.v4, a.v6), (None, Some("fd00::5".parse().expect("ip"))));
        assert_eq!(a.own_ip(), Some("fd00::5".parse().expect("ip")));
        assert_eq!(a.ip_for(RecordType::A), None);
        assert_eq!(a.host_for(RecordType::A), None);
        // With a lan_ipv4 tag on the service, A has its address.
        let a = resolve(
            ["fd00::5", "10.0.0.5", ""],
            ["10.0.0.1", "", ""],
            "10.0.0.1",
        );
        assert_eq!(a.v4, Some("10.0.0.5".parse().expect("ip")));
        assert_eq!((a.any, a.srv_by_node()), (AnyAddr::V4, false));
    }

    #[test]
    fn node_address_keeps_the_node_name_form() {
        let a = resolve(["", "", ""], ["10.0.0.1", "10.0.0.1", ""], "10.0.0.1");
        assert_eq!(a, Addrs::ip("10.0.0.1".parse().expect("ip"), true));
        // A tagged IPv4 that differs from the address: A gets it, SRV names it by `.addr`.
        let a = resolve(["", "", ""], ["10.0.0.1", "10.0.0.9", ""], "10.0.0.1");
        assert_eq!(a, Addrs::ip("10.0.0.9".parse().expect("ip"), false));
    }

    #[test]
    fn hostnames() {
        let a = resolve(["DB.example.", "", ""], ["10.0.0.1", "", ""], "10.0.0.1");
        assert_eq!(a.host.as_deref(), Some("DB.example"));
        assert_eq!((a.v4, a.v6, a.any), (None, None, AnyAddr::Host));
        assert!(a.host_for(RecordType::A).is_some() && a.host_for(RecordType::SRV).is_some());
        // A hostname service with a lan_ipv4 tag: A gets the address, AAAA the name.
        let a = resolve(
            ["db.example", "10.0.0.5", ""],
            ["10.0.0.1", "", ""],
            "10.0.0.1",
        );
        assert_eq!(
            a.ip_for(RecordType::A),
            Some("10.0.0.5".parse().expect("ip"))
        );
        assert!(a.host_for(RecordType::A).is_none());
        assert_eq!(
            a.host_for(RecordType::AAAA).map(|h| &**h),
            Some("db.example")
        );
        assert_eq!(a.any, AnyAddr::V4);
    }

    #[test]
    fn wan_translation_applies_to_other_datacenters_only() {
        let on = WanTranslation {
            enabled: true,
            local_dc: Some("dc1"),
        };
        assert!(on.applies("dc2") && !on.applies("DC1") && !on.applies(""));
        let unknown = WanTranslation {
            enabled: true,
            local_dc: None,
        };
        assert!(!unknown.applies("dc2"));
        assert!(!WanTranslation::default().applies("dc2"));
    }

    /// Every combination of service and node candidates: the stored `Addrs` give each kind of
    /// question exactly what Consul's rules give it.
    #[test]
    fn stored_choice_matches_consul_for_every_combination() {
        fn combos<'a>(defs: &[&'a str], v4s: &[&'a str], v6s: &[&'a str]) -> Vec<Candidates<'a>> {
            let mut out = Vec::new();
            for &d in defs {
                for &v4 in v4s {
                    for &v6 in v6s {
                        out.push([d, v4, v6]);
                    }
                }
            }
            out
        }
        let services = combos(
            &["", "10.0.0.1", "fd00::1", "svc.example"],
            &["", "10.0.0.4"],
            &["", "fd00::6"],
        );
        // The node's IPv4 tag is usually its own address (a real agent sets it so).
        let nodes = combos(
            &["", "10.9.0.1", "fd09::1", "node.example"],
            &["", "10.9.0.4", "10.9.0.1"],
            &["", "fd09::6"],
        );
        for &service in &services {
            for &node in &nodes {
                let a = resolve(service, node, node[0]);
                for (qtype, accept) in [
                    (RecordType::A, Accept::V4),
                    (RecordType::AAAA, Accept::V6),
                    (RecordType::ANY, Accept::Any),
                ] {
                    let got = match (a.ip_for(qtype), a.host_for(qtype)) {
                        (Some(ip), _) => Reached::Ip {
                            ip,
                            via_node: accept == Accept::Any && a.srv_by_node(),
                        },
                        (None, Some(h)) => Reached::Host(h),
                        (None, None) => Reached::Nothing,
                    };
                    // Consul makes no record of an address of the other family.
                    let want = match reach(accept, service, node, node[0]) {
                        Reached::Ip { ip, .. }
                            if (accept == Accept::V4 && ip.is_ipv6())
                                || (accept == Accept::V6 && ip.is_ipv4()) =>
                        {
                            Reached::Nothing
                        }
                        Reached::Ip { ip, via_node } => Reached::Ip {
                            ip,
                            via_node: accept == Accept::Any && via_node,
                        },
                        other => other,
                    };
                    assert_eq!(got, want, "{qtype} service {service:?} node {node:?}");
                }
            }
        }
    }
}
