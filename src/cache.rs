//! The answer cache: one entry per (lowercased name, type, class, CD), TTLs counting down on the
//! way out, negative answers kept per RFC 2308, expired entries kept a while longer so they can
//! be served stale when every upstream fails (RFC 8767), failures remembered per question for a
//! short while (RFC 9520, `failures`), and concurrent identical misses merged into one upstream
//! query.
//!
//! Entries are kept in wire format (the question and the records as they follow it in a reply),
//! so a hit is answered by copying bytes and patching ID, flags, TTLs and the question's case
//! (`raw`), not by cloning and encoding records: little heap per cached name
//! (`benches/cache_memory.rs` measures it) and no encoding per hit.
//! The map is quick_cache (S3-FIFO, sharded, small bookkeeping per entry, weights in bytes; why
//! not moka is in ARCHITECTURE.md). Expiry is checked on read:
//! entries past their stale window are dropped when met, and the byte bound evicts the rest.
//!
//! DNSSEC (see `dnssec`): an entry fetched with DO holds the records as the upstream gave them
//! to a DNSSEC client, and, when they include RRSIG, NSEC, NSEC3 or DS records, the same answer
//! without them, encoded on its own after it: one entry serves both kinds of client, a client
//! without DO never sees a signature, and an answer with nothing to strip costs nothing more. An
//! entry fetched without DO serves only clients without DO. CD is part of the key: a validating
//! upstream gives a CD client data it withholds from the others (and the others a SERVFAIL).

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{RData, Record};

use crate::answer::{Answer, Cut, Dnssec, Question};
use crate::dnssec::{self, Sections};
use crate::failures::{FailurePolicy, Failures};
use crate::header::{self, Section, HEADER_LEN};
use crate::lock::lock;
use crate::raw::{self, PlainQuery};
use crate::recent::Exchanged;
use crate::reply::{self, STALE_TTL};

/// TTL rules applied when an upstream message is stored.
#[derive(Clone, Debug)]
pub struct TtlPolicy {
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    /// Cap on negative caching (RFC 2308: the SOA's minimum, capped by this).
    pub negative_ttl: Duration,
    /// Floor for negative answers (0 normally; the dnsmasq-compatible Consul mode raises it because
    /// Consul's SOA minimum is 0).
    pub negative_min_ttl: Duration,
    /// How long after expiry an entry may still be served when upstreams fail.
    pub stale_for: Duration,
}

impl TtlPolicy {
    /// A positive record's TTL within [min_ttl, max_ttl].
    fn clamp(&self, ttl: u32) -> u32 {
        let secs = u64::from(ttl).clamp(self.min_ttl.as_secs(), self.max_ttl.as_secs());
        u32::try_from(secs).unwrap_or(u32::MAX)
    }
}

/// What an entry costs beyond its bytes: the map's slot (the struct is held inline), the `Arc`
/// counts and allocator header of the bytes, and the exchange kept for `explain`. Used for the
/// byte bound, so it errs on the high side.
const ENTRY_OVERHEAD: usize = 112 + std::mem::size_of::<Option<Exchanged>>();

/// Room for keys recently evicted ("ghosts", which S3-FIFO admits straight to the hot set when
/// they come back), as a share of the entry count. quick_cache's default is 0.5, but a ghost
/// takes a whole slot (about 80 bytes here, the entry being held inline): at 100,000 entries
/// that was 4 MB of a 32 MiB budget. A tenth keeps the scan resistance for names asked again
/// soon after their eviction.
const GHOST_SHARE: f64 = 0.1;

/// Mixed into the key of a CD entry, so that a question's CD and non-CD entries have different
/// keys (the hash being keyed and random, this is as good as hashing the bit, and costs nothing
/// for the common non-CD lookup).
const CD_KEY: u64 = 0x9e37_79b9_7f4a_7c15;

/// Where the form for clients without DO starts in an entry's `wire`: its three record counts
/// (6 bytes, big-endian), then its records. Two offsets no form can start at say there is none:
/// the records hold nothing such a client must not get, so the same bytes serve every client...
const PLAIN_SAME: u32 = 0;
/// ... or a signed answer too large to encode again without its DNSSEC records serves DO
/// clients only.
const PLAIN_MISSING: u32 = u32::MAX;

/// Bits of `CachedAnswer::flags`: what the entry is, packed into one byte, because entries are
/// held inline in the map and 100,000 of them should cost what they did before DNSSEC.
/// NXDOMAIN (else NOERROR, the only other rcode stored).
const NXDOMAIN: u8 = 1;
/// May be stored: false for a negative answer without SOA, passed on to the client, never
/// stored (RFC 2308 §5).
const CACHEABLE: u8 = 1 << 1;
/// CD of the upstream query: part of the key.
const CHECKING_DISABLED: u8 = 1 << 2;
/// DO of the upstream query: the records are what the upstream gives a DNSSEC client.
const SIGNED: u8 = 1 << 3;
/// AD of the upstream's reply: it validated the data.
const AUTHENTIC: u8 = 1 << 4;
/// Stored as the upstream sent it, because it is too large to encode again (hickory compresses
/// at most 120 names); cut in bytes for UDP clients.
const AS_RECEIVED: u8 = 1 << 5;
/// Two or more records, each an A or AAAA of one length whose owner points at the question, in
/// the answer section alone, and the form is the same with and without DO
/// (`raw::uniform_address_len`): a service through Consul's DNS interface. A shuffled reply moves
/// such records at a fixed stride without reading them (`raw::copy_records`), where reading
/// each one twice (spans, then TTLs) cost about 1 µs per reply of 74 records and doubled the
/// cost of shuffling three (docs/benchmarks.md, step sixteen).
const ADDRESSES: u8 = 1 << 6;

/// A stored answer. Record TTLs are the clamped ones at `stored_at`.
///
/// Cheap to clone (the bytes are shared), and held in the map by value: one allocation per
/// entry (the bytes), not two (an `Arc` of the struct, then the bytes).
#[derive(Clone, Debug)]
pub struct CachedAnswer {
    pub(crate) stored_at: Instant,
    /// The question (name lowercased) followed by the records, exactly as they follow a 12-byte
    /// header in a reply: names in the records may point into the question, so a reply must put
    /// the (same-length) question at the same place. Then, at `plain_at`, the form for clients
    /// without DO, whose records point only into the question and themselves.
    wire: Arc<[u8]>,
    /// How long the entry is fresh, in seconds.
    ttl_secs: u32,
    /// See [`PLAIN_SAME`].
    plain_at: u32,
    /// Answer, authority and additional record counts.
    counts: [u16; 3],
    question_len: u16,
    /// [`NXDOMAIN`], [`CACHEABLE`], ...
    flags: u8,
    /// The upstream exchange it came from, for `explain`.
    pub(crate) exchange: Option<Exchanged>,
}

/// The question in wire format, as the cache keys it: the name (already lowercased in a
/// `Question`), type and class.
pub(crate) fn question_wire(q: &Question) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw::MAX_QUESTION_WIRE);
    crate::reply::push_name(&mut out, &q.name);
    out.extend_from_slice(&u16::from(q.qtype).to_be_bytes());
    out.extend_from_slice(&u16::from(q.qclass).to_be_bytes());
    out
}

/// An upstream's reply: the message, and the bytes it arrived as (for an answer too large to
/// encode again, or stored as it came).
#[derive(Clone, Debug)]
pub struct UpstreamReply {
    /// `None` for a reply taken unparsed (`UpstreamReply::unparsed`): a plain answer, which the
    /// cache stores from its bytes, and parses only when it cannot.
    pub(crate) message: Option<Message>,
    pub(crate) wire: Option<Vec<u8>>,
    /// Which server answered, and how fast (set by the server group).
    pub(crate) exchange: Option<Exchanged>,
}

impl From<Message> for UpstreamReply {
    fn from(message: Message) -> UpstreamReply {
        UpstreamReply {
            message: Some(message),
            wire: None,
            exchange: None,
        }
    }
}

impl UpstreamReply {
    /// A reply as it came in `wire`, and `message` parsed from it, or `None` when it was taken
    /// unparsed: a plain answer whose header, question and records were checked (see
    /// `upstream::check`).
    pub(crate) fn received(message: Option<Message>, wire: Vec<u8>) -> UpstreamReply {
        UpstreamReply {
            message,
            wire: Some(wire),
            exchange: None,
        }
    }

    pub(crate) fn rcode(&self) -> ResponseCode {
        match (&self.message, &self.wire) {
            (Some(m), _) => m.metadata.response_code,
            (None, Some(wire)) => {
                ResponseCode::from(0, header::rcode(header::flags(wire).unwrap_or(0)))
            }
            (None, None) => ResponseCode::ServFail,
        }
    }

    pub(crate) fn truncated(&self) -> bool {
        match (&self.message, &self.wire) {
            (Some(m), _) => m.metadata.truncation,
            (None, Some(wire)) => header::flags(wire).unwrap_or(0) & header::TC != 0,
            (None, None) => false,
        }
    }

    /// The message, parsed from the bytes when it was taken unparsed.
    fn parsed(&self) -> Result<std::borrow::Cow<'_, Message>, FetchError> {
        match (&self.message, &self.wire) {
            (Some(m), _) => Ok(std::borrow::Cow::Borrowed(m)),
            (None, Some(wire)) => Message::from_vec(wire)
                .map(std::borrow::Cow::Owned)
                .map_err(|e| FetchError::Unstorable(e.to_string())),
            (None, None) => Err(FetchError::Unstorable("an empty reply".into())),
        }
    }
}

/// The sections of an upstream reply as they are stored (TTLs clamped, OPT dropped; a negative
/// answer keeps only its SOA and, with DO, its denial proofs, all with the negative TTL), how
/// long they are fresh, and whether they may be stored at all.
fn stored_sections(
    msg: &Message,
    signed: bool,
    qtype: hickory_proto::rr::RecordType,
    policy: &TtlPolicy,
) -> (Sections, u32, bool) {
    let negative = msg.metadata.response_code == ResponseCode::NXDomain || msg.answers.is_empty();
    let (sections, ttl, cacheable) = if negative {
        let soa = msg.authorities.iter().find_map(|r| match &r.data {
            RData::SOA(soa) => Some((r.ttl, soa.minimum)),
            _ => None,
        });
        let (soa_ttl, minimum) = soa.unwrap_or((0, 0));
        let secs = u64::from(soa_ttl.min(minimum))
            .min(policy.negative_ttl.as_secs())
            .max(policy.negative_min_ttl.as_secs());
        let ttl = u32::try_from(secs).unwrap_or(u32::MAX);
        // RFC 2308 §3: the SOA's TTL in a negative answer is the negative caching time; the
        // proofs of nonexistence (RFC 4035 §3.1.3) expire with it.
        let authorities = msg
            .authorities
            .iter()
            .filter(|r| matches!(r.data, RData::SOA(_)) || dnssec::is_proof_for(r, qtype))
            .map(|r| with_ttl(r, ttl))
            .collect();
        let sections = Sections {
            answers: msg.answers.clone(),
            authorities,
            additionals: Vec::new(),
        };
        (sections, ttl, soa.is_some())
    } else {
        let clamped = |records: &[Record]| -> Vec<Record> {
            records
                .iter()
                .filter(|r| !matches!(r.data, RData::OPT(_)))
                .map(|r| with_ttl(r, policy.clamp(r.ttl)))
                .collect()
        };
        let sections = Sections {
            answers: clamped(&msg.answers),
            authorities: clamped(&msg.authorities),
            additionals: clamped(&msg.additionals),
        };
        let ttl = sections.answers.iter().map(|r| r.ttl).min().unwrap_or(0);
        (sections, ttl, true)
    };
    // Fetched without DO, a conforming upstream sends none of these; should one, they are
    // dropped all the same.
    let sections = if signed {
        sections
    } else {
        sections.without_proofs(qtype)
    };
    (sections, ttl, cacheable)
}

fn with_ttl(record: &Record, ttl: u32) -> Record {
    let mut record = record.clone();
    record.ttl = ttl;
    record
}

/// `sections` encoded after the question `q`, as a reply's bytes (header included).
fn encode_sections(q: &Question, sections: &Sections) -> Result<Vec<u8>, FetchError> {
    let mut reply = Message::new(0, MessageType::Response, OpCode::Query);
    let mut query = Query::query(q.name.clone(), q.qtype);
    query.set_query_class(q.qclass);
    reply.add_query(query);
    reply.answers = sections.answers.clone();
    reply.authorities = sections.authorities.clone();
    reply.additionals = sections.additionals.clone();
    let bytes = reply
        .to_vec()
        .map_err(|e| FetchError::Unstorable(e.to_string()))?;
    let [_, answers, authorities, additionals] = header::counts(&bytes).unwrap_or([0; 4]);
    // hickory stops at 64 KiB on its own, lowering the counts: not these sections, then.
    let written = [answers, authorities, additionals].map(usize::from);
    if written != sections.counts() {
        return Err(FetchError::Unstorable(
            "answer larger than 64 KiB once encoded again".into(),
        ));
    }
    Ok(bytes)
}

/// The flags an entry fetched with `asked`'s DO and CD gets, the upstream having set AD or not.
fn entry_flags(asked: Dnssec, authentic_data: bool) -> u8 {
    bit(asked.checking_disabled, CHECKING_DISABLED)
        | bit(asked.dnssec_ok, SIGNED)
        | bit(authentic_data, AUTHENTIC)
}

/// `flag` when `on`, else nothing.
fn bit(on: bool, flag: u8) -> u8 {
    if on {
        flag
    } else {
        0
    }
}

fn counts3(bytes: &[u8]) -> [u16; 3] {
    let [_, answers, authorities, additionals] = header::counts(bytes).unwrap_or([0; 4]);
    [answers, authorities, additionals]
}

impl CachedAnswer {
    /// Turns an upstream reply to `q` into an entry, as fetched without DO or CD. Error rcodes
    /// (SERVFAIL, REFUSED...) are never cached: they come back as `FetchError::Rcode`.
    pub fn from_message(
        q: &Question,
        msg: &Message,
        policy: &TtlPolicy,
        now: Instant,
    ) -> Result<CachedAnswer, FetchError> {
        CachedAnswer::from_reply(
            q,
            &UpstreamReply::from(msg.clone()),
            Dnssec::default(),
            policy,
            now,
        )
    }

    /// Turns the upstream's `reply` to `q`, asked with `asked`'s DO and CD, into an entry. An
    /// answer too large to encode again is stored as it came, when its bytes are at hand.
    pub(crate) fn from_reply(
        q: &Question,
        reply: &UpstreamReply,
        asked: Dnssec,
        policy: &TtlPolicy,
        now: Instant,
    ) -> Result<CachedAnswer, FetchError> {
        let rcode = reply.rcode();
        match rcode {
            ResponseCode::NoError | ResponseCode::NXDomain => {}
            other => return Err(FetchError::Rcode(other)),
        }
        if let (None, Some(wire)) = (&reply.message, &reply.wire) {
            // The common miss: an answer with nothing to strip for clients without DO is
            // stored as it came, without parsing and encoding it again (what that costs is in
            // ARCHITECTURE.md). Everything else (negative answers, DNSSEC records) is parsed.
            if let Ok(mut entry) = CachedAnswer::as_received(q, wire, asked, policy, now) {
                if entry.plain_at == PLAIN_SAME {
                    entry.exchange = reply.exchange;
                    return Ok(entry);
                }
            }
        }
        let msg = &*reply.parsed()?;
        let signed = asked.dnssec_ok;
        let (sections, ttl_secs, cacheable) = stored_sections(msg, signed, q.qtype, policy);
        let stripped =
            (signed && sections.has_proofs(q.qtype)).then(|| sections.without_proofs(q.qtype));
        let plain_bytes = stripped.as_ref().map(|s| encode_sections(q, s));
        let full = match (encode_sections(q, &sections), &reply.wire) {
            (Ok(full), _) => full,
            (Err(_), Some(wire)) => {
                let mut entry = CachedAnswer::as_received(q, wire, asked, policy, now)?;
                if let Some(Ok(plain)) = &plain_bytes {
                    entry.attach_plain(plain);
                }
                entry.exchange = reply.exchange;
                return Ok(entry);
            }
            (Err(e), None) => return Err(e),
        };
        let question_len = question_wire(q).len();
        let mut entry = CachedAnswer {
            stored_at: now,
            wire: full[HEADER_LEN..].into(),
            ttl_secs,
            plain_at: PLAIN_SAME,
            counts: counts3(&full),
            question_len: u16::try_from(question_len).unwrap_or(0),
            flags: entry_flags(asked, msg.metadata.authentic_data)
                | bit(rcode == ResponseCode::NXDomain, NXDOMAIN)
                | bit(cacheable, CACHEABLE),
            exchange: reply.exchange,
        };
        if let Some(plain) = plain_bytes {
            // A subset of what just encoded: it encodes too.
            entry.attach_plain(&plain?);
        }
        entry.flags |= bit(entry.uniform_address_len().is_some(), ADDRESSES);
        Ok(entry)
    }

    /// The records' length when they are two or more addresses alone, all of one length (see
    /// [`ADDRESSES`]). A single record is never shuffled, so a miss does not read it.
    fn uniform_address_len(&self) -> Option<usize> {
        let [answers, 0, 0] = self.counts else {
            return None;
        };
        if self.plain_at != PLAIN_SAME || answers < 2 {
            return None;
        }
        let records = self.wire.get(usize::from(self.question_len)..)?;
        let base = HEADER_LEN + usize::from(self.question_len);
        raw::uniform_address_len(records, usize::from(answers), base)
    }

    /// Appends the records of `plain` (a reply to the same question, without DNSSEC records)
    /// as the form for clients without DO.
    fn attach_plain(&mut self, plain: &[u8]) {
        let from = HEADER_LEN + usize::from(self.question_len);
        let (Some(records), Ok(at)) = (plain.get(from..), u32::try_from(self.wire.len())) else {
            return;
        };
        let mut wire = Vec::with_capacity(self.wire.len() + 6 + records.len());
        wire.extend_from_slice(&self.wire);
        for count in counts3(plain) {
            wire.extend_from_slice(&count.to_be_bytes());
        }
        wire.extend_from_slice(records);
        self.wire = wire.into();
        self.plain_at = at;
    }

    /// An entry from the bytes the upstream sent (a positive answer hickory cannot encode again
    /// within 64 KiB): the question lowercased, TTLs clamped, the OPT record dropped; records
    /// otherwise as they came, compression included.
    fn as_received(
        q: &Question,
        wire: &[u8],
        asked: Dnssec,
        policy: &TtlPolicy,
        now: Instant,
    ) -> Result<CachedAnswer, FetchError> {
        let question = question_wire(q);
        let unstorable = || {
            FetchError::Unstorable(
                "answer larger than 64 KiB once encoded again, and not storable as it came".into(),
            )
        };
        let flags = header::flags(wire).ok_or_else(unstorable)?;
        let received = raw::normalize_received(wire, &question, |ttl| policy.clamp(ttl))
            .filter(|r| r.answers > 0 && header::rcode(flags) == 0)
            .ok_or_else(unstorable)?;
        if received.has_proofs && !asked.dnssec_ok {
            // Asked without DO: a client without DO must never get these.
            return Err(unstorable());
        }
        let mut entry = CachedAnswer {
            stored_at: now,
            wire: received.body.into(),
            ttl_secs: received.min_answer_ttl,
            plain_at: if received.has_proofs {
                PLAIN_MISSING
            } else {
                PLAIN_SAME
            },
            counts: received.counts,
            question_len: u16::try_from(question.len()).unwrap_or(0),
            flags: entry_flags(asked, flags & header::AD != 0) | CACHEABLE | AS_RECEIVED,
            exchange: None,
        };
        entry.flags |= bit(entry.uniform_address_len().is_some(), ADDRESSES);
        Ok(entry)
    }

    /// What the entry costs in memory, roughly.
    pub(crate) fn approx_bytes(&self) -> u32 {
        u32::try_from(ENTRY_OVERHEAD + self.wire.len()).unwrap_or(u32::MAX)
    }

    /// The question the entry answers (its cache key).
    pub(crate) fn question(&self) -> &[u8] {
        &self.wire[..usize::from(self.question_len)]
    }

    /// The records a client gets, and their counts: with DO, the entry as fetched; without, the
    /// form without DNSSEC records (`None` when the entry has none to give).
    fn form(&self, dnssec_ok: bool) -> Option<(&[u8], [u16; 3])> {
        let start = usize::from(self.question_len);
        match self.plain_at {
            PLAIN_SAME => Some((self.wire.get(start..)?, self.counts)),
            PLAIN_MISSING if dnssec_ok => Some((self.wire.get(start..)?, self.counts)),
            PLAIN_MISSING => None,
            at => {
                let at = usize::try_from(at).ok()?;
                if dnssec_ok {
                    return Some((self.wire.get(start..at)?, self.counts));
                }
                let c = self.wire.get(at..at + 6)?;
                let count = |i: usize| u16::from_be_bytes([c[i], c[i + 1]]);
                Some((self.wire.get(at + 6..)?, [count(0), count(2), count(4)]))
            }
        }
    }

    /// Can this entry answer a client with (`dnssec_ok`) or without DO? A DO client needs an
    /// entry fetched with DO (its signatures); a client without DO needs a form without them.
    pub(crate) fn serves(&self, dnssec_ok: bool) -> bool {
        if dnssec_ok {
            self.flags & SIGNED != 0
        } else {
            self.plain_at != PLAIN_MISSING
        }
    }

    /// Did the upstream set AD (it validated the data)?
    pub(crate) fn authentic_data(&self) -> bool {
        self.flags & AUTHENTIC != 0
    }

    /// NOERROR or NXDOMAIN, the only rcodes stored.
    pub(crate) fn rcode(&self) -> ResponseCode {
        if self.flags & NXDOMAIN != 0 {
            ResponseCode::NXDomain
        } else {
            ResponseCode::NoError
        }
    }

    /// May it be stored? (See [`CACHEABLE`].)
    pub(crate) fn cacheable(&self) -> bool {
        self.flags & CACHEABLE != 0
    }

    fn checking_disabled(&self) -> bool {
        self.flags & CHECKING_DISABLED != 0
    }

    /// How long the entry is fresh.
    pub(crate) fn ttl(&self) -> Duration {
        Duration::from_secs(u64::from(self.ttl_secs))
    }

    /// Seconds since storing, rounded down.
    fn age_secs(&self, now: Instant) -> u32 {
        u32::try_from(now.saturating_duration_since(self.stored_at).as_secs()).unwrap_or(u32::MAX)
    }

    pub(crate) fn is_fresh(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.stored_at) < self.ttl()
    }

    /// The TTL rewrite for a reply at `now`: reduced by the entry's age (fresh), or 30 s (stale).
    fn ttl_at(&self, now: Instant, stale: bool) -> impl Fn(u32) -> u32 {
        let age = self.age_secs(now);
        move |ttl| {
            if stale {
                STALE_TTL
            } else {
                ttl.saturating_sub(age)
            }
        }
    }

    /// The answer as records for a client without DO, TTLs adjusted as for `write_reply` (the
    /// general path: truncation, shuffling records that cannot move as bytes).
    pub fn to_answer(&self, now: Instant, stale: bool) -> Answer {
        self.to_answer_for(now, stale, false)
    }

    /// `to_answer` for a client with DO (`dnssec_ok`: the entry as fetched) or without.
    pub(crate) fn to_answer_for(&self, now: Instant, stale: bool, dnssec_ok: bool) -> Answer {
        let Some((records, counts)) = self.form(dnssec_ok) else {
            return Answer::servfail();
        };
        let mut bytes = Vec::with_capacity(HEADER_LEN + self.wire.len());
        let [answers, authorities, additionals] = counts;
        // Only the counts matter to the decoder; ID and flags are the reply's business.
        header::push(
            &mut bytes,
            0,
            header::QR,
            [1, answers, authorities, additionals],
        );
        bytes.extend_from_slice(self.question());
        bytes.extend_from_slice(records);
        let base = HEADER_LEN + usize::from(self.question_len);
        let total = counts.iter().map(|&c| usize::from(c)).sum();
        let decoded = raw::rewrite_ttls(&mut bytes[base..], total, base, self.ttl_at(now, stale))
            .then(|| Message::from_vec(&bytes).ok())
            .flatten();
        match decoded {
            Some(msg) => Answer {
                rcode: self.rcode(),
                authoritative: false,
                answers: msg.answers,
                authorities: msg.authorities,
                additionals: msg.additionals,
                cut: Cut::default(),
            },
            // Bytes we encoded ourselves always decode; should they not, fail safe.
            None => Answer::servfail(),
        }
    }

    /// Writes the reply to `q` from this entry into `out`: header, the client's question (its
    /// case kept), the records with TTLs adjusted (with DNSSEC records only if `q` set DO), the
    /// answer records shuffled when `shuffle`, and an OPT record when the query had one (DO
    /// echoed). AD is left clear: the caller sets it when its rule allows. Shuffled answers of
    /// addresses alone too large for `limit` (UDP) are cut to a random subset that fits, with
    /// TC=1, and an answer stored as it came is cut to the answers that fit, with TC=1. Returns
    /// false, with `out` in an unspecified state, when this must go the general way instead:
    /// any other reply that would exceed `limit`, answers that cannot be shuffled as bytes, or
    /// an entry without a form for this client.
    pub fn write_reply(
        &self,
        out: &mut Vec<u8>,
        q: &PlainQuery<'_>,
        limit: usize,
        now: Instant,
        stale: bool,
        shuffle: bool,
    ) -> bool {
        let Some((records, counts)) = self.form(q.dnssec_ok) else {
            return false;
        };
        if q.question.len() != usize::from(self.question_len) {
            return false;
        }
        let opt_len = if q.edns_payload.is_some() {
            reply::OPT_LEN
        } else {
            0
        };
        let answers = usize::from(counts[0]);
        let shuffled = shuffle && answers > 1;
        let fits = HEADER_LEN + q.question.len() + records.len() + opt_len <= limit;
        let udp = limit < reply::TCP_LIMIT;
        // Too large for the client: cut here an answer of shuffled addresses alone (a large
        // service through Consul's DNS interface) or an answer stored as it came, over UDP; the
        // general path cuts the rest, the same way (the largest prefix that fits, TC=1).
        let cut_shuffled = !fits && udp && shuffled && counts[1] == 0 && counts[2] == 0;
        let cut_prefix = !fits && udp && !shuffled && self.flags & AS_RECEIVED != 0;
        if !fits && !cut_shuffled && !cut_prefix {
            return false;
        }
        out.clear();
        raw::write_header(out, q, false, self.rcode().low(), counts);
        out.extend_from_slice(q.question);
        let base = out.len();
        let room = if fits {
            usize::MAX
        } else {
            limit.saturating_sub(base + opt_len)
        };
        // Addresses alone: shuffled or rotated at a fixed stride, unread.
        let stride = (shuffled && self.flags & ADDRESSES != 0).then(|| records.len() / answers);
        let total = if let Some(record_len) = stride {
            let written = if fits { answers } else { room / record_len };
            raw::copy_records(out, records, record_len, written, &mut rand::rng());
            cut_to(out, written.min(answers), answers, counts)
        } else if shuffled {
            let mut rng = rand::rng();
            let Some((used, copied)) =
                raw::copy_reordered_answers(out, records, answers, base, room, &mut rng)
            else {
                return false;
            };
            if fits {
                out.extend_from_slice(&records[used..]);
            }
            cut_to(out, copied, answers, counts)
        } else if cut_prefix {
            let copied = raw::copy_prefix(out, records, answers, base, room);
            cut_to(out, copied, answers, counts)
        } else {
            out.extend_from_slice(records);
            counts.iter().map(|&c| usize::from(c)).sum()
        };
        if let Some(record_len) = stride {
            raw::rewrite_ttls_at_stride(&mut out[base..], record_len, self.ttl_at(now, stale));
        } else if !raw::rewrite_ttls(&mut out[base..], total, base, self.ttl_at(now, stale)) {
            return false;
        }
        if opt_len > 0 {
            raw::write_opt(out, q);
            raw::add_additional(out);
        }
        true
    }
}

/// After copying `copied` of `answers` answer records (and, when all were copied, whatever
/// followed them): when some were left out, the counts say only those and TC=1 is set. Returns
/// how many records `out` holds after the question.
fn cut_to(out: &mut [u8], copied: usize, answers: usize, counts: [u16; 3]) -> usize {
    if copied == answers {
        return counts.iter().map(|&c| usize::from(c)).sum();
    }
    header::set_count(
        out,
        Section::Answer,
        u16::try_from(copied).unwrap_or(u16::MAX),
    );
    header::set_count(out, Section::Authority, 0);
    header::set_count(out, Section::Additional, 0);
    header::set_flags(out, header::TC);
    copied
}

/// Why an upstream fetch gave nothing cacheable. Cloneable because one fetch serves every waiter.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FetchError {
    #[error("upstream answered {0}")]
    Rcode(ResponseCode),
    #[error("no upstream answered within {0:?}")]
    Timeout(Duration),
    #[error("upstream unreachable: {0}")]
    Io(String),
    #[error("the fetch task failed")]
    Aborted,
    #[error("too many upstream queries in flight (upstream.max_inflight)")]
    Overloaded,
    #[error("upstream answer cannot be stored: {0}")]
    Unstorable(String),
}

impl FetchError {
    /// The `reason` label when this failure of the upstreams is remembered (RFC 9520), or `None`
    /// for failures of our own (overload, a failed task), which say nothing about the question.
    pub(crate) fn cached_reason(&self) -> Option<&'static str> {
        match self {
            FetchError::Rcode(ResponseCode::ServFail) => Some("servfail"),
            FetchError::Rcode(ResponseCode::Refused) => Some("refused"),
            FetchError::Rcode(_) | FetchError::Unstorable(_) => Some("other"),
            FetchError::Timeout(_) => Some("timeout"),
            FetchError::Io(_) => Some("unreachable"),
            FetchError::Aborted | FetchError::Overloaded => None,
        }
    }
}

/// The `reason` label values of `upstream_failures_cached_total`.
pub(crate) const FAILURE_REASONS: [&str; 5] =
    ["servfail", "refused", "timeout", "unreachable", "other"];

/// The result of a fetch: the entry (stored when its `cacheable` flag says so; an uncacheable
/// answer is served to the waiting queries once), or why there is none.
pub(crate) type FetchResult = Result<CachedAnswer, FetchError>;

type SharedFetch = Shared<BoxFuture<'static, FetchResult>>;

/// Clears a key's in-flight mark when its fetch task ends, however it ends.
struct InflightGuard {
    cache: Cache,
    key: Box<[u8]>,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.cache.remove_inflight(&self.key);
    }
}

/// What the cache holds for a key right now.
pub enum Lookup {
    Fresh(CachedAnswer),
    /// Expired but within `stale_for`: refresh, and serve this if the refresh fails.
    Expired(CachedAnswer),
    Miss,
}

/// Entries weigh their bytes, but at least `floor`, so the entry count stays bounded too.
#[derive(Clone)]
struct Weigh {
    floor: u64,
}

impl quick_cache::Weighter<u64, CachedAnswer> for Weigh {
    fn weight(&self, _key: &u64, value: &CachedAnswer) -> u64 {
        u64::from(value.approx_bytes()).max(self.floor)
    }
}

/// Counts entries evicted for space.
#[derive(Clone)]
struct Evictions(Option<prometheus::IntCounter>);

impl quick_cache::Lifecycle<u64, CachedAnswer> for Evictions {
    type RequestState = ();

    fn on_evict(&self, _state: &mut (), _key: u64, _value: CachedAnswer) {
        if let Some(counter) = &self.0 {
            counter.inc();
        }
    }
}

type Map = quick_cache::sync::Cache<u64, CachedAnswer, Weigh, RandomState, Evictions>;

/// The cache. Cheap to clone (shared state).
///
/// Keyed by a keyed hash (random per process, so collisions cannot be chosen by clients) of the
/// question in wire format and CD; the entry holds the question itself, so a lookup checks it
/// and a collision is a miss, never a wrong answer.
#[derive(Clone)]
pub struct Cache {
    entries: Arc<Map>,
    hasher: RandomState,
    inflight: Arc<Mutex<HashMap<Box<[u8]>, SharedFetch>>>,
    failures: Arc<Failures>,
    /// Counts failures remembered, by reason (`upstream_failures_cached_total`).
    failures_cached: Option<prometheus::IntCounterVec>,
    policy: TtlPolicy,
}

impl Cache {
    /// A cache of at most `max_entries` (about 1 KiB each at most on average); entries evicted
    /// for space (not expiry) are counted in `evictions`.
    pub fn new(
        max_entries: u64,
        policy: TtlPolicy,
        evictions: Option<prometheus::IntCounter>,
    ) -> Cache {
        Cache::with_limits(
            max_entries,
            max_entries.saturating_mul(1024),
            policy,
            evictions,
        )
    }

    /// A cache bounded both in entries and in (approximate) bytes: each entry weighs its size in
    /// bytes but at least `max_bytes / max_entries`, so the total weight stays under `max_bytes`
    /// and the count under `max_entries`.
    pub(crate) fn with_limits(
        max_entries: u64,
        max_bytes: u64,
        policy: TtlPolicy,
        evictions: Option<prometheus::IntCounter>,
    ) -> Cache {
        let floor = (max_bytes / max_entries.max(1)).max(1);
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity(usize::try_from(max_entries).unwrap_or(usize::MAX))
            .weight_capacity(max_bytes.max(1))
            .ghost_allocation(GHOST_SHARE)
            .build();
        let entries = match options {
            Ok(options) => Map::with_options(
                options,
                Weigh { floor },
                RandomState::new(),
                Evictions(evictions.clone()),
            ),
            // Only reachable with a share outside [0, 1], which GHOST_SHARE is not.
            Err(_) => Map::with(
                usize::try_from(max_entries).unwrap_or(usize::MAX),
                max_bytes.max(1),
                Weigh { floor },
                RandomState::new(),
                Evictions(evictions),
            ),
        };
        Cache {
            entries: Arc::new(entries),
            hasher: RandomState::new(),
            inflight: Arc::new(Mutex::new(HashMap::new())),
            failures: Arc::new(Failures::new(FailurePolicy::default())),
            failures_cached: None,
            policy,
        }
    }

    /// Remembers failures for `policy`'s periods (the default: `cache.failure_ttl`'s), counting
    /// each in `counter` by reason.
    pub fn with_failures(
        mut self,
        policy: FailurePolicy,
        counter: Option<prometheus::IntCounterVec>,
    ) -> Cache {
        self.failures = Arc::new(Failures::new(policy));
        self.failures_cached = counter;
        self
    }

    /// The map key of a question in wire format (name lowercased) and CD.
    fn key(&self, question: &[u8], checking_disabled: bool) -> u64 {
        let hash = self.hasher.hash_one(question);
        if checking_disabled {
            hash ^ CD_KEY
        } else {
            hash
        }
    }

    /// The entry for `key` as asked without CD.
    pub fn lookup(&self, key: &Question, now: Instant) -> Lookup {
        self.lookup_wire(&question_wire(key), false, now)
    }

    /// The entry for `key` as asked with `checking_disabled`.
    pub(crate) fn lookup_cd(
        &self,
        key: &Question,
        checking_disabled: bool,
        now: Instant,
    ) -> Lookup {
        self.lookup_wire(&question_wire(key), checking_disabled, now)
    }

    /// Looks up a question given in wire format with its name lowercased
    /// (`raw::question_key`), as asked with CD or without.
    pub(crate) fn lookup_wire(
        &self,
        question: &[u8],
        checking_disabled: bool,
        now: Instant,
    ) -> Lookup {
        let hash = self.key(question, checking_disabled);
        match self.entries.get(&hash) {
            Some(entry)
                if entry.question() != question
                    || entry.checking_disabled() != checking_disabled =>
            {
                Lookup::Miss
            }
            Some(entry) if entry.is_fresh(now) => Lookup::Fresh(entry),
            Some(entry)
                if now.saturating_duration_since(entry.stored_at)
                    < entry.ttl().saturating_add(self.policy.stale_for) =>
            {
                Lookup::Expired(entry)
            }
            Some(_) => {
                // Past its stale window: gone for good (unless refreshed meanwhile).
                self.entries.remove_if(&hash, |e: &CachedAnswer| {
                    now.saturating_duration_since(e.stored_at)
                        >= e.ttl().saturating_add(self.policy.stale_for)
                });
                Lookup::Miss
            }
            None => Lookup::Miss,
        }
    }

    /// Did the upstreams fail for `key` (asked with `checking_disabled` or without) so recently
    /// that it must not be asked again yet (RFC 9520)?
    pub(crate) fn failed_recently(
        &self,
        key: &Question,
        checking_disabled: bool,
        now: Instant,
    ) -> bool {
        let question = question_wire(key);
        let hash = self.key(&question, checking_disabled);
        self.failures.active(hash, &question, now)
    }

    /// Approximate bytes the entries hold (their weights), for the status page.
    pub(crate) fn weight(&self) -> u64 {
        self.entries.weight()
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.len() as u64
    }

    fn store(&self, entry: CachedAnswer) {
        let hash = self.key(entry.question(), entry.checking_disabled());
        self.entries.insert(hash, entry);
    }

    /// [`Cache::fetch_dnssec`] for a question asked without DO or CD.
    pub async fn fetch<F, Fut, R>(&self, key: &Question, fetch: F) -> FetchResult
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<R, FetchError>> + Send + 'static,
        R: Into<UpstreamReply>,
    {
        self.fetch_dnssec(key, Dnssec::default(), fetch).await
    }

    /// Runs `fetch` for `key` asked with `asked`'s DO and CD, unless a fetch for the same is
    /// already running, in which case its result is shared. The fetch is driven by whichever
    /// of its waiters polls it (no task of its own: that was a tenth of a miss's CPU), so a
    /// client giving up does not cancel it for the others; once every waiter has, it stops. A
    /// cacheable result is stored before it is returned; a failure of the upstreams is
    /// remembered (see `failures`).
    pub async fn fetch_dnssec<F, Fut, R>(
        &self,
        key: &Question,
        asked: Dnssec,
        fetch: F,
    ) -> FetchResult
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<R, FetchError>> + Send + 'static,
        R: Into<UpstreamReply>,
    {
        let question = question_wire(key);
        // Built at its final size: a clone and a push would reallocate it twice, per miss.
        let mut wire = Vec::with_capacity(question.len() + 1);
        wire.extend_from_slice(&question);
        wire.push(u8::from(asked.dnssec_ok) | u8::from(asked.checking_disabled) << 1);
        let wire: Box<[u8]> = wire.into();
        let shared = {
            let mut inflight = lock(&self.inflight);
            if let Some(running) = inflight.get(&wire) {
                running.clone()
            } else {
                let cache = self.clone();
                let q = key.clone();
                let task_key = wire.clone();
                let upstream = fetch();
                let task = std::panic::AssertUnwindSafe(async move {
                    // Whatever happens to this fetch (a panic, every waiter gone), the key must
                    // not stay marked in flight, or every later query for it would wait on a
                    // dead fetch.
                    let _done = InflightGuard {
                        cache: cache.clone(),
                        key: task_key,
                    };
                    let fetched = match upstream.await {
                        Ok(reply) => CachedAnswer::from_reply(
                            &q,
                            &reply.into(),
                            asked,
                            &cache.policy,
                            Instant::now(),
                        ),
                        Err(e) => Err(e),
                    };
                    cache.settle(&question, asked, &fetched);
                    fetched
                });
                let shared: SharedFetch = task
                    .catch_unwind()
                    .map(|finished| finished.unwrap_or(Err(FetchError::Aborted)))
                    .boxed()
                    .shared();
                inflight.insert(wire, shared.clone());
                shared
            }
        };
        shared.await
    }

    /// Stores what a fetch for `question` gave, or remembers that it failed.
    fn settle(&self, question: &[u8], asked: Dnssec, fetched: &FetchResult) {
        let hash = self.key(question, asked.checking_disabled);
        match fetched {
            Ok(entry) => {
                self.failures.clear(hash);
                if entry.cacheable() {
                    self.store(entry.clone());
                }
            }
            Err(e) => {
                if let Some(reason) = e.cached_reason() {
                    self.failures.record(hash, question, Instant::now());
                    if let Some(counter) = &self.failures_cached {
                        counter.with_label_values(&[reason]).inc();
                    }
                }
            }
        }
    }

    fn remove_inflight(&self, key: &[u8]) {
        // Called from a destructor too: never panic here.
        let mut inflight = lock(&self.inflight);
        inflight.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, OpCode, Query};
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{DNSClass, Name, RecordType};
    use std::str::FromStr;

    fn policy() -> TtlPolicy {
        TtlPolicy {
            min_ttl: Duration::from_secs(10),
            max_ttl: Duration::from_secs(100),
            negative_ttl: Duration::from_secs(30),
            negative_min_ttl: Duration::ZERO,
            stale_for: Duration::from_secs(3600),
        }
    }

    fn reply(rcode: ResponseCode, a_ttls: &[u32], soa: Option<(u32, u32)>) -> Message {
        let name = Name::from_str("x.example.").expect("name");
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.metadata.response_code = rcode;
        m.add_query(Query::query(name.clone(), RecordType::A));
        for (i, ttl) in a_ttls.iter().enumerate() {
            m.add_answer(Record::from_rdata(
                name.clone(),
                *ttl,
                RData::A(A::new(192, 0, 2, i as u8)),
            ));
        }
        if let Some((ttl, min)) = soa {
            let zone = Name::from_str("example.").expect("zone");
            m.add_authority(Record::from_rdata(
                zone.clone(),
                ttl,
                RData::SOA(SOA::new(zone.clone(), zone, 1, 2, 3, 4, min)),
            ));
        }
        m
    }

    fn question() -> Question {
        Question {
            name: Name::from_str("x.example.").expect("name"),
            qtype: RecordType::A,
            qclass: DNSClass::IN,
        }
    }

    fn store(msg: &Message, now: Instant) -> Result<CachedAnswer, FetchError> {
        CachedAnswer::from_message(&question(), msg, &policy(), now)
    }

    fn ttls(records: &[Record]) -> Vec<u32> {
        records.iter().map(|r| r.ttl).collect()
    }

    #[test]
    fn positive_ttls_are_clamped_and_count_down() {
        let now = Instant::now();
        let e = store(&reply(ResponseCode::NoError, &[5, 50, 500], None), now).expect("cacheable");
        assert_eq!(ttls(&e.to_answer(now, false).answers), vec![10, 50, 100]);
        assert_eq!(e.ttl(), Duration::from_secs(10));
        let later = e.to_answer(now + Duration::from_millis(3500), false);
        assert_eq!(ttls(&later.answers), vec![7, 47, 97]);
        assert!(e.is_fresh(now + Duration::from_secs(9)));
        assert!(!e.is_fresh(now + Duration::from_secs(10)));
        let stale = e.to_answer(now + Duration::from_secs(60), true);
        assert!(stale.answers.iter().all(|r| r.ttl == STALE_TTL));
    }

    #[test]
    fn negative_ttl_from_soa_minimum_capped() {
        let now = Instant::now();
        let e =
            store(&reply(ResponseCode::NXDomain, &[], Some((3600, 20))), now).expect("cacheable");
        assert_eq!(e.ttl(), Duration::from_secs(20));
        assert_eq!(ttls(&e.to_answer(now, false).authorities), vec![20]);
        let e =
            store(&reply(ResponseCode::NoError, &[], Some((3600, 900))), now).expect("cacheable");
        assert_eq!(e.ttl(), Duration::from_secs(30), "capped by negative_ttl");
        let no_soa = store(&reply(ResponseCode::NXDomain, &[], None), now).expect("passed on");
        assert!(!no_soa.cacheable());
        assert!(matches!(
            store(&reply(ResponseCode::ServFail, &[], None), now),
            Err(FetchError::Rcode(ResponseCode::ServFail))
        ));
    }

    /// The bytes path and the general path (decode, then `reply::encode_reply`) must give the
    /// same reply: same header, the client's question case, same records and TTLs, same OPT.
    #[test]
    fn byte_replies_equal_the_general_path() {
        let now = Instant::now();
        let later = now + Duration::from_secs(4);
        for (msg, edns) in [
            (reply(ResponseCode::NoError, &[5, 50, 500], None), None),
            (reply(ResponseCode::NoError, &[60], None), Some(4096)),
            (
                reply(ResponseCode::NXDomain, &[], Some((3600, 20))),
                Some(512),
            ),
        ] {
            let e = store(&msg, now).expect("cacheable");
            let mut request = Message::query();
            request.metadata.id = 777;
            request.metadata.recursion_desired = true;
            request.metadata.checking_disabled = true;
            request.add_query(Query::query(
                Name::from_ascii("X.ExAmple.").expect("name"),
                RecordType::A,
            ));
            if let Some(size) = edns {
                let mut opt = hickory_proto::op::Edns::new();
                opt.set_max_payload(size);
                request.edns = Some(opt);
            }
            let bytes = request.to_vec().expect("encode");
            let plain = raw::parse_plain_query(&bytes).expect("plain");
            for stale in [false, true] {
                let mut fast = Vec::new();
                assert!(e.write_reply(&mut fast, &plain, 512, later, stale, false));
                let limit = crate::reply::reply_limit(&request, crate::reply::Transport::Udp);
                let (general, truncated) =
                    crate::reply::encode_reply(&request, &e.to_answer(later, stale), limit);
                assert!(!truncated);
                assert_eq!(
                    Message::from_vec(&fast).expect("fast decodes"),
                    Message::from_vec(&general).expect("general decodes"),
                    "edns {edns:?} stale {stale}"
                );
                assert_eq!(
                    &fast[12..12 + 13],
                    b"\x01X\x07ExAmple\x00\x00\x01",
                    "case kept"
                );
            }
            assert!(
                !e.write_reply(&mut Vec::new(), &plain, 20, later, false, false),
                "over limit"
            );
        }
    }

    /// `x.example. A`, without EDNS.
    fn a_query() -> Message {
        let mut request = Message::query();
        request.add_query(Query::query(
            Name::from_str("x.example.").expect("name"),
            RecordType::A,
        ));
        request
    }

    #[test]
    fn shuffled_byte_replies_keep_every_record_and_vary() {
        let now = Instant::now();
        let e = store(&reply(ResponseCode::NoError, &[60, 60, 60, 60], None), now).expect("ok");
        let request = a_query();
        let bytes = request.to_vec().expect("encode");
        let plain = raw::parse_plain_query(&bytes).expect("plain");
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..64 {
            let mut out = Vec::new();
            assert!(e.write_reply(&mut out, &plain, 512, now, false, true));
            let msg = Message::from_vec(&out).expect("decodes");
            let mut addrs: Vec<String> = msg.answers.iter().map(|r| r.data.to_string()).collect();
            firsts.insert(addrs[0].clone());
            addrs.sort();
            assert_eq!(addrs, ["192.0.2.0", "192.0.2.1", "192.0.2.2", "192.0.2.3"]);
        }
        assert!(firsts.len() > 1, "the order changes");
    }

    /// A large service through Consul's DNS interface: more addresses than a UDP reply holds.
    /// The bytes path cuts them as the general path does (as many as fit, TC=1), to a random
    /// subset; over TCP everything fits and nothing is cut.
    #[test]
    fn shuffled_addresses_too_many_for_udp_are_cut_to_a_random_subset() {
        let now = Instant::now();
        let e = store(&reply(ResponseCode::NoError, &[60; 100], None), now).expect("ok");
        let request = a_query();
        let bytes = request.to_vec().expect("encode");
        let plain = raw::parse_plain_query(&bytes).expect("plain");
        let (general, truncated) = reply::encode_reply(&request, &e.to_answer(now, false), 512);
        assert!(truncated);
        let general = Message::from_vec(&general).expect("general decodes");
        let mut kept = std::collections::HashSet::new();
        for _ in 0..20 {
            let mut out = Vec::new();
            assert!(e.write_reply(&mut out, &plain, 512, now, false, true));
            assert!(out.len() <= 512);
            let msg = Message::from_vec(&out).expect("decodes");
            assert!(msg.metadata.truncation, "TC=1: TCP gives more");
            assert_eq!(msg.answers.len(), general.answers.len(), "as many as fit");
            assert!(msg.answers.iter().all(|r| r.ttl == 60));
            kept.extend(msg.answers.iter().map(|r| r.data.to_string()));
        }
        assert!(
            kept.len() > general.answers.len(),
            "a different subset each time"
        );
        // Addresses alone, past SHUFFLED_WHOLE: rotated at a fixed stride. Every record, in the
        // stored order from any one on, TTLs aged like any other reply's.
        assert!(e.flags & ADDRESSES != 0);
        let later = now + Duration::from_secs(5);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let mut out = Vec::new();
            assert!(e.write_reply(&mut out, &plain, reply::TCP_LIMIT, later, false, true));
            let msg = Message::from_vec(&out).expect("decodes");
            assert!(!msg.metadata.truncation);
            let last_octets: Vec<u8> = msg
                .answers
                .iter()
                .filter_map(|r| match r.data {
                    RData::A(a) => Some(a.0.octets()[3]),
                    _ => None,
                })
                .collect();
            assert_eq!(last_octets.len(), 100);
            assert!(msg.answers.iter().all(|r| r.ttl == 55), "aged");
            let first = last_octets[0];
            assert!(last_octets
                .iter()
                .enumerate()
                .all(|(k, &o)| usize::from(o) == (usize::from(first) + k) % 100));
            firsts.insert(first);
        }
        assert!(
            firsts.len() > 50,
            "any record comes first: {}",
            firsts.len()
        );
        // With an authority record the stride does not apply; the records are read as before.
        let with_soa = store(
            &reply(ResponseCode::NoError, &[60; 20], Some((60, 60))),
            now,
        );
        assert!(with_soa.expect("ok").flags & ADDRESSES == 0);
        // Not shuffled (an upstream answer): too large goes the general way.
        assert!(!e.write_reply(&mut Vec::new(), &plain, 512, now, false, false));
    }

    /// Stored as it came (the common miss) or encoded again, two or more addresses alone are
    /// marked for the stride, and more than SHUFFLED_WHOLE rotated; a single one is not marked.
    #[test]
    fn many_addresses_stored_as_they_came_are_rotated_too() {
        let now = Instant::now();
        let received = |ttls: &[u32]| {
            let wire = reply(ResponseCode::NoError, ttls, None)
                .to_vec()
                .expect("encode");
            let reply = UpstreamReply::received(None, wire);
            CachedAnswer::from_reply(&question(), &reply, Dnssec::default(), &policy(), now)
                .expect("stored")
        };
        let many = received(&[60; 40]);
        assert_eq!(
            many.flags & (AS_RECEIVED | ADDRESSES),
            AS_RECEIVED | ADDRESSES
        );
        assert_eq!(received(&[60; 3]).flags & ADDRESSES, ADDRESSES);
        assert_eq!(
            received(&[60]).flags & ADDRESSES,
            0,
            "one is never shuffled"
        );
        let bytes = a_query().to_vec().expect("encode");
        let plain = raw::parse_plain_query(&bytes).expect("plain");
        let mut out = Vec::new();
        assert!(many.write_reply(&mut out, &plain, 512, now, false, true));
        let msg = Message::from_vec(&out).expect("decodes");
        // 40 A records need 667 bytes: the 30 that fit in 512, a run from any one on, TC=1.
        assert!(msg.metadata.truncation && out.len() <= 512);
        let octets: Vec<u8> = msg
            .answers
            .iter()
            .filter_map(|r| match r.data {
                RData::A(a) => Some(a.0.octets()[3]),
                _ => None,
            })
            .collect();
        assert_eq!(octets.len(), 30);
        assert!(
            octets.windows(2).all(|w| w[1] == (w[0] + 1) % 40),
            "{octets:?}"
        );
    }

    #[test]
    fn lookups_check_the_question_and_drop_entries_past_their_stale_window() {
        let cache = Cache::new(100, policy(), None);
        let now = Instant::now();
        let e = store(&reply(ResponseCode::NoError, &[10], None), now).expect("ok");
        cache.store(e);
        assert!(matches!(cache.lookup(&question(), now), Lookup::Fresh(_)));
        let mut other = question();
        other.qtype = RecordType::AAAA;
        assert!(matches!(cache.lookup(&other, now), Lookup::Miss));
        let expired = now + Duration::from_secs(11);
        assert!(matches!(
            cache.lookup(&question(), expired),
            Lookup::Expired(_)
        ));
        let gone = now + Duration::from_secs(10 + 3600 + 1);
        assert!(matches!(cache.lookup(&question(), gone), Lookup::Miss));
        assert_eq!(cache.entry_count(), 0, "removed when met past its window");
    }

    #[test]
    fn the_byte_bound_evicts_and_counts() {
        let counter = prometheus::IntCounter::new("e", "e").expect("counter");
        let cache = Cache::with_limits(10_000, 64 * 1024, policy(), Some(counter.clone()));
        let now = Instant::now();
        for i in 0..5_000u32 {
            let q = Question {
                name: Name::from_str(&format!("n{i}.example.")).expect("name"),
                qtype: RecordType::A,
                qclass: DNSClass::IN,
            };
            let e = CachedAnswer::from_message(
                &q,
                &reply(ResponseCode::NoError, &[60], None),
                &policy(),
                now,
            )
            .expect("ok");
            cache.store(e);
        }
        assert!(
            cache.entry_count() < 1_000,
            "{} entries in 64 KiB",
            cache.entry_count()
        );
        assert!(
            counter.get() > 4_000,
            "evictions counted: {}",
            counter.get()
        );
    }

    #[tokio::test]
    async fn identical_concurrent_fetches_share_one() {
        let cache = Cache::new(100, policy(), None);
        let key = Question {
            name: Name::from_str("x.example.").expect("name"),
            qtype: RecordType::A,
            qclass: DNSClass::IN,
        };
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let cache = cache.clone();
            let key = key.clone();
            let calls = calls.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .fetch(&key, move || async move {
                        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(reply(ResponseCode::NoError, &[60], None))
                    })
                    .await
            }));
        }
        for t in tasks {
            assert!(t.await.expect("join").is_ok());
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(matches!(
            cache.lookup(&key, Instant::now()),
            Lookup::Fresh(_)
        ));
    }

    #[tokio::test]
    async fn a_panicking_fetch_does_not_wedge_its_key() {
        let cache = Cache::new(100, policy(), None);
        let key = Question {
            name: Name::from_str("x.example.").expect("name"),
            qtype: RecordType::A,
            qclass: DNSClass::IN,
        };
        let first = cache
            .fetch(&key, || async {
                let r: Result<Message, FetchError> = Err(FetchError::Aborted);
                if r.is_err() {
                    panic!("a bug in a fetch");
                }
                r
            })
            .await;
        assert!(matches!(first, Err(FetchError::Aborted)));
        let second = cache
            .fetch(&key, || async {
                Ok(reply(ResponseCode::NoError, &[60], None))
            })
            .await;
        assert!(
            second.is_ok(),
            "the key is fetched again, not stuck on the dead fetch"
        );
    }

    /// An RRSIG over `covered` in its real layout, as opaque rdata (hickory is built without its
    /// DNSSEC types here, so it keeps these bytes as they are, as it does in the program).
    fn rrsig(owner: &str, covered: RecordType, ttl: u32) -> Record {
        let mut rdata = u16::from(covered).to_be_bytes().to_vec();
        rdata.extend_from_slice(&[13, 2]);
        rdata.extend_from_slice(&ttl.to_be_bytes());
        rdata.extend_from_slice(&[0x6a, 0, 0, 0, 0x69, 0, 0, 0, 0x12, 0x34]);
        rdata.extend_from_slice(b"\x07example\x00");
        rdata.extend_from_slice(&[0xab; 64]);
        opaque(owner, RecordType::RRSIG, ttl, rdata)
    }

    fn opaque(owner: &str, code: RecordType, ttl: u32, rdata: Vec<u8>) -> Record {
        Record::from_rdata(
            Name::from_str(owner).expect("name"),
            ttl,
            RData::Unknown {
                code,
                rdata: hickory_proto::rr::rdata::NULL::with(rdata),
            },
        )
    }

    /// `reply`'s answer signed as a validating resolver gives it to a DO client: an RRSIG after
    /// the A records, and for a negative answer the SOA's RRSIG and an NSEC with its RRSIG.
    fn signed(mut m: Message) -> Message {
        m.metadata.authentic_data = true;
        if !m.answers.is_empty() {
            m.add_answer(rrsig("x.example.", RecordType::A, 60));
        } else {
            m.add_authority(rrsig("example.", RecordType::SOA, 3600));
            m.add_authority(opaque(
                "example.",
                RecordType::NSEC,
                3600,
                b"\x01z\x07example\x00\x00\x01\x40".to_vec(),
            ));
            m.add_authority(rrsig("example.", RecordType::NSEC, 3600));
        }
        m
    }

    const DO: Dnssec = Dnssec {
        dnssec_ok: true,
        checking_disabled: false,
        authentic_data: false,
    };

    fn types(records: &[Record]) -> Vec<RecordType> {
        records.iter().map(Record::record_type).collect()
    }

    fn query_bytes(dnssec_ok: bool) -> Vec<u8> {
        let mut request = a_query();
        let mut opt = hickory_proto::op::Edns::new();
        opt.set_max_payload(1232);
        opt.set_dnssec_ok(dnssec_ok);
        request.edns = Some(opt);
        request.to_vec().expect("encode")
    }

    /// One entry, fetched with DO, serves DO clients the signatures and proofs and every other
    /// client the same answer without them, on the bytes path as on the general path.
    #[test]
    fn do_entries_serve_both_kinds_of_client_and_only_do_clients_get_signatures() {
        let now = Instant::now();
        for (msg, answer_types, authority_types) in [
            (
                signed(reply(ResponseCode::NoError, &[60, 60], None)),
                vec![RecordType::A, RecordType::A, RecordType::RRSIG],
                vec![],
            ),
            (
                signed(reply(ResponseCode::NXDomain, &[], Some((3600, 20)))),
                vec![],
                vec![
                    RecordType::SOA,
                    RecordType::RRSIG,
                    RecordType::NSEC,
                    RecordType::RRSIG,
                ],
            ),
        ] {
            let e = CachedAnswer::from_reply(&question(), &msg.into(), DO, &policy(), now)
                .expect("cacheable");
            assert!(e.serves(true) && e.serves(false) && e.authentic_data());
            let full = e.to_answer_for(now, false, true);
            assert_eq!(types(&full.answers), answer_types);
            assert_eq!(types(&full.authorities), authority_types);
            if !authority_types.is_empty() {
                assert!(full.authorities.iter().all(|r| r.ttl == 20), "negative TTL");
            }
            let plain = e.to_answer(now, false);
            assert!(!plain
                .answers
                .iter()
                .chain(&plain.authorities)
                .any(|r| header::is_dnssec_proof(u16::from(r.record_type()))));
            for dnssec_ok in [true, false] {
                let bytes = query_bytes(dnssec_ok);
                let q = raw::parse_plain_query(&bytes).expect("plain");
                assert_eq!(q.dnssec_ok, dnssec_ok);
                let mut fast = Vec::new();
                assert!(e.write_reply(&mut fast, &q, 1232, now, false, false));
                let request = Message::from_vec(&bytes).expect("decodes");
                let answer = e.to_answer_for(now, false, dnssec_ok);
                let (general, _) = reply::encode_reply(&request, &answer, 1232);
                let fast = Message::from_vec(&fast).expect("fast decodes");
                assert_eq!(fast, Message::from_vec(&general).expect("general decodes"));
                assert_eq!(
                    fast.edns.map(|o| o.flags().dnssec_ok),
                    Some(dnssec_ok),
                    "DO echoed"
                );
                assert!(
                    !fast.metadata.authentic_data,
                    "AD is the forwarder's to set"
                );
            }
        }
    }

    /// Fetched without DO, an entry never serves a DO client (it lacks the signatures), and
    /// holds no DNSSEC record even if the upstream sent some. An unsigned answer fetched with DO
    /// costs no more than fetched without.
    #[test]
    fn plain_entries_serve_only_clients_without_do() {
        let now = Instant::now();
        let msg = signed(reply(ResponseCode::NoError, &[60], None));
        let e = store(&msg, now).expect("cacheable");
        assert!(!e.serves(true) && e.serves(false));
        assert_eq!(types(&e.to_answer(now, false).answers), [RecordType::A]);
        let unsigned = reply(ResponseCode::NoError, &[60], None);
        let with_do =
            CachedAnswer::from_reply(&question(), &unsigned.clone().into(), DO, &policy(), now)
                .expect("ok");
        let without = store(&unsigned, now).expect("ok");
        assert_eq!(with_do.approx_bytes(), without.approx_bytes());
        let signed =
            CachedAnswer::from_reply(&question(), &msg.into(), DO, &policy(), now).expect("ok");
        assert!(
            signed.approx_bytes() > e.approx_bytes() + 64,
            "the signed form and the plain one: {} vs {}",
            signed.approx_bytes(),
            e.approx_bytes()
        );
    }

    #[test]
    fn cd_answers_are_kept_apart() {
        let cache = Cache::new(100, policy(), None);
        let now = Instant::now();
        let cd = Dnssec {
            checking_disabled: true,
            ..Dnssec::default()
        };
        let msg = reply(ResponseCode::NoError, &[60], None);
        cache.store(
            CachedAnswer::from_reply(&question(), &msg.into(), cd, &policy(), now).expect("ok"),
        );
        assert!(matches!(cache.lookup(&question(), now), Lookup::Miss));
        assert!(matches!(
            cache.lookup_cd(&question(), true, now),
            Lookup::Fresh(_)
        ));
    }

    /// An upstream reply of `n` A records whose owners all point at the question (as BIND and
    /// unbound compress them), with an OPT record: 16 bytes a record.
    fn compressed_reply(n: u16) -> Vec<u8> {
        let mut out = Vec::new();
        header::push(&mut out, 1, header::QR | header::RA, [1, n, 0, 1]);
        out.extend_from_slice(b"\x01x\x07example\x00\x00\x01\x00\x01");
        for i in 0..n {
            out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 10, 0]);
            out.extend_from_slice(&i.to_be_bytes());
        }
        out.extend_from_slice(&[0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0]);
        out
    }

    /// hickory compresses at most 120 names, so 3,000 records that arrived in 48 KB take 75 KB
    /// encoded again: the entry keeps them as they came, serves them whole over TCP and cut to
    /// what fits (TC=1) over UDP, and is not fetched again.
    #[test]
    fn answers_too_large_to_encode_again_are_kept_as_they_came() {
        let now = Instant::now();
        let wire = compressed_reply(3000);
        assert!(wire.len() < reply::TCP_LIMIT);
        let message = Message::from_vec(&wire).expect("decodes");
        assert!(matches!(
            CachedAnswer::from_message(&question(), &message, &policy(), now),
            Err(FetchError::Unstorable(_))
        ));
        let reply_in = UpstreamReply {
            message: Some(message),
            wire: Some(wire.clone()),
            exchange: None,
        };
        let e = CachedAnswer::from_reply(&question(), &reply_in, Dnssec::default(), &policy(), now)
            .expect("kept as it came");
        assert_eq!(e.ttl(), Duration::from_secs(100), "clamped to max_ttl");
        let bytes = a_query().to_vec().expect("encode");
        let q = raw::parse_plain_query(&bytes).expect("plain");
        let mut out = Vec::new();
        assert!(e.write_reply(&mut out, &q, reply::TCP_LIMIT, now, false, false));
        assert_eq!(
            out.len(),
            wire.len() - 11,
            "the same bytes, less the OPT record"
        );
        let whole = Message::from_vec(&out).expect("decodes");
        assert_eq!(whole.answers.len(), 3000);
        assert!(!whole.metadata.truncation && whole.answers.iter().all(|r| r.ttl == 100));
        assert!(e.write_reply(&mut out, &q, 512, now, false, false));
        assert!(out.len() <= 512);
        let cut = Message::from_vec(&out).expect("decodes");
        assert!(cut.metadata.truncation);
        assert_eq!(cut.answers.len(), (512 - 12 - 15) / 16);
        assert_eq!(cut.answers[..], whole.answers[..cut.answers.len()]);
    }

    #[tokio::test]
    async fn upstream_failures_are_remembered_per_question_and_cd() {
        let counter = prometheus::IntCounterVec::new(prometheus::Opts::new("f", "f"), &["reason"])
            .expect("counter");
        let cache = Cache::new(100, policy(), None).with_failures(
            FailurePolicy {
                ttl: Duration::from_secs(5),
                max_ttl: Duration::from_secs(30),
            },
            Some(counter.clone()),
        );
        let q = question();
        let failed = cache
            .fetch(&q, || async {
                Err::<Message, _>(FetchError::Rcode(ResponseCode::ServFail))
            })
            .await;
        assert!(failed.is_err());
        let now = Instant::now();
        assert!(cache.failed_recently(&q, false, now));
        assert!(
            !cache.failed_recently(&q, true, now),
            "CD is another question"
        );
        assert!(!cache.failed_recently(&q, false, now + Duration::from_secs(5)));
        assert_eq!(counter.with_label_values(&["servfail"]).get(), 1);
        // Our own overload says nothing about the question.
        let mut other = question();
        other.qtype = RecordType::AAAA;
        let _ = cache
            .fetch(&other, || async {
                Err::<Message, _>(FetchError::Overloaded)
            })
            .await;
        assert!(!cache.failed_recently(&other, false, now));
        // An answer forgets the failure.
        cache
            .fetch(&q, || async {
                Ok(reply(ResponseCode::NoError, &[60], None))
            })
            .await
            .expect("answer");
        assert!(!cache.failed_recently(&q, false, Instant::now()));
    }
}
