//! One validator per section: `FileX::validate` turns what the file says into the validated
//! type, filling in defaults and collecting (not returning) what is wrong, so that every problem
//! is reported at once and each section can be tested alone.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use hickory_proto::rr::Name;
use humantime::format_duration;
use ipnet::IpNet;

use super::defaults::*;
use super::errors::{ttl_range, Errors};
use super::schema::{
    AllowNet, ConfigDuration, ConsulMode, FileCache, FileConfig, FileConsul, FileForward, FileLog,
    FileMetrics, FileServer, FileSoa, FileUpstream, HttpUrl, ServerAddr, Zone,
};
use super::types::{
    CacheConfig, Config, ConsulConfig, ForwardZone, MetricsConfig, ServerConfig, SoaTimers,
    TtlPattern, UpstreamConfig,
};

impl FileConfig {
    /// Every section in the file's order, which is the order problems are reported in.
    pub(super) fn validate(self, errors: &mut Errors) -> Config {
        Config {
            server: self.server.validate(errors),
            upstream: self.upstream.validate(errors),
            forward: self
                .forward
                .into_iter()
                .enumerate()
                .map(|(i, f)| f.validate(i, errors))
                .collect(),
            cache: self.cache.validate(errors),
            consul: self.consul.validate(errors),
            metrics: self.metrics.validate(errors),
            log_format: self.log.format.unwrap_or_default(),
            log_level: self.log.level.clone().map(|l| l.0),
            log_queries: self.log.validate(errors),
        }
    }
}

fn duration_or(value: Option<ConfigDuration>, default: Duration) -> Duration {
    value.map_or(default, |d| d.0)
}

fn addrs(list: Vec<ServerAddr>) -> Vec<SocketAddr> {
    list.into_iter().map(|a| a.0).collect()
}

fn nets(list: Option<Vec<AllowNet>>, default: [IpNet; 2]) -> Vec<IpNet> {
    list.map_or_else(
        || default.to_vec(),
        |l| l.into_iter().map(|n| n.0).collect(),
    )
}

impl FileServer {
    pub(super) fn validate(self, errors: &mut Errors) -> ServerConfig {
        let listen = self.listen.map_or_else(
            || DEFAULT_LISTEN.to_vec(),
            |l| l.into_iter().map(|a| a.0).collect(),
        );
        if listen.is_empty() {
            errors.invalid(
                "server",
                "listen",
                "at least one address is needed, like [\"127.0.0.1:53\"]",
            );
        }
        let max_tcp_connections = self
            .max_tcp_connections
            .unwrap_or(DEFAULT_MAX_TCP_CONNECTIONS)
            .min(MAX_CONCURRENCY_LIMIT);
        if max_tcp_connections == 0 {
            errors.invalid(
                "server",
                "max_tcp_connections",
                "must be at least 1 (TCP is required for truncated answers)",
            );
        }
        let max_tcp_connections_per_network = self
            .max_tcp_connections_per_network
            .unwrap_or(DEFAULT_MAX_TCP_CONNECTIONS_PER_NETWORK);
        if max_tcp_connections_per_network == 0 {
            errors.invalid(
                "server",
                "max_tcp_connections_per_network",
                "must be at least 1 (TCP is required for truncated answers)",
            );
        }
        let tcp_idle_timeout = duration_or(self.tcp_idle_timeout, DEFAULT_TCP_IDLE_TIMEOUT);
        if tcp_idle_timeout < MIN_TCP_IDLE_TIMEOUT {
            errors.invalid(
                "server",
                "tcp_idle_timeout",
                format!(
                    "must be at least {}, like \"10s\"",
                    format_duration(MIN_TCP_IDLE_TIMEOUT)
                ),
            );
        }
        let max_inflight = self
            .max_inflight
            .unwrap_or(DEFAULT_MAX_INFLIGHT)
            .min(MAX_CONCURRENCY_LIMIT);
        if max_inflight == 0 {
            errors.invalid("server", "max_inflight", "must be at least 1");
        }
        let udp_sockets_per_address = self
            .udp_sockets_per_address
            .unwrap_or(DEFAULT_UDP_SOCKETS_PER_ADDRESS);
        if udp_sockets_per_address > MAX_UDP_SOCKETS_PER_ADDRESS {
            errors.invalid(
                "server",
                "udp_sockets_per_address",
                format!("must be between 0 (one per CPU core) and {MAX_UDP_SOCKETS_PER_ADDRESS}"),
            );
        }
        ServerConfig {
            listen,
            allow: nets(self.allow, DEFAULT_ALLOW),
            tcp_idle_timeout,
            max_tcp_connections,
            max_tcp_connections_per_network,
            udp_sockets_per_address,
            max_inflight,
            rate_limit: self.rate_limit,
            rate_limit_exempt: nets(self.rate_limit_exempt, DEFAULT_RATE_LIMIT_EXEMPT),
        }
    }
}

impl FileUpstream {
    pub(super) fn validate(self, errors: &mut Errors) -> UpstreamConfig {
        let timeout = duration_or(self.timeout, DEFAULT_UPSTREAM_TIMEOUT);
        if !(MIN_UPSTREAM_TIMEOUT..=MAX_UPSTREAM_TIMEOUT).contains(&timeout) {
            errors.invalid(
                "upstream",
                "timeout",
                format!(
                    "must be between {} and {} (clients give up after about 5s)",
                    format_duration(MIN_UPSTREAM_TIMEOUT),
                    format_duration(MAX_UPSTREAM_TIMEOUT)
                ),
            );
        }
        let max_inflight = self
            .max_inflight
            .unwrap_or(DEFAULT_UPSTREAM_INFLIGHT)
            .min(MAX_CONCURRENCY_LIMIT);
        if max_inflight == 0 {
            errors.invalid("upstream", "max_inflight", "must be at least 1");
        }
        UpstreamConfig {
            servers: addrs(self.servers.unwrap_or_default()),
            timeout,
            resolv_conf: self
                .resolv_conf
                .unwrap_or_else(|| PathBuf::from(RESOLV_CONF)),
            max_inflight,
            randomize_case: self.randomize_case.unwrap_or(DEFAULT_RANDOMIZE_CASE),
            trust_ad: self.trust_ad,
        }
    }
}

impl FileForward {
    /// Block `index` of the `[[forward]]` blocks.
    pub(super) fn validate(self, index: usize, errors: &mut Errors) -> ForwardZone {
        if self.servers.is_empty() {
            errors.invalid_in(
                "forward",
                index,
                "servers",
                format!(
                    "zone {} has no servers: list at least one, like [\"10.0.0.1\"]",
                    self.zone.0
                ),
            );
        }
        ForwardZone {
            zone: self.zone.0,
            servers: addrs(self.servers),
        }
    }
}

impl FileCache {
    pub(super) fn validate(self, errors: &mut Errors) -> CacheConfig {
        let cache = CacheConfig {
            max_entries: self.max_entries.unwrap_or(DEFAULT_CACHE_ENTRIES),
            max_bytes: self.max_bytes.unwrap_or(DEFAULT_CACHE_BYTES),
            min_ttl: duration_or(self.min_ttl, DEFAULT_MIN_TTL),
            max_ttl: duration_or(self.max_ttl, DEFAULT_MAX_TTL),
            negative_ttl: duration_or(self.negative_ttl, DEFAULT_NEGATIVE_TTL),
            stale_for: duration_or(self.stale_for, DEFAULT_STALE_FOR),
            failure_ttl: duration_or(self.failure_ttl, DEFAULT_FAILURE_TTL),
            // Unset, the cap is never below the first period, so setting failure_ttl alone
            // (to a minute, say) is enough.
            failure_ttl_max: duration_or(
                self.failure_ttl_max,
                DEFAULT_FAILURE_TTL_MAX.max(duration_or(self.failure_ttl, DEFAULT_FAILURE_TTL)),
            ),
        };
        if cache.max_entries == 0 || cache.max_bytes < MIN_CACHE_BYTES {
            errors.invalid(
                "cache",
                if cache.max_entries == 0 {
                    "max_entries"
                } else {
                    "max_bytes"
                },
                format!("max_entries must be at least 1 and max_bytes at least {MIN_CACHE_BYTES}"),
            );
        }
        if cache.min_ttl > cache.max_ttl {
            errors.invalid(
                "cache",
                "min_ttl",
                format!(
                    "{} is above cache.max_ttl ({}): min_ttl must not exceed max_ttl",
                    format_duration(cache.min_ttl),
                    format_duration(cache.max_ttl)
                ),
            );
        }
        if cache.max_ttl > MAX_DNS_TTL {
            errors.invalid("cache", "max_ttl", ttl_range());
        }
        check_failure_ttls(&cache, errors);
        cache
    }
}

/// RFC 9520 §3.2: failures are cached for at least 1 second and should not be for longer than
/// 5 minutes; the cap must not be below the first period.
fn check_failure_ttls(cache: &CacheConfig, errors: &mut Errors) {
    let range = MIN_FAILURE_TTL..=MAX_FAILURE_TTL;
    let bounds = format!(
        "must be between {} and {} (RFC 9520)",
        format_duration(MIN_FAILURE_TTL),
        format_duration(MAX_FAILURE_TTL)
    );
    if !range.contains(&cache.failure_ttl) {
        errors.invalid("cache", "failure_ttl", bounds.clone());
    }
    if !range.contains(&cache.failure_ttl_max) {
        errors.invalid("cache", "failure_ttl_max", bounds);
    } else if cache.failure_ttl_max < cache.failure_ttl {
        errors.invalid(
            "cache",
            "failure_ttl_max",
            format!(
                "{} is below cache.failure_ttl ({}): the cap must not be below the first period",
                format_duration(cache.failure_ttl_max),
                format_duration(cache.failure_ttl)
            ),
        );
    }
}

/// `consul.watch_wait`, within what Consul accepts for a blocking query.
fn watch_wait(value: Option<ConfigDuration>, errors: &mut Errors) -> Duration {
    let watch_wait = duration_or(value, DEFAULT_WATCH_WAIT);
    if !(MIN_WATCH_WAIT..=MAX_WATCH_WAIT).contains(&watch_wait) {
        errors.invalid(
            "consul",
            "watch_wait",
            format!(
                "must be between {} and {} (Consul caps blocking queries at 10 minutes)",
                format_duration(MIN_WATCH_WAIT),
                format_duration(MAX_WATCH_WAIT)
            ),
        );
    }
    watch_wait
}

/// `consul.max_connections`: room for a blocking watch and a first lookup, at least.
fn consul_max_connections(value: Option<usize>, errors: &mut Errors) -> usize {
    let max_connections = value
        .unwrap_or(DEFAULT_CONSUL_MAX_CONNECTIONS)
        .min(MAX_CONCURRENCY_LIMIT);
    if max_connections < MIN_CONSUL_CONNECTIONS {
        errors.invalid(
            "consul",
            "max_connections",
            format!("must be at least {MIN_CONSUL_CONNECTIONS} (one for blocking watches, one for first lookups)"),
        );
    }
    max_connections
}

/// `consul.watch_idle`: long enough for a watcher to see Consul's first answer.
fn watch_idle(value: Option<ConfigDuration>, errors: &mut Errors) -> Duration {
    let watch_idle = duration_or(value, DEFAULT_WATCH_IDLE);
    if watch_idle < MIN_WATCH_IDLE {
        errors.invalid(
            "consul",
            "watch_idle",
            format!(
                "must be at least {} (a watcher checks it before its first request: a shorter \
                 one stops before Consul answers, and every name gets SERVFAIL)",
                format_duration(MIN_WATCH_IDLE)
            ),
        );
    }
    watch_idle
}

impl FileConsul {
    pub(super) fn validate(self, errors: &mut Errors) -> ConsulConfig {
        let domains = consul_domains(self.domain, self.alt_domains, errors);
        let service_ttl = service_ttls(self.service_ttl.unwrap_or_default(), errors);
        let watch_wait = watch_wait(self.watch_wait, errors);
        let max_connections = consul_max_connections(self.max_connections, errors);
        let mode = self.mode.unwrap_or(DEFAULT_CONSUL_MODE);
        let has_catalog = self.catalog_file.is_some();
        let (http, dns) = consul_agents(self.http, self.dns, mode, has_catalog, errors);
        if let Some(dc) = &self.datacenter {
            if dc.is_empty() || dc.contains('.') {
                errors.invalid(
                    "consul",
                    "datacenter",
                    format!("{dc:?} is not a datacenter name (one DNS label, like \"dc1\")"),
                );
            }
        }
        let stale_for = duration_or(self.stale_for, DEFAULT_CONSUL_STALE_FOR);
        check_stale_for(mode, stale_for, watch_wait, errors);
        let watch_idle = watch_idle(self.watch_idle, errors);
        let node_ttl = duration_or(self.node_ttl, DEFAULT_NODE_TTL);
        let (soa, negative_ttl) = soa_settings(self.soa, self.negative_ttl, errors);
        for (key, ttl) in [("node_ttl", node_ttl), ("negative_ttl", negative_ttl)] {
            if ttl > MAX_DNS_TTL {
                errors.invalid("consul", key, ttl_range());
            }
        }
        let consul = ConsulConfig {
            enabled: self.enabled.unwrap_or(DEFAULT_CONSUL_ENABLED),
            mode,
            http,
            dns,
            domains,
            datacenter: self.datacenter.map(|d| d.to_ascii_lowercase()),
            token_file: self.token_file,
            ca_file: self.ca_file,
            catalog_file: self.catalog_file,
            demo_catalog: false,
            only_passing: self.only_passing.unwrap_or(DEFAULT_ONLY_PASSING),
            when_none_healthy: self.when_none_healthy.unwrap_or(DEFAULT_WHEN_NONE_HEALTHY),
            a_record_limit: self.a_record_limit.unwrap_or(DEFAULT_A_RECORD_LIMIT),
            service_ttl,
            node_ttl,
            negative_ttl,
            watch_wait,
            watch_idle,
            stale_for,
            max_connections,
            allow_stale: self.allow_stale.unwrap_or(DEFAULT_ALLOW_STALE),
            max_stale: duration_or(self.max_stale, DEFAULT_MAX_STALE),
            translate_wan_addrs: self
                .translate_wan_addrs
                .unwrap_or(DEFAULT_TRANSLATE_WAN_ADDRS),
            allow_insecure_token: self
                .allow_insecure_token
                .unwrap_or(DEFAULT_ALLOW_INSECURE_TOKEN),
            node_meta_txt: self
                .enable_additional_node_meta_txt
                .unwrap_or(DEFAULT_NODE_META_TXT),
            udp_answer_limit: self.udp_answer_limit.unwrap_or(DEFAULT_UDP_ANSWER_LIMIT),
            enable_truncate: self.enable_truncate.unwrap_or(DEFAULT_ENABLE_TRUNCATE),
            soa,
            reverse_networks: reverse_networks(self.reverse_networks, mode, errors),
        };
        // The token file is known here, so its problem gets a line; a token from the
        // environment or an agent from a flag is checked after the flags are applied.
        if consul.token_file.is_some() {
            if let Err(e) = consul.check_token_transport_with(false) {
                errors.invalid("consul", "http", e.to_string());
            }
        }
        consul
    }
}

/// `consul.soa`'s timers, and the negative TTL: `consul.soa.min_ttl` is Consul's name for
/// `consul.negative_ttl` (the SOA minimum), so either may be written, both only alike.
fn soa_settings(
    soa: Option<FileSoa>,
    negative_ttl: Option<ConfigDuration>,
    errors: &mut Errors,
) -> (SoaTimers, Duration) {
    let soa = soa.unwrap_or_default();
    let timers = SoaTimers {
        refresh: soa.refresh.unwrap_or(DEFAULT_SOA_REFRESH),
        retry: soa.retry.unwrap_or(DEFAULT_SOA_RETRY),
        expire: soa.expire.unwrap_or(DEFAULT_SOA_EXPIRE),
    };
    // The SOA's timers are signed 32-bit numbers on the wire (RFC 1035 §3.3.13).
    for (key, value) in [
        ("refresh", timers.refresh),
        ("retry", timers.retry),
        ("expire", timers.expire),
    ] {
        if i32::try_from(value).is_err() {
            errors.invalid("consul.soa", key, "must be at most 2147483647 (seconds)");
        }
    }
    let negative = match (soa.min_ttl, negative_ttl) {
        (Some(secs), Some(ttl)) if Duration::from_secs(u64::from(secs)) != ttl.0 => {
            errors.invalid(
                "consul.soa",
                "min_ttl",
                format!(
                    "is consul.negative_ttl under Consul's name, and that says {}: set one of them",
                    format_duration(ttl.0)
                ),
            );
            ttl.0
        }
        (Some(secs), _) => Duration::from_secs(u64::from(secs)),
        (None, ttl) => duration_or(ttl, DEFAULT_CONSUL_NEGATIVE_TTL),
    };
    (timers, negative)
}

/// `consul.reverse_networks`, which only the DNS mode uses: the HTTP and catalog-file modes know
/// Consul's addresses themselves.
fn reverse_networks(
    list: Option<Vec<AllowNet>>,
    mode: ConsulMode,
    errors: &mut Errors,
) -> Vec<IpNet> {
    let nets: Vec<IpNet> = list.unwrap_or_default().into_iter().map(|n| n.0).collect();
    if !nets.is_empty() && mode != ConsulMode::Dns {
        errors.invalid(
            "consul",
            "reverse_networks",
            "only for mode = \"dns\": the HTTP and catalog-file modes answer PTR questions for \
             every address Consul knows, and forward the rest",
        );
    }
    nets
}

/// `consul.domain` (or Consul's own) first, then the alternative domains, each once.
fn consul_domains(
    domain: Option<Zone>,
    alt_domains: Option<Vec<Zone>>,
    errors: &mut Errors,
) -> Vec<Name> {
    let mut domains = Vec::new();
    match domain.map_or_else(
        || Name::from_ascii(DEFAULT_CONSUL_DOMAIN).map_err(|e| e.to_string()),
        |z| Ok(z.0),
    ) {
        Ok(d) => domains.push(d),
        Err(e) => errors.other(e),
    }
    for alt in alt_domains.unwrap_or_default() {
        if domains.contains(&alt.0) {
            errors.invalid(
                "consul",
                "alt_domains",
                format!("{} is listed twice (or is the main domain)", alt.0),
            );
        } else {
            domains.push(alt.0);
        }
    }
    domains
}

/// `consul.service_ttl` in the order [`ConsulConfig::service_ttl_for`] tries it: exact names,
/// then prefixes longest first, then `*` (or the default) as the empty prefix that matches all.
fn service_ttls(
    patterns: BTreeMap<String, ConfigDuration>,
    errors: &mut Errors,
) -> Vec<(TtlPattern, Duration)> {
    let mut service_ttl = Vec::new();
    let mut star = None;
    for (pattern, ttl) in patterns {
        if pattern == "*" {
            star = Some(ttl.0);
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            if prefix.contains('*') {
                errors.invalid(
                    "consul.service_ttl",
                    &format!("{pattern:?}"),
                    "only one trailing * is allowed, like \"web*\"",
                );
            }
            service_ttl.push((TtlPattern::Prefix(prefix.to_owned()), ttl.0));
        } else if pattern.contains('*') || pattern.is_empty() {
            errors.invalid(
                "consul.service_ttl",
                &format!("{pattern:?}"),
                "write a service name, a prefix ending in *, or *",
            );
        } else {
            service_ttl.push((TtlPattern::Exact(pattern.clone()), ttl.0));
        }
        if ttl.0 > MAX_DNS_TTL {
            errors.invalid("consul.service_ttl", &format!("{pattern:?}"), ttl_range());
        }
    }
    service_ttl.sort_by(|a, b| match (&a.0, &b.0) {
        (TtlPattern::Exact(_), TtlPattern::Prefix(_)) => Ordering::Less,
        (TtlPattern::Prefix(_), TtlPattern::Exact(_)) => Ordering::Greater,
        (TtlPattern::Prefix(x), TtlPattern::Prefix(y)) => y.len().cmp(&x.len()),
        _ => Ordering::Equal,
    });
    service_ttl.push((
        TtlPattern::Prefix(String::new()),
        star.unwrap_or(DEFAULT_SERVICE_TTL),
    ));
    service_ttl
}

/// The agents' HTTP URLs and DNS addresses, each required only by the mode that uses it (and
/// the URLs not when a catalog file stands in for the agents).
fn consul_agents(
    http: Option<Vec<HttpUrl>>,
    dns: Option<Vec<ServerAddr>>,
    mode: ConsulMode,
    has_catalog: bool,
    errors: &mut Errors,
) -> (Vec<url::Url>, Vec<SocketAddr>) {
    let http: Vec<url::Url> = match http {
        Some(v) => v.into_iter().map(|u| u.0).collect(),
        None => match HttpUrl::from_str(DEFAULT_CONSUL_HTTP) {
            Ok(u) => vec![u.0],
            Err(e) => {
                errors.other(e);
                Vec::new()
            }
        },
    };
    if mode == ConsulMode::Http && http.is_empty() && !has_catalog {
        errors.invalid(
            "consul",
            "http",
            "no agent listed: give at least one URL, like [\"http://127.0.0.1:8500\"]",
        );
    }
    let dns = dns.map_or_else(|| vec![DEFAULT_CONSUL_DNS], addrs);
    if mode == ConsulMode::Dns && dns.is_empty() {
        errors.invalid(
            "consul",
            "dns",
            "mode = \"dns\" needs at least one agent DNS address, like [\"127.0.0.1:8600\"]",
        );
    }
    (http, dns)
}

/// A blocking query confirms a view only when it returns: up to watch_wait, plus up to wait/16
/// of Consul's jitter, later. A shorter stale_for would turn quiet, healthy services into
/// SERVFAIL between two confirmations.
fn check_stale_for(
    mode: ConsulMode,
    stale_for: Duration,
    watch_wait: Duration,
    errors: &mut Errors,
) {
    let min_stale_for = watch_wait.saturating_mul(STALE_FOR_WATCH_WAITS);
    // Only in the mode with watchers (in mode = "dns" stale_for is a cache setting), and
    // only against a valid watch_wait: otherwise that key's own error says it all.
    if mode == ConsulMode::Http && stale_for < min_stale_for && watch_wait <= MAX_WATCH_WAIT {
        errors.invalid(
            "consul",
            "stale_for",
            format!(
                "must be at least {STALE_FOR_WATCH_WAITS} × consul.watch_wait ({}): a blocking query \
                 confirms a view only when it returns, up to watch_wait later, and a view older \
                 than stale_for is answered SERVFAIL; raise stale_for or lower watch_wait",
                format_duration(min_stale_for)
            ),
        );
    }
}

impl FileMetrics {
    /// `debug = true` with the endpoint off asks for pages nothing would serve: said, so a
    /// config that meant to turn them on does not silently do nothing.
    pub(super) fn validate(self, errors: &mut Errors) -> MetricsConfig {
        let enabled = self.enabled.unwrap_or(DEFAULT_METRICS_ENABLED);
        let debug = self.debug.unwrap_or(DEFAULT_METRICS_DEBUG);
        if debug && !enabled {
            errors.invalid(
                "metrics",
                "debug",
                "needs the HTTP endpoint (metrics.enabled = true): the debug pages are served there"
                    .to_owned(),
            );
        }
        MetricsConfig {
            listen: enabled.then(|| self.listen.map_or(DEFAULT_METRICS_LISTEN, |a| a.0)),
            debug,
        }
    }
}

impl FileLog {
    /// Whether to log each query. Nothing here can be wrong once deserialized.
    pub(super) fn validate(&self, _errors: &mut Errors) -> bool {
        self.queries.unwrap_or(DEFAULT_LOG_QUERIES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::schema::ListenAddr;

    /// Runs one section's validator on no file text (so every problem is at line 1) and returns
    /// its value and the problems as `check-config` prints them.
    fn run<T>(validate: impl FnOnce(&mut Errors) -> T) -> (T, Vec<String>) {
        let mut errors = Errors::new("f.toml", "");
        let value = validate(&mut errors);
        (value, errors.messages())
    }

    /// Like [`run`], but only the keys of the problems.
    fn keys<T>(validate: impl FnOnce(&mut Errors) -> T) -> Vec<String> {
        let mut errors = Errors::new("f.toml", "");
        validate(&mut errors);
        errors.keys().into_iter().map(str::to_owned).collect()
    }

    fn secs(s: u64) -> Option<ConfigDuration> {
        Some(ConfigDuration(Duration::from_secs(s)))
    }

    fn millis(ms: u64) -> Option<ConfigDuration> {
        Some(ConfigDuration(Duration::from_millis(ms)))
    }

    fn server_addrs(list: &[&str]) -> Vec<ServerAddr> {
        list.iter()
            .map(|a| ServerAddr::from_str(a).expect("server address"))
            .collect()
    }

    #[test]
    fn problems_are_located_at_their_key_in_the_text() {
        let mut errors = Errors::new("f.toml", "[server]\n\nmax_inflight = 0\n");
        FileServer {
            max_inflight: Some(0),
            ..FileServer::default()
        }
        .validate(&mut errors);
        assert_eq!(
            errors.messages(),
            ["f.toml:3: server.max_inflight: must be at least 1"]
        );
    }

    #[test]
    fn server_defaults_and_problems() {
        let (server, problems) = run(|e| FileServer::default().validate(e));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            server.listen,
            ["127.0.0.1:53", "[::1]:53"].map(|a| a.parse::<SocketAddr>().expect("addr"))
        );
        let loopback = ["127.0.0.0/8", "::1/128"].map(|n| AllowNet::from_str(n).expect("net").0);
        assert_eq!(server.allow, loopback);
        assert_eq!(server.rate_limit_exempt, loopback);
        assert_eq!(server.tcp_idle_timeout, Duration::from_secs(10));
        assert_eq!(server.effective_rate_limit(), 0, "loopback only: off");

        let (_, problems) = run(|e| {
            FileServer {
                listen: Some(Vec::new()),
                tcp_idle_timeout: millis(99),
                max_tcp_connections: Some(0),
                max_tcp_connections_per_network: Some(0),
                udp_sockets_per_address: Some(MAX_UDP_SOCKETS_PER_ADDRESS + 1),
                max_inflight: Some(0),
                ..FileServer::default()
            }
            .validate(e)
        });
        assert_eq!(
            problems,
            [
                "f.toml:1: server.listen: at least one address is needed, like [\"127.0.0.1:53\"]",
                "f.toml:1: server.max_tcp_connections: must be at least 1 (TCP is required for truncated answers)",
                "f.toml:1: server.max_tcp_connections_per_network: must be at least 1 (TCP is required for truncated answers)",
                "f.toml:1: server.tcp_idle_timeout: must be at least 100ms, like \"10s\"",
                "f.toml:1: server.max_inflight: must be at least 1",
                "f.toml:1: server.udp_sockets_per_address: must be between 0 (one per CPU core) and 1024",
            ]
        );
    }

    #[test]
    fn upstream_defaults_and_problems() {
        let (upstream, problems) = run(|e| {
            FileUpstream {
                servers: Some(server_addrs(&["192.0.2.1", "[::1]:5353"])),
                ..FileUpstream::default()
            }
            .validate(e)
        });
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            upstream.servers,
            ["192.0.2.1:53", "[::1]:5353"].map(|a| a.parse::<SocketAddr>().expect("addr"))
        );
        assert_eq!(upstream.timeout, Duration::from_secs(2));
        assert_eq!(upstream.resolv_conf, PathBuf::from("/etc/resolv.conf"));
        assert_eq!(upstream.max_inflight, 1024);
        assert!(!upstream.randomize_case);
        assert_eq!(upstream.trust_ad, None, "decided from the servers");

        for timeout in [millis(9), secs(31)] {
            let (_, problems) = run(|e| {
                FileUpstream {
                    timeout,
                    max_inflight: Some(0),
                    ..FileUpstream::default()
                }
                .validate(e)
            });
            assert_eq!(
                problems,
                [
                    "f.toml:1: upstream.timeout: must be between 10ms and 30s (clients give up after about 5s)",
                    "f.toml:1: upstream.max_inflight: must be at least 1",
                ]
            );
        }
        let edges = [millis(10), secs(30)];
        for timeout in edges {
            let file = FileUpstream {
                timeout,
                ..FileUpstream::default()
            };
            assert!(keys(|e| file.validate(e)).is_empty());
        }
    }

    #[test]
    fn forward_zone_needs_servers() {
        let zone = || Zone::from_str("Corp.Example").expect("zone");
        let (forward, problems) = run(|e| {
            FileForward {
                zone: zone(),
                servers: server_addrs(&["10.0.0.1"]),
            }
            .validate(0, e)
        });
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(forward.zone.to_ascii(), "corp.example.");
        assert_eq!(
            forward.servers,
            ["10.0.0.1:53".parse::<SocketAddr>().expect("addr")]
        );

        let (_, problems) = run(|e| {
            FileForward {
                zone: zone(),
                servers: Vec::new(),
            }
            .validate(0, e)
        });
        assert_eq!(
            problems,
            ["f.toml:1: forward.servers: zone corp.example. has no servers: list at least one, like [\"10.0.0.1\"]"]
        );
    }

    #[test]
    fn cache_defaults_and_problems() {
        let (cache, problems) = run(|e| FileCache::default().validate(e));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            (cache.max_entries, cache.max_bytes),
            (100_000, 32 * 1024 * 1024)
        );
        assert_eq!(
            [
                cache.min_ttl,
                cache.max_ttl,
                cache.negative_ttl,
                cache.stale_for
            ],
            [0, 86_400, 300, 3600].map(Duration::from_secs)
        );

        let (_, problems) = run(|e| {
            FileCache {
                max_bytes: Some(MIN_CACHE_BYTES - 1),
                min_ttl: secs(60),
                max_ttl: secs(10),
                ..FileCache::default()
            }
            .validate(e)
        });
        assert_eq!(
            problems,
            [
                "f.toml:1: cache.max_bytes: max_entries must be at least 1 and max_bytes at least 1024",
                "f.toml:1: cache.min_ttl: 1m is above cache.max_ttl (10s): min_ttl must not exceed max_ttl",
            ]
        );
        let file = FileCache {
            max_entries: Some(0),
            max_ttl: Some(ConfigDuration(MAX_DNS_TTL + Duration::from_secs(1))),
            ..FileCache::default()
        };
        assert_eq!(
            keys(|e| file.validate(e)),
            ["cache.max_entries", "cache.max_ttl"]
        );
    }

    #[test]
    fn failure_ttls_follow_rfc_9520() {
        let with = |first: Option<ConfigDuration>, cap: Option<ConfigDuration>| {
            run(|e| {
                FileCache {
                    failure_ttl: first,
                    failure_ttl_max: cap,
                    ..FileCache::default()
                }
                .validate(e)
            })
        };
        let (cache, problems) = with(None, None);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            [cache.failure_ttl, cache.failure_ttl_max],
            [5, 30].map(Duration::from_secs)
        );
        assert_eq!(
            with(millis(500), secs(301)).1,
            [
                "f.toml:1: cache.failure_ttl: must be between 1s and 5m (RFC 9520)",
                "f.toml:1: cache.failure_ttl_max: must be between 1s and 5m (RFC 9520)",
            ]
        );
        assert_eq!(
            with(secs(20), secs(10)).1,
            ["f.toml:1: cache.failure_ttl_max: 10s is below cache.failure_ttl (20s): the cap must not be below the first period"]
        );
        let (cache, problems) = with(secs(60), None);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            cache.failure_ttl_max,
            Duration::from_secs(60),
            "unset: not below"
        );
        for (first, cap) in [(1, 1), (300, 300)] {
            assert!(with(secs(first), secs(cap)).1.is_empty());
        }
    }

    #[test]
    fn consul_defaults_and_problems() {
        let (consul, problems) = run(|e| FileConsul::default().validate(e));
        assert!(problems.is_empty(), "{problems:?}");
        assert!(consul.enabled);
        assert_eq!(consul.mode, ConsulMode::Http);
        assert_eq!(
            consul.http.iter().map(url::Url::as_str).collect::<Vec<_>>(),
            ["http://127.0.0.1:8500/"]
        );
        assert_eq!(
            consul.dns,
            ["127.0.0.1:8600".parse::<SocketAddr>().expect("addr")]
        );
        assert_eq!(consul.domains[0].to_ascii(), "consul.");
        assert_eq!(
            [
                consul.node_ttl,
                consul.negative_ttl,
                consul.watch_wait,
                consul.watch_idle,
                consul.stale_for
            ],
            [5, 5, 300, 600, 86_400].map(Duration::from_secs)
        );
        assert_eq!(consul.max_connections, 32);

        let (_, problems) = run(|e| {
            FileConsul {
                mode: Some(ConsulMode::Dns),
                dns: Some(Vec::new()),
                datacenter: Some("dc1.example".into()),
                watch_wait: millis(999),
                max_connections: Some(1),
                ..FileConsul::default()
            }
            .validate(e)
        });
        assert_eq!(
            problems,
            [
                "f.toml:1: consul.watch_wait: must be between 1s and 10m (Consul caps blocking queries at 10 minutes)",
                "f.toml:1: consul.max_connections: must be at least 2 (one for blocking watches, one for first lookups)",
                "f.toml:1: consul.dns: mode = \"dns\" needs at least one agent DNS address, like [\"127.0.0.1:8600\"]",
                "f.toml:1: consul.datacenter: \"dc1.example\" is not a datacenter name (one DNS label, like \"dc1\")",
            ]
        );
        let file = FileConsul {
            http: Some(Vec::new()),
            ..FileConsul::default()
        };
        assert_eq!(keys(|e| file.validate(e)), ["consul.http"]);
    }

    #[test]
    fn consul_answer_options_and_soa() {
        let (consul, problems) = run(|e| FileConsul::default().validate(e));
        assert!(problems.is_empty(), "{problems:?}");
        assert!(consul.node_meta_txt && consul.enable_truncate);
        assert_eq!(consul.udp_answer_limit, 0);
        assert_eq!(
            (consul.soa.refresh, consul.soa.retry, consul.soa.expire),
            (3600, 600, 86_400)
        );

        let (consul, problems) = run(|e| {
            FileConsul {
                enable_additional_node_meta_txt: Some(false),
                udp_answer_limit: Some(3),
                enable_truncate: Some(false),
                soa: Some(FileSoa {
                    refresh: Some(60),
                    retry: Some(30),
                    expire: Some(120),
                    min_ttl: Some(10),
                }),
                ..FileConsul::default()
            }
            .validate(e)
        });
        assert!(problems.is_empty(), "{problems:?}");
        assert!(!consul.node_meta_txt && !consul.enable_truncate);
        assert_eq!(consul.udp_answer_limit, 3);
        assert_eq!(
            (consul.soa.refresh, consul.soa.retry, consul.soa.expire),
            (60, 30, 120)
        );
        assert_eq!(consul.negative_ttl, Duration::from_secs(10), "soa.min_ttl");

        // min_ttl is negative_ttl under Consul's name: both only when they agree.
        let (_, problems) = run(|e| {
            FileConsul {
                negative_ttl: secs(10),
                soa: Some(FileSoa {
                    min_ttl: Some(10),
                    ..FileSoa::default()
                }),
                ..FileConsul::default()
            }
            .validate(e)
        });
        assert!(problems.is_empty(), "{problems:?}");
        let (_, problems) = run(|e| {
            FileConsul {
                negative_ttl: secs(10),
                soa: Some(FileSoa {
                    min_ttl: Some(0),
                    expire: Some(u32::MAX),
                    ..FileSoa::default()
                }),
                ..FileConsul::default()
            }
            .validate(e)
        });
        assert_eq!(
            problems,
            [
                "f.toml:1: consul.soa.expire: must be at most 2147483647 (seconds)",
                "f.toml:1: consul.soa.min_ttl: is consul.negative_ttl under Consul's name, and that says 10s: set one of them",
            ]
        );
    }

    #[test]
    fn consul_reverse_networks_are_for_the_dns_mode_only() {
        let with = |mode: ConsulMode, nets: &[&str]| FileConsul {
            mode: Some(mode),
            reverse_networks: Some(
                nets.iter()
                    .map(|n| AllowNet::from_str(n).expect("net"))
                    .collect(),
            ),
            ..FileConsul::default()
        };
        let (consul, problems) =
            run(|e| with(ConsulMode::Dns, &["10.0.0.0/8", "fd00::1"]).validate(e));
        assert!(problems.is_empty(), "{problems:?}");
        let nets: Vec<String> = consul
            .reverse_networks
            .iter()
            .map(IpNet::to_string)
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "fd00::1/128"]);
        assert!(run(|e| with(ConsulMode::Http, &[]).validate(e))
            .1
            .is_empty());
        let refused = keys(|e| with(ConsulMode::Http, &["10.0.0.0/8"]).validate(e));
        assert_eq!(refused, ["consul.reverse_networks"]);
    }

    #[test]
    fn consul_domains_are_each_listed_once() {
        let zone = |z: &str| Zone::from_str(z).expect("zone");
        let (domains, problems) = run(|e| {
            consul_domains(
                Some(zone("service.example")),
                Some(vec![
                    zone("consul"),
                    zone("Consul."),
                    zone("service.example"),
                ]),
                e,
            )
        });
        assert_eq!(
            domains.iter().map(Name::to_ascii).collect::<Vec<_>>(),
            ["service.example.", "consul."]
        );
        assert_eq!(
            problems,
            [
                "f.toml:1: consul.alt_domains: consul. is listed twice (or is the main domain)",
                "f.toml:1: consul.alt_domains: service.example. is listed twice (or is the main domain)",
            ]
        );
    }

    #[test]
    fn service_ttl_patterns_are_ordered_and_checked() {
        let patterns = ["*", "w*", "web*", "web", "a*b*", "a*b", ""]
            .iter()
            .zip(1..)
            .map(|(p, s)| (p.to_string(), ConfigDuration(Duration::from_secs(s))))
            .collect();
        let (ttls, problems) = run(|e| service_ttls(patterns, e));
        assert_eq!(
            ttls,
            [
                (TtlPattern::Exact("web".into()), Duration::from_secs(4)),
                (TtlPattern::Prefix("a*b".into()), Duration::from_secs(5)),
                (TtlPattern::Prefix("web".into()), Duration::from_secs(3)),
                (TtlPattern::Prefix("w".into()), Duration::from_secs(2)),
                (TtlPattern::Prefix(String::new()), Duration::from_secs(1)),
            ]
        );
        assert_eq!(
            problems,
            [
                "f.toml:1: consul.service_ttl.\"\": write a service name, a prefix ending in *, or *",
                "f.toml:1: consul.service_ttl.\"a*b\": write a service name, a prefix ending in *, or *",
                "f.toml:1: consul.service_ttl.\"a*b*\": only one trailing * is allowed, like \"web*\"",
            ]
        );
        let (ttls, _) = run(|e| service_ttls(BTreeMap::new(), e));
        assert_eq!(
            ttls,
            [(TtlPattern::Prefix(String::new()), DEFAULT_SERVICE_TTL)]
        );
    }

    #[test]
    fn consul_stale_for_is_checked_only_against_a_valid_watch_wait_in_http_mode() {
        let check = |mode, stale_for, watch_wait| {
            keys(|e| {
                check_stale_for(
                    mode,
                    Duration::from_secs(stale_for),
                    Duration::from_secs(watch_wait),
                    e,
                )
            })
        };
        assert_eq!(check(ConsulMode::Http, 599, 300), ["consul.stale_for"]);
        assert!(check(ConsulMode::Http, 600, 300).is_empty());
        assert!(check(ConsulMode::Dns, 0, 300).is_empty());
        assert!(
            check(ConsulMode::Http, 0, 601).is_empty(),
            "watch_wait's own error says it"
        );
    }

    #[test]
    fn metrics_default_listen_and_off() {
        let (metrics, problems) = run(|e| FileMetrics::default().validate(e));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            metrics.listen,
            Some("127.0.0.1:9153".parse().expect("addr"))
        );
        let (metrics, _) = run(|e| {
            FileMetrics {
                enabled: Some(false),
                listen: Some(ListenAddr::from_str("[::1]:9000").expect("addr")),
                debug: None,
            }
            .validate(e)
        });
        assert_eq!(metrics.listen, None);
    }

    #[test]
    fn debug_pages_only_on_loopback_unless_asked() {
        let (metrics, problems) = run(|e| FileMetrics::default().validate(e));
        assert!(problems.is_empty(), "{problems:?}");
        assert!(!metrics.debug);
        let at = |s: &str| s.parse().expect("addr");
        assert!(metrics.debug_pages_on(at("127.0.0.1:9153")));
        assert!(metrics.debug_pages_on(at("127.0.0.2:9153")));
        assert!(metrics.debug_pages_on(at("[::1]:9153")));
        assert!(!metrics.debug_pages_on(at("0.0.0.0:9153")));
        assert!(!metrics.debug_pages_on(at("[::]:9153")));
        assert!(!metrics.debug_pages_on(at("10.1.2.3:9153")));
        let (on, problems) = run(|e| {
            FileMetrics {
                debug: Some(true),
                ..FileMetrics::default()
            }
            .validate(e)
        });
        assert!(problems.is_empty(), "{problems:?}");
        assert!(on.debug_pages_on(at("0.0.0.0:9153")));
        let (_, problems) = run(|e| {
            FileMetrics {
                debug: Some(true),
                enabled: Some(false),
                listen: None,
            }
            .validate(e)
        });
        assert_eq!(problems.len(), 1, "{problems:?}");
    }

    #[test]
    fn log_queries_off_by_default() {
        assert_eq!(run(|e| FileLog::default().validate(e)), (false, Vec::new()));
        let on = FileLog {
            queries: Some(true),
            ..FileLog::default()
        };
        assert_eq!(run(|e| on.validate(e)), (true, Vec::new()));
    }
}
