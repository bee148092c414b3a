//! Tracing set-up shared by every subcommand.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

use crate::api::contract::env;

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    /// The value of `--log-format` (and `MCP_SESSION_LOG_FORMAT`) that selects this format.
    pub fn as_flag(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

/// Installs the global subscriber: `RUST_LOG` wins, else `default_directive` (e.g. `warn` for
/// the CLI, `info` for long-running servers). A `RUST_LOG` that does not parse is said, once
/// logging is up, rather than passed over in silence.
pub fn init(format: LogFormat, default_directive: &str) {
    let (filter, refused) = filter_from(std::env::var(env::LOG_FILTER).ok(), default_directive);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // A second init (tests) keeps the first subscriber; nothing to report.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if let Some(error) = refused {
        tracing::warn!(%error, default = default_directive, "RUST_LOG is not a log filter; logging at the default");
    }
}

/// The filter `raw` (the value of `RUST_LOG`) makes, else `default_directive`'s, with why
/// `raw` was refused.
fn filter_from(raw: Option<String>, default_directive: &str) -> (EnvFilter, Option<String>) {
    match raw.filter(|r| !r.trim().is_empty()).map(EnvFilter::try_new) {
        Some(Ok(filter)) => (filter, None),
        Some(Err(error)) => (EnvFilter::new(default_directive), Some(error.to_string())),
        None => (EnvFilter::new(default_directive), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_filter_that_does_not_parse_is_refused_with_its_reason() {
        let (filter, refused) = filter_from(Some("debug,mcp=trace".into()), "info");
        assert_eq!(refused, None);
        assert!(filter.to_string().contains("debug"), "{filter}");
        let (filter, refused) = filter_from(Some("mcp=loud".into()), "info");
        assert!(refused.is_some(), "an unknown level");
        assert_eq!(filter.to_string(), "info");
        let (filter, refused) = filter_from(Some(" ".into()), "warn");
        assert_eq!((filter.to_string(), refused), ("warn".to_owned(), None));
    }
}
