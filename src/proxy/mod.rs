//! The session proxy: a reverse proxy in front of an MCP server that keeps every client's
//! session alive through upstream restarts and pod replacements.
//!
//! Streamable HTTP (2025-03-26 and later): the client gets a session id of the proxy's own; the
//! proxy maps it to the current upstream session, and when the upstream does not know it (it
//! restarted, or another pod created the session) replays `initialize` +
//! `notifications/initialized` with the stored params before forwarding. SSE streams go through
//! a relay ([`relay`]) that numbers and logs their events for `Last-Event-ID` resumption, keeps a
//! listening stream open across upstream restarts, and answers for requests the upstream lost.
//! Requests without a session (stateless servers, the 2026-07-28 revision) pass through.

mod admin;
mod connections;
mod connector;
mod events;
mod fingerprint;
mod legacy;
mod listeners;
mod metrics;
mod origin;
mod protocol;
mod quiesce;
mod relay;
mod retry;
mod sse;
mod succession;
mod table;
mod upstream;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt as _;
use serde_json::Value;
use tokio::sync::{Mutex, watch};
use tracing::Instrument as _;
use tracing::{debug, info, info_span, warn};

use self::events::{EventLog, StreamKind, StreamTag};
pub use self::fingerprint::Fingerprinter;
use self::metrics::{KindLabels, ProxyMetrics, RequestLabels};
pub use self::origin::{AllowedOrigins, InvalidOrigin};
use self::protocol::{LAST_EVENT_ID_HEADER, MessageHead, PROTOCOL_VERSION_HEADER, SESSION_HEADER};
use self::retry::RetryPolicy;
use self::table::{Lookup, SessionTable, Slot, Transport};
use self::upstream::{Answer, Upstream, UpstreamError};
use crate::serve::{self, ListenerMetrics};
use crate::store::binding::{self, Binding};
use crate::store::{
    self, Claim, ClaimOutcome, DebouncedToucher, LogBound, NewSession, Session, SessionId,
    SessionPatch, SessionStore, StoreError, Tally, Touched,
};

/// JSON-RPC error codes (the implementation-defined server range): the MCP server could not be
/// reached or lost the request, the session is unknown (as the TypeScript SDK answers), and a
/// credential holds too many sessions.
const UPSTREAM_UNAVAILABLE: i64 = -32000;
const SESSION_NOT_FOUND: i64 = -32001;
const TOO_MANY_SESSIONS: i64 = -32002;
/// JSON-RPC's own code for parameters a method cannot take (here: too large to keep).
const INVALID_PARAMS: i64 = -32602;
/// Attempts at one request: a replay after a 404, a resend after a lost response.
const MAX_ATTEMPTS: u32 = 6;
/// Most sessions a drain looks up in the store's index of this pod (beyond those it holds).
const DRAIN_BATCH: usize = 100_000;

/// The header in which `/drain`, `/retire` and `/sessions` require the pod's drain token (the
/// webhook puts it into the backend's preStop hook).
pub const DRAIN_TOKEN_HEADER: &str = "X-Mcp-Drain-Token";

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
    /// Sessions unused this long are dropped from memory (the store's sliding TTL).
    pub session_ttl: Duration,
    /// What each session's log of events for `Last-Event-ID` resumption keeps.
    pub event_log: LogBound,
    /// Sessions one credential may hold in this proxy.
    pub max_sessions_per_credential: usize,
    /// What `/drain`, `/retire` and `/sessions` require in `X-Mcp-Drain-Token`; without one
    /// they answer nobody.
    pub drain_token: Option<String>,
    /// The web pages (by `Origin`) that may send requests.
    pub allowed_origins: AllowedOrigins,
    /// Timeouts and the connection cap of the client listener.
    pub limits: serve::Limits,
    /// Largest `initialize` params kept for a session (they live as long as it does).
    pub max_initialize_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Where a drain stands. Listening streams end when it starts, response streams at its
/// deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    Draining,
    Closing,
}

pub struct Proxy {
    config: ProxyConfig,
    upstream: Upstream,
    store: Arc<dyn SessionStore>,
    toucher: DebouncedToucher,
    fingerprints: Fingerprinter,
    /// The sessions this proxy serves.
    table: SessionTable,
    /// One replay at a time per session; concurrent requests wait on it.
    replays: Mutex<HashMap<SessionId, Arc<Mutex<()>>>>,
    /// Sessions the store does not have right now (it was down, or lost them).
    unstored: std::sync::Mutex<HashSet<SessionId>>,
    retry: RetryPolicy,
    events: EventLog,
    /// HTTP+SSE requests awaiting their answers on the stream.
    unanswered: legacy::Unanswered,
    /// Listening streams, which a replay reopens.
    listeners: Arc<listeners::Listeners>,
    draining: AtomicBool,
    phase: watch::Sender<Phase>,
    /// Requests before their response head, and response streams until they end.
    in_flight: AtomicUsize,
    /// Sessions the drain handed over, once it is done; every caller of `drain` waits for it.
    drained: tokio::sync::OnceCell<u64>,
    /// When the drain began: its deadline counts from there.
    drain_started: std::sync::OnceLock<Instant>,
    /// One quiesce at a time; concurrent callers share it.
    quiescing: Mutex<()>,
    /// Set while a quiesced proxy follows its upstream's restart.
    following_restart: AtomicBool,
    /// Open client connections.
    connections: Arc<AtomicUsize>,
    metrics: ProxyMetrics,
}

/// Why a session id cannot be served.
#[derive(Debug, Clone, Copy)]
enum Unknown {
    NotFound,
    OtherCredential,
    Invalid,
}

/// Why a request got no upstream answer.
#[derive(Debug)]
enum Failure {
    Unknown(Unknown),
    Upstream(UpstreamError),
    /// The store did not answer within the hold time: the session may well exist, so never
    /// a 404 (which ends it for the client), but an error the client may retry.
    Store(StoreError),
}

/// What an upstream's answer to a session's request says of the session.
enum Signal {
    /// The upstream does not know the session (see [`protocol::is_unknown_session`]).
    UnknownSession,
    Answer(Answer),
}

/// Reads an error answer's body where it may say the session is unknown; any other answer is
/// passed on untouched (its body still unread, so streams stay streams).
async fn session_signal(answer: Answer) -> Signal {
    let status = answer.response.status();
    if !matches!(status.as_u16(), 400 | 401 | 404) {
        return Signal::Answer(answer);
    }
    let Answer { response, held } = answer;
    let (parts, body) = response.into_parts();
    let body = http_body_util::Limited::new(body, protocol::SESSION_SIGNAL_LIMIT)
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    if protocol::is_unknown_session(status, &body) {
        return Signal::UnknownSession;
    }
    Signal::Answer(Answer {
        response: hyper::Response::from_parts(parts, Body::from(body)),
        held,
    })
}

/// A client's request, kept whole for as long as it may have to be sent again.
struct Exchange {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
    /// The JSON-RPC message's head, for a POST of one message.
    head: Option<MessageHead>,
    session: Option<Bound>,
}

/// A proxy session id and the fingerprint of the credential presented with it.
struct Bound {
    id: SessionId,
    credential: Option<String>,
}

impl Exchange {
    /// The stream a response to this request opens.
    fn stream_kind(&self) -> StreamKind {
        let listens = self.method == Method::GET
            || self
                .head
                .as_ref()
                .is_some_and(|h| h.method.as_deref() == Some("subscriptions/listen"));
        if listens {
            StreamKind::Listen
        } else {
            StreamKind::Response
        }
    }

    fn is_method(&self, method: &str) -> bool {
        self.head
            .as_ref()
            .is_some_and(|h| h.method.as_deref() == Some(method))
    }

    fn request_id(&self) -> Option<Value> {
        self.head.as_ref().and_then(|h| h.id.clone())
    }

    /// The JSON-RPC method, for logs.
    fn rpc_method(&self) -> Option<&str> {
        self.head.as_ref().and_then(|h| h.method.as_deref())
    }
}

impl Proxy {
    pub fn new(
        config: ProxyConfig,
        store: Arc<dyn SessionStore>,
        fingerprints: Fingerprinter,
    ) -> Arc<Self> {
        Self::build(
            config,
            store,
            fingerprints,
            Arc::default(),
            ListenerMetrics::default(),
        )
    }

    /// A fresh proxy of the same configuration, store and key on the same listeners, for a
    /// pod whose proxy retired without the pod stopping (see [`succession`]).
    fn successor(&self) -> Arc<Self> {
        Self::build(
            self.config.clone(),
            self.store.clone(),
            self.fingerprints.clone(),
            self.connections.clone(),
            self.metrics.listeners.clone(),
        )
    }

    fn build(
        config: ProxyConfig,
        store: Arc<dyn SessionStore>,
        fingerprints: Fingerprinter,
        connections: Arc<AtomicUsize>,
        listeners: ListenerMetrics,
    ) -> Arc<Self> {
        let metrics = ProxyMetrics::new(listeners);
        Arc::new(Self {
            upstream: Upstream::new(config.upstream.clone(), config.hold),
            toucher: DebouncedToucher::new(store.clone(), config.touch_interval),
            events: EventLog::start(
                store.clone(),
                config.event_log,
                metrics.events_unlogged.clone(),
            ),
            table: SessionTable::new(config.max_sessions_per_credential, metrics.sessions.clone()),
            config,
            store,
            fingerprints,
            replays: Default::default(),
            unstored: Default::default(),
            retry: RetryPolicy::default(),
            unanswered: legacy::Unanswered::default(),
            listeners: Arc::default(),
            draining: AtomicBool::new(false),
            phase: watch::Sender::new(Phase::Serving),
            in_flight: AtomicUsize::new(0),
            drained: tokio::sync::OnceCell::new(),
            drain_started: std::sync::OnceLock::new(),
            quiescing: Mutex::new(()),
            following_restart: AtomicBool::new(false),
            connections,
            metrics,
        })
    }

    /// What memory says of a Streamable HTTP session, for `bound`'s credential.
    fn lookup(&self, bound: &Bound) -> Lookup {
        self.table.lookup(
            &bound.id,
            bound.credential.as_deref(),
            Transport::Streamable,
        )
    }

    /// Binds a session bound to nobody (the seed's service wrote it) to `credential`: in the
    /// store first, atomically, so that of two identities racing for it one wins everywhere;
    /// then here. A session the store does not hold (evicted, or never written) is bound here.
    async fn bind(&self, id: &SessionId, credential: &str) -> Result<(), Failure> {
        let patch = SessionPatch {
            bind_credential: Some(credential.to_owned()),
            ..Default::default()
        };
        match self.store.update(id, patch).await {
            Ok(Some(session))
                if session.record.credential_fingerprint.as_deref() != Some(credential) =>
            {
                return Err(Failure::Unknown(Unknown::OtherCredential));
            }
            Ok(_) => {}
            Err(error) => return Err(Failure::Store(error)),
        }
        self.table.bind(id, credential);
        info!(session = %id, "a session bound to nobody is now bound to the identity using it");
        Ok(())
    }

    fn credential_of(&self, headers: &HeaderMap) -> Option<String> {
        self.fingerprints
            .fingerprint(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()))
    }

    /// Admits a new session: not while draining, nor for a credential (as the binding sees
    /// it: a refreshed token is the same identity) that holds as many as it may. The slot is
    /// taken now, so concurrent `initialize`s cannot all pass the check.
    #[allow(clippy::result_large_err)] // The refusal is the response, built once.
    fn admit(&self, exchange: &Exchange) -> Result<Slot<'_>, Response> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining: no new sessions here",
            ));
        }
        let held = match self.table.admit(self.credential_of(&exchange.headers)) {
            Ok(slot) => return Ok(slot),
            Err(held) => held,
        };
        metrics::inc(&self.metrics.refused, metrics::Refusal::TooManySessions);
        warn!(
            sessions = held,
            "a credential reached its session limit; new session refused"
        );
        Err(json_response(
            StatusCode::TOO_MANY_REQUESTS,
            protocol::error_body(
                exchange.request_id(),
                TOO_MANY_SESSIONS,
                "Too many sessions for this credential",
            ),
        ))
    }

    fn forget(&self, id: &SessionId) {
        self.table.unmap(id);
        self.toucher.forget(id);
    }

    /// Drops sessions unused for longer than the session TTL: the store has let them expire.
    fn forget_idle(&self) -> usize {
        let idle = self.table.idle(self.config.session_ttl);
        for id in &idle {
            self.forget(id);
        }
        idle.len()
    }

    /// A write of `operation` for `id` failed: the session is served from memory and written
    /// back by [`Self::maintain`] when the store takes writes again.
    fn mark_unstored(&self, id: &SessionId, operation: &'static str) {
        self.metrics
            .store_write_failures
            .get_or_create(&metrics::OperationLabels { operation })
            .inc();
        let mut unstored = self.unstored.lock().unwrap_or_else(|p| p.into_inner());
        unstored.insert(id.clone());
        self.metrics.unstored.set(unstored.len() as i64);
    }

    /// Sessions served from memory because the store lacks them.
    fn unstored_count(&self) -> usize {
        self.unstored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Writes a session this proxy serves back into the store, which lost it or was down.
    async fn restore(&self, id: &SessionId) {
        let Some(session) = self.table.stored_copy(id, self.config.pod_name.clone()) else {
            return;
        };
        match self.store.create_or_rehydrate(id, session).await {
            Ok(_) => {
                let mut unstored = self.unstored.lock().unwrap_or_else(|p| p.into_inner());
                if unstored.remove(id) {
                    info!(session = %id, "session written back to the store");
                }
                self.metrics.unstored.set(unstored.len() as i64);
            }
            Err(error) => {
                debug!(session = %id, %error, "the store does not take the session yet");
                self.mark_unstored(id, "restore");
            }
        }
    }

    /// Until the process ends: retries writing every session the store lacks, and drops
    /// sessions that have been idle past their TTL.
    async fn maintain(self: Arc<Self>) {
        let mut ticks = 0_u64;
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
            ticks += 1;
            if ticks.is_multiple_of(30) {
                let forgotten = self.forget_idle();
                if forgotten > 0 {
                    info!(forgotten, "dropped sessions idle past their TTL");
                }
            }
        }
    }

    async fn handle(self: Arc<Self>, request: Request) -> Response {
        let started = Instant::now();
        let method = request.method().clone();
        let mut response = self.receive(request).await;
        if self.draining.load(Ordering::SeqCst) {
            // Clients reconnect through the Service, to another pod.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
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

    /// Refuses a page of a foreign origin, reads the request whole (its body bounded in size,
    /// and in time by the listener), and routes it. A request counts as in flight only once it
    /// has arrived, so a stalled upload never holds a drain.
    async fn receive(self: &Arc<Self>, request: Request) -> Response {
        if let Some(origin) = request.headers().get(header::ORIGIN)
            && !self.config.allowed_origins.allows(origin)
        {
            warn!(
                ?origin,
                "refused a request from a web page whose origin is not allowed"
            );
            return error_answer(
                None,
                StatusCode::FORBIDDEN,
                -32000,
                "Forbidden: this Origin may not send requests (see --allowed-origin)",
            );
        }
        let (parts, body) = request.into_parts();
        let body = match http_body_util::Limited::new(body, self.config.max_body_bytes)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(error) if error.is::<http_body_util::LengthLimitError>() => {
                return plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
            }
            Err(error) => {
                debug!(%error, "a request body that never arrived whole");
                return plain(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body did not arrive in time",
                );
            }
        };
        let _in_flight = InFlight::count(&self.in_flight);
        self.route(parts, body).await
    }

    async fn route(self: &Arc<Self>, parts: axum::http::request::Parts, body: Bytes) -> Response {
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let head = (parts.method == Method::POST)
            .then(|| MessageHead::of(&body))
            .flatten();
        let mut exchange = Exchange {
            method: parts.method,
            path,
            headers: parts.headers,
            body,
            head,
            session: None,
        };
        let Some(session) = exchange.headers.get(&SESSION_HEADER) else {
            if exchange.method == Method::POST
                && let Some(id) = legacy::session_in_query(&exchange.path)
            {
                return legacy::post(self, exchange, &id).await;
            }
            if exchange.is_method("initialize") {
                return self.initialize(exchange).await;
            }
            // No session: a stateless exchange, passed through untouched.
            return self.respond(exchange).await;
        };
        let id = match session.to_str().ok().map(SessionId::parse) {
            Some(Ok(id)) => id,
            _ => return self.unknown(Unknown::Invalid, exchange.request_id(), "invalid"),
        };
        let credential = self.credential_of(&exchange.headers);
        // Event ids are the proxy's; the upstream's mean nothing to it.
        let last_event_id = exchange.headers.remove(&LAST_EVENT_ID_HEADER);
        exchange.session = Some(Bound { id, credential });
        match last_event_id {
            Some(last) if exchange.method == Method::GET => {
                let last = last.to_str().unwrap_or_default().to_owned();
                self.resume(exchange, &last).await
            }
            _ => self.respond(exchange).await,
        }
    }

    /// Sends the request upstream and delivers the answer.
    async fn respond(self: &Arc<Self>, exchange: Exchange) -> Response {
        let answer = match self.exchange(&exchange).await {
            Ok(answer) => answer,
            Err(failure) => return self.failure(failure, &exchange),
        };
        if let Some(bound) = &exchange.session {
            let status = answer.response.status();
            if status.is_success() {
                self.record_setup(&bound.id, &exchange);
            }
            self.after_answer(&exchange.method, &bound.id, status).await;
        }
        self.deliver(exchange, answer.response, None).await
    }

    /// Keeps what a request set up in the session (a subscription, the log level), in memory
    /// and in the store, for the replays to set it up again.
    fn record_setup(&self, id: &SessionId, exchange: &Exchange) {
        let Some(change) = exchange
            .head
            .as_ref()
            .and_then(|head| head.method.as_deref())
            .filter(|method| protocol::SETUP_METHODS.contains(method))
            .and_then(|_| protocol::setup_change(&exchange.body))
        else {
            return;
        };
        if self.table.record_setup(id, change.clone()) {
            let patch = SessionPatch {
                setup: Some(change),
                ..Default::default()
            };
            self.patch_in_background(id, patch);
        }
    }

    /// Bookkeeping after the upstream answered a session's request.
    async fn after_answer(&self, method: &Method, id: &SessionId, status: StatusCode) {
        if *method == Method::DELETE && status.is_success() {
            self.forget(id);
            if let Err(error) = self.store.delete(id).await {
                warn!(session = %id, %error, "cannot delete the session from the store");
            }
            return;
        }
        match self
            .toucher
            .touch(id, self.config.pod_name.as_deref())
            .await
        {
            Ok(Touched::Gone) => self.restore(id).await,
            Ok(Touched::Draining) => self.take_over(id).await,
            Ok(Touched::Written | Touched::Skipped) => {}
            Err(error) => {
                debug!(session = %id, %error, "touch failed; the store may be down or full");
                self.mark_unstored(id, "touch");
            }
        }
    }

    /// Another pod drained (or the operator swept) a session this proxy serves too (requests
    /// of one session may reach any pod): it is open upstream here already, so a claim is all
    /// the takeover needs. Counted as a rehydration, like a replayed one.
    async fn take_over(&self, id: &SessionId) {
        let Some(credential) = self.table.credential_of(id) else {
            return;
        };
        let Some(claimed) = self.claim_here(id, credential).await else {
            return;
        };
        let outcome = match claimed {
            Ok(ClaimOutcome::Claimed { from_draining, .. }) => {
                info!(session = %id, "took over a drained session served here");
                if from_draining {
                    self.report(Tally::Rehydrated, 1);
                }
                metrics::Claim::Claimed
            }
            Ok(ClaimOutcome::CredentialMismatch) => metrics::Claim::OtherCredential,
            Ok(_) => metrics::Claim::Shared,
            Err(error) => {
                warn!(session = %id, %error, "cannot claim a drained session served here");
                metrics::Claim::Failed
            }
        };
        metrics::inc(&self.metrics.claims, outcome);
    }

    /// Claims `id` for this pod, as `credential`. `None` where no claim is made: a proxy without
    /// a pod name, or a draining one (clients reach it until the endpoints drop it, but what it
    /// claimed now would be orphaned when it exits).
    async fn claim_here(
        &self,
        id: &SessionId,
        credential: Option<String>,
    ) -> Option<store::Result<ClaimOutcome>> {
        let pod = self.config.pod_name.clone()?;
        if self.draining.load(Ordering::SeqCst) {
            return None;
        }
        let claim = Claim {
            pod,
            credential_fingerprint: credential,
        };
        Some(self.store.claim(id, claim).await)
    }

    /// Sends the request to the upstream until it answers: for a session, through its upstream
    /// session (replayed when the upstream does not know it); held while the upstream is down;
    /// sent again when the upstream lost it, if that is safe.
    async fn exchange(&self, exchange: &Exchange) -> Result<Answer, Failure> {
        let mut held = false;
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            let upstream_id = match &exchange.session {
                Some(bound) => Some(self.upstream_session(bound, exchange).await?),
                None => None,
            };
            let mut headers = exchange.headers.clone();
            if let Some(upstream_id) = &upstream_id {
                headers.insert(SESSION_HEADER, header_or_empty(upstream_id));
            }
            let sent = self
                .upstream
                .send(
                    &exchange.method,
                    &exchange.path,
                    &headers,
                    exchange.body.clone(),
                )
                .await;
            match sent {
                Ok(answer) => {
                    held |= answer.held;
                    let (Some(bound), Some(upstream_id)) = (&exchange.session, &upstream_id) else {
                        break Ok(answer);
                    };
                    match session_signal(answer).await {
                        // The upstream lost the session (it restarted): replay and send again.
                        Signal::UnknownSession if attempt < MAX_ATTEMPTS => {
                            debug!(session = %bound.id, "the upstream does not know the session; replaying the handshake");
                            self.table.invalidate(&bound.id, upstream_id);
                        }
                        Signal::UnknownSession => {
                            break Err(Failure::Upstream(UpstreamError::Unavailable(
                                self.config.hold,
                                "the MCP server keeps refusing the replayed session".into(),
                            )));
                        }
                        Signal::Answer(answer) => break Ok(answer),
                    }
                }
                Err(UpstreamError::Lost(reason))
                    if attempt < MAX_ATTEMPTS && self.may_resend(exchange) =>
                {
                    debug!(%reason, "the upstream lost a request that is safe to send again");
                    // A server shutting down may still take connections: let it go first.
                    tokio::time::sleep(Duration::from_millis(50) * attempt).await;
                    metrics::inc(&self.metrics.unanswered, metrics::Unanswered::Resent);
                }
                Err(error) => break Err(Failure::Upstream(error)),
            }
        };
        if held {
            self.metrics.held.inc();
        }
        result
    }

    fn may_resend(&self, exchange: &Exchange) -> bool {
        exchange.head.as_ref().is_some_and(|h| self.retry.allows(h))
    }

    /// The upstream session of `bound`: the mapped one, or a fresh one from a replay.
    async fn upstream_session(
        &self,
        bound: &Bound,
        exchange: &Exchange,
    ) -> Result<String, Failure> {
        let mut lookup = self.lookup(bound);
        if let (Lookup::Unbound, Some(credential)) = (&lookup, &bound.credential) {
            self.bind(&bound.id, credential).await?;
            lookup = self.lookup(bound);
        }
        match lookup {
            Lookup::Live(upstream_id) => Ok(upstream_id),
            Lookup::Refused(unknown) => Err(Failure::Unknown(unknown)),
            Lookup::Stale | Lookup::Absent | Lookup::Unbound => self.replay(bound, exchange).await,
        }
    }

    /// The upstream's response for the client: hop-by-hop headers dropped, the upstream's
    /// session id replaced by the proxy's; event streams through a [`relay`], `backlog` first.
    async fn deliver(
        self: &Arc<Self>,
        exchange: Exchange,
        response: hyper::Response<Body>,
        resumed: Option<relay::Resumed>,
    ) -> Response {
        let (mut parts, body) = response.into_parts();
        protocol::strip_hop_by_hop(&mut parts.headers);
        if let Some(bound) = &exchange.session {
            parts
                .headers
                .insert(SESSION_HEADER, header_or_empty(bound.id.as_str()));
        }
        let event_stream = protocol::is_event_stream(&parts.headers);
        if event_stream && exchange.session.is_none() && legacy::opens_session(&exchange) {
            let response = hyper::Response::from_parts(parts, body);
            return legacy::open(self, exchange, response).await;
        }
        if event_stream {
            parts.headers.remove(header::CONTENT_LENGTH);
            let body = relay::start(self.clone(), exchange, body, resumed);
            return Response::from_parts(parts, body);
        }
        if parts.status.is_success()
            && (exchange.is_method("tools/list") || exchange.is_method("initialize"))
        {
            // A JSON answer is one complete message: read it for what the proxy learns of it.
            let limited = http_body_util::Limited::new(body, self.config.max_body_bytes);
            return match limited.collect().await {
                Ok(collected) => {
                    let bytes = collected.to_bytes();
                    self.observe(&exchange, &bytes);
                    Response::from_parts(parts, Body::from(bytes))
                }
                Err(error) => self.failure(
                    Failure::Upstream(UpstreamError::Lost(error.to_string())),
                    &exchange,
                ),
            };
        }
        Response::from_parts(parts, body)
    }

    /// A new session: forward `initialize`, then give the client an id of our own.
    async fn initialize(self: &Arc<Self>, mut exchange: Exchange) -> Response {
        let params = protocol::initialize_params(protocol::message(&exchange.body).as_ref())
            .unwrap_or(Value::Null);
        // Kept for the session's life, in memory and in the store: bounded.
        let size = serde_json::to_string(&params).map_or(0, |text| text.len());
        if size > self.config.max_initialize_bytes {
            metrics::inc(&self.metrics.refused, metrics::Refusal::InitializeTooLarge);
            return error_answer(
                exchange.request_id(),
                StatusCode::PAYLOAD_TOO_LARGE,
                INVALID_PARAMS,
                &format!(
                    "initialize params of {size} bytes exceed this proxy's limit of {} (--max-initialize-bytes)",
                    self.config.max_initialize_bytes
                ),
            );
        }
        let slot = match self.admit(&exchange) {
            Ok(slot) => slot,
            Err(refusal) => return refusal,
        };
        let credential = slot.credential.clone();
        let answer = match self.exchange(&exchange).await {
            Ok(answer) => answer,
            Err(failure) => return self.failure(failure, &exchange),
        };
        let Some(upstream_id) = answer
            .response
            .headers()
            .get(&SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
        else {
            // A server that issues no session id: nothing to keep.
            return self.deliver(exchange, answer.response, None).await;
        };
        let id = SessionId::random();
        let new = NewSession {
            owner_pod: self.config.pod_name.clone(),
            protocol_version: protocol::requested_version(&params),
            initialize_params: Some(params),
            credential_fingerprint: credential.clone(),
            ..Default::default()
        };
        self.table.remember(
            &id,
            upstream_id,
            Transport::Streamable,
            new.clone(),
            Some(slot),
        );
        if let Err(error) = self.store.create_or_rehydrate(&id, new).await {
            // Served from memory meanwhile, and written as soon as the store is back.
            warn!(session = %id, %error, "cannot store the new session");
            self.mark_unstored(&id, "create");
        }
        info!(session = %id, "session created");
        exchange.session = Some(Bound { id, credential });
        self.deliver(exchange, answer.response, None).await
    }

    /// Learns from a message the upstream sent in answer to `exchange`: which tools are safe to
    /// call again, and the protocol version it negotiated.
    fn observe(&self, exchange: &Exchange, message: &[u8]) {
        if exchange.is_method("tools/list") {
            self.retry.learn(message);
        } else if exchange.is_method("initialize")
            && let Some(bound) = &exchange.session
        {
            self.negotiated(&bound.id, message);
        }
    }

    /// Records the protocol version the upstream chose in its `initialize` answer, which the
    /// replays then announce.
    fn negotiated(&self, id: &SessionId, answer: &[u8]) {
        let Some(version) = protocol::negotiated_version(answer) else {
            return;
        };
        if !self.table.set_protocol_version(id, &version) {
            return;
        }
        let patch = SessionPatch {
            protocol_version: Some(version),
            ..Default::default()
        };
        self.patch_in_background(id, patch);
    }

    /// Writes what the proxy learned of a session to the store, off the request path: the copy
    /// in memory already has it, and is written back whole if the store lost the session.
    fn patch_in_background(&self, id: &SessionId, patch: SessionPatch) {
        let (store, id) = (self.store.clone(), id.clone());
        let failures = self.metrics.store_write_failures.clone();
        tokio::spawn(async move {
            if let Err(error) = store.update(&id, patch).await {
                failures
                    .get_or_create(&metrics::OperationLabels {
                        operation: "update",
                    })
                    .inc();
                warn!(session = %id, %error, "cannot update the session in the store");
            }
        });
    }

    /// A GET with `Last-Event-ID`: the logged events that followed it on its stream, then (for
    /// a listening stream) the live stream.
    async fn resume(self: &Arc<Self>, exchange: Exchange, last_event_id: &str) -> Response {
        let Some(bound) = &exchange.session else {
            return self.respond(exchange).await;
        };
        let Some((tag, seq)) = StreamTag::parse(last_event_id) else {
            debug!(session = %bound.id, "Last-Event-ID is not one of ours; opening a new stream");
            return self.respond(exchange).await;
        };
        // Only the session's own credential reads its log.
        if let Err(failure) = self.authorize(bound).await {
            return self.failure(failure, &exchange);
        }
        let log = match self.store.events(&bound.id).await {
            Ok(log) => log,
            Err(error) => {
                warn!(session = %bound.id, %error, "cannot read the event log; resuming without it");
                Vec::new()
            }
        };
        let upstream_last = events::last_upstream_id(&log, tag);
        let backlog = events::after(log, tag, seq);
        let kind = match tag.kind {
            StreamKind::Listen => "listen",
            StreamKind::Response => "response",
        };
        self.metrics
            .resumed
            .get_or_create(&KindLabels { kind })
            .inc();
        info!(session = %bound.id, stream = %tag, after = seq, replayed = backlog.len(), "stream resumed");
        match tag.kind {
            StreamKind::Listen => match self.exchange(&exchange).await {
                Ok(answer) => {
                    let resumed = relay::Resumed {
                        tag,
                        after: seq,
                        backlog,
                    };
                    self.deliver(exchange, answer.response, Some(resumed)).await
                }
                Err(failure) => self.failure(failure, &exchange),
            },
            // A POST's stream: what was logged of it, which ends with its response; if the log
            // ends before the response (the stream was cut), what the upstream kept after its
            // own last event id, where it still has the session.
            StreamKind::Response => {
                let answered = backlog.iter().any(|(_, e)| {
                    MessageHead::of(e.data.as_bytes()).is_some_and(|h| h.is_response())
                });
                if !answered
                    && let Some(upstream_last) = upstream_last
                    && let Some(body) = self
                        .upstream_events_after(bound, &exchange, &upstream_last)
                        .await
                {
                    let resumed = relay::Resumed {
                        tag,
                        after: seq,
                        backlog,
                    };
                    let response = hyper::Response::builder()
                        .status(StatusCode::OK)
                        .header(header::CONTENT_TYPE, "text/event-stream")
                        .body(body)
                        .unwrap_or_default();
                    return self.deliver(exchange, response, Some(resumed)).await;
                }
                let mut body = Vec::new();
                for (_, event) in backlog {
                    body.extend_from_slice(&relay::logged_event(event).encode());
                }
                (
                    StatusCode::OK,
                    [
                        (
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("text/event-stream"),
                        ),
                        (SESSION_HEADER, header_or_empty(bound.id.as_str())),
                    ],
                    body,
                )
                    .into_response()
            }
        }
    }

    /// The events the upstream kept after its event `last`, from the session's live upstream
    /// session (never a replayed one, which cannot know them): how a response stream the
    /// upstream closed, or the client lost, goes on. `None` if the upstream keeps none.
    async fn upstream_events_after(
        &self,
        bound: &Bound,
        exchange: &Exchange,
        last: &str,
    ) -> Option<Body> {
        let Lookup::Live(upstream_id) = self.lookup(bound) else {
            return None;
        };
        let mut headers = exchange.headers.clone();
        headers.remove(header::CONTENT_TYPE);
        headers.insert(SESSION_HEADER, protocol::header_value(&upstream_id)?);
        headers.insert(LAST_EVENT_ID_HEADER, protocol::header_value(last)?);
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
        let answer = match self
            .upstream
            .send(&Method::GET, &exchange.path, &headers, Bytes::new())
            .await
        {
            Ok(answer) => answer,
            Err(error) => {
                debug!(%error, "cannot resume the stream upstream");
                return None;
            }
        };
        let status = answer.response.status();
        if status.is_success() && protocol::is_event_stream(answer.response.headers()) {
            Some(answer.response.into_body())
        } else {
            debug!(%status, "the upstream did not resume the stream");
            None
        }
    }

    /// Is `bound.credential` the one the session is bound to (binding a session bound to
    /// nobody)?
    async fn authorize(&self, bound: &Bound) -> Result<(), Failure> {
        let binding = match self.lookup(bound) {
            Lookup::Live(_) | Lookup::Stale => return Ok(()),
            Lookup::Refused(unknown) => return Err(Failure::Unknown(unknown)),
            Lookup::Unbound => Binding::Unbound,
            Lookup::Absent => match self.stored(&bound.id).await? {
                Some(session) => binding::check(
                    session.record.credential_fingerprint.as_deref(),
                    bound.credential.as_deref(),
                ),
                None => return Err(Failure::Unknown(Unknown::NotFound)),
            },
        };
        match (binding, &bound.credential) {
            (Binding::Matches, _) => Ok(()),
            (Binding::Unbound, Some(credential)) => self.bind(&bound.id, credential).await,
            _ => Err(Failure::Unknown(Unknown::OtherCredential)),
        }
    }

    /// The stored session; while the store does not answer (a Redis restart or fail-over),
    /// tried again with backoff for up to the hold time, as requests are held while the
    /// upstream restarts.
    async fn stored(&self, id: &SessionId) -> Result<Option<Session>, Failure> {
        let deadline = Instant::now() + self.config.hold;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.store.get(id).await {
                Ok(found) => return Ok(found),
                // A record that does not parse stays what it is: no point in waiting.
                Err(error @ StoreError::Unreadable(_)) => {
                    warn!(session = %id, %error, "the stored session cannot be read");
                    return Ok(None);
                }
                Err(error) if Instant::now() + pause >= deadline => {
                    warn!(session = %id, %error, "cannot read the session from the store");
                    return Err(Failure::Store(error));
                }
                Err(error) => {
                    debug!(session = %id, %error, "the store does not answer; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Makes a fresh upstream session for the client's session from the stored handshake,
    /// at the MCP endpoint the client uses; then, unless the request is the listening stream's
    /// own, lets that stream reopen before the request goes on.
    async fn replay(&self, bound: &Bound, exchange: &Exchange) -> Result<String, Failure> {
        let id = &bound.id;
        let lock = self
            .replays
            .lock()
            .await
            .entry(id.clone())
            .or_default()
            .clone();
        let result = {
            let _one_at_a_time = lock.lock().await;
            self.replay_locked(bound, exchange)
                .instrument(info_span!("replay", session = %id))
                .await
        };
        // The lock only orders the requests that arrive during a replay: the last one out
        // removes it, so the map does not keep an entry per session ever replayed.
        {
            let mut replays = self.replays.lock().await;
            if replays
                .get(id)
                .is_some_and(|current| Arc::ptr_eq(current, &lock))
                && Arc::strong_count(&lock) == 2
            {
                replays.remove(id);
            }
        }
        if result.is_ok() && exchange.stream_kind() != StreamKind::Listen {
            self.listeners.reopen(id).await;
        }
        result
    }

    /// What a replay starts from: the store's record where it has one (another pod may have
    /// changed it), else the copy in memory (the store refused or evicted the session, or is
    /// down): an upstream restart never loses a session this proxy serves.
    async fn replay_source(&self, id: &SessionId) -> Result<Option<(NewSession, bool)>, Failure> {
        let in_memory = self.table.stored_copy(id, self.config.pod_name.clone());
        let Some(in_memory) = in_memory else {
            // Nothing here to fall back on: wait out a store outage.
            return Ok(self
                .stored(id)
                .await?
                .map(|session| (NewSession::from_record(session.record), true)));
        };
        match self.store.get(id).await {
            Ok(Some(session)) => Ok(Some((NewSession::from_record(session.record), true))),
            Ok(None) => {
                warn!(session = %id, "the store lacks a session served here; replaying from memory");
                Ok(Some((in_memory, false)))
            }
            Err(error) => {
                debug!(session = %id, %error, "the store is unavailable; replaying from memory");
                Ok(Some((in_memory, false)))
            }
        }
    }

    async fn replay_locked(&self, bound: &Bound, exchange: &Exchange) -> Result<String, Failure> {
        let id = &bound.id;
        let unknown = |why| Err(Failure::Unknown(why));
        match self.lookup(bound) {
            // Another request of this session replayed meanwhile.
            Lookup::Live(upstream_id) => return Ok(upstream_id),
            Lookup::Refused(why) => return unknown(why),
            Lookup::Stale | Lookup::Absent | Lookup::Unbound => {}
        }
        let Some((session, in_store)) = self.replay_source(id).await? else {
            return unknown(Unknown::NotFound);
        };
        let binding = binding::check(
            session.credential_fingerprint.as_deref(),
            bound.credential.as_deref(),
        );
        if binding == Binding::Mismatch {
            return unknown(Unknown::OtherCredential);
        }
        // Whether this call moved the session here, and whether it moved from a drained pod.
        let (mut claimed, mut rehydrating) = (false, false);
        if in_store
            && session.owner_pod != self.config.pod_name
            && let Some(claim) = self.claim_here(id, bound.credential.clone()).await
        {
            let outcome = match claim {
                Ok(ClaimOutcome::Claimed { from_draining, .. }) => {
                    // From the claim, not the record read before it: the session may have
                    // been drained in between.
                    (claimed, rehydrating) = (true, from_draining);
                    metrics::Claim::Claimed
                }
                Ok(ClaimOutcome::CredentialMismatch) => return unknown(Unknown::OtherCredential),
                Ok(ClaimOutcome::NotFound) => return unknown(Unknown::NotFound),
                // Any proxy serves any session; ownership follows the GET stream.
                Ok(_) => metrics::Claim::Shared,
                Err(error) => {
                    warn!(%error, "cannot claim the session");
                    metrics::Claim::Failed
                }
            };
            metrics::inc(&self.metrics.claims, outcome);
        }
        // A claim binds a session bound to nobody; a session served without one is bound here.
        let credential = match (binding, &bound.credential) {
            (Binding::Unbound, Some(credential)) => {
                if !claimed {
                    self.bind(id, credential).await?;
                }
                Some(credential.clone())
            }
            _ => session.credential_fingerprint.clone(),
        };
        let path = exchange.path.split('?').next().unwrap_or(&exchange.path);
        let headers = self.replay_headers(exchange);
        let upstream_id = match self.handshake(path, headers, &session).await? {
            Some(upstream_id) => upstream_id,
            None => {
                metrics::inc(&self.metrics.replays, metrics::Replay::Refused);
                warn!("the upstream refused the replayed initialize; the session is lost");
                // Counted once, by the proxy that took the session over; the client's retries
                // (here or on other pods, which now see it owned) are the same loss.
                if claimed {
                    self.report(Tally::Lost, 1);
                }
                return unknown(Unknown::NotFound);
            }
        };
        metrics::inc(&self.metrics.replays, metrics::Replay::Replayed);
        info!(
            subscriptions = session.setup.subscriptions.len(),
            from_memory = !in_store,
            "handshake replayed to the upstream"
        );
        if rehydrating {
            self.report(Tally::Rehydrated, 1);
        }
        let stored = NewSession {
            owner_pod: self.config.pod_name.clone(),
            credential_fingerprint: credential,
            ..session
        };
        self.table
            .remember(id, upstream_id.clone(), Transport::Streamable, stored, None);
        if !in_store {
            self.restore(id).await;
        }
        Ok(upstream_id)
    }

    /// Headers of the messages a replay sends: the client's credential, JSON in, JSON or an
    /// event stream out.
    fn replay_headers(&self, exchange: &Exchange) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = exchange.headers.get(header::AUTHORIZATION) {
            headers.insert(header::AUTHORIZATION, value.clone());
        }
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers
    }

    /// Sends `session`'s handshake (`initialize`, `notifications/initialized`) and then the
    /// requests that set up what the client had set up (subscriptions, the log level) to the
    /// upstream at `path`; the new upstream session id, `None` if the upstream refused it.
    async fn handshake(
        &self,
        path: &str,
        mut headers: HeaderMap,
        session: &NewSession,
    ) -> Result<Option<String>, Failure> {
        let params = session.initialize_params.clone().unwrap_or(Value::Null);
        let answer = self
            .upstream
            .send(
                &Method::POST,
                path,
                &headers,
                protocol::initialize_request(&params, session.protocol_version.as_deref()),
            )
            .await
            .map_err(Failure::Upstream)?;
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
            return Ok(None);
        };
        headers.insert(SESSION_HEADER, header_or_empty(&upstream_id));
        if let Some(version) = session
            .protocol_version
            .as_deref()
            .and_then(protocol::header_value)
        {
            headers.insert(PROTOCOL_VERSION_HEADER, version);
        }
        let messages = std::iter::once(protocol::initialized_notification())
            .chain(protocol::setup_requests(&session.setup));
        for message in messages {
            match self
                .upstream
                .send(&Method::POST, path, &headers, message)
                .await
            {
                Ok(answer) => {
                    let status = answer.response.status();
                    let _ = answer.response.into_body().collect().await;
                    if !status.is_success() {
                        warn!(%status, "the upstream refused a replayed setup request");
                    }
                }
                Err(error) => warn!(%error, "cannot replay a setup request"),
            }
        }
        Ok(Some(upstream_id))
    }

    fn failure(&self, failure: Failure, exchange: &Exchange) -> Response {
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

    fn unknown(&self, why: Unknown, request_id: Option<Value>, id: &str) -> Response {
        let outcome = match why {
            Unknown::NotFound => metrics::Refusal::NotFound,
            Unknown::OtherCredential => metrics::Refusal::OtherCredential,
            Unknown::Invalid => metrics::Refusal::InvalidId,
        };
        metrics::inc(&self.metrics.refused, outcome);
        if matches!(why, Unknown::OtherCredential) {
            warn!(session = %id, "a session was presented with another credential; answered as unknown");
        }
        json_response(
            StatusCode::NOT_FOUND,
            protocol::error_body(request_id, SESSION_NOT_FOUND, "Session not found"),
        )
    }

    fn upstream_failure(&self, error: UpstreamError, request_id: Option<Value>) -> Response {
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

    /// Adds to the store's running tallies, which the operator reads per rollout; off the
    /// request path, and a failure only costs accuracy of those counts.
    fn report(&self, tally: Tally, n: u64) {
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(error) = store.tally(tally, n).await {
                warn!(%error, tally = tally.field(), n, "cannot report to the store's tallies");
            }
        });
    }

    /// Stops taking sessions, ends listening streams with a `retry` hint, lets in-flight
    /// requests finish (up to the drain timeout), and marks this proxy's sessions draining in
    /// the store so that any pod can claim them.
    ///
    /// Every caller returns when the one drain is done: each container's preStop hook calls it,
    /// and the backend's must not return (letting the kubelet stop the backend) any earlier.
    pub async fn drain(&self) -> u64 {
        *self.drained.get_or_init(|| self.drain_once()).await
    }

    async fn drain_once(&self) -> u64 {
        self.draining.store(true, Ordering::SeqCst);
        let started = *self.drain_started.get_or_init(Instant::now);
        self.phase.send_replace(Phase::Draining);
        let deadline = started + self.config.drain_timeout;
        while self.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The sessions this pod owns: those it serves (the store skips any that another pod
        // owns, requests of a session may reach any pod) and any the store names it owner of
        // that it does not hold (a restarted proxy container).
        let owner = self.config.pod_name.as_deref();
        let mut ids: std::collections::BTreeSet<SessionId> = self.table.ids().into_iter().collect();
        if let Some(pod) = owner {
            match self.store.sessions_of_pod(pod, DRAIN_BATCH).await {
                Ok(owned) => ids.extend(owned),
                Err(error) => warn!(%error, "cannot list this pod's sessions in the store"),
            }
        }
        let drained =
            store::mark_all_draining(&*self.store, &ids, owner, self.config.drain_timeout).await;
        // Awaited: the process may exit right after the drain.
        if drained > 0
            && let Err(error) = self.store.tally(Tally::Drained, drained).await
        {
            warn!(%error, drained, "cannot report the drain to the store's tallies");
        }
        self.events.flush().await;
        self.metrics
            .drain_duration
            .observe(started.elapsed().as_secs_f64());
        info!(
            drained,
            seconds = started.elapsed().as_secs_f64(),
            "drained"
        );
        drained
    }
}

/// How long a quiesce waits for the proxy's own SIGTERM: a terminating pod stops every
/// container at once, so a retirement that starts this soon after the backend's preStop is the
/// same pod stop, not an in-place restart of the backend.
const RETIRE_SETTLE: Duration = Duration::from_secs(1);

/// What a quiesce ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quiesced {
    /// Nothing is in flight and new requests wait for the upstream's restart.
    Holding,
    /// The pod is terminating: the proxy retired, its sessions handed over.
    Retired,
}

impl Proxy {
    /// The upstream is about to stop (its preStop hook, or `dev` before a restart): new
    /// requests are held, and this returns once those the upstream is working on have finished
    /// (or the drain timeout). Held requests go to the upstream once it has restarted, or at
    /// the drain deadline if it never stops. In a terminating pod, waits for the retirement
    /// instead. See [`quiesce`].
    pub async fn quiesce(self: &Arc<Self>) -> Quiesced {
        let _one_at_a_time = self.quiescing.lock().await;
        let started = Instant::now();
        let deadline = started + self.config.drain_timeout;
        self.hold_upstream().await;
        let mut phase = self.phase.subscribe();
        let retiring =
            tokio::time::timeout(RETIRE_SETTLE, phase.wait_for(|p| *p >= Phase::Draining))
                .await
                .is_ok_and(|changed| changed.is_ok());
        if retiring {
            self.resume_upstream();
            self.retire().await;
            info!("quiesce: the pod is terminating; retired");
            return Quiesced::Retired;
        }
        info!("quiesced: new requests wait for the upstream's restart");
        if !self.following_restart.swap(true, Ordering::SeqCst) {
            let proxy = self.clone();
            tokio::spawn(async move {
                let restart = quiesce::follow_restart(&proxy.upstream.address(), deadline).await;
                proxy.resume_upstream();
                proxy.following_restart.store(false, Ordering::SeqCst);
                info!(?restart, held_for = ?started.elapsed(), "resumed: held requests go to the upstream");
            });
        }
        Quiesced::Holding
    }

    /// Holds new requests (unless the proxy retires, which needs the upstream to the end) and
    /// returns once the upstream has finished those it was working on, or the drain timeout:
    /// the upstream may stop now without losing a call. `dev` calls it before restarting its
    /// child; [`Self::resume_upstream`] lets the held requests go.
    pub async fn hold_upstream(&self) {
        let started = Instant::now();
        let gate = self.upstream.gate();
        if *self.phase.borrow() == Phase::Serving {
            gate.close();
        }
        if !gate.idle(started + self.config.drain_timeout).await {
            warn!(
                in_flight = gate.in_flight(),
                "quiesce: the upstream did not finish its requests within the drain timeout"
            );
        }
        self.metrics
            .quiesce_duration
            .observe(started.elapsed().as_secs_f64());
    }

    /// Sends held requests (and every new one) to the upstream again.
    pub fn resume_upstream(&self) {
        self.upstream.gate().open();
    }

    /// Requests waiting for the upstream to be resumed.
    pub fn held_requests(&self) -> usize {
        self.upstream.gate().waiting()
    }

    /// Handshakes replayed since the proxy started.
    pub fn replays(&self) -> u64 {
        self.metrics
            .replays
            .get_or_create(&metrics::OutcomeLabels {
                outcome: metrics::Replay::Replayed,
            })
            .get()
    }

    /// Whether new requests are held for a restarting upstream.
    pub fn quiesced(&self) -> bool {
        self.upstream.gate().state() == quiesce::GateState::Quiesced
    }

    /// The whole stop of a pod: the drain, then answering on until the clients have gone (or
    /// the drain deadline). SIGTERM runs it, and a quiesce in a terminating pod waits on it;
    /// concurrent callers share the one drain. A retiring pod's backend serves until its
    /// clients have moved: retiring lifts a quiesce.
    pub async fn retire(&self) -> u64 {
        self.resume_upstream();
        let drained = self.drain().await;
        self.linger().await;
        drained
    }

    /// After a drain, keeps answering (each answer with `Connection: close`) until the clients
    /// have closed their connections, or the drain deadline; then ends whatever still streams,
    /// with a hint to resume elsewhere.
    async fn linger(&self) {
        let started = *self.drain_started.get_or_init(Instant::now);
        let deadline = started + self.config.drain_timeout;
        while Instant::now() < deadline
            && (self.connections.load(Ordering::SeqCst) > 0
                || self.in_flight.load(Ordering::SeqCst) > 0)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.phase.send_replace(Phase::Closing);
        let open = self.connections.load(Ordering::SeqCst);
        if open > 0 {
            info!(open, "drain deadline: closing the remaining connections");
            // The relays write their hints before the connections go.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A request in flight, until dropped (also when its client goes away mid-request).
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn count(in_flight: &'a AtomicUsize) -> Self {
        in_flight.fetch_add(1, Ordering::SeqCst);
        Self(in_flight)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn header_or_empty(value: &str) -> HeaderValue {
    HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn plain(status: StatusCode, message: &'static str) -> Response {
    (status, message).into_response()
}

/// A JSON-RPC error for the request (HTTP 200: the client's request failed, not the HTTP
/// exchange), or `status` for a message without an id.
fn error_answer(
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
    let (succeed, current) = succession::current(proxy.clone());
    let app = Router::new().fallback({
        let current = current.clone();
        move |request: Request| current.get().handle(request)
    });
    info!(%listen, upstream = %proxy.config.upstream, %admin, store = %proxy.store.describe(), "session proxy serving");
    let listeners = proxy.metrics.listeners.clone();
    tokio::spawn(admin::serve(current, admin_listener, listeners.of("admin")));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let open = proxy.connections.clone();
    let server = tokio::spawn(serve::serve(
        listener,
        app,
        proxy.config.limits,
        listeners.of("mcp"),
        move |tcp| {
            let open = open.clone();
            async move { Some(connections::Counted::new(tcp, open)) }
        },
        async move {
            let _ = stopped.await;
        },
    ));
    succession::serve(proxy, succeed, shutdown).await;
    let _ = stop.send(());
    let _ = server.await;
    Ok(())
}
