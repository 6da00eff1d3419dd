//! The real binary's log lines on a pipe (as the journal reads them): no colour codes, one line
//! per event even for a multi-line error, and `log.format` / `log.level` taken from the file.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::upstream::TestUpstream;
use crate::support::{free_port, wait_until_answering, Running, TestConfig};

fn hup(server: &Running) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &server.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// The binary on a free port with `conf`, `extra` flags, `TERM` claiming a colour terminal and
/// `RUST_LOG` unset (so `log.level` applies); waits until it answers.
async fn start(conf: &std::path::Path, extra: &[&str]) -> (Running, SocketAddr) {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "--config",
        conf.to_str().expect("utf-8"),
        "--listen",
        &listen,
    ];
    args.extend(extra);
    let mut cmd = std::process::Command::new(crate::support::BIN);
    cmd.args(&args)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .env("TERM", "xterm-256color")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let server = Running(cmd.spawn().expect("start"));
    let addr: SocketAddr = listen.parse().expect("addr");
    wait_until_answering(addr).await;
    (server, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipe_gets_no_colour_and_one_line_per_event() {
    let up = TestUpstream::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let conf = dir.path().join("f.toml");
    let good = TestConfig::new().upstream(up.addr).consul_off();
    good.write_to(&conf);
    let (mut server, _) = start(&conf, &[]).await;
    // A reload of a file with a type error: the TOML error quotes the line, over several lines.
    std::fs::write(&conf, format!("{}\n[cache]\nmin_ttl = 2\n", good.toml())).expect("write");
    hup(&server);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stderr = server.terminate_and_read_stderr();
    println!("{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes on a pipe: {stderr:?}"
    );
    let failed: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("configuration not reloaded"))
        .collect();
    assert_eq!(failed.len(), 1, "{stderr}");
    assert!(
        failed[0].contains("min_ttl = 2") && failed[0].contains("expected a duration string"),
        "the whole error on the event's one line: {}",
        failed[0]
    );
    assert!(
        stderr
            .lines()
            .all(|l| l.contains(" INFO ") || l.contains(" WARN ") || l.contains(" ERROR ")),
        "every line is an event of its own: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_and_level_come_from_the_file_and_the_flag_wins() {
    let up = TestUpstream::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let conf = dir.path().join("f.toml");
    let with_log = |lines: &str| {
        TestConfig::new()
            .upstream(up.addr)
            .consul_off()
            .log(lines)
            .write_to(&conf)
    };
    with_log("format = \"json\"\nlevel = \"warn\"");
    let (mut server, _) = start(&conf, &[]).await;
    let quiet = server.terminate_and_read_stderr();
    // level = "warn": not even the "serving" line.
    assert!(quiet.trim().is_empty(), "{quiet}");

    with_log("format = \"json\"");
    let (mut server, _) = start(&conf, &[]).await;
    let json = server.terminate_and_read_stderr();
    assert!(json.contains("consul-dns-forwarder serving"), "{json}");
    for line in json.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("log.format = json, but not JSON ({e}): {line}"));
    }
    let (mut server, _) = start(&conf, &["--log-format", "text"]).await;
    let text = server.terminate_and_read_stderr();
    assert!(
        text.lines().next().is_some_and(|l| !l.starts_with('{')),
        "--log-format wins over the file: {text}"
    );
    // An unknown level is refused with its key.
    std::fs::write(&conf, "[log]\nlevel = \"info,x=loud\"\n").expect("write");
    let out = std::process::Command::new(crate::support::BIN)
        .args(["check-config", "--config", conf.to_str().expect("utf-8")])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("level"), "{err}");
}
