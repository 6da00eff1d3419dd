//! Memory of the PTR answers' address index for a 10,000-node catalog, measured with a counting
//! allocator, so the number is the index's own and not the allocator's or the runtime's.
//!
//! ```sh
//! cargo bench --bench ptr_memory            # 10,000 nodes
//! ```
//!
//! Under `cargo test --all-targets` it runs with 1,000 nodes as a smoke test.
//!
//! The index is built the way the inventory builds it: the body of `/v1/catalog/nodes` as the
//! test simulator (and a real agent) writes it, parsed into `NodeAddressJson`s, turned into an
//! `AddressIndex`. The parsed list is transient (dropped once the index and the name list are
//! built); what stays is the index, measured here, beside the node-name list the inventory kept
//! before PTR answers existed.

use consul_dns_forwarder::consul::ptr::{AddressIndex, NodeAddressJson, MAX_PTR_ADDRESSES};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

use counting_alloc::{allocs, live};

/// One element of `/v1/catalog/nodes` as an agent registers itself: tagged addresses by
/// family, the network-segment meta every agent's node carries, raft indexes.
fn node_json(n: usize, v6: bool) -> String {
    let (address, family) = if v6 {
        (format!("2001:db8::{:x}:{:x}", n >> 16, n & 0xffff), "ipv6")
    } else {
        let addr = format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255);
        (addr, "ipv4")
    };
    format!(
        r#"{{"ID":"0b8c7d94-7cae-9ea3-b039-{n:012x}","Node":"node-{n:05}","Address":"{address}","Datacenter":"dc1","TaggedAddresses":{{"lan":"{address}","lan_{family}":"{address}","wan":"{address}","wan_{family}":"{address}"}},"Meta":{{"consul-network-segment":""}},"CreateIndex":{n},"ModifyIndex":{n}}}"#
    )
}

fn main() {
    // `cargo bench` passes --bench; `cargo test` does not: a smaller smoke run there.
    let full = std::env::args().any(|a| a == "--bench");
    let nodes: usize = if full { 10_000 } else { 1_000 };
    println!(
        "ptr_memory: {nodes} nodes, agent-shaped /v1/catalog/nodes JSON (names node-00001...)"
    );
    for v6 in [false, true] {
        let body = format!(
            "[{}]",
            (1..=nodes)
                .map(|n| node_json(n, v6))
                .collect::<Vec<_>>()
                .join(",")
        );
        let list: Vec<NodeAddressJson> = serde_json::from_str(&body).expect("parses");
        let before = live();
        let allocs0 = allocs();
        let (index, dropped) = AddressIndex::from_nodes(&list);
        let kept = live() - before;
        assert_eq!((index.len(), dropped), (nodes, 0));
        let per = kept as f64 / nodes as f64;
        println!(
            "  {}: {per:.1} B live heap per node, {} allocations, JSON body {:.0} B per node (transient)",
            if v6 { "IPv6 addresses" } else { "IPv4 addresses" },
            allocs() - allocs0,
            body.len() as f64 / nodes as f64,
        );
        println!(
            "    => 10,000 nodes: {:.2} MiB; at the bound ({MAX_PTR_ADDRESSES} addresses): {:.1} MiB",
            per * 10_000.0 / 1_048_576.0,
            per * MAX_PTR_ADDRESSES as f64 / 1_048_576.0,
        );
        drop(index);
        assert!(live() - before <= 0, "index freed");
        // What the sorted index saves over the obvious map.
        let before = live();
        let map: std::collections::HashMap<std::net::IpAddr, String> = list
            .iter()
            .map(|n| (n.address().parse().expect("ip"), n.name().to_owned()))
            .collect();
        println!(
            "    (a HashMap<IpAddr, String> of the same: {:.1} B per node)",
            (live() - before) as f64 / nodes as f64
        );
        drop(map);
    }
}
