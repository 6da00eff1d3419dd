//! "Why is this instance not in the answer?": what the forwarder would do with one question,
//! and why, as a typed [`Explanation`]. The reasons per instance come from a pure function of
//! a view and the rules in force ([`verdicts`]); gathering the view, the checks and the reply
//! is in [`gather`], the HTTP pages in [`pages`], the text and HTML renderings in [`render`],
//! and the status page in [`status`].
//!
//! Explaining asks nothing a DNS query would not: the reply is the one a client would get
//! (through the same handler), the view is read where it is kept, and the only extra request
//! is one read of the checks of a service already watched (`Backend::service_details`).

pub mod client;
pub mod details;
pub mod gather;
pub mod names;
pub(crate) mod pages;
pub(crate) mod render;
pub(crate) mod status;

use std::collections::HashSet;
use std::net::IpAddr;

use hickory_proto::rr::RecordType;
use serde::Serialize;

use crate::config::WhenNoneHealthy;
use crate::consul::catalog::{Instance, ServiceView, Status};
use crate::consul::records;

/// What the forwarder would do with one question, and why.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Explanation {
    pub name: String,
    #[serde(rename = "type")]
    pub qtype: String,
    /// How the name was read.
    pub reading: Reading,
    /// For names answered from Consul's HTTP API or a catalog file.
    pub consul: Option<ConsulPart>,
    /// For forwarded names (and the Consul domain in `consul.mode = "dns"`).
    pub forwarded: Option<ForwardedPart>,
    /// The reply that would be sent now.
    pub reply: ReplyNow,
}

/// How a name was read: which source answers it and what it names there.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Reading {
    /// `service`, `connect`, `ingress`, `node`, `query`, `virtual`, `addr`, `apex`, `invalid`
    /// (a Consul name outside Consul's alphabet: NXDOMAIN at once), `ptr` (a reverse name,
    /// answered by Consul when it knows the address, else forwarded), or `forwarded`.
    pub kind: String,
    pub service: Option<String>,
    pub tag: Option<String>,
    /// The datacenter asked for (none: the local one).
    pub datacenter: Option<String>,
    /// The Consul domain or forward zone that matched (`.` for the default upstreams).
    pub zone: String,
    /// What answers it: `consul http`, `consul catalog file`, `consul dns`, `upstream`.
    pub source: String,
}

/// The Consul side of an explanation.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConsulPart {
    pub view: Option<ViewInfo>,
    /// Why there is no view to show (not watched yet, unknown to Consul, Consul unreachable).
    pub no_view: Option<String>,
    pub ttl: TtlInfo,
    pub rules: Rules,
    /// Instances in the view, all of them; `instances` is one page of them.
    pub instance_count: usize,
    pub page: usize,
    pub pages: usize,
    pub instances: Vec<InstanceExplanation>,
    /// Where the check details come from, or why there are none.
    pub checks_from: String,
    /// For node, prepared query, `.addr` and reverse names: what answers them.
    pub answered_by: Option<names::NameAnswer>,
}

/// The view an answer is built from.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ViewInfo {
    /// Seconds since Consul last confirmed it (none: never confirmed, e.g. a catalog file).
    pub age_seconds: Option<f64>,
    /// `X-Consul-Index` of the response it came from.
    pub consul_index: Option<u64>,
    /// The agent requests go to now.
    pub agent: Option<String>,
    /// `blocking query`, `on demand (no blocking query)`, `catalog file`.
    pub kept_fresh_by: String,
    /// The change feed changed the view since Consul last sent it whole.
    pub patched_by_feed: bool,
    /// Seconds since any Consul agent last answered (none: never, or no Consul).
    pub consul_contact_seconds: Option<f64>,
    pub healthy: usize,
    pub warning: usize,
    pub critical: usize,
}

/// The TTL of the answer and the rule it comes from.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TtlInfo {
    pub seconds: u64,
    /// `consul.service_ttl["<pattern>"]`, `consul.node_ttl`, `prepared query`, ...
    pub from: String,
}

/// The rules in force that decide which instances are served.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Rules {
    pub only_passing: bool,
    pub when_none_healthy_all: bool,
    /// 0: no cap.
    pub a_record_limit: usize,
    /// Applies to UDP clients without EDNS (nginx, glibc); 0: no cap.
    pub udp_answer_limit: usize,
    /// The question is asked as a UDP client without EDNS would ask it.
    pub without_edns: bool,
}

/// One instance: where it is, its checks, and whether the reply has it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InstanceExplanation {
    pub node: String,
    /// The address the question's type gets (or the hostname, for a CNAME answer).
    pub address: String,
    pub port: u16,
    /// The worst of its checks: `passing`, `warning`, `critical`.
    pub status: String,
    pub checks: Vec<CheckInfo>,
    pub in_answer: bool,
    /// Why it is not in the answer, or why it is despite its health.
    pub reason: Option<Reason>,
    /// The reason in a sentence.
    pub why: String,
}

/// One check of an instance (service or node check).
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckInfo {
    pub name: String,
    pub status: String,
    /// The first line of its output, bounded.
    pub output: String,
}

/// Why an instance is left out of (or kept in) an answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum Reason {
    /// A check is critical (or maintenance, or unknown).
    Critical,
    /// A check is warning and `consul.only_passing = true`.
    WarningWhileOnlyPassing,
    /// The name asks for a tag the instance does not have.
    TagFilter { tag: String },
    /// The instance has no address (nor hostname) the question's type can get.
    NoAddressForType,
    /// Eligible, but `consul.a_record_limit` capped the answer.
    ARecordLimit { limit: usize },
    /// Eligible, but `consul.udp_answer_limit` capped the answer (UDP without EDNS).
    UdpAnswerLimit { limit: usize },
    /// Eligible, but the reply had room for only some of the eligible instances.
    SizeTruncation { truncated: bool },
    /// Critical or warning, yet served: no instance is healthy and
    /// `consul.when_none_healthy = "all"`.
    ServedNoneHealthy,
}

/// The reply that would be sent now.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplyNow {
    pub rcode: String,
    pub truncated: bool,
    pub answer_count: usize,
    /// The reply as dig prints it.
    pub text: String,
    pub latency_ms: f64,
    /// The reply was dropped (rate limit) or could not be made.
    pub error: Option<String>,
}

/// The forwarded side of an explanation.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ForwardedPart {
    /// The forward zone chosen (`.`: the default upstreams).
    pub zone: String,
    pub upstreams: Vec<String>,
    /// The cache entry for the question, as it was before this explanation asked.
    pub cache: CacheState,
    /// An upstream failure remembered for the question (answered SERVFAIL without asking).
    pub failure_remembered: bool,
    /// The upstream exchange the cached answer came from, read before this explanation asked
    /// (so its own question never shows here).
    pub last_answer: LastAnswer,
}

/// The last real upstream answer to the question, as kept with its cache entry.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LastAnswer {
    /// Whether it is known: an entry for the question was cached with the exchange it came from.
    pub known: bool,
    pub rcode: Option<String>,
    /// The upstream server that answered.
    pub upstream: Option<String>,
    pub latency_ms: Option<f64>,
    /// What is known, in a sentence.
    pub summary: String,
}

/// A cache entry's state.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CacheState {
    /// `fresh`, `stale` (expired, still served while the upstreams fail), `missing`.
    pub state: String,
    pub age_seconds: Option<f64>,
    pub ttl_remaining_seconds: Option<f64>,
    /// Seconds since a stale entry expired.
    pub stale_for_seconds: Option<f64>,
    pub rcode: Option<String>,
}

/// What a reply carries, to tell which instances are in it.
#[derive(Debug, Default)]
pub(crate) struct InReply {
    pub(crate) ips: HashSet<IpAddr>,
    /// SRV records: port and the target's first label, lowercased.
    pub(crate) srv: HashSet<(u16, String)>,
    /// CNAME targets, lowercased, without the trailing dot.
    pub(crate) hosts: HashSet<String>,
    pub(crate) truncated: bool,
    /// Answer records of the question's own kind (what a cap counts).
    pub(crate) count: usize,
}

/// The verdict on each instance of `view`, in the view's order, for a `qtype` question with
/// `tag` under `rules`, given what the reply carries.
pub(crate) fn verdicts(
    view: &ServiceView,
    tag: Option<&str>,
    qtype: RecordType,
    rules: &Rules,
    reply: &InReply,
) -> Vec<(bool, Option<Reason>)> {
    let when = if rules.when_none_healthy_all {
        WhenNoneHealthy::All
    } else {
        WhenNoneHealthy::Nxdomain
    };
    let selection = records::select(view, tag, rules.only_passing, when);
    let served: HashSet<u32> = selection.all.iter().copied().collect();
    let pool: HashSet<u32> = records::pool(&selection, qtype).iter().copied().collect();
    let eligible = pool.len();
    (0u32..)
        .zip(&view.instances)
        .map(|(at, inst)| {
            let in_answer = carried(inst, qtype, reply);
            let reason = if let Some(t) = tag.filter(|t| !inst.has_tag(t)) {
                Some(Reason::TagFilter { tag: t.to_owned() })
            } else if !served.contains(&at) {
                Some(match inst.status {
                    Status::Critical => Reason::Critical,
                    _ => Reason::WarningWhileOnlyPassing,
                })
            } else if !pool.contains(&at) {
                Some(Reason::NoAddressForType)
            } else if in_answer {
                let unhealthy = inst.status == Status::Critical
                    || (inst.status == Status::Warning && rules.only_passing);
                unhealthy.then_some(Reason::ServedNoneHealthy)
            } else {
                Some(cut_reason(qtype, rules, reply, eligible))
            };
            (in_answer, reason)
        })
        .collect()
}

/// Why an eligible instance is not in the reply: the cap that the answer reached.
fn cut_reason(qtype: RecordType, rules: &Rules, reply: &InReply, eligible: usize) -> Reason {
    let addresses = matches!(qtype, RecordType::A | RecordType::AAAA | RecordType::ANY);
    if addresses && rules.a_record_limit > 0 && reply.count >= rules.a_record_limit.min(eligible) {
        Reason::ARecordLimit {
            limit: rules.a_record_limit,
        }
    } else if rules.without_edns
        && rules.udp_answer_limit > 0
        && reply.count >= rules.udp_answer_limit
    {
        Reason::UdpAnswerLimit {
            limit: rules.udp_answer_limit,
        }
    } else {
        Reason::SizeTruncation {
            truncated: reply.truncated,
        }
    }
}

/// Does the reply carry `inst` for a `qtype` question?
fn carried(inst: &Instance, qtype: RecordType, reply: &InReply) -> bool {
    if qtype == RecordType::SRV {
        let by_node = (inst.port, inst.node.to_string());
        let by_addr = inst
            .addrs
            .ip_for(RecordType::ANY)
            .map(|ip| (inst.port, crate::consul::name::encode_hex_ip(ip)));
        return reply.srv.contains(&by_node) || by_addr.is_some_and(|k| reply.srv.contains(&k));
    }
    match inst.addrs.ip_for(qtype) {
        Some(ip) => reply.ips.contains(&ip),
        None => inst
            .addrs
            .host_for(qtype)
            .is_some_and(|h| reply.hosts.contains(&**h)),
    }
}

/// The reason in a sentence, naming the checks that decided it.
pub(crate) fn why(
    reason: Option<&Reason>,
    node: &str,
    checks: &[CheckInfo],
    in_answer: bool,
) -> String {
    let named = |status: &str| {
        let names: Vec<String> = checks
            .iter()
            .filter(|c| c.status == status)
            .map(|c| format!("\"{}\"", c.name))
            .collect();
        if names.is_empty() {
            format!("a {status} check")
        } else {
            format!("{status} check {}", names.join(", "))
        }
    };
    match reason {
        None if in_answer => "in the answer".to_owned(),
        None => "not in this reply".to_owned(),
        Some(Reason::Critical) => format!("left out: {} on node {node}", named("critical")),
        Some(Reason::WarningWhileOnlyPassing) => format!(
            "left out: {} on node {node} while consul.only_passing = true",
            named("warning")
        ),
        Some(Reason::TagFilter { tag }) => {
            format!("left out: the name asks for tag \"{tag}\", which this instance does not have")
        }
        Some(Reason::NoAddressForType) => {
            "left out: no address of the family the question asks for".to_owned()
        }
        Some(Reason::ARecordLimit { limit }) => format!(
            "eligible, not in this reply: consul.a_record_limit = {limit} caps the answer (a new sample for every reply)"
        ),
        Some(Reason::UdpAnswerLimit { limit }) => format!(
            "eligible, not in this reply: consul.udp_answer_limit = {limit} caps answers to UDP clients without EDNS (a new sample for every reply)"
        ),
        Some(Reason::SizeTruncation { truncated }) => format!(
            "eligible, not in this reply: the reply had no room for it{}",
            if *truncated { " (TC=1 set: the client may retry over TCP)" } else { "" }
        ),
        Some(Reason::ServedNoneHealthy) => {
            "in the answer although not healthy: no instance is, and consul.when_none_healthy = \"all\"".to_owned()
        }
    }
}

/// `status` as Consul spells it.
pub(crate) fn status_name(status: Status) -> &'static str {
    match status {
        Status::Passing => "passing",
        Status::Warning => "warning",
        Status::Critical => "critical",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::addrs::Addrs;
    use crate::consul::catalog::Instance;
    use std::sync::Arc;

    fn inst(node: &str, ip: &str, status: Status, tags: &[&str]) -> Instance {
        Instance {
            node: node.into(),
            service_id: 0,
            addrs: Addrs::ip(ip.parse().expect("ip"), true),
            port: 8080,
            tags: tags.iter().map(|t| Arc::from(*t)).collect(),
            status,
            weight_passing: 1,
            weight_warning: 1,
            node_meta: Arc::default(),
        }
    }

    fn reply_with(ips: &[&str], truncated: bool) -> InReply {
        InReply {
            ips: ips.iter().map(|i| i.parse().expect("ip")).collect(),
            count: ips.len(),
            truncated,
            ..InReply::default()
        }
    }

    fn rules() -> Rules {
        Rules {
            only_passing: false,
            when_none_healthy_all: false,
            a_record_limit: 0,
            udp_answer_limit: 3,
            without_edns: false,
        }
    }

    fn one(
        view: &ServiceView,
        tag: Option<&str>,
        rules: &Rules,
        reply: &InReply,
    ) -> Vec<(bool, Option<Reason>)> {
        verdicts(view, tag, RecordType::A, rules, reply)
    }

    #[test]
    fn critical_instance_is_left_out_and_named() {
        let view = ServiceView::new(
            vec![
                inst("n1", "10.0.0.1", Status::Passing, &[]),
                inst("n2", "10.0.0.2", Status::Critical, &[]),
            ],
            "dc1",
        );
        let v = one(&view, None, &rules(), &reply_with(&["10.0.0.1"], false));
        assert_eq!(v, vec![(true, None), (false, Some(Reason::Critical))]);
        let checks = vec![CheckInfo {
            name: "http".into(),
            status: "critical".into(),
            output: "connection refused".into(),
        }];
        assert_eq!(
            why(v[1].1.as_ref(), "n2", &checks, false),
            "left out: critical check \"http\" on node n2"
        );
    }

    #[test]
    fn warning_is_served_unless_only_passing() {
        let view = ServiceView::new(
            vec![
                inst("n1", "10.0.0.1", Status::Passing, &[]),
                inst("n2", "10.0.0.2", Status::Warning, &[]),
            ],
            "dc1",
        );
        let both = reply_with(&["10.0.0.1", "10.0.0.2"], false);
        assert_eq!(
            one(&view, None, &rules(), &both),
            vec![(true, None), (true, None)]
        );
        let strict = Rules {
            only_passing: true,
            ..rules()
        };
        let v = one(&view, None, &strict, &reply_with(&["10.0.0.1"], false));
        assert_eq!(v[1], (false, Some(Reason::WarningWhileOnlyPassing)));
        assert!(why(v[1].1.as_ref(), "n2", &[], false).contains("only_passing"));
    }

    #[test]
    fn tag_filter_comes_before_health() {
        let view = ServiceView::new(
            vec![
                inst("n1", "10.0.0.1", Status::Passing, &["v1"]),
                inst("n2", "10.0.0.2", Status::Critical, &["v2"]),
            ],
            "dc1",
        );
        let v = one(
            &view,
            Some("v1"),
            &rules(),
            &reply_with(&["10.0.0.1"], false),
        );
        assert_eq!(v[1], (false, Some(Reason::TagFilter { tag: "v1".into() })));
    }

    #[test]
    fn caps_name_the_limit_that_applied() {
        let view = ServiceView::new(
            (1..=5)
                .map(|i| {
                    inst(
                        &format!("n{i}"),
                        &format!("10.0.0.{i}"),
                        Status::Passing,
                        &[],
                    )
                })
                .collect(),
            "dc1",
        );
        let two = reply_with(&["10.0.0.1", "10.0.0.2"], false);
        let capped = Rules {
            a_record_limit: 2,
            ..rules()
        };
        let v = one(&view, None, &capped, &two);
        assert_eq!(v[4], (false, Some(Reason::ARecordLimit { limit: 2 })));
        let three = reply_with(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], false);
        let no_edns = Rules {
            without_edns: true,
            ..rules()
        };
        let v = one(&view, None, &no_edns, &three);
        assert_eq!(v[4], (false, Some(Reason::UdpAnswerLimit { limit: 3 })));
        // With EDNS udp_answer_limit does not apply: the size did.
        let v = one(
            &view,
            None,
            &rules(),
            &reply_with(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], true),
        );
        assert_eq!(
            v[4],
            (false, Some(Reason::SizeTruncation { truncated: true }))
        );
    }

    #[test]
    fn none_healthy_all_serves_critical_and_says_so() {
        let view = ServiceView::new(vec![inst("n1", "10.0.0.1", Status::Critical, &[])], "dc1");
        let all = Rules {
            when_none_healthy_all: true,
            ..rules()
        };
        let v = one(&view, None, &all, &reply_with(&["10.0.0.1"], false));
        assert_eq!(v, vec![(true, Some(Reason::ServedNoneHealthy))]);
        let v = one(&view, None, &rules(), &reply_with(&[], false));
        assert_eq!(v, vec![(false, Some(Reason::Critical))]);
    }

    #[test]
    fn no_address_of_the_family() {
        let view = ServiceView::new(
            vec![
                inst("n1", "10.0.0.1", Status::Passing, &[]),
                inst("n2", "2001:db8::2", Status::Passing, &[]),
            ],
            "dc1",
        );
        let v = one(&view, None, &rules(), &reply_with(&["10.0.0.1"], false));
        assert_eq!(v[1], (false, Some(Reason::NoAddressForType)));
    }

    #[test]
    fn srv_records_match_by_node_and_port() {
        let view = ServiceView::new(
            vec![
                inst("n1", "10.0.0.1", Status::Passing, &[]),
                inst("n2", "10.0.0.2", Status::Passing, &[]),
            ],
            "dc1",
        );
        let reply = InReply {
            srv: [(8080, "n2".to_owned())].into_iter().collect(),
            count: 1,
            ..InReply::default()
        };
        let v = verdicts(&view, None, RecordType::SRV, &rules(), &reply);
        assert_eq!(v[1], (true, None));
        assert_eq!(
            v[0],
            (false, Some(Reason::SizeTruncation { truncated: false }))
        );
    }
}
