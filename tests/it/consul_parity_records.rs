//! The records Consul's DNS interface (`agent/dns.go`) puts in its answers, and the size of its
//! answers, against the forwarder over real UDP and TCP, one test per row of the parity table
//! (docs/compat/parity-records.md): SOA and NS for every name, zone transfers, node meta TXT,
//! `.addr` asked with another type, answer size without EDNS, prepared-query order and filters.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::consul_sim::{ConsulSim, SimNode, SimQuery, SimService, Status};
use crate::support::upstream::TestUpstream;
use crate::support::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};

/// The forwarder's default node, service and negative TTLs.
const TTL: u32 = 5;

/// A forwarder on the simulator's HTTP API with `alt.example` as alternative domain and
/// `extra` lines in `[consul]`.
async fn start(sim: &ConsulSim, up: &TestUpstream, extra: &str) -> TestServer {
    let toml = TestConfig::new()
        .upstream(up.addr)
        .upstream_timeout("1s")
        .consul_http(sim.http_url())
        .consul("alt_domains = [\"alt.example\"]")
        .consul(extra)
        .toml();
    TestServer::start(&toml).await
}

/// `n` instances of `service` on nodes `<service>-<i>` at 127.0.<third>.<i>.
fn many(sim: &ConsulSim, service: &str, third: u8, n: u8) {
    for i in 1..=n {
        sim.add_simple(
            service,
            &format!("{service}-{i}"),
            &format!("127.0.{third}.{i}"),
            8080,
        );
    }
}

async fn query(
    addr: std::net::SocketAddr,
    name: &str,
    qtype: RecordType,
    edns: Option<u16>,
) -> Message {
    udp(addr, &make_query(name, qtype, edns)).await
}

async fn query_tcp(addr: std::net::SocketAddr, name: &str, qtype: RecordType) -> Message {
    tcp(addr, &make_query(name, qtype, None)).await
}

fn owners(records: &[Record]) -> Vec<String> {
    records.iter().map(|r| r.name.to_ascii()).collect()
}

fn ttls(records: &[Record]) -> BTreeSet<u32> {
    records.iter().map(|r| r.ttl).collect()
}

fn ns_targets(records: &[Record]) -> BTreeSet<String> {
    records
        .iter()
        .map(|r| match &r.data {
            RData::NS(ns) => ns.0.to_ascii(),
            other => panic!("NS expected: {other:?}"),
        })
        .collect()
}

/// (owner, text) of each TXT record.
fn texts(records: &[Record]) -> Vec<(String, String)> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::TXT(t) => Some((
                r.name.to_ascii(),
                t.txt_data
                    .iter()
                    .map(|d| String::from_utf8_lossy(d).into_owned())
                    .collect(),
            )),
            _ => None,
        })
        .collect()
}

/// `(kind, owner, data)` of every record of a section, for exact comparisons.
fn records(section: &[Record]) -> Vec<(RecordType, String, String)> {
    section
        .iter()
        .map(|r| (r.record_type(), r.name.to_ascii(), r.data.to_string()))
        .collect()
}

fn rcode_aa(m: &Message) -> (ResponseCode, bool) {
    (m.metadata.response_code, m.metadata.authoritative)
}

/// Three healthy servers with names Consul writes in NS records; one whose node is critical
/// and one whose name Consul skips (`_`) are never listed.
fn servers(sim: &ConsulSim) -> BTreeSet<String> {
    for (node, addr) in [
        ("srv-1", "127.0.0.11"),
        ("srv-2", "127.0.0.12"),
        ("srv-3", "127.0.0.13"),
        ("srv-4", "127.0.0.14"),
        ("srv_5", "127.0.0.15"),
    ] {
        sim.add_server(node, addr);
    }
    sim.set_node_check("srv-4", "serfHealth", Status::Critical);
    ["srv-1", "srv-2", "srv-3"]
        .iter()
        .map(|s| format!("{s}.node.dc1.consul."))
        .collect()
}

/// Consul answers SOA and NS for every name in its domain, the nameservers being up to three
/// healthy servers (`<node>.node.<dc>.<domain>`, TTL node_ttl, shuffled) with their addresses
/// as glue; the SOA carries `consul.soa`'s timers and the negative TTL as minimum and TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soa_and_ns_answer_every_name_with_the_consul_servers() {
    let sim = ConsulSim::start().await;
    let listed = servers(&sim);
    sim.add_simple("web", "n1", "127.0.0.2", 8080);
    let up = TestUpstream::start().await;
    let fwd = start(
        &sim,
        &up,
        "soa = { refresh = 60, retry = 30, expire = 120 }",
    )
    .await;

    let mut firsts = BTreeSet::new();
    for name in [
        "consul.",
        "web.service.consul.",
        "foo.consul.",
        "nope.service.consul.",
    ] {
        for _ in 0..5 {
            let r = query(fwd.addr, name, RecordType::NS, None).await;
            assert_eq!(rcode_aa(&r), (ResponseCode::NoError, true), "{name}: {r}");
            assert!(r.metadata.recursion_available && !r.metadata.truncation);
            assert_eq!(owners(&r.answers), ["consul."; 3], "owned by the domain");
            assert_eq!(ns_targets(&r.answers), listed, "{name}");
            assert!(r.authorities.is_empty());
            let glue: BTreeSet<(String, String)> = records(&r.additionals)
                .into_iter()
                .map(|(kind, owner, data)| {
                    assert_eq!(kind, RecordType::A);
                    (owner, data)
                })
                .collect();
            let expected: BTreeSet<(String, String)> = [
                ("srv-1", "127.0.0.11"),
                ("srv-2", "127.0.0.12"),
                ("srv-3", "127.0.0.13"),
            ]
            .iter()
            .map(|(n, a)| (format!("{n}.node.dc1.consul."), a.to_string()))
            .collect();
            assert_eq!(glue, expected);
            assert_eq!(ttls(&r.answers), [TTL].into());
            assert_eq!(ttls(&r.additionals), [TTL].into());
            firsts.insert(r.answers[0].data.to_string());
        }
    }
    assert!(firsts.len() > 1, "shuffled, as Consul: {firsts:?}");

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    for name in [
        "consul.",
        "foo.consul.",
        "nope.service.consul.",
        "n1.node.consul.",
    ] {
        let udp_reply = query(fwd.addr, name, RecordType::SOA, None).await;
        let tcp_reply = query_tcp(fwd.addr, name, RecordType::SOA).await;
        for r in [udp_reply, tcp_reply] {
            assert_eq!(rcode_aa(&r), (ResponseCode::NoError, true), "{name}: {r}");
            assert_eq!(owners(&r.answers), ["consul."]);
            assert_eq!(r.answers[0].ttl, TTL, "the SOA's TTL is its minimum");
            let RData::SOA(soa) = &r.answers[0].data else {
                panic!("SOA expected: {r}")
            };
            assert_eq!(soa.mname.to_ascii(), "ns.consul.");
            assert_eq!(soa.rname.to_ascii(), "hostmaster.consul.");
            assert!(u64::from(soa.serial).abs_diff(now) <= 5, "serial = now");
            assert_eq!(
                (soa.refresh, soa.retry, soa.expire, soa.minimum),
                (60, 30, 120, TTL),
                "consul.soa"
            );
            assert_eq!(
                ns_targets(&r.authorities),
                listed,
                "the nameservers in authority"
            );
            assert_eq!(r.additionals.len(), 3, "with their glue");
        }
    }

    // The alternative domain answers for itself.
    let r = query(fwd.addr, "web.service.alt.example.", RecordType::SOA, None).await;
    assert_eq!(owners(&r.answers), ["alt.example."]);
    let r = query(fwd.addr, "alt.example.", RecordType::NS, None).await;
    let alt: BTreeSet<String> = listed
        .iter()
        .map(|n| n.replace(".consul.", ".alt.example."))
        .collect();
    assert_eq!(ns_targets(&r.answers), alt);

    // Another type at the apex: NODATA (Consul's NXDOMAIN would deny the whole domain to a
    // resolver that follows RFC 8020).
    let r = query(fwd.addr, "consul.", RecordType::A, None).await;
    assert_eq!(rcode_aa(&r), (ResponseCode::NoError, true));
    assert!(r.answers.is_empty());
    assert_eq!(records(&r.authorities)[0].0, RecordType::SOA);
    assert_eq!(up.queries(), 0, "Consul names never go upstream");
    fwd.stop().await;
}

/// Consul answers AXFR with NOTIMP (AA set, nothing else); IXFR too here. In the DNS mode as
/// well, without asking the agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_transfers_are_not_implemented() {
    let sim = ConsulSim::start().await;
    sim.add_simple("web", "n1", "127.0.0.2", 8080);
    let up = TestUpstream::start().await;
    let http = start(&sim, &up, "").await;
    let dns_mode = TestServer::start(
        &TestConfig::new()
            .upstream(up.addr)
            .consul(&format!("mode = \"dns\"\ndns = [\"{}\"]", sim.dns_addr()))
            .toml(),
    )
    .await;

    let asked_before = sim.dns_queries();
    for fwd in [&http, &dns_mode] {
        for name in ["consul.", "web.service.consul."] {
            for r in [
                query_tcp(fwd.addr, name, RecordType::AXFR).await,
                query_tcp(fwd.addr, name, RecordType::IXFR).await,
                query(fwd.addr, name, RecordType::IXFR, None).await,
            ] {
                assert_eq!(rcode_aa(&r), (ResponseCode::NotImp, true), "{name}: {r}");
                assert_eq!(r.queries[0].name().to_ascii(), name, "question echoed");
                assert!(
                    r.answers.is_empty() && r.authorities.is_empty() && r.additionals.is_empty()
                );
            }
        }
    }
    assert_eq!(sim.dns_queries(), asked_before, "the agents are not asked");
    http.stop().await;
    dns_mode.stop().await;
}

/// Node meta as TXT, as Consul writes it: `rfc1035-` keys (in any case) give the bare value;
/// TXT answers it; A and AAAA carry it in additional, SRV for each node
/// (`<node>.node.<dc>.<domain>`, whatever the target) with
/// `enable_additional_node_meta_txt` (on by default); ANY has it in the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_meta_txt_like_consul() {
    let sim = ConsulSim::start().await;
    sim.add_node(SimNode {
        name: "n1".into(),
        address: "127.0.0.2".into(),
        meta: [("RFC1035-spf", "v=spf1 -all"), ("rack", "r1")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    });
    for (id, service, address) in [("web-1", "web", ""), ("own-1", "own", "127.0.0.9")] {
        sim.add_service(
            SimService {
                id: id.into(),
                service: service.into(),
                node: "n1".into(),
                address: address.into(),
                port: 8080,
                tags: Vec::new(),
                weights: (1, 1),
                meta: BTreeMap::new(),
                ..Default::default()
            },
            Status::Passing,
        );
    }
    let up = TestUpstream::start().await;
    let fwd = start(&sim, &up, "").await;
    let meta_of = |owner: &str| -> Vec<(String, String)> {
        vec![
            (owner.to_string(), "v=spf1 -all".to_string()),
            (owner.to_string(), "rack=r1".to_string()),
        ]
    };

    let r = query(fwd.addr, "n1.node.consul.", RecordType::TXT, None).await;
    assert_eq!(rcode_aa(&r), (ResponseCode::NoError, true));
    assert_eq!(texts(&r.answers), meta_of("n1.node.consul."));
    assert_eq!(ttls(&r.answers), [TTL].into());
    assert!(r.additionals.is_empty());

    let r = query(fwd.addr, "n1.node.consul.", RecordType::A, None).await;
    assert_eq!(addresses(&r), ["127.0.0.2"]);
    assert_eq!(texts(&r.additionals), meta_of("n1.node.consul."));

    let r = query(fwd.addr, "n1.node.consul.", RecordType::ANY, None).await;
    assert_eq!(addresses(&r), ["127.0.0.2"]);
    assert_eq!(
        texts(&r.answers),
        meta_of("n1.node.consul."),
        "ANY: in the answer"
    );
    assert!(r.additionals.is_empty(), "ANY: nothing in additional");

    let r = query(fwd.addr, "web.service.consul.", RecordType::SRV, None).await;
    assert_eq!(
        records(&r.answers),
        [(
            RecordType::SRV,
            "web.service.consul.".into(),
            "1 1 8080 n1.node.dc1.consul.".into()
        )]
    );
    assert_eq!(
        records(&r.additionals),
        [
            (
                RecordType::A,
                "n1.node.dc1.consul.".into(),
                "127.0.0.2".into()
            ),
            (
                RecordType::TXT,
                "n1.node.dc1.consul.".into(),
                "v=spf1 -all".into()
            ),
            (
                RecordType::TXT,
                "n1.node.dc1.consul.".into(),
                "rack=r1".into()
            ),
        ]
    );
    assert_eq!(ttls(&r.additionals), [TTL].into(), "the service TTL");
    let r = query(fwd.addr, "own.service.consul.", RecordType::SRV, None).await;
    assert_eq!(
        owners(&r.additionals),
        [
            "7f000009.addr.dc1.consul.",
            "n1.node.dc1.consul.",
            "n1.node.dc1.consul."
        ],
        "an .addr target, the meta under the node's name"
    );
    fwd.stop().await;

    let quiet = start(&sim, &up, "enable_additional_node_meta_txt = false").await;
    let r = query(quiet.addr, "n1.node.consul.", RecordType::A, None).await;
    assert_eq!((addresses(&r).len(), r.additionals.len()), (1, 0));
    let r = query(quiet.addr, "web.service.consul.", RecordType::SRV, None).await;
    assert_eq!(
        records(&r.additionals),
        [(
            RecordType::A,
            "n1.node.dc1.consul.".into(),
            "127.0.0.2".into()
        )]
    );
    let r = query(quiet.addr, "n1.node.consul.", RecordType::TXT, None).await;
    assert_eq!(
        texts(&r.answers),
        meta_of("n1.node.consul."),
        "asked for, still answered"
    );
    let r = query(quiet.addr, "n1.node.consul.", RecordType::ANY, None).await;
    assert_eq!(texts(&r.answers).len(), 2);
    quiet.stop().await;
}

/// `<hex>.addr` asked with another type than its address's: NOERROR, nothing in answer or
/// authority, the address in additional (TTL node_ttl), as Consul answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addr_asked_another_type_answers_in_additional() {
    let sim = ConsulSim::start().await;
    let up = TestUpstream::start().await;
    let fwd = start(&sim, &up, "").await;
    let v6 = "20010db8000000000000000000000001.addr.consul.";
    for (name, qtype, record) in [
        (
            "7f000001.addr.consul.",
            RecordType::TXT,
            (RecordType::A, "127.0.0.1"),
        ),
        (
            "7f000001.addr.dc1.consul.",
            RecordType::AAAA,
            (RecordType::A, "127.0.0.1"),
        ),
        (
            "7f000001.addr.consul.",
            RecordType::SRV,
            (RecordType::A, "127.0.0.1"),
        ),
        (v6, RecordType::A, (RecordType::AAAA, "2001:db8::1")),
    ] {
        for r in [
            query(fwd.addr, name, qtype, None).await,
            query_tcp(fwd.addr, name, qtype).await,
        ] {
            assert_eq!(
                rcode_aa(&r),
                (ResponseCode::NoError, true),
                "{name} {qtype}: {r}"
            );
            assert!(r.answers.is_empty() && r.authorities.is_empty(), "{r}");
            assert_eq!(
                records(&r.additionals),
                [(record.0, name.to_string(), record.1.to_string())]
            );
            assert_eq!(r.additionals[0].ttl, TTL);
        }
    }
    let r = query(fwd.addr, v6, RecordType::AAAA, None).await;
    assert_eq!(
        (addresses(&r), r.additionals.len()),
        (vec!["2001:db8::1".to_string()], 0)
    );
    let r = query(fwd.addr, "7f000001.addr.consul.", RecordType::ANY, None).await;
    assert_eq!(addresses(&r), ["127.0.0.1"]);
    fwd.stop().await;
}

/// Replies to clients limited to 512 bytes (UDP without EDNS, or EDNS ≤ 512): by default as
/// many records as fit with TC=1 when some are left out; `udp_answer_limit` cuts to that many
/// random records (Consul's default 3), `enable_truncate = false` leaves TC clear (Consul's
/// default). EDNS above 512 and TCP are not limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_size_without_edns_follows_udp_answer_limit_and_enable_truncate() {
    let sim = ConsulSim::start().await;
    many(&sim, "twenty", 1, 20);
    many(&sim, "big", 2, 40);
    let up = TestUpstream::start().await;
    // 12 header + 24 question + 16 per A record: 29 fit in 512 bytes.
    const FIT: usize = 29;

    let ours = start(&sim, &up, "").await;
    let r = query(ours.addr, "big.service.consul.", RecordType::A, None).await;
    assert_eq!((addresses(&r).len(), r.metadata.truncation), (FIT, true));
    let r = query(ours.addr, "twenty.service.consul.", RecordType::A, None).await;
    assert_eq!((addresses(&r).len(), r.metadata.truncation), (20, false));
    ours.stop().await;

    let consul = start(&sim, &up, "udp_answer_limit = 3\nenable_truncate = false").await;
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        let r = query(consul.addr, "twenty.service.consul.", RecordType::A, None).await;
        assert_eq!(rcode_aa(&r), (ResponseCode::NoError, true));
        assert_eq!((r.answers.len(), r.metadata.truncation), (3, false), "{r}");
        seen.extend(addresses(&r));
    }
    assert!(
        seen.len() >= 10,
        "a random 3 each time: {} seen",
        seen.len()
    );
    let r = query(
        consul.addr,
        "twenty.service.consul.",
        RecordType::A,
        Some(512),
    )
    .await;
    assert_eq!(r.answers.len(), 3, "EDNS of 512 bytes is no more room");
    let r = query(
        consul.addr,
        "twenty.service.consul.",
        RecordType::A,
        Some(1232),
    )
    .await;
    assert_eq!((r.answers.len(), r.metadata.truncation), (20, false));
    let r = query_tcp(consul.addr, "twenty.service.consul.", RecordType::A).await;
    assert_eq!(r.answers.len(), 20);
    let r = query(consul.addr, "big.service.consul.", RecordType::A, None).await;
    assert_eq!((r.answers.len(), r.metadata.truncation), (3, false));
    // SRV: three records and only their targets' addresses.
    let r = query(consul.addr, "twenty.service.consul.", RecordType::SRV, None).await;
    assert_eq!(r.answers.len(), 3);
    let targets: BTreeSet<String> = r
        .answers
        .iter()
        .map(|a| match &a.data {
            RData::SRV(s) => s.target.to_ascii(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        owners(&r.additionals).into_iter().collect::<BTreeSet<_>>(),
        targets
    );
    consul.stop().await;

    let flagged = start(&sim, &up, "udp_answer_limit = 3").await;
    let r = query(flagged.addr, "twenty.service.consul.", RecordType::A, None).await;
    assert_eq!(
        (r.answers.len(), r.metadata.truncation),
        (3, true),
        "TC: TCP has more"
    );
    flagged.stop().await;

    let silent = start(&sim, &up, "enable_truncate = false").await;
    let r = query(silent.addr, "big.service.consul.", RecordType::A, None).await;
    assert_eq!(
        (r.answers.len(), r.metadata.truncation),
        (FIT, false),
        "cut silently"
    );
    silent.stop().await;
}

/// A prepared query's result as Consul gave it: the query's own filters (`IgnoreCheckIDs`,
/// `OnlyPassing`) and not the local `only_passing`; the order Consul sorted by round-trip time
/// (`Near`) kept, the first ones kept when cut; without `Near`, shuffled for every answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_queries_keep_consuls_filters_and_near_order() {
    let sim = ConsulSim::start().await;
    // web-i on node ni at 127.0.3.i; round-trip times from the agent, n3 without one.
    let ms = |m| Some(Duration::from_millis(m));
    sim.add_at_rtts(
        "web",
        "127.0.3",
        8080,
        &[ms(30), ms(10), None, ms(20), ms(5)],
    );
    sim.set_service_check("web-5", Status::Critical);
    sim.set_service_check("web-4", Status::Warning);
    let q = |name: &str, near: &str| SimQuery {
        name: name.into(),
        service: "web".into(),
        dns_ttl: Some("10s".into()),
        ignore_check_ids: vec!["service:web-5".into()],
        near: near.into(),
        ..SimQuery::default()
    };
    sim.add_query(q("near", "_agent"));
    sim.add_query(q("plain", ""));
    sim.add_query(SimQuery {
        only_passing: true,
        ..q("passing", "")
    });
    let up = TestUpstream::start().await;
    // The local rule would drop web-4 (warning) and web-5 (critical): it does not apply.
    let fwd = start(&sim, &up, "only_passing = true").await;

    let rtt_order = [
        "127.0.3.5",
        "127.0.3.2",
        "127.0.3.4",
        "127.0.3.1",
        "127.0.3.3",
    ];
    for _ in 0..10 {
        let r = query(fwd.addr, "near.query.consul.", RecordType::A, None).await;
        assert_eq!(rcode_aa(&r), (ResponseCode::NoError, true));
        assert_eq!(addresses(&r), rtt_order, "Consul's order, every time");
        assert_eq!(ttls(&r.answers), [10].into(), "the query's DNS.TTL");
    }
    let r = query(fwd.addr, "near.query.consul.", RecordType::SRV, None).await;
    let srv: Vec<(u16, String)> = r
        .answers
        .iter()
        .map(|a| match &a.data {
            RData::SRV(s) => (s.weight, s.target.to_ascii()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        srv,
        [
            (0, "n5.node.dc1.consul.".to_string()),
            (1, "n2.node.dc1.consul.".to_string()),
            (1, "n4.node.dc1.consul.".to_string()),
            (1, "n1.node.dc1.consul.".to_string()),
            (1, "n3.node.dc1.consul.".to_string()),
        ],
        "in order; the ignored critical check weighs 0, as Consul's findWeight"
    );

    let mut orders = BTreeSet::new();
    for _ in 0..20 {
        let r = query(fwd.addr, "plain.query.consul.", RecordType::A, None).await;
        let got = addresses(&r);
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            [
                "127.0.3.1",
                "127.0.3.2",
                "127.0.3.3",
                "127.0.3.4",
                "127.0.3.5"
            ]
        );
        orders.insert(got);
    }
    assert!(orders.len() > 1, "without Near: shuffled for every answer");
    let r = query(fwd.addr, "passing.query.consul.", RecordType::A, None).await;
    let mut got = addresses(&r);
    got.sort();
    assert_eq!(
        got,
        ["127.0.3.1", "127.0.3.2", "127.0.3.3", "127.0.3.5"],
        "OnlyPassing"
    );
    fwd.stop().await;

    // Cut to two: the two nearest.
    let cut = start(&sim, &up, "udp_answer_limit = 2").await;
    let r = query(cut.addr, "near.query.consul.", RecordType::A, None).await;
    assert_eq!(addresses(&r), rtt_order[..2]);
    assert!(r.metadata.truncation);
    cut.stop().await;
    let limited = start(&sim, &up, "a_record_limit = 3").await;
    let r = query(
        limited.addr,
        "near.query.consul.",
        RecordType::A,
        Some(1232),
    )
    .await;
    assert_eq!(addresses(&r), rtt_order[..3]);
    limited.stop().await;
}
