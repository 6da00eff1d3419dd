//! The forwarder over real sockets: forwarding, rcodes, caching, serve-stale, failover,
//! truncation, protocol hygiene and access control.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::upstream::TestUpstream;
use crate::support::*;
use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::{RData, RecordType};

/// Forwarding to `upstreams` in order, with a 1 s timeout, no Consul.
fn config_for(upstreams: &[&TestUpstream]) -> TestConfig {
    let mut config = TestConfig::new();
    for up in upstreams {
        config = config.upstream(up.addr);
    }
    config.upstream_timeout("1s").consul_off()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_and_keeps_rcodes_and_soa() {
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&config_for(&[&up]).toml()).await;

    let r = ask(fwd.addr, "a.test.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&r), vec!["192.0.2.1"]);
    assert!(r.metadata.recursion_available, "RA=1 on every response");
    assert!(
        !r.metadata.authoritative,
        "forwarded answers are not ours to claim"
    );

    let r = ask(fwd.addr, "missing.test.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert!(
        matches!(r.authorities.first().map(|r| &r.data), Some(RData::SOA(_))),
        "SOA in authority: {r}"
    );

    let r = ask(fwd.addr, "a.test.", RecordType::AAAA).await;
    assert_eq!(
        r.metadata.response_code,
        ResponseCode::NoError,
        "NODATA is NOERROR"
    );
    assert!(r.answers.is_empty());
    assert!(
        matches!(r.authorities.first().map(|r| &r.data), Some(RData::SOA(_))),
        "SOA in authority: {r}"
    );

    let r = ask(fwd.addr, "www.test.", RecordType::A).await;
    assert!(
        matches!(r.answers[0].data, RData::CNAME(_)),
        "CNAME first: {r}"
    );
    assert_eq!(addresses(&r), vec!["192.0.2.1"]);

    let r = ask(fwd.addr, "servfail.test.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_positive_and_negative_answers_with_ttl_countdown() {
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&config_for(&[&up]).toml()).await;
    let first = ask(fwd.addr, "a.test.", RecordType::A).await;
    assert_eq!(first.answers[0].ttl, 300);
    let n1 = ask(fwd.addr, "missing.test.", RecordType::A).await;
    assert_eq!(n1.authorities[0].ttl, 60, "negative TTL = SOA minimum");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = ask(fwd.addr, "A.TEST.", RecordType::A).await;
    assert!(
        second.answers[0].ttl < 300 && second.answers[0].ttl >= 298,
        "TTL counts down: {}",
        second.answers[0].ttl
    );
    let n2 = ask(fwd.addr, "missing.test.", RecordType::A).await;
    assert_eq!(n2.metadata.response_code, ResponseCode::NXDomain);
    assert!(n2.authorities[0].ttl < 60);
    assert_eq!(
        up.queries_for("a.test.", RecordType::A),
        1,
        "second answer came from the cache"
    );
    assert_eq!(
        up.queries_for("missing.test.", RecordType::A),
        1,
        "NXDOMAIN cached"
    );
    assert_eq!(
        fwd.metric("consul_dns_forwarder_cache_hits_total", &[]),
        2.0
    );
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_misses_make_one_upstream_query() {
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&config_for(&[&up]).toml()).await;
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let addr = fwd.addr;
        tasks.push(tokio::spawn(async move {
            ask(addr, "slow-300.test.", RecordType::A).await
        }));
    }
    for t in tasks {
        let r = t.await.expect("join");
        assert_eq!(addresses(&r), vec!["192.0.2.9"]);
    }
    assert_eq!(up.queries_for("slow-300.test.", RecordType::A), 1);
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_stale_when_upstream_stops_answering() {
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&config_for(&[&up]).cache("stale_for = \"1h\"").toml()).await;
    let r = ask(fwd.addr, "short.test.", RecordType::A).await;
    assert_eq!(r.answers[0].ttl, 2);
    up.set_blackhole(true);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let started = Instant::now();
    let r = ask(fwd.addr, "short.test.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&r), vec!["192.0.2.3"]);
    assert_eq!(
        r.answers[0].ttl, 30,
        "stale answers carry TTL 30 (RFC 8767)"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "within the upstream timeout"
    );
    assert_eq!(
        fwd.metric("consul_dns_forwarder_stale_answers_total", &[]),
        1.0
    );

    // A name never seen: SERVFAIL within the timeout, not a hang.
    let started = Instant::now();
    let r = ask(fwd.addr, "txt.test.", RecordType::TXT).await;
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_to_the_next_upstream() {
    let dead = TestUpstream::start_labeled("first").await;
    let live = TestUpstream::start_labeled("second").await;
    dead.set_blackhole(true);
    let fwd = TestServer::start(&config_for(&[&dead, &live]).toml()).await;
    let started = Instant::now();
    let r = ask(fwd.addr, "who.test.", RecordType::TXT).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers[0].data.to_string().contains("second"), "{r}");
    assert!(started.elapsed() < Duration::from_millis(1200));
    assert_eq!(dead.queries(), 1);
    // The working server is preferred from now on: no second timeout.
    let started = Instant::now();
    let r = ask(fwd.addr, "a.test.", RecordType::A).await;
    assert_eq!(addresses(&r), vec!["192.0.2.1"]);
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_zones_go_to_their_own_servers() {
    let default = TestUpstream::start_labeled("default").await;
    let corp = TestUpstream::start_labeled("corp").await;
    let config = config_for(&[&default]).forward_zone("corp.test", &[corp.addr]);
    let fwd = TestServer::start(&config.toml()).await;
    let r = ask(fwd.addr, "x.corp.test.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(corp.queries_for("x.corp.test.", RecordType::A), 1);
    assert_eq!(default.queries(), 0);
    let r = ask(fwd.addr, "a.test.", RecordType::A).await;
    assert_eq!(addresses(&r), vec!["192.0.2.1"]);
    assert_eq!(default.queries(), 1);
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_truncate_over_udp_and_arrive_whole_over_tcp() {
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&config_for(&[&up]).toml()).await;
    for (edns, limit) in [(None, 512usize), (Some(1232u16), 1232), (Some(4096), 1232)] {
        let r = udp_within(fwd.addr, "big.test.", RecordType::A, edns, limit).await;
        assert!(r.metadata.truncation, "TC=1, never silent");
        assert_eq!(r.edns.is_some(), edns.is_some(), "OPT kept when truncating");
    }
    let r = tcp(fwd.addr, &make_query("big.test.", RecordType::A, None)).await;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 100);
    assert!(up.tcp_queries() >= 1, "we fell back to TCP upstream");
    assert!(
        fwd.metric(
            "consul_dns_forwarder_truncated_responses_total",
            &[("protocol", "udp")]
        ) >= 3.0
    );
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_hygiene() {
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&config_for(&[&up]).toml()).await;

    // Question echoed with its case; AD clear when asked (this upstream does not validate);
    // CD echoed.
    let mut q = make_query("A.TeSt.", RecordType::A, None);
    q.metadata.authentic_data = true;
    q.metadata.checking_disabled = true;
    let bytes = raw_udp(fwd.addr, &q.to_vec().expect("enc"), REPLY_TIMEOUT)
        .await
        .expect("reply");
    let r = Message::from_vec(&bytes).expect("parse");
    assert_eq!(r.queries[0].name().to_ascii(), "A.TeSt.");
    assert!(!r.metadata.authentic_data);
    assert!(r.metadata.checking_disabled);
    assert!(r.edns.is_none(), "no OPT without one in the query");
    // nginx's check on the flags: Z bit clear.
    assert_eq!(bytes[3] & 0x40, 0);

    // EDNS: OPT echoed; version 1 gets BADVERS.
    let r = udp(fwd.addr, &make_query("a.test.", RecordType::A, Some(1232))).await;
    assert!(r.edns.is_some());
    let mut q = make_query("a.test.", RecordType::A, Some(1232));
    if let Some(e) = q.edns.as_mut() {
        e.set_version(1);
    }
    let r = udp(fwd.addr, &q).await;
    // 16 is BADVERS with an OPT (hickory names the number BADSIG when decoding).
    assert_eq!(u16::from(r.metadata.response_code), 16);
    assert!(r.edns.as_ref().is_some_and(|e| e.version() == 0));

    // Opcode other than QUERY: NOTIMP.
    let mut q = make_query("a.test.", RecordType::A, None);
    q.metadata.op_code = OpCode::Notify;
    let r = udp(fwd.addr, &q).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NotImp);

    // QDCOUNT 0 and 2: FORMERR.
    let mut q = make_query("a.test.", RecordType::A, None);
    q.queries.clear();
    assert_eq!(
        udp(fwd.addr, &q).await.metadata.response_code,
        ResponseCode::FormErr
    );
    let mut q = make_query("a.test.", RecordType::A, None);
    q.add_query(hickory_proto::op::Query::query(
        name("two.test."),
        RecordType::A,
    ));
    assert_eq!(
        udp(fwd.addr, &q).await.metadata.response_code,
        ResponseCode::FormErr
    );

    // A header followed by garbage: FORMERR with the same ID.
    let garbage = [
        0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff,
    ];
    let bytes = raw_udp(fwd.addr, &garbage, REPLY_TIMEOUT)
        .await
        .expect("reply");
    let r = Message::from_vec(&bytes).expect("parse");
    assert_eq!(r.metadata.id, 0xabcd);
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);

    // Shorter than a header: dropped and counted, no reply.
    assert!(raw_udp(fwd.addr, &[1, 2, 3], Duration::from_millis(300))
        .await
        .is_none());
    assert_eq!(
        fwd.metric(
            "consul_dns_forwarder_dropped_packets_total",
            &[("reason", "short")]
        ),
        1.0
    );

    // ANY for a forwarded name: RFC 8482 minimal answer, upstream never asked.
    let r = ask(fwd.addr, "a.test.", RecordType::ANY).await;
    assert_eq!(r.answers.len(), 1);
    assert!(matches!(r.answers[0].data, RData::HINFO(_)));
    assert_eq!(up.queries_for("a.test.", RecordType::ANY), 0);

    // The server still answers after all that.
    assert_eq!(
        addresses(&ask(fwd.addr, "a.test.", RecordType::A).await),
        vec!["192.0.2.1"]
    );
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_outside_allow_are_refused_on_udp_and_tcp() {
    let up = TestUpstream::start().await;
    let fwd =
        TestServer::start(&config_for(&[&up]).server("allow = [\"10.0.0.0/8\"]").toml()).await;
    let r = ask(fwd.addr, "a.test.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    assert!(r.answers.is_empty());
    let r = tcp(fwd.addr, &make_query("a.test.", RecordType::A, None)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    assert_eq!(up.queries(), 0, "nothing forwarded for a refused client");
    assert_eq!(
        fwd.metric(
            "consul_dns_forwarder_refused_clients_total",
            &[("protocol", "udp")]
        ),
        1.0
    );
    assert_eq!(
        fwd.metric(
            "consul_dns_forwarder_refused_clients_total",
            &[("protocol", "tcp")]
        ),
        1.0
    );
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_answers_pipelined_queries_concurrently_and_closes_idle_connections() {
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(
        &config_for(&[&up])
            .server("tcp_idle_timeout = \"500ms\"")
            .toml(),
    )
    .await;
    let mut stream = tokio::net::TcpStream::connect(fwd.addr)
        .await
        .expect("connect");
    use tokio::io::AsyncWriteExt;
    let slow = make_query("slow-600.test.", RecordType::A, None);
    let fast = make_query("a.test.", RecordType::A, None);
    for q in [&slow, &fast] {
        let b = q.to_vec().expect("enc");
        stream
            .write_all(&(b.len() as u16).to_be_bytes())
            .await
            .expect("w");
        stream.write_all(&b).await.expect("w");
    }
    let first = Message::from_vec(&tcp_read(&mut stream).await.expect("reply")).expect("parse");
    let second = Message::from_vec(&tcp_read(&mut stream).await.expect("reply")).expect("parse");
    assert_eq!(
        first.metadata.id, fast.metadata.id,
        "the fast answer is not held behind the slow one"
    );
    assert_eq!(second.metadata.id, slow.metadata.id);
    // Idle: the server closes the connection.
    let started = Instant::now();
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "EOF");
    assert!(started.elapsed() < Duration::from_secs(2));
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_queries_in_flight() {
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&config_for(&[&up]).toml()).await;
    let addr = fwd.addr;
    let pending = tokio::spawn(async move { ask(addr, "slow-400.test.", RecordType::A).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    fwd.stop().await;
    let r = pending.await.expect("join");
    assert_eq!(
        addresses(&r),
        vec!["192.0.2.9"],
        "the query in flight was answered"
    );
    assert!(
        raw_udp(
            addr,
            &make_query("a.test.", RecordType::A, None)
                .to_vec()
                .expect("enc"),
            Duration::from_millis(300)
        )
        .await
        .is_none(),
        "nothing served after stop"
    );
}

/// Cache hits are answered from cached wire bytes on an inline path (`Handler::handle_cached`);
/// misses go through the general path (hickory `Message` in and out). A client must not be able
/// to tell them apart: the hit must carry the same header flags, its own question case, the same
/// records (TTLs counted down), and OPT exactly when asked, over UDP and TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_answer_exactly_like_misses() {
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&config_for(&[&up]).toml()).await;
    let cases: [(&str, RecordType, Option<u16>, bool, bool); 7] = [
        ("a.test.", RecordType::A, None, true, false),
        ("A.TeSt.", RecordType::A, Some(1232), false, true),
        ("two.test.", RecordType::A, Some(4096), true, false),
        ("V6.test.", RecordType::AAAA, None, true, true),
        ("www.test.", RecordType::A, Some(1232), true, false),
        ("TXT.test.", RecordType::TXT, None, false, false),
        ("Nowhere.test.", RecordType::A, Some(1232), true, true),
    ];
    let normalize = |mut m: Message| {
        for r in m
            .answers
            .iter_mut()
            .chain(m.authorities.iter_mut())
            .chain(m.additionals.iter_mut())
        {
            r.ttl = 0;
        }
        m.answers.sort_by_key(|r| r.data.to_string());
        m
    };
    for over_tcp in [false, true] {
        let queries: Vec<Message> = cases
            .iter()
            .enumerate()
            .map(|(i, (qname, qtype, edns, rd, cd))| {
                let mut q = make_query(qname, *qtype, *edns);
                q.metadata.id = 1000 + i as u16;
                q.metadata.recursion_desired = *rd;
                q.metadata.checking_disabled = *cd;
                q
            })
            .collect();
        let send = |q: &Message| {
            let bytes = q.to_vec().expect("encode");
            async move {
                let reply = if over_tcp {
                    raw_tcp(fwd.addr, &bytes).await
                } else {
                    raw_udp(fwd.addr, &bytes, REPLY_TIMEOUT).await
                };
                Message::from_vec(&reply.expect("a reply")).expect("parses")
            }
        };
        // First asks (over UDP: misses, but for a name asked before in another case), then,
        // a second later so TTLs have counted down, hits for sure.
        let mut firsts = Vec::new();
        for q in &queries {
            firsts.push(send(q).await);
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        for ((q, first), (qname, qtype, edns, rd, cd)) in queries.iter().zip(firsts).zip(cases) {
            let hit = send(q).await;
            assert_eq!(hit.metadata.id, q.metadata.id);
            assert_eq!(hit.queries[0].name().to_ascii(), qname, "case kept");
            assert_eq!(hit.metadata.recursion_desired, rd);
            assert_eq!(hit.metadata.checking_disabled, cd);
            assert!(hit.metadata.recursion_available && !hit.metadata.authentic_data);
            assert_eq!(hit.edns.is_some(), edns.is_some(), "OPT only when asked");
            if let Some(opt) = &hit.edns {
                assert_eq!(opt.max_payload(), 1232);
            }
            let ttl = |m: &Message| {
                m.answers
                    .iter()
                    .chain(m.authorities.iter())
                    .map(|r| r.ttl)
                    .max()
                    .unwrap_or(0)
            };
            assert!(ttl(&hit) < ttl(&first), "{qname}: TTL counts down on hits");
            assert_eq!(
                normalize(hit),
                normalize(first),
                "{qname} {qtype} over {}",
                if over_tcp { "tcp" } else { "udp" }
            );
        }
    }
    // Every one of them reached the upstream once per CD bit it was asked with (a CD answer is
    // cached apart: a validating upstream gives CD clients data it withholds from others): the
    // rest were hits.
    let distinct: std::collections::HashSet<(String, RecordType, bool)> = cases
        .iter()
        .map(|(qname, qtype, .., cd)| (qname.to_lowercase(), *qtype, *cd))
        .collect();
    for (qname, qtype, ..) in cases {
        let lower = qname.to_lowercase();
        let variants = distinct
            .iter()
            .filter(|(n, t, _)| *n == lower && *t == qtype)
            .count();
        assert_eq!(up.queries_for(&lower, qtype), variants, "{qname}");
    }
    let hits = fwd.metric("consul_dns_forwarder_cache_hits_total", &[]);
    assert_eq!(
        hits,
        (4 * cases.len() - distinct.len()) as f64,
        "every ask after a name's first is a hit, counted on the inline path too"
    );
    fwd.stop().await;
}

/// A miss of a plain query is answered from bytes (the upstream's answer stored as it came when
/// it is a plain one, the reply written from the entry); with query logging on, every query
/// goes the general way (parsed, encoded). Both give the same replies: addresses in any case,
/// a CNAME chain, NXDOMAIN with its SOA, NODATA, SERVFAIL, an answer truncated over UDP
/// upstream (fetched again over TCP) and cut for the client, and DO echoed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_in_bytes_answer_exactly_like_the_general_way() {
    let up = TestUpstream::start().await;
    let fast = TestServer::start(&config_for(&[&up]).toml()).await;
    let general = TestServer::start(&config_for(&[&up]).log("queries = true").toml()).await;
    let cases: [(&str, RecordType, Option<u16>, bool); 9] = [
        ("a.test.", RecordType::A, None, false),
        ("TwO.test.", RecordType::A, Some(1232), false),
        ("v6.TEST.", RecordType::AAAA, Some(1232), true),
        ("www.test.", RecordType::A, Some(1232), false),
        ("nowhere.test.", RecordType::A, None, false),
        ("a.test.", RecordType::TXT, Some(1232), false),
        ("servfail.test.", RecordType::A, Some(1232), false),
        ("big.test.", RecordType::A, Some(1232), false),
        ("big.test.", RecordType::A, None, false),
    ];
    for (i, (qname, qtype, edns, dnssec_ok)) in cases.into_iter().enumerate() {
        let mut q = make_query(qname, qtype, edns);
        q.metadata.id = 2000 + i as u16;
        if let Some(opt) = q.edns.as_mut() {
            opt.set_dnssec_ok(dnssec_ok);
        }
        let bytes = q.to_vec().expect("encode");
        let mut replies = Vec::new();
        for server in [&fast, &general] {
            let reply = raw_udp(server.addr, &bytes, REPLY_TIMEOUT).await;
            replies.push(Message::from_vec(&reply.expect("a reply")).expect("parses"));
        }
        let [from_bytes, parsed] = <[Message; 2]>::try_from(replies).expect("two");
        assert_eq!(
            from_bytes, parsed,
            "{qname} {qtype} edns {edns:?} DO {dnssec_ok}"
        );
        assert_eq!(from_bytes.queries[0].name().to_ascii(), qname, "case kept");
        assert_eq!(
            from_bytes.edns.as_ref().map(|e| e.flags().dnssec_ok),
            q.edns.as_ref().map(|_| dnssec_ok),
            "DO echoed"
        );
    }
    let misses = fast.metric("consul_dns_forwarder_cache_misses_total", &[]);
    assert_eq!(
        misses, 8.0,
        "every name asked once is a miss, big.test the second time a hit"
    );
    fast.stop().await;
    general.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Spoofing visibility: forged upstream replies are ignored and counted; DNS 0x20.

const UNMATCHED: &str = "consul_dns_forwarder_upstream_unmatched_replies_total";
const CASE_FALLBACKS: &str = "consul_dns_forwarder_upstream_case_fallbacks_total";

/// A forwarder to `up` whose /metrics is served over HTTP, with `extra` lines in `[upstream]`.
async fn with_metrics(up: &TestUpstream, extra: &str) -> TestServer {
    let config = TestConfig::new()
        .upstream(up.addr)
        .upstream_timeout("1s")
        .upstream_lines(extra)
        .consul_off()
        .metrics_listen("127.0.0.1:0");
    TestServer::start(&config.toml()).await
}

/// `name`'s samples on the forwarder's /metrics, as a scraper gets them.
async fn scraped(fwd: &TestServer, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (status, body) = http_get(fwd.metrics_addr.expect("metrics on"), "/metrics").await;
    assert_eq!(status, 200);
    metric_in(&body, name, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_upstream_replies_are_ignored_and_counted() {
    let up = TestUpstream::start().await;
    up.set_spoof_first(true);
    for randomize in [false, true] {
        let fwd = with_metrics(&up, &format!("randomize_case = {randomize}")).await;
        assert_eq!(scraped(&fwd, UNMATCHED, &[]).await, 0.0, "exported at 0");
        for (i, name) in ["a.test.", "two.test."].iter().enumerate() {
            let r = ask(fwd.addr, name, RecordType::A).await;
            assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{name}");
            let mut got = addresses(&r);
            got.sort();
            let want: &[&str] = if i == 0 {
                &["192.0.2.1"]
            } else {
                &["192.0.2.1", "192.0.2.2"]
            };
            assert_eq!(
                got, want,
                "{name}: the real answer, not the forged 203.0.113.66"
            );
        }
        // Each question drew one forgery with a wrong ID and one with a wrong question.
        assert_eq!(scraped(&fwd, UNMATCHED, &[("reason", "id")]).await, 2.0);
        assert_eq!(
            scraped(&fwd, UNMATCHED, &[("reason", "question")]).await,
            2.0
        );
        assert_eq!(scraped(&fwd, UNMATCHED, &[("reason", "case")]).await, 0.0);
        // What was accepted is what is cached.
        let r = ask(fwd.addr, "a.test.", RecordType::A).await;
        assert_eq!(addresses(&r), ["192.0.2.1"], "from the cache");
        fwd.stop().await;
    }
}

/// Owner names of every record in `m`, as written.
fn owners(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .chain(m.authorities.iter())
        .map(|r| r.name.to_ascii())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomize_case_sends_mixed_case_and_clients_never_see_it() {
    let up = TestUpstream::start().await;
    let fwd = with_metrics(&up, "randomize_case = true").await;
    // 12 distinct names of 10+ letters: all-lowercase by chance is 2^-120.
    let names: Vec<String> = (0..12).map(|i| format!("abcdefgh{i}.test.")).collect();
    for name in &names {
        let r = ask(fwd.addr, name, RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert_eq!(
            r.queries[0].name().to_ascii(),
            *name,
            "client's case echoed"
        );
    }
    let received = up.received_names();
    assert_eq!(
        received.len(),
        names.len(),
        "one question each: no fallback"
    );
    for (sent, asked) in received.iter().zip(&names) {
        assert_eq!(sent.to_ascii_lowercase(), *asked, "the same name");
    }
    assert!(
        received
            .iter()
            .any(|n| n.chars().any(|c| c.is_ascii_uppercase())),
        "the upstream saw mixed case: {received:?}"
    );
    assert!(
        received.iter().all(|n| n != &n.to_ascii_lowercase()),
        "every question had some uppercase: {received:?}"
    );

    // The upstream's owner names come back in the random case (they point at the question):
    let direct = udp(up.addr, &make_query("TxT.tEsT.", RecordType::TXT, None)).await;
    assert_eq!(
        owners(&direct),
        ["TxT.tEsT."],
        "the upstream echoes the case in owners"
    );
    // neither the reply nor the cache keeps it. An owner name is the client's spelling or
    // lowercase, on the miss and on the hits from the cache after it.
    for (asked, qtype) in [
        ("TXT.TEST.", RecordType::TXT),
        ("WHO.TEST.", RecordType::TXT),
        ("SHORT.TEST.", RecordType::A),
        ("TWO.TEST.", RecordType::A),
        ("WWW.TEST.", RecordType::A),
        ("V6.TEST.", RecordType::AAAA),
    ] {
        for round in ["miss", "hit", "hit in lowercase"] {
            let spelling = if round == "hit in lowercase" {
                asked.to_ascii_lowercase()
            } else {
                asked.to_owned()
            };
            let r = udp(fwd.addr, &make_query(&spelling, qtype, None)).await;
            assert!(!r.answers.is_empty(), "{spelling} {round}: {r}");
            assert_eq!(
                r.queries[0].name().to_ascii(),
                spelling,
                "question as asked"
            );
            for owner in owners(&r) {
                if owner.eq_ignore_ascii_case(asked) {
                    assert!(
                        owner == spelling || owner == asked.to_ascii_lowercase(),
                        "{spelling} {round}: random case {owner} reached the client: {r}"
                    );
                }
            }
        }
    }
    assert_eq!(scraped(&fwd, CASE_FALLBACKS, &[]).await, 0.0);
    assert_eq!(scraped(&fwd, UNMATCHED, &[]).await, 0.0);
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomize_case_falls_back_for_an_upstream_that_lowercases() {
    let up = TestUpstream::start().await;
    up.set_lowercase_replies(true);
    let fwd = with_metrics(&up, "randomize_case = true").await;
    let names: Vec<String> = (0..5).map(|i| format!("abcdefgh{i}.test.")).collect();
    for name in &names {
        let r = ask(fwd.addr, name, RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain, "{name}");
    }
    let started = Instant::now();
    let r = ask(fwd.addr, "Two.Test.", RecordType::A).await;
    let mut got = addresses(&r);
    got.sort();
    assert_eq!(got, ["192.0.2.1", "192.0.2.2"], "answered: {r}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "the fallback costs a round trip, not a timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(owners(&r), ["Two.Test.", "Two.Test."], "the client's case");
    // Each question: the randomised one (reply in the wrong case), then a plain one. A random
    // case may come out all lowercase (1 in 2^7 for two.test.): the lowercased reply then
    // matches it and is taken, with no fallback.
    let received = up.received_names();
    let mut at = 0;
    let mut fallbacks = 0;
    for question in names.iter().map(String::as_str).chain(["two.test."]) {
        let first = received.get(at).map(String::as_str).unwrap_or_default();
        assert!(
            first.eq_ignore_ascii_case(question),
            "{question}: {received:?}"
        );
        if first == question {
            at += 1;
            continue;
        }
        assert_eq!(
            received.get(at + 1).map(String::as_str),
            Some(question),
            "then plain"
        );
        fallbacks += 1;
        at += 2;
    }
    assert_eq!(at, received.len(), "nothing else asked: {received:?}");
    // Two or more of six all-lowercase draws: about 1 in 10,000 runs; three: 1 in 10^6.
    assert!(fallbacks >= 4, "randomised and fell back: {received:?}");
    assert_eq!(
        scraped(&fwd, CASE_FALLBACKS, &[]).await,
        f64::from(fallbacks)
    );
    assert_eq!(
        scraped(&fwd, UNMATCHED, &[("reason", "case")]).await,
        f64::from(fallbacks)
    );
    let r = ask(fwd.addr, "two.test.", RecordType::A).await;
    assert_eq!(addresses(&r).len(), 2, "cached");
    assert_eq!(up.received_names().len(), received.len(), "from the cache");
    fwd.stop().await;

    // Without randomize_case the same upstream is asked once per question.
    let fwd = with_metrics(&up, "").await;
    let before = up.received_names().len();
    let r = ask(fwd.addr, "a.test.", RecordType::A).await;
    assert_eq!(addresses(&r), ["192.0.2.1"]);
    assert_eq!(up.received_names().len(), before + 1);
    assert_eq!(scraped(&fwd, CASE_FALLBACKS, &[]).await, 0.0);
    fwd.stop().await;
}

/// A loopback upstream that answers `n<i>.test.` A with 10.<i/256>.<i%256>.0, holding replies
/// back until `batch` questions are in (or 50 ms passed), then answering them newest first,
/// each preceded by a forgery from the right address and port with the ID off by one. Returns
/// its address and the source ports the questions came from.
async fn reordering_upstream(batch: usize) -> (std::net::SocketAddr, Arc<Mutex<Vec<u16>>>) {
    use hickory_proto::op::MessageType;
    use hickory_proto::rr::{rdata::A, Record};
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    let ports = Arc::new(Mutex::new(Vec::new()));
    let seen = ports.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let mut held = Vec::new();
            while held.len() < batch {
                let wait =
                    tokio::time::timeout(Duration::from_millis(50), socket.recv_from(&mut buf));
                match wait.await {
                    Ok(Ok((len, from))) => held.push((buf[..len].to_vec(), from)),
                    Ok(Err(_)) => return,
                    Err(_) if held.is_empty() => continue,
                    Err(_) => break,
                }
            }
            for (query, from) in held.into_iter().rev() {
                seen.lock().expect("ports").push(from.port());
                let Ok(query) = Message::from_vec(&query) else {
                    continue;
                };
                let Some(q) = query.queries.first().cloned() else {
                    continue;
                };
                let label = q.name().iter().next().unwrap_or_default();
                let i: u16 = std::str::from_utf8(&label[1..])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let [hi, lo] = i.to_be_bytes();
                let reply = |id: u16, last: u8| {
                    let mut m = Message::new(id, MessageType::Response, OpCode::Query);
                    m.metadata.recursion_desired = true;
                    m.metadata.recursion_available = true;
                    m.add_query(q.clone());
                    let a = RData::A(A::new(10, hi, lo, last));
                    m.add_answer(Record::from_rdata(q.name().clone(), 60, a));
                    m.to_vec().expect("encode")
                };
                let forged = reply(query.metadata.id.wrapping_add(1), 66);
                let _ = socket.send_to(&forged, from).await;
                let _ = socket.send_to(&reply(query.metadata.id, 0), from).await;
            }
        }
    });
    (addr, ports)
}

/// Many different misses in flight at once, their replies coming back in another order and
/// each after a forgery with a wrong ID: every client gets its own question's answer, the
/// forgeries are counted and never cached, and the questions leave from many source ports,
/// none used for more than a few of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_get_their_own_answers_from_reordered_replies() {
    const QUESTIONS: u16 = 120;
    let (up, ports) = reordering_upstream(16).await;
    let config = TestConfig::new()
        .upstream(up)
        .upstream_timeout("2s")
        .consul_off()
        .metrics_listen("127.0.0.1:0");
    let fwd = TestServer::start(&config.toml()).await;
    let mut tasks = Vec::new();
    for i in 0..QUESTIONS {
        let addr = fwd.addr;
        tasks.push(tokio::spawn(async move {
            (i, ask(addr, &format!("n{i}.test."), RecordType::A).await)
        }));
    }
    for t in tasks {
        let (i, r) = t.await.expect("join");
        let [hi, lo] = i.to_be_bytes();
        assert_eq!(addresses(&r), [format!("10.{hi}.{lo}.0")], "n{i}.test.");
    }
    assert_eq!(
        scraped(&fwd, UNMATCHED, &[("reason", "id")]).await,
        f64::from(QUESTIONS),
        "one forgery per question, each ignored"
    );
    let ports = ports.lock().expect("ports").clone();
    assert_eq!(ports.len(), usize::from(QUESTIONS));
    let mut uses: std::collections::HashMap<u16, usize> = std::collections::HashMap::new();
    for p in &ports {
        *uses.entry(*p).or_default() += 1;
    }
    assert!(
        uses.values().all(|&n| n <= 8),
        "a source port carries at most 8 questions: {uses:?}"
    );
    assert!(
        uses.len() >= usize::from(QUESTIONS) / 8,
        "{} ports",
        uses.len()
    );
    // What was cached is the real answer, not a forgery.
    let r = ask(fwd.addr, "n7.test.", RecordType::A).await;
    assert_eq!(addresses(&r), ["10.0.7.0"]);
    fwd.stop().await;
}

/// Replies leave in batches (one `sendmmsg` for the hits among the datagrams one `recvmmsg`
/// read): a burst of hits and misses from several clients at once gets every query answered
/// once, to the client that asked, with its own ID and question.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_many_clients_is_answered_each_to_its_own() {
    const CLIENTS: u16 = 8;
    const PER_CLIENT: u16 = 40;
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&config_for(&[&up]).toml()).await;
    // a.test. is a cache hit from here on; every other name asked below is a miss.
    assert_eq!(
        addresses(&ask(fwd.addr, "a.test.", RecordType::A).await),
        vec!["192.0.2.1"]
    );
    let server = fwd.addr;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            tokio::task::spawn_blocking(move || {
                let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
                socket
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                let mut asked = std::collections::HashMap::new();
                for i in 0..PER_CLIENT {
                    let id = c * 1000 + i;
                    // Two hits for every miss.
                    let name = if i % 3 == 2 {
                        format!("c{c}-q{i}.test.")
                    } else {
                        "a.test.".to_owned()
                    };
                    let mut query = make_query(&name, RecordType::A, None);
                    query.metadata.id = id;
                    socket
                        .send_to(&query.to_vec().expect("encode"), server)
                        .expect("send");
                    asked.insert(id, name);
                }
                let mut answered = Vec::new();
                let mut buf = [0u8; 4096];
                while answered.len() < usize::from(PER_CLIENT) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        break;
                    };
                    assert_eq!(from, server);
                    let reply = Message::from_vec(&buf[..n]).expect("a DNS reply");
                    answered.push(reply);
                }
                (asked, answered)
            })
        })
        .collect();
    for client in clients {
        let (mut asked, answered) = client.await.expect("client thread");
        assert_eq!(
            answered.len(),
            usize::from(PER_CLIENT),
            "every query answered"
        );
        for reply in answered {
            let name = asked.remove(&reply.metadata.id).unwrap_or_else(|| {
                panic!(
                    "reply {} is to a query of this client, once",
                    reply.metadata.id
                )
            });
            assert_eq!(
                reply.queries[0].name().to_string(),
                name,
                "its own question"
            );
            if name == "a.test." {
                assert_eq!(addresses(&reply), vec!["192.0.2.1"], "{reply}");
            } else {
                assert_eq!(
                    reply.metadata.response_code,
                    ResponseCode::NXDomain,
                    "{reply}"
                );
            }
        }
    }
    // The hits were timed a batch at a time, yet each once: a scraper's rate of answers from
    // the cache and its latency histogram's count agree.
    let hits = fwd.metric("consul_dns_forwarder_cache_hits_total", &[]);
    assert_eq!(hits, f64::from(CLIENTS * (PER_CLIENT - PER_CLIENT / 3)));
    assert_eq!(
        fwd.metric(
            "consul_dns_forwarder_request_duration_seconds_count",
            &[("source", "cache")]
        ),
        hits
    );
    fwd.stop().await;
}
