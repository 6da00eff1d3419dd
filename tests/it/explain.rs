//! `explain` and the status page over real HTTP, against the Consul simulator: the reason for
//! each instance left out (or kept in despite its health), the `explain` command as a real
//! process, untrusted check output and node meta kept as text, and the debug routes refused on
//! a listener that is not loopback (in a network namespace of the test's own).

use std::net::SocketAddr;
use std::process::Command;

use serde_json::Value;

use crate::support::consul_sim::{ConsulSim, SimNode, SimService, Status};
use crate::support::e2e::in_new_network_namespace;
use crate::support::upstream::TestUpstream;
use crate::support::*;

/// What the simulator's check of the critical instance prints: markup and an escape sequence.
const HOSTILE_OUTPUT: &str = "<script>alert(1)</script> \u{1b}[31mconnection refused";

/// web on n1..n5 (127.0.0.2-6): web-1 passing with tag v1, web-2 critical (hostile output),
/// web-3 warning, web-4 and web-5 passing (n5's node meta holds markup). down: two critical.
async fn sim() -> ConsulSim {
    let sim = ConsulSim::start().await;
    for (i, status) in [
        Status::Passing,
        Status::Critical,
        Status::Warning,
        Status::Passing,
        Status::Passing,
    ]
    .into_iter()
    .enumerate()
    {
        let n = i + 1;
        let mut node = SimNode::new(&format!("n{n}"), &format!("127.0.0.{}", n + 1));
        if n == 5 {
            node = node.meta("note", "<script>meta</script>");
        }
        sim.add_node(node);
        let tags: Vec<String> = if n == 1 {
            vec!["v1".into()]
        } else {
            Vec::new()
        };
        sim.add_service(
            SimService {
                tags,
                ..SimService::new(&format!("web-{n}"), "web", &format!("n{n}"), 8080)
            },
            status,
        );
    }
    sim.set_service_check_output("web-2", Status::Critical, HOSTILE_OUTPUT);
    sim.add_instance("down-1", "down", "n1", "127.0.0.2", 9000, Status::Critical);
    sim.add_instance("down-2", "down", "n2", "127.0.0.3", 9000, Status::Critical);
    sim
}

/// A forwarder on the simulator with `consul_lines`, its HTTP endpoint on loopback.
async fn server(sim: &ConsulSim, consul_lines: &str) -> (TestServer, TestUpstream, SocketAddr) {
    let up = TestUpstream::start().await;
    let toml = TestConfig::new()
        .upstream(up.addr)
        .consul_http(sim.http_url())
        .consul(consul_lines)
        .metrics_listen("127.0.0.1:0")
        .toml();
    let server = TestServer::start(&toml).await;
    let endpoint = server.metrics_addr.expect("metrics endpoint on");
    (server, up, endpoint)
}

async fn explain_json(endpoint: SocketAddr, query: &str) -> Value {
    let (status, body) = http_get(endpoint, &format!("/explain?{query}")).await;
    assert_eq!(status, 200, "/explain?{query}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("JSON ({e}): {body}"))
}

/// The instance on `node` in an explanation.
fn instance<'a>(e: &'a Value, node: &str) -> &'a Value {
    e["consul"]["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .find(|i| i["node"] == node)
        .unwrap_or_else(|| panic!("no instance on {node} in {e:#}"))
}

fn code(i: &Value) -> &str {
    i["reason"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn explain_names_critical_warning_tag_and_record_limit() {
    let sim = sim().await;
    let (server, _up, endpoint) = server(&sim, "only_passing = true\na_record_limit = 2\n").await;
    let e = explain_json(endpoint, "name=web.service.consul&type=A").await;
    assert_eq!(e["reading"]["kind"], "service");
    assert_eq!(e["reading"]["service"], "web");
    assert_eq!(e["reply"]["rcode"], "NOERROR");
    let critical = instance(&e, "n2");
    assert_eq!(critical["in_answer"], false);
    assert_eq!(code(critical), "critical");
    assert_eq!(
        critical["why"],
        "left out: critical check \"Service 'web' check\" on node n2"
    );
    assert_eq!(
        critical["checks"][1]["output"]
            .as_str()
            .map(|o| o.contains("connection refused")),
        Some(true),
        "{critical:#}"
    );
    let warning = instance(&e, "n3");
    assert_eq!(code(warning), "warning_while_only_passing");
    assert!(warning["why"]
        .as_str()
        .expect("why")
        .contains("only_passing"));
    // Three eligible, two in the reply: the third names the cap.
    let eligible: Vec<&Value> = ["n1", "n4", "n5"].iter().map(|n| instance(&e, n)).collect();
    let answered = eligible.iter().filter(|i| i["in_answer"] == true).count();
    assert_eq!(answered, 2, "{e:#}");
    let capped: Vec<&&Value> = eligible
        .iter()
        .filter(|i| i["in_answer"] == false)
        .collect();
    assert_eq!(code(capped[0]), "a_record_limit");
    assert_eq!(capped[0]["reason"]["limit"], 2);
    assert_eq!(e["reply"]["answer_count"], 2);
    // The view: from a blocking query, with Consul's index and the agent that served it.
    let view = &e["consul"]["view"];
    assert!(
        view["consul_index"].as_u64().is_some_and(|i| i > 0),
        "{view:#}"
    );
    assert_eq!(view["agent"], sim.http_addr().to_string());
    assert_eq!(view["critical"], 1);
    assert_eq!(e["consul"]["ttl"]["from"], "consul.service_ttl[\"*\"]");

    let tagged = explain_json(endpoint, "name=v1.web.service.consul").await;
    assert_eq!(tagged["reading"]["tag"], "v1");
    assert_eq!(instance(&tagged, "n1")["in_answer"], true);
    let other = instance(&tagged, "n4");
    assert_eq!(code(other), "tag_filter");
    assert_eq!(other["reason"]["tag"], "v1");
    server.stop().await;
}

#[tokio::test]
async fn explain_names_none_healthy_and_udp_answer_limit() {
    let sim = sim().await;
    let (server, _up, endpoint) =
        server(&sim, "when_none_healthy = \"all\"\nudp_answer_limit = 1\n").await;
    let e = explain_json(endpoint, "name=down.service.consul").await;
    for node in ["n1", "n2"] {
        let i = instance(&e, node);
        assert_eq!(i["in_answer"], true, "{e:#}");
        assert_eq!(code(i), "served_none_healthy");
    }
    // A client without EDNS (nginx, glibc) gets one of the four healthy ones.
    let e = explain_json(endpoint, "name=web.service.consul&edns=0").await;
    assert_eq!(e["consul"]["rules"]["without_edns"], true);
    let healthy: Vec<&Value> = ["n1", "n3", "n4", "n5"]
        .iter()
        .map(|n| instance(&e, n))
        .collect();
    assert_eq!(
        healthy.iter().filter(|i| i["in_answer"] == true).count(),
        1,
        "{e:#}"
    );
    for i in healthy.iter().filter(|i| i["in_answer"] == false) {
        assert_eq!(code(i), "udp_answer_limit");
        assert_eq!(i["reason"]["limit"], 1);
    }
    server.stop().await;
}

#[tokio::test]
async fn explain_of_unknown_and_invalid_names_starts_nothing() {
    let sim = sim().await;
    let (server, _up, endpoint) = server(&sim, "").await;
    // Let the inventory load, then count what reaches Consul.
    let _ = explain_json(endpoint, "name=web.service.consul").await;
    let before = sim.requests("/v1/health/service/");
    let e = explain_json(endpoint, "name=nosuch.service.consul").await;
    assert_eq!(e["reply"]["rcode"], "NXDOMAIN");
    assert!(e["consul"]["no_view"].as_str().is_some(), "{e:#}");
    let e = explain_json(endpoint, "name=%2A.service.consul").await;
    assert_eq!(e["reply"]["rcode"], "NXDOMAIN");
    assert_eq!(sim.requests("/v1/health/service/"), before);
    // Client-supplied parts are bounded.
    let long = "a.".repeat(200);
    assert_eq!(
        http_get(endpoint, &format!("/explain?name={long}")).await.0,
        400
    );
    assert_eq!(
        http_get(endpoint, "/explain?name=web.service.consul&type=BOGUS")
            .await
            .0,
        400
    );
    assert_eq!(
        http_get(endpoint, "/explain?name=web.service.consul&page=0")
            .await
            .0,
        400
    );
    let huge = "x".repeat(5000);
    assert_eq!(
        http_get(endpoint, &format!("/explain?name={huge}")).await.0,
        414
    );
    server.stop().await;
}

#[tokio::test]
async fn html_and_text_keep_check_output_and_node_meta_as_text() {
    let sim = sim().await;
    let (server, _up, endpoint) = server(&sim, "enable_additional_node_meta_txt = true\n").await;
    let (status, page) = http_get(
        endpoint,
        "/explain?format=html&name=web.service.consul&type=SRV",
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert!(!page.to_ascii_lowercase().contains("<script"), "{page}");
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(
        page.contains("&lt;script&gt;meta&lt;/script&gt;"),
        "the TXT of n5's meta: {page}"
    );
    let (_, text) = http_get(endpoint, "/explain?format=text&name=web.service.consul").await;
    assert!(text.contains("connection refused"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "an escape sequence reached the terminal text"
    );
    let (status, home) = http_get(endpoint, "/").await;
    assert_eq!(status, 200);
    assert!(
        home.contains("href=\"/explain?format=html&amp;name=web.service.consul&amp;type=A\""),
        "{home}"
    );
    assert!(home.contains("<meta http-equiv=\"refresh\""));
    server.stop().await;
}

#[tokio::test]
async fn large_services_are_paged() {
    let sim = ConsulSim::start().await;
    sim.add_many(
        (0..250u32)
            .map(|i| {
                let node = format!("m{i}");
                let addr = format!("127.1.{}.{}", i / 250, i % 250 + 1);
                (
                    SimNode::new(&node, &addr),
                    SimService::new(&format!("big-{i}"), "big", &node, 80),
                    Status::Passing,
                )
            })
            .collect(),
    );
    let (server, _up, endpoint) = server(&sim, "").await;
    let first = explain_json(endpoint, "name=big.service.consul").await;
    assert_eq!(first["consul"]["instance_count"], 250);
    assert_eq!(first["consul"]["pages"], 3);
    assert_eq!(
        first["consul"]["instances"].as_array().map(Vec::len),
        Some(100)
    );
    let last = explain_json(endpoint, "name=big.service.consul&page=3").await;
    assert_eq!(last["consul"]["page"], 3);
    assert_eq!(
        last["consul"]["instances"].as_array().map(Vec::len),
        Some(50)
    );
    // 512 bytes without EDNS hold some 30 of the 250: the others were cut for size, and TC says so.
    let small = explain_json(endpoint, "name=big.service.consul&edns=0").await;
    assert_eq!(small["reply"]["truncated"], true, "{:#}", small["reply"]);
    let cut: Vec<&Value> = small["consul"]["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter(|i| i["in_answer"] == false)
        .collect();
    assert!(!cut.is_empty());
    for i in cut {
        assert_eq!(code(i), "size_truncation", "{i:#}");
        assert_eq!(i["reason"]["truncated"], true);
    }
    server.stop().await;
}

/// Runs the binary's `explain` (a real process) and returns (exit code, stdout, stderr).
async fn explain_command(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(BIN)
            .arg("explain")
            .args(&args)
            .output()
            .expect("run the binary");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("join")
}

#[tokio::test]
async fn the_explain_command_prints_reasons_and_json() {
    let sim = sim().await;
    let (server, _up, endpoint) = server(&sim, "").await;
    let at = endpoint.to_string();
    let (code, out, err) = explain_command(vec![
        "web.service.consul".into(),
        "--endpoint".into(),
        at.clone(),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("- n2 127.0.0.3:8080 critical: left out: critical check \"Service 'web' check\" on node n2"),
        "{out}"
    );
    assert!(out.contains(";; ANSWER SECTION:"), "{out}");
    assert!(!out.contains('\u{1b}'), "{out}");
    let (code, out, err) = explain_command(vec![
        "web.service.consul".into(),
        "SRV".into(),
        "--json".into(),
        "--endpoint".into(),
        at,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let e: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(e["type"], "SRV");
    assert_eq!(self::code(instance(&e, "n2")), "critical");
    server.stop().await;
    // Nothing listening: said, exit 1.
    let (code, _, err) = explain_command(vec![
        "web.service.consul".into(),
        "--endpoint".into(),
        format!("127.0.0.1:{}", free_port()),
    ])
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach"), "{err}");
}

/// In a network namespace of its own, with 10.99.0.1 on its `lo` (an address that is not
/// loopback): the forwarder (`--dev`) with its endpoint there, `extra` added to its flags;
/// prints the status of `/`, `/explain` and `/metrics`, then the explain command's exit code.
fn off_loopback(extra: &str) -> String {
    let script = format!(
        r#"set -eu
ip link set lo up
ip addr add 10.99.0.1/32 dev lo
"{BIN}" --dev --listen 127.0.0.1:1053 --metrics-listen 10.99.0.1:9153 {extra} >/dev/null 2>&1 &
pid=$!
trap 'kill $pid; wait $pid || true' EXIT
for _ in $(seq 100); do
  curl -s -o /dev/null http://10.99.0.1:9153/health && break
  sleep 0.1
done
for path in / '/explain?name=web.service.consul' /metrics; do
  echo "$path $(curl -s -o /dev/null -w '%{{http_code}}' "http://10.99.0.1:9153$path")"
done
rc=0
"{BIN}" explain web.service.consul --endpoint 10.99.0.1:9153 >/dev/null 2>&1 || rc=$?
echo "explain $rc"
"#
    );
    in_new_network_namespace(&script)
}

#[test]
fn debug_routes_are_refused_off_loopback_unless_metrics_debug() {
    let refused = off_loopback("");
    assert_eq!(
        refused,
        "/ 403\n/explain?name=web.service.consul 403\n/metrics 200\nexplain 1\n"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("debug.toml");
    std::fs::write(&config, "[metrics]\ndebug = true\n").expect("write config");
    let served = off_loopback(&format!("--config {}", config.display()));
    assert_eq!(
        served,
        "/ 200\n/explain?name=web.service.consul 200\n/metrics 200\nexplain 0\n"
    );
}

#[tokio::test]
async fn explain_on_the_demo_catalog_lists_the_critical_instance_with_its_check() {
    let (dns, http) = (free_port(), free_port());
    let _demo = spawn(&[
        "--dev",
        "--listen",
        &format!("127.0.0.1:{dns}"),
        "--metrics-listen",
        &format!("127.0.0.1:{http}"),
    ]);
    let endpoint: SocketAddr = format!("127.0.0.1:{http}").parse().expect("addr");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while http_get(endpoint, "/health").await.0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the demo never served /health"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The flags the README's run gives, the endpoint found through --metrics-listen.
    let (code, out, err) = explain_command(vec![
        "web.service.consul".into(),
        "--metrics-listen".into(),
        endpoint.to_string(),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(
            "  - node-3 10.10.0.13:8080 critical: left out: critical check \"Service 'web' check\" on node node-3\n"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "check \"Service 'web' check\": critical: HTTP GET http://10.10.0.13:8080/health: 503"
        ),
        "{out}"
    );
    assert!(
        out.contains("web.service.consul.\t5\tIN\tA\t10.10.0.11\n"),
        "{out}"
    );
}

#[tokio::test]
async fn status_page_lists_reloads_upstreams_and_the_cache() {
    let (dns, http) = (free_port(), free_port());
    let up = TestUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[upstream]\nservers = [\"{}\"]\ntimeout = \"400ms\"\n",
            up.addr
        ),
    )
    .expect("write");
    let demo = spawn(&[
        "--dev",
        "--config",
        &config.display().to_string(),
        "--listen",
        &format!("127.0.0.1:{dns}"),
        "--metrics-listen",
        &format!("127.0.0.1:{http}"),
    ]);
    let endpoint: SocketAddr = format!("127.0.0.1:{http}").parse().expect("addr");
    let wait = |what: &'static str, pred: Box<dyn Fn(&str) -> bool + Send>| async move {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let (status, body) = http_get(endpoint, "/").await;
            if status == 200 && pred(&body) {
                return body;
            }
            assert!(std::time::Instant::now() < deadline, "{what}: {body}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    let first = wait("the page", Box::new(|b| b.contains("none since the start"))).await;
    assert!(
        first.contains(&format!("<td>.</td><td>{}</td>", up.addr)),
        "{first}"
    );
    let reply = ask(
        format!("127.0.0.1:{dns}").parse().expect("addr"),
        "a.test",
        hickory_proto::rr::RecordType::A,
    )
    .await;
    assert!(!reply.answers.is_empty());
    Command::new("kill")
        .args(["-HUP", &demo.0.id().to_string()])
        .status()
        .expect("kill -HUP");
    let page = wait("the reload", Box::new(|b| b.contains("<td>reloaded</td>"))).await;
    // The forwarded name: one cache entry, one upstream query timed.
    assert!(page.contains("<table id=\"cache\">"), "{page}");
    assert!(page.contains("<tr><td>1</td>"), "one cache entry: {page}");
    assert!(
        page.contains(&format!("<td>{}</td><td>1</td>", up.addr)),
        "{page}"
    );
    // The last minute's figures: one attempt, answered.
    assert!(
        page.contains("<td class=\"attempts\">1</td><td class=\"failures\">0</td><td>"),
        "{page}"
    );
    assert!(page.contains("mean latency, last 60 s"), "{page}");
    // The upstream goes silent: the failed attempts show in the window at once.
    up.set_blackhole(true);
    let failed = ask(
        format!("127.0.0.1:{dns}").parse().expect("addr"),
        "b.test",
        hickory_proto::rr::RecordType::A,
    )
    .await;
    assert_eq!(
        failed.metadata.response_code,
        hickory_proto::op::ResponseCode::ServFail
    );
    let page = wait(
        "the failures",
        Box::new(|b| b.contains("<td class=\"attempts\">3</td><td class=\"failures\">2</td>")),
    )
    .await;
    assert!(page.contains("<table id=\"upstreams\">"), "{page}");
}

#[tokio::test]
async fn explain_of_a_forwarded_name_shows_the_last_upstream_answer() {
    let sim = sim().await;
    let (server, up, endpoint) = server(&sim, "").await;
    // Never asked: unknown, and the explanation's own question does not count as one.
    let e = explain_json(endpoint, "name=a.test").await;
    let last = &e["forwarded"]["last_answer"];
    assert_eq!(last["known"], false, "{e:#}");
    assert!(
        last["summary"]
            .as_str()
            .unwrap_or("")
            .starts_with("unknown"),
        "{e:#}"
    );
    assert_eq!(e["reply"]["rcode"], "NOERROR");
    // The explanation's question was a real one: the next explanation sees its exchange.
    let e = explain_json(endpoint, "name=a.test").await;
    let last = &e["forwarded"]["last_answer"];
    assert_eq!(last["known"], true, "{e:#}");
    assert_eq!(last["rcode"], "NOERROR");
    assert_eq!(last["upstream"], up.addr.to_string());
    assert!(
        last["latency_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{e:#}"
    );
    // A client's question: its NXDOMAIN from the upstream is what shows.
    let r = ask(server.addr, "nosuch.test", hickory_proto::rr::RecordType::A).await;
    assert_eq!(
        r.metadata.response_code,
        hickory_proto::op::ResponseCode::NXDomain
    );
    let e = explain_json(endpoint, "name=nosuch.test&format=json").await;
    let last = &e["forwarded"]["last_answer"];
    assert_eq!(last["rcode"], "NXDOMAIN", "{e:#}");
    assert_eq!(last["known"], true, "{e:#}");
    let (status, text) = http_get(endpoint, "/explain?name=a.test&format=text").await;
    assert_eq!(status, 200);
    assert!(
        text.contains(&format!(
            "last upstream answer (before asking): NOERROR from {}",
            up.addr
        )),
        "{text}"
    );
    server.stop().await;
}

#[tokio::test]
async fn explain_says_a_view_beyond_the_blocking_budget_was_patched_by_the_feed() {
    let sim = ConsulSim::start().await;
    sim.add_instance("a-1", "a", "a-node-1", "127.0.1.1", 80, Status::Passing);
    sim.add_instance("a-2", "a", "a-node-2", "127.0.1.2", 80, Status::Passing);
    // Services that take every blocking slot of a budget of 4 (3 for blocking queries, of
    // which the two feeds want two), so `a` never gets one.
    let fillers: Vec<String> = (0..6).map(|f| format!("filler{f}")).collect();
    for (f, name) in fillers.iter().enumerate() {
        sim.add_simple(
            name,
            &format!("{name}-node"),
            &format!("127.0.2.{}", f + 1),
            80,
        );
    }
    let (server, _up, endpoint) = server(&sim, "max_connections = 4").await;
    for _ in 0..2 {
        for f in &fillers {
            let _ = ask(
                server.addr,
                &format!("{f}.service.consul."),
                hickory_proto::rr::RecordType::A,
            )
            .await;
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for _ in 0..2 {
        let r = ask(
            server.addr,
            "a.service.consul.",
            hickory_proto::rr::RecordType::A,
        )
        .await;
        assert_eq!(addresses(&r).len(), 2);
    }
    let e = explain_json(endpoint, "name=a.service.consul").await;
    assert_eq!(e["consul"]["view"]["patched_by_feed"], false, "{e:#}");
    assert!(
        e["consul"]["view"]["kept_fresh_by"]
            .as_str()
            .unwrap_or("")
            .starts_with("on demand"),
        "{e:#}"
    );
    sim.set_service_check("a-2", Status::Critical);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let e = loop {
        let e = explain_json(endpoint, "name=a.service.consul").await;
        if instance(&e, "a-node-2")["status"] == "critical" {
            break e;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never critical: {e:#}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let view = &e["consul"]["view"];
    assert_eq!(view["patched_by_feed"], true, "{e:#}");
    assert!(
        view["kept_fresh_by"]
            .as_str()
            .unwrap_or("")
            .contains("patched by the change feed since its last fetch"),
        "{e:#}"
    );
    assert_eq!(code(instance(&e, "a-node-2")), "critical");
    let (_, text) = http_get(endpoint, "/explain?name=a.service.consul&format=text").await;
    assert!(text.contains("patched by the change feed"), "{text}");
    // No blocking query of `a`'s own: the change came through the feed.
    assert!(
        !sim.request_log()
            .iter()
            .any(|t| t.starts_with("/v1/health/service/a?") && t.contains("index=")),
        "`a` was to stay beyond the budget"
    );
    server.stop().await;
}

#[tokio::test]
async fn explain_reads_nodes_queries_addresses_and_reverse_names() {
    let sim = sim().await;
    sim.set_node_tagged_addresses("n2", &[("lan_ipv6", "2001:db8::2")]);
    sim.add_prepared_query("geo", "web", None, Some("10s"));
    let (server, _up, endpoint) = server(&sim, "").await;

    let e = explain_json(endpoint, "name=n5.node.consul").await;
    assert_eq!(e["reading"]["kind"], "node", "{e:#}");
    let node = &e["consul"]["answered_by"]["node"];
    assert_eq!(node["node"], "n5", "{e:#}");
    assert_eq!(node["ipv4"], "127.0.0.6");
    assert_eq!(node["used"], "127.0.0.6");
    assert_eq!(node["meta"][0], "note=<script>meta</script>");
    let (_, html) = http_get(endpoint, "/explain?format=html&name=n5.node.consul").await;
    assert!(html.contains("note=&lt;script&gt;meta"), "{html}");
    assert!(!html.contains("<script>meta"), "{html}");

    let e = explain_json(endpoint, "name=n2.node.consul&type=AAAA").await;
    let node = &e["consul"]["answered_by"]["node"];
    assert_eq!(node["ipv6"], "2001:db8::2", "{e:#}");
    assert_eq!(
        node["used"], "2001:db8::2",
        "the tagged lan_ipv6 answers AAAA"
    );

    let e = explain_json(endpoint, "name=geo.query.consul").await;
    assert_eq!(e["reading"]["kind"], "query", "{e:#}");
    let query = &e["consul"]["answered_by"]["query"];
    assert_eq!(query["ttl_seconds"], 10, "{e:#}");
    assert!(
        query["filters"]
            .as_str()
            .unwrap_or("")
            .contains("does not filter"),
        "{e:#}"
    );
    let listed = query["instances"].as_array().expect("instances");
    assert_eq!(query["instance_count"], listed.len());
    let mut nodes: Vec<&str> = listed.iter().filter_map(|i| i["node"].as_str()).collect();
    nodes.sort_unstable();
    // Consul's result as it came: Consul left out the critical n2 (its own filter), the
    // forwarder adds none of its own (n3's warning stays).
    assert_eq!(nodes, ["n1", "n3", "n4", "n5"], "{e:#}");
    let n3 = listed.iter().find(|i| i["node"] == "n3").expect("n3");
    assert_eq!(n3["port"], 8080);
    assert_eq!(n3["address"], "127.0.0.4");
    assert_eq!(n3["status"], "warning");

    let e = explain_json(endpoint, "name=7f000002.addr.consul").await;
    assert_eq!(e["reading"]["kind"], "addr", "{e:#}");
    assert_eq!(e["consul"]["answered_by"]["addr"], "127.0.0.2");

    let e = explain_json(endpoint, "name=3.0.0.127.in-addr.arpa&type=PTR").await;
    assert_eq!(e["reading"]["kind"], "ptr", "{e:#}");
    let ptr = &e["consul"]["answered_by"]["ptr"];
    assert_eq!(ptr["matched"], "node", "{e:#}");
    assert_eq!(ptr["name"], "n2");
    assert_eq!(ptr["forwarded"], false);
    assert!(
        e["reply"]["text"]
            .as_str()
            .unwrap_or("")
            .contains("n2.node.dc1.consul."),
        "{e:#}"
    );

    let e = explain_json(endpoint, "name=1.99.0.10.in-addr.arpa&type=PTR").await;
    assert_eq!(e["reading"]["kind"], "ptr", "{e:#}");
    assert_eq!(
        e["consul"]["answered_by"]["ptr"]["forwarded"], true,
        "{e:#}"
    );
    assert_eq!(e["reading"]["source"], "upstream");
    assert!(
        e["forwarded"]["upstreams"]
            .as_array()
            .is_some_and(|u| !u.is_empty()),
        "{e:#}"
    );
    server.stop().await;
}

/// The ACL token reaches Consul, and none of the debug pages: not the status page, not an
/// explanation in any format, not the explain command's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_never_appears_on_the_debug_pages() {
    const TOKEN: &str = "b1gs3cr3t-acl-token";
    let sim = sim().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, format!("{TOKEN}\n")).expect("write");
    let up = TestUpstream::start().await;
    let toml = TestConfig::new()
        .upstream(up.addr)
        .consul_http(sim.http_url())
        .token_file(&token_path)
        .metrics_listen("127.0.0.1:0")
        .toml();
    let server = TestServer::start(&toml).await;
    let endpoint = server.metrics_addr.expect("metrics endpoint on");
    ask(
        server.addr,
        "web.service.consul.",
        hickory_proto::rr::RecordType::A,
    )
    .await;
    assert_eq!(
        sim.last_token().as_deref(),
        Some(TOKEN),
        "the token is in use"
    );
    let mut pages = vec!["/".to_owned()];
    for format in ["json", "text", "html"] {
        for name in ["web.service.consul", "n1.node.consul", "example.com"] {
            pages.push(format!("/explain?name={name}&format={format}"));
        }
    }
    for page in &pages {
        let (status, body) = http_get(endpoint, page).await;
        assert_eq!(status, 200, "{page}: {body}");
        assert!(!body.contains(TOKEN), "{page} shows the token: {body}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_consul-dns-forwarder"))
        .args([
            "explain",
            "web.service.consul",
            "--endpoint",
            &endpoint.to_string(),
        ])
        .output()
        .expect("run explain");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}");
    assert!(printed.contains("web.service.consul"), "{printed}");
    assert!(!printed.contains(TOKEN), "{printed}");
    server.stop().await;
}
