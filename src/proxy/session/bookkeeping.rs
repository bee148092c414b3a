//! What the proxy keeps of its sessions beside forwarding: the store's copy (written back when
//! the store lost it or was down), the set-up replays repeat, the rollout tallies, and the
//! sessions idle past their TTL, forgotten.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{Method, StatusCode};
use prometheus_client::metrics::gauge::Gauge;
use tracing::{debug, info, warn};

use crate::proxy::session::exchange::Exchange;
use crate::proxy::session::table::{Mapping, Slot};
use crate::proxy::{Proxy, mcp::protocol, metrics};
use crate::store::{SessionId, SessionPatch, Tally, Touched};

/// Sessions the store does not have right now (it was down or full, or lost them), served from
/// memory until [`Proxy::maintain`] writes them back; counted in `mcp_proxy_sessions_unstored`.
pub struct Unstored {
    ids: Mutex<HashSet<SessionId>>,
    gauge: Gauge,
}

impl Unstored {
    pub fn new(gauge: Gauge) -> Self {
        Self {
            ids: Mutex::default(),
            gauge,
        }
    }

    pub(in crate::proxy) fn ids(&self) -> std::sync::MutexGuard<'_, HashSet<SessionId>> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(in crate::proxy) fn insert(&self, id: &SessionId) {
        let mut ids = self.ids();
        ids.insert(id.clone());
        self.gauge.set(ids.len() as i64);
    }

    /// Whether `id` was missing from the store until now.
    pub(in crate::proxy) fn remove(&self, id: &SessionId) -> bool {
        let mut ids = self.ids();
        let removed = ids.remove(id);
        self.gauge.set(ids.len() as i64);
        removed
    }

    pub fn len(&self) -> usize {
        self.ids().len()
    }

    pub(in crate::proxy) fn snapshot(&self) -> Vec<SessionId> {
        self.ids().iter().cloned().collect()
    }
}

impl Proxy {
    pub(in crate::proxy) fn forget(&self, id: &SessionId) {
        self.table.unmap(id);
        self.toucher.forget(id);
    }

    /// Drops sessions unused for longer than the session TTL: the store has let them expire.
    pub(in crate::proxy) fn forget_idle(&self) -> usize {
        let idle = self.table.idle(self.config.session_ttl);
        for id in &idle {
            self.forget(id);
        }
        idle.len()
    }

    /// Keeps a new session: in the table (in the slot admitted for it) and in the store; where
    /// the store refuses it, served from memory meanwhile and written once the store is back.
    pub(in crate::proxy) async fn keep_new(
        &self,
        id: &SessionId,
        mapping: Mapping,
        slot: Slot<'_>,
    ) {
        let new = mapping.stored.clone();
        self.table.remember(id, mapping, Some(slot));
        if let Err(error) = self.store.create_or_rehydrate(id, new).await {
            warn!(session = %id, %error, "cannot store the new session");
            self.mark_unstored(id, "create");
        }
    }

    /// A write of `operation` for `id` failed: the session is served from memory and written
    /// back by [`Self::maintain`] when the store takes writes again.
    pub(in crate::proxy) fn mark_unstored(&self, id: &SessionId, operation: &'static str) {
        self.metrics
            .store_write_failures
            .get_or_create(&metrics::OperationLabels { operation })
            .inc();
        self.unstored.insert(id);
    }

    /// Writes a session this proxy serves back into the store, which lost it or was down.
    pub(in crate::proxy) async fn restore(&self, id: &SessionId) {
        let Some(session) = self.table.stored_copy(id, self.config.pod_name.clone()) else {
            return;
        };
        match self.store.create_or_rehydrate(id, session).await {
            Ok(_) => {
                if self.unstored.remove(id) {
                    info!(session = %id, "session written back to the store");
                }
            }
            Err(error) => {
                debug!(session = %id, %error, "the store does not take the session yet");
                self.mark_unstored(id, "restore");
            }
        }
    }

    /// Until the process ends: retries writing every session the store lacks, and drops
    /// sessions that have been idle past their TTL.
    pub(in crate::proxy) async fn maintain(self: Arc<Self>) {
        let mut ticks = 0_u64;
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            for id in self.unstored.snapshot() {
                self.restore(&id).await;
            }
            ticks += 1;
            if ticks.is_multiple_of(30) {
                let forgotten = self.forget_idle();
                if forgotten > 0 {
                    info!(forgotten, "dropped sessions idle past their TTL");
                }
            }
        }
    }

    /// Keeps what a request set up in the session (a subscription, the log level), in memory
    /// and in the store, for the replays to set it up again.
    pub(in crate::proxy) fn record_setup(&self, id: &SessionId, exchange: &Exchange) {
        let Some(change) = exchange
            .head
            .as_ref()
            .and_then(|head| head.method.as_deref())
            .filter(|method| protocol::SETUP_METHODS.contains(method))
            .and_then(|_| protocol::setup_change(&exchange.body))
        else {
            return;
        };
        if self.table.record_setup(id, change.clone()) {
            let patch = SessionPatch {
                setup: Some(change),
                ..Default::default()
            };
            self.patch_in_background(id, patch);
        }
    }

    /// Bookkeeping after the upstream answered a session's request.
    pub(in crate::proxy) async fn after_answer(
        &self,
        method: &Method,
        id: &SessionId,
        status: StatusCode,
    ) {
        if *method == Method::DELETE && status.is_success() {
            self.forget(id);
            if let Err(error) = self.store.delete(id).await {
                warn!(session = %id, %error, "cannot delete the session from the store");
            }
            return;
        }
        match self
            .toucher
            .touch(id, self.config.pod_name.as_deref())
            .await
        {
            // Boxed, as are the request path's other rare turns (see [`Proxy::route`]).
            Ok(Touched::Gone) => Box::pin(self.restore(id)).await,
            Ok(Touched::Draining) => Box::pin(self.take_over(id)).await,
            Ok(Touched::Written | Touched::Skipped) => {}
            Err(error) => {
                debug!(session = %id, %error, "touch failed; the store may be down or full");
                self.mark_unstored(id, "touch");
            }
        }
    }

    /// Writes what the proxy learned of a session to the store, off the request path: the copy
    /// in memory already has it, and is written back whole if the store lost the session.
    pub(in crate::proxy) fn patch_in_background(&self, id: &SessionId, patch: SessionPatch) {
        let (store, id) = (self.store.clone(), id.clone());
        let failures = self.metrics.store_write_failures.clone();
        tokio::spawn(async move {
            if let Err(error) = store.update(&id, patch).await {
                failures
                    .get_or_create(&metrics::OperationLabels {
                        operation: "update",
                    })
                    .inc();
                warn!(session = %id, %error, "cannot update the session in the store");
            }
        });
    }

    /// Adds to the store's running tallies, which the operator reads per rollout; off the
    /// request path, and a failure only costs accuracy of those counts.
    pub(in crate::proxy) fn report(&self, tally: Tally, n: u64) {
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(error) = store.tally(tally, n).await {
                warn!(%error, tally = tally.field(), n, "cannot report to the store's tallies");
            }
        });
    }
}
