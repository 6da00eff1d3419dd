//! The real binary under systemd's protocols, with systemd's part played by the test: a
//! `NOTIFY_SOCKET` datagram socket the test owns (READY=1, STATUS=, WATCHDOG=1, STOPPING=1), and
//! sockets the test binds and passes as fds 3 and 4 (`LISTEN_FDS`), held across a restart
//! under load as systemd holds them for a `.socket` unit.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::consul_sim::ConsulSim;
use crate::support::upstream::TestUpstream;
use crate::support::{free_port, is_root, make_query, raw_udp, Running, BIN};
use hickory_proto::rr::RecordType;
use tokio::net::UnixDatagram;

/// How long any awaited notification may take.
const NOTIFY_WAIT: Duration = Duration::from_secs(10);

/// The watchdog interval the tests set: WATCHDOG=1 is due every 150 ms.
const WATCHDOG_USEC: u64 = 300_000;

/// systemd's side of the notify protocol: a datagram socket in a temporary directory.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: PathBuf,
    socket: UnixDatagram,
    started: Instant,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        // Writable by a service running as another user, as systemd's is.
        use std::os::unix::fs::PermissionsExt;
        for (p, mode) in [(dir.path(), 0o711), (path.as_path(), 0o666)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        NotifySocket {
            _dir: dir,
            path,
            socket,
            started: Instant::now(),
        }
    }

    /// The next datagram's lines, or `None` after `limit`.
    async fn next(&self, limit: Duration) -> Option<Vec<String>> {
        let mut buf = vec![0u8; 4096];
        let len = tokio::time::timeout(limit, self.socket.recv(&mut buf))
            .await
            .ok()?
            .expect("recv");
        let text = String::from_utf8_lossy(&buf[..len]).into_owned();
        println!(
            "{:>6} ms  notify: {}",
            self.started.elapsed().as_millis(),
            text.trim_end().replace('\n', " | ")
        );
        Some(text.lines().map(str::to_owned).collect())
    }

    /// Reads datagrams until one has a line starting with `prefix`; returns that datagram, or
    /// `None` after [`NOTIFY_WAIT`].
    async fn find(&self, prefix: &str) -> Option<Vec<String>> {
        let deadline = Instant::now() + NOTIFY_WAIT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let lines = self.next(left).await?;
            if lines.iter().any(|l| l.starts_with(prefix)) {
                return Some(lines);
            }
        }
        None
    }

    async fn until(&self, prefix: &str) -> Vec<String> {
        self.find(prefix)
            .await
            .unwrap_or_else(|| panic!("no {prefix} within {NOTIFY_WAIT:?}"))
    }

    async fn wait_for(&self, prefix: &str) -> bool {
        self.find(prefix).await.is_some()
    }
}

/// What systemd passes a service: the notify socket, the watchdog, and `fds` as 3, 4, ...
struct Passing<'a> {
    notify: Option<&'a Path>,
    watchdog_usec: Option<u64>,
    fds: Vec<RawFd>,
    names: &'a str,
    /// Run as this uid/gid (root only), the binary copied to `program` (a path every user
    /// can reach): shows the passed sockets need no privilege.
    user: Option<(u32, u32, &'a Path)>,
}

/// The binary with `args`, started as systemd starts a service. `LISTEN_PID` and `WATCHDOG_PID`
/// must be the service's own pid: a shell sets them to its own and then execs the binary.
fn start(args: &[&str], passing: &Passing) -> Running {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"export LISTEN_PID=$$ WATCHDOG_PID=$$; exec "$0" "$@""#)
        .arg(passing.user.map_or(Path::new(BIN), |u| u.2))
        .args(args)
        // Not the default 127.0.0.1:9153: tests run side by side.
        .args(["--metrics-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(path) = passing.notify {
        cmd.env("NOTIFY_SOCKET", path);
    }
    if let Some(usec) = passing.watchdog_usec {
        cmd.env("WATCHDOG_USEC", usec.to_string());
    }
    if !passing.fds.is_empty() {
        cmd.env("LISTEN_FDS", passing.fds.len().to_string())
            .env("LISTEN_FDNAMES", passing.names);
    }
    let fds = passing.fds.clone();
    assert!(fds.len() <= 4, "at most 4 passed sockets");
    let user = passing.user.map(|(uid, gid, _)| (uid, gid));
    // SAFETY: between fork and exec the closure only makes async-signal-safe calls (fcntl,
    // dup2, close, setgroups, setgid, setuid) on a fixed-size stack array: no allocation, no
    // lock. Every fd it reads was opened by this test and is still open (the caller holds it).
    unsafe {
        cmd.pre_exec(move || {
            // First above every target, so that a source already numbered 3 or 4 is not
            // overwritten by the dup2 of another.
            let mut high = [-1; 4];
            for (i, &fd) in fds.iter().enumerate() {
                high[i] = libc::fcntl(fd, libc::F_DUPFD, 100);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &fd) in high.iter().take(fds.len()).enumerate() {
                // dup2 clears close-on-exec on the copy: it survives exec.
                if libc::dup2(fd, 3 + i as libc::c_int) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
            }
            if let Some((uid, gid)) = user {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Running(cmd.spawn().expect("start the binary"))
}

fn sigterm(child: &Running) {
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Waits (bounded) for the exit; returns the status and stderr.
fn wait_exit(mut child: Running) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + NOTIFY_WAIT;
    loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(mut pipe) = child.0.stderr.take() {
                use std::io::Read;
                let _ = pipe.read_to_string(&mut err);
            }
            return (status, err);
        }
        assert!(Instant::now() < deadline, "no exit within {NOTIFY_WAIT:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One query for `a.test` (answered by the test upstream), with `id`.
fn query(id: u16) -> Vec<u8> {
    let mut q = make_query("a.test.", RecordType::A, None)
        .to_vec()
        .expect("encode");
    q[..2].copy_from_slice(&id.to_be_bytes());
    q
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_status_watchdog_and_stopping() {
    let sim = ConsulSim::start().await;
    sim.add_simple("web", "node-1", "10.0.0.1", 80);
    let url = sim.http_url();
    // Consul down at start: STATUS says so, and changes when it comes back.
    sim.stop().await;
    let up = TestUpstream::start().await;
    let notify = NotifySocket::new();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let addr: SocketAddr = listen.parse().expect("addr");
    let server = start(
        &[
            "--listen",
            &listen,
            "--upstream",
            &up.addr.to_string(),
            "--consul-http",
            &url,
        ],
        &Passing {
            notify: Some(&notify.path),
            watchdog_usec: Some(WATCHDOG_USEC),
            fds: Vec::new(),
            names: "",
            user: None,
        },
    );

    let ready = notify.until("READY=1").await;
    // READY=1 means answering: one query, no retry, right away.
    let reply = raw_udp(addr, &query(7), Duration::from_secs(1)).await;
    assert!(
        reply.is_some(),
        "READY=1 sent but the DNS port does not answer"
    );
    let status = ready
        .iter()
        .find(|l| l.starts_with("STATUS="))
        .expect("STATUS= with READY=1");
    assert!(status.contains("Consul: not ready"), "{status}");

    sim.restart().await;
    let changed = notify.until("STATUS=serving DNS; Consul: ready").await;
    assert_eq!(changed.len(), 1, "a status change alone: {changed:?}");

    // WATCHDOG=1 at half of WATCHDOG_USEC: at least 4 in a second.
    let since = Instant::now();
    let mut pings = 0;
    while since.elapsed() < Duration::from_secs(1) {
        if let Some(lines) = notify.next(Duration::from_millis(400)).await {
            pings += lines.iter().filter(|l| *l == "WATCHDOG=1").count();
        }
    }
    assert!(pings >= 4, "{pings} WATCHDOG=1 in a second");

    sigterm(&server);
    let stopping = notify.until("STOPPING=1").await;
    assert!(stopping.iter().any(|l| l.starts_with("STATUS=stopping")));
    let (status, _) = wait_exit(server);
    assert!(status.success(), "{status:?}");
}

/// A UDP socket and a listening TCP socket on one address, as a `.socket` unit binds them.
fn bind_pair(addr: SocketAddr) -> (std::net::UdpSocket, std::net::TcpListener) {
    // With port 0 the UDP port the kernel picks may be taken for TCP by another test: pick again.
    let attempts = if addr.port() == 0 { 20 } else { 1 };
    let mut last_error = None;
    for _ in 0..attempts {
        let udp = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .expect("udp");
        // As ReceiveBuffer= in the shipped socket unit (capped by net.core.rmem_max).
        let _ = udp.set_recv_buffer_size(4 << 20);
        udp.bind(&addr.into()).expect("bind udp");
        let port = udp.local_addr().expect("addr").as_socket().expect("inet");
        match std::net::TcpListener::bind(port) {
            Ok(tcp) => return (udp.into(), tcp),
            Err(e) => last_error = Some(e),
        }
    }
    panic!("bind tcp beside udp: {last_error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passed_sockets_serve_port_53_unprivileged_and_mismatches_are_refused() {
    let up = TestUpstream::start().await;
    let root = is_root();
    // Port 53 where the test may bind it (root); the child never can, as nobody.
    let addr: SocketAddr = if root {
        "127.0.0.53:53".parse().expect("addr")
    } else {
        format!("127.0.0.1:{}", free_port()).parse().expect("addr")
    };
    let (udp, tcp) = match std::net::UdpSocket::bind(addr) {
        Ok(probe) => {
            drop(probe);
            bind_pair(addr)
        }
        // 127.0.0.53:53 is systemd-resolved's on some machines.
        Err(_) => bind_pair(format!("127.0.0.1:{}", free_port()).parse().expect("addr")),
    };
    let addr = udp.local_addr().expect("addr");
    let listen = addr.to_string();
    let notify = NotifySocket::new();
    // The build directory may be closed to other users: nobody runs a copy.
    let copy = tempfile::tempdir().expect("tmp");
    let program = copy.path().join("consul-dns-forwarder");
    if root {
        use std::os::unix::fs::PermissionsExt;
        std::fs::copy(BIN, &program).expect("copy the binary");
        std::fs::set_permissions(copy.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let passing = Passing {
        notify: Some(&notify.path),
        watchdog_usec: None,
        fds: vec![udp.as_raw_fd(), tcp.as_raw_fd()],
        names: "dns:dns",
        // 65534: nobody/nogroup, no capability to bind anything below 1024.
        user: root.then_some((65534, 65534, program.as_path())),
    };
    let mut server = start(
        &["--listen", &listen, "--upstream", &up.addr.to_string()],
        &passing,
    );
    if !notify.wait_for("READY=1").await {
        panic!("no READY=1: {}", server.terminate_and_read_stderr());
    }
    let udp_reply = raw_udp(addr, &query(1), Duration::from_secs(1)).await;
    let tcp_reply = crate::support::raw_tcp(addr, &query(2)).await;
    println!(
        "passed sockets on {addr}, process running as {}: UDP answered {}, TCP answered {}",
        if root {
            "nobody (uid 65534)"
        } else {
            "the test's user"
        },
        udp_reply.is_some(),
        tcp_reply.is_some()
    );
    assert!(udp_reply.is_some() && tcp_reply.is_some());
    sigterm(&server);
    let (status, _) = wait_exit(server);
    assert!(status.success());

    // A config that names another address than the sockets passed: refused, both named.
    let other = format!("127.0.0.1:{}", free_port());
    let server = start(
        &["--listen", &other, "--upstream", &up.addr.to_string()],
        &passing,
    );
    let (status, err) = wait_exit(server);
    println!("mismatch: {err}");
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("fd 3 (\"dns\") is UDP on {addr}")) && err.contains("server.listen"),
        "{err}"
    );
    // Only the UDP socket passed: the TCP one is missing, and the fix is said.
    let server = start(
        &["--listen", &listen, "--upstream", &up.addr.to_string()],
        &Passing {
            fds: vec![udp.as_raw_fd()],
            ..passing
        },
    );
    let (status, err) = wait_exit(server);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("ListenStream={addr}")), "{err}");
}

/// Counts of one client's queries.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    answered: AtomicU64,
}

impl Tally {
    fn figures(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::SeqCst),
            self.answered.load(Ordering::SeqCst),
        )
    }
}

/// Sends a UDP query every `every` until `stop`, one socket, each with its own ID; counts the
/// replies that come back (each query sent once: no retry).
async fn udp_load(addr: SocketAddr, every: Duration, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let socket = Arc::new(
        tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind"),
    );
    socket.connect(addr).await.expect("connect");
    let receiver = {
        let (socket, tally) = (socket.clone(), tally.clone());
        tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            let mut buf = vec![0u8; 4096];
            while let Ok(Ok(len)) =
                tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf)).await
            {
                if len >= 2 && seen.insert(u16::from_be_bytes([buf[0], buf[1]])) {
                    tally.answered.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    let mut tick = tokio::time::interval(every);
    let mut id: u16 = 0;
    while !stop.load(Ordering::SeqCst) && id < u16::MAX {
        tick.tick().await;
        id += 1;
        socket.send(&query(id)).await.expect("send");
        tally.sent.fetch_add(1, Ordering::SeqCst);
    }
    // The receiver ends 5 s after the last reply: every reply still on its way has come.
    let _ = receiver.await;
}

/// A TCP query on a new connection every `every` until `stop`; counts the answered ones.
async fn tcp_load(addr: SocketAddr, every: Duration, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut id: u16 = 0;
    while !stop.load(Ordering::SeqCst) && id < u16::MAX {
        tokio::time::sleep(every).await;
        id += 1;
        tally.sent.fetch_add(1, Ordering::SeqCst);
        if crate::support::raw_tcp(addr, &query(id)).await.is_some() {
            tally.answered.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_under_load_with_passed_sockets_loses_no_query() {
    let up = TestUpstream::start().await;
    let (udp, tcp) = bind_pair("127.0.0.1:0".parse().expect("addr"));
    let addr = udp.local_addr().expect("addr");
    let listen = addr.to_string();
    let upstream = up.addr.to_string();
    let args = ["--listen", listen.as_str(), "--upstream", upstream.as_str()];
    let notify = NotifySocket::new();
    let passing = || Passing {
        notify: Some(&notify.path),
        watchdog_usec: None,
        fds: vec![udp.as_raw_fd(), tcp.as_raw_fd()],
        names: "dns:dns",
        user: None,
    };
    let mut server = start(&args, &passing());
    notify.until("READY=1").await;

    let stop = Arc::new(AtomicBool::new(false));
    let (udp_tally, tcp_tally) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let udp_client = tokio::spawn(udp_load(
        addr,
        Duration::from_millis(2),
        stop.clone(),
        udp_tally.clone(),
    ));
    let tcp_client = tokio::spawn(tcp_load(
        addr,
        Duration::from_millis(5),
        stop.clone(),
        tcp_tally.clone(),
    ));
    let mut gaps = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // As `systemctl restart`: SIGTERM, wait for the exit, start again with the same sockets.
        let term = Instant::now();
        sigterm(&server);
        let (status, err) = tokio::task::spawn_blocking(move || wait_exit(server))
            .await
            .expect("wait");
        assert!(status.success(), "{status:?}: {err}");
        let exited = term.elapsed();
        server = start(&args, &passing());
        notify.until("READY=1").await;
        gaps.push((exited, term.elapsed()));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    udp_client.await.expect("udp client");
    tcp_client.await.expect("tcp client");
    sigterm(&server);

    let (udp_sent, udp_answered) = udp_tally.figures();
    let (tcp_sent, tcp_answered) = tcp_tally.figures();
    for (i, (exited, ready)) in gaps.iter().enumerate() {
        println!(
            "restart {}: SIGTERM to exit {} ms, SIGTERM to the new process's READY=1 {} ms (no process reading the sockets for that long)",
            i + 1,
            exited.as_millis(),
            ready.as_millis()
        );
    }
    println!(
        "UDP: queries sent {udp_sent}, answered {udp_answered}, lost {} (each sent once, no retry)",
        udp_sent - udp_answered
    );
    println!(
        "TCP: queries sent {tcp_sent}, answered {tcp_answered}, lost {} (a new connection each)",
        tcp_sent - tcp_answered
    );
    // Enough load to cross every restart gap (fewer TCP queries on a busy machine).
    assert!(udp_sent > 300 && tcp_sent > 30, "load too thin");
    assert_eq!(udp_sent, udp_answered, "UDP queries lost across restarts");
    assert_eq!(tcp_sent, tcp_answered, "TCP queries lost across restarts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_on_an_open_connection_just_after_sigterm_is_answered() {
    let up = TestUpstream::start().await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let addr: SocketAddr = listen.parse().expect("addr");
    let notify = NotifySocket::new();
    let server = start(
        &["--listen", &listen, "--upstream", &up.addr.to_string()],
        &Passing {
            notify: Some(&notify.path),
            watchdog_usec: None,
            fds: Vec::new(),
            names: "",
            user: None,
        },
    );
    notify.until("READY=1").await;
    // Connected and accepted, as a client is whose query crosses the SIGTERM.
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(100)).await;
    sigterm(&server);
    notify.until("STOPPING=1").await;
    let q = query(9);
    let len = u16::try_from(q.len()).expect("fits");
    use tokio::io::AsyncWriteExt;
    stream.write_all(&len.to_be_bytes()).await.expect("write");
    stream.write_all(&q).await.expect("write");
    let reply = crate::support::tcp_read(&mut stream).await;
    assert!(
        reply.is_some(),
        "the query sent as shutdown began was dropped"
    );
    let (status, _) = tokio::task::spawn_blocking(move || wait_exit(server))
        .await
        .expect("wait");
    assert!(status.success());
}
