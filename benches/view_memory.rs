//! Memory of Consul service views (issue 8's target: 10,000 watched services of 10 instances each
//! in ≤ 64 MiB RSS for the whole process), measured with a counting allocator, so the number is
//! the views' own and not the allocator's or the runtime's.
//!
//! ```sh
//! cargo bench --bench view_memory            # 10,000 services x 10 instances
//! ```
//!
//! Under `cargo test --all-targets` it runs with 1,000 services as a smoke test.
//!
//! Each view is built the way a watcher builds it: the body of `/v1/health/service/<name>` as the
//! test simulator (and Consul) writes it, parsed into `HealthEntry`s, turned into a
//! `ServiceView` kept behind an `Arc`, then asked once (`records::select`, as the first query
//! does, which stores the view's selection).

use std::sync::Arc;

use consul_dns_forwarder::config::WhenNoneHealthy;
use consul_dns_forwarder::consul::addrs::Addrs;
use consul_dns_forwarder::consul::catalog::{HealthEntry, Instance, ServiceView};
use consul_dns_forwarder::consul::records;
use consul_dns_forwarder::metrics::Metrics;

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

use counting_alloc::{allocs, live, rss_kib};

/// Instances per service, as in the load benchmark's many-services scenario.
const INSTANCES: usize = 10;

/// One entry of `/v1/health/service/<service>`, in the simulator's shape (field for field what
/// `tests/support/consul_sim` writes, which follows a real agent's), on a node of its own.
/// `shape` gives the node's `Meta` and `TaggedAddresses`.
fn entry_json(service: &str, i: usize, n: usize, shape: &Shape) -> String {
    let addr = format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255);
    let node = format!("node-{service}-{i}");
    let node_meta = shape.node_meta;
    let tagged = (shape.tagged)(&addr, n);
    format!(
        r#"{{"Checks":[{{"CheckID":"serfHealth","CreateIndex":{n},"ModifyIndex":{n},"Name":"Serf Health Status","Node":"{node}","Notes":"","Output":"Agent alive and reachable","ServiceID":"","ServiceName":"","ServiceTags":[],"Status":"passing"}},{{"CheckID":"service:{service}-{i}","CreateIndex":{n},"ModifyIndex":{n},"Name":"Service '{service}' check","Node":"{node}","Notes":"","Output":"","ServiceID":"{service}-{i}","ServiceName":"{service}","ServiceTags":["v1"],"Status":"passing"}}],"Node":{{"Address":"{addr}","CreateIndex":{n},"Datacenter":"dc1","ID":"0b8c7d94-7cae-9ea3-b039-0f64161b5866","Meta":{node_meta},"ModifyIndex":{n},"Node":"{node}","TaggedAddresses":{tagged}}},"Service":{{"Address":"","CreateIndex":{n},"ID":"{service}-{i}","Meta":{{}},"ModifyIndex":{n},"Port":8080,"Service":"{service}","Tags":["v1"],"Weights":{{"Passing":1,"Warning":1}}}}}}"#
    )
}

/// How the nodes look.
struct Shape {
    name: &'static str,
    /// The node's `Meta` object (the simulator writes `{}`; a real agent's nodes carry at least
    /// `{"consul-network-segment":""}`).
    node_meta: &'static str,
    /// The node's `TaggedAddresses` for its address and number.
    tagged: fn(&str, usize) -> String,
}

const SHAPES: [Shape; 3] = [
    Shape {
        name: "simulator (node Meta {}, TaggedAddresses lan and wan)",
        node_meta: "{}",
        tagged: |addr, _| format!(r#"{{"lan":"{addr}","wan":"{addr}"}}"#),
    },
    // A real agent tags its node with its address four times.
    Shape {
        name: "agent (node Meta {\"consul-network-segment\":\"\"}, lan, lan_ipv4, wan, wan_ipv4)",
        node_meta: r#"{"consul-network-segment":""}"#,
        tagged: |addr, _| {
            format!(r#"{{"lan":"{addr}","lan_ipv4":"{addr}","wan":"{addr}","wan_ipv4":"{addr}"}}"#)
        },
    },
    // Every node dual-stack (`advertise_addr_ipv6`): AAAA, ANY and SRV get its IPv6 address.
    Shape {
        name: "agent, dual stack (lan_ipv6 too)",
        node_meta: r#"{"consul-network-segment":""}"#,
        tagged: |addr, n| {
            format!(
                r#"{{"lan":"{addr}","lan_ipv4":"{addr}","lan_ipv6":"fd00::{n:x}","wan":"{addr}","wan_ipv4":"{addr}"}}"#
            )
        },
    },
];

fn body(s: usize, shape: &Shape) -> String {
    let service = format!("svc{s:02}");
    let entries: Vec<String> = (0..INSTANCES)
        .map(|i| entry_json(&service, i, s * INSTANCES + i + 1, shape))
        .collect();
    format!("[{}]", entries.join(","))
}

fn main() {
    // `cargo bench` passes --bench; `cargo test` does not: a smaller smoke run there.
    let full = std::env::args().any(|a| a == "--bench");
    let services: usize = if full { 10_000 } else { 1_000 };
    println!("view_memory: {services} services x {INSTANCES} instances, simulator-shaped JSON");
    println!(
        "  size_of: Instance {} B, Addrs {} B, ServiceView {} B",
        std::mem::size_of::<Instance>(),
        std::mem::size_of::<Addrs>(),
        std::mem::size_of::<ServiceView>(),
    );

    // Statics the views share (allocated once per process) are not the views' cost.
    let warm: Vec<HealthEntry> = serde_json::from_str(&body(0, &SHAPES[0])).expect("parses");
    let warm = ServiceView::from_entries(&warm, "dc1");
    drop(records::select(
        &warm,
        None,
        false,
        WhenNoneHealthy::Nxdomain,
    ));
    drop(warm);

    // Outside the views, a watched service also has a series of its own in the
    // `consul_healthy_instances` gauge (what `consul/views.rs` sets for every view).
    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry).expect("metrics");
    let before = live();
    for s in 0..services {
        metrics
            .consul_healthy_instances
            .with_label_values(&[format!("svc{s:02}").as_str()])
            .set(INSTANCES as i64);
    }
    let gauges = live() - before;
    println!(
        "  consul_healthy_instances series: {:.0} B live heap per service ({:.1} MiB for 10,000)",
        gauges as f64 / services as f64,
        gauges as f64 / services as f64 * 10_000.0 / 1_048_576.0,
    );
    drop(metrics);
    drop(registry);

    for shape in &SHAPES {
        println!("  {}:", shape.name);
        measure(services, shape);
    }
}

fn measure(services: usize, shape: &Shape) {
    let bodies: Vec<String> = (0..services).map(|s| body(s, shape)).collect();
    let body_bytes: usize = bodies.iter().map(String::len).sum();

    let before = live();
    let rss0 = rss_kib();
    let allocs0 = allocs();
    let mut views: Vec<Arc<ServiceView>> = Vec::with_capacity(services);
    let after_vec = live();
    for b in &bodies {
        let entries: Vec<HealthEntry> = serde_json::from_str(b).expect("simulator JSON parses");
        views.push(Arc::new(ServiceView::from_entries(&entries, "dc1")));
    }
    let built = live() - after_vec;
    let built_allocs = allocs() - allocs0;
    for v in &views {
        let s = records::select(v, None, false, WhenNoneHealthy::Nxdomain);
        assert_eq!(s.v4.len(), INSTANCES, "every instance is served");
    }
    let selected = live() - after_vec;
    let rss1 = rss_kib();
    let total_allocs = allocs() - allocs0;
    let per = |bytes: isize| bytes as f64 / services as f64;
    println!(
        "    JSON bodies: {:.0} B per service ({:.1} MiB for {services}; transient, one at a time)",
        body_bytes as f64 / services as f64,
        body_bytes as f64 / 1_048_576.0,
    );
    println!(
        "    views: {:.0} B live heap per service ({:.0} B per instance), {:.1} allocations",
        per(built),
        per(built) / INSTANCES as f64,
        built_allocs as f64 / services as f64,
    );
    println!(
        "    views + their first selection: {:.0} B per service, {:.1} allocations",
        per(selected),
        total_allocs as f64 / services as f64,
    );
    println!(
        "    RSS grew {:.1} MiB ({:.0} B per service; after the first shape, partly memory it freed)",
        rss1.saturating_sub(rss0) as f64 / 1024.0,
        (rss1.saturating_sub(rss0) * 1024) as f64 / services as f64,
    );
    println!(
        "    => 10,000 services: {:.1} MiB of live heap in views (target for the whole process: 64 MiB RSS)",
        per(selected) * 10_000.0 / 1_048_576.0
    );
    drop(views);
    assert!(live() - before <= 0, "views freed");
}
