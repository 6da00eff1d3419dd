//! Names from clients are untrusted: a label may hold any byte, and the forwarder asks Consul
//! with its ACL token. Every label position is tried with every character class that could
//! steer an HTTP request, over real DNS against the Consul simulator, and every request line
//! the simulator received is held against the endpoints the forwarder may ask for.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::support::consul_sim::ConsulSim;
use crate::support::upstream::TestUpstream;
use crate::support::*;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};

/// Every character class of the issue, alone and inside a label, plus the two attacks seen on
/// the old code (a path climbing to the KV store, a `?filter=` oracle).
fn hostile_labels() -> Vec<Vec<u8>> {
    let mut labels: Vec<Vec<u8>> = Vec::new();
    for c in [
        b'/', b'?', b'#', b'%', b'&', b'=', b'+', b';', b':', b'@', b'\\', b'\0', b' ', b'"',
        b'\'', b'.', b'*', b'<', b'\n', 0x7f, 0xff,
    ] {
        labels.push(vec![c]);
        labels.push([b"we".as_slice(), &[c], b"b"].concat());
    }
    labels.push(b"..".to_vec());
    labels.push(b".".to_vec());
    labels.push("caf\u{e9}".as_bytes().to_vec());
    labels.push(b"%2e%2e".to_vec());
    labels.push(b"web%2Fx".to_vec());
    labels.push(b"../../../kv/secret?raw#".to_vec());
    labels.push(b"web?filter=Service.Meta.secret==\"hunter2\"#".to_vec());
    labels.push(b"web&dc=dc1".to_vec());
    labels
}

/// Names that are valid in Consul's alphabet but name nothing there: they must cost no request
/// either (the inventory knows they do not exist).
fn valid_but_unknown_labels() -> Vec<Vec<u8>> {
    vec![vec![b'a'; 63], b"NOSUCH".to_vec(), b"no_such-2".to_vec()]
}

/// Every position a client-controlled label can take in a Consul name, with `x` the label.
fn positions(x: &[u8]) -> Vec<(Vec<Vec<u8>>, RecordType)> {
    let l = |s: &str| s.as_bytes().to_vec();
    let x = x.to_vec();
    let under = [b"_".as_slice(), &x].concat();
    vec![
        (vec![x.clone(), l("service")], RecordType::A),
        (vec![x.clone(), l("web"), l("service")], RecordType::A),
        (vec![l("web"), l("service"), x.clone()], RecordType::A),
        (vec![x.clone(), l("node")], RecordType::A),
        (vec![l("n1"), x.clone(), l("node")], RecordType::A),
        (vec![l("n1"), l("node"), x.clone()], RecordType::A),
        (vec![x.clone(), l("query")], RecordType::A),
        (vec![l("geo"), l("query"), x.clone()], RecordType::A),
        (
            vec![under.clone(), l("_tcp"), l("service")],
            RecordType::SRV,
        ),
        (vec![l("_web"), under, l("service")], RecordType::SRV),
        (
            vec![l("_web"), l("_tcp"), l("service"), x.clone()],
            RecordType::SRV,
        ),
        (vec![l("_web"), l("_tcp"), x.clone()], RecordType::SRV),
        (vec![x.clone(), l("addr")], RecordType::A),
    ]
    .into_iter()
    .chain(locality_and_mesh_positions(&x))
    .collect()
}

/// The positions of the locality labels (datacenter, peer, Enterprise namespace and partition,
/// the namespace of Enterprise's `<ns>.<dc>`) after `.service` and `.connect`, and of the mesh
/// kinds.
fn locality_and_mesh_positions(x: &[u8]) -> Vec<(Vec<Vec<u8>>, RecordType)> {
    let l = |s: &str| s.as_bytes().to_vec();
    let x = x.to_vec();
    let locality = ["dc", "peer", "ns", "ap", "dc1"]
        .into_iter()
        .flat_map(|after| {
            ["service", "connect"]
                .map(|kind| (vec![l("web"), l(kind), x.clone(), l(after)], RecordType::A))
        });
    locality
        .chain([
            (vec![x.clone(), l("connect")], RecordType::A),
            (vec![x.clone(), l("ingress")], RecordType::SRV),
            (vec![x.clone(), l("virtual")], RecordType::A),
            (vec![l("web"), l("virtual"), x.clone()], RecordType::A),
            (
                vec![l("n1"), l("node"), x.clone(), l("peer")],
                RecordType::A,
            ),
            (
                vec![[b"_".as_slice(), &x].concat(), l("_tcp"), l("query")],
                RecordType::SRV,
            ),
        ])
        .collect()
}

/// The query, or `None` where the position makes a label longer than DNS allows (`_` before a
/// 63-byte label).
fn query_for(labels: &[Vec<u8>], qtype: RecordType) -> Option<Message> {
    if labels.iter().any(|l| l.len() > 63) {
        return None;
    }
    let mut all: Vec<&[u8]> = labels.iter().map(Vec::as_slice).collect();
    all.push(b"consul");
    let name = Name::from_labels(all).expect("labels of at most 63 bytes");
    let mut m = Message::query();
    m.metadata.id = rand::random();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name, qtype));
    Some(m)
}

/// The endpoints the forwarder may ask for, and the parameters each may carry.
fn allowed_request(line: &str, names: &BTreeSet<&str>) -> Result<(), String> {
    let target = line
        .strip_prefix("GET ")
        .and_then(|rest| rest.strip_suffix(" HTTP/1.1"))
        .ok_or("not a GET request line")?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let name_ok = |n: &str| names.contains(n);
    let segments: Vec<&str> = path.split('/').collect();
    let known_path = match segments.as_slice() {
        ["", "v1", "health", "service" | "connect" | "ingress", name]
        | ["", "v1", "catalog", "node", name] => name_ok(name),
        ["", "v1", "query", name, "execute"] => name_ok(name),
        ["", "v1", "health", "state", "critical" | "warning"]
        | ["", "v1", "catalog", "services" | "nodes" | "datacenters"]
        | ["", "v1", "peerings" | "namespaces" | "partitions"]
        | ["", "v1", "query"]
        | ["", "v1", "agent", "self"]
        | ["", "v1", "status", "leader"] => true,
        _ => false,
    };
    if !known_path {
        return Err(format!(
            "path {path:?} is not an endpoint asked for a known name"
        ));
    }
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value_ok = value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !matches!(
            key,
            "dc" | "index" | "wait" | "stale" | "peer" | "ns" | "partition"
        ) || !value_ok
        {
            return Err(format!("parameter {pair:?} was never intended"));
        }
        // A peer, namespace or partition is asked for only once Consul listed it.
        if matches!(key, "peer" | "ns" | "partition") && !name_ok(value) {
            return Err(format!(
                "parameter {pair:?} names what Consul does not have"
            ));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_labels_never_reach_consul_in_any_position() {
    let sim = ConsulSim::start().await;
    sim.add_simple("web", "n1", "127.0.0.2", 8080);
    sim.add_prepared_query("geo", "web", None, None);
    sim.add_peering("p1");
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&forwarder_config(&sim, &up)).await;

    // The real names first, so their views and the catalog lists are loaded.
    for (name, qtype) in [
        ("web.service.consul.", RecordType::A),
        ("web.service.dc1.dc.consul.", RecordType::A),
        ("n1.node.consul.", RecordType::A),
        ("geo.query.consul.", RecordType::A),
    ] {
        let r = ask(fwd.addr, name, qtype).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{name}");
        assert_eq!(addresses(&r), vec!["127.0.0.2"], "{name}");
    }
    let before = sim.request_lines().len();

    let mut tried = 0;
    for label in hostile_labels()
        .into_iter()
        .chain(valid_but_unknown_labels())
    {
        for (labels, qtype) in positions(&label) {
            let Some(q) = query_for(&labels, qtype) else {
                continue;
            };
            let r = udp(fwd.addr, &q).await;
            tried += 1;
            assert!(
                matches!(
                    r.metadata.response_code,
                    ResponseCode::NXDomain | ResponseCode::NoError
                ),
                "{labels:?} {qtype}: {:?}, never SERVFAIL",
                r.metadata.response_code
            );
            if r.metadata.response_code == ResponseCode::NoError {
                // Only a position that keeps the real name whole may answer (an unknown tag
                // of web, or a label Consul's alphabet has, in a position that ignores it).
                assert!(
                    r.answers.is_empty(),
                    "{labels:?} {qtype}: answered {:?}",
                    r.answers
                );
            }
        }
    }
    // Uppercase is the same name, answered.
    let r = ask(fwd.addr, "WEB.SERVICE.CONSUL.", RecordType::A).await;
    assert_eq!(addresses(&r), vec!["127.0.0.2"]);

    // Every request line the simulator saw, from the very first, is a known endpoint with a
    // known name and only the parameters the forwarder means to send; the hostile phase
    // added no request for any name.
    let names: BTreeSet<&str> = ["web", "n1", "geo", "p1"].into_iter().collect();
    let lines = sim.request_lines();
    for line in &lines {
        if let Err(why) = allowed_request(line, &names) {
            panic!("request {line:?}: {why}");
        }
    }
    println!(
        "{tried} hostile queries; {} requests to Consul during them, none for a name:",
        lines.len() - before
    );
    let distinct: BTreeSet<String> = lines[before..]
        .iter()
        .map(|l| l.split('?').next().unwrap_or(l).to_owned())
        .collect();
    for line in distinct {
        println!("  {line}");
    }
    fwd.stop().await;
}

fn forwarder_config(sim: &ConsulSim, up: &TestUpstream) -> String {
    TestConfig::new()
        .upstream(up.addr)
        .upstream_timeout("1s")
        .metrics_default()
        .consul_http(sim.http_url())
        .toml()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_registered_later_is_answered_once_the_catalog_shows_it() {
    let sim = ConsulSim::start().await;
    sim.add_simple("web", "n1", "127.0.0.2", 8080);
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&forwarder_config(&sim, &up)).await;
    let later = [
        ("late.service.consul.", "127.0.0.9"),
        ("late-node.node.consul.", "127.0.0.9"),
        ("later.query.consul.", "127.0.0.9"),
    ];
    for (name, _) in later {
        let r = ask(fwd.addr, name, RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain, "{name}");
    }
    let lookups_before = sim.requests("/v1/health/service/late")
        + sim.requests("/v1/catalog/node/late")
        + sim.requests("/v1/query/later");
    assert_eq!(
        lookups_before, 0,
        "no request for a name Consul does not have"
    );

    sim.add_simple("late", "late-node", "127.0.0.9", 80);
    sim.add_prepared_query("later", "late", None, None);
    // Services and nodes follow the lists' blocking queries (about half a second); prepared
    // queries the 10 s poll of their list.
    for (name, addr) in later {
        let took = eventually(Duration::from_secs(15), async || {
            addresses(&ask(fwd.addr, name, RecordType::A).await) == vec![addr.to_owned()]
        })
        .await
        .unwrap_or_else(|| panic!("{name} is answered once Consul has it"));
        println!("{name} answered {took:?} after its registration");
        if !name.contains(".query.") {
            assert!(took < Duration::from_secs(3), "{name} took {took:?}");
        }
    }
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_the_catalog_cannot_settle_go_to_consul_within_a_budget() {
    let sim = ConsulSim::start().await;
    sim.add_simple("web", "n1", "127.0.0.2", 8080);
    sim.add_prepared_query("geo", "web", None, None);
    // A token without query:read: the prepared-query list is refused, so .query names cannot
    // be checked and each one would be a request.
    sim.set_query_list_denied(true);
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&forwarder_config(&sim, &up)).await;
    let r = ask(fwd.addr, "geo.query.consul.", RecordType::A).await;
    assert_eq!(addresses(&r), vec!["127.0.0.2"], "a real query still works");

    let started = Instant::now();
    let (mut nxdomain, mut servfail) = (0, 0);
    for i in 0..200 {
        let r = ask(
            fwd.addr,
            &format!("made-up-{i}.query.consul."),
            RecordType::A,
        )
        .await;
        match r.metadata.response_code {
            ResponseCode::NXDomain => nxdomain += 1,
            ResponseCode::ServFail => servfail += 1,
            other => panic!("made-up-{i}: {other:?}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let executed = sim.requests("/v1/query/") - 1;
    // The budget: a burst of 20, then 2 a second (and one token of slack for the clock).
    let allowed = 20.0 + 2.0 * elapsed + 1.0;
    println!(
        "200 unchecked names in {elapsed:.2} s: {executed} requests (budget {allowed:.0}), \
         {nxdomain} NXDOMAIN, {servfail} SERVFAIL"
    );
    assert!(
        (executed as f64) <= allowed,
        "{executed} requests > {allowed}"
    );
    assert_eq!(nxdomain, executed, "each request's answer: NXDOMAIN");
    assert_eq!(
        servfail,
        200 - executed,
        "beyond the budget: SERVFAIL, never NXDOMAIN"
    );
    assert_eq!(
        fwd.metric(
            "consul_dns_forwarder_limit_drops_total",
            &[("limit", "unverified_lookups")]
        ),
        servfail as f64
    );
    // The real query is remembered and keeps being answered.
    let r = ask(fwd.addr, "geo.query.consul.", RecordType::A).await;
    assert_eq!(addresses(&r), vec!["127.0.0.2"]);
    fwd.stop().await;
}
