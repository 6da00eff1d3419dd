//! PTR questions over real DNS, as Consul's DNS answers them (`agent/dns.go`, `handlePtr`): a
//! node's address names the node, a service instance's own address names the service, in the
//! local datacenter, authoritative; every other reverse name is forwarded upstream as before.
//! HTTP mode against the Consul simulator, the catalog-file mode, the DNS mode's
//! `consul.reverse_networks`, and `dig -x` against the binary.

use std::net::IpAddr;
use std::time::Duration;

use crate::consul_names::{node, svc};
use crate::e2e_dig_consul_names::{answers, dig, flags, section};
use crate::support::consul_sim::{ConsulSim, Status};
use crate::support::e2e::Forwarder;
use crate::support::upstream::TestUpstream;
use crate::support::*;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

/// How long a registration or deregistration may take to show in PTR answers: the node list
/// (one blocking request, at most two a second) or the service index (rebuilt each second).
const FRESH_WITHIN: Duration = Duration::from_secs(3);

/// The reverse name of 2001:db8::1, which the test upstream names `v6.test.`.
fn v6_upstream_reverse() -> String {
    format!("1.{}8.b.d.0.1.0.0.2.ip6.arpa.", "0.".repeat(23))
}

/// The catalog of Consul's own reverse-lookup tests (`agent/dns_test.go`): node `foo2` at
/// 127.0.0.2, `bar` at ::4242:4242, `foo` at 127.0.0.1 (with a tagged IPv6 address), service
/// `db` with its own 127.0.0.3, `db6` with its own 2001:db8::ff00:42:8329 (critical), `same`
/// whose own address is its node's.
async fn consul_test_catalog() -> ConsulSim {
    let sim = ConsulSim::start().await;
    node(&sim, "foo2", "127.0.0.2");
    node(&sim, "bar", "::4242:4242");
    node(&sim, "foo", "127.0.0.1");
    sim.set_node_tagged_addresses("foo", &[("lan_ipv6", "2001:db8::1")]);
    let ok = Status::Passing;
    svc(&sim, "db-1", "db", "foo", ("127.0.0.3", 5432), &[], ok);
    let db6 = ("2001:db8::ff00:42:8329", 5432);
    svc(&sim, "db6-1", "db6", "bar", db6, &[], Status::Critical);
    svc(&sim, "same-1", "same", "foo", ("127.0.0.1", 80), &[], ok);
    sim
}

/// The catalog above, the test upstream, and a forwarder asking both.
async fn start() -> (ConsulSim, TestUpstream, TestServer) {
    let sim = consul_test_catalog().await;
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&config(&sim, &up)).await;
    (sim, up, fwd)
}

fn config(sim: &ConsulSim, up: &TestUpstream) -> String {
    TestConfig::new()
        .upstream(up.addr)
        .upstream_timeout("1s")
        .consul_http(sim.http_url())
        .consul("alt_domains = [\"alt.example\"]\nnode_ttl = \"7s\"")
        .service_ttl("5s")
        .set("consul.service_ttl", "\"db\"", "\"9s\"")
        .toml()
}

fn ptr(name: &str) -> Message {
    make_query(name, RecordType::PTR, None)
}

/// The PTR targets of a reply's answers with their TTLs; panics on any other record.
fn targets(m: &Message) -> Vec<(String, u32)> {
    m.answers
        .iter()
        .map(|r| match &r.data {
            RData::PTR(p) => (p.0.to_ascii(), r.ttl),
            other => panic!("PTR expected: {other:?}"),
        })
        .collect()
}

/// Consul's answer: NOERROR, AA (we answer for Consul), RA (as every reply here), one PTR
/// owned by the question.
fn assert_consul_ptr(m: &Message, target: &str, ttl: u32) {
    assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{m:?}");
    assert!(m.metadata.authoritative && m.metadata.recursion_available);
    assert_eq!(targets(m), [(target.to_owned(), ttl)]);
    assert_eq!(
        m.answers[0].name,
        *m.queries[0].name(),
        "owned by the question"
    );
    assert!(m.authorities.is_empty() && m.additionals.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_and_service_addresses_answer_like_consul() {
    let (sim, up, fwd) = start().await;

    // A node's address: the node, named in the main domain (not an alternative one), with
    // node_ttl, over UDP and TCP, for PTR and ANY (Consul's tests ask ANY).
    let name = "2.0.0.127.in-addr.arpa.";
    assert_consul_ptr(&udp(fwd.addr, &ptr(name)).await, "foo2.node.dc1.consul.", 7);
    assert_consul_ptr(&tcp(fwd.addr, &ptr(name)).await, "foo2.node.dc1.consul.", 7);
    let any = udp(fwd.addr, &make_query(name, RecordType::ANY, None)).await;
    assert_consul_ptr(&any, "foo2.node.dc1.consul.", 7);
    let upper = udp(fwd.addr, &ptr("2.0.0.127.IN-ADDR.ARPA.")).await;
    assert_eq!(
        upper.queries[0].name().to_ascii(),
        "2.0.0.127.IN-ADDR.ARPA."
    );
    assert_consul_ptr(&upper, "foo2.node.dc1.consul.", 7);
    // IPv6, and an address that is both a node's and a service's: the node.
    let bar = "2.4.2.4.2.4.2.4.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa.";
    assert_consul_ptr(&udp(fwd.addr, &ptr(bar)).await, "bar.node.dc1.consul.", 7);
    let foo = udp(fwd.addr, &ptr("1.0.0.127.in-addr.arpa.")).await;
    assert_consul_ptr(&foo, "foo.node.dc1.consul.", 7);

    // A service's own address is known once the service is watched (asked for); then it names
    // the service with the service's TTL, critical instance or not (Consul reads the catalog).
    assert_eq!(
        addresses(&ask(fwd.addr, "db.service.consul.", RecordType::A).await),
        ["127.0.0.3"]
    );
    let _ = ask(fwd.addr, "db6.service.consul.", RecordType::AAAA).await;
    let db = udp(fwd.addr, &ptr("3.0.0.127.in-addr.arpa.")).await;
    assert_consul_ptr(&db, "db.service.dc1.consul.", 9);
    let db6 = "9.2.3.8.2.4.0.0.0.0.f.f.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.";
    assert_consul_ptr(
        &udp(fwd.addr, &ptr(db6)).await,
        "db6.service.dc1.consul.",
        5,
    );

    assert_eq!(up.queries(), 0, "nothing Consul knows went upstream");
    assert_eq!(
        sim.requests("/v1/catalog/node/"),
        0,
        "no request per address"
    );
    let consul_ptr = [("zone", "consul"), ("qtype", "PTR")];
    let counted = fwd.metric("consul_dns_forwarder_requests_total", &consul_ptr);
    assert_eq!(counted, 7.0, "counted in the Consul zone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_consul_does_not_know_are_forwarded_upstream() {
    let (sim, up, fwd) = start().await;

    // Unknown to Consul, known upstream: the upstream's answer as it came (not AA: ours only
    // for Consul's answers), then from the cache.
    for _ in 0..2 {
        let m = udp(fwd.addr, &ptr("1.2.0.192.in-addr.arpa.")).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(!m.metadata.authoritative);
        assert_eq!(targets(&m).len(), 1);
        assert_eq!(targets(&m)[0].0, "a.test.");
    }
    assert_eq!(
        up.queries_for("1.2.0.192.in-addr.arpa", RecordType::PTR),
        1,
        "then cached"
    );
    // Unknown everywhere: the upstream's NXDOMAIN with its SOA.
    let m = udp(fwd.addr, &ptr("99.9.9.10.in-addr.arpa.")).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(m.authorities[0].name.to_ascii(), "arpa.");
    assert_eq!(up.queries_for("99.9.9.10.in-addr.arpa", RecordType::PTR), 1);
    // A node's tagged address (lan_ipv6) is not its Address: Consul does not match it.
    let m = udp(fwd.addr, &ptr(&v6_upstream_reverse())).await;
    assert_eq!(targets(&m)[0].0, "v6.test.");
    assert_eq!(up.queries_for(&v6_upstream_reverse(), RecordType::PTR), 1);
    // A service address of a service nobody asked for is not known (no view): forwarded.
    node(&sim, "n9", "127.0.0.9");
    let own = ("127.0.0.10", 80);
    svc(
        &sim,
        "unasked-1",
        "unasked",
        "n9",
        own,
        &[],
        Status::Passing,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m = udp(fwd.addr, &ptr("10.0.0.127.in-addr.arpa.")).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(
        up.queries_for("10.0.0.127.in-addr.arpa", RecordType::PTR),
        1
    );
    // Other types for a Consul address are forwarded too (Consul would answer a PTR record).
    let m = ask(fwd.addr, "2.0.0.127.in-addr.arpa.", RecordType::TXT).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(up.queries_for("2.0.0.127.in-addr.arpa", RecordType::TXT), 1);
    assert_eq!(sim.requests("/v1/catalog/node/"), 0);
    assert_eq!(sim.requests("/v1/health/service/"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_and_deregistrations_show_within_seconds() {
    let (sim, up, fwd) = start().await;
    let late = "50.0.0.127.in-addr.arpa.";
    // Not there yet: forwarded, and the upstream's NXDOMAIN cached.
    let m = udp(fwd.addr, &ptr(late)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(up.queries_for(late, RecordType::PTR), 1);

    node(&sim, "late", "127.0.0.50");
    let took = eventually(FRESH_WITHIN, async || {
        targets(&udp(fwd.addr, &ptr(late)).await) == [("late.node.dc1.consul.".into(), 7)]
    })
    .await
    .expect("a new node's address is answered within seconds, over the cached NXDOMAIN");
    println!("node registered: answered after {took:?}");

    // A service instance with its own address, in a watched service.
    assert_eq!(
        addresses(&ask(fwd.addr, "db.service.consul.", RecordType::A).await),
        ["127.0.0.3"]
    );
    let own = ("127.0.0.51", 5432);
    svc(&sim, "db-2", "db", "late", own, &[], Status::Passing);
    let svc = "51.0.0.127.in-addr.arpa.";
    eventually(FRESH_WITHIN, async || {
        targets(&udp(fwd.addr, &ptr(svc)).await) == [("db.service.dc1.consul.".into(), 9)]
    })
    .await
    .expect("a new instance's own address is answered within seconds");

    // Deregistered: gone (forwarded again) within seconds, the instance with it.
    sim.remove_node("late");
    for name in [late, svc] {
        eventually(FRESH_WITHIN, async || {
            let m = udp(fwd.addr, &ptr(name)).await;
            m.metadata.response_code == ResponseCode::NXDomain && !m.metadata.authoritative
        })
        .await
        .unwrap_or_else(|| panic!("{name}: forwarded again after the deregistration"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_consul_is_away_the_last_known_addresses_are_answered() {
    let (sim, _up, fwd) = start().await;
    let name = "2.0.0.127.in-addr.arpa.";
    assert_consul_ptr(&udp(fwd.addr, &ptr(name)).await, "foo2.node.dc1.consul.", 7);
    sim.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_consul_ptr(&udp(fwd.addr, &ptr(name)).await, "foo2.node.dc1.consul.", 7);
    let m = udp(fwd.addr, &ptr("1.2.0.192.in-addr.arpa.")).await;
    assert_eq!(
        targets(&m)[0].0,
        "a.test.",
        "an address never seen is forwarded"
    );
    sim.restart().await;
    assert_consul_ptr(&udp(fwd.addr, &ptr(name)).await, "foo2.node.dc1.consul.", 7);
}

/// A PTR question for a name built from raw labels (any bytes, as a client may send).
fn raw_ptr(labels: &[&[u8]]) -> Message {
    let mut name = Name::from_labels(labels.iter().copied()).expect("labels fit a name");
    name.set_fqdn(true);
    let mut m = Message::query();
    m.metadata.id = rand::random();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name, RecordType::PTR));
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_and_hostile_reverse_names_are_forwarded_without_asking_consul() {
    let (sim, up, fwd) = start().await;
    let (arpa, v4, v6): (&[u8], &[u8], &[u8]) = (b"arpa", b"in-addr", b"ip6");
    let long: Vec<&[u8]> = std::iter::repeat_n(&b"1"[..], 120)
        .chain([v4, arpa])
        .collect();
    let mut nibbles: Vec<&[u8]> = std::iter::repeat_n(&b"0"[..], 31).collect();
    nibbles.extend([&b"10"[..], v6, arpa]);
    let cases: Vec<Vec<&[u8]>> = vec![
        vec![b"3", b"2", b"1", v4, arpa],
        vec![b"10", v4, arpa],
        vec![v4, arpa],
        vec![v6, arpa],
        vec![b"8", b"b", b"d", b"0", b"1", b"0", b"0", b"2", v6, arpa],
        vec![b"256", b"0", b"0", b"127", v4, arpa],
        vec![b"02", b"0", b"0", b"127", v4, arpa],
        vec![b"2\x00", b"0", b"0", b"127", v4, arpa],
        vec![b"2 ", b"0", b"0", b"127", v4, arpa],
        vec![b"2.0", b"0", b"127", v4, arpa],
        vec![b"*", b"0", b"0", b"127", v4, arpa],
        vec![b"\xff\xfe", b"0", b"0", b"127", v4, arpa],
        vec![b"2", b"0", b"0", b"127", b"2", v4, arpa],
        long,
        nibbles,
    ];
    for labels in &cases {
        let m = udp(fwd.addr, &raw_ptr(labels)).await;
        assert_eq!(
            m.metadata.response_code,
            ResponseCode::NXDomain,
            "{labels:?}: the upstream's answer"
        );
        assert!(!m.metadata.authoritative);
        let m = tcp(fwd.addr, &raw_ptr(labels)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    }
    assert_eq!(
        up.queries(),
        cases.len(),
        "each forwarded once, then cached"
    );
    // 300 labels do not fit in a DNS name (255 bytes): the packet is malformed, FORMERR.
    let mut packet = make_query("a.test.", RecordType::PTR, None)
        .to_vec()
        .expect("encode");
    let question: Vec<u8> = std::iter::repeat_n([1u8, b'1'], 300)
        .flatten()
        .chain(*b"\x07in-addr\x04arpa\x00\x00\x0c\x00\x01")
        .collect();
    packet.truncate(12);
    packet.extend_from_slice(&question);
    let reply = raw_udp(fwd.addr, &packet, REPLY_TIMEOUT)
        .await
        .expect("a reply");
    assert_eq!(reply[3] & 0x0f, ResponseCode::FormErr.low());
    // None of them was a full-length reverse name: Consul was not asked anything, not even
    // for its node list.
    assert_eq!(sim.requests("/v1/catalog"), 0);
    assert_eq!(sim.requests("/v1/health"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_nodes_answer_their_addresses() {
    let sim = ConsulSim::start().await;
    let grid = sim.add_grid("n", 1_000, 10);
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&config(&sim, &up)).await;
    for g in grid.iter().step_by(97) {
        let ip: IpAddr = g.address.parse().expect("ip");
        let IpAddr::V4(v4) = ip else {
            unreachable!("the grid is IPv4")
        };
        let [a, b, c, d] = v4.octets();
        let name = format!("{d}.{c}.{b}.{a}.in-addr.arpa.");
        let want = format!("{}.node.dc1.consul.", g.node);
        assert_consul_ptr(&udp(fwd.addr, &ptr(&name)).await, &want, 7);
    }
    assert_eq!(up.queries(), 0);
    assert_eq!(sim.requests("/v1/catalog/node/"), 0);
}

/// The catalog file: its nodes' addresses and its instances' own addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_file_answers_its_addresses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("catalog.json");
    std::fs::write(
        &path,
        r#"{"Web": [{"Node": {"Node": "Node-1", "Address": "10.0.0.1", "Datacenter": "dc7"},
                     "Service": {"ID": "web-1", "Service": "Web", "Address": "10.0.0.2", "Port": 80},
                     "Checks": []},
                    {"Node": {"Node": "node-2", "Address": "fd00::2"},
                     "Service": {"ID": "web-2", "Service": "Web", "Address": "", "Port": 80},
                     "Checks": []}]}"#,
    )
    .expect("write");
    let up = TestUpstream::start().await;
    let file_mode = TestConfig::new().upstream(up.addr).upstream_timeout("1s");
    let fwd = TestServer::start(&file_mode.catalog_file(&path).toml()).await;
    let n1 = udp(fwd.addr, &ptr("1.0.0.10.in-addr.arpa.")).await;
    assert_consul_ptr(&n1, "Node-1.node.dc7.consul.", 5);
    let web = udp(fwd.addr, &ptr("2.0.0.10.in-addr.arpa.")).await;
    assert_consul_ptr(&web, "Web.service.dc7.consul.", 5);
    let n2 = format!("2.{}d.f.ip6.arpa.", "0.".repeat(29));
    assert_consul_ptr(
        &udp(fwd.addr, &ptr(&n2)).await,
        "node-2.node.dc7.consul.",
        5,
    );
    assert_eq!(up.queries(), 0);
    let m = udp(fwd.addr, &ptr("1.2.0.192.in-addr.arpa.")).await;
    assert_eq!(targets(&m)[0].0, "a.test.");
}

/// `consul.mode = "dns"`: reverse names of `consul.reverse_networks` go to the agents' DNS port
/// (dnsmasq's `rev-server`), cached like the domain's names; the others upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dns_mode_sends_reverse_networks_to_the_agents() {
    let sim = consul_test_catalog().await;
    let up = TestUpstream::start().await;
    let toml = TestConfig::new()
        .upstream(up.addr)
        .upstream_timeout("1s")
        .consul_dns(sim.dns_addr())
        .set(
            "consul",
            "reverse_networks",
            r#"["127.0.0.0/8", "::4242:0/112"]"#,
        )
        .toml();
    let fwd = TestServer::start(&toml).await;
    let name = "2.0.0.127.in-addr.arpa.";
    // Consul's answer with the TTL floor of the DNS mode (the service TTL: Consul sends 0); not
    // AA, as every answer this mode passes on from its cache.
    let node = |m: &Message, want: &str| {
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(targets(m), [(want.to_owned(), 5)]);
    };
    node(&udp(fwd.addr, &ptr(name)).await, "foo2.node.dc1.consul.");
    let asked = sim.dns_queries();
    node(&tcp(fwd.addr, &ptr(name)).await, "foo2.node.dc1.consul.");
    assert_eq!(sim.dns_queries(), asked, "the second from the cache");
    let bar = "2.4.2.4.2.4.2.4.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa.";
    node(&udp(fwd.addr, &ptr(bar)).await, "bar.node.dc1.consul.");
    // In the networks but unknown: Consul's NXDOMAIN (an agent without recursors), as with
    // dnsmasq's rev-server.
    let m = udp(fwd.addr, &ptr("99.0.0.127.in-addr.arpa.")).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(m.authorities[0].name.to_ascii(), "consul.");
    assert_eq!(up.queries(), 0);
    // Outside the networks: upstream.
    let m = udp(fwd.addr, &ptr("1.2.0.192.in-addr.arpa.")).await;
    assert_eq!(targets(&m)[0].0, "a.test.");
    assert_eq!(up.queries(), 1);
}

/// `dig -x` against the binary: BIND's client builds the reverse name itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_x_against_the_binary() {
    let sim = consul_test_catalog().await;
    let up = TestUpstream::start().await;
    let url = sim.http_url();
    let upstream = up.addr.to_string();
    let fwd = Forwarder::spawn(&["--consul-http", &url, "--upstream", &upstream]).await;
    for (ip, want) in [
        ("127.0.0.2", "foo2.node.dc1.consul."),
        ("::4242:4242", "bar.node.dc1.consul."),
    ] {
        let out = dig(fwd.port, &["-x", ip]).await;
        assert!(out.contains("status: NOERROR"), "{out}");
        assert_eq!(answers(&out, "PTR"), [want], "{out}");
        assert!(flags(&out).contains("aa"), "{out}");
        assert!(
            section(&out, "ANSWER").iter().all(|r| r[1] == "5"),
            "node_ttl 5: {out}"
        );
        let out = dig(fwd.port, &["+tcp", "-x", ip]).await;
        assert_eq!(answers(&out, "PTR"), [want], "over TCP: {out}");
    }
    let out = dig(fwd.port, &["-x", "2001:db8::1"]).await;
    assert_eq!(answers(&out, "PTR"), ["v6.test."], "forwarded: {out}");
    assert!(!flags(&out).contains("aa"), "{out}");
}
