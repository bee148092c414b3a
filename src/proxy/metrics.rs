//! The proxy's metrics (DESIGN.md names): requests by method and status, latency, replays,
//! held and resent requests, claims, refusals, sessions and streams.

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::proxy::mcp::protocol::StreamKind;
use crate::serve::ListenerMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: &'static str,
    pub status: u16,
}

impl RequestLabels {
    /// The labels of an answered request: its method (the ones MCP uses by name, any other as
    /// `other`, so that a client cannot make series up) and the answer's status.
    pub fn of(method: &axum::http::Method, status: u16) -> Self {
        use axum::http::Method;
        let method = match *method {
            Method::GET => "GET",
            Method::POST => "POST",
            Method::DELETE => "DELETE",
            Method::OPTIONS => "OPTIONS",
            Method::HEAD => "HEAD",
            _ => "other",
        };
        Self { method, status }
    }
}

/// The `outcome` label of a family whose outcomes are the variants of `T`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct OutcomeLabels<T> {
    pub outcome: T,
}

impl<T: Outcome> EncodeLabelSet for OutcomeLabels<T> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeLabel as _;
        ("outcome", self.outcome.as_str()).encode(encoder.encode_label())
    }
}

/// A family's outcomes, in code by variant and in Prometheus in snake_case.
pub trait Outcome: Clone + std::fmt::Debug + std::hash::Hash + Eq + Send + Sync + 'static {
    fn as_str(&self) -> &'static str;
}

macro_rules! outcomes {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        pub enum $name {
            $($variant),+
        }

        impl Outcome for $name {
            fn as_str(&self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }
    };
}

outcomes!(
    /// `mcp_proxy_replays_total`.
    Replay { Replayed => "replayed", Refused => "refused" }
);
outcomes!(
    /// `mcp_proxy_unanswered_requests_total`: what became of a request whose answer was lost.
    Unanswered { Resent => "resent", Failed => "failed", Resumed => "resumed" }
);
outcomes!(
    /// `mcp_proxy_claims_total`.
    Claim {
        Claimed => "claimed",
        Shared => "shared",
        OtherCredential => "other_credential",
        Failed => "failed",
    }
);
outcomes!(
    /// `mcp_proxy_refused_sessions_total`: why a session was refused.
    Refusal {
        NotFound => "not_found",
        OtherCredential => "other_credential",
        InvalidId => "invalid_id",
        TooManySessions => "too_many_sessions",
        ProxyFull => "proxy_full",
        NewIdentitiesTooFast => "new_identities_too_fast",
        InitializeTooLarge => "initialize_too_large",
        StateLost => "state_lost",
    }
);
outcomes!(
    /// `mcp_proxy_sessions_lost_total`: why a session that stays on its pod (drain strategy
    /// `Wait`) lost the state its server held.
    Loss {
        OwnerGone => "owner_gone",
        OwnerRestarted => "owner_restarted",
        ServerRestarted => "server_restarted",
        MaxWait => "max_wait",
    }
);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

impl KindLabels {
    /// The label of a stream of `kind` (listen: GET, response: POST).
    pub fn of(kind: StreamKind) -> Self {
        Self {
            kind: match kind {
                StreamKind::Listen => "listen",
                StreamKind::Response => "response",
            },
        }
    }
}

/// Counts one `outcome` in a family of outcome counters.
pub fn inc<T: Outcome>(family: &Family<OutcomeLabels<T>, Counter>, outcome: T) {
    count(family, outcome);
}

/// Counts one more `outcome`; the count so far, for logging the 1st, 2nd, 4th, 8th… of a flood
/// rather than each.
pub fn count<T: Outcome>(family: &Family<OutcomeLabels<T>, Counter>, outcome: T) -> u64 {
    family.get_or_create(&OutcomeLabels { outcome }).inc() + 1
}

pub struct ProxyMetrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Histogram,
    pub replays: Family<OutcomeLabels<Replay>, Counter>,
    pub held: Counter,
    /// Requests whose response the upstream lost: `resent` (safe to execute twice) or
    /// `failed` (answered with a JSON-RPC error).
    pub unanswered: Family<OutcomeLabels<Unanswered>, Counter>,
    pub claims: Family<OutcomeLabels<Claim>, Counter>,
    pub refused: Family<OutcomeLabels<Refusal>, Counter>,
    pub sessions: Gauge,
    pub streams: Family<KindLabels, Gauge>,
    /// Streams resumed from the event log with `Last-Event-ID`.
    pub resumed: Family<KindLabels, Counter>,
    pub events_unlogged: Counter,
    /// Writes the store refused or did not answer (a full Redis, an outage), by operation.
    pub store_write_failures: Family<OperationLabels, Counter>,
    /// Sessions served from memory because the store lacks them.
    pub unstored: Gauge,
    /// Whether the store keeps sessions: 1 for its current verdict, 0 for the others.
    pub store_retention: Family<ReasonLabels, Gauge>,
    /// `evicted_keys` of the store, as last read.
    pub store_evicted_keys: Gauge,
    /// Sessions this proxy found missing from the store and wrote back.
    pub written_back: Counter,
    /// Sessions that stay on their pod, lost with it, by [`Loss`].
    pub lost: Family<ReasonLabels, Counter>,
    /// Time a stopping proxy served its sessions until they ended (drain strategy `Wait`).
    pub wait_duration: Histogram,
    pub drain_duration: Histogram,
    pub quiesce_duration: Histogram,
    /// The client and admin listeners' connections (shared by a proxy and its successors,
    /// which serve on the same listeners).
    pub listeners: ListenerMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

impl ProxyMetrics {
    pub fn new(listeners: ListenerMetrics) -> Self {
        let mut registry = Registry::default();
        listeners.register(&mut registry, "mcp_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "mcp_proxy_requests",
            "Requests by HTTP method and status",
            requests.clone(),
        );
        let latency = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "mcp_proxy_request_duration_seconds",
            "Time to the response head",
            latency.clone(),
        );
        let replays = Family::<OutcomeLabels<Replay>, Counter>::default();
        registry.register(
            "mcp_proxy_replays",
            "Handshake replays to a fresh upstream, by outcome",
            replays.clone(),
        );
        let held = Counter::default();
        registry.register(
            "mcp_proxy_held_requests",
            "Requests held while the upstream was down",
            held.clone(),
        );
        let unanswered = Family::<OutcomeLabels<Unanswered>, Counter>::default();
        registry.register(
            "mcp_proxy_unanswered_requests",
            "Requests whose response the upstream lost, by what the proxy did",
            unanswered.clone(),
        );
        let claims = Family::<OutcomeLabels<Claim>, Counter>::default();
        registry.register(
            "mcp_proxy_claims",
            "Claims of sessions from other pods",
            claims.clone(),
        );
        let refused = Family::<OutcomeLabels<Refusal>, Counter>::default();
        registry.register(
            "mcp_proxy_refused_sessions",
            "Session ids answered as unknown",
            refused.clone(),
        );
        let sessions = Gauge::default();
        registry.register(
            "mcp_proxy_sessions",
            "Sessions this proxy maps to its upstream",
            sessions.clone(),
        );
        let streams = Family::<KindLabels, Gauge>::default();
        registry.register(
            "mcp_proxy_streams",
            "Open SSE streams by kind (listen: GET, response: POST)",
            streams.clone(),
        );
        let resumed = Family::<KindLabels, Counter>::default();
        registry.register(
            "mcp_proxy_resumed_streams",
            "Streams resumed with Last-Event-ID from the event log",
            resumed.clone(),
        );
        let events_unlogged = Counter::default();
        registry.register(
            "mcp_proxy_events_unlogged",
            "SSE events not logged for resumption because the store fell behind",
            events_unlogged.clone(),
        );
        let store_write_failures = Family::<OperationLabels, Counter>::default();
        registry.register(
            "mcp_proxy_store_write_failures",
            "Session writes the store refused or did not answer, by operation",
            store_write_failures.clone(),
        );
        let unstored = Gauge::default();
        registry.register(
            "mcp_proxy_unstored_sessions",
            "Sessions served from this proxy's memory because the store lacks them",
            unstored.clone(),
        );
        let store_retention = Family::<ReasonLabels, Gauge>::default();
        registry.register(
            "mcp_proxy_store_retention",
            "Whether the store keeps sessions until their TTL: 1 for the verdict read last (Retained, EvictionPolicy, WritesRefused, KeysEvicted)",
            store_retention.clone(),
        );
        let store_evicted_keys = Gauge::default();
        registry.register(
            "mcp_proxy_store_evicted_keys",
            "Keys the store (Redis) evicted since it started, as read last",
            store_evicted_keys.clone(),
        );
        let written_back = Counter::default();
        registry.register(
            "mcp_proxy_written_back_sessions",
            "Sessions this proxy found missing from an evicting store and wrote back",
            written_back.clone(),
        );
        let lost = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "mcp_proxy_sessions_lost",
            "Sessions that stay on their pod (drain strategy Wait) whose state was lost, by reason; each counted once, by the proxy that removed it",
            lost.clone(),
        );
        let wait_duration = Histogram::new(exponential_buckets(0.1, 2.0, 16));
        registry.register(
            "mcp_proxy_wait_duration_seconds",
            "Time a stopping proxy served its sessions until the last ended (drain strategy Wait)",
            wait_duration.clone(),
        );
        let drain_duration = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register(
            "mcp_session_drain_duration_seconds",
            "Time from the start of a drain to its sessions marked draining",
            drain_duration.clone(),
        );
        let quiesce_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "mcp_proxy_quiesce_duration_seconds",
            "Time from a quiesce (the backend's preStop) to nothing in flight",
            quiesce_duration.clone(),
        );
        Self {
            store_retention,
            store_evicted_keys,
            written_back,
            lost,
            wait_duration,
            listeners,
            quiesce_duration,
            drain_duration,
            registry,
            requests,
            latency,
            replays,
            held,
            unanswered,
            claims,
            refused,
            sessions,
            streams,
            resumed,
            events_unlogged,
            store_write_failures,
            unstored,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_exposed_in_snake_case() {
        let metrics = ProxyMetrics::new(ListenerMetrics::default());
        inc(&metrics.claims, Claim::OtherCredential);
        inc(&metrics.refused, Refusal::InitializeTooLarge);
        inc(&metrics.replays, Replay::Replayed);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry).unwrap();
        for line in [
            r#"mcp_proxy_claims_total{outcome="other_credential"} 1"#,
            r#"mcp_proxy_refused_sessions_total{outcome="initialize_too_large"} 1"#,
            r#"mcp_proxy_replays_total{outcome="replayed"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
