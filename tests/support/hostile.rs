//! Hostile DNS input: a hand-written packet builder (independent of hickory's encoder, so it can
//! write what no encoder would), the corpus of nasty packets kept as files in
//! `tests/corpus/packets/` with their expectations in the manifest there, a DNS-aware mutator, and
//! the oracle that judges a reply from the handler.
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
pub const TYPE_SOA: u16 = 6;
pub const TYPE_TXT: u16 = 16;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_SRV: u16 = 33;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_ANY: u16 = 255;
pub const CLASS_IN: u16 = 1;

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
// The corpus: the files in `tests/corpus/packets/`, and their manifest, the table in its INDEX.md.

/// What the server must do with a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// No reply, one drop counted with this reason.
    Drop(String),
    /// A reply with the request's ID: this rcode, or any rcode when `None`.
    Reply(Option<ResponseCode>),
}

impl Expect {
    /// The rule for any packet: shorter than a header or a response (QR=1): a counted drop;
    /// otherwise a reply.
    pub fn from_bytes(p: &[u8]) -> Expect {
        if p.len() < 12 {
            Expect::Drop("short".to_owned())
        } else if p[2] & 0x80 != 0 {
            Expect::Drop("response".to_owned())
        } else {
            Expect::Reply(None)
        }
    }

    /// The manifest's form: `drop:REASON`, `reply:RCODE` (`NOERROR`, `FORMERR`, `SERVFAIL`,
    /// `NXDOMAIN`, `NOTIMP`, `REFUSED` or `BADVERS`) or `reply:any`.
    pub fn parse(text: &str) -> Result<Expect, String> {
        match text.split_once(':') {
            Some(("drop", reason)) if !reason.is_empty() => Ok(Expect::Drop(reason.to_owned())),
            Some(("reply", "any")) => Ok(Expect::Reply(None)),
            Some(("reply", name)) => {
                let rcode = match name {
                    "NOERROR" => ResponseCode::NoError,
                    "FORMERR" => ResponseCode::FormErr,
                    "SERVFAIL" => ResponseCode::ServFail,
                    "NXDOMAIN" => ResponseCode::NXDomain,
                    "NOTIMP" => ResponseCode::NotImp,
                    "REFUSED" => ResponseCode::Refused,
                    "BADVERS" => ResponseCode::BADVERS,
                    _ => return Err(format!("unknown rcode {name:?} in {text:?}")),
                };
                Ok(Expect::Reply(Some(rcode)))
            }
            _ => Err(format!(
                "{text:?} is not drop:REASON, reply:RCODE or reply:any"
            )),
        }
    }
}

/// One packet of the corpus: a file and its row in the manifest.
pub struct CorpusPacket {
    /// File name without `.bin`.
    pub name: String,
    pub what: String,
    /// The size the manifest gives.
    pub listed_size: usize,
    pub bytes: Vec<u8>,
    pub expect: Expect,
}

/// The corpus directory, `tests/corpus/packets`.
pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/packets")
}

/// The manifest, `INDEX.md` in the corpus directory: a table with the columns file, bytes,
/// expect, what.
pub fn manifest_path() -> PathBuf {
    corpus_dir().join("INDEX.md")
}

/// One manifest row, `| `NAME.bin` | SIZE | EXPECT | WHAT |`: (NAME, SIZE, EXPECT, WHAT).
fn manifest_row(line: &str) -> Result<(String, usize, Expect, String), String> {
    let cells: Vec<&str> = line
        .trim()
        .trim_matches('|')
        .splitn(4, '|')
        .map(str::trim)
        .collect();
    let [file, size, expect, what] = cells[..] else {
        return Err("not four cells: file, bytes, expect, what".to_owned());
    };
    let name = file
        .strip_prefix('`')
        .and_then(|f| f.strip_suffix(".bin`"))
        .ok_or_else(|| format!("file {file:?} is not `NAME.bin`"))?;
    let size = size.parse().map_err(|e| format!("bytes {size:?}: {e}"))?;
    Ok((
        name.to_owned(),
        size,
        Expect::parse(expect)?,
        what.to_owned(),
    ))
}

/// Every packet the manifest lists, read from its file, in the manifest's order (the order
/// matters: the mutation tests draw from this list with fixed seeds). Panics, naming the line,
/// on a row it cannot read or a file that is not there.
pub fn corpus() -> Vec<CorpusPacket> {
    let path = manifest_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let rows = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with('|') && !l.starts_with("| file ") && !l.starts_with("|-"));
    rows.map(|(i, line)| {
        let (name, listed_size, expect, what) =
            manifest_row(line).unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), i + 1));
        let file = corpus_dir().join(format!("{name}.bin"));
        let bytes = std::fs::read(&file)
            .unwrap_or_else(|e| panic!("{}:{}: {}: {e}", path.display(), i + 1, file.display()));
        CorpusPacket {
            name,
            what,
            listed_size,
            bytes,
            expect,
        }
    })
    .collect()
}

/// Every packet to replay: the listed ones, plus any other `.bin` file in the corpus directory
/// (fuzzing finds, added without a row), judged by [`Expect::from_bytes`].
pub fn replay_set() -> Vec<(String, Vec<u8>, Expect)> {
    let mut out: Vec<(String, Vec<u8>, Expect)> = corpus()
        .into_iter()
        .map(|n| (n.name, n.bytes, n.expect))
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
