//! The MCP server behind the proxy: requests with hold-and-retry while it restarts.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, header};
use bytes::Bytes;
use http_body_util::Full;
use tracing::debug;

use super::backoff;
use super::connector::{was_not_delivered, with_causes};
use super::pool::{Pool, SendError};
use super::protocol::strip_hop_by_hop;
use super::quiesce::{Gate, GateState, Tracked};
use crate::serve;

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
    #[error("bad upstream request: {0}")]
    Request(String),
}

pub struct Upstream {
    /// A pool of connections per serving thread (see [`serve::serving_thread`]), so that a
    /// call and the upstream connection it goes out on are served by one thread; and one for
    /// what runs elsewhere (background replays, the SSE transport's streams).
    pools: Vec<Pool>,
    shared: Pool,
    base: Uri,
    /// The `Host` of a request that came without one.
    host: HeaderValue,
    hold: Duration,
    /// Holds requests while the upstream is quiesced, and counts what it is working on.
    gate: Gate,
}

/// What came back, and whether it was held (the upstream was down for a while).
pub struct Answer {
    pub response: Response<Body>,
    pub held: bool,
}

impl Upstream {
    pub fn new(base: Uri, hold: Duration, serving_threads: usize) -> Self {
        let address = address_of(&base);
        let authority = base.authority().map_or("", |a| a.as_str());
        Self {
            pools: (0..serving_threads)
                .map(|_| Pool::new(address.clone()))
                .collect(),
            shared: Pool::new(address),
            host: HeaderValue::from_str(authority).unwrap_or(HeaderValue::from_static("localhost")),
            base,
            hold,
            gate: Gate::default(),
        }
    }

    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The connections of the thread this runs on.
    fn pool(&self) -> &Pool {
        serve::serving_thread()
            .and_then(|thread| self.pools.get(thread))
            .unwrap_or(&self.shared)
    }

    /// `host:port` of the upstream, for probes.
    pub fn address(&self) -> String {
        address_of(&self.base)
    }

    /// Sends the request; while the upstream is quiesced, refuses connections or answers
    /// 502/503 (it is restarting), holds it, for up to the hold time. The request counts as in
    /// flight from its sending until its response body ends (a GET's listening stream: until
    /// its head, as it never ends by itself).
    pub async fn send(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Answer, UpstreamError> {
        // Origin form, as a request to a server (not to a proxy) is written.
        let uri: Uri = path_and_query
            .parse()
            .map_err(|e| UpstreamError::Request(format!("{e}")))?;
        let deadline = Instant::now() + self.hold;
        let mut backoff = backoff::HOLD.until(deadline);
        let mut held = false;
        loop {
            held |= self.gate.state() == GateState::Quiesced;
            if !self.gate.pass(deadline).await {
                return Err(UpstreamError::Unavailable(
                    self.hold,
                    "the MCP server is restarting".into(),
                ));
            }
            let mut request = Request::builder().method(method.clone()).uri(uri.clone());
            let mut forwarded = headers.clone();
            // The client's Host goes on (the upstream's only where there is none): a server's
            // own DNS-rebinding check must see what the client asked for.
            strip_hop_by_hop(&mut forwarded);
            forwarded.remove(header::CONTENT_LENGTH);
            if !forwarded.contains_key(header::HOST) {
                forwarded.insert(header::HOST, self.host.clone());
            }
            if let Some(target) = request.headers_mut() {
                *target = forwarded;
            }
            let request = request
                .body(Full::new(body.clone()))
                .map_err(|e| UpstreamError::Request(e.to_string()))?;
            let sending = self.gate.sending();
            let failure = match self.pool().send(request).await {
                Ok(response) if matches!(response.status().as_u16(), 502 | 503) => {
                    format!("status {}", response.status())
                }
                Ok(response) if method == Method::GET => {
                    return Ok(Answer {
                        response: response.map(Body::new),
                        held,
                    });
                }
                Ok(response) => {
                    return Ok(Answer {
                        response: response.map(|body| Tracked::body(Body::new(body), sending)),
                        held,
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

/// `host:port` of `uri` (port 80 if it names none).
fn address_of(uri: &Uri) -> String {
    let authority = uri.authority().map_or("", |a| a.as_str());
    if uri.port().is_some() {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    }
}
