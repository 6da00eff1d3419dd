//! What can be wrong with a configuration, and where in the file it is.

use std::fmt;
use std::path::PathBuf;

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
/// reports them all; each is located in the file's text by its key.
#[derive(Debug)]
pub(super) struct Errors<'a> {
    path: &'a str,
    text: &'a str,
    found: Vec<ConfigError>,
}

impl<'a> Errors<'a> {
    /// `path` only names the file in messages; `text` is searched for the lines of keys.
    pub(super) fn new(path: &'a str, text: &'a str) -> Self {
        Errors {
            path,
            text,
            found: Vec::new(),
        }
    }

    /// `section.key` is wrong: reported at the key's line, or the section's when the key is not
    /// written (a default, or a value that depends on another key).
    pub(super) fn invalid(&mut self, section: &str, key: &str, message: impl Into<String>) {
        self.found.push(ConfigError::Invalid {
            path: self.path.to_owned(),
            line: line_of(self.text, section, key),
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

/// The message for a TTL above [`MAX_DNS_TTL`].
pub(super) fn ttl_range() -> String {
    format!(
        "must be between 0s and {}s, about 68 years (RFC 2181: resolvers read a larger TTL as 0)",
        MAX_DNS_TTL.as_secs()
    )
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
