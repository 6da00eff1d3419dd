//! The fixed 12-byte DNS header (RFC 1035 §4.1.1) as named bits, and the record types the byte
//! paths look at, so that no other module spells a flag as a hex literal or a count as an offset.
//!
//! ```text
//!  byte 0-1   ID
//!  byte 2-3   QR | OPCODE (4) | AA | TC | RD | RA | Z | AD | CD | RCODE (4)
//!  byte 4-11  QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT
//! ```
//!
//! Flags are bits of the 16-bit word at bytes 2-3 (as encrypted-dns-server's `dns.rs` has them),
//! so one mask tests bits of both bytes. Readers return `None` for a packet too short to hold
//! what they read; writers leave such a packet alone, so neither can panic on client bytes.

/// The DNS header is 12 bytes; anything shorter is not DNS.
pub(crate) const HEADER_LEN: usize = 12;

/// The message sizes every reply obeys: they go with the header because the hot path writes
/// them into raw replies (the OPT record's payload size) as much as the encoder uses them.
/// Without EDNS a UDP reply must fit in 512 bytes (RFC 1035 §4.2.1).
pub(crate) const UDP_LIMIT_NO_EDNS: usize = 512;

/// The largest UDP reply we send, whatever the client offers: 1232 bytes avoids IP fragmentation
/// on any path with an MTU of 1280 (DNS Flag Day 2020).
pub(crate) const UDP_LIMIT_EDNS: usize = 1232;

/// A DNS message over TCP is prefixed by a 16-bit length.
pub(crate) const TCP_LIMIT: usize = 65_535;

/// Where the flags word starts.
const FLAGS_AT: usize = 2;

/// Where QDCOUNT starts; the other three counts follow it in [`Section`] order.
const COUNTS_AT: usize = 4;

/// QR: the message is a response.
pub(crate) const QR: u16 = 0x8000;
/// The four opcode bits (QUERY, NOTIFY, UPDATE, ...).
pub(crate) const OPCODE_MASK: u16 = 0x7800;
/// AA: authoritative answer.
pub(crate) const AA: u16 = 0x0400;
/// TC: truncated; a UDP client should ask again over TCP.
pub(crate) const TC: u16 = 0x0200;
/// RD: recursion desired (copied from query to reply).
pub(crate) const RD: u16 = 0x0100;
/// RA: recursion available.
pub(crate) const RA: u16 = 0x0080;
/// Z: reserved, must be zero. Named for the header tests; nothing sets it.
#[cfg(test)]
pub(crate) const Z: u16 = 0x0040;
/// AD: authentic data (RFC 4035 §3.2.3). In a query, the client understands AD (RFC 6840
/// §5.7); in a reply, set only for forwarded answers a trusted upstream validated (see
/// `upstream::Forwarder`).
pub(crate) const AD: u16 = 0x0020;
/// CD: checking disabled (RFC 4035 §3.2.2; copied from query to reply).
pub(crate) const CD: u16 = 0x0010;
/// The four low bits of the rcode (the high bits live in the OPT record).
pub(crate) const RCODE_MASK: u16 = 0x000f;

/// How far the opcode sits above bit 0 of the flags word.
const OPCODE_SHIFT: u32 = OPCODE_MASK.trailing_zeros();

/// Record type of an IPv4 address (RFC 1035).
pub(crate) const TYPE_A: u16 = 1;
/// Record type of an IPv6 address (RFC 3596).
pub(crate) const TYPE_AAAA: u16 = 28;
/// Record type of the EDNS pseudo-record (RFC 6891).
pub(crate) const TYPE_OPT: u16 = 41;
/// Record types a resolver leaves out for a client without DO unless it asked for that type
/// (RFC 4035 §3.2.1): signatures, denial-of-existence proofs and delegation signers.
pub(crate) const TYPE_DS: u16 = 43;
pub(crate) const TYPE_RRSIG: u16 = 46;
pub(crate) const TYPE_NSEC: u16 = 47;
pub(crate) const TYPE_NSEC3: u16 = 50;

/// DO: the DNSSEC OK bit of the OPT record's flags (RFC 3225), the high bit of the 16 flag bits
/// that follow its extended rcode and version.
pub(crate) const EDNS_DO: u16 = 0x8000;

/// Is `rtype` one of the DNSSEC types that only a client with DO gets unless it asked for it
/// (RFC 4035 §3.2.1)?
#[inline]
pub(crate) fn is_dnssec_proof(rtype: u16) -> bool {
    matches!(rtype, TYPE_DS | TYPE_RRSIG | TYPE_NSEC | TYPE_NSEC3)
}

/// The four sections whose record counts the header holds, in header order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Section {
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "only tests write a question count")
    )]
    Question = 0,
    Answer = 1,
    Authority = 2,
    Additional = 3,
}

impl Section {
    fn at(self) -> usize {
        COUNTS_AT + 2 * self as usize
    }
}

fn u16_at(packet: &[u8], at: usize) -> Option<u16> {
    packet
        .get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
}

fn set_u16_at(packet: &mut [u8], at: usize, value: u16) {
    if let Some(b) = packet.get_mut(at..at + 2) {
        b.copy_from_slice(&value.to_be_bytes());
    }
}

/// The message ID.
#[inline]
pub(crate) fn id(packet: &[u8]) -> Option<u16> {
    u16_at(packet, 0)
}

/// The flags word (bytes 2-3): test it with the flag constants.
#[inline]
pub(crate) fn flags(packet: &[u8]) -> Option<u16> {
    u16_at(packet, FLAGS_AT)
}

/// Sets the bits of `flag` (one or more flag constants) in an encoded message.
#[inline]
pub(crate) fn set_flags(packet: &mut [u8], flag: u16) {
    if let Some(f) = flags(packet) {
        set_u16_at(packet, FLAGS_AT, f | flag);
    }
}

/// Clears the bits of `flag` in an encoded message.
#[inline]
pub(crate) fn clear_flags(packet: &mut [u8], flag: u16) {
    if let Some(f) = flags(packet) {
        set_u16_at(packet, FLAGS_AT, f & !flag);
    }
}

/// The opcode held in a flags word.
#[inline]
pub(crate) fn opcode(flags: u16) -> u8 {
    ((flags & OPCODE_MASK) >> OPCODE_SHIFT) as u8
}

/// `opcode` placed in a flags word (bits above the field's four are dropped).
#[inline]
pub(crate) fn opcode_flags(opcode: u8) -> u16 {
    (u16::from(opcode) << OPCODE_SHIFT) & OPCODE_MASK
}

/// The (low four bits of the) rcode held in a flags word.
#[inline]
pub(crate) fn rcode(flags: u16) -> u8 {
    (flags & RCODE_MASK) as u8
}

/// `rcode` placed in a flags word (its low four bits: the rest go in the OPT record).
#[inline]
pub(crate) fn rcode_flags(rcode: u8) -> u16 {
    u16::from(rcode) & RCODE_MASK
}

/// `flag` when `on`, else nothing: for building a flags word from booleans.
#[inline]
pub(crate) fn flag_if(on: bool, flag: u16) -> u16 {
    if on {
        flag
    } else {
        0
    }
}

/// The four section counts, indexed by [`Section`]; `None` for a packet shorter than a header.
#[inline]
pub(crate) fn counts(packet: &[u8]) -> Option<[u16; 4]> {
    let c = packet.get(COUNTS_AT..HEADER_LEN)?;
    Some([
        u16::from_be_bytes([c[0], c[1]]),
        u16::from_be_bytes([c[2], c[3]]),
        u16::from_be_bytes([c[4], c[5]]),
        u16::from_be_bytes([c[6], c[7]]),
    ])
}

/// One section's record count.
#[inline]
pub(crate) fn count(packet: &[u8], section: Section) -> Option<u16> {
    u16_at(packet, section.at())
}

/// Rewrites one section's record count in an encoded message.
#[inline]
pub(crate) fn set_count(packet: &mut [u8], section: Section, n: u16) {
    set_u16_at(packet, section.at(), n);
}

/// Appends a whole header: ID, flags word and the four counts in [`Section`] order.
#[inline]
pub(crate) fn push(out: &mut Vec<u8>, id: u16, flags: u16, counts: [u16; 4]) {
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    for c in counts {
        out.extend_from_slice(&c.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ID 0x1234; QR, opcode NOTIFY (4), AA, TC, RD | RA, AD, CD, rcode REFUSED (5); counts
    /// 1, 2, 3, 4.
    const SAMPLE: [u8; HEADER_LEN] = [0x12, 0x34, 0b1010_0111, 0b1011_0101, 0, 1, 0, 2, 0, 3, 0, 4];

    #[test]
    fn flags_name_the_rfc_1035_bits() {
        let f = flags(&SAMPLE).expect("flags");
        for (name, flag, set) in [
            ("QR", QR, true),
            ("AA", AA, true),
            ("TC", TC, true),
            ("RD", RD, true),
            ("RA", RA, true),
            ("Z", Z, false),
            ("AD", AD, true),
            ("CD", CD, true),
        ] {
            assert_eq!(f & flag != 0, set, "{name}");
        }
        assert_eq!(opcode(f), 4);
        assert_eq!(rcode(f), 5);
        assert_eq!(id(&SAMPLE), Some(0x1234));
        // Every bit of the word has exactly one name.
        let all = [QR, OPCODE_MASK, AA, TC, RD, RA, Z, AD, CD, RCODE_MASK];
        assert_eq!(all.iter().fold(0, |acc, f| acc | f), u16::MAX);
        assert_eq!(all.iter().map(|f| f.count_ones()).sum::<u32>(), 16);
    }

    #[test]
    fn opcode_and_rcode_round_trip_within_their_fields() {
        for v in 0..16u8 {
            assert_eq!(opcode(opcode_flags(v)), v);
            assert_eq!(rcode(rcode_flags(v)), v);
        }
        assert_eq!(opcode_flags(0x1f), opcode_flags(0x0f), "only four bits");
        assert_eq!(rcode_flags(0x17), 7, "extended bits go elsewhere");
        assert_eq!(flag_if(true, TC), TC);
        assert_eq!(flag_if(false, TC), 0);
    }

    #[test]
    fn counts_read_and_write_each_section() {
        assert_eq!(counts(&SAMPLE), Some([1, 2, 3, 4]));
        let mut p = SAMPLE;
        set_count(&mut p, Section::Answer, 0x0102);
        set_count(&mut p, Section::Additional, 9);
        assert_eq!(count(&p, Section::Question), Some(1));
        assert_eq!(count(&p, Section::Answer), Some(0x0102));
        assert_eq!(count(&p, Section::Authority), Some(3));
        assert_eq!(counts(&p), Some([1, 0x0102, 3, 9]));
        assert_eq!(&p[6..8], &[1, 2], "big-endian");
    }

    #[test]
    fn push_writes_what_the_readers_read() {
        let mut out = Vec::new();
        push(&mut out, 0xbeef, QR | RA | rcode_flags(3), [1, 0, 1, 0]);
        assert_eq!(out, [0xbe, 0xef, 0x80, 0x83, 0, 1, 0, 0, 0, 1, 0, 0]);
        set_flags(&mut out, TC);
        assert_eq!(flags(&out), Some(QR | TC | RA | 3));
    }

    #[test]
    fn short_packets_read_as_none_and_are_left_alone() {
        let mut short = [0xffu8; HEADER_LEN - 1];
        assert_eq!(counts(&short), None);
        assert_eq!(count(&short, Section::Additional), None);
        assert_eq!(count(&short, Section::Authority), Some(0xffff));
        assert_eq!(flags(&[0, 0, 0x80]), None);
        assert_eq!(id(&[7]), None);
        set_count(&mut short, Section::Additional, 0);
        let mut three = [0u8; 3];
        set_flags(&mut three, TC);
        assert_eq!(three, [0, 0, 0]);
        assert_eq!(short, [0xff; HEADER_LEN - 1]);
    }
}
