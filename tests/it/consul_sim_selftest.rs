//! Proves the Consul simulator behaves like Consul, over real HTTP (reqwest)
//! and real DNS (tokio sockets + hickory_proto messages), so the project's
//! tests can trust it. Every test is bounded by `within` (20 s) and every
//! network wait has its own timeout: nothing here can hang.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::addresses;
use crate::support::consul_sim::{
    ChurnCheck, ChurnTarget, ConsulSim, SimNode, SimService, SimServiceAddress, Status,
};
use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const TEST_LIMIT: Duration = Duration::from_secs(20);

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test exceeded its time limit")
}

fn client_with_timeout(t: Duration) -> reqwest::Client {
    // reqwest is built with `rustls-no-provider`: it panics when building a
    // client unless a process-wide crypto provider exists, even for plain http.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(t)
        .build()
        .expect("build reqwest client")
}

fn client() -> reqwest::Client {
    client_with_timeout(Duration::from_secs(5))
}

struct Resp {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("bad JSON {e}: {}", self.body))
    }

    fn index(&self) -> u64 {
        self.headers
            .get("X-Consul-Index")
            .expect("X-Consul-Index header")
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

async fn get(c: &reqwest::Client, url: &str) -> Resp {
    let r = c
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    Resp {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.text().await.expect("body"),
    }
}

fn node(name: &str, addr: &str) -> SimNode {
    SimNode::new(name, addr)
}

fn svc(id: &str, service: &str, node: &str, port: u16, tags: &[&str]) -> SimService {
    SimService {
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..SimService::new(id, service, node, port)
    }
}

fn ids(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["Service"]["ID"].as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

// ---------------------------------------------------------------- JSON shapes

/// Key paths of a JSON value. `Meta` objects hold data, not schema, so only
/// their presence counts; `Services` (catalog node) is keyed by service ID, so
/// its values are merged under `*`.
fn shape(v: &Value) -> BTreeSet<String> {
    fn walk(v: &Value, path: &str, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    let p = format!("{path}.{k}");
                    out.insert(p.clone());
                    if k == "Meta" {
                        continue;
                    }
                    if k == "Services" {
                        for c in child.as_object().into_iter().flat_map(|o| o.values()) {
                            walk(c, &format!("{p}.*"), out);
                        }
                        continue;
                    }
                    walk(child, &p, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|e| walk(e, &format!("{path}[]"), out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    walk(v, "", &mut out);
    out
}

fn last_seg(p: &str) -> &str {
    p.rsplit('.').next().unwrap()
}

fn without(set: &BTreeSet<String>, segs: &[&str]) -> BTreeSet<String> {
    set.iter()
        .filter(|p| !segs.contains(&last_seg(p)))
        .cloned()
        .collect()
}

/// A sample's shape as the agent writes it: the docs write a service's tagged address
/// (`ServiceAddress{Address, Port}`, a Go struct without JSON tags) in lowercase, the agent
/// with Go's field names (and Go's decoder takes either).
fn as_agent_writes(shape: BTreeSet<String>) -> BTreeSet<String> {
    shape
        .into_iter()
        .map(|p| {
            if p.contains(".TaggedAddresses.") {
                p.replace(".address", ".Address").replace(".port", ".Port")
            } else {
                p
            }
        })
        .collect()
}

fn sample(name: &str) -> Value {
    let text = match name {
        "health-service" => include_str!("../support/consul_samples/health-service.json"),
        "catalog-node" => include_str!("../support/consul_samples/catalog-node.json"),
        "query-execute" => include_str!("../support/consul_samples/query-execute.json"),
        "agent-self" => include_str!("../support/consul_samples/agent-self.json"),
        "catalog-services" => include_str!("../support/consul_samples/catalog-services.json"),
        "health-state" => include_str!("../support/consul_samples/health-state.json"),
        "catalog-nodes" => include_str!("../support/consul_samples/catalog-nodes.json"),
        _ => unreachable!(),
    };
    serde_json::from_str(text).expect("sample JSON")
}

/// A node and two instances shaped like the samples (one with its own
/// address, tags and meta; one bare).
/// Whether every connection to `sim` is closed within 2 s.
async fn connections_close(sim: &ConsulSim) -> bool {
    for _ in 0..100 {
        if sim.open_connections() == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A simulator holding [`sample_like`]'s catalog, a client, and the simulator's base URL.
async fn sample_sim() -> (ConsulSim, reqwest::Client, String) {
    sim_with(sample_like).await
}

/// A simulator set up by `setup`, a client, and the simulator's base URL.
async fn sim_with(setup: impl FnOnce(&ConsulSim)) -> (ConsulSim, reqwest::Client, String) {
    let sim = ConsulSim::start().await;
    setup(&sim);
    let base = sim.http_url();
    (sim, client(), base)
}

fn sample_like(sim: &ConsulSim) {
    let mut n = node("foobar", "10.1.10.12");
    n.meta.insert("instance_type".into(), "t2.medium".into());
    sim.add_node(n);
    let mut redis = svc("redis", "redis", "foobar", 8000, &["primary"]);
    redis.address = "10.1.10.12".into();
    redis.weights = (10, 1);
    redis.meta.insert("redis_version".into(), "4.0".into());
    sim.add_service(redis, Status::Passing);
    sim.add_service(
        svc("consul", "consul", "foobar", 8300, &[]),
        Status::Passing,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_shapes_match_samples() {
    within(async {
        let (sim, c, base) = sample_sim().await;

        // health/service: exactly the sample's keys (minus Namespace) plus
        // CreateIndex/ModifyIndex on Node, Service and each check.
        let r = get(&c, &format!("{base}/v1/health/service/redis")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["content-type"], "application/json");
        let ours = shape(&r.json());
        let idx = ["CreateIndex", "ModifyIndex"];
        assert_eq!(
            without(&ours, &idx),
            as_agent_writes(without(&shape(&sample("health-service")), &["Namespace"]))
        );
        for p in ["[].Node", "[].Service", "[].Checks[]"] {
            for k in idx {
                assert!(ours.contains(&format!("{p}.{k}")), "missing {p}.{k}");
            }
        }
        // Health never returns null tags.
        let r = get(&c, &format!("{base}/v1/health/service/consul")).await;
        assert_eq!(r.json()[0]["Service"]["Tags"], serde_json::json!([]));
        assert_eq!(r.json()[0]["Service"]["Address"], "");

        // catalog/node: the sample's keys plus Address, Weights and indexes on
        // services (real Consul's NodeService has them; the doc sample is abridged).
        let r = get(&c, &format!("{base}/v1/catalog/node/foobar")).await;
        assert_eq!(r.status, 200);
        assert!(r.index() >= 1);
        let body = r.json();
        assert_eq!(body["Services"]["consul"]["Tags"], Value::Null);
        let mut ours = shape(&body);
        ours.remove(".Services.*.Address");
        assert_eq!(
            without(
                &ours,
                &[
                    "CreateIndex",
                    "ModifyIndex",
                    "Weights",
                    "Passing",
                    "Warning"
                ]
            ),
            as_agent_writes(without(&shape(&sample("catalog-node")), &["Namespace"]))
        );

        // query execute: identical top level; node entries are full health
        // entries, a superset of the doc sample's abridged ones.
        sim.add_prepared_query("redis-q", "redis", None, Some("10s"));
        let r = get(&c, &format!("{base}/v1/query/redis-q/execute")).await;
        assert_eq!(r.status, 200);
        let body = r.json();
        let top: BTreeSet<&String> = body.as_object().unwrap().keys().collect();
        let sample_q = sample("query-execute");
        let sample_top: BTreeSet<&String> = sample_q.as_object().unwrap().keys().collect();
        assert_eq!(top, sample_top);
        let ours = shape(&body);
        let theirs = without(&shape(&sample_q), &["Namespace"]);
        assert!(
            theirs.is_subset(&ours),
            "missing: {:?}",
            theirs.difference(&ours)
        );
        let allowed: BTreeSet<&str> = [
            "CreateIndex",
            "ModifyIndex",
            "Address",
            "TaggedAddresses",
            "lan",
            "wan",
            "Address",
            "Port",
            "Weights",
            "Passing",
            "Warning",
            "ServiceTags",
        ]
        .into();
        for extra in ours.difference(&theirs) {
            assert!(allowed.contains(last_seg(extra)), "unexpected key {extra}");
        }

        // agent/self: same keys as the sample; our identity.
        let r = get(&c, &format!("{base}/v1/agent/self")).await;
        let body = r.json();
        assert_eq!(shape(&body), shape(&sample("agent-self")));
        assert_eq!(body["Config"]["Datacenter"], "dc1");
        assert_eq!(body["Config"]["NodeName"], "agent-1");

        // catalog/services: name -> tags, like the sample.
        let r = get(&c, &format!("{base}/v1/catalog/services")).await;
        let body = r.json();
        assert_eq!(body["redis"], serde_json::json!(["primary"]));
        assert_eq!(body["consul"], serde_json::json!([]));
        assert!(sample("catalog-services")["consul"].is_array());
        assert!(r.index() >= 1);

        // catalog_json mirrors the health endpoint exactly.
        let cat = sim.catalog_json();
        let health = get(&c, &format!("{base}/v1/health/service/redis"))
            .await
            .json();
        assert_eq!(cat["redis"], health);
        assert_eq!(cat.as_object().unwrap().len(), 2);
    })
    .await;
}

// ---------------------------------------------------------------- filters

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passing_tag_and_dc_filters() {
    within(async {
        let sim = ConsulSim::start().await;
        for (n, a) in [("n1", "10.0.0.1"), ("n2", "10.0.0.2"), ("n3", "10.0.0.3")] {
            sim.add_node(node(n, a));
        }
        sim.add_service(
            svc("web-1", "web", "n1", 80, &["v1", "Blue"]),
            Status::Passing,
        );
        sim.add_service(svc("web-2", "web", "n2", 80, &["v1"]), Status::Warning);
        sim.add_service(svc("web-3", "web", "n3", 80, &["v2"]), Status::Critical);
        let c = client();
        let u = |q: &str| format!("{}/v1/health/service/web{q}", sim.http_url());

        assert_eq!(
            ids(&get(&c, &u("")).await.json()),
            ["web-1", "web-2", "web-3"]
        );
        for q in ["?passing", "?passing=", "?passing=true", "?passing=1"] {
            assert_eq!(ids(&get(&c, &u(q)).await.json()), ["web-1"], "{q}");
        }
        // Real Consul parses the value: passing=false means no filter.
        assert_eq!(ids(&get(&c, &u("?passing=false")).await.json()).len(), 3);
        let r = get(&c, &u("?passing=maybe")).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (400, "Invalid value for ?passing")
        );

        // A node check counts for the passing filter too.
        sim.set_node_check("n1", "_node_maintenance", Status::Critical);
        assert!(ids(&get(&c, &u("?passing")).await.json()).is_empty());
        let e = get(&c, &u("")).await.json();
        let checks = e[0]["Checks"].as_array().unwrap();
        assert_eq!(checks.len(), 3, "two node checks + one service check");
        assert_eq!(checks[0]["ServiceID"], "");
        assert_eq!(checks[2]["CheckID"], "service:web-1");
        sim.set_node_check("n1", "_node_maintenance", Status::Passing);

        // Tags: all must match, case-insensitively.
        assert_eq!(
            ids(&get(&c, &u("?tag=v1")).await.json()),
            ["web-1", "web-2"]
        );
        assert_eq!(
            ids(&get(&c, &u("?tag=v1&tag=blue")).await.json()),
            ["web-1"]
        );
        assert!(ids(&get(&c, &u("?tag=v1&tag=v2")).await.json()).is_empty());
        assert_eq!(ids(&get(&c, &u("?tag=v1&passing")).await.json()), ["web-1"]);

        // Datacenters.
        assert_eq!(get(&c, &u("?dc=dc1")).await.status, 200);
        let r = get(&c, &u("?dc=dc2")).await;
        assert_eq!((r.status, r.body.as_str()), (500, "No path to datacenter"));
        let r = get(&c, &format!("{}/v1/catalog/node/n1?dc=eu", sim.http_url())).await;
        assert_eq!(r.status, 500);

        // Unknown service: [] with 200 and an index >= 1.
        let r = get(&c, &u("x")).await; // /v1/health/service/webx
        assert_eq!((r.status, r.body.as_str()), (200, "[]"));
        assert!(r.index() >= 1);
        assert_eq!(r.headers["X-Consul-KnownLeader"], "true");
        assert_eq!(r.headers["X-Consul-LastContact"], "0");
        assert_eq!(r.headers["X-Consul-Effective-Consistency"], "leader");

        // Stale reads: a follower answers, reporting how long ago it heard from the leader
        // (api-docs/features/consistency.mdx); a default read is still the leader's.
        sim.set_follower_lag(Duration::from_millis(2500));
        let r = get(&c, &u("?stale")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["X-Consul-Effective-Consistency"], "stale");
        assert_eq!(r.headers["X-Consul-LastContact"], "2500");
        let r = get(&c, &u("")).await;
        assert_eq!(r.headers["X-Consul-Effective-Consistency"], "leader");
        assert_eq!(r.headers["X-Consul-LastContact"], "0");
        sim.set_follower_lag(Duration::ZERO);

        // Unknown node: null; unknown path: 404.
        let r = get(&c, &format!("{}/v1/catalog/node/nope", sim.http_url())).await;
        assert_eq!((r.status, r.body.as_str()), (200, "null"));
        assert!(r.index() >= 1);
        assert_eq!(
            get(&c, &format!("{}/v1/kv/x", sim.http_url())).await.status,
            404
        );
    })
    .await;
}

/// Registered tagged addresses appear where Consul shows them, in its shapes: a node's as
/// `map[string]string` beside `lan` and `wan`, a service's as `map[string]ServiceAddress`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tagged_addresses_in_consul_shapes() {
    within(async {
        let sim = ConsulSim::start().await;
        let mut n1 = node("n1", "10.0.0.1");
        n1.tagged_addresses = BTreeMap::from([
            ("lan_ipv4".to_string(), "10.0.0.1".to_string()),
            ("lan_ipv6".to_string(), "fd00::1".to_string()),
            ("wan".to_string(), "198.18.0.1".to_string()),
        ]);
        sim.add_node(n1);
        let mut web = svc("web-1", "web", "n1", 80, &[]);
        web.tagged_addresses.insert(
            "wan".into(),
            SimServiceAddress {
                address: "198.18.0.9".into(),
                port: 8080,
            },
        );
        sim.add_service(web, Status::Passing);
        let mut own = svc("api-1", "api", "n1", 81, &[]);
        own.address = "10.0.0.5".into();
        sim.add_service(own, Status::Passing);
        sim.add_prepared_query("web-q", "web", None, None);
        let c = client();
        let base = sim.http_url();

        let node_tags = serde_json::json!({
            "lan": "10.0.0.1", "lan_ipv4": "10.0.0.1", "lan_ipv6": "fd00::1",
            "wan": "198.18.0.1",
        });
        let web_tags = serde_json::json!({ "wan": { "Address": "198.18.0.9", "Port": 8080 } });
        let health = get(&c, &format!("{base}/v1/health/service/web"))
            .await
            .json();
        assert_eq!(health[0]["Node"]["TaggedAddresses"], node_tags);
        assert_eq!(health[0]["Service"]["TaggedAddresses"], web_tags);
        // A service with an address of its own shows it as `lan` and `wan`, as the docs' sample.
        let api = get(&c, &format!("{base}/v1/health/service/api"))
            .await
            .json();
        let lan = serde_json::json!({ "Address": "10.0.0.5", "Port": 81 });
        assert_eq!(
            api[0]["Service"]["TaggedAddresses"],
            serde_json::json!({ "lan": lan, "wan": lan })
        );
        // Node values are strings and service values {Address, Port}, as in the samples.
        let sample_node = &sample("health-service")[0]["Node"]["TaggedAddresses"];
        assert!(sample_node
            .as_object()
            .unwrap()
            .values()
            .all(Value::is_string));
        let sample_svc = &sample("health-service")[0]["Service"]["TaggedAddresses"]["wan"];
        let keys: BTreeSet<String> = sample_svc
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.to_ascii_lowercase())
            .collect();
        assert_eq!(keys, BTreeSet::from(["address".into(), "port".into()]));

        let cat = get(&c, &format!("{base}/v1/catalog/node/n1")).await.json();
        assert_eq!(cat["Node"]["TaggedAddresses"], node_tags);
        assert_eq!(cat["Services"]["web-1"]["TaggedAddresses"], web_tags);
        let nodes = get(&c, &format!("{base}/v1/catalog/nodes")).await.json();
        assert_eq!(nodes[0]["TaggedAddresses"], node_tags);
        let q = get(&c, &format!("{base}/v1/query/web-q/execute"))
            .await
            .json();
        assert_eq!(q["Nodes"][0]["Node"]["TaggedAddresses"], node_tags);
        assert_eq!(q["Nodes"][0]["Service"]["TaggedAddresses"], web_tags);

        // Changing only a node's tagged addresses is a change of its services.
        let before = sim.service_index("web");
        let mut n1 = node("n1", "10.0.0.1");
        n1.tagged_addresses
            .insert("lan_ipv6".into(), "fd00::2".into());
        sim.add_node(n1);
        assert!(sim.service_index("web") > before);

        // The agent-style DNS port answers AAAA from lan_ipv6, A from the address.
        for (name, qtype, want) in [
            ("web.service.consul.", RecordType::AAAA, "fd00::2"),
            ("web.service.consul.", RecordType::A, "10.0.0.1"),
            ("n1.node.consul.", RecordType::AAAA, "fd00::2"),
        ] {
            let (m, _) = dns_udp(sim.dns_addr(), name, qtype, None).await;
            assert_eq!(addresses(&m), [want], "{name} {qtype}");
        }
    })
    .await;
}

/// A node registered in another datacenter is seen only with `?dc=` naming it, as through a
/// WAN-federated server, and its datacenter is listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_datacenter() {
    within(async {
        let sim = ConsulSim::start().await;
        sim.add_node(node("n1", "10.0.0.1"));
        sim.add_service(svc("web-1", "web", "n1", 80, &[]), Status::Passing);
        let mut far = node("far1", "10.2.0.1");
        far.datacenter = "dc2".into();
        sim.add_node(far);
        sim.add_service(svc("web-9", "web", "far1", 80, &["eu"]), Status::Passing);
        sim.add_prepared_query("web-q", "web", None, None);
        let c = client();
        let base = sim.http_url();

        let dcs = get(&c, &format!("{base}/v1/catalog/datacenters"))
            .await
            .json();
        assert_eq!(dcs, serde_json::json!(["dc1", "dc2"]));
        let local = get(&c, &format!("{base}/v1/health/service/web"))
            .await
            .json();
        assert_eq!(ids(&local), ["web-1"]);
        let far = get(&c, &format!("{base}/v1/health/service/web?dc=dc2"))
            .await
            .json();
        assert_eq!(ids(&far), ["web-9"]);
        assert_eq!(far[0]["Node"]["Datacenter"], "dc2");
        let r = get(&c, &format!("{base}/v1/health/service/web?dc=dc3")).await;
        assert_eq!((r.status, r.body.as_str()), (500, "No path to datacenter"));

        let services = get(&c, &format!("{base}/v1/catalog/services?dc=dc2"))
            .await
            .json();
        assert_eq!(services, serde_json::json!({ "web": ["eu"] }));
        let nodes = get(&c, &format!("{base}/v1/catalog/nodes?dc=dc2"))
            .await
            .json();
        assert_eq!(nodes.as_array().unwrap().len(), 1);
        assert_eq!(nodes[0]["Node"], "far1");
        let n = get(&c, &format!("{base}/v1/catalog/node/far1")).await;
        assert_eq!(n.body, "null");
        let n = get(&c, &format!("{base}/v1/catalog/node/far1?dc=dc2"))
            .await
            .json();
        assert_eq!(n["Node"]["Datacenter"], "dc2");
        let states = get(&c, &format!("{base}/v1/health/state/any?dc=dc2"))
            .await
            .json();
        let states = states.as_array().unwrap();
        assert!(!states.is_empty() && states.iter().all(|c| c["Node"] == "far1"));
        // Prepared queries are the local datacenter's.
        let q = get(&c, &format!("{base}/v1/query/web-q/execute"))
            .await
            .json();
        assert_eq!(q["Nodes"].as_array().unwrap().len(), 1);
        let r = get(&c, &format!("{base}/v1/query/web-q/execute?dc=dc2")).await;
        assert_eq!(r.status, 404);
        let list = get(&c, &format!("{base}/v1/query?dc=dc2")).await.json();
        assert_eq!(list, serde_json::json!([]));
        // The agent-style DNS port answers its own datacenter.
        let (m, _) = dns_udp(sim.dns_addr(), "web.service.consul.", RecordType::A, None).await;
        assert_eq!(addresses(&m), ["10.0.0.1"]);
    })
    .await;
}

// ---------------------------------------------------------------- blocking

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_queries() {
    within(async {
        let sim = ConsulSim::start().await;
        sim.add_simple("web", "n1", "10.0.0.1", 80);
        sim.add_simple("web", "n2", "10.0.0.2", 80);
        sim.add_simple("api", "n3", "10.0.0.3", 81);
        let c = client();
        let base = sim.http_url();
        let first = get(&c, &format!("{base}/v1/health/service/web")).await;
        let idx = first.index();
        assert_eq!(idx, sim.service_index("web"));

        // Nothing changes: waits out wait=200ms (+ jitter <= 12.5ms).
        let t = Instant::now();
        let r = get(
            &c,
            &format!("{base}/v1/health/service/web?index={idx}&wait=200ms"),
        )
        .await;
        let el = t.elapsed();
        assert!(
            el >= Duration::from_millis(200) && el < Duration::from_secs(1),
            "{el:?}"
        );
        assert_eq!(r.index(), idx);

        // A change to another service does not wake it.
        let t = Instant::now();
        let c2 = c.clone();
        let url = format!("{base}/v1/health/service/web?index={idx}&wait=400ms");
        let h = tokio::spawn(async move { get(&c2, &url).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        sim.set_service_check("api-1", Status::Warning);
        let r = h.await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(400));
        assert_eq!(r.index(), idx);

        // A check flip wakes it promptly, with a higher index and new content.
        let t = Instant::now();
        let c2 = c.clone();
        let url = format!("{base}/v1/health/service/web?index={idx}&wait=10s");
        let h = tokio::spawn(async move { get(&c2, &url).await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        sim.set_service_check("web-1", Status::Critical);
        let r = h.await.unwrap();
        let el = t.elapsed();
        assert!(
            el >= Duration::from_millis(150) && el < Duration::from_secs(1),
            "{el:?}"
        );
        let idx2 = r.index();
        assert!(idx2 > idx);
        assert_eq!(idx2, sim.current_index());
        let body = r.json();
        let crit = body.as_array().unwrap().iter().any(|e| {
            e["Checks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["Status"] == "critical")
        });
        assert!(crit);

        // A node check change wakes every service on that node.
        let t = Instant::now();
        let c2 = c.clone();
        let url = format!("{base}/v1/health/service/web?index={idx2}&wait=10s");
        let h = tokio::spawn(async move { get(&c2, &url).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        sim.set_node_check("n2", "serfHealth", Status::Critical);
        let r = h.await.unwrap();
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(r.index() > idx2);

        // Registering a new instance wakes too; so does catalog/services.
        let idx3 = r.index();
        let svc_idx = get(&c, &format!("{base}/v1/catalog/services"))
            .await
            .index();
        let c2 = c.clone();
        let url = format!("{base}/v1/health/service/web?index={idx3}&wait=10s");
        let h = tokio::spawn(async move { get(&c2, &url).await });
        let c3 = c.clone();
        let url = format!("{base}/v1/catalog/services?index={svc_idx}&wait=10s");
        let h2 = tokio::spawn(async move { get(&c3, &url).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        sim.add_simple("cache", "n4", "10.0.0.4", 6379);
        sim.add_simple("web", "n4", "10.0.0.4", 80);
        let r = h.await.unwrap();
        assert_eq!(ids(&r.json()).len(), 3);
        let r2 = h2.await.unwrap();
        assert!(r2.index() > svc_idx);
        assert!(r2.json().get("cache").is_some());

        // An index from the future (e.g. after a snapshot restore) blocks too.
        let t = Instant::now();
        let far = sim.current_index() + 100;
        let r = get(
            &c,
            &format!("{base}/v1/health/service/web?index={far}&wait=100ms"),
        )
        .await;
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert!(r.index() < far);

        // Bad parameters are rejected like Consul does.
        let r = get(
            &c,
            &format!("{base}/v1/health/service/web?index=1&wait=soon"),
        )
        .await;
        assert_eq!((r.status, r.body.as_str()), (400, "Invalid wait time"));
        let r = get(&c, &format!("{base}/v1/health/service/web?index=x")).await;
        assert_eq!((r.status, r.body.as_str()), (400, "Invalid index"));

        // A client that gives up on a held query is noticed: connection closed.
        let impatient = client_with_timeout(Duration::from_millis(200));
        let cur = sim.service_index("web");
        let res = impatient
            .get(format!("{base}/v1/health/service/web?index={cur}&wait=30s"))
            .send()
            .await;
        assert!(res.unwrap_err().is_timeout());
        drop(c);
        assert!(
            connections_close(&sim).await,
            "open connections: {}",
            sim.open_connections()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_increases_by_one_per_change() {
    within(async {
        let sim = ConsulSim::start().await;
        let mut i = sim.current_index();
        assert!(i >= 1);
        let mut step = |sim: &ConsulSim, changed: bool| {
            let now = sim.current_index();
            assert_eq!(now, if changed { i + 1 } else { i });
            i = now;
        };
        sim.add_node(node("n1", "10.0.0.1"));
        step(&sim, true);
        sim.add_node(node("n1", "10.0.0.1")); // identical: not a change
        step(&sim, false);
        sim.add_service(svc("web-1", "web", "n1", 80, &[]), Status::Passing);
        step(&sim, true);
        assert_eq!(sim.service_index("web"), sim.current_index());
        sim.set_service_check("web-1", Status::Passing); // same status: not a change
        step(&sim, false);
        sim.set_service_check("web-1", Status::Warning);
        step(&sim, true);
        sim.set_node_check("n1", "serfHealth", Status::Critical);
        step(&sim, true);
        assert_eq!(sim.service_index("web"), sim.current_index());
        sim.add_node(node("n1", "10.0.0.9")); // address change touches its services
        step(&sim, true);
        assert_eq!(sim.service_index("web"), sim.current_index());
        sim.remove_service("web-1");
        step(&sim, true);
        sim.remove_service("web-1"); // already gone
        step(&sim, false);
        let c = client();
        let r = get(&c, &format!("{}/v1/health/service/web", sim.http_url())).await;
        assert_eq!((r.body.as_str(), r.index()), ("[]", sim.current_index()));
        let r = get(&c, &format!("{}/v1/health/service/never", sim.http_url())).await;
        assert!(r.index() >= 1);
    })
    .await;
}

// ---------------------------------------------------------------- faults

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_restart() {
    within(async {
        let sim = ConsulSim::start().await;
        sim.add_simple("web", "n1", "10.0.0.1", 80);
        let c = client();
        let url = format!("{}/v1/health/service/web", sim.http_url());
        let before = get(&c, &url).await;
        let idx = before.index();
        let global = sim.current_index();

        // A held blocking query is cut off by stop().
        let c2 = c.clone();
        let blocking = format!("{url}?index={idx}&wait=30s");
        let h = tokio::spawn(async move { c2.get(blocking).send().await });
        for _ in 0..100 {
            if sim.requests("/v1/health/service/web") >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t = Instant::now();
        sim.stop().await;
        let res = tokio::time::timeout(Duration::from_secs(3), h)
            .await
            .expect("blocked query must end on stop")
            .unwrap();
        assert!(res.is_err(), "blocked query must fail, got {res:?}");
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(sim.open_connections(), 0);

        // New connections are refused (a fresh client, so no pooled socket
        // can be involved; the old client is reused after restart below).
        let err = client().get(&url).send().await.unwrap_err();
        assert!(err.is_connect(), "{err:?}");
        let err = TcpStream::connect(sim.http_addr()).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

        // The DNS port keeps answering while HTTP is down.
        let (m, _) = dns_udp(sim.dns_addr(), "web.service.consul.", RecordType::A, None).await;
        assert_eq!(m.answers.len(), 1);

        // Same port, same state, index never goes back.
        sim.restart().await;
        let after = get(&c, &url).await;
        assert_eq!(after.status, 200);
        assert!(after.index() >= idx);
        assert_eq!(ids(&after.json()), ["web-1"]);
        assert!(sim.current_index() > global);
        sim.set_service_check("web-1", Status::Warning);
        assert!(get(&c, &url).await.index() > idx);

        // Stop/restart twice more to be sure the port can be retaken.
        for _ in 0..2 {
            sim.stop().await;
            assert!(c.get(&url).send().await.is_err());
            sim.restart().await;
            assert_eq!(get(&c, &url).await.status, 200);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_and_fail() {
    within(async {
        let sim = ConsulSim::start().await;
        sim.add_simple("web", "n1", "10.0.0.1", 80);
        let url = format!("{}/v1/health/service/web", sim.http_url());

        sim.set_hang(true);
        let impatient = client_with_timeout(Duration::from_millis(300));
        let t = Instant::now();
        let err = impatient.get(&url).send().await.unwrap_err();
        assert!(err.is_timeout(), "{err:?}");
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert_eq!(
            sim.requests("/v1/health/service/web"),
            1,
            "hung requests are counted"
        );
        sim.set_hang(false);
        let c = client();
        assert_eq!(get(&c, &url).await.status, 200);

        sim.set_fail(true);
        let r = get(&c, &url).await;
        assert_eq!(r.status, 500);
        assert_eq!(r.body, "rpc error making call: No cluster leader");
        assert!(r.headers.get("X-Consul-Index").is_none());
        let r = get(&c, &format!("{}/v1/agent/self", sim.http_url())).await;
        assert_eq!(r.status, 500);
        sim.set_fail(false);
        assert_eq!(get(&c, &url).await.status, 200);
    })
    .await;
}

// ---------------------------------------------------------------- other endpoints

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_node_and_prepared_query() {
    within(async {
        let sim = ConsulSim::start().await;
        let mut n = node("n1", "10.0.0.1");
        n.meta.insert("rack".into(), "r1".into());
        sim.add_node(n);
        sim.add_node(node("n2", "10.0.0.2"));
        sim.add_node(node("n3", "10.0.0.3"));
        sim.add_service(svc("web-1", "web", "n1", 80, &["v1"]), Status::Passing);
        sim.add_service(svc("web-2", "web", "n2", 80, &["v1"]), Status::Warning);
        sim.add_service(svc("web-3", "web", "n3", 80, &["v1"]), Status::Critical);
        sim.add_service(svc("web-4", "web", "n3", 81, &["v2"]), Status::Passing);
        sim.add_service(svc("db-1", "db", "n1", 5432, &[]), Status::Passing);
        let c = client();
        let base = sim.http_url();

        let body = get(&c, &format!("{base}/v1/catalog/node/n1")).await.json();
        assert_eq!(body["Node"]["Node"], "n1");
        assert_eq!(body["Node"]["Address"], "10.0.0.1");
        assert_eq!(body["Node"]["Datacenter"], "dc1");
        assert_eq!(body["Node"]["Meta"]["rack"], "r1");
        let services: BTreeSet<&String> = body["Services"].as_object().unwrap().keys().collect();
        assert_eq!(
            services,
            BTreeSet::from([&"db-1".to_string(), &"web-1".to_string()])
        );
        assert_eq!(body["Services"]["web-1"]["Port"], 80);

        // Critical dropped, warning kept, tag applied; DNS TTL reported.
        sim.add_prepared_query("web-v1", "web", Some("v1"), Some("10s"));
        let r = get(&c, &format!("{base}/v1/query/web-v1/execute")).await;
        assert_eq!(r.status, 200);
        let body = r.json();
        assert_eq!(body["Service"], "web");
        assert_eq!(body["Datacenter"], "dc1");
        assert_eq!(body["Failovers"], 0);
        assert_eq!(body["DNS"]["TTL"], "10s");
        let nodes = &body["Nodes"];
        assert_eq!(ids(nodes), ["web-1", "web-2"]);
        sim.add_prepared_query("all-web", "web", None, None);
        let body = get(&c, &format!("{base}/v1/query/all-web/execute"))
            .await
            .json();
        assert_eq!(ids(&body["Nodes"]), ["web-1", "web-2", "web-4"]);
        assert_eq!(body["DNS"]["TTL"], "");

        let r = get(&c, &format!("{base}/v1/query/nope/execute")).await;
        assert_eq!((r.status, r.body.as_str()), (404, "Query not found"));

        let r = get(&c, &format!("{base}/v1/agent/self")).await;
        assert_eq!(r.json()["Member"]["Name"], "agent-1");
    })
    .await;
}

/// The `consul` service Consul keeps for its servers: ID `consul` on every server, port 8300,
/// no service check (the node's `serfHealth` alone), Consul's meta; in the services list with
/// no tags. Shapes as any health entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_are_the_consul_service() {
    within(async {
        let sim = ConsulSim::start().await;
        sim.add_server("srv-1", "10.0.0.10");
        sim.add_server("srv-2", "10.0.0.11");
        sim.set_node_check("srv-2", "serfHealth", Status::Critical);
        let c = client();
        let base = sim.http_url();

        let r = get(&c, &format!("{base}/v1/health/service/consul")).await;
        assert_eq!(r.status, 200);
        let body = r.json();
        let entries = body.as_array().expect("array");
        assert_eq!(entries.len(), 2);
        for (e, (node, addr)) in entries
            .iter()
            .zip([("srv-1", "10.0.0.10"), ("srv-2", "10.0.0.11")])
        {
            assert_eq!(e["Node"]["Node"], node);
            assert_eq!(e["Node"]["Address"], addr);
            assert_eq!(e["Node"]["Meta"]["consul-network-segment"], "");
            assert_eq!(e["Service"]["ID"], "consul");
            assert_eq!(e["Service"]["Service"], "consul");
            assert_eq!(e["Service"]["Port"], 8300);
            assert_eq!(e["Service"]["Tags"], serde_json::json!([]));
            assert_eq!(e["Service"]["Address"], "");
            assert_eq!(
                e["Service"]["Weights"],
                serde_json::json!({"Passing": 1, "Warning": 1})
            );
            assert!(e["Service"]["Meta"]["version"].is_string());
            let checks: Vec<&str> = e["Checks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["CheckID"].as_str().unwrap())
                .collect();
            assert_eq!(
                checks,
                ["serfHealth"],
                "no service check on the consul service"
            );
        }
        // The sample's keys, but for the service's TaggedAddresses (omitted: it has no
        // address of its own).
        let theirs: BTreeSet<String> = without(&shape(&sample("health-service")), &["Namespace"])
            .into_iter()
            .filter(|p| !p.starts_with("[].Service.TaggedAddresses"))
            .collect();
        let ours = without(&shape(&body), &["CreateIndex", "ModifyIndex"]);
        assert_eq!(ours, theirs);
        let r = get(&c, &format!("{base}/v1/health/service/consul?passing")).await;
        assert_eq!(ids(&r.json()), ["consul"], "srv-2's node is critical");
        let body = get(&c, &format!("{base}/v1/catalog/services")).await.json();
        assert_eq!(body["consul"], serde_json::json!([]));
    })
    .await;
}

/// Prepared queries as Consul's `PreparedQuery.Execute`: `IgnoreCheckIDs` and `OnlyPassing`
/// decide health, the result is shuffled, and sorted by distance from `Near` (nodes without a
/// coordinate last); the definitions list shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_queries_filter_and_sort_like_consul() {
    use crate::support::consul_sim::SimQuery;
    within(async {
        let sim = ConsulSim::start().await;
        let ms = |m| Some(Duration::from_millis(m));
        sim.add_at_rtts("web", "10.0.0", 80, &[ms(30), ms(10), None, ms(20), ms(5)]);
        sim.set_service_check("web-5", Status::Critical);
        sim.set_service_check("web-4", Status::Warning);
        let near = |name: &str, near: &str| SimQuery {
            name: name.into(),
            service: "web".into(),
            near: near.into(),
            ignore_check_ids: vec!["service:web-5".into()],
            ..SimQuery::default()
        };
        sim.add_query(near("near-agent", "_agent"));
        sim.add_query(near("near-n1", "n1"));
        sim.add_query(SimQuery {
            only_passing: true,
            ..near("passing", "")
        });
        let c = client();
        let base = sim.http_url();
        let order = |body: &Value| -> Vec<String> {
            body["Nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["Node"]["Node"].as_str().unwrap().to_string())
                .collect()
        };
        for _ in 0..5 {
            let body = get(&c, &format!("{base}/v1/query/near-agent/execute"))
                .await
                .json();
            assert_eq!(
                order(&body),
                ["n5", "n2", "n4", "n1", "n3"],
                "web-5's critical check is ignored"
            );
            let body = get(&c, &format!("{base}/v1/query/near-n1/execute"))
                .await
                .json();
            assert_eq!(order(&body), ["n1", "n4", "n2", "n5", "n3"]);
        }
        let body = get(&c, &format!("{base}/v1/query/passing/execute"))
            .await
            .json();
        let mut got = order(&body);
        got.sort();
        assert_eq!(
            got,
            ["n1", "n2", "n3", "n5"],
            "OnlyPassing drops the warning one"
        );

        let list = get(&c, &format!("{base}/v1/query")).await.json();
        let def = list
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["Name"] == "near-agent")
            .expect("listed");
        assert_eq!(def["Service"]["Near"], "_agent");
        assert_eq!(def["Service"]["OnlyPassing"], false);
        assert_eq!(
            def["Service"]["IgnoreCheckIDs"],
            serde_json::json!(["service:web-5"])
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_connection_accounting() {
    within(async {
        let sim = ConsulSim::start().await;
        sim.add_simple("web", "n1", "10.0.0.1", 80);
        let base = sim.http_url();
        let c = client();
        for _ in 0..3 {
            get(&c, &format!("{base}/v1/health/service/web?passing")).await;
        }
        get(&c, &format!("{base}/v1/health/service/webby")).await;
        let r = c
            .get(format!("{base}/v1/agent/self"))
            .header("X-Consul-Token", "s3cret")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(sim.requests("/v1/health/service/web"), 4, "prefix match");
        assert_eq!(sim.requests("/v1/health/service/webby"), 1);
        assert_eq!(sim.requests("/v1/agent/self"), 1);
        assert_eq!(sim.total_requests(), 5);
        assert_eq!(sim.last_token().as_deref(), Some("s3cret"));
        assert_eq!(sim.request_log()[0], "/v1/health/service/web?passing");

        // Three concurrent held queries need three connections.
        let idx = sim.service_index("web");
        let mut hs = Vec::new();
        for _ in 0..3 {
            let c2 = c.clone();
            let url = format!("{base}/v1/health/service/web?index={idx}&wait=300ms");
            hs.push(tokio::spawn(async move { get(&c2, &url).await }));
        }
        for h in hs {
            assert_eq!(h.await.unwrap().status, 200);
        }
        assert!(sim.max_concurrent_connections() >= 3);
        assert!(
            sim.open_connections() >= 1,
            "pooled keep-alive connections stay open"
        );
        drop(c);
        assert!(
            connections_close(&sim).await,
            "open connections: {}",
            sim.open_connections()
        );

        // Raw HTTP/1.1: pipelining and Connection: close are handled.
        let mut s = TcpStream::connect(sim.http_addr()).await.unwrap();
        s.write_all(
            b"GET /v1/health/service/web HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /v1/catalog/services HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut out))
            .await
            .expect("server closes after Connection: close")
            .unwrap();
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    })
    .await;
}

// ---------------------------------------------------------------- DNS

async fn dns_udp(
    addr: SocketAddr,
    name: &str,
    rtype: RecordType,
    edns: Option<u16>,
) -> (Message, usize) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        q.edns = Some(e);
    }
    sock.send_to(&q.to_vec().unwrap(), addr).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
        .await
        .expect("DNS reply within 2 s")
        .unwrap();
    let m = Message::from_vec(&buf[..n]).expect("parse reply");
    assert_eq!(m.metadata.id, q.metadata.id);
    (m, n)
}

async fn dns_tcp(addr: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut q = Message::query();
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    let bytes = q.to_vec().unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    s.write_all(&framed).await.unwrap();
    let read = async {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.unwrap();
        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut msg).await.unwrap();
        msg
    };
    let msg = tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .expect("TCP DNS reply");
    Message::from_vec(&msg).unwrap()
}

fn assert_soa_authority(m: &Message) {
    assert_eq!(m.authorities.len(), 1, "{m:?}");
    let r = &m.authorities[0];
    assert_eq!(r.name.to_ascii(), "consul.");
    assert_eq!(r.ttl, 0);
    let RData::SOA(soa) = &r.data else {
        panic!("not SOA: {r:?}")
    };
    assert_eq!(soa.mname.to_ascii(), "ns.consul.");
    assert_eq!(soa.rname.to_ascii(), "hostmaster.consul.");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((i64::from(soa.serial) - now).abs() <= 5);
    assert_eq!(
        (soa.refresh, soa.retry, soa.expire, soa.minimum),
        (3600, 600, 86400, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_like_consul() {
    within(async {
        let sim = ConsulSim::start().await;
        let mut n1 = node("n1", "10.0.0.1");
        n1.meta.insert("rack".into(), "r1".into());
        sim.add_node(n1);
        sim.add_node(node("n2", "10.0.0.2"));
        sim.add_node(node("n3", "10.0.0.3"));
        sim.add_node(node("n6", "fd00::6"));
        let mut w1 = svc("web-1", "web", "n1", 8080, &["v1"]);
        w1.weights = (10, 3);
        sim.add_service(w1, Status::Passing);
        let mut w2 = svc("web-2", "web", "n2", 8081, &["v2"]);
        w2.weights = (10, 3);
        sim.add_service(w2, Status::Warning);
        sim.add_service(svc("web-3", "web", "n3", 8082, &["v1"]), Status::Critical);
        sim.add_service(svc("web-6", "web", "n6", 8086, &[]), Status::Passing);
        let mut own = svc("own-1", "own", "n1", 9000, &[]);
        own.address = "10.9.9.9".into();
        sim.add_service(own, Status::Passing);
        sim.add_simple("dead", "n3", "10.0.0.3", 1);
        sim.set_service_check("dead-1", Status::Critical);
        let dns = sim.dns_addr();

        // A: healthy IPv4 only (critical dropped), TTL 0, AA=1, RA=0, the
        // question echoed exactly as asked (letter case included).
        let asked = "Web.Service.Consul.";
        let (m, _) = dns_udp(dns, asked, RecordType::A, None).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert!(!m.metadata.recursion_available);
        assert!(!m.metadata.truncation);
        assert!(m.metadata.recursion_desired);
        assert_eq!(m.queries.len(), 1);
        assert!(m.queries[0]
            .name()
            .eq_case(&Name::from_ascii(asked).unwrap()));
        let mut got = addresses(&m);
        got.sort();
        assert_eq!(got, ["10.0.0.1", "10.0.0.2"]);
        assert!(m
            .answers
            .iter()
            .all(|r| r.ttl == 0 && r.name.eq_case(&Name::from_ascii(asked).unwrap())));

        // AAAA / datacenter / tag forms.
        let (m, _) = dns_udp(dns, "web.service.consul.", RecordType::AAAA, None).await;
        assert_eq!(addresses(&m), ["fd00::6"]);
        let (m, _) = dns_udp(dns, "web.service.dc1.consul.", RecordType::A, None).await;
        assert_eq!(m.answers.len(), 2);
        let (m, _) = dns_udp(dns, "v1.web.service.consul.", RecordType::A, None).await;
        assert_eq!(addresses(&m), ["10.0.0.1"], "web-3 has v1 but is critical");
        let (m, _) = dns_udp(dns, "web.service.dc2.consul.", RecordType::A, None).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

        // SRV: priority 1, weight by worst check, node target with glue.
        let (m, _) = dns_udp(dns, "web.service.consul.", RecordType::SRV, None).await;
        let mut srvs: Vec<(u16, u16, u16, String)> = m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(s) => (s.priority, s.weight, s.port, s.target.to_ascii()),
                other => panic!("{other:?}"),
            })
            .collect();
        srvs.sort_by_key(|s| s.2);
        assert_eq!(
            srvs,
            [
                (1, 10, 8080, "n1.node.dc1.consul.".to_string()),
                (1, 3, 8081, "n2.node.dc1.consul.".to_string()),
                (1, 1, 8086, "n6.node.dc1.consul.".to_string()),
            ]
        );
        let glue: HashSet<(String, String)> = m
            .additionals
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some((r.name.to_ascii(), a.0.to_string())),
                RData::AAAA(a) => Some((r.name.to_ascii(), a.0.to_string())),
                _ => None,
            })
            .collect();
        assert!(glue.contains(&("n1.node.dc1.consul.".into(), "10.0.0.1".into())));
        assert!(glue.contains(&("n6.node.dc1.consul.".into(), "fd00::6".into())));
        assert!(m.answers.iter().chain(&m.additionals).all(|r| r.ttl == 0));
        // RFC 2782 form; a service with its own IP gets an .addr. target.
        let (m, _) = dns_udp(dns, "_web._tcp.service.consul.", RecordType::SRV, None).await;
        assert_eq!(m.answers.len(), 3);
        let (m, _) = dns_udp(dns, "own.service.consul.", RecordType::SRV, None).await;
        let RData::SRV(s) = &m.answers[0].data else {
            panic!()
        };
        assert_eq!(s.target.to_ascii(), "0a090909.addr.dc1.consul.");
        let (m, _) = dns_udp(dns, "0a090909.addr.dc1.consul.", RecordType::A, None).await;
        assert_eq!(addresses(&m), ["10.9.9.9"]);

        // NXDOMAIN (unknown, or nothing healthy) with the SOA; NODATA; REFUSED.
        for name in [
            "nope.service.consul.",
            "dead.service.consul.",
            "foo.consul.",
            "x.node.consul.",
        ] {
            let (m, _) = dns_udp(dns, name, RecordType::A, None).await;
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
            assert!(m.answers.is_empty());
            assert_soa_authority(&m);
        }
        let (m, _) = dns_udp(dns, "own.service.consul.", RecordType::AAAA, None).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        assert_soa_authority(&m);
        let (m, _) = dns_udp(dns, "example.com.", RecordType::A, None).await;
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        assert!(!m.metadata.authoritative);

        // Nodes: A plus meta TXT in additional.
        let (m, _) = dns_udp(dns, "n1.node.consul.", RecordType::A, None).await;
        assert_eq!(addresses(&m), ["10.0.0.1"]);
        let txt: Vec<String> = m
            .additionals
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(t) => Some(String::from_utf8_lossy(&t.txt_data[0]).into_owned()),
                _ => None,
            })
            .collect();
        assert_eq!(txt, ["rack=r1"]);
        let (m, _) = dns_udp(dns, "n3.node.consul.", RecordType::A, None).await;
        assert_eq!(addresses(&m), ["10.0.0.3"], "node lookups ignore health");

        // TCP on the same port.
        let m = dns_tcp(dns, "web.service.consul.", RecordType::A).await;
        assert_eq!(m.answers.len(), 2);

        // Prepared query over DNS: its TTL, its filters.
        sim.add_prepared_query("webq", "web", Some("v1"), Some("10s"));
        let (m, _) = dns_udp(dns, "webq.query.consul.", RecordType::A, None).await;
        assert_eq!(addresses(&m), ["10.0.0.1"]);
        assert_eq!(m.answers[0].ttl, 10);

        // Every message was counted (UDP and TCP).
        assert_eq!(sim.dns_queries(), 19);
    })
    .await;
}

/// The DNS port's answers for the domain as a whole, as `agent/dns.go`'s `handleQuery`: SOA and
/// NS for any name with the servers as nameservers (glue in additional), AXFR NOTIMP, `.addr`
/// of another type in additional, node meta with `rfc1035-` in any case, node meta beside
/// every SRV answer, and prepared queries in `execute`'s order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_soa_ns_axfr_addr_and_meta_like_consul() {
    use crate::support::consul_sim::SimQuery;
    within(async {
        let sim = ConsulSim::start().await;
        sim.add_server("srv-1", "10.0.0.10");
        sim.add_server("srv-2", "10.0.0.11");
        sim.add_server("srv-3", "10.0.0.12");
        sim.add_server("srv-4", "10.0.0.13");
        sim.add_server("srv_bad", "10.0.0.14");
        sim.set_node_check("srv-4", "serfHealth", Status::Critical);
        let mut n1 = node("n1", "10.0.0.1");
        n1.meta.insert("RFC1035-spf".into(), "v=spf1 -all".into());
        n1.meta.insert("rack".into(), "r1".into());
        sim.add_node(n1);
        let mut own = svc("own-1", "own", "n1", 9000, &[]);
        own.address = "10.9.9.9".into();
        sim.add_service(own, Status::Passing);
        let dns = sim.dns_addr();

        let servers: BTreeSet<String> = ["srv-1", "srv-2", "srv-3"]
            .iter()
            .map(|s| format!("{s}.node.dc1.consul."))
            .collect();
        for name in ["consul.", "foo.consul.", "nope.service.consul."] {
            let (m, _) = dns_udp(dns, name, RecordType::NS, None).await;
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
            assert!(m.metadata.authoritative);
            let targets: BTreeSet<String> = m
                .answers
                .iter()
                .map(|r| {
                    assert_eq!((r.name.to_ascii().as_str(), r.ttl), ("consul.", 0));
                    match &r.data {
                        RData::NS(ns) => ns.0.to_ascii(),
                        other => panic!("{other:?}"),
                    }
                })
                .collect();
            assert_eq!(
                targets, servers,
                "healthy servers with names Consul can write"
            );
            let glue: BTreeSet<String> = m.additionals.iter().map(|r| r.name.to_ascii()).collect();
            assert_eq!(glue, servers);
            let (m, _) = dns_udp(dns, name, RecordType::SOA, None).await;
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
            assert_eq!(m.answers.len(), 1);
            assert_eq!(m.answers[0].name.to_ascii(), "consul.");
            assert!(matches!(m.answers[0].data, RData::SOA(_)));
            assert_eq!((m.authorities.len(), m.additionals.len()), (3, 3));
        }
        let m = dns_tcp(dns, "consul.", RecordType::AXFR).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
        assert!(m.metadata.authoritative && m.answers.is_empty());

        let (m, _) = dns_udp(dns, "7f000001.addr.consul.", RecordType::TXT, None).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty() && m.authorities.is_empty());
        assert_eq!(m.additionals.len(), 1);
        assert!(matches!(m.additionals[0].data, RData::A(_)));

        let txt = |records: &[hickory_proto::rr::Record]| -> Vec<(String, String)> {
            records
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(t) => Some((
                        r.name.to_ascii(),
                        String::from_utf8_lossy(&t.txt_data[0]).into_owned(),
                    )),
                    _ => None,
                })
                .collect()
        };
        let (m, _) = dns_udp(dns, "n1.node.consul.", RecordType::TXT, None).await;
        assert_eq!(
            txt(&m.answers),
            [
                ("n1.node.consul.".to_string(), "v=spf1 -all".to_string()),
                ("n1.node.consul.".to_string(), "rack=r1".to_string())
            ]
        );
        // An instance with its own address: the target is .addr, the TXT the node's name.
        let (m, _) = dns_udp(dns, "own.service.consul.", RecordType::SRV, None).await;
        assert_eq!(
            txt(&m.additionals),
            [
                ("n1.node.dc1.consul.".to_string(), "v=spf1 -all".to_string()),
                ("n1.node.dc1.consul.".to_string(), "rack=r1".to_string())
            ]
        );

        // Prepared queries: the order execute gave, not shuffled again.
        for (i, ms) in [(1, 3), (2, 1), (3, 2)] {
            let n = format!("q{i}");
            sim.add_node(node(&n, &format!("10.1.0.{i}")));
            sim.add_service(
                svc(&format!("db-{i}"), "db", &n, 5432, &[]),
                Status::Passing,
            );
            sim.set_node_rtt(&n, Duration::from_millis(ms));
        }
        sim.add_query(SimQuery {
            name: "near-db".into(),
            service: "db".into(),
            near: "_agent".into(),
            ..SimQuery::default()
        });
        for _ in 0..5 {
            let (m, _) = dns_udp(dns, "near-db.query.consul.", RecordType::A, None).await;
            assert_eq!(addresses(&m), ["10.1.0.2", "10.1.0.3", "10.1.0.1"]);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_shuffles_and_trims_silently() {
    within(async {
        let sim = ConsulSim::start().await;
        for i in 1..=60u16 {
            sim.add_simple(
                "big",
                &format!("node-{i}"),
                &format!("10.1.{}.{}", i / 200, i % 200 + 1),
                80,
            );
        }
        for i in 1..=5u16 {
            sim.add_simple("small", &format!("s{i}"), &format!("10.2.0.{i}"), 80);
        }
        let dns = sim.dns_addr();

        let mut orders = HashSet::new();
        for _ in 0..30 {
            let (m, _) = dns_udp(dns, "small.service.consul.", RecordType::A, None).await;
            assert_eq!(m.answers.len(), 5);
            orders.insert(addresses(&m));
        }
        assert!(orders.len() > 1, "answers must be shuffled per query");

        // Plain UDP: cut to 512 bytes, TC left clear (Consul's default).
        let (m, size) = dns_udp(dns, "big.service.consul.", RecordType::A, None).await;
        assert!(size <= 512, "{size}");
        assert!(!m.metadata.truncation);
        assert!(
            !m.answers.is_empty() && m.answers.len() < 60,
            "{}",
            m.answers.len()
        );
        // SRV with glue: answers and their additionals trimmed together.
        let (m, size) = dns_udp(dns, "big.service.consul.", RecordType::SRV, None).await;
        assert!(size <= 512 && !m.metadata.truncation);
        let targets: HashSet<String> = m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(s) => s.target.to_ascii(),
                _ => panic!(),
            })
            .collect();
        assert!(m
            .additionals
            .iter()
            .all(|r| targets.contains(&r.name.to_ascii())));
        // EDNS with room, or TCP: everything.
        let (m, size) = dns_udp(dns, "big.service.consul.", RecordType::A, Some(4096)).await;
        assert_eq!(m.answers.len(), 60);
        assert!(size > 512);
        assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(4096));
        let m = dns_tcp(dns, "big.service.consul.", RecordType::A).await;
        assert_eq!(m.answers.len(), 60);

        // Opt-in emulation of Consul's udp_answer_limit (default 3).
        sim.set_dns_udp_answer_limit(Some(3));
        let (m, _) = dns_udp(dns, "small.service.consul.", RecordType::A, None).await;
        assert_eq!(m.answers.len(), 3);
        let (m, _) = dns_udp(dns, "small.service.consul.", RecordType::A, Some(1232)).await;
        assert_eq!(m.answers.len(), 5, "the limit does not apply with EDNS");
    })
    .await;
}

// ---------------------------------------------------------------- health/state and churn

fn check_ids(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|c| {
            format!(
                "{}/{}",
                c["Node"].as_str().unwrap(),
                c["CheckID"].as_str().unwrap()
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_state_lists_checks_by_status_and_blocks() {
    within(async {
        let (sim, c, base) = sample_sim().await;

        // The sample's keys (minus Namespace, Enterprise only) plus the raft indexes, one
        // entry per check, node checks first within a node (ordered by check ID).
        let r = get(&c, &format!("{base}/v1/health/state/any")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.index(), sim.checks_index());
        let body = r.json();
        assert_eq!(
            without(&shape(&body), &["CreateIndex", "ModifyIndex"]),
            without(&shape(&sample("health-state")), &["Namespace"])
        );
        assert_eq!(
            check_ids(&body),
            [
                "foobar/serfHealth",
                "foobar/service:consul",
                "foobar/service:redis"
            ]
        );
        assert_eq!(body[0]["ServiceID"], "");
        assert_eq!(body[0]["ServiceName"], "");
        assert_eq!(body[2]["ServiceName"], "redis");
        assert_eq!(body[2]["ServiceTags"], serde_json::json!(["primary"]));
        let r = get(&c, &format!("{base}/v1/health/state/passing")).await;
        assert_eq!(check_ids(&r.json()).len(), 3);
        let r = get(&c, &format!("{base}/v1/health/state/critical")).await;
        assert_eq!(r.json(), serde_json::json!([]));
        let idx = r.index();

        // A service check and a node check change state; the lists and the index follow.
        sim.set_service_check("redis", Status::Critical);
        sim.set_node_check("foobar", "serfHealth", Status::Warning);
        let r = get(&c, &format!("{base}/v1/health/state/critical")).await;
        assert_eq!(check_ids(&r.json()), ["foobar/service:redis"]);
        assert_eq!(r.json()[0]["Status"], "critical");
        assert_eq!(r.index(), idx + 2);
        let r = get(&c, &format!("{base}/v1/health/state/warning")).await;
        assert_eq!(check_ids(&r.json()), ["foobar/serfHealth"]);
        let r = get(&c, &format!("{base}/v1/health/state/passing")).await;
        assert_eq!(check_ids(&r.json()), ["foobar/service:consul"]);
        let idx = r.index();

        // Blocking: nothing changes, the wait runs out with the same index.
        let t = Instant::now();
        let r = get(
            &c,
            &format!("{base}/v1/health/state/critical?index={idx}&wait=300ms"),
        )
        .await;
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(r.index(), idx);
        // Any check write wakes it, even one that leaves the asked list as it was (Consul
        // returns the checks table index).
        let c2 = c.clone();
        let url = format!("{base}/v1/health/state/critical?index={idx}&wait=5s");
        let t = Instant::now();
        let h = tokio::spawn(async move { get(&c2, &url).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        sim.set_service_check("consul", Status::Warning);
        let r = h.await.expect("join");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(r.index(), idx + 1);
        assert_eq!(check_ids(&r.json()), ["foobar/service:redis"]);

        // Deregistering removes the instance's checks (and moves the index).
        sim.remove_service("redis");
        let r = get(&c, &format!("{base}/v1/health/state/critical")).await;
        assert_eq!(r.json(), serde_json::json!([]));
        assert_eq!(r.index(), idx + 2);

        // dc, bad states, and ?filter (not implemented: refused rather than ignored).
        assert_eq!(
            get(&c, &format!("{base}/v1/health/state/any?dc=dc1"))
                .await
                .status,
            200
        );
        let r = get(&c, &format!("{base}/v1/health/state/any?dc=dc2")).await;
        assert_eq!((r.status, r.body.as_str()), (500, "No path to datacenter"));
        assert_eq!(
            get(&c, &format!("{base}/v1/health/state/bogus"))
                .await
                .status,
            400
        );
        assert_eq!(
            get(&c, &format!("{base}/v1/health/state/")).await.status,
            400
        );
        let r = get(
            &c,
            &format!("{base}/v1/health/state/any?filter=Status%20%3D%3D%20passing"),
        )
        .await;
        assert_eq!(r.status, 400);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_catalog_and_churn_generator() {
    within(async {
        let sim = ConsulSim::start().await;
        let before = sim.current_index();
        let grid = sim.add_grid("g", 300, 4);
        assert_eq!(grid.len(), 1200);
        assert_eq!(sim.current_index(), before + 1, "one write");
        let c = client();
        let base = sim.http_url();
        let r = get(&c, &format!("{base}/v1/health/service/g7")).await;
        let mut got: Vec<String> = r
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["Node"]["Address"].as_str().unwrap().to_string())
            .collect();
        got.sort();
        let mut want: Vec<String> = grid[28..32].iter().map(|g| g.address.clone()).collect();
        want.sort();
        assert_eq!(got, want);
        assert_eq!(ids(&r.json()), ["g7-0", "g7-1", "g7-2", "g7-3"]);
        let r = get(&c, &format!("{base}/v1/health/state/any")).await;
        assert_eq!(
            r.json().as_array().unwrap().len(),
            2400,
            "serfHealth + service check each"
        );

        // 200 flips/s over 10 targets, half through node checks: each flips in turn.
        let targets: Vec<ChurnTarget> = grid[..10]
            .iter()
            .enumerate()
            .map(|(k, g)| ChurnTarget {
                service: g.service.clone(),
                check: if k % 2 == 0 {
                    ChurnCheck::Node(g.node.clone())
                } else {
                    ChurnCheck::Service(g.id.clone())
                },
            })
            .collect();
        let idx = sim.checks_index();
        let churn = sim.start_churn(targets, 200);
        let started = Instant::now();
        while churn.count() < 25 && started.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let flips = churn.stop();
        assert!(flips.len() >= 25, "{} flips", flips.len());
        assert!(flips.windows(2).all(|w| w[0].at <= w[1].at));
        // Every target flipped once before any flipped twice, and each alternates.
        let first: HashSet<usize> = flips[..10].iter().map(|f| f.target).collect();
        assert_eq!(first.len(), 10);
        assert!(flips[..10].iter().all(|f| f.status == Status::Critical));
        assert!(flips[10..20].iter().all(|f| f.status == Status::Passing));
        assert_eq!(sim.checks_index(), idx + flips.len() as u64);
        // The critical list is exactly the targets whose last flip was to critical.
        let mut last = BTreeMap::new();
        for f in &flips {
            last.insert(f.target, f.status);
        }
        let mut want: Vec<String> = last
            .iter()
            .filter(|(_, s)| **s == Status::Critical)
            .map(|(&t, _)| {
                let g = &grid[t];
                if t % 2 == 0 {
                    format!("{}/serfHealth", g.node)
                } else {
                    format!("{}/service:{}", g.node, g.id)
                }
            })
            .collect();
        want.sort();
        let r = get(&c, &format!("{base}/v1/health/state/critical")).await;
        let mut got = check_ids(&r.json());
        got.sort();
        assert_eq!(got, want);
    })
    .await;
}

// ---------------------------------------------------------------- catalog nodes and PTR

/// The node names of a `/v1/catalog/nodes` body, in its order.
fn node_names(v: &Value) -> Vec<String> {
    field_list(v, "Node")
}

/// The string field `key` of each element of an array body.
fn field_list(v: &Value, key: &str) -> Vec<String> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|n| n[key].as_str().expect(key).to_string())
        .collect()
}

/// GETs `url` (a blocking query) and, once it is held, makes `change`; returns the response.
async fn get_while(c: &reqwest::Client, url: String, change: impl FnOnce()) -> Resp {
    let c = c.clone();
    let held = tokio::spawn(async move { get(&c, &url).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    change();
    held.await.expect("the request task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_nodes_shape_tagged_addresses_and_blocking() {
    within(async {
        let sim = ConsulSim::start().await;
        sample_like(&sim);
        sim.add_node(node("v6", "2001:db8::6"));
        sim.set_node_tagged_addresses(
            "foobar",
            &[
                ("lan_ipv4", "10.1.10.12"),
                ("wan_ipv4", "10.1.10.12"),
                ("lan_ipv6", "2001:db8::12"),
                ("wan_ipv6", "2001:db8::12"),
            ],
        );
        let c = client();
        let base = sim.http_url();
        let r = get(&c, &format!("{base}/v1/catalog/nodes")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["content-type"], "application/json");
        let body = r.json();
        // The sample's keys, plus the node's raft indexes (Consul's `Node` carries them; the
        // docs sample is abridged) and the tagged addresses by family an agent registers.
        let ours = shape(&body);
        let extra = [
            "CreateIndex",
            "ModifyIndex",
            "lan_ipv4",
            "wan_ipv4",
            "lan_ipv6",
            "wan_ipv6",
        ];
        assert_eq!(without(&ours, &extra), shape(&sample("catalog-nodes")));
        assert!(ours.contains("[].CreateIndex") && ours.contains("[].ModifyIndex"));
        assert_eq!(node_names(&body), ["foobar", "v6"], "sorted by name");
        assert_eq!(
            body[0]["TaggedAddresses"],
            serde_json::json!({
                "lan": "10.1.10.12", "lan_ipv4": "10.1.10.12", "lan_ipv6": "2001:db8::12",
                "wan": "10.1.10.12", "wan_ipv4": "10.1.10.12", "wan_ipv6": "2001:db8::12",
            })
        );
        assert_eq!(body[0]["Meta"]["instance_type"], "t2.medium");
        assert_eq!(body[1]["Address"], "2001:db8::6");
        assert_eq!(
            body[1]["TaggedAddresses"],
            serde_json::json!({"lan": "2001:db8::6", "wan": "2001:db8::6"})
        );
        assert_eq!(body[1]["Datacenter"], "dc1");
        let idx = r.index();
        assert!(idx >= 1);
        // `?stale` is accepted (any server answers); another datacenter fails as without a WAN path.
        assert_eq!(
            get(&c, &format!("{base}/v1/catalog/nodes?stale"))
                .await
                .index(),
            idx
        );
        let r = get(&c, &format!("{base}/v1/catalog/nodes?dc=dc2")).await;
        assert_eq!((r.status, r.body.as_str()), (500, "No path to datacenter"));

        // A check flip is not a change of the nodes table: the query waits out its wait.
        let t = Instant::now();
        let url = format!("{base}/v1/catalog/nodes?stale&index={idx}&wait=300ms");
        let r = get_while(&c, url, || sim.set_service_check("redis", Status::Critical)).await;
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert_eq!(r.index(), idx);

        // A node registered wakes it at once, with a higher index.
        let t = Instant::now();
        let url = format!("{base}/v1/catalog/nodes?index={idx}&wait=10s");
        let r = get_while(&c, url, || sim.add_node(node("late", "10.1.10.99"))).await;
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(r.index() > idx);
        assert_eq!(node_names(&r.json()), ["foobar", "late", "v6"]);

        // So do a new tagged address and a node deregistered, which takes its services along.
        let idx = r.index();
        let url = format!("{base}/v1/catalog/nodes?index={idx}&wait=10s");
        let tag = || sim.set_node_tagged_addresses("v6", &[("lan_ipv6", "2001:db8::6")]);
        let r = get_while(&c, url, tag).await;
        assert!(r.index() > idx);
        assert_eq!(r.json()[2]["TaggedAddresses"]["lan_ipv6"], "2001:db8::6");
        let idx = r.index();
        let url = format!("{base}/v1/catalog/nodes?index={idx}&wait=10s");
        let r = get_while(&c, url, || sim.remove_node("foobar")).await;
        assert!(r.index() > idx);
        assert_eq!(node_names(&r.json()), ["late", "v6"]);
        let redis = get(&c, &format!("{base}/v1/health/service/redis")).await;
        assert_eq!(redis.json(), serde_json::json!([]));
        assert!(redis.index() > idx, "the service's result changed too");
        let services = get(&c, &format!("{base}/v1/catalog/services")).await.json();
        assert!(services.get("redis").is_none() && services.get("consul").is_none());
    })
    .await;
}

fn ptr_target(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .map(|r| match &r.data {
            RData::PTR(p) => {
                assert_eq!(r.ttl, 0, "Consul's PTR TTL is 0");
                p.0.to_ascii()
            }
            other => panic!("PTR expected: {other:?}"),
        })
        .collect()
}

/// Consul's `TestDNS_ReverseLookup*` and `TestDNS_ServiceReverseLookup*` (agent/dns_test.go):
/// node addresses first, then service addresses, IPv4 and IPv6, any question type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_ptr_like_consul() {
    within(async {
        let sim = ConsulSim::start().await;
        sim.add_node(node("foo2", "127.0.0.2"));
        sim.add_node(node("bar", "::4242:4242"));
        sim.add_node(node("foo", "127.0.0.1"));
        let mut db = svc("db-1", "db", "foo", 12345, &["primary"]);
        db.address = "127.0.0.3".into();
        sim.add_service(db, Status::Passing);
        let mut db6 = svc("db-6", "db6", "bar", 12345, &[]);
        db6.address = "2001:db8::ff00:42:8329".into();
        sim.add_service(db6, Status::Critical);
        // Its service address is its node's: the node answers.
        let mut same = svc("same-1", "same", "foo", 80, &[]);
        same.address = "127.0.0.1".into();
        sim.add_service(same, Status::Passing);
        sim.set_node_tagged_addresses("foo", &[("lan_ipv6", "2001:db8::1")]);
        let dns = sim.dns_addr();

        for (name, rtype, want) in [
            (
                "2.0.0.127.in-addr.arpa.",
                RecordType::ANY,
                "foo2.node.dc1.consul.",
            ),
            (
                "2.0.0.127.in-addr.arpa.",
                RecordType::PTR,
                "foo2.node.dc1.consul.",
            ),
            (
                "2.0.0.127.IN-ADDR.ARPA.",
                RecordType::A,
                "foo2.node.dc1.consul.",
            ),
            (
                "1.0.0.127.in-addr.arpa.",
                RecordType::PTR,
                "foo.node.dc1.consul.",
            ),
            (
                "3.0.0.127.in-addr.arpa.",
                RecordType::PTR,
                "db.service.dc1.consul.",
            ),
            (
                "2.4.2.4.2.4.2.4.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa.",
                RecordType::PTR,
                "bar.node.dc1.consul.",
            ),
            (
                "9.2.3.8.2.4.0.0.0.0.f.f.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.",
                RecordType::ANY,
                "db6.service.dc1.consul.",
            ),
        ] {
            let (m, _) = dns_udp(dns, name, rtype, None).await;
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
            assert!(m.metadata.authoritative && !m.metadata.recursion_available);
            assert_eq!(ptr_target(&m), [want], "{name} {rtype}");
            assert_eq!(m.answers[0].name.to_ascii(), name, "owner: the question");
        }
        let m = dns_tcp(dns, "3.0.0.127.in-addr.arpa.", RecordType::PTR).await;
        assert_eq!(ptr_target(&m), ["db.service.dc1.consul."], "over TCP");

        // Unknown, tagged-only, partial and malformed: NXDOMAIN with the SOA (no recursors).
        for name in [
            "9.9.9.10.in-addr.arpa.",
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.",
            "0.127.in-addr.arpa.",
            "02.0.0.127.in-addr.arpa.",
            "x.0.0.127.in-addr.arpa.",
            "in-addr.arpa.",
            "arpa.",
        ] {
            let (m, _) = dns_udp(dns, name, RecordType::PTR, None).await;
            let nxdomain = (ResponseCode::NXDomain, true, 0);
            let got = (
                m.metadata.response_code,
                m.metadata.authoritative,
                m.answers.len(),
            );
            assert_eq!(got, nxdomain, "{name}: NXDOMAIN, AA, no answer");
            assert_soa_authority(&m);
        }
        // Deregistered: gone at once.
        sim.remove_node("foo2");
        let (m, _) = dns_udp(dns, "2.0.0.127.in-addr.arpa.", RecordType::PTR, None).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    })
    .await;
}

// ---------------------------------------------------------------- mesh, peers, tenancy

/// `web` (plain, on n1), its sidecar proxy, a Connect-native `api`, an ingress gateway for
/// `web`, each with its own node.
fn mesh_catalog(sim: &ConsulSim) {
    use crate::support::consul_sim::SimMesh;
    for (name, addr) in [("n1", "10.0.0.1"), ("n2", "10.0.0.2"), ("n3", "10.0.0.3")] {
        sim.add_node(node(name, addr));
    }
    sim.add_service(svc("web-1", "web", "n1", 8080, &[]), Status::Passing);
    for (svc, mesh) in [
        (
            svc("web-1-sidecar", "web-sidecar-proxy", "n1", 21000, &[]),
            SimMesh::sidecar("web"),
        ),
        (svc("api-1", "api", "n2", 9090, &[]), SimMesh::native()),
        (
            svc("gw-1", "gw", "n3", 8443, &[]),
            SimMesh::ingress(&["web"]),
        ),
    ] {
        sim.add_service_with(svc, mesh, Status::Passing);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_ingress_endpoints_list_the_mesh_instances() {
    within(async {
        let (sim, c, base) = sim_with(mesh_catalog).await;

        // Connect: the sidecars of a service (Kind, Proxy, its virtual IP), not the service.
        let r = get(&c, &format!("{base}/v1/health/connect/web")).await;
        assert_eq!(r.status, 200);
        assert!(r.index() >= 1);
        let body = r.json();
        assert_eq!(ids(&body), vec!["web-1-sidecar"]);
        let s = &body[0]["Service"];
        assert_eq!(s["Kind"], "connect-proxy");
        assert_eq!(s["Proxy"]["DestinationServiceName"], "web");
        assert_eq!(
            s["TaggedAddresses"]["consul-virtual"]["Address"],
            "240.0.0.1"
        );
        assert_eq!(s["TaggedAddresses"]["consul-virtual"]["Port"], 21000);
        // The same entry shape as /health/service (the docs: "response format are the same"),
        // plus the Connect fields.
        let theirs = as_agent_writes(without(&shape(&sample("health-service")), &["Namespace"]));
        let ours = shape(&body);
        let mesh: BTreeSet<&str> = [
            "CreateIndex",
            "ModifyIndex",
            "Kind",
            "Proxy",
            "DestinationServiceName",
            "DestinationServiceID",
            "LocalServiceAddress",
            "LocalServicePort",
            "Mode",
            "Upstreams",
            "consul-virtual",
            "Address",
            "Port",
        ]
        .into();
        for missing in theirs.difference(&ours) {
            // A sidecar without an address of its own has no lan/wan tagged addresses.
            assert!(
                missing.contains(".TaggedAddresses.") || missing.ends_with(".Address"),
                "missing {missing}"
            );
        }
        for extra in ours.difference(&theirs) {
            assert!(mesh.contains(last_seg(extra)), "unexpected key {extra}");
        }
        // Connect-native: the service's own instance, with its own virtual IP.
        let r = get(&c, &format!("{base}/v1/health/connect/api")).await;
        let body = r.json();
        assert_eq!(ids(&body), vec!["api-1"]);
        assert_eq!(body[0]["Service"]["Connect"]["Native"], true);
        assert_eq!(
            body[0]["Service"]["TaggedAddresses"]["consul-virtual"]["Address"],
            "240.0.0.2"
        );
        // The plain endpoint is unchanged: no proxies.
        let r = get(&c, &format!("{base}/v1/health/service/web")).await;
        assert_eq!(ids(&r.json()), vec!["web-1"]);
        assert!(r.json()[0]["Service"].get("Kind").is_none());
        // Ingress: the gateways whose configuration lists the service.
        let r = get(&c, &format!("{base}/v1/health/ingress/web")).await;
        let body = r.json();
        assert_eq!(ids(&body), vec!["gw-1"]);
        assert_eq!(body[0]["Service"]["Kind"], "ingress-gateway");
        for empty in ["connect/nope", "ingress/api", "connect/gw"] {
            let r = get(&c, &format!("{base}/v1/health/{empty}")).await;
            assert_eq!(
                (r.status, r.json()),
                (200, serde_json::json!([])),
                "{empty}"
            );
        }
        // ?passing and blocking work as on /health/service.
        sim.set_service_check("web-1-sidecar", Status::Critical);
        let r = get(&c, &format!("{base}/v1/health/connect/web?passing")).await;
        assert_eq!(r.json(), serde_json::json!([]));
        let idx = get(&c, &format!("{base}/v1/health/connect/web"))
            .await
            .index();
        let url = format!("{base}/v1/health/connect/web?index={idx}&wait=5s");
        let held = tokio::spawn(async move { get(&client(), &url).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!held.is_finished(), "blocks until a change");
        sim.set_service_check("web-1-sidecar", Status::Passing);
        let r = held.await.expect("join");
        assert!(r.index() > idx);
        assert_eq!(r.json()[0]["Checks"][1]["Status"], "passing");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_parameter_selects_a_peers_imported_instances() {
    within(async {
        let (sim, c, base) = sim_with(|sim| {
            sim.add_node(node("n1", "10.0.0.1"));
            sim.add_service(svc("web-1", "web", "n1", 80, &[]), Status::Passing);
            sim.add_peering("p1");
            sim.add_node_in(node("pn1", "10.9.0.1"), Some("p1"), None);
            sim.add_service(svc("web-p1", "web", "pn1", 80, &[]), Status::Passing);
        })
        .await;

        let r = get(&c, &format!("{base}/v1/health/service/web")).await;
        assert_eq!(ids(&r.json()), vec!["web-1"], "local instances only");
        let r = get(&c, &format!("{base}/v1/health/service/web?peer=p1")).await;
        let body = r.json();
        assert_eq!(ids(&body), vec!["web-p1"]);
        assert_eq!(body[0]["Node"]["PeerName"], "p1");
        assert_eq!(body[0]["Service"]["PeerName"], "p1");
        assert!(r.index() >= 1);
        // A peer that exports nothing (or does not exist): empty, not an error.
        let r = get(&c, &format!("{base}/v1/health/service/web?peer=nope")).await;
        assert_eq!((r.status, r.json()), (200, serde_json::json!([])));
        let r = get(&c, &format!("{base}/v1/catalog/services?peer=p1")).await;
        assert_eq!(r.json(), serde_json::json!({ "web": [] }));
        let r = get(&c, &format!("{base}/v1/catalog/services")).await;
        assert_eq!(r.json(), serde_json::json!({ "web": [] }));
        let r = get(&c, &format!("{base}/v1/catalog/nodes?peer=p1")).await;
        assert_eq!(r.json().as_array().unwrap().len(), 1);
        assert_eq!(r.json()[0]["Node"], "pn1");
        let r = get(&c, &format!("{base}/v1/catalog/nodes")).await;
        assert_eq!(r.json().as_array().unwrap().len(), 1);
        assert_eq!(r.json()[0]["Node"], "n1");
        let r = get(&c, &format!("{base}/v1/catalog/node/pn1?peer=p1")).await;
        assert_eq!(r.json()["Node"]["Node"], "pn1");
        let r = get(&c, &format!("{base}/v1/catalog/node/pn1")).await;
        assert_eq!(r.json(), Value::Null, "a peer's node is not a local one");

        // /v1/peerings: the docs' sample shape (a CE agent has no Partition field).
        let r = get(&c, &format!("{base}/v1/peerings")).await;
        assert_eq!(r.status, 200);
        let body = r.json();
        assert_eq!(body[0]["Name"], "p1");
        assert_eq!(body[0]["State"], "ACTIVE");
        let keys: BTreeSet<&str> = body[0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let sample_keys: BTreeSet<&str> = [
            "ID",
            "Name",
            "State",
            "PeerID",
            "PeerServerName",
            "PeerServerAddresses",
            "CreateIndex",
            "ModifyIndex",
        ]
        .into();
        assert_eq!(keys, sample_keys);
        // The DNS port serves local instances only.
        let (m, _) = dns_udp(sim.dns_addr(), "web.service.consul.", RecordType::A, None).await;
        assert_eq!(addresses(&m), vec!["10.0.0.1"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_and_partitions_as_consul_ce_and_enterprise_answer_them() {
    within(async {
        use crate::support::consul_sim::SimMesh;
        let (sim, c, base) = sim_with(|sim| {
            sim.add_node(node("n1", "10.0.0.1"));
            sim.add_service(svc("web-1", "web", "n1", 80, &[]), Status::Passing);
        })
        .await;

        // Consul CE: any ns or partition, even "default", is a 400 with CE's own message, and
        // the Enterprise lists do not exist.
        let r = get(&c, &format!("{base}/v1/health/service/web?ns=default")).await;
        assert_eq!(r.status, 400);
        assert_eq!(
            r.body,
            "Invalid query parameter: \"ns\" - Namespaces are a Consul Enterprise feature"
        );
        let r = get(&c, &format!("{base}/v1/catalog/services?partition=ap1")).await;
        assert_eq!(r.status, 400);
        assert_eq!(
            r.body,
            "Invalid query parameter: \"partition\" - Partitions are a Consul Enterprise feature"
        );
        for list in ["namespaces", "partitions"] {
            let r = get(&c, &format!("{base}/v1/{list}")).await;
            assert_eq!(r.status, 404, "{list}");
        }

        // Consul Enterprise: the parameters select, the JSON names namespace and partition.
        sim.set_enterprise(true);
        sim.add_partition("ap1");
        sim.add_namespace("default", "ns1");
        let in_ns1 = SimMesh::in_namespace("ns1");
        sim.add_service_with(
            svc("web-ns1", "web", "n1", 81, &[]),
            in_ns1,
            Status::Passing,
        );
        sim.add_node_in(node("an1", "10.1.0.1"), None, Some("ap1"));
        sim.add_service(svc("web-ap1", "web", "an1", 82, &[]), Status::Passing);
        let r = get(&c, &format!("{base}/v1/health/service/web")).await;
        let body = r.json();
        assert_eq!(ids(&body), vec!["web-1"]);
        assert_eq!(body[0]["Service"]["Namespace"], "default");
        assert_eq!(body[0]["Service"]["Partition"], "default");
        assert_eq!(body[0]["Node"]["Partition"], "default");
        let r = get(&c, &format!("{base}/v1/health/service/web?ns=ns1")).await;
        assert_eq!(ids(&r.json()), vec!["web-ns1"]);
        assert_eq!(r.json()[0]["Service"]["Namespace"], "ns1");
        let r = get(&c, &format!("{base}/v1/health/service/web?ns=default")).await;
        assert_eq!(ids(&r.json()), vec!["web-1"]);
        let r = get(&c, &format!("{base}/v1/health/service/web?partition=ap1")).await;
        assert_eq!(ids(&r.json()), vec!["web-ap1"]);
        assert_eq!(r.json()[0]["Node"]["Partition"], "ap1");
        let r = get(&c, &format!("{base}/v1/catalog/nodes?partition=ap1")).await;
        assert_eq!(r.json()[0]["Node"], "an1");
        // The lists, in the shape of the docs' samples.
        let r = get(&c, &format!("{base}/v1/partitions")).await;
        let body = r.json();
        assert_eq!(field_list(&body, "Name"), vec!["default", "ap1"]);
        assert_eq!(body[0]["Description"], "Builtin Default Partition");
        let r = get(&c, &format!("{base}/v1/namespaces")).await;
        let body = r.json();
        assert_eq!(field_list(&body, "Name"), vec!["default", "ns1"]);
        assert_eq!(body[0]["Description"], "Builtin Default Namespace");
        let r = get(&c, &format!("{base}/v1/namespaces?partition=ap1")).await;
        assert_eq!(
            r.json().as_array().unwrap().len(),
            1,
            "ap1 has only default"
        );
    })
    .await;
}
