//! UDP replies go out with Don't Fragment set (`server::forbid_fragmentation`, RFC 9715): one
//! larger than the interface's MTU is never fragmented; the client gets the same reply cut to
//! its question with TC=1 and asks again over TCP, where it gets every record.
//!
//! The interface is `lo` of a network namespace of the test's own (`unshare --net`, root), with
//! its MTU lowered to 1000 bytes: the 70 A records of `big.service.consul` (a reply of about
//! 1,170 bytes, under the client's EDNS size of 1232) do not fit in one 1000-byte datagram. With
//! fragmentation allowed (the kernel's default for UDP sockets) the reply would arrive whole, in
//! two fragments, and dig would see no TC.

use crate::support::e2e::in_new_network_namespace;
use crate::support::BIN;

/// Instances of the large service: at 16 bytes per A record, more than 1000 bytes of answers,
/// and fewer than fit in a 1232-byte reply (so the only cut is the one the MTU forces).
const BIG_INSTANCES: usize = 70;

/// The namespace's `lo` MTU.
const MTU: usize = 1000;

fn catalog() -> String {
    let entry = |service: &str, i: usize| {
        format!(
            r#"{{"Node": {{"Node": "{service}-n{i}", "Address": "10.7.{}.{}", "Datacenter": "dc1"}},
                "Service": {{"ID": "{service}-{i}", "Service": "{service}", "Address": "", "Port": 80}},
                "Checks": [{{"CheckID": "serfHealth", "Status": "passing"}}]}}"#,
            i / 250,
            i % 250 + 1
        )
    };
    let big: Vec<String> = (0..BIG_INSTANCES).map(|i| entry("big", i)).collect();
    let small: Vec<String> = (0..3).map(|i| entry("small", i)).collect();
    format!(
        r#"{{"big": [{}], "small": [{}]}}"#,
        big.join(","),
        small.join(",")
    )
}

/// Runs the forwarder on the catalog in a namespace whose `lo` has MTU `mtu` and prints, in
/// sections: dig's view of the UDP reply alone (`+ignore`), dig's whole exchange (with its
/// retry over TCP), the small service over UDP, and the truncation counter.
fn in_namespace(mtu: usize) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("catalog.json");
    std::fs::write(&path, catalog()).expect("write the catalog");
    let dig = "dig @127.0.0.1 -p 1053 +bufsize=1232 +time=2 +tries=1";
    let script = format!(
        r#"set -eu
ip link set lo up mtu {mtu}
"{BIN}" --listen 127.0.0.1:1053 --metrics-listen 127.0.0.1:9153 --upstream 127.0.0.1:9 \
  --catalog-file "{catalog}" >/dev/null 2>&1 &
pid=$!
trap 'kill $pid; wait $pid || true' EXIT
for _ in $(seq 100); do
  {dig} +short small.service.consul A | grep -q . && break
  sleep 0.1
done
echo "== udp"
{dig} +ignore big.service.consul A
echo "== retried"
{dig} big.service.consul A
echo "== small"
{dig} +ignore small.service.consul A
echo "== metrics"
curl -s http://127.0.0.1:9153/metrics | grep '^consul_dns_forwarder_truncated_responses_total'
"#,
        catalog = path.display()
    );
    in_new_network_namespace(&script)
}

/// The part of `out` after `== name` and before the next section.
fn section<'a>(out: &'a str, name: &str) -> &'a str {
    let start = out
        .find(&format!("== {name}\n"))
        .unwrap_or_else(|| panic!("no section {name} in:\n{out}"));
    let rest = &out[start + name.len() + 4..];
    &rest[..rest.find("\n== ").unwrap_or(rest.len())]
}

/// dig's flags line of the last reply in `dig` (`;; flags: qr aa rd ra;`).
fn flags(dig: &str) -> &str {
    dig.lines()
        .rev()
        .find(|l| l.starts_with(";; flags:"))
        .unwrap_or_else(|| panic!("no reply in:\n{dig}"))
}

fn a_records(dig: &str) -> usize {
    dig.lines()
        .filter(|l| l.contains("\tIN\tA\t") && !l.starts_with(';'))
        .count()
}

#[test]
fn a_reply_larger_than_the_mtu_is_cut_to_tc_and_whole_over_tcp() {
    let out = in_namespace(MTU);
    let udp = section(&out, "udp");
    assert!(
        flags(udp).contains(" tc"),
        "the UDP reply is not truncated: it was sent in fragments\n{udp}"
    );
    assert_eq!(a_records(udp), 0, "{udp}");
    assert!(udp.contains("ANSWER: 0"), "{udp}");
    assert!(
        udp.contains("; EDNS: version: 0"),
        "the cut reply keeps its OPT record\n{udp}"
    );
    let retried = section(&out, "retried");
    assert!(
        retried.contains("Truncated, retrying in TCP mode"),
        "{retried}"
    );
    assert!(retried.contains("status: NOERROR"), "{retried}");
    assert_eq!(a_records(retried), BIG_INSTANCES, "{retried}");
    let small = section(&out, "small");
    assert!(!flags(small).contains(" tc"), "{small}");
    assert_eq!(a_records(small), 3, "{small}");
    // Both UDP replies to big were cut: the first answered by the general path (sent from a
    // task of its own), the second from the pre-encoded records (sent in a batch).
    let metrics = section(&out, "metrics");
    assert!(
        metrics.contains("consul_dns_forwarder_truncated_responses_total{protocol=\"udp\"} 2"),
        "each UDP reply cut for the MTU is counted\n{metrics}"
    );
}

#[test]
fn a_reply_within_the_mtu_is_sent_whole() {
    let out = in_namespace(65_536);
    let udp = section(&out, "udp");
    assert!(!flags(udp).contains(" tc"), "{udp}");
    assert_eq!(a_records(udp), BIG_INSTANCES, "{udp}");
    assert!(
        section(&out, "metrics")
            .contains("consul_dns_forwarder_truncated_responses_total{protocol=\"udp\"} 0"),
        "{out}"
    );
}
