//! Operating it: /metrics (checked by promtool and scraped by a real Prometheus), /health and
//! /ready, SIGHUP reloads under load, the query log.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::consul_sim::ConsulSim;
use crate::support::upstream::TestUpstream;
use crate::support::*;
use hickory_proto::rr::RecordType;

/// Forwarding to `up`, /metrics served; the Consul source is the test's.
fn config(up: &TestUpstream) -> TestConfig {
    TestConfig::new()
        .upstream(up.addr)
        .upstream_timeout("1s")
        .metrics_listen("127.0.0.1:0")
}

/// Every series operators rely on (issue 5), by name.
const REQUIRED_SERIES: &[&str] = &[
    "consul_dns_forwarder_requests_total",
    "consul_dns_forwarder_responses_total",
    "consul_dns_forwarder_request_duration_seconds_bucket",
    "consul_dns_forwarder_cache_hits_total",
    "consul_dns_forwarder_cache_misses_total",
    "consul_dns_forwarder_cache_entries",
    "consul_dns_forwarder_cache_evictions_total",
    "consul_dns_forwarder_stale_answers_total",
    "consul_dns_forwarder_upstream_request_duration_seconds_bucket",
    "consul_dns_forwarder_consul_requests_total",
    "consul_dns_forwarder_consul_watchers",
    "consul_dns_forwarder_consul_last_success_age_seconds",
    "consul_dns_forwarder_consul_healthy_instances",
    "consul_dns_forwarder_consul_view_changes_total",
    "consul_dns_forwarder_limit_drops_total",
    "consul_dns_forwarder_truncated_responses_total",
    "consul_dns_forwarder_refused_clients_total",
    "consul_dns_forwarder_dropped_packets_total",
    "consul_dns_forwarder_upstream_unmatched_replies_total",
    "consul_dns_forwarder_upstream_case_fallbacks_total",
    "consul_dns_forwarder_build_info",
    // The process collector: memory, descriptors and CPU, to alert on a leak.
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_cpu_seconds_total",
];

async fn some_load(fwd: &TestServer) {
    for _ in 0..20 {
        ask(fwd.addr, "a.test.", RecordType::A).await;
        ask(fwd.addr, "web.service.consul.", RecordType::A).await;
        ask(fwd.addr, "web.service.consul.", RecordType::AAAA).await;
    }
    ask(fwd.addr, "missing.test.", RecordType::A).await;
    ask(fwd.addr, "big.test.", RecordType::A).await;
    let _ = raw_udp(fwd.addr, &[1, 2, 3], Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_passes_promtool_and_has_every_series() {
    let sim = web_sim().await;
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&config(&up).consul_http(sim.http_url()).toml()).await;
    let maddr = fwd.metrics_addr.expect("metrics enabled");
    some_load(&fwd).await;
    let (status, body) = http_get(maddr, "/metrics").await;
    assert_eq!(status, 200);
    for series in REQUIRED_SERIES {
        assert!(body.contains(series), "{series} missing from /metrics");
    }
    assert!(
        !body.contains("web.service.consul"),
        "query names are never labels"
    );
    assert!(
        metric_in(
            &body,
            "consul_dns_forwarder_requests_total",
            &[("zone", "consul")]
        ) >= 40.0
    );
    assert!(
        metric_in(
            &body,
            "consul_dns_forwarder_responses_total",
            &[("source", "cache")]
        ) >= 19.0
    );
    // Latency by where the answer came from: Consul's apart from the upstream's.
    for (source, at_least) in [("consul", 1.0), ("upstream", 1.0), ("cache", 19.0)] {
        let count = metric_in(
            &body,
            "consul_dns_forwarder_request_duration_seconds_count",
            &[("source", source)],
        );
        assert!(count >= at_least, "{source}: {count} observations");
    }
    assert!(
        body.contains("consul_dns_forwarder_build_info{revision=\""),
        "build_info carries the revision"
    );
    assert!(metric_in(&body, "process_open_fds", &[]) > 0.0);
    let excerpt: Vec<&str> = body
        .lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.contains("requests_total")
                    || l.contains("responses_total")
                    || l.contains("cache_hits")
                    || l.contains("duration_seconds_count")
                    || l.starts_with("process_")
                    || l.contains("build_info"))
        })
        .collect();
    println!(
        "/metrics excerpt after a short load:\n{}",
        excerpt.join("\n")
    );

    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool installed (Debian package prometheus)");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_ready_follow_consul_and_shutdown() {
    let sim = web_sim().await;
    let url = sim.http_url();
    sim.stop().await;
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&config(&up).consul_http(url).toml()).await;
    let maddr = fwd.metrics_addr.expect("metrics");
    assert_eq!(http_get(maddr, "/health").await.0, 200);
    let (status, body) = http_get(maddr, "/ready").await;
    assert_eq!(status, 503, "Consul has never answered");
    assert!(body.contains("Consul"), "{body}");
    sim.restart().await;
    let addr = fwd.addr;
    eventually(Duration::from_secs(5), async || {
        addresses(&ask(addr, "web.service.consul.", RecordType::A).await).len() == 1
    })
    .await
    .expect("answers once Consul is back");
    let (status, body) = http_get(maddr, "/ready").await;
    assert_eq!(status, 200, "{body}");
    fwd.stop().await;
    assert_eq!(
        http_get(maddr, "/health").await.0,
        0,
        "endpoint gone after stop"
    );

    // A catalog file is ready at once.
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("c.json");
    std::fs::write(&path, "{}").expect("write");
    let fwd = TestServer::start(&config(&up).catalog_file(&path).toml()).await;
    assert_eq!(
        http_get(fwd.metrics_addr.expect("metrics"), "/ready")
            .await
            .0,
        200
    );
    fwd.stop().await;
}

/// A real Prometheus scrapes the forwarder; the series come back through its query API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_it() {
    let up = TestUpstream::start().await;
    let fwd = TestServer::start(&config(&up).consul_off().toml()).await;
    let maddr = fwd.metrics_addr.expect("metrics");
    for _ in 0..5 {
        ask(fwd.addr, "a.test.", RecordType::A).await;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let conf = dir.path().join("prometheus.yml");
    std::fs::write(
        &conf,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: consul-dns-forwarder\n    static_configs:\n      - targets: ['{maddr}']\n"
        ),
    )
    .expect("write");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let web = format!("127.0.0.1:{port}");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prom = Kill(
        Command::new("prometheus")
            .arg(format!("--config.file={}", conf.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus installed (Debian package prometheus)"),
    );
    let papi: std::net::SocketAddr = web.parse().expect("addr");
    let query = "/api/v1/query?query=consul_dns_forwarder_requests_total";
    let started = Instant::now();
    let found = eventually(Duration::from_secs(40), async || {
        let (status, body) = http_get(papi, query).await;
        status == 200 && body.contains("\"zone\":\"forwarded\"")
    })
    .await;
    assert!(
        found.is_some(),
        "Prometheus never returned the series: {:?}",
        http_get(papi, query).await
    );
    println!(
        "Prometheus returned the scraped series after {:?}",
        started.elapsed()
    );
    let (_, body) = http_get(papi, query).await;
    assert!(body.contains("\"protocol\":\"udp\""), "{body}");
    // What the shipped dashboard and alerts ask for: memory, and latency by source.
    for (q, want) in [
        (
            "process_resident_memory_bytes",
            "\"__name__\":\"process_resident_memory_bytes\"",
        ),
        (
            "sum%20by%20(source)%20(consul_dns_forwarder_request_duration_seconds_count)",
            "\"source\":\"upstream\"",
        ),
    ] {
        let (status, body) = http_get(papi, &format!("/api/v1/query?query={q}")).await;
        assert!(status == 200 && body.contains(want), "{q}: {body}");
    }
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_prometheus_rules_and_dashboard_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/prometheus");
    for (what, file) in [("rules", "alerts.yml"), ("config", "prometheus.yml")] {
        run_ok(
            Command::new("promtool")
                .args(["check", what])
                .arg(root.join(file)),
        );
    }
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana-dashboard.json")).expect("read"),
    )
    .expect("dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 4);
    // Every metric the rules and dashboard use exists.
    let text = format!(
        "{}{}",
        std::fs::read_to_string(root.join("alerts.yml")).expect("read"),
        dash
    );
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("process_") {
            assert!(
                REQUIRED_SERIES.contains(&word),
                "unknown metric {word} in examples/prometheus"
            );
        }
        if let Some(rest) = word.strip_prefix("consul_dns_forwarder_") {
            let base = rest
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            let known = REQUIRED_SERIES
                .iter()
                .any(|s| s.trim_end_matches("_bucket") == format!("consul_dns_forwarder_{base}"))
                || [
                    "upstream_errors_total",
                    "tcp_connections",
                    "config_reloads_total",
                    "consul_last_success_timestamp_seconds",
                    "request_duration_seconds",
                    "upstream_request_duration_seconds",
                ]
                .contains(&base);
            assert!(
                known,
                "unknown metric consul_dns_forwarder_{rest} in examples/prometheus"
            );
        }
    }
}

/// A simulated Consul with one `web` instance, n1 at 127.0.0.2:80.
async fn web_sim() -> ConsulSim {
    let sim = ConsulSim::start().await;
    sim.add_simple("web", "n1", "127.0.0.2", 80);
    sim
}

/// [`web_sim`]'s catalog as a catalog file, `catalog.json` in `dir`.
async fn web_catalog_file(dir: &std::path::Path) -> std::path::PathBuf {
    let catalog = dir.join("catalog.json");
    std::fs::write(&catalog, web_sim().await.catalog_json().to_string()).expect("write");
    catalog
}

fn reload_config(
    up: &TestUpstream,
    catalog: &std::path::Path,
    metrics_port: u16,
    ttl: &str,
) -> TestConfig {
    TestConfig::new()
        .upstream(up.addr)
        .metrics_listen(format!("127.0.0.1:{metrics_port}"))
        .catalog_file(catalog)
        .service_ttl(ttl)
}

/// The start of a reload test, in `dir`: [`web_catalog_file`], and [`reload_config`] with a 5 s
/// TTL and /metrics on a free port written to forwarder.toml: (catalog, config file, metrics port).
async fn reloadable(
    up: &TestUpstream,
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, u16) {
    let catalog = web_catalog_file(dir).await;
    let conf = dir.join("forwarder.toml");
    let mport = free_port();
    reload_config(up, &catalog, mport, "5s").write_to(&conf);
    (catalog, conf, mport)
}

/// SIGHUP under load: new TTLs applied, a bad file rejected and counted, no query lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_under_load_without_losing_a_query() {
    let up = TestUpstream::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let (catalog, conf, mport) = reloadable(&up, dir.path()).await;
    let (server, addr) = spawn_answering(&["--config", &conf.display().to_string()]).await;
    let pid = server.0.id().to_string();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for i in 0..4 {
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let (mut sent, mut lost) = (0u64, 0u64);
            let name = if i % 2 == 0 {
                "web.service.consul."
            } else {
                "a.test."
            };
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && sent < 200_000 {
                let q = make_query(name, RecordType::A, None).to_vec().expect("enc");
                sent += 1;
                if raw_udp(addr, &q, Duration::from_secs(2)).await.is_none() {
                    lost += 1;
                }
            }
            (sent, lost)
        }));
    }
    let hup = |pid: &str| {
        assert!(Command::new("kill")
            .args(["-HUP", pid])
            .status()
            .expect("kill")
            .success());
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    reload_config(&up, &catalog, mport, "7s").write_to(&conf);
    hup(&pid);
    eventually(Duration::from_secs(5), async || {
        ask(addr, "web.service.consul.", RecordType::A)
            .await
            .answers[0]
            .ttl
            == 7
    })
    .await
    .expect("new TTL applied");
    std::fs::write(&conf, "[upstream\nbroken").expect("write");
    let maddr: std::net::SocketAddr = format!("127.0.0.1:{mport}").parse().expect("addr");
    reload_and_count(&pid, maddr, "failure", 1.0)
        .await
        .expect("the failed reload is counted");
    assert_eq!(
        ask(addr, "web.service.consul.", RecordType::A)
            .await
            .answers[0]
            .ttl,
        7,
        "running config untouched"
    );
    // Several more good reloads while the load runs.
    for ttl in ["8s", "9s", "10s"] {
        reload_config(&up, &catalog, mport, ttl).write_to(&conf);
        hup(&pid);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut sent, mut lost) = (0, 0);
    for t in load {
        let (s, l) = t.await.expect("join");
        sent += s;
        lost += l;
    }
    let body = http_get(maddr, "/metrics").await.1;
    let ok = metric_in(
        &body,
        "consul_dns_forwarder_config_reloads_total",
        &[("outcome", "success")],
    );
    println!("{sent} queries during {ok} successful reloads and 1 failed one: {lost} lost");
    assert!(sent > 1000, "the load ran: {sent}");
    assert_eq!(lost, 0, "no query lost during reloads");
    assert_eq!(ok, 4.0);
    assert_eq!(
        ask(addr, "web.service.consul.", RecordType::A)
            .await
            .answers[0]
            .ttl,
        10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_log_in_json() {
    let up = TestUpstream::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let conf = dir.path().join("f.toml");
    TestConfig::new()
        .upstream(up.addr)
        .consul_off()
        .log("queries = true")
        .write_to(&conf);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = spawn(&[
        "--config",
        &conf.display().to_string(),
        "--listen",
        &listen,
        "--log-format",
        "json",
    ]);
    let addr: std::net::SocketAddr = listen.parse().expect("addr");
    wait_until_answering(addr).await;
    ask(addr, "Missing.test.", RecordType::AAAA).await;
    let stderr = server.terminate_and_read_stderr();
    let entries: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let q = entries
        .iter()
        .find(|e| e["fields"]["name"] == "Missing.test.")
        .unwrap_or_else(|| panic!("no query log line: {stderr}"));
    assert_eq!(q["fields"]["qtype"], "AAAA");
    assert_eq!(q["fields"]["rcode"], "NXDOMAIN");
    assert_eq!(q["fields"]["source"], "upstream");
    assert!(q["fields"]["client"]
        .as_str()
        .is_some_and(|c| c.starts_with("127.0.0.1")));
    assert!(q["fields"]["duration_us"].is_u64());
}

fn hup(pid: &str) {
    assert!(Command::new("kill")
        .args(["-HUP", pid])
        .status()
        .expect("kill")
        .success());
}

async fn reloads(maddr: std::net::SocketAddr, outcome: &str) -> f64 {
    metric_in(
        &http_get(maddr, "/metrics").await.1,
        "consul_dns_forwarder_config_reloads_total",
        &[("outcome", outcome)],
    )
}

/// SIGHUP, then waits (at most 5 s) until the reloads counted with `outcome` reach `count`.
async fn reload_and_count(
    pid: &str,
    maddr: std::net::SocketAddr,
    outcome: &str,
    count: f64,
) -> Option<Duration> {
    hup(pid);
    eventually(Duration::from_secs(5), async || {
        reloads(maddr, outcome).await == count
    })
    .await
}

async fn web_ttl(addr: std::net::SocketAddr) -> Option<u32> {
    ask(addr, "web.service.consul.", RecordType::A)
        .await
        .answers
        .first()
        .map(|r| r.ttl)
}

/// SIGHUP with values that used to kill reloads, and with configs that fail after validation
/// (a catalog file that is gone) or in it (a token that would go to another host in clear
/// text): each is counted, the running configuration keeps answering, and the next SIGHUP
/// applies a good file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_reloads_are_counted_and_the_next_sighup_still_applies() {
    let up = TestUpstream::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let token = dir.path().join("token");
    std::fs::write(&token, "secret-token").expect("write");
    let (catalog, conf, mport) = reloadable(&up, dir.path()).await;
    let (mut server, addr) = spawn_answering(&["--config", &conf.display().to_string()]).await;
    let pid = server.0.id().to_string();
    let maddr: std::net::SocketAddr = format!("127.0.0.1:{mport}").parse().expect("addr");
    assert_eq!(web_ttl(addr).await, Some(5));

    // Used to panic inside the reload (a semaphore beyond MAX_PERMITS): now clamped and applied.
    reload_config(&up, &catalog, mport, "6s")
        .server("max_inflight = 18446744073709551615")
        .upstream_lines("max_inflight = 18446744073709551615")
        .write_to(&conf);
    reload_and_count(&pid, maddr, "success", 1.0)
        .await
        .expect("the reload with huge limits succeeds");
    assert_eq!(web_ttl(addr).await, Some(6), "and is applied");

    // Valid on paper, fails while building: the catalog file is gone.
    let missing = dir.path().join("missing.json");
    reload_config(&up, &missing, mport, "7s").write_to(&conf);
    reload_and_count(&pid, maddr, "failure", 1.0)
        .await
        .expect("the failed build is counted");

    // Refused by validation: a token for an http:// agent on another host.
    TestConfig::new()
        .upstream(up.addr)
        .metrics_listen(format!("127.0.0.1:{mport}"))
        .consul_http("http://192.0.2.1:8500")
        .token_file(&token)
        .write_to(&conf);
    reload_and_count(&pid, maddr, "failure", 2.0)
        .await
        .expect("the insecure token is refused and counted");
    assert_eq!(
        web_ttl(addr).await,
        Some(6),
        "the running config is untouched"
    );
    assert_eq!(
        addresses(&ask(addr, "a.test.", RecordType::A).await),
        vec!["192.0.2.1"]
    );
    assert_eq!(reloads(maddr, "success").await, 1.0);

    reload_config(&up, &catalog, mport, "9s").write_to(&conf);
    reload_and_count(&pid, maddr, "success", 2.0)
        .await
        .expect("the next good reload succeeds");
    assert_eq!(web_ttl(addr).await, Some(9), "and is applied");
    assert!(
        server.0.try_wait().expect("wait").is_none(),
        "still running"
    );
    let stderr = server.terminate_and_read_stderr();
    assert!(
        stderr.contains("configuration not reloaded") && stderr.contains("missing.json"),
        "{stderr}"
    );
    assert!(stderr.contains("allow_insecure_token"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !stderr.contains("secret-token"),
        "the token is never logged"
    );
}

/// A reload that panics (here in loading the config; the whole reload runs in one task) is
/// counted as a failure, the forwarder keeps answering with its running config, and the next
/// reload is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_reload_is_counted_and_the_next_one_applies() {
    use consul_dns_forwarder::config::Config;
    use consul_dns_forwarder::{run_with_reload, server, Bound, Reload};

    let up = TestUpstream::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let catalog = web_catalog_file(dir.path()).await;
    let config_with = |ttl: &str| {
        let text = TestConfig::new()
            .upstream(up.addr)
            .catalog_file(&catalog)
            .service_ttl(ttl)
            .toml();
        Config::from_toml_str(&text, "reload.toml").expect("valid")
    };
    let mut config = config_with("5s");
    config.server.listen = vec!["127.0.0.1:0".parse().expect("addr")];
    let dns = server::bind(&config.server.listen, 1).expect("bind");
    let addr = dns.local_addrs()[0];
    let registry = prometheus::Registry::new();
    let (trigger_tx, trigger) = tokio::sync::mpsc::channel(1);
    let calls = Arc::new(AtomicUsize::new(0));
    let next = config_with("9s");
    let counted = calls.clone();
    let load = Box::new(move || {
        if counted.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("simulated bug while reloading");
        }
        Ok(next.clone())
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let reg = registry.clone();
    let task = tokio::spawn(async move {
        run_with_reload(
            config,
            Bound { dns, metrics: None },
            reg,
            async move {
                let _ = stop_rx.await;
            },
            Some(Reload { trigger, load }),
        )
        .await
    });
    let reloads = |outcome: &'static str| {
        let registry = registry.clone();
        move || {
            metric_in(
                &consul_dns_forwarder::metrics::render(&registry),
                "consul_dns_forwarder_config_reloads_total",
                &[("outcome", outcome)],
            )
        }
    };
    let (failures, successes) = (reloads("failure"), reloads("success"));
    wait_until_answering(addr).await;
    assert_eq!(web_ttl(addr).await, Some(5));

    trigger_tx.send(()).await.expect("trigger");
    eventually(Duration::from_secs(5), async || failures() == 1.0)
        .await
        .expect("the panic is counted as a failed reload");
    assert_eq!(web_ttl(addr).await, Some(5), "running config untouched");
    assert_eq!(successes(), 0.0);

    trigger_tx
        .send(())
        .await
        .expect("the reload loop is still listening");
    eventually(Duration::from_secs(5), async || successes() == 1.0)
        .await
        .expect("the next reload succeeds");
    assert_eq!(web_ttl(addr).await, Some(9), "and is applied");
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stops")
        .expect("no panic escaped")
        .expect("ran");
}

/// A token file its group can read gets the same warning as a world-readable one; a 0600 file
/// gets none.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_readable_token_file_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let up = TestUpstream::start().await;
    let sim = web_sim().await;
    let dir = tempfile::tempdir().expect("tmp");
    let token = dir.path().join("token");
    std::fs::write(&token, "secret-token").expect("write");
    let conf = dir.path().join("f.toml");
    TestConfig::new()
        .upstream(up.addr)
        .consul_http(sim.http_url())
        .token_file(&token)
        .write_to(&conf);
    let mut logs = Vec::new();
    for mode in [0o640, 0o600] {
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let (mut server, addr) = spawn_answering(&["--config", &conf.display().to_string()]).await;
        assert_eq!(
            addresses(&ask(addr, "web.service.consul.", RecordType::A).await),
            vec!["127.0.0.2"],
            "mode {mode:o}: Consul answers with the token"
        );
        logs.push(server.terminate_and_read_stderr());
    }
    let warning = "consul.token_file is readable by its group";
    assert!(
        logs[0].contains(warning) && logs[0].contains("chmod 600"),
        "0640: {}",
        logs[0]
    );
    assert!(logs[0].contains("WARN"), "{}", logs[0]);
    assert!(!logs[1].contains("readable by"), "0600: {}", logs[1]);
    assert!(
        !logs.concat().contains("secret-token"),
        "the token is never logged"
    );
}
