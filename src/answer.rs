//! The answer contract between the handler and the sources: the question a source is asked,
//! the answer it gives, where that answer came from, and the [`AnswerSource`] trait that the
//! forwarder (`upstream`) and the Consul source (`consul`) implement. Kept apart from both so
//! that neither sources nor metrics depend on the handler or on each other.

use std::net::IpAddr;
use std::time::Instant;

use async_trait::async_trait;
use hickory_proto::op::{Query, ResponseCode};
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
}
