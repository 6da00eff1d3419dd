//! Gathers an [`Explanation`]: asks the question through the handler (the reply a client would
//! get now), then reads how the name was routed and, for Consul names, the view and the checks
//! its instances have, and hands them to the pure [`verdicts`].

use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use super::details::{by_instance, ChecksByInstance};
use super::names;
use super::{
    status_name, verdicts, why, CacheState, CheckInfo, ConsulPart, Explanation, ForwardedPart,
    InReply, InstanceExplanation, LastAnswer, Reading, ReplyNow, Rules, TtlInfo, ViewInfo,
};
use crate::answer::Question;
use crate::cache::{CachedAnswer, Lookup};
use crate::config::{Config, WhenNoneHealthy};
use crate::consul::catalog::ServiceView;
use crate::consul::name::{self, ConsulName, ServiceKind, ViewKey};
use crate::consul::peek::seconds;
use crate::consul::ConsulSource;
use crate::handler::{ConsulRoute, Handler};
use crate::metrics::{rcode_label, Metrics};
use crate::reply::Transport;
use crate::upstream::Forwarder;

/// Instances shown per page: a 5,000-instance service is read a page at a time.
pub(crate) const PAGE_SIZE: usize = 100;

/// The UDP payload size `explain` asks with, as dig does by default.
const EDNS_PAYLOAD: u16 = 1232;

/// The client address the question is asked from: the host itself.
const EXPLAIN_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A view as kept now, for `explain`.
pub struct ViewPeek {
    pub(crate) view: Arc<ServiceView>,
    /// Since Consul last confirmed it.
    pub(crate) confirmed_ago: Option<Duration>,
    pub(crate) index: Option<u64>,
    pub(crate) agent: Option<String>,
    pub(crate) kept_fresh_by: String,
    pub(crate) patched_by_feed: bool,
}

/// A kept view, for the status page.
pub struct KeptView {
    pub(crate) key: ViewKey,
    /// Healthy, warning, critical; none while it has no view.
    pub(crate) counts: Option<[usize; 3]>,
    pub(crate) age: Option<Duration>,
}

/// A Consul agent and its connection budget, for the status page.
pub struct AgentState {
    pub(crate) agent: String,
    pub(crate) current: bool,
    pub(crate) in_use: usize,
    pub(crate) budget: usize,
}

/// What the running forwarder is now: read afresh for every page (a reload replaces it).
#[derive(Clone)]
pub(crate) struct Current {
    pub(crate) config: Config,
    pub(crate) consul: Option<ConsulRoute>,
    pub(crate) forwarder: Arc<Forwarder>,
    pub(crate) metrics: Arc<Metrics>,
}

/// One `explain` question, validated.
#[derive(Clone, Debug)]
pub(crate) struct Ask {
    pub(crate) name: Name,
    pub(crate) qtype: RecordType,
    /// Ask as a UDP client without EDNS (nginx, glibc) would.
    pub(crate) without_edns: bool,
    /// 0-based page of instances.
    pub(crate) page: usize,
}

/// Longest name accepted (a DNS name is at most 253 characters, plus the final dot).
pub(crate) const MAX_NAME_LEN: usize = 254;

/// Highest page number accepted (100,000 instances at [`PAGE_SIZE`] a page).
pub(crate) const MAX_PAGE: usize = 1_000;

/// Why a question cannot be explained.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum AskError {
    #[error("name: a DNS name of at most {MAX_NAME_LEN} characters is needed")]
    Name,
    #[error("type: not a DNS record type")]
    Type,
    #[error("page: a number from 1 to {MAX_PAGE} is needed")]
    Page,
}

impl Ask {
    /// Reads the client-supplied parts, each bounded: `page` counts from 1.
    pub(crate) fn parse(
        name: &str,
        qtype: Option<&str>,
        page: Option<&str>,
        without_edns: bool,
    ) -> Result<Ask, AskError> {
        if name.is_empty() || name.len() > MAX_NAME_LEN || !name.is_ascii() {
            return Err(AskError::Name);
        }
        let mut parsed = Name::from_ascii(name).map_err(|_| AskError::Name)?;
        parsed.set_fqdn(true);
        let qtype = match qtype.filter(|t| !t.is_empty()) {
            None => RecordType::A,
            Some(t) if t.len() <= 10 => {
                RecordType::from_str(&t.to_ascii_uppercase()).map_err(|_| AskError::Type)?
            }
            Some(_) => return Err(AskError::Type),
        };
        let page = match page.filter(|p| !p.is_empty()) {
            None => 0,
            Some(p) => match p.parse::<usize>() {
                Ok(n) if (1..=MAX_PAGE).contains(&n) => n - 1,
                _ => return Err(AskError::Page),
            },
        };
        Ok(Ask {
            name: parsed,
            qtype,
            without_edns,
            page,
        })
    }
}

/// Explains `ask` against the running forwarder.
pub(crate) async fn explain(handler: &Handler, now: &Current, ask: &Ask) -> Explanation {
    let question = Question {
        name: ask.name.to_lowercase(),
        qtype: ask.qtype,
        qclass: hickory_proto::rr::DNSClass::IN,
    };
    // Read before asking: the question itself may fill the cache.
    let forwarded_before = forwarded_part(&now.forwarder, &question);
    let (reply, message) = ask_now(handler, ask).await;
    let in_reply = message.as_ref().map(in_reply).unwrap_or_default();
    let mut explanation = Explanation {
        name: ask.name.to_string(),
        qtype: ask.qtype.to_string(),
        reply,
        ..Explanation::default()
    };
    let consul_source = now.consul.as_ref().map(|c| c.source().clone());
    let consul_domain = name::parse(&question.name, question.qtype, &now.config.consul.domains);
    let reverse = crate::arpa::question_address(&question);
    if let (Some(ip), Some(consul)) = (reverse, consul_source.as_ref().and_then(|s| s.as_consul()))
    {
        let answered = super::names::ptr(&**consul.backend(), ip).await;
        let known = answered.ptr.as_ref().is_some_and(|p| !p.forwarded);
        explanation.reading = Reading {
            kind: "ptr".to_owned(),
            zone: forwarded_before.0.clone(),
            source: if known { "consul http" } else { "upstream" }.to_owned(),
            ..Reading::default()
        };
        explanation.consul = Some(ConsulPart {
            answered_by: Some(answered),
            ..ConsulPart::default()
        });
        if !known {
            explanation.forwarded = Some(forwarded_before.1);
        }
        return explanation;
    }
    match (consul_source, consul_domain) {
        (Some(source), Some(parsed)) => match source.as_consul() {
            Some(consul) => {
                let contact = last_contact(&now.metrics);
                let (reading, part) =
                    consul_part(consul, parsed, &question, ask, &in_reply, contact).await;
                explanation.reading = reading;
                explanation.consul = Some(part);
            }
            None => {
                explanation.reading = Reading {
                    kind: "consul dns".to_owned(),
                    zone: parsed.domain.to_string(),
                    source: "consul dns (forwarded to the agents' DNS port)".to_owned(),
                    ..Reading::default()
                };
            }
        },
        _ => {
            let (zone, part) = forwarded_before;
            explanation.reading = Reading {
                kind: "forwarded".to_owned(),
                zone,
                source: "upstream".to_owned(),
                ..Reading::default()
            };
            explanation.forwarded = Some(part);
        }
    }
    explanation
}

/// The question asked through the handler as a client on this host would ask it.
async fn ask_now(handler: &Handler, ask: &Ask) -> (ReplyNow, Option<Message>) {
    let mut query = Message::query();
    query.metadata.id = rand::random();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(ask.name.clone(), ask.qtype));
    if !ask.without_edns {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        query.set_edns(edns);
    }
    let bytes = match query.to_vec() {
        Ok(b) => b,
        Err(e) => return (failed(format!("cannot encode the question: {e}")), None),
    };
    let started = Instant::now();
    let reply = handler.handle(&bytes, EXPLAIN_CLIENT, Transport::Udp).await;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let Some(reply) = reply else {
        return (failed("dropped (no reply would be sent)".to_owned()), None);
    };
    match Message::from_vec(&reply) {
        Ok(message) => {
            let now = ReplyNow {
                rcode: rcode_label(message.metadata.response_code).to_owned(),
                truncated: message.metadata.truncation,
                answer_count: message.answers.len(),
                text: super::render::dig(&message),
                latency_ms: (latency_ms * 1000.0).round() / 1000.0,
                error: None,
            };
            (now, Some(message))
        }
        Err(e) => (failed(format!("the reply does not parse: {e}")), None),
    }
}

fn failed(error: String) -> ReplyNow {
    ReplyNow {
        error: Some(error),
        ..ReplyNow::default()
    }
}

/// What the reply carries, for [`verdicts`].
fn in_reply(message: &Message) -> InReply {
    let mut seen = InReply {
        truncated: message.metadata.truncation,
        ..InReply::default()
    };
    let question_type = message.queries.first().map(|q| q.query_type());
    for record in &message.answers {
        match &record.data {
            RData::A(a) => {
                seen.ips.insert(IpAddr::V4(a.0));
            }
            RData::AAAA(a) => {
                seen.ips.insert(IpAddr::V6(a.0));
            }
            RData::SRV(srv) => {
                let first = srv
                    .target
                    .iter()
                    .next()
                    .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
                    .unwrap_or_default();
                seen.srv.insert((srv.port, first));
            }
            RData::CNAME(c) => {
                let host = c.0.to_lowercase().to_string();
                seen.hosts.insert(host.trim_end_matches('.').to_owned());
            }
            _ => {}
        }
        if Some(record.record_type()) == question_type || question_type == Some(RecordType::ANY) {
            seen.count += 1;
        }
    }
    seen
}

/// How a Consul name was read and, for service names, the view and each instance's verdict.
async fn consul_part(
    consul: &ConsulSource,
    parsed: name::Parsed,
    question: &Question,
    ask: &Ask,
    reply: &InReply,
    contact: Option<Duration>,
) -> (Reading, ConsulPart) {
    let cfg = consul.config();
    let backend = consul.backend();
    let local_dc = backend.local_datacenter().await;
    let mut reading = Reading {
        zone: parsed.domain.to_string(),
        source: if cfg.demo_catalog || cfg.catalog_file.is_some() {
            "consul catalog file"
        } else {
            "consul http"
        }
        .to_owned(),
        ..Reading::default()
    };
    let mut part = ConsulPart {
        rules: Rules {
            only_passing: cfg.only_passing,
            when_none_healthy_all: cfg.when_none_healthy == WhenNoneHealthy::All,
            a_record_limit: cfg.a_record_limit,
            udp_answer_limit: cfg.udp_answer_limit,
            without_edns: ask.without_edns,
        },
        ttl: TtlInfo {
            seconds: cfg.node_ttl.as_secs(),
            from: "consul.node_ttl".to_owned(),
        },
        ..ConsulPart::default()
    };
    let ConsulName::Service {
        service,
        tag,
        kind,
        dc,
        tenancy,
    } = parsed.name
    else {
        reading.kind = kind_of(&parsed.name).to_owned();
        part.no_view = Some("only service names have instances to explain".to_owned());
        part.answered_by = other_name(
            consul,
            parsed.name,
            question.qtype,
            local_dc,
            &mut reading,
            &mut part,
        )
        .await;
        return (reading, part);
    };
    reading.kind = match kind {
        ServiceKind::Service => "service",
        ServiceKind::Connect => "connect",
        ServiceKind::Ingress => "ingress",
    }
    .to_owned();
    reading.service = Some(service.clone());
    reading.tag = tag.clone();
    reading.datacenter = dc.clone();
    part.ttl = service_ttl(cfg, &service);
    // The same view key the lookup uses: a name spelling out the local datacenter is the
    // local view.
    let dc = dc.filter(|d| Some(d) != local_dc.as_ref());
    let key = ViewKey::new(service, dc, kind, tenancy);
    match backend.peek_service(&key) {
        Ok(peek) => {
            let checks = match backend.service_details(&key).await {
                Ok(entries) => {
                    part.checks_from = "read now from the same source as the view".to_owned();
                    by_instance(entries)
                }
                Err(e) => {
                    part.checks_from = e;
                    ChecksByInstance::new()
                }
            };
            fill_instances(
                &mut part,
                &peek,
                &checks,
                tag.as_deref(),
                question.qtype,
                ask,
                reply,
            );
            part.view = Some(view_info(&peek, contact));
        }
        Err(why) => part.no_view = Some(why),
    }
    (reading, part)
}

/// A service's TTL and the `service_ttl` pattern it comes from.
fn service_ttl(cfg: &crate::config::ConsulConfig, service: &str) -> TtlInfo {
    let (ttl, pattern) = cfg.service_ttl_rule(service);
    TtlInfo {
        seconds: ttl.as_secs(),
        from: pattern.map_or_else(
            || "default (no consul.service_ttl pattern matches)".to_owned(),
            |p| format!("consul.service_ttl[\"{p}\"]"),
        ),
    }
}

/// What answers a node, prepared query or `.addr` name (a service's instances are read above).
async fn other_name(
    consul: &ConsulSource,
    name: ConsulName,
    qtype: RecordType,
    local_dc: Option<String>,
    reading: &mut Reading,
    part: &mut ConsulPart,
) -> Option<names::NameAnswer> {
    let cfg = consul.config();
    let backend = consul.backend();
    let norm = |dc: Option<String>| dc.filter(|d| Some(d) != local_dc.as_ref());
    match name {
        ConsulName::Node { node, dc, tenancy } => {
            reading.datacenter = dc.clone();
            let dc = norm(dc);
            let answered = names::node(
                &**backend,
                &node,
                dc.as_deref(),
                &tenancy,
                qtype,
                cfg.node_meta_txt,
            )
            .await;
            Some(answered)
        }
        ConsulName::Query { query, dc } => {
            reading.datacenter = dc.clone();
            part.ttl = TtlInfo {
                seconds: cfg.service_ttl_for(&query).as_secs(),
                from: "the query's DNS.TTL when it has one, else consul.service_ttl".to_owned(),
            };
            Some(names::query(&**backend, &query, norm(dc).as_deref()).await)
        }
        ConsulName::Addr { ip } => Some(names::addr(ip)),
        _ => None,
    }
}

fn kind_of(name: &ConsulName) -> &'static str {
    match name {
        ConsulName::Service { .. } => "service",
        ConsulName::Virtual { .. } => "virtual",
        ConsulName::Node { .. } => "node",
        ConsulName::Addr { .. } => "addr",
        ConsulName::Query { .. } => "query",
        ConsulName::Apex => "apex",
        ConsulName::Invalid => "invalid",
    }
}

/// One page of instances with their verdicts.
fn fill_instances(
    part: &mut ConsulPart,
    peek: &ViewPeek,
    checks: &ChecksByInstance,
    tag: Option<&str>,
    qtype: RecordType,
    ask: &Ask,
    reply: &InReply,
) {
    let view = &peek.view;
    let all = verdicts(view, tag, qtype, &part.rules, reply);
    part.instance_count = view.instances.len();
    part.pages = view.instances.len().div_ceil(PAGE_SIZE).max(1);
    part.page = ask.page.min(part.pages - 1) + 1;
    let start = (part.page - 1) * PAGE_SIZE;
    part.instances = view
        .instances
        .iter()
        .zip(all)
        .skip(start)
        .take(PAGE_SIZE)
        .map(|(inst, (in_answer, reason))| {
            let checks: Vec<CheckInfo> = checks
                .get(&(inst.node.to_string(), inst.service_id))
                .cloned()
                .unwrap_or_default();
            let address = inst
                .addrs
                .ip_for(qtype)
                .map(|ip| ip.to_string())
                .or_else(|| inst.addrs.host_for(qtype).map(|h| h.to_string()))
                .or_else(|| inst.addrs.ip_for(RecordType::ANY).map(|ip| ip.to_string()))
                .unwrap_or_default();
            InstanceExplanation {
                why: why(reason.as_ref(), &inst.node, &checks, in_answer),
                node: inst.node.to_string(),
                address,
                port: inst.port,
                status: status_name(inst.status).to_owned(),
                checks,
                in_answer,
                reason,
            }
        })
        .collect();
}

fn view_info(peek: &ViewPeek, contact: Option<Duration>) -> ViewInfo {
    let [healthy, warning, critical] = crate::consul::peek::health_counts(&peek.view);
    ViewInfo {
        age_seconds: seconds(peek.confirmed_ago),
        consul_index: peek.index,
        agent: peek.agent.clone(),
        kept_fresh_by: peek.kept_fresh_by.clone(),
        patched_by_feed: peek.patched_by_feed,
        consul_contact_seconds: seconds(contact),
        healthy,
        warning,
        critical,
    }
}

/// The forward zone of a question and the cache's entry for it.
fn forwarded_part(forwarder: &Forwarder, q: &Question) -> (String, ForwardedPart) {
    let (zone, servers) = forwarder.router().route_of(&q.name);
    let now = Instant::now();
    let mut last_answer = LastAnswer {
        summary: "unknown: no cached answer from an upstream for this question".to_owned(),
        ..LastAnswer::default()
    };
    let cache = match forwarder.cache().lookup(q, now) {
        Lookup::Fresh(entry) | Lookup::Expired(entry) => {
            let age = now.saturating_duration_since(entry.stored_at);
            last_answer = last_answer_of(&entry, age);
            let ttl = entry.ttl();
            let rcode: ResponseCode = entry.rcode();
            CacheState {
                state: if age < ttl { "fresh" } else { "stale" }.to_owned(),
                age_seconds: seconds(Some(age)),
                ttl_remaining_seconds: seconds(Some(ttl.saturating_sub(age))),
                stale_for_seconds: (age >= ttl).then(|| seconds(Some(age - ttl))).flatten(),
                rcode: Some(rcode_label(rcode).to_owned()),
            }
        }
        Lookup::Miss => CacheState {
            state: "missing".to_owned(),
            ..CacheState::default()
        },
    };
    let part = ForwardedPart {
        zone: zone.clone(),
        upstreams: servers.iter().map(ToString::to_string).collect(),
        cache,
        failure_remembered: forwarder.cache().failed_recently(q, false, now),
        last_answer,
    };
    (zone, part)
}

/// The upstream exchange a cache entry came from, when it was kept.
fn last_answer_of(entry: &CachedAnswer, age: Duration) -> LastAnswer {
    let rcode = rcode_label(entry.rcode()).to_owned();
    match entry.exchange {
        Some(x) => {
            let latency_ms = f64::from(x.micros) / 1000.0;
            LastAnswer {
                known: true,
                summary: format!(
                    "{rcode} from {} in {latency_ms} ms, {} s ago",
                    x.server,
                    age.as_secs()
                ),
                rcode: Some(rcode),
                upstream: Some(x.server.to_string()),
                latency_ms: Some(latency_ms),
            }
        }
        None => LastAnswer {
            known: false,
            summary: format!("{rcode} cached; which upstream answered, and how fast, is unknown"),
            rcode: Some(rcode),
            ..LastAnswer::default()
        },
    }
}

/// Seconds since Consul last answered, from the gauge the watchers keep.
pub(crate) fn last_contact(metrics: &Metrics) -> Option<Duration> {
    let at = metrics.consul_last_contact.get();
    if at <= 0 {
        return None;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some(Duration::from_secs(
        now.saturating_sub(u64::try_from(at).ok()?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_supplied_parts_are_bounded() {
        let ok = Ask::parse("web.service.consul", Some("srv"), Some("2"), false).expect("ok");
        assert_eq!(ok.qtype, RecordType::SRV);
        assert_eq!(ok.page, 1);
        assert_eq!(
            Ask::parse(&"a.".repeat(200), None, None, false).err(),
            Some(AskError::Name)
        );
        assert_eq!(
            Ask::parse("", None, None, false).err(),
            Some(AskError::Name)
        );
        assert_eq!(
            Ask::parse("wéb.consul", None, None, false).err(),
            Some(AskError::Name)
        );
        assert_eq!(
            Ask::parse("web.consul", Some("NOTATYPE"), None, false).err(),
            Some(AskError::Type)
        );
        assert_eq!(
            Ask::parse("web.consul", None, Some("0"), false).err(),
            Some(AskError::Page)
        );
        assert_eq!(
            Ask::parse("web.consul", None, Some("1001"), false).err(),
            Some(AskError::Page)
        );
    }
}
