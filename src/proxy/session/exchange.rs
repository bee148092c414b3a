//! A client's request on its way to the upstream: kept whole while it may be sent again, sent
//! through the session's current upstream session (replayed when the upstream lost it), held
//! while the upstream is down, and sent again when that is safe.

use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderMap, Method};
use http_body_util::BodyExt as _;
use serde_json::Value;
use tracing::debug;

use crate::proxy::answers::{Failure, header_or_empty};
use crate::proxy::backoff;
use crate::proxy::mcp::protocol::{self, MessageHead, SESSION_HEADER, StreamKind};
use crate::proxy::metrics::Loss;
use crate::proxy::session::home::OWNER_ATTEMPTS;
use crate::proxy::session::table::{Lookup, Stale, UpstreamSession};
use crate::proxy::upstream::{Answer, Outbound, UpstreamError};
use crate::proxy::{Proxy, metrics};
use crate::store::SessionId;
use bytes::Bytes;

/// Attempts at one request: a replay after a 404, a resend after a lost response.
pub(in crate::proxy) const MAX_ATTEMPTS: u32 = 6;

/// A client's request, kept whole for as long as it may have to be sent again.
pub(in crate::proxy) struct Exchange {
    pub(in crate::proxy) method: Method,
    pub(in crate::proxy) path: String,
    pub(in crate::proxy) headers: HeaderMap,
    pub(in crate::proxy) body: Bytes,
    /// The JSON-RPC message's head, for a POST of one message.
    pub(in crate::proxy) head: Option<MessageHead>,
    pub(in crate::proxy) session: Option<Bound>,
}

/// A proxy session id and the fingerprint of the credential presented with it.
pub(in crate::proxy) struct Bound {
    pub(in crate::proxy) id: SessionId,
    pub(in crate::proxy) credential: Option<String>,
}

impl Exchange {
    /// The stream a response to this request opens.
    pub(in crate::proxy) fn stream_kind(&self) -> StreamKind {
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

    pub(in crate::proxy) fn is_method(&self, method: &str) -> bool {
        self.head
            .as_ref()
            .is_some_and(|h| h.method.as_deref() == Some(method))
    }

    pub(in crate::proxy) fn request_id(&self) -> Option<Value> {
        self.head.as_ref().and_then(|h| h.id.clone())
    }

    /// The JSON-RPC method, for logs.
    pub(in crate::proxy) fn rpc_method(&self) -> Option<&str> {
        self.head.as_ref().and_then(|h| h.method.as_deref())
    }
}

/// What an upstream's answer to a session's request says of the session.
pub(in crate::proxy) enum Signal {
    /// The upstream does not know the session (see [`protocol::is_unknown_session`]).
    UnknownSession,
    Answer(Answer),
}

/// Reads an error answer's body where it may say the session is unknown; any other answer is
/// passed on untouched (its body still unread, so streams stay streams).
pub(in crate::proxy) async fn session_signal(answer: Answer) -> Signal {
    let status = answer.response.status();
    if !matches!(status.as_u16(), 400 | 401 | 404) {
        return Signal::Answer(answer);
    }
    let Answer {
        response,
        held,
        backend,
    } = answer;
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
        backend,
    })
}

impl Proxy {
    /// Sends the request to the upstream until it answers: for a session, through its upstream
    /// session (replayed when the upstream does not know it); held while the upstream is down;
    /// sent again when the upstream lost it, if that is safe.
    pub(in crate::proxy) async fn send_upstream(
        &self,
        exchange: &Exchange,
    ) -> Result<Answer, Failure> {
        let mut held = false;
        let mut attempt = 0;
        let mut resend = backoff::RETRY;
        let deadline = Instant::now() + self.config.hold;
        let result = loop {
            attempt += 1;
            let upstream = match &exchange.session {
                Some(bound) => Some(self.upstream_session(bound, exchange).await?),
                None => None,
            };
            let mut headers = exchange.headers.clone();
            let backend = match &upstream {
                Some(upstream) => {
                    headers.insert(SESSION_HEADER, header_or_empty(&upstream.id));
                    upstream.backend.clone()
                }
                None => self
                    .upstream
                    .pick(deadline)
                    .await
                    .map_err(Failure::Upstream)?,
            };
            let sent = self
                .upstream
                .send(
                    &backend,
                    Outbound {
                        method: &exchange.method,
                        target: &exchange.path,
                        headers: &headers,
                        body: exchange.body.clone(),
                    },
                )
                .await;
            match sent {
                Ok(answer) => {
                    held |= answer.held;
                    let (Some(bound), Some(upstream)) = (&exchange.session, &upstream) else {
                        break Ok(answer);
                    };
                    match session_signal(answer).await {
                        // A session its client ends, which its server forgot (it restarted):
                        // ended, with nothing to end upstream. A replay would open a session
                        // on the server only to end it.
                        Signal::UnknownSession if exchange.method == Method::DELETE => {
                            break Ok(Answer {
                                response: hyper::Response::new(Body::empty()),
                                held,
                                backend: upstream.backend.clone(),
                            });
                        }
                        // The upstream lost the session (it restarted), and with it the state
                        // of a session that stays on its pod: not replayed where the policy
                        // keeps it (drain strategy `Wait`).
                        Signal::UnknownSession if !self.config.residence.replays_lost() => {
                            break Err(self.lost(&bound.id, Loss::ServerRestarted).await);
                        }
                        // The upstream lost the session (it restarted): replay and send again.
                        Signal::UnknownSession if attempt < MAX_ATTEMPTS => {
                            debug!(session = %bound.id, "the upstream does not know the session; replaying the handshake");
                            self.table.invalidate(&bound.id, upstream, Stale::Forgotten);
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
                // The pod a session is pinned to did not take it: a pod that was just killed
                // may refuse once while its address is still routed; then it is gone, and the
                // session's state with it.
                Err(UpstreamError::Unreachable(reason))
                    if self.pins_sessions() && exchange.session.is_some() =>
                {
                    debug!(%reason, backend = backend.name(), attempt, "the pod a session is pinned to takes no connections");
                    match &exchange.session {
                        Some(bound) if attempt >= OWNER_ATTEMPTS => {
                            break Err(self.lost(&bound.id, Loss::OwnerGone).await);
                        }
                        _ => {
                            resend.wait().await;
                        }
                    }
                }
                // The pod did not take it: to another pod, the session replayed there.
                Err(UpstreamError::Unreachable(reason))
                    if attempt < MAX_ATTEMPTS && Instant::now() < deadline =>
                {
                    debug!(%reason, backend = backend.name(), "a backend pod is unreachable; sending elsewhere");
                    held = true;
                    if let (Some(bound), Some(upstream)) = (&exchange.session, &upstream) {
                        self.table.invalidate(&bound.id, upstream, Stale::Left);
                    }
                }
                Err(UpstreamError::Lost(reason))
                    if attempt < MAX_ATTEMPTS && self.may_resend(exchange) =>
                {
                    debug!(%reason, "the upstream lost a request that is safe to send again");
                    // A server shutting down may still take connections: let it go first.
                    resend.wait().await;
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

    pub(in crate::proxy) fn may_resend(&self, exchange: &Exchange) -> bool {
        exchange.head.as_ref().is_some_and(|h| self.retry.allows(h))
    }

    /// The upstream session of `bound`: the mapped one, or a fresh one from a replay.
    pub(in crate::proxy) async fn upstream_session(
        &self,
        bound: &Bound,
        exchange: &Exchange,
    ) -> Result<UpstreamSession, Failure> {
        let mut lookup = self.lookup(bound);
        if let (Lookup::Unbound, Some(credential)) = (&lookup, &bound.credential) {
            Box::pin(self.bind(&bound.id, credential)).await?;
            lookup = self.lookup(bound);
        }
        match lookup {
            Lookup::Live(upstream) => Ok(upstream),
            Lookup::Refused(unknown) => Err(Failure::Unknown(unknown)),
            lookup if self.pins_sessions() => {
                match Box::pin(self.pinned_upstream(bound, lookup)).await? {
                    Some(upstream) => Ok(upstream),
                    None => Box::pin(self.replay(bound, exchange)).await,
                }
            }
            Lookup::Stale(_) | Lookup::Absent | Lookup::Unbound => {
                Box::pin(self.replay(bound, exchange)).await
            }
        }
    }
}
