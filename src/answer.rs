//! The answer contract between the handler and the sources: the question a source is asked,
//! the answer it gives, where that answer came from, and the [`AnswerSource`] trait that the
//! forwarder (`upstream`) and the Consul source (`consul`) implement. Kept apart from both so
//! that neither sources nor metrics depend on the handler or on each other.

use std::net::IpAddr;
use std::time::Instant;

use async_trait::async_trait;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, Record, RecordType};

use crate::raw::PlainQuery;

/// A question as the sources see it: the name lowercased for matching; the original kept by the
/// handler for the echo.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Question {
    pub name: Name,
    pub qtype: RecordType,
    pub qclass: DNSClass,
}

impl Question {
    /// The question in wire format with its name lowercased (`raw::question_key`), as a
    /// `Question`; `None` when the bytes are not one question.
    pub(crate) fn from_wire(key: &[u8]) -> Option<Question> {
        use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
        let mut decoder = BinDecoder::new(key);
        let query = Query::read(&mut decoder).ok()?;
        decoder.is_empty().then(|| Question::from_query(&query))
    }

    pub fn from_query(q: &Query) -> Question {
        let mut name = q.name().to_lowercase();
        name.set_fqdn(true);
        Question {
            name,
            qtype: q.query_type(),
            qclass: q.query_class(),
        }
    }
}

/// The DNSSEC bits of a client's query: what it asks of a security-aware forwarder (RFC 4035
/// §3.2, RFC 6840 §5). All clear for a client that knows nothing of DNSSEC (nginx, glibc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Dnssec {
    /// DO (RFC 3225): the client wants RRSIG, NSEC, NSEC3 and DS records with the answer.
    pub dnssec_ok: bool,
    /// CD: the client validates itself; the upstream must not withhold data that fails.
    pub checking_disabled: bool,
    /// AD in the query: the client understands AD in the reply (RFC 6840 §5.7).
    pub authentic_data: bool,
}

impl Dnssec {
    /// The bits of a parsed request.
    pub(crate) fn of(request: &Message) -> Dnssec {
        Dnssec {
            dnssec_ok: request.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
            checking_disabled: request.metadata.checking_disabled,
            authentic_data: request.metadata.authentic_data,
        }
    }

    /// May AD be set in the reply to this client, when the data is authentic? Only if it set
    /// DO or AD (RFC 6840 §5.7): others (nginx among them) never see the bit.
    pub(crate) fn wants_ad(self) -> bool {
        self.dnssec_ok || self.authentic_data
    }
}

/// What a source answered a client with DNSSEC bits: the answer, where it came from, and whether
/// the reply carries AD.
#[derive(Clone, Debug, PartialEq)]
pub struct Answered {
    pub(crate) answer: Answer,
    pub(crate) source: Source,
    /// Set only by the forwarder, under its rule (a trusted upstream said so, and the client
    /// asked with DO or AD).
    pub(crate) authentic_data: bool,
}

impl Answered {
    /// An answer without AD: every source's but the forwarder's, whose rule may set it.
    pub(crate) fn unsigned(answer: Answer, source: Source) -> Answered {
        Answered {
            answer,
            source,
            authentic_data: false,
        }
    }
}

/// What a source answered, before it is fitted into a reply.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub(crate) rcode: ResponseCode,
    /// AA: set for names in the Consul domains, which we answer for; clear for forwarded names.
    pub(crate) authoritative: bool,
    pub(crate) answers: Vec<Record>,
    pub(crate) authorities: Vec<Record>,
    pub(crate) additionals: Vec<Record>,
    /// Records the source left out, and whether the reply says so.
    pub(crate) cut: Cut,
}

/// Answer records left out of a reply, by the source or to fit the client's size, are
/// flagged with TC=1 by default, so the client can ask over TCP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Cut {
    /// The source already left answer records out (`consul.udp_answer_limit`).
    pub(crate) by_source: bool,
    /// TC stays clear whatever was left out (Consul's `enable_truncate = false`).
    pub(crate) silent: bool,
}

impl Answer {
    pub(crate) fn rcode(rcode: ResponseCode) -> Answer {
        Answer {
            rcode,
            authoritative: false,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            cut: Cut::default(),
        }
    }

    pub(crate) fn servfail() -> Answer {
        Answer::rcode(ResponseCode::ServFail)
    }
}

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
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Upstream => "upstream",
            Source::Stale => "stale",
            Source::Consul => "consul",
            Source::Local => "local",
        }
    }
}

/// Something that answers questions for a set of names. Never fails: a failure is an answer too
/// (SERVFAIL, or stale data).
#[async_trait]
pub trait AnswerSource: Send + Sync {
    /// `limit` is the size the reply may take: a source may use it to avoid building records
    /// that cannot fit (the reply is truncated to it in any case).
    async fn answer(&self, q: &Question, limit: usize) -> (Answer, Source);

    /// `answer` for a client whose query carries `dnssec`. The default ignores the bits: a
    /// source whose answers are unsigned (Consul's, as Consul's own DNS interface gives them)
    /// never adds DNSSEC records or AD. The forwarder passes them on (see `upstream`).
    async fn answer_dnssec(&self, q: &Question, limit: usize, dnssec: Dnssec) -> Answered {
        let _ = dnssec;
        let (answer, source) = self.answer(q, limit).await;
        Answered::unsigned(answer, source)
    }

    /// Why this source cannot answer properly yet (`/ready` answers 503 with it), if it cannot:
    /// a Consul source that has not heard from Consul.
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }

    /// Whether reverse (PTR) questions for `ip` go to this source instead of upstream: the
    /// Consul source's, for the addresses Consul knows (or may know: its node list is still
    /// loading, and [`AnswerSource::answer`] waits for it, then forwards what it does not know).
    /// Asked on the hot path for PTR questions: no allocation, no waiting.
    fn answers_address(&self, _ip: IpAddr) -> bool {
        false
    }

    /// The Consul source behind this one, for `explain` and the status page, which read its
    /// views and rules.
    fn as_consul(&self) -> Option<&crate::consul::ConsulSource> {
        None
    }

    /// Writes the reply to `query` into `out` straight from fresh cached bytes, if the source has
    /// them (the hot path, see `raw`); `key` is the question with its name lowercased. Returns
    /// false when `answer` must be asked instead; sources without a byte cache always do.
    fn reply_from_cache(
        &self,
        _query: &PlainQuery<'_>,
        _key: &[u8],
        _limit: usize,
        _now: Instant,
        _out: &mut Vec<u8>,
    ) -> bool {
        false
    }

    /// Writes the reply to a plain `query` that `reply_from_cache` missed into `out`, once the
    /// source has the answer, and says where it came from: the common miss then costs no
    /// `Message`, parsed or encoded (see `handler::Handler::handle_miss`). `None` when `out`
    /// holds nothing and `answer_dnssec` must be asked instead; sources that keep no bytes
    /// always say so.
    async fn reply_fetched(
        &self,
        _query: &PlainQuery<'_>,
        _key: &[u8],
        _limit: usize,
        _out: &mut Vec<u8>,
    ) -> Option<Source> {
        None
    }

    /// What a reply written by `reply_from_cache` counts as in `responses_total` (and whether
    /// it is a `cache_hits_total`): a cache hit, unless the source keeps its own answers as
    /// bytes (Consul's pre-encoded service addresses count as Consul answers).
    fn cached_source(&self) -> Source {
        Source::Cache
    }
}
