//! The shipped examples under examples/ are valid: the Kubernetes manifests parse as YAML
//! (PyYAML, Debian's python3-yaml) and hang together, the TOML embedded in the ConfigMap is
//! accepted by the forwarder's own parser, and the systemd unit passes `systemd-analyze verify`
//! (where installed) with the hardening it promises. The nginx examples run in e2e_nginx.rs;
//! cli_and_config_files.rs checks every `*.toml` file under examples/.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{check_config, free_port, run_ok, Running as KillOnDrop, BIN};
use consul_dns_forwarder::config::Config;
use serde_json::Value;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn python3() -> &'static str {
    // Debian's interpreter, where scripts/test.sh installs python3-yaml.
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Every document of a YAML file, as JSON values (PyYAML's safe loader).
fn yaml_documents(path: &Path) -> Vec<Value> {
    let out = Command::new(python3())
        .args([
            "-c",
            "import json, sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
             print(json.dumps(docs))",
        ])
        .arg(path)
        .output()
        .expect("python3 runs (scripts/test.sh installs python3-yaml)");
    assert!(
        out.status.success(),
        "{} does not parse as YAML (or PyYAML is missing: apt-get install python3-yaml): {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from python")
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{pointer} is a string in {v}"))
}

#[test]
fn kubernetes_manifests_parse_and_embed_a_valid_config() {
    let path = examples().join("kubernetes/consul-dns-forwarder.yaml");
    let docs = yaml_documents(&path);
    let kinds: Vec<&str> = docs.iter().map(|d| str_at(d, "/kind")).collect();
    assert_eq!(kinds, vec!["ConfigMap", "DaemonSet"]);
    let (cm, ds) = (&docs[0], &docs[1]);
    for d in &docs {
        assert_eq!(str_at(d, "/metadata/namespace"), "consul");
    }

    // The ConfigMap's TOML, through the forwarder's own parser and the binary's check-config.
    let data = cm
        .pointer("/data")
        .and_then(Value::as_object)
        .expect("ConfigMap data");
    assert_eq!(data.len(), 1);
    let (key, toml) = data.iter().next().expect("one key");
    let toml = toml.as_str().expect("TOML text");
    let config = Config::from_toml_str(toml, &format!("{}: data.{key}", path.display()))
        .unwrap_or_else(|e| panic!("the ConfigMap's TOML must parse: {e}"));
    assert_eq!(
        config.server.listen,
        vec!["127.0.0.1:53".parse().expect("addr")]
    );
    let metrics = config.metrics.listen.expect("metrics on");
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join(key);
    std::fs::write(&file, toml).expect("write");
    run_ok(&mut check_config(&file));

    // The DaemonSet: one per node in the host's network, reading that ConfigMap.
    let spec = ds.pointer("/spec/template/spec").expect("pod spec");
    assert_eq!(spec.pointer("/hostNetwork"), Some(&Value::Bool(true)));
    assert_eq!(str_at(spec, "/dnsPolicy"), "Default");
    let labels = ds
        .pointer("/spec/template/metadata/labels")
        .expect("labels");
    let selector = ds.pointer("/spec/selector/matchLabels").expect("selector");
    assert_eq!(labels, selector, "the selector matches the pod labels");
    let containers = spec
        .pointer("/containers")
        .and_then(Value::as_array)
        .expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let args: Vec<&str> = c
        .pointer("/args")
        .and_then(Value::as_array)
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg"))
        .collect();

    let volume = spec
        .pointer("/volumes")
        .and_then(Value::as_array)
        .and_then(|v| {
            v.iter().find(|v| {
                v.pointer("/configMap/name")
                    .and_then(Value::as_str)
                    .is_some()
            })
        })
        .expect("a configMap volume");
    assert_eq!(
        str_at(volume, "/configMap/name"),
        str_at(cm, "/metadata/name")
    );
    let mount = c
        .pointer("/volumeMounts")
        .and_then(Value::as_array)
        .and_then(|m| {
            m.iter()
                .find(|m| m.pointer("/name") == volume.pointer("/name"))
        })
        .expect("the volume is mounted");
    let config_path = format!("{}/{key}", str_at(mount, "/mountPath"));
    let at = args
        .iter()
        .position(|a| *a == "--config")
        .expect("--config");
    assert_eq!(args[at + 1], config_path, "--config names the mounted key");

    // Every $(VAR) in args is an env var of the container (Kubernetes leaves unknown ones as
    // they are, which would make a bad URL).
    let env: Vec<&str> = c
        .pointer("/env")
        .and_then(Value::as_array)
        .expect("env")
        .iter()
        .map(|e| str_at(e, "/name"))
        .collect();
    for arg in &args {
        let mut rest = *arg;
        while let Some(start) = rest.find("$(") {
            let end = rest[start..].find(')').expect("closed $(") + start;
            let var = &rest[start + 2..end];
            assert!(env.contains(&var), "$({var}) in args is not in env");
            rest = &rest[end + 1..];
        }
    }
    let host_ip = c
        .pointer("/env")
        .and_then(Value::as_array)
        .and_then(|e| {
            e.iter()
                .find(|e| e.pointer("/name") == Some(&Value::from("HOST_IP")))
        })
        .expect("HOST_IP");
    assert_eq!(
        str_at(host_ip, "/valueFrom/fieldRef/fieldPath"),
        "status.hostIP"
    );
    let at = args
        .iter()
        .position(|a| *a == "--consul-http")
        .expect("--consul-http");
    assert_eq!(args[at + 1], "http://$(HOST_IP):8500");

    // The flags are the binary's: it starts with them (the file in place, the agent's URL made
    // local, listening on free ports instead of 53) and answers DNS.
    let mut flags: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    flags[at + 1] = "http://127.0.0.1:9".into();
    let cfg_at = flags
        .iter()
        .position(|a| a == "--config")
        .expect("--config");
    flags[cfg_at + 1] = file.display().to_string();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = free_port();
    let child = Command::new(BIN)
        .args(&flags)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--upstream", "127.0.0.1:9"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start");
    let mut child = KillOnDrop(child);
    assert!(
        answers_dns(&socket, port, &mut child.0),
        "the binary does not serve with the DaemonSet's flags {flags:?}"
    );

    // The image that packaging/Containerfile builds (tests/it/packaging.rs), pushed to a registry.
    assert_eq!(
        str_at(c, "/image"),
        format!(
            "registry.example.com/consul-dns-forwarder:{}",
            env!("CARGO_PKG_VERSION")
        )
    );

    // Port 53 as user 0 with only NET_BIND_SERVICE; readiness on /ready, liveness on /health,
    // where metrics listen.
    let sc = c.pointer("/securityContext").expect("securityContext");
    assert_eq!(
        sc.pointer("/allowPrivilegeEscalation"),
        Some(&Value::Bool(false))
    );
    assert_eq!(
        sc.pointer("/capabilities/add"),
        Some(&serde_json::json!(["NET_BIND_SERVICE"]))
    );
    assert_eq!(
        sc.pointer("/capabilities/drop"),
        Some(&serde_json::json!(["ALL"]))
    );
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/health")] {
        let p = c.pointer(&format!("/{probe}/httpGet")).expect(probe);
        assert_eq!(str_at(p, "/path"), path);
        assert_eq!(str_at(p, "/host"), metrics.ip().to_string());
        assert_eq!(
            p.pointer("/port").and_then(Value::as_u64),
            Some(u64::from(metrics.port()))
        );
    }
}

/// Asks `consul. SOA` (answered locally) until a reply comes, for at most 10 s; false when the
/// process exits first or nothing answers.
fn answers_dns(socket: &std::net::UdpSocket, port: u16, child: &mut std::process::Child) -> bool {
    let query: &[u8] = &[
        0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 6, b'c', b'o', b'n', b's', b'u', b'l', 0,
        0, 6, 0, 1,
    ];
    socket
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .expect("timeout");
    let start = std::time::Instant::now();
    let mut buf = [0u8; 1500];
    while start.elapsed() < std::time::Duration::from_secs(10) {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            eprintln!("exited with {status}: {err}");
            return false;
        }
        let _ = socket.send_to(query, ("127.0.0.1", port));
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            if n >= 12 && buf[..2] == [0x12, 0x34] {
                return true;
            }
        }
    }
    false
}

fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn systemd_unit_runs_without_root_and_verifies() {
    let dir = examples().join("systemd");
    let unit = std::fs::read_to_string(dir.join("consul-dns-forwarder.service")).expect("unit");
    for (key, value) in [
        ("DynamicUser", "yes"),
        // Port 53 comes from the socket unit: no capability at all.
        ("CapabilityBoundingSet", ""),
        ("Requires", "consul-dns-forwarder.socket"),
        ("Type", "notify"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("Restart", "always"),
        (
            "ExecStart",
            "/usr/local/bin/consul-dns-forwarder --config /etc/consul-dns-forwarder.toml",
        ),
    ] {
        assert_eq!(unit_values(&unit, key), vec![value], "{key}=");
    }
    assert!(
        unit_values(&unit, "User").is_empty(),
        "DynamicUser, no User="
    );
    assert!(unit_values(&unit, "AmbientCapabilities").is_empty());
    let socket = std::fs::read_to_string(dir.join("consul-dns-forwarder.socket")).expect("socket");
    for key in ["ListenDatagram", "ListenStream"] {
        assert_eq!(
            unit_values(&socket, key),
            vec!["127.0.0.1:53", "[::1]:53"],
            "{key}="
        );
    }

    // The config the unit expects, as shipped beside it: port 53 on loopback.
    let toml_path = dir.join("consul-dns-forwarder.toml");
    let toml = std::fs::read_to_string(&toml_path).expect("toml");
    let config = Config::from_toml_str(&toml, &toml_path.display().to_string()).expect("valid");
    assert!(config
        .server
        .listen
        .iter()
        .all(|a| a.port() == 53 && a.ip().is_loopback()));
    assert_eq!(config.consul.a_record_limit, 1);

    // systemd's own check, with the paths pointed at this build and this config.
    let tmp = tempfile::tempdir().expect("tmp");
    let local = unit
        .replace("/usr/local/bin/consul-dns-forwarder", BIN)
        .replace(
            "/etc/consul-dns-forwarder.toml",
            &toml_path.display().to_string(),
        );
    let path = tmp.path().join("consul-dns-forwarder.service");
    std::fs::write(&path, local).expect("write");
    let socket_path = tmp.path().join("consul-dns-forwarder.socket");
    std::fs::write(&socket_path, socket).expect("write");
    crate::support::systemd::verify(tmp.path(), &[&socket_path, &path]);
}
