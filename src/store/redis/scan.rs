//! Reading records in bulk: a page of keys fetched with their TTLs in one pipeline, decoded or
//! reported unreadable, and `SCAN` over every master of a Cluster.

use redis::Value;

use super::RedisStore;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};

use super::Conn;
use crate::store::{Session, SessionRecord, UnreadableRecord};

use crate::store::{Listed, MemorySample, Result, SessionStore as _, UnreadableReason};

/// A record as fetched: key, raw value (or why it cannot be used) and `PTTL`.
pub(super) struct Fetched {
    pub(super) key: Vec<u8>,
    pub(super) value: std::result::Result<Option<Vec<u8>>, UnreadableReason>,
    pub(super) pttl_ms: i64,
}

impl RedisStore {
    pub(super) async fn fetch(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Fetched>> {
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
    pub(super) fn decode(&self, fetched: &Fetched) -> Option<Listed> {
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

    /// The master nodes of a cluster, in a stable order (a listing cursor indexes into it).
    pub(super) async fn cluster_masters(&self) -> Result<Vec<(String, u16)>> {
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
    pub(super) async fn scan_step(
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

    pub(super) async fn sample_memory(&self, sample: usize) -> Result<Option<MemorySample>> {
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
}
