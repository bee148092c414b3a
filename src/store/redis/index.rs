//! The session index: three sorted sets per prefix (expiry, draining, owning pod) that make every
//! count a `ZCOUNT`, kept beside the records, checked against them where Redis may evict, and
//! rebuilt from them when it is missing.

use futures::StreamExt as _;
use redis::{Pipeline, Value};
use tracing::{debug, info};

use super::keys::{Keys, SENTINEL};
use super::{millis, script_cmd};

use super::{MAINTENANCE_BATCH, NO_TTL_HORIZON_MS, RedisStore};
use crate::store::{
    CountSource, Listed, PruneReport, RecordObserver, Result, SessionCounts, SessionId,
    SessionRecord, SessionState, SessionStore as _, Timestamp, Touch,
};

/// Which per-state index set holds a session, besides the expiry set that holds all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IndexSlot<'a> {
    Unowned,
    Draining,
    Pod(&'a str),
}

impl<'a> IndexSlot<'a> {
    pub(super) fn of(record: &'a SessionRecord) -> Self {
        match (record.state(), record.owner_pod.as_deref()) {
            (SessionState::Draining, _) => Self::Draining,
            (SessionState::Active, Some(pod)) => Self::Pod(pod),
            (SessionState::Active, None) => Self::Unowned,
        }
    }

    /// The set that holds a session in this slot, besides the expiry set that holds every
    /// session (a pod's set also puts the pod in the `pods` set).
    fn set(self, keys: &Keys) -> Option<String> {
        match self {
            Self::Unowned => None,
            Self::Draining => Some(keys.draining()),
            Self::Pod(pod) => Some(keys.pod(pod)),
        }
    }
}

/// Which index sets a check for dangling entries reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IndexSets {
    All,
    /// The pods' sets, not the expiry and draining sets.
    PodsOnly,
}

/// A page of a rebuild's index entries, grouped by set: written as one `ZADD` per set, since one
/// command per entry would cost Redis more than reading the records did.
#[derive(Default)]
struct PageEntries {
    /// Every session's entry in the expiry set.
    expiry: Vec<(f64, String)>,
    /// Entries in the set of each session's slot, by set.
    by_set: std::collections::BTreeMap<String, Vec<(f64, String)>>,
    pods: std::collections::BTreeSet<String>,
}

impl PageEntries {
    /// The entries [`RedisStore::reindex`] writes for a record not indexed before.
    fn add(&mut self, keys: &Keys, id: &SessionId, record: &SessionRecord, expiry_ms: i64) {
        let entry = (expiry_ms as f64, id.as_str().to_owned());
        let slot = IndexSlot::of(record);
        if let Some(set) = slot.set(keys) {
            self.by_set.entry(set).or_default().push(entry.clone());
        }
        if let IndexSlot::Pod(pod) = slot {
            self.pods.insert(pod.to_owned());
        }
        self.expiry.push(entry);
    }
}

/// What a record becomes, for [`RedisStore::reindex`].
pub(super) enum Becomes<'a> {
    /// Deleted: its index entries go.
    Absent,
    /// Written, expiring at `expiry_ms` (Unix milliseconds): indexed under its slot.
    Stored {
        record: &'a SessionRecord,
        expiry_ms: i64,
    },
}

impl RedisStore {
    /// One `ZADD` per index set of the page's entries.
    fn write_entries(&self, entries: PageEntries, now_ms: i64) -> Pipeline {
        let mut pipe = redis::pipe();
        if !entries.expiry.is_empty() {
            pipe.zadd_multiple(self.keys.expiry(), &entries.expiry);
        }
        for (set, members) in &entries.by_set {
            pipe.zadd_multiple(set, members);
        }
        if !entries.pods.is_empty() {
            let pods: Vec<(f64, &str)> = entries
                .pods
                .iter()
                .map(|pod| (now_ms as f64, pod.as_str()))
                .collect();
            pipe.zadd_multiple(self.keys.pods(), &pods);
        }
        pipe
    }

    /// Index changes for a record going from `old` (`None`: absent) to `new`.
    pub(super) fn reindex(
        &self,
        pipe: &mut Pipeline,
        id: &SessionId,
        old: Option<&SessionRecord>,
        new: Becomes<'_>,
    ) {
        let id = id.as_str();
        let old_slot = old.map_or(IndexSlot::Unowned, IndexSlot::of);
        let Becomes::Stored {
            record: new,
            expiry_ms,
        } = new
        else {
            pipe.zrem(self.keys.expiry(), id);
            pipe.zrem(self.keys.draining(), id);
            if let IndexSlot::Pod(pod) = old_slot {
                pipe.zrem(self.keys.pod(pod), id);
            }
            return;
        };
        let score = expiry_ms as f64;
        let new_slot = IndexSlot::of(new);
        if old_slot != new_slot
            && let Some(set) = old_slot.set(&self.keys)
        {
            pipe.zrem(set, id);
        }
        for set in std::iter::once(self.keys.expiry()).chain(new_slot.set(&self.keys)) {
            pipe.zadd(set, id, score);
        }
        if let IndexSlot::Pod(pod) = new_slot {
            pipe.zadd(self.keys.pods(), pod, Timestamp::now().unix_millis() as f64);
        }
    }

    /// Touch of the record plus, in the same round trip, the sliding scores of its index
    /// entries. `add` also indexes a session that is not indexed yet (a seed-written record).
    pub(super) async fn touch_indexed(
        &self,
        id: &SessionId,
        slot: IndexSlot<'_>,
        add: bool,
    ) -> Result<Touch> {
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
                // The sets of the slot, as everywhere (`IndexSlot::set`); sliding, also the
                // draining set, where another pod may have moved the session since `slot` was
                // read (XX slides only what is there).
                let draining_too = !add && slot != IndexSlot::Draining;
                let sets = std::iter::once(self.keys.expiry())
                    .chain(slot.set(&self.keys))
                    .chain(draining_too.then(|| self.keys.draining()));
                for set in sets {
                    pipe.add_command(zadd(set));
                }
                if let (true, IndexSlot::Pod(pod)) = (add, slot) {
                    pipe.zadd(self.keys.pods(), pod, now.unix_millis() as f64);
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

    /// Drops the index entries (every set) whose record is gone; returns how many.
    pub(super) async fn drop_dangling_entries(&self) -> Result<u64> {
        self.drop_dangling_entries_of(IndexSets::All).await
    }

    async fn drop_dangling_entries_of(&self, which: IndexSets) -> Result<u64> {
        let mut sets = match which {
            IndexSets::All => vec![self.keys.expiry(), self.keys.draining()],
            IndexSets::PodsOnly => Vec::new(),
        };
        sets.extend(self.indexed_pods().await?.iter().map(|p| self.keys.pod(p)));
        let mut dropped = 0;
        for set in sets {
            dropped += self.remove_dangling(&set).await?;
        }
        Ok(dropped)
    }

    /// Index members of `set` whose records no longer exist are removed; returns how many.
    pub(super) async fn remove_dangling(&self, set: &str) -> Result<u64> {
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
    pub(super) async fn indexed_pods(&self) -> Result<Vec<String>> {
        let pods: Vec<String> = self
            .query(redis::cmd("ZRANGE").arg(self.keys.pods()).arg(0).arg(-1))
            .await?;
        Ok(pods.into_iter().filter(|p| p != SENTINEL).collect())
    }

    pub(super) async fn index_counts(&self) -> Result<Option<SessionCounts>> {
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

    pub(super) async fn count_sessions(&self) -> Result<SessionCounts> {
        if let Some(counts) = self.index_counts().await? {
            // A user without INFO (an ACL) keeps the plain count.
            let may_evict = self
                .read_retention()
                .await
                .is_ok_and(|retention| retention.verdict().may_evict());
            if may_evict {
                let dropped = self.drop_dangling_entries().await?;
                debug!(
                    dropped,
                    "dropped index entries of evicted records before counting"
                );
                let counts = self.index_counts().await?.unwrap_or(counts);
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
        self.rebuild(&mut |_| {}).await?;
        let counts = self.index_counts().await?.unwrap_or_default();
        Ok(SessionCounts {
            source: CountSource::Rebuilt,
            ..counts
        })
    }

    pub(super) async fn prune_index(&self) -> Result<PruneReport> {
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

    pub(super) async fn rebuild(&self, seen: &mut RecordObserver<'_>) -> Result<u64> {
        let now = Timestamp::now().unix_millis();
        // Sets that existed before may hold entries of records gone since; the expiry and
        // draining sets this rebuild makes hold only what it read. (A record deleted while it
        // runs may keep an entry until the operator's next prune, as one deleted behind the
        // index's back does.) The pods' sets are checked for every pod the `pods` set names
        // after the rebuild, which names every pod a record it read names: a set of a pod no
        // record names stays unchecked, and is not counted either.
        let existed: u64 = self
            .query(
                redis::cmd("EXISTS")
                    .arg(self.keys.expiry())
                    .arg(self.keys.draining()),
            )
            .await?;
        let mut indexed = 0_u64;
        let mut pages = std::pin::pin!(self.scan_pages(MAINTENANCE_BATCH));
        // A page's index entries are written while the next page is read.
        let mut unwritten: Option<Pipeline> = None;
        loop {
            let write = async {
                match unwritten.take() {
                    Some(pipe) => self.all_succeeded(self.pipeline(&pipe).await?),
                    None => Ok(()),
                }
            };
            let (page, written) = futures::join!(pages.next(), write);
            written?;
            let Some(page) = page.transpose()? else {
                break;
            };
            let mut entries = PageEntries::default();
            for item in page {
                if let Listed::Session(session) = &item {
                    let expiry = now + session.ttl_millis.map_or(NO_TTL_HORIZON_MS, |t| t as i64);
                    entries.add(&self.keys, &session.id, &session.record, expiry);
                    indexed += 1;
                }
                seen(&item);
            }
            unwritten = Some(self.write_entries(entries, now));
        }
        // What the index held of records gone since (evicted, deleted behind its back) would
        // be counted with the rest.
        self.drop_dangling_entries_of(if existed > 0 {
            IndexSets::All
        } else {
            IndexSets::PodsOnly
        })
        .await?;
        // Sentinels last: the index counts as whole only once every record is in.
        let mut pipe = redis::pipe();
        for set in [self.keys.expiry(), self.keys.draining(), self.keys.pods()] {
            pipe.zadd(set, SENTINEL, "+inf");
        }
        self.all_succeeded(self.pipeline(&pipe).await?)?;
        debug!(indexed, "session index rebuilt");
        Ok(indexed)
    }
}
