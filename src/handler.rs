//! Bytes in, bytes out: one DNS request turned into one reply (or a counted drop), with no I/O of
//! its own beyond what the answer sources do. The server module feeds it packets from UDP and TCP.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use ipnet::IpNet;

use crate::answer::{Answer, AnswerSource, Answered, Dnssec, Question, Source};
use crate::arpa;
use crate::header;
use crate::metrics::{rcode_label, Metrics};
use crate::ratelimit::RateLimiter;
use crate::raw;
use crate::reply::{self, RawHeader, Transport};

/// The Consul domains and what answers them.
#[derive(Clone)]
pub struct ConsulRoute {
    domains: Vec<Name>,
    /// The same domains in lowercased wire format, for the hot path's byte comparison.
    domains_wire: Vec<Vec<u8>>,
    source: Arc<dyn AnswerSource>,
}

impl ConsulRoute {
    /// See [`AnswerSource::ready`].
    pub(crate) fn ready(&self) -> Result<(), String> {
        self.source.ready()
    }

    /// What answers the Consul domains (for `explain`).
    pub(crate) fn source(&self) -> &Arc<dyn AnswerSource> {
        &self.source
    }

    pub fn new(domains: Vec<Name>, source: Arc<dyn AnswerSource>) -> ConsulRoute {
        let domains_wire = domains
            .iter()
            .map(|d| {
                let mut bytes = Vec::new();
                reply::push_name(&mut bytes, &d.to_lowercase());
                bytes
            })
            .collect();
        ConsulRoute {
            domains,
            domains_wire,
            source,
        }
    }

    fn covers_wire(&self, name: &[u8]) -> bool {
        self.domains_wire.iter().any(|d| raw::name_in_zone(name, d))
    }

    /// Does this route take `q`: a name under its domains, or a reverse (PTR) question for an
    /// address its source answers?
    fn takes(&self, q: &Question) -> bool {
        self.domains.iter().any(|d| reply::in_zone(&q.name, d))
            || arpa::question_address(q).is_some_and(|ip| self.source.answers_address(ip))
    }

    /// [`ConsulRoute::takes`] on the hot path: `key` is the question with its name lowercased.
    /// A question of any type but PTR costs one comparison more than before, a PTR question
    /// for a name outside the reverse zones a suffix comparison; nothing allocates.
    fn takes_wire(&self, qtype: u16, key: &[u8]) -> bool {
        self.covers_wire(&key[..key.len() - 4])
            || arpa::wire_question_address(qtype, key)
                .is_some_and(|ip| self.source.answers_address(ip))
    }
}

/// What a config decides about answering: who may ask, and which source answers which names.
/// Replaced whole on reload; queries in flight finish with the routes they started with.
#[derive(Clone)]
pub struct Routes {
    pub allow: Vec<IpNet>,
    pub consul: Option<ConsulRoute>,
    pub forwarder: Arc<dyn AnswerSource>,
    pub log_queries: bool,
    /// UDP response rate limit per client network (`None` = off).
    pub rate_limit: Option<Arc<RateLimiter>>,
}

impl Routes {
    fn allowed(&self, client: IpAddr) -> bool {
        let client = match client {
            // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(client, IpAddr::V4),
            v4 => v4,
        };
        self.allow.iter().any(|net| net.contains(&client))
    }
}

/// The `dropped_packets_total` reason of a query over the rate limit whose reply would have been
/// an error (REFUSED, FORMERR, NOTIMP, BADVERS): dropped, see [`Handler::handle_miss`].
pub(crate) const RATE_LIMIT_DROP: &str = "rate_limit";

/// What [`Handler::handle_cached`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Cached {
    /// `out` holds the answer: send it, and observe its time with
    /// `Metrics::observe_request(Source::Cache, ..)` (left to the caller, which knows when the
    /// reply left: the UDP loop times a whole batch with two clock reads).
    Replied,
    /// `out` holds the TC reply of a query over the rate limit: send it (not timed, as `handle`
    /// does not time it either).
    RateLimited,
    /// Not answerable on the hot path: call `Handler::handle_miss` with this charge.
    Miss(RateCharge),
}

/// Whether the rate limit already took a query's token (it must take one per query, not one
/// per code path the query goes through).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateCharge {
    Taken,
    NotTaken,
}

pub struct Handler {
    routes: ArcSwap<Routes>,
    metrics: Arc<Metrics>,
}

impl Handler {
    pub fn new(routes: Routes, metrics: Arc<Metrics>) -> Handler {
        Handler {
            routes: ArcSwap::from_pointee(routes),
            metrics,
        }
    }

    /// Installs new routes (config reload) and returns the previous ones.
    pub(crate) fn replace_routes(&self, routes: Routes) -> Arc<Routes> {
        self.routes.swap(Arc::new(routes))
    }

    /// The hot path: writes the reply to `packet` into `out` when it is a plain query (see
    /// `raw::parse_plain_query`) that a source answers from fresh cached bytes, or that the
    /// rate limit turns away. No `Message` is built, nothing is allocated beyond `out`'s growth,
    /// and the caller needs no task. Returns [`Cached::Miss`] when `Handler::handle_miss` must
    /// be called instead (with the charge it carries, so a miss costs one rate-limit token, not
    /// two); the reply and the metrics are then exactly those `handle` would give, but for the
    /// time taken, which the caller observes (see [`Cached::Replied`]). `arrived` is when the
    /// packet was read: the rate limit and the freshness of cached answers are judged at it.
    pub fn handle_cached(
        &self,
        packet: &[u8],
        client: IpAddr,
        transport: Transport,
        arrived: Instant,
        out: &mut Vec<u8>,
    ) -> Cached {
        let Some(query) = raw::parse_plain_query(packet) else {
            return Cached::Miss(RateCharge::NotTaken);
        };
        if query.qtype == u16::from(RecordType::ANY) {
            return Cached::Miss(RateCharge::NotTaken);
        }
        let routes = self.routes.load();
        if routes.log_queries || !routes.allowed(client) {
            return Cached::Miss(RateCharge::NotTaken);
        }
        if self.over_rate_limit(&routes, transport, client, arrived) {
            self.metrics.rate_limited.inc();
            // As `handle` does: an empty NOERROR with TC=1, within 512 bytes.
            raw::write_rcode_reply(out, &query, ResponseCode::NoError.low());
            header::set_flags(out, header::TC);
            return Cached::RateLimited;
        }
        let mut key_buf = [0u8; raw::MAX_QUESTION_WIRE];
        let key = raw::question_key(query.question, &mut key_buf);
        let consul = routes
            .consul
            .as_ref()
            .filter(|c| c.takes_wire(query.qtype, key));
        let source = match consul {
            Some(route) => &route.source,
            None => &routes.forwarder,
        };
        let limit = reply::limit_for(transport, query.edns_payload);
        if !source.reply_from_cache(&query, key, limit, arrived, out) {
            // The token is spent: `handle_miss` must not take another for the same query.
            return Cached::Miss(RateCharge::Taken);
        }
        let answered_by = source.cached_source();
        match answered_by {
            Source::Cache => self.metrics.cache_hit(),
            _ => self.metrics.consul_encoded_answers.inc(),
        }
        // TC here is a cut to fit (a large shuffled answer); nothing else sets it on this path.
        self.count_written(out, (transport, query.qtype, consul.is_some()), answered_by);
        Cached::Replied
    }

    /// The reply to `packet`, or `None` when the packet must be dropped (not DNS, a response, or
    /// over the rate limit with nothing a real client could use; see `handle_miss`).
    pub async fn handle(
        &self,
        packet: &[u8],
        client: IpAddr,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        self.handle_miss(packet, client, transport, RateCharge::NotTaken)
            .await
    }

    /// [`Handler::handle`] after [`Handler::handle_cached`] said [`Cached::Miss`]: `charge` says
    /// whether the rate limit already took this query's token.
    ///
    /// The rate limit applies before any reply is chosen, REFUSED and the other error replies
    /// included: each is a datagram sent to whatever source address the query claims, so
    /// unlimited ones would make us a reflector for spoofed sources. Over the limit, only a
    /// well-formed query from an allowed client gets the empty TC=1 reply (a real client
    /// retries over TCP and is answered); everything else is dropped and counted. A REFUSED
    /// or FORMERR client gains nothing from TC=1 (TCP would give it the same error), while a
    /// spoofed victim would still receive a datagram per query.
    pub(crate) async fn handle_miss(
        &self,
        packet: &[u8],
        client: IpAddr,
        transport: Transport,
        charge: RateCharge,
    ) -> Option<Vec<u8>> {
        let started = Instant::now();
        if charge == RateCharge::Taken {
            // `handle_cached` took it: a plain query from an allowed client, within its rate.
            if let Some(reply) = self.miss_in_bytes(packet, client, transport, started).await {
                return Some(reply);
            }
        }
        let Some(header) = RawHeader::parse(packet) else {
            self.metrics.drop_packet("short");
            return None;
        };
        if header.is_response {
            // Never answer a response: that is how reflection loops start.
            self.metrics.drop_packet("response");
            return None;
        }
        let request = Message::from_vec(packet);
        let routes = self.routes.load_full();
        let limited = charge == RateCharge::NotTaken
            && self.over_rate_limit(&routes, transport, client, started);
        if limited {
            self.metrics.rate_limited.inc();
        }
        let allowed = routes.allowed(client);
        if !allowed {
            self.metrics
                .refused_clients
                .with_label_values(&[transport.as_str()])
                .inc();
        }
        let error = if allowed {
            request_error(request.as_ref().ok())
        } else {
            Some(ResponseCode::Refused)
        };
        let request = match request {
            Ok(request) if error.is_none() => request,
            request => {
                if limited {
                    self.metrics.drop_packet(RATE_LIMIT_DROP);
                    return None;
                }
                // Without an error rcode here, the request did not parse: FORMERR.
                let rcode = error.unwrap_or(ResponseCode::FormErr);
                return Some(self.finish_error(request.ok().as_ref(), &header, rcode));
            }
        };
        if limited {
            let (mut bytes, _) = reply::encode_reply(
                &request,
                &Answer::rcode(ResponseCode::NoError),
                reply::UDP_LIMIT_NO_EDNS,
            );
            header::set_flags(&mut bytes, header::TC);
            return Some(bytes);
        }
        let query = &request.queries[0];
        let q = Question::from_query(query);
        let consul = routes.consul.as_ref().filter(|c| c.takes(&q));
        self.metrics
            .count_request(transport, q.qtype, consul.is_some());
        let limit = reply::reply_limit(&request, transport);
        let answering = consul.map_or(&routes.forwarder, |route| &route.source);
        let answered = match consul {
            // In every Consul mode, as Consul answers AXFR.
            Some(_) if matches!(q.qtype, RecordType::AXFR | RecordType::IXFR) => {
                Answered::unsigned(crate::consul::records::zone_transfer(), Source::Local)
            }
            _ => {
                answering
                    .answer_dnssec(&q, limit, Dnssec::of(&request))
                    .await
            }
        };
        let (answer, source) = (answered.answer, answered.source);
        let (mut bytes, mut truncated) = reply::encode_reply(&request, &answer, limit);
        if truncated && transport == Transport::Tcp {
            // An answer hickory cannot encode again within 64 KiB (it compresses at most 120
            // names) is cached as the upstream sent it: served whole from those bytes.
            if let Some(whole) = whole_from_cache(answering.as_ref(), packet, limit) {
                (bytes, truncated) = (whole, false);
            }
        }
        if answered.authentic_data {
            header::set_flags(&mut bytes, header::AD);
        }
        if truncated {
            self.metrics
                .truncated
                .with_label_values(&[transport.as_str()])
                .inc();
        }
        self.metrics.count_response(answer.rcode, source);
        let took = started.elapsed();
        self.metrics.observe_request(source, took);
        if routes.log_queries {
            log_query(client, query, &answer, source, took, transport);
        }
        Some(bytes)
    }

    /// The reply to a plain query for a forwarded name that missed the cache, written from
    /// bytes (see `AnswerSource::reply_fetched`), with the metrics `handle_miss` would count;
    /// `None` when it must go the general way (nothing was answered then, and only the
    /// source's cache counters may have counted the lookup, see `Forwarder::reply_fetched`).
    async fn miss_in_bytes(
        &self,
        packet: &[u8],
        client: IpAddr,
        transport: Transport,
        started: Instant,
    ) -> Option<Vec<u8>> {
        let query = raw::parse_plain_query(packet)?;
        let routes = self.routes.load_full();
        if routes.log_queries || !routes.allowed(client) {
            return None;
        }
        let mut key_buf = [0u8; raw::MAX_QUESTION_WIRE];
        let key = raw::question_key(query.question, &mut key_buf);
        if routes
            .consul
            .as_ref()
            .is_some_and(|c| c.takes_wire(query.qtype, key))
        {
            return None;
        }
        let limit = reply::limit_for(transport, query.edns_payload);
        // Most replies fit in 512 bytes (it grows when one does not). A block of 1,232 is past
        // the allocator's per-thread cache: one per miss, freed between cached entries, left
        // the heap fragmented (ARCHITECTURE.md, "Cache misses in bytes").
        let mut out = Vec::with_capacity(reply::UDP_LIMIT_NO_EDNS);
        let source = routes
            .forwarder
            .reply_fetched(&query, key, limit, &mut out)
            .await?;
        self.count_written(&out, (transport, query.qtype, false), source);
        self.metrics.observe_request(source, started.elapsed());
        Some(out)
    }

    /// Counts a reply written in bytes, `out`, to a query of `qtype` over `transport` (for a
    /// Consul name or not): the request, TC and the response by rcode and `answered_by`. Not
    /// its time: that is the caller's to observe.
    fn count_written(
        &self,
        out: &[u8],
        (transport, qtype, consul): (Transport, u16, bool),
        answered_by: Source,
    ) {
        let flags = header::flags(out).unwrap_or(0);
        if flags & header::TC != 0 {
            self.metrics
                .truncated
                .with_label_values(&[transport.as_str()])
                .inc();
        }
        self.metrics
            .count_request(transport, RecordType::from(qtype), consul);
        let rcode = ResponseCode::from(0, header::rcode(flags));
        self.metrics.count_response(rcode, answered_by);
    }

    /// Is this UDP query over its client network's response rate? Takes a token when it is
    /// not, so call it once per query. Over TCP the client has proved its address, so no limit
    /// applies.
    fn over_rate_limit(
        &self,
        routes: &Routes,
        transport: Transport,
        client: IpAddr,
        now: Instant,
    ) -> bool {
        transport == Transport::Udp
            && routes
                .rate_limit
                .as_ref()
                .is_some_and(|l| !l.allow(client, now))
    }

    fn finish_error(
        &self,
        request: Option<&Message>,
        header: &RawHeader,
        rcode: ResponseCode,
    ) -> Vec<u8> {
        self.metrics
            .responses
            .with_label_values(&[rcode_label(rcode), Source::Local.as_str()])
            .inc();
        match request {
            Some(request) => reply::error_reply(request, rcode),
            None => reply::header_only_reply(header, rcode),
        }
    }
}

/// The reply to `packet` written from `source`'s cached bytes, if it is a plain query it has
/// them for.
fn whole_from_cache(source: &dyn AnswerSource, packet: &[u8], limit: usize) -> Option<Vec<u8>> {
    let query = raw::parse_plain_query(packet)?;
    let mut key_buf = [0u8; raw::MAX_QUESTION_WIRE];
    let key = raw::question_key(query.question, &mut key_buf);
    let mut out = Vec::new();
    source
        .reply_from_cache(&query, key, limit, Instant::now(), &mut out)
        .then_some(out)
}

/// The error rcode a request that parsed (`None`: it did not) must get before any source is
/// asked, or `None` when it is a query we answer.
fn request_error(request: Option<&Message>) -> Option<ResponseCode> {
    match request {
        // The header parsed, so a reply is possible: FORMERR (counted in responses_total).
        None => Some(ResponseCode::FormErr),
        Some(r) if r.metadata.op_code != OpCode::Query => Some(ResponseCode::NotImp),
        Some(r) if r.queries.len() != 1 => Some(ResponseCode::FormErr),
        // RFC 6891 §6.1.3: we speak EDNS version 0 only.
        Some(r) if r.edns.as_ref().is_some_and(|e| e.version() > 0) => Some(ResponseCode::BADVERS),
        Some(_) => None,
    }
}

/// One line of the query log (`[log] queries = true`).
fn log_query(
    client: IpAddr,
    query: &hickory_proto::op::Query,
    answer: &Answer,
    source: Source,
    took: std::time::Duration,
    transport: Transport,
) {
    tracing::info!(
        target: "consul_dns_forwarder::query",
        client = %client,
        name = %query.name(),
        qtype = %query.query_type(),
        rcode = rcode_label(answer.rcode),
        source = source.as_str(),
        duration_us = took.as_micros() as u64,
        protocol = transport.as_str(),
        "query"
    );
}
