//! The admission webhooks, served by `run` over HTTPS in every replica: a mutating webhook that
//! injects the session proxy into selected pods, and a validating webhook for policies.

mod admission;
mod configuration;
mod inject;
mod server;
mod tls;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, ResourceExt as _};
use tracing::{info, warn};

use self::admission::Exclusions;
pub use self::admission::{ReviewError, decode, overlap};
pub use self::configuration::{Endpoint, MUTATE_PATH, NAME as CONFIGURATION_NAME, VALIDATE_PATH};
pub use self::inject::{Injection, InjectorConfig, inject};
#[cfg(test)]
pub(crate) use self::inject::{hold_container, proxy_container};
pub use self::tls::{CertResolver, TlsSource};
use crate::api::McpSessionPolicy;
use crate::events::{PolicyEvents, Transition};
use crate::metrics::Metrics;

/// Largest AdmissionReview accepted (the apiserver's own request limit).
const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook TLS: {0}")]
    Tls(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub address: std::net::SocketAddr,
    pub endpoint: Endpoint,
    /// The operator's namespace: its certificate Secret, and excluded from injection.
    pub namespace: String,
    pub tls: TlsSource,
    pub injector: InjectorConfig,
    /// How often the certificate is checked for renewal (and files for changes).
    pub refresh_every: Duration,
    /// This replica's name, for Events.
    pub identity: String,
}

#[derive(Clone)]
struct AppState {
    client: Client,
    policies: Store<McpSessionPolicy>,
    injector: Arc<InjectorConfig>,
    exclusions: Arc<Exclusions>,
    metrics: Arc<Metrics>,
    events: PolicyEvents,
}

/// The native-sidecar form needs Kubernetes ≥ 1.29 (SidecarContainers on by default).
pub async fn supports_native_sidecars(client: &Client) -> bool {
    match client.apiserver_version().await {
        Ok(info) => {
            let minor: u32 = info.minor.trim_end_matches('+').parse().unwrap_or(0);
            info.major == "1" && minor >= 29
        }
        Err(error) => {
            warn!(%error, "cannot read the apiserver version; injecting classic sidecars");
            false
        }
    }
}

/// Serves the webhooks until `shutdown` resolves, keeping the certificate and the webhook
/// configurations current.
pub async fn run(
    client: Client,
    config: WebhookConfig,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), WebhookError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
    let resolver = Arc::new(CertResolver::default());
    // A certificate before the first connection; the loop below keeps it fresh.
    let mut ca_bundle = tls::refresh(&config.tls, &secrets, &resolver).await?;
    // Bound before the configurations point the apiserver here: with `failurePolicy: Fail`
    // a configuration that names a port nobody listens on yet refuses every admission.
    let listener = tokio::net::TcpListener::bind(config.address)
        .await
        .map_err(|source| WebhookError::Listen {
            address: config.address,
            source,
        })?;
    configuration::apply(
        &client,
        &config.endpoint,
        ca_bundle.as_deref(),
        &config.namespace,
    )
    .await?;
    info!(endpoint = ?config.endpoint, "webhook configurations applied");

    let (policies, writer) = reflector::store();
    let policy_watch = watcher(
        Api::<McpSessionPolicy>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .for_each(|_| async {});
    tokio::spawn(policy_watch);

    let connections = metrics.listeners.of("webhook");
    let state = AppState {
        client: client.clone(),
        policies,
        injector: Arc::new(config.injector.clone()),
        exclusions: Arc::new(Exclusions {
            namespaces: vec!["kube-system".into(), config.namespace.clone()],
        }),
        metrics,
        events: PolicyEvents::new(client.clone(), &config.identity),
    };
    let app = Router::new()
        .route(MUTATE_PATH, post(mutate))
        .route(VALIDATE_PATH, post(validate))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state);
    info!(address = %config.address, "serving admission webhooks over HTTPS");

    let refresher = {
        let (client, resolver, config) = (client.clone(), resolver.clone(), config.clone());
        async move {
            loop {
                tokio::time::sleep(config.refresh_every).await;
                match tls::refresh(&config.tls, &secrets, &resolver).await {
                    Ok(bundle) if bundle != ca_bundle => {
                        match configuration::apply(
                            &client,
                            &config.endpoint,
                            bundle.as_deref(),
                            &config.namespace,
                        )
                        .await
                        {
                            Ok(()) => ca_bundle = bundle,
                            Err(error) => warn!(%error, "cannot update the webhook configurations"),
                        }
                    }
                    Ok(_) => {}
                    Err(error) => warn!(%error, "cannot refresh the webhook certificate"),
                }
            }
        }
    };
    tokio::select! {
        () = server::serve(listener, resolver, app, connections, shutdown) => {}
        () = refresher => {}
    }
    Ok(())
}

fn review_response(
    result: Result<kube::core::admission::AdmissionReview<kube::core::DynamicObject>, ReviewError>,
) -> Response {
    match result {
        Ok(review) => (StatusCode::OK, axum::Json(review)).into_response(),
        Err(error) => {
            warn!(%error, "refusing a request that is no usable AdmissionReview");
            (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({"error": error.to_string()})),
            )
                .into_response()
        }
    }
}

async fn mutate(State(state): State<AppState>, body: Bytes) -> Response {
    let started = Instant::now();
    let result = match decode(&body) {
        Ok(request) => Ok(mutate_and_key(&state, &request).await.into_review()),
        Err(error) => Err(error),
    };
    state
        .metrics
        .webhook
        .request("mutate-pods", result.is_ok(), started.elapsed());
    review_response(result)
}

/// The pod's mutation; a pod whose proxy would find no fingerprint key is refused, with the
/// reason, rather than created to wait for a Secret (a generated key is made here if the
/// operator has not made it yet).
async fn mutate_and_key(
    state: &AppState,
    request: &kube::core::admission::AdmissionRequest<kube::core::DynamicObject>,
) -> kube::core::admission::AdmissionResponse {
    let mutation =
        admission::mutate_pod(request, &state.policies, &state.injector, &state.exclusions);
    if let Some((policy, message)) = mutation.conflict {
        let events = state.events.clone();
        tokio::spawn(async move {
            let transition = Transition::warning("ProxyNotInjected", message);
            events.publish(&policy, "InjectProxy", &transition).await;
        });
    }
    let Some(policy) = mutation.injected else {
        return mutation.response;
    };
    match crate::fingerprint_key::ensure(&state.client, &policy, request.dry_run).await {
        Ok(_) => mutation.response,
        Err(error) => {
            warn!(policy = %policy.name_any(), %error, "refusing a pod whose proxy would have no fingerprint key");
            kube::core::admission::AdmissionResponse::from(request).deny(error.to_string())
        }
    }
}

async fn validate(State(state): State<AppState>, body: Bytes) -> Response {
    let started = Instant::now();
    let result = match decode(&body) {
        Ok(request) => {
            // Existing pods make an overlap concrete; metadata is all it takes.
            let namespace = request.namespace.clone().unwrap_or_default();
            let pods: Api<PartialObjectMeta<Pod>> =
                Api::namespaced(state.client.clone(), &namespace);
            let labels = match pods.list_metadata(&ListParams::default()).await {
                Ok(list) => list.items.iter().map(|p| p.labels().clone()).collect(),
                Err(error) => {
                    warn!(%error, "cannot list pods for the overlap check; checking selectors only");
                    Vec::new()
                }
            };
            Ok(admission::validate_policy(&request, &state.policies, &labels).into_review())
        }
        Err(error) => Err(error),
    };
    state
        .metrics
        .webhook
        .request("validate-policies", result.is_ok(), started.elapsed());
    review_response(result)
}
