//! The agent-style DNS port: answers `*.consul.` the way a Consul agent with
//! default configuration does (classic `agent/dns.go`, summarised in
//! `/work/shared/notes/consul-dns.md`), so tests can compare the project's
//! answers with Consul's own.
//!
//! Default-config behaviour reproduced on purpose, including the parts the
//! project improves on: every TTL is 0, SOA minimum is 0, RA is 0 (no recursors
//! configured), names under `arpa.` get Consul's PTR answers (NXDOMAIN for an address it does
//! not know), other names outside the domain are REFUSED, and an oversized UDP
//! reply is trimmed *silently* (answers dropped until it fits 512 bytes, or the
//! client's EDNS size, with TC left clear: `enable_truncate = false`).
//!
//! SOA and NS are answered for every name in the domain, the nameservers being
//! up to three healthy Consul servers (`ConsulSim::add_server`) with their
//! addresses; AXFR gets NOTIMP; `<hex>.addr` asked with another type has its
//! record in the additional section; prepared queries answer in the order
//! `execute` gave (no second shuffle). Tagged addresses choose the address as
//! Consul does (`lan_ipv6` for AAAA, `lan_ipv4` for A).
//!
//! `connect` and `ingress` answer the local Connect instances and ingress gateways like a
//! service (the last label before the kind is the service, a peer label is ignored);
//! `virtual` the service's virtual IP as one A record, NOERROR without records when it has
//! none; `_q._tcp.query` is the prepared query `q`.
//!
//! Simplifications: no recursion (hostname addresses give a CNAME only), no cluster peers,
//! namespaces or partitions (`.peer`, `.ns`, `.ap` are NXDOMAIN), only `dc1` is
//! answered (no WAN translation). Consul's default `udp_answer_limit` (3) is off
//! unless enabled with `ConsulSim::set_dns_udp_answer_limit`.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use rand::seq::SliceRandom;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

use super::http::parse_go_duration;
use super::state::{dc_of, node_addresses, Instance, Scope, State};
use super::{Inner, Status, DATACENTER};

const DOMAIN: &str = "consul.";
/// Consul caps `udp_answer_limit` at this (`maxUDPAnswerLimit`).
const MAX_UDP_ANSWER_LIMIT: usize = 8;

pub(super) async fn serve_udp(inner: Arc<Inner>, sock: UdpSocket, cancel: CancellationToken) {
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                // ICMP errors from earlier replies surface here; keep serving.
                Err(_) => continue,
            },
        };
        if let Some(reply) = answer(&inner, &buf[..n], true) {
            let _ = sock.send_to(&reply, peer).await;
        }
    }
}

pub(super) async fn serve_tcp(inner: Arc<Inner>, listener: TcpListener, cancel: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let inner = inner.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tcp_conn(&inner, stream) => {}
            }
        });
    }
}

/// RFC 1035 §4.2.2 framing; several queries per connection, answered in order.
async fn tcp_conn(inner: &Inner, mut stream: TcpStream) {
    loop {
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).await.is_err() {
            return;
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut msg).await.is_err() {
            return;
        }
        if let Some(reply) = answer(inner, &msg, false) {
            let Ok(n) = u16::try_from(reply.len()) else {
                return;
            };
            let mut out = n.to_be_bytes().to_vec();
            out.extend_from_slice(&reply);
            if stream.write_all(&out).await.is_err() {
                return;
            }
        }
    }
}

/// Builds the wire reply to one message, or `None` to stay silent (garbage, or
/// a response sent to us).
fn answer(inner: &Inner, packet: &[u8], udp: bool) -> Option<Vec<u8>> {
    let req = Message::from_vec(packet).ok()?;
    if req.metadata.message_type != MessageType::Query {
        return None;
    }
    inner.stats.dns_queries.fetch_add(1, Ordering::SeqCst);

    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    // Copies ID, opcode, RD and CD like miekg/dns's SetReply; RA stays 0.
    resp.metadata = Metadata::response_from_request(&req.metadata);
    resp.queries = req.queries.clone();
    if let Some(e) = &req.edns {
        // Consul echoes an OPT record with the client's size.
        let mut out = Edns::new();
        out.set_max_payload(e.max_payload().max(512));
        resp.edns = Some(out);
    }
    if req.metadata.op_code != OpCode::Query {
        resp.metadata.response_code = ResponseCode::NotImp;
    } else if req.queries.len() != 1 {
        resp.metadata.response_code = ResponseCode::FormErr;
    } else {
        resolve(&inner.state(), &req.queries[0], &mut resp);
    }

    if udp {
        let size = req.edns.as_ref().map_or(512, |e| e.max_payload().max(512));
        let limit = inner.udp_answer_limit.load(Ordering::SeqCst);
        if size == 512 && limit > 0 {
            let limit = limit.min(MAX_UDP_ANSWER_LIMIT);
            if resp.answers.len() > limit {
                resp.answers.truncate(limit);
                sync_additionals(&mut resp);
            }
        }
        trim_to(&mut resp, usize::from(size));
    } else {
        trim_to(&mut resp, usize::from(u16::MAX));
    }
    resp.to_vec().ok()
}

enum Lookup {
    NxDomain,
    /// Answers and additionals; no answers = NODATA.
    Found(Vec<Record>, Vec<Record>),
    /// NOERROR with only additional records, no SOA (`.addr` asked with another type).
    Extra(Vec<Record>),
}

fn resolve(st: &State, q: &Query, resp: &mut Message) {
    let qname = q.name().clone();
    let labels: Vec<String> = qname
        .iter()
        .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
        .collect();
    if labels.last().map(String::as_str) == Some("arpa") {
        ptr(st, q, resp);
        return;
    }
    if labels.last().map(String::as_str) != Some("consul") {
        // No recursors configured: Consul's mux has no handler for ".".
        resp.metadata.response_code = ResponseCode::Refused;
        return;
    }
    resp.metadata.authoritative = true;
    let qtype = q.query_type();
    match qtype {
        RecordType::SOA => {
            let (ns, glue) = nameservers(st);
            resp.answers.push(soa());
            resp.authorities = ns;
            resp.additionals = glue;
            return;
        }
        RecordType::NS => {
            let (ns, glue) = nameservers(st);
            resp.answers = ns;
            resp.additionals = glue;
            return;
        }
        RecordType::AXFR => {
            resp.metadata.response_code = ResponseCode::NotImp;
            return;
        }
        _ => {}
    }
    match lookup(st, &qname, &labels[..labels.len() - 1], qtype) {
        Lookup::NxDomain => {
            resp.metadata.response_code = ResponseCode::NXDomain;
            resp.authorities.push(soa());
        }
        Lookup::Found(answers, additionals) => {
            if answers.is_empty() {
                resp.authorities.push(soa());
            } else {
                resp.answers = answers;
                resp.additionals = additionals;
            }
        }
        Lookup::Extra(additionals) => resp.additionals = additionals,
    }
}

/// Consul's `getNameserversAndNodeRecord`: up to three healthy servers, shuffled,
/// those whose name has anything but letters, digits and `-` skipped, as
/// `<node>.node.dc1.consul.` NS records owned by the domain, their addresses as
/// glue (TTL 0, the default `node_ttl`).
fn nameservers(st: &State) -> (Vec<Record>, Vec<Record>) {
    let mut servers = st.healthy_instances(DATACENTER, "consul", None);
    servers.shuffle(&mut rand::rng());
    let mut ns = Vec::new();
    let mut glue = Vec::new();
    let domain = Name::from_ascii(DOMAIN).expect("static name");
    for s in servers {
        let name = &s.node.node.name;
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            continue;
        }
        let Ok(target) = Name::from_ascii(format!(
            "{}.node.{DATACENTER}.{DOMAIN}",
            name.to_ascii_lowercase()
        )) else {
            continue;
        };
        if let Ok(ip) = s.node.node.address.parse::<IpAddr>() {
            glue.push(ip_record(&target, ip, 0));
        }
        ns.push(Record::from_rdata(domain.clone(), 0, RData::NS(NS(target))));
        if ns.len() == 3 {
            break;
        }
    }
    (ns, glue)
}

/// `labels`: the question name without the domain, lowercased.
fn lookup(st: &State, qname: &Name, labels: &[String], qtype: RecordType) -> Lookup {
    // Right to left, the first kind label wins; for SRV an `_label` counts as
    // `service` (RFC 2782 names without the `.service` part).
    let mut found = None;
    for i in (0..labels.len()).rev() {
        match labels[i].as_str() {
            k @ ("service" | "connect" | "ingress" | "virtual" | "node" | "query" | "addr") => {
                found = Some((k, &labels[..i], &labels[i + 1..]));
                break;
            }
            l if qtype == RecordType::SRV && l.starts_with('_') => {
                found = Some(("service", &labels[..=i], &labels[i + 1..]));
                break;
            }
            _ => {}
        }
    }
    let Some((kind, parts, suffix)) = found else {
        return Lookup::NxDomain;
    };
    let dc_ok = match suffix {
        [] => true,
        [dc] => dc == DATACENTER,
        [dc, d] => d == "dc" && dc == DATACENTER,
        _ => false,
    };
    if !dc_ok || parts.is_empty() {
        return Lookup::NxDomain;
    }
    match kind {
        "service" => {
            let (service, tag) =
                if parts.len() == 2 && parts[0].starts_with('_') && parts[1].starts_with('_') {
                    // _name._tag; `_tcp` means "no tag".
                    let tag = &parts[1][1..];
                    (&parts[0][1..], (tag != "tcp").then(|| tag.to_string()))
                } else {
                    let n = parts.len();
                    (
                        parts[n - 1].as_str(),
                        (n > 1).then(|| parts[..n - 1].join(".")),
                    )
                };
            let mut insts = st.healthy_instances(DATACENTER, service, tag.as_deref());
            if insts.is_empty() {
                return Lookup::NxDomain;
            }
            insts.shuffle(&mut rand::rng());
            service_records(qname, insts, qtype, 0)
        }
        "connect" | "ingress" => {
            let service = &parts[parts.len() - 1];
            let local = Scope::default();
            let mut insts: Vec<Instance<'_>> = st
                .health_instances(kind, DATACENTER, service, &local)
                .into_iter()
                .filter(|i| i.worst() != Status::Critical)
                .collect();
            if insts.is_empty() {
                return Lookup::NxDomain;
            }
            insts.shuffle(&mut rand::rng());
            service_records(qname, insts, qtype, 0)
        }
        // Consul appends the A record whatever the question's type.
        "virtual" => match st
            .virtual_ips
            .get(&(String::new(), parts[parts.len() - 1].clone()))
        {
            Some(vip) => {
                let ip: IpAddr = vip.parse().expect("the simulator's virtual IPs are IPv4");
                Lookup::Found(vec![ip_record(qname, ip, 0)], Vec::new())
            }
            None => Lookup::Extra(Vec::new()),
        },
        "query" => {
            // `_geo._tcp.query`: the first and last labels start with `_`, the last one (the
            // protocol) is dropped and so is the first underscore.
            let name = match parts {
                [first, .., last] if first.starts_with('_') && last.starts_with('_') => {
                    parts[..parts.len() - 1].join(".")[1..].to_owned()
                }
                _ => parts.join("."),
            };
            let Some(q) = st.find_query(&name) else {
                return Lookup::NxDomain;
            };
            let ttl = q
                .dns_ttl
                .as_deref()
                .and_then(parse_go_duration)
                .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
            // The executed result as it comes: Consul's DNS does not shuffle it again.
            let insts = st.execute(q);
            if insts.is_empty() {
                return Lookup::NxDomain;
            }
            service_records(qname, insts, qtype, ttl)
        }
        "node" => node_records(st, qname, &parts.join("."), qtype),
        "addr" => addr_records(qname, parts, qtype),
        _ => Lookup::NxDomain,
    }
}

fn wants_v4(qtype: RecordType) -> bool {
    matches!(qtype, RecordType::A | RecordType::ANY)
}

fn wants_v6(qtype: RecordType) -> bool {
    matches!(qtype, RecordType::AAAA | RecordType::ANY)
}

/// Consul's address for a question (`translateAddressAccept` over an address and its
/// `lan_ipv4`, `lan_ipv6` tags): the IPv6 tag for AAAA and any other type but A, the IPv4 tag
/// for A and any other type but AAAA, else the address itself.
fn accepted(qtype: RecordType, [address, v4, v6]: [&str; 3]) -> &str {
    if qtype != RecordType::A && !v6.is_empty() {
        v6
    } else if qtype != RecordType::AAAA && !v4.is_empty() {
        v4
    } else {
        address
    }
}

/// The address a `qtype` question gets for an instance: the service's (translated), else the
/// node's; `true` when it is the node's.
fn address_for<'a>(i: &'a Instance<'_>, qtype: RecordType) -> (&'a str, bool) {
    match accepted(qtype, i.service_addresses()) {
        "" => (accepted(qtype, node_addresses(&i.node.node)), true),
        own => (own, false),
    }
}

fn ip_record(owner: &Name, ip: IpAddr, ttl: u32) -> Record {
    let data = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(owner.clone(), ttl, data)
}

fn fqdn(host: &str) -> Option<Name> {
    let s = if host.ends_with('.') {
        host.to_string()
    } else {
        format!("{host}.")
    };
    Name::from_ascii(s).ok()
}

/// A/AAAA/ANY and SRV answers for `insts`, in their order.
fn service_records(qname: &Name, insts: Vec<Instance<'_>>, qtype: RecordType, ttl: u32) -> Lookup {
    match qtype {
        RecordType::A | RecordType::AAAA | RecordType::ANY => {
            let mut answers = Vec::new();
            let mut seen = HashSet::new();
            let mut hosts: Vec<&str> = Vec::new();
            let mut any_ip = false;
            for i in &insts {
                let (addr, _) = address_for(i, qtype);
                match addr.parse::<IpAddr>() {
                    Ok(ip) => {
                        any_ip = true;
                        let wanted = match ip {
                            IpAddr::V4(_) => wants_v4(qtype),
                            IpAddr::V6(_) => wants_v6(qtype),
                        };
                        if wanted && seen.insert(ip) {
                            answers.push(ip_record(qname, ip, ttl));
                        }
                    }
                    Err(_) if !hosts.contains(&addr) => hosts.push(addr),
                    Err(_) => {}
                }
            }
            // Hostname instances only count when no instance has an IP.
            if !any_ip {
                for h in hosts {
                    if let Some(target) = fqdn(h) {
                        answers.push(Record::from_rdata(
                            qname.clone(),
                            ttl,
                            RData::CNAME(CNAME(target)),
                        ));
                    }
                }
            }
            Lookup::Found(answers, Vec::new())
        }
        RecordType::SRV => {
            let mut answers = Vec::new();
            let mut extra: Vec<Record> = Vec::new();
            let mut seen = HashSet::new();
            for i in &insts {
                let s = &i.svc.svc;
                if !seen.insert((&i.node.node.name, &s.address, s.port)) {
                    continue;
                }
                let weight = if i.worst() == Status::Warning {
                    s.weights.1
                } else {
                    s.weights.0
                };
                let weight = u16::try_from(weight).unwrap_or(u16::MAX);
                let Some((target, mut recs)) = srv_target(i, ttl) else {
                    continue;
                };
                // Node meta for every instance, owned by its node's name whatever the
                // target (`enable_additional_node_meta_txt`, on by default).
                if let Ok(owner) =
                    Name::from_ascii(format!("{}.node.{DATACENTER}.{DOMAIN}", i.node.node.name))
                {
                    recs.extend(meta_txt(&owner, &i.node.node.meta, ttl));
                }
                answers.push(Record::from_rdata(
                    qname.clone(),
                    ttl,
                    RData::SRV(SRV::new(1, weight, s.port, target)),
                ));
                for r in recs {
                    if !extra.contains(&r) {
                        extra.push(r);
                    }
                }
            }
            Lookup::Found(answers, extra)
        }
        _ => Lookup::Found(Vec::new(), Vec::new()),
    }
}

/// SRV target and its additional records: `<node>.node.dc1.consul.` for an
/// instance reached at its node's own address, `<hex>.addr.dc1.consul.` for one
/// reached at another IP (its own, or a tagged one: the IPv6 tag first), the
/// hostname itself otherwise (as Consul does).
fn srv_target(i: &Instance<'_>, ttl: u32) -> Option<(Name, Vec<Record>)> {
    let (addr, from_node) = address_for(i, RecordType::SRV);
    if from_node && addr == i.node.node.address {
        let node = &i.node.node;
        let target = Name::from_ascii(format!("{}.node.{DATACENTER}.{DOMAIN}", node.name)).ok()?;
        let mut recs = Vec::new();
        match node.address.parse::<IpAddr>() {
            Ok(ip) => recs.push(ip_record(&target, ip, ttl)),
            Err(_) => {
                if let Some(h) = fqdn(&node.address) {
                    recs.push(Record::from_rdata(
                        target.clone(),
                        ttl,
                        RData::CNAME(CNAME(h)),
                    ));
                }
            }
        }
        return Some((target, recs));
    }
    match addr.parse::<IpAddr>() {
        Ok(ip) => {
            let target =
                Name::from_ascii(format!("{}.addr.{DATACENTER}.{DOMAIN}", hex_ip(ip))).ok()?;
            let rec = ip_record(&target, ip, ttl);
            Some((target, vec![rec]))
        }
        Err(_) => Some((fqdn(addr)?, Vec::new())),
    }
}

fn hex_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.octets().iter().map(|b| format!("{b:02x}")).collect(),
        IpAddr::V6(v6) => v6.octets().iter().map(|b| format!("{b:02x}")).collect(),
    }
}

/// `<node>.node.consul`: catalog node, no health filter.
fn node_records(st: &State, qname: &Name, name: &str, qtype: RecordType) -> Lookup {
    let Some(n) = st
        .nodes
        .values()
        .find(|n| n.node.name.eq_ignore_ascii_case(name) && dc_of(&n.node) == DATACENTER)
    else {
        return Lookup::NxDomain;
    };
    let mut answers = Vec::new();
    match accepted(qtype, node_addresses(&n.node)).parse::<IpAddr>() {
        Ok(ip @ IpAddr::V4(_)) if wants_v4(qtype) => answers.push(ip_record(qname, ip, 0)),
        Ok(ip @ IpAddr::V6(_)) if wants_v6(qtype) => answers.push(ip_record(qname, ip, 0)),
        Err(_)
            if matches!(
                qtype,
                RecordType::A | RecordType::AAAA | RecordType::ANY | RecordType::CNAME
            ) =>
        {
            if let Some(h) = fqdn(&n.node.address) {
                answers.push(Record::from_rdata(qname.clone(), 0, RData::CNAME(CNAME(h))));
            }
        }
        _ => {}
    }
    let txt = meta_txt(qname, &n.node.meta, 0);
    if matches!(qtype, RecordType::TXT | RecordType::ANY) {
        answers.extend(txt);
        Lookup::Found(answers, Vec::new())
    } else if answers.is_empty() {
        Lookup::Found(answers, Vec::new())
    } else {
        Lookup::Found(answers, txt)
    }
}

/// `<hex>.addr.consul`: decoded locally (8 hex digits = IPv4, 32 = IPv6).
fn addr_records(qname: &Name, parts: &[String], qtype: RecordType) -> Lookup {
    let [hex] = parts else {
        return Lookup::NxDomain;
    };
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    let ip = match bytes.as_deref() {
        Some(&[a, b, c, d]) => IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
        Some(b) if b.len() == 16 => {
            let arr: [u8; 16] = b.try_into().expect("length checked");
            IpAddr::V6(Ipv6Addr::from(arr))
        }
        _ => return Lookup::NxDomain,
    };
    let wanted = match ip {
        IpAddr::V4(_) => wants_v4(qtype),
        IpAddr::V6(_) => wants_v6(qtype),
    };
    if wanted {
        Lookup::Found(vec![ip_record(qname, ip, 0)], Vec::new())
    } else {
        Lookup::Extra(vec![ip_record(qname, ip, 0)])
    }
}

/// Consul's `handlePtr`, for every question under `arpa.` whatever its type: the first node (in
/// name order) whose `Address` is the name's address answers `<node>.node.dc1.consul.`, else
/// the first instance (by node, then ID) whose own `Address` is that address written as Go
/// writes it answers `<service>.service.dc1.consul.`; TTL 0, AA. Anything else is NXDOMAIN with
/// the SOA (no recursors configured).
fn ptr(st: &State, q: &Query, resp: &mut Message) {
    resp.metadata.authoritative = true;
    let target = ip_from_arpa(q.name()).and_then(|ip| {
        let mut nodes: Vec<_> = st.nodes.values().collect();
        nodes.sort_by_key(|n| n.node.name.to_ascii_lowercase());
        let node = nodes
            .into_iter()
            .find(|n| n.node.address.parse::<IpAddr>() == Ok(ip))
            .map(|n| format!("{}.node.{DATACENTER}.{DOMAIN}", n.node.name));
        node.or_else(|| {
            let mut services: Vec<_> = st.services.values().collect();
            services.sort_by(|a, b| (&a.svc.node, &a.svc.id).cmp(&(&b.svc.node, &b.svc.id)));
            services
                .into_iter()
                .find(|s| s.svc.address == ip.to_string())
                .map(|s| format!("{}.service.{DATACENTER}.{DOMAIN}", s.svc.service))
        })
    });
    match target.and_then(|t| Name::from_ascii(t).ok()) {
        Some(target) => resp.answers.push(Record::from_rdata(
            q.name().clone(),
            0,
            RData::PTR(PTR(target)),
        )),
        None => {
            resp.metadata.response_code = ResponseCode::NXDomain;
            resp.authorities.push(soa());
        }
    }
}

/// Consul's `dnsutil.IPFromARPA`: 4 labels under `in-addr.arpa.` joined back into an IPv4
/// address, or 32 under `ip6.arpa.` joined four by four into an IPv6 one; anything else is no
/// address.
fn ip_from_arpa(name: &Name) -> Option<IpAddr> {
    let labels: Vec<String> = name
        .iter()
        .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
        .collect();
    let (zone, parts) = match labels.as_slice() {
        [parts @ .., zone, arpa] if arpa == "arpa" => (zone.as_str(), parts),
        _ => return None,
    };
    let mut parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    parts.reverse();
    match (zone, parts.len()) {
        ("in-addr", 4) => parts.join(".").parse::<Ipv4Addr>().ok().map(IpAddr::V4),
        ("ip6", 32) => {
            let words: Vec<String> = parts.chunks(4).map(|w| w.concat()).collect();
            words.join(":").parse::<Ipv6Addr>().ok().map(IpAddr::V6)
        }
        _ => None,
    }
}

/// Node meta as TXT: `key=value` with RFC 1464 backtick escaping of the key;
/// keys starting with `rfc1035-` give the bare value.
fn meta_txt(
    owner: &Name,
    meta: &std::collections::BTreeMap<String, String>,
    ttl: u32,
) -> Vec<Record> {
    meta.iter()
        .map(|(k, v)| {
            let s = if k
                .get(..8)
                .is_some_and(|p| p.eq_ignore_ascii_case("rfc1035-"))
            {
                v.clone()
            } else {
                format!("{}={}", rfc1464_key(k), v.replace('`', "``"))
            };
            Record::from_rdata(owner.clone(), ttl, RData::TXT(TXT::new(vec![s])))
        })
        .collect()
}

fn rfc1464_key(k: &str) -> String {
    let k = k.replace('`', "``").replace('=', "`=");
    let lead = k.len() - k.trim_start_matches(' ').len();
    let trail = k.len() - k.trim_end_matches(' ').len();
    if lead == k.len() {
        return "` ".repeat(lead);
    }
    format!(
        "{}{}{}",
        "` ".repeat(lead),
        &k[lead..k.len() - trail],
        "` ".repeat(trail)
    )
}

/// The SOA Consul puts in NXDOMAIN/NODATA authority sections (and answers for
/// SOA questions); minimum 0 is Consul's `soa.min_ttl` default.
fn soa() -> Record {
    let serial = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as u32);
    let name = |s: &str| Name::from_ascii(s).expect("static name");
    Record::from_rdata(
        name(DOMAIN),
        0,
        RData::SOA(SOA::new(
            name("ns.consul."),
            name("hostmaster.consul."),
            serial,
            3600,
            600,
            86400,
            0,
        )),
    )
}

fn encoded_len(m: &Message) -> usize {
    m.to_vec().map_or(usize::MAX, |v| v.len())
}

/// Consul's `trimUDPResponse` without `enable_truncate`: drop answers from the
/// end until the reply fits, keep only additionals still referenced, never set
/// TC. (A client therefore silently sees fewer instances.) Like Consul's
/// `dnsBinaryTruncate`, the number of answers kept is found by binary search:
/// one encode per step, not one per dropped record (a 5,000-instance answer
/// took seconds the other way).
fn trim_to(resp: &mut Message, max: usize) {
    if encoded_len(resp) <= max {
        return;
    }
    let answers = std::mem::take(&mut resp.answers);
    let additionals = std::mem::take(&mut resp.additionals);
    let fits = |n: usize, resp: &mut Message| {
        resp.answers = answers[..n].to_vec();
        resp.additionals = additionals.clone();
        sync_additionals(resp);
        encoded_len(resp) <= max
    };
    // Largest n in [0, len) that fits (the whole answer did not).
    let (mut lo, mut hi) = (0usize, answers.len().saturating_sub(1));
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fits(mid, resp) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    fits(lo, resp);
}

/// Keeps only additionals whose owner is an answer owner or an SRV target of a
/// remaining answer (Consul's `syncExtra`).
fn sync_additionals(resp: &mut Message) {
    let mut keep: HashSet<Name> = HashSet::new();
    for r in &resp.answers {
        keep.insert(r.name.to_lowercase());
        if let RData::SRV(srv) = &r.data {
            keep.insert(srv.target.to_lowercase());
        }
    }
    resp.additionals
        .retain(|r| keep.contains(&r.name.to_lowercase()));
}
