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

use crate::controller::{self, leader::LeaderElection};
use crate::metrics::Metrics;
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
    /// Leader lease duration: a standby takes over this long after the leader dies.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    lease_seconds: u64,
    /// Watch policies, pods and secrets of this namespace only (a namespaced install).
    #[arg(long, env = "MCP_SESSION_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Reconcile without leader election (one replica only).
    #[arg(long)]
    no_leader_election: bool,
    #[command(flatten)]
    webhook: WebhookArgs,
}

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
    /// Image of the session proxy: the injected one and the gateways (default: this version of
    /// the operator's image).
    #[arg(long, env = "MCP_SESSION_PROXY_IMAGE")]
    proxy_image: Option<String>,
    /// Admin port of the injected proxy and the gateways (health, drain, metrics).
    #[arg(long, default_value_t = 8091, value_parser = clap::value_parser!(i32).range(1..65536))]
    proxy_admin_port: i32,
    /// How to inject: a native sidecar (Kubernetes >= 1.29), a classic one, or by the server's version.
    #[arg(long, value_enum, default_value_t = SidecarMode::Auto)]
    sidecar: SidecarMode,
    /// Give each policy's injected pods a NetworkPolicy: the proxy's port open to all, its admin
    /// port only to --metrics-namespace, the backend's own port to none.
    #[arg(long)]
    network_policies: bool,
    /// A namespace (by name) whose pods may reach the injected proxies' admin port, for
    /// Prometheus; repeatable.
    #[arg(long = "metrics-namespace", requires = "network_policies")]
    metrics_namespaces: Vec<String>,
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
        let defaults = webhook::InjectorConfig::default();
        webhook::WebhookConfig {
            address: self.webhook_addr,
            endpoint,
            namespace: namespace.to_owned(),
            tls,
            injector: webhook::InjectorConfig {
                image: self.proxy_image.clone().unwrap_or(defaults.image),
                admin_port: self.proxy_admin_port,
                native_sidecar,
                ..defaults
            },
            refresh_every: Duration::from_secs(self.webhook_refresh_seconds),
            identity: identity.to_owned(),
        }
    }
}

#[derive(Clone)]
struct Health {
    metrics: Arc<Metrics>,
    leading: Arc<AtomicBool>,
    synced: Arc<AtomicBool>,
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
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
    // Every replica serves the webhooks, leader or not. If they fail, the process exits.
    let mut webhooks: tokio::task::JoinHandle<Result<(), webhook::WebhookError>> =
        if args.webhook.no_webhook {
            tokio::spawn(std::future::pending())
        } else {
            let config = args
                .webhook
                .config(&client, &args.namespace, &identity)
                .await;
            // Served until the process exits: also while the controller drains.
            tokio::spawn(webhook::run(
                client.clone(),
                config,
                health.metrics.clone(),
                std::future::pending(),
            ))
        };
    let election = (!args.no_leader_election).then(|| {
        LeaderElection::new(
            client.clone(),
            &args.namespace,
            LEASE_NAME,
            &identity,
            Duration::from_secs(args.lease_seconds),
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
    let config = controller::Config {
        requeue: Duration::from_secs(args.requeue_seconds),
        max_backoff: Duration::from_secs(args.max_backoff_seconds),
        identity,
        namespace: args.watch_namespace.clone(),
        deletion_cost_interval: Duration::from_secs(args.deletion_cost_interval_seconds),
        prune_interval: Duration::from_secs(args.prune_interval_seconds),
        gateway: controller::gateway::Settings {
            image: args
                .webhook
                .proxy_image
                .clone()
                .unwrap_or_else(|| webhook::InjectorConfig::default().image),
            admin_port: args.webhook.proxy_admin_port,
        },
        network_policies: args.webhook.network_policies.then(|| {
            controller::network_policy::Settings {
                admin_port: args.webhook.proxy_admin_port,
                metrics_from: args.webhook.metrics_namespaces.clone(),
            }
        }),
        ..Default::default()
    };
    let (lost, lost_rx) = watch::channel(false);
    let until = {
        let (stopped, lost_rx) = (stopped.clone(), lost_rx.clone());
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
    match &election {
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
                result = &mut webhooks => return webhook_ended(result),
            }
        }
        None => tokio::select! {
            () = controller => {}
            result = &mut webhooks => return webhook_ended(result),
        },
    }
    health.leading.store(false, Ordering::SeqCst);
    if *lost_rx.borrow() {
        anyhow::bail!("lost the leader lease; exiting so that a restart rejoins as a standby");
    }
    if let Some(election) = &election {
        election.release().await;
    }
    Ok(())
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
