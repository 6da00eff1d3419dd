//! Which address each question gets, as Consul's DNS chooses it (`agent/translate_addr.go`,
//! `nodeServiceRecords` in `agent/dns.go`): tagged addresses give a dual-stack node its AAAA,
//! a `lan_ipv4` tag wins over the address for A, and with `translate_wan_addrs` the nodes and
//! services of other datacenters answer with their WAN addresses. Over real UDP, against the
//! Consul simulator.

use std::collections::BTreeMap;

use crate::support::consul_sim::{ConsulSim, SimNode, SimService, SimServiceAddress, Status};
use crate::support::upstream::TestUpstream;
use crate::support::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};

/// Every test's TTL: the default service and node TTL.
const TTL: u32 = 5;

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
    SimService {
        id: id.into(),
        service: service.into(),
        node: node.into(),
        address: address.into(),
        port,
        tagged_addresses: tags
            .iter()
            .map(|(k, a, p)| {
                let at = SimServiceAddress {
                    address: a.to_string(),
                    port: *p,
                };
                (k.to_string(), at)
            })
            .collect::<BTreeMap<_, _>>(),
        ..Default::default()
    }
}

/// A forwarder in front of `sim`, with `consul_lines` in its `[consul]` section.
async fn forwarder(sim: &ConsulSim, consul_lines: &str) -> (TestServer, TestUpstream) {
    let up = TestUpstream::start().await;
    let toml = TestConfig::new()
        .upstream(up.addr)
        .consul_http(sim.http_url())
        .consul(consul_lines)
        .toml();
    (TestServer::start(&toml).await, up)
}

/// A record as `owner TTL TYPE data`.
fn line(r: &Record) -> String {
    format!("{} {} {} {}", r.name, r.ttl, r.record_type(), r.data)
}

fn lines(records: &[Record]) -> Vec<String> {
    records.iter().map(line).collect()
}

/// A positive answer: NOERROR, authoritative, nothing in authority; `answers` and
/// `additionals` exactly.
fn assert_answer(m: &Message, answers: &[&str], additionals: &[&str]) {
    assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{m:?}");
    assert!(m.metadata.authoritative, "{m:?}");
    assert_eq!(lines(&m.answers), answers, "{m:?}");
    assert!(m.authorities.is_empty(), "{m:?}");
    assert_eq!(lines(&m.additionals), additionals, "{m:?}");
}

/// NOERROR, no answers, the SOA in authority.
fn assert_nodata(m: &Message) {
    assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{m:?}");
    assert!(m.answers.is_empty(), "{m:?}");
    assert!(
        matches!(m.authorities.as_slice(), [soa] if matches!(soa.data, RData::SOA(_))),
        "{m:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_node_answers_a_and_aaaa() {
    let sim = ConsulSim::start().await;
    // What an agent with advertise_addr_ipv6 registers.
    sim.add_node(node(
        "n1",
        "10.0.0.1",
        &[("lan_ipv4", "10.0.0.1"), ("lan_ipv6", "fd00::1")],
    ));
    sim.add_service(
        service("web-1", "web", "n1", ("", 80), &[]),
        Status::Passing,
    );
    sim.add_prepared_query("web-q", "web", None, Some("7s"));
    let (fwd, _up) = forwarder(&sim, "").await;

    let q = "web.service.consul.";
    let a = ask(fwd.addr, q, RecordType::A).await;
    assert_answer(&a, &[&format!("{q} {TTL} A 10.0.0.1")], &[]);
    let aaaa = ask(fwd.addr, q, RecordType::AAAA).await;
    assert_answer(&aaaa, &[&format!("{q} {TTL} AAAA fd00::1")], &[]);
    // ANY gets one address per instance, the IPv6 one first (Consul's "any" translation).
    let any = ask(fwd.addr, q, RecordType::ANY).await;
    assert_answer(&any, &[&format!("{q} {TTL} AAAA fd00::1")], &[]);

    // SRV: the IPv6 address is not the node's own, so the target is named by it.
    let target = "fd000000000000000000000000000001.addr.dc1.consul.";
    let srv = ask(fwd.addr, "_web._tcp.service.consul.", RecordType::SRV).await;
    assert_answer(
        &srv,
        &[&format!(
            "_web._tcp.service.consul. {TTL} SRV 1 1 80 {target}"
        )],
        &[&format!("{target} {TTL} AAAA fd00::1")],
    );

    // The node itself, and a prepared query over the service (its DNS.TTL).
    let n = ask(fwd.addr, "n1.node.consul.", RecordType::AAAA).await;
    assert_answer(&n, &[&format!("n1.node.consul. {TTL} AAAA fd00::1")], &[]);
    let n = ask(fwd.addr, "n1.node.consul.", RecordType::A).await;
    assert_answer(&n, &[&format!("n1.node.consul. {TTL} A 10.0.0.1")], &[]);
    let pq = ask(fwd.addr, "web-q.query.consul.", RecordType::AAAA).await;
    assert_answer(&pq, &["web-q.query.consul. 7 AAAA fd00::1"], &[]);
    fwd.stop().await;
}

/// A service with an IPv6 address of its own on an IPv4 node: AAAA gets the service's address,
/// A gets nothing (Consul's translation returns the service's address whatever the question's
/// family, and makes no A record of it: no fallback to the node's IPv4); a `lan_ipv4` tag on
/// the service gives A its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_with_its_own_ipv6_address_on_an_ipv4_node() {
    let sim = ConsulSim::start().await;
    sim.add_node(node("n1", "10.0.0.1", &[("lan_ipv4", "10.0.0.1")]));
    sim.add_service(
        service("v6-1", "v6only", "n1", ("fd00::5", 80), &[]),
        Status::Passing,
    );
    sim.add_service(
        service(
            "dual-1",
            "dual",
            "n1",
            ("fd00::6", 81),
            &[("lan_ipv4", "10.0.0.6", 81)],
        ),
        Status::Passing,
    );
    let (fwd, _up) = forwarder(&sim, "").await;

    let q = "v6only.service.consul.";
    assert_nodata(&ask(fwd.addr, q, RecordType::A).await);
    let aaaa = ask(fwd.addr, q, RecordType::AAAA).await;
    assert_answer(&aaaa, &[&format!("{q} {TTL} AAAA fd00::5")], &[]);

    let q = "dual.service.consul.";
    let a = ask(fwd.addr, q, RecordType::A).await;
    assert_answer(&a, &[&format!("{q} {TTL} A 10.0.0.6")], &[]);
    let aaaa = ask(fwd.addr, q, RecordType::AAAA).await;
    assert_answer(&aaaa, &[&format!("{q} {TTL} AAAA fd00::6")], &[]);
    // SRV (Consul's "any": the IPv6 tag first, else the IPv4 tag, else the address).
    let target = "0a000006.addr.dc1.consul.";
    let srv = ask(fwd.addr, "_dual._tcp.service.consul.", RecordType::SRV).await;
    assert_answer(
        &srv,
        &[&format!(
            "_dual._tcp.service.consul. {TTL} SRV 1 1 81 {target}"
        )],
        &[&format!("{target} {TTL} A 10.0.0.6")],
    );
    fwd.stop().await;
}

/// A node whose `lan_ipv4` differs from its address: A gets the tagged one, and SRV names it by
/// `.addr` (it is not the node's own address).
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
    let (fwd, _up) = forwarder(&sim, "").await;

    let q = "web.service.consul.";
    let a = ask(fwd.addr, q, RecordType::A).await;
    assert_answer(&a, &[&format!("{q} {TTL} A 10.0.0.9")], &[]);
    assert_nodata(&ask(fwd.addr, q, RecordType::AAAA).await);
    let target = "0a000009.addr.dc1.consul.";
    let srv = ask(fwd.addr, "_web._tcp.service.consul.", RecordType::SRV).await;
    assert_answer(
        &srv,
        &[&format!(
            "_web._tcp.service.consul. {TTL} SRV 1 1 80 {target}"
        )],
        &[&format!("{target} {TTL} A 10.0.0.9")],
    );
    let n = ask(fwd.addr, "n1.node.consul.", RecordType::A).await;
    assert_answer(&n, &[&format!("n1.node.consul. {TTL} A 10.0.0.9")], &[]);
    // A tag equal to the address (what an agent registers) keeps the node-name target.
    let target = "n2.node.dc1.consul.";
    let srv = ask(fwd.addr, "_api._tcp.service.consul.", RecordType::SRV).await;
    assert_answer(
        &srv,
        &[&format!(
            "_api._tcp.service.consul. {TTL} SRV 1 1 90 {target}"
        )],
        &[&format!("{target} {TTL} A 10.0.0.2")],
    );
    fwd.stop().await;
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
    sim.add_service(
        service(
            "api-9",
            "api",
            "far1",
            ("10.2.0.5", 443),
            &[("wan", "198.18.2.5", 8443)],
        ),
        Status::Passing,
    );
    sim
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translate_wan_addrs_answers_other_datacenters_with_their_wan_addresses() {
    let sim = two_datacenters().await;
    // The agent's datacenter named in the config: known before the first view is built (from
    // /v1/agent/self it comes a request later, and views built before it are not translated).
    let (fwd, _up) = forwarder(&sim, "translate_wan_addrs = true\ndatacenter = \"dc1\"").await;

    let q = "web.service.dc2.consul.";
    let a = ask(fwd.addr, q, RecordType::A).await;
    assert_answer(&a, &[&format!("{q} {TTL} A 198.18.2.1")], &[]);
    // The agent's own datacenter keeps its LAN addresses, named with or without its label.
    for q in ["web.service.consul.", "web.service.dc1.consul."] {
        let a = ask(fwd.addr, q, RecordType::A).await;
        assert_answer(&a, &[&format!("{q} {TTL} A 10.0.0.1")], &[]);
    }
    // SRV: a WAN address is never named by the node, and a service's WAN port replaces its own.
    let target = "c6120201.addr.dc2.consul.";
    let srv = ask(fwd.addr, "_web._tcp.service.dc2.consul.", RecordType::SRV).await;
    assert_answer(
        &srv,
        &[&format!(
            "_web._tcp.service.dc2.consul. {TTL} SRV 1 1 80 {target}"
        )],
        &[&format!("{target} {TTL} A 198.18.2.1")],
    );
    let target = "c6120205.addr.dc2.consul.";
    let srv = ask(fwd.addr, "_api._tcp.service.dc2.consul.", RecordType::SRV).await;
    assert_answer(
        &srv,
        &[&format!(
            "_api._tcp.service.dc2.consul. {TTL} SRV 1 1 8443 {target}"
        )],
        &[&format!("{target} {TTL} A 198.18.2.5")],
    );
    let n = ask(fwd.addr, "far1.node.dc2.consul.", RecordType::A).await;
    assert_answer(
        &n,
        &[&format!("far1.node.dc2.consul. {TTL} A 198.18.2.1")],
        &[],
    );
    let n = ask(fwd.addr, "n1.node.consul.", RecordType::A).await;
    assert_answer(&n, &[&format!("n1.node.consul. {TTL} A 10.0.0.1")], &[]);
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_translate_wan_addrs_other_datacenters_answer_their_lan_addresses() {
    let sim = two_datacenters().await;
    // Off by default, as in Consul.
    let (fwd, _up) = forwarder(&sim, "").await;
    let q = "web.service.dc2.consul.";
    let a = ask(fwd.addr, q, RecordType::A).await;
    assert_answer(&a, &[&format!("{q} {TTL} A 10.2.0.1")], &[]);
    let target = "0a020005.addr.dc2.consul.";
    let srv = ask(fwd.addr, "_api._tcp.service.dc2.consul.", RecordType::SRV).await;
    assert_answer(
        &srv,
        &[&format!(
            "_api._tcp.service.dc2.consul. {TTL} SRV 1 1 443 {target}"
        )],
        &[&format!("{target} {TTL} A 10.2.0.5")],
    );
    let target = "far1.node.dc2.consul.";
    let srv = ask(fwd.addr, "_web._tcp.service.dc2.consul.", RecordType::SRV).await;
    assert_answer(
        &srv,
        &[&format!(
            "_web._tcp.service.dc2.consul. {TTL} SRV 1 1 80 {target}"
        )],
        &[&format!("{target} {TTL} A 10.2.0.1")],
    );
    let n = ask(fwd.addr, "far1.node.dc2.consul.", RecordType::A).await;
    assert_answer(
        &n,
        &[&format!("far1.node.dc2.consul. {TTL} A 10.2.0.1")],
        &[],
    );
    fwd.stop().await;
}
