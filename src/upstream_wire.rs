//! An upstream's reply read in bytes: is it the plain answer to our question, one the cache can
//! store as it came without parsing it into a `Message` and encoding it again? That is most
//! cache misses, and the parse and the encoding were a fifth of a miss's CPU (see ARCHITECTURE.md,
//! "Cache misses in bytes").
//!
//! The rule is narrow on purpose, so that the bytes need no more checking than this: addresses
//! only, owned by the question's name itself (a compression pointer to it), nothing in the
//! authority section, and nothing but an OPT record in the additional one. A CNAME chain, a
//! negative answer, a referral, DNSSEC records or anything unusual is parsed as before.

use crate::header::{self, HEADER_LEN, TYPE_A, TYPE_AAAA, TYPE_OPT};
use crate::raw;

/// A compression pointer to the question's name, which starts right after the header.
const POINTER_TO_QUESTION: [u8; 2] = [0xc0, HEADER_LEN as u8];

/// Is `wire` the reply with ID `id` to `question` (wire format, name lowercased; the reply may
/// spell it in any case), NOERROR, not truncated, with one or more addresses of the asked type
/// owned by the question's name, no authority records and, at most, an OPT record without an
/// extended rcode?
pub(crate) fn plain_answer(wire: &[u8], id: u16, question: &[u8]) -> bool {
    let (Some(reply_id), Some(flags), Some([questions, answers, authorities, additionals])) =
        (header::id(wire), header::flags(wire), header::counts(wire))
    else {
        return false;
    };
    let Some(name_len) = question.len().checked_sub(4) else {
        return false;
    };
    let same_question = wire
        .get(HEADER_LEN..HEADER_LEN + question.len())
        .is_some_and(|asked| {
            asked[..name_len].eq_ignore_ascii_case(&question[..name_len])
                && asked[name_len..] == question[name_len..]
        });
    let qtype = u16::from_be_bytes([question[name_len], question[name_len + 1]]);
    reply_id == id
        && flags & header::QR != 0
        && flags & (header::OPCODE_MASK | header::TC | header::RCODE_MASK) == 0
        && questions == 1
        && answers > 0
        && authorities == 0
        && additionals <= 1
        && same_question
        && matches!(qtype, TYPE_A | TYPE_AAAA)
        && records_plain(
            wire,
            HEADER_LEN + question.len(),
            (usize::from(answers), usize::from(additionals)),
            &question[name_len..],
        )
}

/// Walks the `answers` records after the question (at `base`), then the `additionals`: each
/// answer of the asked type and class (`type_class`, as in the question), owned by the
/// question's name, with an address of that type's size; the additional an OPT record with no
/// extended rcode; nothing after them.
fn records_plain(
    wire: &[u8],
    base: usize,
    (answers, additionals): (usize, usize),
    type_class: &[u8],
) -> bool {
    let Some(records) = wire.get(base..) else {
        return false;
    };
    let address_len = if type_class[..2] == TYPE_A.to_be_bytes() {
        4
    } else {
        16
    };
    let mut at = 0;
    for i in 0..answers + additionals {
        let Some(span) = raw::record_at(records, at, base) else {
            return false;
        };
        // Type, class, TTL, length: the owner ends where these start.
        let fixed = span.ttl_at - 4;
        let rdata_len = span.end - (span.ttl_at + 6);
        let ok = if i < answers {
            records[span.start..fixed] == POINTER_TO_QUESTION
                && records[fixed..fixed + 4] == *type_class
                && rdata_len == address_len
        } else {
            // Root owner, OPT, and the extended rcode (the TTL's first byte) zero.
            span.start + 1 == fixed
                && records[span.start] == 0
                && span.rtype == TYPE_OPT
                && records[span.ttl_at] == 0
        };
        if !ok {
            return false;
        }
        at = span.end;
    }
    at == records.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::rdata::{A, CNAME, SOA};
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    fn name(s: &str) -> Name {
        Name::from_ascii(s).expect("name")
    }

    /// The question `www.example.` A in wire format, as the cache keys it.
    fn question() -> Vec<u8> {
        let mut q = b"\x03www\x07example\x00".to_vec();
        q.extend_from_slice(&[0, 1, 0, 1]);
        q
    }

    /// A change made to the plain reply.
    type Edit = fn(&mut Message);

    fn reply(spelled: &str, edit: impl FnOnce(&mut Message)) -> Vec<u8> {
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(name(spelled), RecordType::A));
        for last in 1..=2 {
            m.add_answer(Record::from_rdata(
                name(spelled),
                60,
                RData::A(A::new(192, 0, 2, last)),
            ));
        }
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        m.edns = Some(edns);
        edit(&mut m);
        m.to_vec().expect("encode")
    }

    #[test]
    fn addresses_for_the_question_are_plain_in_any_case() {
        assert!(plain_answer(&reply("www.example.", |_| {}), 7, &question()));
        assert!(plain_answer(&reply("WwW.eXample.", |_| {}), 7, &question()));
        let mut without_opt = reply("www.example.", |m| m.edns = None);
        assert!(plain_answer(&without_opt, 7, &question()));
        without_opt.push(0);
        assert!(
            !plain_answer(&without_opt, 7, &question()),
            "trailing bytes"
        );
    }

    #[test]
    fn anything_else_is_not() {
        let q = question();
        assert!(!plain_answer(&reply("www.example.", |_| {}), 8, &q), "ID");
        assert!(!plain_answer(&reply("ftp.example.", |_| {}), 7, &q), "name");
        let cases: [(&str, Edit); 6] = [
            ("truncated", |m| m.metadata.truncation = true),
            ("NXDOMAIN", |m| {
                m.metadata.response_code = ResponseCode::NXDomain;
                m.answers.clear();
            }),
            ("no answer", |m| m.answers.clear()),
            ("CNAME chain", |m| {
                m.answers.insert(
                    0,
                    Record::from_rdata(
                        name("www.example."),
                        60,
                        RData::CNAME(CNAME(name("web.example."))),
                    ),
                );
                for r in &mut m.answers[1..] {
                    r.name = name("web.example.");
                }
            }),
            ("authority", |m| {
                m.add_authority(Record::from_rdata(
                    name("example."),
                    60,
                    RData::SOA(SOA::new(
                        name("ns.example."),
                        name("h.example."),
                        1,
                        2,
                        3,
                        4,
                        5,
                    )),
                ));
            }),
            ("a query", |m| m.metadata.message_type = MessageType::Query),
        ];
        for (why, edit) in cases {
            assert!(!plain_answer(&reply("www.example.", edit), 7, &q), "{why}");
        }
        let whole = reply("www.example.", |_| {});
        assert!(!plain_answer(&whole[..whole.len() - 3], 7, &q), "cut short");
        let mut extended = whole.clone();
        let ttl_at = extended.len() - 6;
        extended[ttl_at] = 1;
        assert!(!plain_answer(&extended, 7, &q), "extended rcode");
    }
}
