//! Records from Consul views, as pure functions: which instances are served, A/AAAA/ANY/SRV/TXT
//! answers, SRV targets and their additional records, SOA and NS for the domain (the Consul
//! servers), the cut to `udp_answer_limit`. The caller shuffles; these functions keep the order
//! they are given.

use std::collections::HashSet;
use std::net::IpAddr;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use std::sync::Arc;

use rand::Rng;

use super::catalog::{Instance, NodeView, Selection, SelectionKey, ServiceView};
use super::name::encode_hex_ip;
use crate::answer::{Answer, Cut};
use crate::config::{SoaTimers, WhenNoneHealthy};

/// At most this many Consul servers are listed as the domain's nameservers (Consul's
/// `getNameserversAndNodeRecord`).
const MAX_NAMESERVERS: usize = 3;

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
    /// The SOA's refresh, retry and expire.
    pub soa: SoaTimers,
    /// Node meta as TXT in the additional section (`enable_additional_node_meta_txt`).
    pub node_meta_txt: bool,
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
        unfiltered: false,
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

/// Every instance of a prepared query's result: Consul filtered it already, by the query's own
/// rules (`OnlyPassing`, `IgnoreCheckIDs`); the local health rule does not apply again.
pub(crate) fn select_all(view: &ServiceView) -> Arc<Selection> {
    view.selection(&SelectionKey {
        tag: None,
        only_passing: false,
        all_when_none_healthy: false,
        unfiltered: true,
    })
}

/// The instances of `selection` that can answer a `qtype` question: those with an address for
/// it, else those with a hostname (a CNAME), or every instance for SRV.
pub(crate) fn pool(selection: &Selection, qtype: RecordType) -> &Arc<[u32]> {
    let with_address = match qtype {
        RecordType::A => &selection.v4,
        RecordType::AAAA => &selection.v6,
        RecordType::ANY => &selection.with_ip,
        _ => return &selection.all,
    };
    if with_address.is_empty() {
        &selection.hosts
    } else {
        with_address
    }
}

/// The first `cap` instances of the pool in the view's order: a prepared query Consul sorted
/// by round-trip time (`Near`) keeps that order.
pub(crate) fn first<'v>(
    view: &'v ServiceView,
    selection: &Selection,
    qtype: RecordType,
    cap: usize,
) -> Vec<&'v Instance> {
    pool(selection, qtype)
        .iter()
        .take(cap)
        .filter_map(|&at| view.instances.get(at as usize))
        .collect()
}

/// Up to `cap` instances picked at random, in random order (a partial Fisher-Yates shuffle, so
/// the cost is `cap`, not the instance count), from those that can answer a `qtype` question
/// (see [`pool`]).
pub fn pick<'v, R: Rng + ?Sized>(
    view: &'v ServiceView,
    selection: &Selection,
    qtype: RecordType,
    cap: usize,
    rng: &mut R,
) -> Vec<&'v Instance> {
    let pool = pool(selection, qtype);
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

/// The SOA of the domain, as Consul writes it: MNAME `ns.<domain>` (a name that does not
/// resolve, as in Consul), RNAME `hostmaster.<domain>`, TTL and minimum the negative TTL.
pub(crate) fn soa_record(ctx: &Ctx<'_>) -> Record {
    let mname = Name::from_ascii("ns")
        .and_then(|n| n.append_domain(ctx.domain))
        .unwrap_or_else(|_| ctx.domain.clone());
    let rname = Name::from_ascii("hostmaster")
        .and_then(|n| n.append_domain(ctx.domain))
        .unwrap_or_else(|_| ctx.domain.clone());
    let timer = |t: u32| i32::try_from(t).unwrap_or(i32::MAX);
    Record::from_rdata(
        ctx.domain.clone(),
        ctx.negative_ttl,
        RData::SOA(SOA::new(
            mname,
            rname,
            ctx.serial,
            timer(ctx.soa.refresh),
            timer(ctx.soa.retry),
            timer(ctx.soa.expire),
            ctx.negative_ttl,
        )),
    )
}

/// Can Consul write this node name in an NS record? Its DNS interface skips a server whose name
/// has anything but letters, digits and `-` (`InvalidNameRe`).
fn ns_name_ok(node: &str) -> bool {
    (1..=63).contains(&node.len()) && node.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The domain's nameservers: up to [`MAX_NAMESERVERS`] of `servers` (the healthy instances of
/// Consul's own `consul` service, shuffled) as `<node>.node.<dc>.<domain>`, owned by the domain,
/// with their addresses as glue. TTLs are the node TTL (`ctx.ttl`), as in Consul.
fn nameservers(servers: &[&Instance], ctx: &Ctx<'_>) -> (Vec<Record>, Vec<Record>) {
    let mut ns = Vec::new();
    let mut glue = Vec::new();
    for server in servers.iter().filter(|s| ns_name_ok(&s.node)) {
        let Some(target) = name_under(&server.node, "node", ctx) else {
            continue;
        };
        if ns
            .iter()
            .any(|r: &Record| r.data == RData::NS(NS(target.clone())))
        {
            continue;
        }
        // The address Consul's translation gives "any" question (its `getNameserversAndNodeRecord`).
        if let Some(ip) = server.addrs.ip_for(RecordType::ANY) {
            glue.push(address_record(&target, ctx.ttl, ip));
        }
        ns.push(Record::from_rdata(
            ctx.domain.clone(),
            ctx.ttl,
            RData::NS(NS(target)),
        ));
        if ns.len() == MAX_NAMESERVERS {
            break;
        }
    }
    (ns, glue)
}

/// An SOA question, for any name in the domain: the SOA, the nameservers in authority and
/// their addresses in additional.
pub(crate) fn soa_answer(servers: &[&Instance], ctx: &Ctx<'_>) -> Answer {
    let (ns, glue) = nameservers(servers, ctx);
    Answer {
        authorities: ns,
        ..answer(vec![soa_record(ctx)], glue)
    }
}

/// An NS question, for any name in the domain: the nameservers, with their addresses.
pub(crate) fn ns_answer(servers: &[&Instance], ctx: &Ctx<'_>) -> Answer {
    let (ns, glue) = nameservers(servers, ctx);
    answer(ns, glue)
}

/// AXFR and IXFR of a Consul domain: not implemented, as Consul answers AXFR (nothing
/// transfers a zone that is computed per question).
pub(crate) fn zone_transfer() -> Answer {
    Answer {
        authoritative: true,
        ..Answer::rcode(ResponseCode::NotImp)
    }
}

fn answer(answers: Vec<Record>, additionals: Vec<Record>) -> Answer {
    Answer {
        rcode: ResponseCode::NoError,
        authoritative: true,
        answers,
        authorities: Vec::new(),
        additionals,
        cut: Cut::default(),
    }
}

/// Consul's `udp_answer_limit`: a reply to a client limited to 512 bytes keeps the first `max`
/// answer records (already in random order, or in a prepared query's order) and the additional
/// records the kept SRV answers still need; the answer says records were left out.
pub(crate) fn limit_answers(answer: &mut Answer, max: usize) {
    if max == 0 || answer.answers.len() <= max {
        return;
    }
    answer.answers.truncate(max);
    let mut needed: HashSet<&Name> = answer.answers.iter().map(|r| &r.name).collect();
    needed.extend(answer.answers.iter().filter_map(|r| match &r.data {
        RData::SRV(srv) => Some(&srv.target),
        _ => None,
    }));
    let needed: HashSet<Name> = needed.into_iter().cloned().collect();
    answer.additionals.retain(|r| needed.contains(&r.name));
    answer.cut.by_source = true;
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
        cut: Cut::default(),
    }
}

/// The domain itself, asked for another type than SOA or NS: NODATA. (Consul answers NXDOMAIN,
/// which would tell a resolver that follows RFC 8020 that nothing exists below the domain.)
pub(crate) fn apex_answer(ctx: &Ctx<'_>) -> Answer {
    nodata(ctx)
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
    for i in instances {
        if let Some(ip) = i.addrs.ip_for(ctx.qtype) {
            if seen.insert(ip) {
                records.push(address_record(ctx.qname, ctx.ttl, ip));
            }
        }
    }
    if ctx.a_record_limit > 0 {
        records.truncate(ctx.a_record_limit);
    }
    if !records.is_empty() {
        return Plan::Done(answer(records, Vec::new()));
    }
    // No address for this question: a CNAME to an instance's hostname (a name may carry one
    // CNAME only), followed by its addresses. Addresses win over hostnames, as in Consul.
    match instances
        .iter()
        .find_map(|i| i.addrs.host_for(ctx.qtype))
        .and_then(|h| Name::from_ascii(format!("{h}.")).ok())
    {
        Some(host) => cname_plan(host, ctx),
        None => Plan::Done(nodata(ctx)),
    }
}

/// A CNAME to `host`, whose addresses the caller appends.
fn cname_plan(host: Name, ctx: &Ctx<'_>) -> Plan {
    let cname = Record::from_rdata(
        ctx.qname.clone(),
        ctx.ttl,
        RData::CNAME(CNAME(host.clone())),
    );
    Plan::Cname {
        answer: answer(vec![cname], Vec::new()),
        target: host,
    }
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
/// the target is `<node>.node.<dc>.<domain>` (the node's own address),
/// `<hex>.addr.<dc>.<domain>` (the service's address, or a tagged or WAN one) or the hostname,
/// with the address ANY gets (Consul's "any" translation: the IPv6 tag first). Addresses of the
/// targets go in the additional section; every target name also resolves on its own (nginx
/// asks for each). With `node_meta_txt`, each node's meta follows as TXT records owned by
/// `<node>.node.<dc>.<domain>` (whatever the target), as in Consul.
fn srv_answer(instances: &[&Instance], ctx: &Ctx<'_>) -> Answer {
    let mut seen = HashSet::new();
    let mut answers = Vec::new();
    let mut additionals = Vec::new();
    let mut extra_seen = HashSet::new();
    let mut meta_seen = HashSet::new();
    for i in instances {
        let ip = i.addrs.ip_for(RecordType::SRV);
        let host = i.addrs.host_for(RecordType::SRV);
        if !seen.insert((&*i.node, ip, host, i.port)) {
            continue;
        }
        let target = match (ip, host) {
            (Some(_), _) if i.addrs.srv_by_node() => name_under(&i.node, "node", ctx),
            (Some(ip), _) => name_under(&encode_hex_ip(ip), "addr", ctx),
            (None, Some(h)) => Name::from_ascii(format!("{h}.")).ok(),
            (None, None) => None,
        };
        let Some(target) = target else { continue };
        let extra_ip = ip;
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
        if ctx.node_meta_txt && !i.node_meta.is_empty() && meta_seen.insert(&*i.node) {
            if let Some(owner) = name_under(&i.node, "node", ctx) {
                let entries = i.node_meta.iter().map(|(k, v)| (&**k, &**v));
                additionals.extend(meta_txt(entries, &owner, ctx.ttl));
            }
        }
    }
    answer(answers, additionals)
}

/// A node: its address (A/AAAA/ANY) with its meta as TXT (in the additional section for A and
/// AAAA when `node_meta_txt`, in the answer for ANY), or its meta as TXT.
pub(crate) fn node_answer(node: Option<&NodeView>, ctx: &Ctx<'_>) -> Plan {
    let Some(node) = node else {
        return Plan::Done(nxdomain(ctx));
    };
    let meta = || {
        let entries = node.meta.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        meta_txt(entries, ctx.qname, ctx.ttl)
    };
    match ctx.qtype {
        RecordType::TXT => {
            let txt = meta();
            Plan::Done(if txt.is_empty() {
                nodata(ctx)
            } else {
                answer(txt, Vec::new())
            })
        }
        RecordType::A | RecordType::AAAA | RecordType::ANY => {
            if let Some(ip) = node.addrs.ip_for(ctx.qtype) {
                let record = address_record(ctx.qname, ctx.ttl, ip);
                // ANY answers the meta too; A and AAAA carry it beside, when enabled.
                return Plan::Done(if ctx.qtype == RecordType::ANY {
                    let mut records = vec![record];
                    records.extend(meta());
                    answer(records, Vec::new())
                } else if ctx.node_meta_txt {
                    answer(vec![record], meta())
                } else {
                    answer(vec![record], Vec::new())
                });
            }
            match node
                .addrs
                .host_for(ctx.qtype)
                .and_then(|h| Name::from_ascii(format!("{h}.")).ok())
            {
                Some(host) => cname_plan(host, ctx),
                None => Plan::Done(nodata(ctx)),
            }
        }
        _ => Plan::Done(nodata(ctx)),
    }
}

/// Node meta as TXT records owned by `owner`, one per entry, as Consul writes them (its
/// `makeTXTRecordFromNodeMeta`).
fn meta_txt<'a>(
    meta: impl IntoIterator<Item = (&'a str, &'a str)>,
    owner: &Name,
    ttl: u32,
) -> Vec<Record> {
    meta.into_iter()
        .map(|(k, v)| {
            Record::from_rdata(
                owner.clone(),
                ttl,
                RData::TXT(TXT::new(vec![meta_text(k, v)])),
            )
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

/// One meta entry as TXT text: a key starting `rfc1035-` (in any case) gives the value alone;
/// any other is `key=value` in RFC 1464's form, backticks doubled and `=` in the key quoted.
/// (Consul also quotes a key's leading and trailing spaces, but it accepts only
/// `[A-Za-z0-9_-]` in meta keys, so none has any.)
pub(crate) fn meta_text(key: &str, value: &str) -> String {
    if key
        .get(..8)
        .is_some_and(|p| p.eq_ignore_ascii_case("rfc1035-"))
    {
        return value.to_owned();
    }
    format!(
        "{}={}",
        key.replace('`', "``").replace('=', "`="),
        value.replace('`', "``")
    )
}

/// `<hex>.addr`: the address itself, computed locally. Asked with another type than its own
/// (or ANY), the record goes in the additional section of an otherwise empty NOERROR reply,
/// as Consul answers.
pub(crate) fn addr_answer(ip: IpAddr, ctx: &Ctx<'_>) -> Answer {
    let record = address_record(ctx.qname, ctx.ttl, ip);
    if family_matches(ctx.qtype, &ip) {
        answer(vec![record], Vec::new())
    } else {
        answer(Vec::new(), vec![record])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::addrs::{Addrs, AnyAddr, Origin};
    use crate::consul::catalog::{service_id_key, Status};
    use std::str::FromStr;

    /// An instance reached at `addr` (an IP or a hostname) for every question; `own`: the
    /// service's address rather than its node's.
    fn inst(node: &str, addr: &str, own: bool, port: u16, status: Status) -> Instance {
        let addrs = match addr.parse::<IpAddr>() {
            Ok(ip) => Addrs::ip(ip, !own),
            Err(_) if addr.is_empty() => Addrs::default(),
            Err(_) => Addrs {
                host: Some(addr.into()),
                any: AnyAddr::Host,
                ..Addrs::default()
            },
        };
        Instance {
            node: node.into(),
            service_id: service_id_key(node),
            addrs,
            port,
            tags: vec!["v1".into()].into(),
            status,
            weight_passing: 10,
            weight_warning: 1,
            node_meta: Default::default(),
        }
    }

    fn with_meta(mut i: Instance, meta: &[(&str, &str)]) -> Instance {
        i.node_meta = meta
            .iter()
            .map(|(k, v)| (Box::from(*k), Box::from(*v)))
            .collect();
        i
    }

    fn names(records: &[Record]) -> Vec<String> {
        records.iter().map(|r| r.name.to_ascii()).collect()
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
            soa: SoaTimers::default(),
            node_meta_txt: true,
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

    /// An instance on a dual-stack node (address 10.0.0.1, `lan_ipv6` fd00::1).
    fn dual_stack(node: &str) -> Instance {
        Instance {
            addrs: Addrs {
                v6: Some("fd00::1".parse().expect("ip")),
                any: AnyAddr::V6,
                origin: Origin::Other,
                ..Addrs::ip("10.0.0.1".parse().expect("ip"), true)
            },
            ..inst(node, "", false, 80, Status::Passing)
        }
    }

    fn rdata(records: &[Record]) -> Vec<(String, String)> {
        records
            .iter()
            .map(|r| (r.name.to_ascii(), r.data.to_string()))
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
    fn each_question_gets_its_own_address() {
        let d = dual_stack("n1");
        let owner = "web.service.consul.".to_string();
        for (qtype, want) in [
            (RecordType::A, "10.0.0.1"),
            (RecordType::AAAA, "fd00::1"),
            // ANY gets one address per instance, the IPv6 tag first (Consul's "any").
            (RecordType::ANY, "fd00::1"),
        ] {
            let r = with(qtype, |ctx| done(service_answer(&[&d], true, ctx)));
            assert_eq!(rdata(&r.answers), vec![(owner.clone(), want.to_string())]);
        }
        // SRV: the IPv6 address is not the node's own, so the target is its `.addr` name.
        let r = with(RecordType::SRV, |ctx| {
            done(service_answer(&[&d], true, ctx))
        });
        let target = "fd000000000000000000000000000001.addr.dc1.consul.";
        assert_eq!(
            rdata(&r.answers),
            vec![(owner, format!("1 10 80 {target}"))]
        );
        assert_eq!(
            rdata(&r.additionals),
            vec![(target.to_string(), "fd00::1".to_string())]
        );
        let r = with(RecordType::AAAA, |ctx| {
            done(node_answer(
                Some(&NodeView {
                    name: "n1".into(),
                    addrs: d.addrs.clone(),
                    meta: Default::default(),
                }),
                ctx,
            ))
        });
        assert_eq!(rdata(&r.answers)[0].1, "fd00::1");
    }

    #[test]
    fn hostnames_answer_questions_no_instance_has_an_address_for() {
        let v4 = inst("a", "10.0.0.1", false, 80, Status::Passing);
        let host = inst("h", "db.example.com", true, 80, Status::Passing);
        let v = view(vec![v4, host]);
        let sel = select(&v, None, false, WhenNoneHealthy::Nxdomain);
        let mut rng = rand::rng();
        // A: the address; AAAA: nobody has one, so the hostname instance's CNAME.
        let a = pick(&v, &sel, RecordType::A, 10, &mut rng);
        assert_eq!(a.len(), 1);
        let six = pick(&v, &sel, RecordType::AAAA, 10, &mut rng);
        assert_eq!(six.iter().map(|i| &*i.node).collect::<Vec<_>>(), ["h"]);
        match with(RecordType::AAAA, |ctx| service_answer(&six, true, ctx)) {
            Plan::Cname { target, .. } => assert_eq!(target.to_ascii(), "db.example.com."),
            other => panic!("expected a CNAME, got {other:?}"),
        }
        // An IPv4-only service asked AAAA without hostnames: nothing to pick, NODATA.
        let v = view(vec![inst("a", "10.0.0.1", false, 80, Status::Passing)]);
        let sel = select(&v, None, false, WhenNoneHealthy::Nxdomain);
        assert!(pick(&v, &sel, RecordType::AAAA, 10, &mut rng).is_empty());
    }

    #[test]
    fn nodes_and_addrs() {
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("instance_type".to_string(), "t2.medium".to_string());
        meta.insert("rfc1035-x".to_string(), "raw".to_string());
        let node = NodeView {
            name: "n1".into(),
            addrs: Addrs::ip("10.0.0.1".parse().expect("ip"), true),
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
        // ANY: the meta is part of the answer, as in Consul.
        let r = with(RecordType::ANY, |ctx| done(node_answer(Some(&node), ctx)));
        assert_eq!((r.answers.len(), r.additionals.len()), (3, 0));
        // Without enable_additional_node_meta_txt, A gets no TXT; TXT still answers.
        let quiet = |qtype| {
            with(qtype, |ctx| {
                let ctx = Ctx {
                    node_meta_txt: false,
                    ..ctx.clone()
                };
                done(node_answer(Some(&node), &ctx))
            })
        };
        let r = quiet(RecordType::A);
        assert_eq!((r.answers.len(), r.additionals.len()), (1, 0));
        assert_eq!(quiet(RecordType::TXT).answers.len(), 2);
    }

    #[test]
    fn addr_asked_another_type_answers_in_additional() {
        let v4: IpAddr = "10.0.0.1".parse().expect("ip");
        for qtype in [RecordType::AAAA, RecordType::TXT, RecordType::SRV] {
            let r = with(qtype, |ctx| addr_answer(v4, ctx));
            assert_eq!(r.rcode, ResponseCode::NoError, "{qtype}");
            assert!(r.answers.is_empty() && r.authorities.is_empty(), "{r:?}");
            assert_eq!(r.additionals.len(), 1);
            assert_eq!(
                r.additionals[0].data,
                RData::A(A(std::net::Ipv4Addr::new(10, 0, 0, 1)))
            );
            assert_eq!(r.additionals[0].ttl, 5, "the node TTL");
        }
        let r = with(RecordType::ANY, |ctx| addr_answer(v4, ctx));
        assert_eq!((r.answers.len(), r.additionals.len()), (1, 0));
        let v6: IpAddr = "2001:db8::1".parse().expect("ip");
        let r = with(RecordType::A, |ctx| addr_answer(v6, ctx));
        assert!(r.answers.is_empty());
        assert!(matches!(r.additionals[0].data, RData::AAAA(_)));
    }

    #[test]
    fn meta_text_as_consul_writes_it() {
        assert_eq!(
            meta_text("instance_type", "t2.medium"),
            "instance_type=t2.medium"
        );
        assert_eq!(meta_text("rfc1035-x", "raw"), "raw");
        assert_eq!(meta_text("RFC1035-Spf", "v=spf1 -all"), "v=spf1 -all");
        assert_eq!(meta_text("rfc1035", "v"), "rfc1035=v");
        assert_eq!(meta_text("a=b", "c`d"), "a`=b=c``d");
    }

    #[test]
    fn srv_carries_each_nodes_meta_once_owned_by_the_node_name() {
        let meta = [("consul-network-segment", ""), ("rack", "r1")];
        let a = with_meta(inst("n1", "10.0.0.1", false, 80, Status::Passing), &meta);
        let b = with_meta(inst("n1", "10.0.0.1", false, 81, Status::Passing), &meta);
        let own = with_meta(inst("n2", "127.0.0.2", true, 80, Status::Passing), &meta);
        let plain = inst("n3", "10.0.0.3", false, 80, Status::Passing);
        let all = [&a, &b, &own, &plain];
        let r = with(RecordType::SRV, |ctx| done(service_answer(&all, true, ctx)));
        assert_eq!(r.answers.len(), 4);
        let txt: Vec<(String, String)> = r
            .additionals
            .iter()
            .filter(|r| r.record_type() == RecordType::TXT)
            .map(|r| (r.name.to_ascii(), r.data.to_string()))
            .collect();
        assert_eq!(
            txt,
            [
                (
                    "n1.node.dc1.consul.".into(),
                    "consul-network-segment=".into()
                ),
                ("n1.node.dc1.consul.".into(), "rack=r1".into()),
                (
                    "n2.node.dc1.consul.".into(),
                    "consul-network-segment=".into()
                ),
                ("n2.node.dc1.consul.".into(), "rack=r1".into()),
            ]
        );
        assert!(r.additionals.iter().all(|r| r.ttl == 5), "the service TTL");
        let r = with(RecordType::SRV, |ctx| {
            let ctx = Ctx {
                node_meta_txt: false,
                ..ctx.clone()
            };
            done(service_answer(&all, true, &ctx))
        });
        assert!(r
            .additionals
            .iter()
            .all(|r| r.record_type() != RecordType::TXT));
    }

    #[test]
    fn nameservers_are_up_to_three_servers_with_glue() {
        let servers = [
            inst("srv-1", "10.0.0.1", false, 8300, Status::Passing),
            inst("bad_name", "10.0.0.9", false, 8300, Status::Passing),
            inst("srv-2", "2001:db8::2", false, 8300, Status::Passing),
            inst("srv-3", "10.0.0.3", false, 8300, Status::Passing),
            inst("srv-4", "10.0.0.4", false, 8300, Status::Passing),
        ];
        let refs: Vec<&Instance> = servers.iter().collect();
        let r = with(RecordType::NS, |ctx| ns_answer(&refs, ctx));
        assert!(r.authoritative);
        assert_eq!(names(&r.answers), ["consul.", "consul.", "consul."]);
        let targets: Vec<String> = r
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::NS(ns) => ns.0.to_ascii(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            targets,
            [
                "srv-1.node.dc1.consul.",
                "srv-2.node.dc1.consul.",
                "srv-3.node.dc1.consul."
            ],
            "a name Consul cannot write is skipped"
        );
        assert_eq!(names(&r.additionals), targets);
        assert!(matches!(r.additionals[1].data, RData::AAAA(_)));
        assert!(r.answers.iter().chain(&r.additionals).all(|r| r.ttl == 5));

        let r = with(RecordType::SOA, |ctx| soa_answer(&refs[..1], ctx));
        assert_eq!(names(&r.answers), ["consul."]);
        match &r.answers[0].data {
            RData::SOA(soa) => {
                assert_eq!(
                    (soa.refresh, soa.retry, soa.expire, soa.minimum),
                    (3600, 600, 86_400, 7)
                );
                assert_eq!(soa.rname.to_ascii(), "hostmaster.consul.");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.answers[0].ttl, 7, "the SOA's TTL is its minimum");
        assert_eq!(names(&r.authorities), ["consul."]);
        assert_eq!(names(&r.additionals), ["srv-1.node.dc1.consul."]);
        let r = with(RecordType::NS, |ctx| ns_answer(&[], ctx));
        assert_eq!(r.rcode, ResponseCode::NoError);
        assert!(r.answers.is_empty());
    }

    #[test]
    fn udp_answer_limit_keeps_the_first_answers_and_what_they_need() {
        let mut r = with(RecordType::SRV, |ctx| {
            let i: Vec<Instance> = (1..=5)
                .map(|n| {
                    inst(
                        &format!("n{n}"),
                        &format!("10.0.0.{n}"),
                        false,
                        80,
                        Status::Passing,
                    )
                })
                .collect();
            let refs: Vec<&Instance> = i.iter().collect();
            done(service_answer(&refs, true, ctx))
        });
        limit_answers(&mut r, 3);
        assert_eq!(r.answers.len(), 3);
        assert_eq!(
            names(&r.additionals),
            [
                "n1.node.dc1.consul.",
                "n2.node.dc1.consul.",
                "n3.node.dc1.consul."
            ]
        );
        assert!(r.cut.by_source);
        let mut small = r.clone();
        small.cut = Cut::default();
        limit_answers(&mut small, 3);
        assert!(!small.cut.by_source, "nothing left out, nothing to say");
        limit_answers(&mut small, 0);
        assert_eq!(small.answers.len(), 3, "0 = no limit");
    }

    #[test]
    fn a_prepared_query_keeps_consuls_filter_and_order() {
        let v = view(vec![
            inst("c", "10.0.0.3", false, 80, Status::Critical),
            inst("a", "10.0.0.1", false, 80, Status::Passing),
            inst("b", "10.0.0.2", false, 80, Status::Warning),
        ]);
        let sel = select_all(&v);
        assert_eq!(
            sel.all.len(),
            3,
            "an ignored critical check is Consul's business"
        );
        let nodes: Vec<&str> = first(&v, &sel, RecordType::A, 2)
            .iter()
            .map(|i| &*i.node)
            .collect();
        assert_eq!(nodes, ["c", "a"]);
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
            .all(|i| i.addrs.v4.is_some() && i.addrs.v6.is_none()));
        let distinct: std::collections::HashSet<&str> = a.iter().map(|i| &*i.node).collect();
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
            .all(|i| i.addrs.v6.is_some() && i.addrs.v4.is_none()));
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
