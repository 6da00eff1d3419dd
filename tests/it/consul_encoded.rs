//! Consul service answers served from their pre-encoded records (the hot path, `consul::encoded`):
//! still shuffled, with the exact TTL, flags, question case and size rules of the general path,
//! and encoded again when the view changes (a health flip). A catalog file's: in
//! `consul_names::catalog_file_answers_without_consul`.

use std::collections::HashSet;
use std::time::Duration;

use crate::consul_names::{node, sim_with_web, svc};
use crate::support::consul_sim::{ConsulSim, Status};
use crate::support::upstream::TestUpstream;
use crate::support::*;
use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;

const ENCODED: &str = "consul_dns_forwarder_consul_encoded_answers_total";

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Asks `name` until an answer comes from the pre-encoded records (the watcher's blocking
/// query must be running first).
async fn until_encoded(fwd: &TestServer, name: &str) {
    let addr = fwd.addr;
    eventually(Duration::from_secs(5), async || {
        ask(addr, name, RecordType::A).await;
        fwd.metric(ENCODED, &[]) > 0.0
    })
    .await
    .expect("answers come from the pre-encoded records");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_encoded_answers_shuffle_keep_ttl_and_flags_and_follow_a_health_flip() {
    let sim = sim_with_web().await;
    let up = TestUpstream::start().await;
    let toml = TestConfig::new()
        .upstream(up.addr)
        .consul_http(sim.http_url())
        .service_ttl("17s")
        .toml();
    let fwd = TestServer::start(&toml).await;
    let addr = fwd.addr;
    until_encoded(&fwd, "web.service.consul.").await;
    let before = fwd.metric(ENCODED, &[]);
    let mut first = HashSet::new();
    for _ in 0..60 {
        let q = make_query("WeB.SeRvIcE.CoNsUl.", RecordType::A, None);
        let r = udp(addr, &q).await;
        assert_eq!(r.metadata.id, q.metadata.id);
        assert_eq!(r.queries[0].name().to_string(), "WeB.SeRvIcE.CoNsUl.");
        let md = &r.metadata;
        assert!(md.authoritative && md.recursion_available && md.recursion_desired);
        assert!(!md.truncation && !md.authentic_data);
        assert!(r.edns.is_none(), "no OPT without one in the query");
        assert_eq!(r.answers.len(), 3);
        assert!(r.answers.iter().all(|a| a.ttl == 17), "{:?}", r.answers);
        first.insert(addresses(&r)[0].clone());
    }
    assert_eq!(first.len(), 3, "every instance comes first at some point");
    assert!(
        fwd.metric(ENCODED, &[]) >= before + 60.0,
        "every one of them from the pre-encoded records"
    );
    let r = udp(
        addr,
        &make_query("web.service.consul.", RecordType::A, Some(1232)),
    )
    .await;
    assert!(r.edns.is_some_and(|e| e.max_payload() == 1232));
    assert_eq!(r.answers.len(), 3);

    sim.set_service_check("web-2", Status::Critical);
    let took = eventually(Duration::from_secs(2), async || {
        !addresses(&ask(addr, "web.service.consul.", RecordType::A).await)
            .contains(&"127.0.0.3".to_string())
    })
    .await
    .expect("the critical instance leaves the answers within 2 s");
    println!("critical → gone took {took:?}");
    let after_flip = fwd.metric(ENCODED, &[]);
    for _ in 0..10 {
        let r = ask(addr, "web.service.consul.", RecordType::A).await;
        assert_eq!(sorted(addresses(&r)), vec!["127.0.0.2", "127.0.0.4"]);
    }
    assert!(
        fwd.metric(ENCODED, &[]) > after_flip,
        "the new view is encoded and served from its records"
    );
    fwd.stop().await;
}

/// A watcher that stopped (idle) keeps its view fresh no more: the answers encoded from that
/// view are not served after it, though it was confirmed well within `stale_for`. The next
/// question starts a new watch, which sees the health change made while none ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_encoded_from_a_stopped_watcher_are_not_served() {
    let sim = sim_with_web().await;
    let up = TestUpstream::start().await;
    let toml = TestConfig::new()
        .upstream(up.addr)
        .consul_http(sim.http_url())
        .consul("watch_wait = \"1s\"\nwatch_idle = \"1s\"\nstale_for = \"1h\"")
        .toml();
    let fwd = TestServer::start(&toml).await;
    until_encoded(&fwd, "web.service.consul.").await;
    let stopped = eventually(Duration::from_secs(6), async || {
        fwd.metric("consul_dns_forwarder_consul_watchers", &[]) == 0.0
    })
    .await;
    assert!(stopped.is_some(), "the idle watcher stops");
    sim.set_service_check("web-2", Status::Critical);
    let encoded = fwd.metric(ENCODED, &[]);
    let r = ask(fwd.addr, "web.service.consul.", RecordType::A).await;
    assert_eq!(sorted(addresses(&r)), vec!["127.0.0.2", "127.0.0.4"]);
    assert_eq!(
        fwd.metric(ENCODED, &[]),
        encoded,
        "answered the general way, from a new watch"
    );
    fwd.stop().await;
}

/// A service of 300 instances (more than fit in any UDP reply): each size class gets what the
/// general path gives it (as many records as fit, TC over UDP; every one over TCP), a random
/// subset of distinct addresses each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_service_is_cut_per_size_class_from_its_encoded_records() {
    const INSTANCES: usize = 300;
    let sim = ConsulSim::start().await;
    for i in 0..INSTANCES {
        let n = format!("n{i}");
        node(&sim, &n, &format!("127.1.{}.{}", i / 200, i % 200 + 1));
        svc(
            &sim,
            &format!("big-{i}"),
            "big",
            &n,
            ("", 80),
            &[],
            Status::Passing,
        );
    }
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(
        &TestConfig::new()
            .upstream(up.addr)
            .consul_http(sim.http_url())
            .toml(),
    )
    .await;
    let addr = fwd.addr;
    let name = "big.service.consul.";
    // The general path's answer, before anything is encoded: 29 A records fill 512 bytes.
    let general = udp(addr, &make_query(name, RecordType::A, None)).await;
    assert_eq!(
        (general.answers.len(), general.metadata.truncation),
        (29, true)
    );
    until_encoded(&fwd, name).await;
    // Each round's 41 answers must all come from the encoded records. A view without a
    // blocking query of its own is answered from them only while its feeds vouch for it
    // (`consul::freshness`): a loaded machine (a full parallel run, once) can lose a few to
    // the general path while the view is fetched again. A hot path that does not hold for 41
    // answers in a row fails all three rounds.
    let mut general_per_round = Vec::new();
    for _ in 0..3 {
        let before = fwd.metric(ENCODED, &[]);
        let mut firsts = HashSet::new();
        for (edns, want, tc) in [(None, 29, true), (Some(1232), 74, true)] {
            for _ in 0..20 {
                let q = make_query(name, RecordType::A, edns);
                let bytes = raw_udp(addr, &q.to_vec().expect("encode"), Duration::from_secs(2))
                    .await
                    .expect("a reply");
                assert!(bytes.len() <= edns.map_or(512, usize::from));
                let r = Message::from_vec(&bytes).expect("decodes");
                assert_eq!((r.answers.len(), r.metadata.truncation), (want, tc));
                let got = addresses(&r);
                assert_eq!(got.iter().collect::<HashSet<_>>().len(), want, "distinct");
                firsts.insert(got[0].clone());
            }
        }
        assert!(
            firsts.len() > 20,
            "random subsets: {} first addresses",
            firsts.len()
        );
        let r = tcp(addr, &make_query(name, RecordType::A, None)).await;
        assert_eq!((r.answers.len(), r.metadata.truncation), (INSTANCES, false));
        let general = 41.0 - (fwd.metric(ENCODED, &[]) - before);
        general_per_round.push(general);
        if general == 0.0 {
            break;
        }
    }
    println!("answers the general path gave, per round of 41: {general_per_round:?}");
    assert_eq!(
        general_per_round.last(),
        Some(&0.0),
        "41 answers in a row from the encoded records"
    );
    fwd.stop().await;
}
