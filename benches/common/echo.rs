//! The upstream of the benchmarks: an MCP server reduced to what a session needs, as fast as an
//! upstream gets. JSON answers; the sessions it opened, and `404` for any other (as the SDKs'
//! servers answer an id they do not know, so a request sent to the wrong server shows); one
//! tool, `echo`, without annotations (as most tools are), which takes `delay_ms` when asked to.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper::body::Bytes;
use serde_json::{Value, json};

/// The sessions the server opened and not yet closed.
type Sessions = Arc<Mutex<HashSet<String>>>;

/// Serves MCP on `listener` until `shutdown`, then finishes the requests it has.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/mcp", axum::routing::post(post).delete(delete))
        .with_state(Sessions::default());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

fn session_of(headers: &HeaderMap) -> Option<&str> {
    headers.get("mcp-session-id")?.to_str().ok()
}

fn known(sessions: &Sessions, id: &str) -> bool {
    sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(id)
}

async fn post(State(sessions): State<Sessions>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(message) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let id = message.get("id").cloned();
    if message.get("method").and_then(Value::as_str) == Some("initialize") {
        let session = format!("{:032x}", rand::random::<u128>());
        sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(session.clone());
        let result = json!({"jsonrpc": "2.0", "id": id, "result": {"protocolVersion": "2025-06-18",
            "capabilities": {"tools": {}}, "serverInfo": {"name": "echo", "version": "1"}}});
        return (
            [
                ("mcp-session-id", session),
                ("content-type", "application/json".into()),
            ],
            result.to_string(),
        )
            .into_response();
    }
    let Some(session) = session_of(&headers) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    if !known(&sessions, session) {
        let error = json!({"jsonrpc": "2.0", "id": Value::Null,
            "error": {"code": -32001, "message": "Session not found"}});
        return (StatusCode::NOT_FOUND, error.to_string()).into_response();
    }
    if id.is_none() {
        return StatusCode::ACCEPTED.into_response();
    }
    let arguments = &message["params"]["arguments"];
    if let Some(delay) = arguments.get("delay_ms").and_then(Value::as_u64) {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let result = json!({"jsonrpc": "2.0", "id": id,
        "result": {"content": [{"type": "text", "text": arguments["text"]}]}});
    ([("content-type", "application/json")], result.to_string()).into_response()
}

async fn delete(State(sessions): State<Sessions>, headers: HeaderMap) -> StatusCode {
    let removed = session_of(&headers).is_some_and(|id| {
        sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    });
    if removed {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    }
}
