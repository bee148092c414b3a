//! `hold`: beside a backend in gateway mode under drain strategy `Wait`, keeps the stopping pod
//! alive for its sessions (see [`crate::hold`]).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use super::proxy::connect_redis;
use super::sessions::RedisArgs;
use crate::api::contract::{DEFAULT_MAX_WAIT, env};
use crate::hold::{self, Hold, HoldConfig};
use crate::serve::ListenerMetrics;
use crate::store::DEFAULT_TTL;

#[derive(Debug, Args)]
pub struct HoldArgs {
    /// Address of /healthz and /hold (the backend containers' preStop hook).
    #[arg(long, default_value = "127.0.0.1:8091")]
    pub(super) admin_addr: SocketAddr,
    #[command(flatten)]
    redis: RedisArgs,
    /// This pod's name: the owner the store names for the sessions the hold waits for.
    #[arg(long, env = env::POD_NAME)]
    pub(super) pod_name: String,
    /// How long the pod is held for its sessions at most; those still open then stop with the
    /// pod, and are lost (a gateway answers each 404 and counts it, or the operator once the
    /// pod is gone).
    #[arg(long, default_value_t = DEFAULT_MAX_WAIT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(super) max_wait_seconds: u64,
    /// The token /hold requires in `X-Mcp-Drain-Token` (the webhook injects one per pod);
    /// without it /hold answers nobody.
    #[arg(long, env = env::DRAIN_TOKEN, hide_env_values = true)]
    drain_token: Option<String>,
}

pub async fn run(args: HoldArgs) -> anyhow::Result<()> {
    // The store's TTL is not the hold's to set: it only reads sessions.
    let store = connect_redis(&args.redis, DEFAULT_TTL).await?;
    let config = HoldConfig {
        pod: args.pod_name,
        max_wait: Duration::from_secs(args.max_wait_seconds),
        drain_token: args.drain_token.filter(|token| !token.is_empty()),
    };
    let listener = hold::listen(args.admin_addr).await?;
    tracing::info!(address = %args.admin_addr, pod = %config.pod, "holding for the pod's sessions on its preStop hook");
    let hold = Hold::new(config, std::sync::Arc::new(store));
    let connections = ListenerMetrics::default().of("admin");
    hold::serve(hold, listener, connections, super::shutdown_signal()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use serde_json::json;

    use crate::api::McpSessionPolicy;
    use crate::api::contract::env;
    use crate::cli::{Cli, Command};
    use crate::webhook::{InjectorConfig, hold_container};

    /// The contract between the webhook and the CLI: the hold the webhook injects parses with
    /// the CLI's own parser to what the policy says, and reads every variable it is given.
    #[test]
    fn the_injected_hold_is_the_cli_s_hold() {
        let policy: McpSessionPolicy = serde_json::from_value(json!({
            "apiVersion": "mcpsession.dev/v1alpha1", "kind": "McpSessionPolicy",
            "metadata": {"name": "api", "namespace": "apps"},
            "spec": {"selector": {"matchLabels": {"app": "api"}},
                     "redis": {"urlSecretRef": {"name": "redis", "key": "url"}, "cluster": true, "keyPrefix": "team:"},
                     "drain": {"strategy": "Wait", "maxWaitSeconds": 900},
                     "gateway": {"enabled": true}}
        }))
        .expect("policy");
        let config = InjectorConfig {
            admin_port: 9001,
            ..InjectorConfig::default()
        };
        let container = hold_container(&policy, &config, "token", None);
        let args = container["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(|a| a.as_str())
            .map(|a| a.replace("$(POD_NAME)", "api-7d9f-abcde"));
        let cli =
            Cli::try_parse_from(std::iter::once("mcp-session-operator".to_owned()).chain(args))
                .unwrap_or_else(|e| panic!("the hold's command line does not parse: {e}"));
        let Command::Hold(parsed) = cli.command else {
            panic!("not the hold");
        };
        assert_eq!(parsed.admin_addr, "0.0.0.0:9001".parse().unwrap());
        assert_eq!(parsed.pod_name, "api-7d9f-abcde");
        assert_eq!(parsed.max_wait_seconds, 900);
        assert_eq!(parsed.redis.key_prefix, "team:");
        let read = [
            env::POD_NAME,
            env::LOG_FORMAT,
            env::LOG_FILTER,
            env::REDIS_URL,
            env::REDIS_CLUSTER,
            env::DRAIN_TOKEN,
        ];
        for variable in container["env"].as_array().expect("env") {
            let name = variable["name"].as_str().expect("a name");
            assert!(read.contains(&name), "the hold does not read {name}");
        }
    }
}
