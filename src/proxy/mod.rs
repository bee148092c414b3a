//! The session proxy: a reverse proxy in front of an MCP server that keeps every client's
//! session alive through upstream restarts and pod replacements.
//!
//! Streamable HTTP (2025-03-26 and later): the client gets a session id of the proxy's own; the
//! proxy maps it to the current upstream session, and when the upstream does not know it (it
//! restarted, or another pod created the session) replays `initialize` +
//! `notifications/initialized` with the stored params before forwarding. SSE streams go through
//! a relay ([`relay`]) that numbers and logs their events for `Last-Event-ID` resumption, keeps a
//! listening stream open across upstream restarts, and answers for requests the upstream lost.
//! Requests without a session (stateless servers, the 2026-07-28 revision) pass through.

// Layers, each depending only on those below it: `mcp` (protocol knowledge), `upstream` (the MCP
// servers and the connections to them), `session`, then `stream` and `legacy` (the two ways a
// session's events reach its client), `lifecycle` (serving, quiescing, retiring, the admin
// port), and `routing` (the request path) on top. The small shared parts stay at this level.
mod answers;
mod backoff;
mod legacy;
mod lifecycle;
mod mcp;
mod metrics;
mod routing;
mod session;
mod stream;
mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, header};
use tokio::sync::Mutex;
use tracing::info;

pub use crate::api::origin::{AllowedOrigins, InvalidOrigin};
use crate::count::Count;
use crate::proxy::answers::Unknown;
pub use crate::proxy::lifecycle::Quiesced;
use crate::proxy::lifecycle::{Lifecycle, Phase};
pub use crate::proxy::mcp::fingerprint::Fingerprinter;
use crate::proxy::mcp::retry::RetryPolicy;
use crate::proxy::metrics::ProxyMetrics;
use crate::proxy::session::bookkeeping::Unstored;
use crate::proxy::session::exchange::Bound;
pub use crate::proxy::session::home::{OnOwnerLost, Residence};
pub use crate::proxy::session::table::AdmissionLimits;
use crate::proxy::session::table::{Lookup, SessionTable, Transport};
use crate::proxy::stream::event_log::EventLog;
pub use crate::proxy::upstream::backends::{Backends, Endpoint};
use crate::proxy::upstream::{Upstream, UpstreamError};
use crate::serve::{self, ListenerMetrics};
use crate::store::{DebouncedToucher, LogBound, Owner, SessionId, SessionStore};

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// The MCP servers: the one beside the proxy, or a policy's pods (gateway mode).
    pub upstream: Arc<Backends>,
    pub admin: SocketAddr,
    pub pod_name: Option<String>,
    /// Where the policy's other proxies reach this one (`pod-ip:port`), recorded with the
    /// sessions it owns.
    pub advertise: Option<String>,
    pub drain_timeout: Duration,
    /// What a stopping proxy does with its sessions, and whom a session's requests go to.
    pub residence: Residence,
    /// How long a request is held while the upstream is down.
    pub hold: Duration,
    pub touch_interval: Duration,
    pub max_body_bytes: usize,
    /// Sessions unused this long are dropped from memory (the store's sliding TTL).
    pub session_ttl: Duration,
    /// What each session's log of events for `Last-Event-ID` resumption keeps.
    pub event_log: LogBound,
    /// How often the proxy checks that the store keeps sessions, and on one that may evict
    /// them, writes back those it lost.
    pub write_back_interval: Duration,
    /// Who may open a session: per identity, per proxy, and the rate of new identities.
    pub admission: AdmissionLimits,
    /// What `/drain`, `/retire` and `/sessions` require in `X-Mcp-Drain-Token`; without one
    /// they answer nobody.
    pub drain_token: Option<String>,
    /// The web pages (by `Origin`) that may send requests.
    pub allowed_origins: AllowedOrigins,
    /// Timeouts and the connection cap of the client listener.
    pub limits: serve::Limits,
    /// Largest `initialize` params kept for a session (they live as long as it does).
    pub max_initialize_bytes: usize,
    /// Threads serving client connections ([`serve::serve`]).
    pub serving_threads: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// The proxy: its configuration, its handles on the upstream and the store, and the parts that
/// own its state (the session table, the lifecycle); its behaviour is spread over the modules
/// above by job (routing, exchange, replay, resume, bookkeeping, lifecycle, answers).
pub struct Proxy {
    config: ProxyConfig,
    upstream: Upstream,
    store: Arc<dyn SessionStore>,
    toucher: DebouncedToucher,
    fingerprints: Fingerprinter,
    /// The sessions this proxy serves.
    table: SessionTable,
    /// One replay at a time per session; concurrent requests wait on it.
    replays: Mutex<HashMap<SessionId, Arc<Mutex<()>>>>,
    /// Sessions the store does not have right now (it was down, or lost them).
    unstored: Unstored,
    retry: RetryPolicy,
    events: EventLog,
    /// HTTP+SSE requests awaiting their answers on the stream.
    unanswered: legacy::Unanswered,
    /// Connections to the proxies of pods that own sessions (drain strategy `Wait`).
    hops: session::home::Hops,
    /// Sessions being ended by their clients: their servers forgetting them is neither a loss
    /// nor a restart.
    ending: session::ending::Ending,
    /// Listening streams, which a replay reopens.
    listening: Arc<stream::listening::ListeningStreams>,
    lifecycle: Lifecycle,
    metrics: ProxyMetrics,
}

impl Proxy {
    pub fn new(
        config: ProxyConfig,
        store: Arc<dyn SessionStore>,
        fingerprints: Fingerprinter,
    ) -> Arc<Self> {
        Self::build(
            config,
            store,
            fingerprints,
            Count::default(),
            ListenerMetrics::default(),
        )
    }

    /// A fresh proxy of the same configuration, store and key on the same listeners, for a
    /// pod whose proxy retired without the pod stopping (see [`succession`]).
    fn successor(&self) -> Arc<Self> {
        Self::build(
            self.config.clone(),
            self.store.clone(),
            self.fingerprints.clone(),
            self.lifecycle.connections().clone(),
            self.metrics.listeners.clone(),
        )
    }

    fn build(
        config: ProxyConfig,
        store: Arc<dyn SessionStore>,
        fingerprints: Fingerprinter,
        connections: Count,
        listeners: ListenerMetrics,
    ) -> Arc<Self> {
        let metrics = ProxyMetrics::new(listeners);
        Arc::new(Self {
            upstream: Upstream::new(config.upstream.clone(), config.hold),
            toucher: DebouncedToucher::new(store.clone(), config.touch_interval),
            events: EventLog::start(
                store.clone(),
                config.event_log,
                metrics.events_unlogged.clone(),
            ),
            table: SessionTable::new(
                config.admission,
                metrics.sessions.clone(),
                config.residence.max_wait().is_some(),
            ),
            config,
            store,
            fingerprints,
            replays: Default::default(),
            unstored: Unstored::new(metrics.unstored.clone()),
            retry: RetryPolicy::default(),
            unanswered: legacy::Unanswered::default(),
            listening: Arc::default(),
            hops: Default::default(),
            ending: Default::default(),
            lifecycle: Lifecycle::new(connections),
            metrics,
        })
    }

    /// What memory says of a Streamable HTTP session, for `bound`'s credential.
    fn lookup(&self, bound: &Bound) -> Lookup {
        self.table.lookup(
            &bound.id,
            bound.credential.as_deref(),
            Transport::Streamable,
        )
    }

    /// This proxy, as the owner of the sessions it serves.
    fn owner(&self) -> Owner {
        Owner {
            pod: self.config.pod_name.clone(),
            address: self.config.advertise.clone(),
            upstream_session: None,
        }
    }

    fn credential_of(&self, headers: &HeaderMap) -> Option<String> {
        self.fingerprints
            .fingerprint(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()))
    }
}

/// Serves the proxy on `config.listen` and the admin endpoints on `config.admin` until
/// `shutdown` resolves; then drains and returns.
pub async fn run(
    proxy: Arc<Proxy>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ProxyError> {
    let (listen, admin) = (proxy.config.listen, proxy.config.admin);
    let bind = |address: SocketAddr| async move {
        tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| ProxyError::Listen { address, source })
    };
    let (listener, admin_listener) = (bind(listen).await?, bind(admin).await?);
    let (succeed, current) = lifecycle::succession::current(proxy.clone());
    info!(%listen, upstream = %proxy.config.upstream.describe(), %admin, store = %proxy.store.describe(), "session proxy serving");
    let listeners = proxy.metrics.listeners.clone();
    tokio::spawn(lifecycle::admin::serve(
        current.clone(),
        admin_listener,
        listeners.of("admin"),
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let open = proxy.lifecycle.connections().clone();
    let served = serve::Served {
        app: current,
        accept: move |tcp| {
            let open = open.clone();
            async move { Some(lifecycle::connections::Connection::new(tcp, &open)) }
        },
        limits: proxy.config.limits,
    };
    let server = tokio::spawn(serve::serve(
        listener,
        served,
        listeners.of("mcp"),
        proxy.config.serving_threads,
        async move {
            let _ = stopped.await;
        },
    ));
    lifecycle::succession::serve(proxy, succeed, shutdown).await;
    let _ = stop.send(());
    let _ = server.await;
    Ok(())
}
