//! [`SessionStore`] on Redis: standalone, TLS, or Cluster.
//!
//! Records are plain string keys with a TTL (the seed's schema). Three sorted sets per prefix
//! index them by expiry, draining state and owning pod, so every count is a `ZCOUNT`. Record and
//! index live in different Cluster slots, so they are written in one pipeline but not one
//! transaction: an index can lag a record, never the other way round for long, and `prune` and
//! the sentinel-triggered rebuild bring it back (docs/redis-schema.md).

mod keys;
mod lazy;
mod retention;
mod scripts;
mod target;

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt as _;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisResult, Value};
use tracing::{debug, info, instrument, warn};

pub use self::keys::Keys;
use self::keys::SENTINEL;
pub use self::lazy::LazyRedisStore;
pub use self::retention::{Retention, Verdict as RetentionVerdict};
use self::scripts::{Lua, Scripts};
pub(crate) use self::target::Conn;
pub use self::target::{RedisTarget, mask_url};
use super::{
    Claim, ClaimOutcome, ClaimRefusal, CountSource, ListCursor, ListPage, Listed, LogBound,
    LoggedEvent, MemorySample, NewSession, Origin, PruneReport, Result, Session, SessionCounts,
    SessionId, SessionPatch, SessionRecord, SessionState, SessionStore, StoreError, Tallies, Tally,
    Timestamp, Touch, UnreadableReason, UnreadableRecord,
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

/// Which per-state index set holds a session, besides the expiry set that holds all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IndexSlot<'a> {
    Unowned,
    Draining,
    Pod(&'a str),
}

impl<'a> IndexSlot<'a> {
    fn of(record: &'a SessionRecord) -> Self {
        match (record.state(), record.owner_pod.as_deref()) {
            (SessionState::Draining, _) => Self::Draining,
            (SessionState::Active, Some(pod)) => Self::Pod(pod),
            (SessionState::Active, None) => Self::Unowned,
        }
    }
}

/// A record as fetched: key, raw value (or why it cannot be used) and `PTTL`.
struct Fetched {
    key: Vec<u8>,
    value: std::result::Result<Option<Vec<u8>>, UnreadableReason>,
    pttl_ms: i64,
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
            target: self.target.clone(),
            keys: Keys::new(key_prefix)?,
            conn: self.conn.clone(),
            ttl,
            max_record_bytes: self.max_record_bytes,
            scripts: Scripts::new(),
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
    pub async fn retention(&self) -> Result<Retention> {
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

    async fn fetch(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Fetched>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
        }
        let mut results = self.pipeline(&pipe).await?.into_iter();
        let mut fetched = Vec::with_capacity(keys.len());
        for key in keys {
            let (value, pttl) = (results.next(), results.next());
            let pttl_ms = self.value_of::<i64>(pttl.unwrap_or(Ok(Value::Int(-2))))?;
            let value = match value.unwrap_or(Ok(Value::Nil)) {
                Err(e) if e.code() == Some("WRONGTYPE") => {
                    let kind: String = self.query(redis::cmd("TYPE").arg(&key)).await?;
                    Err(UnreadableReason::WrongType(kind))
                }
                other => match self.value_of::<Option<Vec<u8>>>(other)? {
                    Some(bytes) if bytes.len() > self.max_record_bytes => {
                        Err(UnreadableReason::Oversize {
                            bytes: bytes.len() as u64,
                            limit: self.max_record_bytes as u64,
                        })
                    }
                    value => Ok(value),
                },
            };
            fetched.push(Fetched {
                key,
                value,
                pttl_ms,
            });
        }
        Ok(fetched)
    }

    /// A fetched key as a listing entry; `None` if it vanished since the scan.
    fn decode(&self, fetched: &Fetched) -> Option<Listed> {
        let unreadable = |reason| {
            Listed::Unreadable(UnreadableRecord {
                key: String::from_utf8_lossy(&fetched.key).into_owned(),
                reason,
            })
        };
        let value = match &fetched.value {
            Ok(None) => return None,
            Ok(Some(value)) => value,
            Err(reason) => return Some(unreadable(reason.clone())),
        };
        let id = match self.keys.id_of(&fetched.key) {
            Ok(id) => id,
            Err(reason) => return Some(unreadable(reason)),
        };
        Some(match SessionRecord::from_json(value) {
            Ok(record) => Listed::Session(Session {
                id,
                record,
                ttl_millis: u64::try_from(fetched.pttl_ms).ok(),
            }),
            Err(reason) => unreadable(UnreadableReason::Malformed(reason)),
        })
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
                self.reindex(&mut pipe, id, Some(&old.record), Some(&record), expiry_ms);
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

    /// Index changes for a record going from `old` to `new` (`None`: absent).
    fn reindex(
        &self,
        pipe: &mut Pipeline,
        id: &SessionId,
        old: Option<&SessionRecord>,
        new: Option<&SessionRecord>,
        expiry_ms: i64,
    ) {
        let id = id.as_str();
        let old_slot = old.map_or(IndexSlot::Unowned, IndexSlot::of);
        let Some(new) = new else {
            pipe.zrem(self.keys.expiry(), id);
            pipe.zrem(self.keys.draining(), id);
            if let IndexSlot::Pod(pod) = old_slot {
                pipe.zrem(self.keys.pod(pod), id);
            }
            return;
        };
        let score = expiry_ms as f64;
        pipe.zadd(self.keys.expiry(), id, score);
        let new_slot = IndexSlot::of(new);
        if old_slot != new_slot {
            match old_slot {
                IndexSlot::Draining => pipe.zrem(self.keys.draining(), id),
                IndexSlot::Pod(pod) => pipe.zrem(self.keys.pod(pod), id),
                IndexSlot::Unowned => pipe,
            };
        }
        match new_slot {
            IndexSlot::Draining => pipe.zadd(self.keys.draining(), id, score),
            IndexSlot::Pod(pod) => pipe.zadd(self.keys.pod(pod), id, score).zadd(
                self.keys.pods(),
                pod,
                Timestamp::now().unix_millis() as f64,
            ),
            IndexSlot::Unowned => pipe,
        };
    }

    /// Touch of the record plus, in the same round trip, the sliding scores of its index
    /// entries. `add` also indexes a session that is not indexed yet (a seed-written record).
    async fn touch_indexed(&self, id: &SessionId, slot: IndexSlot<'_>, add: bool) -> Result<Touch> {
        let now = Timestamp::now();
        let ttl_ms = millis(self.ttl);
        let score = (now.unix_millis() + ttl_ms) as f64;
        let key = self.keys.record(id);
        let (ttl_arg, now_arg) = (ttl_ms.to_string(), now.to_seed_string());
        let member = id.as_str();
        let results = self
            .pipeline_with_scripts(|by_body| {
                let mut pipe = redis::pipe();
                let args = [ttl_arg.as_bytes(), now_arg.as_bytes()];
                pipe.add_command(script_cmd(&self.scripts.touch, by_body, &key, &args));
                let zadd = |set: String| {
                    let mut cmd = redis::cmd("ZADD");
                    cmd.arg(set);
                    if !add {
                        // XX: slides an entry that exists, adds none.
                        cmd.arg("XX");
                    }
                    cmd.arg(score).arg(member);
                    cmd
                };
                pipe.add_command(zadd(self.keys.expiry()));
                match (add, slot) {
                    (true, IndexSlot::Draining) | (false, _) => {
                        pipe.add_command(zadd(self.keys.draining()));
                    }
                    _ => {}
                }
                if let IndexSlot::Pod(pod) = slot {
                    pipe.add_command(zadd(self.keys.pod(pod)));
                    if add {
                        pipe.zadd(self.keys.pods(), pod, now.unix_millis() as f64);
                    }
                }
                pipe
            })
            .await?;
        let mut results = results.into_iter();
        let touched = match self.value_of::<i64>(results.next().unwrap_or(Ok(Value::Int(0))))? {
            0 => Touch::Gone,
            2 => Touch::Draining,
            _ => Touch::Active,
        };
        self.all_succeeded(results.collect())?;
        Ok(touched)
    }

    /// The master nodes of a cluster, in a stable order (a listing cursor indexes into it).
    async fn cluster_masters(&self) -> Result<Vec<(String, u16)>> {
        let nodes: String = self
            .query(&redis::cmd("CLUSTER").arg("NODES").clone())
            .await?;
        let mut masters: Vec<(String, u16)> = nodes
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let flags = fields.get(2)?;
                if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
                    return None;
                }
                let address = fields.get(1)?.split(['@', ',']).next()?;
                let (host, port) = address.rsplit_once(':')?;
                Some((host.to_owned(), port.parse().ok()?))
            })
            .collect();
        masters.sort();
        Ok(masters)
    }

    /// One `SCAN` step on one node: (next cursor, keys).
    async fn scan_step(
        &self,
        node: Option<&(String, u16)>,
        position: u64,
        count: usize,
    ) -> Result<(u64, Vec<Vec<u8>>)> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(position)
            .arg("MATCH")
            .arg(self.keys.record_pattern())
            .arg("COUNT")
            .arg(count);
        match (node, &self.conn) {
            (Some((host, port)), Conn::Cluster(conn)) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                let value = conn
                    .clone()
                    .route_command(cmd, routing)
                    .await
                    .map_err(|e| self.error(e))?;
                redis::from_redis_value(value).map_err(|e| self.error(e.into()))
            }
            _ => self.query(&cmd).await,
        }
    }

    /// Index members of `set` whose records no longer exist are removed; returns how many.
    /// Drops the index entries (every set) whose record is gone; returns how many.
    async fn drop_dangling_entries(&self) -> Result<u64> {
        let mut sets = vec![self.keys.expiry(), self.keys.draining()];
        sets.extend(self.indexed_pods().await?.iter().map(|p| self.keys.pod(p)));
        let mut dropped = 0;
        for set in sets {
            dropped += self.remove_dangling(&set).await?;
        }
        Ok(dropped)
    }

    async fn remove_dangling(&self, set: &str) -> Result<u64> {
        let mut removed = 0;
        let mut position = 0_u64;
        loop {
            let (next, flat): (u64, Vec<String>) = self
                .query(
                    redis::cmd("ZSCAN")
                        .arg(set)
                        .arg(position)
                        .arg("COUNT")
                        .arg(MAINTENANCE_BATCH),
                )
                .await?;
            // ZSCAN answers member, score, member, score, ...
            let members: Vec<SessionId> = flat
                .iter()
                .step_by(2)
                .filter(|m| *m != SENTINEL)
                .filter_map(|m| SessionId::parse(m).ok())
                .collect();
            if !members.is_empty() {
                let mut pipe = redis::pipe();
                for id in &members {
                    pipe.exists(self.keys.record(id));
                }
                let exists = self.pipeline(&pipe).await?;
                let mut zrem = redis::pipe();
                for (id, exists) in members.iter().zip(exists) {
                    if !self.value_of::<bool>(exists)? {
                        zrem.zrem(set, id.as_str());
                        removed += 1;
                    }
                }
                self.all_succeeded(self.pipeline(&zrem).await?)?;
            }
            if next == 0 {
                return Ok(removed);
            }
            position = next;
        }
    }

    /// Pods listed in the pods set (without the sentinel).
    async fn indexed_pods(&self) -> Result<Vec<String>> {
        let pods: Vec<String> = self
            .query(redis::cmd("ZRANGE").arg(self.keys.pods()).arg(0).arg(-1))
            .await?;
        Ok(pods.into_iter().filter(|p| p != SENTINEL).collect())
    }

    async fn indexed_counts(&self) -> Result<Option<SessionCounts>> {
        let now = Timestamp::now().unix_millis();
        let mut pipe = redis::pipe();
        for set in [self.keys.expiry(), self.keys.draining()] {
            pipe.zcount(&set, now, "(+inf").zscore(&set, SENTINEL);
        }
        pipe.zscore(self.keys.pods(), SENTINEL);
        pipe.cmd("ZRANGE").arg(self.keys.pods()).arg(0).arg(-1);
        let mut results = self.pipeline(&pipe).await?.into_iter();
        let mut next = || results.next().unwrap_or(Ok(Value::Nil));
        let total: u64 = self.value_of(next())?;
        let expiry_sentinel: Option<f64> = self.value_of(next())?;
        let draining: u64 = self.value_of(next())?;
        let draining_sentinel: Option<f64> = self.value_of(next())?;
        let pods_sentinel: Option<f64> = self.value_of(next())?;
        let pods: Vec<String> = self.value_of(next())?;
        if expiry_sentinel.is_none() || draining_sentinel.is_none() || pods_sentinel.is_none() {
            return Ok(None);
        }
        let pods: Vec<String> = pods.into_iter().filter(|p| p != SENTINEL).collect();
        let mut pipe = redis::pipe();
        for pod in &pods {
            pipe.zcount(self.keys.pod(pod), now, "+inf");
        }
        let mut per_pod = std::collections::BTreeMap::new();
        for (pod, count) in pods.into_iter().zip(self.pipeline(&pipe).await?) {
            let count: u64 = self.value_of(count)?;
            if count > 0 {
                per_pod.insert(pod, count);
            }
        }
        Ok(Some(SessionCounts {
            total,
            active: total.saturating_sub(draining),
            draining,
            per_pod,
            source: CountSource::Index,
        }))
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
            self.reindex(
                &mut pipe,
                id,
                None,
                Some(&record),
                now.unix_millis() + ttl_ms,
            );
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
                record.set_state(SessionState::Draining);
                record.owner_pod = None;
                record.draining_since = Some(now);
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
        self.reindex(&mut pipe, id, old.as_ref(), None, 0);
        self.all_succeeded(self.pipeline(&pipe).await?)?;
        Ok(true)
    }

    async fn list_page(&self, cursor: Option<ListCursor>, page_size: usize) -> Result<ListPage> {
        let cursor = cursor.unwrap_or_default();
        let masters = match self.conn {
            Conn::Cluster(_) => self.cluster_masters().await?,
            Conn::Single(_) => Vec::new(),
        };
        let node = masters.get(cursor.node);
        let (next, keys) = self
            .scan_step(node, cursor.position, page_size.max(1))
            .await?;
        let items = self
            .fetch(keys)
            .await?
            .iter()
            .filter_map(|f| self.decode(f))
            .collect();
        let next = match (next, masters.len()) {
            (0, n) if cursor.node + 1 < n => Some(ListCursor {
                node: cursor.node + 1,
                position: 0,
            }),
            (0, _) => None,
            (position, _) => Some(ListCursor {
                node: cursor.node,
                position,
            }),
        };
        Ok(ListPage { items, next })
    }

    #[instrument(level = "debug", skip_all)]
    async fn counts(&self) -> Result<SessionCounts> {
        if let Some(counts) = self.indexed_counts().await? {
            // A user without INFO (an ACL) keeps the plain count.
            let may_evict = self
                .retention()
                .await
                .is_ok_and(|retention| retention.verdict().may_evict());
            if may_evict {
                let dropped = self.drop_dangling_entries().await?;
                debug!(
                    dropped,
                    "dropped index entries of evicted records before counting"
                );
                let counts = self.indexed_counts().await?.unwrap_or(counts);
                return Ok(SessionCounts {
                    source: CountSource::Verified,
                    ..counts
                });
            }
            return Ok(counts);
        }
        info!(
            prefix = self.keys.prefix(),
            "session index missing (never built or evicted); rebuilding"
        );
        self.rebuild_index().await?;
        let counts = self.indexed_counts().await?.unwrap_or_default();
        Ok(SessionCounts {
            source: CountSource::Rebuilt,
            ..counts
        })
    }

    #[instrument(level = "debug", skip_all)]
    async fn prune(&self) -> Result<PruneReport> {
        let now = Timestamp::now().unix_millis();
        // Draining entries are counted lost as they go; expiry entries just go.
        let lost = self.expire_draining().await?;
        let expired: u64 = self
            .query(
                redis::cmd("ZREMRANGEBYSCORE")
                    .arg(self.keys.expiry())
                    .arg("-inf")
                    .arg(format!("({now}")),
            )
            .await?;
        let mut report = PruneReport {
            expired: lost + expired,
            lost,
            ..PruneReport::default()
        };
        let pods = self.indexed_pods().await?;
        for pod in &pods {
            let (pods_key, pod_key, now_arg) =
                (self.keys.pods(), self.keys.pod(pod), now.to_string());
            let mut results = self
                .pipeline_with_scripts(|by_body| {
                    let mut pipe = redis::pipe();
                    pipe.add_command(self.scripts.prune_pod.cmd(
                        by_body,
                        &[&pods_key, &pod_key],
                        &[pod.as_str(), now_arg.as_str()],
                    ));
                    pipe
                })
                .await?;
            let (expired, dropped): (u64, u64) =
                self.value_of(results.pop().unwrap_or(Ok(Value::Nil)))?;
            report.expired += expired;
            report.pods += dropped;
        }
        report.dangling = self.drop_dangling_entries().await?;
        Ok(report)
    }

    #[instrument(level = "info", skip_all, fields(prefix = self.keys.prefix()))]
    async fn rebuild_index(&self) -> Result<u64> {
        let now = Timestamp::now().unix_millis();
        let mut indexed = 0_u64;
        let mut pages =
            std::pin::pin!(super::list_all(self, MAINTENANCE_BATCH).chunks(MAINTENANCE_BATCH));
        while let Some(chunk) = pages.next().await {
            let mut pipe = redis::pipe();
            for item in chunk {
                if let Listed::Session(session) = item? {
                    let expiry = now + session.ttl_millis.map_or(NO_TTL_HORIZON_MS, |t| t as i64);
                    self.reindex(&mut pipe, &session.id, None, Some(&session.record), expiry);
                    indexed += 1;
                }
            }
            self.all_succeeded(self.pipeline(&pipe).await?)?;
        }
        // What the index held of records gone since (evicted, deleted behind its back) would
        // be counted with the rest.
        self.drop_dangling_entries().await?;
        // Sentinels last: the index counts as whole only once every record is in.
        let mut pipe = redis::pipe();
        for set in [self.keys.expiry(), self.keys.draining(), self.keys.pods()] {
            pipe.zadd(set, SENTINEL, "+inf");
        }
        self.all_succeeded(self.pipeline(&pipe).await?)?;
        debug!(indexed, "session index rebuilt");
        Ok(indexed)
    }

    async fn memory_usage(&self, sample: usize) -> Result<Option<MemorySample>> {
        let mut keys = Vec::new();
        let mut cursor = None;
        loop {
            let page = self.list_page(cursor, sample.max(1)).await?;
            keys.extend(page.items.into_iter().filter_map(|item| match item {
                Listed::Session(s) => Some(self.keys.record(&s.id)),
                Listed::Unreadable(_) => None,
            }));
            cursor = page.next;
            if keys.len() >= sample || cursor.is_none() {
                break;
            }
        }
        keys.truncate(sample);
        if keys.is_empty() {
            return Ok(Some(MemorySample::default()));
        }
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("MEMORY")
                .arg("USAGE")
                .arg(key)
                .arg("SAMPLES")
                .arg(0);
        }
        let mut sizes = Vec::with_capacity(keys.len());
        for size in self.pipeline(&pipe).await? {
            if let Some(bytes) = self.value_of::<Option<u64>>(size)? {
                sizes.push(bytes);
            }
        }
        let sampled = sizes.len() as u64;
        Ok(Some(MemorySample {
            sampled,
            mean_bytes: sizes.iter().sum::<u64>().checked_div(sampled).unwrap_or(0),
            max_bytes: sizes.iter().copied().max().unwrap_or(0),
        }))
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
