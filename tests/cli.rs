//! The real binary: `dig` against it, `--dev`, `check-config`, shipped configs, refusing to
//! start on bad input, and a clean exit on SIGTERM.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use consul_dns_forwarder::config::Config;
use support::upstream::TestUpstream;
use support::{free_port, spawn, BIN};

fn dig(port: u16, args: &[&str]) -> String {
    let out = Command::new("dig")
        .arg("@127.0.0.1")
        .arg("-p")
        .arg(port.to_string())
        .args(["+time=2", "+tries=1"])
        .args(args)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_against_the_binary_then_sigterm_exits_zero() {
    let up = TestUpstream::start().await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let upstream = up.addr.to_string();
    let mut server = spawn(&[
        "--listen",
        &listen,
        "--upstream",
        &upstream,
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
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

#[test]
fn refuses_an_upstream_that_is_itself() {
    let port = free_port();
    let me = format!("127.0.0.1:{port}");
    let out: Output = Command::new(BIN)
        .args(["--listen", &me, "--upstream", &me])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("loop"), "{err}");
}

#[test]
fn refuses_a_taken_port_with_a_clear_message() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = Command::new(BIN)
        .args([
            "--listen",
            &addr,
            "--upstream",
            "127.0.0.1:9",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&addr) && err.contains("another process"),
        "{err}"
    );
}

#[test]
fn bad_flags_and_files_are_explained() {
    let out = Command::new(BIN)
        .args(["--upstream", "not-an-address"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--upstream"));

    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/x.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.toml"));
}

fn shipped_configs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    let mut dirs = vec![root.join("conf"), root.join("examples")];
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

        let out = Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "check-config {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
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
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:2: cache.min_ttl"), "{err}");
    assert!(err.contains("bad.toml:5: consul.watch_wait"), "{err}");

    std::fs::write(&path, "[upstream]\ntimeout = 5\n").expect("write");
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2") && err.contains("timeout"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_serves_the_demo_catalog() {
    let up = TestUpstream::start().await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let upstream = up.addr.to_string();
    let _server = spawn(&[
        "--dev",
        "--listen",
        &listen,
        "--upstream",
        &upstream,
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
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
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let upstream = up.addr.to_string();
    let file = path.display().to_string();
    let server = spawn(&[
        "--catalog-file",
        &file,
        "--listen",
        &listen,
        "--upstream",
        &upstream,
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
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
