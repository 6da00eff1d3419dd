//! The soak run (issue 7): about 60 s of ~20k queries/s, Consul and forwarded names mixed, against
//! the real binary, while a check flaps every second, another instance goes critical for a long
//! stretch and the Consul simulator restarts once. Nothing may be lost, no known name may get
//! SERVFAIL, no answer may contain an instance critical for more than 2 s, and RSS stays steady.
//!
//! Ignored in the debug run (a debug build measures the debug build); `scripts/test.sh` runs it
//! with `--release -- --ignored`. `SOAK_SECONDS` and `SOAK_QPS` override the duration and rate.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::consul_sim::{ConsulSim, Status};
use crate::support::upstream::TestUpstream;
use crate::support::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};

/// How long a query may take before it counts as lost.
const LOST_AFTER: Duration = Duration::from_secs(2);

/// UDP sockets the load is spread over (the server sees several clients).
const CLIENT_SOCKETS: usize = 8;

/// How long an instance may stay in answers after turning critical.
const CRITICAL_GRACE: Duration = Duration::from_secs(2);

/// A client socket with a large receive buffer: the load generator shares the two cores with the
/// server, and a reply dropped by the client's own kernel buffer would count as lost.
fn client_socket() -> tokio::net::UdpSocket {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .expect("socket");
    let _ = socket.set_recv_buffer_size(8 * 1024 * 1024);
    socket.set_nonblocking(true).expect("nonblocking");
    socket
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .expect("addr")
                .into(),
        )
        .expect("bind");
    tokio::net::UdpSocket::from_std(socket.into()).expect("tokio socket")
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// When each instance address last turned critical (absent while passing).
type CriticalSince = Arc<Mutex<HashMap<String, Instant>>>;

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    answered: AtomicU64,
    servfail: AtomicU64,
    nxdomain: AtomicU64,
    violations: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by scripts/test.sh in release mode"]
async fn soak() {
    let seconds = env_or("SOAK_SECONDS", 60);
    let qps = env_or("SOAK_QPS", 20_000);
    let sim = ConsulSim::start().await;
    for (i, addr) in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
        .iter()
        .enumerate()
    {
        sim.add_simple("web", &format!("w{i}"), addr, 80);
    }
    for (i, addr) in ["127.0.1.2", "127.0.1.3"].iter().enumerate() {
        sim.add_simple("api", &format!("a{i}"), addr, 81);
    }
    let up = TestUpstream::start().await;
    let (server, addr) = spawn_forwarder(up.addr, &sim.http_url(), "127.0.0.1:0").await;
    let pid = server.0.id();
    // Warm: every name known before the clock starts.
    let warm = [
        "web.service.consul.",
        "api.service.consul.",
        "a.test.",
        "two.test.",
        "www.test.",
        "txt.test.",
    ];
    assert_rcode(addr, &warm, ResponseCode::NoError).await;

    let critical: CriticalSince = Arc::new(Mutex::new(HashMap::new()));
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();

    // The load: each socket sends its share at a steady pace and reads replies concurrently.
    let names: [(&str, RecordType, bool); 6] = [
        ("web.service.consul.", RecordType::A, true),
        ("web.service.consul.", RecordType::A, true),
        ("api.service.consul.", RecordType::A, false),
        ("a.test.", RecordType::A, false),
        ("two.test.", RecordType::A, false),
        ("www.test.", RecordType::A, false),
    ];
    let mut clients = Vec::new();
    for c in 0..CLIENT_SOCKETS {
        let tally = tally.clone();
        let critical = critical.clone();
        let per_socket = qps / CLIENT_SOCKETS as u64;
        clients.push(tokio::spawn(async move {
            let socket = Arc::new(client_socket());
            socket.connect(addr).await.expect("connect");
            let pending: Arc<Mutex<HashMap<u16, (Instant, bool)>>> =
                Arc::new(Mutex::new(HashMap::new()));
            let reader = {
                let socket = socket.clone();
                let pending = pending.clone();
                let tally = tally.clone();
                let critical = critical.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        let Ok(Ok(len)) = tokio::time::timeout(
                            LOST_AFTER + Duration::from_secs(1),
                            socket.recv(&mut buf),
                        )
                        .await
                        else {
                            return;
                        };
                        let Ok(reply) = Message::from_vec(&buf[..len]) else {
                            continue;
                        };
                        let Some((_, is_web)) =
                            pending.lock().expect("lock").remove(&reply.metadata.id)
                        else {
                            continue;
                        };
                        tally.answered.fetch_add(1, Ordering::Relaxed);
                        match reply.metadata.response_code {
                            ResponseCode::ServFail => {
                                tally.servfail.fetch_add(1, Ordering::Relaxed);
                            }
                            ResponseCode::NXDomain => {
                                tally.nxdomain.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {}
                        }
                        if is_web {
                            let now = Instant::now();
                            let since = critical.lock().expect("lock").clone();
                            for rec in &reply.answers {
                                if let RData::A(a) = &rec.data {
                                    if since
                                        .get(&a.0.to_string())
                                        .is_some_and(|t| now.duration_since(*t) > CRITICAL_GRACE)
                                    {
                                        tally.violations.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            }
                        }
                    }
                })
            };
            let mut id: u16 = (c as u16) << 12;
            let tick = Duration::from_millis(10);
            let per_tick = (per_socket / 100).max(1);
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut i = 0usize;
            let mut sent_here = 0u64;
            while Instant::now() < deadline {
                interval.tick().await;
                for _ in 0..per_tick {
                    let (name, qtype, is_web) = names[i % names.len()];
                    i += 1;
                    id = id.wrapping_add(1);
                    let mut q = make_query(name, qtype, None);
                    q.metadata.id = id;
                    let bytes = q.to_vec().expect("enc");
                    pending
                        .lock()
                        .expect("lock")
                        .insert(id, (Instant::now(), is_web));
                    if socket.send(&bytes).await.is_ok() {
                        tally.sent.fetch_add(1, Ordering::Relaxed);
                        sent_here += 1;
                    }
                }
                // Forget IDs long unanswered (they are counted as lost at the end) so the 16-bit
                // ID space can wrap without confusing old and new queries.
                let mut p = pending.lock().expect("lock");
                if p.len() > 20_000 {
                    p.retain(|_, (at, _)| at.elapsed() < LOST_AFTER);
                }
            }
            tokio::time::sleep(LOST_AFTER).await;
            reader.abort();
            sent_here
        }));
    }

    // The chaos: web-2 (127.0.0.3) flaps every second; web-3 (127.0.0.4) is critical from 25% to
    // 75% of the run; the simulator restarts once at half time.
    let mut rss = Vec::new();
    let mut flaps = 0;
    let mut restarted = false;
    let mut long_critical = false;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t = started.elapsed().as_secs_f64() / seconds as f64;
        flaps += 1;
        let web2_critical = flaps % 2 == 1;
        // Mark critical before Consul is told, so the grace period starts no later than the flip.
        if web2_critical {
            critical
                .lock()
                .expect("lock")
                .insert("127.0.0.3".into(), Instant::now());
        }
        sim.set_service_check(
            "web-2",
            if web2_critical {
                Status::Critical
            } else {
                Status::Passing
            },
        );
        if !web2_critical {
            critical.lock().expect("lock").remove("127.0.0.3");
        }
        if (0.25..0.75).contains(&t) && !long_critical {
            long_critical = true;
            critical
                .lock()
                .expect("lock")
                .insert("127.0.0.4".into(), Instant::now());
            sim.set_service_check("web-3", Status::Critical);
        } else if t >= 0.75 && long_critical {
            long_critical = false;
            sim.set_service_check("web-3", Status::Passing);
            critical.lock().expect("lock").remove("127.0.0.4");
        }
        if t >= 0.5 && !restarted {
            restarted = true;
            sim.stop().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            sim.restart().await;
        }
        rss.push(rss_kib(pid));
    }
    for c in clients {
        c.await.expect("join");
    }
    let sent = tally.sent.load(Ordering::Relaxed);
    let answered = tally.answered.load(Ordering::Relaxed);
    // Every query unanswered within LOST_AFTER (including ones whose ID was reused meanwhile).
    let lost = sent.saturating_sub(answered);
    let took = seconds as f64;
    let warm = rss.get(rss.len() / 4).copied().unwrap_or(0);
    let last = rss.last().copied().unwrap_or(0);
    println!(
        "soak: {seconds} s, {sent} queries sent ({:.0}/s), {answered} answered, {lost} lost, {} SERVFAIL, {} NXDOMAIN, {} answers with an instance critical > 2 s, {flaps} flips, 1 Consul restart, RSS {} KiB after warm-up → {} KiB at the end (max {} KiB)",
        sent as f64 / took,
        tally.servfail.load(Ordering::Relaxed),
        tally.nxdomain.load(Ordering::Relaxed),
        tally.violations.load(Ordering::Relaxed),
        warm,
        last,
        rss.iter().max().copied().unwrap_or(0),
    );
    assert!(
        sent as f64 / took > qps as f64 * 0.8,
        "the load generator kept up"
    );
    assert_eq!(lost, 0, "lost queries");
    assert_eq!(tally.servfail.load(Ordering::Relaxed), 0);
    assert_eq!(tally.nxdomain.load(Ordering::Relaxed), 0);
    assert_eq!(tally.violations.load(Ordering::Relaxed), 0);
    assert!(
        last <= warm + warm / 2 + 4096,
        "RSS grew from {warm} KiB to {last} KiB"
    );
    drop(server);
}
