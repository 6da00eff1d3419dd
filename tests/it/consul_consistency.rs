//! Which Consul servers answer the forwarder's reads: stale reads by default, as Consul's own
//! DNS interface does (`dns_config.allow_stale`), the leader when `allow_stale = false`, and a
//! read from a server too far behind the leader (`max_stale`) asked again of the leader.

use std::time::Duration;

use crate::support::consul_sim::ConsulSim;
use crate::support::*;
use hickory_proto::rr::RecordType;

/// A forwarder in front of `sim`, with `web` (one instance) registered and asked for once.
async fn ask_web(sim: &ConsulSim, consul_lines: &str) -> TestServer {
    sim.add_simple("web", "n1", "127.0.0.2", 8080);
    let (fwd, _up) = TestServer::with_consul(&sim.http_url(), consul_lines).await;
    let reply = ask(fwd.addr, "web.service.consul.", RecordType::A).await;
    assert_eq!(addresses(&reply), vec!["127.0.0.2"]);
    fwd
}

/// The request targets (path and query) the simulator saw for `path`.
fn reads_of(sim: &ConsulSim, path: &str) -> Vec<String> {
    sim.request_log()
        .into_iter()
        .filter(|t| t.split('?').next() == Some(path))
        .collect()
}

fn is_stale(target: &str) -> bool {
    target.split_once('?').is_some_and(|(_, q)| {
        q.split('&')
            .any(|kv| kv == "stale" || kv.starts_with("stale="))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_is_stale_by_default() {
    let sim = ConsulSim::start().await;
    let fwd = ask_web(&sim, "").await;
    // The lists the inventory keeps and the service's own fetch (and its watch, once started).
    for path in ["/v1/catalog/services", "/v1/health/service/web"] {
        let reads = reads_of(&sim, path);
        assert!(!reads.is_empty(), "no read of {path}");
        assert!(reads.iter().all(|t| is_stale(t)), "{path}: {reads:?}");
    }
    assert_eq!(
        fwd.metric(
            "consul_dns_forwarder_consul_requests_total",
            &[("outcome", "too_stale")]
        ),
        0.0
    );
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_stale_false_reads_from_the_leader() {
    let sim = ConsulSim::start().await;
    let fwd = ask_web(&sim, "allow_stale = false").await;
    let all = sim.request_log();
    assert!(all.iter().any(|t| t.starts_with("/v1/health/service/web")));
    assert!(all.iter().all(|t| !is_stale(t)), "{all:?}");
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_from_a_server_behind_max_stale_is_asked_again_of_the_leader() {
    let sim = ConsulSim::start().await;
    // The server answering stale reads last heard from the leader 5 s ago.
    sim.set_follower_lag(Duration::from_secs(5));
    let fwd = ask_web(&sim, "max_stale = \"1s\"").await;
    let reads = reads_of(&sim, "/v1/health/service/web");
    let stale = reads.iter().filter(|t| is_stale(t)).count();
    let leader: Vec<&String> = reads.iter().filter(|t| !is_stale(t)).collect();
    assert!(stale >= 1, "{reads:?}");
    // The repeat goes to the leader at once: no blocking parameters.
    assert!(!leader.is_empty(), "{reads:?}");
    assert!(leader.iter().all(|t| !t.contains("index=")), "{reads:?}");
    assert!(
        fwd.metric(
            "consul_dns_forwarder_consul_requests_total",
            &[("endpoint", "health_service"), ("outcome", "too_stale")]
        ) >= 1.0
    );
    fwd.stop().await;

    // Within max_stale: one read, no repeat.
    let sim = ConsulSim::start().await;
    sim.set_follower_lag(Duration::from_millis(500));
    let fwd = ask_web(&sim, "max_stale = \"1s\"").await;
    let reads = reads_of(&sim, "/v1/health/service/web");
    assert!(reads.iter().all(|t| is_stale(t)), "{reads:?}");
    fwd.stop().await;
}
