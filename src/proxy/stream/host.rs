//! What a relayed stream ([`crate::proxy::stream::relay`]) may ask of the proxy that serves it: the exchange
//! with the upstream (to resend or reopen), the session's event log and resumption, the
//! bookkeeping of an answer, the drain's phase, its own metrics. A handle, so that a relay
//! reaches nothing else of the proxy (its session table, store or replays).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use tokio::sync::watch;

use crate::count::Counted;
use crate::proxy::answers::Failure;
use crate::proxy::mcp::protocol::StreamKind;
use crate::proxy::metrics::{self, KindLabels, Unanswered};
use crate::proxy::session::exchange::{Bound, Exchange};
use crate::proxy::stream::listening::Registration;
use crate::proxy::upstream::Answer;
use crate::proxy::{Lookup, Phase, Proxy};
use crate::store::{LoggedEvent, SessionId};

#[derive(Clone)]
pub struct StreamHost(Arc<Proxy>);

impl StreamHost {
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self(proxy)
    }

    /// Counts a stream of `kind` as open until the returned guard drops: in the metrics, and
    /// (a response stream) as in flight, which a drain waits for.
    pub fn open(&self, kind: StreamKind) -> OpenStream {
        let in_flight = (kind == StreamKind::Response).then(|| self.0.lifecycle.in_flight());
        let gauge = self
            .0
            .metrics
            .streams
            .get_or_create(&KindLabels::of(kind))
            .clone();
        gauge.inc();
        OpenStream {
            gauge,
            _in_flight: in_flight,
        }
    }

    /// A listening stream's place among its session's, which a replay wakes.
    pub fn listen(&self, id: &SessionId) -> Registration {
        self.0.listening.register(id)
    }

    /// How long a request is held for a restarting upstream.
    pub fn hold(&self) -> Duration {
        self.0.config.hold
    }

    pub fn max_body_bytes(&self) -> usize {
        self.0.config.max_body_bytes
    }

    /// The proxy's phase, which ends streams as the drain reaches them.
    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.0.lifecycle.watch()
    }

    /// Is the session still on the upstream session its stream came from?
    pub fn is_live(&self, bound: &Bound) -> bool {
        matches!(self.0.lookup(bound), Lookup::Live(_))
    }

    /// See [`Proxy::upstream_events_after`].
    pub async fn events_after(
        &self,
        bound: &Bound,
        exchange: &Exchange,
        last: &str,
    ) -> Option<Body> {
        self.0.upstream_events_after(bound, exchange, last).await
    }

    /// See [`Proxy::exchange`].
    pub async fn send_upstream(&self, exchange: &Exchange) -> Result<Answer, Failure> {
        self.0.send_upstream(exchange).await
    }

    /// See [`Proxy::may_resend`].
    pub fn may_resend(&self, exchange: &Exchange) -> bool {
        self.0.may_resend(exchange)
    }

    /// The answer to `exchange`'s request has come: see [`Proxy::observe`].
    pub fn observe(&self, exchange: &Exchange, message: &[u8]) {
        self.0.observe(exchange, message);
    }

    /// Logs an event of the session's for `Last-Event-ID` resumption.
    pub fn log_event(&self, id: &SessionId, event: LoggedEvent) {
        self.0.events.append(id, event);
    }

    /// Counts what became of a request whose stream ended before its answer.
    pub fn count_unanswered(&self, outcome: Unanswered) {
        metrics::inc(&self.0.metrics.unanswered, outcome);
    }
}

/// An open stream, counted until it drops.
pub struct OpenStream {
    gauge: prometheus_client::metrics::gauge::Gauge,
    _in_flight: Option<Counted>,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}
