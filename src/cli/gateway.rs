//! `gateway`: the session proxy in front of a policy's pods, as a Deployment of its own (see
//! [`crate::gateway`]).

use anyhow::Context as _;
use clap::Args;

use super::proxy::ServingArgs;
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
