//! What the proxy needs to know of MCP's HTTP transports.

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use bytes::Bytes;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};

use crate::store::{SessionSetup, SetupChange};

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

/// The `name` of by-name params; by-position params (an array, which JSON-RPC allows) and
/// anything else name nothing, and are skipped unbuilt like the rest.
#[derive(Debug, Default, Clone, PartialEq)]
struct ParamsHead {
    name: Option<Value>,
}

impl<'de> Deserialize<'de> for ParamsHead {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{MapAccess, SeqAccess, Visitor};

        /// Whether a key is `name`, without allocating it.
        struct IsName(bool);
        impl<'de> Deserialize<'de> for IsName {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Key;
                impl Visitor<'_> for Key {
                    type Value = IsName;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("a key")
                    }
                    fn visit_str<E>(self, key: &str) -> Result<IsName, E> {
                        Ok(IsName(key == "name"))
                    }
                }
                d.deserialize_str(Key)
            }
        }

        struct Params;
        impl<'de> Visitor<'de> for Params {
            type Value = ParamsHead;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("JSON-RPC params")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ParamsHead, A::Error> {
                let mut head = ParamsHead::default();
                while let Some(IsName(is_name)) = map.next_key()? {
                    if is_name {
                        head.name = Some(map.next_value()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(head)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ParamsHead, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(ParamsHead::default())
            }
            // Scalars are no valid params, but the server is the one to say so.
            fn visit_bool<E>(self, _: bool) -> Result<ParamsHead, E> {
                Ok(ParamsHead::default())
            }
            fn visit_i64<E>(self, _: i64) -> Result<ParamsHead, E> {
                Ok(ParamsHead::default())
            }
            fn visit_u64<E>(self, _: u64) -> Result<ParamsHead, E> {
                Ok(ParamsHead::default())
            }
            fn visit_f64<E>(self, _: f64) -> Result<ParamsHead, E> {
                Ok(ParamsHead::default())
            }
            fn visit_str<E>(self, _: &str) -> Result<ParamsHead, E> {
                Ok(ParamsHead::default())
            }
        }
        deserializer.deserialize_any(Params)
    }
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

    /// A response (a result or an error) to some request.
    pub fn is_response(&self) -> bool {
        self.method.is_none() && (self.result.is_some() || self.error.is_some())
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

/// Largest error body read to tell an unknown session from a genuine refusal.
pub const SESSION_SIGNAL_LIMIT: usize = 16 * 1024;

/// Does an upstream's answer to a request that carried `Mcp-Session-Id` say it does not know
/// that session (it restarted, or never had it)? The spec says 404; servers in the field also
/// answer 400 (the TypeScript SDK's example servers and `server-everything`: "Bad Request: No
/// valid session ID provided"; a single-transport TypeScript server: "Server not initialized")
/// and some 401 ("Session not found"). A 400 or 401 counts only when its message speaks of the
/// session, so a genuine bad request (a parse error, an expired token) is passed to the client
/// and never replayed. docs/proxy.md has the survey behind these rules.
pub fn is_unknown_session(status: axum::http::StatusCode, body: &[u8]) -> bool {
    match status.as_u16() {
        404 => true,
        400 | 401 => {
            let text =
                error_message(body).unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
            speaks_of_unknown_session(&text.to_ascii_lowercase())
        }
        _ => false,
    }
}

/// The `error.message` of a JSON-RPC error body.
fn error_message(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: ErrorObject,
    }
    #[derive(Deserialize)]
    struct ErrorObject {
        message: String,
    }
    serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .map(|b| b.error.message)
}

fn speaks_of_unknown_session(message: &str) -> bool {
    const UNKNOWN: [&str; 7] = [
        "not found",
        "no valid",
        "invalid",
        "unknown",
        "missing",
        "expired",
        "terminated",
    ];
    (message.contains("session") && UNKNOWN.iter().any(|word| message.contains(word)))
        || message.contains("server not initialized")
}

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1). Typed names:
/// removing by `&str` would parse the name again on every request.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: look first, as each removal hashes its name.
    while let Some(name) = headers
        .keys()
        .find(|name| HOP_BY_HOP.contains(name))
        .cloned()
    {
        headers.remove(&name);
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

/// The token and value of a `notifications/progress` message.
pub fn progress(message: &[u8]) -> Option<(String, f64)> {
    #[derive(Deserialize)]
    struct Notification {
        method: String,
        params: Params,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Params {
        progress_token: Value,
        progress: f64,
    }
    // Cheap refusal of everything else before any parse: this runs on every relayed event.
    if !message
        .windows(b"notifications/progress".len())
        .any(|w| w == b"notifications/progress")
    {
        return None;
    }
    let notification: Notification = serde_json::from_slice(message).ok()?;
    (notification.method == "notifications/progress").then(|| {
        (
            notification.params.progress_token.to_string(),
            notification.params.progress,
        )
    })
}

/// Requests that set up session state a fresh upstream does not have (MCP 2025-11-25).
pub const SETUP_METHODS: [&str; 3] = [
    "resources/subscribe",
    "resources/unsubscribe",
    "logging/setLevel",
];

/// The change a setup request (one of [`SETUP_METHODS`]) makes.
pub fn setup_change(body: &[u8]) -> Option<SetupChange> {
    #[derive(Deserialize)]
    struct Request {
        method: String,
        params: Params,
    }
    #[derive(Deserialize)]
    struct Params {
        #[serde(default)]
        uri: Option<String>,
        #[serde(default)]
        level: Option<String>,
    }
    let request: Request = serde_json::from_slice(body).ok()?;
    match (request.method.as_str(), request.params) {
        ("resources/subscribe", Params { uri: Some(uri), .. }) => Some(SetupChange::Subscribe(uri)),
        ("resources/unsubscribe", Params { uri: Some(uri), .. }) => {
            Some(SetupChange::Unsubscribe(uri))
        }
        (
            "logging/setLevel",
            Params {
                level: Some(level), ..
            },
        ) => Some(SetupChange::LogLevel(level)),
        _ => None,
    }
}

/// The requests that set `setup` up again on a fresh upstream session, ids of the proxy's own.
pub fn setup_requests(setup: &SessionSetup) -> impl Iterator<Item = Bytes> + '_ {
    let level = setup
        .log_level
        .iter()
        .map(|level| ("logging/setLevel", json!({"level": level})));
    let subscriptions = setup
        .subscriptions
        .iter()
        .map(|uri| ("resources/subscribe", json!({"uri": uri})));
    level
        .chain(subscriptions)
        .enumerate()
        .map(|(n, (method, params))| {
            let id = format!("{REPLAY_REQUEST_ID}-setup-{n}");
            Bytes::from(
                serde_json::to_vec(
                    &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}),
                )
                .unwrap_or_default(),
            )
        })
}

/// The id of the `initialize` requests the proxy replays: their answers are the proxy's.
pub const REPLAY_REQUEST_ID: &str = "mcp-session-proxy-replay";

/// The protocol version a replay announces for a session whose record has none.
pub const DEFAULT_REPLAY_VERSION: &str = "2025-06-18";

/// The `initialize` request the proxy replays to a fresh upstream: the client's own params, or,
/// for a session the seed's service wrote (no handshake stored), a minimal handshake that asks
/// for the session's protocol version.
pub fn initialize_request(params: &Value, protocol_version: Option<&str>) -> Bytes {
    let params = if params.is_object() {
        params.clone()
    } else {
        json!({
            "protocolVersion": protocol_version.unwrap_or(DEFAULT_REPLAY_VERSION),
            "capabilities": {},
            "clientInfo": {"name": "mcp-session-proxy", "version": env!("CARGO_PKG_VERSION")},
        })
    };
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

/// The two kinds of event stream a Streamable HTTP server opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// A GET stream: server messages outside any request, for as long as the client listens.
    Listen,
    /// A POST's response stream: ends with the response.
    Response,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_stripped_with_every_value_and_nothing_else() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        headers.insert(header::AUTHORIZATION, "Bearer a".parse().unwrap());
        headers.insert(header::CONNECTION, "keep-alive".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.append(header::TRANSFER_ENCODING, "gzip".parse().unwrap());
        headers.append(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        headers.insert(header::UPGRADE, "websocket".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        let left: Vec<_> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["content-type", "authorization"]);
        let mut none = headers.clone();
        strip_hop_by_hop(&mut none);
        assert_eq!(none, headers);
    }

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
    fn unknown_sessions_as_the_servers_in_the_field_say_it() {
        use axum::http::StatusCode;
        let unknown = [
            // The spec, the Python SDK, the TypeScript SDK's transport.
            (404, &br#"{"jsonrpc":"2.0","id":"x","error":{"code":-32001,"message":"Session not found"}}"#[..]),
            (404, b""),
            // server-everything and the TypeScript SDK's example servers.
            (400, br#"{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: No valid session ID provided"},"id":1}"#),
            // A single-transport TypeScript server that restarted.
            (400, br#"{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: Server not initialized"},"id":null}"#),
            // Plain-text answers (the conformance suite's servers on GET, some Python servers).
            (400, b"Invalid or missing session ID"),
            (400, b"Bad Request: No valid session ID provided"),
            (401, b"Unauthorized: Session not found"),
        ];
        for (status, body) in unknown {
            let status = StatusCode::from_u16(status).unwrap();
            assert!(
                is_unknown_session(status, body),
                "{status} {}",
                String::from_utf8_lossy(body)
            );
        }
        let genuine = [
            (400, &br#"{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"},"id":null}"#[..]),
            (400, br#"{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":1}"#),
            (400, br#"{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: Unsupported protocol version"},"id":1}"#),
            (400, b"Bad Request"),
            (401, br#"{"error":"invalid_token","error_description":"The access token expired"}"#),
            (403, b"Session forbidden"),
            (500, b"session not found"),
            (200, b"session not found"),
        ];
        for (status, body) in genuine {
            let status = StatusCode::from_u16(status).unwrap();
            assert!(
                !is_unknown_session(status, body),
                "{status} {}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn a_replay_without_stored_params_asks_for_the_sessions_version() {
        let replay = |params: Value, version| {
            serde_json::from_slice::<Value>(&initialize_request(&params, version)).unwrap()
        };
        let own = json!({"protocolVersion": "2025-03-26", "capabilities": {"roots": {}}, "clientInfo": {"name": "c"}});
        assert_eq!(replay(own.clone(), Some("2025-06-18"))["params"], own);
        let seed = replay(Value::Null, Some("2025-11-25"));
        assert_eq!(seed["params"]["protocolVersion"], "2025-11-25");
        assert_eq!(seed["method"], "initialize");
        assert_eq!(
            replay(Value::Null, None)["params"]["protocolVersion"],
            DEFAULT_REPLAY_VERSION
        );
    }

    #[test]
    fn progress_of_notifications() {
        assert_eq!(
            progress(br#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"t","progress":3,"total":10}}"#),
            Some(("\"t\"".into(), 3.0))
        );
        assert_eq!(
            progress(br#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":7,"progress":0.5}}"#),
            Some(("7".into(), 0.5))
        );
        assert_eq!(progress(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#), None);
        assert_eq!(
            progress(br#"{"method":"notifications/progress","params":{}}"#),
            None
        );
    }

    #[test]
    fn setup_requests_are_recorded_and_replayed() {
        let subscribe = br#"{"jsonrpc":"2.0","id":4,"method":"resources/subscribe","params":{"uri":"demo://resource/static/document/architecture.md"}}"#;
        assert_eq!(
            setup_change(subscribe),
            Some(SetupChange::Subscribe(
                "demo://resource/static/document/architecture.md".into()
            ))
        );
        let level =
            br#"{"jsonrpc":"2.0","id":5,"method":"logging/setLevel","params":{"level":"debug"}}"#;
        assert_eq!(
            setup_change(level),
            Some(SetupChange::LogLevel("debug".into()))
        );
        for other in [
            &br#"{"jsonrpc":"2.0","id":6,"method":"resources/subscribe","params":{}}"#[..],
            br#"{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"x"}}"#,
            b"[]",
        ] {
            assert_eq!(setup_change(other), None);
        }
        let setup = SessionSetup {
            subscriptions: vec!["a://1".into(), "a://2".into()],
            log_level: Some("debug".into()),
        };
        let requests: Vec<Value> = setup_requests(&setup)
            .map(|body| serde_json::from_slice(&body).unwrap())
            .collect();
        assert_eq!(requests.len(), 3);
        assert_eq!(requests[0]["method"], "logging/setLevel");
        assert_eq!(requests[2]["params"]["uri"], "a://2");
        let ids: std::collections::HashSet<String> =
            requests.iter().map(|r| r["id"].to_string()).collect();
        assert_eq!(ids.len(), 3, "distinct ids");
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

    /// Any JSON value, a few levels deep: what a client may put anywhere in a message.
    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "\\PC{0,20}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map("[a-zA-Z]{1,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 2000, ..Default::default() })]
        /// What a client sends (arbitrary bytes, or a message of a known method with arbitrary
        /// params and id) never panics the proxy's reading of it, and reads as what it is.
        #[test]
        fn client_messages_never_panic_and_read_as_what_they_are(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
            method in proptest::sample::select(vec!["initialize", "tools/call", "resources/subscribe",
                "resources/unsubscribe", "logging/setLevel", "notifications/progress", "ping", ""]),
            params in any_json(),
            id in any_json(),
            status in 100_u16..600,
        ) {
            let _ = MessageHead::of(&bytes);
            let _ = message(&Bytes::from(bytes.clone()));
            let _ = progress(&bytes);
            let _ = setup_change(&bytes);
            if let Ok(status) = axum::http::StatusCode::from_u16(status) {
                let _ = is_unknown_session(status, &bytes);
            }
            let _ = header_value(&String::from_utf8_lossy(&bytes));

            let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
            let body = Bytes::from(serde_json::to_vec(&request).unwrap());
            let head = MessageHead::of(&body);
            proptest::prop_assert!(head.is_some());
            let parsed = message(&body);
            proptest::prop_assert_eq!(parsed.as_ref(), Some(&request));
            let initialize = initialize_params(parsed.as_ref());
            proptest::prop_assert_eq!(initialize.is_some(), method == "initialize");
            if let Some(uri) = params.get("uri").and_then(Value::as_str)
                && method == "resources/subscribe"
            {
                proptest::prop_assert_eq!(setup_change(&body), Some(SetupChange::Subscribe(uri.to_owned())));
            }
            let _ = progress(&body);
            let _ = requested_version(&params);
        }
    }
}
