//! [`SessionStore`] on Redis: standalone, TLS, or Cluster.
//!
//! Records are plain string keys with a TTL (the seed's schema). Three sorted sets per prefix
//! index them by expiry, draining state and owning pod, so every count is a `ZCOUNT`. Record and
//! index live in different Cluster slots, so they are written in one pipeline but not one
//! transaction: an index can lag a record, never the other way round for long, and `prune` and
//! the sentinel-triggered rebuild bring it back (docs/redis-schema.md).

mod index;
mod keys;
mod lazy;
mod retention;
mod scan;
mod scripts;
mod target;

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisResult, Value};
use tracing::{debug, instrument, warn};

use self::index::{Becomes, IndexSlot};
pub use self::keys::Keys;
pub use self::lazy::LazyRedisStore;
pub use self::retention::{Retention, Verdict as RetentionVerdict};
use self::scripts::{Lua, Scripts};
pub(crate) use self::target::Conn;
pub use self::target::{RedisTarget, mask_url};
use super::{
    Claim, ClaimOutcome, ClaimRefusal, ListCursor, ListPage, Listed, LogBound, LoggedEvent,
    MemorySample, NewSession, Origin, PruneReport, RecordObserver, Result, Session, SessionCounts,
    SessionId, SessionPatch, SessionRecord, SessionStore, StoreError, Tallies, Tally, Timestamp,
    Touch, UnreadableReason, UnreadableRecord,
};

/// Records above this size are reported, not parsed (a session is a few hundred bytes).
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1 << 20;
/// Attempts of a compare-and-set before giving up on a hot record.
const CAS_ATTEMPTS: u32 = 32;
/// Page size for index maintenance.
const MAINTENANCE_BATCH: usize = 500;
/// Expiry score for a record without TTL (written by hand): far enough to never be pruned.
const NO_TTL_HORIZON_MS: i64 = 100 * 365 * 86_400_000;

/// How a rewrite treats the record's TTL.
#[derive(Debug, Clone, Copy)]
enum TtlRule {
    Keep,
    Reset(Duration),
    AtLeast(Duration),
}

/// Outcome of a read-modify-write.
#[allow(clippy::large_enum_variant)] // Short-lived, returned once per write.
enum Modified<T> {
    Missing,
    Refused(T),
    Done(Session),
}

pub struct RedisStore {
    target: RedisTarget,
    keys: Keys,
    conn: Conn,
    ttl: Duration,
    max_record_bytes: usize,
    scripts: Scripts,
}

/// Another handle on the same connection, prefix and settings.
impl Clone for RedisStore {
    fn clone(&self) -> Self {
        Self {
            target: self.target.clone(),
            keys: self.keys.clone(),
            conn: self.conn.clone(),
            ttl: self.ttl,
            max_record_bytes: self.max_record_bytes,
            scripts: Scripts::new(),
        }
    }
}

impl RedisStore {
    /// Connects; fails with [`StoreError::Unavailable`] naming the (masked) URL if Redis
    /// cannot be reached.
    pub async fn connect(target: RedisTarget, key_prefix: &str, ttl: Duration) -> Result<Self> {
        let keys = Keys::new(key_prefix)?;
        let conn = target.connect().await?;
        let store = Self {
            target,
            keys,
            conn,
            ttl,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
            scripts: Scripts::new(),
        };
        store.query::<String>(&redis::cmd("PING")).await?;
        Ok(store)
    }

    /// The same Redis, connection included, under another prefix and TTL: policies that share a
    /// Redis share one multiplexed connection.
    pub fn with_prefix(&self, key_prefix: &str, ttl: Duration) -> Result<Self> {
        Ok(Self {
            keys: Keys::new(key_prefix)?,
            ttl,
            ..self.clone()
        })
    }

    pub fn with_max_record_bytes(mut self, bytes: usize) -> Self {
        self.max_record_bytes = bytes;
        self
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Whether this Redis keeps what is written to it (its eviction policy, memory and
    /// evictions). On a Cluster, the node the command reaches speaks for all.
    pub async fn read_retention(&self) -> Result<Retention> {
        let memory: String = self.query(redis::cmd("INFO").arg("memory")).await?;
        let stats: String = self.query(redis::cmd("INFO").arg("stats")).await?;
        Ok(Retention::parse(&format!("{memory}\n{stats}")))
    }

    fn error(&self, source: RedisError) -> StoreError {
        StoreError::from_redis(&self.target.masked(), source)
    }

    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        cmd.query_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.error(e))
    }

    /// Runs a pipeline, one result per command (a failed command does not fail the others).
    /// Not a transaction. On a Cluster, where one pipeline must stay in one slot, the commands
    /// go out concurrently on the multiplexed connection instead: still one round trip per node.
    async fn pipeline(&self, pipe: &Pipeline) -> Result<Vec<RedisResult<Value>>> {
        if pipe.is_empty() {
            return Ok(Vec::new());
        }
        match &self.conn {
            Conn::Single(conn) => {
                let mut pipe = pipe.clone();
                pipe.ignore_errors()
                    .query_async(&mut conn.clone())
                    .await
                    .map_err(|e| self.error(e))
            }
            Conn::Cluster(conn) => {
                let sends = pipe.cmd_iter().map(|cmd| {
                    let mut conn = conn.clone();
                    async move { cmd.query_async::<Value>(&mut conn).await }
                });
                Ok(futures::future::join_all(sends).await)
            }
        }
    }

    /// Runs a pipeline that calls scripts; if Redis lost its script cache (restart, failover),
    /// sends the script bodies once. Every other command must be idempotent.
    async fn pipeline_with_scripts(
        &self,
        build: impl Fn(bool) -> Pipeline,
    ) -> Result<Vec<RedisResult<Value>>> {
        let results = self.pipeline(&build(false)).await?;
        let noscript = results
            .iter()
            .any(|r| matches!(r, Err(e) if e.code() == Some("NOSCRIPT")));
        if noscript {
            self.pipeline(&build(true)).await
        } else {
            Ok(results)
        }
    }

    /// The value of a command that must succeed.
    fn value_of<T: FromRedisValue>(&self, result: RedisResult<Value>) -> Result<T> {
        result
            .and_then(|v| redis::from_redis_value(v).map_err(RedisError::from))
            .map_err(|e| self.error(e))
    }

    /// Ok if every command of a pipeline succeeded; else the first failure.
    fn all_succeeded(&self, results: Vec<RedisResult<Value>>) -> Result<()> {
        results
            .into_iter()
            .try_for_each(|r| self.value_of::<Value>(r).map(drop))
    }

    /// One record with its raw value (for compare-and-set).
    async fn read(&self, id: &SessionId) -> Result<Option<(Session, Vec<u8>)>> {
        let key = self.keys.record(id).into_bytes();
        let Some(fetched) = self.fetch(vec![key]).await?.pop() else {
            return Ok(None);
        };
        match self.decode(&fetched) {
            None => Ok(None),
            Some(Listed::Unreadable(unreadable)) => Err(unreadable.into()),
            Some(Listed::Session(session)) => {
                let raw = fetched.value.ok().flatten().unwrap_or_default();
                Ok(Some((session, raw)))
            }
        }
    }

    /// Read-modify-write of one record by compare-and-set, then its index entries. `change`
    /// may refuse (returning `Err`), which leaves the record untouched.
    async fn modify<R>(
        &self,
        id: &SessionId,
        ttl: TtlRule,
        mut change: impl FnMut(&mut SessionRecord) -> std::result::Result<(), R>,
    ) -> Result<Modified<R>> {
        let key = self.keys.record(id);
        for attempt in 1..=CAS_ATTEMPTS {
            let Some((old, raw)) = self.read(id).await? else {
                return Ok(Modified::Missing);
            };
            let mut record = old.record.clone();
            if let Err(refused) = change(&mut record) {
                return Ok(Modified::Refused(refused));
            }
            let now_ms = Timestamp::now().unix_millis();
            let remaining_ms = old.ttl_millis.map_or(NO_TTL_HORIZON_MS, |t| t as i64);
            let ttl_ms = match ttl {
                TtlRule::Keep => None,
                TtlRule::Reset(d) => Some(millis(d)),
                TtlRule::AtLeast(d) => Some(millis(d).max(remaining_ms)),
            };
            let expiry_ms = now_ms + ttl_ms.unwrap_or(remaining_ms);
            let new_raw = record.to_json();
            let ttl_arg = ttl_ms.map_or_else(|| "keep".to_owned(), |t| t.to_string());
            let args = [raw.as_slice(), new_raw.as_bytes(), ttl_arg.as_bytes()];
            let swapped = self
                .pipeline_with_scripts(|by_body| {
                    let mut pipe = redis::pipe();
                    pipe.add_command(script_cmd(
                        &self.scripts.compare_and_set,
                        by_body,
                        &key,
                        &args,
                    ));
                    pipe
                })
                .await?
                .pop()
                .map(|r| self.value_of::<i64>(r))
                .transpose()?
                == Some(1);
            if swapped {
                let mut pipe = redis::pipe();
                let becomes = Becomes::Stored {
                    record: &record,
                    expiry_ms,
                };
                self.reindex(&mut pipe, id, Some(&old.record), becomes);
                self.all_succeeded(self.pipeline(&pipe).await?)?;
                let ttl_millis = u64::try_from(expiry_ms - now_ms).ok();
                return Ok(Modified::Done(Session {
                    id: id.clone(),
                    record,
                    ttl_millis,
                }));
            }
            debug!(session = %id, attempt, "record changed concurrently; retrying");
        }
        Err(StoreError::Contended {
            id: id.to_string(),
            attempts: CAS_ATTEMPTS,
        })
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn script_cmd(lua: &Lua, by_body: bool, key: &str, args: &[&[u8]]) -> Cmd {
    let mut cmd = lua.cmd(by_body, &[key], &[]);
    for arg in args {
        cmd.arg(*arg);
    }
    cmd
}

#[async_trait]
impl SessionStore for RedisStore {
    #[instrument(level = "debug", skip_all, fields(session = %id))]
    async fn create_or_rehydrate(
        &self,
        id: &SessionId,
        new: NewSession,
    ) -> Result<(Session, Origin)> {
        let now = Timestamp::now();
        let record = new.into_record(id, now);
        let ttl_ms = millis(self.ttl);
        let mut set = redis::cmd("SET");
        set.arg(self.keys.record(id))
            .arg(record.to_json())
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(ttl_ms);
        let previous = match self.query::<Option<Vec<u8>>>(&set).await {
            Ok(previous) => previous,
            Err(StoreError::Redis { source, .. }) if source.code() == Some("WRONGTYPE") => {
                let key = self.keys.record(id);
                let kind: String = self.query(redis::cmd("TYPE").arg(&key)).await?;
                return Err(UnreadableRecord {
                    key,
                    reason: UnreadableReason::WrongType(kind),
                }
                .into());
            }
            Err(e) => return Err(e),
        };
        let Some(previous) = previous else {
            let mut pipe = redis::pipe();
            let becomes = Becomes::Stored {
                record: &record,
                expiry_ms: now.unix_millis() + ttl_ms,
            };
            self.reindex(&mut pipe, id, None, becomes);
            self.all_succeeded(self.pipeline(&pipe).await?)?;
            let session = Session {
                id: id.clone(),
                record,
                ttl_millis: Some(ttl_ms as u64),
            };
            return Ok((session, Origin::Created));
        };
        // The session exists: never overwrite it, and refuse to build on a record we cannot
        // read rather than replace it.
        let mut existing =
            SessionRecord::from_json(&previous).map_err(|reason| UnreadableRecord {
                key: self.keys.record(id),
                reason: UnreadableReason::Malformed(reason),
            })?;
        self.touch_indexed(id, IndexSlot::of(&existing), true)
            .await?;
        existing.last_activity_at = now;
        let session = Session {
            id: id.clone(),
            record: existing,
            ttl_millis: Some(ttl_ms as u64),
        };
        Ok((session, Origin::Rehydrated))
    }

    #[instrument(level = "debug", skip_all, fields(session = %id))]
    async fn get(&self, id: &SessionId) -> Result<Option<Session>> {
        Ok(self.read(id).await?.map(|(session, _)| session))
    }

    #[instrument(level = "debug", skip_all, fields(session = %id))]
    async fn touch(&self, id: &SessionId, owner_pod: Option<&str>) -> Result<Touch> {
        let slot = owner_pod.map_or(IndexSlot::Unowned, IndexSlot::Pod);
        self.touch_indexed(id, slot, false).await
    }

    #[instrument(level = "debug", skip_all, fields(session = %id))]
    async fn update(&self, id: &SessionId, patch: SessionPatch) -> Result<Option<Session>> {
        // A retry re-reads the record, so the patch is applied to each fresh copy.
        let outcome = self
            .modify(id, TtlRule::Keep, |record| {
                patch.clone().apply(record);
                Ok::<(), ()>(())
            })
            .await?;
        Ok(match outcome {
            Modified::Done(session) => Some(session),
            Modified::Missing | Modified::Refused(()) => None,
        })
    }

    #[instrument(level = "debug", skip_all, fields(session = %id))]
    async fn mark_draining(
        &self,
        id: &SessionId,
        owner: Option<&str>,
        hold: Duration,
    ) -> Result<Option<Session>> {
        let now = Timestamp::now();
        let outcome = self
            .modify(id, TtlRule::AtLeast(hold), |record| {
                if record.owner_pod.as_deref() != owner {
                    return Err(());
                }
                record.hand_over(now);
                Ok(())
            })
            .await?;
        Ok(match outcome {
            Modified::Done(session) => Some(session),
            Modified::Missing | Modified::Refused(()) => None,
        })
    }

    async fn tally(&self, tally: Tally, n: u64) -> Result<()> {
        self.query::<i64>(
            redis::cmd("HINCRBY")
                .arg(self.keys.tallies())
                .arg(tally.field())
                .arg(n),
        )
        .await
        .map(|_| ())
    }

    async fn tallies(&self) -> Result<Tallies> {
        let fields = [Tally::Drained, Tally::Rehydrated, Tally::Lost];
        let values: Vec<Option<u64>> = self
            .query(
                redis::cmd("HMGET")
                    .arg(self.keys.tallies())
                    .arg(&fields.map(Tally::field)[..]),
            )
            .await?;
        let at = |i: usize| values.get(i).copied().flatten().unwrap_or(0);
        Ok(Tallies {
            drained: at(0),
            rehydrated: at(1),
            lost: at(2),
        })
    }

    #[instrument(level = "debug", skip_all)]
    async fn expire_draining(&self) -> Result<u64> {
        let now = Timestamp::now().unix_millis().to_string();
        let (draining, tallies) = (self.keys.draining(), self.keys.tallies());
        let mut results = self
            .pipeline_with_scripts(|by_body| {
                let mut pipe = redis::pipe();
                pipe.add_command(self.scripts.expire_draining.cmd(
                    by_body,
                    &[&draining, &tallies],
                    &[&now],
                ));
                pipe
            })
            .await?;
        let lost: u64 = self.value_of(results.pop().unwrap_or(Ok(Value::Nil)))?;
        if lost > 0 {
            debug!(lost, "draining sessions expired unclaimed");
        }
        Ok(lost)
    }

    async fn sessions_of_pod(&self, pod: &str, limit: usize) -> Result<Vec<SessionId>> {
        let now = Timestamp::now().unix_millis();
        let members: Vec<String> = self
            .query(
                redis::cmd("ZRANGE")
                    .arg(self.keys.pod(pod))
                    .arg(now)
                    .arg("(+inf")
                    .arg("BYSCORE")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit),
            )
            .await?;
        // Members that are not ids (the sentinel, junk) are skipped: prune removes them.
        Ok(members
            .iter()
            .filter_map(|m| SessionId::parse(m).ok())
            .collect())
    }

    #[instrument(level = "debug", skip_all, fields(session = %id, pod = %claim.pod))]
    async fn claim(&self, id: &SessionId, claim: Claim) -> Result<ClaimOutcome> {
        let now = Timestamp::now();
        // Set by each attempt; the written one is the last (a compare-and-set may retry on a
        // fresh copy).
        let mut handover = super::Handover::Unowned;
        let outcome = self
            .modify(id, TtlRule::Reset(self.ttl), |record| {
                ClaimOutcome::decide(record, &claim)?;
                handover = ClaimOutcome::apply(record, &claim, now);
                Ok::<(), ClaimRefusal>(())
            })
            .await?;
        Ok(match outcome {
            Modified::Missing => ClaimOutcome::NotFound,
            Modified::Refused(refused) => refused.into(),
            Modified::Done(session) => ClaimOutcome::applied(session, handover),
        })
    }

    #[instrument(level = "debug", skip_all, fields(session = %id))]
    async fn append_events(
        &self,
        id: &SessionId,
        events: &[LoggedEvent],
        bound: LogBound,
    ) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let key = self.keys.events(id);
        let entries: Vec<Vec<u8>> = events.iter().map(LoggedEvent::to_entry).collect();
        let (keep, bytes, ttl) = (
            bound.events.to_string(),
            bound.bytes.to_string(),
            millis(self.ttl).to_string(),
        );
        let results = self
            .pipeline_with_scripts(|by_body| {
                let mut cmd = self.scripts.append_events.cmd(by_body, &[&key], &[]);
                cmd.arg(&keep).arg(&bytes).arg(&ttl).arg(&entries);
                let mut pipe = redis::pipe();
                pipe.add_command(cmd);
                pipe
            })
            .await?;
        self.all_succeeded(results)
    }

    async fn events(&self, id: &SessionId) -> Result<Vec<LoggedEvent>> {
        let key = self.keys.events(id);
        let entries: Vec<Vec<u8>> = self
            .query(redis::cmd("LRANGE").arg(&key).arg(0).arg(-1))
            .await?;
        Ok(entries
            .iter()
            .filter_map(|entry| match serde_json::from_slice(entry) {
                Ok(event) => Some(event),
                Err(error) => {
                    warn!(%key, %error, "skipping an unreadable event log entry");
                    None
                }
            })
            .collect())
    }

    async fn delete(&self, id: &SessionId) -> Result<bool> {
        let previous: Option<Vec<u8>> = self
            .query(redis::cmd("GETDEL").arg(self.keys.record(id)))
            .await?;
        // The log is useless without its session, whether or not the record was still there.
        self.query::<i64>(redis::cmd("DEL").arg(self.keys.events(id)))
            .await?;
        let Some(previous) = previous else {
            return Ok(false);
        };
        // An unreadable record is deleted all the same (the caller asked); its pod entry, if any,
        // goes with the next prune.
        let old = SessionRecord::from_json(&previous).ok();
        let mut pipe = redis::pipe();
        self.reindex(&mut pipe, id, old.as_ref(), Becomes::Absent);
        self.all_succeeded(self.pipeline(&pipe).await?)?;
        Ok(true)
    }

    async fn list_page(&self, cursor: Option<ListCursor>, page_size: usize) -> Result<ListPage> {
        self.list_from(cursor, page_size).await
    }

    fn record_pages(&self, page_size: usize) -> BoxStream<'_, Result<Vec<Listed>>> {
        self.scan_pages(page_size).boxed()
    }

    #[instrument(level = "debug", skip_all)]
    async fn counts(&self) -> Result<SessionCounts> {
        self.count_sessions().await
    }

    #[instrument(level = "debug", skip_all)]
    async fn prune(&self) -> Result<PruneReport> {
        self.prune_index().await
    }

    #[instrument(level = "info", skip_all, fields(prefix = self.keys.prefix()))]
    async fn indexed_counts(&self) -> Result<Option<SessionCounts>> {
        self.index_counts().await
    }

    async fn rebuild_index(&self, seen: &mut RecordObserver<'_>) -> Result<u64> {
        self.rebuild(seen).await
    }

    async fn memory_usage(&self, sample: usize) -> Result<Option<MemorySample>> {
        self.sample_memory(sample).await
    }

    /// One `EXISTS` each, pipelined.
    async fn missing(&self, ids: &[SessionId]) -> Result<Vec<SessionId>> {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("EXISTS").arg(self.keys.record(id));
        }
        let results = self.pipeline(&pipe).await?;
        let mut missing = Vec::new();
        for (id, result) in ids.iter().zip(results) {
            let exists: u64 = self.value_of(result)?;
            if exists == 0 {
                missing.push(id.clone());
            }
        }
        Ok(missing)
    }

    async fn retention(&self) -> Result<Option<Retention>> {
        self.read_retention().await.map(Some)
    }

    fn describe(&self) -> String {
        let kind = if self.target.is_cluster() {
            "Redis Cluster"
        } else {
            "Redis"
        };
        format!(
            "{kind} at {} (prefix {:?})",
            self.target.masked(),
            self.keys.prefix()
        )
    }
}
