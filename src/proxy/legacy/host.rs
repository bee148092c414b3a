//! What the HTTP+SSE transport ([`crate::proxy::legacy::transport`]) may ask of the proxy: admit, create, look
//! up, remap and end its sessions, send to the upstream, answer for what it cannot forward,
//! count. A handle, so that the transport reaches the session table, the store and the
//! upstream only through these operations.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::watch;
use tracing::debug;

use crate::count::Counted;
use crate::proxy::answers::{Failure, Unknown};
use crate::proxy::legacy::transport::{PROTOCOL_VERSION, Unanswered};
use crate::proxy::mcp::protocol;
use crate::proxy::metrics::{self, Replay};
use crate::proxy::session::exchange::Exchange;
use crate::proxy::session::table::{Mapping, Slot, UpstreamSession};
use crate::proxy::upstream::backends::Assigned;
use crate::proxy::upstream::{Answer, Outbound, UpstreamError};
use crate::proxy::{Lookup, Phase, Proxy, Transport};
use crate::store::{NewSession, SessionId, SessionPatch};

#[derive(Clone)]
pub struct SseHost(Arc<Proxy>);

impl SseHost {
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self(proxy)
    }

    /// A place for a new session under the request's credential, or the refusal to answer.
    #[allow(clippy::result_large_err)] // The refusal is the response, built once.
    pub(in crate::proxy) fn admit(&self, exchange: &Exchange) -> Result<Slot<'_>, Response> {
        self.0.admit(exchange)
    }

    /// Creates the session `id` on the upstream message endpoint `upstream`: in the table, and
    /// in the store (served from memory where the store refuses it).
    pub async fn create(&self, id: &SessionId, upstream: UpstreamSession, slot: Slot<'_>) {
        let new = NewSession {
            protocol_version: Some(PROTOCOL_VERSION.to_owned()),
            credential_fingerprint: slot.credential.clone(),
            ..Default::default()
        }
        .owned_by(self.0.owner());
        let mapping = Mapping {
            upstream,
            transport: Transport::Sse,
            stored: new,
        };
        self.0.keep_new(id, mapping, slot).await;
    }

    /// The upstream endpoint of the session, for `credential`.
    pub fn lookup(&self, id: &SessionId, credential: Option<&str>) -> Lookup {
        self.0.table.lookup(id, credential, Transport::Sse)
    }

    /// Keeps the client's `initialize` params, for replays.
    pub fn remember_initialize(&self, id: &SessionId, body: &Bytes) {
        let Some(params) = protocol::initialize_params(protocol::message(body).as_ref()) else {
            return;
        };
        if !self.0.table.set_initialize_params(id, &params) {
            return;
        }
        let patch = SessionPatch {
            initialize_params: Some(params),
            ..Default::default()
        };
        self.0.patch_in_background(id, patch);
    }

    pub fn initialize_params(&self, id: &SessionId) -> Option<Value> {
        self.0.table.initialize_params(id)
    }

    /// Points the session at a new upstream endpoint (its stream was re-established).
    pub fn remap(&self, id: &SessionId, upstream: UpstreamSession) {
        self.0.table.remap(id, upstream);
    }

    /// Waits until the session moves off `old`; false if `deadline` comes first.
    pub async fn remapped_from(
        &self,
        id: &SessionId,
        old: &UpstreamSession,
        deadline: Instant,
    ) -> bool {
        self.0.table.remapped_from(id, old, deadline).await
    }

    /// The client left: the session ends with its stream, as in the SDK servers (forgotten,
    /// and deleted from the store).
    pub async fn end(&self, id: &SessionId) {
        self.0.forget(id);
        if let Err(error) = self.0.store.delete(id).await {
            debug!(session = %id, %error, "cannot delete the session from the store");
        }
    }

    /// The transport's requests that await their answers on a stream.
    pub fn unanswered(&self) -> &Unanswered {
        &self.0.unanswered
    }

    /// Sends to a backend, held while it restarts: see [`crate::proxy::upstream::Upstream::send`].
    pub async fn send(
        &self,
        to: &Assigned,
        outbound: Outbound<'_>,
    ) -> Result<Answer, UpstreamError> {
        self.0.upstream.send(to, outbound).await
    }

    /// The backend a new stream goes to (in gateway mode, the least-loaded pod that takes it).
    pub async fn pick(&self) -> Result<Assigned, UpstreamError> {
        let deadline = Instant::now() + self.0.config.hold;
        self.0.upstream.pick(deadline).await
    }

    /// Counts a request as in flight at the upstream until the guard drops.
    pub fn sending(&self) -> Counted {
        self.0.upstream.gate().sending()
    }

    /// What follows an upstream's answer to a session's request (touch, or a session gone).
    pub async fn after_answer(&self, method: &Method, id: &SessionId, status: StatusCode) {
        self.0.after_answer(method, id, status).await;
    }

    pub fn credential_of(&self, headers: &HeaderMap) -> Option<String> {
        self.0.credential_of(headers)
    }

    /// See [`Proxy::may_resend`].
    pub fn may_resend(&self, exchange: &Exchange) -> bool {
        self.0.may_resend(exchange)
    }

    /// Learns from an answer the upstream sent (a `tools/list` one: which tools are safe).
    pub fn learn(&self, answer: &[u8]) {
        self.0.retry.learn(answer);
    }

    pub fn unknown(&self, why: Unknown, request_id: Option<Value>, id: &str) -> Response {
        self.0.unknown(why, request_id, id)
    }

    pub fn failure(&self, failure: Failure, exchange: &Exchange) -> Response {
        self.0.failure(failure, exchange)
    }

    /// How long a request is held for a restarting upstream.
    pub fn hold(&self) -> Duration {
        self.0.config.hold
    }

    /// The proxy's phase, which ends streams as the drain reaches them.
    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.0.lifecycle.watch()
    }

    pub fn count_held(&self) {
        self.0.metrics.held.inc();
    }

    pub fn count_replay(&self, outcome: Replay) {
        metrics::inc(&self.0.metrics.replays, outcome);
    }

    pub fn count_unanswered(&self, outcome: metrics::Unanswered) {
        metrics::inc(&self.0.metrics.unanswered, outcome);
    }
}
