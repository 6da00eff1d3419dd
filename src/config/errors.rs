//! What can be wrong with a configuration, and where in the file it is.

use std::fmt;
use std::path::PathBuf;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::defaults::MAX_DNS_TTL;

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
    /// Found in the final configuration (file and flags), so named by key without a line.
    #[error("{key}: {message}")]
    Key { key: &'static str, message: String },
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
    pub(crate) agent: String,
    pub(crate) token_from: String,
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

/// The problems the section validators find, collected rather than returned so that one run
/// reports them all; each is located in the file by its key's span.
#[derive(Debug)]
pub(super) struct Errors<'a> {
    path: &'a str,
    text: &'a str,
    /// The file as spanned TOML (keys and values with their byte ranges); `None` only for text
    /// that does not parse, which never gets this far.
    spans: Option<DeTable<'a>>,
    found: Vec<ConfigError>,
}

impl<'a> Errors<'a> {
    /// `path` only names the file in messages; `text` gives the lines of keys.
    pub(super) fn new(path: &'a str, text: &'a str) -> Self {
        Errors {
            path,
            text,
            spans: DeTable::parse(text).ok().map(Spanned::into_inner),
            found: Vec::new(),
        }
    }

    /// `section.key` is wrong: reported at the key's line, or the section's when the key is not
    /// written (a default, or a value that depends on another key).
    pub(super) fn invalid(&mut self, section: &str, key: &str, message: impl Into<String>) {
        self.invalid_in(section, 0, key, message);
    }

    /// Like [`Errors::invalid`], in block `index` of an array of tables (`[[forward]]`).
    pub(super) fn invalid_in(
        &mut self,
        section: &str,
        index: usize,
        key: &str,
        message: impl Into<String>,
    ) {
        let offset = self
            .spans
            .as_ref()
            .and_then(|root| offset_of(root, section, index, key));
        self.found.push(ConfigError::Invalid {
            path: self.path.to_owned(),
            line: offset.map_or(1, |o| line_at(self.text, o)),
            key: format!("{section}.{key}"),
            message: message.into(),
        });
    }

    /// A problem no key of the file is to blame for.
    pub(super) fn other(&mut self, message: String) {
        self.found.push(ConfigError::Other(message));
    }

    /// `value` if nothing was found, else every problem in the order found.
    pub(super) fn into_result<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.found.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(self.found))
        }
    }

    /// The `section.key` of each located problem, for tests of one section.
    #[cfg(test)]
    pub(super) fn keys(&self) -> Vec<&str> {
        self.found
            .iter()
            .filter_map(|e| match e {
                ConfigError::Invalid { key, .. } => Some(key.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Every problem as `check-config` would print it, for tests of one section.
    #[cfg(test)]
    pub(super) fn messages(&self) -> Vec<String> {
        self.found.iter().map(ToString::to_string).collect()
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Where `key` is written in `section` (dotted: `consul.soa`; in block `index` when the section
/// is an array of tables), else where the innermost section written is; `None` when not even
/// the first part of `section` is in the file. `key` may be quoted as Rust debug-prints it.
fn offset_of(root: &DeTable<'_>, section: &str, index: usize, key: &str) -> Option<usize> {
    let mut table = root;
    let mut found = None;
    for part in section.split('.') {
        let (name, value) = table.get_key_value(part)?;
        found = Some(name.span().start);
        table = match value.get_ref() {
            DeValue::Table(t) => t,
            DeValue::Array(blocks) => {
                let block = blocks.get(index).or_else(|| blocks.first())?;
                found = Some(block.span().start);
                match block.get_ref() {
                    DeValue::Table(t) => t,
                    _ => return found,
                }
            }
            _ => return found,
        };
    }
    let key = key
        .strip_prefix('"')
        .and_then(|k| k.strip_suffix('"'))
        .unwrap_or(key);
    match table.get_key_value(key) {
        Some((name, _)) => Some(name.span().start),
        None => found,
    }
}

/// The message for a TTL above [`MAX_DNS_TTL`].
pub(super) fn ttl_range() -> String {
    format!(
        "must be between 0s and {}s, about 68 years (RFC 2181: resolvers read a larger TTL as 0)",
        MAX_DNS_TTL.as_secs()
    )
}

/// The 1-based line where `key` is set inside `[section]` (or the first `[[section]]`), from
/// the TOML spans; the section's line when the key is not written (its default was used), 1 when
/// neither is found.
pub fn line_of(text: &str, section: &str, key: &str) -> usize {
    DeTable::parse(text)
        .ok()
        .and_then(|root| offset_of(root.get_ref(), section, 0, key))
        .map_or(1, |o| line_at(text, o))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "[consul]\ndomain = \"consul\"\n\n[[forward]]\nzone = \"a\"\nservers = [\"10.0.0.1\"]\n\n[[forward]]\nzone = \"b\"\nservers = []\n\n[consul.service_ttl]\n\"web*\" = \"5s\"\n\"db\" = \"1s\"\n";

    #[test]
    fn lines_come_from_spans_in_nested_tables_and_blocks() {
        let root = DeTable::parse(FILE).expect("toml").into_inner();
        let line =
            |section, index, key| offset_of(&root, section, index, key).map(|o| line_at(FILE, o));
        assert_eq!(line("consul", 0, "domain"), Some(2));
        assert_eq!(line("forward", 0, "servers"), Some(6));
        assert_eq!(line("forward", 1, "servers"), Some(10), "the second block");
        assert_eq!(line("consul.service_ttl", 0, "\"db\""), Some(14));
        assert_eq!(line("consul.service_ttl", 0, "\"web*\""), Some(13));
        assert_eq!(
            line("consul.service_ttl", 0, "x"),
            Some(12),
            "the table's header"
        );
        assert_eq!(line("cache", 0, "min_ttl"), None);
        assert_eq!(line_of(FILE, "cache", "min_ttl"), 1);
    }
}
