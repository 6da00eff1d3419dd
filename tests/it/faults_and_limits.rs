//! Faults and limits: Consul down, hung or flapping; secrets kept out of output; resource limits
//! with their counters.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::consul_sim::{ConsulSim, Status};
use crate::support::upstream::TestUpstream;
use crate::support::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;

fn web(sim: &ConsulSim) {
    for (i, addr) in ["127.0.0.2", "127.0.0.3", "127.0.0.4"].iter().enumerate() {
        let n = i + 1;
        sim.add_instance(
            &format!("web-{n}"),
            "web",
            &format!("n{n}"),
            addr,
            80,
            Status::Passing,
        );
    }
}

fn conf(up: &TestUpstream, urls: &[String], extra: &str) -> String {
    let mut config = TestConfig::new().upstream(up.addr).upstream_timeout("1s");
    for url in urls {
        config = config.consul_http(url);
    }
    config.consul(extra).toml()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_down_at_start_then_answers_after_first_contact() {
    let sim = ConsulSim::start().await;
    web(&sim);
    sim.stop().await;
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&conf(&up, &[sim.http_url()], "")).await;
    assert_eq!(
        addresses(&ask(fwd.addr, "a.test.", RecordType::A).await),
        vec!["192.0.2.1"],
        "forwarded names work"
    );
    let r = ask(fwd.addr, "web.service.consul.", RecordType::A).await;
    assert_eq!(
        r.metadata.response_code,
        ResponseCode::ServFail,
        "never NXDOMAIN before first contact"
    );
    sim.restart().await;
    let addr = fwd.addr;
    let took = eventually(Duration::from_secs(8), async || {
        addresses(&ask(addr, "web.service.consul.", RecordType::A).await).len() == 3
    })
    .await
    .expect("answers after Consul comes up");
    println!("first answer {took:?} after Consul came up");
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_agent_is_left_for_the_next_one() {
    let a = ConsulSim::start().await;
    let b = ConsulSim::start().await;
    web(&a);
    web(&b);
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&conf(&up, &[a.http_url(), b.http_url()], "")).await;
    assert_eq!(
        addresses(&ask(fwd.addr, "web.service.consul.", RecordType::A).await).len(),
        3
    );
    assert!(a.requests("/v1/health/service/web") >= 1 && b.requests("/v1/health/service/web") == 0);
    // Agent A hangs: accepts requests, never answers. Its blocking query looks just like "no
    // change", so only the probe can notice.
    a.set_hang(true);
    b.set_service_check("web-2", Status::Critical);
    let addr = fwd.addr;
    let started = Instant::now();
    let took = eventually(Duration::from_secs(10), async || {
        addresses(&ask(addr, "web.service.consul.", RecordType::A).await).len() == 2
    })
    .await;
    let took = took.expect("the change on agent B shows after failing over");
    println!("failed over from a hung agent in {took:?}");
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(b.requests("/v1/health/service/web") >= 1);
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_consul_never_costs_an_answer() {
    let sim = ConsulSim::start().await;
    web(&sim);
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&conf(&up, &[sim.http_url()], "")).await;
    assert_eq!(
        addresses(&ask(fwd.addr, "web.service.consul.", RecordType::A).await).len(),
        3
    );
    let mut answers = 0;
    for _ in 0..3 {
        sim.stop().await;
        for _ in 0..20 {
            let r = ask(fwd.addr, "web.service.consul.", RecordType::A).await;
            assert_eq!(r.metadata.response_code, ResponseCode::NoError);
            assert_eq!(addresses(&r).len(), 3);
            answers += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sim.restart().await;
        for _ in 0..20 {
            assert_eq!(
                addresses(&ask(fwd.addr, "web.service.consul.", RecordType::A).await).len(),
                3
            );
            answers += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    println!("{answers} answers through 3 outages, all with the last known view");
    sim.set_service_check("web-3", Status::Critical);
    let addr = fwd.addr;
    eventually(Duration::from_secs(8), async || {
        addresses(&ask(addr, "web.service.consul.", RecordType::A).await).len() == 2
    })
    .await
    .expect("fresh again after the flapping");
    fwd.stop().await;
}

/// One log line when an outage starts, one when it ends, however many watchers and queries; the
/// token appears in no log line, metric or error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_log_line_per_outage_and_the_token_never_shows() {
    let sim = ConsulSim::start().await;
    web(&sim);
    sim.add_simple("api", "n9", "127.0.0.9", 81);
    sim.add_simple("db", "n8", "127.0.0.8", 82);
    let up = TestUpstream::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let token = "d3adb33f-secret-token";
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, token).expect("write");
    let mport = free_port();
    let conf_path = dir.path().join("f.toml");
    TestConfig::new()
        .upstream(up.addr)
        .metrics_listen(format!("127.0.0.1:{mport}"))
        .consul_http(sim.http_url())
        .token_file(&token_path)
        .write_to(&conf_path);
    let (mut server, addr) = spawn_answering(&["--config", &conf_path.display().to_string()]).await;
    for svc in ["web", "api", "db"] {
        assert!(
            !addresses(&ask(addr, &format!("{svc}.service.consul."), RecordType::A).await)
                .is_empty()
        );
    }
    assert_eq!(sim.last_token().as_deref(), Some(token));
    sim.stop().await;
    for _ in 0..40 {
        for svc in ["web", "api", "db"] {
            let r = ask(addr, &format!("{svc}.service.consul."), RecordType::A).await;
            assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        }
        ask(addr, "unknown.service.consul.", RecordType::A).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sim.restart().await;
    let maddr: std::net::SocketAddr = format!("127.0.0.1:{mport}").parse().expect("addr");
    eventually(Duration::from_secs(8), async || {
        metric_in(
            &http_get(maddr, "/metrics").await.1,
            "consul_dns_forwarder_consul_last_success_age_seconds",
            &[],
        ) < 1.0
    })
    .await
    .expect("Consul reached again");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let metrics = http_get(maddr, "/metrics").await.1;
    assert!(!metrics.contains(token));
    let stderr = server.terminate_and_read_stderr();
    let down = stderr.matches("Consul unreachable").count();
    let up_again = stderr.matches("Consul reachable again").count();
    println!("log lines for one outage: {down} down, {up_again} back");
    assert_eq!(down, 1, "{stderr}");
    assert_eq!(up_again, 1, "{stderr}");
    assert!(!stderr.contains(token), "token in the logs: {stderr}");

    let out = run_ok(&mut check_config(&conf_path));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(token)
            && !String::from_utf8_lossy(&out.stderr).contains(token)
    );
}

/// Starts the binary with `config` (written to `path`) and returns what it says on stderr when it
/// refuses to start, as it must, with exit `code` (2: a file that cannot be read, found by the
/// configuration checks; 1: one that can be read but not used).
fn refused_start(config: &TestConfig, path: &std::path::Path, code: i32) -> String {
    config.write_to(path);
    exits_with(
        Command::new(BIN)
            .arg("--config")
            .arg(path)
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args([
                "--upstream",
                "127.0.0.1:9",
                "--metrics-listen",
                "127.0.0.1:0",
            ]),
        code,
    )
}

#[test]
fn token_file_problems_are_clear() {
    let dir = tempfile::tempdir().expect("tmp");
    let missing = dir.path().join("no-such-token");
    let port = free_port();
    let config = TestConfig::new().metrics_default().token_file(&missing);
    let err = refused_start(&config, &dir.path().join("f.toml"), 2);
    assert!(
        err.contains("consul.token_file") && err.contains("no-such-token"),
        "{err}"
    );

    // World-readable: a warning, and it still runs.
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken").expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let conf = dir.path().join("g.toml");
    TestConfig::new()
        .metrics_default()
        .token_file(&token)
        .write_to(&conf);
    let mut server = spawn(&[
        "--config",
        &conf.display().to_string(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--upstream",
        "127.0.0.1:9",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    std::thread::sleep(Duration::from_millis(700));
    let _ = server.0.kill();
    let _ = server.0.wait();
    let mut stderr = String::new();
    use std::io::Read;
    server
        .0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read");
    assert!(stderr.contains("readable by every user"), "{stderr}");
    assert!(!stderr.contains("t0ken"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_inflight_limit_answers_at_once() {
    let up = TestUpstream::start().await;
    let config = TestConfig::new()
        .upstream(up.addr)
        .upstream_timeout("2s")
        .upstream_lines("max_inflight = 2")
        .consul_off();
    let fwd = TestServer::start(&config.toml()).await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let addr = fwd.addr;
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let r = ask(addr, &format!("slow-{}.test.", 800 + i), RecordType::A).await;
            (r.metadata.response_code, started.elapsed())
        }));
    }
    let mut fast_servfail = 0;
    let mut answered = 0;
    for t in tasks {
        let (rcode, took) = t.await.expect("join");
        match rcode {
            ResponseCode::ServFail if took < Duration::from_millis(300) => fast_servfail += 1,
            ResponseCode::NoError => answered += 1,
            other => panic!("unexpected {other:?} after {took:?}"),
        }
    }
    assert_eq!(answered, 2, "two fetches in flight at most");
    assert_eq!(fast_servfail, 8, "the rest answered at once");
    assert_eq!(
        fwd.metric("consul_dns_forwarder_upstream_inflight_rejected_total", &[]),
        8.0
    );
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_truncates_udp_and_tcp_still_answers() {
    let up = TestUpstream::start().await;
    let config = TestConfig::new()
        .server("rate_limit = 20\nrate_limit_exempt = []")
        .upstream(up.addr)
        .consul_off();
    let fwd = TestServer::start(&config.toml()).await;
    let mut truncated = 0;
    for _ in 0..60 {
        let r = ask(fwd.addr, "a.test.", RecordType::A).await;
        if r.metadata.truncation {
            assert!(r.answers.is_empty(), "over the limit: nothing to amplify");
            truncated += 1;
        }
    }
    assert!(truncated >= 35, "only {truncated} of 60 limited at 20/s");
    let r: Message = tcp(fwd.addr, &make_query("a.test.", RecordType::A, None)).await;
    assert_eq!(addresses(&r), vec!["192.0.2.1"], "TCP is not limited");
    assert_eq!(
        fwd.metric("consul_dns_forwarder_rate_limited_total", &[]),
        truncated as f64
    );
    fwd.stop().await;

    // Loopback is exempt by default.
    let config = TestConfig::new()
        .server("rate_limit = 20")
        .upstream(up.addr)
        .consul_off();
    let fwd = TestServer::start(&config.toml()).await;
    for _ in 0..60 {
        assert!(
            !ask(fwd.addr, "a.test.", RecordType::A)
                .await
                .metadata
                .truncation
        );
    }
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_stays_within_its_entry_limit() {
    let up = TestUpstream::start().await;
    let config = TestConfig::new()
        .upstream(up.addr)
        .cache("max_entries = 20")
        .consul_off();
    let fwd = TestServer::start(&config.toml()).await;
    for i in 0..200 {
        ask(fwd.addr, &format!("n{i}.test."), RecordType::A).await;
    }
    let addr = fwd.addr;
    let evicted = eventually(Duration::from_secs(5), async || {
        ask(addr, "a.test.", RecordType::A).await;
        fwd.metric("consul_dns_forwarder_cache_evictions_total", &[]) >= 150.0
    })
    .await;
    assert!(
        evicted.is_some(),
        "evictions: {}",
        fwd.metric("consul_dns_forwarder_cache_evictions_total", &[])
    );
    fwd.stop().await;
}

#[test]
fn ca_file_problems_are_clear() {
    let dir = tempfile::tempdir().expect("tmp");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").expect("write");
    for (ca, file, code) in [
        (dir.path().join("missing.pem"), "missing.pem", 2),
        (garbage, "garbage.pem", 1),
    ] {
        let config = TestConfig::new()
            .metrics_default()
            .consul_http("https://127.0.0.1:8501")
            .ca_file(&ca);
        let err = refused_start(&config, &dir.path().join("ca.toml"), code);
        assert!(
            err.contains("consul.ca_file") && err.contains(file),
            "{err}"
        );
    }
}

/// A UDP flood of answers the receive loop gives at once (pre-encoded Consul answers) must not
/// starve the other tasks of its worker thread: the server runs on one CPU (one worker), two
/// threads send it the same question without pause, and a TCP question asked meanwhile is still
/// answered. The receive loop reads queued datagrams without going back to the runtime, so
/// without its bound on a batch (`UDP_BATCH`) the TCP connection would wait for the flood to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_flood_leaves_tcp_answered() {
    /// How long each flood thread sends: past the TCP question's deadline, so that the flood is
    /// still on when the question is judged.
    const FLOOD: Duration = Duration::from_secs(4);
    /// How long the TCP question may take while the flood runs.
    const TCP_WITHIN: Duration = Duration::from_secs(2);
    let listen = format!("127.0.0.1:{}", free_port());
    let server = Running(
        Command::new("taskset")
            .args(["-c", "0", BIN, "--dev", "--listen", &listen])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("taskset (util-linux) starts the binary"),
    );
    let addr: std::net::SocketAddr = listen.parse().expect("addr");
    wait_until_answering(addr).await;
    let question = make_query("web.service.consul.", RecordType::A, None)
        .to_vec()
        .expect("encode");
    // The name is answered inline (the demo catalog's answers are pre-encoded) before the flood.
    let first = tcp(
        addr,
        &make_query("web.service.consul.", RecordType::A, None),
    )
    .await;
    assert_eq!(first.metadata.response_code, ResponseCode::NoError);
    let flooders: Vec<_> = (0..2)
        .map(|_| {
            let question = question.clone();
            std::thread::spawn(move || {
                let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
                let until = Instant::now() + FLOOD;
                let mut sent = 0u64;
                while Instant::now() < until {
                    for _ in 0..256 {
                        if socket.send_to(&question, addr).is_ok() {
                            sent += 1;
                        }
                    }
                }
                sent
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = Instant::now();
    let answered = tokio::time::timeout(
        TCP_WITHIN,
        tcp(
            addr,
            &make_query("web.service.consul.", RecordType::A, None),
        ),
    )
    .await;
    let took = asked.elapsed();
    let sent: u64 = flooders
        .into_iter()
        .map(|f| f.join().expect("flood thread"))
        .sum();
    let answer = answered.unwrap_or_else(|_| {
        panic!("no TCP answer within {TCP_WITHIN:?} while {sent} datagrams flooded the server")
    });
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert!(!addresses(&answer).is_empty(), "{answer:?}");
    println!("TCP answered in {took:?} during a flood of {sent} datagrams");
    drop(server);
}

/// A service list slower than a plain request's 2 s (a large catalog on a loaded agent: the
/// benchmark's 100,000-node list took 1.3 s on an idle core) still loads: it is asked once and
/// waited for, and every name is then answered. Abandoned at 2 s, it was asked again and again
/// and never loaded, and every name past the budget of unchecked lookups got SERVFAIL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_service_list_is_waited_for_not_asked_again() {
    const SERVICES: usize = 40;
    const LIST_DELAY: Duration = Duration::from_secs(3);
    let sim = ConsulSim::start().await;
    for s in 0..SERVICES {
        sim.add_simple(
            &format!("slow{s}"),
            &format!("slow{s}-node"),
            &format!("10.4.0.{}", s + 1),
            80,
        );
    }
    sim.set_list_delay(LIST_DELAY);
    let up = TestUpstream::start().await;
    let config = TestConfig::new()
        .upstream(up.addr)
        .consul_http(sim.http_url());
    let fwd = TestServer::start(&config.toml()).await;
    // The first Consul name starts the lists; its own answer may come from an unchecked lookup.
    let _ = ask(fwd.addr, "slow0.service.consul.", RecordType::A).await;
    tokio::time::sleep(LIST_DELAY + Duration::from_secs(1)).await;
    let mut failed = Vec::new();
    for s in 0..SERVICES {
        let r = ask(fwd.addr, &format!("slow{s}.service.consul."), RecordType::A).await;
        if r.metadata.response_code != ResponseCode::NoError
            || addresses(&r) != [format!("10.4.0.{}", s + 1)]
        {
            failed.push((s, r.metadata.response_code));
        }
    }
    let loads: Vec<String> = sim
        .request_log()
        .into_iter()
        .filter(|t| t.starts_with("/v1/catalog/services") && !t.contains("index="))
        .collect();
    println!(
        "service list delayed {LIST_DELAY:?}: {} of {SERVICES} names failed, loads {loads:?}",
        failed.len()
    );
    assert!(failed.is_empty(), "every name answered: {failed:?}");
    assert_eq!(loads.len(), 1, "the list was asked once: {loads:?}");
    fwd.stop().await;
}
