//! The proxy's own answers for what it cannot forward: an unknown session, an upstream that
//! did not answer, a store that did not; JSON-RPC errors where the request has an id.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tracing::warn;

use crate::proxy::session::exchange::Exchange;
use crate::proxy::upstream::UpstreamError;
use crate::proxy::{Proxy, mcp::protocol, metrics};
use crate::store::StoreError;

/// JSON-RPC error codes (the implementation-defined server range): the MCP server could not be
/// reached or lost the request, the session is unknown (as the TypeScript SDK answers), and a
/// credential holds too many sessions.
pub(super) const UPSTREAM_UNAVAILABLE: i64 = -32000;

pub(super) const SESSION_NOT_FOUND: i64 = -32001;

/// The code the SDKs answer a request they refuse at the transport with ("Bad Request",
/// "Forbidden"); the same number as [`UPSTREAM_UNAVAILABLE`], as the SDKs use it for both.
pub(super) const REFUSED: i64 = -32000;

pub(super) const TOO_MANY_SESSIONS: i64 = -32002;

/// JSON-RPC's own code for parameters a method cannot take (here: too large to keep).
pub(super) const INVALID_PARAMS: i64 = -32602;

/// Why a session id cannot be served.
#[derive(Debug, Clone, Copy)]
pub(super) enum Unknown {
    NotFound,
    OtherCredential,
    Invalid,
    /// The session stays on its pod (drain strategy `Wait`), and that pod, or its server, is
    /// gone with the session's state: the client must start a new session, knowingly.
    StateLost,
}

/// Why a request got no upstream answer.
#[derive(Debug)]
pub(super) enum Failure {
    Unknown(Unknown),
    Upstream(UpstreamError),
    /// The store did not answer within the hold time: the session may well exist, so never
    /// a 404 (which ends it for the client), but an error the client may retry.
    Store(StoreError),
}

impl Proxy {
    pub(super) fn failure(&self, failure: Failure, exchange: &Exchange) -> Response {
        match failure {
            Failure::Unknown(unknown) => {
                let id = exchange
                    .session
                    .as_ref()
                    .map_or("", |bound| bound.id.as_str());
                self.unknown(unknown, exchange.request_id(), id)
            }
            Failure::Upstream(error) => self.upstream_failure(error, exchange.request_id()),
            Failure::Store(_) => {
                let (code, message) = failure.describe();
                error_answer(
                    exchange.request_id(),
                    StatusCode::SERVICE_UNAVAILABLE,
                    code,
                    &message,
                )
            }
        }
    }

    pub(super) fn unknown(&self, why: Unknown, request_id: Option<Value>, id: &str) -> Response {
        let outcome = match why {
            Unknown::NotFound => metrics::Refusal::NotFound,
            Unknown::OtherCredential => metrics::Refusal::OtherCredential,
            Unknown::Invalid => metrics::Refusal::InvalidId,
            Unknown::StateLost => metrics::Refusal::StateLost,
        };
        metrics::inc(&self.metrics.refused, outcome);
        if matches!(why, Unknown::OtherCredential) {
            warn!(session = %id, "a session was presented with another credential; answered as unknown");
        }
        let message = match why {
            Unknown::StateLost => {
                "Session not found: the server that held this session's state is gone; start a new session"
            }
            _ => "Session not found",
        };
        json_response(
            StatusCode::NOT_FOUND,
            protocol::error_body(request_id, SESSION_NOT_FOUND, message),
        )
    }

    pub(super) fn upstream_failure(
        &self,
        error: UpstreamError,
        request_id: Option<Value>,
    ) -> Response {
        warn!(%error, "upstream request failed");
        if matches!(error, UpstreamError::Lost(_)) {
            metrics::inc(&self.metrics.unanswered, metrics::Unanswered::Failed);
        }
        error_answer(
            request_id,
            StatusCode::BAD_GATEWAY,
            UPSTREAM_UNAVAILABLE,
            &error.to_string(),
        )
    }
}

pub(super) fn header_or_empty(value: &str) -> HeaderValue {
    HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

pub(super) fn plain(status: StatusCode, message: &'static str) -> Response {
    (status, message).into_response()
}

/// A JSON-RPC error for the request (HTTP 200: the client's request failed, not the HTTP
/// exchange), or `status` for a message without an id.
pub(super) fn error_answer(
    request_id: Option<Value>,
    status: StatusCode,
    code: i64,
    message: &str,
) -> Response {
    let status = if request_id.is_some() {
        StatusCode::OK
    } else {
        status
    };
    json_response(status, protocol::error_body(request_id, code, message))
}

pub(super) fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

impl Failure {
    /// The JSON-RPC error a client gets for this failure.
    pub(super) fn describe(&self) -> (i64, String) {
        match self {
            Failure::Unknown(_) => (SESSION_NOT_FOUND, "Session not found".into()),
            Failure::Upstream(error) => (UPSTREAM_UNAVAILABLE, error.to_string()),
            Failure::Store(error) => (
                UPSTREAM_UNAVAILABLE,
                format!("the session store is unavailable, try again: {error}"),
            ),
        }
    }
}
