//! The name forms Consul's DNS answers beyond `<service>.service[.<dc>]`, over real DNS against
//! the Consul HTTP API simulator: locality labels (`.dc`, `.peer`), Enterprise namespaces and
//! partitions (`.ns`, `.ap`) on a CE and on an Enterprise agent, `.connect`, `.ingress`,
//! `.virtual`, RFC 2782 prepared queries (`_q._tcp.query`) and the `_udp` tag; each with its
//! exact rcode, records, TTLs and AA, and the requests it costs Consul.

use crate::support::consul_sim::{ConsulSim, SimMesh, SimNode, SimService, Status};
use crate::support::upstream::TestUpstream;
use crate::support::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};

/// Service answers' TTL (`consul.service_ttl`) and node answers' (`consul.node_ttl`, which
/// `.virtual` uses too, as Consul), different so a test sees which one an answer took.
const SERVICE_TTL: u32 = 5;
const NODE_TTL: u32 = 7;

/// `web` on n1 (tag `v1`) and n2 (tag `udp`), each with a sidecar (n2's critical); `api`,
/// Connect-native on n3; an ingress gateway for `web` on gwn; the prepared query `geo` for
/// `web`.
fn mesh(sim: &ConsulSim) {
    for (n, addr) in [
        ("n1", "127.0.0.2"),
        ("n2", "127.0.0.3"),
        ("n3", "127.0.0.4"),
        ("gwn", "127.0.0.5"),
    ] {
        sim.add_node(SimNode::new(n, addr));
    }
    sim.add_service(
        SimService::new("web-1", "web", "n1", 8080).tags(&["v1"]),
        Status::Passing,
    );
    sim.add_service(
        SimService::new("web-2", "web", "n2", 8080).tags(&["udp"]),
        Status::Passing,
    );
    sim.add_service_with(
        SimService::new("web-1-sidecar", "web-sidecar-proxy", "n1", 21000),
        SimMesh::sidecar("web"),
        Status::Passing,
    );
    sim.add_service_with(
        SimService::new("web-2-sidecar", "web-sidecar-proxy", "n2", 21000),
        SimMesh::sidecar("web"),
        Status::Critical,
    );
    let api = SimService::new("api-1", "api", "n3", 9090);
    sim.add_service_with(api, SimMesh::native(), Status::Passing);
    let gateway = SimService::new("gw-1", "gw", "gwn", 8443);
    sim.add_service_with(gateway, SimMesh::ingress(&["web"]), Status::Passing);
    sim.add_prepared_query("geo", "web", None, None);
}

/// Cluster peer `p1` exporting `web` on its node pn1 (127.0.1.1).
fn peer(sim: &ConsulSim) {
    sim.add_peering("p1");
    sim.add_node_in(SimNode::new("pn1", "127.0.1.1"), Some("p1"), None);
    sim.add_service(SimService::new("web-p1", "web", "pn1", 80), Status::Passing);
}

fn config() -> TestConfig {
    TestConfig::new()
        .upstream_timeout("1s")
        .consul(&format!("node_ttl = \"{NODE_TTL}s\""))
        .service_ttl(&format!("{SERVICE_TTL}s"))
}

async fn start(sim: &ConsulSim, up: &TestUpstream) -> TestServer {
    TestServer::start(
        &config()
            .upstream(up.addr)
            .consul_http(sim.http_url())
            .toml(),
    )
    .await
}

/// rcode, AA, and every answer's TTL equal to `ttl`.
fn assert_answer(m: &Message, rcode: ResponseCode, ttl: u32, what: &str) {
    assert_eq!(m.metadata.response_code, rcode, "{what}: {m:?}");
    assert!(m.metadata.authoritative, "{what}: AA");
    for r in &m.answers {
        assert_eq!(r.ttl, ttl, "{what}: TTL of {r:?}");
    }
}

/// NXDOMAIN or NODATA: no answers, the SOA of the domain in authority.
fn assert_negative(m: &Message, rcode: ResponseCode, what: &str) {
    assert_answer(m, rcode, 0, what);
    assert!(m.answers.is_empty(), "{what}: {:?}", m.answers);
    assert!(
        matches!(m.authorities.first().map(|r| &r.data), Some(RData::SOA(_))),
        "{what}: SOA in authority: {m:?}"
    );
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// (weight, port, target) of each SRV answer, sorted; and the additional section's
/// (owner, address) pairs, sorted.
type SrvAnswer = (Vec<(u16, u16, String)>, Vec<(String, String)>);

fn srv(m: &Message) -> SrvAnswer {
    let mut answers: Vec<(u16, u16, String)> = m
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::SRV(s) => (s.weight, s.port, s.target.to_ascii()),
            other => panic!("not an SRV answer: {other:?}"),
        })
        .collect();
    answers.sort();
    let mut extra: Vec<(String, String)> = m
        .additionals
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((r.name.to_ascii(), a.0.to_string())),
            _ => None,
        })
        .collect();
    extra.sort();
    (answers, extra)
}

/// Asks `name` SRV (EDNS, so nothing is cut) and checks the answer: NOERROR, AA, the service
/// TTL, one SRV (priority and weight 1) per `(port, target, address)`, and the target's A
/// record in the additional section.
async fn assert_srv(server: std::net::SocketAddr, name: &str, expected: &[(u16, &str, &str)]) {
    let r = udp(server, &make_query(name, RecordType::SRV, Some(1232))).await;
    assert_answer(&r, ResponseCode::NoError, SERVICE_TTL, name);
    let mut answers: Vec<(u16, u16, String)> = expected
        .iter()
        .map(|(port, target, _)| (1, *port, target.to_string()))
        .collect();
    answers.sort();
    let mut extra: Vec<(String, String)> = expected
        .iter()
        .map(|(_, target, addr)| (target.to_string(), addr.to_string()))
        .collect();
    extra.sort();
    assert_eq!(srv(&r), (answers, extra), "{name}");
}

/// The request lines the simulator received that contain `needle`.
fn requests_with(sim: &ConsulSim, needle: &str) -> Vec<String> {
    sim.request_lines()
        .into_iter()
        .filter(|l| l.contains(needle))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datacenter_and_peer_labels_answer_like_consul() {
    let sim = ConsulSim::start().await;
    mesh(&sim);
    peer(&sim);
    let up = TestUpstream::start().await;
    let fwd = start(&sim, &up).await;

    // `<dc>.dc` is the datacenter, like the bare label.
    let r = ask(fwd.addr, "web.service.dc1.dc.consul.", RecordType::A).await;
    assert_answer(&r, ResponseCode::NoError, SERVICE_TTL, "web.service.dc1.dc");
    assert_eq!(sorted(addresses(&r)), vec!["127.0.0.2", "127.0.0.3"]);
    let r = ask(fwd.addr, "v1.web.service.dc1.dc.consul.", RecordType::A).await;
    assert_eq!(addresses(&r), vec!["127.0.0.2"]);
    let r = ask(fwd.addr, "web.service.dc2.dc.consul.", RecordType::A).await;
    assert_negative(&r, ResponseCode::NXDomain, "unknown datacenter");
    let r = ask(fwd.addr, "n1.node.dc1.dc.consul.", RecordType::A).await;
    assert_answer(&r, ResponseCode::NoError, NODE_TTL, "n1.node.dc1.dc");
    assert_eq!(addresses(&r), vec!["127.0.0.2"]);
    let r = ask(
        fwd.addr,
        "web.service.dc1.dc.p1.peer.consul.",
        RecordType::A,
    )
    .await;
    assert_negative(&r, ResponseCode::NXDomain, "both a datacenter and a peer");

    // `<peer>.peer`: what the peer exports, asked with ?peer=.
    let r = ask(fwd.addr, "web.service.p1.peer.consul.", RecordType::A).await;
    assert_answer(
        &r,
        ResponseCode::NoError,
        SERVICE_TTL,
        "web.service.p1.peer",
    );
    assert_eq!(addresses(&r), vec!["127.0.1.1"]);
    assert!(!requests_with(&sim, "/v1/health/service/web?peer=p1").is_empty());
    // SRV targets of a peer's node, as Consul spells them; each target resolves here.
    assert_srv(
        fwd.addr,
        "_web._tcp.service.p1.peer.consul.",
        &[(80, "pn1.node.p1.peer.consul.", "127.0.1.1")],
    )
    .await;
    let r = ask(fwd.addr, "pn1.node.p1.peer.consul.", RecordType::A).await;
    assert_answer(&r, ResponseCode::NoError, NODE_TTL, "pn1.node.p1.peer");
    assert_eq!(addresses(&r), vec!["127.0.1.1"]);
    // A peer's node is not a local one.
    let r = ask(fwd.addr, "pn1.node.consul.", RecordType::A).await;
    assert_negative(&r, ResponseCode::NXDomain, "pn1.node");

    // A peer Consul does not have, and a service the peer does not export: NXDOMAIN, and no
    // request names them.
    for name in [
        "web.service.nope.peer.consul.",
        "db.service.p1.peer.consul.",
        "n1.node.nope.peer.consul.",
    ] {
        let r = ask(fwd.addr, name, RecordType::A).await;
        assert_negative(&r, ResponseCode::NXDomain, name);
    }
    assert_eq!(requests_with(&sim, "nope"), Vec::<String>::new());
    assert_eq!(requests_with(&sim, "/db"), Vec::<String>::new());
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_and_partition_labels_are_nxdomain_on_consul_ce() {
    let sim = ConsulSim::start().await;
    mesh(&sim);
    let up = TestUpstream::start().await;
    let fwd = start(&sim, &up).await;
    // Consul CE's own DNS rejects `.ns` and `.ap` labels (its parseLocality knows dc and peer
    // only); its HTTP API refuses the parameters with 400. The forwarder learns from the agent
    // (no /v1/namespaces, /v1/partitions: 404) that it has neither, and never sends them.
    for name in [
        "web.service.default.ns.consul.",
        "web.service.ns1.ns.consul.",
        "web.service.default.ap.consul.",
        "web.service.ns1.ns.ap1.ap.dc1.dc.consul.",
        "web.service.ns1.dc1.consul.",
        "web.connect.ns1.ns.consul.",
        "n1.node.default.ns.consul.",
    ] {
        let r = ask(fwd.addr, name, RecordType::A).await;
        assert_negative(&r, ResponseCode::NXDomain, name);
    }
    assert_eq!(requests_with(&sim, "ns="), Vec::<String>::new());
    assert_eq!(requests_with(&sim, "partition="), Vec::<String>::new());
    assert!(requests_with(&sim, "/v1/namespaces").len() <= 1);
    assert!(requests_with(&sim, "/v1/partitions").len() <= 1);
    // The names without those labels still answer.
    let r = ask(fwd.addr, "web.service.consul.", RecordType::A).await;
    assert_eq!(addresses(&r).len(), 2);
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_and_partition_labels_on_consul_enterprise() {
    let sim = ConsulSim::start().await;
    mesh(&sim);
    sim.set_enterprise(true);
    sim.add_namespace("default", "ns1");
    let mut in_ns1 = SimService::new("web-ns1", "web", "n3", 8081);
    in_ns1.address = "127.0.0.9".into();
    sim.add_service_with(in_ns1, SimMesh::in_namespace("ns1"), Status::Passing);
    sim.add_partition("ap1");
    sim.add_node_in(SimNode::new("an1", "127.0.2.1"), None, Some("ap1"));
    sim.add_service(
        SimService::new("web-ap1", "web", "an1", 80),
        Status::Passing,
    );
    let up = TestUpstream::start().await;
    let fwd = start(&sim, &up).await;

    let r = ask(fwd.addr, "web.service.ns1.ns.consul.", RecordType::A).await;
    assert_answer(&r, ResponseCode::NoError, SERVICE_TTL, "web.service.ns1.ns");
    assert_eq!(addresses(&r), vec!["127.0.0.9"]);
    assert!(!requests_with(&sim, "/v1/health/service/web?ns=ns1").is_empty());
    // Enterprise's older `<namespace>.<datacenter>` form.
    let r = ask(fwd.addr, "web.service.ns1.dc1.consul.", RecordType::A).await;
    assert_eq!(addresses(&r), vec!["127.0.0.9"]);
    // The default namespace spelled out is the default namespace.
    let r = ask(fwd.addr, "web.service.default.ns.consul.", RecordType::A).await;
    assert_eq!(sorted(addresses(&r)), vec!["127.0.0.2", "127.0.0.3"]);

    let r = ask(fwd.addr, "web.service.ap1.ap.consul.", RecordType::A).await;
    assert_answer(&r, ResponseCode::NoError, SERVICE_TTL, "web.service.ap1.ap");
    assert_eq!(addresses(&r), vec!["127.0.2.1"]);
    assert!(!requests_with(&sim, "partition=ap1").is_empty());
    // SRV targets name the partition, and resolve to that partition's node.
    assert_srv(
        fwd.addr,
        "web.service.ap1.ap.consul.",
        &[(80, "an1.node.ap1.ap.dc1.dc.consul.", "127.0.2.1")],
    )
    .await;
    let r = ask(fwd.addr, "an1.node.ap1.ap.dc1.dc.consul.", RecordType::A).await;
    assert_answer(&r, ResponseCode::NoError, NODE_TTL, "an1.node.ap1.ap");
    assert_eq!(addresses(&r), vec!["127.0.2.1"]);

    // Namespaces and partitions Consul does not have: NXDOMAIN, never asked for.
    for name in [
        "web.service.nope.ns.consul.",
        "web.service.nope.ap.consul.",
        "web.service.ns1.ns.nope.ap.consul.",
        "n1.node.ns1.ns.consul.",
    ] {
        let r = ask(fwd.addr, name, RecordType::A).await;
        assert_negative(&r, ResponseCode::NXDomain, name);
    }
    assert_eq!(requests_with(&sim, "nope"), Vec::<String>::new());
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_ingress_and_virtual_names() {
    let sim = ConsulSim::start().await;
    mesh(&sim);
    let up = TestUpstream::start().await;
    let fwd = start(&sim, &up).await;

    // .connect: the healthy sidecars (n2's is critical), at their own port.
    let r = ask(fwd.addr, "web.connect.consul.", RecordType::A).await;
    assert_answer(&r, ResponseCode::NoError, SERVICE_TTL, "web.connect");
    assert_eq!(addresses(&r), vec!["127.0.0.2"]);
    assert_srv(
        fwd.addr,
        "web.connect.consul.",
        &[(21000, "n1.node.dc1.consul.", "127.0.0.2")],
    )
    .await;
    // Consul takes the last label as the service, and ignores a peer label here.
    for name in ["v1.web.connect.consul.", "web.connect.p1.peer.consul."] {
        let r = ask(fwd.addr, name, RecordType::A).await;
        assert_eq!(addresses(&r), vec!["127.0.0.2"], "{name}");
    }
    // Connect-native instances are their own Connect instances.
    let r = ask(fwd.addr, "api.connect.consul.", RecordType::A).await;
    assert_eq!(addresses(&r), vec!["127.0.0.4"]);
    // A service without Connect instances, and one Consul does not have.
    let r = ask(fwd.addr, "gw.connect.consul.", RecordType::A).await;
    assert_negative(&r, ResponseCode::NXDomain, "gw.connect");
    let r = ask(fwd.addr, "nope.connect.consul.", RecordType::A).await;
    assert_negative(&r, ResponseCode::NXDomain, "nope.connect");
    assert_eq!(sim.requests("/v1/health/connect/nope"), 0);

    // .ingress: the gateways routing to the service.
    assert_srv(
        fwd.addr,
        "web.ingress.consul.",
        &[(8443, "gwn.node.dc1.consul.", "127.0.0.5")],
    )
    .await;
    let r = ask(fwd.addr, "api.ingress.consul.", RecordType::A).await;
    assert_negative(&r, ResponseCode::NXDomain, "api.ingress");

    // .virtual: the service's virtual IP, with the node TTL.
    let r = ask(fwd.addr, "web.virtual.consul.", RecordType::A).await;
    assert_answer(&r, ResponseCode::NoError, NODE_TTL, "web.virtual");
    assert_eq!(addresses(&r), vec!["240.0.0.1"]);
    let r = ask(fwd.addr, "api.virtual.consul.", RecordType::A).await;
    assert_eq!(addresses(&r), vec!["240.0.0.2"]);
    // Consul: NOERROR without records for a service it has no virtual IP for, known or not.
    for name in ["gw.virtual.consul.", "nope.virtual.consul."] {
        let r = ask(fwd.addr, name, RecordType::A).await;
        assert_negative(&r, ResponseCode::NoError, name);
    }
    let r = ask(fwd.addr, "web.virtual.consul.", RecordType::AAAA).await;
    assert_negative(&r, ResponseCode::NoError, "web.virtual AAAA");
    assert_eq!(sim.requests("/v1/health/connect/nope"), 0);
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc2782_prepared_queries_and_the_udp_tag() {
    let sim = ConsulSim::start().await;
    mesh(&sim);
    let up = TestUpstream::start().await;
    let fwd = start(&sim, &up).await;

    // `_geo._tcp.query` is the prepared query geo, not a service `geo` in datacenter "query".
    let web = [
        (8080, "n1.node.dc1.consul.", "127.0.0.2"),
        (8080, "n2.node.dc1.consul.", "127.0.0.3"),
    ];
    assert_srv(fwd.addr, "_geo._tcp.query.consul.", &web).await;
    assert!(sim.requests("/v1/query/geo/execute") >= 1);
    assert_eq!(sim.requests("/v1/health/service/geo"), 0);
    let r = ask(fwd.addr, "_nope._tcp.query.consul.", RecordType::SRV).await;
    assert_negative(&r, ResponseCode::NXDomain, "_nope._tcp.query");

    // Only `_tcp` means any tag: `_udp` is the tag `udp`.
    assert_srv(fwd.addr, "_web._udp.service.consul.", &web[1..]).await;
    assert_srv(fwd.addr, "_web._tcp.service.consul.", &web).await;
    let r = ask(fwd.addr, "_api._udp.service.consul.", RecordType::SRV).await;
    assert_negative(
        &r,
        ResponseCode::NXDomain,
        "_api._udp: no instance tagged udp",
    );
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_file_serves_connect_and_virtual_names() {
    let sim = ConsulSim::start().await;
    mesh(&sim);
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("catalog.json");
    std::fs::write(&path, sim.catalog_json().to_string()).expect("write catalog");
    drop(sim);
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&config().upstream(up.addr).catalog_file(&path).toml()).await;

    let r = ask(fwd.addr, "web.connect.consul.", RecordType::A).await;
    assert_answer(&r, ResponseCode::NoError, SERVICE_TTL, "file: web.connect");
    assert_eq!(addresses(&r), vec!["127.0.0.2"]);
    let r = ask(fwd.addr, "api.connect.consul.", RecordType::A).await;
    assert_eq!(addresses(&r), vec!["127.0.0.4"]);
    let r = ask(fwd.addr, "web.virtual.consul.", RecordType::A).await;
    assert_answer(&r, ResponseCode::NoError, NODE_TTL, "file: web.virtual");
    assert_eq!(addresses(&r), vec!["240.0.0.1"]);
    // What a file cannot hold: gateway config entries, peers, namespaces, partitions.
    for name in [
        "web.ingress.consul.",
        "web.service.p1.peer.consul.",
        "web.service.default.ns.consul.",
        "web.service.default.ap.consul.",
    ] {
        let r = ask(fwd.addr, name, RecordType::A).await;
        assert_negative(&r, ResponseCode::NXDomain, name);
    }
    let r = ask(fwd.addr, "web.service.dc1.dc.consul.", RecordType::A).await;
    assert_eq!(sorted(addresses(&r)), vec!["127.0.0.2", "127.0.0.3"]);
    fwd.stop().await;
}
