//! Which address each question gets, as Consul's DNS chooses it (`agent/translate_addr.go`,
//! `nodeServiceRecords` in `agent/dns.go`): tagged addresses give a dual-stack node its AAAA,
//! a `lan_ipv4` tag wins over the address for A, and with `translate_wan_addrs` the nodes and
//! services of other datacenters answer with their WAN addresses. Over real UDP, against the
//! Consul simulator. Every TTL is the default service and node TTL (5 s) unless a prepared
//! query sets its own.

use crate::support::consul_sim::{ConsulSim, SimNode, SimService, SimServiceAddress, Status};
use crate::support::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};

fn node(name: &str, address: &str, tags: &[(&str, &str)]) -> SimNode {
    SimNode {
        name: name.into(),
        address: address.into(),
        tagged_addresses: tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// Instance `id` of `service` on `node` at `address` ("" = the node's) and `port`, with
/// `tags` as its tagged addresses.
fn service(
    id: &str,
    service: &str,
    node: &str,
    (address, port): (&str, u16),
    tags: &[(&str, &str, u16)],
) -> SimService {
    let tagged = |&(k, a, p): &(&str, &str, u16)| {
        let at = SimServiceAddress {
            address: a.into(),
            port: p,
        };
        (k.to_string(), at)
    };
    SimService {
        id: id.into(),
        service: service.into(),
        node: node.into(),
        address: address.into(),
        port,
        tagged_addresses: tags.iter().map(tagged).collect(),
        ..Default::default()
    }
}

/// One question and the answer it must get.
enum Expect<'a> {
    /// NOERROR, authoritative, nothing in authority; the answer and additional sections
    /// exactly, each record as `owner TTL TYPE data`.
    Answer(&'a [&'a str], &'a [&'a str]),
    /// NOERROR, no answers, the SOA in authority.
    NoData,
}

/// Starts a forwarder in front of `sim` (`consul_lines` in its `[consul]` section), asks each
/// question over UDP and checks the reply.
async fn check(sim: &ConsulSim, consul_lines: &str, cases: &[(&str, RecordType, Expect<'_>)]) {
    let (fwd, _up) = TestServer::with_consul(&sim.http_url(), consul_lines).await;
    for (qname, qtype, expect) in cases {
        let m = ask(fwd.addr, qname, *qtype).await;
        let lines = |records: &[hickory_proto::rr::Record]| -> Vec<String> {
            records
                .iter()
                .map(|r| format!("{} {} {} {}", r.name, r.ttl, r.record_type(), r.data))
                .collect()
        };
        let what = format!("{qname} {qtype}: {m:?}");
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{what}");
        assert!(m.metadata.authoritative, "{what}");
        match expect {
            Expect::Answer(answers, additionals) => {
                assert_eq!(lines(&m.answers), *answers, "{what}");
                assert!(m.authorities.is_empty(), "{what}");
                assert_eq!(lines(&m.additionals), *additionals, "{what}");
            }
            Expect::NoData => {
                assert!(m.answers.is_empty(), "{what}");
                let soa =
                    matches!(m.authorities.as_slice(), [r] if matches!(r.data, RData::SOA(_)));
                assert!(soa, "{what}");
            }
        }
    }
    fwd.stop().await;
}

use Expect::{Answer, NoData};
use RecordType::{A, AAAA, ANY, SRV};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_node_answers_a_and_aaaa() {
    let sim = ConsulSim::start().await;
    // What an agent with advertise_addr_ipv6 registers.
    let tags = [("lan_ipv4", "10.0.0.1"), ("lan_ipv6", "fd00::1")];
    sim.add_node(node("n1", "10.0.0.1", &tags));
    sim.add_service(
        service("web-1", "web", "n1", ("", 80), &[]),
        Status::Passing,
    );
    sim.add_prepared_query("web-q", "web", None, Some("7s"));
    check(
        &sim,
        "",
        &[
            ("web.service.consul.", A, Answer(&["web.service.consul. 5 A 10.0.0.1"], &[])),
            ("web.service.consul.", AAAA, Answer(&["web.service.consul. 5 AAAA fd00::1"], &[])),
            // ANY gets one address per instance, the IPv6 one first (Consul's "any").
            ("web.service.consul.", ANY, Answer(&["web.service.consul. 5 AAAA fd00::1"], &[])),
            // SRV: the IPv6 address is not the node's own, so the target is named by it.
            (
                "_web._tcp.service.consul.",
                SRV,
                Answer(
                    &["_web._tcp.service.consul. 5 SRV 1 1 80 fd000000000000000000000000000001.addr.dc1.consul."],
                    &["fd000000000000000000000000000001.addr.dc1.consul. 5 AAAA fd00::1"],
                ),
            ),
            ("n1.node.consul.", AAAA, Answer(&["n1.node.consul. 5 AAAA fd00::1"], &[])),
            ("n1.node.consul.", A, Answer(&["n1.node.consul. 5 A 10.0.0.1"], &[])),
            // A prepared query over the service, with its DNS.TTL.
            ("web-q.query.consul.", AAAA, Answer(&["web-q.query.consul. 7 AAAA fd00::1"], &[])),
        ],
    )
    .await;
}

/// A service with an IPv6 address of its own on an IPv4 node: AAAA gets the service's address,
/// A gets nothing (Consul's translation returns the service's address whatever the question's
/// family, and makes no A record of it: no fallback to the node's IPv4); a `lan_ipv4` tag on
/// the service gives A its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_with_its_own_ipv6_address_on_an_ipv4_node() {
    let sim = ConsulSim::start().await;
    sim.add_node(node("n1", "10.0.0.1", &[("lan_ipv4", "10.0.0.1")]));
    let v6 = service("v6-1", "v6only", "n1", ("fd00::5", 80), &[]);
    sim.add_service(v6, Status::Passing);
    let dual = service(
        "d-1",
        "dual",
        "n1",
        ("fd00::6", 81),
        &[("lan_ipv4", "10.0.0.6", 81)],
    );
    sim.add_service(dual, Status::Passing);
    check(
        &sim,
        "",
        &[
            ("v6only.service.consul.", A, NoData),
            (
                "v6only.service.consul.",
                AAAA,
                Answer(&["v6only.service.consul. 5 AAAA fd00::5"], &[]),
            ),
            (
                "dual.service.consul.",
                A,
                Answer(&["dual.service.consul. 5 A 10.0.0.6"], &[]),
            ),
            (
                "dual.service.consul.",
                AAAA,
                Answer(&["dual.service.consul. 5 AAAA fd00::6"], &[]),
            ),
            // SRV takes the IPv6 tag first, else the IPv4 tag, else the address.
            (
                "_dual._tcp.service.consul.",
                SRV,
                Answer(
                    &["_dual._tcp.service.consul. 5 SRV 1 1 81 0a000006.addr.dc1.consul."],
                    &["0a000006.addr.dc1.consul. 5 A 10.0.0.6"],
                ),
            ),
        ],
    )
    .await;
}

/// A node whose `lan_ipv4` differs from its address: A gets the tagged one, and SRV names it by
/// `.addr` (it is not the node's own address); a tag equal to the address (what an agent
/// registers) keeps the node-name target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lan_ipv4_tag_wins_over_the_address() {
    let sim = ConsulSim::start().await;
    sim.add_node(node("n1", "10.0.0.1", &[("lan_ipv4", "10.0.0.9")]));
    sim.add_node(node("n2", "10.0.0.2", &[("lan_ipv4", "10.0.0.2")]));
    sim.add_service(
        service("web-1", "web", "n1", ("", 80), &[]),
        Status::Passing,
    );
    sim.add_service(
        service("api-1", "api", "n2", ("", 90), &[]),
        Status::Passing,
    );
    check(
        &sim,
        "",
        &[
            (
                "web.service.consul.",
                A,
                Answer(&["web.service.consul. 5 A 10.0.0.9"], &[]),
            ),
            ("web.service.consul.", AAAA, NoData),
            (
                "_web._tcp.service.consul.",
                SRV,
                Answer(
                    &["_web._tcp.service.consul. 5 SRV 1 1 80 0a000009.addr.dc1.consul."],
                    &["0a000009.addr.dc1.consul. 5 A 10.0.0.9"],
                ),
            ),
            (
                "n1.node.consul.",
                A,
                Answer(&["n1.node.consul. 5 A 10.0.0.9"], &[]),
            ),
            (
                "_api._tcp.service.consul.",
                SRV,
                Answer(
                    &["_api._tcp.service.consul. 5 SRV 1 1 90 n2.node.dc1.consul."],
                    &["n2.node.dc1.consul. 5 A 10.0.0.2"],
                ),
            ),
        ],
    )
    .await;
}

/// dc1 (the agent's) and dc2, each node and service with WAN tagged addresses.
async fn two_datacenters() -> ConsulSim {
    let sim = ConsulSim::start().await;
    sim.add_node(node("n1", "10.0.0.1", &[("wan", "198.18.0.1")]));
    sim.add_service(
        service("web-1", "web", "n1", ("", 80), &[]),
        Status::Passing,
    );
    let mut far = node("far1", "10.2.0.1", &[("wan", "198.18.2.1")]);
    far.datacenter = "dc2".into();
    sim.add_node(far);
    sim.add_service(
        service("web-9", "web", "far1", ("", 80), &[]),
        Status::Passing,
    );
    let api = service(
        "api-9",
        "api",
        "far1",
        ("10.2.0.5", 443),
        &[("wan", "198.18.2.5", 8443)],
    );
    sim.add_service(api, Status::Passing);
    sim
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translate_wan_addrs_answers_other_datacenters_with_their_wan_addresses() {
    let sim = two_datacenters().await;
    // The agent's datacenter named in the config: known before the first view is built (from
    // /v1/agent/self it comes a request later, and views built before it are not translated).
    let lines = "translate_wan_addrs = true\ndatacenter = \"dc1\"";
    check(
        &sim,
        lines,
        &[
            (
                "web.service.dc2.consul.",
                A,
                Answer(&["web.service.dc2.consul. 5 A 198.18.2.1"], &[]),
            ),
            // The agent's own datacenter keeps its LAN addresses, with or without its label.
            (
                "web.service.consul.",
                A,
                Answer(&["web.service.consul. 5 A 10.0.0.1"], &[]),
            ),
            (
                "web.service.dc1.consul.",
                A,
                Answer(&["web.service.dc1.consul. 5 A 10.0.0.1"], &[]),
            ),
            // SRV: a WAN address is never named by the node; a service's WAN port replaces its own.
            (
                "_web._tcp.service.dc2.consul.",
                SRV,
                Answer(
                    &["_web._tcp.service.dc2.consul. 5 SRV 1 1 80 c6120201.addr.dc2.consul."],
                    &["c6120201.addr.dc2.consul. 5 A 198.18.2.1"],
                ),
            ),
            (
                "_api._tcp.service.dc2.consul.",
                SRV,
                Answer(
                    &["_api._tcp.service.dc2.consul. 5 SRV 1 1 8443 c6120205.addr.dc2.consul."],
                    &["c6120205.addr.dc2.consul. 5 A 198.18.2.5"],
                ),
            ),
            (
                "far1.node.dc2.consul.",
                A,
                Answer(&["far1.node.dc2.consul. 5 A 198.18.2.1"], &[]),
            ),
            (
                "n1.node.consul.",
                A,
                Answer(&["n1.node.consul. 5 A 10.0.0.1"], &[]),
            ),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_translate_wan_addrs_other_datacenters_answer_their_lan_addresses() {
    let sim = two_datacenters().await;
    // Off by default, as in Consul.
    check(
        &sim,
        "",
        &[
            (
                "web.service.dc2.consul.",
                A,
                Answer(&["web.service.dc2.consul. 5 A 10.2.0.1"], &[]),
            ),
            (
                "_api._tcp.service.dc2.consul.",
                SRV,
                Answer(
                    &["_api._tcp.service.dc2.consul. 5 SRV 1 1 443 0a020005.addr.dc2.consul."],
                    &["0a020005.addr.dc2.consul. 5 A 10.2.0.5"],
                ),
            ),
            (
                "_web._tcp.service.dc2.consul.",
                SRV,
                Answer(
                    &["_web._tcp.service.dc2.consul. 5 SRV 1 1 80 far1.node.dc2.consul."],
                    &["far1.node.dc2.consul. 5 A 10.2.0.1"],
                ),
            ),
            (
                "far1.node.dc2.consul.",
                A,
                Answer(&["far1.node.dc2.consul. 5 A 10.2.0.1"], &[]),
            ),
        ],
    )
    .await;
}
