//! `run`: the operator process. Elects a leader, reconciles policies while leading, and
//! serves `/metrics`, `/healthz` and `/readyz` throughout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use clap::Args;
use tokio::sync::watch;
use tracing::info;

use crate::api::contract;
use crate::controller::{self, leader::LeaderElection};
use crate::metrics::Metrics;
use crate::telemetry::LogFormat;
use crate::webhook;

const LEASE_NAME: &str = "mcp-session-operator";

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Namespace of the operator's Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// This replica's name (leader election, Events).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    #[command(flatten)]
    election: ElectionArgs,
    #[command(flatten)]
    controller: ControllerArgs,
    #[command(flatten)]
    proxy: ProxyImageArgs,
    #[command(flatten)]
    webhook: WebhookArgs,
}

/// Which replica reconciles.
#[derive(Debug, Args)]
struct ElectionArgs {
    /// Leader lease duration: a standby takes over this long after the leader dies.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    lease_seconds: u64,
    /// Reconcile without leader election (one replica only).
    #[arg(long)]
    no_leader_election: bool,
}

/// How the controller counts, retries and what it writes besides status.
#[derive(Debug, Args)]
struct ControllerArgs {
    /// Re-count every policy this often.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    requeue_seconds: u64,
    /// A selected pod's pod-deletion-cost annotation is rewritten at most this often.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    deletion_cost_interval_seconds: u64,
    /// Each store's session index is pruned (entries of expired and deleted sessions, pods with
    /// none left) at most this often.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    prune_interval_seconds: u64,
    /// Longest retry delay after failures.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    max_backoff_seconds: u64,
    /// Watch policies, pods and secrets of this namespace only (a namespaced install).
    #[arg(long, env = "MCP_SESSION_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Give each policy's injected pods a NetworkPolicy: the proxy's port open to all, its admin
    /// port only to --metrics-namespace, the backend's own port to none.
    #[arg(long)]
    network_policies: bool,
    /// A namespace (by name) whose pods may reach the injected proxies' admin port, for
    /// Prometheus; repeatable.
    #[arg(long = "metrics-namespace", requires = "network_policies")]
    metrics_namespaces: Vec<String>,
}

/// The session proxy the operator deploys: injected by the webhook, and as gateways by the
/// controller.
#[derive(Debug, Args)]
struct ProxyImageArgs {
    /// Image of the session proxy: the injected one and the gateways (default: this version of
    /// the operator's image).
    #[arg(long, env = "MCP_SESSION_PROXY_IMAGE")]
    proxy_image: Option<String>,
    /// Admin port of the injected proxy and the gateways (health, drain, metrics).
    #[arg(long, default_value_t = 8091, value_parser = clap::value_parser!(i32).range(1..65536))]
    proxy_admin_port: i32,
    /// How they log: as the operator does (the global `--log-format`, set by [`run`]).
    #[arg(skip)]
    log_format: LogFormat,
}

impl ProxyImageArgs {
    fn image(&self) -> String {
        self.proxy_image
            .clone()
            .unwrap_or_else(contract::default_image)
    }
}

/// The admission webhooks: where they are served, their certificate, how they inject.
#[derive(Debug, Args)]
struct WebhookArgs {
    /// Do not serve the admission webhooks (nor manage their configurations).
    #[arg(long)]
    no_webhook: bool,
    /// Address of the HTTPS admission webhooks.
    #[arg(long, default_value = "0.0.0.0:8443")]
    webhook_addr: SocketAddr,
    /// Base URL the apiserver calls (default: the in-cluster Service).
    #[arg(long, value_parser = parse_https_url)]
    webhook_url: Option<String>,
    /// Name of the webhook's Service in --namespace.
    #[arg(long, default_value = "mcp-session-operator-webhook")]
    webhook_service: String,
    /// Port of the webhook's Service.
    #[arg(long, default_value_t = 443)]
    webhook_service_port: i32,
    /// Serving certificate (PEM), e.g. from cert-manager; default: managed by the operator.
    #[arg(long, requires = "tls_key_file")]
    tls_cert_file: Option<std::path::PathBuf>,
    #[arg(long, requires = "tls_cert_file")]
    tls_key_file: Option<std::path::PathBuf>,
    /// CA of --tls-cert-file for the caBundle (omit when cert-manager's CA injector sets it).
    #[arg(long, requires = "tls_cert_file")]
    tls_ca_file: Option<std::path::PathBuf>,
    /// Validity of a certificate the operator issues; renewed with a third left.
    #[arg(long, default_value_t = 365 * 86_400, value_parser = clap::value_parser!(u64).range(10..))]
    webhook_cert_validity_seconds: u64,
    /// How often the certificate is checked (and its files re-read).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    webhook_refresh_seconds: u64,
    /// How to inject: a native sidecar (Kubernetes >= 1.29), a classic one, or by the server's version.
    #[arg(long, value_enum, default_value_t = SidecarMode::Auto)]
    sidecar: SidecarMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SidecarMode {
    Auto,
    Native,
    Classic,
}

fn parse_https_url(raw: &str) -> Result<String, String> {
    let url = url::Url::parse(raw).map_err(|e| e.to_string())?;
    if url.scheme() != "https" || url.host_str().is_none() {
        return Err("the apiserver calls webhooks over https://HOST[:PORT]".into());
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

impl WebhookArgs {
    async fn config(
        &self,
        client: &kube::Client,
        proxy: &ProxyImageArgs,
        namespace: &str,
        identity: &str,
    ) -> webhook::WebhookConfig {
        let endpoint = match &self.webhook_url {
            Some(url) => webhook::Endpoint::Url(url.clone()),
            None => webhook::Endpoint::Service {
                namespace: namespace.to_owned(),
                name: self.webhook_service.clone(),
                port: self.webhook_service_port,
            },
        };
        let tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => webhook::TlsSource::Files {
                cert: cert.clone(),
                key: key.clone(),
                ca: self.tls_ca_file.clone(),
            },
            _ => webhook::TlsSource::Managed {
                secret: format!("{}-tls", self.webhook_service),
                names: endpoint.certificate_names(),
                validity: Duration::from_secs(self.webhook_cert_validity_seconds),
            },
        };
        let native_sidecar = match self.sidecar {
            SidecarMode::Native => true,
            SidecarMode::Classic => false,
            SidecarMode::Auto => webhook::supports_native_sidecars(client).await,
        };
        webhook::WebhookConfig {
            address: self.webhook_addr,
            endpoint,
            namespace: namespace.to_owned(),
            tls,
            injector: webhook::InjectorConfig {
                image: proxy.image(),
                admin_port: proxy.proxy_admin_port,
                native_sidecar,
                log_format: proxy.log_format,
                ..webhook::InjectorConfig::default()
            },
            refresh_every: Duration::from_secs(self.webhook_refresh_seconds),
            identity: identity.to_owned(),
        }
    }
}

impl ControllerArgs {
    fn config(&self, proxy: &ProxyImageArgs, identity: String) -> controller::Config {
        controller::Config {
            requeue: Duration::from_secs(self.requeue_seconds),
            max_backoff: Duration::from_secs(self.max_backoff_seconds),
            identity,
            namespace: self.watch_namespace.clone(),
            deletion_cost_interval: Duration::from_secs(self.deletion_cost_interval_seconds),
            prune_interval: Duration::from_secs(self.prune_interval_seconds),
            gateway: controller::gateway::Settings {
                image: proxy.image(),
                admin_port: proxy.proxy_admin_port,
                log_format: proxy.log_format,
            },
            network_policies: self
                .network_policies
                .then(|| controller::network_policy::Settings {
                    admin_port: proxy.proxy_admin_port,
                    metrics_from: self.metrics_namespaces.clone(),
                }),
            ..Default::default()
        }
    }
}

#[derive(Clone)]
struct Health {
    metrics: Arc<Metrics>,
    leading: Arc<AtomicBool>,
    synced: Arc<AtomicBool>,
}

/// The admission webhooks, served until the process exits (also while the controller drains);
/// a task that ends only if they fail.
type Webhooks = tokio::task::JoinHandle<Result<(), webhook::WebhookError>>;

/// Runs the operator; the proxies it injects and runs log in its own `log_format`.
pub async fn run(mut args: RunArgs, log_format: LogFormat) -> anyhow::Result<()> {
    args.proxy.log_format = log_format;
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let client = kube::Client::try_default()
        .await
        .context("cannot build a Kubernetes client (KUBECONFIG or in-cluster)")?;
    let health = Health {
        metrics: Arc::new(Metrics::default()),
        leading: Arc::new(AtomicBool::new(false)),
        synced: Arc::new(AtomicBool::new(false)),
    };
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_addr))?;
    info!(address = %args.metrics_addr, "serving /metrics, /healthz, /readyz");
    tokio::spawn(serve(listener, health.clone()));

    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        super::shutdown_signal().await;
        info!("shutting down");
        let _ = stop.send(true);
    });
    let mut webhooks = start_webhooks(&args, &client, &health, &identity).await;
    let election = (!args.election.no_leader_election).then(|| {
        LeaderElection::new(
            client.clone(),
            &args.namespace,
            LEASE_NAME,
            &identity,
            Duration::from_secs(args.election.lease_seconds),
        )
    });
    if let Some(election) = &election {
        tokio::select! {
            () = election.acquire() => {}
            () = signalled(stopped.clone()) => return Ok(()),
            result = &mut webhooks => return webhook_ended(result),
        }
    }
    health.leading.store(true, Ordering::SeqCst);
    let config = args.controller.config(&args.proxy, identity);
    let lost_lease = Leader {
        client,
        health: &health,
        election: election.as_ref(),
    }
    .lead(config, stopped, webhooks)
    .await?;
    health.leading.store(false, Ordering::SeqCst);
    if lost_lease {
        anyhow::bail!("lost the leader lease; exiting so that a restart rejoins as a standby");
    }
    if let Some(election) = &election {
        election.release().await;
    }
    Ok(())
}

/// Every replica serves the webhooks, leader or not; with --no-webhook, a task that never ends.
async fn start_webhooks(
    args: &RunArgs,
    client: &kube::Client,
    health: &Health,
    identity: &str,
) -> Webhooks {
    if args.webhook.no_webhook {
        return tokio::spawn(std::future::pending());
    }
    let config = args
        .webhook
        .config(client, &args.proxy, &args.namespace, identity)
        .await;
    tokio::spawn(webhook::run(
        client.clone(),
        config,
        health.metrics.clone(),
        std::future::pending(),
    ))
}

/// The replica that leads: its client, its health, and its lease (none without election).
struct Leader<'a> {
    client: kube::Client,
    health: &'a Health,
    election: Option<&'a LeaderElection>,
}

impl Leader<'_> {
    /// Reconciles until a signal, the loss of the lease (then `true`: the caller exits), or
    /// the webhooks failing (an error).
    async fn lead(
        self,
        config: controller::Config,
        stopped: watch::Receiver<bool>,
        mut webhooks: Webhooks,
    ) -> anyhow::Result<bool> {
        let Self {
            client,
            health,
            election,
        } = self;
        let (lost, lost_rx) = watch::channel(false);
        let until = {
            let lost_rx = lost_rx.clone();
            async move {
                tokio::select! {
                    () = signalled(stopped) => {}
                    () = signalled(lost_rx) => {}
                }
            }
        };
        let controller = controller::run(
            client,
            health.metrics.clone(),
            config,
            health.synced.clone(),
            until,
        );
        match election {
            Some(election) => {
                let holding = async {
                    election.hold().await;
                    let _ = lost.send(true);
                    // Keep this branch pending: the controller drains its reconciles, then ends.
                    std::future::pending::<()>().await;
                };
                tokio::select! {
                    () = controller => {}
                    () = holding => {}
                    result = &mut webhooks => return webhook_ended(result).map(|()| false),
                }
            }
            None => tokio::select! {
                () = controller => {}
                result = &mut webhooks => return webhook_ended(result).map(|()| false),
            },
        }
        let lost_lease = *lost_rx.borrow();
        Ok(lost_lease)
    }
}

fn webhook_ended(
    result: Result<Result<(), webhook::WebhookError>, tokio::task::JoinError>,
) -> anyhow::Result<()> {
    match result {
        Ok(Ok(())) => Err(anyhow::anyhow!("the admission webhooks stopped")),
        Ok(Err(error)) => Err(anyhow::Error::new(error).context("the admission webhooks failed")),
        Err(error) => Err(anyhow::anyhow!("the admission webhooks panicked: {error}")),
    }
}

async fn signalled(mut flag: watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

async fn serve(listener: tokio::net::TcpListener, health: Health) {
    let connections = health.metrics.listeners.of("metrics");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health);
    crate::serve::serve_probes(listener, app, connections).await;
}

async fn metrics(State(health): State<Health>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.metrics.encode(),
    )
}

/// A standby is ready (it will serve webhooks); the leader once its stores synced.
async fn readyz(State(health): State<Health>) -> (StatusCode, &'static str) {
    match (
        health.leading.load(Ordering::SeqCst),
        health.synced.load(Ordering::SeqCst),
    ) {
        (false, _) => (StatusCode::OK, "ok: standby"),
        (true, true) => (StatusCode::OK, "ok: leader"),
        (true, false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "leader, stores not synced yet",
        ),
    }
}
