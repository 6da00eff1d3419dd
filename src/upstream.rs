//! Forwarding to upstream resolvers: a transparent DNS client (UDP, TCP when the reply is
//! truncated, failover across servers within one deadline), the zone routing of `[[forward]]`, and
//! the answer source that puts the cache in front of it.
//!
//! Why not hickory-resolver's `lookup()`: it chases CNAMEs, answers RFC 6761 names itself, loses
//! flags and turns an upstream SERVFAIL into an error (see ARCHITECTURE.md). A forwarder must pass
//! the upstream's answer through unchanged, so this client sends the question and returns the
//! upstream's message as it came; hickory-proto does the encoding.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use ipnet::IpNet;
use prometheus::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::answer::{Answer, AnswerSource, Answered, Dnssec, Question, Source};
use crate::cache::{
    question_wire, Cache, CachedAnswer, FetchError, Lookup, TtlPolicy, UpstreamReply,
};
use crate::config::Config;
use crate::failures::FailurePolicy;
use crate::header::{self, HEADER_LEN};
use crate::metrics::Metrics;
use crate::raw::{self, PlainQuery};
use crate::recent::{Exchanged, RecentExchanges, RecentFigures};
use crate::reply;
use crate::socket_pool::SocketPool;
use crate::upstream_wire;

/// The EDNS size we offer upstreams: the same 1232 bytes we accept from clients.
const UPSTREAM_EDNS_SIZE: u16 = reply::UDP_LIMIT_EDNS as u16;

/// Every attempt gets at least this long, even when many servers share a short deadline.
const MIN_ATTEMPT: Duration = Duration::from_millis(100);

/// A set of servers tried in order (starting with the last one that answered), all within one
/// deadline.
#[derive(Debug)]
pub(crate) struct ServerGroup {
    servers: Vec<SocketAddr>,
    timeout: Duration,
    /// Index of the server that answered last: tried first next time, so a dead first server
    /// costs one timeout, not one per query.
    preferred: AtomicUsize,
    /// DNS 0x20: random letter case in the questions we send (`upstream.randomize_case`).
    randomize_case: bool,
    /// Each server's recent attempts (same order as `servers`), for the status page.
    recent: Box<[RecentExchanges]>,
    /// Open UDP sockets per server (same index as `servers`).
    sockets: Vec<SocketPool>,
    /// Each server's `upstream_duration_seconds` histogram (same index as `servers`), looked up
    /// by label once, not per question.
    durations: Box<[OnceLock<Histogram>]>,
}

impl ServerGroup {
    pub(crate) fn new(servers: Vec<SocketAddr>, timeout: Duration) -> ServerGroup {
        ServerGroup {
            recent: servers.iter().map(|_| RecentExchanges::default()).collect(),
            sockets: servers.iter().map(|_| SocketPool::default()).collect(),
            durations: servers.iter().map(|_| OnceLock::new()).collect(),
            servers,
            timeout,
            preferred: AtomicUsize::new(0),
            randomize_case: false,
        }
    }

    /// Sends questions with random letter case and accepts only replies that echo it (see
    /// `exchange`).
    pub(crate) fn with_randomize_case(mut self, on: bool) -> ServerGroup {
        self.randomize_case = on;
        self
    }

    /// Asks the servers for `q`, with `flags`' DO, CD and AD, and returns the first usable reply
    /// (any rcode but SERVFAIL, REFUSED, NOTIMP and FORMERR, which move on to the next server).
    /// A server that answered is not asked again: a lost datagram is worth a second try, an
    /// answer is not (the upstream would only repeat it), so once every server has answered
    /// with one of those rcodes the question has failed.
    pub(crate) async fn query(
        &self,
        q: &Question,
        flags: Dnssec,
        metrics: &Metrics,
    ) -> Result<UpstreamReply, FetchError> {
        let n = self.servers.len();
        if n == 0 {
            return Err(FetchError::Io("no upstream servers".into()));
        }
        let deadline = Instant::now() + self.timeout;
        let first = self.preferred.load(Ordering::Relaxed) % n;
        // With a single server, try it twice (a lost UDP datagram should not cost the deadline).
        let attempts = n.max(2);
        let mut last_error = FetchError::Timeout(self.timeout);
        let mut answered = 0;
        for attempt in 0..attempts {
            let now = Instant::now();
            if now >= deadline || answered == n {
                break;
            }
            let index = (first + attempt) % n;
            let server = self.servers[index];
            let left = deadline - now;
            let per_attempt = (left / u32::try_from(attempts - attempt).unwrap_or(1))
                .max(MIN_ATTEMPT)
                .min(left);
            let started = now;
            let result = tokio::time::timeout(
                per_attempt,
                exchange(
                    (server, &self.sockets[index]),
                    q,
                    flags,
                    self.randomize_case,
                    metrics,
                ),
            )
            .await;
            let took = started.elapsed();
            self.durations[index]
                .get_or_init(|| metrics.upstream_duration_of(&server.to_string()))
                .observe(took.as_secs_f64());
            let replied = matches!(result, Ok(Ok(_))).then_some(took);
            match result {
                Ok(Ok(mut reply)) => match reply.rcode() {
                    ResponseCode::ServFail
                    | ResponseCode::Refused
                    | ResponseCode::NotImp
                    | ResponseCode::FormErr => {
                        self.recent[index].record(Instant::now(), replied, true);
                        metrics.upstream_error(&server.to_string(), "rcode");
                        answered += 1;
                        last_error = FetchError::Rcode(reply.rcode());
                    }
                    _ => {
                        self.recent[index].record(Instant::now(), replied, false);
                        self.preferred.store(index, Ordering::Relaxed);
                        reply.exchange = Some(Exchanged::new(server, took));
                        return Ok(reply);
                    }
                },
                Ok(Err(e)) => {
                    self.recent[index].record(Instant::now(), None, true);
                    metrics.upstream_error(&server.to_string(), "io");
                    last_error = FetchError::Io(format!("{server}: {e}"));
                }
                Err(_) => {
                    self.recent[index].record(Instant::now(), None, true);
                    metrics.upstream_error(&server.to_string(), "timeout");
                    if !matches!(last_error, FetchError::Rcode(_)) {
                        last_error = FetchError::Timeout(self.timeout);
                    }
                }
            }
        }
        Err(last_error)
    }
}

/// Why a datagram on our upstream socket is not the answer to our question. Each is ignored (we
/// keep waiting for the real answer until the attempt's deadline) and counted in
/// `upstream_unmatched_replies_total`: a blind spoofer must guess the ID, the port and (with
/// 0x20) the case, and its misses are what shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mismatch {
    Id,
    Question,
    Case,
    Malformed,
}

impl Mismatch {
    fn as_str(self) -> &'static str {
        match self {
            Mismatch::Id => "id",
            Mismatch::Question => "question",
            Mismatch::Case => "case",
            Mismatch::Malformed => "malformed",
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The reply matched in everything but the letter case of our 0x20 question.
    #[error("the reply did not keep the letter case of the question")]
    CaseMismatch,
}

/// One question to one server: UDP first, TCP when the UDP reply is truncated.
///
/// With `randomize_case` (DNS 0x20) the name goes out in random letter case and a UDP reply
/// must echo that exact case. A reply that differs only in case is what an upstream that does
/// not preserve case sends (they exist), so, as unbound does, the server is re-asked at once
/// without randomisation (a fresh ID and port) and the fallback counted. A spoofer who gets ID
/// and port right can force that fallback, but then must win a second race against fresh ones,
/// and the counters show it. Which servers fail is not remembered: one spoofed reply must not
/// turn 0x20 off for later questions.
async fn exchange(
    (server, sockets): (SocketAddr, &SocketPool),
    q: &Question,
    flags: Dnssec,
    randomize_case: bool,
    metrics: &Metrics,
) -> std::io::Result<UpstreamReply> {
    if randomize_case {
        let sent = randomized_case(&q.name);
        match exchange_as((server, sockets), q, &sent, (flags, true), metrics).await {
            Ok(mut reply) => {
                if let Some(message) = &mut reply.message {
                    restore_case(message, q);
                }
                return Ok(reply);
            }
            Err(ExchangeError::Io(e)) => return Err(e),
            Err(ExchangeError::CaseMismatch) => {
                metrics.upstream_case_fallbacks.inc();
                tracing::debug!(%server, name = %q.name, "upstream did not keep the 0x20 case; asking again without it");
            }
        }
    }
    match exchange_as((server, sockets), q, &q.name, (flags, false), metrics).await {
        Ok(reply) => Ok(reply),
        Err(ExchangeError::Io(e)) => Err(e),
        // Not produced without `exact_case`; mapped for completeness.
        Err(e @ ExchangeError::CaseMismatch) => Err(std::io::Error::other(e)),
    }
}

/// `exchange` with the question's name written as `sent` (`q.name` in some letter case), and
/// with its case checked in the reply when `exact_case`.
async fn exchange_as(
    (server, sockets): (SocketAddr, &SocketPool),
    q: &Question,
    sent: &Name,
    (flags, exact_case): (Dnssec, bool),
    metrics: &Metrics,
) -> Result<UpstreamReply, ExchangeError> {
    let id: u16 = rand::random();
    let request = build_query(id, q, sent, flags)?;
    let reply = exchange_udp(
        (server, sockets),
        &request,
        id,
        (q, sent, exact_case),
        metrics,
    )
    .await?;
    if reply.truncated() {
        // TCP cannot be spoofed blind, so its reply's case is not checked (and is restored by
        // the caller all the same).
        // Boxed: rare (truncated replies only), and inline it would make every miss's future
        // larger than the allocator's per-thread cache takes.
        return Ok(Box::pin(exchange_tcp(server, &request, id, q, metrics)).await?);
    }
    Ok(reply)
}

/// The upstream query: RD, EDNS with our size, and DO, CD and AD as `flags` say (see
/// `Forwarder::upstream_flags`). Written in bytes: a `Message` built and encoded per miss cost
/// a twentieth of its CPU.
fn build_query(id: u16, q: &Question, sent: &Name, flags: Dnssec) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(HEADER_LEN + raw::MAX_QUESTION_WIRE + reply::OPT_LEN);
    let header_flags = header::RD
        | header::flag_if(flags.checking_disabled, header::CD)
        | header::flag_if(flags.authentic_data, header::AD);
    header::push(&mut out, id, header_flags, [1, 0, 0, 1]);
    reply::push_name(&mut out, sent);
    out.extend_from_slice(&u16::from(q.qtype).to_be_bytes());
    out.extend_from_slice(&u16::from(q.qclass).to_be_bytes());
    raw::push_opt(&mut out, UPSTREAM_EDNS_SIZE, flags.dnssec_ok);
    Ok(out)
}

/// `name` with each ASCII letter upper- or lowercase at random (DNS 0x20,
/// draft-vixie-dnsext-dns0x20): one bit of entropy per letter on top of ID and port.
fn randomized_case(name: &Name) -> Name {
    let labels: Vec<Vec<u8>> = name
        .iter()
        .map(|label| {
            label
                .iter()
                .map(|&b| {
                    if b.is_ascii_alphabetic() && rand::random::<bool>() {
                        b.to_ascii_uppercase()
                    } else {
                        b.to_ascii_lowercase()
                    }
                })
                .collect()
        })
        .collect();
    match Name::from_labels(labels) {
        Ok(mut randomized) => {
            randomized.set_fqdn(name.is_fqdn());
            randomized
        }
        // Same label lengths as a valid name, so this cannot fail; asking in plain case is
        // the safe answer if it ever did.
        Err(_) => name.clone(),
    }
}

/// Puts the question's own spelling back where the upstream echoed our random case (the
/// question, and owner names equal to it): what is cached and sent to clients never shows it.
fn restore_case(reply: &mut Message, q: &Question) {
    for query in &mut reply.queries {
        if query.name() == &q.name {
            query.set_name(q.name.clone());
        }
    }
    for record in reply
        .answers
        .iter_mut()
        .chain(reply.authorities.iter_mut())
        .chain(reply.additionals.iter_mut())
    {
        if record.name == q.name {
            record.name = q.name.clone();
        }
    }
}

/// Is `bytes` the answer to our query (ID and question match; with `exact_case`, the name in
/// the exact case we sent)? Anything else on the socket is ignored, which also defeats blind
/// spoofing from other addresses (the socket is connected, so the kernel drops those).
///
/// A plain answer (see `upstream_wire::plain_answer`) to a question asked in its own case is
/// taken as it came, unparsed: the cache stores it from its bytes. Everything else is parsed
/// here, so a reply that is not well formed is ignored like any other mismatch.
///
/// Returns the reply parsed, or `None` for one taken as it came.
fn check(
    bytes: &[u8],
    id: u16,
    q: &Question,
    sent: &Name,
    exact_case: bool,
) -> Result<Option<Message>, Mismatch> {
    if !exact_case && upstream_wire::plain_answer(bytes, id, &question_wire(q)) {
        return Ok(None);
    }
    let reply = Message::from_vec(bytes).map_err(|_| Mismatch::Malformed)?;
    if reply.metadata.id != id || reply.metadata.message_type != MessageType::Response {
        return Err(Mismatch::Id);
    }
    let [asked] = reply.queries.as_slice() else {
        return Err(Mismatch::Question);
    };
    if asked.name() != &q.name || asked.query_type() != q.qtype || asked.query_class() != q.qclass {
        return Err(Mismatch::Question);
    }
    if exact_case && !asked.name().eq_case(sent) {
        return Err(Mismatch::Case);
    }
    Ok(Some(reply))
}

/// One UDP exchange on a socket of `sockets` (see `socket_pool`): given back only once the
/// reply matched, so a socket whose question failed or timed out (this future dropped) closes.
async fn exchange_udp(
    (server, sockets): (SocketAddr, &SocketPool),
    request: &[u8],
    id: u16,
    (q, sent, exact_case): (&Question, &Name, bool),
    metrics: &Metrics,
) -> Result<UpstreamReply, ExchangeError> {
    let lent = sockets.take(server).await?;
    lent.socket.send(request).await?;
    loop {
        let (buf, len) = receive(&lent.socket).await?;
        let datagram = &buf[..len];
        match check(datagram, id, q, sent, exact_case) {
            Ok(message) => {
                sockets.put(lent);
                return Ok(UpstreamReply::received(message, datagram.to_vec()));
            }
            Err(mismatch) => {
                metrics.upstream_unmatched(mismatch.as_str());
                if mismatch == Mismatch::Case {
                    return Err(ExchangeError::CaseMismatch);
                }
            }
        }
    }
}

/// Room for one upstream datagram: more than the EDNS size we offer, for servers that ignore it
/// (a reply cut short by the buffer fails the checks like any malformed one).
const RECEIVE_BUFFER: usize = 4096;

/// The next datagram on `socket`, in a buffer on the stack.
///
/// Not a heap buffer per miss: a 4 KiB block is beyond the allocator's per-thread cache, and
/// freeing one between the cache's small long-lived entries fragmented the heap (peak RSS in
/// `fill-100k` rose by a tenth, see docs/benchmarks.md). The buffer is filled only once the
/// socket is readable, so it is never part of the future's state across an `await`; the reply
/// is then copied out at its own size.
async fn receive(socket: &tokio::net::UdpSocket) -> std::io::Result<([u8; RECEIVE_BUFFER], usize)> {
    loop {
        socket.readable().await?;
        let mut buf = [0u8; RECEIVE_BUFFER];
        match socket.try_recv(&mut buf) {
            Ok(len) => return Ok((buf, len)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn exchange_tcp(
    server: SocketAddr,
    request: &[u8],
    id: u16,
    q: &Question,
    metrics: &Metrics,
) -> std::io::Result<UpstreamReply> {
    let mut stream = TcpStream::connect(server).await?;
    stream.set_nodelay(true)?;
    let len = u16::try_from(request.len()).map_err(std::io::Error::other)?;
    let mut framed = Vec::with_capacity(request.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(request);
    stream.write_all(&framed).await?;
    loop {
        let len = stream.read_u16().await?;
        let mut buf = vec![0u8; usize::from(len)];
        stream.read_exact(&mut buf).await?;
        match check(&buf, id, q, &q.name, false) {
            Ok(message) => return Ok(UpstreamReply::received(message, buf)),
            Err(mismatch) => metrics.upstream_unmatched(mismatch.as_str()),
        }
    }
}

/// `[[forward]]` zones and the default servers: the longest matching zone wins.
#[derive(Debug)]
pub(crate) struct Router {
    zones: Vec<(Name, Arc<ServerGroup>)>,
    default: Arc<ServerGroup>,
}

impl Router {
    pub(crate) fn new(default: ServerGroup, zones: Vec<(Name, ServerGroup)>) -> Router {
        let mut zones: Vec<(Name, Arc<ServerGroup>)> =
            zones.into_iter().map(|(z, g)| (z, Arc::new(g))).collect();
        // Most labels first, so the first match is the longest.
        zones.sort_by_key(|(z, _)| std::cmp::Reverse(z.num_labels()));
        Router {
            zones,
            default: Arc::new(default),
        }
    }

    /// The forward zone `name` goes to (`.`: the default upstreams) and its servers.
    pub(crate) fn route_of(&self, name: &Name) -> (String, Vec<SocketAddr>) {
        match self.zones.iter().find(|(zone, _)| zone.zone_of(name)) {
            Some((zone, g)) => (zone.to_string(), g.servers.clone()),
            None => (".".to_owned(), self.default.servers.clone()),
        }
    }

    /// Every forward zone's servers with their recent figures, the default upstreams last.
    pub(crate) fn recent(&self) -> Vec<(String, SocketAddr, RecentFigures)> {
        let now = Instant::now();
        self.zones
            .iter()
            .map(|(zone, g)| (zone.to_string(), g))
            .chain([(".".to_owned(), &self.default)])
            .flat_map(|(zone, g)| {
                g.servers
                    .iter()
                    .zip(g.recent.iter())
                    .map(move |(s, r)| (zone.clone(), *s, r.figures(now)))
            })
            .collect()
    }

    pub(crate) fn group_for(&self, name: &Name) -> &Arc<ServerGroup> {
        self.zones
            .iter()
            .find(|(zone, _)| zone.zone_of(name))
            .map_or(&self.default, |(_, g)| g)
    }
}

/// What `Forwarder::resolve` found: an entry to answer from, with where it came from (a stale
/// one as `Source::Stale`), or an answer made without one.
enum Resolved {
    Entry(CachedAnswer, Source),
    Answered(Answered),
}

/// Forwarded names: cache first, upstream on a miss, stale data when the upstream fails, and
/// SERVFAIL without asking while a failure is remembered (RFC 9520).
///
/// DNSSEC (see `dnssec` for the rules): the client's DO and CD go upstream, its answer is
/// cached under CD and served to DO clients whole and to others without DNSSEC records, and AD
/// is passed on from a trusted upstream to clients that set DO or AD.
pub struct Forwarder {
    router: Router,
    cache: Cache,
    metrics: Arc<Metrics>,
    /// Shuffle answer records on every response (the dnsmasq-compatible Consul mode, where round
    /// robin must survive our cache).
    shuffle: bool,
    /// Pass DNSSEC on (forwarded names). Off for Consul's DNS interface, whose answers are
    /// unsigned: it is asked without DO, CD or AD, whatever the client set.
    dnssec: bool,
    /// AD from the upstreams may reach clients (`upstream.trust_ad`).
    trust_ad: bool,
    /// Upstream fetches in flight (`upstream.max_inflight`).
    inflight: Arc<tokio::sync::Semaphore>,
    /// The Consul DNS mode's `consul.reverse_networks`: PTR questions for addresses in them go
    /// to the agents (dnsmasq's `rev-server`). Empty for the upstream forwarder.
    reverse_networks: Vec<IpNet>,
}

impl Forwarder {
    pub(crate) fn new(
        router: Router,
        cache: Cache,
        metrics: Arc<Metrics>,
        shuffle: bool,
    ) -> Forwarder {
        Forwarder {
            router,
            cache,
            metrics,
            shuffle,
            dnssec: false,
            trust_ad: false,
            inflight: Arc::new(tokio::sync::Semaphore::new(
                crate::config::DEFAULT_UPSTREAM_INFLIGHT,
            )),
            reverse_networks: Vec::new(),
        }
    }

    /// Passes DNSSEC on (DO, CD, DNSSEC records), and AD when `trust_ad`.
    pub(crate) fn with_dnssec(mut self, trust_ad: bool) -> Forwarder {
        self.dnssec = true;
        self.trust_ad = trust_ad;
        self
    }

    /// The forwarding stack `config` asks for: `[upstream]` servers and `[[forward]]` zones, the
    /// answer cache with `[cache]`'s limits and TTL rules, and the cap on fetches in flight.
    /// The one place it is assembled: the server, the tests and the benchmarks all build it here.
    pub fn from_config(config: &Config, metrics: &Arc<Metrics>) -> Forwarder {
        let group = |servers: &[SocketAddr]| {
            ServerGroup::new(servers.to_vec(), config.upstream.timeout)
                .with_randomize_case(config.upstream.randomize_case)
        };
        let zones = config
            .forward
            .iter()
            .map(|f| (f.zone.clone(), group(&f.servers)))
            .collect();
        let policy = TtlPolicy {
            min_ttl: config.cache.min_ttl,
            max_ttl: config.cache.max_ttl,
            negative_ttl: config.cache.negative_ttl,
            negative_min_ttl: Duration::ZERO,
            stale_for: config.cache.stale_for,
        };
        Forwarder::new(
            Router::new(group(&config.upstream.servers), zones),
            Self::new_cache(config, policy, metrics),
            metrics.clone(),
            false,
        )
        .with_max_inflight(config.upstream.max_inflight)
        .with_dnssec(config.effective_trust_ad())
    }

    /// The dnsmasq-compatible Consul mode (`consul.mode = "dns"`): the Consul domains forwarded
    /// to the agents' DNS ports, a forward zone like the others but with a TTL floor of the
    /// service TTL (Consul sends 0: without the floor every query would reach the agent) and
    /// shuffled on the way out, so round robin survives the cache. Consul's answers are
    /// unsigned: no DNSSEC is passed on.
    pub(crate) fn consul_dns(config: &Config, metrics: &Arc<Metrics>) -> Forwarder {
        let consul = &config.consul;
        let floor = config.cache.min_ttl.max(consul.service_ttl_for(""));
        let policy = TtlPolicy {
            min_ttl: floor,
            max_ttl: config.cache.max_ttl.max(floor),
            negative_ttl: consul.negative_ttl,
            negative_min_ttl: consul.negative_ttl,
            stale_for: consul.stale_for,
        };
        let mut forwarder = Forwarder::new(
            Router::new(
                ServerGroup::new(consul.dns.clone(), config.upstream.timeout),
                Vec::new(),
            ),
            Self::new_cache(config, policy, metrics),
            metrics.clone(),
            true,
        );
        forwarder.reverse_networks = consul.reverse_networks.clone();
        forwarder
    }

    fn new_cache(config: &Config, policy: TtlPolicy, metrics: &Metrics) -> Cache {
        Cache::with_limits(
            config.cache.max_entries,
            config.cache.max_bytes,
            policy,
            Some(metrics.cache_evictions.clone()),
        )
        .with_failures(
            FailurePolicy {
                ttl: config.cache.failure_ttl,
                max_ttl: config.cache.failure_ttl_max,
            },
            Some(metrics.failures_cached.clone()),
        )
    }

    /// Caps upstream fetches in flight; a miss beyond the cap is answered at once (stale data or
    /// SERVFAIL) instead of queueing behind a slow upstream.
    pub(crate) fn with_max_inflight(mut self, max: usize) -> Forwarder {
        // Config validation clamps too; this keeps any caller from the semaphore's panic.
        let permits = max.clamp(1, crate::config::MAX_CONCURRENCY_LIMIT);
        self.inflight = Arc::new(tokio::sync::Semaphore::new(permits));
        self
    }

    /// Where names are forwarded (explain, status page).
    pub(crate) fn router(&self) -> &Router {
        &self.router
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// What the upstream is asked with for a client that sent `client`: its DO and CD, and AD
    /// always (RFC 6840 §5.7: the upstream then says whether it validated, whatever the
    /// client's bits, so one entry serves clients with and without AD). Nothing when DNSSEC is
    /// not passed on.
    fn upstream_flags(&self, client: Dnssec) -> Dnssec {
        if !self.dnssec {
            return Dnssec::default();
        }
        Dnssec {
            authentic_data: true,
            ..client
        }
    }

    /// Is AD set in the reply to `client` from `entry`? Only from a trusted upstream that set
    /// it, and only for a client that set DO or AD (RFC 6840 §5.7).
    fn authentic(&self, entry: &CachedAnswer, client: Dnssec) -> bool {
        self.dnssec && self.trust_ad && entry.authentic_data() && client.wants_ad()
    }

    /// `entry`'s answer for `client`, as fetched for a DO client, without DNSSEC records for
    /// the others.
    fn answered(
        &self,
        entry: &CachedAnswer,
        client: Dnssec,
        stale: bool,
        source: Source,
    ) -> Answered {
        let dnssec_ok = self.dnssec && client.dnssec_ok;
        Answered {
            answer: self.finish(entry.to_answer_for(Instant::now(), stale, dnssec_ok)),
            source,
            authentic_data: self.authentic(entry, client),
        }
    }

    /// The answer for `q` asked by a client with `client`'s DNSSEC bits, and where it came from.
    /// Never fails: when nothing can be had in time, the answer is SERVFAIL.
    pub(crate) async fn answer_for(&self, q: &Question, client: Dnssec) -> Answered {
        match self.resolve(q, client).await {
            Resolved::Entry(entry, source) => {
                self.answered(&entry, client, source == Source::Stale, source)
            }
            Resolved::Answered(answered) => answered,
        }
    }

    /// The cache entry that answers `q` (fresh, fetched, or stale when the upstreams fail), or
    /// the answer given without one (SERVFAIL, or RFC 8482's to ANY).
    async fn resolve(&self, q: &Question, client: Dnssec) -> Resolved {
        if q.qtype == RecordType::ANY {
            // RFC 8482, without asking anyone.
            return Resolved::Answered(Answered::unsigned(
                reply::minimal_any_answer(&Query::query(q.name.clone(), q.qtype)),
                Source::Local,
            ));
        }
        let asked = self.upstream_flags(client);
        let now = Instant::now();
        // A DO client needs an entry fetched with DO; anything else is a miss to it.
        let stale = match self.cache.lookup_cd(q, asked.checking_disabled, now) {
            Lookup::Fresh(entry) if entry.serves(asked.dnssec_ok) => {
                self.metrics.cache_hit();
                return Resolved::Entry(entry, Source::Cache);
            }
            Lookup::Expired(entry) if entry.serves(asked.dnssec_ok) => Some(entry),
            _ => None,
        };
        if self.cache.failed_recently(q, asked.checking_disabled, now) {
            // RFC 8767 before RFC 9520: stale data rather than the remembered failure.
            return match stale {
                Some(entry) => {
                    self.metrics.stale_served();
                    Resolved::Entry(entry, Source::Stale)
                }
                None => {
                    self.metrics.cached_failure_answers.inc();
                    Resolved::Answered(Answered::unsigned(Answer::servfail(), Source::Cache))
                }
            };
        }
        self.metrics.cache_miss();
        let group = self.router.group_for(&q.name).clone();
        let metrics = self.metrics.clone();
        let question = q.clone();
        let permits = self.inflight.clone();
        let fetched = self
            .cache
            .fetch_dnssec(q, asked, move || async move {
                let Ok(_permit) = permits.try_acquire_owned() else {
                    metrics.upstream_rejected.inc();
                    return Err(FetchError::Overloaded);
                };
                group.query(&question, asked, &metrics).await
            })
            .await;
        match (fetched, stale) {
            (Ok(entry), _) => Resolved::Entry(entry, Source::Upstream),
            (Err(_), Some(stale)) => {
                self.metrics.stale_served();
                Resolved::Entry(stale, Source::Stale)
            }
            (Err(e), None) => {
                tracing::debug!(name = %q.name, qtype = %q.qtype, error = %e, "upstream failed");
                Resolved::Answered(Answered::unsigned(Answer::servfail(), Source::Upstream))
            }
        }
    }

    fn finish(&self, mut answer: Answer) -> Answer {
        if self.shuffle {
            use rand::seq::SliceRandom;
            answer.answers.shuffle(&mut rand::rng());
        }
        answer
    }
}

#[async_trait::async_trait]
impl AnswerSource for Forwarder {
    /// For a client without DNSSEC bits (and the Consul source's CNAME targets: Consul answers
    /// are unsigned, so is what they are completed with).
    async fn answer(&self, q: &Question, _limit: usize) -> (Answer, Source) {
        let answered = self.answer_for(q, Dnssec::default()).await;
        (answered.answer, answered.source)
    }

    async fn answer_dnssec(&self, q: &Question, _limit: usize, dnssec: Dnssec) -> Answered {
        self.answer_for(q, dnssec).await
    }

    fn answers_address(&self, ip: IpAddr) -> bool {
        self.reverse_networks.iter().any(|net| net.contains(&ip))
    }

    /// The miss of `reply_from_cache`, answered from the entry's bytes once fetched (or from a
    /// stale one), or with SERVFAIL written here; `None` only when the entry's bytes do not make
    /// this client's reply (too large to cut here, see `CachedAnswer::write_reply`), and the
    /// general way then answers from the entry just stored (counted as a miss, then a hit).
    async fn reply_fetched(
        &self,
        query: &PlainQuery<'_>,
        key: &[u8],
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Option<Source> {
        let q = Question::from_wire(key)?;
        let client = Dnssec {
            dnssec_ok: query.dnssec_ok,
            checking_disabled: query.checking_disabled,
            authentic_data: query.authentic_data,
        };
        match self.resolve(&q, client).await {
            Resolved::Entry(entry, source) => {
                let stale = source == Source::Stale;
                if !entry.write_reply(out, query, limit, Instant::now(), stale, self.shuffle) {
                    out.clear();
                    return None;
                }
                if self.authentic(&entry, client) {
                    header::set_flags(out, header::AD);
                }
                Some(source)
            }
            Resolved::Answered(answered) => {
                let answer = &answered.answer;
                if !(answer.answers.is_empty()
                    && answer.authorities.is_empty()
                    && answer.additionals.is_empty())
                {
                    return None;
                }
                raw::write_rcode_reply(out, query, answer.rcode.low());
                Some(answered.source)
            }
        }
    }

    /// Fresh cached bytes only: expired entries go the general way, which refreshes.
    fn reply_from_cache(
        &self,
        query: &PlainQuery<'_>,
        key: &[u8],
        limit: usize,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> bool {
        let client = Dnssec {
            dnssec_ok: query.dnssec_ok,
            checking_disabled: query.checking_disabled,
            authentic_data: query.authentic_data,
        };
        let asked = self.upstream_flags(client);
        let Lookup::Fresh(entry) = self.cache.lookup_wire(key, asked.checking_disabled, now) else {
            return false;
        };
        if !entry.serves(asked.dnssec_ok)
            || !entry.write_reply(out, query, limit, now, false, self.shuffle)
        {
            return false;
        }
        if self.authentic(&entry, client) {
            header::set_flags(out, header::AD);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::OpCode;
    use tokio::net::UdpSocket;

    fn question(name: &str) -> Question {
        Question {
            name: Name::from_ascii(name).expect("name"),
            qtype: RecordType::A,
            qclass: hickory_proto::rr::DNSClass::IN,
        }
    }

    fn reply(id: u16, name: &str) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            RecordType::A,
        ));
        m.to_vec().expect("encode")
    }

    #[test]
    fn randomized_case_changes_only_letter_case() {
        let name = Name::from_ascii("abcdefghijklmnop-0123.example.").expect("name");
        let spellings: Vec<Name> = (0..8).map(|_| randomized_case(&name)).collect();
        assert!(spellings.iter().all(|s| s == &name && s.is_fqdn()));
        assert!(
            spellings.iter().any(|s| !s.eq_case(&name)),
            "some letters change case"
        );
    }

    #[test]
    fn replies_are_classified() {
        let q = question("a.example.");
        let sent = Name::from_ascii("A.eXample.").expect("name");
        assert!(check(&reply(7, "A.eXample."), 7, &q, &sent, true).is_ok());
        assert_eq!(
            check(&reply(8, "A.eXample."), 7, &q, &sent, true).err(),
            Some(Mismatch::Id)
        );
        assert_eq!(
            check(&reply(7, "b.example."), 7, &q, &sent, true).err(),
            Some(Mismatch::Question)
        );
        assert_eq!(
            check(&reply(7, "a.example."), 7, &q, &sent, true).err(),
            Some(Mismatch::Case)
        );
        assert!(
            check(&reply(7, "a.example."), 7, &q, &sent, false).is_ok(),
            "case is checked only when randomised"
        );
        assert_eq!(
            check(&[0u8; 5], 7, &q, &sent, true).err(),
            Some(Mismatch::Malformed)
        );
    }

    /// A loopback DNS server for the failover tests: answers every question with `rcode` (echoing
    /// ID and question), or never answers when `rcode` is `None`. Counts what it received.
    async fn fake_server(
        rcode: Option<ResponseCode>,
    ) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("addr");
        let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = received.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                seen.fetch_add(1, Ordering::SeqCst);
                let (Some(rcode), Ok(query)) = (rcode, Message::from_vec(&buf[..len])) else {
                    continue;
                };
                let mut m = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
                m.metadata.response_code = rcode;
                for q in query.queries {
                    m.add_query(q);
                }
                let _ = socket.send_to(&m.to_vec().expect("encode"), from).await;
            }
        });
        (addr, received)
    }

    fn metrics() -> Arc<Metrics> {
        Metrics::new(&prometheus::Registry::new()).expect("metrics")
    }

    #[tokio::test]
    async fn a_silent_first_server_costs_one_timeout_then_the_good_one_is_asked_first() {
        let (silent, silent_got) = fake_server(None).await;
        let (good, good_got) = fake_server(Some(ResponseCode::NoError)).await;
        let group = ServerGroup::new(vec![silent, good], Duration::from_secs(2));
        let m = metrics();
        let started = Instant::now();
        let reply = group
            .query(&question("a.example."), Dnssec::default(), &m)
            .await
            .expect("answer");
        assert_eq!(reply.rcode(), ResponseCode::NoError);
        assert_eq!(
            silent_got.load(Ordering::SeqCst),
            1,
            "the first server was tried"
        );
        assert_eq!(good_got.load(Ordering::SeqCst), 1);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "within the deadline"
        );
        // The server that answered is tried first from now on: no more waiting on the silent one.
        let started = Instant::now();
        for _ in 0..3 {
            group
                .query(&question("a.example."), Dnssec::default(), &m)
                .await
                .expect("answer");
        }
        assert_eq!(silent_got.load(Ordering::SeqCst), 1, "not asked again");
        assert_eq!(good_got.load(Ordering::SeqCst), 4);
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    /// A server that answers is not asked the same question again: its SERVFAIL is the answer
    /// (a silent one gets the second try, for a lost datagram).
    #[tokio::test]
    async fn a_lone_failing_server_is_asked_once() {
        let (servfail, got) = fake_server(Some(ResponseCode::ServFail)).await;
        let group = ServerGroup::new(vec![servfail], Duration::from_secs(2));
        let failed = group
            .query(&question("d.example."), Dnssec::default(), &metrics())
            .await;
        assert!(matches!(
            failed,
            Err(FetchError::Rcode(ResponseCode::ServFail))
        ));
        assert_eq!(got.load(Ordering::SeqCst), 1);
        let (silent, got) = fake_server(None).await;
        let group = ServerGroup::new(vec![silent], Duration::from_millis(400));
        let failed = group
            .query(&question("d.example."), Dnssec::default(), &metrics())
            .await;
        assert!(matches!(failed, Err(FetchError::Timeout(_))));
        assert_eq!(got.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn upstream_queries_carry_the_dnssec_bits_asked_for() {
        let q = question("e.example.");
        for flags in [
            Dnssec::default(),
            Dnssec {
                dnssec_ok: true,
                checking_disabled: true,
                authentic_data: true,
            },
        ] {
            let bytes = build_query(9, &q, &q.name, flags).expect("encode");
            let m = Message::from_vec(&bytes).expect("decode");
            assert_eq!(m.metadata.checking_disabled, flags.checking_disabled);
            assert_eq!(m.metadata.authentic_data, flags.authentic_data);
            let edns = m.edns.expect("EDNS always");
            assert_eq!(edns.flags().dnssec_ok, flags.dnssec_ok);
            assert_eq!(edns.max_payload(), UPSTREAM_EDNS_SIZE);
        }
    }

    #[tokio::test]
    async fn servfail_and_refused_move_on_to_the_next_server() {
        for bad in [ResponseCode::ServFail, ResponseCode::Refused] {
            let (first, first_got) = fake_server(Some(bad)).await;
            let (second, second_got) = fake_server(Some(ResponseCode::NXDomain)).await;
            let group = ServerGroup::new(vec![first, second], Duration::from_secs(2));
            let reply = group
                .query(&question("b.example."), Dnssec::default(), &metrics())
                .await
                .expect("answer");
            assert_eq!(reply.rcode(), ResponseCode::NXDomain, "{bad:?}");
            assert_eq!(first_got.load(Ordering::SeqCst), 1);
            assert_eq!(second_got.load(Ordering::SeqCst), 1);
        }
    }

    #[tokio::test]
    async fn every_server_silent_fails_at_the_deadline() {
        let (a, _) = fake_server(None).await;
        let (b, _) = fake_server(None).await;
        let group = ServerGroup::new(vec![a, b], Duration::from_millis(600));
        let started = Instant::now();
        assert!(group
            .query(&question("c.example."), Dnssec::default(), &metrics())
            .await
            .is_err());
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }
}
