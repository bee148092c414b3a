//! `gateway`: the session proxy in front of a policy's pods, as a Deployment of its own (see
//! [`crate::gateway`]).

use anyhow::Context as _;
use clap::Args;

use super::proxy::ServingArgs;
use crate::api::{DrainStrategy, OnOwnerLost};
use crate::gateway::{self, PolicyRef};
use crate::proxy::{self, Backends};

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// The policy whose pods the gateway sends to, `NAMESPACE/NAME`.
    #[arg(long)]
    policy: PolicyRef,
    /// The port of the MCP server in each of the policy's pods.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    backend_port: u16,
    #[command(flatten)]
    serving: ServingArgs,
}

pub async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    if args.serving.drain_strategy == DrainStrategy::Wait
        && args.serving.on_owner_lost == OnOwnerLost::Replay
    {
        anyhow::bail!(
            "--on-owner-lost replay is for injected proxies: a gateway under --drain-strategy wait answers a session whose pod is gone 404"
        );
    }
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration")?;
    let policy = gateway::policy(&client, &args.policy).await?;
    let backends = Backends::discovered(args.serving.serving_threads());
    let proxy = args.serving.proxy(backends.clone()).await?;
    let following = tokio::spawn({
        let port = args.backend_port;
        async move { gateway::follow_pods(client, &policy, port, backends).await }
    });
    let served = proxy::run(proxy, super::shutdown_signal()).await;
    following.abort();
    served.context("the gateway failed")
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use crate::cli::{Cli, Command};
    use crate::controller::gateway::{self, tests::*};

    /// The contract between the controller and the CLI: the gateway the operator runs for a
    /// policy has a command line the CLI's own parser reads as the policy says.
    #[test]
    fn the_gateway_the_operator_runs_is_the_cli_s_gateway() {
        let objects = gateway::build(&policy(), &settings());
        let container = &find(&objects, "Deployment")["spec"]["template"]["spec"]["containers"][0];
        let args = container["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(|a| a.as_str())
            .map(|a| a.replace("$(POD_NAME)", "api-gateway-0"));
        let cli =
            Cli::try_parse_from(std::iter::once("mcp-session-operator".to_owned()).chain(args))
                .unwrap_or_else(|e| panic!("the gateway's command line does not parse: {e}"));
        let Command::Gateway(parsed) = cli.command else {
            panic!("not the gateway");
        };
        assert_eq!(parsed.policy.to_string(), "apps/api");
        assert_eq!(parsed.backend_port, 3000);
        assert_eq!(parsed.serving.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(parsed.serving.admin_addr, "0.0.0.0:8091".parse().unwrap());
        assert_eq!(parsed.serving.pod_name.as_deref(), Some("api-gateway-0"));
    }
}
