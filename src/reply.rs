//! DNS message hygiene, as pure functions: reading a request, building the reply header the way
//! strict clients (nginx, glibc) demand, encoding within the client's size limit, and truncating
//! with TC=1 instead of silently.

use crate::answer::{Answer, Cut};
use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};

use crate::header::{self, Section, HEADER_LEN, TYPE_A, TYPE_AAAA};
// Re-exported because callers outside the header code still import it from here.

pub(crate) use crate::header::{TCP_LIMIT, UDP_LIMIT_EDNS, UDP_LIMIT_NO_EDNS};

/// Size of an OPT record without options (RFC 6891 §6.1.2).
pub(crate) const OPT_LEN: usize = 11;

/// TTL of answers served from stale data (RFC 8767 §4 recommends 30 seconds).
pub(crate) const STALE_TTL: u32 = 30;

/// How a query arrived, which decides the size limit of its reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// The fixed 12-byte header, read without parsing the rest, so that even a packet whose body is
/// garbage can get a FORMERR with the right ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RawHeader {
    pub(crate) id: u16,
    pub(crate) is_response: bool,
    pub(crate) opcode: u8,
    pub(crate) recursion_desired: bool,
    pub(crate) checking_disabled: bool,
    pub(crate) qdcount: u16,
}

impl RawHeader {
    pub(crate) fn parse(packet: &[u8]) -> Option<RawHeader> {
        let [qdcount, ..] = header::counts(packet)?;
        let flags = header::flags(packet)?;
        Some(RawHeader {
            id: header::id(packet)?,
            is_response: flags & header::QR != 0,
            opcode: header::opcode(flags),
            recursion_desired: flags & header::RD != 0,
            checking_disabled: flags & header::CD != 0,
            qdcount,
        })
    }
}

/// A reply with only a header: used when the request body could not be parsed, so nothing of it
/// can be echoed. QR=1, RA=1, opcode and RD copied, counts zero.
pub(crate) fn header_only_reply(h: &RawHeader, rcode: ResponseCode) -> Vec<u8> {
    let flags = header::QR
        | header::opcode_flags(h.opcode)
        | header::flag_if(h.recursion_desired, header::RD)
        | header::RA
        | header::rcode_flags(rcode.low());
    let mut out = Vec::with_capacity(HEADER_LEN);
    header::push(&mut out, h.id, flags, [0; 4]);
    out
}

/// The reply size a client can take: min(its EDNS size, 1232) with EDNS (never below 512), 512
/// without, 64 KiB over TCP.
pub fn reply_limit(request: &Message, transport: Transport) -> usize {
    limit_for(transport, request.edns.as_ref().map(|e| e.max_payload()))
}

/// `reply_limit` from the client's EDNS payload size (`None`: no OPT in the query).
pub(crate) fn limit_for(transport: Transport, edns_payload: Option<u16>) -> usize {
    match (transport, edns_payload) {
        (Transport::Tcp, _) => TCP_LIMIT,
        (Transport::Udp, None) => UDP_LIMIT_NO_EDNS,
        (Transport::Udp, Some(size)) => usize::from(size).clamp(UDP_LIMIT_NO_EDNS, UDP_LIMIT_EDNS),
    }
}

/// The reply's header: ID, opcode, RD and CD copied; RA=1 always (glibc treats a reply without RA,
/// AA or records as lame); Z never set (nginx drops replies with it), AD clear (the handler sets
/// it on a forwarded answer the forwarder's rule allows, which never reaches a client that did
/// not set DO or AD).
pub(crate) fn reply_metadata(
    request: &Message,
    rcode: ResponseCode,
    authoritative: bool,
) -> Metadata {
    let mut md = Metadata::new(request.metadata.id, MessageType::Response, OpCode::Query);
    md.op_code = request.metadata.op_code;
    md.recursion_desired = request.metadata.recursion_desired;
    md.checking_disabled = request.metadata.checking_disabled;
    md.recursion_available = true;
    md.authentic_data = false;
    md.authoritative = authoritative;
    md.response_code = rcode;
    md
}

/// The OPT record of a reply: present only when the request had one (RFC 6891 §7), version 0,
/// advertising the size we accept, DO copied from the request (RFC 3225 §3).
fn reply_edns(request: &Message) -> Option<Edns> {
    request.edns.as_ref().map(|asked| {
        let mut edns = Edns::new();
        edns.set_max_payload(UDP_LIMIT_EDNS as u16);
        edns.set_version(0);
        edns.set_dnssec_ok(asked.flags().dnssec_ok);
        edns
    })
}

/// A reply carrying only an rcode (plus the question and OPT when the request had them). Only a
/// single question is echoed: echoing many could exceed the 512 bytes a UDP client without EDNS
/// accepts (a single one always fits).
pub(crate) fn error_reply(request: &Message, rcode: ResponseCode) -> Vec<u8> {
    let mut msg = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    msg.metadata = reply_metadata(request, rcode, false);
    if request.queries.len() == 1 {
        msg.queries = request.queries.clone();
    }
    msg.edns = reply_edns(request);
    match msg.to_vec() {
        Ok(bytes) => bytes,
        Err(_) => header_only_reply(
            &RawHeader {
                id: request.metadata.id,
                is_response: true,
                opcode: u8::from(request.metadata.op_code),
                recursion_desired: request.metadata.recursion_desired,
                checking_disabled: false,
                qdcount: 0,
            },
            rcode,
        ),
    }
}

/// Encodes `answer` as the reply to `request`, within `limit` bytes.
///
/// When the whole answer does not fit, the reply keeps as many answer records as fit (in their
/// given order, which is already shuffled for Consul names, so clients get a random subset), drops
/// the authority and additional sections, and sets TC=1 so the client can retry over TCP. The OPT
/// record is always kept when the request had one (hickory may drop it when it truncates by itself).
/// Returns the bytes and whether records were left out.
///
/// The answer's [`Cut`] adjusts TC: records its source already left out set it too, and a
/// silent cut (Consul's `enable_truncate = false`) leaves it clear whatever was left out.
pub fn encode_reply(request: &Message, answer: &Answer, limit: usize) -> (Vec<u8>, bool) {
    let (mut bytes, cut) = encode_addresses(request, answer, limit)
        .unwrap_or_else(|| encode_general(request, answer, limit));
    if answer.cut.silent {
        header::clear_flags(&mut bytes, header::TC);
    } else if answer.cut.by_source {
        header::set_flags(&mut bytes, header::TC);
    }
    (bytes, cut || answer.cut.by_source)
}

/// `encode_reply` for any answer, with hickory's encoder.
fn encode_general(request: &Message, answer: &Answer, limit: usize) -> (Vec<u8>, bool) {
    let mut msg = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    msg.metadata = reply_metadata(request, answer.rcode, answer.authoritative);
    msg.queries = request.queries.clone();
    msg.edns = reply_edns(request);
    msg.answers = answer.answers.clone();
    msg.authorities = answer.authorities.clone();
    msg.additionals = answer.additionals.clone();
    if let Ok(bytes) = msg.to_vec() {
        if bytes.len() <= limit && complete(&bytes, &msg) {
            return (bytes, false);
        }
    }
    // Too large (or unencodable): keep the largest prefix of the answers that fits. TC=1 tells
    // a UDP client that TCP would give it more; over TCP nothing more can be had, so no TC.
    msg.metadata.truncation = limit < TCP_LIMIT;
    msg.authorities.clear();
    msg.additionals.clear();
    let fits = |n: usize, msg: &mut Message| -> Option<Vec<u8>> {
        msg.answers = answer.answers[..n].to_vec();
        msg.to_vec()
            .ok()
            .filter(|b| b.len() <= limit && complete(b, msg))
    };
    // hickory's encoder, given a size limit, writes whole records until the next one does not
    // fit: one encode tells how many answers fit (the OPT record, emitted last, is kept out of
    // the limit so it always has room).
    let probe_limit = limit.saturating_sub(if msg.edns.is_some() { OPT_LEN } else { 0 });
    let fit_estimate = {
        let mut probe = msg.clone();
        probe.edns = None;
        probe.answers = answer.answers.clone();
        let mut buf = Vec::with_capacity(probe_limit);
        let mut encoder = BinEncoder::new(&mut buf);
        encoder.set_max_size(u16::try_from(probe_limit).unwrap_or(u16::MAX));
        match probe.emit(&mut encoder) {
            Ok(()) => header::count(&buf, Section::Answer).map_or(0, usize::from),
            Err(_) => 0,
        }
    };
    if let Some(bytes) = fits(fit_estimate, &mut msg) {
        return (bytes, true);
    }
    // Should the estimate be off, a binary search below it: log2(n) encodes instead of n.
    let (mut lo, mut hi) = (0usize, fit_estimate.min(answer.answers.len()));
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fits(mid, &mut msg).is_some() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    match fits(lo, &mut msg) {
        Some(bytes) => (bytes, true),
        // Not even the question fits (a name near 255 bytes in a tiny limit): header only.
        None => {
            let mut bytes = header_only_reply(
                &RawHeader {
                    id: request.metadata.id,
                    is_response: true,
                    opcode: 0,
                    recursion_desired: request.metadata.recursion_desired,
                    checking_disabled: false,
                    qdcount: 0,
                },
                answer.rcode,
            );
            header::set_flags(&mut bytes, header::TC);
            (bytes, true)
        }
    }
}

/// `encode_reply` for the shape of every Consul service A/AAAA answer: only address records, all
/// owned by the question's name, nothing in the other sections. hickory's encoder costs grow
/// faster than the record count (each name is compared with every name written before it, for
/// compression) and a reply that does not fit costs it three encodes; here each record is 16 or
/// 28 bytes written in place, its owner a pointer to the question, so a 5,000-instance service
/// costs about what a 3-instance one does. The header, question and OPT still come from hickory.
/// `None` when the answer has another shape.
fn encode_addresses(request: &Message, answer: &Answer, limit: usize) -> Option<(Vec<u8>, bool)> {
    let [query] = request.queries.as_slice() else {
        return None;
    };
    if answer.answers.is_empty()
        || !answer.authorities.is_empty()
        || !answer.additionals.is_empty()
        || !answer.answers.iter().all(|r| {
            matches!(r.data, RData::A(_) | RData::AAAA(_))
                && r.dns_class == DNSClass::IN
                && &r.name == query.name()
        })
    {
        return None;
    }
    let mut msg = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    msg.metadata = reply_metadata(request, answer.rcode, answer.authoritative);
    msg.queries = request.queries.clone();
    msg.edns = reply_edns(request);
    let frame = msg.to_vec().ok()?;
    // The question ends where its name (never compressed: it is the first) and type and class
    // end; the OPT record, if any, follows it.
    let name_len = query.name().iter().map(|l| l.len() + 1).sum::<usize>() + 1;
    let question_end = HEADER_LEN + name_len + 4;
    if frame.len() < question_end {
        return None;
    }
    let mut out = Vec::with_capacity(limit.min(frame.len() + 28 * answer.answers.len()));
    out.extend_from_slice(&frame[..question_end]);
    let room = limit.saturating_sub(frame.len());
    let mut written = 0usize;
    for record in &answer.answers {
        let (rtype, rdata): (u16, &[u8]) = match &record.data {
            RData::A(a) => (TYPE_A, &a.0.octets()),
            RData::AAAA(aaaa) => (TYPE_AAAA, &aaaa.0.octets()),
            _ => return None,
        };
        if out.len() - question_end + 12 + rdata.len() > room {
            break;
        }
        out.extend_from_slice(&[0xc0, HEADER_LEN as u8]);
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&u16::from(DNSClass::IN).to_be_bytes());
        out.extend_from_slice(&record.ttl.to_be_bytes());
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(rdata);
        written += 1;
    }
    out.extend_from_slice(&frame[question_end..]);
    header::set_count(&mut out, Section::Answer, u16::try_from(written).ok()?);
    let truncated = written < answer.answers.len();
    // As in the general path: TC=1 tells a UDP client TCP would give it more.
    if truncated && limit < TCP_LIMIT {
        header::set_flags(&mut out, header::TC);
    }
    Some((out, truncated))
}

/// Did the encoder write every record? hickory stops at 64 KiB on its own (setting TC and
/// lowering the counts), which must not pass for a fit.
fn complete(bytes: &[u8], msg: &Message) -> bool {
    let count = |section| header::count(bytes, section).map_or(0, usize::from);
    let opt = usize::from(msg.edns.is_some());
    count(Section::Answer) == msg.answers.len()
        && count(Section::Authority) == msg.authorities.len()
        && count(Section::Additional) == msg.additionals.len() + opt
}

/// RFC 8482: a forwarded ANY query gets one synthesized HINFO record instead of everything, so we
/// are useless as an amplifier and never pay for a huge upstream answer.
pub(crate) fn minimal_any_answer(query: &Query) -> Answer {
    let record = Record::from_rdata(
        query.name().clone(),
        RFC8482_TTL,
        RData::HINFO(hickory_proto::rr::rdata::HINFO::new(
            "RFC8482".to_owned(),
            String::new(),
        )),
    );
    Answer {
        rcode: ResponseCode::NoError,
        authoritative: false,
        answers: vec![record],
        authorities: Vec::new(),
        additionals: Vec::new(),
        cut: Cut::default(),
    }
}

/// TTL of the RFC 8482 HINFO record (RFC 8482 §4.2 suggests a long TTL; a day, like Cloudflare).
pub(crate) const RFC8482_TTL: u32 = 86_400;

/// Does `name` fall inside `zone` (both compared case-insensitively)?
pub(crate) fn in_zone(name: &Name, zone: &Name) -> bool {
    zone.zone_of(name)
}

/// Appends `name` in wire format, uncompressed, in its case (the root label included).
pub(crate) fn push_name(out: &mut Vec<u8>, name: &Name) {
    for label in name.iter() {
        out.push(label.len() as u8);
        out.extend_from_slice(label);
    }
    out.push(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::RecordType;
    use std::str::FromStr;

    fn request(name: &str, edns: Option<u16>) -> Message {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            RecordType::A,
        ));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.edns = Some(e);
        }
        m
    }

    fn many_a(name: &str, n: u8) -> Answer {
        let owner = Name::from_str(name).expect("name");
        Answer {
            rcode: ResponseCode::NoError,
            authoritative: true,
            answers: (0..n)
                .map(|i| Record::from_rdata(owner.clone(), 5, RData::A(A::new(10, 0, 0, i))))
                .collect(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            cut: Cut::default(),
        }
    }

    #[test]
    fn reply_header_has_ra_no_ad_and_echoes_case() {
        let mut req = request("WeB.Service.Consul.", None);
        req.metadata.authentic_data = true;
        let (bytes, tc) = encode_reply(&req, &many_a("web.service.consul.", 1), 512);
        assert!(!tc);
        let reply = Message::from_vec(&bytes).expect("parse");
        assert!(reply.metadata.recursion_available);
        assert!(!reply.metadata.authentic_data);
        assert_eq!(reply.metadata.id, 4242);
        assert_eq!(reply.queries[0].name().to_ascii(), "WeB.Service.Consul.");
        assert!(reply.edns.is_none(), "no OPT unless the query had one");
        // nginx's acceptance mask: QR=1 and AD, Z, CD clear.
        let flags = header::flags(&bytes).expect("flags");
        let checked = header::QR | header::OPCODE_MASK | header::Z | header::AD | header::CD;
        assert_eq!(flags & checked, header::QR);
    }

    #[test]
    fn truncation_sets_tc_keeps_opt_and_fits() {
        for (edns, limit) in [(None, 512), (Some(4096), 1232), (Some(800), 800)] {
            let req = request("big.example.", edns);
            let limit_now = reply_limit(&req, Transport::Udp);
            assert_eq!(limit_now, limit);
            let (bytes, tc) = encode_reply(&req, &many_a("big.example.", 200), limit_now);
            assert!(tc);
            assert!(bytes.len() <= limit, "{} > {limit}", bytes.len());
            let reply = Message::from_vec(&bytes).expect("parse");
            assert!(reply.metadata.truncation);
            assert_eq!(reply.edns.is_some(), edns.is_some());
            assert!(!reply.answers.is_empty(), "a prefix of the answers is kept");
            // The largest prefix: one more record would not fit.
            let mut more = many_a("big.example.", 200);
            more.answers.truncate(reply.answers.len() + 1);
            let (b2, _) = encode_reply(&req, &more, TCP_LIMIT);
            assert!(b2.len() > limit);
        }
    }

    #[test]
    fn tcp_limit_fits_all() {
        let req = request("big.example.", None);
        let (bytes, tc) = encode_reply(&req, &many_a("big.example.", 200), TCP_LIMIT);
        assert!(!tc);
        assert_eq!(Message::from_vec(&bytes).expect("parse").answers.len(), 200);
    }

    #[test]
    fn header_only_reply_keeps_id_and_rcode() {
        let h = RawHeader::parse(&[0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0]).expect("hdr");
        let r = header_only_reply(&h, ResponseCode::FormErr);
        let m = Message::from_vec(&r).expect("parse");
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert!(m.metadata.recursion_desired && m.metadata.recursion_available);
    }

    #[test]
    fn edns_limits() {
        assert_eq!(reply_limit(&request("a.", Some(100)), Transport::Udp), 512);
        assert_eq!(
            reply_limit(&request("a.", Some(65000)), Transport::Udp),
            1232
        );
        assert_eq!(reply_limit(&request("a.", None), Transport::Tcp), 65535);
    }

    /// The direct encoder of address answers must give what hickory's would: the same message
    /// when everything fits, and when it does not, at least as many records (its pointers are
    /// never longer), the same TC flag and a reply within the limit.
    #[test]
    fn address_answers_encode_like_the_general_path() {
        let mut v6 = many_a("svc.example.", 3);
        v6.answers.push(Record::from_rdata(
            Name::from_ascii("svc.example.").expect("name"),
            30,
            RData::AAAA(hickory_proto::rr::rdata::AAAA(
                std::net::Ipv6Addr::LOCALHOST,
            )),
        ));
        for answer in [
            many_a("svc.example.", 1),
            many_a("svc.example.", 3),
            many_a("svc.example.", 40),
            many_a("svc.example.", 200),
            v6,
        ] {
            for (edns, limit) in [
                (None, UDP_LIMIT_NO_EDNS),
                (Some(1232), UDP_LIMIT_EDNS),
                (Some(1232), TCP_LIMIT),
            ] {
                let mut req = request("SVC.example.", edns);
                req.queries[0] = Query::query(
                    Name::from_ascii("SVC.example.").expect("name"),
                    answer.answers[0].record_type(),
                );
                let (fast, fast_cut) =
                    encode_addresses(&req, &answer, limit).expect("address answer");
                let (general, general_cut) = encode_general(&req, &answer, limit);
                assert!(fast.len() <= limit);
                let (f, g) = (
                    Message::from_vec(&fast).expect("decodes"),
                    Message::from_vec(&general).expect("decodes"),
                );
                assert_eq!(
                    f.metadata.truncation, g.metadata.truncation,
                    "TC, limit {limit}"
                );
                assert_eq!(fast_cut, general_cut, "limit {limit}");
                assert_eq!(f.queries[0].name().to_ascii(), "SVC.example.");
                assert_eq!(f.edns.is_some(), edns.is_some());
                if general_cut {
                    assert!(f.answers.len() >= g.answers.len());
                    assert_eq!(f.answers[..g.answers.len()], g.answers[..]);
                } else {
                    assert_eq!(f, g);
                }
            }
        }
        // Other shapes are left to hickory.
        let req = request("www.example.", None);
        let mut cname = many_a("www.example.", 1);
        cname.answers[0].name = Name::from_ascii("other.example.").expect("name");
        assert!(encode_addresses(&req, &cname, 512).is_none());
    }
}
