//! What the proxy needs to know of MCP's HTTP transports.

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};

pub const SESSION_HEADER: HeaderName = HeaderName::from_static("mcp-session-id");
pub const PROTOCOL_VERSION_HEADER: HeaderName = HeaderName::from_static("mcp-protocol-version");
pub const LAST_EVENT_ID_HEADER: HeaderName = HeaderName::from_static("last-event-id");

/// What the proxy needs of a JSON-RPC message: its id, method and, for `tools/call`, the
/// tool's name. Everything else is skipped without being built, so reading it costs little on
/// the hot path.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub struct MessageHead {
    #[serde(default)]
    pub id: Option<Value>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    params: Option<ParamsHead>,
    #[serde(default)]
    result: Option<IgnoredAny>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
struct ParamsHead {
    #[serde(default)]
    name: Option<Value>,
}

impl MessageHead {
    /// The head of a body holding one JSON-RPC message; `None` for batches and non-JSON.
    pub fn of(body: &[u8]) -> Option<Self> {
        serde_json::from_slice(body).ok()
    }

    /// A request (it has a method and an id), as opposed to a notification or a response.
    pub fn is_request(&self) -> bool {
        self.method.is_some() && self.id.is_some()
    }

    /// A response to the request with `id`.
    pub fn answers(&self, id: &Value) -> bool {
        self.method.is_none()
            && self.id.as_ref() == Some(id)
            && (self.result.is_some() || self.error.is_some())
    }

    /// The tool a `tools/call` names.
    pub fn tool(&self) -> Option<&str> {
        self.params.as_ref()?.name.as_ref()?.as_str()
    }
}

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// A response whose body is an event stream.
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}

/// The protocol version an `initialize` answer settles on.
pub fn negotiated_version(answer: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Answer {
        result: AnswerResult,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct AnswerResult {
        protocol_version: String,
    }
    serde_json::from_slice::<Answer>(answer)
        .ok()
        .map(|a| a.result.protocol_version)
        .filter(|v| v.len() <= 64 && header_value(v).is_some())
}

/// The body's JSON-RPC message, if it is one object (batches and non-JSON pass through).
pub fn message(body: &Bytes) -> Option<Value> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .filter(Value::is_object)
}

/// `initialize` request params, if the body is one.
pub fn initialize_params(message: Option<&Value>) -> Option<Value> {
    let message = message?;
    (message.get("method")? == "initialize")
        .then(|| message.get("params").cloned().unwrap_or(Value::Null))
}

/// A JSON-RPC error response body.
pub fn error_body(id: Option<Value>, code: i64, message: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": id.unwrap_or(Value::Null), "error": {"code": code, "message": message}}))
        .unwrap_or_default()
}

/// The id of the `initialize` requests the proxy replays: their answers are the proxy's.
pub const REPLAY_REQUEST_ID: &str = "mcp-session-proxy-replay";

/// The `initialize` request the proxy replays to a fresh upstream.
pub fn initialize_request(params: &Value) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": REPLAY_REQUEST_ID, "method": "initialize", "params": params}))
            .unwrap_or_default(),
    )
}

pub fn initialized_notification() -> Bytes {
    Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
}

/// The protocol version a request or stored record asks for.
pub fn requested_version(params: &Value) -> Option<String> {
    params
        .get("protocolVersion")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

pub fn header_value(value: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_of_requests_notifications_and_responses() {
        let call = MessageHead::of(br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"add","arguments":{"a":1}}}"#).unwrap();
        assert!(call.is_request());
        assert_eq!(call.tool(), Some("add"));
        let note =
            MessageHead::of(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).unwrap();
        assert!(!note.is_request());
        let answer =
            MessageHead::of(br#"{"jsonrpc":"2.0","id":3,"result":{"content":[]}}"#).unwrap();
        assert!(answer.answers(&json!(3)) && !answer.answers(&json!("3")));
        let failure =
            MessageHead::of(br#"{"jsonrpc":"2.0","id":"x","error":{"code":1,"message":"m"}}"#)
                .unwrap();
        assert!(failure.answers(&json!("x")));
        for bad in [
            &b"[1]"[..],
            b"\xff",
            b"{\"id\":",
            b"{\"params\":{\"name\":[]}}",
        ] {
            assert!(
                MessageHead::of(bad).is_none_or(|h| h.tool().is_none()),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn negotiated_versions_and_event_streams() {
        assert_eq!(
            negotiated_version(
                br#"{"id":1,"result":{"protocolVersion":"2025-06-18","capabilities":{}}}"#
            )
            .as_deref(),
            Some("2025-06-18")
        );
        assert_eq!(negotiated_version(br#"{"id":1,"error":{"code":1}}"#), None);
        assert_eq!(
            negotiated_version(b"{\"result\":{\"protocolVersion\":\"a\nb\"}}"),
            None
        );
        let mut headers = HeaderMap::new();
        assert!(!is_event_stream(&headers));
        headers.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        assert!(is_event_stream(&headers));
    }

    #[test]
    fn recognises_initialize_and_ids() {
        let body = Bytes::from_static(br#"{"jsonrpc":"2.0","id":7,"method":"initialize","params":{"protocolVersion":"2025-06-18"}}"#);
        let message = message(&body);
        let params = initialize_params(message.as_ref()).unwrap();
        assert_eq!(requested_version(&params).as_deref(), Some("2025-06-18"));
        let call = Bytes::from_static(br#"{"jsonrpc":"2.0","id":8,"method":"tools/call"}"#);
        assert!(initialize_params(super::message(&call).as_ref()).is_none());
        assert!(super::message(&Bytes::from_static(b"[1,2]")).is_none());
        assert!(super::message(&Bytes::from_static(b"\xff")).is_none());
    }
}
