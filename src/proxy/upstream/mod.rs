//! The MCP server behind the proxy: requests with hold-and-retry while it restarts.

pub(super) mod backends;
pub(super) mod connector;
pub(super) mod pool;
pub(super) mod quiesce;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, Response, Uri, header};
use bytes::Bytes;
use http_body_util::Full;
use tracing::debug;

use crate::proxy::backoff;
use crate::proxy::mcp::protocol::strip_hop_by_hop;
use crate::proxy::upstream::backends::{Assigned, Backends};
use crate::proxy::upstream::connector::{was_not_delivered, with_causes};
use crate::proxy::upstream::pool::SendError;
use crate::proxy::upstream::quiesce::{Gate, GateState, Tracked};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Never reached the upstream within the hold time: safe to report, nothing happened.
    #[error("the MCP server did not answer within {0:?}: {1}")]
    Unavailable(Duration, String),
    /// Sent, but no response came back: the request may have been processed.
    #[error(
        "the MCP server closed the connection before answering ({0}); the request may have been executed, so it was not sent again"
    )]
    Lost(String),
    /// A backend pod did not take the request (gateway mode): it was not delivered, and goes
    /// to another pod.
    #[error("the MCP server pod did not take the request: {0}")]
    Unreachable(String),
    #[error("bad upstream request: {0}")]
    Request(String),
}

pub struct Upstream {
    backends: Arc<Backends>,
    hold: Duration,
    /// Holds requests while the upstream is quiesced, and counts what it is working on.
    gate: Gate,
}

/// What came back, from which backend, and whether it was held (the upstream was down for a
/// while).
pub struct Answer {
    pub response: Response<Body>,
    pub held: bool,
    pub backend: Assigned,
}

/// A request for the upstream, as the proxy writes it: `target` is the path and query.
pub struct Outbound<'a> {
    pub method: &'a Method,
    pub target: &'a str,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
}

impl<'a> Outbound<'a> {
    pub fn post(target: &'a str, headers: &'a HeaderMap, body: Bytes) -> Self {
        Self {
            method: &Method::POST,
            target,
            headers,
            body,
        }
    }

    /// A GET, which opens an event stream.
    pub fn get(target: &'a str, headers: &'a HeaderMap) -> Self {
        Self {
            method: &Method::GET,
            target,
            headers,
            body: Bytes::new(),
        }
    }
}

impl Upstream {
    pub fn new(backends: Arc<Backends>, hold: Duration) -> Self {
        Self {
            backends,
            hold,
            gate: Gate::default(),
        }
    }

    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// The backend for a request of no session yet, waiting for one that takes requests until
    /// `deadline` (gateway mode).
    pub async fn pick(&self, deadline: Instant) -> Result<Assigned, UpstreamError> {
        self.backends.pick_by(deadline).await.ok_or_else(|| {
            UpstreamError::Unavailable(self.hold, "no MCP server pod is ready".into())
        })
    }

    /// Sends the request; while the upstream is quiesced, refuses connections or answers
    /// 502/503 (it is restarting), holds it, for up to the hold time. The request counts as in
    /// flight from its sending until its response body ends (a GET's listening stream: until
    /// its head, as it never ends by itself).
    pub async fn send(
        &self,
        to: &Assigned,
        outbound: Outbound<'_>,
    ) -> Result<Answer, UpstreamError> {
        let Outbound {
            method,
            target,
            headers,
            body,
        } = outbound;
        // Origin form, as a request to a server (not to a proxy) is written.
        let uri: Uri = target
            .parse()
            .map_err(|e| UpstreamError::Request(format!("{e}")))?;
        let deadline = Instant::now() + self.hold;
        let mut backoff = backoff::HOLD.until(deadline);
        let mut held = false;
        loop {
            held |= self.gate.state() == GateState::Quiesced;
            let Some(sending) = self.gate.pass(deadline).await else {
                return Err(UpstreamError::Unavailable(
                    self.hold,
                    "the MCP server is restarting".into(),
                ));
            };
            let mut request = Request::builder().method(method.clone()).uri(uri.clone());
            let mut forwarded = headers.clone();
            // The client's Host goes on (the upstream's only where there is none): a server's
            // own DNS-rebinding check must see what the client asked for.
            strip_hop_by_hop(&mut forwarded);
            forwarded.remove(header::CONTENT_LENGTH);
            if !forwarded.contains_key(header::HOST) {
                forwarded.insert(header::HOST, to.host().clone());
            }
            if let Some(target) = request.headers_mut() {
                *target = forwarded;
            }
            let request = request
                .body(Full::new(body.clone()))
                .map_err(|e| UpstreamError::Request(e.to_string()))?;
            let failure = match to.pool().send(request).await {
                Ok(response) if matches!(response.status().as_u16(), 502 | 503) => {
                    format!("status {}", response.status())
                }
                Ok(response) if method == Method::GET => {
                    return Ok(Answer {
                        response: response.map(Body::new),
                        held,
                        backend: to.clone(),
                    });
                }
                Ok(response) => {
                    return Ok(Answer {
                        response: response.map(|body| Tracked::body(Body::new(body), sending)),
                        held,
                        backend: to.clone(),
                    });
                }
                // A pooled connection the server had closed: at once on another.
                Err(SendError::Exchange {
                    ref error,
                    reused: true,
                }) if was_not_delivered(error) => continue,
                // Never reached the server: held and sent again, whatever the request.
                Err(error @ SendError::Connect { .. }) => with_causes(&error),
                Err(SendError::Exchange { ref error, .. }) if was_not_delivered(error) => {
                    with_causes(error)
                }
                Err(error) => return Err(UpstreamError::Lost(with_causes(&error))),
            };
            if to.is_discovered() {
                // Another pod can take it now: not delivered, so any request may go there.
                to.refused();
                return Err(UpstreamError::Unreachable(failure));
            }
            let Some(pause) = backoff.next_pause() else {
                return Err(UpstreamError::Unavailable(self.hold, failure));
            };
            debug!(%failure, retry_in = ?pause, "upstream unavailable; holding the request");
            held = true;
            drop(sending);
            tokio::time::sleep(pause).await;
        }
    }
}
