//! `TestConfig`: the forwarder's TOML config for a test, built by what the test cares about
//! instead of a `format!` string per test.
//!
//! It writes TOML text (not a `Config`), because the same text also goes into files for the real
//! binary and through `Config::from_toml_str`. Sections come out in a fixed order, `[server]`,
//! `[upstream]`, `[cache]`, `[metrics]`, `[log]`, `[consul]`, each only when something was set in
//! it, then the `[[forward]]` zones, then any other table (`[consul.service_ttl]`: TOML subtables
//! must come after their parent's keys), each in the order first set.
//!
//! Tests whose subject is the TOML text itself (a line number in an error, an edit of a shipped
//! file, mutated text) write their text literally instead.
//!
//! Unlike the shipped defaults, the metrics endpoint is off unless asked for: a test that binds
//! nothing it does not use cannot collide with another test's port.

use std::fmt::{self, Display};
use std::path::Path;

#[derive(Clone, Debug)]
pub struct TestConfig {
    server: String,
    upstream_servers: Vec<String>,
    upstream: String,
    cache: String,
    /// `None`: no `[metrics]` section, the shipped default (the endpoint on).
    metrics: Option<String>,
    log: String,
    consul_http: Vec<String>,
    consul: String,
    /// `[[forward]]` entries, each its lines.
    forwards: Vec<String>,
    /// Other tables: (name, lines).
    tables: Vec<(String, String)>,
}

impl Default for TestConfig {
    fn default() -> Self {
        TestConfig::new()
    }
}

impl TestConfig {
    pub fn new() -> TestConfig {
        TestConfig {
            server: String::new(),
            upstream_servers: Vec::new(),
            upstream: String::new(),
            cache: String::new(),
            metrics: Some("enabled = false\n".to_owned()),
            log: String::new(),
            consul_http: Vec::new(),
            consul: String::new(),
            forwards: Vec::new(),
            tables: Vec::new(),
        }
    }

    /// Adds an upstream server (`upstream.servers`, in call order).
    pub fn upstream(mut self, addr: impl Display) -> Self {
        self.upstream_servers.push(addr.to_string());
        self
    }

    /// `upstream.timeout`, e.g. `"1s"`.
    pub fn upstream_timeout(self, timeout: &str) -> Self {
        self.upstream_lines(&format!("timeout = \"{timeout}\""))
    }

    /// Lines of `[upstream]` beyond the servers and the timeout.
    pub fn upstream_lines(self, lines: &str) -> Self {
        self.lines_in("upstream", lines)
    }

    /// Lines of `[server]`.
    pub fn server(self, lines: &str) -> Self {
        self.lines_in("server", lines)
    }

    /// Lines of `[cache]`.
    pub fn cache(self, lines: &str) -> Self {
        self.lines_in("cache", lines)
    }

    /// Lines of `[log]`.
    pub fn log(self, lines: &str) -> Self {
        self.lines_in("log", lines)
    }

    /// Serves /metrics on `addr` (`TestServer` binds its own port 0 whatever the address).
    pub fn metrics_listen(mut self, addr: impl Display) -> Self {
        self.metrics = Some(format!("listen = \"{addr}\"\n"));
        self
    }

    /// The metrics endpoint off: already so unless `metrics_listen` was called; says so where a
    /// test depends on it.
    pub fn metrics_off(mut self) -> Self {
        self.metrics = Some("enabled = false\n".to_owned());
        self
    }

    /// No `[metrics]` section: the shipped default, endpoint on.
    pub fn metrics_default(mut self) -> Self {
        self.metrics = None;
        self
    }

    /// Adds a Consul agent's HTTP address (`consul.http`, in call order: the failover order).
    pub fn consul_http(mut self, url: impl Display) -> Self {
        self.consul_http.push(url.to_string());
        self
    }

    /// Lines of `[consul]` beyond `http`.
    pub fn consul(self, lines: &str) -> Self {
        self.lines_in("consul", lines)
    }

    /// No Consul at all: every name is forwarded.
    pub fn consul_off(self) -> Self {
        self.consul("enabled = false")
    }

    /// Consul names from a catalog file instead of an agent.
    pub fn catalog_file(self, path: &Path) -> Self {
        self.consul(&format!("catalog_file = \"{}\"", path.display()))
    }

    pub fn token_file(self, path: &Path) -> Self {
        self.consul(&format!("token_file = \"{}\"", path.display()))
    }

    /// `consul.ca_file`: the CA bundle for an https:// agent.
    pub fn ca_file(self, path: &Path) -> Self {
        self.consul(&format!("ca_file = \"{}\"", path.display()))
    }

    /// Consul names from an agent's DNS port (`consul.mode = "dns"`) instead of its HTTP API.
    pub fn consul_dns(self, addr: impl Display) -> Self {
        self.consul(&format!("mode = \"dns\"\ndns = [\"{addr}\"]"))
    }

    /// One TTL for every service (`[consul.service_ttl] "*"`).
    pub fn service_ttl(self, ttl: &str) -> Self {
        self.set("consul.service_ttl", "\"*\"", format!("\"{ttl}\""))
    }

    /// A forward zone (`[[forward]]`): names in `zone` go to `servers`.
    pub fn forward_zone(mut self, zone: &str, servers: &[impl Display]) -> Self {
        let servers: Vec<String> = servers.iter().map(ToString::to_string).collect();
        self.forwards.push(format!(
            "zone = \"{zone}\"\nservers = {}\n",
            quoted_list(&servers)
        ));
        self
    }

    /// `key = value` in the table `table` (`"cache"`, `"consul.service_ttl"`, ...), for a test that
    /// goes through keys by name; `value` is TOML (a string in its quotes).
    pub fn set(self, table: &str, key: &str, value: impl Display) -> Self {
        self.lines_in(table, &format!("{key} = {value}"))
    }

    /// Lines of the table `table`: one of the sections above, or any other table (a subtable).
    fn lines_in(mut self, table: &str, lines: &str) -> Self {
        let section = match table {
            "server" => &mut self.server,
            "upstream" => &mut self.upstream,
            "cache" => &mut self.cache,
            "metrics" => self.metrics.get_or_insert_with(String::new),
            "log" => &mut self.log,
            "consul" => &mut self.consul,
            _ => {
                let at = match self.tables.iter().position(|(name, _)| name == table) {
                    Some(at) => at,
                    None => {
                        self.tables.push((table.to_owned(), String::new()));
                        self.tables.len() - 1
                    }
                };
                &mut self.tables[at].1
            }
        };
        push_lines(section, lines);
        self
    }

    /// The TOML text.
    pub fn toml(&self) -> String {
        self.to_string()
    }

    /// Writes the TOML text to `path`, for the real binary's `--config`.
    pub fn write_to(&self, path: &Path) {
        std::fs::write(path, self.toml())
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Writes the TOML text to `name` in a new temporary directory, for the real binary's
    /// `--config`: the directory (removed when dropped) and the file's path.
    pub fn write_temp(&self, name: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(name);
        self.write_to(&path);
        (dir, path.display().to_string())
    }
}

/// Appends `lines`, ending them with a newline so the next key starts on its own line.
fn push_lines(section: &mut String, lines: &str) {
    if lines.is_empty() {
        return;
    }
    section.push_str(lines);
    if !lines.ends_with('\n') {
        section.push('\n');
    }
}

fn quoted_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

impl Display for TestConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let upstream = with_list("servers", &self.upstream_servers, &self.upstream);
        let consul = with_list("http", &self.consul_http, &self.consul);
        let sections = [
            ("server", self.server.as_str()),
            ("upstream", &upstream),
            ("cache", &self.cache),
            ("metrics", self.metrics.as_deref().unwrap_or_default()),
            ("log", &self.log),
            ("consul", &consul),
        ];
        for (name, lines) in sections {
            if !lines.is_empty() {
                write!(f, "[{name}]\n{lines}")?;
            }
        }
        for forward in &self.forwards {
            write!(f, "[[forward]]\n{forward}")?;
        }
        for (name, lines) in &self.tables {
            write!(f, "[{name}]\n{lines}")?;
        }
        Ok(())
    }
}

/// A section's lines with `key = [items]` first, when there are items.
fn with_list(key: &str, items: &[String], lines: &str) -> String {
    if items.is_empty() {
        lines.to_owned()
    } else {
        format!("{key} = {}\n{lines}", quoted_list(items))
    }
}
