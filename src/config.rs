//! Configuration: the TOML file, the command-line overrides, and the validated types the rest of the
//! program uses.
//!
//! Everything is checked here, once. Values that can be checked alone (durations, addresses, zone
//! names) are checked while deserializing, so the TOML parser's error already names the file, line,
//! column and key; relations between values (`min_ttl <= max_ttl`, ...) are checked afterwards and
//! located with [`line_of`]. Nothing downstream parses or re-validates strings.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use hickory_proto::rr::Name;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// The DNS port: the default for upstream servers given without one.
pub const DNS_PORT: u16 = 53;

/// Where `--dev` listens: an unprivileged port, so the demo runs without root.
pub const DEV_LISTEN: &str = "127.0.0.1:1053";

/// Where the system's resolvers are listed.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// How long every upstream together may take before the client gets SERVFAIL. Below the 5 s that
/// glibc waits per try, so a client never times out on us while we wait for an upstream.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// Idle TCP connections are closed after this (RFC 7766 §6.2.3 suggests "on the order of seconds").
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Enough for every local client (nginx workers, glibc retries) with a wide margin, small enough
/// that a misbehaving client cannot exhaust file descriptors.
pub const DEFAULT_MAX_TCP_CONNECTIONS: usize = 1024;

/// TCP connections one client network may hold: a quarter of the default total, so at least
/// four networks always find a slot, and still far more than a host's resolver clients open
/// (glibc and nginx use one connection per retried query and close it).
pub const DEFAULT_MAX_TCP_CONNECTIONS_PER_NETWORK: usize = 256;

/// Cached names. 100,000 entries cost a few tens of MiB at most.
pub const DEFAULT_CACHE_ENTRIES: u64 = 100_000;

/// RFC 8767 suggests 1–3 days of stale serving; one hour covers a restarting upstream without
/// pinning long-gone data.
pub const DEFAULT_STALE_FOR: Duration = Duration::from_secs(3600);

/// Upper bound on how long a negative answer is cached (RFC 2308 suggests 1–3 hours max; a short
/// value lets a newly created name appear quickly).
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(300);

/// Upper bound on positive TTLs: one day, as unbound's `cache-max-ttl`.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(86_400);

/// Consul's HTTP API on the local agent.
pub const DEFAULT_CONSUL_HTTP: &str = "http://127.0.0.1:8500";

/// Consul's DNS interface on the local agent.
pub const DEFAULT_CONSUL_DNS: &str = "127.0.0.1:8600";

/// TTL of service answers when `consul.service_ttl` does not say: long enough to absorb bursts,
/// short enough that a client re-asks soon after an instance fails.
pub const DEFAULT_SERVICE_TTL: Duration = Duration::from_secs(5);

/// How long a blocking query may wait in Consul (Consul's default and our default: 5 minutes).
pub const DEFAULT_WATCH_WAIT: Duration = Duration::from_secs(300);

/// Consul caps `wait` at 10 minutes.
pub const MAX_WATCH_WAIT: Duration = Duration::from_secs(600);

/// `consul.stale_for` is at least this many `consul.watch_wait`s: one for the blocking query
/// to return, one for Consul's jitter and a retry.
pub const STALE_FOR_WATCH_WAITS: u32 = 2;

/// A watcher nobody asked about for this long stops.
pub const DEFAULT_WATCH_IDLE: Duration = Duration::from_secs(600);

/// The shortest `consul.watch_idle`: long enough for a first answer from Consul to arrive.
pub const MIN_WATCH_IDLE: Duration = Duration::from_secs(1);

/// How long the last known view of a service is served while Consul is unreachable.
pub const DEFAULT_CONSUL_STALE_FOR: Duration = Duration::from_secs(86_400);

/// Connections to one agent: far below Consul's `limits.http_max_conns_per_client` (200).
pub const DEFAULT_CONSUL_MAX_CONNECTIONS: usize = 32;

/// The smallest connection budget that still leaves a watch slot and a fetch slot (see
/// `consul::client`; connections hold their slot until closed, so no margin is needed).
pub const MIN_CONSUL_CONNECTIONS: usize = 2;

/// Where metrics are served by default: CoreDNS's conventional metrics port, loopback only.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9153";

/// The largest TTL a record may carry: RFC 2181 §8 makes TTLs 31-bit, and resolvers read a
/// larger value as 0, so a longer configured TTL would silently disable caching downstream.
pub const MAX_DNS_TTL: Duration = Duration::from_secs(0x7fff_ffff);

/// More UDP sockets per address than any core count needs; each costs a descriptor, a kernel
/// buffer and a 64 KiB receive buffer, so a typo like 100000 must not exhaust the host.
pub const MAX_UDP_SOCKETS_PER_ADDRESS: usize = 1024;

/// Counts of concurrent things (queries, connections) are semaphores, which cannot hold more
/// than this many permits (tokio panics above it). Larger values are unlimited in practice, so
/// they are clamped, not rejected.
pub const MAX_CONCURRENCY_LIMIT: usize = tokio::sync::Semaphore::MAX_PERMITS;

/// The environment variable the ACL token is read from when `consul.token_file` is not set
/// (the name Consul's own CLI uses).
pub const TOKEN_ENV: &str = "CONSUL_HTTP_TOKEN";

/// A problem with the configuration, worded for the person who has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax, unknown keys, wrong types and values that are wrong on their own. The message from
    /// the TOML parser names the line, column and key.
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        path: String,
        line: usize,
        key: String,
        message: String,
    },
    #[error("{flag}: {message}")]
    Flag { flag: &'static str, message: String },
    /// Found after the command-line flags and the environment are applied, so there is no line.
    #[error("consul.http: {0}")]
    InsecureToken(#[from] InsecureToken),
    #[error("{0}")]
    Other(String),
}

/// The Consul ACL token would cross the network in clear text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{agent} is plain http:// to an agent that is not on this host (not 127.0.0.0/8, ::1 or \
     localhost), and the Consul ACL token from {token_from} would cross the network in clear \
     text. Use an https:// URL for this agent (with consul.ca_file if its CA is private), or set \
     consul.allow_insecure_token = true if the network path to it is trusted"
)]
pub struct InsecureToken {
    pub agent: String,
    pub token_from: String,
}

/// Several problems at once, so `check-config` can list them all.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// ---------------------------------------------------------------------------------------------
// Value types that validate themselves while deserializing.

/// A duration written as a string with a unit: "500ms", "5s", "10m", "1h", "1d".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl FromStr for ConfigDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim()).map(ConfigDuration).map_err(|e| {
            format!("invalid duration {s:?} ({e}): write a number with a unit, like \"500ms\", \"5s\", \"10m\" or \"1h\"")
        })
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `ADDR:PORT`, e.g. `127.0.0.1:53` or `[::1]:53`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim().parse().map(ListenAddr).map_err(|_| {
            format!("invalid address {s:?}: write IP:PORT, like \"127.0.0.1:53\" or \"[::1]:53\"")
        })
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// `ADDR[:PORT]`, the port defaulting to 53: `192.0.2.1`, `192.0.2.1:5353`, `::1`, `[::1]:5353`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerAddr(pub SocketAddr);

impl FromStr for ServerAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Ok(sa) = t.parse::<SocketAddr>() {
            return Ok(ServerAddr(sa));
        }
        if let Ok(ip) = t.parse::<IpAddr>() {
            return Ok(ServerAddr(SocketAddr::new(ip, DNS_PORT)));
        }
        Err(format!(
            "invalid server address {s:?}: write IP or IP:PORT (port 53 by default), like \"192.0.2.1\", \"127.0.0.1:5353\" or \"[::1]:53\""
        ))
    }
}

impl<'de> Deserialize<'de> for ServerAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A network in CIDR form, or a single address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowNet(pub IpNet);

impl FromStr for AllowNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Ok(net) = t.parse::<IpNet>() {
            return Ok(AllowNet(net.trunc()));
        }
        if let Ok(ip) = t.parse::<IpAddr>() {
            return Ok(AllowNet(IpNet::from(ip)));
        }
        Err(format!(
            "invalid network {s:?}: write an address or CIDR, like \"10.0.0.0/8\", \"127.0.0.1\" or \"::1/128\""
        ))
    }
}

impl<'de> Deserialize<'de> for AllowNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A DNS zone such as `consul` or `corp.example.` (stored lowercased, fully qualified).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Zone(pub Name);

impl FromStr for Zone {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.is_empty() {
            return Err(
                "empty zone name: write a domain like \"consul\" or \"corp.example\"".into(),
            );
        }
        let mut name = Name::from_ascii(t).map_err(|e| {
            format!("invalid zone {s:?} ({e}): write a domain like \"consul\" or \"corp.example\"")
        })?;
        name.set_fqdn(true);
        Ok(Zone(name.to_lowercase()))
    }
}

impl<'de> Deserialize<'de> for Zone {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// An `http://` or `https://` base URL of a Consul agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl(pub url::Url);

impl FromStr for HttpUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let url = url::Url::parse(s.trim()).map_err(|e| {
            format!("invalid URL {s:?} ({e}): write a base URL like \"http://127.0.0.1:8500\"")
        })?;
        match url.scheme() {
            "http" | "https" if url.host().is_some() => Ok(HttpUrl(url)),
            _ => Err(format!(
                "invalid URL {s:?}: only http:// and https:// URLs with a host are allowed, like \"http://127.0.0.1:8500\""
            )),
        }
    }
}

impl<'de> Deserialize<'de> for HttpUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------------
// The file as written. Every section and key is optional; `deny_unknown_fields` everywhere.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: FileServer,
    #[serde(default)]
    upstream: FileUpstream,
    #[serde(default)]
    forward: Vec<FileForward>,
    #[serde(default)]
    cache: FileCache,
    #[serde(default)]
    consul: FileConsul,
    #[serde(default)]
    metrics: FileMetrics,
    #[serde(default)]
    log: FileLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    listen: Option<Vec<ListenAddr>>,
    allow: Option<Vec<AllowNet>>,
    tcp_idle_timeout: Option<ConfigDuration>,
    max_tcp_connections: Option<usize>,
    max_tcp_connections_per_network: Option<usize>,
    udp_sockets_per_address: Option<usize>,
    max_inflight: Option<usize>,
    rate_limit: Option<u32>,
    rate_limit_exempt: Option<Vec<AllowNet>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    servers: Option<Vec<ServerAddr>>,
    timeout: Option<ConfigDuration>,
    resolv_conf: Option<PathBuf>,
    max_inflight: Option<usize>,
    randomize_case: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileForward {
    zone: Zone,
    servers: Vec<ServerAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCache {
    max_entries: Option<u64>,
    max_bytes: Option<u64>,
    min_ttl: Option<ConfigDuration>,
    max_ttl: Option<ConfigDuration>,
    negative_ttl: Option<ConfigDuration>,
    stale_for: Option<ConfigDuration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ConsulMode {
    /// Answers from the HTTP health API, kept fresh by blocking queries.
    #[default]
    Http,
    /// The dnsmasq-compatible mode: the domain forwarded to the agents' DNS interface.
    Dns,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WhenNoneHealthy {
    /// NXDOMAIN, as Consul does.
    #[default]
    Nxdomain,
    /// Every instance, healthy or not: better than sending traffic nowhere.
    All,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConsul {
    enabled: Option<bool>,
    mode: Option<ConsulMode>,
    http: Option<Vec<HttpUrl>>,
    dns: Option<Vec<ServerAddr>>,
    domain: Option<Zone>,
    alt_domains: Option<Vec<Zone>>,
    datacenter: Option<String>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    catalog_file: Option<PathBuf>,
    only_passing: Option<bool>,
    when_none_healthy: Option<WhenNoneHealthy>,
    a_record_limit: Option<usize>,
    service_ttl: Option<BTreeMap<String, ConfigDuration>>,
    node_ttl: Option<ConfigDuration>,
    negative_ttl: Option<ConfigDuration>,
    watch_wait: Option<ConfigDuration>,
    watch_idle: Option<ConfigDuration>,
    stale_for: Option<ConfigDuration>,
    max_connections: Option<usize>,
    allow_insecure_token: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMetrics {
    listen: Option<ListenAddr>,
    enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLog {
    queries: Option<bool>,
}

// ---------------------------------------------------------------------------------------------
// The validated configuration.

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub forward: Vec<ForwardZone>,
    pub cache: CacheConfig,
    pub consul: ConsulConfig,
    pub metrics: MetricsConfig,
    pub log_queries: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    pub allow: Vec<IpNet>,
    pub tcp_idle_timeout: Duration,
    pub max_tcp_connections: usize,
    /// Of `max_tcp_connections`, how many one client network (/24 for IPv4, /56 for IPv6, as
    /// the rate limit) may hold, so one client cannot lock the others out of TCP.
    pub max_tcp_connections_per_network: usize,
    /// SO_REUSEPORT sockets per UDP listen address, each with its own receive loop (0 = one per core).
    pub udp_sockets_per_address: usize,
    /// Queries being answered at once across UDP and TCP; beyond it UDP queries are dropped
    /// (and counted) rather than queued without bound.
    pub max_inflight: usize,
    /// Responses per second to one client network (/24 for IPv4, /56 for IPv6) over UDP; above
    /// it, UDP queries get an empty TC=1 reply so real clients retry over TCP (which a spoofed
    /// source cannot). `None` = the default: off when every listen address is loopback, else
    /// [`DEFAULT_RATE_LIMIT`]. `Some(0)` = off.
    pub rate_limit: Option<u32>,
    /// Clients never rate-limited.
    pub rate_limit_exempt: Vec<IpNet>,
}

impl ServerConfig {
    /// The rate limit in force (0 = off); see [`ServerConfig::rate_limit`].
    pub fn effective_rate_limit(&self) -> u32 {
        match self.rate_limit {
            Some(r) => r,
            None if self.listen.iter().all(|a| a.ip().is_loopback()) => 0,
            None => DEFAULT_RATE_LIMIT,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Empty until [`Config::resolve_system_upstreams`] fills it from resolv.conf.
    pub servers: Vec<SocketAddr>,
    pub timeout: Duration,
    pub resolv_conf: PathBuf,
    /// Upstream fetches in flight at once; beyond it a miss is answered SERVFAIL (or stale) at
    /// once instead of piling up behind a slow upstream.
    pub max_inflight: usize,
    /// Random letter case in upstream questions (DNS 0x20), checked in replies: more entropy
    /// against blind spoofing. Off by default because some upstreams do not preserve case
    /// (those are re-asked without it, at the cost of a round trip).
    pub randomize_case: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ForwardZone {
    pub zone: Name,
    pub servers: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    pub max_entries: u64,
    /// Approximate bytes of cached records; whichever of the two limits is reached first evicts.
    pub max_bytes: u64,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub negative_ttl: Duration,
    pub stale_for: Duration,
}

/// A `consul.service_ttl` key: exact service name, `prefix*`, or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TtlPattern {
    Exact(String),
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConsulConfig {
    pub enabled: bool,
    pub mode: ConsulMode,
    pub http: Vec<url::Url>,
    pub dns: Vec<SocketAddr>,
    /// The main domain first, then the alternative ones.
    pub domains: Vec<Name>,
    pub datacenter: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub catalog_file: Option<PathBuf>,
    /// Serve the built-in demo catalog (`--dev` without a catalog file).
    pub demo_catalog: bool,
    pub only_passing: bool,
    pub when_none_healthy: WhenNoneHealthy,
    pub a_record_limit: usize,
    /// Longest pattern first, so the first match is the best one.
    pub service_ttl: Vec<(TtlPattern, Duration)>,
    pub node_ttl: Duration,
    pub negative_ttl: Duration,
    pub watch_wait: Duration,
    pub watch_idle: Duration,
    pub stale_for: Duration,
    pub max_connections: usize,
    /// Send the token to `http://` agents that are not on loopback (off: refused at start and
    /// on reload, see [`ConsulConfig::check_token_transport`]).
    pub allow_insecure_token: bool,
}

impl ConsulConfig {
    /// The TTL for a service: exact name, then the longest matching `prefix*`, then `*`.
    pub fn service_ttl_for(&self, service: &str) -> Duration {
        for (pattern, ttl) in &self.service_ttl {
            match pattern {
                TtlPattern::Exact(name) if name.eq_ignore_ascii_case(service) => return *ttl,
                TtlPattern::Prefix(p)
                    if service.len() >= p.len() && service[..p.len()].eq_ignore_ascii_case(p) =>
                {
                    return *ttl
                }
                _ => {}
            }
        }
        DEFAULT_SERVICE_TTL
    }

    /// Refuses a token that would go in clear text to an agent off this host. Checked when the
    /// token is read (start and every reload) and by `check-config`, after the flags are
    /// applied, since `--consul-http` and `CONSUL_HTTP_TOKEN` can both bring the problem in.
    pub fn check_token_transport(&self) -> Result<(), InsecureToken> {
        let env_token = std::env::var(TOKEN_ENV).is_ok_and(|t| !t.trim().is_empty());
        self.check_token_transport_with(env_token)
    }

    fn check_token_transport_with(&self, env_token: bool) -> Result<(), InsecureToken> {
        // Only the HTTP backend talks to agents with the token.
        if !self.enabled
            || self.mode != ConsulMode::Http
            || self.catalog_file.is_some()
            || self.demo_catalog
            || self.allow_insecure_token
        {
            return Ok(());
        }
        let token_from = match &self.token_file {
            Some(path) => format!("consul.token_file ({})", path.display()),
            None if env_token => TOKEN_ENV.to_owned(),
            None => return Ok(()),
        };
        match self
            .http
            .iter()
            .find(|u| u.scheme() == "http" && !is_loopback_url(u))
        {
            Some(agent) => Err(InsecureToken {
                agent: agent.as_str().to_owned(),
                token_from,
            }),
            None => Ok(()),
        }
    }
}

/// Does `url` name this host? Only literal loopback addresses and `localhost` count: any other
/// name could resolve off the host.
fn is_loopback_url(url: &url::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.is_loopback(),
        Ok(IpAddr::V6(v6)) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Err(_) => {
            let name = bare.strip_suffix('.').unwrap_or(bare);
            name.eq_ignore_ascii_case("localhost")
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    pub listen: Option<SocketAddr>,
}

/// Command-line values that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Vec<String>,
    pub upstream: Vec<String>,
    pub consul_http: Vec<String>,
    pub consul_dns: Vec<String>,
    pub catalog_file: Option<PathBuf>,
    pub metrics_listen: Option<String>,
    pub dev: bool,
}

impl Default for Config {
    fn default() -> Self {
        // Built from an empty file so there is a single source of defaults.
        match Config::from_toml_str("", "<defaults>") {
            Ok(c) => c,
            Err(e) => unreachable!("the empty config is valid: {e}"),
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            ConfigErrors(vec![ConfigError::Read {
                path: path.to_owned(),
                source,
            }])
        })?;
        Config::from_toml_str(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn from_toml_str(text: &str, path: &str) -> Result<Config, ConfigErrors> {
        let file: FileConfig = toml::from_str(text).map_err(|e| {
            ConfigErrors(vec![ConfigError::Parse {
                path: path.to_owned(),
                message: e.to_string().trim_end().to_owned(),
            }])
        })?;
        let mut errors = Vec::new();
        let invalid = |section: &str, key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            line: line_of(text, section, key),
            key: format!("{section}.{key}"),
            message,
        };

        let s = file.server;
        let listen: Vec<SocketAddr> = match s.listen {
            Some(l) => l.into_iter().map(|a| a.0).collect(),
            None => vec![
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DNS_PORT),
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), DNS_PORT),
            ],
        };
        if listen.is_empty() {
            errors.push(invalid(
                "server",
                "listen",
                "at least one address is needed, like [\"127.0.0.1:53\"]".into(),
            ));
        }
        let allow: Vec<IpNet> = match s.allow {
            Some(a) => a.into_iter().map(|n| n.0).collect(),
            None => vec![
                AllowNet::from_str("127.0.0.0/8").map(|n| n.0),
                AllowNet::from_str("::1/128").map(|n| n.0),
            ]
            .into_iter()
            .flatten()
            .collect(),
        };
        let max_tcp_connections = s
            .max_tcp_connections
            .unwrap_or(DEFAULT_MAX_TCP_CONNECTIONS)
            .min(MAX_CONCURRENCY_LIMIT);
        if max_tcp_connections == 0 {
            errors.push(invalid(
                "server",
                "max_tcp_connections",
                "must be at least 1 (TCP is required for truncated answers)".into(),
            ));
        }
        let max_tcp_connections_per_network = s
            .max_tcp_connections_per_network
            .unwrap_or(DEFAULT_MAX_TCP_CONNECTIONS_PER_NETWORK);
        if max_tcp_connections_per_network == 0 {
            errors.push(invalid(
                "server",
                "max_tcp_connections_per_network",
                "must be at least 1 (TCP is required for truncated answers)".into(),
            ));
        }
        let tcp_idle_timeout = s.tcp_idle_timeout.map_or(DEFAULT_TCP_IDLE_TIMEOUT, |d| d.0);
        if tcp_idle_timeout < Duration::from_millis(100) {
            errors.push(invalid(
                "server",
                "tcp_idle_timeout",
                "must be at least 100ms, like \"10s\"".into(),
            ));
        }
        let max_inflight = s
            .max_inflight
            .unwrap_or(DEFAULT_MAX_INFLIGHT)
            .min(MAX_CONCURRENCY_LIMIT);
        if max_inflight == 0 {
            errors.push(invalid(
                "server",
                "max_inflight",
                "must be at least 1".into(),
            ));
        }
        let udp_sockets_per_address = s.udp_sockets_per_address.unwrap_or(0);
        if udp_sockets_per_address > MAX_UDP_SOCKETS_PER_ADDRESS {
            errors.push(invalid(
                "server",
                "udp_sockets_per_address",
                format!("must be between 0 (one per CPU core) and {MAX_UDP_SOCKETS_PER_ADDRESS}"),
            ));
        }
        let server = ServerConfig {
            listen,
            allow,
            tcp_idle_timeout,
            max_tcp_connections,
            max_tcp_connections_per_network,
            udp_sockets_per_address,
            max_inflight,
            rate_limit: s.rate_limit,
            rate_limit_exempt: match s.rate_limit_exempt {
                Some(v) => v.into_iter().map(|n| n.0).collect(),
                None => ["127.0.0.0/8", "::1/128"]
                    .iter()
                    .filter_map(|n| AllowNet::from_str(n).ok().map(|n| n.0))
                    .collect(),
            },
        };

        let u = file.upstream;
        let timeout = u.timeout.map_or(DEFAULT_UPSTREAM_TIMEOUT, |d| d.0);
        if timeout < Duration::from_millis(10) || timeout > Duration::from_secs(30) {
            errors.push(invalid(
                "upstream",
                "timeout",
                "must be between 10ms and 30s (clients give up after about 5s)".into(),
            ));
        }
        let upstream = UpstreamConfig {
            servers: u
                .servers
                .unwrap_or_default()
                .into_iter()
                .map(|a| a.0)
                .collect(),
            timeout,
            resolv_conf: u.resolv_conf.unwrap_or_else(|| PathBuf::from(RESOLV_CONF)),
            max_inflight: u
                .max_inflight
                .unwrap_or(DEFAULT_UPSTREAM_INFLIGHT)
                .min(MAX_CONCURRENCY_LIMIT),
            randomize_case: u.randomize_case.unwrap_or(false),
        };
        if upstream.max_inflight == 0 {
            errors.push(invalid(
                "upstream",
                "max_inflight",
                "must be at least 1".into(),
            ));
        }

        let mut forward = Vec::new();
        for f in file.forward {
            if f.servers.is_empty() {
                errors.push(invalid(
                    "forward",
                    "servers",
                    format!(
                        "zone {} has no servers: list at least one, like [\"10.0.0.1\"]",
                        f.zone.0
                    ),
                ));
            }
            forward.push(ForwardZone {
                zone: f.zone.0,
                servers: f.servers.into_iter().map(|a| a.0).collect(),
            });
        }

        let c = file.cache;
        let cache = CacheConfig {
            max_entries: c.max_entries.unwrap_or(DEFAULT_CACHE_ENTRIES),
            max_bytes: c.max_bytes.unwrap_or(DEFAULT_CACHE_BYTES),
            min_ttl: c.min_ttl.map_or(Duration::ZERO, |d| d.0),
            max_ttl: c.max_ttl.map_or(DEFAULT_MAX_TTL, |d| d.0),
            negative_ttl: c.negative_ttl.map_or(DEFAULT_NEGATIVE_TTL, |d| d.0),
            stale_for: c.stale_for.map_or(DEFAULT_STALE_FOR, |d| d.0),
        };
        if cache.max_entries == 0 || cache.max_bytes < 1024 {
            errors.push(invalid(
                "cache",
                if cache.max_entries == 0 {
                    "max_entries"
                } else {
                    "max_bytes"
                },
                "max_entries must be at least 1 and max_bytes at least 1024".into(),
            ));
        }
        if cache.min_ttl > cache.max_ttl {
            errors.push(invalid(
                "cache",
                "min_ttl",
                format!(
                    "{} is above cache.max_ttl ({}): min_ttl must not exceed max_ttl",
                    humantime::format_duration(cache.min_ttl),
                    humantime::format_duration(cache.max_ttl)
                ),
            ));
        }
        if cache.max_ttl > MAX_DNS_TTL {
            errors.push(invalid("cache", "max_ttl", ttl_range()));
        }

        let k = file.consul;
        let domain = k.domain.map_or_else(
            || Name::from_ascii("consul.").map_err(|e| e.to_string()),
            |z| Ok(z.0),
        );
        let mut domains = Vec::new();
        match domain {
            Ok(d) => domains.push(d),
            Err(e) => errors.push(ConfigError::Other(e)),
        }
        for alt in k.alt_domains.unwrap_or_default() {
            if domains.contains(&alt.0) {
                errors.push(invalid(
                    "consul",
                    "alt_domains",
                    format!("{} is listed twice (or is the main domain)", alt.0),
                ));
            } else {
                domains.push(alt.0);
            }
        }
        let mut service_ttl = Vec::new();
        let mut star = None;
        for (pattern, ttl) in k.service_ttl.unwrap_or_default() {
            if pattern == "*" {
                star = Some(ttl.0);
            } else if let Some(prefix) = pattern.strip_suffix('*') {
                if prefix.contains('*') {
                    errors.push(invalid(
                        "consul",
                        "service_ttl",
                        format!(
                            "pattern {pattern:?}: only one trailing * is allowed, like \"web*\""
                        ),
                    ));
                }
                service_ttl.push((TtlPattern::Prefix(prefix.to_owned()), ttl.0));
            } else if pattern.contains('*') || pattern.is_empty() {
                errors.push(invalid(
                    "consul",
                    "service_ttl",
                    format!(
                        "pattern {pattern:?}: write a service name, a prefix ending in *, or *"
                    ),
                ));
            } else {
                service_ttl.push((TtlPattern::Exact(pattern.clone()), ttl.0));
            }
            if ttl.0 > MAX_DNS_TTL {
                errors.push(invalid(
                    "consul.service_ttl",
                    &format!("{pattern:?}"),
                    ttl_range(),
                ));
            }
        }
        // Exact names first, then prefixes longest first, then `*`: the first match wins.
        service_ttl.sort_by(|a, b| match (&a.0, &b.0) {
            (TtlPattern::Exact(_), TtlPattern::Prefix(_)) => std::cmp::Ordering::Less,
            (TtlPattern::Prefix(_), TtlPattern::Exact(_)) => std::cmp::Ordering::Greater,
            (TtlPattern::Prefix(x), TtlPattern::Prefix(y)) => y.len().cmp(&x.len()),
            _ => std::cmp::Ordering::Equal,
        });
        service_ttl.push((
            TtlPattern::Prefix(String::new()),
            star.unwrap_or(DEFAULT_SERVICE_TTL),
        ));
        let watch_wait = k.watch_wait.map_or(DEFAULT_WATCH_WAIT, |d| d.0);
        if watch_wait < Duration::from_secs(1) || watch_wait > MAX_WATCH_WAIT {
            errors.push(invalid(
                "consul",
                "watch_wait",
                "must be between 1s and 10m (Consul caps blocking queries at 10 minutes)".into(),
            ));
        }
        let max_connections = k
            .max_connections
            .unwrap_or(DEFAULT_CONSUL_MAX_CONNECTIONS)
            .min(MAX_CONCURRENCY_LIMIT);
        if max_connections < MIN_CONSUL_CONNECTIONS {
            errors.push(invalid(
                "consul",
                "max_connections",
                format!("must be at least {MIN_CONSUL_CONNECTIONS} (one for blocking watches, one for first lookups)"),
            ));
        }
        let http: Vec<url::Url> = match k.http {
            Some(v) => v.into_iter().map(|u| u.0).collect(),
            None => vec![HttpUrl::from_str(DEFAULT_CONSUL_HTTP)
                .map(|u| u.0)
                .map_err(|e| ConfigErrors(vec![ConfigError::Other(e)]))?],
        };
        let mode = k.mode.unwrap_or_default();
        if mode == ConsulMode::Http && http.is_empty() && k.catalog_file.is_none() {
            errors.push(invalid(
                "consul",
                "http",
                "no agent listed: give at least one URL, like [\"http://127.0.0.1:8500\"]".into(),
            ));
        }
        let dns: Vec<SocketAddr> = match k.dns {
            Some(v) => v.into_iter().map(|a| a.0).collect(),
            None => vec![ServerAddr::from_str(DEFAULT_CONSUL_DNS)
                .map(|a| a.0)
                .map_err(|e| ConfigErrors(vec![ConfigError::Other(e)]))?],
        };
        if mode == ConsulMode::Dns && dns.is_empty() {
            errors.push(invalid(
                "consul",
                "dns",
                "mode = \"dns\" needs at least one agent DNS address, like [\"127.0.0.1:8600\"]"
                    .into(),
            ));
        }
        if let Some(dc) = &k.datacenter {
            if dc.is_empty() || dc.contains('.') {
                errors.push(invalid(
                    "consul",
                    "datacenter",
                    format!("{dc:?} is not a datacenter name (one DNS label, like \"dc1\")"),
                ));
            }
        }
        let stale_for = k.stale_for.map_or(DEFAULT_CONSUL_STALE_FOR, |d| d.0);
        // A blocking query confirms a view only when it returns: up to watch_wait, plus up to
        // wait/16 of Consul's jitter, later. A shorter stale_for would turn quiet, healthy
        // services into SERVFAIL between two confirmations.
        let min_stale_for = watch_wait.saturating_mul(STALE_FOR_WATCH_WAITS);
        // Only in the mode with watchers (in mode = "dns" stale_for is a cache setting), and
        // only against a valid watch_wait: otherwise that key's own error says it all.
        if mode == ConsulMode::Http && stale_for < min_stale_for && watch_wait <= MAX_WATCH_WAIT {
            errors.push(invalid(
                "consul",
                "stale_for",
                format!(
                    "must be at least {STALE_FOR_WATCH_WAITS} × consul.watch_wait ({}): a blocking query \
                     confirms a view only when it returns, up to watch_wait later, and a view older \
                     than stale_for is answered SERVFAIL; raise stale_for or lower watch_wait",
                    humantime::format_duration(min_stale_for)
                ),
            ));
        }
        let watch_idle = k.watch_idle.map_or(DEFAULT_WATCH_IDLE, |d| d.0);
        if watch_idle < MIN_WATCH_IDLE {
            errors.push(invalid(
                "consul",
                "watch_idle",
                format!(
                    "must be at least {} (a watcher checks it before its first request: a shorter \
                     one stops before Consul answers, and every name gets SERVFAIL)",
                    humantime::format_duration(MIN_WATCH_IDLE)
                ),
            ));
        }
        let node_ttl = k.node_ttl.map_or(DEFAULT_SERVICE_TTL, |d| d.0);
        let negative_ttl = k.negative_ttl.map_or(DEFAULT_SERVICE_TTL, |d| d.0);
        for (key, ttl) in [("node_ttl", node_ttl), ("negative_ttl", negative_ttl)] {
            if ttl > MAX_DNS_TTL {
                errors.push(invalid("consul", key, ttl_range()));
            }
        }
        let consul = ConsulConfig {
            enabled: k.enabled.unwrap_or(true),
            mode,
            http,
            dns,
            domains,
            datacenter: k.datacenter.map(|d| d.to_ascii_lowercase()),
            token_file: k.token_file,
            ca_file: k.ca_file,
            catalog_file: k.catalog_file,
            demo_catalog: false,
            only_passing: k.only_passing.unwrap_or(false),
            when_none_healthy: k.when_none_healthy.unwrap_or_default(),
            a_record_limit: k.a_record_limit.unwrap_or(0),
            service_ttl,
            node_ttl,
            negative_ttl,
            watch_wait,
            watch_idle,
            stale_for,
            max_connections,
            allow_insecure_token: k.allow_insecure_token.unwrap_or(false),
        };
        // The token file is known here, so its problem gets a line; a token from the
        // environment or an agent from a flag is checked after the flags are applied.
        if consul.token_file.is_some() {
            if let Err(e) = consul.check_token_transport_with(false) {
                errors.push(invalid("consul", "http", e.to_string()));
            }
        }

        let metrics = MetricsConfig {
            listen: if file.metrics.enabled == Some(false) {
                None
            } else {
                Some(file.metrics.listen.map_or_else(
                    || {
                        SocketAddr::from_str(DEFAULT_METRICS_LISTEN)
                            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9153)))
                    },
                    |a| a.0,
                ))
            },
        };

        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Config {
            server,
            upstream,
            forward,
            cache,
            consul,
            metrics,
            log_queries: file.log.queries.unwrap_or(false),
        })
    }

    /// Applies command-line flags over the file's values.
    pub fn apply_overrides(&mut self, o: &Overrides) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        fn parse_all<T: FromStr<Err = String>>(
            flag: &'static str,
            values: &[String],
            errors: &mut Vec<ConfigError>,
        ) -> Vec<T> {
            values
                .iter()
                .filter_map(|v| match v.parse() {
                    Ok(x) => Some(x),
                    Err(message) => {
                        errors.push(ConfigError::Flag { flag, message });
                        None
                    }
                })
                .collect()
        }
        if o.dev && o.listen.is_empty() {
            if let Ok(a) = DEV_LISTEN.parse() {
                self.server.listen = vec![a];
            }
        }
        if !o.listen.is_empty() {
            self.server.listen = parse_all::<ListenAddr>("--listen", &o.listen, &mut errors)
                .into_iter()
                .map(|a| a.0)
                .collect();
        }
        if !o.upstream.is_empty() {
            self.upstream.servers = parse_all::<ServerAddr>("--upstream", &o.upstream, &mut errors)
                .into_iter()
                .map(|a| a.0)
                .collect();
        }
        if !o.consul_http.is_empty() {
            self.consul.http = parse_all::<HttpUrl>("--consul-http", &o.consul_http, &mut errors)
                .into_iter()
                .map(|u| u.0)
                .collect();
        }
        if !o.consul_dns.is_empty() {
            self.consul.dns = parse_all::<ServerAddr>("--consul-dns", &o.consul_dns, &mut errors)
                .into_iter()
                .map(|a| a.0)
                .collect();
            self.consul.mode = ConsulMode::Dns;
        }
        if let Some(f) = &o.catalog_file {
            self.consul.catalog_file = Some(f.clone());
        }
        if o.dev && self.consul.catalog_file.is_none() {
            self.consul.demo_catalog = true;
        }
        if let Some(m) = &o.metrics_listen {
            match m.parse::<ListenAddr>() {
                Ok(a) => self.metrics.listen = Some(a.0),
                Err(message) => errors.push(ConfigError::Flag {
                    flag: "--metrics-listen",
                    message,
                }),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Fills `upstream.servers` from resolv.conf when neither the file nor a flag named any, and
    /// refuses upstreams that are this forwarder itself (a query loop).
    pub fn resolve_system_upstreams(&mut self) -> Result<(), ConfigError> {
        if self.upstream.servers.is_empty() {
            let path = &self.upstream.resolv_conf;
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::Other(format!(
                    "no upstream servers configured and {} cannot be read ({e}): set upstream.servers or pass --upstream ADDR",
                    path.display()
                ))
            })?;
            self.upstream.servers = parse_resolv_conf(&text);
            if self.upstream.servers.is_empty() {
                return Err(ConfigError::Other(format!(
                    "no upstream servers configured and {} lists no nameserver: set upstream.servers or pass --upstream ADDR",
                    path.display()
                )));
            }
        }
        let groups = std::iter::once(("upstream.servers", &self.upstream.servers))
            .chain(self.forward.iter().map(|f| ("forward.servers", &f.servers)));
        for (key, servers) in groups {
            for s in servers {
                if self.server.listen.iter().any(|l| is_same_endpoint(*l, *s)) {
                    return Err(ConfigError::Other(format!(
                        "{key} includes {s}, which is this forwarder's own listen address: queries would loop back to us. \
                         If /etc/resolv.conf points at this forwarder, list the real upstream resolvers in upstream.servers or with --upstream"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Cache memory bound: 100,000 typical answers fit with room to spare.
pub const DEFAULT_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// Upstream fetches in flight: far above what a healthy upstream needs (answers take
/// milliseconds), low enough that a black-holed upstream cannot tie up memory without bound.
pub const DEFAULT_UPSTREAM_INFLIGHT: usize = 1024;

/// Responses per second per client network when rate limiting is on by default (non-loopback
/// listen addresses): ample for a host's resolver clients, small for an amplification attack.
pub const DEFAULT_RATE_LIMIT: u32 = 200;

/// How many queries may be in progress at once before new UDP queries are shed.
pub const DEFAULT_MAX_INFLIGHT: usize = 10_000;

/// The message for a TTL above [`MAX_DNS_TTL`].
fn ttl_range() -> String {
    format!(
        "must be between 0s and {}s, about 68 years (RFC 2181: resolvers read a larger TTL as 0)",
        MAX_DNS_TTL.as_secs()
    )
}

/// Would a query sent to `upstream` arrive at a socket bound to `listen`?
fn is_same_endpoint(listen: SocketAddr, upstream: SocketAddr) -> bool {
    if listen.port() != upstream.port() {
        return false;
    }
    let (l, u) = (listen.ip(), upstream.ip());
    l == u || (l.is_unspecified() && (u.is_loopback() || u.is_unspecified()))
}

/// The `nameserver` lines of a resolv.conf, port 53. Scoped IPv6 (`fe80::1%eth0`) is skipped.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(addr)) => addr
                    .parse::<IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, DNS_PORT)),
                _ => None,
            }
        })
        .collect()
}

/// The 1-based line where `key` is set inside `[section]` (or `[[section]]`); the section header's
/// line when the key is not written (its default was used), 1 when neither is found.
pub fn line_of(text: &str, section: &str, key: &str) -> usize {
    let mut current = String::new();
    let mut section_line = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(header) = line.strip_prefix('[') {
            current = header
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_owned();
            if current == section && section_line.is_none() {
                section_line = Some(i + 1);
            }
            continue;
        }
        if current == section {
            if let Some(rest) = line.strip_prefix(key) {
                if rest.trim_start().starts_with('=') {
                    return i + 1;
                }
            }
        }
    }
    section_line.unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = Config::from_toml_str("", "x.toml").expect("valid");
        assert_eq!(c.server.listen.len(), 2);
        assert_eq!(c.upstream.timeout, Duration::from_secs(2));
        assert_eq!(c.cache.stale_for, Duration::from_secs(3600));
        assert_eq!(c.consul.domains[0].to_ascii(), "consul.");
        assert_eq!(c.consul.service_ttl_for("anything"), Duration::from_secs(5));
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = Config::from_toml_str("[server]\nlisten = []\nbogus = 1\n", "f.toml")
            .expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.contains("f.toml"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("bogus"), "{msg}");
    }

    #[test]
    fn bad_duration_is_explained() {
        let err = Config::from_toml_str("[upstream]\ntimeout = \"soon\"\n", "f.toml")
            .expect_err("bad duration");
        let msg = err.to_string();
        assert!(msg.contains("line 2"), "{msg}");
        assert!(msg.contains("\"5s\""), "{msg}");
    }

    #[test]
    fn cross_field_errors_carry_line() {
        let err = Config::from_toml_str("[cache]\nmax_ttl = \"10s\"\nmin_ttl = \"1m\"\n", "f.toml")
            .expect_err("min > max");
        assert!(err.to_string().contains("f.toml:3: cache.min_ttl"), "{err}");
    }

    #[test]
    fn server_addresses_default_to_port_53() {
        assert_eq!(
            ServerAddr::from_str("192.0.2.1").map(|a| a.0),
            Ok("192.0.2.1:53".parse().expect("addr"))
        );
        assert_eq!(
            ServerAddr::from_str("::1").map(|a| a.0),
            Ok("[::1]:53".parse().expect("addr"))
        );
        assert!(ServerAddr::from_str("example.com").is_err());
    }

    #[test]
    fn service_ttl_longest_match_wins() {
        let c = Config::from_toml_str(
            "[consul.service_ttl]\n\"*\" = \"7s\"\n\"we*\" = \"8s\"\n\"web*\" = \"9s\"\n\"web\" = \"10s\"\n",
            "f.toml",
        )
        .expect("valid");
        assert_eq!(c.consul.service_ttl_for("web"), Duration::from_secs(10));
        assert_eq!(c.consul.service_ttl_for("webapp"), Duration::from_secs(9));
        assert_eq!(c.consul.service_ttl_for("west"), Duration::from_secs(8));
        assert_eq!(c.consul.service_ttl_for("db"), Duration::from_secs(7));
    }

    #[test]
    fn resolv_conf_nameservers() {
        let s = parse_resolv_conf(
            "# comment\nsearch example\nnameserver 192.0.2.53\nnameserver ::1 # x\nnameserver fe80::1%eth0\noptions edns0\n",
        );
        assert_eq!(
            s,
            vec![
                "192.0.2.53:53".parse().expect("addr"),
                "[::1]:53".parse().expect("addr")
            ]
        );
    }

    #[test]
    fn shipped_config_shows_the_defaults() {
        let text = include_str!("../conf/consul-dns-forwarder.toml");
        let shipped = Config::from_toml_str(text, "conf/consul-dns-forwarder.toml").expect("valid");
        assert_eq!(shipped, Config::default());
    }

    #[test]
    fn concurrency_limits_beyond_a_semaphore_are_clamped() {
        let c = Config::from_toml_str(
            "[server]\nmax_inflight = 18446744073709551615\nmax_tcp_connections = 9223372036854775807\n\
             [upstream]\nmax_inflight = 18446744073709551615\n[consul]\nmax_connections = 18446744073709551615\n",
            "f.toml",
        )
        .expect("huge counts mean unlimited");
        assert_eq!(c.server.max_inflight, MAX_CONCURRENCY_LIMIT);
        assert_eq!(c.server.max_tcp_connections, MAX_CONCURRENCY_LIMIT);
        assert_eq!(c.upstream.max_inflight, MAX_CONCURRENCY_LIMIT);
        assert_eq!(c.consul.max_connections, MAX_CONCURRENCY_LIMIT);
    }

    #[test]
    fn ttls_above_31_bits_are_rejected_with_their_key() {
        let err = Config::from_toml_str(
            "[consul]\nnode_ttl = \"100000000y\"\n[consul.service_ttl]\n\"web*\" = \"69y\"\n",
            "f.toml",
        )
        .expect_err("TTL beyond RFC 2181");
        let msg = err.to_string();
        assert!(
            msg.contains("f.toml:2: consul.node_ttl: must be between 0s and 2147483647s"),
            "{msg}"
        );
        assert!(
            msg.contains("f.toml:4: consul.service_ttl.\"web*\""),
            "{msg}"
        );
        let ok = Config::from_toml_str("[consul]\nnode_ttl = \"2147483647s\"\n", "f.toml");
        assert!(ok.is_ok(), "the largest TTL itself is allowed");
    }

    #[test]
    fn consul_stale_for_covers_two_blocking_waits_and_watchers_live_a_second() {
        let err = Config::from_toml_str("[consul]\nstale_for = \"9m\"\n", "f.toml")
            .expect_err("below 2 x the default 5m watch_wait");
        assert!(
            err.to_string().contains(
                "f.toml:2: consul.stale_for: must be at least 2 × consul.watch_wait (10m)"
            ),
            "{err}"
        );
        for ok in [
            "[consul]\nstale_for = \"10m\"\n",
            "[consul]\nstale_for = \"2s\"\nwatch_wait = \"1s\"\n",
            "[consul]\nstale_for = \"0s\"\nmode = \"dns\"\n",
            "[consul]\nwatch_idle = \"1s\"\n",
        ] {
            assert!(Config::from_toml_str(ok, "f.toml").is_ok(), "{ok}");
        }
        let err = Config::from_toml_str("[consul]\nwatch_idle = \"500ms\"\n", "f.toml")
            .expect_err("watch_idle below 1s");
        assert!(
            err.to_string()
                .contains("f.toml:2: consul.watch_idle: must be at least 1s"),
            "{err}"
        );
    }

    fn consul_with(http: &str, extra: &str) -> Result<Config, ConfigErrors> {
        Config::from_toml_str(
            &format!("[consul]\nhttp = [\"{http}\"]\ntoken_file = \"/run/token\"\n{extra}"),
            "f.toml",
        )
    }

    #[test]
    fn token_over_plain_http_off_host_is_refused_with_the_fix() {
        let msg = consul_with("http://192.0.2.1:8500", "")
            .expect_err("clear-text token")
            .to_string();
        assert!(
            msg.starts_with("f.toml:2: consul.http: http://192.0.2.1:8500/"),
            "{msg}"
        );
        for part in [
            "consul.token_file (/run/token)",
            "https://",
            "consul.allow_insecure_token = true",
        ] {
            assert!(msg.contains(part), "{part} missing: {msg}");
        }
        for http in [
            "http://127.0.0.1:8500",
            "http://127.8.9.10:8500",
            "http://localhost:8500",
            "http://LOCALHOST.:8500",
            "http://[::1]:8500",
            "https://192.0.2.1:8501",
        ] {
            assert!(consul_with(http, "").is_ok(), "{http} must be accepted");
        }
        assert!(consul_with("http://192.0.2.1:8500", "allow_insecure_token = true\n").is_ok());
        assert!(consul_with("http://192.0.2.1:8500", "catalog_file = \"/x.json\"\n").is_ok());
        assert!(consul_with("http://192.0.2.1:8500", "mode = \"dns\"\n").is_ok());
        assert!(
            consul_with("http://localhost.example:8500", "").is_err(),
            "a name that merely starts with localhost is not loopback"
        );
    }

    #[test]
    fn token_from_the_environment_is_checked_too() {
        let mut c =
            Config::from_toml_str("[consul]\nhttp = [\"http://192.0.2.1:8500\"]\n", "f.toml")
                .expect("no token file: nothing to check in the file");
        assert_eq!(c.consul.check_token_transport_with(false), Ok(()));
        let err = c
            .consul
            .check_token_transport_with(true)
            .expect_err("env token");
        assert_eq!(err.token_from, TOKEN_ENV);
        c.consul.allow_insecure_token = true;
        assert_eq!(c.consul.check_token_transport_with(true), Ok(()));
    }

    #[test]
    fn upstream_equal_to_listen_is_a_loop() {
        let mut c = Config::default();
        c.server.listen = vec!["127.0.0.1:53".parse().expect("addr")];
        c.upstream.servers = vec!["127.0.0.1:53".parse().expect("addr")];
        let err = c.resolve_system_upstreams().expect_err("loop");
        assert!(err.to_string().contains("loop"), "{err}");
        c.upstream.servers = vec!["127.0.0.1:5353".parse().expect("addr")];
        assert!(c.resolve_system_upstreams().is_ok());
    }
}
