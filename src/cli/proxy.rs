//! `proxy`: the session proxy in front of one MCP server.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use tracing::warn;

use super::UsageError;
use super::sessions::RedisArgs;
use crate::api::DrainStrategy;
use crate::api::contract::{DEFAULT_MAX_WAIT, env};
use crate::proxy::{
    self, AdmissionLimits, AllowedOrigins, Backends, Fingerprinter, OnOwnerLost, Proxy,
    ProxyConfig, Residence,
};
use crate::store::binding::SessionBinding;
use crate::store::redis::LazyRedisStore;
use crate::store::{LogBound, MemoryStore, SessionStore};

/// Used when no key is configured: fingerprints still bind sessions to credentials, but anyone
/// who knows this constant can test guesses of low-entropy credentials against stored ones.
const DEFAULT_FINGERPRINT_KEY: &[u8] = b"mcp-session-operator default fingerprint key";

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// The MCP server, `http://host:port` (requests keep their path).
    #[arg(long, value_parser = parse_upstream)]
    upstream: axum::http::Uri,
    #[command(flatten)]
    serving: ServingArgs,
}

/// How a session proxy serves, whatever its upstream: the sidecar's (`proxy`) and the
/// gateway's (`gateway`) options.
#[derive(Debug, Args)]
pub struct ServingArgs {
    /// Address clients connect to.
    #[arg(long)]
    pub(super) listen: SocketAddr,
    #[command(flatten)]
    redis: RedisArgs,
    /// Address of /healthz, /readyz, /drain, /metrics and /sessions.
    #[arg(long, default_value = "127.0.0.1:8091")]
    pub(super) admin_addr: SocketAddr,
    /// This pod's name: the owner recorded for its sessions.
    #[arg(long, env = env::POD_NAME)]
    pub(super) pod_name: Option<String>,
    /// This pod's IP: with the listen port, where the policy's other proxies reach this one
    /// (`--drain-strategy wait` forwards a session's requests to the proxy that owns it).
    #[arg(long, env = env::POD_IP)]
    pod_ip: Option<IpAddr>,
    /// How long a drain waits for in-flight requests.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    /// What a stopping proxy does with its sessions: `move` (each is replayed on another pod)
    /// or `wait` (each stays here until it ends; requests that reach another pod's proxy are
    /// forwarded here), for servers that keep a session's state in memory. A gateway under
    /// `wait` pins each session to its backend pod, which serves it while it terminates.
    #[arg(long, value_enum, default_value_t = DrainStrategy::Move)]
    pub(super) drain_strategy: DrainStrategy,
    /// Under `--drain-strategy wait`: how long a stopping proxy serves its sessions at most;
    /// those still open then are lost (answered 404, and counted).
    #[arg(long, default_value_t = DEFAULT_MAX_WAIT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=86_400))]
    max_wait_seconds: u64,
    /// Under `--drain-strategy wait`: what a session whose pod is gone becomes: `fail`
    /// (answered 404 and counted as lost, so that its client starts a new one knowingly) or
    /// `replay` (replayed on another pod, its server-side state gone).
    #[arg(long, value_enum, default_value_t = OnOwnerLost::Fail)]
    pub(super) on_owner_lost: OnOwnerLost,
    /// How long a request is held while the MCP server is down, before the client gets an error.
    #[arg(long, default_value_t = 30)]
    hold_seconds: u64,
    /// Sliding session TTL.
    #[arg(long, default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    ttl_seconds: u64,
    /// A session's TTL is written at most this often.
    #[arg(long, default_value_t = 10)]
    touch_interval_seconds: u64,
    /// Key of the credential fingerprints; the same for every proxy of a deployment.
    #[arg(long, env = env::FINGERPRINT_KEY, hide_env_values = true)]
    fingerprint_key: Option<String>,
    /// What a session is bound to: `identity` (a bearer JWT's issuer and subject, so a
    /// refreshed token keeps the session; other credentials as a whole), `credential` (the
    /// Authorization header as a whole) or `none`.
    #[arg(long, value_enum, default_value_t = SessionBinding::Identity)]
    binding: SessionBinding,
    /// The token /drain, /retire and /sessions require in `X-Mcp-Drain-Token` (the webhook
    /// injects one per pod); without it they answer nobody.
    #[arg(long, env = env::DRAIN_TOKEN, hide_env_values = true)]
    drain_token: Option<String>,
    /// A web page origin (`scheme://host[:port]`, `null` or `*`) that may send requests;
    /// repeat it, or separate them with commas. Requests without `Origin` (clients that are
    /// not browsers) always pass. Default: pages of localhost, 127.0.0.1 and [::1] only.
    #[arg(
        long = "allowed-origin",
        env = env::ALLOWED_ORIGINS,
        value_delimiter = ',',
        value_parser = parse_origin
    )]
    allowed_origins: Vec<String>,
    /// How long a client may take to send a request's head, and how long its connection may
    /// idle between requests.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    header_timeout_seconds: u64,
    /// How long a client may take to send a request's body.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    body_timeout_seconds: u64,
    /// Client connections open at once; more are closed as they come (and counted).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Largest `initialize` params a session may keep (they are stored with it and replayed to
    /// a new server); a larger `initialize` is refused with a JSON-RPC error.
    #[arg(long, default_value_t = 64 * 1024)]
    max_initialize_bytes: usize,
    /// Largest request body accepted.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    max_body_bytes: usize,
    /// SSE events kept per session for `Last-Event-ID` resumption.
    #[arg(long, default_value_t = LogBound::DEFAULT.events as u64, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    event_log_size: u64,
    /// Bytes of SSE events kept per session for resumption (an event larger than this is not
    /// kept: a stream cut during it cannot resume past it).
    #[arg(long, default_value_t = LogBound::DEFAULT.bytes as u64, value_parser = clap::value_parser!(u64).range(1024..))]
    event_log_bytes: u64,
    /// Sessions one credential (one Authorization header; requests without one count as one
    /// credential) may hold in this proxy.
    #[arg(long, default_value_t = AdmissionLimits::DEFAULT.per_credential as u64, value_parser = clap::value_parser!(u64).range(1..))]
    max_sessions_per_credential: u64,
    /// Sessions this proxy may hold in all; a new one beyond gets 429 with `Retry-After`.
    #[arg(long, default_value_t = AdmissionLimits::DEFAULT.sessions as u64, value_parser = clap::value_parser!(u64).range(1..))]
    max_sessions: u64,
    /// Identities (as `--binding` sees them) that hold no session here yet, admitted per minute,
    /// in bursts of up to a tenth of it; beyond, 429 with `Retry-After`. 0: no limit.
    #[arg(long, default_value_t = crate::api::contract::admission::NEW_IDENTITIES_PER_MINUTE)]
    max_new_identities_per_minute: u32,
    /// How often to check that the store keeps sessions (Redis's eviction policy and
    /// evictions), and, on one that may evict them, to write back those it lost.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    write_back_interval_seconds: u64,
    /// Threads that serve client connections, each connection on one of them; 0: one per CPU
    /// the process may use, at most 4.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=64))]
    serving_threads: u16,
}

fn parse_origin(raw: &str) -> Result<String, String> {
    AllowedOrigins::parse(&[raw])
        .map(|_| raw.to_owned())
        .map_err(|e| e.to_string())
}

fn parse_upstream(raw: &str) -> Result<axum::http::Uri, String> {
    let uri: axum::http::Uri = raw.parse().map_err(|e| format!("{e}"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err("the upstream is http://HOST:PORT".into());
    }
    Ok(uri)
}

pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    let upstream = Backends::fixed(&args.upstream, args.serving.serving_threads());
    let proxy = args.serving.proxy(upstream).await?;
    proxy::run(proxy, super::shutdown_signal())
        .await
        .context("the session proxy failed")
}

impl ServingArgs {
    /// Threads that serve client connections (and keep upstream connections of their own).
    pub(super) fn serving_threads(&self) -> usize {
        crate::serve::serving_threads(usize::from(self.serving_threads))
    }

    /// The proxy these options describe, in front of `upstream`.
    pub(super) async fn proxy(self, upstream: Arc<Backends>) -> anyhow::Result<Arc<Proxy>> {
        let args = self;
        let ttl = Duration::from_secs(args.ttl_seconds);
        let store = open_store(&args.redis, ttl).await?;
        let key = fingerprint_key(args.fingerprint_key.as_deref(), &args.redis);
        let config = ProxyConfig {
            listen: args.listen,
            upstream,
            admin: args.admin_addr,
            advertise: args
                .pod_ip
                .map(|ip| SocketAddr::new(ip, args.listen.port()).to_string()),
            pod_name: args.pod_name,
            drain_timeout: Duration::from_secs(args.drain_timeout),
            residence: match args.drain_strategy {
                DrainStrategy::Move => Residence::Moves,
                DrainStrategy::Wait => Residence::Stays {
                    max_wait: Duration::from_secs(args.max_wait_seconds),
                    on_owner_lost: args.on_owner_lost,
                },
            },
            hold: Duration::from_secs(args.hold_seconds),
            touch_interval: Duration::from_secs(args.touch_interval_seconds),
            max_body_bytes: args.max_body_bytes,
            session_ttl: ttl,
            write_back_interval: Duration::from_secs(args.write_back_interval_seconds),
            event_log: LogBound {
                events: usize::try_from(args.event_log_size).unwrap_or(usize::MAX),
                bytes: usize::try_from(args.event_log_bytes).unwrap_or(usize::MAX),
            },
            admission: AdmissionLimits {
                per_credential: usize::try_from(args.max_sessions_per_credential)
                    .unwrap_or(usize::MAX),
                sessions: usize::try_from(args.max_sessions).unwrap_or(usize::MAX),
                new_identities_per_minute: Some(args.max_new_identities_per_minute)
                    .filter(|rate| *rate > 0),
            },
            drain_token: args.drain_token.filter(|token| !token.is_empty()),
            allowed_origins: AllowedOrigins::parse(&args.allowed_origins)
                .map_err(|e| UsageError(e.to_string()))?,
            limits: crate::serve::Limits {
                header_timeout: Duration::from_secs(args.header_timeout_seconds),
                body_timeout: Duration::from_secs(args.body_timeout_seconds),
                max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
            },
            max_initialize_bytes: args.max_initialize_bytes,
            serving_threads: crate::serve::serving_threads(usize::from(args.serving_threads)),
        };
        let fingerprints = Fingerprinter::new(&key, args.binding).context("fingerprint key")?;
        Ok(Proxy::new(config, store, fingerprints))
    }
}

/// The embedded store without a Redis URL, else Redis (see [`connect_redis`]).
pub(super) async fn open_store(
    redis: &RedisArgs,
    ttl: Duration,
) -> anyhow::Result<Arc<dyn SessionStore>> {
    Ok(match &redis.redis_url {
        Some(_) => Arc::new(connect_redis(redis, ttl).await?),
        None => Arc::new(MemoryStore::new(ttl)),
    })
}

/// The fingerprint key: the configured one; with Redis and none configured, the built-in
/// default (with a warning: every deployment should have its own); with the embedded store, a
/// random one (sessions live and die with this process, and so does the key).
pub(super) fn fingerprint_key(configured: Option<&str>, redis: &RedisArgs) -> Vec<u8> {
    match (configured, &redis.redis_url) {
        (Some(key), _) => key.as_bytes().to_vec(),
        (None, Some(_)) => {
            warn!(
                "MCP_SESSION_FINGERPRINT_KEY is not set: using the built-in default key; set one per deployment"
            );
            DEFAULT_FINGERPRINT_KEY.to_vec()
        }
        (None, None) => rand::random::<[u8; 32]>().to_vec(),
    }
}

/// Redis for the proxy: if it is down now, the proxy starts all the same and connects when it
/// answers (sessions live in the proxy's memory meanwhile, and are written then).
pub(super) async fn connect_redis(
    args: &RedisArgs,
    ttl: Duration,
) -> anyhow::Result<LazyRedisStore> {
    let target = args.target()?;
    crate::store::redis::Keys::new(&args.key_prefix).map_err(|e| UsageError(e.to_string()))?;
    Ok(LazyRedisStore::new(target, &args.key_prefix, ttl).await?)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};
    use serde_json::json;

    use super::*;
    use crate::api::McpSessionPolicy;
    use crate::cli::{Cli, Command};
    use crate::webhook::{InjectorConfig, proxy_container};

    /// The contract between the webhook and the CLI: the proxy the webhook injects, with every
    /// option a policy can set, parses with the CLI's own parser to what the policy says, and
    /// every environment variable it sets is one the proxy reads.
    #[test]
    fn the_injected_command_line_is_the_cli_s_proxy() {
        let policy: McpSessionPolicy = serde_json::from_value(json!({
            "apiVersion": "mcpsession.dev/v1alpha1", "kind": "McpSessionPolicy",
            "metadata": {"name": "api", "namespace": "apps"},
            "spec": {"selector": {"matchLabels": {"app": "api"}},
                     "redis": {"urlSecretRef": {"name": "redis", "key": "url"}, "cluster": true, "keyPrefix": "team:"},
                     "ttlSeconds": 7200, "binding": "Credential",
                     "drain": {"timeoutSeconds": 45, "strategy": "Wait", "maxWaitSeconds": 900, "onOwnerLost": "Replay"},
                     "injection": {"proxyPort": 9000, "upstreamPort": 3000, "allowedOrigins": ["https://app.example.com"]}}
        }))
        .expect("policy");
        let config = InjectorConfig {
            admin_port: 9001,
            ..InjectorConfig::default()
        };
        let container = proxy_container(&policy, &config, "token", None);
        let args: Vec<String> = container["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| {
                a.as_str()
                    .expect("a string")
                    .replace("$(POD_NAME)", "api-0")
            })
            .collect();
        let cli =
            Cli::try_parse_from(std::iter::once("mcp-session-operator".to_owned()).chain(args))
                .unwrap_or_else(|e| panic!("the injected command line does not parse: {e}"));
        let Command::Proxy(parsed) = cli.command else {
            panic!("not the proxy");
        };
        assert_eq!(parsed.serving.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(parsed.upstream, "http://127.0.0.1:3000");
        assert_eq!(parsed.serving.admin_addr, "0.0.0.0:9001".parse().unwrap());
        assert_eq!(parsed.serving.pod_name.as_deref(), Some("api-0"));
        assert_eq!(parsed.serving.drain_timeout, 45);
        assert_eq!(parsed.serving.drain_strategy, DrainStrategy::Wait);
        assert_eq!(parsed.serving.max_wait_seconds, 900);
        assert_eq!(parsed.serving.on_owner_lost, OnOwnerLost::Replay);
        assert_eq!(parsed.serving.binding, SessionBinding::Credential);
        assert_eq!(parsed.serving.redis.key_prefix, "team:");
        assert_eq!(parsed.serving.ttl_seconds, 7200);

        let cli = Cli::command();
        let proxy = cli.find_subcommand("proxy").expect("the proxy subcommand");
        let mut read: Vec<String> = proxy
            .get_arguments()
            .chain(cli.get_arguments().filter(|arg| arg.is_global_set()))
            .filter_map(|arg| arg.get_env())
            .map(|name| name.to_string_lossy().into_owned())
            .collect();
        // Read by the logging's set-up, not by an option.
        read.push(env::LOG_FILTER.to_owned());
        let set: Vec<&str> = container["env"]
            .as_array()
            .expect("env")
            .iter()
            .filter_map(|e| e["name"].as_str())
            .collect();
        for name in &set {
            assert!(
                read.iter().any(|r| r == name),
                "{name} is set but not read: {read:?}"
            );
        }
        for name in [
            env::REDIS_URL,
            env::REDIS_CLUSTER,
            env::FINGERPRINT_KEY,
            env::DRAIN_TOKEN,
            env::ALLOWED_ORIGINS,
        ] {
            assert!(set.contains(&name), "{name} is not set: {set:?}");
        }
        let origins = container["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == env::ALLOWED_ORIGINS)
            .and_then(|e| e["value"].as_str())
            .expect("origins");
        assert!(parse_origin(origins).is_ok(), "{origins}");
    }
}
