//! The forwarder over real sockets: forwarding, rcodes, caching, serve-stale, failover,
//! truncation, protocol hygiene and access control.

mod support;

use std::time::{Duration, Instant};

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use support::upstream::TestUpstream;
use support::*;

fn config_for(upstreams: &[&TestUpstream], extra: &str) -> String {
    let servers: Vec<String> = upstreams
        .iter()
        .map(|u| format!("\"{}\"", u.addr))
        .collect();
    format!(
        "[upstream]\nservers = [{}]\ntimeout = \"1s\"\n[consul]\nenabled = false\n[metrics]\nenabled = false\n{extra}",
        servers.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_and_keeps_rcodes_and_soa() {
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&config_for(&[&up], "")).await;

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
    let fwd = TestServer::start(&config_for(&[&up], "")).await;
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
    let fwd = TestServer::start(&config_for(&[&up], "")).await;
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
    let fwd = TestServer::start(&config_for(&[&up], "[cache]\nstale_for = \"1h\"\n")).await;
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
    let fwd = TestServer::start(&config_for(&[&dead, &live], "")).await;
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
    let extra = format!(
        "[[forward]]\nzone = \"corp.test\"\nservers = [\"{}\"]\n",
        corp.addr
    );
    let fwd = TestServer::start(&config_for(&[&default], &extra)).await;
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
    let fwd = TestServer::start(&config_for(&[&up], "")).await;
    for (edns, limit) in [(None, 512usize), (Some(1232u16), 1232), (Some(4096), 1232)] {
        let q = make_query("big.test.", RecordType::A, edns);
        let bytes = raw_udp(fwd.addr, &q.to_vec().expect("enc"), REPLY_TIMEOUT)
            .await
            .expect("reply");
        assert!(bytes.len() <= limit, "{} > {limit}", bytes.len());
        let r = Message::from_vec(&bytes).expect("parse");
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
    let fwd = TestServer::start(&config_for(&[&up], "")).await;

    // Question echoed with its case; AD cleared even when asked; CD echoed.
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
    let fwd = TestServer::start(&config_for(&[&up], "[server]\nallow = [\"10.0.0.0/8\"]\n")).await;
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
    let fwd = TestServer::start(&config_for(
        &[&up],
        "[server]\ntcp_idle_timeout = \"500ms\"\n",
    ))
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
    let fwd = TestServer::start(&config_for(&[&up], "")).await;
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
    let fwd = TestServer::start(&config_for(&[&up], "")).await;
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
    // Every one of them reached the upstream once: the rest were hits.
    for (qname, qtype, ..) in cases {
        assert_eq!(up.queries_for(&qname.to_lowercase(), qtype), 1, "{qname}");
    }
    let distinct: std::collections::HashSet<(String, RecordType)> = cases
        .iter()
        .map(|(qname, qtype, ..)| (qname.to_lowercase(), *qtype))
        .collect();
    let hits = fwd.metric("consul_dns_forwarder_cache_hits_total", &[]);
    assert_eq!(
        hits,
        (4 * cases.len() - distinct.len()) as f64,
        "every ask after a name's first is a hit, counted on the inline path too"
    );
    fwd.stop().await;
}
