//! Scale (issue 8): a 5,000-instance service answered within every size limit, the connection
//! budget towards Consul (also under health churn and agent restarts), and a cold start with ten
//! thousand service names at once.
//!
//! The two large ones are ignored in the debug run (they would measure a debug build's JSON
//! parsing); `scripts/test.sh` runs them with `--release -- --ignored`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::consul_sim::{ConsulSim, Status};
use crate::support::upstream::TestUpstream;
use crate::support::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

/// Forwarding to `up`, Consul names from `sim`'s HTTP API.
fn conf(up: &TestUpstream, sim: &ConsulSim) -> TestConfig {
    TestConfig::new()
        .upstream(up.addr)
        .consul_http(sim.http_url())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by scripts/test.sh in release mode"]
async fn a_five_thousand_instance_service_fits_every_limit() {
    let sim = ConsulSim::start().await;
    for n in 0..5000u32 {
        let addr = std::net::Ipv4Addr::from(0x0a00_0000 + n).to_string();
        sim.add_simple("big", &format!("node-{n}"), &addr, 80);
    }
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&conf(&up, &sim).toml()).await;
    let mut subsets = HashSet::new();
    for (edns, limit) in [(None, 512usize), (Some(1232u16), 1232)] {
        for _ in 0..5 {
            let r = udp_within(fwd.addr, "big.service.consul.", RecordType::A, edns, limit).await;
            assert_eq!(r.metadata.response_code, ResponseCode::NoError);
            assert!(r.metadata.truncation, "TC=1: TCP would give more");
            assert!(
                r.answers.len() >= limit / 16 - 4,
                "as many as fit: {}",
                r.answers.len()
            );
            subsets.insert(addresses(&r));
        }
    }
    assert_eq!(subsets.len(), 10, "a random subset every time");
    let r = tcp(
        fwd.addr,
        &make_query("big.service.consul.", RecordType::A, None),
    )
    .await;
    assert!(
        !r.metadata.truncation,
        "nothing more to get: no TC over TCP ({} answers, {:?})",
        r.answers.len(),
        r.metadata
    );
    assert!(
        r.answers.len() > 1900,
        "TCP carries as many as fit in 64 KiB (names compressed in the first 120 only): {}",
        r.answers.len()
    );
    let srv = tcp(
        fwd.addr,
        &make_query("big.service.consul.", RecordType::SRV, None),
    )
    .await;
    assert!(srv.answers.len() > 500, "{}", srv.answers.len());
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_never_sees_more_connections_than_the_budget() {
    let sim = ConsulSim::start().await;
    for n in 0..300 {
        sim.add_simple(
            &format!("svc{n}"),
            &format!("node{n}"),
            &format!("127.0.{}.{}", n / 200 + 1, n % 200 + 2),
            80,
        );
    }
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&conf(&up, &sim).consul("max_connections = 8").toml()).await;
    let mut tasks = Vec::new();
    for n in 0..300 {
        let addr = fwd.addr;
        tasks.push(tokio::spawn(async move {
            ask(addr, &format!("svc{n}.service.consul."), RecordType::A).await
        }));
    }
    let mut servfail = 0;
    for t in tasks {
        let r = t.await.expect("join");
        if r.metadata.response_code == ResponseCode::ServFail {
            servfail += 1;
        } else {
            assert_eq!(addresses(&r).len(), 1);
        }
    }
    // Keep the watchers running a little: blocking queries hold their connections.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peak = sim.max_concurrent_connections();
    println!("300 services, budget 8: peak {peak} connections, {servfail} SERVFAIL");
    assert!(peak <= 8, "{peak} connections to Consul");
    assert_eq!(servfail, 0);
    fwd.stop().await;
}

/// A cold start taking this long is stalled, not slow. Issue 8's figure (every name within 3 s)
/// is a speed target: `benches/load.sh` measures it (scenario `cold-start`, pinned to one core,
/// beside other contenders), where a timing belongs; this test asserts what is structural.
const COLD_START_STALL: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by scripts/test.sh in release mode"]
async fn cold_start_with_ten_thousand_names() {
    let sim = ConsulSim::start().await;
    const SERVICES: u32 = 10_000;
    for n in 0..SERVICES {
        sim.add_simple(
            &format!("s{n}"),
            &format!("h{n}"),
            &std::net::Ipv4Addr::from(0x0a01_0000 + n).to_string(),
            80,
        );
    }
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&conf(&up, &sim).toml()).await;
    let started = Instant::now();
    let names: Vec<String> = (0..SERVICES)
        .map(|n| format!("s{n}.service.consul."))
        .collect();
    // All at once, through a few hundred sockets in flight at a time (a fleet of clients).
    let chunks: Vec<Vec<String>> = names.chunks(25).map(|c| c.to_vec()).collect();
    let mut tasks = Vec::new();
    for chunk in chunks {
        let addr = fwd.addr;
        tasks.push(tokio::spawn(async move {
            let mut bad = 0;
            for name in chunk {
                let r = ask(addr, &name, RecordType::A).await;
                if r.metadata.response_code != ResponseCode::NoError || r.answers.len() != 1 {
                    bad += 1;
                }
            }
            bad
        }));
    }
    let mut bad = 0;
    for t in tasks {
        bad += t.await.expect("join");
    }
    let took = started.elapsed();
    let peak = sim.max_concurrent_connections();
    println!("cold start: {SERVICES} names answered in {took:?}, {bad} not answered, peak {peak} connections");
    assert_eq!(bad, 0, "no SERVFAIL storm");
    assert!(
        took < COLD_START_STALL,
        "every name answered, none stalled: {took:?}"
    );
    assert!(
        peak <= 32,
        "{peak} connections to Consul with the default budget of 32"
    );
    fwd.stop().await;
}

/// Services in the churn runs: many more than either budget has connections.
const CHURN_SERVICES: usize = 500;
/// Check flips: one batch every `FLIP_EVERY`, for `FLIP_ROUNDS` batches (4 s and more of churn).
/// The agent restarts twice meanwhile, then hangs for `HANG_FOR`.
const FLIP_ROUNDS: usize = 400;
const FLIP_BATCH: usize = 25;
const FLIP_EVERY: Duration = Duration::from_millis(10);
/// How long the agent hangs (reads requests, never answers) in the churn runs: longer than a
/// fetch's timeout, so connections are closed by us while the agent holds them.
const HANG_FOR: Duration = Duration::from_millis(3000);
/// Every service is asked at once, again and again, for this long (the flips, then the hang),
/// and at most `ASK_ROUNDS` times.
const ASK_FOR: Duration = Duration::from_secs(8);
const ASK_ROUNDS: usize = 100;

/// Asks every `svcN` once, all at once; returns the names that got SERVFAIL or not exactly one
/// address.
async fn ask_all(addr: SocketAddr) -> Vec<String> {
    let mut tasks = Vec::new();
    for n in 0..CHURN_SERVICES {
        tasks.push(tokio::spawn(async move {
            let name = format!("svc{n}.service.consul.");
            let r = ask(addr, &name, RecordType::A).await;
            let good =
                r.metadata.response_code == ResponseCode::NoError && addresses(&r).len() == 1;
            (!good).then(|| format!("{name} {:?} {:?}", r.metadata.response_code, addresses(&r)))
        }));
    }
    let mut bad = Vec::new();
    for t in tasks {
        bad.extend(t.await.expect("join"));
    }
    bad
}

/// 300 services asked again and again while their checks flip between passing and warning
/// (both served, so every name keeps exactly one address) many times a second, the agent is
/// restarted twice and then hangs for a while: blocking queries return and start over, watches
/// are dropped and re-taken, refreshes on demand come and go, timed-out requests close their
/// connections. Returns (peak connections Consul saw, bad answers).
async fn churn(budget: usize) -> (usize, Vec<String>) {
    let sim = ConsulSim::start().await;
    let ids: Vec<String> = (0..CHURN_SERVICES)
        .map(|n| {
            sim.add_simple_id(
                &format!("svc{n}"),
                &format!("node{n}"),
                &format!("127.0.{}.{}", n / 200 + 1, n % 200 + 2),
                80,
            )
        })
        .collect();
    let up = TestUpstream::start().await;
    // Short waits and TTLs make the most requests: blocking queries end every second even
    // without changes, and views without a watch are refreshed on demand every second.
    let config = conf(&up, &sim)
        .consul(&format!("max_connections = {budget}\nwatch_wait = \"1s\""))
        .service_ttl("1s");
    let fwd = TestServer::start(&config.toml()).await;
    let addr = fwd.addr;
    // Twice: a service asked again is worth a blocking watch, so watches fill the budget.
    let mut bad = ask_all(addr).await;
    bad.extend(ask_all(addr).await);

    let flip = async {
        for round in 0..FLIP_ROUNDS {
            let status = if round % 2 == 0 {
                Status::Warning
            } else {
                Status::Passing
            };
            for k in 0..FLIP_BATCH {
                sim.set_service_check(&ids[(round * 7 + k * 13) % CHURN_SERVICES], status);
            }
            tokio::time::sleep(FLIP_EVERY).await;
        }
    };
    let restart = async {
        for pause in [Duration::from_millis(1000), Duration::from_millis(1500)] {
            tokio::time::sleep(pause).await;
            sim.stop().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            sim.restart().await;
        }
        // Then, once the flips are over, a hung agent: requests time out and we close their
        // connections, which the agent counts until it notices; new ones must wait for that.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        sim.set_hang(true);
        tokio::time::sleep(HANG_FOR).await;
        sim.set_hang(false);
    };
    let asks = async {
        let mut bad = Vec::new();
        let started = Instant::now();
        for _ in 0..ASK_ROUNDS {
            if started.elapsed() > ASK_FOR {
                break;
            }
            bad.extend(ask_all(addr).await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bad
    };
    let ((), (), churn_bad) = tokio::join!(flip, restart, asks);
    bad.extend(churn_bad);
    let peak = sim.max_concurrent_connections();
    println!(
        "churn, budget {budget}: peak {peak} connections ({} requests), {} bad answers",
        sim.total_requests(),
        bad.len()
    );
    fwd.stop().await;
    (peak, bad)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_of_8_holds_under_churn_and_restarts() {
    let (peak, bad) = churn(8).await;
    assert!(peak <= 8, "{peak} connections to Consul with a budget of 8");
    assert!(bad.is_empty(), "names that exist must answer: {bad:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_of_32_holds_under_churn_and_restarts() {
    let (peak, bad) = churn(32).await;
    assert!(
        peak <= 32,
        "{peak} connections to Consul with a budget of 32"
    );
    assert!(bad.is_empty(), "names that exist must answer: {bad:?}");
}

/// Failover under the budget: agent A hangs with our connections (watches, fetches) held, the
/// client moves to B, and every service must come to be answered from B (whose catalog has
/// other addresses), without a bad answer meanwhile and without either agent ever seeing more
/// than the budget (each agent has its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_over_from_a_hung_agent_keeps_both_within_the_budget() {
    const SERVICES: usize = 100;
    let a = ConsulSim::start().await;
    let b = ConsulSim::start().await;
    let address = |agent: u8, n: usize| format!("127.{agent}.{}.{}", n / 200, n % 200 + 2);
    for n in 0..SERVICES {
        a.add_simple(&format!("svc{n}"), &format!("node{n}"), &address(1, n), 80);
        b.add_simple(&format!("svc{n}"), &format!("node{n}"), &address(2, n), 80);
    }
    let up = TestUpstream::start().await;
    let toml = TestConfig::new()
        .upstream(up.addr)
        .consul_http(a.http_url())
        .consul_http(b.http_url())
        .consul("max_connections = 8\nwatch_wait = \"1s\"")
        .service_ttl("1s")
        .toml();
    let fwd = TestServer::start(&toml).await;
    let addr = fwd.addr;
    // Which agent answered each service; asked all at once.
    let answered_by = async || {
        let mut tasks = Vec::new();
        for n in 0..SERVICES {
            tasks.push(tokio::spawn(async move {
                let r = ask(addr, &format!("svc{n}.service.consul."), RecordType::A).await;
                match addresses(&r).as_slice() {
                    [one] if *one == address(1, n) => Ok(1),
                    [one] if *one == address(2, n) => Ok(2),
                    _ => Err(format!(
                        "svc{n}: {:?} {:?}",
                        r.metadata.response_code, r.answers
                    )),
                }
            }));
        }
        let mut by = Vec::new();
        for t in tasks {
            by.push(t.await.expect("join"));
        }
        by
    };
    for _ in 0..2 {
        let by = answered_by().await;
        assert!(by.iter().all(|r| *r == Ok(1)), "all from agent A: {by:?}");
    }
    a.set_hang(true);
    let mut bad = Vec::new();
    let mut rounds = 0;
    let took = eventually(Duration::from_secs(20), async || {
        rounds += 1;
        let by = answered_by().await;
        bad.extend(by.iter().filter_map(|r| r.clone().err()));
        by.iter().all(|r| *r == Ok(2))
    })
    .await;
    println!(
        "failover after {rounds} rounds ({took:?}): peaks A {} B {}, {} bad answers",
        a.max_concurrent_connections(),
        b.max_concurrent_connections(),
        bad.len()
    );
    assert!(took.is_some(), "every service answered from agent B");
    assert!(bad.is_empty(), "names that exist must answer: {bad:?}");
    assert!(a.max_concurrent_connections() <= 8);
    assert!(b.max_concurrent_connections() <= 8);
    fwd.stop().await;
}
