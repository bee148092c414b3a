//! The request path: every client request enters at [`Proxy::handle`], is read whole and routed
//! (a new session, a session's request, a resumption, a stateless exchange), and its answer is
//! delivered, event streams through a [`relay`](crate::proxy::stream::relay).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use bytes::Bytes;
use http_body_util::BodyExt as _;
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::api::contract::HOP_HEADER;
use crate::proxy::answers::{
    Failure, INVALID_PARAMS, REFUSED, TOO_MANY_SESSIONS, Unknown, error_answer, header_or_empty,
    json_response, plain,
};
use crate::proxy::legacy::host::SseHost;
use crate::proxy::mcp::protocol::{self, LAST_EVENT_ID_HEADER, MessageHead, SESSION_HEADER};
use crate::proxy::metrics::RequestLabels;
use crate::proxy::session::exchange::{Bound, Exchange};
use crate::proxy::session::pinned::Adoption;
use crate::proxy::session::table::{Lookup, Mapping, Refusal, Slot, Transport, UpstreamSession};
use crate::proxy::stream::host::StreamHost;
use crate::proxy::upstream::UpstreamError;
use crate::proxy::{Proxy, legacy, metrics, stream::relay};
use crate::store::{NewSession, SessionId, SessionPatch};

impl Proxy {
    pub(super) async fn handle(self: Arc<Self>, request: Request) -> Response {
        let started = Instant::now();
        let method = request.method().clone();
        // Another proxy's connection to this one, which only a stop of this one ends.
        let hop = request.headers().contains_key(HOP_HEADER);
        let mut response = self.receive(request).await;
        if self.lifecycle.draining() && !hop {
            // Clients reconnect through the Service, to another pod.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let labels = RequestLabels::of(&method, response.status().as_u16());
        self.metrics.requests.get_or_create(&labels).inc();
        self.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        response
    }

    /// Refuses a page of a foreign origin, reads the request whole (its body bounded in size,
    /// and in time by the listener), and routes it. A request counts as in flight only once it
    /// has arrived, so a stalled upload never holds a drain.
    pub(super) async fn receive(self: &Arc<Self>, request: Request) -> Response {
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
                REFUSED,
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
        let _in_flight = self.lifecycle.in_flight();
        self.route(parts, body).await
    }

    /// Routes a request that arrived whole. The rare routes (a new session, the old transport, a
    /// resumption, an end) and the rare turns of the common one (a replay, a restore) are boxed:
    /// a future is as large as its largest branch, and the common route's is moved and touched
    /// on every request (7 KiB with them inline).
    pub(super) async fn route(
        self: &Arc<Self>,
        parts: axum::http::request::Parts,
        body: Bytes,
    ) -> Response {
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
                return Box::pin(legacy::post(&SseHost::new(self.clone()), exchange, &id)).await;
            }
            if exchange.is_method("initialize") {
                return Box::pin(self.initialize(exchange)).await;
            }
            // No session: a stateless exchange, passed through untouched.
            return self.respond(exchange).await;
        };
        let id = match session.to_str().ok().map(SessionId::parse) {
            Some(Ok(id)) => id,
            _ => return self.unknown(Unknown::Invalid, exchange.request_id(), "invalid"),
        };
        let credential = self.credential_of(&exchange.headers);
        exchange.session = Some(Bound { id, credential });
        // Where sessions stay with their owners' proxies; a gateway pins them to their pods
        // instead (see `session::pinned`).
        if self.config.residence.max_wait().is_some() && !self.pins_sessions() {
            if let Some(answer) = Box::pin(self.route_home(&exchange)).await {
                return answer;
            }
            // A hop's proof is for the policy's proxies, not for the server.
            exchange.headers.remove(HOP_HEADER);
        }
        // Event ids are the proxy's; the upstream's mean nothing to it.
        let last_event_id = exchange.headers.remove(&LAST_EVENT_ID_HEADER);
        if exchange.method == Method::DELETE {
            return Box::pin(self.end(exchange)).await;
        }
        match last_event_id {
            Some(last) if exchange.method == Method::GET => {
                let last = last.to_str().unwrap_or_default().to_owned();
                Box::pin(self.resume(exchange, &last)).await
            }
            _ => self.respond(exchange).await,
        }
    }

    /// A client ends its session (`DELETE`). Where its upstream session here is live, the
    /// upstream ends it. Where there is none (its server restarted, its pod left, or another
    /// pod served it), a replay would open a session on a server only to end it: the proxy ends
    /// the session itself, once the credential is the session's.
    async fn end(self: &Arc<Self>, exchange: Exchange) -> Response {
        let Some(bound) = &exchange.session else {
            return self.respond(exchange).await;
        };
        let live = match self.lookup(bound) {
            Lookup::Live(_) => true,
            // Another gateway replica made it: ended on its pod, where its state is.
            Lookup::Absent if self.pins_sessions() => {
                matches!(self.adopt(bound).await, Ok(Adoption::Adopted(_)))
            }
            _ => false,
        };
        if live {
            // Until it is forgotten, what else of the session meets its server's forgetting
            // it (the listening stream, reopening) is its end, not a loss: here, and on the
            // other replicas of a gateway.
            let _ending = self.ending.enter(&bound.id);
            let id = bound.id.clone();
            self.mark_ending(&id, true).await;
            let response = self.respond(exchange).await;
            if !response.status().is_success() {
                self.mark_ending(&id, false).await;
            }
            return response;
        }
        if let Err(failure) = self.authorize(bound).await {
            return self.failure(failure, &exchange);
        }
        self.after_answer(&Method::DELETE, &bound.id, StatusCode::OK)
            .await;
        StatusCode::OK.into_response()
    }

    /// Sends the request upstream and delivers the answer.
    pub(super) async fn respond(self: &Arc<Self>, exchange: Exchange) -> Response {
        let answer = match self.send_upstream(&exchange).await {
            Ok(answer) => answer,
            Err(failure) => return self.failure(failure, &exchange),
        };
        if exchange.session.is_none()
            && legacy::opens_session(&exchange)
            && protocol::is_event_stream(answer.response.headers())
        {
            return Box::pin(legacy::open(SseHost::new(self.clone()), exchange, answer)).await;
        }
        if let Some(bound) = &exchange.session {
            let status = answer.response.status();
            if status.is_success() {
                self.record_setup(&bound.id, &exchange);
            }
            self.after_answer(&exchange.method, &bound.id, status).await;
        }
        self.deliver(exchange, answer.response, None).await
    }

    /// The upstream's response for the client: hop-by-hop headers dropped, the upstream's
    /// session id replaced by the proxy's; event streams through a [`relay`], `backlog` first.
    pub(super) async fn deliver(
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
        if event_stream {
            parts.headers.remove(header::CONTENT_LENGTH);
            let body = relay::start(StreamHost::new(self.clone()), exchange, body, resumed);
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
    pub(super) async fn initialize(self: &Arc<Self>, mut exchange: Exchange) -> Response {
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
        let answer = match self.send_upstream(&exchange).await {
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
        let upstream = UpstreamSession::new(answer.backend.clone(), upstream_id);
        let new = NewSession {
            protocol_version: protocol::requested_version(&params),
            initialize_params: Some(params),
            credential_fingerprint: credential.clone(),
            ..Default::default()
        }
        .owned_by(self.owner_on(&upstream));
        let mapping = Mapping {
            upstream,
            transport: Transport::Streamable,
            stored: new,
        };
        self.keep_new(&id, mapping, slot).await;
        info!(session = %id, "session created");
        exchange.session = Some(Bound { id, credential });
        self.deliver(exchange, answer.response, None).await
    }

    /// Admits a new session: not while draining, nor beyond the admission limits (per
    /// identity, as the binding sees it: a refreshed token is the same identity; per proxy; the
    /// rate of new identities), answered 429 with `Retry-After`. The slot is taken now, so
    /// concurrent `initialize`s cannot all pass the check.
    #[allow(clippy::result_large_err)] // The refusal is the response, built once.
    pub(super) fn admit(&self, exchange: &Exchange) -> Result<Slot<'_>, Response> {
        if self.lifecycle.draining() {
            return Err(plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining: no new sessions here",
            ));
        }
        let refusal = match self.table.admit(self.credential_of(&exchange.headers)) {
            Ok(slot) => return Ok(slot),
            Err(refusal) => refusal,
        };
        let (outcome, message) = match refusal {
            Refusal::Credential { .. } => (
                metrics::Refusal::TooManySessions,
                "Too many sessions for this credential",
            ),
            Refusal::Proxy { .. } => (
                metrics::Refusal::ProxyFull,
                "This server holds as many sessions as it may; try again later",
            ),
            Refusal::NewIdentities { .. } => (
                metrics::Refusal::NewIdentitiesTooFast,
                "Too many new clients at once; try again later",
            ),
        };
        let refused = metrics::count(&self.metrics.refused, outcome);
        if refused.is_power_of_two() {
            warn!(?refusal, refused, "new session refused: {message}");
        }
        let retry_after = refusal.retry_after().as_secs().max(1);
        let mut response = json_response(
            StatusCode::TOO_MANY_REQUESTS,
            protocol::error_body(exchange.request_id(), TOO_MANY_SESSIONS, message),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        Err(response)
    }

    /// Learns from a message the upstream sent in answer to `exchange`: which tools are safe to
    /// call again, and the protocol version it negotiated.
    pub(super) fn observe(&self, exchange: &Exchange, message: &[u8]) {
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
    pub(super) fn negotiated(&self, id: &SessionId, answer: &[u8]) {
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
}
