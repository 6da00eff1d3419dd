//! Hostile input other than DNS packets (issue 7): the config file, the catalog file, and
//! Consul's HTTP responses.
//!
//! - Config text: random byte and line mutations of `conf/consul-dns-forwarder.toml` through
//!   `Config::from_toml_str`: never a panic, every error names the file and a line. Values the
//!   validation accepts, at their extremes, do not crash a running server either.
//! - Catalog file: byte mutations and JSON-aware mutations (wrong types, huge and odd values) of
//!   the demo catalog through `FileBackend::from_text`: never a panic, errors name the file and
//!   line; catalogs that parse are then asked every name they define through the handler.
//! - Consul's HTTP API: a hostile HTTP server of our own (hand-written HTTP/1.1 on 127.0.0.1)
//!   serving truncated JSON, wrong types, HTML, 500s, bodies that never end, connections that
//!   hang, and `X-Consul-Index` values that go backwards, are 0, missing or not numbers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::hostile::{
    check_reply, hex, query, ALLOWED_CLIENT, TYPE_A, TYPE_AAAA, TYPE_ANY, TYPE_SRV, TYPE_TXT,
};
use crate::support::upstream::TestUpstream;
use crate::support::*;
use consul_dns_forwarder::config::Config;
use consul_dns_forwarder::consul::file::{FileBackend, DEMO_CATALOG};
use consul_dns_forwarder::reply::Transport;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CONFIG: &str = include_str!("../../conf/consul-dns-forwarder.toml");

/// Values that break assumptions: wrong types, empty, huge, negative, odd units and addresses.
const HOSTILE_TOML_VALUES: &[&str] = &[
    "-1",
    "0",
    "18446744073709551616",
    "9223372036854775807",
    "1.5",
    "nan",
    "inf",
    "true",
    "\"\"",
    "\"0s\"",
    "\"-5s\"",
    "\"1e400s\"",
    "\"18446744073709551615s\"",
    "\"584942417355y\"",
    "\"1s1s\"",
    "\"soon\"",
    "\"\\u0000\"",
    "\"☃\"",
    "\"127.0.0.1:99999\"",
    "\"[::1\"",
    "\"300.1.1.1\"",
    "\"http://\"",
    "\"ftp://127.0.0.1\"",
    "\"http://127.0.0.1:8500/../..\"",
    "\"0.0.0.0/33\"",
    "\"..\"",
    "\"a..b\"",
    "[]",
    "[1, \"a\"]",
    "[[]]",
    "{}",
    "{ a = 1 }",
    "1979-05-27T07:32:00Z",
    "\"\"\"multi\nline\"\"\"",
];

fn mutate_config(rng: &mut StdRng, text: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for _ in 0..rng.random_range(1..=3) {
        let n = lines.len().max(1);
        let i = rng.random_range(0..n);
        match rng.random_range(0..9) {
            0 => {
                lines.remove(i.min(lines.len().saturating_sub(1)));
            }
            1 => {
                let l = lines[i].clone();
                lines.insert(i, l);
            }
            2 => {
                let j = rng.random_range(0..n);
                lines.swap(i, j);
            }
            // Replace the value of a `key = value` line (commented-out keys come back to life).
            3..=5 => {
                let candidates: Vec<usize> = lines
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.contains(" = "))
                    .map(|(k, _)| k)
                    .collect();
                if let Some(&k) = candidates.get(rng.random_range(0..candidates.len().max(1))) {
                    let key = lines[k]
                        .split(" = ")
                        .next()
                        .unwrap_or("")
                        .trim_start_matches("# ")
                        .to_owned();
                    let value = HOSTILE_TOML_VALUES[rng.random_range(0..HOSTILE_TOML_VALUES.len())];
                    lines[k] = format!("{key} = {value}");
                }
            }
            6 => {
                let section = [
                    "[server]",
                    "[consul]",
                    "[[forward]]",
                    "[cache]",
                    "[consul.service_ttl]",
                    "[bogus]",
                    "[",
                    "[[server]]",
                ];
                lines.insert(i, section[rng.random_range(0..section.len())].to_owned());
            }
            7 => {
                lines.truncate(i);
            }
            _ => {
                // Bytes: flip, insert or delete one character of a line.
                let l = &mut lines[i];
                let mut bytes = l.clone().into_bytes();
                if bytes.is_empty() {
                    bytes.push(b'=');
                } else {
                    let at = rng.random_range(0..bytes.len());
                    match rng.random_range(0..3) {
                        0 => bytes[at] ^= 1 << rng.random_range(0..7),
                        1 => bytes.insert(at, b"=[]{}\"'#.\\\n\t,"[rng.random_range(0..13)]),
                        _ => {
                            bytes.remove(at);
                        }
                    }
                }
                *l = String::from_utf8_lossy(&bytes).into_owned();
            }
        }
        if lines.is_empty() {
            break;
        }
    }
    lines.join("\n")
}

/// Does an error message give a line? (TOML's "line N, column M", or ours "path:N: key".)
fn names_a_line(message: &str, path: &str) -> bool {
    message.contains("line ")
        || message
            .split(&format!("{path}:"))
            .nth(1)
            .is_some_and(|rest| rest.chars().next().is_some_and(|c| c.is_ascii_digit()))
}

#[test]
fn config_mutations_never_panic_and_errors_name_file_and_line() {
    let mut rng = StdRng::seed_from_u64(0xc0f1);
    let start = Instant::now();
    let (mut ok, mut err) = (0, 0);
    for case in 0..3000 {
        if start.elapsed() > Duration::from_secs(4) {
            break;
        }
        let text = mutate_config(&mut rng, CONFIG);
        let result = std::panic::catch_unwind(|| Config::from_toml_str(&text, "mutated.toml"));
        match result {
            Err(_) => panic!("case {case}: Config::from_toml_str panicked on:\n{text}"),
            Ok(Ok(_)) => ok += 1,
            Ok(Err(errors)) => {
                err += 1;
                assert!(!errors.0.is_empty(), "case {case}: an empty error list");
                for e in &errors.0 {
                    let m = e.to_string();
                    assert!(
                        m.contains("mutated.toml"),
                        "case {case}: error without the file name: {m}\n--- text:\n{text}"
                    );
                    assert!(
                        names_a_line(&m, "mutated.toml"),
                        "case {case}: error without a line: {m}\n--- text:\n{text}"
                    );
                }
            }
        }
    }
    eprintln!("{ok} mutated configs accepted, {err} rejected");
    assert!(
        ok > 50 && err > 50,
        "mutations should both keep and break the file ({ok} ok, {err} errors)"
    );
}

/// Values the validation accepts, at their extremes, must not crash a running server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_extreme_config_values_serve_queries() {
    let up = TestUpstream::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let catalog = dir.path().join("catalog.json");
    std::fs::write(&catalog, DEMO_CATALOG).expect("write");
    let huge = "\"18446744073709551615s\"";
    for (section, key, value) in [
        ("cache", "stale_for", huge),
        ("cache", "negative_ttl", huge),
        ("cache", "min_ttl", "\"2147483647s\""),
        ("cache", "max_entries", "0"),
        ("server", "tcp_idle_timeout", huge),
        ("server", "max_inflight", "1"),
        ("server", "max_inflight", "9223372036854775807"),
        ("server", "max_tcp_connections", "9223372036854775807"),
        ("consul", "max_connections", "9223372036854775807"),
        ("consul", "stale_for", huge),
        ("consul", "node_ttl", huge),
        ("consul", "negative_ttl", huge),
        ("consul", "watch_idle", huge),
        ("consul", "a_record_limit", "9223372036854775807"),
    ] {
        // consul.max_connections only matters to the HTTP client: that case asks an agent on
        // 127.0.0.1:1, where nothing listens, and its Consul names get SERVFAIL.
        let http = key == "max_connections";
        let config = TestConfig::new()
            .upstream(up.addr)
            .upstream_timeout("1s")
            .cache("max_ttl = \"2147483647s\"");
        let config = if http {
            config
                .consul_http("http://127.0.0.1:1")
                .consul("datacenter = \"dc1\"")
        } else {
            config.catalog_file(&catalog)
        };
        let toml = config.set(section, key, value).toml();
        let config = match Config::from_toml_str(&toml, "extreme.toml") {
            Ok(c) => c,
            Err(e) => {
                // Rejected is fine, with a message that says where.
                assert!(e.to_string().contains("extreme.toml"), "{e}");
                continue;
            }
        };
        let fwd = TestServer::start_config(config).await;
        for name in [
            "a.test.",
            "a.test.",
            "nxdomain.test.",
            "nxdomain.test.",
            "web.service.consul.",
            "nosuch.service.consul.",
            "node-1.node.consul.",
        ] {
            // Retried like a stub resolver does: with max_inflight = 1 a query that arrives
            // before the previous one has released its slot is shed (and counted).
            let q = make_query(name, RecordType::A, None);
            let mut reply = None;
            for _ in 0..3 {
                reply = raw_udp(
                    fwd.addr,
                    &q.to_vec().expect("encode"),
                    Duration::from_secs(2),
                )
                .await;
                if reply.is_some() {
                    break;
                }
            }
            let reply =
                reply.unwrap_or_else(|| panic!("{section}.{key} = {value}: no reply for {name}"));
            let r = hickory_proto::op::Message::from_vec(&reply).expect("reply parses");
            assert_eq!(r.metadata.id, q.metadata.id);
            if http && name.ends_with(".consul.") {
                assert_eq!(r.metadata.response_code, ResponseCode::ServFail, "{name}");
                continue;
            }
            assert_ne!(
                r.metadata.response_code,
                ResponseCode::ServFail,
                "{section}.{key} = {value}: {name}"
            );
        }
        let r = tcp(fwd.addr, &make_query("a.test.", RecordType::A, None)).await;
        assert_eq!(
            r.metadata.response_code,
            ResponseCode::NoError,
            "{section}.{key} = {value}: over TCP"
        );
        fwd.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// The catalog file.

const HOSTILE_JSON: &[&str] = &[
    "null",
    "true",
    "-1",
    "0",
    "65536",
    "1e300",
    "-0.5",
    "\"\"",
    "\"eighty\"",
    "\"127.0.0.1\"",
    "\"::1\"",
    "\"999.1.1.1\"",
    "\"a..b\"",
    "\"host.example\"",
    "\"with space\"",
    "\"☃.example\"",
    "\"critical\"",
    "\"warning\"",
    "[]",
    "{}",
    "[[]]",
    "{\"a\":1}",
];

fn random_value(rng: &mut StdRng) -> Value {
    match rng.random_range(0..10) {
        0 => Value::String("x".repeat(rng.random_range(60..400))),
        1 => Value::String(format!("{}.{}", "l".repeat(63), "m".repeat(63))),
        _ => serde_json::from_str(HOSTILE_JSON[rng.random_range(0..HOSTILE_JSON.len())])
            .expect("valid json"),
    }
}

/// Replaces, deletes or adds something at a random place in the tree.
fn mutate_json(rng: &mut StdRng, v: &mut Value, depth: usize) {
    let descend = depth < 6 && rng.random_bool(0.8);
    match v {
        Value::Object(map) if !map.is_empty() && descend => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let k = &keys[rng.random_range(0..keys.len())];
            match rng.random_range(0..10) {
                0 => {
                    map.remove(k);
                }
                1 => {
                    let val = map.remove(k).unwrap_or(Value::Null);
                    map.insert(k.to_lowercase(), val);
                }
                _ => mutate_json(rng, map.get_mut(k).expect("key"), depth + 1),
            }
        }
        Value::Array(items) if !items.is_empty() && descend => {
            let i = rng.random_range(0..items.len());
            match rng.random_range(0..10) {
                0 => {
                    items.remove(i);
                }
                1 => {
                    let copy = items[i].clone();
                    items.push(copy);
                }
                _ => mutate_json(rng, &mut items[i], depth + 1),
            }
        }
        _ => *v = random_value(rng),
    }
}

/// Every service and node name a catalog defines (to ask for them).
fn names_in(v: &Value) -> (Vec<String>, Vec<String>) {
    let mut services = Vec::new();
    let mut nodes = Vec::new();
    if let Value::Object(map) = v {
        for (service, entries) in map {
            services.push(service.clone());
            if let Value::Array(entries) = entries {
                for e in entries {
                    if let Some(n) = e.pointer("/Node/Node").and_then(Value::as_str) {
                        nodes.push(n.to_owned());
                    }
                }
            }
        }
    }
    (services, nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_mutations_never_panic_and_accepted_catalogs_answer() {
    let base: Value = serde_json::from_str(DEMO_CATALOG).expect("demo catalog");
    let mut rng = StdRng::seed_from_u64(0xca7a);
    let start = Instant::now();
    let (mut ok, mut err, mut asked) = (0, 0, 0);
    for case in 0..2000 {
        if start.elapsed() > Duration::from_secs(5) {
            break;
        }
        let mut v = base.clone();
        let text = if rng.random_ratio(1, 4) {
            // Byte-level: flip, cut or insert in the JSON text.
            let mut bytes = serde_json::to_vec_pretty(&v).expect("json");
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..bytes.len());
                match rng.random_range(0..3) {
                    0 => bytes[at] ^= 1 << rng.random_range(0..8),
                    1 => bytes.truncate(at),
                    _ => bytes.insert(at, b"{}[],:\"0"[rng.random_range(0..8)]),
                }
                if bytes.is_empty() {
                    break;
                }
            }
            String::from_utf8_lossy(&bytes).into_owned()
        } else {
            for _ in 0..rng.random_range(1..=3) {
                mutate_json(&mut rng, &mut v, 0);
            }
            serde_json::to_string_pretty(&v).expect("json")
        };
        let parsed =
            std::panic::catch_unwind(|| FileBackend::from_text(&text, "catalog.json", None));
        let backend = match parsed {
            Err(_) => panic!("case {case}: FileBackend::from_text panicked on:\n{text}"),
            Ok(Err(e)) => {
                err += 1;
                let m = e.to_string();
                assert!(
                    m.contains("catalog.json") && m.contains("line "),
                    "case {case}: {m}"
                );
                continue;
            }
            Ok(Ok(b)) => b,
        };
        ok += 1;
        // Ask the handler for what this catalog holds (every fifth accepted one: bounded time).
        if ok % 5 != 1 {
            continue;
        }
        let (handler, _registry) =
            crate::support::hostile::handler_with_catalog(None, Duration::from_millis(50), backend);
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let (services, nodes) = names_in(&value);
        let mut names: Vec<String> = Vec::new();
        for s in services.iter().take(4) {
            names.push(format!("{s}.service.consul."));
            names.push(format!("_{s}._tcp.service.consul."));
            names.push(format!("v1.{s}.service.dc1.consul."));
        }
        for n in nodes.iter().take(4) {
            names.push(format!("{n}.node.consul."));
        }
        for (i, n) in names.iter().enumerate() {
            for qtype in [TYPE_A, TYPE_AAAA, TYPE_SRV, TYPE_TXT, TYPE_ANY] {
                // Names that are not valid DNS (over 63/255 bytes, empty labels) cannot be asked.
                if n.split('.').any(|l| l.len() > 63)
                    || n.len() > 250
                    || n.contains("..")
                    || n.starts_with('.')
                {
                    continue;
                }
                let packet = query(i as u16, n, qtype, None);
                let call = handler.handle(&packet, ALLOWED_CLIENT, Transport::Udp);
                let reply = tokio::time::timeout(Duration::from_secs(2), call)
                    .await
                    .unwrap_or_else(|_| panic!("case {case}: {n} type {qtype} took over 2 s"));
                if let Err(e) = check_reply(&packet, reply.as_deref(), Transport::Udp, true) {
                    panic!(
                        "case {case}: {n} type {qtype}: {e}\npacket {}\ncatalog:\n{text}",
                        hex(&packet)
                    );
                }
                asked += 1;
            }
        }
    }
    eprintln!("{ok} mutated catalogs accepted, {err} rejected, {asked} questions asked");
    assert!(
        ok > 50 && err > 50 && asked > 500,
        "{ok} ok, {err} errors, {asked} asked"
    );
}

// ---------------------------------------------------------------------------------------------
// Consul's HTTP API, hostile.

/// What the hostile server sends for one request.
#[derive(Clone, Debug)]
enum Reply {
    /// A complete response (Content-Length set, connection kept alive).
    Full {
        status: u16,
        content_type: &'static str,
        index: Option<String>,
        body: Vec<u8>,
    },
    /// These bytes, then the connection is closed.
    Raw(Vec<u8>),
    /// 200, chunked, a JSON array that never ends: `chunk` bytes every `every` (until the client
    /// goes away, or 60 s).
    Endless { chunk: usize, every: Duration },
    /// Read the request and say nothing (for at most 60 s).
    Hang,
}

fn json_reply(body: &str, index: Option<&str>) -> Reply {
    Reply::Full {
        status: 200,
        content_type: "application/json",
        index: index.map(str::to_owned),
        body: body.as_bytes().to_vec(),
    }
}

/// A health entry for `service` on node `node` at `addr`, passing.
fn entry(service: &str, node: &str, addr: &str) -> Value {
    json!({
        "Node": {"Node": node, "Address": addr, "Datacenter": "dc1", "Meta": {}},
        "Service": {"ID": format!("{service}-1"), "Service": service, "Tags": [], "Address": "", "Port": 8080},
        "Checks": [{"CheckID": "serfHealth", "Status": "passing", "ServiceID": ""}]
    })
}

fn good(service: &str, addr: &str, index: u64) -> Reply {
    json_reply(
        &json!([entry(service, "n1", addr)]).to_string(),
        Some(&index.to_string()),
    )
}

/// Every kind of garbage, by name.
fn garbage(kind: &str) -> Reply {
    let entry_with = |field: &str, value: Value| {
        let mut e = entry(kind, "n1", "127.0.0.2");
        e["Service"][field] = value;
        json_reply(&json!([e]).to_string(), Some("7"))
    };
    match kind {
        "truncated-json" => json_reply(r#"[{"Node":{"Node":"n1","Address":"127.0.0.2"},"Serv"#, Some("7")),
        "truncated-body" => Reply::Raw(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: 7\r\nContent-Length: 500\r\n\r\n[{\"Node\":{\"Node\":\"n1\"".to_vec(),
        ),
        "object" => json_reply(r#"{"a":1}"#, Some("7")),
        "numbers" => json_reply("[1,2]", Some("7")),
        "port-string" => entry_with("Port", json!("eighty")),
        "port-negative" => entry_with("Port", json!(-1)),
        "port-huge" => entry_with("Port", json!(70000)),
        "tags-string" => entry_with("Tags", json!("primary")),
        "status-number" => {
            let mut e = entry(kind, "n1", "127.0.0.2");
            e["Checks"][0]["Status"] = json!(5);
            json_reply(&json!([e]).to_string(), Some("7"))
        }
        "html-200" => Reply::Full {
            status: 200,
            content_type: "text/html",
            index: None,
            body: b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>".to_vec(),
        },
        "status-500" => Reply::Full {
            status: 500,
            content_type: "text/plain",
            index: None,
            body: b"rpc error making call: EOF".to_vec(),
        },
        "status-503-html" => Reply::Full {
            status: 503,
            content_type: "text/html",
            index: None,
            body: b"<html><body>Service Unavailable</body></html>".to_vec(),
        },
        "status-429" => Reply::Full {
            status: 429,
            content_type: "text/plain",
            index: None,
            body: b"Your IP is issuing too many concurrent connections".to_vec(),
        },
        "empty-200" => json_reply("", Some("7")),
        "bad-utf8" => Reply::Full {
            status: 200,
            content_type: "application/json",
            index: Some("7".into()),
            body: vec![0xff, 0xfe, b'[', 0xc0, b']'],
        },
        "deep-nesting" => json_reply(&format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)), Some("7")),
        "bad-content-length" => Reply::Raw(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n[]".to_vec()),
        "not-http" => Reply::Raw(b"SSH-2.0-OpenSSH_9.2\r\n".to_vec()),
        "headers-never-end" => Reply::Raw({
            let mut h = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..20_000 {
                h.extend_from_slice(format!("X-Junk-{i}: {}\r\n", "j".repeat(40)).as_bytes());
            }
            h
        }),
        "hang" => Reply::Hang,
        "endless-slow" => Reply::Endless { chunk: 1024, every: Duration::from_millis(10) },
        "endless-fast" => Reply::Endless { chunk: 64 * 1024, every: Duration::ZERO },
        other => panic!("no garbage called {other}"),
    }
}

/// Kinds answered at once (the first query for such a service gets SERVFAIL without waiting).
const FAST_GARBAGE: &[&str] = &[
    "truncated-json",
    "truncated-body",
    "object",
    "numbers",
    "port-string",
    "port-negative",
    "port-huge",
    "tags-string",
    "status-number",
    "html-200",
    "status-500",
    "status-503-html",
    "status-429",
    "empty-200",
    "bad-utf8",
    "deep-nesting",
    "bad-content-length",
    "not-http",
    "headers-never-end",
];

/// Kinds that make the forwarder wait for its own timeout (2 s for a first fetch).
const SLOW_GARBAGE: &[&str] = &["hang", "endless-slow", "endless-fast"];

type Script = Arc<dyn Fn(&str, usize) -> Reply + Send + Sync>;

/// A hostile Consul agent: `script(path, n)` decides the reply to the n-th request (from 0) for
/// `path` (without the query string).
struct HostileConsul {
    addr: SocketAddr,
    requests: Arc<Mutex<HashMap<String, usize>>>,
    /// Bytes of never-ending bodies sent, and how many such streams the client cut off.
    streamed: Arc<AtomicUsize>,
    streams_cut: Arc<AtomicUsize>,
    script: Arc<Mutex<Script>>,
    task: tokio::task::JoinHandle<()>,
}

impl HostileConsul {
    async fn start(script: impl Fn(&str, usize) -> Reply + Send + Sync + 'static) -> HostileConsul {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(HashMap::new()));
        let streamed = Arc::new(AtomicUsize::new(0));
        let streams_cut = Arc::new(AtomicUsize::new(0));
        let script: Arc<Mutex<Script>> = Arc::new(Mutex::new(Arc::new(script)));
        let (r, s, c, sc) = (
            requests.clone(),
            streamed.clone(),
            streams_cut.clone(),
            script.clone(),
        );
        let task = tokio::spawn(async move {
            // Bounded: a test's server accepts at most this many connections.
            for _ in 0..10_000 {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve_connection(
                    stream,
                    r.clone(),
                    s.clone(),
                    c.clone(),
                    sc.clone(),
                ));
            }
        });
        HostileConsul {
            addr,
            requests,
            streamed,
            streams_cut,
            script,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set(&self, script: impl Fn(&str, usize) -> Reply + Send + Sync + 'static) {
        *self.script.lock().expect("lock") = Arc::new(script);
    }

    fn requests(&self, path: &str) -> usize {
        self.requests
            .lock()
            .expect("lock")
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    fn total_requests(&self) -> usize {
        self.requests.lock().expect("lock").values().sum()
    }
}

impl Drop for HostileConsul {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    requests: Arc<Mutex<HashMap<String, usize>>>,
    streamed: Arc<AtomicUsize>,
    streams_cut: Arc<AtomicUsize>,
    script: Arc<Mutex<Script>>,
) {
    let mut buf = Vec::new();
    // Keep-alive: at most 1000 requests on one connection.
    for _ in 0..1000 {
        // Read one request head (bounded: 64 KiB, 120 s).
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if buf.len() > 64 * 1024 {
                return;
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(Duration::from_secs(120), stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let target = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let path = target.split('?').next().unwrap_or("/").to_owned();
        let n = {
            let mut r = requests.lock().expect("lock");
            let c = r.entry(path.clone()).or_insert(0);
            *c += 1;
            *c - 1
        };
        let reply = {
            let s = script.lock().expect("lock").clone();
            s(&path, n)
        };
        match reply {
            Reply::Full {
                status,
                content_type,
                index,
                body,
            } => {
                let mut out = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
                    body.len()
                );
                if let Some(i) = index {
                    out.push_str(&format!("X-Consul-Index: {i}\r\n"));
                }
                out.push_str("\r\n");
                let mut bytes = out.into_bytes();
                bytes.extend_from_slice(&body);
                if stream.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Reply::Raw(bytes) => {
                let _ = stream.write_all(&bytes).await;
                return;
            }
            Reply::Hang => {
                let mut sink = [0u8; 1024];
                let _ = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut sink)).await;
                return;
            }
            Reply::Endless { chunk, every } => {
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: 7\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n[\r\n";
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let item = format!("{},", entry("endless", "n1", "127.0.0.2"));
                let mut data = String::new();
                while data.len() < chunk {
                    data.push_str(&item);
                }
                let framed = format!("{:x}\r\n{data}\r\n", data.len());
                let began = Instant::now();
                while began.elapsed() < Duration::from_secs(60) {
                    if stream.write_all(framed.as_bytes()).await.is_err() {
                        streams_cut.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    streamed.fetch_add(framed.len(), Ordering::SeqCst);
                    if !every.is_zero() {
                        tokio::time::sleep(every).await;
                    }
                }
                return;
            }
        }
    }
}

/// The forwarder asking `consul` (watch_wait 1 s, datacenter given so only health requests are
/// made unless `discover`), forwarding other names to `up`.
async fn forwarder(consul: &HostileConsul, up: &TestUpstream, discover: bool) -> TestServer {
    let dc = if discover {
        ""
    } else {
        "datacenter = \"dc1\"\n"
    };
    let config = TestConfig::new()
        .upstream(up.addr)
        .upstream_timeout("1s")
        .consul_http(consul.url())
        .consul("watch_wait = \"1s\"")
        .consul(dc);
    TestServer::start(&config.toml()).await
}

async fn rcode_of(fwd: &TestServer, name: &str) -> (ResponseCode, Vec<String>) {
    let r = ask(fwd.addr, name, RecordType::A).await;
    (r.metadata.response_code, addresses(&r))
}

/// The forwarder still answers forwarded names and good Consul names.
async fn still_serving(fwd: &TestServer) {
    assert_eq!(
        rcode_of(fwd, "a.test.").await,
        (ResponseCode::NoError, vec!["192.0.2.1".to_owned()])
    );
    let (rc, addrs) = rcode_of(fwd, "fine.service.consul.").await;
    assert_eq!(
        (rc, addrs),
        (ResponseCode::NoError, vec!["127.0.0.9".to_owned()]),
        "a good service next to the garbage"
    );
}

fn script_by_service(path: &str) -> Reply {
    match path.strip_prefix("/v1/health/service/") {
        Some("fine") => good("fine", "127.0.0.9", 3),
        Some(kind) => garbage(kind),
        None => garbage("status-500"),
    }
}

/// `KIND.service.consul.` for every kind, all at once: (kind, rcode, how long its answer took).
async fn ask_all_at_once<'a>(
    fwd: &TestServer,
    kinds: &[&'a str],
) -> Vec<(&'a str, ResponseCode, Duration)> {
    futures::future::join_all(kinds.iter().map(|&kind| async move {
        let began = Instant::now();
        let (rc, _) = rcode_of(fwd, &format!("{kind}.service.consul.")).await;
        (kind, rc, began.elapsed())
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_garbage_gets_servfail_for_never_seen_names() {
    let consul = HostileConsul::start(|path, _| script_by_service(path)).await;
    let up = TestUpstream::start().await;
    let fwd = forwarder(&consul, &up, false).await;
    still_serving(&fwd).await;
    for (kind, rc, took) in ask_all_at_once(&fwd, FAST_GARBAGE).await {
        assert_eq!(
            rc,
            ResponseCode::ServFail,
            "{kind}: never NXDOMAIN or made-up data"
        );
        assert!(
            took < Duration::from_millis(2500),
            "{kind}: answered after {took:?}"
        );
    }
    // Asked again while the watchers back off: still SERVFAIL, at once.
    for kind in FAST_GARBAGE {
        let began = Instant::now();
        assert_eq!(
            rcode_of(&fwd, &format!("{kind}.service.consul.")).await.0,
            ResponseCode::ServFail,
            "{kind}"
        );
        assert!(
            began.elapsed() < Duration::from_secs(2),
            "{kind}: {:?}",
            began.elapsed()
        );
    }
    still_serving(&fwd).await;
    // Backoff, not a busy loop: over ~3 s each failing watcher retried a few times at most.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for kind in FAST_GARBAGE {
        let n = consul.requests(&format!("/v1/health/service/{kind}"));
        assert!((1..=12).contains(&n), "{kind}: {n} requests");
    }
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_bodies_that_never_end_and_hung_requests_are_given_up() {
    let consul = HostileConsul::start(|path, _| script_by_service(path)).await;
    let up = TestUpstream::start().await;
    let fwd = forwarder(&consul, &up, false).await;
    for (kind, rc, took) in ask_all_at_once(&fwd, SLOW_GARBAGE).await {
        assert_eq!(rc, ResponseCode::ServFail, "{kind}");
        // The first query waits for the first fetch at most 2 s (FIRST_FETCH_WAIT).
        assert!(
            took < Duration::from_millis(4000),
            "{kind}: answered after {took:?}"
        );
    }
    still_serving(&fwd).await;
    // The forwarder hung up on both endless streams (the fast one at the 64 MiB cap or the 2 s
    // timeout, the slow one at the timeout), well before our 60 s.
    let cut = eventually(Duration::from_secs(5), async || {
        consul.streams_cut.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert!(
        cut.is_some(),
        "endless bodies are abandoned ({} cut)",
        consul.streams_cut.load(Ordering::SeqCst)
    );
    let streamed = consul.streamed.load(Ordering::SeqCst);
    eprintln!("never-ending bodies: {streamed} bytes sent before the forwarder gave up");
    fwd.stop().await;
}

/// Whether `name` comes to be answered with `addr` alone within 10 s.
async fn comes_to_answer(fwd: &TestServer, name: &str, addr: &str) -> bool {
    let want = (ResponseCode::NoError, vec![addr.to_owned()]);
    eventually(Duration::from_secs(10), async || {
        rcode_of(fwd, name).await == want
    })
    .await
    .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_garbage_after_good_data_keeps_the_last_view_and_recovers() {
    let consul = HostileConsul::start(|_, _| good("flappy", "127.0.0.5", 10)).await;
    let up = TestUpstream::start().await;
    let fwd = forwarder(&consul, &up, false).await;
    let good_answer = (ResponseCode::NoError, vec!["127.0.0.5".to_owned()]);
    assert_eq!(rcode_of(&fwd, "flappy.service.consul.").await, good_answer);
    // Now every request gets the next kind of garbage, including hung and endless ones.
    let kinds: Vec<&'static str> = FAST_GARBAGE.iter().chain(SLOW_GARBAGE).copied().collect();
    consul.set(move |_, n| garbage(kinds[n % kinds.len()]));
    let began = Instant::now();
    let mut asked = 0;
    while began.elapsed() < Duration::from_secs(4) {
        assert_eq!(
            rcode_of(&fwd, "flappy.service.consul.").await,
            good_answer,
            "the last good view is served"
        );
        assert_eq!(rcode_of(&fwd, "a.test.").await.0, ResponseCode::NoError);
        asked += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(asked >= 10);
    let during = consul.total_requests();
    // Good data again, with a new address: the view follows within the backoff (≤ 4.5 s).
    consul.set(|_, _| good("flappy", "127.0.0.6", 20));
    assert!(
        comes_to_answer(&fwd, "flappy.service.consul.", "127.0.0.6").await,
        "recovers once Consul answers properly ({during} requests during the garbage)"
    );
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_garbage_first_then_recovery() {
    let consul = HostileConsul::start(|path, n| {
        if path.starts_with("/v1/agent/self") {
            return garbage(["html-200", "object", "status-500"][n % 3]);
        }
        garbage(FAST_GARBAGE[n % FAST_GARBAGE.len()])
    })
    .await;
    let up = TestUpstream::start().await;
    // Datacenter discovery on: /v1/agent/self gets garbage too.
    let fwd = forwarder(&consul, &up, true).await;
    for _ in 0..3 {
        assert_eq!(
            rcode_of(&fwd, "late.service.consul.").await.0,
            ResponseCode::ServFail
        );
    }
    assert_eq!(rcode_of(&fwd, "a.test.").await.0, ResponseCode::NoError);
    consul.set(|path, _| {
        if path.starts_with("/v1/agent/self") {
            json_reply(r#"{"Config":{"Datacenter":"dc1"}}"#, None)
        } else {
            good("late", "127.0.0.7", 5)
        }
    });
    assert!(
        comes_to_answer(&fwd, "late.service.consul.", "127.0.0.7").await,
        "a valid answer after garbage is served"
    );
    let self_requests = consul.requests("/v1/agent/self");
    assert!(
        (1..=10).contains(&self_requests),
        "datacenter discovery backs off: {self_requests}"
    );
    fwd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_index_backwards_zero_or_garbage_does_not_busy_loop() {
    // The hostile agent answers every request at once, blocking or not, with a bad index.
    let counters: Arc<Mutex<HashMap<String, u64>>> = Arc::new(Mutex::new(HashMap::new()));
    let c = counters.clone();
    let consul = HostileConsul::start(move |path, n| {
        let service = path
            .strip_prefix("/v1/health/service/")
            .unwrap_or("x")
            .to_owned();
        let index = match service.as_str() {
            "backwards" => Some((1_000_000 - n as u64).to_string()),
            "zero" => Some("0".to_owned()),
            "missing" => None,
            "garbage-index" => Some("abc".to_owned()),
            "negative" => Some("-5".to_owned()),
            "huge" => Some("18446744073709551615".to_owned()),
            "alternating" => Some(if n % 2 == 0 { "100" } else { "50" }.to_owned()),
            _ => Some("1".to_owned()),
        };
        *c.lock().expect("lock").entry(service.clone()).or_default() += 1;
        let Reply::Full { body, .. } = good(&service, "127.0.0.8", 0) else {
            unreachable!()
        };
        Reply::Full {
            status: 200,
            content_type: "application/json",
            index,
            body,
        }
    })
    .await;
    let up = TestUpstream::start().await;
    let fwd = forwarder(&consul, &up, false).await;
    let services = [
        "backwards",
        "zero",
        "missing",
        "garbage-index",
        "negative",
        "huge",
        "alternating",
    ];
    for s in services {
        assert_eq!(
            rcode_of(&fwd, &format!("{s}.service.consul.")).await,
            (ResponseCode::NoError, vec!["127.0.0.8".to_owned()]),
            "{s}"
        );
    }
    let before: Vec<usize> = services
        .iter()
        .map(|s| consul.requests(&format!("/v1/health/service/{s}")))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (s, b) in services.iter().zip(before) {
        let n = consul.requests(&format!("/v1/health/service/{s}")) - b;
        // The watcher's token bucket: a burst of 2, then one request per 250 ms: ≤ 14 in 3 s.
        assert!(n <= 20, "{s}: {n} requests in 3 s");
        assert_eq!(
            rcode_of(&fwd, &format!("{s}.service.consul.")).await,
            (ResponseCode::NoError, vec!["127.0.0.8".to_owned()]),
            "{s} still answers"
        );
    }
    fwd.stop().await;
}
