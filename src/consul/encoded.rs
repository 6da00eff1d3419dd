//! Consul service addresses kept as wire bytes, so that an A or AAAA question for a service is
//! answered the way a forwarded cache hit is (see `raw`): no `Message`, no task, no records built.
//!
//! The general path (`ConsulSource::answer`) remembers, per question (name lowercased, type,
//! class IN), the view it answered from and every address record the question's pool can give,
//! encoded once: owner a pointer to the question, the final TTL, in a random order. Every such
//! record of a question has the same length (16 bytes for A, 28 for AAAA), so the three size
//! classes (512 bytes without EDNS, the client's EDNS size, TCP) need no encoding of their own:
//! each reduces to a record count. Per query only the header is written, the question copied in
//! the client's case, the records copied (a pool of up to 16 shuffled, or a shuffled subset of
//! it when cut; a larger one's sample a window of the encoded order from a random start:
//! `raw::copy_records`), and the OPT
//! record added; the counts follow the general path's rules exactly (`records::record_cap`,
//! `a_record_limit`, `udp_answer_limit`, the cut at the client's size, TC).
//!
//! An entry is used only while its view is still the one the backend serves at once, with
//! nothing to wait for or wake: each carries the backend's check for that
//! ([`super::Backend::serving`], made when the entry is remembered), asked per query without
//! looking the view up. A view replaced by its watcher or the change feed, a watcher gone
//! idle, a view gone stale or without a blocking query all send the query the general way,
//! which remembers the new view.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use hickory_proto::rr::{DNSClass, Name, RecordType};
use rand::seq::SliceRandom;
use rand::Rng;

use super::catalog::{Selection, ServiceView};
use super::records;
use super::StillServed;
use crate::header::{self, HEADER_LEN};
use crate::raw::{self, PlainQuery};
use crate::reply::{OPT_LEN, TCP_LIMIT, UDP_LIMIT_NO_EDNS};

/// Questions remembered at once. Each is a name someone asked that has a watched view, so the
/// bound is that of the watchers (`http::MAX_WATCHERS`); past it the table starts over.
pub(crate) const MAX_ENCODED_ANSWERS: usize = 20_000;

/// Bytes of encoded records held at once (a 5,000-instance service's A records take 80 KB);
/// past it the table starts over, so memory stays bounded whatever names are asked.
pub(crate) const MAX_ENCODED_BYTES: usize = 16 << 20;

/// The owner of every record: a compression pointer to the question's name.
const OWNER: [u8; 2] = [0xc0, HEADER_LEN as u8];

/// An encoded record's length: owner (`OWNER`), type, class, TTL, RDLENGTH (10 bytes), address;
/// the length `raw::copy_records` moves without a `memcpy` call.
const A_RECORD_LEN: usize = raw::POINTED_A_LEN;
const AAAA_RECORD_LEN: usize = raw::POINTED_AAAA_LEN;

/// One question's addresses, as records.
pub(crate) struct Encoded {
    /// The view they came from, and the backend's check that it is still the one served.
    view: Arc<ServiceView>,
    check: Box<dyn StillServed>,
    /// Every record, `record_len` bytes each, in a random order drawn when the entry was made.
    records: Box<[u8]>,
    record_len: usize,
    qtype: RecordType,
    /// The question name's length as `records::record_cap` counts it (`Name::len`).
    qname_len: usize,
}

impl Encoded {
    fn count(&self) -> usize {
        self.records.len() / self.record_len
    }
}

/// The config rules the counts follow (see `ConsulSource::answer_inner`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rules {
    pub(crate) a_record_limit: usize,
    pub(crate) udp_answer_limit: usize,
    /// `consul.enable_truncate`.
    pub(crate) truncate: bool,
}

/// How one reply is cut: how many records it carries, and what the general path would say
/// about what it left out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Shape {
    written: usize,
    /// TC in the reply.
    tc: bool,
    /// The general path would count the reply in `truncated_responses_total`.
    counted_truncated: bool,
}

/// The general path's counts for a pool of `count` records of `record_len` bytes, `cap`
/// (`records::record_cap`) and `room` bytes left after the header, question and OPT: `pick`
/// draws `min(cap, count)`, `a_record_limit` cuts, `udp_answer_limit` cuts a 512-byte reply
/// (setting TC unless `enable_truncate` is off), and `encode_reply` keeps what fits.
fn shape(
    count: usize,
    cap: usize,
    record_len: usize,
    room: usize,
    limit: usize,
    rules: Rules,
) -> Shape {
    let mut chosen = count.min(cap);
    if rules.a_record_limit > 0 {
        chosen = chosen.min(rules.a_record_limit);
    }
    let by_source =
        limit == UDP_LIMIT_NO_EDNS && rules.udp_answer_limit > 0 && chosen > rules.udp_answer_limit;
    if by_source {
        chosen = rules.udp_answer_limit;
    }
    let written = chosen.min(room / record_len);
    let cut = written < chosen;
    let tc = rules.truncate && (by_source || (cut && limit < TCP_LIMIT));
    Shape {
        written,
        tc,
        counted_truncated: cut || by_source,
    }
}

/// Writes the reply to `query` from `entry` into `out`. Returns false (leaving `out` to be
/// overwritten) when the general path must answer instead: a cut it would count in
/// `truncated_responses_total` without TC (`enable_truncate = false`, or a TCP reply cut),
/// which the hot path could not count.
pub(crate) fn write_reply(
    out: &mut Vec<u8>,
    query: &PlainQuery<'_>,
    entry: &Encoded,
    limit: usize,
    rules: Rules,
    rng: &mut impl Rng,
) -> bool {
    let opt_len = if query.edns_payload.is_some() {
        OPT_LEN
    } else {
        0
    };
    let room = limit.saturating_sub(HEADER_LEN + query.question.len() + opt_len);
    let cap = records::record_cap(entry.qtype, limit, entry.qname_len);
    let shape = shape(entry.count(), cap, entry.record_len, room, limit, rules);
    if shape.counted_truncated != shape.tc {
        return false;
    }
    let Ok(written) = u16::try_from(shape.written) else {
        return false;
    };
    out.clear();
    raw::write_header(out, query, true, 0, [written, 0, 0]);
    out.extend_from_slice(query.question);
    raw::copy_records(out, &entry.records, entry.record_len, shape.written, rng);
    if query.edns_payload.is_some() {
        raw::write_opt(out, query);
        raw::add_additional(out);
    }
    if shape.tc {
        header::set_flags(out, header::TC);
    }
    true
}

/// The records of `pool` (instances of `view` with an address for `qtype`, A or AAAA) in a
/// random order (the one `raw::copy_records` takes windows of), or `None` when the pool is empty or two instances share an address (the general path drops
/// duplicates after drawing, which a fixed record list cannot reproduce).
fn encode_pool(
    view: &ServiceView,
    pool: &[u32],
    qtype: RecordType,
    ttl: u32,
) -> Option<(Vec<u8>, usize)> {
    let record_len = match qtype {
        RecordType::A => A_RECORD_LEN,
        RecordType::AAAA => AAAA_RECORD_LEN,
        _ => return None,
    };
    let rdata_len = record_len - OWNER.len() - 10;
    let mut out = Vec::with_capacity(pool.len() * record_len);
    let mut seen = std::collections::HashSet::with_capacity(pool.len());
    let mut order = pool.to_vec();
    order.shuffle(&mut rand::rng());
    for at in order {
        let ip = view.instances.get(at as usize)?.addrs.ip_for(qtype)?;
        if !seen.insert(ip) {
            return None;
        }
        out.extend_from_slice(&OWNER);
        out.extend_from_slice(&u16::from(qtype).to_be_bytes());
        out.extend_from_slice(&u16::from(DNSClass::IN).to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(rdata_len as u16).to_be_bytes());
        match ip {
            std::net::IpAddr::V4(v4) => out.extend_from_slice(&v4.octets()),
            std::net::IpAddr::V6(v6) => out.extend_from_slice(&v6.octets()),
        }
    }
    (!out.is_empty()).then_some((out, record_len))
}

/// The table key of a question: its name lowercased in wire format, type, class IN (what
/// `raw::question_key` makes of the client's question).
fn key_of(qname: &Name, qtype: RecordType) -> Vec<u8> {
    let mut key = Vec::with_capacity(qname.len() + 6);
    crate::reply::push_name(&mut key, &qname.to_lowercase());
    key.extend_from_slice(&u16::from(qtype).to_be_bytes());
    key.extend_from_slice(&u16::from(DNSClass::IN).to_be_bytes());
    key
}

/// What one answer the general path gave was made of, for [`EncodedAnswers::remember`].
pub(crate) struct Answered<'a> {
    pub(crate) qname: &'a Name,
    pub(crate) qtype: RecordType,
    pub(crate) ttl: u32,
    pub(crate) view: &'a Arc<ServiceView>,
    pub(crate) selection: &'a Selection,
    /// The backend's check that `view` is still the one served (`Backend::serving`).
    pub(crate) check: Box<dyn StillServed>,
}

/// The remembered questions (see the module's documentation).
#[derive(Default)]
pub(crate) struct EncodedAnswers {
    table: RwLock<Table>,
}

#[derive(Default)]
struct Table {
    // foldhash: the key is hashed once per answer, and SipHash showed in its cost. The names
    // are client-chosen but only those of watched views get in, at most MAX_ENCODED_ANSWERS.
    entries: HashMap<Box<[u8]>, Encoded, foldhash::fast::RandomState>,
    bytes: usize,
}

impl EncodedAnswers {
    /// Calls `write` with the entry for `key` (`raw::question_key` of the client's question)
    /// and returns what it returns, if there is an entry and its view is still the one served
    /// at `now` (the query's arrival); false otherwise.
    pub(crate) fn reply(
        &self,
        key: &[u8],
        now: Instant,
        write: impl FnOnce(&Encoded) -> bool,
    ) -> bool {
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        table
            .entries
            .get(key)
            .is_some_and(|entry| entry.check.still_served(now) && write(entry))
    }

    /// Remembers the addresses of a service answer the general path gave, unless the table
    /// holds them already for this very view, still served. Only A and AAAA answers from a
    /// pool of addresses are kept (not CNAMEs to hostnames, not NXDOMAIN or NODATA).
    pub(crate) fn remember(&self, a: Answered<'_>) {
        let pool = match a.qtype {
            RecordType::A => &a.selection.v4,
            RecordType::AAAA => &a.selection.v6,
            _ => return,
        };
        let key = key_of(a.qname, a.qtype);
        let held = self.reply(&key, Instant::now(), |e| Arc::ptr_eq(&e.view, a.view));
        if held {
            return;
        }
        let Some((records, record_len)) = encode_pool(a.view, pool, a.qtype, a.ttl) else {
            return;
        };
        let entry = Encoded {
            view: a.view.clone(),
            check: a.check,
            records: records.into_boxed_slice(),
            record_len,
            qtype: a.qtype,
            qname_len: a.qname.len(),
        };
        let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
        let added = entry.records.len() + key.len();
        if table.entries.len() >= MAX_ENCODED_ANSWERS || table.bytes + added > MAX_ENCODED_BYTES {
            *table = Table::default();
        }
        table.bytes += added;
        // A replaced entry had the same key.
        let key_len = key.len();
        if let Some(old) = table.entries.insert(key.into_boxed_slice(), entry) {
            table.bytes = table.bytes.saturating_sub(old.records.len() + key_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules {
        a_record_limit: 0,
        udp_answer_limit: 0,
        truncate: true,
    };

    #[test]
    fn shapes_follow_the_general_path() {
        // Three records fit anywhere, whole.
        let s = shape(3, 30, 16, 480, 512, RULES);
        assert_eq!((s.written, s.tc, s.counted_truncated), (3, false, false));
        // 5,000 records in 512 bytes: what fits, TC.
        let s = shape(5000, 30, 16, 470, 512, RULES);
        assert_eq!((s.written, s.tc, s.counted_truncated), (29, true, true));
        // udp_answer_limit cuts a 512-byte reply only, with TC.
        let limited = Rules {
            udp_answer_limit: 3,
            ..RULES
        };
        let s = shape(5000, 30, 16, 470, 512, limited);
        assert_eq!((s.written, s.tc, s.counted_truncated), (3, true, true));
        let s = shape(5000, 74, 16, 1190, 1232, limited);
        assert_eq!((s.written, s.tc), (74, false));
        // Exactly udp_answer_limit records: nothing left out.
        let s = shape(3, 30, 16, 470, 512, limited);
        assert_eq!((s.written, s.tc, s.counted_truncated), (3, false, false));
        // a_record_limit before anything else, never TC.
        let s = shape(
            50,
            74,
            16,
            1190,
            1232,
            Rules {
                a_record_limit: 5,
                ..RULES
            },
        );
        assert_eq!((s.written, s.tc, s.counted_truncated), (5, false, false));
        // enable_truncate = false: cut without TC, which only the general path can count.
        let silent = Rules {
            truncate: false,
            ..limited
        };
        let s = shape(5000, 30, 16, 470, 512, silent);
        assert_eq!((s.written, s.tc, s.counted_truncated), (3, false, true));
        // Over TCP a cut sets no TC either.
        let s = shape(5000, 5000, 16, 100, TCP_LIMIT, RULES);
        assert_eq!((s.written, s.tc, s.counted_truncated), (6, false, true));
    }

    /// An entry of `n` A records 10.0.0.1.. with TTL 17, for `web.service.consul.`.
    fn entry(n: u8) -> Encoded {
        struct Served;
        impl StillServed for Served {
            fn still_served(&self, _now: Instant) -> bool {
                true
            }
        }
        let mut records = Vec::new();
        for i in 1..=n {
            records.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 17, 0, 4, 10, 0, 0, i]);
        }
        let qname = Name::from_ascii("web.service.consul.").expect("name");
        Encoded {
            view: Arc::new(ServiceView::new(Vec::new(), "dc1")),
            check: Box::new(Served),
            records: records.into_boxed_slice(),
            record_len: 16,
            qtype: RecordType::A,
            qname_len: qname.len(),
        }
    }

    #[test]
    fn replies_patch_id_case_and_flags_and_carry_the_records() {
        use hickory_proto::op::{Edns, Message, Query};
        let mut q = Message::query();
        q.metadata.id = 0x4242;
        q.metadata.recursion_desired = true;
        let asked = Name::from_ascii("WeB.service.CONSUL.").expect("name");
        q.add_query(Query::query(asked.clone(), RecordType::A));
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        edns.set_dnssec_ok(true);
        q.edns = Some(edns);
        let bytes = q.to_vec().expect("encode");
        let query = raw::parse_plain_query(&bytes).expect("plain");
        let mut out = Vec::new();
        let three = entry(3);
        assert!(write_reply(
            &mut out,
            &query,
            &three,
            1232,
            RULES,
            &mut rand::rng()
        ));
        let reply = Message::from_vec(&out).expect("decodes");
        assert_eq!(reply.metadata.id, 0x4242);
        assert!(reply.metadata.authoritative && reply.metadata.recursion_available);
        assert!(reply.metadata.recursion_desired && !reply.metadata.truncation);
        assert!(reply.queries[0].name().eq_case(&asked), "the client's case");
        assert_eq!(reply.answers.len(), 3);
        assert!(reply
            .answers
            .iter()
            .all(|r| r.ttl == 17 && r.name.eq_case(&asked)));
        assert!(reply
            .edns
            .is_some_and(|e| e.flags().dnssec_ok && e.max_payload() == 1232));
        // 40 records in 512 bytes: as many as fit, TC, and the bytes within the limit.
        q.edns = None;
        let bytes = q.to_vec().expect("encode");
        let query = raw::parse_plain_query(&bytes).expect("plain");
        assert!(write_reply(
            &mut out,
            &query,
            &entry(40),
            512,
            RULES,
            &mut rand::rng()
        ));
        let reply = Message::from_vec(&out).expect("decodes");
        assert!(out.len() <= 512 && reply.metadata.truncation && reply.edns.is_none());
        assert_eq!(reply.answers.len(), (512 - 12 - query.question.len()) / 16);
    }
}
