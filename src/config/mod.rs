//! Configuration: the TOML file, the command-line overrides, and the validated types the rest of the
//! program uses.
//!
//! Everything is checked here, once. Values that can be checked alone (durations, addresses, zone
//! names) are checked while deserializing, so the TOML parser's error already names the file, line,
//! column and key; relations between values (`min_ttl <= max_ttl`, ...) are checked afterwards and
//! located by their keys' spans in the TOML text ([`line_of`]). Nothing downstream parses or re-validates strings.
//!
//! Read in this order (each file uses only the ones before it):
//! - `schema`: the file as written, and the value types that check themselves;
//! - `defaults`: every default and limit, typed;
//! - `errors`: what can be wrong, and where in the file;
//! - `types`: the validated configuration;
//! - `validate`: one validator per section;
//! - `host`: the checks against this host (files readable, addresses free of collisions, the
//!   open-file limit), after the flags;
//! - here: the checks across sections and flags, and the entry points.

mod defaults;
mod errors;
mod host;
mod schema;
mod types;
mod validate;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use defaults::MAX_CONCURRENCY_LIMIT;
pub(crate) use defaults::*;
use errors::Errors;
pub use errors::{line_of, ConfigError, ConfigErrors, InsecureToken};
use schema::FileConfig;
pub use schema::{
    AllowNet, ConfigDuration, ConsulMode, HttpUrl, ListenAddr, LogFormat, LogLevel, ServerAddr,
    WhenNoneHealthy, Zone, DNS_PORT,
};
pub use types::{
    CacheConfig, Config, ConsulConfig, ForwardZone, MetricsConfig, ServerConfig, SoaTimers,
    TtlPattern, UpstreamConfig,
};

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

// ---------------------------------------------------------------------------------------------
// Checks across sections and against the command line and the host: they run after the flags
// are applied, so they have no line in the file.

impl Config {
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
            self.server.listen = vec![DEV_LISTEN];
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

    /// Whether AD from the upstreams is passed on (see `UpstreamConfig::trust_ad`): as set, else
    /// true exactly when every upstream, `[[forward]]` zones' included, is on loopback. Read
    /// after [`Config::resolve_system_upstreams`], which may fill the servers in.
    pub(crate) fn effective_trust_ad(&self) -> bool {
        self.upstream.trust_ad.unwrap_or_else(|| {
            self.upstream
                .servers
                .iter()
                .chain(self.forward.iter().flat_map(|f| &f.servers))
                .all(|s| s.ip().is_loopback())
        })
    }
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
pub(crate) fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
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

// ---------------------------------------------------------------------------------------------
// Entry points.

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
        let mut errors = Errors::new(path, text);
        let config = file.validate(&mut errors);
        errors.into_result(config)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = Config::from_toml_str("", "x.toml").expect("valid");
        assert_eq!(c.server.listen.len(), 2);
        assert_eq!(c.upstream.timeout, Duration::from_secs(2));
        assert_eq!(c.cache.stale_for, Duration::from_secs(3600));
        assert_eq!(c.consul.domains[0].to_ascii(), "consul.");
        assert_eq!(c.consul.service_ttl_for("anything"), Duration::from_secs(5));
        assert_eq!(c.cache.failure_ttl, Duration::from_secs(5));
        assert_eq!(c.cache.failure_ttl_max, Duration::from_secs(30));
        assert_eq!(c.upstream.trust_ad, None);
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
    fn a_number_for_a_duration_says_the_string_meant() {
        let msg = Config::from_toml_str("[upstream]\ntimeout = 2\n", "f.toml")
            .expect_err("a number")
            .to_string();
        assert!(msg.contains("line 2"), "{msg}");
        assert!(
            msg.contains("expected a duration string like \"2s\"") && msg.contains("write \"2s\""),
            "{msg}"
        );
        let msg = Config::from_toml_str("[server]\nlisten = [53]\n", "f.toml")
            .expect_err("a number")
            .to_string();
        assert!(
            msg.contains("expected an address string like \"127.0.0.1:53\""),
            "{msg}"
        );
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
        let text = include_str!("../../conf/consul-dns-forwarder.toml");
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

    #[test]
    fn ad_is_trusted_by_default_only_from_loopback_upstreams() {
        let with = |servers: &[&str], forward: &[&str], trust: &str| {
            let zone = if forward.is_empty() {
                String::new()
            } else {
                format!("[[forward]]\nzone = \"corp\"\nservers = {forward:?}\n")
            };
            let text = format!("[upstream]\nservers = {servers:?}\n{trust}{zone}");
            Config::from_toml_str(&text, "t.toml")
                .expect("valid")
                .effective_trust_ad()
        };
        assert!(with(&["127.0.0.53", "[::1]:5353"], &[], ""));
        assert!(!with(&["127.0.0.53", "192.0.2.1"], &[], ""));
        assert!(
            !with(&["127.0.0.53"], &["10.0.0.1"], ""),
            "forward zones count"
        );
        assert!(with(&["192.0.2.1"], &[], "trust_ad = true\n"));
        assert!(!with(&["127.0.0.1"], &[], "trust_ad = false\n"));
    }
}
