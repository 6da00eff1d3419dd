//! Forwarding to upstream resolvers: a transparent DNS client (UDP, TCP when the reply is
//! truncated, failover across servers within one deadline), the zone routing of `[[forward]]`, and
//! the answer source that puts the cache in front of it.
//!
//! Why not hickory-resolver's `lookup()`: it chases CNAMEs, answers RFC 6761 names itself, loses
//! flags and turns an upstream SERVFAIL into an error (see ARCHITECTURE.md). A forwarder must pass
//! the upstream's answer through unchanged, so this client sends the question and returns the
//! upstream's message as it came; hickory-proto does the encoding.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::cache::{Cache, FetchError, Lookup};
use crate::metrics::Metrics;
use crate::packet::PlainQuery;
use crate::wire::{self, Answer, Question};

/// The EDNS size we offer upstreams: the same 1232 bytes we accept from clients.
const UPSTREAM_EDNS_SIZE: u16 = wire::UDP_LIMIT_EDNS as u16;

/// Every attempt gets at least this long, even when many servers share a short deadline.
const MIN_ATTEMPT: Duration = Duration::from_millis(100);

/// Where an answer came from, for metrics and the query log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Cache,
    Upstream,
    Stale,
    Consul,
    Local,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Upstream => "upstream",
            Source::Stale => "stale",
            Source::Consul => "consul",
            Source::Local => "local",
        }
    }
}

/// A set of servers tried in order (starting with the last one that answered), all within one
/// deadline.
#[derive(Debug)]
pub struct ServerGroup {
    servers: Vec<SocketAddr>,
    timeout: Duration,
    /// Index of the server that answered last: tried first next time, so a dead first server
    /// costs one timeout, not one per query.
    preferred: AtomicUsize,
}

impl ServerGroup {
    pub fn new(servers: Vec<SocketAddr>, timeout: Duration) -> ServerGroup {
        ServerGroup {
            servers,
            timeout,
            preferred: AtomicUsize::new(0),
        }
    }

    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// Asks the servers for `q` and returns the first usable reply (any rcode but SERVFAIL,
    /// REFUSED, NOTIMP and FORMERR, which move on to the next server).
    pub async fn query(&self, q: &Question, metrics: &Metrics) -> Result<Message, FetchError> {
        let n = self.servers.len();
        if n == 0 {
            return Err(FetchError::Io("no upstream servers".into()));
        }
        let deadline = Instant::now() + self.timeout;
        let first = self.preferred.load(Ordering::Relaxed) % n;
        // With a single server, try it twice (a lost UDP datagram should not cost the deadline).
        let attempts = n.max(2);
        let mut last_error = FetchError::Timeout(self.timeout);
        for attempt in 0..attempts {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let index = (first + attempt) % n;
            let server = self.servers[index];
            let left = deadline - now;
            let per_attempt = (left / u32::try_from(attempts - attempt).unwrap_or(1))
                .max(MIN_ATTEMPT)
                .min(left);
            let started = Instant::now();
            let result = tokio::time::timeout(per_attempt, exchange(server, q)).await;
            let label = server.to_string();
            metrics.observe_upstream(&label, started.elapsed());
            match result {
                Ok(Ok(reply)) => match reply.metadata.response_code {
                    ResponseCode::ServFail
                    | ResponseCode::Refused
                    | ResponseCode::NotImp
                    | ResponseCode::FormErr => {
                        metrics.upstream_error(&label, "rcode");
                        last_error = FetchError::Rcode(reply.metadata.response_code);
                    }
                    _ => {
                        self.preferred.store(index, Ordering::Relaxed);
                        return Ok(reply);
                    }
                },
                Ok(Err(e)) => {
                    metrics.upstream_error(&label, "io");
                    last_error = FetchError::Io(format!("{server}: {e}"));
                }
                Err(_) => {
                    metrics.upstream_error(&label, "timeout");
                    if !matches!(last_error, FetchError::Rcode(_)) {
                        last_error = FetchError::Timeout(self.timeout);
                    }
                }
            }
        }
        Err(last_error)
    }
}

/// One question to one server: UDP first, TCP when the UDP reply is truncated.
async fn exchange(server: SocketAddr, q: &Question) -> std::io::Result<Message> {
    let id: u16 = rand::random();
    let request = build_query(id, q)?;
    let reply = exchange_udp(server, &request, id, q).await?;
    if reply.metadata.truncation {
        return exchange_tcp(server, &request, id, q).await;
    }
    Ok(reply)
}

fn build_query(id: u16, q: &Question) -> std::io::Result<Vec<u8>> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    let mut query = Query::query(q.name.clone(), q.qtype);
    query.set_query_class(q.qclass);
    msg.add_query(query);
    let mut edns = Edns::new();
    edns.set_max_payload(UPSTREAM_EDNS_SIZE);
    msg.edns = Some(edns);
    msg.to_vec().map_err(std::io::Error::other)
}

/// Is `reply` the answer to our query (ID and question match)? Anything else on the socket is
/// ignored, which also defeats blind spoofing from other ports (the socket is connected).
fn matches(reply: &Message, id: u16, q: &Question) -> bool {
    reply.metadata.id == id
        && reply.metadata.message_type == MessageType::Response
        && reply.queries.len() == 1
        && reply.queries[0].name() == &q.name
        && reply.queries[0].query_type() == q.qtype
        && reply.queries[0].query_class() == q.qclass
}

async fn exchange_udp(
    server: SocketAddr,
    request: &[u8],
    id: u16,
    q: &Question,
) -> std::io::Result<Message> {
    let bind: SocketAddr = match server.ip() {
        IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(server).await?;
    socket.send(request).await?;
    let mut buf = vec![0u8; usize::from(UPSTREAM_EDNS_SIZE).max(4096)];
    loop {
        let len = socket.recv(&mut buf).await?;
        if let Ok(reply) = Message::from_vec(&buf[..len]) {
            if matches(&reply, id, q) {
                return Ok(reply);
            }
        }
    }
}

async fn exchange_tcp(
    server: SocketAddr,
    request: &[u8],
    id: u16,
    q: &Question,
) -> std::io::Result<Message> {
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
        if let Ok(reply) = Message::from_vec(&buf) {
            if matches(&reply, id, q) {
                return Ok(reply);
            }
        }
    }
}

/// `[[forward]]` zones and the default servers: the longest matching zone wins.
#[derive(Debug)]
pub struct Router {
    zones: Vec<(Name, Arc<ServerGroup>)>,
    default: Arc<ServerGroup>,
}

impl Router {
    pub fn new(default: ServerGroup, zones: Vec<(Name, ServerGroup)>) -> Router {
        let mut zones: Vec<(Name, Arc<ServerGroup>)> =
            zones.into_iter().map(|(z, g)| (z, Arc::new(g))).collect();
        // Most labels first, so the first match is the longest.
        zones.sort_by_key(|(z, _)| std::cmp::Reverse(z.num_labels()));
        Router {
            zones,
            default: Arc::new(default),
        }
    }

    pub fn group_for(&self, name: &Name) -> &Arc<ServerGroup> {
        self.zones
            .iter()
            .find(|(zone, _)| zone.zone_of(name))
            .map_or(&self.default, |(_, g)| g)
    }
}

/// Forwarded names: cache first, upstream on a miss, stale data when the upstream fails.
pub struct Forwarder {
    router: Router,
    cache: Cache,
    metrics: Arc<Metrics>,
    /// Shuffle answer records on every response (the dnsmasq-compatible Consul mode, where round
    /// robin must survive our cache).
    shuffle: bool,
    /// Upstream fetches in flight (`upstream.max_inflight`).
    inflight: Arc<tokio::sync::Semaphore>,
}

impl Forwarder {
    pub fn new(router: Router, cache: Cache, metrics: Arc<Metrics>, shuffle: bool) -> Forwarder {
        Forwarder {
            router,
            cache,
            metrics,
            shuffle,
            inflight: Arc::new(tokio::sync::Semaphore::new(
                crate::config::DEFAULT_UPSTREAM_INFLIGHT,
            )),
        }
    }

    /// Caps upstream fetches in flight; a miss beyond the cap is answered at once (stale data or
    /// SERVFAIL) instead of queueing behind a slow upstream.
    pub fn with_max_inflight(mut self, max: usize) -> Forwarder {
        // Config validation clamps too; this keeps any caller from the semaphore's panic.
        let permits = max.clamp(1, crate::config::MAX_CONCURRENCY_LIMIT);
        self.inflight = Arc::new(tokio::sync::Semaphore::new(permits));
        self
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The answer for `q`, and where it came from. Never fails: when nothing can be had in time,
    /// the answer is SERVFAIL.
    pub async fn answer(&self, q: &Question) -> (Answer, Source) {
        if q.qtype == RecordType::ANY {
            // RFC 8482, without asking anyone.
            return (
                wire::minimal_any_answer(&Query::query(q.name.clone(), q.qtype)),
                Source::Local,
            );
        }
        let now = Instant::now();
        let expired = match self.cache.lookup(q, now) {
            Lookup::Fresh(entry) => {
                self.metrics.cache_hit();
                return (self.finish(entry.to_answer(now, false)), Source::Cache);
            }
            Lookup::Expired(entry) => Some(entry),
            Lookup::Miss => None,
        };
        self.metrics.cache_miss();
        let group = self.router.group_for(&q.name).clone();
        let metrics = self.metrics.clone();
        let question = q.clone();
        let permits = self.inflight.clone();
        let fetched = self
            .cache
            .fetch(q, move || async move {
                let Ok(_permit) = permits.try_acquire_owned() else {
                    metrics.upstream_rejected.inc();
                    return Err(FetchError::Overloaded);
                };
                group.query(&question, &metrics).await
            })
            .await;
        match (fetched, expired) {
            (Ok(entry), _) => (
                self.finish(entry.to_answer(Instant::now(), false)),
                Source::Upstream,
            ),
            (Err(_), Some(stale)) => {
                self.metrics.stale_served();
                (
                    self.finish(stale.to_answer(Instant::now(), true)),
                    Source::Stale,
                )
            }
            (Err(e), None) => {
                tracing::debug!(name = %q.name, qtype = %q.qtype, error = %e, "upstream failed");
                (Answer::servfail(), Source::Upstream)
            }
        }
    }

    /// The hot path: the reply to `query` from fresh cached bytes, if there are any (see
    /// `AnswerSource::reply_from_cache`). Expired entries go the general way, which refreshes.
    pub fn reply_from_cache(
        &self,
        query: &PlainQuery<'_>,
        key: &[u8],
        limit: usize,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> bool {
        let Lookup::Fresh(entry) = self.cache.lookup_wire(key, now) else {
            return false;
        };
        if !entry.write_reply(out, query, limit, now, false, self.shuffle) {
            return false;
        }
        self.metrics.cache_hit();
        true
    }

    fn finish(&self, mut answer: Answer) -> Answer {
        if self.shuffle {
            use rand::seq::SliceRandom;
            answer.answers.shuffle(&mut rand::rng());
        }
        answer
    }
}
