//! The file as written: every section and key optional, `deny_unknown_fields` everywhere, and the
//! value types that check themselves while deserializing, so that the TOML parser's error names
//! the file, line, column and key of a value that is wrong on its own.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use hickory_proto::rr::Name;
use ipnet::IpNet;
use serde::de::{Unexpected, Visitor};
use serde::{Deserialize, Deserializer};

/// The DNS port: the default for upstream servers given without one.
pub const DNS_PORT: u16 = 53;

// ---------------------------------------------------------------------------------------------
// Value types.

/// The form a value written as a string takes, for the message when something else is written
/// (`timeout = 2`): "expected a duration string like \"2s\"".
trait StringForm: FromStr<Err = String> {
    /// Completes "expected ...".
    const FORM: &'static str;
    /// The string meant when a number was written, if one is obvious.
    fn for_number(_n: f64) -> Option<String> {
        None
    }
}

/// Reads a string and parses it with `T`'s `FromStr`, whose message says what is wrong and
/// shows the expected form; the TOML parser adds where. Anything but a string is refused with
/// the form expected.
fn deserialize_from_str<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: StringForm,
{
    struct Form<T>(std::marker::PhantomData<T>);
    impl<T: StringForm> Form<T> {
        fn number<E: serde::de::Error>(&self, n: f64, unexpected: Unexpected<'_>) -> E {
            match T::for_number(n) {
                Some(meant) => E::custom(format!(
                    "invalid type: {unexpected}, expected {}: write {meant:?}",
                    T::FORM
                )),
                None => E::invalid_type(unexpected, self),
            }
        }
    }
    impl<T: StringForm> Visitor<'_> for Form<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(T::FORM)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
            v.parse().map_err(E::custom)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<T, E> {
            Err(self.number(v as f64, Unexpected::Signed(v)))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<T, E> {
            Err(self.number(v as f64, Unexpected::Unsigned(v)))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<T, E> {
            Err(self.number(v, Unexpected::Float(v)))
        }
    }
    d.deserialize_any(Form(std::marker::PhantomData))
}

/// `Deserialize` through [`deserialize_from_str`], for types written as strings, each with the
/// form its messages show.
macro_rules! deserialize_via_from_str {
    ($($t:ty => $form:expr),+ $(,)?) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                deserialize_from_str(d)
            }
        }
        impl StringForm for $t {
            const FORM: &'static str = $form;
            fn for_number(n: f64) -> Option<String> {
                <$t>::number_meant(n)
            }
        }
    )+};
}

deserialize_via_from_str!(
    ConfigDuration => "a duration string like \"2s\", \"500ms\" or \"10m\"",
    ListenAddr => "an address string like \"127.0.0.1:53\"",
    ServerAddr => "an address string like \"192.0.2.1\" or \"127.0.0.1:5353\"",
    AllowNet => "a network string like \"10.0.0.0/8\"",
    Zone => "a domain string like \"consul\"",
    HttpUrl => "a URL string like \"http://127.0.0.1:8500\"",
    LogLevel => "a level string like \"info\"",
);

impl ConfigDuration {
    /// A bare number is read as seconds by most tools: say so, in our form.
    fn number_meant(n: f64) -> Option<String> {
        Some(format!("{n}s"))
    }
}

/// No obvious string for a number.
macro_rules! no_number_meant {
    ($($t:ty),+) => {$(
        impl $t {
            fn number_meant(_n: f64) -> Option<String> {
                None
            }
        }
    )+};
}

no_number_meant!(ListenAddr, ServerAddr, AllowNet, Zone, HttpUrl, LogLevel);

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsulMode {
    /// Answers from the HTTP health API, kept fresh by blocking queries.
    Http,
    /// The dnsmasq-compatible mode: the domain forwarded to the agents' DNS interface.
    Dns,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenNoneHealthy {
    /// NXDOMAIN, as Consul does.
    Nxdomain,
    /// Every instance, healthy or not: better than sending traffic nowhere.
    All,
}

// ---------------------------------------------------------------------------------------------
// Sections. Each has a `validate` in `validate.rs` that turns it into its validated type.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    #[serde(default)]
    pub(crate) server: FileServer,
    #[serde(default)]
    pub(crate) upstream: FileUpstream,
    #[serde(default)]
    pub(crate) forward: Vec<FileForward>,
    #[serde(default)]
    pub(crate) cache: FileCache,
    #[serde(default)]
    pub(crate) consul: FileConsul,
    #[serde(default)]
    pub(crate) metrics: FileMetrics,
    #[serde(default)]
    pub(crate) log: FileLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileServer {
    pub(crate) listen: Option<Vec<ListenAddr>>,
    pub(crate) allow: Option<Vec<AllowNet>>,
    pub(crate) tcp_idle_timeout: Option<ConfigDuration>,
    pub(crate) max_tcp_connections: Option<usize>,
    pub(crate) max_tcp_connections_per_network: Option<usize>,
    pub(crate) udp_sockets_per_address: Option<usize>,
    pub(crate) max_inflight: Option<usize>,
    pub(crate) rate_limit: Option<u32>,
    pub(crate) rate_limit_exempt: Option<Vec<AllowNet>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileUpstream {
    pub(crate) servers: Option<Vec<ServerAddr>>,
    pub(crate) timeout: Option<ConfigDuration>,
    pub(crate) resolv_conf: Option<PathBuf>,
    pub(crate) max_inflight: Option<usize>,
    pub(crate) randomize_case: Option<bool>,
    pub(crate) trust_ad: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileForward {
    pub(crate) zone: Zone,
    pub(crate) servers: Vec<ServerAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCache {
    pub(crate) max_entries: Option<u64>,
    pub(crate) max_bytes: Option<u64>,
    pub(crate) min_ttl: Option<ConfigDuration>,
    pub(crate) max_ttl: Option<ConfigDuration>,
    pub(crate) negative_ttl: Option<ConfigDuration>,
    pub(crate) stale_for: Option<ConfigDuration>,
    pub(crate) failure_ttl: Option<ConfigDuration>,
    pub(crate) failure_ttl_max: Option<ConfigDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConsul {
    pub(crate) enabled: Option<bool>,
    pub(crate) mode: Option<ConsulMode>,
    pub(crate) http: Option<Vec<HttpUrl>>,
    pub(crate) dns: Option<Vec<ServerAddr>>,
    pub(crate) domain: Option<Zone>,
    pub(crate) alt_domains: Option<Vec<Zone>>,
    pub(crate) datacenter: Option<String>,
    pub(crate) token_file: Option<PathBuf>,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) catalog_file: Option<PathBuf>,
    pub(crate) only_passing: Option<bool>,
    pub(crate) when_none_healthy: Option<WhenNoneHealthy>,
    pub(crate) a_record_limit: Option<usize>,
    pub(crate) service_ttl: Option<BTreeMap<String, ConfigDuration>>,
    pub(crate) node_ttl: Option<ConfigDuration>,
    pub(crate) negative_ttl: Option<ConfigDuration>,
    pub(crate) watch_wait: Option<ConfigDuration>,
    pub(crate) watch_idle: Option<ConfigDuration>,
    pub(crate) stale_for: Option<ConfigDuration>,
    pub(crate) max_connections: Option<usize>,
    pub(crate) allow_stale: Option<bool>,
    pub(crate) max_stale: Option<ConfigDuration>,
    pub(crate) translate_wan_addrs: Option<bool>,
    pub(crate) allow_insecure_token: Option<bool>,
    pub(crate) reverse_networks: Option<Vec<AllowNet>>,
    pub(crate) enable_additional_node_meta_txt: Option<bool>,
    pub(crate) udp_answer_limit: Option<usize>,
    pub(crate) enable_truncate: Option<bool>,
    pub(crate) soa: Option<FileSoa>,
}

/// `[consul.soa]`: Consul's `dns_config.soa`, in seconds as Consul writes them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSoa {
    pub(crate) refresh: Option<u32>,
    pub(crate) retry: Option<u32>,
    pub(crate) expire: Option<u32>,
    pub(crate) min_ttl: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileMetrics {
    pub(crate) listen: Option<ListenAddr>,
    pub(crate) enabled: Option<bool>,
    pub(crate) debug: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLog {
    pub(crate) queries: Option<bool>,
    pub(crate) format: Option<LogFormat>,
    pub(crate) level: Option<LogLevel>,
}

/// How log lines are written (`log.format`, `--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line of text per event.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// A log filter in `RUST_LOG`'s syntax: `info`, or `info,consul_dns_forwarder=debug`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLevel(pub String);

impl FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        tracing_subscriber::EnvFilter::builder()
            .parse(s.trim())
            .map(|_| LogLevel(s.trim().to_owned()))
            .map_err(|e| format!("invalid log filter {s:?} ({e}): write a level like \"info\" or \"debug\", or \"info,consul_dns_forwarder=debug\""))
    }
}
