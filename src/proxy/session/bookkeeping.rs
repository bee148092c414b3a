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
use crate::store::redis::RetentionVerdict;
use crate::store::{SessionId, SessionPatch, Tally, Touched};

/// Sessions checked against the store per round trip (one `EXISTS` each, pipelined), and the
/// pause between batches: 20,000 sessions in 40 round trips over 2 s.
const WRITE_BACK_BATCH: usize = 500;
const WRITE_BACK_PAUSE: Duration = Duration::from_millis(50);

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

    /// Writes a session this proxy serves back into the store, which lost it or was down;
    /// whether the store took it.
    pub(in crate::proxy) async fn restore(&self, id: &SessionId) -> bool {
        let owner = match self.table.upstream_of(id) {
            Some(upstream) => self.owner_on(&upstream),
            None => self.owner(),
        };
        let Some(session) = self.table.stored_copy(id, owner) else {
            return false;
        };
        match self.store.create_or_rehydrate(id, session).await {
            Ok(_) => {
                if self.unstored.remove(id) {
                    info!(session = %id, "session written back to the store");
                }
                true
            }
            Err(error) => {
                debug!(session = %id, %error, "the store does not take the session yet");
                self.mark_unstored(id, "restore");
                false
            }
        }
    }

    /// Until the process ends: retries writing every session the store lacks (every 2 s),
    /// drops sessions idle past their TTL (every minute), and checks that the store keeps what
    /// it is given (every write-back interval, see [`Self::check_retention`]).
    pub(in crate::proxy) async fn maintain(self: Arc<Self>) {
        const TICK: Duration = Duration::from_secs(2);
        let mut since_idle_check = Duration::ZERO;
        let mut since_retention_check = self.config.write_back_interval;
        let mut last_verdict = None;
        loop {
            tokio::time::sleep(TICK).await;
            for id in self.unstored.snapshot() {
                self.restore(&id).await;
            }
            since_idle_check += TICK;
            if since_idle_check >= Duration::from_secs(60) {
                since_idle_check = Duration::ZERO;
                let forgotten = self.forget_idle();
                if forgotten > 0 {
                    info!(forgotten, "dropped sessions idle past their TTL");
                }
            }
            since_retention_check += TICK;
            if since_retention_check >= self.config.write_back_interval {
                since_retention_check = Duration::ZERO;
                last_verdict = self.check_retention(last_verdict).await;
            }
        }
    }

    /// Reads whether the store keeps sessions until their TTL, reports it (metrics, and a
    /// warning when the verdict turns for the worse), and where the store may have evicted
    /// some, writes back those this proxy serves that it lacks ([`Self::write_back_lost`]).
    /// Returns the verdict, for the next check to compare.
    async fn check_retention(&self, last: Option<RetentionVerdict>) -> Option<RetentionVerdict> {
        let retention = match self.store.retention().await {
            Ok(Some(retention)) => retention,
            Ok(None) => return None,
            Err(error) => {
                debug!(%error, "cannot read the store's eviction policy and memory");
                return last;
            }
        };
        let verdict = retention.verdict();
        for reason in RetentionVerdict::REASONS {
            let gauge = self
                .metrics
                .store_retention
                .get_or_create(&metrics::ReasonLabels { reason });
            gauge.set(i64::from(reason == verdict.reason()));
        }
        self.metrics
            .store_evicted_keys
            .set(i64::try_from(retention.evicted_keys).unwrap_or(i64::MAX));
        if last.as_ref().map(RetentionVerdict::reason) != Some(verdict.reason()) {
            let consequence = verdict.consequence();
            match verdict {
                RetentionVerdict::Retained => info!("{consequence}"),
                _ => warn!(
                    reason = verdict.reason(),
                    policy = %retention.maxmemory_policy,
                    evicted_keys = retention.evicted_keys,
                    "the store may lose sessions before their TTL: {consequence}"
                ),
            }
        }
        if verdict.may_evict() {
            self.write_back_lost().await;
        }
        Some(verdict)
    }

    /// Finds the sessions this proxy serves that the store lacks (evicted), a batch per round
    /// trip with a pause between, and writes them back, so that a later restart or move of
    /// this pod still finds them. Only on a store that may evict: elsewhere a missing session
    /// was deleted on purpose (a DELETE through another pod), and stays deleted.
    async fn write_back_lost(&self) {
        // Sessions idle past their TTL expired in the store: not lost.
        self.forget_idle();
        let ids = self.table.ids();
        let mut written = 0_u64;
        for batch in ids.chunks(WRITE_BACK_BATCH) {
            let missing = match self.store.missing(batch).await {
                Ok(missing) => missing,
                Err(error) => {
                    debug!(%error, "cannot check the store for evicted sessions");
                    return;
                }
            };
            for id in &missing {
                if self.restore(id).await {
                    self.metrics.written_back.inc();
                    written += 1;
                }
            }
            tokio::time::sleep(WRITE_BACK_PAUSE).await;
        }
        if written > 0 {
            info!(
                written,
                checked = ids.len(),
                "wrote back sessions the store had evicted"
            );
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
        let owner = self.owner_pod_of(id);
        match self.toucher.touch(id, owner.as_deref()).await {
            // Boxed, as are the request path's other rare turns (see [`Proxy::route`]).
            Ok(Touched::Gone) => {
                Box::pin(self.restore(id)).await;
            }
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
