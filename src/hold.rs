//! The hold: what keeps a stopping backend pod alive for its sessions in gateway mode, under
//! drain strategy `Wait`.
//!
//! A gateway pins each session to the backend pod that holds its state (see the proxy's
//! `session::pinned`), and that pod must keep serving its sessions while it terminates, until
//! they end. The kubelet stops a container once its preStop hook returns, and a hook may call
//! only its own pod (Pod Security's baseline level forbids a hook's `host` from 1.34): so the
//! webhook injects this small container beside the backend, and points the backend's preStop
//! hook at its `/hold`, which answers once the store names this pod the owner of no session,
//! or at `maxWaitSeconds`. The sessions still open then stop with the pod: a gateway answers
//! each 404 at its next request and counts it lost, or the operator does once the pod is gone.
//! The hold removes none itself: a gateway may still serve one from the stopping server, and
//! would write it back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use tokio::sync::OnceCell;
use tracing::{info, warn};

use crate::count::Count;
use crate::serve::{ConnectionMetrics, refuse_without_drain_token};
use crate::store::SessionStore;

/// How often the hold looks at the store, and how often it says what it waits for.
const POLL: Duration = Duration::from_secs(1);
const REPORT: Duration = Duration::from_secs(10);
/// Sessions read per look: enough to name how many are left.
const BATCH: usize = 1000;
/// How long a hold that got SIGTERM keeps answering for a preStop hook to reach it: a classic
/// sidecar gets its SIGTERM as the backend's hook starts, not after it.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct HoldConfig {
    /// The pod whose sessions are waited for.
    pub pod: String,
    pub max_wait: Duration,
    /// What `/hold` requires in `X-Mcp-Drain-Token`; without one it answers nobody.
    pub drain_token: Option<String>,
}

/// How a hold ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// The pod's sessions ended, after this long.
    Ended(Duration),
    /// `max_wait` came first, with this many sessions still open when the store last said
    /// (or more, if a batch's worth): they stop with the pod.
    MaxWait { open: usize },
}

/// One pod's hold: every preStop hook of the pod (one per backend container) waits on the one
/// wait, which starts with the first.
pub struct Hold {
    config: HoldConfig,
    store: Arc<dyn SessionStore>,
    held: OnceCell<Held>,
    /// Hooks waiting now: a stopping hold exits only once none is.
    waiting: Count,
}

impl Hold {
    pub fn new(config: HoldConfig, store: Arc<dyn SessionStore>) -> Arc<Self> {
        Arc::new(Self {
            config,
            store,
            held: OnceCell::new(),
            waiting: Count::default(),
        })
    }

    /// Waits until the store names this pod the owner of no session, or `max_wait`.
    pub async fn hold(&self) -> Held {
        let _waiting = self.waiting.enter();
        *self.held.get_or_init(|| self.wait_once()).await
    }

    async fn wait_once(&self) -> Held {
        let pod = self.config.pod.as_str();
        let started = Instant::now();
        let deadline = started + self.config.max_wait;
        let mut report = started;
        // What the store said last: it may not answer at the deadline.
        let mut open = 0;
        info!(pod, max_wait = ?self.config.max_wait, "holding the pod until its sessions end");
        loop {
            match self.store.sessions_of_pod(pod, BATCH).await {
                Ok(ids) if ids.is_empty() => {
                    let waited = started.elapsed();
                    info!(pod, ?waited, "the pod's sessions have ended");
                    return Held::Ended(waited);
                }
                Ok(ids) => open = ids.len(),
                Err(error) => {
                    warn!(pod, %error, "cannot read the pod's sessions from the store; trying again");
                }
            }
            let now = Instant::now();
            if now >= deadline {
                warn!(pod, open, max_wait = ?self.config.max_wait, "sessions still open at the drain's maximum wait stop with the pod, and are lost");
                return Held::MaxWait { open };
            }
            if now >= report {
                let more = if open == BATCH { " or more" } else { "" };
                info!(pod, open, waited = ?started.elapsed(), "waiting for {open} sessions{more} to end");
                report = now + REPORT;
            }
            tokio::time::sleep(POLL.min(deadline - now)).await;
        }
    }
}

/// Serves `/healthz` and `/hold` on `listener` until `shutdown`, then for as long as a hook
/// waits on the hold (after [`SETTLE`], for a hook about to come).
pub async fn serve(
    hold: Arc<Hold>,
    listener: tokio::net::TcpListener,
    connections: ConnectionMetrics,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/hold", get(answer).post(answer))
        .with_state(hold.clone());
    let server = tokio::spawn(crate::serve::serve_probes(listener, app, connections));
    shutdown.await;
    tokio::time::sleep(SETTLE).await;
    hold.waiting.zero().await;
    server.abort();
}

/// Binds `address` for [`serve`].
pub async fn listen(address: SocketAddr) -> Result<tokio::net::TcpListener, HoldError> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| HoldError::Listen { address, source })
}

/// The backend's preStop hook: answers once the pod's sessions have ended.
async fn answer(
    State(hold): State<Arc<Hold>>,
    request: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    if let Some(refusal) = refuse_without_drain_token(hold.config.drain_token.as_deref(), &request)
    {
        return refusal;
    }
    match hold.hold().await {
        Held::Ended(waited) => format!("the pod's sessions ended after {waited:.1?}\n"),
        Held::MaxWait { open } => {
            format!("{open} sessions were still open at the maximum wait: they stop with the pod\n")
        }
    }
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, NewSession, Owner, SessionId};

    async fn sessions_of(store: &MemoryStore, pod: &str, n: usize) -> Vec<SessionId> {
        let mut ids = Vec::new();
        for _ in 0..n {
            let id = SessionId::random();
            let owner = Owner {
                pod: Some(pod.into()),
                ..Owner::default()
            };
            store
                .create_or_rehydrate(&id, NewSession::default().owned_by(owner))
                .await
                .expect("stored");
            ids.push(id);
        }
        ids
    }

    fn hold(store: &Arc<MemoryStore>, max_wait: Duration) -> Arc<Hold> {
        let config = HoldConfig {
            pod: "api-1".into(),
            max_wait,
            drain_token: None,
        };
        Hold::new(config, store.clone())
    }

    #[tokio::test]
    async fn a_hold_ends_when_the_pod_s_sessions_do_and_every_hook_shares_it() {
        let store = Arc::new(MemoryStore::new(Duration::from_secs(60)));
        let ours = sessions_of(&store, "api-1", 2).await;
        sessions_of(&store, "api-2", 1).await;
        let hold = hold(&store, Duration::from_secs(30));
        let (first, second) = (hold.clone(), hold.clone());
        let hooks = tokio::spawn(async move { tokio::join!(first.hold(), second.hold()) });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!hooks.is_finished(), "two sessions are open");
        for id in &ours {
            store.delete(id).await.expect("ended");
        }
        let (first, second) = hooks.await.expect("joined");
        assert!(matches!(first, Held::Ended(_)), "{first:?}");
        assert_eq!(first, second, "one wait");
    }

    #[tokio::test]
    async fn at_the_maximum_wait_the_pod_stops_with_its_open_sessions() {
        let store = Arc::new(MemoryStore::new(Duration::from_secs(60)));
        let ours = sessions_of(&store, "api-1", 3).await;
        let held = hold(&store, Duration::from_millis(200)).hold().await;
        assert_eq!(held, Held::MaxWait { open: 3 });
        for id in &ours {
            assert!(
                store.get(id).await.expect("read").is_some(),
                "left for whoever meets the loss to count"
            );
        }
        assert_eq!(store.tallies().await.expect("tallies").lost, 0);
    }
}
