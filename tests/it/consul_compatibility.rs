//! docs/consul-compatibility.md is kept true here: every example question of its name-form table
//! is asked of a forwarder in HTTP mode (the simulator's HTTP API) and must get the rcode and the
//! answer count the table promises; every `dns_config` row that names a config key must be
//! accepted with the value shown. Then the same questions go to a forwarder in DNS mode (the
//! simulator's agent-style DNS port standing in for Consul) and the two modes are compared: the
//! differences accepted are listed in `ACCEPTED_MODE_DIFFERENCES`, each with its reason.

use std::str::FromStr;

use crate::support::consul_sim::{ConsulSim, SimNode, SimService, Status};
use crate::support::upstream::TestUpstream;
use crate::support::*;
use consul_dns_forwarder::config::Config;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};

const DOC: &str = include_str!("../../docs/consul-compatibility.md");

/// Questions whose answers differ between HTTP mode and DNS mode (where the agent's own DNS
/// answers), and why. Everything else must get the same rcode and the same answer records
/// (TTLs and order aside: DNS mode floors Consul's TTL 0 and both shuffle).
const ACCEPTED_MODE_DIFFERENCES: &[(&str, &str)] = &[
    (
        "web.service.consul ANY",
        "DNS mode is a forward zone, and every forwarded ANY gets RFC 8482's HINFO answer \
         (ANY is an amplification vector; the agent's own answer is not asked for)",
    ),
    (
        "consul A",
        "the apex asked another type than SOA or NS is NODATA in HTTP mode, where Consul says \
         NXDOMAIN (which would deny every name below the apex to an RFC 8020 resolver)",
    ),
    (
        "2.0.0.127.in-addr.arpa PTR",
        "DNS mode forwards reverse names upstream unless consul.reverse_networks lists their \
         network: the forwarder does not know Consul's addresses there",
    ),
    (
        "2.0.0.127.in-addr.arpa ANY",
        "as the PTR question above; forwarded, and ANY gets RFC 8482's HINFO",
    ),
];

/// One row of the name-form table.
#[derive(Debug)]
struct NameRow {
    form: String,
    name: String,
    qtype: RecordType,
    rcode: ResponseCode,
    answers: usize,
    answer_type: Option<RecordType>,
}

/// The cells of the table rows under `heading` (up to the next heading), header and rule skipped.
fn table(heading: &str) -> Vec<Vec<String>> {
    let section = DOC
        .split("\n## ")
        .find(|s| s.starts_with(heading))
        .unwrap_or_else(|| panic!("no section {heading:?} in docs/consul-compatibility.md"));
    section
        .lines()
        .filter(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect()
}

fn unquote(cell: &str) -> &str {
    cell.trim().trim_matches('`')
}

fn name_rows() -> Vec<NameRow> {
    table("Name forms")
        .into_iter()
        .map(|cells| {
            assert_eq!(cells.len(), 5, "a name-form row has 5 cells: {cells:?}");
            let (name, qtype) = unquote(&cells[1])
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("example {:?} is not `name TYPE`", cells[1]));
            let mut expect = cells[3].split(|c: char| c == ',' || c.is_whitespace());
            let mut next = || expect.find(|w| !w.is_empty()).unwrap_or("");
            let rcode = match next() {
                "NOERROR" => ResponseCode::NoError,
                "NXDOMAIN" => ResponseCode::NXDomain,
                "NOTIMP" => ResponseCode::NotImp,
                "SERVFAIL" => ResponseCode::ServFail,
                "REFUSED" => ResponseCode::Refused,
                other => panic!("row {:?}: unknown rcode {other:?}", cells[0]),
            };
            let answers = next()
                .parse()
                .unwrap_or_else(|_| panic!("row {:?}: no answer count", cells[0]));
            let answer_type = RecordType::from_str(next()).ok();
            NameRow {
                form: cells[0].clone(),
                name: format!("{name}."),
                qtype: RecordType::from_str(qtype).expect("record type"),
                rcode,
                answers,
                answer_type,
            }
        })
        .collect()
}

/// The fixture the document describes.
async fn fixture() -> ConsulSim {
    let sim = ConsulSim::start().await;
    for (n, addr) in [
        ("n1", "127.0.0.2"),
        ("n2", "127.0.0.3"),
        ("n3", "127.0.0.4"),
    ] {
        sim.add_node(SimNode::new(n, addr).meta("rack", "r1"));
    }
    for (id, node, tags) in [
        ("web-1", "n1", &["v1", "primary"][..]),
        ("web-2", "n2", &["v2"]),
        ("web-3", "n3", &["v2"]),
    ] {
        let instance = SimService::new(id, "web", node, 8080).tags(tags);
        sim.add_service(instance, Status::Passing);
    }
    sim.add_service(SimService::new("db-1", "db", "n1", 8080), Status::Critical);
    sim.add_prepared_query("geo", "web", Some("v2"), Some("10s"));
    sim.add_server("srv-1", "127.0.0.10");
    // A dual-stack node: its IPv6 address is a tagged one, as an agent with
    // `advertise_addr_ipv6` registers it.
    let mut dual = SimNode::new("n4", "127.0.0.5");
    dual.tagged_addresses
        .insert("lan_ipv6".to_owned(), "::5".to_owned());
    sim.add_node(dual);
    sim.add_service(SimService::new("ds-1", "ds", "n4", 8080), Status::Passing);
    sim
}

fn summary(m: &Message) -> String {
    let types: Vec<String> = m
        .answers
        .iter()
        .map(|r| r.record_type().to_string())
        .collect();
    format!("{} {:?}", m.metadata.response_code, types)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_name_form_answers_as_the_document_says() {
    let rows = name_rows();
    assert!(rows.len() >= 25, "only {} rows read", rows.len());
    let sim = fixture().await;
    let up = TestUpstream::start().await;
    let toml = TestConfig::new()
        .upstream(up.addr)
        .consul_http(sim.http_url())
        .toml();
    let fwd = TestServer::start(&toml).await;
    let mut wrong = Vec::new();
    for row in &rows {
        let reply = ask(fwd.addr, &row.name, row.qtype).await;
        let typed = row.answer_type.map_or(reply.answers.len(), |t| {
            reply
                .answers
                .iter()
                .filter(|r| r.record_type() == t)
                .count()
        });
        if reply.metadata.response_code != row.rcode
            || reply.answers.len() != row.answers
            || typed != row.answers
        {
            wrong.push(format!(
                "{} ({} {}): document says {} {} {:?}, got {}",
                row.form,
                row.name,
                row.qtype,
                row.rcode,
                row.answers,
                row.answer_type,
                summary(&reply)
            ));
        }
    }
    fwd.stop().await;
    assert!(wrong.is_empty(), "rows not true:\n{}", wrong.join("\n"));
}

#[test]
fn every_option_with_a_config_key_is_accepted_as_shown() {
    let mut checked = 0;
    for cells in table("`dns_config` options") {
        assert_eq!(cells.len(), 4, "an option row has 4 cells: {cells:?}");
        for setting in cells[2].split('`').skip(1).step_by(2) {
            let Some((key, value)) = setting.split_once(" = ") else {
                continue;
            };
            let (section, key) = key.split_once('.').expect("section.key");
            let toml = format!("[{section}]\n{key} = {value}\n");
            if let Err(e) = Config::from_toml_str(&toml, "docs/consul-compatibility.md") {
                panic!("option {}: `{setting}` is refused: {e}", cells[0]);
            }
            checked += 1;
        }
    }
    assert!(checked >= 9, "only {checked} settings found");
}

/// An answer's records as comparable text, TTLs left out.
fn records(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::SOA(_) => "SOA".to_owned(),
            data => format!("{} {} {data}", r.name, r.record_type()),
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_mode_and_dns_mode_agree_but_for_the_listed_differences() {
    let sim = fixture().await;
    let up = TestUpstream::start().await;
    let http = TestServer::start(
        &TestConfig::new()
            .upstream(up.addr)
            .consul_http(sim.http_url())
            .toml(),
    )
    .await;
    let dns = TestServer::start(
        &TestConfig::new()
            .upstream(up.addr)
            .consul(&format!("mode = \"dns\"\ndns = [\"{}\"]", sim.dns_addr()))
            .toml(),
    )
    .await;
    let mut differences = Vec::new();
    for row in name_rows() {
        let a = ask(http.addr, &row.name, row.qtype).await;
        let b = ask(dns.addr, &row.name, row.qtype).await;
        let same =
            a.metadata.response_code == b.metadata.response_code && records(&a) == records(&b);
        let question = format!("{} {}", row.name.trim_end_matches('.'), row.qtype);
        let accepted = ACCEPTED_MODE_DIFFERENCES
            .iter()
            .any(|(q, _)| *q == question);
        if !same && !accepted {
            differences.push(format!(
                "{question}: http {} {:?}, dns {} {:?}",
                a.metadata.response_code,
                records(&a),
                b.metadata.response_code,
                records(&b)
            ));
        }
        if same && accepted {
            differences.push(format!(
                "{question}: listed as different, but the modes agree"
            ));
        }
    }
    http.stop().await;
    dns.stop().await;
    assert!(
        differences.is_empty(),
        "unlisted differences between the modes:\n{}",
        differences.join("\n")
    );
}
