//! Raw Streamable HTTP for the steps a test must control exactly: requests, sessions, event
//! streams, credentials, and a connection read until the far end closes it.

use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::body::Bytes;
use serde_json::{Value, json};

use super::http_request;
use super::sdk::Sdk;

pub struct Reply {
    pub status: u16,
    pub session: Option<String>,
    /// The `Retry-After` header, in seconds.
    pub retry_after: Option<u64>,
    pub body: String,
}

impl Reply {
    /// The JSON-RPC message of a JSON body or of the first SSE `data:` line.
    pub fn message(&self) -> Value {
        let text = self
            .body
            .lines()
            .find_map(|l| l.strip_prefix("data:"))
            .unwrap_or(&self.body);
        serde_json::from_str(text.trim()).unwrap_or(Value::Null)
    }
}

pub async fn post(
    port: u16,
    path: &str,
    session: Option<&str>,
    authorization: Option<&str>,
    method: &str,
    body: Value,
) -> Reply {
    let mut headers = vec![
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
        ("mcp-protocol-version", "2025-06-18"),
    ];
    headers.extend(session.map(|s| ("mcp-session-id", s)));
    headers.extend(authorization.map(|a| ("authorization", a)));
    let bytes = if body.is_null() {
        Vec::new()
    } else {
        serde_json::to_vec(&body).unwrap()
    };
    let response = http_request(port, method, path, &headers, Bytes::from(bytes)).await;
    let status = response.status().as_u16();
    let session = response
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    Reply {
        status,
        session,
        retry_after,
        body,
    }
}

pub async fn call(port: u16, session: &str, authorization: Option<&str>, id: u64, a: i64) -> Reply {
    let request = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "add", "arguments": {"a": a, "b": 1}}});
    post(port, "/mcp", Some(session), authorization, "POST", request).await
}

/// `initialize` and `notifications/initialized` through the proxy at `port` to the Python SDK's
/// test server: the session id.
pub async fn open_session(port: u16, authorization: Option<&str>) -> String {
    open_session_on(Sdk::Python, port, authorization).await
}

/// As [`open_session`], to the test server of `sdk`.
pub async fn open_session_on(sdk: Sdk, port: u16, authorization: Option<&str>) -> String {
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18",
        "capabilities": {}, "clientInfo": {"name": "raw-test-client", "version": "1.0"}}});
    let reply = post(port, "/mcp", None, authorization, "POST", init).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.message()["result"]["serverInfo"]["name"],
        sdk.server_name()
    );
    let session = reply.session.expect("the proxy's session id");
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    assert_eq!(
        post(
            port,
            "/mcp",
            Some(&session),
            authorization,
            "POST",
            initialized
        )
        .await
        .status,
        202
    );
    session
}

pub fn result_text(reply: &Reply) -> String {
    reply.message()["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// An `initialize` with extra headers, on a fresh connection: status and body.
pub async fn initialize_with(port: u16, headers: &[(&str, &str)]) -> (u16, String) {
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18",
        "capabilities": {}, "clientInfo": {"name": "raw-test-client", "version": "1.0"}}});
    let mut all = vec![
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
    ];
    all.extend_from_slice(headers);
    let response = http_request(port, "POST", "/mcp", &all, Bytes::from(init.to_string())).await;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Reads from `stream` until the far end closes it (a minute at most): what it sent. Fails the
/// test if the far end keeps the connection open.
pub async fn until_closed(stream: &mut tokio::net::TcpStream) -> String {
    read_until_closed(stream, Duration::from_secs(60))
        .await
        .unwrap_or_else(|sent| panic!("the far end kept the connection open (it sent {sent:?})"))
}

/// Reads from `stream` until the far end closes it: what it sent, or, as the error, what it
/// sent by `within` while it kept the connection open.
pub async fn read_until_closed(
    stream: &mut tokio::net::TcpStream,
    within: Duration,
) -> Result<String, String> {
    use tokio::io::AsyncReadExt as _;
    let mut seen = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut seen)).await;
    let sent = String::from_utf8_lossy(&seen).into_owned();
    match read {
        Ok(_) => Ok(sent),
        Err(_) => Err(sent),
    }
}

/// `tools/call` of `tool` with `arguments`.
pub async fn call_tool(
    port: u16,
    session: &str,
    authorization: Option<&str>,
    id: u64,
    tool: &str,
    arguments: Value,
) -> Reply {
    let request = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": arguments}});
    post(port, "/mcp", Some(session), authorization, "POST", request).await
}

pub async fn list_tools(port: u16, session: &str, authorization: Option<&str>) {
    let request = json!({"jsonrpc": "2.0", "id": 900, "method": "tools/list"});
    let reply = post(port, "/mcp", Some(session), authorization, "POST", request).await;
    let tools = reply.message()["result"]["tools"].clone();
    let declared = |name: &str| {
        tools
            .as_array()
            .and_then(|t| t.iter().find(|tool| tool["name"] == name))
            .map(|tool| tool["annotations"]["readOnlyHint"].clone())
    };
    assert_eq!(
        declared("add_read_only"),
        Some(json!(true)),
        "{}",
        reply.body
    );
    assert_eq!(
        declared("add"),
        Some(Value::Null),
        "the main tool is unannotated"
    );
}

/// One server-sent event as a client sees it.
#[derive(Debug, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub data: Option<String>,
    pub retry: Option<u64>,
}

/// A client's open event stream.
pub struct EventStream {
    pub status: u16,
    pub body: hyper::body::Incoming,
    pub buffer: String,
    /// Why the stream broke off (no terminating chunk), if it did.
    pub broken: Option<String>,
}

impl EventStream {
    /// `GET /mcp` for the session, resuming after `last_event_id` if given.
    pub async fn open(
        port: u16,
        session: &str,
        authorization: Option<&str>,
        last_event_id: Option<&str>,
    ) -> Self {
        let mut headers = vec![
            ("accept", "text/event-stream"),
            ("mcp-protocol-version", "2025-06-18"),
            ("mcp-session-id", session),
        ];
        headers.extend(authorization.map(|a| ("authorization", a)));
        headers.extend(last_event_id.map(|l| ("last-event-id", l)));
        Self::request(port, "GET", &headers, Bytes::new()).await
    }

    pub async fn request(port: u16, method: &str, headers: &[(&str, &str)], body: Bytes) -> Self {
        let response = http_request(port, method, "/mcp", headers, body).await;
        Self {
            status: response.status().as_u16(),
            body: response.into_body(),
            buffer: String::new(),
            broken: None,
        }
    }

    /// The next event, `None` when the stream ends (see `broken`); panics after 20 s of silence.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent::default();
                for line in block.lines() {
                    let (name, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
                    match name {
                        "id" => event.id = Some(value),
                        "data" => event.data = Some(value),
                        "retry" => event.retry = value.parse().ok(),
                        _ => {}
                    }
                }
                return Some(event);
            }
            let frame = tokio::time::timeout(Duration::from_secs(20), self.body.frame())
                .await
                .expect("an event within 20 s")?;
            let frame = match frame {
                Ok(frame) => frame,
                Err(error) => {
                    self.broken = Some(error.to_string());
                    return None;
                }
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            self.buffer.push_str(&String::from_utf8_lossy(&data));
        }
    }

    /// The next event that carries a message.
    pub async fn next_message(&mut self) -> Option<SseEvent> {
        loop {
            let event = self.next().await?;
            if event.data.as_deref().is_some_and(|d| !d.is_empty()) {
                return Some(event);
            }
        }
    }
}

pub const LIST_CHANGED: &str = "notifications/resources/list_changed";

/// Calls `notify` until the listening stream gets the notification (a restarted upstream's
/// stream is reopened behind the client's in the background).
pub async fn notify_until_heard(
    port: u16,
    session: &str,
    token: Option<&str>,
    stream: &mut EventStream,
) -> SseEvent {
    let heard = tokio::spawn({
        let session = session.to_owned();
        let token = token.map(str::to_owned);
        async move {
            for id in 1000.. {
                call_tool(port, &session, token.as_deref(), id, "notify", json!({})).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    });
    let event = stream.next_message().await.expect("the stream goes on");
    heard.abort();
    assert!(
        event
            .data
            .as_deref()
            .unwrap_or_default()
            .contains(LIST_CHANGED),
        "{event:?}"
    );
    event
}

/// A bearer JWT for `subject` (the proxy reads its claims; the signature is the backend's to
/// check, and these test servers check none).
pub fn jwt(subject: &str, serial: u32) -> String {
    use base64::Engine as _;
    let encode =
        |value: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string());
    let claims = json!({"iss": "https://idp.example", "sub": subject, "exp": 1_900_000_000 + serial, "jti": serial});
    format!(
        "Bearer {}.{}.signature-{serial}",
        encode(json!({"alg": "RS256", "typ": "JWT"})),
        encode(claims)
    )
}
