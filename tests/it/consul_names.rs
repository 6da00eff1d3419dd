//! Consul names over real DNS, answered from the Consul HTTP API simulator: every name form,
//! the health rules, shuffling, freshness through blocking queries, outages, and the bound on
//! requests that reach Consul.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::support::consul_sim::{ConsulSim, SimNode, SimService, Status};
use crate::support::upstream::TestUpstream;
use crate::support::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};

pub(crate) fn node(sim: &ConsulSim, name: &str, addr: &str) {
    sim.add_node(SimNode::new(name, addr).meta("rack", "r1"));
}

/// Registers instance `id` of `service` on `node`; `at` is (service address, port), the address
/// "" meaning the node's.
pub(crate) fn svc(
    sim: &ConsulSim,
    id: &str,
    service: &str,
    node: &str,
    at: (&str, u16),
    tags: &[&str],
    status: Status,
) {
    sim.add_service(
        SimService {
            address: at.0.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            weights: (10, 1),
            ..SimService::new(id, service, node, at.1)
        },
        status,
    );
}

/// web: three instances on n1..n3 (127.0.0.2-4, node addresses), one tagged v1.
pub(crate) async fn sim_with_web() -> ConsulSim {
    let sim = ConsulSim::start().await;
    node(&sim, "n1", "127.0.0.2");
    node(&sim, "n2", "127.0.0.3");
    node(&sim, "n3", "127.0.0.4");
    svc(
        &sim,
        "web-1",
        "web",
        "n1",
        ("", 8080),
        &["v1", "primary"],
        Status::Passing,
    );
    svc(
        &sim,
        "web-2",
        "web",
        "n2",
        ("", 8080),
        &["v2"],
        Status::Passing,
    );
    svc(
        &sim,
        "web-3",
        "web",
        "n3",
        ("", 8080),
        &["v2"],
        Status::Passing,
    );
    sim
}

fn config(sim_urls: &[String], upstream: &TestUpstream, extra_consul: &str) -> TestConfig {
    let mut config = TestConfig::new()
        .upstream(upstream.addr)
        .upstream_timeout("1s");
    for url in sim_urls {
        config = config.consul_http(url);
    }
    config
        .consul("alt_domains = [\"alt.example\"]")
        .consul(extra_consul)
}

async fn start(sim: &ConsulSim, up: &TestUpstream, extra: &str) -> TestServer {
    TestServer::start(&config(&[sim.http_url()], up, extra).toml()).await
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn has_soa_authority(m: &Message) -> bool {
    matches!(m.authorities.first().map(|r| &r.data), Some(RData::SOA(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_names_answer_like_consul() {
    let sim = sim_with_web().await;
    let up = TestUpstream::start().await;
    let fwd = start(&sim, &up, "").await;

    let r = ask(fwd.addr, "web.service.consul.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        sorted(addresses(&r)),
        vec!["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    );
    assert!(r.metadata.authoritative && r.metadata.recursion_available);
    assert!(
        r.answers.iter().all(|a| a.ttl == 5),
        "service_ttl default 5s"
    );

    let r = ask(fwd.addr, "WEB.Service.CONSUL.", RecordType::A).await;
    assert_eq!(
        r.queries[0].name().to_ascii(),
        "WEB.Service.CONSUL.",
        "case echoed"
    );
    assert_eq!(addresses(&r).len(), 3);

    let r = ask(fwd.addr, "web.service.consul.", RecordType::AAAA).await;
    assert_eq!(
        r.metadata.response_code,
        ResponseCode::NoError,
        "IPv4-only: AAAA is NODATA at once"
    );
    assert!(r.answers.is_empty() && has_soa_authority(&r));

    assert_eq!(
        ask(fwd.addr, "web.service.consul.", RecordType::ANY)
            .await
            .answers
            .len(),
        3
    );
    assert_eq!(
        addresses(&ask(fwd.addr, "v1.web.service.consul.", RecordType::A).await),
        vec!["127.0.0.2"]
    );
    assert_eq!(
        sorted(addresses(
            &ask(fwd.addr, "v2.web.service.dc1.consul.", RecordType::A).await
        )),
        vec!["127.0.0.3", "127.0.0.4"]
    );
    assert_eq!(
        addresses(&ask(fwd.addr, "web.service.dc1.consul.", RecordType::A).await).len(),
        3
    );
    assert_eq!(
        addresses(&ask(fwd.addr, "web.service.alt.example.", RecordType::A).await).len(),
        3,
        "alt domain"
    );

    // Names that do not exist, and whether the SOA must come in the authority section.
    for (name, soa, why) in [
        ("web.service.dc9.consul.", false, "unknown datacenter"),
        ("nosuch.service.consul.", true, "unknown service"),
        ("v9.web.service.consul.", false, "no instance with that tag"),
        ("whatever.consul.", true, "not a Consul name"),
    ] {
        let r = ask(fwd.addr, name, RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain, "{why}");
        assert!(!soa || has_soa_authority(&r), "{why}: SOA in the authority");
    }

    let r = ask(fwd.addr, "consul.", RecordType::SOA).await;
    match &r.answers[0].data {
        RData::SOA(soa) => {
            assert_eq!(soa.mname.to_ascii(), "ns.consul.");
            assert_eq!(soa.minimum, 5);
        }
        other => panic!("SOA expected: {other:?}"),
    }
    // Nameservers: the Consul servers (tests/it/consul_parity_records.rs has the details).
    // A server registered after the SOA above asked for them: listed once the forwarder's
    // service list shows it.
    sim.add_server("srv-1", "127.0.0.10");
    let listed = eventually(Duration::from_secs(3), async || {
        let r = ask(fwd.addr, "consul.", RecordType::NS).await;
        r.answers
            .iter()
            .map(|a| a.data.to_string())
            .collect::<Vec<_>>()
            == ["srv-1.node.dc1.consul."]
    })
    .await;
    assert!(listed.is_some(), "the server is listed as the nameserver");
    assert_eq!(up.queries(), 0, "Consul names never reach the upstream");
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_rfc2782_targets_resolve_on_their_own() {
    let sim = sim_with_web().await;
    node(&sim, "n4", "127.0.0.5");
    svc(
        &sim,
        "api-1",
        "api",
        "n4",
        ("127.0.0.9", 9090),
        &[],
        Status::Warning,
    );
    let up = TestUpstream::start().await;
    let fwd = start(&sim, &up, "").await;

    for qname in [
        "_web._tcp.service.consul.",
        "web.service.consul.",
        "_web._tcp.consul.",
    ] {
        let r = ask(fwd.addr, qname, RecordType::SRV).await;
        assert_eq!(r.answers.len(), 3, "{qname}: {r}");
        for rec in &r.answers {
            let RData::SRV(srv) = &rec.data else {
                panic!("SRV expected")
            };
            assert_eq!((srv.priority, srv.weight, srv.port), (1, 10, 8080));
            let target = srv.target.to_ascii();
            assert!(target.ends_with(".node.dc1.consul."), "{target}");
            assert!(
                r.additionals.iter().any(|a| a.name == srv.target),
                "A for {target} in additional"
            );
            // nginx ignores the additional section and asks for each target.
            let a = ask(fwd.addr, &target, RecordType::A).await;
            assert_eq!(addresses(&a).len(), 1, "{target} resolves: {a}");
        }
    }
    let r = ask(fwd.addr, "_web._v1.service.consul.", RecordType::SRV).await;
    assert_eq!(r.answers.len(), 1, "tag in RFC 2782 form");

    // Own IP: <hex>.addr target, weight from Weights.Warning.
    let r = ask(fwd.addr, "_api._tcp.service.consul.", RecordType::SRV).await;
    let RData::SRV(srv) = &r.answers[0].data else {
        panic!("SRV")
    };
    assert_eq!(srv.target.to_ascii(), "7f000009.addr.dc1.consul.");
    assert_eq!(srv.weight, 1);
    assert_eq!(
        addresses(&ask(fwd.addr, "7f000009.addr.dc1.consul.", RecordType::A).await),
        vec!["127.0.0.9"]
    );
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_addrs_and_prepared_queries() {
    let sim = sim_with_web().await;
    sim.add_prepared_query("geo", "web", Some("v2"), Some("10s"));
    let up = TestUpstream::start().await;
    let fwd = start(&sim, &up, "").await;

    let r = ask(fwd.addr, "n1.node.consul.", RecordType::A).await;
    assert_eq!(addresses(&r), vec!["127.0.0.2"]);
    let r = ask(fwd.addr, "n1.node.dc1.consul.", RecordType::TXT).await;
    assert!(
        r.answers
            .iter()
            .any(|a| a.data.to_string().contains("rack=r1")),
        "{r}"
    );
    let r = ask(fwd.addr, "nobody.node.consul.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);

    let before = sim.total_requests();
    let r = ask(fwd.addr, "7f000002.addr.consul.", RecordType::A).await;
    assert_eq!(addresses(&r), vec!["127.0.0.2"]);
    assert_eq!(sim.total_requests(), before, ".addr is computed locally");

    let r = ask(fwd.addr, "geo.query.consul.", RecordType::A).await;
    assert_eq!(sorted(addresses(&r)), vec!["127.0.0.3", "127.0.0.4"]);
    assert!(
        r.answers.iter().all(|a| a.ttl == 10),
        "TTL from the query's DNS.TTL"
    );
    let r = ask(fwd.addr, "nope.query.consul.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_rules() {
    let sim = sim_with_web().await;
    node(&sim, "n5", "127.0.0.6");
    svc(&sim, "web-5", "web", "n5", ("", 8080), &[], Status::Warning);
    sim.set_service_check("web-3", Status::Critical);
    sim.set_node_check("n2", "serfHealth", Status::Critical);
    let up = TestUpstream::start().await;
    let fwd = start(&sim, &up, "").await;
    let r = ask(fwd.addr, "web.service.consul.", RecordType::A).await;
    assert_eq!(
        sorted(addresses(&r)),
        vec!["127.0.0.2", "127.0.0.6"],
        "critical service and node checks drop; warning stays"
    );
    fwd.stop().await;

    let fwd = start(&sim, &up, "only_passing = true\n").await;
    let r = ask(fwd.addr, "web.service.consul.", RecordType::A).await;
    assert_eq!(
        addresses(&r),
        vec!["127.0.0.2"],
        "only_passing drops warning too"
    );
    fwd.stop().await;

    sim.set_service_check("web-1", Status::Critical);
    sim.set_service_check("web-5", Status::Critical);
    let fwd = start(&sim, &up, "").await;
    let r = ask(fwd.addr, "web.service.consul.", RecordType::A).await;
    assert_eq!(
        r.metadata.response_code,
        ResponseCode::NXDomain,
        "none healthy: NXDOMAIN as Consul"
    );
    assert!(has_soa_authority(&r));
    fwd.stop().await;

    let fwd = start(&sim, &up, "when_none_healthy = \"all\"\n").await;
    let r = ask(fwd.addr, "web.service.consul.", RecordType::A).await;
    assert_eq!(
        addresses(&r).len(),
        4,
        "panic mode answers with every instance"
    );
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_is_shuffled_and_a_record_limit_caps() {
    let sim = sim_with_web().await;
    let up = TestUpstream::start().await;
    let fwd = start(&sim, &up, "").await;
    let mut orders = HashSet::new();
    for _ in 0..20 {
        orders.insert(addresses(
            &ask(fwd.addr, "web.service.consul.", RecordType::A).await,
        ));
    }
    assert!(
        orders.len() >= 3,
        "20 answers, only {} orders: {orders:?}",
        orders.len()
    );
    fwd.stop().await;

    let fwd = start(&sim, &up, "a_record_limit = 1\n").await;
    let mut seen = HashSet::new();
    for _ in 0..30 {
        let r = ask(fwd.addr, "web.service.consul.", RecordType::A).await;
        assert_eq!(r.answers.len(), 1);
        seen.extend(addresses(&r));
    }
    assert_eq!(seen.len(), 3, "the one address rotates");
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_turning_critical_leaves_answers_within_a_second() {
    let sim = sim_with_web().await;
    let up = TestUpstream::start().await;
    let fwd = start(&sim, &up, "").await;
    assert_eq!(
        addresses(&ask(fwd.addr, "web.service.consul.", RecordType::A).await).len(),
        3
    );
    // Let the watcher settle into its blocking query.
    tokio::time::sleep(Duration::from_millis(200)).await;
    sim.set_service_check("web-2", Status::Critical);
    let addr = fwd.addr;
    let took = eventually(Duration::from_secs(3), async || {
        !addresses(&ask(addr, "web.service.consul.", RecordType::A).await)
            .contains(&"127.0.0.3".to_string())
    })
    .await
    .expect("the critical instance leaves the answers");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    sim.set_service_check("web-2", Status::Passing);
    let took = eventually(Duration::from_secs(3), async || {
        addresses(&ask(addr, "web.service.consul.", RecordType::A).await).len() == 3
    })
    .await
    .expect("it comes back");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    println!("critical → gone took {took:?}");
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_outage_serves_the_last_view_and_servfails_unknown_names() {
    let sim = sim_with_web().await;
    let up = TestUpstream::start().await;
    let fwd = start(&sim, &up, "").await;
    assert_eq!(
        addresses(&ask(fwd.addr, "web.service.consul.", RecordType::A).await).len(),
        3
    );
    assert_eq!(
        addresses(&ask(fwd.addr, "n1.node.consul.", RecordType::A).await).len(),
        1
    );
    sim.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..5 {
        let r = ask(fwd.addr, "web.service.consul.", RecordType::A).await;
        assert_eq!(
            r.metadata.response_code,
            ResponseCode::NoError,
            "never NXDOMAIN because Consul is down"
        );
        assert_eq!(
            addresses(&r).len(),
            3,
            "the last view while Consul is away: {r}"
        );
    }
    // The node entry is past its TTL after 5 s; keep it short: ask again now (fresh) — and an
    // unseen service must SERVFAIL, not NXDOMAIN.
    let started = Instant::now();
    let r = ask(fwd.addr, "never-seen.service.consul.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail, "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // Forwarded names are unaffected.
    assert_eq!(
        addresses(&ask(fwd.addr, "a.test.", RecordType::A).await),
        vec!["192.0.2.1"]
    );

    sim.restart().await;
    sim.set_service_check("web-1", Status::Critical);
    let addr = fwd.addr;
    let took = eventually(Duration::from_secs(8), async || {
        addresses(&ask(addr, "web.service.consul.", RecordType::A).await).len() == 2
    })
    .await
    .expect("recovers after Consul returns");
    println!("recovery after restart took {took:?}");
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_load_does_not_grow_with_dns_load() {
    let sim = sim_with_web().await;
    let up = TestUpstream::start().await;
    let fwd = start(&sim, &up, "").await;
    // Concurrent first queries share one fetch.
    let mut first = Vec::new();
    for _ in 0..20 {
        let addr = fwd.addr;
        first.push(tokio::spawn(async move {
            ask(addr, "web.service.consul.", RecordType::A).await
        }));
    }
    for t in first {
        assert_eq!(addresses(&t.await.expect("join")).len(), 3);
    }
    let initial_fetches = sim
        .request_log()
        .iter()
        .filter(|l| l.contains("/v1/health/service/web") && !l.contains("index="))
        .count();
    assert_eq!(
        initial_fetches, 1,
        "one fetch for 20 concurrent first queries"
    );

    let mut tasks = Vec::new();
    for _ in 0..8 {
        let addr = fwd.addr;
        tasks.push(tokio::spawn(async move {
            for _ in 0..1250 {
                let r = ask(addr, "web.service.consul.", RecordType::A).await;
                assert_eq!(r.answers.len(), 3);
            }
        }));
    }
    for t in tasks {
        t.await.expect("join");
    }
    let requests = sim.requests("/v1/health/service/web");
    println!("10,000 DNS queries cost {requests} HTTP requests");
    assert!(requests <= 3, "{requests} requests for 10,000 queries");
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_to_the_next_agent_and_sends_the_token() {
    let dead = ConsulSim::start().await;
    let dead_url = dead.http_url();
    dead.stop().await;
    let sim = sim_with_web().await;
    let up = TestUpstream::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, "s3cr3t-token\n").expect("write");
    let config = config(&[dead_url, sim.http_url()], &up, "").token_file(&token_path);
    let fwd = TestServer::start(&config.toml()).await;
    let r = ask(fwd.addr, "web.service.consul.", RecordType::A).await;
    assert_eq!(addresses(&r).len(), 3);
    assert_eq!(sim.last_token().as_deref(), Some("s3cr3t-token"));
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostname_addresses_become_a_cname_chain() {
    let sim = ConsulSim::start().await;
    node(&sim, "h1", "127.0.0.2");
    svc(
        &sim,
        "ext-1",
        "ext",
        "h1",
        ("www.test", 443),
        &[],
        Status::Passing,
    );
    let up = TestUpstream::start().await;
    let fwd = start(&sim, &up, "").await;
    let r = ask(fwd.addr, "ext.service.consul.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    let RData::CNAME(c) = &r.answers[0].data else {
        panic!("CNAME first: {r}")
    };
    assert_eq!(c.0.to_ascii(), "www.test.");
    assert_eq!(
        addresses(&r),
        vec!["192.0.2.1"],
        "followed by the resolved chain: {r}"
    );
    fwd.stop().await;
}

/// `consul.mode = "dns"` against the simulator's DNS port.
fn dns_mode_config(sim: &ConsulSim, up: &TestUpstream) -> String {
    TestConfig::new()
        .upstream(up.addr)
        .consul_dns(sim.dns_addr())
        .toml()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_mode_forwards_to_the_agent_and_caches_despite_ttl_zero() {
    let sim = sim_with_web().await;
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&dns_mode_config(&sim, &up)).await;
    let mut orders = HashSet::new();
    // Every order of the three shows up: missing one in 100 shuffles has odds of about 1e-7.
    for _ in 0..100 {
        let r = ask(fwd.addr, "web.service.consul.", RecordType::A).await;
        assert_eq!(addresses(&r).len(), 3);
        let ttl = r.answers[0].ttl;
        assert!((1..=5).contains(&ttl), "TTL floored from Consul's 0: {ttl}");
        assert!(
            r.answers.iter().all(|a| a.ttl == ttl),
            "every record's TTL rewritten"
        );
        orders.insert(addresses(&r));
    }
    assert_eq!(sim.dns_queries(), 1, "cached: one query reached the agent");
    assert_eq!(orders.len(), 6, "cache hits are shuffled too: {orders:?}");
    let r = ask(fwd.addr, "nosuch.service.consul.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    fwd.stop().await;
}

/// A large service in DNS mode: the agent's answer is cached whole; a client that takes less
/// gets as many addresses as fit, a different random subset each time, with TC=1 (TCP gives
/// more), and TCP gives all the cached ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_mode_cuts_a_large_cached_answer_to_a_random_subset_that_fits() {
    let sim = ConsulSim::start().await;
    sim.add_grid("big", 1, 300);
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&dns_mode_config(&sim, &up)).await;
    let name = "big0.service.consul.";
    let whole = tcp(fwd.addr, &make_query(name, RecordType::A, None)).await;
    assert!(!whole.metadata.truncation);
    let cached = addresses(&whole).len();
    // The agent trims its answer to our EDNS size (74 addresses), without TC, as Consul does.
    assert!(cached > 29, "the agent's answer holds {cached} addresses");
    let mut seen = HashSet::new();
    for _ in 0..20 {
        let q = make_query(name, RecordType::A, None);
        let bytes = raw_udp(fwd.addr, &q.to_vec().expect("encode"), REPLY_TIMEOUT)
            .await
            .expect("reply");
        assert!(bytes.len() <= 512, "{} bytes", bytes.len());
        let r = Message::from_vec(&bytes).expect("decodes");
        assert!(r.metadata.truncation, "TC=1: TCP would give more");
        let got = addresses(&r);
        // 512 bytes hold 29 A records after this question (16 bytes each).
        assert_eq!(got.len(), 29, "as many as fit");
        seen.extend(got);
    }
    assert!(
        seen.len() > 29,
        "a different subset each time: {} seen",
        seen.len()
    );
    let again = tcp(fwd.addr, &make_query(name, RecordType::A, None)).await;
    assert!(!again.metadata.truncation);
    assert_eq!(addresses(&again).len(), cached);
    assert_eq!(sim.dns_queries(), 1, "every answer came from the cache");
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_file_answers_without_consul() {
    let sim = sim_with_web().await;
    sim.set_service_check("web-3", Status::Critical);
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("catalog.json");
    std::fs::write(&path, sim.catalog_json().to_string()).expect("write");
    drop(sim);
    let up = TestUpstream::start().await;
    let toml = TestConfig::new()
        .upstream(up.addr)
        .catalog_file(&path)
        .toml();
    let fwd = TestServer::start(&toml).await;
    let mut orders = HashSet::new();
    for _ in 0..20 {
        let r = ask(fwd.addr, "web.service.consul.", RecordType::A).await;
        assert_eq!(sorted(addresses(&r)), vec!["127.0.0.2", "127.0.0.3"]);
        orders.insert(addresses(&r));
    }
    assert_eq!(orders.len(), 2, "both orders");
    let encoded = fwd.metric("consul_dns_forwarder_consul_encoded_answers_total", &[]);
    assert!(
        encoded >= 19.0,
        "all but the first from the pre-encoded records: {encoded}"
    );
    let r = ask(fwd.addr, "_web._tcp.service.consul.", RecordType::SRV).await;
    assert_eq!(r.answers.len(), 2);
    assert_eq!(
        addresses(&ask(fwd.addr, "n1.node.consul.", RecordType::A).await),
        vec!["127.0.0.2"]
    );
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_watchers_stop_and_come_back_on_demand() {
    let sim = sim_with_web().await;
    let up = TestUpstream::start().await;
    let fwd = start(&sim, &up, "watch_wait = \"1s\"\nwatch_idle = \"1s\"\n").await;
    assert_eq!(
        addresses(&ask(fwd.addr, "web.service.consul.", RecordType::A).await).len(),
        3
    );
    assert_eq!(fwd.metric("consul_dns_forwarder_consul_watchers", &[]), 1.0);
    let stopped = eventually(Duration::from_secs(6), async || {
        fwd.metric("consul_dns_forwarder_consul_watchers", &[]) == 0.0
    })
    .await;
    assert!(stopped.is_some(), "the idle watcher stops");
    let requests = sim.requests("/v1/health/service/web");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        sim.requests("/v1/health/service/web"),
        requests,
        "no requests for a stopped watcher"
    );
    assert_eq!(
        addresses(&ask(fwd.addr, "web.service.consul.", RecordType::A).await).len(),
        3
    );
    assert_eq!(fwd.metric("consul_dns_forwarder_consul_watchers", &[]), 1.0);
    fwd.stop().await;
}

/// A view without a blocking query of its own (the connection budget's blocking slots all taken:
/// 8 connections give 6, held by the two catalog lists, the two change feeds and two services
/// asked before) sees registrations and deregistrations within 2 s, though its TTL is a minute
/// and no check changes: the service list's index says the catalog moved. Consul is asked
/// once per change, not once per query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_reach_views_without_a_blocking_query_within_two_seconds() {
    registrations_reach_a_view_without_a_blocking_query(Duration::ZERO).await;
}

/// The same, with the service list's answers 150 ms in transit: a registration moves the node
/// list first, and the view fetched for that move holds the service list's change too, and
/// the deregistration that follows. The service list's late reports of changes the view holds
/// must not fetch it again (they did, at the next query however late, in 1 run of 19 without
/// the delay, and in CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_reporting_a_change_the_view_holds_does_not_fetch_it_again() {
    registrations_reach_a_view_without_a_blocking_query(Duration::from_millis(150)).await;
}

async fn registrations_reach_a_view_without_a_blocking_query(list_transit: Duration) {
    let sim = sim_with_web().await;
    sim.set_list_transit(list_transit);
    for (n, filler) in [("f1", "filler-1"), ("f2", "filler-2")] {
        svc(&sim, n, filler, "n1", ("", 9000), &[], Status::Passing);
    }
    let up = TestUpstream::start().await;
    let toml = TestConfig::new()
        .upstream(up.addr)
        .consul_http(sim.http_url())
        .consul("max_connections = 8")
        .service_ttl("60s")
        .toml();
    let fwd = TestServer::start(&toml).await;
    // The lists and the feeds hold the 4 slots kept for them; the fillers take the other two
    // when asked a second time. A filler whose first ask found both slots lent to short
    // requests waits `SLOT_RETRY` (5 s) for one, so they are asked until both block.
    for name in ["filler-1.service.consul.", "filler-2.service.consul."] {
        assert_eq!(
            addresses(&ask(fwd.addr, name, RecordType::A).await).len(),
            1
        );
    }
    let blocking = |sim: &ConsulSim, service: &str| {
        let path = format!("/v1/health/service/{service}?");
        sim.request_log()
            .iter()
            .any(|t| t.starts_with(&path) && t.contains("index="))
    };
    let fillers_block = eventually(Duration::from_secs(12), async || {
        for name in ["filler-1.service.consul.", "filler-2.service.consul."] {
            ask(fwd.addr, name, RecordType::A).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        blocking(&sim, "filler-1") && blocking(&sim, "filler-2")
    })
    .await;
    assert!(
        fillers_block.is_some(),
        "the fillers never blocked: {:?}",
        sim.request_log()
    );
    for _ in 0..3 {
        let r = ask(fwd.addr, "web.service.consul.", RecordType::A).await;
        assert_eq!(addresses(&r).len(), 3);
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let web_reads = |sim: &ConsulSim| -> Vec<String> {
        sim.request_log()
            .into_iter()
            .filter(|t| t.starts_with("/v1/health/service/web"))
            .collect()
    };
    assert!(
        web_reads(&sim).iter().all(|t| !t.contains("index=")),
        "the premise: web has no blocking query: {:?}",
        web_reads(&sim)
    );

    let asked = |want: usize, without: Option<&'static str>| {
        let addr = fwd.addr;
        async move {
            eventually(Duration::from_secs(4), async || {
                let r = ask(addr, "web.service.consul.", RecordType::A).await;
                let got = addresses(&r);
                got.len() == want && without.is_none_or(|ip| !got.iter().any(|a| a == ip))
            })
            .await
        }
    };
    node(&sim, "n4", "127.0.0.5");
    svc(&sim, "web-4", "web", "n4", ("", 8080), &[], Status::Passing);
    let took = asked(4, None).await.expect("the new instance is answered");
    println!("registration answered after {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");

    sim.remove_service("web-2");
    let took = asked(3, Some("127.0.0.3"))
        .await
        .expect("the deregistered instance leaves");
    println!("deregistration answered after {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");

    // Many more queries, no catalog change: Consul is not asked per query. A list that reports
    // the change after the view was fetched for it (the fetch came on the other list's move,
    // or on the list's previous index) reports what the view holds already: no fetch either.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = web_reads(&sim).len();
    for _ in 0..200 {
        ask(fwd.addr, "web.service.consul.", RecordType::A).await;
    }
    assert_eq!(
        web_reads(&sim).len(),
        before,
        "{before} reads before 200 queries: {:?}",
        web_reads(&sim)
    );
    fwd.stop().await;
}

/// A cold start asks many services at once, and each one asked twice wants a blocking slot for
/// its watcher. The catalog lists and the change feeds keep every view fresh, so they must hold
/// slots of their own, not poll: at 100,000 nodes the node list is 25 MB a poll (issue 8's
/// many-services benchmark used to poll it every 3 s and doubled its memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_leaves_the_catalog_lists_and_feeds_their_blocking_slots() {
    const SERVICES: usize = 30;
    let sim = ConsulSim::start().await;
    for n in 0..SERVICES {
        sim.add_simple(
            &format!("svc{n}"),
            &format!("node{n}"),
            &format!("127.0.3.{}", n + 1),
            80,
        );
    }
    let up = TestUpstream::start().await;
    // 8 connections: 2 for fetches, 6 blocking slots, fewer than the services.
    let fwd = start(&sim, &up, "max_connections = 8").await;
    let addr = fwd.addr;
    for _ in 0..2 {
        let mut asks = Vec::new();
        for n in 0..SERVICES {
            asks.push(tokio::spawn(async move {
                ask(addr, &format!("svc{n}.service.consul."), RecordType::A).await
            }));
        }
        for (n, a) in asks.into_iter().enumerate() {
            let r = a.await.expect("join");
            assert_eq!(addresses(&r), [format!("127.0.3.{}", n + 1)], "svc{n}: {r}");
        }
    }
    // A list without a slot polls every second: three seconds would show two or three polls.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = sim.request_log();
    for list in [
        "/v1/catalog/nodes",
        "/v1/catalog/services",
        "/v1/health/state/critical",
        "/v1/health/state/warning",
    ] {
        let requests: Vec<&String> = log
            .iter()
            .filter(|t| t.split('?').next() == Some(list))
            .collect();
        let plain = requests.iter().filter(|t| !t.contains("index=")).count();
        assert_eq!(
            plain, 1,
            "{list}: one plain request, then blocking: {requests:?}"
        );
        assert!(
            requests.iter().any(|t| t.contains("index=")),
            "{list} holds a blocking query: {requests:?}"
        );
    }
    fwd.stop().await;
}
