//! dig (BIND's client, an independent DNS implementation) against the forwarder binary for
//! Consul names: TCP, no EDNS, truncation and the TCP retry, SRV in RFC 2782 form, and every
//! SRV target asked on its own (as nginx's `service=` does). cli_and_config_files.rs covers forwarded names.

use crate::support::consul_sim::{ConsulSim, SimNode, SimService, Status};
use crate::support::e2e::{dig_command, Forwarder};
use crate::support::upstream::TestUpstream;

pub(crate) async fn dig(port: u16, args: &[&str]) -> String {
    let out = tokio::process::Command::from(dig_command(port, args))
        .output()
        .await
        .expect("dig is installed (bind9-dnsutils, scripts/test.sh installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The records of one section of dig's output (`ANSWER`, `AUTHORITY`, `ADDITIONAL`), each
/// split into fields: name, TTL, class, type, data...
pub(crate) fn section(out: &str, name: &str) -> Vec<Vec<String>> {
    let header = format!(";; {name} SECTION:");
    out.lines()
        .skip_while(|l| l.trim() != header)
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// The data of the `rtype` records in the answer section, sorted.
pub(crate) fn answers(out: &str, rtype: &str) -> Vec<String> {
    let mut v: Vec<String> = section(out, "ANSWER")
        .into_iter()
        .filter(|f| f.get(3).is_some_and(|t| t == rtype))
        .map(|f| f[4..].join(" "))
        .collect();
    v.sort();
    v
}

pub(crate) fn flags(out: &str) -> String {
    out.lines()
        .find_map(|l| l.split_once(";; flags: "))
        .map(|(_, rest)| rest.split(';').next().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn node(sim: &ConsulSim, name: &str, addr: &str) {
    sim.add_node(SimNode::new(name, addr));
}

fn service(sim: &ConsulSim, id: &str, name: &str, node: &str, addr: &str, port: u16) {
    sim.add_service(
        SimService {
            address: addr.into(),
            ..SimService::new(id, name, node, port)
        },
        Status::Passing,
    );
}

/// web-1..3 on n1..n3 (127.0.0.2-4, node addresses, port 8080) and api-1 on n9 (127.0.0.5) at
/// its own address, 127.0.0.9:9090; all passing.
async fn web_and_api() -> ConsulSim {
    let sim = ConsulSim::start().await;
    for (i, ip) in ["127.0.0.2", "127.0.0.3", "127.0.0.4"].iter().enumerate() {
        let n = i + 1;
        node(&sim, &format!("n{n}"), ip);
        service(&sim, &format!("web-{n}"), "web", &format!("n{n}"), "", 8080);
    }
    // An instance whose own address differs from its node's.
    node(&sim, "n9", "127.0.0.5");
    service(&sim, "api-1", "api", "n9", "127.0.0.9", 9090);
    sim
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_asks_consul_names_over_udp_tcp_with_and_without_edns() {
    let sim = web_and_api().await;
    // 60 instances: too big for 512 bytes.
    for i in 1..=60 {
        node(&sim, &format!("m{i}"), &format!("127.0.1.{i}"));
        service(
            &sim,
            &format!("many-{i}"),
            "many",
            &format!("m{i}"),
            "",
            7000,
        );
    }
    let up = TestUpstream::start().await;
    let url = sim.http_url();
    let upstream = up.addr.to_string();
    let fwd = Forwarder::spawn(&["--consul-http", &url, "--upstream", &upstream]).await;
    let port = fwd.port;
    let web = vec!["127.0.0.2", "127.0.0.3", "127.0.0.4"];

    let out = dig(port, &["web.service.consul"]).await;
    assert!(out.contains("status: NOERROR"), "{out}");
    assert_eq!(answers(&out, "A"), web, "{out}");
    let f = flags(&out);
    assert!(
        f.contains("aa") && f.contains("ra") && !f.contains("ad"),
        "flags {f}"
    );
    assert!(
        out.contains("OPT PSEUDOSECTION"),
        "EDNS query, OPT in the reply: {out}"
    );
    assert!(
        section(&out, "ANSWER").iter().all(|r| r[1] == "5"),
        "TTL 5: {out}"
    );

    let out = dig(port, &["+tcp", "web.service.consul"]).await;
    assert!(out.contains("(TCP)"), "{out}");
    assert_eq!(answers(&out, "A"), web, "over TCP: {out}");

    let out = dig(port, &["+noedns", "web.service.consul"]).await;
    assert_eq!(answers(&out, "A"), web, "without EDNS: {out}");
    assert!(
        !out.contains("OPT PSEUDOSECTION"),
        "no OPT without EDNS: {out}"
    );

    let out = dig(port, &["AAAA", "web.service.consul"]).await;
    assert!(
        out.contains("status: NOERROR"),
        "IPv4-only service: AAAA NODATA: {out}"
    );
    assert!(section(&out, "ANSWER").is_empty(), "{out}");
    assert!(
        section(&out, "AUTHORITY").iter().any(|r| r[3] == "SOA"),
        "{out}"
    );

    // Truncation: TC=1 over UDP without EDNS, then dig's own retry over TCP gets everything.
    let out = dig(port, &["+noedns", "+ignore", "many.service.consul"]).await;
    assert!(flags(&out).contains("tc"), "TC=1: {out}");
    let out = dig(port, &["+noedns", "many.service.consul"]).await;
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert_eq!(answers(&out, "A").len(), 60, "{out}");
    let out = dig(port, &["+noedns", "SRV", "_many._tcp.service.consul"]).await;
    assert_eq!(
        answers(&out, "SRV").len(),
        60,
        "SRV over the TCP retry: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_srv_targets_resolve_on_their_own() {
    let sim = web_and_api().await;
    sim.set_service_check("web-3", Status::Critical);
    let up = TestUpstream::start().await;
    let url = sim.http_url();
    let upstream = up.addr.to_string();
    let fwd = Forwarder::spawn(&["--consul-http", &url, "--upstream", &upstream]).await;
    let port = fwd.port;

    for extra in [&[][..], &["+tcp"][..], &["+noedns"][..]] {
        let mut args = extra.to_vec();
        args.extend(["SRV", "_web._tcp.service.consul"]);
        let out = dig(port, &args).await;
        assert!(out.contains("status: NOERROR"), "{args:?}: {out}");
        let srv = answers(&out, "SRV");
        assert_eq!(srv.len(), 2, "the two healthy instances ({args:?}): {out}");
        let mut resolved = Vec::new();
        for record in &srv {
            // priority weight port target
            let f: Vec<&str> = record.split_whitespace().collect();
            assert_eq!(f[2], "8080", "{record}");
            let target = f[3];
            assert!(target.ends_with(".node.dc1.consul."), "{record}");
            let alone = dig(port, &["+short", target]).await;
            resolved.push(alone.trim().to_string());
            let aaaa = dig(port, &["AAAA", target]).await;
            assert!(
                aaaa.contains("status: NOERROR") && section(&aaaa, "ANSWER").is_empty(),
                "AAAA of an IPv4 node is NODATA: {aaaa}"
            );
        }
        resolved.sort();
        assert_eq!(resolved, vec!["127.0.0.2", "127.0.0.3"], "{args:?}");
    }

    // An instance with its own address: the target is <hex>.addr, which resolves to it.
    let out = dig(port, &["SRV", "_api._tcp.service.consul"]).await;
    let srv = answers(&out, "SRV");
    assert_eq!(srv, vec!["1 1 9090 7f000009.addr.dc1.consul."], "{out}");
    let out = dig(port, &["+short", "7f000009.addr.dc1.consul"]).await;
    assert_eq!(out.trim(), "127.0.0.9");
    let out = dig(port, &["+short", "api.service.consul"]).await;
    assert_eq!(
        out.trim(),
        "127.0.0.9",
        "A of the service: the service address"
    );
}

/// The names issue 15 listed as answered differently from Consul's DNS, asked with dig against
/// the binary: a reverse name of a node's address, a `.connect` name, a cluster peer's
/// service, an RFC 2782 prepared query, and AAAA of a dual-stack node (its `lan_ipv6` tagged
/// address). Each output is printed (`--nocapture`) for the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_gets_ptr_connect_peer_prepared_query_and_dual_stack_answers() {
    use crate::support::consul_sim::SimMesh;
    let sim = ConsulSim::start().await;
    node(&sim, "web-node", "127.0.0.2");
    service(&sim, "web-1", "web", "web-node", "", 8080);
    // A dual-stack node (its SRV targets would be `.addr` names, as Consul's are: Consul then
    // prefers the IPv6 tagged address for SRV).
    node(&sim, "db-node", "127.0.0.3");
    sim.set_node_tagged_addresses(
        "db-node",
        &[("lan_ipv4", "127.0.0.3"), ("lan_ipv6", "fd00::3")],
    );
    service(&sim, "db-1", "db", "db-node", "", 5432);
    sim.add_service_with(
        SimService::new("web-1-sidecar", "web-sidecar-proxy", "web-node", 21000),
        SimMesh::sidecar("web"),
        Status::Passing,
    );
    sim.add_peering("p1");
    sim.add_node_in(SimNode::new("peer-node", "127.0.1.1"), Some("p1"), None);
    sim.add_service(
        SimService::new("api-p1", "api", "peer-node", 9090),
        Status::Passing,
    );
    sim.add_prepared_query("geo", "web", None, None);
    let up = TestUpstream::start().await;
    let url = sim.http_url();
    let upstream = up.addr.to_string();
    let fwd = Forwarder::spawn(&["--consul-http", &url, "--upstream", &upstream]).await;
    let port = fwd.port;

    let cases: [(&[&str], &str, &[&str]); 5] = [
        (&["-x", "127.0.0.2"], "PTR", &["web-node.node.dc1.consul."]),
        (
            &["web.connect.consul", "SRV"],
            "SRV",
            &["1 1 21000 web-node.node.dc1.consul."],
        ),
        (&["api.service.p1.peer.consul"], "A", &["127.0.1.1"]),
        (
            &["_geo._tcp.query.consul", "SRV"],
            "SRV",
            &["1 1 8080 web-node.node.dc1.consul."],
        ),
        (&["db.service.consul", "AAAA"], "AAAA", &["fd00::3"]),
    ];
    for (args, rtype, want) in cases {
        let out = dig(port, args).await;
        println!("$ dig {}\n{out}", args.join(" "));
        assert!(out.contains("status: NOERROR"), "{out}");
        assert!(flags(&out).contains("aa"), "authoritative: {out}");
        assert_eq!(answers(&out, rtype), want, "{out}");
    }
}
