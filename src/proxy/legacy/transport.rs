//! MCP's HTTP+SSE transport (2024-11-05): `GET /sse` opens a stream whose first event,
//! `endpoint`, names where the client POSTs its messages (`/messages/?session_id=...`); the
//! answers come back on the stream.
//!
//! The proxy gives the client an endpoint with a session id of its own and keeps the client's
//! stream open while the upstream restarts: it opens a new upstream stream, replays the stored
//! `initialize` and `notifications/initialized` to the new endpoint (hiding the replay's answer
//! from the client), and sends the messages that arrived meanwhile on. The transport has no
//! resumption, and its answers travel on the one stream, so a session lives on the proxy that
//! holds that stream: it ends when the client closes the stream or the proxy drains.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument as _, info, info_span, warn};

use crate::count::Counted;
use crate::proxy::answers::{Failure, UPSTREAM_UNAVAILABLE, Unknown, plain};
use crate::proxy::backoff;
use crate::proxy::legacy::host::SseHost;
use crate::proxy::mcp::protocol::{self, MessageHead};
use crate::proxy::mcp::sse::{self, Event};
use crate::proxy::session::exchange::Exchange;
use crate::proxy::session::table::UpstreamSession;
use crate::proxy::upstream::{Answer, Outbound};
use crate::proxy::{Lookup, Phase, metrics, stream::relay};
use crate::store::SessionId;

/// The revision of this transport.
pub const PROTOCOL_VERSION: &str = "2024-11-05";
/// Query parameters that carry the session in a message endpoint (the Python and TypeScript
/// SDKs' spellings).
const SESSION_PARAMS: [&str; 2] = ["session_id", "sessionId"];
/// How long an upstream may take to announce its endpoint.
const ENDPOINT_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests of HTTP+SSE sessions whose answers have not come back on the stream yet: what a
/// restarted upstream never answers. After the session is re-established, the proxy sends the
/// safe ones again and answers the others with an error.
#[derive(Default)]
pub struct Unanswered {
    by_session: std::sync::Mutex<std::collections::HashMap<SessionId, Vec<Request>>>,
}

#[derive(Clone)]
struct Request {
    id: Value,
    body: Bytes,
    resendable: bool,
    /// Once the upstream accepted it, the request is in flight until its answer comes on the
    /// stream, long after its POST was answered: a quiesce waits for it.
    in_flight: Option<Arc<Counted>>,
}

impl Unanswered {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<SessionId, Vec<Request>>> {
        self.by_session.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, session: &SessionId, request: Request) {
        self.lock()
            .entry(session.clone())
            .or_default()
            .push(request);
    }

    /// The answer to `id` came: forget the request.
    fn answered(&self, session: &SessionId, id: &Value) {
        let mut by_session = self.lock();
        if let Some(requests) = by_session.get_mut(session) {
            requests.retain(|r| r.id != *id);
            if requests.is_empty() {
                by_session.remove(session);
            }
        }
    }

    /// The upstream accepted the request with `id`: in flight until its answer.
    fn delivered(&self, session: &SessionId, id: &Value, in_flight: Counted) {
        let in_flight = Arc::new(in_flight);
        if let Some(request) = self
            .lock()
            .get_mut(session)
            .and_then(|requests| requests.iter_mut().find(|r| r.id == *id))
        {
            request.in_flight = Some(in_flight);
        }
    }

    /// The requests the upstream accepted and has not answered; those still on their way (held
    /// for the restarting upstream) stay: their own POSTs deliver them.
    fn take_delivered(&self, session: &SessionId) -> Vec<Request> {
        let mut by_session = self.lock();
        let Some(requests) = by_session.get_mut(session) else {
            return Vec::new();
        };
        let (delivered, on_their_way) = std::mem::take(requests)
            .into_iter()
            .partition(|request| request.in_flight.is_some());
        *requests = on_their_way;
        if requests.is_empty() {
            by_session.remove(session);
        }
        delivered
    }

    fn take(&self, session: &SessionId) -> Vec<Request> {
        self.lock().remove(session).unwrap_or_default()
    }
}

/// A message endpoint: its path, the query parameter naming the session, and the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    path: String,
    param: String,
    session: String,
}

impl Endpoint {
    /// An `endpoint` event's data: a relative URL with the session in its query.
    pub fn parse(data: &str) -> Option<Self> {
        let url = url::Url::parse("http://upstream.invalid")
            .ok()?
            .join(data.trim())
            .ok()?;
        let (param, session) = url
            .query_pairs()
            .find(|(name, _)| SESSION_PARAMS.contains(&name.as_ref()))?;
        Some(Self {
            path: url.path().to_owned(),
            param: param.into_owned(),
            session: session.into_owned(),
        })
    }

    /// The endpoint with `session` in place of the upstream's.
    pub fn with_session(&self, session: &str) -> String {
        let mut url = url::Url::parse("http://upstream.invalid").expect("a valid base");
        url.set_path(&self.path);
        url.query_pairs_mut().append_pair(&self.param, session);
        match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        }
    }

    pub fn upstream(&self) -> String {
        self.with_session(&self.session)
    }
}

/// A client's `GET .../sse`: the way into an HTTP+SSE session.
pub fn opens_session(exchange: &Exchange) -> bool {
    exchange.method == Method::GET
        && exchange
            .path
            .split('?')
            .next()
            .is_some_and(|path| path.ends_with("/sse"))
}

/// The proxy session a client's message POST names, if its query names one.
pub fn session_in_query(path_and_query: &str) -> Option<String> {
    let url = url::Url::parse("http://client.invalid")
        .ok()?
        .join(path_and_query)
        .ok()?;
    url.query_pairs()
        .find(|(name, _)| SESSION_PARAMS.contains(&name.as_ref()))
        .map(|(_, value)| value.into_owned())
}

/// Reads events until the `endpoint` one; returns it and the events that came after it in the
/// same reads.
async fn read_endpoint(
    body: &mut Body,
    parser: &mut sse::Parser,
) -> Option<(Endpoint, Vec<Event>)> {
    let mut events = Vec::new();
    let read = async {
        loop {
            let frame = body.frame().await?.ok()?;
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            parser.feed(&chunk, &mut events).ok()?;
            if let Some(at) = events
                .iter()
                .position(|e| e.event.as_deref() == Some("endpoint"))
            {
                let endpoint = Endpoint::parse(events[at].data.as_deref()?)?;
                return Some((endpoint, events.split_off(at + 1)));
            }
        }
    };
    tokio::time::timeout(ENDPOINT_TIMEOUT, read).await.ok()?
}

/// A client's `GET /sse` answered by the upstream with an event stream.
pub async fn open(host: SseHost, exchange: Exchange, answer: Answer) -> Response {
    let slot = match host.admit(&exchange) {
        Ok(slot) => slot,
        Err(refusal) => return refusal,
    };
    let (mut parts, mut body) = answer.response.into_parts();
    let mut parser = sse::Parser::default();
    let Some((endpoint, after)) = read_endpoint(&mut body, &mut parser).await else {
        warn!("the upstream's /sse stream announced no message endpoint");
        return plain(
            StatusCode::BAD_GATEWAY,
            "the MCP server announced no message endpoint",
        );
    };
    let id = SessionId::random();
    let upstream = UpstreamSession::new(answer.backend, endpoint.upstream());
    host.create(&id, upstream, slot).await;
    info!(session = %id, transport = "sse", "session created");
    let (out, client) = mpsc::channel(16);
    let announce = Event {
        event: Some("endpoint".into()),
        data: Some(endpoint.with_session(id.as_str())),
        ..Default::default()
    };
    let _ = out.try_send(announce.encode());
    let stream = Stream {
        phase: host.phase(),
        host: host.clone(),
        exchange,
        id: id.clone(),
        out,
    };
    let span = info_span!("sse_stream", session = %id);
    tokio::spawn(stream.run(body, parser, after).instrument(span));
    protocol::strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, relay::channel_body(client))
}

/// A client's message POST: sent to the upstream endpoint of the session, and sent again once
/// the stream is re-established if the upstream restarted meanwhile.
pub async fn post(host: &SseHost, exchange: Exchange, raw_id: &str) -> Response {
    let id = match SessionId::parse(raw_id) {
        Ok(id) => id,
        Err(_) => return host.unknown(Unknown::Invalid, exchange.request_id(), "invalid"),
    };
    let credential = host.credential_of(&exchange.headers);
    if exchange.is_method("initialize") {
        host.remember_initialize(&id, &exchange.body);
    }
    // Registered before it is sent: its answer may come back on the stream before the POST's.
    let request = exchange
        .head
        .as_ref()
        .filter(|head| head.is_request())
        .and_then(|head| head.id.clone())
        .map(|request_id| Request {
            id: request_id,
            body: exchange.body.clone(),
            resendable: host.may_resend(&exchange),
            in_flight: None,
        });
    if let Some(request) = &request {
        host.unanswered().add(&id, request.clone());
    }
    let response = post_until_accepted(host, &exchange, &id, raw_id, credential).await;
    if let Some(request) = request
        && !response.status().is_success()
    {
        host.unanswered().answered(&id, &request.id);
    }
    response
}

async fn post_until_accepted(
    host: &SseHost,
    exchange: &Exchange,
    id: &SessionId,
    raw_id: &str,
    credential: Option<String>,
) -> Response {
    let deadline = Instant::now() + host.hold();
    let mut resend = backoff::RETRY.until(deadline);
    loop {
        // An HTTP+SSE session lives as long as its client's stream, on this proxy: it is
        // never stale (its stream re-establishes it) and never bound later than it began.
        let upstream = match host.lookup(id, credential.as_deref()) {
            Lookup::Live(upstream) => upstream,
            Lookup::Refused(unknown) => {
                return host.unknown(unknown, exchange.request_id(), raw_id);
            }
            Lookup::Unbound => {
                return host.unknown(Unknown::OtherCredential, exchange.request_id(), raw_id);
            }
            Lookup::Stale(_) | Lookup::Absent => {
                return host.unknown(Unknown::NotFound, exchange.request_id(), raw_id);
            }
        };
        let sent = host
            .send(
                &upstream.backend,
                Outbound::post(&upstream.id, &exchange.headers, exchange.body.clone()),
            )
            .await;
        let lost_session = match &sent {
            Ok(answer) => answer.response.status() == StatusCode::NOT_FOUND,
            Err(error) => matches!(error, crate::proxy::UpstreamError::Unreachable(_)),
        };
        match sent {
            // The upstream restarted and does not know the session yet (or, gateway mode, its
            // pod went away): the stream re-establishes it; the message was not processed, so
            // it is sent again then.
            _ if lost_session => {
                if !host.remapped_from(id, &upstream, deadline).await {
                    return host.failure(
                        Failure::Upstream(crate::proxy::UpstreamError::Unavailable(
                            host.hold(),
                            "the MCP server lost the session".into(),
                        )),
                        exchange,
                    );
                }
            }
            Ok(answer) => {
                if answer.held {
                    host.count_held();
                }
                // Taken while the POST's own count still stands (its body is not read yet).
                if let Some(request_id) = exchange.request_id()
                    && answer.response.status().is_success()
                {
                    host.unanswered().delivered(id, &request_id, host.sending());
                }
                host.after_answer(&Method::POST, id, answer.response.status())
                    .await;
                let (mut parts, body) = answer.response.into_parts();
                protocol::strip_hop_by_hop(&mut parts.headers);
                return Response::from_parts(parts, body);
            }
            Err(crate::proxy::UpstreamError::Lost(_))
                if host.may_resend(exchange) && resend.wait().await => {}
            Err(error) => return host.failure(Failure::Upstream(error), exchange),
        }
    }
}

/// Relays a session's upstream stream to the client, across upstream restarts.
struct Stream {
    host: SseHost,
    exchange: Exchange,
    id: SessionId,
    out: mpsc::Sender<Bytes>,
    phase: watch::Receiver<Phase>,
}

enum End {
    Upstream,
    ClientGone,
    Closing,
}

impl Stream {
    async fn run(mut self, mut body: Body, mut parser: sse::Parser, mut pending: Vec<Event>) {
        loop {
            for event in pending.drain(..) {
                if !self.forward(event).await {
                    return self.end().await;
                }
            }
            match self.pump(&mut body, &mut parser).await {
                End::ClientGone => return self.end().await,
                End::Closing => return self.close().await,
                End::Upstream => {}
            }
            match self.reconnect().await {
                Some((next, next_parser, after)) => {
                    body = next;
                    parser = next_parser;
                    pending = after;
                }
                None => return self.close().await,
            }
        }
    }

    async fn pump(&mut self, body: &mut Body, parser: &mut sse::Parser) -> End {
        let mut events = Vec::new();
        loop {
            let frame = tokio::select! {
                biased;
                result = self.phase.wait_for(|p| *p >= Phase::Closing) => {
                    if result.is_ok() { return End::Closing }
                    continue;
                }
                () = self.out.closed() => return End::ClientGone,
                frame = body.frame() => frame,
            };
            let chunk = match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(chunk) => chunk,
                    Err(_) => continue,
                },
                _ => return End::Upstream,
            };
            if parser.feed(&chunk, &mut events).is_err() {
                warn!("the upstream sent a malformed event stream; reconnecting");
                return End::Upstream;
            }
            for event in events.drain(..) {
                if !self.forward(event).await {
                    return End::ClientGone;
                }
            }
        }
    }

    /// Sends an event on, except the answer to a replayed `initialize`, which is the proxy's.
    async fn forward(&mut self, event: Event) -> bool {
        if event.event.as_deref() == Some("endpoint") {
            return true;
        }
        let head = event
            .data
            .as_deref()
            .and_then(|d| MessageHead::of(d.as_bytes()));
        if let Some(head) = head.filter(|h| h.method.is_none())
            && let Some(id) = &head.id
        {
            if head.answers(&json!(protocol::REPLAY_REQUEST_ID)) {
                return true;
            }
            self.host.unanswered().answered(&self.id, id);
            // Answers travel only here: the place to learn from a `tools/list` one.
            if let Some(data) = &event.data {
                self.host.learn(data.as_bytes());
            }
        }
        self.out.send(event.encode()).await.is_ok()
    }

    /// Opens a new upstream stream and re-establishes the session on it.
    async fn reconnect(&mut self) -> Option<(Body, sse::Parser, Vec<Event>)> {
        let mut backoff = backoff::RETRY.until(Instant::now() + self.host.hold());
        loop {
            if *self.phase.borrow() >= Phase::Draining {
                return None;
            }
            if let Some(reconnected) = self.try_reconnect().await {
                return Some(reconnected);
            }
            if !backoff.wait().await {
                break;
            }
        }
        warn!("cannot re-establish the session with the upstream");
        None
    }

    async fn try_reconnect(&mut self) -> Option<(Body, sse::Parser, Vec<Event>)> {
        let backend = self.host.pick().await.ok()?;
        let answer = self
            .host
            .send(
                &backend,
                Outbound::get(&self.exchange.path, &self.exchange.headers),
            )
            .await
            .ok()?;
        if !protocol::is_event_stream(answer.response.headers()) {
            return None;
        }
        let mut body = answer.response.into_body();
        let mut parser = sse::Parser::default();
        let (endpoint, after) = read_endpoint(&mut body, &mut parser).await?;
        let upstream = UpstreamSession::new(answer.backend, endpoint.upstream());
        self.replay(&upstream).await.ok()?;
        info!(
            backend = upstream.backend.name(),
            "session re-established on a new upstream stream"
        );
        self.settle_unanswered(&upstream).await;
        Some((body, parser, after))
    }

    /// The requests the old upstream never answered: the safe ones go to the new upstream
    /// again (their answers come on the new stream), the others get an error.
    async fn settle_unanswered(&mut self, target: &UpstreamSession) {
        let headers = self.message_headers();
        for request in self.host.unanswered().take_delivered(&self.id) {
            let outcome = if request.resendable {
                let sent = self
                    .host
                    .send(
                        &target.backend,
                        Outbound::post(&target.id, &headers, request.body.clone()),
                    )
                    .await;
                match sent {
                    Ok(answer) if answer.response.status().is_success() => {
                        self.host.unanswered().add(&self.id, request.clone());
                        metrics::Unanswered::Resent
                    }
                    Ok(answer) => {
                        let status = answer.response.status();
                        warn!(%status, "the new upstream refused a resent request");
                        metrics::Unanswered::Failed
                    }
                    Err(error) => {
                        warn!(%error, "cannot resend a request");
                        metrics::Unanswered::Failed
                    }
                }
            } else {
                metrics::Unanswered::Failed
            };
            self.host.count_unanswered(outcome);
            if outcome == metrics::Unanswered::Failed {
                warn!(
                    "the upstream restarted before answering; the request may have been executed, so it is not sent again"
                );
                let body = protocol::error_body(
                    Some(request.id),
                    UPSTREAM_UNAVAILABLE,
                    "The MCP server went away before answering; the request may have been executed, so it was not sent again",
                );
                let event = Event {
                    event: Some("message".into()),
                    data: Some(String::from_utf8_lossy(&body).into_owned()),
                    ..Default::default()
                };
                let _ = self.out.send(event.encode()).await;
            }
        }
    }

    /// Sends the stored handshake to the new endpoint, then points the session at it.
    async fn replay(&self, target: &UpstreamSession) -> Result<(), Failure> {
        if let Some(params) = self.host.initialize_params(&self.id) {
            let headers = self.message_headers();
            for message in [
                protocol::initialize_request(&params, None),
                protocol::initialized_notification(),
            ] {
                let answer = self
                    .host
                    .send(
                        &target.backend,
                        Outbound::post(&target.id, &headers, message),
                    )
                    .await
                    .map_err(Failure::Upstream)?;
                let status = answer.response.status();
                let _ = answer.response.into_body().collect().await;
                if !status.is_success() {
                    self.host.count_replay(metrics::Replay::Refused);
                    return Err(Failure::Unknown(Unknown::NotFound));
                }
            }
            self.host.count_replay(metrics::Replay::Replayed);
        }
        self.host.remap(&self.id, target.clone());
        Ok(())
    }

    /// Headers of a message the proxy POSTs for the client: its credential, JSON.
    fn message_headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = self.exchange.headers.get(header::AUTHORIZATION) {
            headers.insert(header::AUTHORIZATION, value.clone());
        }
        headers.insert(
            header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        );
        headers
    }

    /// The client left: its session ends with its stream, as in the SDK servers.
    async fn end(self) {
        self.host.unanswered().take(&self.id);
        self.host.end(&self.id).await;
    }

    async fn close(self) {
        let _ = self.out.send(relay::reconnect_hint()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_of_both_sdks_are_rewritten_and_read_back() {
        let python = Endpoint::parse("/messages/?session_id=4f2a9c").unwrap();
        assert_eq!(python.session, "4f2a9c");
        assert_eq!(python.upstream(), "/messages/?session_id=4f2a9c");
        let ours = python.with_session("abc123");
        assert_eq!(ours, "/messages/?session_id=abc123");
        assert_eq!(session_in_query(&ours).as_deref(), Some("abc123"));
        let typescript = Endpoint::parse("/messages?sessionId=9b1d-77").unwrap();
        assert_eq!(typescript.with_session("x"), "/messages?sessionId=x");
        assert_eq!(
            session_in_query("/messages?sessionId=x&other=1").as_deref(),
            Some("x")
        );
        for bad in ["", "/messages/", "/messages/?other=1"] {
            assert_eq!(Endpoint::parse(bad), None, "{bad:?}");
        }
        assert_eq!(session_in_query("/mcp"), None);
    }
}
