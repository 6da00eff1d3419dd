//! Every default and every limit of the configuration, typed as the validated configuration uses
//! it. `conf/consul-dns-forwarder.toml` writes the same values out (a unit test keeps them equal).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;

use super::schema::{ConsulMode, WhenNoneHealthy, DNS_PORT};

/// Where the system's resolvers are listed.
pub(crate) const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The environment variable the ACL token is read from when `consul.token_file` is not set
/// (the name Consul's own CLI uses).
pub(crate) const TOKEN_ENV: &str = "CONSUL_HTTP_TOKEN";

/// The largest TTL a record may carry: RFC 2181 §8 makes TTLs 31-bit, and resolvers read a
/// larger value as 0, so a longer configured TTL would silently disable caching downstream.
pub(crate) const MAX_DNS_TTL: Duration = Duration::from_secs(0x7fff_ffff);

/// Counts of concurrent things (queries, connections) are semaphores, which cannot hold more
/// than this many permits (tokio panics above it). Larger values are unlimited in practice, so
/// they are clamped, not rejected.
pub const MAX_CONCURRENCY_LIMIT: usize = tokio::sync::Semaphore::MAX_PERMITS;

/// This host only: the default for who may query, and who is never rate-limited.
const LOOPBACK_NETS: [IpNet; 2] = [
    IpNet::new_assert(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8),
    IpNet::new_assert(IpAddr::V6(Ipv6Addr::LOCALHOST), 128),
];

// --- [server] ---------------------------------------------------------------------------------

/// Loopback only, both families: a per-host forwarder serves its own host unless told otherwise.
pub(crate) const DEFAULT_LISTEN: [SocketAddr; 2] = [
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DNS_PORT),
    SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), DNS_PORT),
];

/// Where `--dev` listens: an unprivileged port, so the demo runs without root.
pub(crate) const DEV_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1053);

/// Clients allowed to query: this host.
pub(crate) const DEFAULT_ALLOW: [IpNet; 2] = LOOPBACK_NETS;

/// Idle TCP connections are closed after this (RFC 7766 §6.2.3 suggests "on the order of seconds").
pub(crate) const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The shortest `server.tcp_idle_timeout`, so that a slip like "1ms" cannot close connections
/// before a client's query arrives.
pub(crate) const MIN_TCP_IDLE_TIMEOUT: Duration = Duration::from_millis(100);

/// Enough for every local client (nginx workers, glibc retries) with a wide margin, small enough
/// that a misbehaving client cannot exhaust file descriptors.
pub(crate) const DEFAULT_MAX_TCP_CONNECTIONS: usize = 1024;

/// TCP connections one client network may hold: a quarter of the default total, so at least
/// four networks always find a slot, and still far more than a host's resolver clients open
/// (glibc and nginx use one connection per retried query and close it).
pub(crate) const DEFAULT_MAX_TCP_CONNECTIONS_PER_NETWORK: usize = 256;

/// 0 = one socket per CPU core, so every core has a receive loop.
pub(crate) const DEFAULT_UDP_SOCKETS_PER_ADDRESS: usize = 0;

/// More UDP sockets per address than any core count needs; each costs a descriptor, a kernel
/// buffer and a 64 KiB receive buffer, so a typo like 100000 must not exhaust the host.
pub(crate) const MAX_UDP_SOCKETS_PER_ADDRESS: usize = 1024;

/// How many queries may be in progress at once before new UDP queries are shed.
pub(crate) const DEFAULT_MAX_INFLIGHT: usize = 10_000;

/// Responses per second per client network when rate limiting is on by default (non-loopback
/// listen addresses): ample for a host's resolver clients, small for an amplification attack.
pub(crate) const DEFAULT_RATE_LIMIT: u32 = 200;

/// Clients never rate-limited: this host.
pub(crate) const DEFAULT_RATE_LIMIT_EXEMPT: [IpNet; 2] = LOOPBACK_NETS;

// --- [upstream] -------------------------------------------------------------------------------

/// How long every upstream together may take before the client gets SERVFAIL. Below the 5 s that
/// glibc waits per try, so a client never times out on us while we wait for an upstream.
pub(crate) const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// The shortest `upstream.timeout`, so that a slip like "1ms" cannot fail every query.
pub(crate) const MIN_UPSTREAM_TIMEOUT: Duration = Duration::from_millis(10);

/// The longest `upstream.timeout`: clients give up after about 5 s, so longer only holds
/// resources for answers nobody waits for.
pub(crate) const MAX_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// Upstream fetches in flight: far above what a healthy upstream needs (answers take
/// milliseconds), low enough that a black-holed upstream cannot tie up memory without bound.
pub(crate) const DEFAULT_UPSTREAM_INFLIGHT: usize = 1024;

/// Off: some upstreams do not preserve the letter case of questions (see
/// `UpstreamConfig::randomize_case`).
pub(crate) const DEFAULT_RANDOMIZE_CASE: bool = false;

// `upstream.trust_ad` has no constant: by default it is true exactly when every upstream is on
// loopback (see `Config::effective_trust_ad`).

// --- [cache] ----------------------------------------------------------------------------------

/// Cached names. 100,000 entries cost a few tens of MiB at most.
pub(crate) const DEFAULT_CACHE_ENTRIES: u64 = 100_000;

/// Cache memory bound: 100,000 typical answers fit with room to spare.
pub(crate) const DEFAULT_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// The smallest `cache.max_bytes`: a cache smaller than this holds hardly an answer.
pub(crate) const MIN_CACHE_BYTES: u64 = 1024;

/// No TTL floor: answers expire when their owner says.
pub(crate) const DEFAULT_MIN_TTL: Duration = Duration::ZERO;

/// Upper bound on positive TTLs: one day, as unbound's `cache-max-ttl`.
pub(crate) const DEFAULT_MAX_TTL: Duration = Duration::from_secs(86_400);

/// Upper bound on how long a negative answer is cached (RFC 2308 suggests 1–3 hours max; a short
/// value lets a newly created name appear quickly).
pub(crate) const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(300);

/// RFC 8767 suggests 1–3 days of stale serving; one hour covers a restarting upstream without
/// pinning long-gone data.
pub(crate) const DEFAULT_STALE_FOR: Duration = Duration::from_secs(3600);

/// How long a question whose upstreams failed (SERVFAIL, REFUSED, timeout) is not asked again
/// at first (RFC 9520 §3.2: at least 1 second): short enough that a fixed upstream is seen soon.
pub(crate) const DEFAULT_FAILURE_TTL: Duration = Duration::from_secs(5);

/// The longest such period, reached by doubling while the failure persists.
pub(crate) const DEFAULT_FAILURE_TTL_MAX: Duration = Duration::from_secs(30);

/// RFC 9520 §3.2: failures MUST be cached for at least 1 second...
pub(crate) const MIN_FAILURE_TTL: Duration = Duration::from_secs(1);

/// ... and SHOULD NOT be cached for longer than 5 minutes.
pub(crate) const MAX_FAILURE_TTL: Duration = Duration::from_secs(300);

// --- [consul] ---------------------------------------------------------------------------------

/// On: answering `*.consul` is what this forwarder is for.
pub(crate) const DEFAULT_CONSUL_ENABLED: bool = true;

/// The health API: answers follow health changes as they happen (blocking queries).
pub(crate) const DEFAULT_CONSUL_MODE: ConsulMode = ConsulMode::Http;

/// Consul's HTTP API on the local agent (a string: a URL cannot be built in a constant).
pub(crate) const DEFAULT_CONSUL_HTTP: &str = "http://127.0.0.1:8500";

/// Consul's DNS interface on the local agent.
pub(crate) const DEFAULT_CONSUL_DNS: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8600);

/// Consul's own domain (a string: a DNS name cannot be built in a constant).
pub(crate) const DEFAULT_CONSUL_DOMAIN: &str = "consul.";

/// Off: Consul's DNS interface also answers instances in the warning state.
pub(crate) const DEFAULT_ONLY_PASSING: bool = false;

/// What Consul does when no instance is healthy.
pub(crate) const DEFAULT_WHEN_NONE_HEALTHY: WhenNoneHealthy = WhenNoneHealthy::Nxdomain;

/// 0 = every instance, as Consul's `a_record_limit` default.
pub(crate) const DEFAULT_A_RECORD_LIMIT: usize = 0;

/// TTL of service answers when `consul.service_ttl` does not say: long enough to absorb bursts,
/// short enough that a client re-asks soon after an instance fails.
pub(crate) const DEFAULT_SERVICE_TTL: Duration = Duration::from_secs(5);

/// Node answers change as rarely as service answers: the same TTL.
pub(crate) const DEFAULT_NODE_TTL: Duration = DEFAULT_SERVICE_TTL;

/// A name that does not exist in Consul may be registered any moment: as short as a service TTL.
pub(crate) const DEFAULT_CONSUL_NEGATIVE_TTL: Duration = DEFAULT_SERVICE_TTL;

/// How long a blocking query may wait in Consul (Consul's default and our default: 5 minutes).
pub(crate) const DEFAULT_WATCH_WAIT: Duration = Duration::from_secs(300);

/// The shortest `consul.watch_wait`: shorter turns blocking queries into polling.
pub(crate) const MIN_WATCH_WAIT: Duration = Duration::from_secs(1);

/// Consul caps `wait` at 10 minutes.
pub(crate) const MAX_WATCH_WAIT: Duration = Duration::from_secs(600);

/// `consul.stale_for` is at least this many `consul.watch_wait`s: one for the blocking query
/// to return, one for Consul's jitter and a retry.
pub(crate) const STALE_FOR_WATCH_WAITS: u32 = 2;

/// A watcher nobody asked about for this long stops.
pub(crate) const DEFAULT_WATCH_IDLE: Duration = Duration::from_secs(600);

/// The shortest `consul.watch_idle`: long enough for a first answer from Consul to arrive.
pub(crate) const MIN_WATCH_IDLE: Duration = Duration::from_secs(1);

/// How long the last known view of a service is served while Consul is unreachable.
pub(crate) const DEFAULT_CONSUL_STALE_FOR: Duration = Duration::from_secs(86_400);

/// Reads go to any Consul server (`?stale`), as Consul's own DNS interface does by default
/// (`dns_config.allow_stale`): followers share the load, and reads keep working while the servers
/// elect a leader.
pub(crate) const DEFAULT_ALLOW_STALE: bool = true;

/// A stale read from a server that last heard from the leader longer ago than this is asked
/// again of the leader. Consul's `dns_config.max_stale` default: 10 years, i.e. never in practice.
pub(crate) const DEFAULT_MAX_STALE: Duration = Duration::from_secs(87_600 * 3600);

/// Addresses of other datacenters are their LAN ones, as with Consul's default
/// `translate_wan_addrs = false`.
pub(crate) const DEFAULT_TRANSLATE_WAN_ADDRS: bool = false;

/// Connections to one agent: far below Consul's `limits.http_max_conns_per_client` (200).
pub(crate) const DEFAULT_CONSUL_MAX_CONNECTIONS: usize = 32;

/// The smallest connection budget that still leaves a watch slot and a fetch slot (see
/// `consul::client`; connections hold their slot until closed, so no margin is needed).
pub(crate) const MIN_CONSUL_CONNECTIONS: usize = 2;

/// On, as Consul's `enable_additional_node_meta_txt`.
pub(crate) const DEFAULT_NODE_META_TXT: bool = true;

/// 0 = as many records as fit in 512 bytes (Consul's default is 3; ARCHITECTURE.md measures
/// both).
pub(crate) const DEFAULT_UDP_ANSWER_LIMIT: usize = 0;

/// On: a client is told when records were left out, so it can ask over TCP (Consul's default is
/// off).
pub(crate) const DEFAULT_ENABLE_TRUNCATE: bool = true;

/// Consul's SOA timers (`dns_config.soa`): refresh, retry, expire in seconds.
pub(crate) const DEFAULT_SOA_REFRESH: u32 = 3600;
pub(crate) const DEFAULT_SOA_RETRY: u32 = 600;
pub(crate) const DEFAULT_SOA_EXPIRE: u32 = 86_400;

/// Off: a token crosses the network only encrypted unless the operator says the path is trusted.
pub(crate) const DEFAULT_ALLOW_INSECURE_TOKEN: bool = false;

// --- [metrics] and [log] ----------------------------------------------------------------------

/// On: the metrics listener is loopback-only by default, so it exposes nothing off the host.
pub(crate) const DEFAULT_METRICS_ENABLED: bool = true;

/// Where metrics are served by default: CoreDNS's conventional metrics port, loopback only.
pub(crate) const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9153);

/// Off: the debug pages (`/`, `/explain`) show the catalog, so off a loopback listener they
/// need an explicit yes.
pub(crate) const DEFAULT_METRICS_DEBUG: bool = false;

/// Off: a line per query is for debugging, too much for a busy host's logs.
pub(crate) const DEFAULT_LOG_QUERIES: bool = false;
