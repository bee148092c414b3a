//! The relay of an upstream event stream to the client.
//!
//! Event by event (never a whole body), the relay:
//! - numbers the events of a session's stream with the proxy's own ids and logs them for
//!   `Last-Event-ID` resumption ([`crate::proxy::stream::event_log`]);
//! - keeps a listening (GET) stream open across upstream restarts by opening a new upstream
//!   stream behind it, at once when a replay asks ([`crate::proxy::stream::listening`]);
//! - resumes a response stream the upstream closed on purpose before its answer (SSE polling,
//!   2025-11-25) with the upstream's own `Last-Event-ID`, so the client's stream simply goes on;
//! - never lets a progress notification go backwards (a resent request starts its progress
//!   over, under the same token);
//! - on a response (POST) stream that ends before the request's answer (the upstream died), sends
//!   the request again if executing it twice is safe ([`crate::proxy::mcp::retry`]), else answers for it with
//!   a JSON-RPC error: the client always gets an answer, never a stream that just stops;
//! - ends with a `retry` hint when the proxy drains: listening streams at once, response streams
//!   at the drain deadline.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::proxy::Phase;
use crate::proxy::answers::UPSTREAM_UNAVAILABLE;
use crate::proxy::backoff::{self, Backoff};
use crate::proxy::mcp::protocol::{self, MessageHead, StreamKind};
use crate::proxy::mcp::sse::{self, Event};
use crate::proxy::metrics::Unanswered;
use crate::proxy::session::exchange::Exchange;
use crate::proxy::stream::event_log::StreamTag;
use crate::proxy::stream::host::{OpenStream, StreamHost};
use crate::proxy::stream::listening::Registration;
use crate::store::LoggedEvent;

/// What a client told to reconnect waits first, in milliseconds: another pod is ready.
const RECONNECT_HINT_MS: u64 = 500;

/// The event that tells a client to reconnect (to another pod, through the Service).
pub fn reconnect_hint() -> Bytes {
    Event {
        retry: Some(RECONNECT_HINT_MS),
        ..Default::default()
    }
    .encode()
}

/// The client's side of a relay: a body fed by the relay task's channel.
pub fn channel_body(client: mpsc::Receiver<Bytes>) -> Body {
    Body::from_stream(futures::stream::unfold(client, |mut client| async move {
        client
            .recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), client))
    }))
}
/// Chunks in flight to a slow client before the relay stops reading the upstream.
const BUFFERED_CHUNKS: usize = 16;

/// Resumptions in a row that brought no new event before a response stream gives up on them.
const MAX_IDLE_RESUMPTIONS: u32 = 3;

/// A resumed stream: its identity, where the client left it, and the logged events it missed.
pub struct Resumed {
    pub tag: StreamTag,
    pub after: u64,
    pub backlog: Vec<(u64, LoggedEvent)>,
}

/// Starts relaying `body` and returns the client's side of it.
pub fn start(host: StreamHost, exchange: Exchange, body: Body, resumed: Option<Resumed>) -> Body {
    let (out, client) = mpsc::channel(BUFFERED_CHUNKS);
    // A resumed stream is of the kind it was, whatever request resumes it (always a GET).
    let kind = resumed
        .as_ref()
        .map_or_else(|| exchange.stream_kind(), |r| r.tag.kind);
    let open = host.open(kind);
    let (tag, seq, backlog) = match resumed {
        Some(resumed) => {
            let seq = resumed
                .backlog
                .last()
                .map_or(resumed.after, |(n, _)| (*n).max(resumed.after));
            (Some(resumed.tag), seq, resumed.backlog)
        }
        None => (
            exchange.session.as_ref().map(|_| StreamTag::new(kind)),
            0,
            Vec::new(),
        ),
    };
    let listening = match (kind, &exchange.session) {
        (StreamKind::Listen, Some(bound)) => Some(host.listen(&bound.id)),
        _ => None,
    };
    // A response stream resumed by a GET: its request is not at hand, its answer is the first.
    let resumed_response = kind == StreamKind::Response && exchange.head.is_none();
    let span = info_span!(
        "stream",
        session = exchange.session.as_ref().map(|b| b.id.to_string()),
        stream = tag.map(|t| t.to_string()),
    );
    let hold = host.hold();
    let relay = Relay {
        awaited: (kind == StreamKind::Response)
            .then(|| exchange.head.as_ref().filter(|h| h.is_request()))
            .flatten()
            .and_then(|h| h.id.clone()),
        any_answer: resumed_response,
        cut_at: cut_at(kind, *host.phase().borrow()),
        phase: host.phase(),
        host,
        exchange,
        kind,
        tag,
        seq,
        answered: false,
        out,
        // A server that is shutting down still accepts requests and drops them: a resend
        // waits for its successor, for as long as a request is held.
        resend: backoff::RETRY.until(Instant::now() + hold),
        listening,
        upstream_event: None,
        upstream_retry: None,
        progress: Default::default(),
    };
    tokio::spawn(relay.run(body, backlog, open).instrument(span));
    channel_body(client)
}

/// The event a client gets for a logged one.
pub fn logged_event(logged: LoggedEvent) -> Event {
    Event {
        id: Some(logged.id),
        event: logged.event,
        data: Some(logged.data),
        retry: None,
    }
}

/// Why pumping stopped.
enum End {
    /// The upstream ended its stream, with its terminating chunk: on purpose.
    UpstreamClosed,
    /// The upstream's stream broke (the server went away).
    UpstreamBroke,
    /// The client went away.
    ClientGone,
    /// The drain reached this stream.
    Closing,
}

struct Relay {
    host: StreamHost,
    exchange: Exchange,
    kind: StreamKind,
    /// Set for a session's streams: their events get the proxy's ids and are logged.
    tag: Option<StreamTag>,
    seq: u64,
    /// The id of the request whose answer a response stream carries.
    awaited: Option<Value>,
    /// A resumed response stream, whose request's id is not known here: any answer is its.
    any_answer: bool,
    answered: bool,
    out: mpsc::Sender<Bytes>,
    phase: watch::Receiver<Phase>,
    /// The drain's phase that ends this stream before its upstream does, if any.
    cut_at: Option<Phase>,
    /// Resends go on, with growing pauses, for as long as a request is held for a restarting
    /// upstream.
    resend: Backoff,
    /// A listening stream's place among the session's, which a replay wakes.
    listening: Option<Registration>,
    /// The id of the upstream's last event on this stream, and the reconnection delay it
    /// asked for: where a stream it closed on purpose resumes.
    upstream_event: Option<String>,
    upstream_retry: Option<u64>,
    /// The highest progress relayed per progress token: a resent request starts over.
    progress: std::collections::HashMap<String, f64>,
}

/// The phase of the drain that ends a stream of `kind` opened at phase `now`: a listening
/// stream at the drain's start (its client reconnects elsewhere), a response stream at the
/// drain's deadline. A response stream opened past that deadline is not ended by it: only a
/// retired proxy whose pod goes on opens one (a request it held while the server restarted in
/// place, let go to the new server), and ending it would fail a call that is being answered.
fn cut_at(kind: StreamKind, now: Phase) -> Option<Phase> {
    match kind {
        StreamKind::Listen => Some(Phase::Draining),
        StreamKind::Response if now >= Phase::Closing => None,
        StreamKind::Response => Some(Phase::Closing),
    }
}

/// Resolves once the drain has reached `cut_at`; never without one.
async fn closing(phase: &mut watch::Receiver<Phase>, cut_at: Option<Phase>) {
    let Some(threshold) = cut_at else {
        return std::future::pending().await;
    };
    if phase.wait_for(|p| *p >= threshold).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Relay {
    async fn run(mut self, mut body: Body, backlog: Vec<(u64, LoggedEvent)>, _open: OpenStream) {
        for (_, logged) in backlog {
            if self.out.send(logged_event(logged).encode()).await.is_err() {
                return;
            }
        }
        let mut reopen = backoff::REOPEN;
        let mut idle_resumptions = 0_u32;
        loop {
            let opened = Instant::now();
            let resumable_from = self.upstream_event.clone();
            let end = self.pump(&mut body).await;
            let next = match (end, self.kind) {
                (End::ClientGone, _) => return,
                (End::Closing, _) => return self.close().await,
                (_, StreamKind::Response) if self.answered || self.awaited.is_none() => return,
                // Closed on purpose after an event with an id: the server keeps the answer
                // for a resumption (SSE polling).
                (End::UpstreamClosed, StreamKind::Response)
                    if self.upstream_event.is_some() && idle_resumptions < MAX_IDLE_RESUMPTIONS =>
                {
                    if self.upstream_event == resumable_from {
                        idle_resumptions += 1;
                    } else {
                        idle_resumptions = 0;
                    }
                    match self.resume_upstream().await {
                        Some(next) => Some(next),
                        None => self.resend().await,
                    }
                }
                (_, StreamKind::Response) => self.resend().await,
                (_, StreamKind::Listen) => {
                    // An upstream that ends every stream at once must not be hammered; a
                    // replay wakes the relay at once.
                    if opened.elapsed() < Duration::from_secs(1) {
                        let pause = reopen.next_pause().unwrap_or_default();
                        self.backoff(pause).await;
                    } else {
                        reopen = backoff::REOPEN;
                    }
                    let next = self.reconnect().await;
                    if next.is_none() {
                        return self.close().await;
                    }
                    next
                }
            };
            match next {
                Some(next) => body = next,
                None => return,
            }
        }
    }

    /// Waits `pause`, or less if a replay asks the listening stream to reopen.
    async fn backoff(&self, pause: Duration) {
        match &self.listening {
            Some(listening) => {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = listening.woken() => {}
                }
            }
            None => tokio::time::sleep(pause).await,
        }
    }

    /// Resumes a response stream the upstream closed on purpose: after the delay it asked
    /// for, a GET with its last event id on the same upstream session (never a replay: a fresh
    /// upstream session would not know the events). `None` if the upstream will not resume it.
    async fn resume_upstream(&mut self) -> Option<Body> {
        let bound = self.exchange.session.as_ref()?;
        let last = self.upstream_event.clone()?;
        if !self.host.is_live(bound) {
            return None;
        }
        let delay = Duration::from_millis(self.upstream_retry.unwrap_or(0).min(60_000));
        tokio::select! {
            () = closing(&mut self.phase, self.cut_at) => return None,
            () = tokio::time::sleep(delay) => {}
        }
        let resumed = tokio::select! {
            () = closing(&mut self.phase, self.cut_at) => return None,
            resumed = self.host.events_after(bound, &self.exchange, &last) => resumed?,
        };
        self.host.count_unanswered(Unanswered::Resumed);
        info!(last_event = %last, "the upstream closed the response stream before its answer; resumed it");
        Some(resumed)
    }

    /// Relays events until the upstream's stream ends, the client leaves or the drain comes.
    async fn pump(&mut self, body: &mut Body) -> End {
        let mut parser = sse::Parser::default();
        let mut events = Vec::new();
        loop {
            let frame = tokio::select! {
                biased;
                () = closing(&mut self.phase, self.cut_at) => return End::Closing,
                () = self.out.closed() => return End::ClientGone,
                frame = body.frame() => frame,
            };
            let chunk = match frame {
                None => return End::UpstreamClosed,
                Some(Err(error)) => {
                    debug!(%error, "the upstream's event stream broke");
                    return End::UpstreamBroke;
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(chunk) => chunk,
                    Err(_) => continue, // Trailers.
                },
            };
            if let Err(error) = parser.feed(&chunk, &mut events) {
                warn!(%error, "the upstream sent a malformed event stream; ending it");
                return End::UpstreamBroke;
            }
            for event in events.drain(..) {
                if !self.forward(event).await {
                    return End::ClientGone;
                }
            }
            // Nothing follows a request's answer on its stream: an upstream that keeps a
            // resumed stream open after it is not waited for.
            if self.answered && self.kind == StreamKind::Response {
                return End::UpstreamClosed;
            }
        }
    }

    /// Sends one event to the client, numbered and logged if it belongs to a session.
    async fn forward(&mut self, mut event: Event) -> bool {
        // The upstream's id and retry hint are for resuming the upstream stream, which the
        // proxy does itself; the client gets the proxy's ids, and its hints when it must move.
        // A sessionless (stateless) stream keeps the upstream's ids: its client resumes with
        // the upstream itself.
        let mut upstream_id = None;
        if self.tag.is_some() {
            if let Some(id) = event.id.take() {
                self.upstream_event = Some(id.clone());
                upstream_id = Some(id);
            }
            if let Some(retry) = event.retry.take() {
                self.upstream_retry = Some(retry);
            }
        }
        if let Some(data) = &event.data
            && !self.progress_advances(data)
        {
            return true;
        }
        if let Some(data) = &event.data
            && !self.answered
            && MessageHead::of(data.as_bytes()).is_some_and(|head| match &self.awaited {
                Some(awaited) => head.answers(awaited),
                None => self.any_answer && head.is_response(),
            })
        {
            self.answered = true;
            self.host.observe(&self.exchange, data.as_bytes());
        }
        if let (Some(tag), Some(bound)) = (self.tag, &self.exchange.session)
            && (event.data.is_some() || event.id.is_some())
        {
            self.seq += 1;
            let id = tag.event_id(self.seq);
            if let Some(data) = &event.data {
                let logged = LoggedEvent {
                    id: id.clone(),
                    event: event.event.clone(),
                    data: data.clone(),
                    upstream_id,
                };
                self.host.log_event(&bound.id, logged);
            }
            event.id = Some(id);
        }
        self.out.send(event.encode()).await.is_ok()
    }

    /// False for a progress notification that does not advance its token's progress (MCP:
    /// progress only increases), which the relay then drops.
    fn progress_advances(&mut self, data: &str) -> bool {
        let Some((token, progress)) = protocol::progress(data.as_bytes()) else {
            return true;
        };
        match self.progress.get(&token) {
            Some(&highest) if progress <= highest => {
                debug!(%token, progress, highest, "dropped a progress notification that went backwards");
                false
            }
            _ => {
                self.progress.insert(token, progress);
                true
            }
        }
    }

    /// Tells the client to reconnect (to another pod, through the Service) and ends.
    async fn close(self) {
        let _ = self.out.send(reconnect_hint()).await;
    }

    /// The response stream ended before its answer: send the request again if that is safe,
    /// else answer for it.
    async fn resend(&mut self) -> Option<Body> {
        let pause = self.resend.next_pause();
        let Some(pause) = pause.filter(|_| self.host.may_resend(&self.exchange)) else {
            self.host.count_unanswered(Unanswered::Failed);
            warn!(
                method = self.exchange.rpc_method(),
                "the upstream ended the stream before answering; the request may have been executed, so it is not sent again"
            );
            self.answer_with_error(
                UPSTREAM_UNAVAILABLE,
                "The MCP server went away before answering; the request may have been executed, so it was not sent again",
            )
            .await;
            return None;
        };
        tokio::time::sleep(pause).await;
        self.host.count_unanswered(Unanswered::Resent);
        info!(
            method = self.exchange.rpc_method(),
            "the upstream ended the stream before answering; sending the request again (safe to repeat)"
        );
        let answer = tokio::select! {
            () = closing(&mut self.phase, self.cut_at) => return None,
            answer = self.host.send_upstream(&self.exchange) => answer,
        };
        match answer {
            Ok(answer) if protocol::is_event_stream(answer.response.headers()) => {
                Some(answer.response.into_body())
            }
            Ok(answer) => {
                // A JSON answer is the stream's next (and last) event.
                let limit = self.host.max_body_bytes();
                let body = http_body_util::Limited::new(answer.response.into_body(), limit);
                match body.collect().await.map(|c| c.to_bytes()) {
                    Ok(bytes) if !bytes.is_empty() => {
                        let data = String::from_utf8_lossy(&bytes).into_owned();
                        let event = Event {
                            data: Some(data),
                            ..Default::default()
                        };
                        self.forward(event).await;
                    }
                    _ => {
                        self.answer_with_error(
                            UPSTREAM_UNAVAILABLE,
                            "The MCP server sent no answer",
                        )
                        .await;
                    }
                }
                None
            }
            Err(failure) => {
                let (code, message) = failure.describe();
                self.answer_with_error(code, &message).await;
                None
            }
        }
    }

    async fn answer_with_error(&mut self, code: i64, message: &str) {
        let body = protocol::error_body(self.awaited.clone(), code, message);
        let event = Event {
            data: Some(String::from_utf8_lossy(&body).into_owned()),
            ..Default::default()
        };
        self.forward(event).await;
    }

    /// Opens a new upstream stream behind the client's listening stream (the upstream
    /// restarted, or ended it); `None` if it cannot, or the proxy drains meanwhile.
    async fn reconnect(&mut self) -> Option<Body> {
        let answer = tokio::select! {
            () = closing(&mut self.phase, self.cut_at) => return None,
            answer = self.host.send_upstream(&self.exchange) => answer,
        };
        match answer {
            Ok(answer)
                if answer.response.status().is_success()
                    && protocol::is_event_stream(answer.response.headers()) =>
            {
                info!("listening stream reconnected to the upstream");
                if let Some(listening) = &self.listening {
                    listening.opened();
                }
                Some(answer.response.into_body())
            }
            Ok(answer) => {
                debug!(status = %answer.response.status(), "the upstream did not reopen the listening stream");
                None
            }
            Err(failure) => {
                debug!(?failure, "cannot reopen the listening stream");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_ends_streams_opened_before_it_reached_them() {
        for now in [Phase::Serving, Phase::Draining, Phase::Closing] {
            assert_eq!(cut_at(StreamKind::Listen, now), Some(Phase::Draining));
        }
        assert_eq!(
            cut_at(StreamKind::Response, Phase::Serving),
            Some(Phase::Closing)
        );
        assert_eq!(
            cut_at(StreamKind::Response, Phase::Draining),
            Some(Phase::Closing)
        );
        // A request a retired proxy held through the server's restart in place.
        assert_eq!(cut_at(StreamKind::Response, Phase::Closing), None);
    }
}
