//! What the proxy needs to know of MCP's HTTP transports.

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use serde_json::{Value, json};

pub const SESSION_HEADER: HeaderName = HeaderName::from_static("mcp-session-id");
pub const PROTOCOL_VERSION_HEADER: HeaderName = HeaderName::from_static("mcp-protocol-version");

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

/// The JSON-RPC id of a request body, for an error answer in its name.
pub fn request_id(message: Option<&Value>) -> Option<Value> {
    message.and_then(|m| m.get("id")).cloned()
}

/// A JSON-RPC error response body.
pub fn error_body(id: Option<Value>, code: i64, message: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": id.unwrap_or(Value::Null), "error": {"code": code, "message": message}}))
        .unwrap_or_default()
}

/// The `initialize` request the proxy replays to a fresh upstream.
pub fn initialize_request(params: &Value) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": "mcp-session-proxy-replay", "method": "initialize", "params": params}))
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
    fn recognises_initialize_and_ids() {
        let body = Bytes::from_static(br#"{"jsonrpc":"2.0","id":7,"method":"initialize","params":{"protocolVersion":"2025-06-18"}}"#);
        let message = message(&body);
        let params = initialize_params(message.as_ref()).unwrap();
        assert_eq!(requested_version(&params).as_deref(), Some("2025-06-18"));
        assert_eq!(request_id(message.as_ref()), Some(json!(7)));
        let call = Bytes::from_static(br#"{"jsonrpc":"2.0","id":8,"method":"tools/call"}"#);
        assert!(initialize_params(super::message(&call).as_ref()).is_none());
        assert!(super::message(&Bytes::from_static(b"[1,2]")).is_none());
        assert!(super::message(&Bytes::from_static(b"\xff")).is_none());
    }
}
