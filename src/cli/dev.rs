//! `dev`: an MCP server as a child process behind the session proxy, restarted on code changes
//! (see [`crate::dev`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use crate::api::contract::env;
use crate::proxy::AdmissionLimits;
use tokio::sync::watch;

use super::proxy::{fingerprint_key, open_store};
use super::sessions::RedisArgs;
use crate::dev::{self, DevConfig};
use crate::proxy::{self, AllowedOrigins, Backends, Fingerprinter, Proxy, ProxyConfig, Residence};
use crate::store::LogBound;
use crate::store::binding::SessionBinding;

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Address clients connect to (the URL to put in Cursor's or Claude's MCP settings).
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// A file or directory whose changes restart the server (repeatable; directories are
    /// watched recursively, without .git, node_modules, target, __pycache__ and virtualenvs).
    #[arg(long)]
    watch: Vec<PathBuf>,
    #[command(flatten)]
    redis: RedisArgs,
    /// Key of the credential fingerprints (with Redis, shared with the cluster's proxies).
    #[arg(long, env = env::FINGERPRINT_KEY, hide_env_values = true)]
    fingerprint_key: Option<String>,
    /// Address of the proxy's /metrics and /sessions (an ephemeral loopback port by default).
    #[arg(long, default_value = "127.0.0.1:0")]
    admin_addr: SocketAddr,
    /// How long a request waits for a restarting server, and a stop waits for the calls it
    /// runs.
    #[arg(long, default_value_t = 60)]
    hold_seconds: u64,
    /// How long the server has to exit after SIGTERM (then SIGKILL).
    #[arg(long, default_value_t = 10)]
    stop_timeout: u64,
    /// The MCP server: a command and its arguments, after `--`. It listens on the port given in
    /// the environment variable PORT, or where `{port}` stands in its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// A loopback port nobody listens on right now, for the child.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let ttl = crate::store::DEFAULT_TTL;
    let store = open_store(&args.redis, ttl).await?;
    let key = fingerprint_key(args.fingerprint_key.as_deref(), &args.redis);
    let port = free_port()?;
    let hold = Duration::from_secs(args.hold_seconds);
    let serving_threads = crate::serve::serving_threads(0);
    let upstream = format!("http://127.0.0.1:{port}")
        .parse()
        .context("upstream URL")?;
    let config = ProxyConfig {
        listen: args.listen,
        upstream: Backends::fixed(&upstream, serving_threads),
        admin: args.admin_addr,
        pod_name: None,
        advertise: None,
        drain_timeout: hold,
        // One server, restarted in place: nothing to wait for, a replay is all there is.
        residence: Residence::Moves,
        hold,
        touch_interval: Duration::from_secs(10),
        max_body_bytes: 4 * 1024 * 1024,
        session_ttl: ttl,
        event_log: LogBound::DEFAULT,
        write_back_interval: Duration::from_secs(30),
        // One developer's clients on a laptop: no limit on new identities.
        admission: AdmissionLimits {
            new_identities_per_minute: None,
            ..AdmissionLimits::DEFAULT
        },
        // dev quiesces in process; its admin port lists no sessions without a token.
        drain_token: std::env::var(env::DRAIN_TOKEN).ok(),
        // A laptop's server: pages of localhost only, as the SDKs' own default.
        allowed_origins: AllowedOrigins::Local,
        limits: crate::serve::Limits::default(),
        max_initialize_bytes: 64 * 1024,
        serving_threads,
    };
    let proxy = Proxy::new(
        config,
        store,
        Fingerprinter::new(&key, SessionBinding::Identity).context("fingerprint key")?,
    );
    let (stop, stopped) = watch::channel(false);
    let signal = tokio::spawn(async move {
        super::shutdown_signal().await;
        let _ = stop.send(true);
    });
    let on_stop = |mut stopped: watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    tracing::info!(listen = %args.listen, command = %args.command.join(" "), port, "dev: the MCP server runs behind the session proxy");
    let serving = tokio::spawn(proxy::run(proxy.clone(), on_stop(stopped.clone())));
    let supervised = dev::supervise(
        proxy,
        DevConfig {
            command: args.command,
            port,
            watch: args.watch,
            stop_timeout: Duration::from_secs(args.stop_timeout),
            start_timeout: hold,
        },
        on_stop(stopped),
    )
    .await;
    signal.abort();
    supervised.context("dev")?;
    serving
        .await
        .context("the session proxy task")?
        .context("the session proxy failed")
}
