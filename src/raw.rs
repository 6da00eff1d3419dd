//! The cache-hit hot path in bytes, as pure functions: reading a plain query without building a
//! `Message`, and writing a reply from a cached answer kept in wire format, patching only what
//! differs per response (ID, flags, the question's case, TTLs, record order and OPT).
//!
//! Anything unusual (several questions, records in the request other than one OPT, EDNS version
//! above 0, trailing bytes, an answer too large for the client) is left to the general path in
//! `handler`, which parses with hickory and can refuse, truncate or FORMERR properly. This module
//! only ever says "I can answer this exactly like the general path would" or "not me".

use crate::header::{self, Section, HEADER_LEN, TYPE_A, TYPE_AAAA, TYPE_OPT};

/// Longest name in wire format (RFC 1035 §3.1).
pub(crate) const MAX_NAME_WIRE: usize = 255;

/// Longest question: a name plus type and class. Fits the stack buffer the key is built in.
pub(crate) const MAX_QUESTION_WIRE: usize = MAX_NAME_WIRE + 4;

/// EDNS options whose contents hickory checks when it parses a request (NSID, DAU, client
/// subnet): a query carrying one goes the general way, so a malformed one still gets FORMERR.
const VALIDATED_OPTIONS: [u16; 3] = [3, 5, 8];

/// Answer sections up to this many records keep their spans on the stack (1,280 bytes); longer
/// ones put them in one allocation. An EDNS 1232 reply holds at most 75 A records (a large
/// service through Consul's DNS interface: Consul fills it with 74), so UDP never allocates.
const SPANS_ON_STACK: usize = 80;

/// Answers of up to this many addresses are shuffled per reply (Fisher–Yates; a reply cut to
/// fit draws only the records it keeps), as Consul shuffles and then cuts; longer ones (a large
/// service) are rotated instead: copied from a random record on, wrapping around, as BIND's
/// `rrset-order cyclic` does. Either way every record is as likely as any other to come first
/// (what glibc's and nginx's choice of peer follows) and to be among those a cut reply keeps. A shuffle draws a random number per
/// record, a rotation one: a 5,000-instance service's EDNS answer (74 records) cost 1.67 µs
/// sampled, 0.67 rotated, against 0.50 for one instance (`cargo bench --bench hot_path --
/// consul_a_inline_edns`, docs/benchmarks.md step seven). Up to 16 records the draws cost
/// little, and Consul's behaviour is kept.
pub(crate) const SHUFFLED_WHOLE: usize = 16;

/// The smallest record that can be moved: an A record whose owner is a 2-byte pointer. Bounds the
/// span list by the bytes really there, whatever count the header claims.
const MIN_MOVABLE_RECORD: usize = 16;

/// What the reply to a plain query needs from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlainQuery<'a> {
    pub(crate) id: u16,
    pub(crate) recursion_desired: bool,
    pub(crate) checking_disabled: bool,
    /// AD in the query: the client understands AD in replies (RFC 6840 §5.7).
    pub(crate) authentic_data: bool,
    /// DO in the query's OPT record: the client wants DNSSEC records (RFC 3225).
    pub(crate) dnssec_ok: bool,
    /// The question exactly as the client wrote it (name in its case, type, class): echoed as is.
    pub(crate) question: &'a [u8],
    pub(crate) qtype: u16,
    /// The client's EDNS UDP size when the query carried an OPT record.
    pub(crate) edns_payload: Option<u16>,
}

fn u16_at(p: &[u8], at: usize) -> Option<u16> {
    p.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

/// Length of an uncompressed name starting at `at` (a query's question cannot point anywhere).
fn plain_name_len(p: &[u8], at: usize) -> Option<usize> {
    let mut i = at;
    loop {
        let len = usize::from(*p.get(i)?);
        if len == 0 {
            let total = i + 1 - at;
            return (total <= MAX_NAME_WIRE).then_some(total);
        }
        if len > 63 {
            // A compression pointer or a reserved label type: not a plain query.
            return None;
        }
        i += 1 + len;
    }
}

/// Reads `packet` if it is a plain query: QUERY opcode, QR=0, TC=0, one question with an
/// uncompressed name, no answer or authority records, and at most one additional record, which
/// is an EDNS version 0 OPT with well-formed options. `None` means "use the general path".
/// The DNSSEC bits (CD, AD, DO) are read too: they choose the cache entry and the reply's form.
pub fn parse_plain_query(packet: &[u8]) -> Option<PlainQuery<'_>> {
    let [questions, answers, authorities, additionals] = header::counts(packet)?;
    let flags = header::flags(packet)?;
    // A response, another opcode or a truncated query is the general path's to judge.
    if flags & (header::QR | header::OPCODE_MASK | header::TC) != 0 {
        return None;
    }
    if questions != 1 || answers != 0 || authorities != 0 {
        return None;
    }
    let name_len = plain_name_len(packet, HEADER_LEN)?;
    let question_end = HEADER_LEN + name_len + 4;
    let question = packet.get(HEADER_LEN..question_end)?;
    let qtype = u16_at(packet, HEADER_LEN + name_len)?;
    let mut dnssec_ok = false;
    let edns_payload = match additionals {
        0 => {
            if packet.len() != question_end {
                return None;
            }
            None
        }
        1 => {
            let opt = packet.get(question_end..)?;
            // Root owner, type OPT, class = payload, TTL = extended rcode, version, flags.
            if opt.len() < 11 || opt[0] != 0 || u16_at(opt, 1)? != TYPE_OPT {
                return None;
            }
            let payload = u16_at(opt, 3)?;
            if opt[6] != 0 {
                // EDNS version above 0: BADVERS, from the general path.
                return None;
            }
            dnssec_ok = u16_at(opt, 7)? & header::EDNS_DO != 0;
            let rdlen = usize::from(u16_at(opt, 9)?);
            if opt.len() != 11 + rdlen {
                return None;
            }
            let mut options = &opt[11..];
            while !options.is_empty() {
                // hickory validates the contents of these (a bad one is FORMERR); the rest it
                // keeps as opaque bytes, and so do we.
                if VALIDATED_OPTIONS.contains(&u16_at(options, 0)?) {
                    return None;
                }
                let len = usize::from(u16_at(options, 2)?);
                options = options.get(4 + len..)?;
            }
            Some(payload)
        }
        _ => return None,
    };
    Some(PlainQuery {
        id: header::id(packet)?,
        recursion_desired: flags & header::RD != 0,
        checking_disabled: flags & header::CD != 0,
        authentic_data: flags & header::AD != 0,
        dnssec_ok,
        question,
        qtype,
        edns_payload,
    })
}

/// The cache key of a question: its name lowercased (ASCII, as `Name::to_lowercase` does),
/// then type and class unchanged. Written into `buf`; returns the used part.
pub(crate) fn question_key<'b>(question: &[u8], buf: &'b mut [u8; MAX_QUESTION_WIRE]) -> &'b [u8] {
    let len = question.len().min(MAX_QUESTION_WIRE);
    let name_end = len.saturating_sub(4);
    for (i, (dst, &src)) in buf.iter_mut().zip(&question[..len]).enumerate() {
        // Length bytes are below 64, outside 'A'..='Z', so lowercasing them is harmless; the type
        // and class bytes are not lowercased (type 65, HTTPS, is an 'A').
        *dst = if i < name_end {
            src.to_ascii_lowercase()
        } else {
            src
        };
    }
    &buf[..len]
}

/// Does the wire-format `name` lie in the zone `zone` (both wire format, lowercased)? Compared
/// on label boundaries, so `xconsul.` is not in `consul.`.
pub(crate) fn name_in_zone(name: &[u8], zone: &[u8]) -> bool {
    if zone.len() > name.len() {
        return false;
    }
    let offset = name.len() - zone.len();
    if name[offset..] != *zone {
        return false;
    }
    // `offset` must be the start of a label of `name`.
    let mut i = 0;
    while i < offset {
        i += 1 + usize::from(name[i]);
    }
    i == offset
}

/// Where each record of a records section starts, and its TTL offset, found by walking the
/// section. `base` is the section's offset in the message (compression pointers are message
/// offsets). `None` if the bytes are not well-formed records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecordSpan {
    pub(crate) start: usize,
    pub(crate) ttl_at: usize,
    pub(crate) end: usize,
    pub(crate) rtype: u16,
    /// The owner name is one compression pointer to before `base` (the question): the record
    /// does not depend on what precedes it in its section, so it may be moved.
    pub(crate) owner_points_back: bool,
}

/// Walks one record at `at` in `body` (whose first byte sits at message offset `base`).
pub(crate) fn record_at(body: &[u8], at: usize, base: usize) -> Option<RecordSpan> {
    let mut i = at;
    let mut owner_points_back = false;
    loop {
        let b = *body.get(i)?;
        if b & 0xc0 == 0xc0 {
            let pointer = usize::from(u16_at(body, i)? & 0x3fff);
            owner_points_back = i == at && pointer < base;
            i += 2;
            break;
        }
        if b > 63 {
            return None;
        }
        i += 1 + usize::from(b);
        if b == 0 {
            break;
        }
    }
    let rtype = u16_at(body, i)?;
    let ttl_at = i + 4;
    let rdlen = usize::from(u16_at(body, i + 8)?);
    let end = i + 10 + rdlen;
    if end > body.len() {
        return None;
    }
    Some(RecordSpan {
        start: at,
        ttl_at,
        end,
        rtype,
        owner_points_back,
    })
}

/// Rewrites every TTL of the `count` records at the start of `records` with `ttl(old)`.
/// Returns false (leaving the bytes partly rewritten) if the records are malformed.
pub(crate) fn rewrite_ttls(
    records: &mut [u8],
    count: usize,
    base: usize,
    ttl: impl Fn(u32) -> u32,
) -> bool {
    let mut at = 0;
    for _ in 0..count {
        let Some(span) = record_at(records, at, base) else {
            return false;
        };
        let field = &mut records[span.ttl_at..span.ttl_at + 4];
        let old = u32::from_be_bytes([field[0], field[1], field[2], field[3]]);
        field.copy_from_slice(&ttl(old).to_be_bytes());
        at = span.end;
    }
    true
}

/// An upstream reply as it came, made ready to be stored as it is (see `cache`): the question in
/// the cache's spelling, TTLs rewritten, the OPT record dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Received {
    /// The question, then the records, as they follow the header.
    pub(crate) body: Vec<u8>,
    /// Answer, authority and additional record counts.
    pub(crate) counts: [u16; 3],
    pub(crate) answers: u16,
    /// The shortest answer TTL, rewritten (0 without answers).
    pub(crate) min_answer_ttl: u32,
    /// Holds an RRSIG, NSEC, NSEC3 or DS record of a type other than the question's.
    pub(crate) has_proofs: bool,
}

/// Reads the upstream reply `wire` to `question` (wire format, name lowercased) for storing as
/// it came: its question must be `question` but for letter case (DNS 0x20), and becomes it; its
/// records must be well formed; an OPT record must be the last one (dropping it then moves no
/// other record); every TTL becomes `ttl(old)`. Records keep their bytes and compression.
pub(crate) fn normalize_received(
    wire: &[u8],
    question: &[u8],
    ttl: impl Fn(u32) -> u32,
) -> Option<Received> {
    let [questions, answers, authorities, additionals] = header::counts(wire)?;
    let name_len = question.len().checked_sub(4)?;
    let asked = wire.get(HEADER_LEN..HEADER_LEN + question.len())?;
    if questions != 1
        || !asked[..name_len].eq_ignore_ascii_case(&question[..name_len])
        || asked[name_len..] != question[name_len..]
    {
        return None;
    }
    let qtype = u16_at(question, name_len)?;
    let mut body = wire.get(HEADER_LEN..)?.to_vec();
    body[..question.len()].copy_from_slice(question);
    let base = HEADER_LEN + question.len();
    let before_additional = usize::from(answers) + usize::from(authorities);
    let total = before_additional + usize::from(additionals);
    let (mut at, mut kept, mut has_proofs, mut min_ttl) = (0, 0, false, u32::MAX);
    let mut additionals = additionals;
    for i in 0..total {
        let span = record_at(&body[question.len()..], at, base)?;
        if span.rtype == TYPE_OPT {
            if i + 1 != total || i < before_additional {
                return None;
            }
            additionals -= 1;
            break;
        }
        has_proofs |= header::is_dnssec_proof(span.rtype) && span.rtype != qtype;
        if i < usize::from(answers) {
            let field = body.get(question.len() + span.ttl_at..)?;
            min_ttl = min_ttl.min(u32::from_be_bytes([field[0], field[1], field[2], field[3]]));
        }
        at = span.end;
        kept += 1;
    }
    body.truncate(question.len() + at);
    if !rewrite_ttls(&mut body[question.len()..], kept, base, &ttl) {
        return None;
    }
    Some(Received {
        body,
        counts: [answers, authorities, additionals],
        answers,
        min_answer_ttl: if answers > 0 { ttl(min_ttl) } else { 0 },
        has_proofs,
    })
}

/// Copies whole records from the start of `records` to `out` while they fit in `room` bytes, at
/// most `count` of them; returns how many. The copy stands on its own: compression pointers
/// point only at names before them (RFC 1035 §4.1.4).
pub(crate) fn copy_prefix(
    out: &mut Vec<u8>,
    records: &[u8],
    count: usize,
    base: usize,
    room: usize,
) -> usize {
    let (mut at, mut copied) = (0, 0);
    while copied < count {
        match record_at(records, at, base) {
            Some(span) if span.end <= room => at = span.end,
            _ => break,
        }
        copied += 1;
    }
    out.extend_from_slice(&records[..at]);
    copied
}

/// Header flags of a reply to `q`: QR=1, opcode QUERY, RD and CD copied, RA=1, AA as given, AD
/// and Z clear (the same rules as `reply::reply_metadata`; AD is the forwarder's to set).
#[inline]
pub(crate) fn write_header(
    out: &mut Vec<u8>,
    q: &PlainQuery<'_>,
    authoritative: bool,
    rcode: u8,
    counts: [u16; 3],
) {
    let flags = header::QR
        | header::RA
        | header::flag_if(authoritative, header::AA)
        | header::flag_if(q.recursion_desired, header::RD)
        | header::flag_if(q.checking_disabled, header::CD)
        | header::rcode_flags(rcode);
    let [answers, authorities, additionals] = counts;
    header::push(out, q.id, flags, [1, answers, authorities, additionals]);
}

/// Writes into `out` a reply to `q` with `rcode` and no records: the header, the question as
/// the client wrote it, and an OPT record when the query had one.
pub(crate) fn write_rcode_reply(out: &mut Vec<u8>, q: &PlainQuery<'_>, rcode: u8) {
    out.clear();
    write_header(out, q, false, rcode, [0, 0, 0]);
    out.extend_from_slice(q.question);
    if q.edns_payload.is_some() {
        write_opt(out, q);
        add_additional(out);
    }
}

/// Cuts `reply` to its header, its question and its OPT record, with TC=1: what a UDP client is
/// sent when the whole reply cannot go out (`server::forbid_fragmentation`); it asks again over
/// TCP. A reply already cut to fit the client's size (TC set, fewer records) is cut the same
/// way. False, leaving `reply` as it was, when its sections do not walk or there is nothing to
/// cut (so a reply that still cannot go is not cut again).
pub(crate) fn cut_to_question(reply: &mut Vec<u8>) -> bool {
    let Some([1, answers, authorities, additionals]) = header::counts(reply) else {
        return false;
    };
    let Some(name_len) = plain_name_len(reply, HEADER_LEN) else {
        return false;
    };
    let question_end = HEADER_LEN + name_len + 4;
    let before_additional = usize::from(answers) + usize::from(authorities);
    let mut at = question_end;
    let mut opt = None;
    for index in 0..before_additional + usize::from(additionals) {
        let Some(span) = record_at(reply, at, 0) else {
            return false;
        };
        if span.rtype == TYPE_OPT && index >= before_additional {
            opt = Some(span.start..span.end);
        }
        at = span.end;
    }
    let end = question_end + opt.as_ref().map_or(0, |opt| opt.len());
    if end >= reply.len() {
        return false;
    }
    if let Some(opt) = opt {
        reply.copy_within(opt, question_end);
    }
    reply.truncate(end);
    header::set_count(reply, Section::Answer, 0);
    header::set_count(reply, Section::Authority, 0);
    header::set_count(reply, Section::Additional, u16::from(end > question_end));
    header::set_flags(reply, header::TC);
    true
}

/// The OPT record of our replies: UDP size 1232, version 0, DO copied from the query (RFC 3225
/// §3), no other flags or options (as `reply::reply_edns`).
#[inline]
pub(crate) fn write_opt(out: &mut Vec<u8>, q: &PlainQuery<'_>) {
    push_opt(out, header::UDP_LIMIT_EDNS as u16, q.dnssec_ok);
}

/// Appends an OPT record offering `payload` bytes, with DO when `dnssec_ok`, version 0, no
/// options.
pub(crate) fn push_opt(out: &mut Vec<u8>, payload: u16, dnssec_ok: bool) {
    let [size_high, size_low] = payload.to_be_bytes();
    let [do_high, do_low] = header::flag_if(dnssec_ok, header::EDNS_DO).to_be_bytes();
    let [type_high, type_low] = TYPE_OPT.to_be_bytes();
    // Root owner, type, payload size, extended rcode and version 0, flags, no options.
    out.extend_from_slice(&[
        0, type_high, type_low, size_high, size_low, 0, 0, do_high, do_low, 0, 0,
    ]);
}

/// Bumps ARCOUNT of an encoded message by one (after `write_opt`).
pub(crate) fn add_additional(out: &mut [u8]) {
    if let Some(n) = header::count(out, Section::Additional) {
        header::set_count(out, Section::Additional, n.saturating_add(1));
    }
}

/// Copies the `count` answer records at the start of `records` to `out` in a random order
/// (shuffled, or rotated past `SHUFFLED_WHOLE` records), as many as fit in `room` bytes, if
/// every one of them can move (an A or AAAA whose owner points back at the question, so no
/// other record points into it either). The copy stops at the first record that does not fit,
/// so a cut answer is the largest prefix of a random order that fits, as the general path cuts
/// (`reply::encode_reply`). Returns the length of the whole answer section in `records` and how
/// many records were copied, or `None` when they cannot be moved here.
pub(crate) fn copy_reordered_answers(
    out: &mut Vec<u8>,
    records: &[u8],
    count: usize,
    base: usize,
    room: usize,
    rng: &mut impl rand::Rng,
) -> Option<(usize, usize)> {
    if count == 0 || count > records.len() / MIN_MOVABLE_RECORD {
        return None;
    }
    let mut on_stack = [(0usize, 0usize); SPANS_ON_STACK];
    let mut on_heap = Vec::new();
    let spans: &mut [(usize, usize)] = if count <= SPANS_ON_STACK {
        &mut on_stack[..count]
    } else {
        on_heap.resize(count, (0, 0));
        &mut on_heap
    };
    let mut at = 0;
    for slot in spans.iter_mut() {
        let span = record_at(records, at, base)?;
        if !span.owner_points_back || !(span.rtype == TYPE_A || span.rtype == TYPE_AAAA) {
            return None;
        }
        *slot = (span.start, span.end);
        at = span.end;
    }
    let mut left = room;
    let mut copied = 0;
    if count <= SHUFFLED_WHOLE {
        // Fisher–Yates, one position at a time, stopped when a record does not fit: a cut
        // answer draws only the records it sends.
        while copied < count {
            spans.swap(copied, rng.random_range(copied..count));
            let (start, end) = spans[copied];
            if end - start > left {
                break;
            }
            left -= end - start;
            out.extend_from_slice(&records[start..end]);
            copied += 1;
        }
        return Some((at, copied));
    }
    // Rotated: the records from `first` on, then those before it, each run copied at once.
    let first = rng.random_range(0..count);
    let (after, before) = spans.split_at(first);
    for run in [before, after] {
        let fitting = run
            .iter()
            .take_while(|(start, end)| {
                let fits = end - start <= left;
                left = left.saturating_sub(end - start);
                fits
            })
            .count();
        if fitting > 0 {
            // Adjacent records of one section: one run of bytes.
            out.extend_from_slice(&records[run[0].0..run[fitting - 1].1]);
        }
        copied += fitting;
        if fitting < run.len() {
            break;
        }
    }
    Some((at, copied))
}

/// Where the TTL sits in an address record whose owner is a 2-byte pointer (owner, type, class).
const TTL_IN_POINTED_RECORD: usize = 6;

/// The length shared by the `count` records of `records` (nothing else in it), if each is an A
/// or AAAA whose owner points back at the question, all of one length: a reply can then move
/// and rewrite them at a fixed stride (`copy_records`, `rewrite_ttls_at_stride`) without
/// reading them. Checked once, when an answer is stored.
pub(crate) fn uniform_address_len(records: &[u8], count: usize, base: usize) -> Option<usize> {
    let first = record_at(records, 0, base)?;
    let len = first.end;
    if count == 0 || records.len() != count.checked_mul(len)? {
        return None;
    }
    (0..count)
        .all(|i| {
            record_at(records, i * len, base).is_some_and(|span| {
                span.owner_points_back
                    && span.rtype == first.rtype
                    && (span.rtype == TYPE_A || span.rtype == TYPE_AAAA)
                    && span.end == (i + 1) * len
            })
        })
        .then_some(len)
}

/// The length of an A and of an AAAA record whose owner is a 2-byte pointer (owner, type, class,
/// TTL, RDLENGTH, address): the records the stride paths move.
pub(crate) const POINTED_A_LEN: usize = 2 + 10 + 4;
pub(crate) const POINTED_AAAA_LEN: usize = 2 + 10 + 16;

/// Appends `written` of the records of `records` (`record_len` bytes each) to `out`, in a random
/// order (see `SHUFFLED_WHOLE`): up to `SHUFFLED_WHOLE` records are shuffled, as Consul shuffles
/// and then cuts (a Fisher–Yates on the stack that draws only the records written); more are
/// rotated (`copy_rotated`). Every record is as likely as any other to be written and to come
/// first. Records are never read: the caller vouches for their length (`uniform_address_len`, or
/// records it encoded itself).
pub(crate) fn copy_records(
    out: &mut Vec<u8>,
    records: &[u8],
    record_len: usize,
    written: usize,
    rng: &mut impl rand::Rng,
) {
    let count = records.len() / record_len.max(1);
    let written = written.min(count);
    if written == 0 {
        return;
    }
    if count > SHUFFLED_WHOLE {
        copy_rotated(out, records, record_len, (count, written), rng);
        return;
    }
    match record_len {
        POINTED_A_LEN => shuffle_whole(rng, count, written, |i| {
            push_record::<POINTED_A_LEN>(out, records, i)
        }),
        POINTED_AAAA_LEN => shuffle_whole(rng, count, written, |i| {
            push_record::<POINTED_AAAA_LEN>(out, records, i)
        }),
        len => shuffle_whole(rng, count, written, |i| {
            if let Some(record) = records.get(i * len..(i + 1) * len) {
                out.extend_from_slice(record);
            }
        }),
    }
}

/// Calls `take` with `written` distinct indices below `count` (at most `SHUFFLED_WHOLE`), in
/// random order: the first `written` steps of a Fisher–Yates shuffle on the stack.
fn shuffle_whole(
    rng: &mut impl rand::Rng,
    count: usize,
    written: usize,
    mut take: impl FnMut(usize),
) {
    let mut order = [0u8; SHUFFLED_WHOLE];
    let Some(order) = order.get_mut(..count) else {
        return;
    };
    for (i, slot) in (0u8..).zip(order.iter_mut()) {
        *slot = i;
    }
    for i in 0..written.min(count) {
        order.swap(i, rng.random_range(i..count));
        take(usize::from(order[i]));
    }
}

/// Appends record `i` of `records` (`N` bytes each). `N` known at compile time makes the copy a
/// move or two instead of a `memcpy` call, which showed in the profile of a large service's
/// answers (74 records per EDNS reply).
fn push_record<const N: usize>(out: &mut Vec<u8>, records: &[u8], i: usize) {
    if let Some(record) = records.get(i * N..).and_then(<[u8]>::first_chunk::<N>) {
        out.extend_from_slice(record);
    }
}

/// Appends `written` of the `count` records of `records` (`record_len` bytes each; `written`
/// from 1 to `count`, as `copy_records` clamps it) to `out`, rotated (see `SHUFFLED_WHOLE`):
/// from a random one on, wrapping around, in one or two copies. What a client could see is that
/// the records of one reply are neighbours in the stored order (for `consul::encoded`, shuffled
/// once per view; for the cache, the upstream's) until it changes.
fn copy_rotated(
    out: &mut Vec<u8>,
    records: &[u8],
    record_len: usize,
    (count, written): (usize, usize),
    rng: &mut impl rand::Rng,
) {
    let first = rng.random_range(0..count);
    let from_first = written.min(count - first);
    let runs = [
        records.get(first * record_len..(first + from_first) * record_len),
        records.get(..(written - from_first) * record_len),
    ];
    runs.into_iter()
        .flatten()
        .for_each(|run| out.extend_from_slice(run));
}

/// Rewrites the TTL of every record of `records` (`uniform_address_len` records of
/// `record_len` bytes) with `ttl(old)`.
pub(crate) fn rewrite_ttls_at_stride(
    records: &mut [u8],
    record_len: usize,
    ttl: impl Fn(u32) -> u32,
) {
    for record in records.chunks_exact_mut(record_len.max(1)) {
        if let Some(field) = record
            .get_mut(TTL_IN_POINTED_RECORD..)
            .and_then(<[u8]>::first_chunk_mut::<4>)
        {
            *field = ttl(u32::from_be_bytes(*field)).to_be_bytes();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};

    fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0xbeef;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.edns = Some(e);
        }
        m.to_vec().expect("encode")
    }

    /// A reply to `x.example. A` with `answers` A records, an NS in authority, an A glue
    /// record in additional and an OPT when `edns`.
    fn large_reply(answers: u8, edns: bool) -> Vec<u8> {
        use hickory_proto::op::MessageType;
        use hickory_proto::rr::rdata::{A, NS};
        use hickory_proto::rr::{RData, Record};
        let name = Name::from_ascii("x.example.").expect("name");
        let ns = Name::from_ascii("ns.example.").expect("ns");
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(name.clone(), RecordType::A));
        for i in 0..answers {
            m.add_answer(Record::from_rdata(
                name.clone(),
                30,
                RData::A(A::new(192, 0, 2, i)),
            ));
        }
        m.add_authority(Record::from_rdata(
            name.clone(),
            30,
            RData::NS(NS(ns.clone())),
        ));
        m.add_additional(Record::from_rdata(
            ns,
            30,
            RData::A(A::new(198, 51, 100, 1)),
        ));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(1232);
            e.set_dnssec_ok(true);
            m.edns = Some(e);
        }
        m.to_vec().expect("encode")
    }

    #[test]
    fn a_reply_cut_to_its_question_keeps_the_question_and_the_opt_and_sets_tc() {
        for edns in [true, false] {
            let mut reply = large_reply(70, edns);
            assert!(reply.len() > 1000);
            assert!(cut_to_question(&mut reply));
            let cut = Message::from_vec(&reply).expect("the cut reply parses");
            assert!(cut.metadata.truncation, "TC set");
            assert_eq!(cut.metadata.id, 7);
            assert!(cut.metadata.recursion_desired);
            assert_eq!(cut.queries.len(), 1);
            assert_eq!(cut.queries[0].name().to_ascii(), "x.example.");
            assert!(cut.answers.is_empty() && cut.authorities.is_empty());
            assert!(cut.additionals.is_empty(), "only the OPT is kept");
            assert_eq!(cut.edns.is_some(), edns);
            if let Some(e) = &cut.edns {
                assert!(e.flags().dnssec_ok, "the OPT is the reply's own, DO kept");
            }
            // Nothing left to cut: a second cut changes nothing.
            let before = reply.clone();
            assert!(!cut_to_question(&mut reply));
            assert_eq!(reply, before);
        }
    }

    #[test]
    fn a_reply_already_cut_to_fit_the_client_is_cut_again_to_its_question() {
        // A large service's EDNS reply: as many records as fit in 1232 bytes, with TC set.
        let mut reply = large_reply(70, true);
        header::set_flags(&mut reply, header::TC);
        assert!(cut_to_question(&mut reply));
        let cut = Message::from_vec(&reply).expect("the cut reply parses");
        assert!(cut.metadata.truncation);
        assert!(cut.answers.is_empty() && cut.edns.is_some());
    }

    #[test]
    fn a_reply_whose_records_do_not_walk_is_not_cut() {
        let mut reply = large_reply(3, true);
        let short = reply.len() - 5;
        reply.truncate(short);
        let before = reply.clone();
        assert!(!cut_to_question(&mut reply));
        assert_eq!(reply, before);
        assert!(!cut_to_question(&mut Vec::new()));
    }

    #[test]
    fn plain_queries_are_read() {
        let bytes = query("WwW.Example.COM.", RecordType::AAAA, None);
        let q = parse_plain_query(&bytes).expect("plain");
        assert_eq!(q.id, 0xbeef);
        assert!(q.recursion_desired && !q.checking_disabled);
        assert_eq!(q.qtype, TYPE_AAAA);
        assert_eq!(q.edns_payload, None);
        assert_eq!(
            &q.question[..q.question.len() - 4],
            b"\x03WwW\x07Example\x03COM\x00"
        );
        let bytes = query("a.b.", RecordType::A, Some(4096));
        let q = parse_plain_query(&bytes).expect("plain");
        assert_eq!(q.edns_payload, Some(4096));
        assert!(!q.dnssec_ok && !q.authentic_data);
    }

    #[test]
    fn dnssec_bits_are_read_and_do_is_echoed() {
        let mut m = Message::from_vec(&query("a.b.", RecordType::A, Some(1232))).expect("query");
        m.metadata.authentic_data = true;
        m.metadata.checking_disabled = true;
        if let Some(e) = m.edns.as_mut() {
            e.set_dnssec_ok(true);
        }
        let bytes = m.to_vec().expect("encode");
        let q = parse_plain_query(&bytes).expect("plain");
        assert!(q.dnssec_ok && q.authentic_data && q.checking_disabled);
        let mut out = Vec::new();
        write_header(&mut out, &q, false, 0, [0; 3]);
        out.extend_from_slice(q.question);
        write_opt(&mut out, &q);
        add_additional(&mut out);
        let reply = Message::from_vec(&out).expect("decodes");
        assert!(!reply.metadata.authentic_data && reply.metadata.checking_disabled);
        assert!(reply.edns.is_some_and(|e| e.flags().dnssec_ok));
    }

    /// The upstream's bytes, stored as they came: question in the cache's case, TTLs rewritten,
    /// the trailing OPT dropped; an OPT anywhere else, or a different question, is refused.
    #[test]
    fn received_replies_are_normalized_in_place() {
        let question = b"\x01a\x01b\x00\x00\x01\x00\x01";
        let mut wire = Vec::new();
        header::push(&mut wire, 7, header::QR, [1, 2, 0, 1]);
        wire.extend_from_slice(b"\x01A\x01b\x00\x00\x01\x00\x01");
        for ttl in [300u32, 50] {
            wire.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
            wire.extend_from_slice(&ttl.to_be_bytes());
            wire.extend_from_slice(&[0, 4, 192, 0, 2, 1]);
        }
        let opt = [0, 0, 41, 4, 208, 0, 0, 0x80, 0, 0, 0];
        wire.extend_from_slice(&opt);
        let got = normalize_received(&wire, question, |t| t.min(100)).expect("storable");
        assert_eq!(got.counts, [2, 0, 0]);
        assert_eq!(
            (got.answers, got.min_answer_ttl, got.has_proofs),
            (2, 50, false)
        );
        assert_eq!(&got.body[..question.len()], question);
        assert_eq!(got.body.len(), wire.len() - HEADER_LEN - opt.len());
        let first =
            record_at(&got.body[question.len()..], 0, HEADER_LEN + question.len()).expect("record");
        let ttl_at = question.len() + first.ttl_at;
        assert_eq!(&got.body[ttl_at..ttl_at + 4], &100u32.to_be_bytes());
        // The OPT before the last record: dropping it would move the record after it.
        let mut misplaced = wire.clone();
        header::set_count(&mut misplaced, Section::Answer, 1);
        header::set_count(&mut misplaced, Section::Additional, 2);
        let len = misplaced.len();
        misplaced.truncate(len - opt.len() - 16);
        misplaced.extend_from_slice(&opt);
        misplaced.extend_from_slice(&wire[len - opt.len() - 16..len - opt.len()]);
        assert!(normalize_received(&misplaced, question, |t| t).is_none());
        assert!(normalize_received(&wire, b"\x01c\x01b\x00\x00\x01\x00\x01", |t| t).is_none());
        // Cut after the first record: the prefix stands on its own.
        let mut out = Vec::new();
        let records = &got.body[question.len()..];
        assert_eq!(copy_prefix(&mut out, records, 2, 25, 20), 1);
        assert_eq!(out.len(), 16);
        out.clear();
        assert_eq!(copy_prefix(&mut out, records, 2, 25, 64), 2);
    }

    #[test]
    fn anything_unusual_goes_to_the_general_path() {
        let plain = query("a.b.", RecordType::A, Some(1232));
        let mut response = plain.clone();
        header::set_flags(&mut response, header::QR);
        let mut notify = plain.clone();
        header::set_flags(&mut notify, header::opcode_flags(u8::from(OpCode::Notify)));
        let mut truncated = plain.clone();
        header::set_flags(&mut truncated, header::TC);
        let mut two_questions = plain.clone();
        header::set_count(&mut two_questions, Section::Question, 2);
        let mut trailing = plain.clone();
        trailing.push(0);
        let mut version1 = plain.clone();
        let opt_version = plain.len() - 11 + 6;
        version1[opt_version] = 1;
        let mut compressed = query("a.b.", RecordType::A, None);
        compressed[12] = 0xc0;
        for (what, bytes) in [
            ("response", response),
            ("notify", notify),
            ("tc", truncated),
            ("two questions", two_questions),
            ("trailing byte", trailing),
            ("edns version 1", version1),
            ("compressed question", compressed),
            ("short", plain[..11].to_vec()),
        ] {
            assert!(parse_plain_query(&bytes).is_none(), "{what}");
        }
    }

    #[test]
    fn keys_lowercase_the_name_only() {
        let bytes = query("WwW.Example.COM.", RecordType::HTTPS, None);
        let q = parse_plain_query(&bytes).expect("plain");
        let mut buf = [0u8; MAX_QUESTION_WIRE];
        let key = question_key(q.question, &mut buf);
        assert_eq!(&key[..key.len() - 4], b"\x03www\x07example\x03com\x00");
        // Type 65 is the byte 'A': it must survive lowercasing.
        assert_eq!(&key[key.len() - 4..], &[0, 65, 0, 1]);
    }

    #[test]
    fn zones_match_on_label_boundaries() {
        let consul = b"\x06consul\x00";
        assert!(name_in_zone(b"\x03web\x07service\x06consul\x00", consul));
        assert!(name_in_zone(consul, consul));
        assert!(!name_in_zone(b"\x07xconsul\x00", consul));
        assert!(!name_in_zone(b"\x03com\x00", consul));
        assert!(name_in_zone(b"\x03com\x00", b"\x00"));
    }

    #[test]
    fn ttls_are_rewritten_in_place_and_shuffles_keep_every_record() {
        // Two A records whose owner points at offset 12 (the question), then an SOA-ish record.
        let mut records = Vec::new();
        for (ttl, last) in [(300u32, 1u8), (200, 2)] {
            records.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
            records.extend_from_slice(&ttl.to_be_bytes());
            records.extend_from_slice(&[0, 4, 192, 0, 2, last]);
        }
        assert!(rewrite_ttls(&mut records, 2, 20, |t| t - 100));
        let first = record_at(&records, 0, 20).expect("record");
        assert_eq!(
            &records[first.ttl_at..first.ttl_at + 4],
            &200u32.to_be_bytes()
        );
        assert!(first.owner_points_back);
        let mut seen = std::collections::HashSet::new();
        let mut rng = rand::rng();
        for _ in 0..50 {
            let mut out = Vec::new();
            let (used, copied) =
                copy_reordered_answers(&mut out, &records, 2, 20, usize::MAX, &mut rng)
                    .expect("movable");
            assert_eq!((used, copied), (records.len(), 2));
            assert_eq!(out.len(), records.len());
            seen.insert(out[out.len() - 1]);
        }
        assert_eq!(seen.len(), 2, "both orders show up");
        // Room for one record: one of the two, either one.
        let mut kept = std::collections::HashSet::new();
        for _ in 0..50 {
            let mut out = Vec::new();
            let (used, copied) =
                copy_reordered_answers(&mut out, &records, 2, 20, 31, &mut rng).expect("movable");
            assert_eq!((used, copied, out.len()), (records.len(), 1, 16));
            kept.insert(out[15]);
        }
        assert_eq!(kept.len(), 2, "the kept record is drawn at random");
        // A count the bytes cannot hold is refused before anything is allocated for it.
        assert!(copy_reordered_answers(&mut Vec::new(), &records, 3, 20, 64, &mut rng).is_none());
        assert!(!rewrite_ttls(&mut records[..20].to_vec(), 2, 20, |t| t));
    }

    /// `count` A records whose owner points at offset 12 and whose last address byte is their
    /// index, and the indices `copy_reordered_answers` copied of them into `room` bytes.
    fn reordered(count: u8, room: usize, rng: &mut impl rand::Rng) -> Vec<u8> {
        let mut records = Vec::new();
        for i in 0..count {
            records.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 0, 0, i]);
        }
        let mut out = Vec::new();
        let (used, copied) =
            copy_reordered_answers(&mut out, &records, usize::from(count), 20, room, rng)
                .expect("movable");
        assert_eq!((used, out.len()), (records.len(), copied * 16));
        out.chunks_exact(16).map(|r| r[15]).collect()
    }

    #[test]
    fn small_answers_are_shuffled_and_large_ones_rotated() {
        use std::collections::HashSet;
        let mut rng = rand::rng();
        // Up to SHUFFLED_WHOLE: any order (all six of three records show up in 300 replies).
        let orders: HashSet<Vec<u8>> = (0..300)
            .map(|_| reordered(3, usize::MAX, &mut rng))
            .collect();
        assert_eq!(orders.len(), 6, "{orders:?}");
        // Past it: every record, in the section's order from a random one on.
        let count = SHUFFLED_WHOLE as u8 + 24;
        let mut first = HashSet::new();
        for _ in 0..800 {
            let got = reordered(count, usize::MAX, &mut rng);
            let rotated: Vec<u8> = (0..count).map(|k| (got[0] + k) % count).collect();
            assert_eq!(got, rotated);
            first.insert(got[0]);
        }
        assert_eq!(
            first.len(),
            usize::from(count),
            "every record comes first at some point"
        );
        // Cut to the room: the largest run that fits, wrapping around, from any record.
        let mut kept = vec![0u32; usize::from(count)];
        for _ in 0..400 {
            let got = reordered(count, 10 * 16 + 15, &mut rng);
            assert_eq!(got.len(), 10);
            assert!(
                got.windows(2).all(|w| w[1] == (w[0] + 1) % count),
                "{got:?}"
            );
            got.iter().for_each(|&i| kept[usize::from(i)] += 1);
        }
        assert!(
            kept.iter().all(|&n| n > 0),
            "every record kept at some point"
        );
        // Room for none: nothing copied.
        assert!(reordered(count, 15, &mut rng).is_empty());
    }

    #[test]
    fn uniform_addresses_are_told_apart_from_anything_else() {
        let a = [0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 0, 0, 1];
        let mut aaaa = vec![0xc0, 12, 0, 28, 0, 1, 0, 0, 0, 60, 0, 16];
        aaaa.extend_from_slice(&[0; 16]);
        let three_a = [a, a, a].concat();
        assert_eq!(uniform_address_len(&three_a, 3, 20), Some(16));
        assert_eq!(
            uniform_address_len(&[aaaa.clone(), aaaa.clone()].concat(), 2, 20),
            Some(28)
        );
        // Mixed types, a count that does not cover the bytes, an owner written out.
        assert_eq!(
            uniform_address_len(&[a.to_vec(), aaaa].concat(), 2, 20),
            None
        );
        assert_eq!(uniform_address_len(&three_a, 2, 20), None);
        let mut named = vec![1, b'x', 0];
        named.extend_from_slice(&a[2..]);
        assert_eq!(
            uniform_address_len(&[named.clone(), named].concat(), 2, 20),
            None
        );
        // TTLs at the stride.
        let mut records = three_a.clone();
        rewrite_ttls_at_stride(&mut records, 16, |t| t - 7);
        assert!(records.chunks(16).all(|r| r[6..10] == 53u32.to_be_bytes()));
    }

    /// `count` A-sized records, each holding its index in its last four bytes.
    fn numbered(count: usize) -> Vec<u8> {
        (0..count as u32)
            .flat_map(|i| {
                let mut record = [0u8; POINTED_A_LEN];
                record[POINTED_A_LEN - 4..].copy_from_slice(&i.to_be_bytes());
                record
            })
            .collect()
    }

    /// The indices of the records `copy_records` wrote from `numbered` records.
    fn copied(records: &[u8], written: usize, rng: &mut impl rand::Rng) -> Vec<usize> {
        let mut out = Vec::new();
        copy_records(&mut out, records, POINTED_A_LEN, written, rng);
        out.chunks_exact(POINTED_A_LEN)
            .filter_map(|r| r.last_chunk::<4>())
            .map(|i| u32::from_be_bytes(*i) as usize)
            .collect()
    }

    #[test]
    fn copies_are_distinct_random_and_cover_every_record() {
        use std::collections::HashSet;
        let mut rng = rand::rng();
        // Small pools: every order of three appears (six orders, 300 tries), and every ordered
        // pair when two are written (as Consul shuffles and then cuts).
        let three = numbered(3);
        for written in [3, 2] {
            let orders: HashSet<Vec<usize>> = (0..300)
                .map(|_| copied(&three, written, &mut rng))
                .collect();
            assert_eq!(orders.len(), 6, "{orders:?}");
        }
        // Whole or in part, large or small: distinct records, as many as asked, each one in
        // some reply, and at least half of as many as could come first did. 74 of 5,000 (an
        // EDNS reply of a large service) x 400 replies cover each record 5.9 times on average:
        // the bound allows 100 never copied (about 14 expected).
        for (count, written, replies, never_allowed) in [
            (1, 1, 10, 0),
            (SHUFFLED_WHOLE, SHUFFLED_WHOLE, 100, 0),
            (SHUFFLED_WHOLE, 3, 100, 0),
            (SHUFFLED_WHOLE + 1, SHUFFLED_WHOLE + 1, 100, 0),
            (100, 74, 100, 0),
            (400, 300, 50, 0),
            (5000, 74, 400, 100),
            (5000, 29, 2000, 100),
        ] {
            let mut copies = vec![0u32; count];
            let (mut first, records) = (HashSet::new(), numbered(count));
            for _ in 0..replies {
                let got = copied(&records, written, &mut rng);
                let distinct: HashSet<_> = got.iter().collect();
                assert_eq!((got.len(), distinct.len()), (written, written), "{count}");
                got.iter().for_each(|&i| copies[i] += 1);
                first.insert(got[0]);
            }
            let never = copies.iter().filter(|&&n| n == 0).count();
            assert!(never <= never_allowed, "{count}: {never} never copied");
            assert!(
                first.len() >= count.min(replies).div_ceil(2),
                "{count}: {} records came first in {replies} replies",
                first.len()
            );
        }
        // Nothing asked, nothing written.
        assert!(copied(&numbered(5000), 0, &mut rng).is_empty());
    }
}
