//! DNSSEC bits from clients that Consul answers never follow: Consul's answers are unsigned, as
//! Consul's own DNS interface gives them, so a client's DO, AD and CD change nothing in them but
//! the echo (DO in the OPT record, CD in the header), in the HTTP mode and in the DNS mode
//! alike. (Forwarded names with a real signed zone: e2e_dnssec.rs.)

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;

use crate::support::consul_sim::ConsulSim;
use crate::support::upstream::TestUpstream;
use crate::support::*;

/// `web.service.consul. A` as a validating stub asks it: EDNS with DO, AD and CD set.
fn dnssec_query(name: &str, qtype: RecordType) -> Message {
    let mut q = make_query(name, qtype, Some(1232));
    q.metadata.authentic_data = true;
    q.metadata.checking_disabled = true;
    if let Some(edns) = q.edns.as_mut() {
        edns.set_dnssec_ok(true);
    }
    q
}

fn record_types(m: &Message) -> Vec<RecordType> {
    m.answers
        .iter()
        .chain(&m.authorities)
        .chain(&m.additionals)
        .map(|r| r.record_type())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_answers_are_unsigned_whatever_dnssec_bits_the_client_sets() {
    let sim = ConsulSim::start().await;
    sim.add_simple("web", "n1", "127.0.0.2", 80);
    sim.add_simple("web", "n2", "127.0.0.3", 80);
    let up = TestUpstream::start().await;
    let base = TestConfig::new().upstream(up.addr);
    for (mode, config) in [
        ("http", base.clone().consul_http(sim.http_url())),
        ("dns", base.clone().consul_dns(sim.dns_addr())),
    ] {
        let fwd = TestServer::start(&config.toml()).await;
        for (name, qtype) in [
            ("web.service.consul.", RecordType::A),
            ("_web._tcp.service.consul.", RecordType::SRV),
            ("nowhere.service.consul.", RecordType::A),
        ] {
            let plain = udp(fwd.addr, &make_query(name, qtype, Some(1232))).await;
            let dnssec_queries = sim.dns_queries();
            let signed = udp(fwd.addr, &dnssec_query(name, qtype)).await;
            let what = format!("{mode} mode, {name} {qtype}");
            assert!(!signed.metadata.authentic_data, "{what}: AD clear");
            assert!(signed.metadata.checking_disabled, "{what}: CD echoed");
            assert!(
                signed.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
                "{what}: DO echoed"
            );
            assert_eq!(signed.metadata.response_code, plain.metadata.response_code);
            let mut got = record_types(&signed);
            let mut unsigned = record_types(&plain);
            got.sort_by_key(|t| u16::from(*t));
            unsigned.sort_by_key(|t| u16::from(*t));
            assert_eq!(got, unsigned, "{what}: the same records, none of DNSSEC's");
            if mode == "dns" {
                assert_eq!(
                    sim.dns_queries(),
                    dnssec_queries,
                    "{what}: the agent is asked without DO or CD, so the cached answer serves"
                );
            }
        }
        fwd.stop().await;
    }
}
