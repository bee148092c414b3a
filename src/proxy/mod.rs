//! The session proxy: a reverse proxy in front of an MCP server that keeps every client's
//! session alive through upstream restarts and pod replacements.
//!
//! Streamable HTTP (2025-03-26 and later): the client gets a session id of the proxy's own; the
//! proxy maps it to the current upstream session, and when the upstream does not know it (it
//! restarted, or another pod created the session) replays `initialize` +
//! `notifications/initialized` with the stored params before forwarding. Requests without a
//! session (stateless servers, the 2026-07-28 revision) pass through.

mod fingerprint;
mod protocol;
mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

pub use self::fingerprint::Fingerprinter;
use self::protocol::{PROTOCOL_VERSION_HEADER, SESSION_HEADER};
use self::upstream::{Upstream, UpstreamError};
use crate::store::{
    Claim, ClaimOutcome, DebouncedToucher, NewSession, SessionId, SessionStore, Touched,
};

/// JSON-RPC error codes (the implementation-defined server range): the MCP server could not be
/// reached, and the session is unknown (as the TypeScript SDK answers).
const UPSTREAM_UNAVAILABLE: i64 = -32000;
const SESSION_NOT_FOUND: i64 = -32001;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub upstream: axum::http::Uri,
    pub admin: SocketAddr,
    pub pod_name: Option<String>,
    pub drain_timeout: Duration,
    /// How long a request is held while the upstream is down.
    pub hold: Duration,
    pub touch_interval: Duration,
    pub max_body_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// The proxy's metrics (DESIGN.md): requests by method and status, latency, replays, held
/// requests, claims, sessions.
struct ProxyMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Histogram,
    replays: Family<OutcomeLabels, Counter>,
    held: Counter,
    claims: Family<OutcomeLabels, Counter>,
    refused: Family<OutcomeLabels, Counter>,
    sessions: Gauge,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "mcp_proxy_requests",
            "Requests by HTTP method and status",
            requests.clone(),
        );
        let latency = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "mcp_proxy_request_duration_seconds",
            "Time to the response head",
            latency.clone(),
        );
        let replays = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "mcp_session_rehydrations",
            "Handshake replays to a fresh upstream",
            replays.clone(),
        );
        let held = Counter::default();
        registry.register(
            "mcp_proxy_held_requests",
            "Requests held while the upstream was down",
            held.clone(),
        );
        let claims = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "mcp_proxy_claims",
            "Claims of sessions from other pods",
            claims.clone(),
        );
        let refused = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "mcp_proxy_refused_sessions",
            "Session ids answered as unknown",
            refused.clone(),
        );
        let sessions = Gauge::default();
        registry.register(
            "mcp_proxy_sessions",
            "Sessions this proxy maps to its upstream",
            sessions.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            replays,
            held,
            claims,
            refused,
            sessions,
        }
    }
}

pub struct Proxy {
    config: ProxyConfig,
    upstream: Upstream,
    store: Arc<dyn SessionStore>,
    toucher: DebouncedToucher,
    fingerprints: Fingerprinter,
    /// Proxy session id → the upstream's session id and the credential fingerprint bound to it.
    upstream_ids: std::sync::RwLock<HashMap<SessionId, Mapped>>,
    /// One replay at a time per session; concurrent requests wait on it.
    replays: Mutex<HashMap<SessionId, Arc<Mutex<()>>>>,
    /// Sessions the store does not have right now (it was down, or lost them).
    unstored: std::sync::Mutex<std::collections::HashSet<SessionId>>,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    drained: AtomicU64,
    metrics: ProxyMetrics,
}

/// A session this proxy has an upstream session for.
#[derive(Debug)]
struct Mapped {
    upstream_id: String,
    credential: Option<String>,
    /// What the store holds of the session, to write it again if the store loses it (a Redis
    /// restarted without persistence): a live proxy's sessions are never lost with it.
    stored: StoredCopy,
}

/// The stored handshake as compact JSON text: a parsed JSON tree takes several times the
/// memory of its text, per session, for a copy that is read only if the store loses it.
#[derive(Debug, Clone)]
struct StoredCopy {
    initialize_params: Option<Box<str>>,
    protocol_version: Option<Box<str>>,
    metadata: Option<Box<str>>,
}

impl StoredCopy {
    fn of(session: &NewSession) -> Self {
        let text = |value: &Value| {
            serde_json::to_string(value)
                .ok()
                .map(String::into_boxed_str)
        };
        Self {
            initialize_params: session.initialize_params.as_ref().and_then(text),
            protocol_version: session.protocol_version.as_deref().map(Box::from),
            metadata: (!session.metadata.is_empty())
                .then(|| {
                    serde_json::to_string(&session.metadata)
                        .ok()
                        .map(String::into_boxed_str)
                })
                .flatten(),
        }
    }

    fn to_new_session(&self, owner_pod: Option<String>, credential: Option<String>) -> NewSession {
        fn parse<T: serde::de::DeserializeOwned>(text: &Option<Box<str>>) -> Option<T> {
            text.as_deref().and_then(|t| serde_json::from_str(t).ok())
        }
        NewSession {
            owner_pod,
            metadata: parse(&self.metadata).unwrap_or_default(),
            protocol_version: self.protocol_version.as_deref().map(String::from),
            initialize_params: parse(&self.initialize_params),
            credential_fingerprint: credential,
        }
    }
}

/// Why a session id cannot be served.
enum Unknown {
    NotFound,
    OtherCredential,
    Invalid,
}

impl Proxy {
    pub fn new(
        config: ProxyConfig,
        store: Arc<dyn SessionStore>,
        fingerprints: Fingerprinter,
    ) -> Arc<Self> {
        Arc::new(Self {
            upstream: Upstream::new(config.upstream.clone(), config.hold),
            toucher: DebouncedToucher::new(store.clone(), config.touch_interval),
            config,
            store,
            fingerprints,
            upstream_ids: Default::default(),
            replays: Default::default(),
            unstored: Default::default(),
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            drained: AtomicU64::new(0),
            metrics: ProxyMetrics::default(),
        })
    }

    /// The upstream session id and the bound credential of a mapped session.
    fn mapped(&self, id: &SessionId) -> Option<(String, Option<String>)> {
        let ids = self.upstream_ids.read().unwrap_or_else(|p| p.into_inner());
        ids.get(id)
            .map(|m| (m.upstream_id.clone(), m.credential.clone()))
    }

    fn remember(&self, id: &SessionId, upstream_id: String, stored: NewSession) {
        let mut ids = self.upstream_ids.write().unwrap_or_else(|p| p.into_inner());
        let credential = stored.credential_fingerprint.clone();
        ids.insert(
            id.clone(),
            Mapped {
                upstream_id,
                credential,
                stored: StoredCopy::of(&stored),
            },
        );
        self.metrics.sessions.set(ids.len() as i64);
    }

    fn mark_unstored(&self, id: &SessionId) {
        self.unstored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone());
    }

    /// Writes a session this proxy serves back into the store, which lost it or was down.
    async fn restore(&self, id: &SessionId) {
        let session = {
            let ids = self.upstream_ids.read().unwrap_or_else(|p| p.into_inner());
            let Some(mapped) = ids.get(id) else { return };
            mapped
                .stored
                .to_new_session(self.config.pod_name.clone(), mapped.credential.clone())
        };
        match self.store.create_or_rehydrate(id, session).await {
            Ok(_) => {
                self.unstored
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(id);
                info!(session = %id, "session written back to the store");
            }
            Err(error) => {
                debug!(session = %id, %error, "the store is still unavailable");
                self.mark_unstored(id);
            }
        }
    }

    /// Retries writing every session the store lacks; runs until the process ends.
    async fn restore_unstored(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let ids: Vec<SessionId> = self
                .unstored
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned()
                .collect();
            for id in ids {
                self.restore(&id).await;
            }
        }
    }

    fn forget(&self, id: &SessionId) {
        let mut ids = self.upstream_ids.write().unwrap_or_else(|p| p.into_inner());
        ids.remove(id);
        self.metrics.sessions.set(ids.len() as i64);
        self.toucher.forget(id);
    }

    async fn handle(self: Arc<Self>, request: Request) -> Response {
        let started = Instant::now();
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let method = request.method().clone();
        let mut response = self.route(request).await;
        if self.draining.load(Ordering::SeqCst) {
            // Clients reconnect through the Service, to another pod.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let labels = RequestLabels {
            method: method.to_string(),
            status: response.status().as_u16(),
        };
        self.metrics.requests.get_or_create(&labels).inc();
        self.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        response
    }

    async fn route(&self, request: Request) -> Response {
        let (parts, body) = request.into_parts();
        let body = match axum::body::to_bytes(body, self.config.max_body_bytes).await {
            Ok(body) => body,
            Err(_) => return plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
        };
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        // Parsed only where a decision needs it (is this `initialize`?) or an error names the id:
        // the hot path forwards bytes.
        let session = parts.headers.get(&SESSION_HEADER).cloned();
        let Some(session) = session else {
            if parts.method == Method::POST
                && let Some(params) = protocol::initialize_params(protocol::message(&body).as_ref())
            {
                return self.initialize(&path, parts.headers, body, params).await;
            }
            // No session: a stateless exchange, passed through untouched.
            return self
                .forward(&parts.method, &path, &parts.headers, &body, None)
                .await;
        };
        let id = match session.to_str().ok().map(SessionId::parse) {
            Some(Ok(id)) => id,
            _ => return self.unknown(Unknown::Invalid, &body, "invalid"),
        };
        let credential = self.fingerprints.fingerprint(
            parts
                .headers
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        );
        for attempt in 0..2 {
            let upstream_id = match self.mapped(&id) {
                Some((_, bound)) if bound != credential => {
                    return self.unknown(Unknown::OtherCredential, &body, id.as_str());
                }
                Some((upstream_id, _)) => upstream_id,
                None => match self
                    .replay(&id, &path, &parts.headers, credential.clone())
                    .await
                {
                    Ok(upstream_id) => upstream_id,
                    Err(Ok(unknown)) => {
                        return self.unknown(unknown, &body, id.as_str());
                    }
                    Err(Err(error)) => return self.upstream_failure(error, &body),
                },
            };
            let response = self
                .forward(
                    &parts.method,
                    &path,
                    &parts.headers,
                    &body,
                    Some((&id, &upstream_id)),
                )
                .await;
            if response.status() == StatusCode::NOT_FOUND && attempt == 0 {
                // The upstream lost the session (it restarted): replay once and retry.
                debug!(session = %id, "upstream answered 404; replaying the handshake");
                // Only the mapping that failed: a concurrent request may have replayed already.
                let mut ids = self.upstream_ids.write().unwrap_or_else(|p| p.into_inner());
                if ids
                    .get(&id)
                    .is_some_and(|mapped| mapped.upstream_id == upstream_id)
                {
                    ids.remove(&id);
                }
                continue;
            }
            if parts.method == Method::DELETE && response.status().is_success() {
                self.forget(&id);
                if let Err(error) = self.store.delete(&id).await {
                    warn!(session = %id, %error, "cannot delete the session from the store");
                }
            } else {
                match self
                    .toucher
                    .touch(&id, self.config.pod_name.as_deref())
                    .await
                {
                    Ok(Touched::Gone) => self.restore(&id).await,
                    Ok(_) => {}
                    Err(error) => {
                        debug!(session = %id, %error, "touch failed; the store may be down");
                        self.mark_unstored(&id);
                    }
                }
            }
            return response;
        }
        self.unknown(Unknown::NotFound, &body, id.as_str())
    }

    /// A new session: forward `initialize`, then give the client an id of our own.
    async fn initialize(
        &self,
        path: &str,
        headers: HeaderMap,
        body: Bytes,
        params: Value,
    ) -> Response {
        if self.draining.load(Ordering::SeqCst) {
            return plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining: no new sessions here",
            );
        }
        let answer = match self
            .upstream
            .send(&Method::POST, path, &headers, body.clone())
            .await
        {
            Ok(answer) => answer,
            Err(error) => return self.upstream_failure(error, &body),
        };
        if answer.held {
            self.metrics.held.inc();
        }
        let Some(upstream_id) = answer
            .response
            .headers()
            .get(&SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
        else {
            // A server that issues no session id: nothing to keep.
            return convert(answer.response, None);
        };
        let id = SessionId::random();
        let new = NewSession {
            owner_pod: self.config.pod_name.clone(),
            protocol_version: protocol::requested_version(&params),
            initialize_params: Some(params),
            credential_fingerprint: self
                .fingerprints
                .fingerprint(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes())),
            ..Default::default()
        };
        self.remember(&id, upstream_id, new.clone());
        if let Err(error) = self.store.create_or_rehydrate(&id, new).await {
            // Served from memory meanwhile, and written as soon as the store is back.
            warn!(session = %id, %error, "cannot store the new session");
            self.mark_unstored(&id);
        }
        info!(session = %id, "session created");
        convert(answer.response, Some(&id))
    }

    /// Makes a fresh upstream session for `id` from the stored handshake.
    /// `path` is the MCP endpoint the client uses, where the handshake is replayed too.
    async fn replay(
        &self,
        id: &SessionId,
        path: &str,
        headers: &HeaderMap,
        credential: Option<String>,
    ) -> Result<String, Result<Unknown, UpstreamError>> {
        let lock = self
            .replays
            .lock()
            .await
            .entry(id.clone())
            .or_default()
            .clone();
        let result = {
            let _one_at_a_time = lock.lock().await;
            self.replay_locked(id, path, headers, credential).await
        };
        // The lock only orders the requests that arrive during a replay: the last one out
        // removes it, so the map does not keep an entry per session ever replayed.
        let mut replays = self.replays.lock().await;
        if replays
            .get(id)
            .is_some_and(|current| Arc::ptr_eq(current, &lock))
            && Arc::strong_count(&lock) == 2
        {
            replays.remove(id);
        }
        result
    }

    async fn replay_locked(
        &self,
        id: &SessionId,
        path: &str,
        headers: &HeaderMap,
        credential: Option<String>,
    ) -> Result<String, Result<Unknown, UpstreamError>> {
        if let Some(mapped) = self.mapped(id) {
            return Ok(mapped.0); // Another request of this session replayed meanwhile.
        }
        let session = match self.store.get(id).await {
            Ok(Some(session)) => session,
            Ok(None) => return Err(Ok(Unknown::NotFound)),
            Err(error) => {
                warn!(session = %id, %error, "cannot read the session from the store");
                return Err(Ok(Unknown::NotFound));
            }
        };
        let record = &session.record;
        if record.credential_fingerprint.is_some() && record.credential_fingerprint != credential {
            return Err(Ok(Unknown::OtherCredential));
        }
        if let Some(pod) = &self.config.pod_name
            && record.owner_pod.as_ref() != Some(pod)
        {
            let claim = Claim {
                pod: pod.clone(),
                credential_fingerprint: credential.clone(),
            };
            let outcome = match self.store.claim(id, claim).await {
                Ok(ClaimOutcome::Claimed(_)) => "claimed",
                Ok(ClaimOutcome::CredentialMismatch) => return Err(Ok(Unknown::OtherCredential)),
                Ok(ClaimOutcome::NotFound) => return Err(Ok(Unknown::NotFound)),
                // Any proxy serves any session; ownership follows the GET stream.
                Ok(_) => "shared",
                Err(error) => {
                    warn!(session = %id, %error, "cannot claim the session");
                    "failed"
                }
            };
            self.metrics
                .claims
                .get_or_create(&OutcomeLabels { outcome })
                .inc();
        }
        let params = record.initialize_params.clone().unwrap_or(Value::Null);
        let mut replay_headers = HeaderMap::new();
        for name in [header::AUTHORIZATION, header::ACCEPT, header::CONTENT_TYPE] {
            if let Some(value) = headers.get(&name) {
                replay_headers.insert(name, value.clone());
            }
        }
        replay_headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        replay_headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let path = path.split('?').next().unwrap_or(path);
        let answer = self
            .upstream
            .send(
                &Method::POST,
                path,
                &replay_headers,
                protocol::initialize_request(&params),
            )
            .await
            .map_err(Err)?;
        let status = answer.response.status();
        let upstream_id = answer
            .response
            .headers()
            .get(&SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // The initialize result (JSON or one SSE event) is not the client's to see.
        let _ = answer.response.into_body().collect().await;
        let Some(upstream_id) = upstream_id.filter(|_| status.is_success()) else {
            self.metrics
                .replays
                .get_or_create(&OutcomeLabels { outcome: "refused" })
                .inc();
            warn!(session = %id, %status, "the upstream refused the replayed initialize");
            return Err(Ok(Unknown::NotFound));
        };
        replay_headers.insert(SESSION_HEADER, header_or_empty(&upstream_id));
        if let Some(version) = record
            .protocol_version
            .as_deref()
            .and_then(protocol::header_value)
        {
            replay_headers.insert(PROTOCOL_VERSION_HEADER, version);
        }
        if let Ok(answer) = self
            .upstream
            .send(
                &Method::POST,
                path,
                &replay_headers,
                protocol::initialized_notification(),
            )
            .await
        {
            let _ = answer.response.into_body().collect().await;
        }
        self.metrics
            .replays
            .get_or_create(&OutcomeLabels {
                outcome: "replayed",
            })
            .inc();
        info!(session = %id, "handshake replayed to the upstream");
        let stored = NewSession {
            owner_pod: self.config.pod_name.clone(),
            metadata: record.metadata.clone(),
            protocol_version: record.protocol_version.clone(),
            initialize_params: record.initialize_params.clone(),
            credential_fingerprint: record.credential_fingerprint.clone(),
        };
        self.remember(id, upstream_id.clone(), stored);
        Ok(upstream_id)
    }

    async fn forward(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        body: &Bytes,
        session: Option<(&SessionId, &str)>,
    ) -> Response {
        let mut headers = headers.clone();
        if let Some((_, upstream_id)) = session {
            headers.insert(SESSION_HEADER, header_or_empty(upstream_id));
        }
        match self
            .upstream
            .send(method, path, &headers, body.clone())
            .await
        {
            Ok(answer) => {
                if answer.held {
                    self.metrics.held.inc();
                }
                convert(answer.response, session.map(|(id, _)| id))
            }
            Err(error) => self.upstream_failure(error, body),
        }
    }

    fn unknown(&self, why: Unknown, request: &Bytes, id: &str) -> Response {
        let outcome = match why {
            Unknown::NotFound => "not_found",
            Unknown::OtherCredential => "other_credential",
            Unknown::Invalid => "invalid_id",
        };
        self.metrics
            .refused
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        if matches!(why, Unknown::OtherCredential) {
            warn!(session = %id, "a session was presented with another credential; answered as unknown");
        }
        json_response(
            StatusCode::NOT_FOUND,
            protocol::error_body(
                protocol::request_id(protocol::message(request).as_ref()),
                SESSION_NOT_FOUND,
                "Session not found",
            ),
        )
    }

    fn upstream_failure(&self, error: UpstreamError, request: &Bytes) -> Response {
        warn!(%error, "upstream request failed");
        let id = protocol::request_id(protocol::message(request).as_ref());
        let status = if id.is_some() {
            StatusCode::OK
        } else {
            StatusCode::BAD_GATEWAY
        };
        json_response(
            status,
            protocol::error_body(id, UPSTREAM_UNAVAILABLE, &error.to_string()),
        )
    }

    /// Stops taking sessions, lets in-flight requests finish (up to the drain timeout), and
    /// marks this proxy's sessions draining in the store so that any pod can claim them.
    pub async fn drain(&self) -> u64 {
        if self.draining.swap(true, Ordering::SeqCst) {
            return self.drained.load(Ordering::SeqCst);
        }
        let deadline = Instant::now() + self.config.drain_timeout;
        while self.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ids: Vec<SessionId> = self
            .upstream_ids
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        let mut drained = 0;
        for id in ids {
            match self
                .store
                .mark_draining(&id, self.config.drain_timeout.max(Duration::from_secs(600)))
                .await
            {
                Ok(Some(_)) => drained += 1,
                Ok(None) => {}
                Err(error) => warn!(session = %id, %error, "cannot mark the session draining"),
            }
        }
        self.drained.store(drained, Ordering::SeqCst);
        info!(drained, "drained");
        drained
    }
}

fn header_or_empty(value: &str) -> HeaderValue {
    HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The upstream's response for the client: hop-by-hop headers dropped, the upstream's session
/// id replaced by the proxy's; the body streams through.
fn convert(
    response: hyper::Response<hyper::body::Incoming>,
    session: Option<&SessionId>,
) -> Response {
    let (mut parts, body) = response.into_parts();
    protocol::strip_hop_by_hop(&mut parts.headers);
    if let Some(id) = session {
        parts
            .headers
            .insert(SESSION_HEADER, header_or_empty(id.as_str()));
    }
    Response::from_parts(parts, Body::new(body))
}

fn plain(status: StatusCode, message: &'static str) -> Response {
    (status, message).into_response()
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Serves the proxy on `config.listen` and the admin endpoints on `config.admin` until
/// `shutdown` resolves; then drains and returns.
pub async fn run(
    proxy: Arc<Proxy>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ProxyError> {
    let (listen, admin) = (proxy.config.listen, proxy.config.admin);
    let bind = |address: SocketAddr| async move {
        tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| ProxyError::Listen { address, source })
    };
    let (listener, admin_listener) = (bind(listen).await?, bind(admin).await?);
    let app = Router::new().fallback({
        let proxy = proxy.clone();
        move |request: Request| proxy.clone().handle(request)
    });
    let admin_app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/drain", get(drain).post(drain))
        .route("/metrics", get(metrics))
        .route("/sessions", get(sessions))
        .with_state(proxy.clone());
    info!(%listen, upstream = %proxy.config.upstream, %admin, store = %proxy.store.describe(), "session proxy serving");
    tokio::spawn(proxy.clone().restore_unstored());
    tokio::spawn(async move {
        if let Err(error) = axum::serve(admin_listener, admin_app).await {
            warn!(%error, "admin server failed");
        }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = stopped.await;
    });
    let server = tokio::spawn(async move { serving.await });
    shutdown.await;
    proxy.drain().await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(proxy.config.drain_timeout, server).await;
    Ok(())
}

async fn readyz(State(proxy): State<Arc<Proxy>>) -> (StatusCode, &'static str) {
    if proxy.draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else {
        (StatusCode::OK, "ok")
    }
}

async fn drain(State(proxy): State<Arc<Proxy>>) -> String {
    format!("drained {} sessions\n", proxy.drain().await)
}

async fn metrics(State(proxy): State<Arc<Proxy>>) -> impl IntoResponse {
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
async fn sessions(State(proxy): State<Arc<Proxy>>) -> axum::Json<Value> {
    let ids: Vec<String> = proxy
        .upstream_ids
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .keys()
        .map(|id| id.to_string())
        .collect();
    axum::Json(
        serde_json::json!({"pod": proxy.config.pod_name, "draining": proxy.draining.load(Ordering::SeqCst), "sessions": ids}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compact_copy_restores_what_was_stored() {
        let session = NewSession {
            owner_pod: Some("old".into()),
            metadata: serde_json::json!({"user_id": "u-1"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            protocol_version: Some("2025-06-18".into()),
            initialize_params: Some(
                serde_json::json!({"capabilities": {"roots": []}, "clientInfo": {"name": "c"}}),
            ),
            credential_fingerprint: Some("fp".into()),
        };
        let copy = StoredCopy::of(&session);
        let restored = copy.to_new_session(Some("pod-b".into()), Some("fp".into()));
        assert_eq!(restored.owner_pod.as_deref(), Some("pod-b"));
        assert_eq!(restored.metadata, session.metadata);
        assert_eq!(restored.protocol_version, session.protocol_version);
        assert_eq!(restored.initialize_params, session.initialize_params);
        assert_eq!(restored.credential_fingerprint.as_deref(), Some("fp"));
        let empty = StoredCopy::of(&NewSession::default());
        assert!(empty.metadata.is_none() && empty.initialize_params.is_none());
    }
}
