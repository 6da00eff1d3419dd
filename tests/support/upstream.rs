//! A small authoritative DNS server for the zone `test.`, used by the
//! integration tests as the "upstream resolver" the forwarder forwards to.
//!
//! It is built on `hickory-server` so that the wire handling (UDP datagrams,
//! TCP length prefixes, question echo, EDNS parsing) is a real, independent
//! DNS implementation rather than something written alongside the code under
//! test. The zone data is fixed so tests can assert on exact answers:
//!
//! | name                | data                                                        |
//! |---------------------|-------------------------------------------------------------|
//! | `test.`             | SOA `ns.test. hostmaster.test. 1 3600 600 86400 60`, TTL 3600 |
//! | `a.test.`           | A 192.0.2.1, TTL 300                                        |
//! | `two.test.`         | A 192.0.2.1, A 192.0.2.2, TTL 300                           |
//! | `v6.test.`          | AAAA 2001:db8::1, TTL 300                                   |
//! | `short.test.`       | A 192.0.2.3, TTL 2                                          |
//! | `www.test.`         | CNAME `a.test.`, TTL 300 (A answer also carries `a.test.` A)  |
//! | `txt.test.`         | TXT "hello world", TTL 300                                  |
//! | `who.test.`         | TXT "<label>", TTL 300 (tells upstreams apart)              |
//! | `big.test.`         | 100 × A 198.51.100.1–100, TTL 300 (truncated over UDP)      |
//! | `slow-<ms>.test.`   | A 192.0.2.9, TTL 300, answered after `<ms>` milliseconds     |
//! | `servfail.test.`    | SERVFAIL                                                    |
//! | `refused.test.`     | REFUSED                                                     |
//! | `silent.test.`      | never answered (counted): a timeout for this name only       |
//! | other `*.test.`     | NXDOMAIN + SOA                                              |
//! | `1.2.0.192.in-addr.arpa.` | PTR `a.test.`, TTL 300 (the reverse of 192.0.2.1)     |
//! | `1.0.….8.b.d.0.1.0.0.2.ip6.arpa.` | PTR `v6.test.`, TTL 300 (the reverse of 2001:db8::1) |
//! | other names under `in-addr.arpa.` and `ip6.arpa.` | NXDOMAIN + SOA `arpa.` (what a resolver answers for an address nobody named) |
//! | outside these       | REFUSED (not authoritative)                                 |
//!
//! Two misbehaviours can be switched on, for the forwarder's spoofing defences:
//! [`TestUpstream::set_lowercase_replies`] (the question in replies is lowercased, as by
//! upstreams that do not preserve case, defeating DNS 0x20) and
//! [`TestUpstream::set_spoof_first`] (over UDP, each real reply is preceded by two forged ones:
//! a wrong ID, then a wrong question, both answering [`SPOOFED_ADDRESS`]).
//! [`TestUpstream::received_names`] lists the question names exactly as they arrived.
//!
//! [`PackedUpstream`] is another upstream, for one case hickory cannot serve: an answer
//! compressed as BIND and unbound compress it (every owner a pointer), so large that hickory,
//! which compresses at most 120 names, cannot encode it again within 64 KiB.
//!
//! Owner names equal to the question are written in the question's case, as servers that
//! compress them into a pointer at the question do (BIND, Unbound): a forwarder using DNS 0x20
//! gets its random case back in the answers.
//!
//! Every answer from the zone has AA=1; NXDOMAIN and NODATA answers carry the
//! SOA in the authority section (RFC 2308), so negative caching can be tested
//! (negative TTL = min(SOA TTL 3600, minimum 60) = 60 s).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::iter;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, PTR, SOA, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecoder, BinEncoder};
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponseBuilder, Queries};
use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

/// The address forged replies answer (TEST-NET-3): a client that sees it was fooled.
pub const SPOOFED_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);

/// The question of the forged reply whose ID is right but question wrong.
const SPOOFED_NAME: &str = "spoofed.test.";

/// Label served by `who.test.` when none is given.
pub const DEFAULT_LABEL: &str = "upstream";

/// The zone apex, normalised (see [`normalize`]).
const ZONE: &str = "test";

/// How long hickory keeps an idle TCP connection open. Generous so that a
/// delayed (`slow-<ms>.test.`) reply on an otherwise idle connection is not
/// cut off; tests that need the connection gone call `stop()` instead.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Per-connection queue of outgoing TCP responses inside hickory.
const TCP_RESPONSE_BUFFER: usize = 64;

/// With port 0 the UDP socket picks a free port and TCP must then bind the
/// same one; another process may hold it for TCP, so retry a few times.
const BIND_ATTEMPTS: usize = 50;

/// The name never answered (normalised): each query for it times out.
const SILENT_NAME: &str = "silent.test";

/// Longest CNAME chain followed inside the zone before giving up (SERVFAIL).
const MAX_CNAME_CHAIN: usize = 8;

/// A running upstream DNS server on 127.0.0.1 (UDP and TCP on the same port).
///
/// Dropping it stops it, like [`TestUpstream::stop`] but without waiting.
pub struct TestUpstream {
    /// Where to send queries: UDP and TCP share this address.
    pub addr: SocketAddr,
    stats: Arc<Stats>,
    /// Cancels delayed replies that the handler spawned itself (hickory's own
    /// token is private to the `Server`, and the handler exists before it).
    shutdown: CancellationToken,
    /// `None` once `stop` has taken it.
    server: Option<Server<UpstreamHandler>>,
}

impl TestUpstream {
    /// Binds UDP and TCP on the same free port of 127.0.0.1, with the default
    /// `who.test.` label (`"upstream"`).
    ///
    /// Panics if no port can be bound: tests cannot proceed without one.
    pub async fn start() -> TestUpstream {
        Self::start_labeled(DEFAULT_LABEL).await
    }

    /// Like [`TestUpstream::start`], but `who.test.` TXT answers `label`, so a
    /// test with several upstreams can tell which one answered.
    pub async fn start_labeled(label: &str) -> TestUpstream {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), label)
            .await
            .expect("TestUpstream: could not bind UDP and TCP on the same port of 127.0.0.1")
    }

    /// Binds UDP and TCP on `addr` (port 0 picks one free port for both;
    /// a fixed port lets a test restart an upstream where it was).
    ///
    /// Returns `Err` if binding fails, and `InvalidInput` for a non-loopback
    /// address: test traffic must never leave the machine.
    pub async fn start_on(addr: SocketAddr, label: &str) -> io::Result<TestUpstream> {
        if !addr.ip().is_loopback() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("TestUpstream only binds loopback addresses, not {addr}"),
            ));
        }
        let (udp, tcp) = bind_pair(addr).await?;
        let addr = udp.local_addr()?;
        let udp = udp.into_std()?;
        let forger = Arc::new(udp.try_clone()?);
        let udp = UdpSocket::from_std(udp)?;

        let stats = Arc::new(Stats::default());
        let shutdown = CancellationToken::new();
        let handler = UpstreamHandler {
            forger,
            zone: Arc::new(Zone::new(label)),
            stats: Arc::clone(&stats),
            shutdown: shutdown.clone(),
        };
        let mut server = Server::new(handler);
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);

        Ok(TestUpstream {
            addr,
            stats,
            shutdown,
            server: Some(server),
        })
    }

    /// Total queries received (UDP + TCP), including black-holed ones.
    pub fn queries(&self) -> usize {
        self.stats.total.load(Ordering::SeqCst)
    }

    /// Queries received for one (name, type). The name is compared
    /// case-insensitively and the trailing dot is optional (`"a.test"` and
    /// `"A.Test."` are the same).
    pub fn queries_for(&self, name: &str, rtype: RecordType) -> usize {
        let per_query = self
            .stats
            .per_query
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        per_query
            .get(&(normalize(name), rtype))
            .copied()
            .unwrap_or(0)
    }

    /// Queries received over TCP.
    pub fn tcp_queries(&self) -> usize {
        self.stats.tcp.load(Ordering::SeqCst)
    }

    /// Queries received over UDP.
    pub fn udp_queries(&self) -> usize {
        self.stats.udp.load(Ordering::SeqCst)
    }

    /// While on, queries are received and counted but never answered, to
    /// simulate an upstream that has gone silent (timeouts, failover).
    pub fn set_blackhole(&self, on: bool) {
        self.stats.blackhole.store(on, Ordering::SeqCst);
    }

    /// While on, replies carry the question name lowercased instead of echoing its case,
    /// like upstreams that do not preserve case (DNS 0x20 cannot work with them).
    pub fn set_lowercase_replies(&self, on: bool) {
        self.stats.lowercase_replies.store(on, Ordering::SeqCst);
    }

    /// While on, every UDP reply is preceded by two forged replies to the same client: one
    /// with a wrong ID, one with the right ID and another question (`spoofed.test.`), both
    /// answering [`SPOOFED_ADDRESS`].
    pub fn set_spoof_first(&self, on: bool) {
        self.stats.spoof_first.store(on, Ordering::SeqCst);
    }

    /// Every question name received, in arrival order, exactly as written (case kept, with the
    /// trailing dot).
    pub fn received_names(&self) -> Vec<String> {
        self.stats
            .names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops serving and waits until the UDP socket and TCP listener are
    /// closed, so later queries get ICMP port unreachable / connection
    /// refused. Already accepted TCP connections are aborted right after.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(mut server) = self.server.take() {
            if let Err(error) = server.shutdown_gracefully().await {
                tracing::warn!(%error, addr = %self.addr, "TestUpstream: error while stopping");
            }
        }
    }
}

impl Drop for TestUpstream {
    /// Cancelling makes hickory's tasks return (closing the sockets); dropping
    /// the `Server` afterwards aborts whatever is left of them.
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(server) = &self.server {
            server.shutdown_token().cancel();
        }
    }
}

impl fmt::Debug for TestUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestUpstream")
            .field("addr", &self.addr)
            .field("queries", &self.queries())
            .field("udp_queries", &self.udp_queries())
            .field("tcp_queries", &self.tcp_queries())
            .field("blackhole", &self.stats.blackhole.load(Ordering::SeqCst))
            .field("running", &self.server.is_some())
            .finish()
    }
}

/// Binds a UDP socket and a TCP listener on the same address. With port 0,
/// UDP picks the port and TCP follows; if TCP cannot have that port, both are
/// dropped and another port is tried.
async fn bind_pair(addr: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    if addr.port() != 0 {
        let udp = UdpSocket::bind(addr).await?;
        let tcp = TcpListener::bind(addr).await?;
        return Ok((udp, tcp));
    }
    let mut last_error = None;
    for _ in 0..BIND_ATTEMPTS {
        let udp = UdpSocket::bind(addr).await?;
        let chosen = udp.local_addr()?;
        match TcpListener::bind(chosen).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| io::Error::other("no port could be bound")))
}

/// Counters shared between the handler and the [`TestUpstream`] handle.
#[derive(Default)]
struct Stats {
    total: AtomicUsize,
    udp: AtomicUsize,
    tcp: AtomicUsize,
    /// Keyed by (normalised name, type).
    per_query: Mutex<HashMap<(String, RecordType), usize>>,
    /// Question names as received, case kept.
    names: Mutex<Vec<String>>,
    blackhole: AtomicBool,
    lowercase_replies: AtomicBool,
    spoof_first: AtomicBool,
}

impl Stats {
    fn count(&self, request: &Request) {
        {
            let mut per_query = self
                .per_query
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for query in request.queries.queries() {
                let key = (normalize(&query.name().to_string()), query.query_type());
                *per_query.entry(key).or_default() += 1;
            }
        }
        self.names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(
                request
                    .queries
                    .queries()
                    .iter()
                    .map(|q| q.original().name().to_ascii()),
            );
        match request.protocol() {
            Protocol::Udp => self.udp.fetch_add(1, Ordering::SeqCst),
            Protocol::Tcp => self.tcp.fetch_add(1, Ordering::SeqCst),
            _ => 0,
        };
        self.total.fetch_add(1, Ordering::SeqCst);
    }
}

/// Lower-case, without the trailing dot: the one spelling used for lookups
/// and counters, so callers may write names either way.
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn in_zone(key: &str) -> bool {
    key == ZONE || key.ends_with(".test") || in_reverse_zone(key)
}

/// The reverse names the upstream answers for (any address, as a recursive resolver would).
fn in_reverse_zone(key: &str) -> bool {
    ["in-addr.arpa", "ip6.arpa"]
        .iter()
        .any(|zone| key == *zone || key.ends_with(&format!(".{zone}")))
}

/// `slow-<ms>.test` → the delay before answering.
fn slow_delay(key: &str) -> Option<Duration> {
    key.strip_prefix("slow-")?
        .strip_suffix(".test")?
        .parse::<u64>()
        .ok()
        .map(Duration::from_millis)
}

/// What to answer to one request, decided before anything is sent.
#[derive(Debug, Clone)]
struct Reply {
    rcode: ResponseCode,
    authoritative: bool,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    /// `Some` for `slow-<ms>.test.`: send only after this long.
    delay: Option<Duration>,
}

impl Reply {
    fn empty(rcode: ResponseCode, authoritative: bool) -> Self {
        Reply {
            rcode,
            authoritative,
            answers: Vec::new(),
            authorities: Vec::new(),
            delay: None,
        }
    }
}

/// The fixed data of the zone `test.` and of the reverse names.
struct Zone {
    soa: Record,
    /// The SOA of negative answers for reverse names.
    reverse_soa: Record,
    /// Keyed by normalised owner name.
    rrsets: HashMap<String, Vec<Record>>,
}

impl Zone {
    fn new(label: &str) -> Self {
        fn name(ascii: &str) -> Name {
            Name::from_ascii(ascii).expect("static zone name is valid")
        }
        let mut rrsets: HashMap<String, Vec<Record>> = HashMap::new();
        let mut add = |owner: &str, ttl: u32, rdata: RData| {
            rrsets
                .entry(normalize(owner))
                .or_default()
                .push(Record::from_rdata(name(owner), ttl, rdata));
        };

        // The SOA of the zone `test.`, and the one reverse names' negative answers carry.
        let soa_of = |zone: &str| {
            Record::from_rdata(
                name(zone),
                3600,
                RData::SOA(SOA::new(
                    name("ns.test."),
                    name("hostmaster.test."),
                    1,
                    3600,
                    600,
                    86400,
                    60,
                )),
            )
        };
        let soa = soa_of("test.");
        add("test.", soa.ttl, soa.data.clone());

        add("a.test.", 300, RData::A(A(Ipv4Addr::new(192, 0, 2, 1))));
        add("two.test.", 300, RData::A(A(Ipv4Addr::new(192, 0, 2, 1))));
        add("two.test.", 300, RData::A(A(Ipv4Addr::new(192, 0, 2, 2))));
        add(
            "v6.test.",
            300,
            RData::AAAA(AAAA(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))),
        );
        add("short.test.", 2, RData::A(A(Ipv4Addr::new(192, 0, 2, 3))));
        add("www.test.", 300, RData::CNAME(CNAME(name("a.test."))));
        add(
            "txt.test.",
            300,
            RData::TXT(TXT::new(vec!["hello world".to_string()])),
        );
        add(
            "who.test.",
            300,
            RData::TXT(TXT::new(vec![label.to_string()])),
        );
        for i in 1..=100u8 {
            add(
                "big.test.",
                300,
                RData::A(A(Ipv4Addr::new(198, 51, 100, i))),
            );
        }
        add(
            "1.2.0.192.in-addr.arpa.",
            300,
            RData::PTR(PTR(name("a.test."))),
        );
        let v6_reverse = format!("1.{}8.b.d.0.1.0.0.2.ip6.arpa.", "0.".repeat(23));
        add(&v6_reverse, 300, RData::PTR(PTR(name("v6.test."))));

        Zone {
            soa,
            reverse_soa: soa_of("arpa."),
            rrsets,
        }
    }

    /// The SOA of a negative answer for `key`.
    fn soa_for(&self, key: &str) -> &Record {
        if in_reverse_zone(key) {
            &self.reverse_soa
        } else {
            &self.soa
        }
    }

    /// Records owned by `key`, including the synthesised `slow-<ms>.test.`.
    fn rrset(&self, key: &str) -> Option<Vec<Record>> {
        if let Some(records) = self.rrsets.get(key) {
            return Some(records.clone());
        }
        slow_delay(key)?;
        let owner = Name::from_ascii(format!("{key}.")).ok()?;
        Some(vec![Record::from_rdata(
            owner,
            300,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 9))),
        )])
    }

    fn answer(&self, request: &Request) -> Reply {
        if request.metadata.op_code != OpCode::Query {
            return Reply::empty(ResponseCode::NotImp, false);
        }
        let [query] = request.queries.queries() else {
            return Reply::empty(ResponseCode::FormErr, false);
        };
        let key = normalize(&query.name().to_string());
        if query.query_class() != DNSClass::IN || !in_zone(&key) {
            return Reply::empty(ResponseCode::Refused, false);
        }
        self.resolve(&key, query.query_type())
    }

    fn resolve(&self, qkey: &str, qtype: RecordType) -> Reply {
        match qkey {
            "servfail.test" => return Reply::empty(ResponseCode::ServFail, true),
            "refused.test" => return Reply::empty(ResponseCode::Refused, true),
            _ => {}
        }
        let mut reply = Reply::empty(ResponseCode::NoError, true);
        reply.delay = slow_delay(qkey);

        let mut key = qkey.to_string();
        for _ in 0..MAX_CNAME_CHAIN {
            let Some(records) = self.rrset(&key) else {
                reply.rcode = ResponseCode::NXDomain;
                reply.authorities.push(self.soa_for(&key).clone());
                return reply;
            };
            let matching: Vec<Record> = records
                .iter()
                .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
                .cloned()
                .collect();
            if !matching.is_empty() {
                reply.answers.extend(matching);
                return reply;
            }
            let cname = records.iter().find_map(|r| match &r.data {
                RData::CNAME(target) => Some((r.clone(), normalize(&target.0.to_string()))),
                _ => None,
            });
            let Some((cname_record, target)) = cname else {
                // NODATA: the name exists but has no record of this type.
                reply.authorities.push(self.soa_for(&key).clone());
                return reply;
            };
            reply.answers.push(cname_record);
            if !in_zone(&target) {
                // Not ours to chase: the resolver continues from the CNAME.
                return reply;
            }
            key = target;
        }
        Reply::empty(ResponseCode::ServFail, true)
    }
}

/// The `RequestHandler` hickory calls for every decoded query.
struct UpstreamHandler {
    /// A duplicate of the UDP socket's descriptor, for [`send_forgeries`].
    forger: Arc<std::net::UdpSocket>,
    zone: Arc<Zone>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
}

#[async_trait::async_trait]
impl RequestHandler for UpstreamHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        self.stats.count(request);
        let silent = request
            .queries
            .queries()
            .iter()
            .any(|q| normalize(&q.name().to_string()) == SILENT_NAME);
        if silent || self.stats.blackhole.load(Ordering::SeqCst) {
            return unsent_info(request, ResponseCode::NoError);
        }

        let reply = self.zone.answer(request);
        let misbehave = Misbehave {
            lowercase: self.stats.lowercase_replies.load(Ordering::SeqCst),
            spoof_first: self
                .stats
                .spoof_first
                .load(Ordering::SeqCst)
                .then(|| self.forger.clone()),
        };
        let Some(delay) = reply.delay else {
            return send_reply(request, &reply, response_handle, misbehave).await;
        };

        // hickory serves a TCP connection's queries one after another, so a
        // delayed reply is sent from its own task: the handler returns at once
        // and later queries on the same connection are answered meanwhile
        // (out of order, as RFC 7766 allows). That task needs its own copy of
        // the request, which is borrowed only for this call.
        let owned = match Request::from_bytes(
            request.as_slice().to_vec(),
            request.src(),
            request.protocol(),
        ) {
            Ok(owned) => owned,
            Err(error) => {
                tracing::warn!(%error, "TestUpstream: could not re-read a delayed request");
                return unsent_info(request, ResponseCode::ServFail);
            }
        };
        let shutdown = self.shutdown.clone();
        let pending = unsent_info(request, reply.rcode);
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {
                    send_reply(&owned, &reply, response_handle, misbehave).await;
                }
                _ = shutdown.cancelled() => {}
            }
        });
        pending
    }
}

/// The `ResponseInfo` hickory wants back when nothing was sent (yet).
fn unsent_info(request: &Request, rcode: ResponseCode) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = rcode;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

/// OPT for the reply if and only if the query had one. Its payload size is
/// the client's (at least 512): hickory uses the response's OPT size as the
/// UDP limit when encoding, exactly as its own `Catalog` does.
fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|query_edns| {
        let mut edns = Edns::new();
        edns.set_max_payload(request.max_payload());
        edns.set_dnssec_ok(query_edns.flags().dnssec_ok);
        edns
    })
}

/// Whether the full reply fits in the client's UDP size (512 without EDNS,
/// the EDNS size otherwise), found by encoding it with hickory's encoder.
fn fits_udp(request: &Request, edns: Option<&Edns>, metadata: Metadata, reply: &Reply) -> bool {
    let limit = request.max_payload();
    let mut buffer = Vec::with_capacity(usize::from(limit));
    let mut encoder = BinEncoder::new(&mut buffer);
    encoder.set_max_size(limit);
    let trial = MessageResponseBuilder::new(&request.queries, edns).build(
        metadata,
        reply.answers.iter(),
        reply.authorities.iter(),
        iter::empty(),
        iter::empty(),
    );
    match trial.destructive_emit(&mut encoder) {
        Ok(info) => !info.truncation,
        Err(error) => {
            tracing::warn!(%error, "TestUpstream: trial encoding failed, truncating");
            false
        }
    }
}

/// Encodes and sends `reply`. Over UDP, a reply too big for the client is
/// sent as TC=1 with empty sections (plus OPT when the query had EDNS).
/// hickory alone already sets TC=1 and respects the limit, but it keeps as
/// many answers as fit and then drops the OPT whenever the leftover space is
/// too small for it (for `big.test.` with EDNS 1400, for one), which breaks
/// "EDNS query → OPT in reply"; an empty TC answer also leaves no partial
/// RRset that a forwarder could mistake for the whole one.
async fn send_reply<R: ResponseHandler>(
    request: &Request,
    reply: &Reply,
    mut response_handle: R,
    misbehave: Misbehave,
) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.authoritative = reply.authoritative;
    metadata.response_code = reply.rcode;
    let edns = response_edns(request);
    let lowered;
    let queries = if misbehave.lowercase {
        lowered = lowercase_queries(&request.queries);
        &lowered
    } else {
        &request.queries
    };
    let builder = MessageResponseBuilder::new(queries, edns.as_ref());
    let echoed;
    let reply = match queries.queries().first() {
        Some(question) => {
            let mut copy = reply.clone();
            let spelling = question.original().name();
            for record in copy.answers.iter_mut().chain(copy.authorities.iter_mut()) {
                if record.name == *spelling {
                    record.name = spelling.clone();
                }
            }
            echoed = copy;
            &echoed
        }
        None => reply,
    };

    let udp = matches!(request.protocol(), Protocol::Udp);
    if let Some(forger) = misbehave.spoof_first.filter(|_| udp) {
        send_forgeries(request, &forger);
    }
    let sent = if udp && !fits_udp(request, edns.as_ref(), metadata, reply) {
        metadata.truncation = true;
        response_handle
            .send_response(builder.build_no_records(metadata))
            .await
    } else {
        let response = builder.build(
            metadata,
            reply.answers.iter(),
            reply.authorities.iter(),
            iter::empty(),
            iter::empty(),
        );
        response_handle.send_response(response).await
    };
    match sent {
        Ok(info) => info,
        Err(error) => {
            tracing::warn!(%error, "TestUpstream: could not send a reply");
            unsent_info(request, ResponseCode::ServFail)
        }
    }
}

/// The switchable misbehaviours, read once per request.
#[derive(Debug, Clone)]
struct Misbehave {
    lowercase: bool,
    /// The socket forged replies are sent from, when on.
    spoof_first: Option<Arc<std::net::UdpSocket>>,
}

/// `queries` with every name lowercased, as an upstream that does not preserve case echoes
/// them. Only the name bytes are touched (type and class bytes may look like letters).
fn lowercase_queries(queries: &Queries) -> Queries {
    let mut bytes = queries.as_bytes().to_vec();
    let mut at = 0;
    for _ in 0..queries.len() {
        // Question names in a request are never compressed: plain labels to the root.
        while let Some(&len) = bytes.get(at) {
            at += 1;
            if len == 0 {
                break;
            }
            let end = (at + usize::from(len)).min(bytes.len());
            bytes[at..end].make_ascii_lowercase();
            at = end;
        }
        at += 4; // type and class
    }
    Queries::read(&mut BinDecoder::new(&bytes), queries.len())
        .expect("lowercased questions still decode")
}

/// The forged replies of [`TestUpstream::set_spoof_first`]: a wrong ID, then the right ID with
/// another question, each answering [`SPOOFED_ADDRESS`]. Sent raw through `forger`, a duplicate
/// of the server's UDP socket (same source address and port, as a spoofer would forge them):
/// hickory's own response handle insists on the request's ID.
fn send_forgeries(request: &Request, forger: &std::net::UdpSocket) {
    let Some(query) = request.queries.queries().first() else {
        return;
    };
    let forge = |id: u16, question: hickory_proto::op::Query| {
        let mut message = hickory_proto::op::Message::new(
            id,
            hickory_proto::op::MessageType::Response,
            OpCode::Query,
        );
        message.metadata.recursion_desired = request.metadata.recursion_desired;
        message.metadata.recursion_available = true;
        message.add_answer(Record::from_rdata(
            question.name().clone(),
            300,
            RData::A(A(SPOOFED_ADDRESS)),
        ));
        message.add_query(question);
        message.to_vec().expect("a forged reply encodes")
    };
    let asked = query.original().clone();
    let other = hickory_proto::op::Query::query(
        Name::from_ascii(SPOOFED_NAME).expect("static name"),
        query.query_type(),
    );
    for bytes in [
        forge(request.metadata.id ^ 0x5a5a, asked),
        forge(request.metadata.id, other),
    ] {
        if let Err(error) = forger.send_to(&bytes, request.src()) {
            tracing::warn!(%error, "TestUpstream: could not send a forged reply");
        }
    }
}

/// An upstream that answers any A question with `records` A records (10.0.x.y, TTL 300) whose
/// owners are all a pointer to the question, as BIND and unbound compress them: 16 bytes a
/// record, where hickory, compressing at most 120 names, needs about 25. Over UDP it answers
/// TC=1 with no records; over TCP, the whole answer. Counts queries per transport.
pub struct PackedUpstream {
    pub addr: SocketAddr,
    udp: Arc<AtomicUsize>,
    tcp: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl PackedUpstream {
    pub async fn start(records: u16) -> PackedUpstream {
        let (udp, tcp) = bind_pair(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("PackedUpstream: bind UDP and TCP on one port of 127.0.0.1");
        let addr = udp.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let (udp_count, tcp_count) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (count, token) = (udp_count.clone(), stop.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let (len, from) = tokio::select! {
                    _ = token.cancelled() => return,
                    got = udp.recv_from(&mut buf) => match got { Ok(g) => g, Err(_) => return },
                };
                count.fetch_add(1, Ordering::SeqCst);
                if let Some(reply) = packed_reply(&buf[..len], None) {
                    let _ = udp.send_to(&reply, from).await;
                }
            }
        });
        let (count, token) = (tcp_count.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = tokio::select! {
                    _ = token.cancelled() => return,
                    got = tcp.accept() => match got { Ok(g) => g, Err(_) => return },
                };
                let count = count.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    while let Ok(len) = stream.read_u16().await {
                        let mut query = vec![0u8; usize::from(len)];
                        if stream.read_exact(&mut query).await.is_err() {
                            return;
                        }
                        count.fetch_add(1, Ordering::SeqCst);
                        // The reply is built with its 2-byte length prefix in front.
                        let framed = packed_reply(&query, Some(records)).map(|reply| {
                            [&(reply.len() as u16).to_be_bytes()[..], &reply].concat()
                        });
                        match framed {
                            Some(framed) if stream.write_all(&framed).await.is_ok() => {}
                            _ => return,
                        }
                    }
                });
            }
        });
        PackedUpstream {
            addr,
            udp: udp_count,
            tcp: tcp_count,
            stop,
        }
    }

    /// Queries received over UDP.
    pub fn udp_queries(&self) -> usize {
        self.udp.load(Ordering::SeqCst)
    }

    /// Queries received over TCP.
    pub fn tcp_queries(&self) -> usize {
        self.tcp.load(Ordering::SeqCst)
    }
}

impl Drop for PackedUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The reply to `query` (its question echoed as sent): `Some(n)` A records, or, with `None`,
/// TC=1 and no records. `None` when the query has no plain question to echo.
fn packed_reply(query: &[u8], records: Option<u16>) -> Option<Vec<u8>> {
    let mut end = 12;
    while *query.get(end)? != 0 {
        end += 1 + usize::from(query[end]);
    }
    let question = query.get(12..end + 5)?;
    let (flags, count) = match records {
        Some(n) => (0x8180u16, n),
        None => (0x8380, 0),
    };
    let mut out = query.get(..2)?.to_vec();
    out.extend_from_slice(&flags.to_be_bytes());
    for c in [1, count, 0, 0] {
        out.extend_from_slice(&c.to_be_bytes());
    }
    out.extend_from_slice(question);
    for i in 0..count {
        // Owner: a pointer to the question at offset 12; A, IN, TTL 300, 4 bytes of address.
        out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 10, 0]);
        out.extend_from_slice(&i.to_be_bytes());
    }
    Some(out)
}
