//! A flood of made-up Consul names (issue 13's acceptance test): 100,000 unique names that do
//! not exist, under `.service`, `.node`, `.query` and unknown datacenters, sent as fast as the
//! forwarder answers, while real names are asked alongside. Names from clients must not turn
//! into Consul requests, watchers, metric series or memory.
//!
//! Ignored in the debug run; `scripts/test.sh` runs it with `--release -- --ignored`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::consul_sim::ConsulSim;
use crate::support::upstream::TestUpstream;
use crate::support::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;

/// Unique made-up names in the flood, at least.
const FLOOD_NAMES: u32 = 100_000;
/// The flood goes on with further made-up names until this many real names were answered
/// alongside it, so that their p99 means something however fast the forwarder gets (a 0.74 s
/// flood once left 99 samples).
const MIN_PROBES: u64 = 200;
/// ... but never beyond this many names.
const MAX_FLOOD_NAMES: u32 = 1_000_000;
/// Client sockets sending the flood, and queries each keeps in flight.
const FLOOD_SOCKETS: u32 = 4;
const FLOOD_WINDOW: u32 = 64;
/// How long a flood socket waits for the rest of a window before sending the next one.
const WINDOW_WAIT: Duration = Duration::from_millis(200);
/// The whole flood must be over by then (it takes seconds in release).
const FLOOD_DEADLINE: Duration = Duration::from_secs(120);
/// The real names are asked this often during the flood.
const PROBE_EVERY: Duration = Duration::from_millis(5);

/// The bounds.
const MAX_REQUESTS_DURING_FLOOD: usize = 50;
const MAX_RSS_GROWTH_KIB: u64 = 16 * 1024;
const MAX_PROBE_P99: Duration = Duration::from_millis(50);

/// The lists the inventory keeps: requests to these are "the catalog watches".
const CATALOG_WATCHES: [&str; 4] = [
    "/v1/catalog/services",
    "/v1/catalog/nodes",
    "/v1/catalog/datacenters",
    "/v1/query?",
];

fn flood_name(i: u32) -> String {
    match i % 4 {
        0 => format!("f{i}.service.consul."),
        1 => format!("f{i}.node.consul."),
        2 => format!("f{i}.query.consul."),
        _ => format!("web.service.dc{i}.consul."),
    }
}

/// Sends names from `first` stepping by `step`, a window at a time, until `FLOOD_NAMES` are sent
/// and `probes` has reached `MIN_PROBES` (or `MAX_FLOOD_NAMES` are sent); returns the count of
/// replies by rcode (NXDOMAIN, other) and of queries unanswered.
async fn flood(addr: SocketAddr, first: u32, step: u32, probes: Arc<AtomicU64>) -> (u64, u64, u64) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let (mut nxdomain, mut other, mut lost) = (0u64, 0u64, 0u64);
    let mut next = first;
    let mut buf = vec![0u8; 4096];
    let more_wanted = |next: u32| {
        next < FLOOD_NAMES || (next < MAX_FLOOD_NAMES && probes.load(Ordering::SeqCst) < MIN_PROBES)
    };
    while more_wanted(next) {
        let mut sent = 0u64;
        for _ in 0..FLOOD_WINDOW {
            if !more_wanted(next) {
                break;
            }
            let q = make_query(&flood_name(next), RecordType::A, None);
            socket
                .send_to(&q.to_vec().expect("encode"), addr)
                .await
                .expect("send");
            next += step;
            sent += 1;
        }
        let mut got = 0u64;
        while got < sent {
            match tokio::time::timeout(WINDOW_WAIT, socket.recv(&mut buf)).await {
                Ok(Ok(len)) => {
                    got += 1;
                    match Message::from_vec(&buf[..len]).map(|m| m.metadata.response_code) {
                        Ok(ResponseCode::NXDomain) => nxdomain += 1,
                        _ => other += 1,
                    }
                }
                _ => break,
            }
        }
        lost += sent - got;
    }
    (nxdomain, other, lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by scripts/test.sh in release mode"]
async fn a_flood_of_made_up_names_costs_consul_nothing() {
    let sim = ConsulSim::start().await;
    for s in 0..20 {
        for i in 0..2 {
            sim.add_simple(
                &format!("svc-{s}"),
                &format!("n{s}-{i}"),
                &format!("127.0.{}.{}", 10 + s, 2 + i),
                80,
            );
        }
    }
    sim.add_prepared_query("geo", "svc-0", None, None);
    let up = TestUpstream::start().await;
    let metrics_listen = format!("127.0.0.1:{}", free_port());
    let (server, addr) = spawn_forwarder(up.addr, &sim.http_url(), &metrics_listen).await;
    let pid = server.0.id();

    let real: Vec<String> = (0..20)
        .map(|s| format!("svc-{s}.service.consul."))
        .chain([
            "n0-0.node.consul.".to_owned(),
            "geo.query.consul.".to_owned(),
        ])
        .collect();
    for name in &real {
        let r = ask(addr, name, RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{name}");
        assert!(!r.answers.is_empty(), "{name}");
    }
    // The inventory is loaded once a made-up name of each kind is NXDOMAIN.
    let made_up = [
        "warm.service.consul.",
        "warm.node.consul.",
        "warm.query.consul.",
        "web.service.warm.consul.",
    ];
    assert_rcode(addr, &made_up, ResponseCode::NXDomain).await;
    // Let the lists settle into their blocking queries before the clock starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = rss_kib(pid);
    let lines_before = sim.request_lines().len();

    // Real names asked alongside the flood, one every PROBE_EVERY, with their latency.
    let flooding = Arc::new(AtomicBool::new(true));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let probes_answered = Arc::new(AtomicU64::new(0));
    let probe_failures = Arc::new(AtomicU64::new(0));
    let prober = {
        let (flooding, latencies, answered, failures) = (
            flooding.clone(),
            latencies.clone(),
            probes_answered.clone(),
            probe_failures.clone(),
        );
        let real = real.clone();
        tokio::spawn(async move {
            let mut i = 0usize;
            while flooding.load(Ordering::SeqCst) {
                let q = make_query(&real[i % real.len()], RecordType::A, None);
                i += 1;
                let started = Instant::now();
                let reply = raw_udp(addr, &q.to_vec().expect("encode"), Duration::from_secs(1))
                    .await
                    .and_then(|b| Message::from_vec(&b).ok());
                match reply {
                    Some(m)
                        if m.metadata.response_code == ResponseCode::NoError
                            && !m.answers.is_empty() =>
                    {
                        latencies.lock().expect("lock").push(started.elapsed());
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(PROBE_EVERY).await;
            }
        })
    };

    let started = Instant::now();
    let senders: Vec<_> = (0..FLOOD_SOCKETS)
        .map(|k| tokio::spawn(flood(addr, k, FLOOD_SOCKETS, probes_answered.clone())))
        .collect();
    let (mut nxdomain, mut other, mut lost) = (0, 0, 0);
    for s in senders {
        let (n, o, l) = tokio::time::timeout(FLOOD_DEADLINE, s)
            .await
            .expect("the flood ends in time")
            .expect("flood task");
        nxdomain += n;
        other += o;
        lost += l;
    }
    let took = started.elapsed();
    flooding.store(false, Ordering::SeqCst);
    prober.await.expect("prober");
    let rss_after = rss_kib(pid);

    let lines = sim.request_lines();
    let during: Vec<&String> = lines[lines_before..]
        .iter()
        .filter(|l| !CATALOG_WATCHES.iter().any(|w| l.contains(w)))
        .collect();
    let mut latencies = latencies.lock().expect("lock").clone();
    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q) as usize];
    let (p50, p99) = (p(0.5), p(0.99));
    let growth = rss_after.saturating_sub(rss_before);
    let metrics = http_get(metrics_listen.parse().expect("addr"), "/metrics")
        .await
        .1;
    let sent = nxdomain + other + lost;
    println!(
        "flood: {sent} made-up names in {:.2} s ({:.0}/s): {nxdomain} NXDOMAIN, {other} other, {lost} unanswered",
        took.as_secs_f64(),
        sent as f64 / took.as_secs_f64()
    );
    println!(
        "Consul requests during the flood beyond the catalog watches: {} (bound {MAX_REQUESTS_DURING_FLOOD}); all requests: {}",
        during.len(),
        lines.len() - lines_before
    );
    println!("RSS {rss_before} KiB -> {rss_after} KiB (+{growth} KiB, bound {MAX_RSS_GROWTH_KIB})");
    println!(
        "real names during the flood: {} answered, p50 {:.2} ms, p99 {:.2} ms (bound {} ms), {} failed",
        latencies.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        MAX_PROBE_P99.as_millis(),
        probe_failures.load(Ordering::SeqCst)
    );
    println!(
        "watchers {}, limit drops: {}",
        metric_in(&metrics, "consul_dns_forwarder_consul_watchers", &[]),
        metric_in(&metrics, "consul_dns_forwarder_limit_drops_total", &[])
    );

    assert_eq!(other, 0, "every answered made-up name is NXDOMAIN");
    assert!(
        nxdomain >= sent * 9 / 10,
        "most of the flood answered: {nxdomain}"
    );
    assert!(
        during.len() <= MAX_REQUESTS_DURING_FLOOD,
        "requests during the flood: {during:?}"
    );
    assert!(growth <= MAX_RSS_GROWTH_KIB, "RSS grew {growth} KiB");
    assert_eq!(
        probe_failures.load(Ordering::SeqCst),
        0,
        "no real name failed"
    );
    assert!(
        latencies.len() as u64 >= MIN_PROBES,
        "real names were asked throughout: {} answered",
        latencies.len()
    );
    assert!(p99 <= MAX_PROBE_P99, "p99 of real names {p99:?}");
    // Only the real services have watchers.
    assert!(metric_in(&metrics, "consul_dns_forwarder_consul_watchers", &[]) <= 20.0);
    drop(server);
}
