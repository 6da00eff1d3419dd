//! The validated configuration: typed values the rest of the program uses without parsing or
//! checking them again.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use hickory_proto::rr::Name;
use ipnet::IpNet;

use super::defaults::{
    DEFAULT_RATE_LIMIT, DEFAULT_SERVICE_TTL, DEFAULT_SOA_EXPIRE, DEFAULT_SOA_REFRESH,
    DEFAULT_SOA_RETRY, TOKEN_ENV,
};
use super::errors::InsecureToken;
use super::schema::{ConsulMode, LogFormat, WhenNoneHealthy};

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub(crate) forward: Vec<ForwardZone>,
    pub(crate) cache: CacheConfig,
    pub consul: ConsulConfig,
    pub metrics: MetricsConfig,
    pub(crate) log_queries: bool,
    /// `log.format`; `--log-format` wins over it. Read at start only.
    pub log_format: LogFormat,
    /// `log.level`, used when `RUST_LOG` is not set. Read at start only.
    pub log_level: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    pub allow: Vec<IpNet>,
    pub(crate) tcp_idle_timeout: Duration,
    pub(crate) max_tcp_connections: usize,
    /// Of `max_tcp_connections`, how many one client network (/24 for IPv4, /56 for IPv6, as
    /// the rate limit) may hold, so one client cannot lock the others out of TCP.
    pub(crate) max_tcp_connections_per_network: usize,
    /// SO_REUSEPORT sockets per UDP listen address, each with its own receive loop (0 = one per core).
    pub udp_sockets_per_address: usize,
    /// Queries being answered at once across UDP and TCP; beyond it UDP queries are dropped
    /// (and counted) rather than queued without bound.
    pub(crate) max_inflight: usize,
    /// Responses per second to one client network (/24 for IPv4, /56 for IPv6) over UDP; above
    /// it, UDP queries get an empty TC=1 reply so real clients retry over TCP (which a spoofed
    /// source cannot). `None` = the default: off when every listen address is loopback, else
    /// [`DEFAULT_RATE_LIMIT`]. `Some(0)` = off.
    pub(crate) rate_limit: Option<u32>,
    /// Clients never rate-limited.
    pub(crate) rate_limit_exempt: Vec<IpNet>,
}

impl ServerConfig {
    /// The rate limit in force (0 = off); see [`ServerConfig::rate_limit`].
    pub(crate) fn effective_rate_limit(&self) -> u32 {
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
    pub(crate) resolv_conf: PathBuf,
    /// Upstream fetches in flight at once; beyond it a miss is answered SERVFAIL (or stale) at
    /// once instead of piling up behind a slow upstream.
    pub(crate) max_inflight: usize,
    /// Random letter case in upstream questions (DNS 0x20), checked in replies: more entropy
    /// against blind spoofing. Off by default because some upstreams do not preserve case
    /// (those are re-asked without it, at the cost of a round trip).
    pub(crate) randomize_case: bool,
    /// Pass AD on from the upstreams (to clients that set DO or AD). `None` = the default: true
    /// exactly when every upstream (`servers` and every `[[forward]]` zone's) is on loopback,
    /// where the path to the validating resolver cannot be tampered with (systemd-resolved and
    /// dnsmasq reason the same way). See [`Config::effective_trust_ad`].
    pub(crate) trust_ad: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ForwardZone {
    pub(crate) zone: Name,
    pub(crate) servers: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    pub(crate) max_entries: u64,
    /// Approximate bytes of cached records; whichever of the two limits is reached first evicts.
    pub(crate) max_bytes: u64,
    pub(crate) min_ttl: Duration,
    pub(crate) max_ttl: Duration,
    pub(crate) negative_ttl: Duration,
    pub(crate) stale_for: Duration,
    /// How long a question whose upstreams failed is not asked again (RFC 9520), at first...
    pub(crate) failure_ttl: Duration,
    /// ... and at most, doubling while the failure persists.
    pub(crate) failure_ttl_max: Duration,
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
    pub(crate) datacenter: Option<String>,
    pub(crate) token_file: Option<PathBuf>,
    pub(crate) ca_file: Option<PathBuf>,
    pub catalog_file: Option<PathBuf>,
    /// Serve the built-in demo catalog (`--dev` without a catalog file).
    pub demo_catalog: bool,
    pub(crate) only_passing: bool,
    pub(crate) when_none_healthy: WhenNoneHealthy,
    pub a_record_limit: usize,
    /// Longest pattern first, so the first match is the best one.
    pub(crate) service_ttl: Vec<(TtlPattern, Duration)>,
    pub(crate) node_ttl: Duration,
    pub(crate) negative_ttl: Duration,
    pub(crate) watch_wait: Duration,
    pub(crate) watch_idle: Duration,
    pub(crate) stale_for: Duration,
    pub(crate) max_connections: usize,
    /// Read from any server (`?stale`), as Consul's DNS does (`dns_config.allow_stale`).
    pub(crate) allow_stale: bool,
    /// With `allow_stale`: a read from a server further behind the leader than this
    /// (`X-Consul-LastContact`) is asked again of the leader (`dns_config.max_stale`).
    pub(crate) max_stale: Duration,
    /// Answer with the WAN addresses (`wan`, `wan_ipv4`, `wan_ipv6` tagged addresses) of nodes
    /// and services in other datacenters, as Consul's `translate_wan_addrs`.
    pub(crate) translate_wan_addrs: bool,
    /// Send the token to `http://` agents that are not on loopback (off: refused at start and
    /// on reload, see [`ConsulConfig::check_token_transport`]).
    pub(crate) allow_insecure_token: bool,
    /// `mode = "dns"` only: PTR questions for addresses in these networks go to the agents'
    /// DNS port, as dnsmasq's `rev-server` sends them (the HTTP and file modes know Consul's
    /// addresses themselves).
    pub(crate) reverse_networks: Vec<IpNet>,
    /// Node meta as TXT in the additional section of node A/AAAA and service SRV answers
    /// (Consul's `enable_additional_node_meta_txt`).
    pub(crate) node_meta_txt: bool,
    /// Answer records in a reply to a client limited to 512 bytes (UDP without EDNS); 0 = as
    /// many as fit (Consul's `udp_answer_limit`, which has no 0).
    pub(crate) udp_answer_limit: usize,
    /// TC=1 when records are left out of a Consul answer (Consul's `enable_truncate`); off,
    /// they are left out silently, as Consul does by default.
    pub(crate) enable_truncate: bool,
    /// The SOA's timers; its minimum is `negative_ttl` (Consul's `soa.min_ttl`).
    pub(crate) soa: SoaTimers,
}

/// `consul.soa`'s refresh, retry and expire, in seconds (Consul's `dns_config.soa`). Nothing
/// transfers a Consul zone, so they only have to look sane to tools that check them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoaTimers {
    pub(crate) refresh: u32,
    pub(crate) retry: u32,
    pub(crate) expire: u32,
}

impl Default for SoaTimers {
    /// Consul's.
    fn default() -> SoaTimers {
        SoaTimers {
            refresh: DEFAULT_SOA_REFRESH,
            retry: DEFAULT_SOA_RETRY,
            expire: DEFAULT_SOA_EXPIRE,
        }
    }
}

impl ConsulConfig {
    /// The TTL for a service: exact name, then the longest matching `prefix*`, then `*`.
    pub(crate) fn service_ttl_for(&self, service: &str) -> Duration {
        self.service_ttl_rule(service).0
    }

    /// [`ConsulConfig::service_ttl_for`] and the `service_ttl` pattern it comes from (`None`:
    /// the built-in default).
    pub(crate) fn service_ttl_rule(&self, service: &str) -> (Duration, Option<String>) {
        for (pattern, ttl) in &self.service_ttl {
            match pattern {
                TtlPattern::Exact(name) if name.eq_ignore_ascii_case(service) => {
                    return (*ttl, Some(name.clone()))
                }
                TtlPattern::Prefix(p)
                    if service.len() >= p.len() && service[..p.len()].eq_ignore_ascii_case(p) =>
                {
                    return (*ttl, Some(format!("{p}*")))
                }
                _ => {}
            }
        }
        (DEFAULT_SERVICE_TTL, None)
    }

    /// Refuses a token that would go in clear text to an agent off this host. Checked when the
    /// token is read (start and every reload) and by `check-config`, after the flags are
    /// applied, since `--consul-http` and `CONSUL_HTTP_TOKEN` can both bring the problem in.
    pub fn check_token_transport(&self) -> Result<(), InsecureToken> {
        let env_token = std::env::var(TOKEN_ENV).is_ok_and(|t| !t.trim().is_empty());
        self.check_token_transport_with(env_token)
    }

    pub(super) fn check_token_transport_with(&self, env_token: bool) -> Result<(), InsecureToken> {
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
    /// Serve the debug pages (`/` and `/explain`) even on a listener that is not loopback.
    pub debug: bool,
}

impl MetricsConfig {
    /// Are the debug pages (`/`, `/explain`) served on `listen`? They show every watched
    /// service, its nodes, addresses and check output: only to this host (a loopback listener)
    /// unless `metrics.debug = true` says the network in front of the listener is trusted.
    pub fn debug_pages_on(&self, listen: SocketAddr) -> bool {
        self.debug || listen.ip().is_loopback()
    }
}
