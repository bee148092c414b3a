//! The admin port: probes, the drain hook, metrics and this proxy's sessions. Thin handlers
//! over the serving [`Proxy`].

use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::Value;
use tracing::warn;

use super::succession::Current;
use super::{DRAIN_TOKEN_HEADER, Proxy};

/// The serving proxy, for each request (a retired proxy may have a successor).
struct Serving(Arc<Proxy>);

impl axum::extract::FromRequestParts<Current> for Serving {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        _parts: &mut axum::http::request::Parts,
        current: &Current,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(current.get()))
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
    Serving(proxy): Serving,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let presented = request
        .headers()
        .get(DRAIN_TOKEN_HEADER)
        .map(|value| value.as_bytes());
    match (&proxy.config.drain_token, presented) {
        (Some(token), Some(presented)) if constant_time_eq(token.as_bytes(), presented) => {
            next.run(request).await
        }
        (None, _) => (
            StatusCode::FORBIDDEN,
            "no drain token is configured (MCP_SESSION_DRAIN_TOKEN): this endpoint answers nobody\n",
        )
            .into_response(),
        _ => {
            warn!(path = %request.uri().path(), "refused an admin request without the drain token");
            (StatusCode::UNAUTHORIZED, "the X-Mcp-Drain-Token header is missing or wrong\n")
                .into_response()
        }
    }
}

/// Compares without an early exit, so that timing tells nothing of a token's prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0_u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// Ready unless draining or quiesced (new connections go to other pods meanwhile). Sessions the store lacks (a full or unreachable Redis) do not make
/// the proxy unready, since it serves them from memory, but are named: they are lost if this
/// proxy stops before the store takes them.
async fn readyz(Serving(proxy): Serving) -> (StatusCode, String) {
    if proxy.lifecycle.draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n".into());
    }
    if proxy.quiesced() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "quiesced: the MCP server is restarting\n".into(),
        );
    }
    match proxy.unstored.len() {
        0 => (StatusCode::OK, "ok\n".into()),
        n => (
            StatusCode::OK,
            format!("ok; {n} sessions served from memory: the store refuses or lost them\n"),
        ),
    }
}

/// The preStop hook of the backend container: returns once the upstream has finished what it
/// was working on and new requests are held for its restart (see [`super::quiesce`]); in a
/// terminating pod, once the proxy has retired.
async fn drain(Serving(proxy): Serving) -> String {
    match proxy.quiesce().await {
        super::Quiesced::Holding => {
            "quiesced: requests are held until the server restarts\n".into()
        }
        super::Quiesced::Retired => "retired: the pod's sessions were handed over\n".into(),
    }
}

/// The pod stops: hands this proxy's sessions over and answers until its clients have moved
/// (what SIGTERM does; the backend's preStop in the native-sidecar form).
async fn retire(Serving(proxy): Serving) -> String {
    format!("drained {} sessions\n", proxy.retire().await)
}

async fn metrics(Serving(proxy): Serving) -> impl IntoResponse {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &proxy.metrics.registry);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
}

/// This proxy's sessions: ids only (the upstream's ids are the upstream's secrets).
async fn sessions(Serving(proxy): Serving) -> axum::Json<Value> {
    let ids: Vec<String> = proxy.table.ids().iter().map(|id| id.to_string()).collect();
    axum::Json(serde_json::json!({
        "pod": proxy.config.pod_name,
        "draining": proxy.lifecycle.draining(),
        "sessions": ids,
    }))
}
