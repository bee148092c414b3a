//! The admin port: probes, the drain hook, metrics and this proxy's sessions. Thin handlers
//! over the serving proxy's [`Control`].

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::proxy::lifecycle::control::{Control, Readiness, Sessions};
use crate::proxy::lifecycle::succession::Current;

/// The serving proxy, for each request (a retired proxy may have a successor).
struct Serving(Control);

impl axum::extract::FromRequestParts<Current> for Serving {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        _parts: &mut axum::http::request::Parts,
        current: &Current,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(current.control()))
    }
}

pub async fn serve(
    current: Current,
    listener: tokio::net::TcpListener,
    connections: crate::serve::ConnectionMetrics,
) {
    // What changes the proxy's state or lists its sessions answers only the pod's drain token.
    let guarded = Router::new()
        .route("/drain", get(drain).post(drain))
        .route("/retire", get(retire).post(retire))
        .route("/sessions", get(sessions))
        .route_layer(axum::middleware::from_fn_with_state(
            current.clone(),
            require_drain_token,
        ));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(guarded)
        .with_state(current);
    crate::serve::serve_probes(listener, app, connections).await;
}

async fn require_drain_token(
    Serving(control): Serving,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match crate::serve::refuse_without_drain_token(control.drain_token(), &request) {
        Some(refusal) => refusal,
        None => next.run(request).await,
    }
}

/// Ready unless draining or quiesced (new connections go to other pods meanwhile). Sessions the
/// store lacks (a full or unreachable Redis) do not make the proxy unready, since it serves them
/// from memory, but are named: they are lost if this proxy stops before the store takes them.
async fn readyz(Serving(control): Serving) -> (StatusCode, String) {
    match control.readiness() {
        Readiness::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining\n".into()),
        Readiness::Quiesced => (
            StatusCode::SERVICE_UNAVAILABLE,
            "quiesced: the MCP server is restarting\n".into(),
        ),
        Readiness::NoBackends => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the policy's pods are not listed yet\n".into(),
        ),
        Readiness::Ready { unstored: 0 } => (StatusCode::OK, "ok\n".into()),
        Readiness::Ready { unstored } => (
            StatusCode::OK,
            format!("ok; {unstored} sessions served from memory: the store refuses or lost them\n"),
        ),
    }
}

/// The preStop hook of the backend container: returns once the upstream has finished what it
/// was working on and new requests are held for its restart (see [`crate::proxy::upstream::quiesce`]); in a
/// terminating pod, once the proxy has retired.
async fn drain(Serving(control): Serving) -> String {
    match control.quiesce().await {
        crate::proxy::Quiesced::Holding => {
            "quiesced: requests are held until the server restarts\n".into()
        }
        crate::proxy::Quiesced::Retired => "retired: the pod's sessions were handed over\n".into(),
    }
}

/// The backend's preStop in the native-sidecar form: hands this proxy's sessions over and
/// answers until its clients have moved (what SIGTERM does), then holds new requests until the
/// backend has finished its own (see [`crate::proxy::Proxy::retire_before_backend_stops`]).
async fn retire(Serving(control): Serving) -> String {
    format!("drained {} sessions\n", control.retire().await)
}

async fn metrics(Serving(control): Serving) -> impl IntoResponse {
    let mut out = String::new();
    let _ = control.encode_metrics(&mut out);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
}

/// This proxy's sessions: ids only (the upstream's ids are the upstream's secrets).
async fn sessions(Serving(control): Serving) -> axum::Json<Sessions> {
    axum::Json(control.sessions())
}
