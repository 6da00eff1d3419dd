//! The checks that need the final configuration (file and flags) and this host, but bind
//! nothing: the files named exist and are readable, the listen addresses do not collide, and the
//! sockets bound at start fit the open-file limit. Run by `check-config` and at every start and
//! reload, so a configuration `check-config` accepts does not fail for these at start.

use std::net::SocketAddr;
use std::path::Path;

use super::{Config, ConfigError, ConfigErrors};

/// Descriptors the process holds besides the listen sockets: stdio, the runtime's epoll and
/// event fds, the metrics listener, Consul and upstream sockets opened before the first query.
const FD_RESERVE: u64 = 64;

impl Config {
    /// Every problem these checks find, each naming its key.
    pub fn check_host(&self) -> Result<(), ConfigErrors> {
        let mut found = Vec::new();
        if self.consul.enabled {
            let files = [
                ("consul.token_file", &self.consul.token_file),
                ("consul.ca_file", &self.consul.ca_file),
                ("consul.catalog_file", &self.consul.catalog_file),
            ];
            for (key, path) in files {
                if let Some(path) = path {
                    if let Err(message) = readable(path) {
                        found.push(ConfigError::Key { key, message });
                    }
                }
            }
        }
        found.extend(
            listen_conflicts(&self.server.listen, self.metrics.listen)
                .into_iter()
                .map(|(key, message)| ConfigError::Key { key, message }),
        );
        let per = crate::server::udp_sockets_per_address(self.server.udp_sockets_per_address);
        if let Some(limit) = open_file_limit() {
            if let Some(message) = fd_shortfall(self.server.listen.len(), per, limit) {
                found.push(ConfigError::Key {
                    key: "server.udp_sockets_per_address",
                    message,
                });
            }
        }
        if found.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(found))
        }
    }
}

/// Opens `path` for reading and reads from it, as the start will.
fn readable(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut byte = [0u8; 1];
    std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut byte))
        .map(drop)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Would binding `b` fail because `a` is bound (same port, same address or a wildcard of the
/// same family)?
fn collide(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Listen addresses listed twice or overlapping, and a metrics endpoint on a DNS address's TCP
/// port: the key to blame and why.
fn listen_conflicts(
    listen: &[SocketAddr],
    metrics: Option<SocketAddr>,
) -> Vec<(&'static str, String)> {
    let mut found = Vec::new();
    for (i, &b) in listen.iter().enumerate() {
        if let Some(a) = listen[..i].iter().find(|&&a| collide(a, b)) {
            let why = if *a == b {
                format!("{b} is listed twice")
            } else {
                format!("{a} and {b} overlap (a wildcard address covers the other)")
            };
            found.push((
                "server.listen",
                format!("{why}: each address and port once"),
            ));
        }
    }
    if let Some(m) = metrics {
        if let Some(a) = listen.iter().find(|&&a| collide(a, m)) {
            found.push((
                "metrics.listen",
                format!("{m} is the DNS listen address {a} (server.listen): give the metrics endpoint another port, like 9153"),
            ));
        }
    }
    found
}

/// The message when `addresses` listen addresses of `per` UDP sockets and one TCP listener each
/// (and the reserve) exceed the soft open-file limit.
fn fd_shortfall(addresses: usize, per: usize, limit: u64) -> Option<String> {
    let sockets = (addresses as u64).saturating_mul(per as u64 + 1);
    let needed = sockets.saturating_add(FD_RESERVE);
    (needed > limit).then(|| {
        format!(
            "{addresses} listen address(es) × ({per} UDP sockets + 1 TCP) = {sockets} sockets at start, \
             plus {FD_RESERVE} for the rest, exceed the open-file limit of {limit} (ulimit -n, \
             LimitNOFILE=): lower it or raise the limit"
        )
    })
}

/// The soft limit on open files, from /proc (Linux); `None` where it cannot be read.
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_file_limit(&limits)
}

fn parse_open_file_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    // "unlimited" means no limit to check.
    soft.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().expect("addr")).collect()
    }

    #[test]
    fn duplicate_and_overlapping_listen_addresses_are_named() {
        let found = listen_conflicts(&addrs(&["127.0.0.1:53", "127.0.0.1:53"]), None);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "server.listen");
        assert!(
            found[0].1.contains("127.0.0.1:53 is listed twice"),
            "{found:?}"
        );
        let found = listen_conflicts(&addrs(&["0.0.0.0:53", "127.0.0.1:53"]), None);
        assert!(found[0].1.contains("overlap"), "{found:?}");
        for fine in [
            &["127.0.0.1:53", "[::1]:53"][..],
            &["0.0.0.0:53", "[::]:53"],
            &["127.0.0.1:0", "127.0.0.1:0"],
            &["127.0.0.1:53", "127.0.0.2:53"],
        ] {
            assert!(listen_conflicts(&addrs(fine), None).is_empty(), "{fine:?}");
        }
    }

    #[test]
    fn metrics_on_a_dns_port_is_named() {
        let listen = addrs(&["127.0.0.1:53"]);
        let found = listen_conflicts(&listen, Some("0.0.0.0:53".parse().expect("addr")));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "metrics.listen");
        assert!(
            listen_conflicts(&listen, Some("127.0.0.1:9153".parse().expect("addr"))).is_empty()
        );
    }

    #[test]
    fn sockets_beyond_the_open_file_limit_are_refused() {
        assert_eq!(fd_shortfall(2, 2, 1024), None);
        let msg = fd_shortfall(2, 1024, 1024).expect("2050 sockets");
        assert!(
            msg.contains("2050 sockets") && msg.contains("1024"),
            "{msg}"
        );
        let proc = "Limit                     Soft Limit           Hard Limit           Units\n\
                    Max open files            1024                 524288               files\n";
        assert_eq!(parse_open_file_limit(proc), Some(1024));
        assert_eq!(
            parse_open_file_limit(
                "Max open files            unlimited            unlimited            files\n"
            ),
            None
        );
    }
}
