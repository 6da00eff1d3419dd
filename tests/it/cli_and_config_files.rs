//! The real binary: `dig` against it, `--dev`, `check-config`, shipped configs, refusing to
//! start on bad input, and a clean exit on SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::support::e2e::dig_command;
use crate::support::upstream::TestUpstream;
use crate::support::{
    check_config, exits_with, free_port, run_ok, spawn, Running, TestConfig, BIN,
};
use consul_dns_forwarder::config::Config;

fn dig(port: u16, args: &[&str]) -> String {
    let out = dig_command(port, args)
        .output()
        .expect("dig is installed (bind9-dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the server answers dig (bounded).
fn wait_ready(port: u16, name: &str) -> String {
    let start = Instant::now();
    loop {
        let out = dig(port, &[name]);
        if out.contains("status:") {
            return out;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "server did not come up: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The binary with `args`, forwarding to `up`, on a free port of 127.0.0.1 (not waited for:
/// [`wait_ready`] does that with dig): the child and its port.
fn spawn_forwarding(args: &[&str], up: &TestUpstream) -> (Running, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let upstream = up.addr.to_string();
    let mut all = args.to_vec();
    all.extend([
        "--listen",
        &listen,
        "--upstream",
        &upstream,
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    (spawn(&all), port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_against_the_binary_then_sigterm_exits_zero() {
    let up = TestUpstream::start().await;
    let (mut server, port) = spawn_forwarding(&[], &up);
    let out = tokio::task::spawn_blocking(move || {
        let first = wait_ready(port, "a.test");
        let tcp = dig(port, &["+tcp", "a.test"]);
        let noedns = dig(port, &["+noedns", "missing.test"]);
        (first, tcp, noedns)
    })
    .await
    .expect("dig");
    println!("dig against the binary, a forwarded name:\n{}", out.0);
    assert!(out.0.contains("status: NOERROR"), "{}", out.0);
    assert!(out.0.contains("192.0.2.1"), "{}", out.0);
    assert!(out.0.contains(" ra"), "RA flag: {}", out.0);
    assert!(out.1.contains("192.0.2.1"), "over TCP: {}", out.1);
    assert!(out.2.contains("status: NXDOMAIN"), "{}", out.2);
    assert!(out.2.contains("SOA"), "{}", out.2);
    sigterm(&server.0);
    let status = wait_exit(&mut server.0, Duration::from_secs(5)).expect("exits after SIGTERM");
    assert!(status.success(), "exit 0 on SIGTERM, got {status:?}");
}

/// Pinned to one core (as `taskset` or systemd's `CPUAffinity=` pin it), the binary runs a
/// single-threaded runtime: it must answer the same, Consul names and misses that go upstream,
/// over UDP and TCP, and stop cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_pinned_to_one_core_answers_and_stops_on_sigterm() {
    let up = TestUpstream::start().await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let upstream = up.addr.to_string();
    let mut server = Running(
        Command::new("taskset")
            .args(["-c", "0", BIN, "--dev", "--listen", &listen])
            .args(["--upstream", &upstream, "--metrics-listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("taskset runs the binary"),
    );
    let threads = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Threads:").map(|n| n.trim().to_string()))
            })
    };
    let pid = server.0.id();
    let (consul, udp, tcp, threads) = tokio::task::spawn_blocking(move || {
        wait_ready(port, "web.service.consul");
        (
            dig(port, &["+short", "web.service.consul"]),
            dig(port, &["a.test"]),
            dig(port, &["+tcp", "two.test"]),
            threads(pid),
        )
    })
    .await
    .expect("dig");
    assert_eq!(consul.lines().count(), 2, "{consul}");
    assert!(
        udp.contains("192.0.2.1") && udp.contains("NOERROR"),
        "{udp}"
    );
    assert!(
        tcp.contains("NOERROR") && tcp.contains("192.0.2.2"),
        "{tcp}"
    );
    // The runtime's own thread and nothing else: a multi-threaded runtime would add a worker
    // to the main thread (and nothing here uses the blocking pool, which would add more).
    assert_eq!(threads.as_deref(), Some("1"), "threads on one core");
    sigterm(&server.0);
    let status = wait_exit(&mut server.0, Duration::from_secs(5)).expect("exits after SIGTERM");
    assert!(status.success(), "exit 0 on SIGTERM, got {status:?}");
}

#[test]
fn refuses_an_upstream_that_is_itself() {
    let port = free_port();
    let me = format!("127.0.0.1:{port}");
    let err = exits_with(
        Command::new(BIN).args(["--listen", &me, "--upstream", &me]),
        2,
    );
    assert!(err.contains("loop"), "{err}");
}

#[test]
fn refuses_a_taken_port_with_a_clear_message() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let err = exits_with(
        Command::new(BIN).args([
            "--listen",
            &addr,
            "--upstream",
            "127.0.0.1:9",
            "--metrics-listen",
            "127.0.0.1:0",
        ]),
        1,
    );
    assert!(
        err.contains(&addr) && err.contains("another process"),
        "{err}"
    );
}

#[test]
fn bad_flags_and_files_are_explained() {
    for (args, named) in [
        (["--upstream", "not-an-address"], "--upstream"),
        (["--config", "/nonexistent/x.toml"], "/nonexistent/x.toml"),
    ] {
        let err = exits_with(Command::new(BIN).args(args), 2);
        assert!(err.contains(named), "{err}");
    }
}

fn shipped_configs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    let mut dirs = vec![
        root.join("conf"),
        root.join("examples"),
        root.join("packaging"),
    ];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "toml") {
                found.push(p);
            }
        }
    }
    found.sort();
    found
}

#[test]
fn every_shipped_config_parses_and_rejects_an_unknown_key() {
    let configs = shipped_configs();
    assert!(!configs.is_empty());
    for path in configs {
        let text = std::fs::read_to_string(&path).expect("read");
        Config::from_toml_str(&text, &path.display().to_string())
            .unwrap_or_else(|e| panic!("{} must parse: {e}", path.display()));
        // Inject an unknown key into the first section.
        let bad = text.replacen(
            "[server]\n",
            "[server]\nlisten_adress = [\"127.0.0.1:53\"]\n",
            1,
        );
        let bad = if bad == text {
            format!("bogus_top_level = 1\n{text}")
        } else {
            bad
        };
        let err = Config::from_toml_str(&bad, &path.display().to_string())
            .expect_err("unknown key rejected");
        let msg = err.to_string();
        assert!(msg.contains("unknown field"), "{}: {msg}", path.display());

        run_ok(&mut check_config(&path));
    }
}

#[test]
fn check_config_lists_every_problem_with_line_and_key() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[cache]\nmin_ttl = \"2h\"\nmax_ttl = \"1h\"\n[consul]\nwatch_wait = \"20m\"\n",
    )
    .expect("write");
    let err = exits_with(&mut check_config(&path), 2);
    assert!(err.contains("bad.toml:2: cache.min_ttl"), "{err}");
    assert!(err.contains("bad.toml:5: consul.watch_wait"), "{err}");

    std::fs::write(&path, "[upstream]\ntimeout = 5\n").expect("write");
    let err = exits_with(&mut check_config(&path), 2);
    assert!(err.contains("line 2") && err.contains("timeout"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_serves_the_demo_catalog() {
    let up = TestUpstream::start().await;
    let (_server, port) = spawn_forwarding(&["--dev"], &up);
    let (a, srv, node, aaaa) = tokio::task::spawn_blocking(move || {
        wait_ready(port, "web.service.consul");
        (
            dig(port, &["+short", "web.service.consul"]),
            dig(port, &["SRV", "_web._tcp.service.consul"]),
            dig(port, &["+short", "node-1.node.consul"]),
            dig(port, &["+short", "AAAA", "api.service.consul"]),
        )
    })
    .await
    .expect("dig");
    let mut lines: Vec<&str> = a.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        vec!["10.10.0.11", "10.10.0.12"],
        "healthy and warning, not critical: {a}"
    );
    assert!(
        srv.contains("node-1.node.dc1.consul.") && srv.contains("status: NOERROR"),
        "{srv}"
    );
    assert_eq!(node.trim(), "10.10.0.11");
    assert_eq!(aaaa.trim(), "2001:db8::21");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_file_is_reloaded_on_sighup_and_a_bad_file_keeps_the_old_one() {
    let up = TestUpstream::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("catalog.json");
    let catalog = |addr: &str| {
        format!(
            r#"{{"web": [{{"Node": {{"Node": "n1", "Address": "{addr}", "Datacenter": "dc1"}},
                "Service": {{"ID": "web-1", "Service": "web", "Address": "", "Port": 80}},
                "Checks": [{{"CheckID": "serfHealth", "Status": "passing"}}]}}]}}"#
        )
    };
    std::fs::write(&path, catalog("127.0.0.2")).expect("write");
    let (server, port) = spawn_forwarding(&["--catalog-file", &path.display().to_string()], &up);
    let pid = server.0.id().to_string();
    let p2 = path.clone();
    let (before, after, after_bad) = tokio::task::spawn_blocking(move || {
        wait_ready(port, "web.service.consul");
        let before = dig(port, &["+short", "web.service.consul"]);
        std::fs::write(&p2, catalog("127.0.0.7")).expect("write");
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill");
        let start = Instant::now();
        let mut after = String::new();
        while start.elapsed() < Duration::from_secs(5) {
            after = dig(port, &["+short", "web.service.consul"]);
            if after.trim() == "127.0.0.7" {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::write(&p2, "{ not json").expect("write");
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill");
        std::thread::sleep(Duration::from_millis(300));
        let after_bad = dig(port, &["+short", "web.service.consul"]);
        (before, after, after_bad)
    })
    .await
    .expect("dig");
    assert_eq!(before.trim(), "127.0.0.2");
    assert_eq!(after.trim(), "127.0.0.7", "reloaded on SIGHUP");
    assert_eq!(
        after_bad.trim(),
        "127.0.0.7",
        "a bad file leaves the served catalog untouched"
    );
}

/// A key the shipped config documents with an integer or duration value.
#[derive(Clone, Debug)]
struct Limit {
    section: String,
    /// As written in the file (`max_inflight`, `"*"`).
    key: String,
    duration: bool,
}

impl Limit {
    fn name(&self) -> String {
        format!("{}.{}", self.section, self.key)
    }
}

/// Every integer and duration key of conf/consul-dns-forwarder.toml, commented-out ones too, so
/// a limit added later (and documented, as it must be) is covered without touching this test.
fn documented_limits() -> Vec<Limit> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/consul-dns-forwarder.toml");
    let text = std::fs::read_to_string(path).expect("read the shipped config");
    let mut section: Option<String> = None;
    let mut found = Vec::new();
    for raw in text.lines() {
        let line = raw.trim();
        if line.starts_with('[') {
            section = Some(line.trim_matches(|c| c == '[' || c == ']').to_owned());
            continue;
        }
        let candidate = line.trim_start_matches('#').trim();
        if candidate.starts_with('[') {
            // A commented-out section: its keys belong to it, not to the one above.
            section = None;
            continue;
        }
        let (Some(section), Ok(table)) = (&section, candidate.parse::<toml::Table>()) else {
            continue;
        };
        for (key, value) in table {
            let duration = match &value {
                toml::Value::Integer(_) => false,
                toml::Value::String(s) if humantime::parse_duration(s).is_ok() => true,
                _ => continue,
            };
            let key = if key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                key
            } else {
                format!("{key:?}")
            };
            found.push(Limit {
                section: section.clone(),
                key,
                duration,
            });
        }
    }
    found
}

/// Each limit at 0 and at the largest values TOML and humantime accept: `check-config` either
/// rejects the value naming its key (exit 2, never a crash), or the value is accepted and a
/// server running with all the accepted extremes together starts and answers forwarded and
/// Consul names over UDP and TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_limit_at_its_extremes_is_rejected_with_its_key_or_served() {
    use crate::support::consul_sim::ConsulSim;
    use crate::support::{addresses, ask, make_query, raw_udp, tcp};
    use consul_dns_forwarder::config::MAX_CONCURRENCY_LIMIT;
    use hickory_proto::rr::RecordType;

    const INTEGERS: [&str; 3] = ["0", "9223372036854775807", "18446744073709551615"];
    const DURATIONS: [&str; 3] = ["\"0s\"", "\"100000000y\"", "\"100000000y\""];

    let limits = documented_limits();
    let names: Vec<String> = limits.iter().map(Limit::name).collect();
    for known in [
        "server.tcp_idle_timeout",
        "server.max_inflight",
        "server.udp_sockets_per_address",
        "server.rate_limit",
        "upstream.max_inflight",
        "upstream.timeout",
        "cache.max_entries",
        "cache.stale_for",
        "consul.watch_idle",
        "consul.max_connections",
        "consul.service_ttl.\"*\"",
    ] {
        assert!(
            names.iter().any(|n| n == known),
            "{known} not found in {names:?}"
        );
    }

    let up = TestUpstream::start().await;
    let sim = ConsulSim::start().await;
    sim.add_simple("web", "n1", "127.0.0.2", 80);
    let dir = tempfile::tempdir().expect("tmp");
    // The agent's HTTP API, or (mode = "dns") its DNS port, where the Consul limits feed a cache.
    let base = TestConfig::new()
        .upstream(up.addr)
        .metrics_listen("127.0.0.1:0");
    let http_source = base.clone().consul_http(sim.http_url());
    let dns_source = base.consul_dns(sim.dns_addr());
    let render = |set: &[(&Limit, &str)], source: &TestConfig| -> TestConfig {
        set.iter().fold(source.clone(), |config, (limit, value)| {
            config.set(&limit.section, &limit.key, value)
        })
    };

    // One value at a time through check-config.
    let mut accepted: Vec<Vec<(&Limit, &str)>> = vec![Vec::new(); INTEGERS.len()];
    let mut report = Vec::new();
    for limit in &limits {
        let values = if limit.duration { DURATIONS } else { INTEGERS };
        for (i, value) in values.iter().enumerate() {
            if i > 0 && values[i] == values[i - 1] {
                if accepted[i - 1]
                    .iter()
                    .any(|(l, _)| l.name() == limit.name())
                {
                    accepted[i].push((limit, value));
                }
                continue;
            }
            let path = dir.path().join("one.toml");
            render(&[(limit, value)], &http_source).write_to(&path);
            let out = tokio::process::Command::new(BIN)
                .args(["check-config", "--config"])
                .arg(&path)
                .output()
                .await
                .expect("run check-config");
            let stderr = String::from_utf8_lossy(&out.stderr);
            match out.status.code() {
                Some(0) => {
                    accepted[i].push((limit, value));
                    report.push(format!("{} = {value}: accepted", limit.name()));
                }
                Some(2) => {
                    // Either the TOML parser's error (a value the key's type cannot hold),
                    // which quotes the offending line with its key, or our validation's
                    // "file:line: section.key: must be ...", which states the range.
                    let named = if stderr.contains("TOML parse error") {
                        stderr.contains("one.toml: ")
                            && stderr.contains(&format!("{} = ", limit.key))
                    } else {
                        stderr.contains("one.toml:")
                            && stderr.contains(&format!(": {}: ", limit.name()))
                            && stderr.contains("must ")
                    };
                    assert!(
                        named,
                        "{} = {value}: the rejection must name the key and what is allowed: {stderr}",
                        limit.name()
                    );
                    let summary = stderr.lines().last().unwrap_or_default().trim().to_owned();
                    report.push(format!("{} = {value}: rejected: {summary}", limit.name()));
                }
                other => panic!(
                    "{} = {value}: check-config exited {other:?}: {stderr}",
                    limit.name()
                ),
            }
        }
    }
    println!("{}", report.join("\n"));
    // The known panic: an upstream.max_inflight beyond what a semaphore holds.
    assert!(
        accepted[2]
            .iter()
            .any(|(l, _)| l.name() == "upstream.max_inflight"),
        "huge counts are clamped to {MAX_CONCURRENCY_LIMIT}, not rejected"
    );

    // Every accepted extreme together, one server per column and Consul mode.
    let runs = accepted.iter().enumerate().flat_map(|(column, set)| {
        [("http", &http_source), ("dns", &dns_source)]
            .map(|(mode, source)| (column, set, mode, source))
    });
    for (column, set, mode, source) in runs {
        let path = dir.path().join(format!("extreme-{column}-{mode}.toml"));
        render(set, source).write_to(&path);
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut server = spawn(&["--config", &path.display().to_string(), "--listen", &listen]);
        let addr: std::net::SocketAddr = listen.parse().expect("addr");
        let probe = make_query("a.test.", RecordType::A, None)
            .to_vec()
            .expect("encode");
        let started = Instant::now();
        while raw_udp(addr, &probe, Duration::from_millis(200))
            .await
            .is_none()
        {
            if let Ok(Some(status)) = server.0.try_wait() {
                let mut stderr = String::new();
                if let Some(mut pipe) = server.0.stderr.take() {
                    use std::io::Read;
                    let _ = pipe.read_to_string(&mut stderr);
                }
                panic!("{}: exited {status} at start: {stderr}", path.display());
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{}: not answering",
                path.display()
            );
        }
        let udp = ask(addr, "a.test.", RecordType::A).await;
        let over_tcp = tcp(addr, &make_query("two.test.", RecordType::A, None)).await;
        let consul = ask(addr, "web.service.consul.", RecordType::A).await;
        assert_eq!(addresses(&udp), vec!["192.0.2.1"], "{}", path.display());
        assert_eq!(addresses(&over_tcp).len(), 2, "{}", path.display());
        assert_eq!(addresses(&consul), vec!["127.0.0.2"], "{}", path.display());
        assert!(
            server.0.try_wait().expect("wait").is_none(),
            "{} still running after the queries",
            path.display()
        );
        let stderr = server.terminate_and_read_stderr();
        assert!(!stderr.contains("panicked"), "{stderr}");
        println!(
            "extreme-{column}-{mode}: {} accepted limits together, answered",
            set.len()
        );
    }
}

/// A Consul token is never sent in clear text to another host: `check-config` and a start refuse
/// it before any connection (192.0.2.1 is TEST-NET-1 and is never contacted), saying what to do;
/// loopback agents, https:// and `consul.allow_insecure_token = true` are accepted.
#[test]
fn a_token_over_plain_http_to_another_host_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let token = dir.path().join("token");
    std::fs::write(&token, "secret-token\n").expect("write");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let path = dir.path().join("f.toml");
    // check-config of `config` (written to f.toml), to run.
    let check = |config: &TestConfig, env_token: Option<&str>, flags: &[&str]| -> Command {
        config.write_to(&path);
        let mut cmd = check_config(&path);
        cmd.args(flags);
        cmd.env_remove("CONSUL_HTTP_TOKEN");
        if let Some(t) = env_token {
            cmd.env("CONSUL_HTTP_TOKEN", t);
        }
        cmd
    };
    let plain = || TestConfig::new().metrics_default().upstream("127.0.0.1:9");
    let with_file = |http: &str| plain().consul_http(http).token_file(&token);

    let config = with_file("http://192.0.2.1:8500");
    let http_line = 1 + config
        .toml()
        .lines()
        .position(|l| l.starts_with("http = "))
        .expect("consul.http in the file");
    let err = exits_with(&mut check(&config, None, &[]), 2);
    for part in [
        &format!("f.toml:{http_line}: consul.http: http://192.0.2.1:8500/"),
        "consul.token_file",
        "clear text",
        "https://",
        "consul.allow_insecure_token = true",
    ] {
        assert!(err.contains(part), "{part:?} missing: {err}");
    }
    assert!(
        !err.contains("secret-token"),
        "the token itself is never printed"
    );

    // A start with that file stops at the same check, before binding or connecting.
    let port = free_port();
    let started = Instant::now();
    let err = exits_with(
        Command::new(BIN)
            .args(["--config"])
            .arg(&path)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env_remove("CONSUL_HTTP_TOKEN"),
        2,
    );
    assert!(err.contains("consul.allow_insecure_token"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // The token from the environment, the agent from a flag: refused after the flags apply.
    let err = exits_with(
        &mut check(
            &plain(),
            Some("secret-token"),
            &["--consul-http", "http://192.0.2.1:8500"],
        ),
        2,
    );
    assert!(
        err.contains("consul.http: http://192.0.2.1:8500/") && err.contains("CONSUL_HTTP_TOKEN"),
        "{err}"
    );

    for (config, env, why) in [
        (
            with_file("http://192.0.2.1:8500").consul("allow_insecure_token = true"),
            None,
            "explicitly allowed",
        ),
        (with_file("http://127.0.0.1:8500"), None, "loopback"),
        (with_file("http://localhost:8500"), None, "localhost"),
        (with_file("http://[::1]:8500"), None, "IPv6 loopback"),
        (with_file("https://192.0.2.1:8501"), None, "https"),
        (
            plain().consul_http("http://192.0.2.1:8500"),
            None,
            "no token at all",
        ),
        (
            plain().consul_http("http://127.0.0.1:8500"),
            Some("secret-token"),
            "environment token to loopback",
        ),
    ] {
        let out = check(&config, env, &[]).output().expect("run check-config");
        assert!(
            out.status.success(),
            "{why}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
