//! Resumption with `Last-Event-ID`: the logged events of a stream, then the live stream (or what
//! the upstream kept of a response stream it closed).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tracing::{debug, info, warn};

use crate::proxy::answers::header_or_empty;
use crate::proxy::mcp::protocol::{
    self, LAST_EVENT_ID_HEADER, MessageHead, SESSION_HEADER, StreamKind,
};
use crate::proxy::metrics::KindLabels;
use crate::proxy::session::exchange::{Bound, Exchange};
use crate::proxy::session::table::Lookup;
use crate::proxy::stream::event_log::{self, StreamTag};
use crate::proxy::upstream::Outbound;
use crate::proxy::{Proxy, stream::relay};

impl Proxy {
    /// A GET with `Last-Event-ID`: the logged events that followed it on its stream, then (for
    /// a listening stream) the live stream.
    pub(in crate::proxy) async fn resume(
        self: &Arc<Self>,
        exchange: Exchange,
        last_event_id: &str,
    ) -> Response {
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
        let upstream_last = event_log::last_upstream_id(&log, tag);
        let backlog = event_log::after(log, tag, seq);
        self.metrics
            .resumed
            .get_or_create(&KindLabels::of(tag.kind))
            .inc();
        info!(session = %bound.id, stream = %tag, after = seq, replayed = backlog.len(), "stream resumed");
        match tag.kind {
            StreamKind::Listen => match self.send_upstream(&exchange).await {
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
    pub(in crate::proxy) async fn upstream_events_after(
        &self,
        bound: &Bound,
        exchange: &Exchange,
        last: &str,
    ) -> Option<Body> {
        let Lookup::Live(upstream) = self.lookup(bound) else {
            return None;
        };
        let mut headers = exchange.headers.clone();
        headers.remove(header::CONTENT_TYPE);
        headers.insert(SESSION_HEADER, protocol::header_value(&upstream.id)?);
        headers.insert(LAST_EVENT_ID_HEADER, protocol::header_value(last)?);
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
        let answer = match self
            .upstream
            .send(&upstream.backend, Outbound::get(&exchange.path, &headers))
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
}
