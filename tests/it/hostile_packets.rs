//! Hostile DNS input (issue 7), over the whole request path, bytes in and bytes out:
//!
//! - the corpus of nasty packets in `tests/corpus/packets/` (each file with its expectation in
//!   the manifest there, INDEX.md), replayed against a real server over UDP and TCP;
//! - thousands of mutated packets through `Handler::handle` in-process, from a fixed seed;
//! - TCP abuse over real sockets: huge length prefixes, slow-loris clients, zero-length
//!   messages, connections past the limit, and clients that never read their replies.
//!
//! The rule everywhere: a packet with a 12-byte header and QR=0 gets a reply with its ID that
//! parses (FORMERR when the rest does not); anything else is dropped and counted in
//! `consul_dns_forwarder_dropped_packets_total`; and the server keeps answering.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::hostile::*;
use crate::support::upstream::TestUpstream;
use crate::support::*;
use consul_dns_forwarder::consul::file::DEMO_CATALOG;
use consul_dns_forwarder::reply::Transport;
use futures::FutureExt;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DROPPED: &str = "consul_dns_forwarder_dropped_packets_total";
const TCP_CONNECTIONS: &str = "consul_dns_forwarder_tcp_connections";

/// How long to listen for a reply that must not come.
const SILENCE: Duration = Duration::from_millis(400);

/// A forwarder on 127.0.0.1:0 forwarding to `up`, Consul names from the demo catalog file, with
/// `extra_server` lines in `[server]`. The temporary directory holds the catalog file.
async fn start(up: &TestUpstream, extra_server: &str) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tmp");
    let catalog = dir.path().join("catalog.json");
    std::fs::write(&catalog, DEMO_CATALOG).expect("write catalog");
    let toml = TestConfig::new()
        .server(extra_server)
        .upstream(up.addr)
        .upstream_timeout("1s")
        .catalog_file(&catalog)
        .toml();
    (TestServer::start(&toml).await, dir)
}

fn control_query(id: u16) -> Vec<u8> {
    query(id, "a.test.", TYPE_A, None)
}

/// Is `reply` a good answer to [`control_query`]?
fn control_ok(reply: Option<&[u8]>, id: u16) -> Result<(), String> {
    let reply = reply.ok_or("no reply to the control query a.test. A")?;
    let m = Message::from_vec(reply).map_err(|e| format!("control reply does not parse: {e}"))?;
    if m.metadata.id != id || m.metadata.response_code != ResponseCode::NoError {
        return Err(format!(
            "control reply: ID {} rcode {}",
            m.metadata.id, m.metadata.response_code
        ));
    }
    if addresses(&m) != vec!["192.0.2.1".to_owned()] {
        return Err(format!("control reply: addresses {:?}", addresses(&m)));
    }
    Ok(())
}

/// Checks a reply against what the corpus says about its packet.
fn judge(
    bytes: &[u8],
    reply: Option<&[u8]>,
    expect: &Expect,
    transport: Transport,
) -> Result<(), String> {
    match (expect, reply) {
        (Expect::Drop(_), None) => Ok(()),
        (Expect::Drop(why), Some(r)) => Err(format!(
            "must be dropped ({why}), got a {}-byte reply",
            r.len()
        )),
        (Expect::Reply(_), None) => Err("no reply".into()),
        (Expect::Reply(want), Some(r)) => {
            check_reply(bytes, Some(r), transport, true)?;
            let m = Message::from_vec(r).map_err(|e| e.to_string())?;
            match want {
                Some(want) if !rcode_is(m.metadata.response_code, *want) => {
                    Err(format!("rcode {}, want {want}", m.metadata.response_code))
                }
                _ => Ok(()),
            }
        }
    }
}

async fn replay_udp(addr: SocketAddr, bytes: &[u8], expect: &Expect) -> Result<(), String> {
    let wait = match expect {
        Expect::Drop(_) => SILENCE,
        Expect::Reply(_) => REPLY_TIMEOUT,
    };
    let reply = raw_udp(addr, bytes, wait).await;
    judge(bytes, reply.as_deref(), expect, Transport::Udp)?;
    // The server still answers.
    let id = 0xc0de;
    control_ok(
        raw_udp(addr, &control_query(id), REPLY_TIMEOUT)
            .await
            .as_deref(),
        id,
    )
}

fn frame(bytes: &[u8]) -> Vec<u8> {
    let mut f = (bytes.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(bytes);
    f
}

/// Reads one length-prefixed message; `None` on EOF, error or `wait` passing.
async fn read_frame(stream: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
    let read = async {
        let len = stream.read_u16().await.ok()?;
        let mut buf = vec![0u8; usize::from(len)];
        stream.read_exact(&mut buf).await.ok()?;
        Some(buf)
    };
    tokio::time::timeout(wait, read).await.ok().flatten()
}

/// Waits until the server closes `stream` (EOF or reset); how long that took, or `None` when it
/// stayed open for `limit`. Any data read on the way is returned too.
async fn wait_closed(stream: &mut TcpStream, limit: Duration) -> (Option<Duration>, Vec<u8>) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match tokio::time::timeout(limit.saturating_sub(start.elapsed()), stream.read(&mut buf))
            .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => return (Some(start.elapsed()), got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    (None, got)
}

/// One TCP connection: the packet and a control query pipelined behind it.
async fn replay_tcp(addr: SocketAddr, bytes: &[u8], expect: &Expect) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    if bytes.is_empty() {
        // A zero length prefix: the connection is closed, nothing is answered.
        stream.write_all(&[0, 0]).await.map_err(|e| e.to_string())?;
        let (closed, data) = wait_closed(&mut stream, Duration::from_secs(2)).await;
        if closed.is_none() || !data.is_empty() {
            return Err(format!(
                "zero-length message: closed {closed:?}, {} bytes back",
                data.len()
            ));
        }
        let id = 0xc0de;
        return control_ok(raw_tcp(addr, &control_query(id)).await.as_deref(), id);
    }
    let nasty_id = if bytes.len() >= 2 {
        Some(u16::from_be_bytes([bytes[0], bytes[1]]))
    } else {
        None
    };
    let control_id = !nasty_id.unwrap_or(0);
    let mut out = frame(bytes);
    out.extend(frame(&control_query(control_id)));
    stream.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut nasty_reply = None;
    let mut control_reply = None;
    let want_nasty = matches!(expect, Expect::Reply(_));
    for _ in 0..2 {
        if control_reply.is_some() && (nasty_reply.is_some() || !want_nasty) {
            break;
        }
        let Some(f) = read_frame(&mut stream, REPLY_TIMEOUT).await else {
            break;
        };
        let id = (f.len() >= 2).then(|| u16::from_be_bytes([f[0], f[1]]));
        if id == Some(control_id) && control_reply.is_none() {
            control_reply = Some(f);
        } else {
            nasty_reply = Some(f);
        }
    }
    if !want_nasty && nasty_reply.is_none() {
        // Nothing more may come for the dropped packet.
        nasty_reply = read_frame(&mut stream, SILENCE).await;
    }
    judge(bytes, nasty_reply.as_deref(), expect, Transport::Tcp)?;
    control_ok(control_reply.as_deref(), control_id)
        .map_err(|e| format!("on the same connection: {e}"))
}

fn drops(server: &TestServer) -> BTreeMap<String, f64> {
    ["short", "response", "overload", "tcp_connection_limit"]
        .iter()
        .map(|r| (r.to_string(), server.metric(DROPPED, &[("reason", r)])))
        .collect()
}

#[test]
fn corpus_files_match_their_manifest() {
    let corpus = corpus();
    assert!(
        corpus.len() >= 50,
        "the manifest lists {} packets",
        corpus.len()
    );
    let mut problems = Vec::new();
    let mut names = std::collections::HashSet::new();
    for p in &corpus {
        if !names.insert(&p.name) {
            problems.push(format!("{}.bin: listed twice", p.name));
        }
        if p.bytes.len() != p.listed_size {
            problems.push(format!(
                "{}.bin: {} bytes, the manifest says {}",
                p.name,
                p.bytes.len(),
                p.listed_size
            ));
        }
        if p.what.is_empty() {
            problems.push(format!("{}.bin: no description", p.name));
        }
    }
    assert!(
        problems.is_empty(),
        "{} does not match the files:\n{}",
        manifest_path().display(),
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_replayed_over_udp_and_tcp() {
    let up = TestUpstream::start().await;
    let (fwd, _dir) = start(&up, "").await;
    let set = replay_set();
    assert!(set.len() >= 50, "the corpus has {} packets", set.len());
    let before = drops(&fwd);

    let udp = futures::future::join_all(set.iter().map(|(name, bytes, expect)| async move {
        (name, replay_udp(fwd.addr, bytes, expect).await)
    }))
    .await;
    let tcp = futures::future::join_all(set.iter().map(|(name, bytes, expect)| async move {
        (name, replay_tcp(fwd.addr, bytes, expect).await)
    }))
    .await;
    let failures: Vec<String> = udp
        .iter()
        .map(|(n, r)| ("udp", n, r))
        .chain(tcp.iter().map(|(n, r)| ("tcp", n, r)))
        .filter_map(|(t, n, r)| r.as_ref().err().map(|e| format!("{t} {n}.bin: {e}")))
        .collect();
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Every drop is counted, by reason: once per packet over UDP and once over TCP.
    let mut want: BTreeMap<String, f64> = BTreeMap::new();
    for (_, _, expect) in &set {
        if let Expect::Drop(reason) = expect {
            *want.entry(reason.to_string()).or_default() += 2.0;
        }
    }
    let after = drops(&fwd);
    for (reason, n) in &want {
        assert_eq!(
            after[reason] - before[reason],
            *n,
            "drops counted as {reason}: {after:?}"
        );
    }
    assert_eq!(after["overload"], before["overload"], "nothing shed");
    // And a last ordinary query over each transport.
    assert_eq!(
        addresses(&ask(fwd.addr, "a.test.", RecordType::A).await),
        vec!["192.0.2.1"]
    );
    let r = tcp_query(fwd.addr, "web.service.consul.").await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    fwd.stop().await;
}

async fn tcp_query(addr: SocketAddr, name: &str) -> Message {
    tcp(addr, &make_query(name, RecordType::A, None)).await
}

/// Seed of the mutation test: change it to explore, keep it fixed so failures reproduce.
const PROPERTY_SEED: u64 = 0x0007_f00d;

/// At most this many mutated packets, and at most this long, whichever comes first.
const PROPERTY_CASES: usize = 20_000;
const PROPERTY_BUDGET: Duration = Duration::from_secs(5);

/// No single call may take longer (the upstream timeout is 300 ms).
const CALL_BOUND: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_answers_every_mutated_packet() {
    let up = TestUpstream::start().await;
    let (handler, registry) = in_process_handler(Some(up.addr), Duration::from_millis(300));
    let mut pool = seeds();
    pool.extend(
        corpus()
            .into_iter()
            .map(|n| n.bytes)
            .filter(|b| !b.is_empty()),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(PROPERTY_SEED);
    let start = Instant::now();
    let mut failures = Vec::new();
    let mut done = 0;
    let mut replies = 0;
    let mut slowest = Duration::ZERO;
    for case in 0..PROPERTY_CASES {
        if start.elapsed() > PROPERTY_BUDGET {
            break;
        }
        let packet = mutant(&mut rng, &pool);
        let transport = if rng.random_ratio(1, 4) {
            Transport::Tcp
        } else {
            Transport::Udp
        };
        let allowed = !rng.random_ratio(1, 25);
        let client = if allowed {
            ALLOWED_CLIENT
        } else {
            REFUSED_CLIENT
        };
        let began = Instant::now();
        let call =
            std::panic::AssertUnwindSafe(handler.handle(&packet, client, transport)).catch_unwind();
        let outcome = tokio::time::timeout(CALL_BOUND, call).await;
        slowest = slowest.max(began.elapsed());
        let problem = match outcome {
            Err(_) => Some(format!("no return within {CALL_BOUND:?}")),
            Ok(Err(panic)) => Some(format!(
                "panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
            Ok(Ok(reply)) => {
                replies += usize::from(reply.is_some());
                check_reply(&packet, reply.as_deref(), transport, allowed).err()
            }
        };
        if let Some(p) = problem {
            failures.push(format!(
                "case {case} ({transport:?}, allowed {allowed}): {p}\n  packet {}",
                hex(&packet)
            ));
            if failures.len() >= 10 {
                break;
            }
        }
        done += 1;
    }
    eprintln!(
        "{done} mutated packets in {:?} ({replies} replies), slowest call {slowest:?}",
        start.elapsed()
    );
    assert!(
        failures.is_empty(),
        "seed {PROPERTY_SEED:#x}:\n{}",
        failures.join("\n")
    );
    assert!(done >= 500, "only {done} cases ran in {PROPERTY_BUDGET:?}");
    let text = consul_dns_forwarder::metrics::render(&registry);
    let dropped = metric_in(&text, DROPPED, &[]);
    assert_eq!(
        dropped as usize,
        done - replies,
        "every packet without a reply is a counted drop"
    );
}

// ---------------------------------------------------------------------------------------------
// TCP abuse.

const IDLE: Duration = Duration::from_secs(1);

/// Others are served: a UDP query and a TCP query, each answered within 2 s.
async fn others_served(addr: SocketAddr) {
    let id = 0x0b0b;
    let r = raw_udp(addr, &control_query(id), Duration::from_secs(2)).await;
    control_ok(r.as_deref(), id).expect("UDP served meanwhile");
    let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .expect("TCP connect in time")
        .expect("TCP connect");
    s.write_all(&frame(&control_query(id)))
        .await
        .expect("write");
    let r = read_frame(&mut s, Duration::from_secs(2)).await;
    control_ok(r.as_deref(), id).expect("TCP served meanwhile");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_huge_length_prefix_then_silence_is_closed_after_the_idle_timeout() {
    let up = TestUpstream::start().await;
    let (fwd, _dir) = start(&up, "tcp_idle_timeout = \"1s\"").await;
    let mut s = TcpStream::connect(fwd.addr).await.expect("connect");
    let mut msg = vec![0xff, 0xff];
    msg.extend_from_slice(&control_query(1)[..10]);
    s.write_all(&msg).await.expect("write");
    let began = Instant::now();
    others_served(fwd.addr).await;
    let (closed, data) = wait_closed(&mut s, IDLE + Duration::from_secs(2)).await;
    let took = began.elapsed();
    assert!(closed.is_some(), "still open after {took:?}");
    assert!(data.is_empty(), "nothing is answered");
    assert!(
        took >= IDLE - Duration::from_millis(100),
        "closed by the idle timeout, after {took:?}"
    );
    others_served(fwd.addr).await;
    let gone = eventually(Duration::from_secs(2), async || {
        fwd.metric(TCP_CONNECTIONS, &[]) == 0.0
    })
    .await;
    assert!(gone.is_some(), "no connection left open");
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_slow_loris_is_closed_within_the_idle_timeout() {
    let up = TestUpstream::start().await;
    let (fwd, _dir) = start(&up, "tcp_idle_timeout = \"1s\"").await;
    let s = TcpStream::connect(fwd.addr).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    // A valid query, one byte every 100 ms: 27 bytes would take 2.7 s.
    let msg = frame(&control_query(7));
    let began = Instant::now();
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 512];
        let mut got = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), rd.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (Some(began.elapsed()), got),
                Ok(Ok(n)) => got += n,
                Err(_) => return (None, got),
            }
        }
    });
    let mut sent = 0;
    for b in &msg {
        if reader.is_finished() || wr.write_all(&[*b]).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (closed, got) = reader.await.expect("reader");
    let closed = closed.expect("the slow client is disconnected");
    assert!(
        sent < msg.len(),
        "the whole message got through ({sent} bytes)"
    );
    assert_eq!(got, 0, "no reply to a message that never completed");
    assert!(
        closed <= IDLE + Duration::from_secs(1),
        "closed after {closed:?}"
    );
    others_served(fwd.addr).await;
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_zero_length_message_closes_the_connection_and_is_counted() {
    let up = TestUpstream::start().await;
    let (fwd, _dir) = start(&up, "tcp_idle_timeout = \"5s\"").await;
    let before = fwd.metric(DROPPED, &[("reason", "short")]);
    let mut s = TcpStream::connect(fwd.addr).await.expect("connect");
    // A zero-length message, then a good query behind it on the same connection.
    let mut out = vec![0, 0];
    out.extend(frame(&control_query(9)));
    s.write_all(&out).await.expect("write");
    let (closed, data) = wait_closed(&mut s, Duration::from_secs(2)).await;
    assert!(
        closed.is_some(),
        "closed at once, not after the 5 s idle timeout"
    );
    assert!(
        data.is_empty(),
        "nothing after a zero-length message is answered"
    );
    assert_eq!(
        fwd.metric(DROPPED, &[("reason", "short")]) - before,
        1.0,
        "the drop is counted"
    );
    others_served(fwd.addr).await;
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_past_the_limit_are_closed_at_once_and_counted() {
    let up = TestUpstream::start().await;
    let (fwd, _dir) = start(&up, "tcp_idle_timeout = \"5s\"\nmax_tcp_connections = 4").await;
    let mut held = Vec::new();
    for i in 0..4u16 {
        let mut s = TcpStream::connect(fwd.addr).await.expect("connect");
        s.write_all(&frame(&control_query(100 + i)))
            .await
            .expect("write");
        control_ok(read_frame(&mut s, REPLY_TIMEOUT).await.as_deref(), 100 + i)
            .expect("within the limit");
        held.push(s);
    }
    assert_eq!(fwd.metric(TCP_CONNECTIONS, &[]), 4.0);
    for i in 0..3u16 {
        let mut s = TcpStream::connect(fwd.addr)
            .await
            .expect("the kernel accepts");
        let _ = s.write_all(&frame(&control_query(200 + i))).await;
        let (closed, data) = wait_closed(&mut s, Duration::from_secs(1)).await;
        assert!(
            closed.is_some(),
            "connection {i} past the limit is closed at once"
        );
        assert!(data.is_empty(), "and not answered");
    }
    assert_eq!(
        fwd.metric(DROPPED, &[("reason", "tcp_connection_limit")]),
        3.0
    );
    // UDP is not affected.
    let id = 0x0b0b;
    control_ok(
        raw_udp(fwd.addr, &control_query(id), REPLY_TIMEOUT)
            .await
            .as_deref(),
        id,
    )
    .expect("UDP");
    // Closing the held connections frees their slots.
    drop(held);
    let back = eventually(Duration::from_secs(3), async || {
        fwd.metric(TCP_CONNECTIONS, &[]) == 0.0
    })
    .await;
    assert!(back.is_some(), "slots freed");
    others_served(fwd.addr).await;
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_client_that_never_reads_does_not_stall_others_and_is_closed() {
    let up = TestUpstream::start().await;
    let (fwd, _dir) = start(&up, "tcp_idle_timeout = \"1s\"").await;
    // A small receive buffer, so the server's writes block soon.
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("rcvbuf");
    let stream = sock.connect(fwd.addr).await.expect("connect");
    let (_rd, mut wr) = stream.into_split();
    // 4 KB queries (EDNS padding) for big.test., whose answers are ~1.7 KB: 20,000 of them
    // (80 MB in, 34 MB out) are far more than the socket buffers hold.
    let padding = vec![0u8; 4000];
    let q = frame(&query(
        0x4242,
        "big.test.",
        TYPE_A,
        Some(opt(1232, 0, &edns_options(&[(12, &padding)]))),
    ));
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        for _ in 0..20_000 {
            match tokio::time::timeout(Duration::from_secs(1), wr.write_all(&q)).await {
                Ok(Ok(())) => sent += 1,
                _ => break, // the server stopped reading (backpressure) or closed
            }
        }
        (sent, wr)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        others_served(fwd.addr).await;
    }
    let (sent, _wr) = writer.await.expect("writer");
    assert!(
        sent < 20_000,
        "the server applies backpressure (it read all {sent} queries)"
    );
    others_served(fwd.addr).await;
    // The connection whose replies cannot be written is closed, freeing its slot.
    let closed = eventually(IDLE * 4, async || fwd.metric(TCP_CONNECTIONS, &[]) == 0.0).await;
    assert!(
        closed.is_some(),
        "a client that never reads keeps its connection open"
    );
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_network_cannot_take_every_tcp_connection() {
    let up = TestUpstream::start().await;
    let (fwd, _dir) = start(
        &up,
        "tcp_idle_timeout = \"5s\"\nmax_tcp_connections = 10\nmax_tcp_connections_per_network = 3",
    )
    .await;
    // 127.0.0.1 and 127.0.1.1 are in different /24s: two client networks, loopback only.
    let connect_from = async |source: &str| {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind(format!("{source}:0").parse().expect("addr"))
            .expect("bind a loopback source");
        sock.connect(fwd.addr).await.expect("the kernel accepts")
    };
    let mut held = Vec::new();
    for i in 0..3u16 {
        let mut s = connect_from("127.0.0.1").await;
        s.write_all(&frame(&control_query(300 + i)))
            .await
            .expect("write");
        control_ok(read_frame(&mut s, REPLY_TIMEOUT).await.as_deref(), 300 + i)
            .expect("within the network's share");
        held.push(s);
    }
    for i in 0..2u16 {
        let mut s = connect_from("127.0.0.1").await;
        let _ = s.write_all(&frame(&control_query(400 + i))).await;
        let (closed, data) = wait_closed(&mut s, Duration::from_secs(1)).await;
        assert!(
            closed.is_some(),
            "connection {i} past the share is closed at once"
        );
        assert!(data.is_empty(), "and not answered");
    }
    assert_eq!(fwd.metric(DROPPED, &[("reason", "tcp_network_limit")]), 2.0);
    assert_eq!(
        fwd.metric(DROPPED, &[("reason", "tcp_connection_limit")]),
        0.0,
        "the total is not what refused them"
    );
    // Another network still gets in, up to its own share.
    for i in 0..3u16 {
        let mut s = connect_from("127.0.1.1").await;
        s.write_all(&frame(&control_query(500 + i)))
            .await
            .expect("write");
        control_ok(read_frame(&mut s, REPLY_TIMEOUT).await.as_deref(), 500 + i)
            .expect("another network is served");
        held.push(s);
    }
    assert_eq!(fwd.metric(TCP_CONNECTIONS, &[]), 6.0);
    // A closed connection gives its network's slot back.
    drop(held.remove(0));
    let back = eventually(Duration::from_secs(3), async || {
        fwd.metric(TCP_CONNECTIONS, &[]) == 5.0
    })
    .await;
    assert!(back.is_some(), "slot freed");
    let mut s = connect_from("127.0.0.1").await;
    s.write_all(&frame(&control_query(600)))
        .await
        .expect("write");
    control_ok(read_frame(&mut s, REPLY_TIMEOUT).await.as_deref(), 600)
        .expect("127.0.0.1 is served again");
    fwd.stop().await;
}

#[test]
fn a_per_network_tcp_share_of_zero_is_rejected_naming_the_key() {
    let err = consul_dns_forwarder::config::Config::from_toml_str(
        &TestConfig::new()
            .server("max_tcp_connections_per_network = 0")
            .toml(),
        "zero.toml",
    )
    .expect_err("0 refuses every TCP client");
    assert!(
        err.to_string().contains("max_tcp_connections_per_network"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// UDP response rate limit (`server.rate_limit`).

/// Sends every query at once, each from its own socket on 127.0.0.1, and returns the replies
/// in the same order (`None`: nothing within `wait`). At once, so the bucket barely refills
/// while they arrive, however slow the machine is to answer.
async fn udp_burst(addr: SocketAddr, queries: &[Vec<u8>], wait: Duration) -> Vec<Option<Message>> {
    let mut sockets = Vec::new();
    for _ in queries {
        sockets.push(
            tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind"),
        );
    }
    for (socket, q) in sockets.iter().zip(queries) {
        socket.send_to(q, addr).await.expect("send");
    }
    let mut replies = Vec::new();
    for socket in &sockets {
        let mut buf = vec![0u8; 65535];
        replies.push(
            match tokio::time::timeout(wait, socket.recv_from(&mut buf)).await {
                Ok(Ok((len, _))) => Some(Message::from_vec(&buf[..len]).expect("reply parses")),
                _ => None,
            },
        );
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_charges_a_cache_miss_once() {
    const RATE: usize = 5;
    let up = TestUpstream::start().await;
    let (fwd, _dir) = start(&up, &format!("rate_limit = {RATE}\nrate_limit_exempt = []")).await;
    // RATE + 1 distinct names, none cached: each is a miss that goes upstream.
    let queries: Vec<Vec<u8>> = (1..=RATE + 1)
        .map(|i| query(0x700 + i as u16, &format!("slow-{i}.test."), TYPE_A, None))
        .collect();
    let replies = udp_burst(fwd.addr, &queries, REPLY_TIMEOUT).await;
    let mut answered = 0;
    let mut truncated = 0;
    for reply in replies.iter().flatten() {
        if reply.metadata.truncation {
            assert!(
                reply.answers.is_empty(),
                "over the limit: nothing to amplify"
            );
            truncated += 1;
        } else {
            assert_eq!(addresses(reply), ["192.0.2.9"], "a real answer: {reply}");
            answered += 1;
        }
    }
    assert_eq!(
        (answered, truncated),
        (RATE, 1),
        "rate_limit = {RATE}: {RATE} misses answered, the next truncated"
    );
    assert_eq!(
        fwd.metric("consul_dns_forwarder_rate_limited_total", &[]),
        1.0
    );
    assert_eq!(up.queries(), RATE, "only the answered ones went upstream");
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_replies_are_rate_limited_too() {
    const RATE: usize = 5;
    let up = TestUpstream::start().await;
    // 127.0.0.1 is outside `allow`: it gets REFUSED, like a spoofed source would.
    let (fwd, _dir) = start(
        &up,
        &format!("allow = [\"127.0.0.2/32\"]\nrate_limit = {RATE}\nrate_limit_exempt = []"),
    )
    .await;
    let queries: Vec<Vec<u8>> = (0..RATE + 3)
        .map(|i| query(0x800 + i as u16, "a.test.", TYPE_A, None))
        .collect();
    let replies = udp_burst(fwd.addr, &queries, SILENCE).await;
    let refused = replies
        .iter()
        .flatten()
        .filter(|r| r.metadata.response_code == ResponseCode::Refused && !r.metadata.truncation)
        .count();
    let silent = replies.iter().filter(|r| r.is_none()).count();
    assert_eq!(
        (refused, silent),
        (RATE, 3),
        "REFUSED up to the limit, then nothing: {replies:?}"
    );
    assert_eq!(fwd.metric(DROPPED, &[("reason", "rate_limit")]), 3.0);
    assert_eq!(
        fwd.metric(
            "consul_dns_forwarder_refused_clients_total",
            &[("protocol", "udp")]
        ),
        (RATE + 3) as f64,
        "every refused request is counted, answered or not"
    );
    // TCP proves the source address: refused, never limited.
    let mut s = TcpStream::connect(fwd.addr).await.expect("connect");
    s.write_all(&frame(&control_query(0x900)))
        .await
        .expect("write");
    let r = read_frame(&mut s, REPLY_TIMEOUT)
        .await
        .expect("a TCP reply");
    let r = Message::from_vec(&r).expect("parses");
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    assert_eq!(up.queries(), 0, "nothing refused went upstream");
    fwd.stop().await;
}
