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
        shutdown_signal().await;
        info!("shutting down");
        let _ = stop.send(true);
    });
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
        }
    }
    health.leading.store(true, Ordering::SeqCst);
    let config = controller::Config {
        requeue: Duration::from_secs(args.requeue_seconds),
        max_backoff: Duration::from_secs(args.max_backoff_seconds),
        identity,
        namespace: args.watch_namespace.clone(),
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
            }
        }
        None => controller.await,
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

async fn signalled(mut flag: watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

async fn shutdown_signal() {
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

async fn serve(listener: tokio::net::TcpListener, health: Health) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(health);
    if let Err(error) = axum::serve(listener, app).await {
        tracing::error!(%error, "metrics server failed");
    }
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
