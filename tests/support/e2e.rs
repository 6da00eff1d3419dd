//! Helpers shared by the end-to-end tests (`e2e_*.rs`): the real binary as a child process,
//! small HTTP backends that answer with their own address, a minimal HTTP client, and an nginx
//! child process. Everything listens on loopback only.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub use super::{free_port, Running as KillOnDrop, BIN};

/// `dig @127.0.0.1 -p port +time=2 +tries=1 args...` (BIND's client, from bind9-dnsutils, which
/// scripts/test.sh installs).
pub fn dig_command(port: u16, args: &[&str]) -> Command {
    let mut cmd = Command::new("dig");
    cmd.arg("@127.0.0.1")
        .arg("-p")
        .arg(port.to_string())
        .args(["+time=2", "+tries=1"])
        .args(args);
    cmd
}

/// Runs the shell `script` in a network namespace of its own (`unshare --net`: only `lo`,
/// down until the script brings it up; needs root) and returns what it printed. Panics with
/// its stderr when it fails.
pub fn in_new_network_namespace(script: &str) -> String {
    let out = Command::new("unshare")
        .args(["--net", "sh", "-c", script])
        .output()
        .expect("unshare runs (util-linux; the test needs root)");
    assert!(
        out.status.success(),
        "the namespace script failed (needs root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts `cmd` (the forwarder, or a command that runs it) with only its warnings and errors
/// logged, to the test's stderr.
pub fn start_quietly(cmd: &mut Command) -> Child {
    cmd.env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"))
}

/// The forwarder binary listening on 127.0.0.1:`port` (UDP and TCP).
pub struct Forwarder {
    pub port: u16,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    child: KillOnDrop,
}

impl Forwarder {
    /// Runs `consul-dns-forwarder --listen 127.0.0.1:<free> --metrics-listen 127.0.0.1:<free>`
    /// plus `args`, and waits (bounded) until it answers DNS.
    pub async fn spawn(args: &[&str]) -> Forwarder {
        let port = free_port();
        let metrics_port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let metrics: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().expect("addr");
        let child = start_quietly(
            Command::new(BIN)
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--metrics-listen")
                .arg(metrics.to_string())
                .args(args),
        );
        let mut fwd = Forwarder {
            port,
            addr,
            metrics,
            child: KillOnDrop(child),
        };
        fwd.wait_ready().await;
        fwd
    }

    async fn wait_ready(&mut self) {
        let start = Instant::now();
        // Any reply at all means the sockets are up; the name does not matter.
        let query =
            crate::support::make_query("ready.invalid.", hickory_proto::rr::RecordType::A, None)
                .to_vec()
                .expect("encode");
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(status)) = self.child.0.try_wait() {
                panic!("the forwarder exited early: {status}");
            }
            if crate::support::raw_udp(self.addr, &query, Duration::from_millis(200))
                .await
                .is_some()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the forwarder did not answer on {} within 10 s", self.addr);
    }

    /// A counter from `/metrics`, summed over the samples matching `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let reply = http_get(self.metrics, "/metrics", Duration::from_secs(5))
            .await
            .expect("/metrics answers");
        crate::support::metric_in(&reply.body, name, labels)
    }
}

/// One HTTP response, as far as the tests care.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub body: String,
}

/// `GET path` over HTTP/1.0 (the server closes the connection after the reply), within `limit`.
pub async fn http_get(addr: SocketAddr, path: &str, limit: Duration) -> Result<HttpReply, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: e2e.test\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no end of headers in {text:?}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| format!("no status in {head:?}"))?;
        Ok(HttpReply {
            status,
            body: body.to_string(),
        })
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| format!("GET {path} on {addr}: no reply within {limit:?}"))?
}

/// Hits and the time of the last hit of one backend.
#[derive(Default, Clone, Copy, Debug)]
pub struct Hits {
    pub count: usize,
    pub last: Option<Instant>,
}

/// Tiny HTTP servers on several loopback addresses, all on the same port, each answering
/// `200` with its own address as the body and counting its requests.
pub struct Backends {
    pub port: u16,
    pub ips: Vec<IpAddr>,
    hits: Arc<Mutex<BTreeMap<IpAddr, Hits>>>,
    cancel: CancellationToken,
}

impl Backends {
    pub async fn start(ips: &[&str]) -> Backends {
        let ips: Vec<IpAddr> = ips.iter().map(|s| s.parse().expect("ip")).collect();
        for ip in &ips {
            assert!(ip.is_loopback(), "backends are loopback only: {ip}");
        }
        let listeners = Self::bind_same_port(&ips).await;
        let port = listeners[0].local_addr().expect("addr").port();
        let hits = Arc::new(Mutex::new(
            ips.iter()
                .map(|ip| (*ip, Hits::default()))
                .collect::<BTreeMap<_, _>>(),
        ));
        let cancel = CancellationToken::new();
        for listener in listeners {
            tokio::spawn(serve(listener, hits.clone(), cancel.clone()));
        }
        Backends {
            port,
            ips,
            hits,
            cancel,
        }
    }

    /// The first address picks a free port; the others must get the same one (bounded retries).
    async fn bind_same_port(ips: &[IpAddr]) -> Vec<TcpListener> {
        'attempt: for _ in 0..20 {
            let first = TcpListener::bind((ips[0], 0)).await.expect("bind backend");
            let port = first.local_addr().expect("addr").port();
            let mut all = vec![first];
            for ip in &ips[1..] {
                match TcpListener::bind((*ip, port)).await {
                    Ok(l) => all.push(l),
                    Err(_) => continue 'attempt,
                }
            }
            return all;
        }
        panic!("no port free on every backend address");
    }

    pub fn hits(&self) -> BTreeMap<IpAddr, Hits> {
        self.hits.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn count(&self, ip: &str) -> usize {
        let ip: IpAddr = ip.parse().expect("ip");
        self.hits().get(&ip).map_or(0, |h| h.count)
    }

    pub fn reset(&self) {
        for h in self
            .hits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values_mut()
        {
            *h = Hits::default();
        }
    }

    /// `127.0.0.2: 21, 127.0.0.3: 19, ...` for the test output.
    pub fn distribution(&self) -> String {
        self.hits()
            .iter()
            .map(|(ip, h)| format!("{ip}: {}", h.count))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn serve(
    listener: TcpListener,
    hits: Arc<Mutex<BTreeMap<IpAddr, Hits>>>,
    cancel: CancellationToken,
) {
    let me = listener.local_addr().expect("addr").ip();
    loop {
        let (mut stream, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let hits = hits.clone();
        tokio::spawn(async move {
            // Read the request head (bounded in size and time), then answer and close.
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if read != Ok(true) {
                return;
            }
            {
                let mut hits = hits.lock().unwrap_or_else(|e| e.into_inner());
                let h = hits.entry(me).or_default();
                h.count += 1;
                h.last = Some(Instant::now());
            }
            let body = me.to_string();
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Where the shipped examples live.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// Replaces `from` by `to` in `text`, insisting that `from` occurs exactly once, so that a test
/// templating a shipped example notices when the example changes under it.
pub fn replace_once(text: &str, from: &str, to: &str) -> String {
    let n = text.matches(from).count();
    assert_eq!(
        n, 1,
        "expected {from:?} exactly once in the example, found {n}"
    );
    text.replacen(from, to, 1)
}

/// A program from /usr/sbin (nginx, ip), found even when /usr/sbin is not on PATH.
pub fn sbin(name: &str) -> String {
    let full = format!("/usr/sbin/{name}");
    if Path::new(&full).exists() {
        full
    } else {
        name.to_string()
    }
}

/// The installed nginx's version, e.g. `(1, 22, 1)`, or `None` when nginx is missing.
pub fn nginx_version() -> Option<(u32, u32, u32)> {
    let out = Command::new(sbin("nginx")).arg("-v").output().ok()?;
    // "nginx version: nginx/1.22.1" (on stderr), possibly with a suffix such as " (Ubuntu)".
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    let v = text.split("nginx/").nth(1)?.split_whitespace().next()?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??, parts.next()??))
}

/// nginx run in the foreground from a private directory: `nginx -p DIR -c DIR/nginx.conf -e
/// DIR/error.log -g 'daemon off;'`, with pid, logs and temp paths inside DIR, one worker.
/// It runs in its own process group; dropping it stops that group (master and worker).
pub struct Nginx {
    pub port: u16,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Nginx {
    /// Starts nginx with `site` (server and upstream blocks, the http context) included from
    /// the main configuration, listening where `site` says, which must be 127.0.0.1:`port`.
    pub async fn start(site: &str, port: u16) -> Nginx {
        assert!(
            nginx_version().is_some(),
            "nginx is not installed: scripts/test.sh installs Debian's nginx (run it as root)"
        );
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path().display().to_string();
        std::fs::write(dir.path().join("site.conf"), site).expect("write site.conf");
        let main = format!(
            "user root;\n\
             worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
             \x20   access_log {d}/access.log;\n\
             \x20   client_body_temp_path {d}/client_body;\n\
             \x20   proxy_temp_path {d}/proxy;\n\
             \x20   fastcgi_temp_path {d}/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/uwsgi;\n\
             \x20   scgi_temp_path {d}/scgi;\n\
             \x20   include {d}/site.conf;\n\
             }}\n"
        );
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, main).expect("write nginx.conf");
        // nginx with its prefix, configuration and error log in `dir`.
        let nginx = || {
            let mut cmd = Command::new(sbin("nginx"));
            cmd.arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg(dir.path().join("error.log"));
            cmd
        };
        let check = nginx().arg("-t").output().expect("nginx -t");
        assert!(
            check.status.success(),
            "nginx -t rejects the configuration:\n{}\n--- site.conf ---\n{site}",
            String::from_utf8_lossy(&check.stderr)
        );
        use std::os::unix::process::CommandExt;
        let child = nginx()
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .expect("start nginx");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let mut nginx = Nginx {
            port,
            addr,
            dir,
            child: Some(child),
        };
        nginx.wait_listening().await;
        nginx
    }

    async fn wait_listening(&mut self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("nginx exited early ({status}):\n{}", self.error_log());
            }
            if TcpStream::connect(self.addr).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "nginx did not listen on {} within 10 s:\n{}",
            self.addr,
            self.error_log()
        );
    }

    /// `GET /` through nginx (30 s limit: more than nginx's own resolver timeout).
    pub async fn get(&self, path: &str) -> HttpReply {
        match http_get(self.addr, path, Duration::from_secs(30)).await {
            Ok(r) => r,
            Err(e) => panic!("request through nginx failed: {e}\n{}", self.error_log()),
        }
    }

    /// The last 40 lines of nginx's error log, for failure messages.
    pub fn error_log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!(
            "--- nginx error.log (tail) ---\n{}",
            lines[from..].join("\n")
        )
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGTERM to the group: the master and its worker exit at once ("fast shutdown").
        let group = format!("-{}", child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = child.wait();
    }
}

/// The answer-size policies the spread measurements compare (`[consul]` lines).
pub const ANSWER_SIZE_POLICIES: [(&str, &str); 4] = [
    ("default: as many as fit, TC", ""),
    (
        "udp_answer_limit = 3, no TC (Consul's)",
        "udp_answer_limit = 3\nenable_truncate = false",
    ),
    ("udp_answer_limit = 3 with TC", "udp_answer_limit = 3"),
    ("a_record_limit = 1", "a_record_limit = 1"),
];

/// How a client spread its picks over a set of backends: counts per backend, and figures of
/// evenness, for the answer-size measurements (ARCHITECTURE.md).
pub struct Spread {
    /// Picks per backend, every backend listed (0 when never picked), in the given order.
    pub counts: Vec<(String, usize)>,
}

impl Spread {
    pub fn new(backends: &[String], picks: &[String]) -> Spread {
        Spread {
            counts: backends
                .iter()
                .map(|b| (b.clone(), picks.iter().filter(|p| *p == b).count()))
                .collect(),
        }
    }

    fn total(&self) -> usize {
        self.counts.iter().map(|(_, c)| c).sum()
    }

    /// Backends picked at least once.
    pub fn used(&self) -> usize {
        self.counts.iter().filter(|(_, c)| *c > 0).count()
    }

    /// The busiest backend's share of the picks, in percent.
    pub fn max_share(&self) -> f64 {
        let max = self.counts.iter().map(|(_, c)| *c).max().unwrap_or(0);
        100.0 * max as f64 / self.total().max(1) as f64
    }

    /// Standard deviation of the counts over their mean (0 = perfectly even).
    pub fn cv(&self) -> f64 {
        let n = self.counts.len().max(1) as f64;
        let mean = self.total() as f64 / n;
        let var = self
            .counts
            .iter()
            .map(|(_, c)| (*c as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        if mean == 0.0 {
            0.0
        } else {
            var.sqrt() / mean
        }
    }

    /// One line: used backends, busiest share, CV, then the counts in backend order.
    pub fn summary(&self) -> String {
        let counts: Vec<String> = self.counts.iter().map(|(_, c)| c.to_string()).collect();
        format!(
            "{:2}/{} used, busiest {:5.1}%, cv {:.2}  [{}]",
            self.used(),
            self.counts.len(),
            self.max_share(),
            self.cv(),
            counts.join(" ")
        )
    }
}
