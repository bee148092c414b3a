//! A Redis store that connects when Redis answers: a proxy starting while Redis is down must
//! come up and serve its clients (from its own memory) rather than crash-loop and take its MCP
//! server offline with it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{StreamExt as _, TryStreamExt as _};
use tokio::sync::OnceCell;
use tracing::info;

use super::super::{
    Claim, ClaimOutcome, ListCursor, ListPage, Listed, LogBound, LoggedEvent, MemorySample,
    NewSession, Origin, PruneReport, RecordObserver, Result, Session, SessionCounts, SessionId,
    SessionPatch, SessionStore, StoreError, Tallies, Tally, Touch,
};
use super::{Keys, RedisStore, RedisTarget};

/// At most one connection attempt per this interval; calls in between fail at once.
const RETRY_EVERY: Duration = Duration::from_secs(1);

pub struct LazyRedisStore {
    target: RedisTarget,
    prefix: String,
    ttl: Duration,
    store: OnceCell<RedisStore>,
    last_attempt: Mutex<Option<Instant>>,
}

impl LazyRedisStore {
    /// Tries to connect once; an unreachable Redis is not an error here (a bad prefix is).
    pub async fn new(target: RedisTarget, prefix: &str, ttl: Duration) -> Result<Self> {
        Keys::new(prefix)?;
        let lazy = Self {
            target,
            prefix: prefix.to_owned(),
            ttl,
            store: OnceCell::new(),
            last_attempt: Mutex::new(None),
        };
        match lazy.store().await {
            Ok(_) => {}
            Err(error) if error.is_transient() => {
                tracing::warn!(%error, "Redis is unreachable; serving from memory until it answers");
            }
            Err(error) => return Err(error),
        }
        Ok(lazy)
    }

    /// The connected store, connecting first if it is time to try.
    async fn store(&self) -> Result<&RedisStore> {
        if let Some(store) = self.store.get() {
            return Ok(store);
        }
        {
            let mut last = self.last_attempt.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|at| at.elapsed() < RETRY_EVERY) {
                return Err(StoreError::NotConnected {
                    url: self.target.masked(),
                });
            }
            *last = Some(Instant::now());
        }
        let store = RedisStore::connect(self.target.clone(), &self.prefix, self.ttl).await?;
        info!(redis = %self.target.masked(), "connected to Redis");
        Ok(self.store.get_or_init(|| async { store }).await)
    }
}

#[async_trait]
impl SessionStore for LazyRedisStore {
    async fn create_or_rehydrate(
        &self,
        id: &SessionId,
        new: NewSession,
    ) -> Result<(Session, Origin)> {
        self.store().await?.create_or_rehydrate(id, new).await
    }

    async fn get(&self, id: &SessionId) -> Result<Option<Session>> {
        self.store().await?.get(id).await
    }

    async fn touch(&self, id: &SessionId, owner_pod: Option<&str>) -> Result<Touch> {
        self.store().await?.touch(id, owner_pod).await
    }

    async fn update(&self, id: &SessionId, patch: SessionPatch) -> Result<Option<Session>> {
        self.store().await?.update(id, patch).await
    }

    async fn mark_draining(
        &self,
        id: &SessionId,
        owner: Option<&str>,
        hold: Duration,
    ) -> Result<Option<Session>> {
        self.store().await?.mark_draining(id, owner, hold).await
    }

    async fn tally(&self, tally: Tally, n: u64) -> Result<()> {
        self.store().await?.tally(tally, n).await
    }

    async fn tallies(&self) -> Result<Tallies> {
        self.store().await?.tallies().await
    }

    async fn expire_draining(&self) -> Result<u64> {
        self.store().await?.expire_draining().await
    }

    async fn sessions_of_pod(&self, pod: &str, limit: usize) -> Result<Vec<SessionId>> {
        self.store().await?.sessions_of_pod(pod, limit).await
    }

    async fn claim(&self, id: &SessionId, claim: Claim) -> Result<ClaimOutcome> {
        self.store().await?.claim(id, claim).await
    }

    async fn append_events(
        &self,
        id: &SessionId,
        events: &[LoggedEvent],
        bound: LogBound,
    ) -> Result<()> {
        self.store().await?.append_events(id, events, bound).await
    }

    async fn events(&self, id: &SessionId) -> Result<Vec<LoggedEvent>> {
        self.store().await?.events(id).await
    }

    async fn delete(&self, id: &SessionId) -> Result<bool> {
        self.store().await?.delete(id).await
    }

    async fn list_page(&self, cursor: Option<ListCursor>, page_size: usize) -> Result<ListPage> {
        self.store().await?.list_page(cursor, page_size).await
    }

    fn record_pages(&self, page_size: usize) -> BoxStream<'_, Result<Vec<Listed>>> {
        futures::stream::once(self.store())
            .map_ok(move |store| store.record_pages(page_size))
            .try_flatten()
            .boxed()
    }

    async fn counts(&self) -> Result<SessionCounts> {
        self.store().await?.counts().await
    }

    async fn prune(&self) -> Result<PruneReport> {
        self.store().await?.prune().await
    }

    async fn indexed_counts(&self) -> Result<Option<SessionCounts>> {
        self.store().await?.indexed_counts().await
    }

    async fn rebuild_index(&self, seen: &mut RecordObserver<'_>) -> Result<u64> {
        self.store().await?.rebuild_index(seen).await
    }

    async fn memory_usage(&self, sample: usize) -> Result<Option<MemorySample>> {
        self.store().await?.memory_usage(sample).await
    }

    async fn missing(&self, ids: &[SessionId]) -> Result<Vec<SessionId>> {
        self.store().await?.missing(ids).await
    }

    async fn retention(&self) -> Result<Option<super::Retention>> {
        SessionStore::retention(self.store().await?).await
    }

    fn describe(&self) -> String {
        match self.store.get() {
            Some(store) => store.describe(),
            None => format!("{} (not connected yet)", self.target.masked()),
        }
    }
}
