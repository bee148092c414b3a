//! The session store: where MCP sessions live between requests, restarts and pods.
//!
//! One trait, [`SessionStore`], and two implementations: [`RedisStore`] (standalone, TLS, Cluster)
//! and [`MemoryStore`] (embedded, for a proxy on a laptop). Both honour the Redis schema of
//! `docs/redis-schema.md`: the seed's record JSON under `{prefix}{id}` with a sliding TTL, plus
//! sorted-set indexes that make counting O(log n).

pub mod binding;
mod debounce;
mod error;
mod id;
mod memory;
mod record;
pub mod redis;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt as _, TryStreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use self::debounce::{DebouncedToucher, Touched};
pub use self::error::{StoreError, UnreadableReason, UnreadableRecord};
pub use self::id::{InvalidSessionId, MAX_SESSION_ID_LEN, SessionId};
pub use self::memory::MemoryStore;
pub use self::record::{SessionRecord, SessionSetup, SessionState, SetupChange, Timestamp};
pub use self::redis::{RedisStore, RedisTarget};

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The seed's key prefix.
pub const DEFAULT_KEY_PREFIX: &str = "mcp:session:";
/// The seed's sliding TTL: 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(86_400);

/// A stored session as read back: its id, its record and the TTL it has left.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Session {
    pub id: SessionId,
    #[serde(flatten)]
    pub record: SessionRecord,
    /// Milliseconds until expiry; `None` for a key without TTL.
    pub ttl_millis: Option<u64>,
}

/// One event of a session's resumption log: an SSE event the proxy sent a client, kept so that
/// a client that lost its stream resumes it with `Last-Event-ID`, on any proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedEvent {
    /// The id the client saw (the proxy's, never the upstream's).
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    pub data: String,
    /// The upstream's own id of the event, where it gave one: a resumption whose log ends before
    /// the answer asks the upstream for what followed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_id: Option<String>,
}

impl LoggedEvent {
    /// The entry as a log stores it.
    pub fn to_entry(&self) -> Vec<u8> {
        // A struct of strings always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// How much of a session's event log is kept: the newest entries, at most `events` of them and
/// at most `bytes` of stored entries in all. An entry larger than `bytes` is never kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBound {
    pub events: usize,
    pub bytes: usize,
}

impl LogBound {
    /// A hundred events, 1 MiB.
    pub const DEFAULT: Self = Self {
        events: 100,
        bytes: 1024 * 1024,
    };

    /// How many of the newest entries a log of entries of these sizes (newest first) keeps,
    /// none of them over `bytes` (those are never appended).
    pub fn kept(&self, newest_first: impl IntoIterator<Item = usize>) -> usize {
        let mut total = 0_usize;
        newest_first
            .into_iter()
            .take(self.events)
            .take_while(|size| {
                total = total.saturating_add(*size);
                total <= self.bytes
            })
            .count()
    }
}

/// Sessions changing hands, as proxies report them: running totals per prefix, from which the
/// operator takes a rollout's differences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tally {
    /// Marked draining by a proxy that stopped serving it.
    Drained,
    /// Claimed by another proxy after a drain, its handshake replayed there.
    Rehydrated,
    /// A client came back for it and could not get it (the new upstream refused the replay).
    Lost,
}

impl Tally {
    pub fn field(self) -> &'static str {
        match self {
            Self::Drained => "drained",
            Self::Rehydrated => "rehydrated",
            Self::Lost => "lost",
        }
    }
}

/// The running totals of [`Tally`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tallies {
    pub drained: u64,
    pub rehydrated: u64,
    pub lost: u64,
}

/// The pod that owns a session, and where it is reached (`ip:port`): its proxy's pod (other
/// proxies reach that proxy there), or where a gateway pins sessions to backend pods (drain
/// strategy `Wait`), the backend pod holding the session's state, and its MCP server there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner {
    pub pod: Option<String>,
    pub address: Option<String>,
    /// The owner's own id for the session: a backend pod's, where a gateway pins sessions to
    /// their backends (drain strategy `Wait`); none for a proxy, whose session id is the key.
    pub upstream_session: Option<String>,
}

/// What a new session starts with.
#[derive(Debug, Clone, Default)]
pub struct NewSession {
    pub owner_pod: Option<String>,
    pub owner_address: Option<String>,
    pub upstream_session: Option<String>,
    pub metadata: Map<String, Value>,
    pub protocol_version: Option<String>,
    pub initialize_params: Option<Value>,
    pub credential_fingerprint: Option<String>,
    pub setup: SessionSetup,
}

impl NewSession {
    /// The same session, owned by `owner`.
    pub fn owned_by(self, owner: Owner) -> Self {
        Self {
            owner_pod: owner.pod,
            owner_address: owner.address,
            upstream_session: owner.upstream_session,
            ..self
        }
    }

    /// What a stored session would be created with, to write it again.
    pub fn from_record(record: SessionRecord) -> Self {
        Self {
            owner_pod: record.owner_pod,
            owner_address: record.owner_address,
            upstream_session: record.upstream_session,
            metadata: record.metadata,
            protocol_version: record.protocol_version,
            initialize_params: record.initialize_params,
            credential_fingerprint: record.credential_fingerprint,
            setup: record.setup,
        }
    }

    pub fn into_record(self, id: &SessionId, now: Timestamp) -> SessionRecord {
        let mut record = SessionRecord::new(id.as_str(), now);
        record.set_state(SessionState::Active);
        record.owner_pod = self.owner_pod;
        record.owner_address = self.owner_address;
        record.upstream_session = self.upstream_session;
        record.metadata = self.metadata;
        record.protocol_version = self.protocol_version;
        record.initialize_params = self.initialize_params;
        record.credential_fingerprint = self.credential_fingerprint;
        record.setup = self.setup;
        record
    }
}

/// Whether `create_or_rehydrate` found the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Created,
    Rehydrated,
}

/// Fields a caller may change on an existing session; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct SessionPatch {
    pub protocol_version: Option<String>,
    pub initialize_params: Option<Value>,
    pub credential_fingerprint: Option<String>,
    /// Binds an unbound session (a seed-written record) to this fingerprint; a session bound
    /// already keeps its binding, which the caller reads back from the result.
    pub bind_credential: Option<String>,
    /// A change to what the client set up after `initialize`.
    pub setup: Option<SetupChange>,
    /// Merged key by key into the record's metadata.
    pub metadata: Map<String, Value>,
    /// Marks the session being ended by its client (`Some(true)`, see
    /// [`SessionRecord::ending_since`]), or no longer (`Some(false)`: the server refused the end).
    pub ending: Option<bool>,
}

impl SessionPatch {
    fn apply(self, record: &mut SessionRecord) {
        match self.ending {
            Some(true) => record.ending_since = Some(Timestamp::now()),
            Some(false) => record.ending_since = None,
            None => {}
        }
        if let Some(version) = self.protocol_version {
            record.protocol_version = Some(version);
        }
        if let Some(params) = self.initialize_params {
            record.initialize_params = Some(params);
        }
        if let Some(fingerprint) = self.credential_fingerprint {
            record.credential_fingerprint = Some(fingerprint);
        }
        if let Some(fingerprint) = self.bind_credential
            && record.credential_fingerprint.is_none()
        {
            record.credential_fingerprint = Some(fingerprint);
        }
        if let Some(change) = self.setup {
            record.setup.apply(change);
        }
        record.metadata.extend(self.metadata);
    }
}

/// Who asks to take over a session.
#[derive(Debug, Clone)]
pub struct Claim {
    pub pod: String,
    /// Where other proxies reach the claimer's.
    pub address: Option<String>,
    /// Fingerprint of the credential on the request that wants the session.
    pub credential_fingerprint: Option<String>,
}

/// The result of a claim; exactly one of many concurrent claimers gets `Claimed`.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimOutcome {
    /// The caller now owns the session; `from_draining`: it was draining (its pod stopped, or
    /// it was swept), not merely unowned: a rehydration.
    Claimed {
        session: Session,
        from_draining: bool,
    },
    /// The caller owned it already.
    AlreadyOwned(Session),
    /// A live pod owns it.
    OwnedByOther {
        owner: String,
    },
    /// The session belongs to another credential; it must not be handed over.
    CredentialMismatch,
    NotFound,
}

/// Why a claim is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ClaimRefusal {
    OwnedByOther { owner: String },
    CredentialMismatch,
}

impl From<ClaimRefusal> for ClaimOutcome {
    fn from(refusal: ClaimRefusal) -> Self {
        match refusal {
            ClaimRefusal::OwnedByOther { owner } => Self::OwnedByOther { owner },
            ClaimRefusal::CredentialMismatch => Self::CredentialMismatch,
        }
    }
}

impl ClaimOutcome {
    /// Decides a claim on a record as read; shared by both stores so they agree to the letter.
    fn decide(record: &SessionRecord, claim: &Claim) -> Result<(), ClaimRefusal> {
        let binding = binding::check(
            record.credential_fingerprint.as_deref(),
            claim.credential_fingerprint.as_deref(),
        );
        if binding == binding::Binding::Mismatch {
            return Err(ClaimRefusal::CredentialMismatch);
        }
        match (&record.owner_pod, record.state()) {
            (Some(owner), SessionState::Active) if owner != &claim.pod => {
                Err(ClaimRefusal::OwnedByOther {
                    owner: owner.clone(),
                })
            }
            _ => Ok(()),
        }
    }

    fn apply(record: &mut SessionRecord, claim: &Claim, now: Timestamp) -> Handover {
        let handover = match (record.state(), record.owner_pod.as_deref()) {
            (SessionState::Draining, _) => Handover::Drained,
            (SessionState::Active, Some(owner)) if owner == claim.pod => Handover::AlreadyOwned,
            (SessionState::Active, _) => Handover::Unowned,
        };
        if handover != Handover::AlreadyOwned {
            record.rehydrations += 1;
        }
        // A seed-written record is bound to the first identity that claims it.
        if record.credential_fingerprint.is_none() {
            record.credential_fingerprint = claim.credential_fingerprint.clone();
        }
        record.owner_pod = Some(claim.pod.clone());
        record.owner_address = claim.address.clone();
        record.upstream_session = None;
        record.set_state(SessionState::Active);
        record.draining_since = None;
        record.last_activity_at = now;
        handover
    }

    /// The outcome of a claim that was applied.
    fn applied(session: Session, handover: Handover) -> Self {
        match handover {
            Handover::AlreadyOwned => Self::AlreadyOwned(session),
            Handover::Unowned => Self::Claimed {
                session,
                from_draining: false,
            },
            Handover::Drained => Self::Claimed {
                session,
                from_draining: true,
            },
        }
    }
}

/// What an applied claim took over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handover {
    AlreadyOwned,
    Unowned,
    Drained,
}

/// What a touch found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    Gone,
    Active,
    /// Marked draining (its pod stopped, or it was swept), and still served by the caller.
    Draining,
}

impl Touch {
    pub fn exists(self) -> bool {
        self != Self::Gone
    }
}

/// Session counts. `active + draining == total`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SessionCounts {
    pub total: u64,
    pub active: u64,
    pub draining: u64,
    /// Sessions by owning pod (draining sessions have none).
    pub per_pod: BTreeMap<String, u64>,
    /// How the numbers were obtained.
    pub source: CountSource,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CountSource {
    /// Sorted-set indexes, O(log n).
    #[default]
    Index,
    /// The index was missing (never built, or evicted) and was rebuilt by a scan first.
    Rebuilt,
    /// The index, after dropping the entries of records gone behind its back: Redis may evict
    /// records (an `allkeys-*` policy, or evictions seen), and an index counts what it holds.
    Verified,
    /// A full incremental SCAN of the records (seed-only prefixes).
    Scan,
}

/// What a full scan saw: counts plus everything a count by index cannot know.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScanReport {
    pub counts: SessionCounts,
    pub unreadable: Vec<UnreadableRecord>,
    pub oldest_created: Option<Timestamp>,
    pub newest_created: Option<Timestamp>,
    pub keys_scanned: u64,
}

impl ScanReport {
    fn new() -> Self {
        Self {
            counts: SessionCounts {
                source: CountSource::Scan,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Adds `item`, and shows `progress` the keys seen every 1024 keys.
    fn add_showing(&mut self, item: &Listed, progress: &(dyn Fn(u64) + Send + Sync)) {
        self.add(item);
        if self.keys_scanned.is_multiple_of(1024) {
            progress(self.keys_scanned);
        }
    }

    fn add(&mut self, item: &Listed) {
        self.keys_scanned += 1;
        match item {
            Listed::Session(session) => {
                let counts = &mut self.counts;
                counts.total += 1;
                match session.record.state() {
                    SessionState::Active => counts.active += 1,
                    SessionState::Draining => counts.draining += 1,
                }
                if let Some(pod) = &session.record.owner_pod
                    && session.record.state() == SessionState::Active
                {
                    *counts.per_pod.entry(pod.clone()).or_default() += 1;
                }
                let created = session.record.created_at;
                self.oldest_created = Some(self.oldest_created.map_or(created, |o| o.min(created)));
                self.newest_created = Some(self.newest_created.map_or(created, |n| n.max(created)));
            }
            Listed::Unreadable(unreadable) => self.unreadable.push(unreadable.clone()),
        }
    }
}

/// What `prune` removed from the indexes (never a record).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Index entries whose sessions expired.
    pub expired: u64,
    /// Index entries whose records are gone (deleted or evicted behind the index's back).
    pub dangling: u64,
    /// Pods with no session left.
    pub pods: u64,
    /// Of the expired entries, draining sessions nobody claimed, now tallied `lost`.
    pub lost: u64,
}

/// `MEMORY USAGE` over a sample of records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MemorySample {
    pub sampled: u64,
    pub mean_bytes: u64,
    pub max_bytes: u64,
}

/// One entry of a listing: a session, or a record that could not be read (reported, never
/// dropped and never deleted).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
#[allow(clippy::large_enum_variant)] // Nearly every entry is a session: boxing would only add allocations.
pub enum Listed {
    Session(Session),
    Unreadable(UnreadableRecord),
}

/// Where a listing continues; opaque to callers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListCursor {
    /// Index of the Redis node being scanned (always 0 standalone).
    pub(crate) node: usize,
    pub(crate) position: u64,
}

#[derive(Debug, Clone)]
pub struct ListPage {
    pub items: Vec<Listed>,
    /// `None` once the whole keyspace has been visited.
    pub next: Option<ListCursor>,
}

/// The store of MCP sessions. Every method is one logical operation, safe to call from many
/// tasks, pods and processes at once.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Creates the session, or if it exists (a client reconnecting after a restart) refreshes its
    /// TTL and returns it as stored.
    async fn create_or_rehydrate(
        &self,
        id: &SessionId,
        new: NewSession,
    ) -> Result<(Session, Origin)>;

    /// The session, `None` if it does not exist, `Err(Unreadable)` if its record does not parse.
    async fn get(&self, id: &SessionId) -> Result<Option<Session>>;

    /// Slides the TTL and `last_activity_at`. Always writes; callers on a hot path go through a
    /// [`DebouncedToucher`]. `owner_pod` is the pod the caller believes owns the session, so its
    /// per-pod index entry slides too. Says whether the session is gone, or draining: a proxy
    /// that serves a session another pod drained takes it over.
    async fn touch(&self, id: &SessionId, owner_pod: Option<&str>) -> Result<Touch>;

    /// Changes fields of an existing session, keeping its TTL.
    async fn update(&self, id: &SessionId, patch: SessionPatch) -> Result<Option<Session>>;

    /// Marks the session draining, owned by nobody and claimable by any pod, with its TTL reset
    /// to at least `hold` so it survives until a client comes back; only if `owner` owns it
    /// (`None`: nobody does), else `None` as for a missing session. A pod drains its own
    /// sessions, never one that another pod took over meanwhile.
    async fn mark_draining(
        &self,
        id: &SessionId,
        owner: Option<&str>,
        hold: Duration,
    ) -> Result<Option<Session>>;

    /// Ids of the active sessions `pod` owns (from the per-pod index; at most `limit`).
    async fn sessions_of_pod(&self, pod: &str, limit: usize) -> Result<Vec<SessionId>>;

    /// Takes over a draining or unowned session atomically.
    async fn claim(&self, id: &SessionId, claim: Claim) -> Result<ClaimOutcome>;

    /// Adds `n` to a running tally of the prefix.
    async fn tally(&self, tally: Tally, n: u64) -> Result<()>;

    /// The running tallies of the prefix (zero where none was reported).
    async fn tallies(&self) -> Result<Tallies>;

    /// Tallies draining sessions whose TTL ran out before any pod claimed them as `lost`, and
    /// drops them from the draining index, atomically, so that each is counted once however
    /// many callers race; returns how many this call counted.
    async fn expire_draining(&self) -> Result<u64>;

    /// Appends to the session's event log, keeping what `bound` allows of its newest entries.
    /// The log expires with the session (Redis: its own key, same TTL, same Cluster slot as the
    /// record).
    async fn append_events(
        &self,
        id: &SessionId,
        events: &[LoggedEvent],
        bound: LogBound,
    ) -> Result<()>;

    /// The session's event log, oldest first. Entries that do not parse are skipped and logged.
    async fn events(&self, id: &SessionId) -> Result<Vec<LoggedEvent>>;

    /// Deletes the session, its event log and its index entries. Returns false if it did not
    /// exist.
    async fn delete(&self, id: &SessionId) -> Result<bool>;

    /// One page of all records under the prefix, in no particular order. Never `KEYS`.
    async fn list_page(&self, cursor: Option<ListCursor>, page_size: usize) -> Result<ListPage>;

    /// Every record under the prefix, page by page, in no particular order. A store may read
    /// ahead (Redis: while a page is used, the next one is already being read).
    fn record_pages(&self, page_size: usize) -> BoxStream<'_, Result<Vec<Listed>>> {
        futures::stream::try_unfold(Some(ListCursor::default()), move |cursor| async move {
            let Some(cursor) = cursor else {
                return Ok(None);
            };
            let page = self.list_page(Some(cursor), page_size).await?;
            Ok(Some((page.items, page.next)))
        })
        .boxed()
    }

    /// Totals and per-pod counts from the indexes (rebuilt first if they are missing).
    async fn counts(&self) -> Result<SessionCounts>;

    /// The indexes' counts as they are: `None` where there are none yet (never builds them).
    async fn indexed_counts(&self) -> Result<Option<SessionCounts>>;

    /// Removes index entries of expired and vanished sessions; never touches a record.
    async fn prune(&self) -> Result<PruneReport>;

    /// Drops and rebuilds the indexes from a full scan, showing `seen` every record it reads (a
    /// caller that wants a scan anyway needs no second pass); returns the sessions indexed.
    async fn rebuild_index(&self, seen: &mut RecordObserver<'_>) -> Result<u64>;

    /// `MEMORY USAGE` of up to `sample` records; `None` where the store is not Redis.
    async fn memory_usage(&self, sample: usize) -> Result<Option<MemorySample>>;

    /// Which of `ids` have no record (evicted, expired or deleted): for a proxy to find the
    /// sessions it serves that the store lost. Redis answers in one round trip.
    async fn missing(&self, ids: &[SessionId]) -> Result<Vec<SessionId>> {
        let mut missing = Vec::new();
        for id in ids {
            if self.get(id).await?.is_none() {
                missing.push(id.clone());
            }
        }
        Ok(missing)
    }

    /// Whether the store keeps what is written to it (Redis: its eviction policy, memory and
    /// evictions); `None` where there is nothing to tell (the embedded store keeps everything).
    async fn retention(&self) -> Result<Option<redis::Retention>> {
        Ok(None)
    }

    /// Human-readable location, with any password masked, for messages.
    fn describe(&self) -> String;
}

/// A session marked draining is kept at least this long for its client to come back.
pub const MIN_DRAINING_HOLD: Duration = Duration::from_secs(600);

/// Marks the sessions `owner` owns among `ids` draining, all at once, held for `hold` but at
/// least [`MIN_DRAINING_HOLD`]: a stopping pod's proxy drains its own, the operator sweeps those
/// of a pod that vanished. Failures are logged and skipped; returns how many were marked.
pub async fn mark_all_draining<'a, S>(
    store: &S,
    ids: impl IntoIterator<Item = &'a SessionId>,
    owner: Option<&str>,
    hold: Duration,
) -> u64
where
    S: SessionStore + ?Sized,
{
    let hold = hold.max(MIN_DRAINING_HOLD);
    let marks = ids.into_iter().map(|id| async move {
        match store.mark_draining(id, owner, hold).await {
            Ok(Some(_)) => 1,
            Ok(None) => 0,
            Err(error) => {
                tracing::warn!(session = %id, %error, "cannot mark the session draining");
                0
            }
        }
    });
    futures::future::join_all(marks).await.into_iter().sum()
}

/// Every record of the store as a stream, read `page_size` at a time.
pub fn list_all(
    store: &dyn SessionStore,
    page_size: usize,
) -> impl Stream<Item = Result<Listed>> + '_ {
    store
        .record_pages(page_size)
        .map_ok(|page| futures::stream::iter(page.into_iter().map(Ok)))
        .try_flatten()
}

/// What sees each record a rebuild of the indexes reads.
pub type RecordObserver<'o> = dyn for<'r> FnMut(&'r Listed) + Send + 'o;

/// The indexes' counts as they stand and a full scan's (`sessions stats`), without a single
/// write: a monitoring command must cost no session on a full or an evicting Redis (a write
/// there is refused, or evicts records). `None` where there is no index yet: the operator
/// builds it, and drops the entries of records Redis evicted. `progress` is called with the
/// number of keys seen so far.
pub async fn audit(
    store: &dyn SessionStore,
    page_size: usize,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<(Option<SessionCounts>, ScanReport)> {
    let indexed = store.indexed_counts().await?;
    Ok((indexed, scan_report(store, page_size, progress).await?))
}

/// Counts by a full incremental scan, for prefixes whose writers (the seed's service) keep no
/// index, and for `sessions stats`. `progress` is called with the number of keys seen so far.
pub async fn scan_report(
    store: &dyn SessionStore,
    page_size: usize,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<ScanReport> {
    let mut report = ScanReport::new();
    let mut items = std::pin::pin!(list_all(store, page_size));
    while let Some(item) = items.try_next().await? {
        report.add_showing(&item, progress);
    }
    progress(report.keys_scanned);
    Ok(report)
}
