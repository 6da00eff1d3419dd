//! Failure caching (RFC 9520) over real sockets: an upstream that answers SERVFAIL or REFUSED,
//! or does not answer, is asked at most once per backoff period however many clients ask;
//! stale data is served before a remembered failure (RFC 8767); an answer too large to encode
//! again is cached as it came and not fetched again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;

use crate::support::upstream::{PackedUpstream, TestUpstream};
use crate::support::*;

/// The forwarder's config: failures remembered for 1 s at first, doubling to 4 s, so that in a
/// 5 s run the upstream is asked at 0, 1 and 3 s.
fn config(upstream: impl std::fmt::Display, timeout: &str) -> String {
    TestConfig::new()
        .upstream(upstream)
        .upstream_timeout(timeout)
        .consul_off()
        .cache("failure_ttl = \"1s\"\nfailure_ttl_max = \"4s\"")
        .toml()
}

/// `clients` tasks ask `name` over UDP, each every 20 ms, for `run`; returns every reply with
/// how long it took.
async fn hammer(
    server: std::net::SocketAddr,
    name: &'static str,
    clients: usize,
    run: Duration,
) -> Vec<(Message, Duration)> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        tasks.push(tokio::spawn(async move {
            let mut replies = Vec::new();
            while started.elapsed() < run {
                let asked = Instant::now();
                let reply = ask(server, name, RecordType::A).await;
                replies.push((reply, asked.elapsed()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            replies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servfail_and_refused_are_asked_once_per_backoff_period() {
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&config(up.addr, "1s")).await;
    let run = Duration::from_secs(5);
    let (servfail, refused) = tokio::join!(
        hammer(fwd.addr, "servfail.test.", 10, run),
        hammer(fwd.addr, "refused.test.", 10, run)
    );
    for (name, replies, reason) in [
        ("servfail.test.", &servfail, "servfail"),
        ("refused.test.", &refused, "refused"),
    ] {
        assert!(replies
            .iter()
            .all(|(r, _)| r.metadata.response_code == ResponseCode::ServFail));
        let asked = up.queries_for(name, RecordType::A);
        println!(
            "{name} {} client queries in {run:?}, {asked} reached the upstream (backoff 1 s, 2 s, 4 s)",
            replies.len()
        );
        let fetches = fwd.metric(
            "consul_dns_forwarder_upstream_failures_cached_total",
            &[("reason", reason)],
        );
        assert_eq!(fetches, 3.0, "{name}: fetched once at 0 s, 1 s and 3 s");
        // A fetch sends its question again when the reply is later than half the timeout (two
        // tries), so a test machine stalled for 500 ms adds a datagram to one fetch (seen once
        // in CI under the whole suite: 4 datagrams). More than one extra would mean a fetch
        // outside the backoff.
        assert!(
            (3..=4).contains(&asked),
            "{name}: 3 fetches reached the upstream as {asked} datagrams"
        );
    }
    // Every query either waited for a fetch (a miss) or got the remembered failure.
    let total = (servfail.len() + refused.len()) as f64;
    assert_eq!(
        fwd.metric("consul_dns_forwarder_cached_failure_answers_total", &[])
            + fwd.metric("consul_dns_forwarder_cache_misses_total", &[]),
        total
    );
    assert!(fwd.metric("consul_dns_forwarder_cached_failure_answers_total", &[]) > total * 0.9);
    // Another name is not held back by these.
    assert_eq!(
        addresses(&ask(fwd.addr, "a.test.", RecordType::A).await),
        ["192.0.2.1"]
    );
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upstream_is_asked_once_per_backoff_period() {
    let up = TestUpstream::start().await;
    // 500 ms a fetch (two tries of 250 ms: a lost datagram is worth a second try); failures at
    // 0.5 s, 2 s and 4.5 s, so fetches start at 0, 1.5 and 4 s within a 5 s run.
    let fwd = TestServer::start(&config(up.addr, "500ms")).await;
    let replies = hammer(fwd.addr, "silent.test.", 10, Duration::from_secs(5)).await;
    assert!(replies
        .iter()
        .all(|(r, _)| r.metadata.response_code == ResponseCode::ServFail));
    let datagrams = up.queries_for("silent.test.", RecordType::A);
    let fetches = fwd.metric(
        "consul_dns_forwarder_upstream_failures_cached_total",
        &[("reason", "timeout")],
    );
    println!(
        "silent.test.: {} client queries in 5 s, {fetches} fetches upstream ({datagrams} datagrams: two tries each)",
        replies.len()
    );
    assert_eq!(fetches, 3.0);
    assert_eq!(datagrams, 6);
    // Answers from the remembered failure are immediate; only those that waited on a fetch took
    // the upstream timeout.
    let waited = replies
        .iter()
        .filter(|(_, took)| *took > Duration::from_millis(200))
        .count();
    assert!(waited <= 3 * 10, "{waited} queries waited on a fetch");
    fwd.stop().await;
}

/// RFC 8767 before RFC 9520: while the failure is remembered, an expired answer is served at
/// once (TTL 30), and the upstream is still asked only once per period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_answers_are_preferred_to_a_remembered_failure() {
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&config(up.addr, "500ms")).await;
    assert_eq!(
        addresses(&ask(fwd.addr, "short.test.", RecordType::A).await),
        ["192.0.2.3"]
    );
    up.set_blackhole(true);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let served = Arc::new(AtomicUsize::new(0));
    let mut slow = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let asked = Instant::now();
        let r = ask(fwd.addr, "short.test.", RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(addresses(&r), ["192.0.2.3"]);
        assert_eq!(r.answers[0].ttl, 30, "stale TTL");
        if asked.elapsed() > Duration::from_millis(300) {
            slow += 1;
        }
        served.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let served = served.load(Ordering::SeqCst);
    let datagrams = up.queries_for("short.test.", RecordType::A);
    println!(
        "short.test. expired, upstream silent: {served} answers from stale data in 3 s, {slow} waited on a fetch, {datagrams} datagrams upstream (1 before)"
    );
    // Fetches at 0 and 1.5 s (the second period, 2 s, outlasts the run).
    assert_eq!(slow, 2);
    assert_eq!(datagrams, 1 + 2 * slow);
    let counted = [
        "consul_dns_forwarder_stale_answers_total",
        "consul_dns_forwarder_cached_failure_answers_total",
    ]
    .map(|series| fwd.metric(series, &[]));
    assert_eq!(
        counted,
        [served as f64, 0.0],
        "every answer stale, none the failure"
    );
    fwd.stop().await;
}

/// 3,000 A records arrive in 48 KB over TCP (every owner a pointer) but take 75 KB encoded by
/// hickory, which compresses at most 120 names: the answer is cached as it came, whole over
/// TCP from the first query on, TC=1 over UDP, and fetched once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_too_large_to_encode_again_is_cached_as_it_came() {
    let up = PackedUpstream::start(3000).await;
    let fwd = TestServer::start(&config(up.addr, "2s")).await;
    let whole_over_tcp = || async {
        let r = tcp(fwd.addr, &make_query("Big.Example.", RecordType::A, None)).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(!r.metadata.truncation);
        assert_eq!(r.answers.len(), 3000);
        assert_eq!(r.queries[0].name().to_ascii(), "Big.Example.", "case kept");
    };
    whole_over_tcp().await;
    for edns in [None, Some(1232)] {
        for _ in 0..5 {
            let q = make_query("big.example.", RecordType::A, edns);
            let bytes = raw_udp(fwd.addr, &q.to_vec().expect("enc"), REPLY_TIMEOUT)
                .await
                .expect("reply");
            let limit = edns.map_or(512, usize::from);
            assert!(bytes.len() <= limit);
            let r = Message::from_vec(&bytes).expect("parses");
            assert!(r.metadata.truncation, "TC=1: TCP gives the rest");
            assert_eq!(r.edns.is_some(), edns.is_some());
            assert!(!r.answers.is_empty() && r.answers.len() < 3000);
        }
    }
    for _ in 0..3 {
        whole_over_tcp().await;
    }
    println!(
        "big.example.: 14 queries (4 over TCP, 10 over UDP), upstream asked {} times over UDP and {} over TCP",
        up.udp_queries(),
        up.tcp_queries()
    );
    assert_eq!((up.udp_queries(), up.tcp_queries()), (1, 1), "fetched once");
    fwd.stop().await;
}
