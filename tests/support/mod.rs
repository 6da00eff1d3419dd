//! Shared test support: the forwarder run in-process on port 0, a test upstream, a Consul
//! simulator, and small DNS client helpers over real UDP and TCP sockets.
#![allow(dead_code)]

pub mod config;
pub mod consul_sim;
pub mod dnssec;
pub mod e2e;
pub mod hostile;
pub mod proc_status;
pub mod systemd;
pub mod upstream;

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

pub use config::TestConfig;
use consul_dns_forwarder::config::Config;
use consul_dns_forwarder::{run, server, Bound};
use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use upstream::TestUpstream;

/// How long a test waits for any single DNS reply before calling it lost.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A forwarder running inside the test process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub registry: prometheus::Registry,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Starts a forwarder from TOML text; `listen` is forced to 127.0.0.1:0.
    pub async fn start(toml: &str) -> TestServer {
        let config = Config::from_toml_str(toml, "test.toml").expect("test config is valid");
        TestServer::start_config(config).await
    }

    pub async fn start_config(mut config: Config) -> TestServer {
        config.server.listen = vec!["127.0.0.1:0".parse().expect("addr")];
        config.server.udp_sockets_per_address = 2;
        let dns = server::bind(&config.server.listen, 2).expect("bind port 0");
        let addr = dns.local_addrs()[0];
        let metrics = match config.metrics.listen {
            Some(_) => Some(
                tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind metrics"),
            ),
            None => None,
        };
        let metrics_addr = metrics.as_ref().map(|l| l.local_addr().expect("addr"));
        let registry = prometheus::Registry::new();
        let (tx, rx) = oneshot::channel::<()>();
        let reg = registry.clone();
        let task = tokio::spawn(async move {
            run(config, Bound { dns, metrics }, reg, async move {
                let _ = rx.await;
            })
            .await
            .expect("forwarder runs");
        });
        TestServer {
            addr,
            metrics_addr,
            registry,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// A forwarder answering Consul names from the agent at `consul_url` (with `consul_lines` in
    /// its `[consul]` section) and other names from a test upstream, which the caller keeps.
    pub async fn with_consul(consul_url: &str, consul_lines: &str) -> (TestServer, TestUpstream) {
        let up = TestUpstream::start().await;
        let toml = TestConfig::new()
            .upstream(up.addr)
            .consul_http(consul_url)
            .consul(consul_lines)
            .toml();
        (TestServer::start(&toml).await, up)
    }

    /// Asks the server to stop and waits until it has (bounded).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("server stops within 10 s")
                .expect("server task ok");
        }
    }

    /// The value of a counter or gauge with the given labels, summed over other labels (0 when
    /// absent), read from the text exposition Prometheus would scrape.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = consul_dns_forwarder::metrics::render(&self.registry);
        metric_in(&text, name, labels)
    }
}

/// Sums the samples of `name` whose labels include every given pair.
pub fn metric_in(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let ok = labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A query message with RD=1 and a random ID; the name is used exactly as written (case kept).
pub fn make_query(name: &str, qtype: RecordType, edns: Option<u16>) -> Message {
    let mut m = Message::query();
    m.metadata.id = rand::random();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.edns = Some(e);
    }
    m
}

/// Sends raw bytes over UDP and returns the raw reply, or `None` when none came in `wait`.
pub async fn raw_udp(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    socket.send_to(bytes, server).await.expect("send");
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(wait, socket.recv_from(&mut buf)).await {
        Ok(Ok((len, _))) => Some(buf[..len].to_vec()),
        _ => None,
    }
}

/// One length-prefixed message over a new TCP connection.
pub async fn raw_tcp(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect(server).await.expect("connect");
    let len = u16::try_from(bytes.len()).expect("fits");
    stream.write_all(&len.to_be_bytes()).await.expect("write");
    stream.write_all(bytes).await.expect("write");
    tcp_read(&mut stream).await
}

pub async fn tcp_read(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let read = async {
        let len = stream.read_u16().await.ok()?;
        let mut buf = vec![0u8; usize::from(len)];
        stream.read_exact(&mut buf).await.ok()?;
        Some(buf)
    };
    tokio::time::timeout(REPLY_TIMEOUT, read)
        .await
        .ok()
        .flatten()
}

/// Sends `msg` over UDP and parses the reply (panics when none comes).
pub async fn udp(server: SocketAddr, msg: &Message) -> Message {
    let bytes = msg.to_vec().expect("encode");
    let reply = raw_udp(server, &bytes, REPLY_TIMEOUT)
        .await
        .expect("a UDP reply");
    let parsed = Message::from_vec(&reply).expect("reply parses");
    assert_eq!(parsed.metadata.id, msg.metadata.id, "reply ID matches");
    parsed
}

/// `name` `qtype` over UDP with EDNS payload size `edns` (none: no OPT); the reply, which must
/// come and be at most `limit` bytes.
pub async fn udp_within(
    server: SocketAddr,
    name: &str,
    qtype: RecordType,
    edns: Option<u16>,
    limit: usize,
) -> Message {
    let q = make_query(name, qtype, edns);
    let reply = raw_udp(server, &q.to_vec().expect("encode"), REPLY_TIMEOUT)
        .await
        .expect("a UDP reply");
    assert!(reply.len() <= limit, "{} > {limit}", reply.len());
    Message::from_vec(&reply).expect("reply parses")
}

/// Sends `msg` over TCP and parses the reply.
pub async fn tcp(server: SocketAddr, msg: &Message) -> Message {
    let bytes = msg.to_vec().expect("encode");
    let reply = raw_tcp(server, &bytes).await.expect("a TCP reply");
    Message::from_vec(&reply).expect("reply parses")
}

/// A/AAAA query over UDP without EDNS, as nginx and glibc send them.
pub async fn ask(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    udp(server, &make_query(name, qtype, None)).await
}

/// The addresses (A and AAAA data) in a reply's answer section, as strings, in order.
pub fn addresses(m: &Message) -> Vec<String> {
    use hickory_proto::rr::RData;
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

pub fn name(s: &str) -> Name {
    Name::from_str(s).expect("name")
}

/// Polls `check` every 20 ms until it returns true or `limit` passes; returns how long it took.
pub async fn eventually(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A plain HTTP/1.0 GET over a new connection: (status code, body). Enough for our endpoints and
/// Prometheus' API, without pulling a TLS stack into the tests.
pub async fn http_get(addr: SocketAddr, path_and_query: &str) -> (u16, String) {
    let request = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(format!("GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    };
    tokio::time::timeout(REPLY_TIMEOUT, request)
        .await
        .ok()
        .flatten()
        .unwrap_or((0, String::new()))
}

/// Whether the tests run as root (effective uid 0, from /proc).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_consul-dns-forwarder");

/// A free port for both UDP and TCP on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    for _ in 0..50 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = udp.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port");
}

/// A child process killed when dropped, so a failing test leaves nothing running.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary with `args`, stdout and stderr piped.
pub fn spawn(args: &[&str]) -> Running {
    Running(
        std::process::Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the binary"),
    )
}

impl Running {
    /// SIGTERM, wait for the exit, and return everything the process wrote to stderr.
    pub fn terminate_and_read_stderr(&mut self) -> String {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -TERM failed");
        let _ = self.0.wait();
        let mut stderr = String::new();
        if let Some(mut pipe) = self.0.stderr.take() {
            use std::io::Read;
            let _ = pipe.read_to_string(&mut stderr);
        }
        stderr
    }
}

/// Starts the binary with `args` and `--listen` on a free port of 127.0.0.1, and waits until it
/// answers there.
pub async fn spawn_answering(args: &[&str]) -> (Running, SocketAddr) {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut all = args.to_vec();
    all.extend(["--listen", &listen]);
    let server = spawn(&all);
    let addr: SocketAddr = listen.parse().expect("addr");
    wait_until_answering(addr).await;
    (server, addr)
}

/// [`spawn_answering`] forwarding to `upstream`, Consul names from the agent at `consul_http`,
/// /metrics on `metrics_listen`.
pub async fn spawn_forwarder(
    upstream: SocketAddr,
    consul_http: &str,
    metrics_listen: &str,
) -> (Running, SocketAddr) {
    spawn_answering(&[
        "--upstream",
        &upstream.to_string(),
        "--consul-http",
        consul_http,
        "--metrics-listen",
        metrics_listen,
    ])
    .await
}

/// Asks each of `names` (A, over UDP) and checks that the answer's rcode is `rcode`.
pub async fn assert_rcode(server: SocketAddr, names: &[&str], rcode: ResponseCode) {
    for name in names {
        let r = ask(server, name, RecordType::A).await;
        assert_eq!(r.metadata.response_code, rcode, "{name}");
    }
}

/// Runs `cmd` to the end and returns its output; panics, showing the command and what it wrote,
/// unless it exits 0.
pub fn run_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cmd` to the end, checks that it exited with `code`, and returns what it wrote to stderr.
pub fn exits_with(cmd: &mut std::process::Command, code: i32) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{cmd:?}: {err}");
    err
}

/// The binary's `check-config --config path`, to run (and add to).
pub fn check_config(path: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["check-config", "--config"]).arg(path);
    cmd
}

/// Waits (at most 10 s) until a DNS server at `addr` answers over UDP.
pub async fn wait_until_answering(addr: SocketAddr) {
    let query = make_query("a.test.", RecordType::A, None)
        .to_vec()
        .expect("encode");
    eventually(Duration::from_secs(10), async || {
        raw_udp(addr, &query, Duration::from_millis(200))
            .await
            .is_some()
    })
    .await
    .expect("the server answers within 10 s");
}

/// Resident memory of process `pid` in KiB, from /proc (0 when it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    proc_status::vm_rss_kib(&pid.to_string())
}
