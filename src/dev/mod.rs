//! `dev`: the laptop loop. Runs the MCP server as a child process on a port of its own, behind
//! a session proxy, and restarts it when a watched file changes, on SIGHUP, or when it exits:
//! quiesce (new requests held, those it works on finish), stop, start, wait until it answers,
//! resume (held requests go to the new process, which the proxy replays each session's
//! handshake to). A client connected meanwhile (Cursor, Claude) sees neither an error nor a new
//! session, whatever its tools do.

pub mod watch;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tracing::{info, warn};

use self::watch::Snapshot;
use crate::proxy::Proxy;

/// How often watched paths are looked at.
const WATCH_INTERVAL: Duration = Duration::from_millis(300);
/// A burst of writes (an editor saving several files, a formatter) is one change.
const SETTLE: Duration = Duration::from_millis(200);
/// A child that exits sooner than this after its start is started again with growing pauses.
const QUICK_EXIT: Duration = Duration::from_secs(2);

/// The literal in the command's arguments that stands for the child's port.
pub const PORT_PLACEHOLDER: &str = "{port}";

#[derive(Debug, Clone)]
pub struct DevConfig {
    /// The MCP server's command and arguments; `{port}` in them is replaced by `port`.
    pub command: Vec<String>,
    pub port: u16,
    pub watch: Vec<PathBuf>,
    /// How long the child has to exit after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// How long a started child has to answer on its port.
    pub start_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("no MCP server command given (dev [OPTIONS] -- COMMAND [ARGS]...)")]
    NoCommand,
    #[error("cannot start {command:?}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
}

/// Why the child is restarted.
#[derive(Debug)]
enum Cause {
    Changed(PathBuf),
    Hangup,
    Exited(String),
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Changed(path) => write!(f, "{} changed", path.display()),
            Self::Hangup => f.write_str("SIGHUP"),
            Self::Exited(status) => write!(f, "the server exited ({status})"),
        }
    }
}

/// The child's command with `{port}` replaced.
pub fn child_command(config: &DevConfig) -> Result<Command, DevError> {
    let port = config.port.to_string();
    let mut words = config
        .command
        .iter()
        .map(|word| word.replace(PORT_PLACEHOLDER, &port));
    let program = words.next().ok_or(DevError::NoCommand)?;
    let mut command = Command::new(program);
    command
        .args(words)
        .env("PORT", &port)
        // Its own process group: a signal reaches what it starts too (`npm run`, `uv run`).
        .process_group(0)
        .kill_on_drop(true);
    Ok(command)
}

fn start(config: &DevConfig) -> Result<Child, DevError> {
    child_command(config)?
        .spawn()
        .map_err(|source| DevError::Spawn {
            command: config.command.join(" "),
            source,
        })
}

/// SIGTERM to the child's process group; SIGKILL if it is still there after `timeout`.
async fn stop(child: &mut Child, timeout: Duration) {
    let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) else {
        return; // Exited already.
    };
    let group = Pid::from_raw(pid);
    if killpg(group, Signal::SIGTERM).is_err() {
        let _ = child.start_kill();
    }
    if tokio::time::timeout(timeout, child.wait()).await.is_err() {
        warn!(?timeout, "the MCP server ignored SIGTERM; killing it");
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.wait().await;
    }
}

/// Waits until something accepts connections on the child's port; false after `timeout`.
async fn answering(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Resolves with the first watched path that changes (after a burst of changes settles).
async fn next_change(paths: &[PathBuf], snapshot: &mut Snapshot) -> PathBuf {
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let now = take_snapshot(paths).await;
        let Some(changed) = now.changed_since(snapshot).map(PathBuf::from) else {
            continue;
        };
        tokio::time::sleep(SETTLE).await;
        *snapshot = take_snapshot(paths).await;
        return changed;
    }
}

async fn take_snapshot(paths: &[PathBuf]) -> Snapshot {
    let paths = paths.to_vec();
    tokio::task::spawn_blocking(move || Snapshot::take(&paths))
        .await
        .unwrap_or_default()
}

/// Runs the child and restarts it until `shutdown` resolves; then stops it.
pub async fn supervise(
    proxy: Arc<Proxy>,
    config: DevConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DevError> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut snapshot = take_snapshot(&config.watch).await;
    let mut child = start(&config)?;
    let mut started = Instant::now();
    if answering(config.port, config.start_timeout).await {
        info!(port = config.port, pid = child.id(), "MCP server answering");
    } else {
        warn!(
            port = config.port,
            "the MCP server does not answer on its port yet"
        );
    }
    let mut quick_exits = 0_u32;
    let mut restarts = 0_u64;
    tokio::pin!(shutdown);
    loop {
        let cause = tokio::select! {
            () = &mut shutdown => {
                stop(&mut child, config.stop_timeout).await;
                return Ok(());
            }
            status = child.wait() => Cause::Exited(status.map_or_else(|e| e.to_string(), |s| s.to_string())),
            Some(()) = async { match hangups.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => Cause::Hangup,
            path = next_change(&config.watch, &mut snapshot), if !config.watch.is_empty() => Cause::Changed(path),
        };
        restarts += 1;
        let began = Instant::now();
        // Nothing new reaches the old process, and what it works on finishes, before it stops.
        proxy.hold_upstream().await;
        let exited = matches!(cause, Cause::Exited(_));
        if exited {
            quick_exits = if started.elapsed() < QUICK_EXIT {
                (quick_exits + 1).min(5)
            } else {
                0
            };
            if quick_exits > 0 {
                let pause = Duration::from_millis(250 << quick_exits);
                warn!(%cause, ?pause, "the MCP server exited soon after its start; starting it again after a pause");
                tokio::time::sleep(pause).await;
            }
        } else {
            stop(&mut child, config.stop_timeout).await;
        }
        let stopped = began.elapsed();
        child = start(&config)?;
        started = Instant::now();
        let up = answering(config.port, config.start_timeout).await;
        let held = proxy.held_requests();
        proxy.resume_upstream();
        let seconds = |d: Duration| (d.as_secs_f64() * 100.0).round() / 100.0;
        if up {
            info!(
                restart = restarts,
                cause = %cause,
                stopped_seconds = seconds(stopped),
                total_seconds = seconds(began.elapsed()),
                held,
                replays_so_far = proxy.replays(),
                "MCP server restarted"
            );
        } else {
            warn!(restart = restarts, cause = %cause, "the restarted MCP server does not answer; held requests go to it anyway");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_goes_into_the_arguments_and_the_environment() {
        let config = DevConfig {
            command: vec!["python".into(), "server.py".into(), "--port={port}".into()],
            port: 4321,
            watch: Vec::new(),
            stop_timeout: Duration::from_secs(1),
            start_timeout: Duration::from_secs(1),
        };
        let command = child_command(&config).unwrap();
        let std = command.as_std();
        assert_eq!(std.get_program(), "python");
        let args: Vec<_> = std.get_args().collect();
        assert_eq!(args, ["server.py", "--port=4321"]);
        assert!(
            std.get_envs()
                .any(|(k, v)| k == "PORT" && v == Some("4321".as_ref()))
        );
        let empty = DevConfig {
            command: Vec::new(),
            ..config
        };
        assert!(matches!(child_command(&empty), Err(DevError::NoCommand)));
    }
}
