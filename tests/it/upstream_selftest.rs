// Proves every feature of `support::upstream::TestUpstream` with real DNS
// queries over UDP and TCP on 127.0.0.1, so the forwarder's integration tests
// can rely on it.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::SOA;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

use crate::support::upstream::*;

/// Upper bound for an answer that should come; nothing here is slow.
const WAIT: Duration = Duration::from_secs(5);
/// How long to listen for an answer that should not come.
const SILENCE: Duration = Duration::from_millis(300);

fn query(name: &str, rtype: RecordType, edns_size: Option<u16>) -> Message {
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(
        Name::from_ascii(name).expect("valid query name"),
        rtype,
    ));
    if let Some(size) = edns_size {
        let mut edns = Edns::new();
        edns.set_max_payload(size);
        message.set_edns(edns);
    }
    message
}

fn encode(message: &Message) -> Vec<u8> {
    message.to_vec().expect("query encodes")
}

fn decode(bytes: &[u8]) -> Message {
    Message::from_vec(bytes).expect("reply decodes")
}

/// Sends one query over UDP and waits up to `wait` for the reply; returns the
/// reply and its size on the wire.
async fn udp_exchange_within(
    addr: SocketAddr,
    message: &Message,
    wait: Duration,
) -> io::Result<(Message, usize)> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect(addr).await?;
    socket.send(&encode(message)).await?;
    let mut buffer = vec![0u8; 65535];
    let len = timeout(wait, socket.recv(&mut buffer)).await??;
    let reply = decode(&buffer[..len]);
    assert_eq!(reply.metadata.id, message.metadata.id, "reply id");
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    Ok((reply, len))
}

async fn udp(addr: SocketAddr, name: &str, rtype: RecordType, edns: Option<u16>) -> Message {
    udp_exchange_within(addr, &query(name, rtype, edns), WAIT)
        .await
        .expect("UDP reply")
        .0
}

async fn tcp_send(stream: &mut TcpStream, message: &Message) -> io::Result<()> {
    let bytes = encode(message);
    let len = u16::try_from(bytes.len()).expect("query fits in 64 KiB");
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(&bytes).await
}

async fn tcp_recv(stream: &mut TcpStream) -> io::Result<Message> {
    let len = stream.read_u16().await?;
    let mut buffer = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buffer).await?;
    Ok(decode(&buffer))
}

async fn tcp_exchange_within(
    addr: SocketAddr,
    message: &Message,
    wait: Duration,
) -> io::Result<Message> {
    let mut stream = TcpStream::connect(addr).await?;
    tcp_send(&mut stream, message).await?;
    let reply = timeout(wait, tcp_recv(&mut stream)).await??;
    assert_eq!(reply.metadata.id, message.metadata.id, "reply id");
    Ok(reply)
}

async fn tcp(addr: SocketAddr, name: &str, rtype: RecordType, edns: Option<u16>) -> Message {
    tcp_exchange_within(addr, &query(name, rtype, edns), WAIT)
        .await
        .expect("TCP reply")
}

fn a_addrs(records: &[Record]) -> Vec<Ipv4Addr> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

fn txt_strings(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::TXT(txt) => Some(
                txt.txt_data
                    .iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect::<String>(),
            ),
            _ => None,
        })
        .collect()
}

/// Checks an NXDOMAIN/NODATA reply: no answers, exactly the zone SOA in the
/// authority section, AA=1.
fn assert_negative(reply: &Message, rcode: ResponseCode) {
    assert_eq!(reply.metadata.response_code, rcode);
    assert!(reply.metadata.authoritative, "AA=1");
    assert!(reply.answers.is_empty(), "no answers: {:?}", reply.answers);
    assert_eq!(reply.authorities.len(), 1, "SOA in authority");
    let soa_record = &reply.authorities[0];
    assert_eq!(soa_record.name, Name::from_ascii("test.").unwrap());
    assert_eq!(soa_record.ttl, 3600);
    let RData::SOA(soa) = &soa_record.data else {
        panic!("authority is not a SOA: {soa_record:?}");
    };
    let expected = SOA::new(
        Name::from_ascii("ns.test.").unwrap(),
        Name::from_ascii("hostmaster.test.").unwrap(),
        1,
        3600,
        600,
        86400,
        60,
    );
    assert_eq!(soa, &expected);
}

#[test]
fn upstream_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<TestUpstream>();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_over_udp_and_tcp_with_counters() {
    let upstream = TestUpstream::start().await;
    assert!(upstream.addr.ip().is_loopback());

    for reply in [
        udp(upstream.addr, "a.test.", RecordType::A, None).await,
        tcp(upstream.addr, "a.test.", RecordType::A, None).await,
    ] {
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(reply.metadata.authoritative, "AA=1");
        assert!(!reply.metadata.truncation);
        assert!(reply.metadata.recursion_desired, "RD copied");
        assert_eq!(reply.answers.len(), 1);
        assert_eq!(reply.answers[0].ttl, 300);
        assert_eq!(a_addrs(&reply.answers), [Ipv4Addr::new(192, 0, 2, 1)]);
        assert!(reply.authorities.is_empty());
    }

    assert_eq!(upstream.queries(), 2);
    assert_eq!(upstream.udp_queries(), 1);
    assert_eq!(upstream.tcp_queries(), 1);
    assert_eq!(upstream.queries_for("a.test", RecordType::A), 2);
    assert_eq!(upstream.queries_for("A.Test.", RecordType::A), 2);
    assert_eq!(upstream.queries_for("a.test", RecordType::AAAA), 0);
    assert_eq!(upstream.queries_for("two.test", RecordType::A), 0);
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nodata_and_nxdomain_carry_soa() {
    let upstream = TestUpstream::start().await;
    let addr = upstream.addr;

    assert_negative(
        &udp(addr, "a.test.", RecordType::AAAA, None).await,
        ResponseCode::NoError,
    );
    assert_negative(
        &udp(addr, "v6.test.", RecordType::A, None).await,
        ResponseCode::NoError,
    );
    assert_negative(
        &udp(addr, "nope.test.", RecordType::A, None).await,
        ResponseCode::NXDomain,
    );
    assert_negative(
        &tcp(addr, "deep.nope.test.", RecordType::TXT, None).await,
        ResponseCode::NXDomain,
    );

    let v6 = udp(addr, "v6.test.", RecordType::AAAA, None).await;
    assert_eq!(v6.metadata.response_code, ResponseCode::NoError);
    assert_eq!(v6.answers.len(), 1);
    assert_eq!(v6.answers[0].ttl, 300);
    assert_eq!(
        v6.answers[0].data,
        RData::AAAA(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into())
    );

    let soa = udp(addr, "test.", RecordType::SOA, None).await;
    assert_eq!(soa.answers.len(), 1);
    assert_eq!(soa.answers[0].record_type(), RecordType::SOA);
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fixed_records() {
    let upstream = TestUpstream::start().await;
    let addr = upstream.addr;

    let two = udp(addr, "two.test.", RecordType::A, None).await;
    let mut two_addrs = a_addrs(&two.answers);
    two_addrs.sort();
    assert_eq!(
        two_addrs,
        [Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)]
    );
    assert!(two.answers.iter().all(|r| r.ttl == 300));

    let short = udp(addr, "short.test.", RecordType::A, None).await;
    assert_eq!(a_addrs(&short.answers), [Ipv4Addr::new(192, 0, 2, 3)]);
    assert_eq!(short.answers[0].ttl, 2);

    let txt = udp(addr, "txt.test.", RecordType::TXT, None).await;
    assert_eq!(txt_strings(&txt.answers), ["hello world"]);
    assert_eq!(txt.answers[0].ttl, 300);

    let who = udp(addr, "who.test.", RecordType::TXT, None).await;
    assert_eq!(txt_strings(&who.answers), ["upstream"]);
    upstream.stop().await;

    let labeled = TestUpstream::start_labeled("alpha").await;
    let who = tcp(labeled.addr, "who.test.", RecordType::TXT, None).await;
    assert_eq!(txt_strings(&who.answers), ["alpha"]);
    assert_eq!(who.answers[0].ttl, 300);
    labeled.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cname_comes_first_then_target() {
    let upstream = TestUpstream::start().await;
    let reply = udp(upstream.addr, "www.test.", RecordType::A, None).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert!(reply.metadata.authoritative);
    assert_eq!(reply.answers.len(), 2, "{:?}", reply.answers);
    let cname = &reply.answers[0];
    assert_eq!(cname.name, Name::from_ascii("www.test.").unwrap());
    assert_eq!(cname.ttl, 300);
    let RData::CNAME(target) = &cname.data else {
        panic!("first answer is not a CNAME: {cname:?}");
    };
    assert_eq!(target.0, Name::from_ascii("a.test.").unwrap());
    assert_eq!(reply.answers[1].name, Name::from_ascii("a.test.").unwrap());
    assert_eq!(a_addrs(&reply.answers[1..]), [Ipv4Addr::new(192, 0, 2, 1)]);

    let only_cname = udp(upstream.addr, "www.test.", RecordType::CNAME, None).await;
    assert_eq!(only_cname.answers.len(), 1);
    assert_eq!(only_cname.answers[0].record_type(), RecordType::CNAME);
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn error_codes() {
    let upstream = TestUpstream::start().await;
    let addr = upstream.addr;

    for (name, rcode) in [
        ("servfail.test.", ResponseCode::ServFail),
        ("refused.test.", ResponseCode::Refused),
        ("example.com.", ResponseCode::Refused),
        ("test.example.", ResponseCode::Refused),
    ] {
        for reply in [
            udp(addr, name, RecordType::A, None).await,
            tcp(addr, name, RecordType::A, None).await,
        ] {
            assert_eq!(reply.metadata.response_code, rcode, "{name}");
            assert!(reply.answers.is_empty(), "{name}");
            assert!(reply.authorities.is_empty(), "{name}");
        }
    }
    assert_eq!(upstream.queries_for("example.com", RecordType::A), 2);
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reverse_names_answer_ptr_or_nxdomain_with_the_arpa_soa() {
    let upstream = TestUpstream::start().await;
    let addr = upstream.addr;
    let v6 = format!("1.{}8.b.d.0.1.0.0.2.ip6.arpa.", "0.".repeat(23));
    for (name, target) in [
        ("1.2.0.192.in-addr.arpa.", "a.test."),
        (v6.as_str(), "v6.test."),
    ] {
        for reply in [
            udp(addr, name, RecordType::PTR, None).await,
            tcp(addr, name, RecordType::PTR, None).await,
        ] {
            assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
            assert!(reply.metadata.authoritative);
            assert_eq!(reply.answers.len(), 1, "{name}");
            assert_eq!(reply.answers[0].ttl, 300);
            match &reply.answers[0].data {
                RData::PTR(ptr) => assert_eq!(ptr.0.to_ascii(), target),
                other => panic!("PTR expected: {other:?}"),
            }
        }
    }
    for name in ["9.9.9.10.in-addr.arpa.", "1.2.3.in-addr.arpa.", "ip6.arpa."] {
        let reply = udp(addr, name, RecordType::PTR, None).await;
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::NXDomain,
            "{name}"
        );
        assert!(reply.answers.is_empty());
        let soa = &reply.authorities[0];
        assert_eq!((soa.name.to_ascii().as_str(), soa.ttl), ("arpa.", 3600));
    }
    let reply = udp(addr, "1.2.0.192.in-addr.arpa.", RecordType::A, None).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert!(reply.answers.is_empty(), "NODATA");
    assert_eq!(reply.authorities[0].name.to_ascii(), "arpa.");
    assert_eq!(
        upstream.queries_for("1.2.0.192.in-addr.arpa", RecordType::PTR),
        2
    );
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mixed_case_is_matched_and_echoed() {
    let upstream = TestUpstream::start().await;
    for reply in [
        udp(upstream.addr, "A.TeSt.", RecordType::A, None).await,
        tcp(upstream.addr, "A.TeSt.", RecordType::A, None).await,
    ] {
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert_eq!(reply.queries.len(), 1);
        assert_eq!(
            reply.queries[0].name().to_ascii(),
            "A.TeSt.",
            "question echoed as asked"
        );
        assert_eq!(a_addrs(&reply.answers), [Ipv4Addr::new(192, 0, 2, 1)]);
    }
    let nx = udp(upstream.addr, "NoPe.TeSt.", RecordType::A, None).await;
    assert_eq!(nx.queries[0].name().to_ascii(), "NoPe.TeSt.");
    assert_negative(&nx, ResponseCode::NXDomain);
    assert_eq!(upstream.queries_for("a.test.", RecordType::A), 2);
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lowercase_replies_mode_echoes_the_question_lowercased_and_names_are_recorded() {
    let upstream = TestUpstream::start().await;
    upstream.set_lowercase_replies(true);
    for reply in [
        udp(upstream.addr, "A.TeSt.", RecordType::A, None).await,
        tcp(upstream.addr, "A.TeSt.", RecordType::A, None).await,
    ] {
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert_eq!(
            reply.queries[0].name().to_ascii(),
            "a.test.",
            "question lowercased"
        );
        assert_eq!(reply.queries[0].query_type(), RecordType::A, "type kept");
        assert_eq!(a_addrs(&reply.answers), [Ipv4Addr::new(192, 0, 2, 1)]);
    }
    upstream.set_lowercase_replies(false);
    let reply = udp(upstream.addr, "A.TeSt.", RecordType::A, None).await;
    assert_eq!(reply.queries[0].name().to_ascii(), "A.TeSt.", "off again");
    assert_eq!(
        upstream.received_names(),
        ["A.TeSt.", "A.TeSt.", "A.TeSt."],
        "names recorded as received"
    );
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn spoof_first_mode_sends_a_wrong_id_then_a_wrong_question_then_the_answer() {
    let upstream = TestUpstream::start().await;
    upstream.set_spoof_first(true);
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    socket.connect(upstream.addr).await.expect("connect");
    let q = query("a.test.", RecordType::A, None);
    socket.send(&encode(&q)).await.expect("send");
    let mut buffer = vec![0u8; 65535];
    let mut replies = Vec::new();
    for _ in 0..3 {
        let len = timeout(WAIT, socket.recv(&mut buffer))
            .await
            .expect("three datagrams")
            .expect("recv");
        replies.push(decode(&buffer[..len]));
    }
    let spoofed = [Ipv4Addr::new(203, 0, 113, 66)];
    assert_ne!(replies[0].metadata.id, q.metadata.id, "first: wrong ID");
    assert_eq!(replies[0].queries[0].name().to_ascii(), "a.test.");
    assert_eq!(a_addrs(&replies[0].answers), spoofed);
    assert_eq!(replies[1].metadata.id, q.metadata.id, "second: right ID");
    assert_eq!(
        replies[1].queries[0].name().to_ascii(),
        "spoofed.test.",
        "second: wrong question"
    );
    assert_eq!(a_addrs(&replies[1].answers), spoofed);
    assert_eq!(replies[2].metadata.id, q.metadata.id, "third: the answer");
    assert_eq!(replies[2].queries[0].name().to_ascii(), "a.test.");
    assert_eq!(a_addrs(&replies[2].answers), [Ipv4Addr::new(192, 0, 2, 1)]);
    let extra = timeout(SILENCE, socket.recv(&mut buffer)).await;
    assert!(extra.is_err(), "nothing more");
    // TCP cannot be spoofed blind: only the answer.
    let reply = tcp(upstream.addr, "a.test.", RecordType::A, None).await;
    assert_eq!(a_addrs(&reply.answers), [Ipv4Addr::new(192, 0, 2, 1)]);
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn opt_only_when_the_query_had_one() {
    let upstream = TestUpstream::start().await;
    let addr = upstream.addr;

    let plain = udp(addr, "a.test.", RecordType::A, None).await;
    assert!(plain.edns.is_none());
    assert!(plain.additionals.is_empty());

    for reply in [
        udp(addr, "a.test.", RecordType::A, Some(1232)).await,
        tcp(addr, "a.test.", RecordType::A, Some(1232)).await,
        udp(addr, "nope.test.", RecordType::A, Some(4096)).await,
        udp(addr, "servfail.test.", RecordType::A, Some(1232)).await,
    ] {
        assert!(reply.edns.is_some(), "OPT in reply: {reply:?}");
    }
    let tcp_plain = tcp(addr, "nope.test.", RecordType::A, None).await;
    assert!(tcp_plain.edns.is_none());
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn big_answer_truncates_over_udp_and_is_whole_over_tcp() {
    let upstream = TestUpstream::start().await;
    let addr = upstream.addr;

    // Without EDNS the limit is 512 bytes; with EDNS it is the advertised size.
    // 1400 is a size at which hickory's own truncation would drop the OPT.
    for (edns, limit) in [
        (None, 512usize),
        (Some(512), 512),
        (Some(1232), 1232),
        (Some(1400), 1400),
    ] {
        let (reply, len) =
            udp_exchange_within(addr, &query("big.test.", RecordType::A, edns), WAIT)
                .await
                .expect("UDP reply");
        assert!(reply.metadata.truncation, "TC=1 for EDNS {edns:?}");
        assert!(len <= limit, "{len} bytes > {limit} for EDNS {edns:?}");
        assert_eq!(reply.edns.is_some(), edns.is_some(), "OPT iff EDNS");
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert_eq!(reply.queries.len(), 1);
        assert!(reply.answers.is_empty(), "no partial RRset in a TC reply");
    }

    // A client with a large enough buffer gets it all over UDP.
    let (whole, len) =
        udp_exchange_within(addr, &query("big.test.", RecordType::A, Some(4096)), WAIT)
            .await
            .expect("UDP reply");
    assert!(!whole.metadata.truncation);
    assert_eq!(whole.answers.len(), 100);
    assert!(len > 1232, "big.test. is {len} bytes, meant to exceed 1232");

    let expected: Vec<Ipv4Addr> = (1..=100).map(|i| Ipv4Addr::new(198, 51, 100, i)).collect();
    for edns in [None, Some(1232)] {
        let reply = tcp(addr, "big.test.", RecordType::A, edns).await;
        assert!(!reply.metadata.truncation);
        let mut addrs = a_addrs(&reply.answers);
        addrs.sort();
        assert_eq!(addrs, expected);
        assert!(reply.answers.iter().all(|r| r.ttl == 300));
    }
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_names_answer_late_without_blocking_others() {
    let upstream = TestUpstream::start().await;
    let addr = upstream.addr;

    // UDP: a slow query in flight does not hold up a fast one.
    let started = Instant::now();
    let slow = tokio::spawn(async move {
        let reply = udp(addr, "slow-400.test.", RecordType::A, None).await;
        (reply, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fast_started = Instant::now();
    let fast = udp(addr, "a.test.", RecordType::A, None).await;
    assert!(fast_started.elapsed() < Duration::from_millis(300));
    assert_eq!(a_addrs(&fast.answers), [Ipv4Addr::new(192, 0, 2, 1)]);
    let (slow_reply, slow_elapsed) = slow.await.expect("slow query task");
    assert!(
        slow_elapsed >= Duration::from_millis(400),
        "{slow_elapsed:?}"
    );
    assert_eq!(a_addrs(&slow_reply.answers), [Ipv4Addr::new(192, 0, 2, 9)]);
    assert_eq!(slow_reply.answers[0].ttl, 300);
    assert!(slow_reply.metadata.authoritative);

    // TCP: two queries pipelined on one connection; the fast one is answered
    // first, the slow one after its delay.
    let mut stream = TcpStream::connect(addr).await.expect("TCP connect");
    let slow_query = query("slow-500.test.", RecordType::A, None);
    let fast_query = query("a.test.", RecordType::A, None);
    let started = Instant::now();
    tcp_send(&mut stream, &slow_query).await.expect("send");
    tcp_send(&mut stream, &fast_query).await.expect("send");
    let first = timeout(WAIT, tcp_recv(&mut stream))
        .await
        .expect("in time")
        .expect("reply");
    assert_eq!(first.metadata.id, fast_query.metadata.id, "fast first");
    assert!(started.elapsed() < Duration::from_millis(400));
    let second = timeout(WAIT, tcp_recv(&mut stream))
        .await
        .expect("in time")
        .expect("reply");
    assert_eq!(second.metadata.id, slow_query.metadata.id);
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(a_addrs(&second.answers), [Ipv4Addr::new(192, 0, 2, 9)]);

    // Other types at a slow name: NODATA, also delayed.
    let started = Instant::now();
    let nodata = udp(addr, "slow-200.test.", RecordType::AAAA, None).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_negative(&nodata, ResponseCode::NoError);
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn blackhole_counts_but_never_answers() {
    let upstream = TestUpstream::start().await;
    let addr = upstream.addr;
    upstream.set_blackhole(true);

    let udp_result =
        udp_exchange_within(addr, &query("a.test.", RecordType::A, None), SILENCE).await;
    assert!(udp_result.is_err(), "UDP answered while black-holed");
    let tcp_result =
        tcp_exchange_within(addr, &query("a.test.", RecordType::A, None), SILENCE).await;
    assert!(tcp_result.is_err(), "TCP answered while black-holed");
    assert_eq!(upstream.queries(), 2);
    assert_eq!(upstream.udp_queries(), 1);
    assert_eq!(upstream.tcp_queries(), 1);
    assert_eq!(upstream.queries_for("a.test", RecordType::A), 2);

    upstream.set_blackhole(false);
    let reply = udp(addr, "a.test.", RecordType::A, None).await;
    assert_eq!(a_addrs(&reply.answers), [Ipv4Addr::new(192, 0, 2, 1)]);
    assert_eq!(upstream.queries(), 3);
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_name_is_counted_but_never_answered_while_others_are() {
    let upstream = TestUpstream::start().await;
    let addr = upstream.addr;
    let (a, txt) = (
        query("Silent.test.", RecordType::A, None),
        query("silent.test.", RecordType::TXT, None),
    );
    let (over_udp, over_tcp) = tokio::join!(
        udp_exchange_within(addr, &a, SILENCE),
        tcp_exchange_within(addr, &txt, SILENCE)
    );
    assert!(
        over_udp.is_err() && over_tcp.is_err(),
        "silent.test. answered: {over_udp:?} {over_tcp:?}"
    );
    let counted = [RecordType::A, RecordType::TXT].map(|t| upstream.queries_for("silent.test", t));
    assert_eq!(counted, [1, 1]);
    let reply = udp(addr, "a.test.", RecordType::A, None).await;
    assert_eq!(a_addrs(&reply.answers), [Ipv4Addr::new(192, 0, 2, 1)]);
    upstream.stop().await;
}

/// `PackedUpstream`: TC=1 and no records over UDP; over TCP every record, each owner a 2-byte
/// pointer to the question (16 bytes a record), the question echoed in the case sent.
#[tokio::test(flavor = "multi_thread")]
async fn packed_upstream_compresses_every_owner_and_truncates_over_udp() {
    let upstream = PackedUpstream::start(3000).await;
    let (reply, size) = udp_exchange_within(
        upstream.addr,
        &query("Big.Example.", RecordType::A, Some(1232)),
        WAIT,
    )
    .await
    .expect("UDP reply");
    assert!(reply.metadata.truncation && reply.answers.is_empty());
    assert_eq!(reply.queries[0].name().to_ascii(), "Big.Example.");
    assert_eq!(size, 12 + 13 + 4);
    let message = query("Big.Example.", RecordType::A, None);
    let mut stream = TcpStream::connect(upstream.addr).await.expect("connect");
    tcp_send(&mut stream, &message).await.expect("send");
    let len = timeout(WAIT, stream.read_u16())
        .await
        .expect("in time")
        .expect("length");
    assert_eq!(
        usize::from(len),
        12 + 17 + 3000 * 16,
        "every owner compressed"
    );
    let mut body = vec![0u8; usize::from(len)];
    stream.read_exact(&mut body).await.expect("body");
    let reply = decode(&body);
    assert_eq!(reply.metadata.id, message.metadata.id);
    assert!(!reply.metadata.truncation);
    assert_eq!(reply.answers.len(), 3000);
    assert_eq!(
        a_addrs(&reply.answers[..2]),
        [Ipv4Addr::new(10, 0, 0, 0), Ipv4Addr::new(10, 0, 0, 1)]
    );
    assert!(reply.answers.iter().all(|r| r.ttl == 300));
    assert_eq!((upstream.udp_queries(), upstream.tcp_queries()), (1, 1));
}

/// Asserts nothing serves `addr` any more: UDP gets port unreachable (or at
/// least no answer) and TCP connections are refused.
async fn assert_not_serving(addr: SocketAddr) {
    match udp_exchange_within(addr, &query("a.test.", RecordType::A, None), SILENCE).await {
        Err(error) => assert!(
            matches!(
                error.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::TimedOut
            ),
            "unexpected UDP error {error:?}"
        ),
        Ok((reply, _)) => panic!("stopped upstream answered over UDP: {reply:?}"),
    }
    let connect = TcpStream::connect(addr).await;
    assert_eq!(
        connect.expect_err("TCP connect must fail").kind(),
        io::ErrorKind::ConnectionRefused
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_closes_both_sockets_and_the_port_can_be_reused() {
    let upstream = TestUpstream::start_labeled("first").await;
    let addr = upstream.addr;
    // Leave a TCP connection open across the stop, as a forwarder would.
    let _ = tcp(addr, "a.test.", RecordType::A, None).await;
    let mut open = TcpStream::connect(addr).await.expect("TCP connect");
    tcp_send(&mut open, &query("a.test.", RecordType::A, None))
        .await
        .expect("send");
    tcp_recv(&mut open).await.expect("reply");
    upstream.stop().await;

    assert_not_serving(addr).await;
    // The open connection is closed by the server (EOF or reset), not left hanging.
    let mut byte = [0u8; 1];
    let read = timeout(WAIT, open.read(&mut byte))
        .await
        .expect("closed in time");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // A new upstream can take over the same port.
    let again = TestUpstream::start_on(addr, "second")
        .await
        .expect("rebind the same port");
    assert_eq!(again.addr, addr);
    let who = udp(addr, "who.test.", RecordType::TXT, None).await;
    assert_eq!(txt_strings(&who.answers), ["second"]);

    // Binding a port that is in use fails instead of panicking.
    let busy = TestUpstream::start_on(addr, "third").await;
    assert!(busy.is_err());
    again.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drop_stops_serving() {
    let upstream = TestUpstream::start().await;
    let addr = upstream.addr;
    let _ = udp(addr, "a.test.", RecordType::A, None).await;
    drop(upstream);

    // Drop cannot wait for the tasks to end; give them a moment.
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after drop");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_not_serving(addr).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn start_on_binds_given_loopback_address_only() {
    let upstream = TestUpstream::start_on("127.0.0.1:0".parse().unwrap(), "x")
        .await
        .expect("bind");
    assert_ne!(upstream.addr.port(), 0);
    let who = tcp(upstream.addr, "who.test.", RecordType::TXT, None).await;
    assert_eq!(txt_strings(&who.answers), ["x"]);
    upstream.stop().await;

    let outside = TestUpstream::start_on("0.0.0.0:0".parse().unwrap(), "x").await;
    assert_eq!(
        outside.expect_err("non-loopback refused").kind(),
        io::ErrorKind::InvalidInput
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_queries_are_all_answered_and_counted() {
    let upstream = TestUpstream::start().await;
    let addr = upstream.addr;
    let mut tasks = Vec::new();
    for i in 0..20 {
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                udp(addr, "two.test.", RecordType::A, None).await
            } else {
                tcp(addr, "two.test.", RecordType::A, Some(1232)).await
            }
        }));
    }
    for task in tasks {
        let reply = task.await.expect("query task");
        assert_eq!(reply.answers.len(), 2);
    }
    assert_eq!(upstream.queries(), 20);
    assert_eq!(upstream.udp_queries(), 10);
    assert_eq!(upstream.tcp_queries(), 10);
    assert_eq!(upstream.queries_for("TWO.test", RecordType::A), 20);
    upstream.stop().await;
}
