//! The Consul simulator of the tests (`tests/support/consul_sim`) as a standalone process, for the
//! load benchmark (`benches/load.sh`): one catalog served both over the HTTP API (for the
//! forwarder's HTTP mode) and over the agent-style DNS port with TTL 0 (for the forwarder's DNS
//! mode, dnsmasq and unbound).
//!
//! ```sh
//! cargo run --release --example bench_consul_sim -- --services 20 --instances 3 \
//!     --addr-file /tmp/sim.addr --stats-file /tmp/sim.stats --max-seconds 900
//! ```
//!
//! - `--addr-file`: written once everything listens: `http=http://127.0.0.1:P` and
//!   `dns=127.0.0.1:Q`, one per line.
//! - `--stats-file`: rewritten every 100 ms (atomically): `http_requests N` and `dns_queries N`,
//!   the requests that reached the simulated agent so far.
//! - Services `svc00`..`svc<N-1>`, each with `--instances` passing instances on their own nodes
//!   (10.1.S.I), port 8080.
//! - Stops on SIGTERM/SIGINT, and after `--max-seconds` (default 900) in any case: a benchmark
//!   that dies without cleaning up does not leave it running.
//!
//! Listens on 127.0.0.1 only.

#[allow(dead_code)]
#[path = "../tests/support/consul_sim/mod.rs"]
mod consul_sim;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use consul_sim::{ConsulSim, SimNode, SimService, Status};

struct Args {
    services: usize,
    instances: usize,
    addr_file: PathBuf,
    stats_file: Option<PathBuf>,
    max_seconds: u64,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench_consul_sim --addr-file FILE [--stats-file FILE] [--services N] \
         [--instances N] [--max-seconds S]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        services: 20,
        instances: 3,
        addr_file: PathBuf::new(),
        stats_file: None,
        max_seconds: 900,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--services" => args.services = value().parse().unwrap_or_else(|_| usage()),
            "--instances" => args.instances = value().parse().unwrap_or_else(|_| usage()),
            "--addr-file" => args.addr_file = PathBuf::from(value()),
            "--stats-file" => args.stats_file = Some(PathBuf::from(value())),
            "--max-seconds" => args.max_seconds = value().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    if args.addr_file.as_os_str().is_empty() || args.services > 256 || args.instances > 256 {
        usage();
    }
    args
}

fn write_atomic(path: &PathBuf, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = parse_args();
    let sim = ConsulSim::start().await;
    for s in 0..args.services {
        let service = format!("svc{s:02}");
        for i in 0..args.instances {
            let node = format!("node-{s}-{i}");
            sim.add_node(SimNode {
                name: node.clone(),
                address: format!("10.1.{s}.{}", i + 1),
                meta: BTreeMap::new(),
            });
            sim.add_service(
                SimService {
                    id: format!("{service}-{i}"),
                    service: service.clone(),
                    node,
                    address: String::new(),
                    port: 8080,
                    tags: vec!["v1".into()],
                    weights: (1, 1),
                    meta: BTreeMap::new(),
                },
                Status::Passing,
            );
        }
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
                &format!(
                    "http_requests {}\ndns_queries {}\n",
                    sim.total_requests(),
                    sim.dns_queries()
                ),
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
