//! Records from Consul views, as pure functions: which instances are served, A/AAAA/ANY/SRV/TXT
//! answers, SRV targets and their additional records, SOA and NS for the domain. The caller
//! shuffles; these functions keep the order they are given.

use std::collections::HashSet;
use std::net::IpAddr;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use std::sync::Arc;

use rand::Rng;

use super::catalog::{Instance, NodeView, Selection, SelectionKey, ServiceView, Target};
use super::name::encode_hex_ip;
use crate::answer::Answer;
use crate::config::WhenNoneHealthy;

/// SOA timers, as Consul's DNS interface sends them.
const SOA_REFRESH: i32 = 3600;
const SOA_RETRY: i32 = 600;
const SOA_EXPIRE: i32 = 86_400;

/// What every record built for one question shares.
#[derive(Clone, Debug)]
pub struct Ctx<'a> {
    /// Owner of the answer records: the question's name.
    pub qname: &'a Name,
    pub qtype: RecordType,
    /// The Consul domain the question was under (SRV targets and SOA live there).
    pub domain: &'a Name,
    /// The datacenter the answer is about (for SRV target names).
    pub dc: &'a str,
    pub ttl: u32,
    /// SOA minimum and TTL of negative answers.
    pub negative_ttl: u32,
    /// Cap on address records (0 = none).
    pub a_record_limit: usize,
    /// SOA serial: Unix time, as Consul.
    pub serial: u32,
    /// The cluster peer a service answer is about: SRV targets are then
    /// `<node>.node.<peer>.peer.<domain>` and `<hex>.addr.<domain>`, as Consul names them.
    pub peer: Option<&'a str>,
    /// The admin partition a service answer is about (Consul Enterprise): SRV targets name it
    /// (`<node>.node.<partition>.ap.<dc>.dc.<domain>`) so that resolving them finds that node.
    pub partition: Option<&'a str>,
}

/// The instances a service lookup serves: tag-filtered, then healthy only, or every one when
/// none is healthy and `when_none_healthy = "all"`. Empty means NXDOMAIN. Cached in the view.
pub fn select(
    view: &ServiceView,
    tag: Option<&str>,
    only_passing: bool,
    when_none_healthy: WhenNoneHealthy,
) -> Arc<Selection> {
    view.selection(&SelectionKey {
        tag: tag.map(str::to_owned),
        only_passing,
        all_when_none_healthy: when_none_healthy == WhenNoneHealthy::All,
    })
}

/// hickory compresses at most this many names per message (unbound's CVE-2024-8508 limit);
/// records after them carry their owner name in full.
const COMPRESSED_NAMES: usize = 120;

/// An upper bound on how many records of `qtype` fit in `limit` bytes: each A record takes at
/// least 16 bytes while its name is compressed, AAAA 28, SRV 20, and `qname_len + 14` (resp.
/// 26, 18) after the first `COMPRESSED_NAMES`. Sampling more instances than this is wasted
/// work, so a 5,000-instance service costs what a 50-instance one does over UDP.
pub fn record_cap(qtype: RecordType, limit: usize, qname_len: usize) -> usize {
    let rdata = match qtype {
        RecordType::AAAA => 16,
        RecordType::SRV => 8,
        _ => 4,
    };
    let compressed = 2 + 10 + rdata;
    let full = qname_len + 10 + rdata;
    let cap = if limit <= COMPRESSED_NAMES * compressed {
        limit / compressed
    } else {
        COMPRESSED_NAMES + (limit - COMPRESSED_NAMES * compressed) / full.max(1)
    };
    cap.max(1)
}

/// Up to `cap` instances picked at random, in random order (a partial Fisher-Yates shuffle, so
/// the cost is `cap`, not the instance count), from those that can answer a `qtype` question:
/// the address family asked for, or every instance for SRV and when none has an IP (hostnames).
pub fn pick<'v, R: Rng + ?Sized>(
    view: &'v ServiceView,
    selection: &Selection,
    qtype: RecordType,
    cap: usize,
    rng: &mut R,
) -> Vec<&'v Instance> {
    let pool = match qtype {
        _ if selection.with_ip.is_empty() => &selection.all,
        RecordType::A => &selection.v4,
        RecordType::AAAA => &selection.v6,
        RecordType::ANY => &selection.with_ip,
        _ => &selection.all,
    };
    sample_indices(rng, pool.len(), cap)
        .into_iter()
        .filter_map(|i| pool.get(i).and_then(|&at| view.instances.get(at as usize)))
        .collect()
}

/// `amount` distinct indices below `len` (all of them when `amount >= len`), in random order.
///
/// rand's `index::sample` fills and shuffles a vector of all `len` indices when `amount` is
/// large relative to `len` (74 of 5,000 for an EDNS answer: 20 KB written per answer), and
/// compares each draw with every earlier one otherwise. Here a draw is checked against a bitset
/// of `len` bits: cost `amount`, plus `len / 8` bytes zeroed.
pub(crate) fn sample_indices<R: Rng + ?Sized>(
    rng: &mut R,
    len: usize,
    amount: usize,
) -> Vec<usize> {
    use rand::seq::SliceRandom;
    if amount.saturating_mul(2) >= len {
        // Most of them are wanted anyway: shuffle them all and keep a prefix.
        let mut all: Vec<usize> = (0..len).collect();
        all.shuffle(rng);
        all.truncate(amount);
        return all;
    }
    let mut taken = vec![0u64; len.div_ceil(64)];
    let mut picked = Vec::with_capacity(amount);
    // At least half the indices are always free, so each draw succeeds with probability >= 1/2;
    // the bound on tries only guards against a broken random source.
    let mut tries = amount.saturating_mul(64);
    while picked.len() < amount && tries > 0 {
        tries -= 1;
        let i = rng.random_range(0..len);
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if taken[word] & bit == 0 {
            taken[word] |= bit;
            picked.push(i);
        }
    }
    picked
}

pub(crate) fn soa_record(ctx: &Ctx<'_>) -> Record {
    let mname = Name::from_ascii("ns")
        .and_then(|n| n.append_domain(ctx.domain))
        .unwrap_or_else(|_| ctx.domain.clone());
    let rname = Name::from_ascii("hostmaster")
        .and_then(|n| n.append_domain(ctx.domain))
        .unwrap_or_else(|_| ctx.domain.clone());
    Record::from_rdata(
        ctx.domain.clone(),
        ctx.negative_ttl,
        RData::SOA(SOA::new(
            mname,
            rname,
            ctx.serial,
            SOA_REFRESH,
            SOA_RETRY,
            SOA_EXPIRE,
            ctx.negative_ttl,
        )),
    )
}

fn ns_record(ctx: &Ctx<'_>) -> Record {
    let ns = Name::from_ascii("ns")
        .and_then(|n| n.append_domain(ctx.domain))
        .unwrap_or_else(|_| ctx.domain.clone());
    Record::from_rdata(ctx.domain.clone(), ctx.ttl, RData::NS(NS(ns)))
}

fn answer(answers: Vec<Record>, additionals: Vec<Record>) -> Answer {
    Answer {
        rcode: ResponseCode::NoError,
        authoritative: true,
        answers,
        authorities: Vec::new(),
        additionals,
    }
}

/// NXDOMAIN with the SOA in authority.
pub(crate) fn nxdomain(ctx: &Ctx<'_>) -> Answer {
    negative(ctx, ResponseCode::NXDomain)
}

/// NOERROR, no answers, the SOA in authority: the name exists, not with this type.
pub(crate) fn nodata(ctx: &Ctx<'_>) -> Answer {
    negative(ctx, ResponseCode::NoError)
}

fn negative(ctx: &Ctx<'_>, rcode: ResponseCode) -> Answer {
    Answer {
        rcode,
        authoritative: true,
        answers: Vec::new(),
        authorities: vec![soa_record(ctx)],
        additionals: Vec::new(),
    }
}

/// SOA and NS are answered for any existing name in the domain, as Consul does.
fn apex_types(ctx: &Ctx<'_>) -> Option<Answer> {
    match ctx.qtype {
        RecordType::SOA => Some(answer(vec![soa_record(ctx)], Vec::new())),
        RecordType::NS => Some(answer(vec![ns_record(ctx)], Vec::new())),
        _ => None,
    }
}

/// The domain itself.
pub(crate) fn apex_answer(ctx: &Ctx<'_>) -> Answer {
    apex_types(ctx).unwrap_or_else(|| nodata(ctx))
}

fn address_record(owner: &Name, ttl: u32, ip: IpAddr) -> Record {
    let data = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(owner.clone(), ttl, data)
}

fn family_matches(qtype: RecordType, ip: &IpAddr) -> bool {
    match qtype {
        RecordType::A => ip.is_ipv4(),
        RecordType::AAAA => ip.is_ipv6(),
        RecordType::ANY => true,
        _ => false,
    }
}

/// What a view gives for a question: the answer, or an answer that still needs a hostname
/// resolved (a CNAME whose target the caller resolves and appends).
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    Done(Answer),
    /// The answer holds a CNAME to `target`; the caller appends `target`'s addresses after it.
    Cname {
        answer: Answer,
        target: Name,
    },
}

/// Answers a service question from `instances` (picked and shuffled). `exists` = the selection
/// was not empty: without it the answer is NXDOMAIN; with it and nothing to say, NODATA.
pub fn service_answer(instances: &[&Instance], exists: bool, ctx: &Ctx<'_>) -> Plan {
    if !exists {
        return Plan::Done(nxdomain(ctx));
    }
    if let Some(a) = apex_types(ctx) {
        return Plan::Done(a);
    }
    match ctx.qtype {
        RecordType::A | RecordType::AAAA | RecordType::ANY => addresses(instances, ctx),
        RecordType::SRV => Plan::Done(srv_answer(instances, ctx)),
        _ => Plan::Done(nodata(ctx)),
    }
}

fn addresses(instances: &[&Instance], ctx: &Ctx<'_>) -> Plan {
    // Duplicate addresses are dropped. foldhash: this set is built for every answer of up to
    // a few hundred records, where SipHash showed in the per-answer cost; its keys are
    // addresses from Consul, not chosen by the client.
    let mut seen: HashSet<IpAddr, foldhash::fast::RandomState> =
        HashSet::with_capacity_and_hasher(instances.len(), Default::default());
    let mut records = Vec::with_capacity(instances.len());
    let mut any_ip = false;
    for i in instances {
        if let Some(Target::Ip(ip)) = &i.target {
            any_ip = true;
            if family_matches(ctx.qtype, ip) && seen.insert(*ip) {
                records.push(address_record(ctx.qname, ctx.ttl, *ip));
            }
        }
    }
    if ctx.a_record_limit > 0 {
        records.truncate(ctx.a_record_limit);
    }
    if !records.is_empty() {
        return Plan::Done(answer(records, Vec::new()));
    }
    if !any_ip {
        // Only hostname instances: a CNAME to one (a name may carry one CNAME only), followed by
        // its addresses. Instances with IPs win over hostnames, as in Consul.
        if let Some(host) = instances.iter().find_map(|i| match &i.target {
            Some(Target::Host(h)) => Name::from_ascii(format!("{h}.")).ok(),
            _ => None,
        }) {
            let cname = Record::from_rdata(
                ctx.qname.clone(),
                ctx.ttl,
                RData::CNAME(CNAME(host.clone())),
            );
            return Plan::Cname {
                answer: answer(vec![cname], Vec::new()),
                target: host,
            };
        }
    }
    Plan::Done(nodata(ctx))
}

/// An SRV target under the domain: `<label>.<kind>.<dc>.<domain>`; for a peer
/// `<node>.node.<peer>.peer.<domain>` and `<hex>.addr.<domain>` (Consul's spelling, the
/// datacenter of a peer's node means nothing here); in a partition
/// `<node>.node.<partition>.ap.<dc>.dc.<domain>`.
fn name_under(label: &str, kind: &str, ctx: &Ctx<'_>) -> Option<Name> {
    let text = match (ctx.peer, ctx.partition, kind) {
        (Some(_), _, "addr") => format!("{label}.addr"),
        (Some(peer), _, _) => format!("{label}.{kind}.{peer}.peer"),
        (None, Some(ap), "node") => format!("{label}.node.{ap}.ap.{}.dc", ctx.dc),
        _ => format!("{label}.{kind}.{}", ctx.dc),
    };
    Name::from_ascii(text).ok()?.append_domain(ctx.domain).ok()
}

/// SRV: one record per (node, address, port), priority 1, weight by the instance's worst check;
/// the target is `<node>.node.<dc>.<domain>` (no own address), `<hex>.addr.<dc>.<domain>` (own
/// IP) or the hostname. Addresses of the targets go in the additional section; every target
/// name also resolves on its own (nginx asks for each).
fn srv_answer(instances: &[&Instance], ctx: &Ctx<'_>) -> Answer {
    let mut seen = HashSet::new();
    let mut answers = Vec::new();
    let mut additionals = Vec::new();
    let mut extra_seen = HashSet::new();
    for i in instances {
        if !seen.insert((i.node.as_str(), i.target.clone(), i.port)) {
            continue;
        }
        let (target, extra_ip) = match (&i.target, i.own_address) {
            (Some(Target::Ip(ip)), true) => {
                (name_under(&encode_hex_ip(*ip), "addr", ctx), Some(*ip))
            }
            (Some(Target::Host(h)), true) => (Name::from_ascii(format!("{h}.")).ok(), None),
            (target, _) => (
                name_under(&i.node, "node", ctx),
                match target {
                    Some(Target::Ip(ip)) => Some(*ip),
                    _ => None,
                },
            ),
        };
        let Some(target) = target else { continue };
        answers.push(Record::from_rdata(
            ctx.qname.clone(),
            ctx.ttl,
            RData::SRV(SRV::new(1, i.weight(), i.port, target.clone())),
        ));
        if let Some(ip) = extra_ip {
            if extra_seen.insert((target.clone(), ip)) {
                additionals.push(address_record(&target, ctx.ttl, ip));
            }
        }
    }
    answer(answers, additionals)
}

/// A node: its address (A/AAAA/ANY) with its meta as TXT in additional, or its meta as TXT.
pub(crate) fn node_answer(node: Option<&NodeView>, ctx: &Ctx<'_>) -> Plan {
    let Some(node) = node else {
        return Plan::Done(nxdomain(ctx));
    };
    if let Some(a) = apex_types(ctx) {
        return Plan::Done(a);
    }
    let meta = || meta_txt(node, ctx);
    match (ctx.qtype, &node.target) {
        (RecordType::TXT, _) => {
            let txt = meta();
            Plan::Done(if txt.is_empty() {
                nodata(ctx)
            } else {
                answer(txt, Vec::new())
            })
        }
        (RecordType::A | RecordType::AAAA | RecordType::ANY, Some(Target::Ip(ip)))
            if family_matches(ctx.qtype, ip) =>
        {
            Plan::Done(answer(
                vec![address_record(ctx.qname, ctx.ttl, *ip)],
                meta(),
            ))
        }
        (RecordType::A | RecordType::AAAA | RecordType::ANY, Some(Target::Host(h))) => {
            match Name::from_ascii(format!("{h}.")) {
                Ok(host) => Plan::Cname {
                    answer: answer(
                        vec![Record::from_rdata(
                            ctx.qname.clone(),
                            ctx.ttl,
                            RData::CNAME(CNAME(host.clone())),
                        )],
                        Vec::new(),
                    ),
                    target: host,
                },
                Err(_) => Plan::Done(nodata(ctx)),
            }
        }
        _ => Plan::Done(nodata(ctx)),
    }
}

/// Node meta as TXT, RFC 1464 `key=value` (keys starting `rfc1035-` give the value alone).
fn meta_txt(node: &NodeView, ctx: &Ctx<'_>) -> Vec<Record> {
    node.meta
        .iter()
        .map(|(k, v)| {
            let text = match k.strip_prefix("rfc1035-") {
                Some(_) => v.clone(),
                None => format!("{}={v}", k.replace('`', "``").replace('=', "`=")),
            };
            Record::from_rdata(ctx.qname.clone(), ctx.ttl, RData::TXT(TXT::new(vec![text])))
        })
        .collect()
}

/// `<service>.virtual`: the virtual IP Consul gave the service, as an A record with the node
/// TTL (as Consul). No virtual IP (an unknown service, virtual IPs off): NOERROR without
/// records. Consul puts the A record in the answer whatever the question's type; here only
/// A and ANY questions get it, other types get NODATA, so a client never reads an A record
/// as the answer to another question.
pub(crate) fn virtual_answer(ip: Option<IpAddr>, ctx: &Ctx<'_>) -> Answer {
    match ip {
        Some(ip) if matches!(ctx.qtype, RecordType::A | RecordType::ANY) => {
            answer(vec![address_record(ctx.qname, ctx.ttl, ip)], Vec::new())
        }
        _ => nodata(ctx),
    }
}

/// `<hex>.addr`: the address itself, computed locally.
pub(crate) fn addr_answer(ip: IpAddr, ctx: &Ctx<'_>) -> Answer {
    if let Some(a) = apex_types(ctx) {
        return a;
    }
    if family_matches(ctx.qtype, &ip) {
        answer(vec![address_record(ctx.qname, ctx.ttl, ip)], Vec::new())
    } else {
        nodata(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::catalog::{service_id_key, Status};
    use std::str::FromStr;

    fn inst(node: &str, addr: &str, own: bool, port: u16, status: Status) -> Instance {
        let target = if addr.is_empty() {
            None
        } else {
            Some(match addr.parse::<IpAddr>() {
                Ok(ip) => Target::Ip(ip),
                Err(_) => Target::Host(addr.into()),
            })
        };
        Instance {
            node: node.into(),
            service_id: service_id_key(node),
            target,
            own_address: own,
            port,
            tags: vec!["v1".into()].into(),
            status,
            weight_passing: 10,
            weight_warning: 1,
        }
    }

    fn with<R>(qtype: RecordType, f: impl FnOnce(&Ctx<'_>) -> R) -> R {
        let qname = Name::from_str("web.service.consul.").expect("n");
        let domain = Name::from_str("consul.").expect("d");
        f(&Ctx {
            qname: &qname,
            qtype,
            domain: &domain,
            dc: "dc1",
            ttl: 5,
            negative_ttl: 7,
            a_record_limit: 0,
            serial: 1,
            peer: None,
            partition: None,
        })
    }

    fn done(b: Plan) -> Answer {
        match b {
            Plan::Done(a) => a,
            Plan::Cname { .. } => panic!("expected a complete answer"),
        }
    }

    fn view(instances: Vec<Instance>) -> ServiceView {
        ServiceView::new(instances, "dc1")
    }

    #[test]
    fn select_drops_critical_and_warning_when_only_passing() {
        let v = view(vec![
            inst("a", "10.0.0.1", false, 80, Status::Passing),
            inst("b", "10.0.0.2", false, 80, Status::Warning),
            inst("c", "10.0.0.3", false, 80, Status::Critical),
        ]);
        assert_eq!(
            select(&v, None, false, WhenNoneHealthy::Nxdomain).all.len(),
            2
        );
        assert_eq!(
            select(&v, None, true, WhenNoneHealthy::Nxdomain).all.len(),
            1
        );
        assert_eq!(
            select(&v, Some("v2"), false, WhenNoneHealthy::Nxdomain)
                .all
                .len(),
            0
        );
        let dead = view(vec![inst("c", "10.0.0.3", false, 80, Status::Critical)]);
        assert!(select(&dead, None, false, WhenNoneHealthy::Nxdomain)
            .all
            .is_empty());
        assert_eq!(
            select(&dead, None, false, WhenNoneHealthy::All).all.len(),
            1
        );
    }

    #[test]
    fn a_aaaa_any_by_family_deduplicated_and_limited() {
        let a = inst("a", "10.0.0.1", false, 80, Status::Passing);
        let b = inst("b", "10.0.0.1", true, 81, Status::Passing);
        let c = inst("c", "2001:db8::1", true, 80, Status::Passing);
        let d = inst("d", "10.0.0.4", true, 80, Status::Passing);
        let all = [&a, &b, &c, &d];
        let r = with(RecordType::A, |ctx| done(service_answer(&all, true, ctx)));
        assert_eq!(r.answers.len(), 2);
        assert!(r.authoritative);
        let r = with(RecordType::AAAA, |ctx| {
            done(service_answer(&all, true, ctx))
        });
        assert_eq!(r.answers.len(), 1);
        let r = with(RecordType::ANY, |ctx| done(service_answer(&all, true, ctx)));
        assert_eq!(r.answers.len(), 3);
        let r = with(RecordType::A, |ctx| {
            done(service_answer(
                &all,
                true,
                &Ctx {
                    a_record_limit: 1,
                    ..ctx.clone()
                },
            ))
        });
        assert_eq!(r.answers.len(), 1);
        // IPv4-only service asked AAAA: NODATA with SOA, not NXDOMAIN.
        let r = with(RecordType::AAAA, |ctx| {
            done(service_answer(&[&a, &d], true, ctx))
        });
        assert_eq!(r.rcode, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        assert!(matches!(r.authorities[0].data, RData::SOA(_)));
    }

    #[test]
    fn empty_is_nxdomain_with_soa() {
        let r = with(RecordType::A, |ctx| done(service_answer(&[], false, ctx)));
        assert_eq!(r.rcode, ResponseCode::NXDomain);
        match &r.authorities[0].data {
            RData::SOA(soa) => {
                assert_eq!(soa.minimum, 7);
                assert_eq!(soa.mname.to_ascii(), "ns.consul.");
            }
            other => panic!("expected SOA, got {other:?}"),
        }
    }

    #[test]
    fn hostname_becomes_cname_unless_ips_exist() {
        let h = inst("h", "db.example.com", true, 80, Status::Passing);
        match with(RecordType::A, |ctx| service_answer(&[&h], true, ctx)) {
            Plan::Cname { answer, target } => {
                assert_eq!(target.to_ascii(), "db.example.com.");
                assert!(matches!(answer.answers[0].data, RData::CNAME(_)));
            }
            other => panic!("expected CNAME, got {other:?}"),
        }
        let a = inst("a", "10.0.0.1", true, 80, Status::Passing);
        let r = with(RecordType::A, |ctx| {
            done(service_answer(&[&h, &a], true, ctx))
        });
        assert_eq!(r.answers.len(), 1);
        assert!(matches!(r.answers[0].data, RData::A(_)));
    }

    #[test]
    fn srv_targets_weights_and_additionals() {
        let node_addr = inst("n1", "10.0.0.1", false, 80, Status::Passing);
        let own_ip = inst("n2", "127.0.0.2", true, 81, Status::Warning);
        let own_host = inst("n3", "db.example.com", true, 82, Status::Passing);
        let dup = inst("n2", "127.0.0.2", true, 81, Status::Passing);
        let r = with(RecordType::SRV, |ctx| {
            done(service_answer(
                &[&node_addr, &own_ip, &own_host, &dup],
                true,
                ctx,
            ))
        });
        let srvs: Vec<(u16, u16, u16, String)> = r
            .answers
            .iter()
            .map(|rec| match &rec.data {
                RData::SRV(s) => (s.priority, s.weight, s.port, s.target.to_ascii()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            srvs,
            vec![
                (1, 10, 80, "n1.node.dc1.consul.".into()),
                (1, 1, 81, "7f000002.addr.dc1.consul.".into()),
                (1, 10, 82, "db.example.com.".into()),
            ]
        );
        let extra: Vec<String> = r.additionals.iter().map(|r| r.name.to_ascii()).collect();
        assert_eq!(
            extra,
            vec!["n1.node.dc1.consul.", "7f000002.addr.dc1.consul."]
        );
    }

    /// The SRV targets of `instances` when the answer is about a peer or a partition.
    fn srv_targets(
        instances: &[&Instance],
        peer: Option<&str>,
        partition: Option<&str>,
    ) -> Vec<String> {
        let r = with(RecordType::SRV, |ctx| {
            let ctx = Ctx {
                peer,
                partition,
                ..ctx.clone()
            };
            done(service_answer(instances, true, &ctx))
        });
        r.answers
            .iter()
            .map(|rec| match &rec.data {
                RData::SRV(s) => s.target.to_ascii(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn srv_targets_of_peers_and_partitions() {
        let node_addr = inst("n1", "10.0.0.1", false, 80, Status::Passing);
        let own_ip = inst("n2", "127.0.0.2", true, 81, Status::Passing);
        // Consul's spelling for a peer: the peer names the node, an address has no datacenter.
        assert_eq!(
            srv_targets(&[&node_addr, &own_ip], Some("p1"), None),
            vec!["n1.node.p1.peer.consul.", "7f000002.addr.consul."]
        );
        // A partition names its node (resolving the target finds that partition's node).
        assert_eq!(
            srv_targets(&[&node_addr, &own_ip], None, Some("ap1")),
            vec!["n1.node.ap1.ap.dc1.dc.consul.", "7f000002.addr.dc1.consul."]
        );
    }

    #[test]
    fn virtual_ip_answers_a_and_any_with_the_node_ttl() {
        let vip: IpAddr = "240.0.0.7".parse().expect("ip");
        let r = with(RecordType::A, |ctx| virtual_answer(Some(vip), ctx));
        assert_eq!(r.rcode, ResponseCode::NoError);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(
            r.answers[0].data,
            RData::A(A("240.0.0.7".parse().expect("v4")))
        );
        assert_eq!(r.answers[0].ttl, 5);
        let r = with(RecordType::ANY, |ctx| virtual_answer(Some(vip), ctx));
        assert_eq!(r.answers.len(), 1);
        // Other types, and no virtual IP: NOERROR without records (NODATA, with the SOA).
        for (qtype, ip) in [
            (RecordType::AAAA, Some(vip)),
            (RecordType::SRV, Some(vip)),
            (RecordType::A, None),
        ] {
            let r = with(qtype, |ctx| virtual_answer(ip, ctx));
            assert_eq!(r.rcode, ResponseCode::NoError, "{qtype}");
            assert!(r.answers.is_empty(), "{qtype}");
            assert!(matches!(r.authorities[0].data, RData::SOA(_)), "{qtype}");
        }
    }

    #[test]
    fn nodes_and_addrs() {
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("instance_type".to_string(), "t2.medium".to_string());
        meta.insert("rfc1035-x".to_string(), "raw".to_string());
        let node = NodeView {
            name: "n1".into(),
            target: Some(Target::Ip("10.0.0.1".parse().expect("ip"))),
            meta,
        };
        let r = with(RecordType::A, |ctx| done(node_answer(Some(&node), ctx)));
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.additionals.len(), 2);
        let r = with(RecordType::TXT, |ctx| done(node_answer(Some(&node), ctx)));
        let texts: Vec<String> = r.answers.iter().map(|r| r.data.to_string()).collect();
        assert!(
            texts.iter().any(|t| t.contains("instance_type=t2.medium")),
            "{texts:?}"
        );
        assert!(
            texts.iter().any(|t| t.contains("raw") && !t.contains('=')),
            "{texts:?}"
        );
        let r = with(RecordType::A, |ctx| done(node_answer(None, ctx)));
        assert_eq!(r.rcode, ResponseCode::NXDomain);
        let r = with(RecordType::AAAA, |ctx| {
            addr_answer("10.0.0.1".parse().expect("ip"), ctx)
        });
        assert_eq!(r.rcode, ResponseCode::NoError);
        assert!(r.answers.is_empty());
    }

    #[test]
    fn pick_samples_within_cap_from_the_right_family() {
        let mut instances: Vec<Instance> = (0..5000u32)
            .map(|n| {
                let ip = if n % 2 == 0 {
                    std::net::Ipv4Addr::from(0x0a00_0000 + n).to_string()
                } else {
                    std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(n)).to_string()
                };
                inst(&format!("n{n}"), &ip, true, 80, Status::Passing)
            })
            .collect();
        instances.push(inst("bad", "10.9.9.9", true, 80, Status::Critical));
        let v = view(instances);
        let sel = select(&v, None, false, WhenNoneHealthy::Nxdomain);
        assert_eq!(
            (sel.all.len(), sel.v4.len(), sel.v6.len()),
            (5000, 2500, 2500)
        );
        let mut rng = rand::rng();
        let cap = record_cap(RecordType::A, 512, 20);
        assert_eq!(cap, 32);
        let a = pick(&v, &sel, RecordType::A, cap, &mut rng);
        assert_eq!(a.len(), 32);
        assert!(a
            .iter()
            .all(|i| matches!(i.target, Some(Target::Ip(ip)) if ip.is_ipv4())));
        let distinct: std::collections::HashSet<&str> = a.iter().map(|i| i.node.as_str()).collect();
        assert_eq!(distinct.len(), 32, "no instance twice");
        let again = pick(&v, &sel, RecordType::A, cap, &mut rng);
        assert_ne!(
            a.iter().map(|i| &i.node).collect::<Vec<_>>(),
            again.iter().map(|i| &i.node).collect::<Vec<_>>(),
            "a fresh random subset each time"
        );
        let six = pick(&v, &sel, RecordType::AAAA, 10, &mut rng);
        assert!(six
            .iter()
            .all(|i| matches!(i.target, Some(Target::Ip(ip)) if ip.is_ipv6())));
        assert!(
            Arc::ptr_eq(&sel, &select(&v, None, false, WhenNoneHealthy::Nxdomain)),
            "computed once per view"
        );
    }

    #[test]
    fn sampled_indices_are_distinct_in_range_and_vary() {
        let mut rng = rand::rng();
        for (len, amount) in [(5_000, 74), (5_000, 29), (10, 3), (10, 8), (3, 5), (0, 4)] {
            let mut firsts = HashSet::new();
            for _ in 0..50 {
                let picked = sample_indices(&mut rng, len, amount);
                assert_eq!(picked.len(), amount.min(len), "{len} {amount}");
                let distinct: HashSet<usize> = picked.iter().copied().collect();
                assert_eq!(distinct.len(), picked.len());
                assert!(picked.iter().all(|&i| i < len));
                if let Some(&first) = picked.first() {
                    firsts.insert(first);
                }
            }
            if len > 1 && amount > 0 {
                assert!(firsts.len() > 1, "the order changes ({len} {amount})");
            }
        }
    }
}
