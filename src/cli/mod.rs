//! The command line: `run`, `proxy`, `gateway`, `hold`, `dev`, `sessions`, `crd`.

mod dev;
mod gateway;
mod hold;
mod output;
mod proxy;
mod run;
mod sessions;

use clap::{Parser, Subcommand};

use crate::telemetry::{self, LogFormat};

pub use self::output::OutputFormat;
pub use self::sessions::{RedisArgs, SessionsCommand};

/// Exit code for usage errors (bad flags, invalid ids), as clap uses.
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "mcp-session-operator",
    version,
    about,
    propagate_version = true,
    args_override_self = true
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = crate::api::contract::env::LOG_FORMAT
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the operator: controller, metrics and admission webhooks.
    Run(Box<run::RunArgs>),
    /// Run the session proxy in front of an MCP server.
    Proxy(Box<proxy::ProxyArgs>),
    /// Run the session proxy in front of a policy's pods: a gateway that keeps clients'
    /// connections when a backend pod stops or dies.
    Gateway(Box<gateway::GatewayArgs>),
    /// Hold a stopping MCP server pod until its sessions end: the backend's preStop hook in
    /// gateway mode under drain strategy Wait, injected by the webhook.
    Hold(Box<hold::HoldArgs>),
    /// Run an MCP server behind the session proxy, restarting it when its code changes.
    Dev(Box<dev::DevArgs>),
    /// Inspect and manage the session store.
    Sessions(sessions::SessionsArgs),
    /// Print the McpSessionPolicy CustomResourceDefinition as YAML.
    Crd,
}

/// An error that is the caller's: wrong flags or arguments. Exits with [`EXIT_USAGE`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Exit code for an error returned by [`run`].
pub fn exit_code(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<UsageError>().is_some() {
        EXIT_USAGE
    } else {
        1
    }
}

/// An error and its causes on one line, each said once: a store error names its cause in its
/// own message, and a Redis error may span lines.
pub fn error_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Resolves on SIGTERM or Ctrl-C.
pub(crate) async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Sessions(args) => {
            telemetry::init(cli.log_format, "warn");
            sessions::run(args).await
        }
        Command::Run(args) => {
            telemetry::init(cli.log_format, "info");
            run::run(*args, cli.log_format).await
        }
        Command::Crd => {
            print!("{}", crate::api::crd_yaml());
            Ok(())
        }
        Command::Proxy(args) => {
            telemetry::init(cli.log_format, "info");
            proxy::run(*args).await
        }
        Command::Gateway(args) => {
            telemetry::init(cli.log_format, "info");
            gateway::run(*args).await
        }
        Command::Hold(args) => {
            telemetry::init(cli.log_format, "info");
            hold::run(*args).await
        }
        Command::Dev(args) => {
            telemetry::init(cli.log_format, "info");
            dev::run(*args).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot reach Redis at redis://x: {source}")]
    struct Wrapping {
        source: std::io::Error,
    }

    #[test]
    fn an_error_is_one_line_with_each_cause_once() {
        let io = std::io::Error::other("Parse error at 1\nUnexpected `33`");
        let error = anyhow::Error::new(Wrapping { source: io }).context("sessions stats");
        assert_eq!(
            error_line(&error),
            "sessions stats: cannot reach Redis at redis://x: Parse error at 1 Unexpected `33`"
        );
    }
}
