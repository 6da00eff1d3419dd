//! Hostile DNS input: a hand-written packet builder (independent of hickory's encoder, so it can
//! write what no encoder would), the corpus of nasty packets kept in `tests/corpus/packets/`, a
//! DNS-aware mutator, and the oracle that judges a reply from the handler.
//!
//! Self-contained (only the crate, hickory-proto, rand and tokio), so the coverage-guided fuzz
//! target in `fuzz/` includes this same file and applies the same oracle.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use consul_dns_forwarder::config::Config;
use consul_dns_forwarder::consul::file::{FileBackend, DEMO_CATALOG};
use consul_dns_forwarder::consul::ConsulSource;
use consul_dns_forwarder::handler::{ConsulRoute, Handler, Routes};
use consul_dns_forwarder::metrics::Metrics;
use consul_dns_forwarder::reply::Transport;
use consul_dns_forwarder::upstream::Forwarder;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use rand::Rng;

// ---------------------------------------------------------------------------------------------
// Packet builder.

pub const TYPE_A: u16 = 1;
pub const TYPE_NS: u16 = 2;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_PTR: u16 = 12;
pub const TYPE_MX: u16 = 15;
pub const TYPE_TXT: u16 = 16;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_SRV: u16 = 33;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_TSIG: u16 = 250;
pub const TYPE_AXFR: u16 = 252;
pub const TYPE_ANY: u16 = 255;
pub const CLASS_IN: u16 = 1;
pub const CLASS_CH: u16 = 3;

/// Header flags of a plain query with RD=1.
pub const RD: u16 = 0x0100;

/// The 12-byte header.
pub fn header(id: u16, flags: u16, qd: u16, an: u16, ns: u16, ar: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(12);
    for v in [id, flags, qd, an, ns, ar] {
        h.extend_from_slice(&v.to_be_bytes());
    }
    h
}

/// A name in wire form from dotted text (no escapes: every byte between dots is label data).
pub fn wire_name(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in text.split('.').filter(|l| !l.is_empty()) {
        out.push(u8::try_from(label.len()).expect("label length fits a byte"));
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// A name from raw labels (any bytes, any length byte the caller wants).
pub fn name_labels(labels: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in labels {
        out.push(l.len() as u8);
        out.extend_from_slice(l);
    }
    out.push(0);
    out
}

pub fn question(qname: &[u8], qtype: u16, qclass: u16) -> Vec<u8> {
    let mut q = qname.to_vec();
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&qclass.to_be_bytes());
    q
}

/// A resource record.
pub fn rr(owner: &[u8], rtype: u16, class: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
    let mut r = owner.to_vec();
    r.extend_from_slice(&rtype.to_be_bytes());
    r.extend_from_slice(&class.to_be_bytes());
    r.extend_from_slice(&ttl.to_be_bytes());
    r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    r.extend_from_slice(rdata);
    r
}

/// EDNS options as rdata: (code, data) pairs.
pub fn edns_options(options: &[(u16, &[u8])]) -> Vec<u8> {
    let mut d = Vec::new();
    for (code, data) in options {
        d.extend_from_slice(&code.to_be_bytes());
        d.extend_from_slice(&(data.len() as u16).to_be_bytes());
        d.extend_from_slice(data);
    }
    d
}

/// An OPT pseudo-RR: root owner, class = UDP payload size, TTL = extended rcode, version, flags.
pub fn opt(payload: u16, version: u8, rdata: &[u8]) -> Vec<u8> {
    rr(&[0], TYPE_OPT, payload, u32::from(version) << 16, rdata)
}

/// A complete single-question query, optionally with an OPT record.
pub fn query(id: u16, qname: &str, qtype: u16, edns: Option<Vec<u8>>) -> Vec<u8> {
    let ar = u16::from(edns.is_some());
    let mut p = header(id, RD, 1, 0, 0, ar);
    p.extend(question(&wire_name(qname), qtype, CLASS_IN));
    if let Some(o) = edns {
        p.extend(o);
    }
    p
}

// ---------------------------------------------------------------------------------------------
// The corpus.

/// What the server must do with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// No reply, one drop counted with this reason.
    Drop(&'static str),
    /// A reply with the request's ID: this rcode, or any rcode when `None`.
    Reply(Option<ResponseCode>),
}

impl Expect {
    /// The rule for any packet: shorter than a header or a response (QR=1): a counted drop;
    /// otherwise a reply.
    pub fn from_bytes(p: &[u8]) -> Expect {
        if p.len() < 12 {
            Expect::Drop("short")
        } else if p[2] & 0x80 != 0 {
            Expect::Drop("response")
        } else {
            Expect::Reply(None)
        }
    }

    pub fn describe(self) -> String {
        match self {
            Expect::Drop(reason) => format!("no reply, drop counted as `{reason}`"),
            Expect::Reply(None) => "a reply (any rcode)".to_owned(),
            Expect::Reply(Some(rc)) => format!("a {rc} reply"),
        }
    }
}

/// One hand-crafted nasty packet.
pub struct Nasty {
    /// File name without `.bin`.
    pub name: &'static str,
    pub what: &'static str,
    pub bytes: Vec<u8>,
    pub expect: Expect,
}

fn nasty(name: &'static str, what: &'static str, bytes: Vec<u8>, expect: Expect) -> Nasty {
    Nasty {
        name,
        what,
        bytes,
        expect,
    }
}

const FORMERR: Expect = Expect::Reply(Some(ResponseCode::FormErr));
const NOERROR: Expect = Expect::Reply(Some(ResponseCode::NoError));
const NXDOMAIN: Expect = Expect::Reply(Some(ResponseCode::NXDomain));
const NOTIMP: Expect = Expect::Reply(Some(ResponseCode::NotImp));
const ANY: Expect = Expect::Reply(None);

/// Every hand-crafted packet, in a fixed order (IDs are fixed so the files never change).
pub fn corpus() -> Vec<Nasty> {
    let mut v = Vec::new();
    let mut id: u16 = 0x5100;
    let mut next = || {
        id += 1;
        id
    };

    // --- Too short, or not a query.
    v.push(nasty(
        "empty",
        "a zero-byte datagram (over TCP: a zero length prefix)",
        vec![],
        Expect::Drop("short"),
    ));
    v.push(nasty(
        "one-byte",
        "a single byte",
        vec![0x42],
        Expect::Drop("short"),
    ));
    let mut h11 = header(next(), RD, 1, 0, 0, 0);
    h11.truncate(11);
    v.push(nasty(
        "header-11-bytes",
        "a header one byte short",
        h11,
        Expect::Drop("short"),
    ));
    v.push(nasty(
        "header-only",
        "a 12-byte header, every count 0",
        header(next(), RD, 0, 0, 0, 0),
        FORMERR,
    ));
    v.push(nasty(
        "header-only-qdcount-1",
        "a 12-byte header announcing a question that is not there",
        header(next(), RD, 1, 0, 0, 0),
        FORMERR,
    ));
    let mut resp = query(next(), "a.test.", TYPE_A, None);
    resp[2] |= 0x80;
    v.push(nasty(
        "response-bit",
        "a well-formed query with QR=1 (a reflected response)",
        resp,
        Expect::Drop("response"),
    ));
    let mut resp_garbage = header(next(), 0x8180, 0xffff, 0xffff, 0xffff, 0xffff);
    resp_garbage.extend_from_slice(&[0xc0, 0x0c, 0xff, 0xff]);
    v.push(nasty(
        "response-bit-garbage",
        "QR=1 with lying counts and a body of garbage",
        resp_garbage,
        Expect::Drop("response"),
    ));
    let mut resp_short = header(next(), 0x8000, 0, 0, 0, 0);
    resp_short.truncate(11);
    v.push(nasty(
        "response-bit-11-bytes",
        "11 bytes with QR=1",
        resp_short,
        Expect::Drop("short"),
    ));

    // --- Names.
    let mut p = header(next(), RD, 1, 0, 0, 0);
    p.extend_from_slice(&[0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01]);
    v.push(nasty(
        "compression-loop",
        "the question name is a pointer to itself (offset 12)",
        p,
        FORMERR,
    ));
    let mut p = header(next(), RD, 1, 0, 0, 0);
    // offset 12: "a" then pointer to 16; offset 16: "b" then pointer to 12.
    p.extend_from_slice(&[1, b'a', 0xc0, 16, 1, b'b', 0xc0, 12, 0x00, 0x01, 0x00, 0x01]);
    v.push(nasty(
        "compression-loop-two-pointers",
        "two labels pointing at each other (a -> b -> a ...)",
        p,
        FORMERR,
    ));
    let mut p = header(next(), RD, 1, 0, 0, 0);
    p.extend_from_slice(&[1, b'a', 0xc0, 0xff, 0x00, 0x01, 0x00, 0x01]);
    v.push(nasty(
        "compression-pointer-past-end",
        "a pointer to offset 255 of an 20-byte packet",
        p,
        FORMERR,
    ));
    let mut p = header(next(), RD, 1, 0, 0, 0);
    p.extend_from_slice(&[0xc0, 0x0e, 0x00, 0x01, 0x00, 0x01]);
    v.push(nasty(
        "compression-pointer-forward",
        "a pointer forward, into the question's own type field",
        p,
        FORMERR,
    ));
    let mut p = header(next(), RD, 1, 0, 0, 0);
    p.extend_from_slice(&[0xc0, 0x02, 0x00, 0x01, 0x00, 0x01]);
    v.push(nasty(
        "compression-pointer-into-header",
        "a pointer into the header (offset 2)",
        p,
        ANY,
    ));
    let mut p = header(next(), RD, 1, 0, 0, 0);
    p.extend_from_slice(&[0xc0]);
    v.push(nasty(
        "compression-pointer-half",
        "the packet ends in the middle of a pointer",
        p,
        FORMERR,
    ));
    // Pointers must point backwards, so a question name can only point into the header; long
    // chains live in the additional section instead: record k is owned by "y" and a pointer to
    // the owner of record k-1, the first by "x." — names growing by 2 bytes per link.
    for (file, what, links, expect) in [
        ("compression-chain-100", "100 additional records, each owner a pointer to the previous one (names up to 201 bytes)", 100u16, ANY),
        ("compression-chain-past-255", "130 chained owners: the 127th expands past 255 bytes", 130, FORMERR),
    ] {
        let mut p = header(next(), RD, 1, 0, 0, links + 1);
        p.extend(question(&wire_name("a.test."), TYPE_A, CLASS_IN));
        let mut prev = p.len() as u16;
        p.extend(rr(&wire_name("x."), TYPE_A, CLASS_IN, 0, &[192, 0, 2, 1]));
        for _ in 0..links {
            let here = p.len() as u16;
            let mut owner = vec![1, b'y'];
            owner.extend_from_slice(&(0xc000 | prev).to_be_bytes());
            p.extend(rr(&owner, TYPE_A, CLASS_IN, 0, &[192, 0, 2, 1]));
            prev = here;
        }
        v.push(nasty(file, what, p, expect));
    }

    let long63 = "a".repeat(63);
    let label63 = format!("{long63}.test.");
    v.push(nasty(
        "label-63",
        "a 63-byte label (the maximum) under test.",
        query(next(), &label63, TYPE_A, None),
        NXDOMAIN,
    ));
    let mut p = header(next(), RD, 1, 0, 0, 0);
    p.push(64);
    p.extend_from_slice(&[b'a'; 64]);
    p.extend(wire_name("test."));
    p.extend_from_slice(&[0x00, 0x01, 0x00, 0x01]);
    v.push(nasty(
        "label-64",
        "a label length byte of 64 (0x40: the reserved extended label type)",
        p,
        FORMERR,
    ));
    let mut p = header(next(), RD, 1, 0, 0, 0);
    p.push(0x41);
    p.extend_from_slice(&[0x01, 0x08, 0xff, 0x00]);
    p.extend_from_slice(&[0x00, 0x01, 0x00, 0x01]);
    v.push(nasty(
        "label-bitstring",
        "an RFC 2673 bit-string label (0x41), long obsolete",
        p,
        FORMERR,
    ));
    let mut p = header(next(), RD, 1, 0, 0, 0);
    p.push(0x80);
    p.extend_from_slice(&[0x00, 0x00, 0x01, 0x00, 0x01]);
    v.push(nasty(
        "label-type-10",
        "the reserved label type 0b10 (0x80)",
        p,
        FORMERR,
    ));
    let mut p = header(next(), RD, 1, 0, 0, 0);
    p.push(50);
    p.extend_from_slice(b"only-ten-b");
    v.push(nasty(
        "label-past-end",
        "a 50-byte label with 10 bytes left in the packet",
        p,
        FORMERR,
    ));
    // 127 one-letter labels end in "test."? No: 125 "a." labels + "test." = 250 + 6 = 256 > 255;
    // 124 of them: 248 + 6 + ... let the builder count: exactly 255 bytes on the wire.
    let mut labels = String::new();
    while labels.len() + 2 + wire_name("test.").len() <= 255 {
        labels.push_str("a.");
    }
    let n255 = format!("{labels}test.");
    let n255_wire = wire_name(&n255);
    let n255 = if n255_wire.len() < 255 {
        // Pad the first label so the wire form is exactly 255 bytes.
        let pad = 255 - n255_wire.len();
        format!("{}{}", "a".repeat(pad), n255)
    } else {
        n255
    };
    assert_eq!(
        wire_name(&n255).len(),
        255,
        "name-255 is 255 bytes on the wire"
    );
    v.push(nasty(
        "name-255",
        "a 255-byte name (the maximum) under test.",
        query(next(), &n255, TYPE_A, None),
        NXDOMAIN,
    ));
    let n256 = format!("b{n255}");
    assert_eq!(wire_name(&n256).len(), 256);
    v.push(nasty(
        "name-256",
        "a 256-byte name, one over the limit",
        query(next(), &n256, TYPE_A, None),
        FORMERR,
    ));
    let four_63 = format!("{long63}.{long63}.{long63}.{long63}.{long63}.");
    v.push(nasty(
        "name-320",
        "five 63-byte labels: 321 bytes",
        query(next(), &four_63, TYPE_A, None),
        FORMERR,
    ));
    // The question is a 198-byte name; an additional record's owner is a 63-byte label, "pp"
    // and a pointer to it: 64 + 3 + 198 = 265 bytes when expanded.
    let long = format!("{long63}.{long63}.{long63}.test.");
    let mut p = header(next(), RD, 1, 0, 0, 1);
    p.extend(question(&wire_name(&long), TYPE_A, CLASS_IN));
    let mut owner = vec![63];
    owner.extend_from_slice(long63.as_bytes());
    owner.extend_from_slice(&[2, b'p', b'p', 0xc0, 12]);
    p.extend(rr(&owner, TYPE_A, CLASS_IN, 0, &[192, 0, 2, 1]));
    v.push(nasty(
        "name-over-255-via-pointer",
        "a record owner that a pointer makes 265 bytes long when expanded",
        p,
        FORMERR,
    ));
    let mut p = header(next(), RD, 1, 0, 0, 0);
    p.extend(name_labels(&[b"a\x00b", b"c.d", b"\xff\xfe", b"test"]));
    p.extend_from_slice(&[0x00, 0x01, 0x00, 0x01]);
    v.push(nasty(
        "binary-labels",
        "labels holding NUL, a dot and 0xff bytes, under test.",
        p,
        ANY,
    ));
    let mut p = header(next(), RD, 1, 0, 0, 0);
    p.extend(name_labels(&[b"we\x00b", b"ser.vice", b"consul"]));
    p.extend_from_slice(&[0x00, 0x01, 0x00, 0x01]);
    v.push(nasty(
        "binary-labels-consul",
        "binary labels under consul.",
        p,
        ANY,
    ));
    let consul63 = format!("{long63}.service.consul.");
    v.push(nasty(
        "consul-label-63",
        "a 63-byte service name under consul.",
        query(next(), &consul63, TYPE_A, None),
        ANY,
    ));
    let mut deep = String::new();
    while wire_name(&format!("x.{deep}service.consul.")).len() <= 255 {
        deep.push_str("x.");
    }
    v.push(nasty(
        "consul-many-labels",
        "a name of ~120 one-letter labels under service.consul.",
        query(next(), &format!("{deep}service.consul."), TYPE_SRV, None),
        ANY,
    ));
    v.push(nasty(
        "root-name",
        "a question for the root name (NS)",
        query(next(), ".", TYPE_NS, None),
        ANY,
    ));
    v.push(nasty(
        "wildcard-consul",
        "*.service.consul.",
        query(next(), "*.service.consul.", TYPE_A, None),
        ANY,
    ));

    // --- Counts that lie.
    let mut p = query(next(), "a.test.", TYPE_A, None);
    p[5] = 2;
    v.push(nasty("qdcount-lies", "qdcount 2, one question", p, FORMERR));
    let mut p = query(next(), "a.test.", TYPE_A, None);
    p[4] = 0xff;
    p[5] = 0xff;
    v.push(nasty(
        "qdcount-65535",
        "qdcount 65535, one question",
        p,
        FORMERR,
    ));
    let mut p = query(next(), "a.test.", TYPE_A, None);
    p[5] = 0;
    v.push(nasty(
        "qdcount-0-with-question",
        "qdcount 0 followed by a question",
        p,
        FORMERR,
    ));
    let mut p = header(next(), RD, 2, 0, 0, 0);
    p.extend(question(&wire_name("a.test."), TYPE_A, CLASS_IN));
    p.extend(question(&wire_name("two.test."), TYPE_A, CLASS_IN));
    v.push(nasty("qdcount-2", "two real questions", p, FORMERR));
    let mut p = query(next(), "a.test.", TYPE_A, None);
    p[7] = 5;
    v.push(nasty(
        "ancount-lies",
        "ancount 5 in a query with no answers",
        p,
        FORMERR,
    ));
    let mut p = query(next(), "a.test.", TYPE_A, None);
    p[9] = 1;
    v.push(nasty(
        "nscount-lies",
        "nscount 1 with nothing there",
        p,
        FORMERR,
    ));
    let mut p = query(next(), "a.test.", TYPE_A, None);
    p[11] = 3;
    v.push(nasty(
        "arcount-lies",
        "arcount 3 with nothing there",
        p,
        FORMERR,
    ));
    let mut p = query(next(), "a.test.", TYPE_A, None);
    p.truncate(p.len() - 2);
    v.push(nasty(
        "question-truncated",
        "the question's class is missing",
        p,
        FORMERR,
    ));
    let mut p = query(next(), "a.test.", TYPE_A, None);
    p.truncate(p.len() - 3);
    v.push(nasty(
        "question-truncated-in-type",
        "the packet ends inside the question's type",
        p,
        FORMERR,
    ));
    let mut p = query(next(), "a.test.", TYPE_A, None);
    p.extend_from_slice(b"trailing garbage \x00\xff\xc0\x0c");
    v.push(nasty(
        "trailing-garbage",
        "a good query followed by bytes no count announces",
        p,
        NOERROR,
    ));
    let mut p = header(next(), RD, 1, 1, 0, 0);
    p.extend(question(&wire_name("a.test."), TYPE_A, CLASS_IN));
    p.extend(rr(&[0xc0, 12], TYPE_A, CLASS_IN, 60, &[1, 2, 3]));
    v.push(nasty(
        "rdata-short",
        "an A record with 3 bytes of rdata",
        p,
        FORMERR,
    ));
    let mut p = header(next(), RD, 1, 1, 0, 0);
    p.extend(question(&wire_name("a.test."), TYPE_A, CLASS_IN));
    let mut r = rr(&[0xc0, 12], TYPE_TXT, CLASS_IN, 60, b"\x05hi");
    let n = r.len();
    r[n - 4..n - 2].copy_from_slice(&500u16.to_be_bytes());
    p.extend(r);
    v.push(nasty(
        "rdlength-past-end",
        "a record whose rdlength runs 500 bytes past the packet",
        p,
        FORMERR,
    ));
    let mut p = header(next(), RD, 1, 1, 0, 0);
    p.extend(question(&wire_name("a.test."), TYPE_A, CLASS_IN));
    p.extend(rr(&[0xc0, 12], TYPE_OPT, 4096, 0, &[]));
    v.push(nasty(
        "opt-in-answer-section",
        "an OPT record in the answer section",
        p,
        FORMERR,
    ));

    // --- EDNS.
    let garbage = edns_options(&[(65001, b"\xde\xad\xbe\xef\x00\xff\xc0\x0c")]);
    v.push(nasty(
        "edns-garbage-option",
        "an OPT with an unknown option code and 8 bytes of junk",
        query(next(), "a.test.", TYPE_A, Some(opt(1232, 0, &garbage))),
        NOERROR,
    ));
    let mut rd = edns_options(&[(10, b"12345678")]);
    rd[3] = 100; // option length 100 inside 12 bytes of rdata
    v.push(nasty(
        "edns-option-overruns-rdata",
        "an EDNS option whose length runs past the OPT's rdata",
        query(next(), "a.test.", TYPE_A, Some(opt(1232, 0, &rd))),
        FORMERR,
    ));
    let mut o = opt(1232, 0, &edns_options(&[(10, b"12345678")]));
    let n = o.len();
    o[n - 14..n - 12].copy_from_slice(&400u16.to_be_bytes());
    v.push(nasty(
        "edns-rdlength-past-end",
        "an OPT whose rdlength runs past the end of the packet",
        query(next(), "a.test.", TYPE_A, Some(o)),
        FORMERR,
    ));
    v.push(nasty(
        "edns-option-header-cut",
        "OPT rdata of 3 bytes: half an option header",
        query(
            next(),
            "a.test.",
            TYPE_A,
            Some(opt(1232, 0, &[0x00, 0x0a, 0x00])),
        ),
        FORMERR,
    ));
    v.push(nasty(
        "edns-cookie-3-bytes",
        "a COOKIE option of 3 bytes (RFC 7873 wants 8, or 16-40)",
        query(
            next(),
            "a.test.",
            TYPE_A,
            Some(opt(1232, 0, &edns_options(&[(10, b"abc")]))),
        ),
        ANY,
    ));
    v.push(nasty(
        "edns-ecs-bad-prefix",
        "a CLIENT-SUBNET option for IPv4 with a source prefix of 200 bits",
        query(
            next(),
            "a.test.",
            TYPE_A,
            Some(opt(
                1232,
                0,
                &edns_options(&[(8, &[0, 1, 200, 0, 10, 0, 0])]),
            )),
        ),
        FORMERR,
    ));
    v.push(nasty(
        "edns-ecs-bad-family",
        "a CLIENT-SUBNET option with address family 7",
        query(
            next(),
            "a.test.",
            TYPE_A,
            Some(opt(
                1232,
                0,
                &edns_options(&[(8, &[0, 7, 24, 0, 10, 0, 0])]),
            )),
        ),
        FORMERR,
    ));
    v.push(nasty(
        "edns-ecs-empty",
        "a CLIENT-SUBNET option with no data at all",
        query(
            next(),
            "a.test.",
            TYPE_A,
            Some(opt(1232, 0, &edns_options(&[(8, &[])]))),
        ),
        FORMERR,
    ));
    let many: Vec<(u16, &[u8])> = (0..200).map(|i| (65000 + i, &b"x"[..])).collect();
    v.push(nasty(
        "edns-200-options",
        "an OPT with 200 small unknown options",
        query(
            next(),
            "a.test.",
            TYPE_A,
            Some(opt(1232, 0, &edns_options(&many))),
        ),
        NOERROR,
    ));
    let pad = vec![0u8; 3000];
    v.push(nasty(
        "edns-padding-3000",
        "a 3 KB query: an EDNS padding option of 3000 bytes",
        query(
            next(),
            "a.test.",
            TYPE_A,
            Some(opt(1232, 0, &edns_options(&[(12, &pad)]))),
        ),
        NOERROR,
    ));
    let mut p = query(next(), "a.test.", TYPE_A, Some(opt(1232, 0, &[])));
    p[11] = 2;
    p.extend(opt(4096, 0, &[]));
    v.push(nasty(
        "opt-twice",
        "two OPT records (RFC 6891 6.1.1: FORMERR)",
        p,
        FORMERR,
    ));
    v.push(nasty(
        "opt-version-1",
        "EDNS version 1 (BADVERS)",
        query(next(), "a.test.", TYPE_A, Some(opt(1232, 1, &[]))),
        Expect::Reply(Some(ResponseCode::BADVERS)),
    ));
    v.push(nasty(
        "opt-version-255",
        "EDNS version 255 with the DO bit and garbage flags",
        query(
            next(),
            "a.test.",
            TYPE_A,
            Some(rr(&[0], TYPE_OPT, 1232, 0x00ff_ffff, &[])),
        ),
        Expect::Reply(Some(ResponseCode::BADVERS)),
    ));
    v.push(nasty(
        "opt-payload-0",
        "EDNS with a UDP payload size of 0",
        query(next(), "big.test.", TYPE_A, Some(opt(0, 0, &[]))),
        NOERROR,
    ));
    v.push(nasty(
        "opt-payload-65535",
        "EDNS with a UDP payload size of 65535 for a large answer",
        query(next(), "big.test.", TYPE_A, Some(opt(65535, 0, &[]))),
        NOERROR,
    ));
    let mut p = query(next(), "a.test.", TYPE_A, None);
    p[11] = 1;
    p.extend(rr(&wire_name("not.root."), TYPE_OPT, 1232, 0, &[]));
    v.push(nasty(
        "opt-owner-not-root",
        "an OPT record owned by not.root. instead of the root",
        p,
        FORMERR,
    ));
    let mut p = query(next(), "a.test.", TYPE_A, None);
    p[11] = 1;
    p.extend(rr(&[0], TYPE_OPT, 1232, 0x0f00_0000, &[]));
    v.push(nasty(
        "opt-extended-rcode",
        "an OPT carrying an extended rcode in a query",
        p,
        ANY,
    ));
    let mut p = query(next(), "a.test.", TYPE_A, None);
    p[11] = 1;
    p.extend(rr(
        &wire_name("key."),
        TYPE_TSIG,
        255,
        0,
        b"\x00garbage-tsig-rdata",
    ));
    v.push(nasty(
        "tsig-garbage",
        "a TSIG record with garbage rdata",
        p,
        FORMERR,
    ));
    let mut p = query(next(), "a.test.", TYPE_A, None);
    p[11] = 2;
    p.extend(rr(&wire_name("key."), TYPE_TSIG, 255, 0, b""));
    p.extend(opt(1232, 0, &[]));
    v.push(nasty(
        "record-after-tsig",
        "an OPT after an (empty) TSIG record",
        p,
        FORMERR,
    ));

    // --- Header fields.
    for (name_, what, opcode) in [
        ("opcode-iquery", "opcode 1 (IQUERY, obsolete)", 1u16),
        ("opcode-status", "opcode 2 (STATUS)", 2),
        ("opcode-notify", "opcode 4 (NOTIFY)", 4),
        ("opcode-update", "opcode 5 (UPDATE)", 5),
    ] {
        let mut p = query(next(), "a.test.", TYPE_A, None);
        p[2] = (p[2] & 0x87) | ((opcode as u8) << 3);
        v.push(nasty(name_, what, p, NOTIMP));
    }
    let mut p = query(next(), "a.test.", TYPE_A, None);
    p[2] = (p[2] & 0x87) | (15 << 3);
    v.push(nasty("opcode-15", "the unassigned opcode 15", p, NOTIMP));
    let mut p = query(next(), "a.test.", TYPE_A, None);
    p[2] = 0x7f; // QR=0, opcode 15, AA, TC, RD
    p[3] = 0xff; // RA, Z, AD, CD, rcode 15
    v.push(nasty(
        "all-flags",
        "QR=0 and every other header bit set (opcode 15)",
        p,
        NOTIMP,
    ));
    let mut p = query(next(), "a.test.", TYPE_A, None);
    p[3] = 0x7f; // Z, AD, CD, rcode 15
    v.push(nasty(
        "z-ad-cd-rcode-set",
        "Z, AD, CD and rcode 15 set in a standard query",
        p,
        NOERROR,
    ));
    let mut p = query(next(), "a.test.", TYPE_A, None);
    p[2] |= 0x02; // TC
    v.push(nasty("tc-in-query", "TC=1 in a query", p, NOERROR));

    // --- Questions no resolver should send.
    v.push(nasty(
        "qtype-any",
        "ANY (RFC 8482: one HINFO)",
        query(next(), "a.test.", TYPE_ANY, None),
        NOERROR,
    ));
    v.push(nasty(
        "qtype-any-consul",
        "ANY for a Consul service",
        query(next(), "web.service.consul.", TYPE_ANY, None),
        ANY,
    ));
    v.push(nasty(
        "qtype-axfr",
        "AXFR over UDP",
        query(next(), "test.", TYPE_AXFR, None),
        ANY,
    ));
    v.push(nasty(
        "qtype-opt",
        "a question of type OPT",
        query(next(), "a.test.", TYPE_OPT, None),
        ANY,
    ));
    v.push(nasty(
        "qtype-0",
        "a question of type 0",
        query(next(), "a.test.", 0, None),
        ANY,
    ));
    v.push(nasty(
        "qtype-65535",
        "a question of type 65535",
        query(next(), "a.test.", 65535, None),
        ANY,
    ));
    let mut p = header(next(), RD, 1, 0, 0, 0);
    p.extend(question(&wire_name("version.bind."), TYPE_TXT, CLASS_CH));
    v.push(nasty("qclass-chaos", "version.bind. CH TXT", p, ANY));
    let mut p = header(next(), RD, 1, 0, 0, 0);
    p.extend(question(&wire_name("web.service.consul."), TYPE_A, 0));
    v.push(nasty("qclass-0-consul", "a Consul name in class 0", p, ANY));
    let mut p = header(next(), RD, 1, 0, 0, 0);
    p.extend(question(&wire_name("web.service.consul."), TYPE_A, 254));
    v.push(nasty(
        "qclass-none-consul",
        "a Consul name in class NONE (254)",
        p,
        ANY,
    ));
    v.push(nasty(
        "ptr-garbage",
        "a PTR question for a malformed in-addr.arpa name",
        query(next(), "999.x.in-addr.arpa.", TYPE_PTR, None),
        ANY,
    ));
    v.push(nasty(
        "consul-addr-garbage",
        "an addr.consul name that is not hex",
        query(next(), "zzzzzzzz.addr.dc1.consul.", TYPE_A, None),
        ANY,
    ));
    v.push(nasty(
        "consul-addr-long",
        "an addr.consul name with 40 hex digits",
        query(
            next(),
            "0123456789abcdef0123456789abcdef01234567.addr.dc1.consul.",
            TYPE_AAAA,
            None,
        ),
        ANY,
    ));
    v.push(nasty(
        "consul-query-garbage",
        "a prepared-query name with binary-ish labels",
        query(next(), "_._.query.consul.", TYPE_SRV, None),
        ANY,
    ));
    v.push(nasty(
        "consul-srv-three-underscores",
        "_a._b._c.service.consul SRV",
        query(next(), "_a._b._c.service.consul.", TYPE_SRV, None),
        ANY,
    ));
    v.push(nasty(
        "consul-apex-any",
        "ANY at the consul. apex",
        query(next(), "consul.", TYPE_ANY, None),
        ANY,
    ));
    v.push(nasty(
        "consul-dc-long",
        "a service in a datacenter named by a 63-byte label",
        query(
            next(),
            &format!("web.service.{long63}.consul."),
            TYPE_A,
            None,
        ),
        ANY,
    ));

    // --- Well-formed controls (must get ordinary answers).
    v.push(nasty(
        "control-a",
        "a plain query for a.test.",
        query(next(), "a.test.", TYPE_A, None),
        NOERROR,
    ));
    v.push(nasty(
        "control-consul",
        "a plain query for web.service.consul.",
        query(next(), "web.service.consul.", TYPE_A, None),
        NOERROR,
    ));

    // --- Found by fuzzing (appended, so the IDs above never change).
    let mut p = header(next(), RD, 40, 0, 0, 0);
    for i in 0..40 {
        p.extend(question(
            &wire_name(&format!("question-number-{i:02}.test.")),
            TYPE_A,
            CLASS_IN,
        ));
    }
    v.push(nasty(
        "qdcount-40",
        "40 real questions (1.1 KB): the FORMERR must still fit in 512 bytes over UDP",
        p,
        FORMERR,
    ));
    v
}

/// The corpus directory, `tests/corpus/packets`.
pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/packets")
}

/// Every packet to replay: the hand-crafted ones, plus any other `.bin` file in the corpus
/// directory (fuzzing finds, added by hand), judged by [`Expect::from_bytes`].
pub fn replay_set() -> Vec<(String, Vec<u8>, Expect)> {
    let mut out: Vec<(String, Vec<u8>, Expect)> = corpus()
        .into_iter()
        .map(|n| (n.name.to_owned(), n.bytes, n.expect))
        .collect();
    let known: Vec<String> = out.iter().map(|(n, _, _)| n.clone()).collect();
    if let Ok(entries) = std::fs::read_dir(corpus_dir()) {
        let mut extra: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "bin"))
            .collect();
        extra.sort();
        for path in extra {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if known.contains(&stem) {
                continue;
            }
            if let Ok(bytes) = std::fs::read(&path) {
                let expect = Expect::from_bytes(&bytes);
                out.push((stem, bytes, expect));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Seeds and mutations.

/// Well-formed queries of many shapes: the starting points for mutation.
pub fn seeds() -> Vec<Vec<u8>> {
    let names_types: &[(&str, u16)] = &[
        ("a.test.", TYPE_A),
        ("two.test.", TYPE_A),
        ("v6.test.", TYPE_AAAA),
        ("www.test.", TYPE_A),
        ("txt.test.", TYPE_TXT),
        ("big.test.", TYPE_A),
        ("nxdomain.test.", TYPE_A),
        ("test.", TYPE_SOA),
        ("web.service.consul.", TYPE_A),
        ("v1.web.service.consul.", TYPE_A),
        ("_web._tcp.service.consul.", TYPE_SRV),
        ("web.service.dc1.consul.", TYPE_SRV),
        ("node-1.node.consul.", TYPE_A),
        ("nosuch.service.consul.", TYPE_A),
        ("7f000001.addr.dc1.consul.", TYPE_A),
        ("q.query.consul.", TYPE_A),
        ("consul.", TYPE_SOA),
        ("web.service.consul.", TYPE_TXT),
        ("web.service.consul.", TYPE_ANY),
    ];
    let mut out = Vec::new();
    for (i, (n, t)) in names_types.iter().enumerate() {
        let id = 0x1000 + i as u16;
        out.push(query(id, n, *t, None));
        out.push(query(id, n, *t, Some(opt(1232, 0, &[]))));
    }
    out.push(query(
        0x2000,
        "a.test.",
        TYPE_A,
        Some(opt(
            4096,
            0,
            &edns_options(&[
                (10, b"01234567"),
                (8, &[0, 1, 24, 0, 192, 0, 2]),
                (12, &[0; 16]),
            ]),
        )),
    ));
    out
}

/// Bytes worth writing over anything: label-length edges, pointer bits, all-ones.
const INTERESTING: &[u8] = &[
    0,
    1,
    0x3f,
    0x40,
    0x7f,
    0x80,
    0xbf,
    0xc0,
    0xc0 | 0x3f,
    0xff,
    12,
];

/// Offsets of the length bytes of the labels of the name starting at `at` (stops at a pointer,
/// the root or the end), and the offset right after the name.
fn label_offsets(p: &[u8], mut at: usize) -> (Vec<usize>, usize) {
    let mut offs = Vec::new();
    while at < p.len() && offs.len() < 128 {
        let len = p[at];
        if len == 0 {
            return (offs, at + 1);
        }
        if len & 0xc0 != 0 {
            offs.push(at);
            return (offs, at + 2);
        }
        offs.push(at);
        at += 1 + usize::from(len);
    }
    (offs, at)
}

/// One random mutation of `p`, DNS-aware where it helps.
pub fn mutate_once(rng: &mut impl Rng, p: &mut Vec<u8>, others: &[Vec<u8>]) {
    match rng.random_range(0..14) {
        // Flip one bit.
        0 | 1 if !p.is_empty() => {
            let i = rng.random_range(0..p.len());
            p[i] ^= 1 << rng.random_range(0..8);
        }
        // An interesting byte anywhere.
        2 if !p.is_empty() => {
            let i = rng.random_range(0..p.len());
            p[i] = INTERESTING[rng.random_range(0..INTERESTING.len())];
        }
        // Truncate.
        3 if !p.is_empty() => {
            let n = rng.random_range(0..p.len());
            p.truncate(n);
        }
        // A count field lies.
        4 if p.len() >= 12 => {
            let field = 4 + 2 * rng.random_range(0..4);
            let v: u16 = match rng.random_range(0..5) {
                0 => 0,
                1 => 1,
                2 => 2,
                3 => 0xffff,
                _ => rng.random(),
            };
            p[field..field + 2].copy_from_slice(&v.to_be_bytes());
        }
        // A label length byte changed.
        5 | 6 if p.len() > 12 => {
            let (offs, _) = label_offsets(p, 12);
            if let Some(&at) = offs.get(rng.random_range(0..offs.len().max(1))) {
                p[at] = match rng.random_range(0..3) {
                    0 => INTERESTING[rng.random_range(0..INTERESTING.len())],
                    1 => p[at].wrapping_add(rng.random_range(1..4)),
                    _ => rng.random(),
                };
            }
        }
        // A compression pointer inserted where a label starts (or anywhere).
        7 | 8 if p.len() > 12 => {
            let (offs, _) = label_offsets(p, 12);
            let at = match offs.get(rng.random_range(0..offs.len().max(1))) {
                Some(&at) if rng.random_bool(0.8) => at,
                _ => rng.random_range(12..p.len()),
            };
            let target: u16 = match rng.random_range(0..4) {
                0 => at as u16,                   // itself: a loop
                1 => 12,                          // the question
                2 => rng.random_range(0..12),     // the header
                _ => rng.random_range(0..0x3fff), // anywhere, mostly past the end
            };
            let ptr = (0xc000 | (target & 0x3fff)).to_be_bytes();
            if rng.random_bool(0.5) && at + 2 <= p.len() {
                p[at..at + 2].copy_from_slice(&ptr);
            } else {
                p.splice(at..at, ptr);
            }
        }
        // Random bytes inserted.
        9 => {
            let at = rng.random_range(0..=p.len());
            let n = rng.random_range(1..16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            p.splice(at..at, bytes);
        }
        // A range deleted.
        10 if p.len() > 1 => {
            let a = rng.random_range(0..p.len());
            let b = rng.random_range(a..=p.len().min(a + 16));
            p.drain(a..b);
        }
        // Header flags: QR, opcode, rcode, the rest.
        11 if p.len() >= 4 => {
            let i = 2 + rng.random_range(0..2);
            p[i] = rng.random();
            if rng.random_bool(0.7) {
                p[2] &= 0x7f; // keep QR=0 mostly: those must be answered
            }
        }
        // Splice the tail of another packet.
        12 if !others.is_empty() => {
            let o = &others[rng.random_range(0..others.len())];
            let cut = rng.random_range(0..=p.len());
            let from = rng.random_range(0..=o.len());
            p.truncate(cut);
            p.extend_from_slice(&o[from..]);
        }
        // An extra record appended (an OPT or garbage) with arcount bumped.
        _ if p.len() >= 12 => {
            let extra = match rng.random_range(0..3) {
                0 => opt(rng.random(), rng.random_range(0..2), &[]),
                1 => opt(
                    1232,
                    0,
                    &edns_options(&[(rng.random(), &[rng.random(); 5])]),
                ),
                _ => (0..rng.random_range(1..12)).map(|_| rng.random()).collect(),
            };
            p.extend(extra);
            let ar = u16::from_be_bytes([p[10], p[11]]).wrapping_add(1);
            p[10..12].copy_from_slice(&ar.to_be_bytes());
        }
        _ => {
            p.push(rng.random());
        }
    }
    // Keep within what one TCP message can carry.
    p.truncate(65_535);
}

/// 1 to 4 mutations of a random seed (or corpus packet), or now and then pure random bytes.
pub fn mutant(rng: &mut impl Rng, pool: &[Vec<u8>]) -> Vec<u8> {
    if rng.random_ratio(1, 20) {
        let n = rng.random_range(0..64);
        let mut p: Vec<u8> = (0..n).map(|_| rng.random()).collect();
        if p.len() > 2 && rng.random_bool(0.8) {
            p[2] &= 0x7f;
        }
        return p;
    }
    let mut p = pool[rng.random_range(0..pool.len())].clone();
    for _ in 0..rng.random_range(1..=4) {
        mutate_once(rng, &mut p, pool);
    }
    p
}

// ---------------------------------------------------------------------------------------------
// The oracle.

pub fn hex(p: &[u8]) -> String {
    p.iter().map(|b| format!("{b:02x}")).collect()
}

/// Judges the handler's reply to `req` (from a client that is `allowed`). Err explains what is
/// wrong.
pub fn check_reply(
    req: &[u8],
    reply: Option<&[u8]>,
    transport: Transport,
    allowed: bool,
) -> Result<(), String> {
    let reply = match (Expect::from_bytes(req), reply) {
        (Expect::Drop(why), None) => {
            let _ = why;
            return Ok(());
        }
        (Expect::Drop(why), Some(r)) => {
            return Err(format!(
                "a reply ({} bytes) to a packet that must be dropped ({why})",
                r.len()
            ))
        }
        (Expect::Reply(_), None) => {
            return Err("no reply to a packet with a header and QR=0".into())
        }
        (Expect::Reply(_), Some(r)) => r,
    };
    let msg = Message::from_vec(reply).map_err(|e| format!("the reply does not parse: {e}"))?;
    let id = u16::from_be_bytes([req[0], req[1]]);
    if msg.metadata.id != id {
        return Err(format!("reply ID {} for request ID {id}", msg.metadata.id));
    }
    if msg.metadata.message_type != MessageType::Response {
        return Err("the reply has QR=0".into());
    }
    if reply[3] & 0x80 == 0 || reply[3] & 0x60 != 0 {
        return Err(format!(
            "reply flags RA/Z/AD wrong: byte 3 = {:#04x}",
            reply[3]
        ));
    }
    let request = Message::from_vec(req);
    let limit = match (transport, &request) {
        (Transport::Tcp, _) => 65_535,
        (Transport::Udp, Ok(r)) if r.edns.is_some() => 1232,
        (Transport::Udp, _) => 512,
    };
    if reply.len() > limit {
        return Err(format!(
            "a {}-byte reply over the {limit}-byte limit",
            reply.len()
        ));
    }
    let rcode = msg.metadata.response_code;
    let request = match request {
        Err(_) => {
            let want = if allowed {
                ResponseCode::FormErr
            } else {
                ResponseCode::Refused
            };
            if rcode != want {
                return Err(format!("{rcode} for an unparseable request (want {want})"));
            }
            return Ok(());
        }
        Ok(r) => r,
    };
    if !allowed {
        return if rcode == ResponseCode::Refused {
            Ok(())
        } else {
            Err(format!("{rcode} for a client outside server.allow"))
        };
    }
    let want = if request.metadata.op_code != OpCode::Query {
        Some(ResponseCode::NotImp)
    } else if request.queries.len() != 1 {
        Some(ResponseCode::FormErr)
    } else if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
        Some(ResponseCode::BADVERS)
    } else {
        None
    };
    if let Some(want) = want {
        if !rcode_is(rcode, want) {
            return Err(format!("{rcode}, want {want}"));
        }
    }
    if msg.edns.is_some() != request.edns.is_some() {
        return Err(format!(
            "OPT in reply: {}, in request: {}",
            msg.edns.is_some(),
            request.edns.is_some()
        ));
    }
    if request.queries.len() == 1 && !msg.metadata.truncation {
        let echoed = msg
            .queries
            .first()
            .map(|q| (q.name().to_ascii(), q.query_type(), q.query_class()));
        let asked = request
            .queries
            .first()
            .map(|q| (q.name().to_ascii(), q.query_type(), q.query_class()));
        if echoed != asked {
            return Err(format!("question echoed as {echoed:?}, asked {asked:?}"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The handler, in-process.

/// A handler as `run` builds it: forwarding to `upstream` (none: every forwarded name fails at
/// once with SERVFAIL), Consul names from the demo catalog through a `FileBackend`. Clients in
/// 127.0.0.0/8 are allowed.
pub fn in_process_handler(
    upstream: Option<std::net::SocketAddr>,
    upstream_timeout: Duration,
) -> (Handler, prometheus::Registry) {
    let backend =
        FileBackend::from_text(DEMO_CATALOG, "demo-catalog.json", None).expect("demo catalog");
    handler_with_catalog(upstream, upstream_timeout, backend)
}

/// [`in_process_handler`] with Consul names from `backend`.
pub fn handler_with_catalog(
    upstream: Option<std::net::SocketAddr>,
    upstream_timeout: Duration,
    backend: FileBackend,
) -> (Handler, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry).expect("metrics register");
    let mut config = Config::default();
    config.upstream.servers = upstream.into_iter().collect();
    config.upstream.timeout = upstream_timeout;
    let forwarder = Arc::new(Forwarder::from_config(&config, &metrics));
    let consul = ConsulSource::new(Arc::new(backend), &config.consul, forwarder.clone());
    let routes = Routes {
        allow: vec!["127.0.0.0/8".parse().expect("net")],
        consul: Some(ConsulRoute::new(
            config.consul.domains.clone(),
            Arc::new(consul),
        )),
        forwarder,
        log_queries: false,
        rate_limit: None,
    };
    (Handler::new(routes, metrics), registry)
}

pub const ALLOWED_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Outside `127.0.0.0/8`: gets REFUSED (TEST-NET-1, never contacted: it is only a label).
pub const REFUSED_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99));

/// Rcodes compared as numbers: BADVERS and BADSIG are both 16, and hickory decodes 16 as BADSIG.
pub fn rcode_is(got: ResponseCode, want: ResponseCode) -> bool {
    u16::from(got) == u16::from(want)
}
