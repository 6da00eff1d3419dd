//! glibc's stub resolver (`getent ahosts`, i.e. getaddrinfo) using the forwarder as the host's
//! resolver: `nameserver 127.0.0.1` and the forwarder binary on 127.0.0.1:53.
//!
//! Port 53 and /etc/resolv.conf belong to the machine, so all of it runs in a network namespace
//! the test creates (`ip netns add cdf-<random>`), with its own resolv.conf in
//! /etc/netns/<ns>/ (which `ip netns exec` mounts over /etc/resolv.conf). The forwarder and
//! getent are started with `ip netns exec`.
//!
//! The Consul simulator and the test upstream must listen inside the namespace too. They are
//! the usual in-process ones, started on a dedicated thread that first moves itself into the
//! namespace with setns(2): a network namespace belongs to a thread, and a socket belongs to
//! the namespace of the thread that created it, so everything that thread's tokio runtime binds
//! is reachable from the forwarder inside the namespace, while the test's other threads stay in
//! the host's namespace. The simulator's handle is sent back to the test, which can change the
//! catalog as in any other test.
//!
//! Needs root (network namespaces, /etc/netns). The namespace, its /etc/netns directory and
//! every process are removed by a Drop guard, also when an assertion fails.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support::consul_sim::{ConsulSim, Status};
use crate::support::e2e::{sbin, start_quietly, KillOnDrop, Spread, ANSWER_SIZE_POLICIES, BIN};
use crate::support::upstream::TestUpstream;
use crate::support::TestConfig;
use crate::support::{is_root, run_ok};

const CLONE_NEWNET: i32 = 0x4000_0000;

extern "C" {
    /// glibc's setns(2) wrapper (the test links glibc anyway).
    fn setns(fd: i32, nstype: i32) -> i32;
}

/// A network namespace with `lo` up and /etc/netns/<name>/resolv.conf, the in-namespace
/// simulator and upstream (on their own thread), and the forwarder on 127.0.0.1:53. Dropping it
/// stops the forwarder and the thread and deletes the namespace and its /etc/netns directory.
struct Netns {
    name: String,
    etc: PathBuf,
    forwarder: Option<KillOnDrop>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    sim: Option<ConsulSim>,
    upstream: std::net::SocketAddr,
}

impl Netns {
    /// `lo_addrs` are added to the namespace's `lo` (as `ip addr add` takes them); `sim_setup`
    /// fills the catalog before the forwarder starts.
    fn start(
        lo_addrs: &[&str],
        forwarder_args: &[&str],
        sim_setup: impl FnOnce(&ConsulSim),
    ) -> Netns {
        assert!(
            is_root(),
            "this test needs root: it creates a network namespace (ip netns add) and \
             /etc/netns/<ns>/resolv.conf. Run scripts/test.sh as root (CI does)."
        );
        let name = format!("cdf-{:08x}", rand::random::<u32>());
        let etc = PathBuf::from(format!("/etc/netns/{name}"));
        // The guard exists before the first change to the machine, so a failure at any later
        // step still cleans up.
        let mut ns = Netns {
            name: name.clone(),
            etc: etc.clone(),
            forwarder: None,
            stop: None,
            thread: None,
            sim: None,
            upstream: "0.0.0.0:0".parse().expect("addr"),
        };
        run_ok(Command::new(sbin("ip")).args(["netns", "add", &name]));
        let ip_inside = |args: &[&str]| {
            run_ok(
                Command::new(sbin("ip"))
                    .args(["netns", "exec", &name, sbin("ip").as_str()])
                    .args(args),
            );
        };
        ip_inside(&["link", "set", "lo", "up"]);
        for addr in lo_addrs {
            ip_inside(&["addr", "add", addr, "dev", "lo"]);
        }
        std::fs::create_dir_all(&etc).expect("mkdir /etc/netns/<ns>");
        std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n")
            .expect("write resolv.conf");

        let (sim, upstream) = ns.start_servers_inside();
        sim_setup(&sim);
        let url = sim.http_url();
        ns.sim = Some(sim);
        ns.upstream = upstream;

        let up = upstream.to_string();
        let mut args = vec![
            "netns",
            "exec",
            &name,
            BIN,
            "--listen",
            "127.0.0.1:53",
            "--metrics-listen",
            "127.0.0.1:9153",
            "--consul-http",
            &url,
            "--upstream",
            &up,
        ];
        args.extend_from_slice(forwarder_args);
        let child = start_quietly(Command::new(sbin("ip")).args(&args));
        ns.forwarder = Some(KillOnDrop(child));
        ns.wait_ready();
        ns
    }

    /// A thread that enters the namespace, then runs the simulator and the upstream on its own
    /// tokio runtime until `stop`.
    fn start_servers_inside(&mut self) -> (ConsulSim, std::net::SocketAddr) {
        let path = format!("/run/netns/{}", self.name);
        let (ready_tx, ready_rx) =
            mpsc::channel::<Result<(ConsulSim, std::net::SocketAddr), String>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let entered = File::open(&path)
                .map_err(|e| format!("open {path}: {e}"))
                .and_then(|f| {
                    // SAFETY: setns only changes this thread's network namespace; the fd is valid
                    // for the call.
                    let rc = unsafe { setns(f.as_raw_fd(), CLONE_NEWNET) };
                    if rc == 0 {
                        Ok(())
                    } else {
                        Err(format!("setns {path}: {}", std::io::Error::last_os_error()))
                    }
                });
            if let Err(e) = entered {
                let _ = ready_tx.send(Err(e));
                return;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let sim = ConsulSim::start().await;
                let up = TestUpstream::start().await;
                let _ = ready_tx.send(Ok((sim, up.addr)));
                // Bounded: the guard always sends stop, and a test never runs this long.
                let _ = tokio::time::timeout(Duration::from_secs(300), stop_rx).await;
                drop(up);
            });
        });
        self.stop = Some(stop_tx);
        self.thread = Some(thread);
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the namespace thread reports")
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn exec(&self, args: &[&str]) -> Output {
        Command::new(sbin("ip"))
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Some(Ok(Some(status))) = self.forwarder.as_mut().map(|c| c.0.try_wait()) {
                panic!("the forwarder exited early: {status}");
            }
            let out = self.exec(&["dig", "@127.0.0.1", "+time=1", "+tries=1", "a.test"]);
            if String::from_utf8_lossy(&out.stdout).contains("status:") {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "the forwarder did not answer on 127.0.0.1:53 in {}",
            self.name
        );
    }

    /// `getent ahosts NAME` in the namespace: the distinct addresses in glibc's order (the
    /// order getaddrinfo returns, after its RFC 6724 sorting), the exit code and the time taken.
    fn ahosts(&self, name: &str) -> (Vec<String>, Option<i32>, Duration) {
        let start = Instant::now();
        let out = self.exec(&["getent", "ahosts", name]);
        let took = start.elapsed();
        let mut addrs: Vec<String> = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(a) = line.split_whitespace().next() {
                if !addrs.iter().any(|x| x == a) {
                    addrs.push(a.to_string());
                }
            }
        }
        (addrs, out.status.code(), took)
    }

    fn sim(&self) -> &ConsulSim {
        self.sim.as_ref().expect("sim")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.forwarder.take();
        self.sim.take();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = Command::new(sbin("ip"))
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(&self.etc);
    }
}

fn register(sim: &ConsulSim, service: &str, n: usize, ip: &str, status: Status) {
    let id = format!("{service}-{n}");
    sim.add_instance(
        &id,
        service,
        &format!("{service}-node-{n}"),
        ip,
        8080,
        status,
    );
}

/// web: 127.0.0.2 and .4 passing, .3 critical; api: one IPv4 instance.
fn catalog(sim: &ConsulSim) {
    register(sim, "web", 1, "127.0.0.2", Status::Passing);
    register(sim, "web", 2, "127.0.0.3", Status::Critical);
    register(sim, "web", 3, "127.0.0.4", Status::Passing);
    register(sim, "api", 1, "127.0.0.9", Status::Passing);
}

#[test]
fn glibc_resolves_through_the_forwarder_as_the_hosts_resolver() {
    let ns = Netns::start(&[], &[], catalog);

    let (mut addrs, code, took) = ns.ahosts("web.service.consul");
    addrs.sort();
    println!("getent ahosts web.service.consul: {addrs:?} in {took:?}");
    assert_eq!(code, Some(0));
    assert_eq!(
        addrs,
        vec!["127.0.0.2", "127.0.0.4"],
        "exactly the healthy instances"
    );

    // IPv4-only: glibc asks A and AAAA together; the AAAA must come back at once (NOERROR,
    // no data), else glibc waits its 5 s timeout. First query for the service included.
    let (addrs, code, took) = ns.ahosts("api.service.consul");
    println!("getent ahosts api.service.consul: {addrs:?} in {took:?}");
    assert_eq!((addrs, code), (vec!["127.0.0.9".to_string()], Some(0)));
    assert!(took < Duration::from_millis(200), "took {took:?}");
    let (_, _, again) = ns.ahosts("api.service.consul");
    assert!(again < Duration::from_millis(200), "took {again:?}");

    // A name of the test upstream, forwarded.
    let (addrs, code, _) = ns.ahosts("a.test");
    assert_eq!((addrs, code), (vec!["192.0.2.1".to_string()], Some(0)));

    // Names that do not exist fail (exit 2 = not found), quickly.
    let (addrs, code, took) = ns.ahosts("nosuch.service.consul");
    assert!(addrs.is_empty() && code == Some(2), "{addrs:?} {code:?}");
    assert!(took < Duration::from_millis(200), "took {took:?}");

    // A check turning critical leaves glibc's answers once the forwarder sees it (no cache
    // in glibc).
    ns.sim().set_service_check("web-3", Status::Critical);
    let start = Instant::now();
    let mut last = Vec::new();
    while start.elapsed() < Duration::from_secs(3) {
        last = ns.ahosts("web.service.consul").0;
        if last == ["127.0.0.2"] {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(last, vec!["127.0.0.2"]);
}

/// Backends on the client's own subnet, at increasing distance from its address 198.18.0.1/24:
/// RFC 6724 rule 9 (longest matching prefix) orders them .2, .5, .9, .17 whatever the DNS order.
const SORTED: [&str; 4] = ["198.18.0.2", "198.18.0.5", "198.18.0.9", "198.18.0.17"];

fn same_subnet_catalog(sim: &ConsulSim) {
    for (i, ip) in SORTED.iter().enumerate() {
        register(sim, "near", i + 1, ip, Status::Passing);
    }
}

/// glibc applies rule 9 to IPv4 only when it knows the prefix length of the source address,
/// which its netlink query keeps only on hosts that also have a non-loopback IPv6 address
/// (sysdeps/unix/sysv/linux/check_pf.c); so the namespace gets 198.18.0.1/24 and fd00:cdf::1/64
/// on lo, like a dual-stack host on the backends' subnet. These addresses exist only inside the
/// test's namespace, and getaddrinfo's sorting sends no packet (it connects a UDP socket to learn
/// the source address).
#[test]
fn glibc_sorting_defeats_round_robin_and_a_record_limit_1_restores_it() {
    let lo = ["198.18.0.1/24", "fd00:cdf::1/64"];
    let mut firsts: BTreeMap<String, usize> = BTreeMap::new();
    {
        let ns = Netns::start(&lo, &[], same_subnet_catalog);
        for _ in 0..12 {
            let (addrs, code, _) = ns.ahosts("near.service.consul");
            assert_eq!(code, Some(0));
            assert_eq!(
                addrs, SORTED,
                "glibc's order, whatever order the forwarder sent"
            );
            *firsts.entry(addrs[0].clone()).or_default() += 1;
        }
    }
    println!("a_record_limit = 0: first address of 12 lookups: {firsts:?}");

    let (_dir, conf) = TestConfig::new()
        .metrics_default()
        .consul("a_record_limit = 1")
        .write_temp("limit.toml");
    let ns = Netns::start(&lo, &["--config", &conf], same_subnet_catalog);
    let mut firsts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..12 {
        let (addrs, code, _) = ns.ahosts("near.service.consul");
        assert_eq!(code, Some(0));
        assert_eq!(addrs.len(), 1, "one address per answer: {addrs:?}");
        assert!(SORTED.contains(&addrs[0].as_str()));
        *firsts.entry(addrs[0].clone()).or_default() += 1;
    }
    println!("a_record_limit = 1: first address of 12 lookups: {firsts:?}");
    assert!(firsts.len() >= 2, "the single address rotates: {firsts:?}");
}

/// Lookups per policy and host in the spread measurement; `CDF_SPREAD_LOOKUPS` sets more for
/// the figures in ARCHITECTURE.md.
fn spread_lookups() -> usize {
    std::env::var("CDF_SPREAD_LOOKUPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

/// 20 backends on the host's /24 at increasing distance from its address 198.18.0.1.
fn twenty_backends() -> Vec<String> {
    (0..20)
        .map(|i| format!("198.18.0.{}", 2 + 12 * i))
        .collect()
}

/// How evenly glibc's clients spread over 20 backends under each answer-size policy: the
/// first address `getent ahosts` returns (what a program connects to) over many lookups,
/// on a dual-stack host on the backends' subnet (glibc's RFC 6724 rule 9 sorts by distance)
/// and on an IPv4-only one (it cannot, and keeps the DNS order). Printed for ARCHITECTURE.md.
#[test]
fn glibc_spread_over_20_backends_per_answer_size_policy() {
    let backends = twenty_backends();
    let lookups = spread_lookups();
    let catalog = |sim: &ConsulSim| {
        for (i, ip) in twenty_backends().iter().enumerate() {
            register(sim, "spread", i + 1, ip, Status::Passing);
        }
    };
    let dir = tempfile::tempdir().expect("tmp");
    let mut results = BTreeMap::new();
    for (host, lo) in [
        ("dual-stack", &["198.18.0.1/24", "fd00:cdf::1/64"][..]),
        ("IPv4-only", &["198.18.0.1/24"][..]),
    ] {
        for (p, (policy, lines)) in ANSWER_SIZE_POLICIES.iter().enumerate() {
            let conf = dir.path().join(format!("policy-{p}.toml"));
            std::fs::write(&conf, format!("[consul]\n{lines}\n")).expect("write");
            let conf = conf.display().to_string();
            let ns = Netns::start(lo, &["--config", &conf], catalog);
            let firsts: Vec<String> = (0..lookups)
                .map(|_| {
                    let (addrs, code, _) = ns.ahosts("spread.service.consul");
                    assert_eq!(code, Some(0), "{host} {policy}");
                    addrs[0].clone()
                })
                .collect();
            let spread = Spread::new(&backends, &firsts);
            println!("glibc {host:10} {policy:40} {}", spread.summary());
            results.insert((host, p), spread);
        }
    }
    let dual = |p| &results[&("dual-stack", p)];
    // Sorted by distance, the nearest of all 20 is everybody's first; TC sends glibc to TCP
    // for all 20 as well.
    assert_eq!(dual(0).used(), 1, "{}", dual(0).summary());
    assert_eq!(dual(2).used(), 1, "{}", dual(2).summary());
    // Three random ones: the nearest of the three, so near backends get more, far ones less.
    assert!(dual(1).used() >= 8, "{}", dual(1).summary());
    assert!(dual(1).max_share() < 50.0, "{}", dual(1).summary());
    // One address per answer: nothing to sort.
    assert!(dual(3).used() >= 15, "{}", dual(3).summary());
    for p in 0..ANSWER_SIZE_POLICIES.len() {
        let v4 = &results[&("IPv4-only", p)];
        assert!(
            v4.used() >= 15,
            "IPv4-only keeps the shuffled order: {}",
            v4.summary()
        );
    }
}
