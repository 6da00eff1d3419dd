//! `check-config` and a real start agree: every broken configuration is refused by both, with
//! exit code 2, naming the same key (and line, where the file has it), before anything is
//! served, the error printed once. Also flag-only setups and every global flag.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::{free_port, BIN};

/// How long a start may take to refuse a configuration.
const REFUSE_WITHIN: Duration = Duration::from_secs(10);

/// Runs `cmd` to its end, killing it after [`REFUSE_WITHIN`] (a start that serves does not end).
fn run_bounded(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the binary");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > REFUSE_WITHIN {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// `sh -c 'ulimit -n N; exec BIN args'` when `nofile` is set, else BIN itself.
fn binary(args: &[String], nofile: Option<u32>) -> Command {
    let mut cmd = match nofile {
        Some(n) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!(r#"ulimit -n {n} && exec "$0" "$@""#))
                .arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    cmd.args(args)
        .env("RUST_LOG", "info")
        .env_remove("CONSUL_HTTP_TOKEN");
    cmd
}

struct Broken {
    what: &'static str,
    /// The file's text (`{port}` replaced by a free port), or `None` for flags only.
    toml: Option<String>,
    flags: Vec<String>,
    /// What both must print: the key, with the file's line where there is one.
    named: &'static str,
    nofile: Option<u32>,
}

fn base(port: u16, extra: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\n[upstream]\nservers = [\"127.0.0.1:9\"]\n[metrics]\nlisten = \"127.0.0.1:0\"\n{extra}"
    )
}

/// [`base`] with `line` right after `header`.
fn spliced(port: u16, header: &str, line: &str) -> String {
    base(port, "").replacen(header, &format!("{header}{line}"), 1)
}

fn broken_configs(port: u16) -> Vec<Broken> {
    let file = |what, extra: &str, named| Broken {
        what,
        toml: Some(base(port, extra)),
        flags: Vec::new(),
        named,
        nofile: None,
    };
    vec![
        file(
            "a missing token_file",
            "[consul]\ntoken_file = \"/nonexistent/token\"\n",
            "consul.token_file: cannot read /nonexistent/token",
        ),
        file(
            "a missing ca_file",
            "[consul]\nhttp = [\"https://127.0.0.1:8501\"]\nca_file = \"/nonexistent/ca.pem\"\n",
            "consul.ca_file: cannot read /nonexistent/ca.pem",
        ),
        file(
            "a missing catalog_file",
            "[consul]\ncatalog_file = \"/nonexistent/catalog.json\"\n",
            "consul.catalog_file: cannot read /nonexistent/catalog.json",
        ),
        Broken {
            what: "a listen address twice",
            toml: Some(format!(
                "[server]\nlisten = [\"127.0.0.1:{port}\", \"127.0.0.1:{port}\"]\n[upstream]\nservers = [\"127.0.0.1:9\"]\n"
            )),
            flags: Vec::new(),
            named: "server.listen: 127.0.0.1:",
            nofile: None,
        },
        Broken {
            what: "udp_sockets_per_address = 100000",
            toml: Some(spliced(port, "[server]\n", "udp_sockets_per_address = 100000\n")),
            flags: Vec::new(),
            named: "c.toml:2: server.udp_sockets_per_address",
            nofile: None,
        },
        Broken {
            what: "metrics on the DNS port",
            toml: Some(format!(
                "[server]\nlisten = [\"127.0.0.1:{port}\"]\n[upstream]\nservers = [\"127.0.0.1:9\"]\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"
            )),
            flags: Vec::new(),
            named: "metrics.listen:",
            nofile: None,
        },
        Broken {
            what: "more UDP sockets than the open-file limit",
            toml: Some(spliced(port, "[server]\n", "udp_sockets_per_address = 300\n")),
            flags: Vec::new(),
            named: "server.udp_sockets_per_address: 1 listen address(es) × (300 UDP sockets",
            nofile: Some(256),
        },
        file(
            "a second [[forward]] block without servers",
            "[[forward]]\nzone = \"a.example\"\nservers = [\"127.0.0.1:9\"]\n\n[[forward]]\nzone = \"b.example\"\nservers = []\n",
            "c.toml:13: forward.servers: zone b.example.",
        ),
        file(
            "a bad [consul.service_ttl] pattern",
            "[consul]\nnode_ttl = \"5s\"\n\n[consul.service_ttl]\n\"web\" = \"5s\"\n\"a*b\" = \"5s\"\n",
            "c.toml:12: consul.service_ttl.\"a*b\"",
        ),
        Broken {
            what: "timeout = 2",
            toml: Some(spliced(port, "[upstream]\n", "timeout = 2\n")),
            flags: Vec::new(),
            named: "expected a duration string like \"2s\"",
            nofile: None,
        },
        Broken {
            what: "flags only: metrics on the DNS port",
            toml: None,
            flags: vec![
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--upstream".into(),
                "127.0.0.1:9".into(),
                "--metrics-listen".into(),
                format!("127.0.0.1:{port}"),
                "--log-format".into(),
                "json".into(),
            ],
            named: "metrics.listen:",
            nofile: None,
        },
    ]
}

#[test]
fn check_config_and_a_start_refuse_the_same_configs_with_the_same_key_and_exit_2() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("c.toml");
    let port = free_port();
    for b in broken_configs(port) {
        let mut args: Vec<String> = Vec::new();
        if let Some(toml) = &b.toml {
            std::fs::write(&path, toml).expect("write");
            args.extend(["--config".into(), path.display().to_string()]);
        }
        args.extend(b.flags.iter().cloned());
        let mut check_args = vec!["check-config".to_owned()];
        check_args.extend(args.iter().cloned());
        let check = run_bounded(&mut binary(&check_args, b.nofile));
        let start = run_bounded(&mut binary(&args, b.nofile));
        let (check_err, start_err) = (
            String::from_utf8_lossy(&check.stderr).into_owned(),
            String::from_utf8_lossy(&start.stderr).into_owned(),
        );
        println!(
            "{}:\n  check-config: {}",
            b.what,
            check_err.trim_end().replace('\n', "\n    ")
        );
        assert_eq!(
            check.status.code(),
            Some(2),
            "{}: check-config: {check_err}",
            b.what
        );
        assert_eq!(
            start.status.code(),
            Some(2),
            "{}: start: {start_err}",
            b.what
        );
        for (who, err) in [("check-config", &check_err), ("start", &start_err)] {
            assert!(
                err.contains(b.named),
                "{}: {who} must name {:?}: {err}",
                b.what,
                b.named
            );
            assert_eq!(
                err.matches(b.named).count(),
                1,
                "{}: {who} prints the error once: {err}",
                b.what
            );
        }
        assert!(
            !start_err.contains("serving"),
            "{}: refused before serving: {start_err}",
            b.what
        );
        assert_eq!(
            check_err, start_err,
            "{}: the same message from both",
            b.what
        );
    }
}

/// Runs the binary with `args` and checks that it exits 0; returns stdout.
fn succeeds(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let out = run_bounded(&mut binary(&args, None));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn check_config_takes_flags_alone_and_every_global_flag() {
    let listen = format!("127.0.0.1:{}", free_port());
    let out = succeeds(&[
        "check-config",
        "--listen",
        &listen,
        "--upstream",
        "127.0.0.1:9",
        "--consul-http",
        "http://127.0.0.1:8500",
        "--metrics-listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ]);
    assert!(out.contains("OK"), "{out}");
    // Global flags also before the subcommand.
    succeeds(&["--log-format", "text", "--dev", "check-config"]);
}
