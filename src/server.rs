//! Sockets: binding (several SO_REUSEPORT UDP sockets per address so every core runs a receive
//! loop), the UDP receive loops, TCP per RFC 7766 (queries on one connection answered concurrently,
//! idle timeout, connection limits overall and per client network), and draining in-flight queries on shutdown.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::answer::Source;
use crate::datagrams::{Inbox, Outbox, ReadSize};
use crate::handler::{Cached, Handler, RateCharge};
use crate::lock::lock;
use crate::metrics::Metrics;
use crate::ratelimit::network_key;
use crate::raw;
use crate::reply::Transport;

/// Kernel buffer of each UDP socket. The default (about 200 KiB) holds roughly a thousand
/// queries: a burst from many clients arriving while both cores are busy overflows it and the
/// kernel drops queries silently. 4 MiB rides out bursts of tens of milliseconds at 20k
/// queries/s (unbound's so-rcvbuf advice is similar).
const UDP_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Queries from one TCP connection answered at once. Beyond it we stop reading from that
/// connection until one finishes (backpressure, not buffering without bound).
const TCP_PIPELINE: usize = 64;

/// Replies queued for one TCP connection's writer.
const TCP_WRITE_QUEUE: usize = 64;

/// How long a TCP connection still reads queries after shutdown starts: those its client sent
/// before seeing the shutdown (with socket activation the next process takes the connections
/// not yet accepted, but not these). Each connection closes once its client is quiet this long,
/// so shutdown takes at most this much longer.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(200);

/// Datagrams one UDP loop reads and answers before it yields to the other tasks of its worker
/// thread. tokio's cooperative budget is 128 operations; a batch of 64 keeps a receive loop under
/// a flood from delaying a Consul watcher or a TCP connection by more than about 64 answers
/// (a few hundred microseconds), while an idle-to-busy wake-up still answers everything queued.
const UDP_BATCH: usize = 64;

/// The batch while queries are being answered in tasks of their own (cache misses waiting on an
/// upstream or on Consul). Those tasks move on (send their question, take their reply) only
/// between batches, so every batch a miss waits through adds to its latency: at 64 answers a
/// batch (about 0.4 ms of a busy core) a miss's p90 in mix-10pct-miss was 1.15–1.58 ms against
/// dnsmasq's 0.95–1.08; at 16 while lookups are in flight, 0.86–0.98 ms (docs/benchmarks.md,
/// "Step six"). The price, one more yield and I/O poll per 16 answers (2–4 % of CPU per answer
/// when paid always), is paid only while such tasks exist: hits alone keep the batch of 64.
const UDP_BATCH_WITH_LOOKUPS: usize = 16;

/// Tries at finding a port free for both UDP and TCP when binding port 0.
const PORT_ZERO_TRIES: usize = 20;

/// Listen sockets, bound before `run` so tests can bind port 0 and callers see bind errors
/// before anything starts.
#[derive(Default)]
pub struct Listeners {
    pub(crate) udp: Vec<UdpSocket>,
    pub(crate) tcp: Vec<TcpListener>,
}

impl Listeners {
    /// The addresses actually bound (UDP and TCP share each).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        let mut addrs: Vec<SocketAddr> = self
            .tcp
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        addrs.dedup();
        addrs
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot listen on {addr} ({proto}): {source}{hint}")]
    Bind {
        addr: SocketAddr,
        proto: &'static str,
        #[source]
        source: std::io::Error,
        hint: &'static str,
    },
}

fn hint_for(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " — another process already uses this port (is dnsmasq or systemd-resolved running?); stop it or choose another server.listen / --listen address"
        }
        std::io::ErrorKind::PermissionDenied => {
            " — ports below 1024 need root or CAP_NET_BIND_SERVICE (see examples/systemd), or use --dev to listen on 127.0.0.1:1053"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            " — this address is not configured on any interface of this host"
        }
        _ => "",
    }
}

fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Best effort: the kernel caps it at net.core.rmem_max / wmem_max (root may exceed those);
    // a small buffer only means more drops under bursts, which are counted by the kernel.
    let _ = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_SOCKET_BUFFER);
    forbid_fragmentation(&socket, addr.is_ipv6())?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Sends every UDP reply with Don't Fragment set and the path MTU that ICMP reports ignored
/// (`IP_PMTUDISC_PROBE`), as RFC 9715 advises DNS responders: a fragmented reply is what
/// off-path spoofing and fragment-reassembly attacks ride on, and a forged "fragmentation
/// needed" could otherwise shrink the MTU we send with. Replies are at most
/// `header::UDP_LIMIT_EDNS` (1232 bytes), which fits any IPv6 link and any IPv4 link of 1260
/// bytes or more; one that does not fit the interface is refused by the kernel (`EMSGSIZE`)
/// and replaced by the same reply cut to TC=1, so the client asks again over TCP
/// (`UdpLoop::send`, `send_one`).
///
/// It also saves kernel work per datagram: without DF, Linux draws each datagram's IP ID from
/// a shared table of hashed counters (`__ip_select_ident`: 1.8 % of our CPU answering Consul
/// names flat out, 3.4 % of the limit responder's, in `perf`); with DF set and fragmentation
/// forbidden the ID is 0 and the frame is gone from the profile (docs/benchmarks.md, step
/// thirteen, for what that is worth per answer).
pub(crate) fn forbid_fragmentation(
    socket: &impl std::os::fd::AsFd,
    ipv6: bool,
) -> std::io::Result<()> {
    use rustix::net::sockopt;
    if ipv6 {
        sockopt::set_ipv6_mtu_discover(socket, sockopt::Ipv6PathMtuDiscovery::PROBE)?;
        // An IPv6 socket that also takes IPv4 (systemd's `BindIPv6Only=both`) sends its IPv4
        // replies by the IPv4 option; an IPv6-only one rejects it, which changes nothing.
        let _ = sockopt::set_ip_mtu_discover(socket, sockopt::Ipv4PathMtuDiscovery::PROBE);
        Ok(())
    } else {
        Ok(sockopt::set_ip_mtu_discover(
            socket,
            sockopt::Ipv4PathMtuDiscovery::PROBE,
        )?)
    }
}

fn tcp_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Binds UDP and TCP on every address, `udp_per_address` UDP sockets each (0 = one per core).
/// Port 0 picks one port that is free for both UDP and TCP.
pub fn bind(addrs: &[SocketAddr], udp_per_address: usize) -> Result<Listeners, BindError> {
    let per = udp_sockets_per_address(udp_per_address);
    let mut listeners = Listeners::default();
    for &addr in addrs {
        let tries = if addr.port() == 0 { PORT_ZERO_TRIES } else { 1 };
        let mut last_err = None;
        for _ in 0..tries {
            match bind_one(addr, per) {
                Ok((udp, tcp)) => {
                    listeners.udp.extend(udp);
                    listeners.tcp.push(tcp);
                    last_err = None;
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        if let Some(e) = last_err {
            return Err(e);
        }
    }
    Ok(listeners)
}

/// The UDP sockets (receive loops) per listen address for `server.udp_sockets_per_address`:
/// 0 means one per core.
pub(crate) fn udp_sockets_per_address(configured: usize) -> usize {
    if configured == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        configured
    }
}

fn bind_one(addr: SocketAddr, per: usize) -> Result<(Vec<UdpSocket>, TcpListener), BindError> {
    let err = |addr, proto, source: std::io::Error| BindError::Bind {
        addr,
        proto,
        hint: hint_for(&source),
        source,
    };
    let first = udp_socket(addr).map_err(|e| err(addr, "udp", e))?;
    let bound = first.local_addr().map_err(|e| err(addr, "udp", e))?;
    let mut udp = vec![first];
    for _ in 1..per {
        udp.push(udp_socket(bound).map_err(|e| err(bound, "udp", e))?);
    }
    let tcp = tcp_listener(bound).map_err(|e| err(bound, "tcp", e))?;
    Ok((udp, tcp))
}

/// Serves until `shutdown` is cancelled, then stops reading, lets queries in flight finish (at
/// most `drain` long) and returns.
pub(crate) async fn serve(
    listeners: Listeners,
    handler: Arc<Handler>,
    metrics: Arc<Metrics>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    // Limits beyond what a semaphore can count (2^61) are unlimited in practice.
    let max_inflight = limits.max_inflight.min(Semaphore::MAX_PERMITS);
    let inflight = Arc::new(Semaphore::new(max_inflight));
    let connections = TcpSlots {
        total: Arc::new(Semaphore::new(
            limits.max_tcp_connections.min(Semaphore::MAX_PERMITS),
        )),
        per_network: Arc::new(NetworkConnections::new(
            limits.max_tcp_connections_per_network,
        )),
    };
    let mut loops = Vec::new();
    for socket in listeners.udp {
        let udp = UdpLoop {
            socket: Arc::new(socket),
            handler: handler.clone(),
            metrics: metrics.clone(),
            inflight: inflight.clone(),
            max_inflight,
            tracker: tracker.clone(),
        };
        loops.push(tokio::spawn(udp.run(shutdown.clone())));
    }
    for listener in listeners.tcp {
        loops.push(tokio::spawn(tcp_accept_loop(
            listener,
            handler.clone(),
            metrics.clone(),
            connections.clone(),
            limits.tcp_idle_timeout,
            tracker.clone(),
            shutdown.clone(),
        )));
    }
    shutdown.cancelled().await;
    for l in loops {
        let _ = l.await;
    }
    tracker.close();
    if tokio::time::timeout(limits.drain, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "shutdown: some queries were still in flight after {:?}",
            limits.drain
        );
    }
}

/// The server's resource limits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) max_inflight: usize,
    pub(crate) max_tcp_connections: usize,
    /// Of `max_tcp_connections`, how many one client network (see `ratelimit::network_key`)
    /// may hold.
    pub(crate) max_tcp_connections_per_network: usize,
    pub(crate) tcp_idle_timeout: Duration,
    /// How long shutdown waits for queries in flight: the upstream timeout and a margin.
    pub(crate) drain: Duration,
}

/// One UDP socket's receive loop and what it needs to answer a datagram.
struct UdpLoop {
    socket: Arc<UdpSocket>,
    handler: Arc<Handler>,
    metrics: Arc<Metrics>,
    inflight: Arc<Semaphore>,
    /// `inflight`'s permits when no query is in flight.
    max_inflight: usize,
    tracker: TaskTracker,
}

impl UdpLoop {
    async fn run(self, shutdown: CancellationToken) {
        let mut inbox = Inbox::new();
        // Replies answered inline (cache hits) wait here until the datagrams read with them are
        // answered, then go out together; the buffers are reused.
        let mut outbox = Outbox::new(crate::reply::UDP_LIMIT_EDNS);
        let mut read_size = ReadSize::default();
        // The hits of one read are timed together, from the read to their send: flat out, where
        // reads are batches, two clock reads per batch rather than two per answer (those were
        // 2 % of the hits' CPU).
        let hit_durations = self.metrics.hit_durations();
        // One shutdown future for the loop's life: made per datagram, it registered and removed
        // a waiter under the token's lock each time.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        loop {
            tokio::select! {
                biased;
                _ = &mut cancelled => return,
                ready = self.socket.readable() => if let Err(e) = ready {
                    // Only when the runtime's I/O driver is gone: nothing more will arrive.
                    tracing::warn!(error = %e, "udp socket no longer readable");
                    return;
                },
            }
            // Every datagram already queued is read without going back to the runtime, one or
            // a batch per system call (`ReadSize` says which), and the hits among them answered
            // with one more. At most `UDP_BATCH` before the loop yields, so that a flood cannot
            // starve the other tasks of this worker (Consul watchers, TCP, metrics), as tokio's
            // budget would have.
            let mut answered = 0;
            let drained = loop {
                let budget = if self.lookups_in_flight() {
                    UDP_BATCH_WITH_LOOKUPS
                } else {
                    UDP_BATCH
                };
                if answered >= budget {
                    break false;
                }
                let want = read_size.next(budget - answered);
                let read = self
                    .socket
                    .try_io(Interest::READABLE, || inbox.receive(&*self.socket, want));
                match read {
                    Ok(n) => {
                        answered += n;
                        read_size.read(n);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        read_size.emptied();
                        break true;
                    }
                    Err(e) => {
                        // ICMP errors from earlier sends surface here on some systems. Counted
                        // against the batch so that a socket in error cannot hold the loop.
                        tracing::debug!(error = %e, "udp receive error");
                        answered += 1;
                        continue;
                    }
                }
                let arrived = Instant::now();
                let mut hits = 0;
                for (packet, peer) in inbox.datagrams() {
                    hits += usize::from(self.answer(packet, peer, arrived, &mut outbox));
                }
                self.send(&mut outbox);
                if hits > 0 {
                    let took = arrived.elapsed().as_secs_f64();
                    for _ in 0..hits {
                        hit_durations.observe(took);
                    }
                    hit_durations.flush();
                }
            };
            if !drained {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Whether some query is being answered in a task (holds an in-flight permit).
    fn lookups_in_flight(&self) -> bool {
        self.inflight.available_permits() < self.max_inflight
    }

    /// Answers one datagram: a cache hit (or a pre-encoded Consul answer) right here, with no
    /// task, no copy of the packet and no `Message`, its reply queued in `outbox`; anything else
    /// in a task of its own, within the in-flight limit. True for an answer the caller is to
    /// time (see [`Cached::Replied`]).
    fn answer(
        &self,
        packet: &[u8],
        peer: SocketAddr,
        arrived: Instant,
        outbox: &mut Outbox,
    ) -> bool {
        let cached = match outbox.next_buffer() {
            Some(reply) => {
                self.handler
                    .handle_cached(packet, peer.ip(), Transport::Udp, arrived, reply)
            }
            // Not reached: the loop sends after each read of at most a batch. A query that
            // found no room is answered the long way rather than lost.
            None => Cached::Miss(RateCharge::NotTaken),
        };
        let charge = match cached {
            Cached::Replied => {
                outbox.commit(peer);
                return true;
            }
            Cached::RateLimited => {
                outbox.commit(peer);
                return false;
            }
            Cached::Miss(charge) => charge,
        };
        let Ok(permit) = self.inflight.clone().try_acquire_owned() else {
            self.metrics.drop_packet("overload");
            return false;
        };
        let packet = packet.to_vec();
        let socket = self.socket.clone();
        let handler = self.handler.clone();
        let metrics = self.metrics.clone();
        self.tracker.spawn(async move {
            let reply = handler
                .handle_miss(&packet, peer.ip(), Transport::Udp, charge)
                .await;
            if let Some(reply) = reply {
                send_one(&socket, reply, peer, &metrics).await;
            }
            drop(permit);
        });
        false
    }

    /// Sends the replies queued in `outbox`, as many per system call as the socket takes. A
    /// reply the kernel refuses (an unreachable destination, say) is skipped and the rest sent;
    /// only when the socket's send buffer is full do the rest wait, in a task.
    fn send(&self, outbox: &mut Outbox) {
        let mut sent = 0;
        while sent < outbox.len() {
            let result = self
                .socket
                .try_io(Interest::WRITABLE, || outbox.send(&*self.socket, sent));
            match result {
                Ok(n) => sent += n.max(1),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let pending: Vec<(Vec<u8>, SocketAddr)> = (sent..outbox.len())
                        .filter_map(|i| outbox.reply(i))
                        .map(|(reply, peer)| (reply.to_vec(), peer))
                        .collect();
                    let socket = self.socket.clone();
                    let metrics = self.metrics.clone();
                    self.tracker.spawn(async move {
                        for (reply, peer) in pending {
                            send_one(&socket, reply, peer, &metrics).await;
                        }
                    });
                    break;
                }
                // Too large for the interface (see `forbid_fragmentation`): the same reply cut
                // to TC=1 is sent in its place, by the next turn of the loop.
                Err(e) if too_large(&e) && outbox.cut_to_question(sent) => {
                    self.metrics.truncated.with_label_values(&["udp"]).inc();
                }
                Err(e) => {
                    let peer = outbox.reply(sent).map(|(_, peer)| peer);
                    tracing::debug!(error = %e, ?peer, "udp send failed");
                    sent += 1;
                }
            }
        }
        outbox.clear();
    }
}

/// Sends one reply from a task of its own; one too large for the interface goes as TC=1
/// instead (see `forbid_fragmentation`).
async fn send_one(socket: &UdpSocket, mut reply: Vec<u8>, peer: SocketAddr, metrics: &Metrics) {
    let mut sent = socket.send_to(&reply, peer).await;
    if matches!(&sent, Err(e) if too_large(e)) && raw::cut_to_question(&mut reply) {
        metrics.truncated.with_label_values(&["udp"]).inc();
        sent = socket.send_to(&reply, peer).await;
    }
    if let Err(e) = sent {
        tracing::debug!(error = %e, %peer, "udp send failed");
    }
}

/// The kernel refused a datagram larger than the interface's MTU (Don't Fragment is set).
fn too_large(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(nix::errno::Errno::EMSGSIZE as i32)
}

async fn tcp_accept_loop(
    listener: TcpListener,
    handler: Arc<Handler>,
    metrics: Arc<Metrics>,
    connections: TcpSlots,
    idle: Duration,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // The network's share first: a network at its cap must not take a global slot, even
        // for a moment, or its retries would crowd out other networks.
        let Some(network_slot) = connections.per_network.clone().acquire(peer.ip()) else {
            metrics.drop_packet("tcp_network_limit");
            drop(stream);
            continue;
        };
        let Ok(permit) = connections.total.clone().try_acquire_owned() else {
            metrics.drop_packet("tcp_connection_limit");
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        let metrics = metrics.clone();
        let conn_tracker = tracker.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            metrics.tcp_connections.inc();
            tcp_connection(
                stream,
                peer,
                handler,
                &metrics,
                idle,
                conn_tracker,
                shutdown,
            )
            .await;
            metrics.tcp_connections.dec();
            drop(permit);
            drop(network_slot);
        });
    }
}

/// The TCP connection limits: `max_tcp_connections` in all, and each network's share.
#[derive(Clone)]
struct TcpSlots {
    total: Arc<Semaphore>,
    per_network: Arc<NetworkConnections>,
}

/// Open TCP connections per client network, so one network (a client sent to TCP by the rate
/// limit, or one opening connections on purpose) cannot take every slot of
/// `max_tcp_connections` and lock the others out. Networks are those of the rate limiter: /24
/// for IPv4, /56 for IPv6. Touched once per accept and once per close, so a mutex is cheap.
struct NetworkConnections {
    max: usize,
    /// Only networks with an open connection are present: the map is bounded by
    /// `max_tcp_connections`.
    open: std::sync::Mutex<HashMap<u128, usize>>,
}

impl NetworkConnections {
    fn new(max: usize) -> NetworkConnections {
        NetworkConnections {
            // A cap of 0 would refuse every connection; config validation rejects it.
            max: max.max(1),
            open: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one connection from `client`'s network, or `None` when the network is at its
    /// cap. The slot is given back when dropped.
    fn acquire(self: Arc<Self>, client: IpAddr) -> Option<NetworkSlot> {
        let key = network_key(client);
        {
            let mut open = lock(&self.open);
            let count = open.entry(key).or_insert(0);
            if *count >= self.max {
                return None;
            }
            *count += 1;
        }
        Some(NetworkSlot { owner: self, key })
    }
}

struct NetworkSlot {
    owner: Arc<NetworkConnections>,
    key: u128,
}

impl Drop for NetworkSlot {
    fn drop(&mut self) {
        let mut open = lock(&self.owner.open);
        if let Some(count) = open.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The next length-prefixed message, or `None` when the connection is to close: the client
/// closed or went quiet for `idle` (the whole message must arrive within it: a client trickling
/// bytes cannot hold the connection), the writer gave up, or shutdown began and `closing.1` (the
/// grace) ran out. One read future across the shutdown signal: no half-read message is dropped.
async fn next_message(
    reader: &mut tokio::net::tcp::OwnedReadHalf,
    idle: Duration,
    shutdown: &CancellationToken,
    (closing, mut grace): (&mut bool, std::pin::Pin<&mut tokio::time::Sleep>),
    tx: &mpsc::Sender<Vec<u8>>,
) -> Option<Vec<u8>> {
    let read = tokio::time::timeout(idle, async {
        let len = reader.read_u16().await?;
        let mut body = vec![0u8; usize::from(len)];
        reader.read_exact(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    });
    tokio::pin!(read);
    loop {
        tokio::select! {
            _ = shutdown.cancelled(), if !*closing => {
                *closing = true;
                grace.as_mut().reset(tokio::time::Instant::now() + SHUTDOWN_GRACE);
            }
            _ = &mut grace, if *closing => return None,
            // The writer gave up (the client stopped reading): stop reading too.
            _ = tx.closed() => return None,
            r = &mut read => return r.ok().and_then(Result::ok),
        }
    }
}

/// One TCP connection: read length-prefixed queries, answer each in its own task (so a slow
/// upstream answer does not hold up the next query), write replies in completion order. Closes
/// after `idle` without a new query, when a reply cannot be written within `idle` (the client
/// does not read), when the client closes, or on shutdown — always after the queries already
/// read are answered.
async fn tcp_connection(
    stream: TcpStream,
    peer: SocketAddr,
    handler: Arc<Handler>,
    metrics: &Metrics,
    idle: Duration,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_WRITE_QUEUE);
    let write_task = tokio::spawn(async move {
        while let Some(reply) = rx.recv().await {
            let Ok(len) = u16::try_from(reply.len()) else {
                continue;
            };
            let mut framed = Vec::with_capacity(reply.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&reply);
            // A client that does not read its replies must not hold the connection (and the
            // queries queued behind it) forever.
            match tokio::time::timeout(idle, writer.write_all(&framed)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
        let _ = writer.shutdown().await;
    });
    let pipeline = Arc::new(Semaphore::new(TCP_PIPELINE));
    // After shutdown, queries the client already sent are still read for SHUTDOWN_GRACE: a
    // connection accepted just before it must not be closed with its query unanswered.
    let mut closing = false;
    let grace = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(grace);
    loop {
        let Some(body) = next_message(
            &mut reader,
            idle,
            &shutdown,
            (&mut closing, grace.as_mut()),
            &tx,
        )
        .await
        else {
            break;
        };
        if body.is_empty() {
            // A zero-length message is not DNS: counted like any short packet, and the
            // connection closed.
            metrics.drop_packet("short");
            break;
        }
        let mut reply = Vec::new();
        let arrived = Instant::now();
        let cached = handler.handle_cached(&body, peer.ip(), Transport::Tcp, arrived, &mut reply);
        if cached == Cached::Replied {
            metrics.observe_request(Source::Cache, arrived.elapsed());
        }
        let Cached::Miss(charge) = cached else {
            // In order with the replies of queries still in flight is not required (RFC 7766
            // §6.2.1.1): a hit goes out as soon as the writer takes it.
            tokio::select! {
                _ = tx.closed() => break,
                sent = tx.send(reply) => if sent.is_err() { break },
            }
            continue;
        };
        let permit = tokio::select! {
            _ = tx.closed() => break,
            p = pipeline.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let handler = handler.clone();
        let tx = tx.clone();
        tracker.spawn(async move {
            let reply = handler
                .handle_miss(&body, peer.ip(), Transport::Tcp, charge)
                .await;
            if let Some(reply) = reply {
                let _ = tx.send(reply).await;
            }
            drop(permit);
        });
    }
    // Queries in flight hold clones of `tx`; the writer ends when the last of them is done.
    drop(tx);
    let _ = write_task.await;
}
