//! Log output: text or JSON on stderr, one line per event (a message with line breaks, such as
//! a TOML error quoting the file, is folded so the journal keeps it as one entry), colour only
//! on a terminal and never with `NO_COLOR` set.

use std::io::{IsTerminal, Write};

use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

/// The filter when neither `RUST_LOG` nor `log.level` is set.
pub const DEFAULT_LEVEL: &str = "info";

/// The subscriber for `format`, filtering by `RUST_LOG`, else `level`, else
/// [`DEFAULT_LEVEL`].
pub fn subscriber(
    format: LogFormat,
    level: Option<&str>,
) -> Box<dyn tracing::Subscriber + Send + Sync> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::builder()
            .parse(level.unwrap_or(DEFAULT_LEVEL))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LEVEL))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(OneLine)
        .with_ansi(colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        ));
    match format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(builder.json().finish()),
    }
}

/// Colour only on a terminal, and not when `NO_COLOR` is set to anything non-empty
/// (no-color.org).
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// stderr, with line breaks inside an event written as `\n`, so each event is one line.
struct OneLine;

impl<'a> MakeWriter<'a> for OneLine {
    type Writer = OneLine;
    fn make_writer(&'a self) -> OneLine {
        OneLine
    }
}

impl Write for OneLine {
    /// tracing-subscriber hands over each formatted event whole.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().lock().write_all(&fold(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// `event` with every line break but a final one written as the two characters `\n`.
fn fold(event: &[u8]) -> Vec<u8> {
    let (body, end) = match event.strip_suffix(b"\n") {
        Some(body) => (body, &b"\n"[..]),
        None => (event, &b""[..]),
    };
    let mut out = Vec::with_capacity(event.len() + 8);
    for &b in body {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => {}
            _ => out.push(b),
        }
    }
    out.extend_from_slice(end);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_one_line() {
        assert_eq!(fold(b"a\nb\r\nc\n"), b"a\\nb\\nc\n");
        assert_eq!(fold(b"plain\n"), b"plain\n");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colour(true, None));
        assert!(!colour(false, None));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(
            colour(true, Some(OsStr::new(""))),
            "empty NO_COLOR is unset"
        );
    }
}
