//! The Consul simulator of the tests (`tests/support/consul_sim`) as a standalone process, for the
//! load benchmark (`benches/load.sh`): one catalog served both over the HTTP API (for the
//! forwarder's HTTP mode) and over the agent-style DNS port with TTL 0 (for the forwarder's DNS
//! mode, dnsmasq and unbound).
//!
//! ```sh
//! cargo run --release --example bench_consul_sim -- --services 20 --instances 3 \
//!     --addr-file /tmp/sim.addr --stats-file /tmp/sim.stats --max-seconds 900
//! cargo run --release --example bench_consul_sim -- --services 0 \
//!     --large-service big=5000 --large-service small=3 --addr-file /tmp/sim.addr
//! ```
//!
//! - `--addr-file`: written once everything listens: `http=http://127.0.0.1:P` and
//!   `dns=127.0.0.1:Q`, one per line.
//! - `--stats-file`: rewritten every 100 ms (atomically): `http_requests N`, `dns_queries N` (the
//!   requests that reached the simulated agent so far), `max_connections N` (the most HTTP
//!   connections open at once since the start) and `open_connections N`.
//! - Services `svc00`..`svc<N-1>` (`--services`, default 20), each with `--instances` (default 3)
//!   passing instances, and every `--large-service NAME=COUNT` (repeatable) with COUNT passing
//!   instances. Every instance has a node of its own with a distinct IPv4 address (the k-th
//!   instance created gets 10.a.b.c with a.b.c = k + 1 in base 256), port 8080, tag `v1`.
//! - `--node-meta KEY=VALUE` (repeatable): meta on every node (the simulator's default is none;
//!   a real agent's nodes carry at least `consul-network-segment=`).
//! - `--dns-udp-answer-limit N`: Consul's `dns_config.udp_answer_limit` (the agent's default is
//!   3; the simulator's is no limit): UDP answers without EDNS carry at most N records.
//! - `--catalog-file-out FILE`: the same catalog written, before the address file, as a catalog
//!   file (`{"<service>": [entries as /v1/health/service/<service> returns them]}`), for the
//!   forwarder's `--catalog-file` contender (`ours-file`): the three answer sources then serve
//!   the very same instances.
//! - Stops on SIGTERM/SIGINT, and after `--max-seconds` (default 900) in any case: a benchmark
//!   that dies without cleaning up does not leave it running.
//!
//! Listens on 127.0.0.1 only.

#[allow(dead_code)]
#[path = "../tests/support/consul_sim/mod.rs"]
mod consul_sim;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use consul_sim::{ConsulSim, SimNode, SimService, Status};

/// Instances the simulator can give distinct addresses (10.0.0.1 .. 10.255.255.255).
const MAX_INSTANCES: usize = (1 << 24) - 1;

struct Args {
    services: usize,
    instances: usize,
    /// `(name, instance count)`.
    large: Vec<(String, usize)>,
    udp_answer_limit: Option<usize>,
    node_meta: BTreeMap<String, String>,
    addr_file: PathBuf,
    stats_file: Option<PathBuf>,
    catalog_file_out: Option<PathBuf>,
    max_seconds: u64,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench_consul_sim --addr-file FILE [--stats-file FILE] [--services N] \
         [--instances N] [--large-service NAME=COUNT]... [--node-meta KEY=VALUE]... \
         [--dns-udp-answer-limit N] [--catalog-file-out FILE] \
         [--max-seconds S]"
    );
    std::process::exit(2)
}

/// `kind <path, the service name as *> <blocking|plain> <count>` lines: which requests a
/// contender made, to explain a change in the total.
fn requests_by_kind(log: &[String]) -> String {
    let mut kinds: BTreeMap<(String, &str), usize> = BTreeMap::new();
    for target in log {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let path = match path.rsplit_once('/') {
            Some((head, _)) if head.starts_with("/v1/health/service") => format!("{head}/*"),
            _ => path.to_owned(),
        };
        let blocking = query.split('&').any(|p| p.starts_with("index="));
        *kinds
            .entry((path, if blocking { "blocking" } else { "plain" }))
            .or_default() += 1;
    }
    kinds
        .into_iter()
        .map(|((path, how), n)| format!("kind {path} {how} {n}\n"))
        .collect()
}

fn parse_args() -> Args {
    let mut args = Args {
        services: 20,
        instances: 3,
        large: Vec::new(),
        udp_answer_limit: None,
        node_meta: BTreeMap::new(),
        addr_file: PathBuf::new(),
        stats_file: None,
        catalog_file_out: None,
        max_seconds: 900,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--services" => args.services = value().parse().unwrap_or_else(|_| usage()),
            "--instances" => args.instances = value().parse().unwrap_or_else(|_| usage()),
            "--large-service" => {
                let v = value();
                let (name, count) = v.split_once('=').unwrap_or_else(|| usage());
                let count = count.parse().unwrap_or_else(|_| usage());
                if name.is_empty() {
                    usage();
                }
                args.large.push((name.to_owned(), count));
            }
            "--node-meta" => {
                let v = value();
                let (k, v) = v.split_once('=').unwrap_or_else(|| usage());
                args.node_meta.insert(k.to_owned(), v.to_owned());
            }
            "--dns-udp-answer-limit" => {
                args.udp_answer_limit = Some(value().parse().unwrap_or_else(|_| usage()))
            }
            "--addr-file" => args.addr_file = PathBuf::from(value()),
            "--stats-file" => args.stats_file = Some(PathBuf::from(value())),
            "--catalog-file-out" => args.catalog_file_out = Some(PathBuf::from(value())),
            "--max-seconds" => args.max_seconds = value().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let total = args
        .services
        .checked_mul(args.instances)
        .and_then(|n| args.large.iter().try_fold(n, |n, (_, c)| n.checked_add(*c)));
    if args.addr_file.as_os_str().is_empty() || total.is_none_or(|n| n > MAX_INSTANCES) {
        usage();
    }
    args
}

fn write_atomic(path: &PathBuf, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Every (service, instance number) of the catalog, in creation order.
fn catalog(args: &Args) -> Vec<(String, usize)> {
    let mut all = Vec::new();
    for s in 0..args.services {
        let service = format!("svc{s:02}");
        all.extend((0..args.instances).map(|i| (service.clone(), i)));
    }
    for (name, count) in &args.large {
        all.extend((0..*count).map(|i| (name.clone(), i)));
    }
    all
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = parse_args();
    let sim = ConsulSim::start().await;
    if let Some(limit) = args.udp_answer_limit {
        sim.set_dns_udp_answer_limit(Some(limit));
    }
    let started = Instant::now();
    let all = catalog(&args);
    // Every node before any service: adding a node re-indexes the services already on it, which
    // scans every registered service, so this order keeps a 100,000-instance build linear.
    let node_name = |service: &str, i: usize| format!("node-{service}-{i}");
    for (k, (service, i)) in all.iter().enumerate() {
        let n = k + 1;
        sim.add_node(SimNode {
            name: node_name(service, *i),
            address: format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255),
            meta: args.node_meta.clone(),
            ..Default::default()
        });
    }
    for (service, i) in &all {
        sim.add_service(
            SimService {
                id: format!("{service}-{i}"),
                service: service.clone(),
                node: node_name(service, *i),
                address: String::new(),
                port: 8080,
                tags: vec!["v1".into()],
                weights: (1, 1),
                meta: BTreeMap::new(),
                ..Default::default()
            },
            Status::Passing,
        );
    }
    eprintln!(
        "bench_consul_sim: {} instances registered in {:.2} s",
        all.len(),
        started.elapsed().as_secs_f64()
    );
    drop(all);
    // Before the address file: whoever waits for that one finds the catalog file complete.
    if let Some(path) = &args.catalog_file_out {
        write_atomic(path, &sim.catalog_json().to_string())?;
    }
    write_atomic(
        &args.addr_file,
        &format!("http={}\ndns={}\n", sim.http_url(), sim.dns_addr()),
    )?;

    let stats_file = args.stats_file.clone();
    let write_stats = move |sim: &ConsulSim| {
        if let Some(path) = &stats_file {
            let _ = write_atomic(
                path,
                &(format!(
                    "http_requests {}\ndns_queries {}\nmax_connections {}\nopen_connections {}\n",
                    sim.total_requests(),
                    sim.dns_queries(),
                    sim.max_concurrent_connections(),
                    sim.open_connections(),
                ) + &requests_by_kind(&sim.request_log())),
            );
        }
    };

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let deadline = tokio::time::sleep(Duration::from_secs(args.max_seconds));
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = &mut deadline => {
                eprintln!("bench_consul_sim: --max-seconds reached, stopping");
                break;
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => write_stats(&sim),
        }
    }
    write_stats(&sim);
    Ok(())
}
