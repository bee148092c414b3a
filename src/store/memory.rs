//! The embedded store: the Redis schema's semantics in process memory, for a proxy on a laptop
//! and for tests of code above the store.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::{
    Claim, ClaimOutcome, CountSource, ListCursor, ListPage, Listed, LogBound, LoggedEvent,
    MemorySample, NewSession, Origin, PruneReport, RecordObserver, Result, Session, SessionCounts,
    SessionId, SessionPatch, SessionRecord, SessionState, SessionStore, Timestamp, Touch,
};

#[derive(Debug)]
struct Entry {
    record: SessionRecord,
    expires_at_ms: i64,
}

impl Entry {
    /// The entry as the store hands it out at `now_ms`.
    fn session(&self, id: &SessionId, now_ms: i64) -> Session {
        Session {
            id: id.clone(),
            record: self.record.clone(),
            ttl_millis: Some(u64::try_from(self.expires_at_ms - now_ms).unwrap_or(0)),
        }
    }
}

/// Records plus the counters that the Redis store keeps as sorted sets.
#[derive(Debug, Default)]
struct State {
    records: BTreeMap<SessionId, Entry>,
    by_expiry: BTreeSet<(i64, SessionId)>,
    draining: u64,
    per_pod: BTreeMap<String, u64>,
    tallies: super::Tallies,
    /// Draining sessions that expired unclaimed, not yet tallied `lost` by `expire_draining`.
    expired_draining: u64,
    /// Event logs of live sessions; a log goes with its record.
    /// Each entry with its stored size, for the log's byte bound.
    events: HashMap<SessionId, VecDeque<(usize, LoggedEvent)>>,
}

impl State {
    /// The one place where records change, so the counters can never disagree with them.
    fn put(&mut self, id: &SessionId, entry: Option<Entry>) -> Option<Entry> {
        // The old entry leaves the index before the new one enters: a rewrite that keeps the
        // expiry (an update) has the same index key.
        let old = self.records.remove(id);
        if let Some(old) = &old {
            self.by_expiry.remove(&(old.expires_at_ms, id.clone()));
            self.count(&old.record, -1);
        }
        match entry {
            Some(entry) => {
                self.by_expiry.insert((entry.expires_at_ms, id.clone()));
                self.count(&entry.record, 1);
                self.records.insert(id.clone(), entry);
            }
            None => {
                self.events.remove(id);
            }
        }
        old
    }

    fn count(&mut self, record: &SessionRecord, delta: i64) {
        let apply = |n: &mut u64| *n = n.saturating_add_signed(delta);
        match (record.state(), &record.owner_pod) {
            (SessionState::Draining, _) => apply(&mut self.draining),
            (SessionState::Active, Some(pod)) => {
                let n = self.per_pod.entry(pod.clone()).or_default();
                apply(n);
                if *n == 0 {
                    self.per_pod.remove(pod);
                }
            }
            (SessionState::Active, None) => {}
        }
    }

    fn expire(&mut self, now_ms: i64) -> u64 {
        let mut expired = 0;
        while let Some((at, id)) = self.by_expiry.first().cloned() {
            if at > now_ms {
                break;
            }
            if self
                .put(&id, None)
                .is_some_and(|old| old.record.state() == SessionState::Draining)
            {
                self.expired_draining += 1;
            }
            expired += 1;
        }
        expired
    }

    fn session(&self, id: &SessionId, now_ms: i64) -> Option<Session> {
        self.records.get(id).map(|entry| entry.session(id, now_ms))
    }

    /// Replaces a live record, keeping or resetting its expiry; the session as it now is.
    fn rewrite(
        &mut self,
        id: &SessionId,
        record: SessionRecord,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> Session {
        let entry = Entry {
            record,
            expires_at_ms,
        };
        let session = entry.session(id, now_ms);
        self.put(id, Some(entry));
        session
    }
}

/// In-memory [`SessionStore`] with the same TTL semantics as Redis: lazily expired on access.
#[derive(Debug)]
pub struct MemoryStore {
    ttl: Duration,
    state: Mutex<State>,
}

impl MemoryStore {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            state: Mutex::new(State::default()),
        }
    }

    /// Runs `f` on the state after expiring what is due; `now` is passed on so one operation
    /// sees one clock reading.
    fn with_state<T>(&self, f: impl FnOnce(&mut State, Timestamp, i64) -> T) -> T {
        let now = Timestamp::now();
        let now_ms = now.unix_millis();
        // No code below panics while holding the lock; recover the data if it ever did.
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state.expire(now_ms);
        f(&mut state, now, now_ms)
    }

    fn ttl_ms(&self, ttl: Duration) -> i64 {
        i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn create_or_rehydrate(
        &self,
        id: &SessionId,
        new: NewSession,
    ) -> Result<(Session, Origin)> {
        let ttl_ms = self.ttl_ms(self.ttl);
        Ok(self.with_state(|state, now, now_ms| {
            let (record, origin) = match state.records.get(id) {
                Some(existing) => {
                    let mut record = existing.record.clone();
                    record.last_activity_at = now;
                    (record, Origin::Rehydrated)
                }
                None => (new.into_record(id, now), Origin::Created),
            };
            (state.rewrite(id, record, now_ms + ttl_ms, now_ms), origin)
        }))
    }

    async fn get(&self, id: &SessionId) -> Result<Option<Session>> {
        Ok(self.with_state(|state, _, now_ms| state.session(id, now_ms)))
    }

    async fn touch(&self, id: &SessionId, _owner_pod: Option<&str>) -> Result<Touch> {
        let ttl_ms = self.ttl_ms(self.ttl);
        Ok(self.with_state(|state, now, now_ms| {
            let Some(entry) = state.records.get(id) else {
                return Touch::Gone;
            };
            let mut record = entry.record.clone();
            record.last_activity_at = now;
            let touched = match record.state() {
                SessionState::Draining => Touch::Draining,
                SessionState::Active => Touch::Active,
            };
            state.rewrite(id, record, now_ms + ttl_ms, now_ms);
            touched
        }))
    }

    async fn update(&self, id: &SessionId, patch: SessionPatch) -> Result<Option<Session>> {
        Ok(self.with_state(|state, _, now_ms| {
            let entry = state.records.get(id)?;
            let (mut record, expires_at_ms) = (entry.record.clone(), entry.expires_at_ms);
            patch.apply(&mut record);
            Some(state.rewrite(id, record, expires_at_ms, now_ms))
        }))
    }

    async fn mark_draining(
        &self,
        id: &SessionId,
        owner: Option<&str>,
        hold: Duration,
    ) -> Result<Option<Session>> {
        let hold_ms = self.ttl_ms(hold);
        Ok(self.with_state(|state, now, now_ms| {
            let entry = state
                .records
                .get(id)
                .filter(|e| e.record.owner_pod.as_deref() == owner)?;
            let expires_at_ms = entry.expires_at_ms.max(now_ms + hold_ms);
            let mut record = entry.record.clone();
            record.hand_over(now);
            Some(state.rewrite(id, record, expires_at_ms, now_ms))
        }))
    }

    async fn claim(&self, id: &SessionId, claim: Claim) -> Result<ClaimOutcome> {
        let ttl_ms = self.ttl_ms(self.ttl);
        Ok(self.with_state(|state, now, now_ms| {
            let Some(entry) = state.records.get(id) else {
                return ClaimOutcome::NotFound;
            };
            let mut record = entry.record.clone();
            if let Err(refused) = ClaimOutcome::decide(&record, &claim) {
                return refused.into();
            }
            let handover = ClaimOutcome::apply(&mut record, &claim, now);
            let session = state.rewrite(id, record, now_ms + ttl_ms, now_ms);
            ClaimOutcome::applied(session, handover)
        }))
    }

    async fn tally(&self, tally: super::Tally, n: u64) -> Result<()> {
        self.with_state(|state, _, _| {
            let count = match tally {
                super::Tally::Drained => &mut state.tallies.drained,
                super::Tally::Rehydrated => &mut state.tallies.rehydrated,
                super::Tally::Lost => &mut state.tallies.lost,
            };
            *count = count.saturating_add(n);
        });
        Ok(())
    }

    async fn tallies(&self) -> Result<super::Tallies> {
        Ok(self.with_state(|state, _, _| state.tallies))
    }

    async fn expire_draining(&self) -> Result<u64> {
        Ok(self.with_state(|state, _, _| {
            let lost = std::mem::take(&mut state.expired_draining);
            state.tallies.lost += lost;
            lost
        }))
    }

    async fn sessions_of_pod(&self, pod: &str, limit: usize) -> Result<Vec<SessionId>> {
        Ok(self.with_state(|state, _, _| {
            state
                .records
                .iter()
                .filter(|(_, entry)| {
                    entry.record.state() == SessionState::Active
                        && entry.record.owner_pod.as_deref() == Some(pod)
                })
                .map(|(id, _)| id.clone())
                .take(limit)
                .collect()
        }))
    }

    async fn append_events(
        &self,
        id: &SessionId,
        events: &[LoggedEvent],
        bound: LogBound,
    ) -> Result<()> {
        self.with_state(|state, _, _| {
            if !state.records.contains_key(id) {
                return; // Nothing would ever resume it, and nothing would remove it.
            }
            let log = state.events.entry(id.clone()).or_default();
            log.extend(
                events
                    .iter()
                    .map(|event| (event.to_entry().len(), event.clone()))
                    .filter(|(size, _)| *size <= bound.bytes),
            );
            let kept = bound.kept(log.iter().rev().map(|(size, _)| *size));
            log.drain(..log.len() - kept);
        });
        Ok(())
    }

    async fn events(&self, id: &SessionId) -> Result<Vec<LoggedEvent>> {
        Ok(self.with_state(|state, _, _| {
            state
                .events
                .get(id)
                .map(|log| log.iter().map(|(_, event)| event.clone()).collect())
                .unwrap_or_default()
        }))
    }

    async fn delete(&self, id: &SessionId) -> Result<bool> {
        Ok(self.with_state(|state, _, _| state.put(id, None).is_some()))
    }

    async fn list_page(&self, cursor: Option<ListCursor>, page_size: usize) -> Result<ListPage> {
        let start = cursor.map_or(0, |c| c.position);
        Ok(self.with_state(|state, _, now_ms| {
            let skip = usize::try_from(start).unwrap_or(usize::MAX);
            let items: Vec<Listed> = state
                .records
                .keys()
                .skip(skip)
                .take(page_size.max(1))
                .filter_map(|id| state.session(id, now_ms).map(Listed::Session))
                .collect();
            let position = start + items.len() as u64;
            let next =
                (position < state.records.len() as u64).then_some(ListCursor { node: 0, position });
            ListPage { items, next }
        }))
    }

    async fn counts(&self) -> Result<SessionCounts> {
        Ok(self.with_state(|state, _, _| {
            let total = state.records.len() as u64;
            SessionCounts {
                total,
                active: total - state.draining,
                draining: state.draining,
                per_pod: state.per_pod.clone(),
                source: CountSource::Index,
            }
        }))
    }

    async fn prune(&self) -> Result<PruneReport> {
        // Expired entries go on every access; nothing else can dangle in one process.
        let lost = self.expire_draining().await?;
        Ok(PruneReport {
            expired: lost,
            lost,
            ..PruneReport::default()
        })
    }

    async fn indexed_counts(&self) -> Result<Option<SessionCounts>> {
        // Always indexed: the counts are kept as the records change.
        Ok(Some(self.counts().await?))
    }

    async fn rebuild_index(&self, seen: &mut RecordObserver<'_>) -> Result<u64> {
        let mut items = std::pin::pin!(super::list_all(self, 1000));
        let mut indexed = 0;
        while let Some(item) = futures::TryStreamExt::try_next(&mut items).await? {
            indexed += u64::from(matches!(item, Listed::Session(_)));
            seen(&item);
        }
        Ok(indexed)
    }

    async fn memory_usage(&self, _sample: usize) -> Result<Option<MemorySample>> {
        Ok(None)
    }

    fn describe(&self) -> String {
        "embedded in-memory store".to_owned()
    }
}
