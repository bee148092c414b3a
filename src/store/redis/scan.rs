//! Reading records in bulk: a page of keys fetched with their TTLs in one pipeline, decoded or
//! reported unreadable, and `SCAN` over every master of a Cluster.

use futures::{Stream, TryStreamExt as _};
use redis::{RedisResult, Value};

use super::RedisStore;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};

use super::Conn;
use crate::store::{ListCursor, ListPage, Session, SessionRecord, UnreadableRecord};

use crate::store::{Listed, MemorySample, Result, SessionStore as _, UnreadableReason};

/// Pages a full read keeps at Redis while its caller uses the one before: one being read and,
/// behind it, the next `SCAN`. Redis is then never idle waiting for the caller (a pass over
/// 200,000 records took 2.4 s one page at a time, about twice Redis's own time).
const READ_AHEAD: usize = 2;

/// A Redis node `SCAN` visits: a Cluster's master, or `None` for the one server.
type ScanNode = (String, u16);

/// Where a full read's `SCAN` is: not started, at a cursor, or past the last node.
enum ScanState {
    Start,
    At(Vec<ScanNode>, ListCursor),
    Done,
}

/// A record as fetched: key, raw value (or why it cannot be used) and `PTTL`.
pub(super) struct Fetched {
    pub(super) key: Vec<u8>,
    pub(super) value: std::result::Result<Option<Vec<u8>>, UnreadableReason>,
    pub(super) pttl_ms: i64,
}

impl RedisStore {
    /// Reads `keys` with their TTLs in one round trip: one `MGET` on one server, a `GET` per key
    /// on a Cluster (whose keys span slots); a `PTTL` per key either way.
    pub(super) async fn fetch(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Fetched>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let one_server = matches!(self.conn, Conn::Single(_));
        let mut pipe = redis::pipe();
        if one_server {
            pipe.cmd("MGET").arg(&keys);
        } else {
            for key in &keys {
                pipe.cmd("GET").arg(key);
            }
        }
        for key in &keys {
            pipe.cmd("PTTL").arg(key);
        }
        let mut results = self.pipeline(&pipe).await?;
        let values_end = if one_server { 1 } else { keys.len() };
        // One result per command; a short answer leaves the missing keys read as gone.
        let pttls = results.split_off(values_end.min(results.len()));
        let values: Vec<RedisResult<Value>> = if one_server {
            let values = results.pop().unwrap_or(Ok(Value::Nil));
            match self.value_of::<Value>(values)? {
                Value::Array(values) => values.into_iter().map(Ok).collect(),
                other => vec![Ok(other)],
            }
        } else {
            results
        };
        let (mut values, mut pttls) = (values.into_iter(), pttls.into_iter());
        let mut fetched = Vec::with_capacity(keys.len());
        for key in keys {
            let pttl_ms = self.value_of::<i64>(pttls.next().unwrap_or(Ok(Value::Int(-2))))?;
            let value = match values.next().unwrap_or(Ok(Value::Nil)) {
                // `GET` refuses a key of another type; `MGET` answers nil for it, as for a key
                // that is gone, which `PTTL` (-2) tells apart.
                Err(e) if e.code() == Some("WRONGTYPE") => self.not_a_string(&key).await?,
                Ok(Value::Nil) if pttl_ms != -2 => self.not_a_string(&key).await?,
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

    /// Why a key that holds no string value cannot be read: its type; gone (`Ok(None)`) if it
    /// is a string by now (written since it was read) or no longer exists.
    async fn not_a_string(
        &self,
        key: &[u8],
    ) -> Result<std::result::Result<Option<Vec<u8>>, UnreadableReason>> {
        let kind: String = self.query(redis::cmd("TYPE").arg(key)).await?;
        Ok(match kind.as_str() {
            "string" | "none" => Ok(None),
            _ => Err(UnreadableReason::WrongType(kind)),
        })
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
    async fn cluster_masters(&self) -> Result<Vec<ScanNode>> {
        let nodes: String = self
            .query(&redis::cmd("CLUSTER").arg("NODES").clone())
            .await?;
        let mut masters: Vec<ScanNode> = nodes
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

    /// The nodes a full `SCAN` visits in turn: a Cluster's masters; none for one server.
    async fn scan_nodes(&self) -> Result<Vec<ScanNode>> {
        match self.conn {
            Conn::Cluster(_) => self.cluster_masters().await,
            Conn::Single(_) => Ok(Vec::new()),
        }
    }

    /// One `SCAN` step from `cursor` over `nodes`: the keys and where the next step starts.
    async fn scan_from(
        &self,
        nodes: &[ScanNode],
        cursor: &ListCursor,
        count: usize,
    ) -> Result<(Vec<Vec<u8>>, Option<ListCursor>)> {
        let (position, keys) = self
            .scan_step(nodes.get(cursor.node), cursor.position, count.max(1))
            .await?;
        let next = match position {
            0 if cursor.node + 1 < nodes.len() => Some(ListCursor {
                node: cursor.node + 1,
                position: 0,
            }),
            0 => None,
            position => Some(ListCursor {
                node: cursor.node,
                position,
            }),
        };
        Ok((keys, next))
    }

    /// A page of records decoded from their keys (those gone since the scan left out).
    async fn read_page(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Listed>> {
        let fetched = self.fetch(keys).await?;
        Ok(fetched.iter().filter_map(|f| self.decode(f)).collect())
    }

    /// One page of a listing that a caller resumes by cursor.
    pub(super) async fn list_from(
        &self,
        cursor: Option<ListCursor>,
        page_size: usize,
    ) -> Result<ListPage> {
        let nodes = self.scan_nodes().await?;
        let (keys, next) = self
            .scan_from(&nodes, &cursor.unwrap_or_default(), page_size)
            .await?;
        Ok(ListPage {
            items: self.read_page(keys).await?,
            next,
        })
    }

    /// Every record, a page per `SCAN` step, read [`READ_AHEAD`] pages ahead of the caller.
    pub(super) fn scan_pages(
        &self,
        page_size: usize,
    ) -> impl Stream<Item = Result<Vec<Listed>>> + Send + '_ {
        let steps = futures::stream::try_unfold(ScanState::Start, move |state| async move {
            let (nodes, cursor) = match state {
                ScanState::Done => return Ok(None),
                ScanState::Start => (self.scan_nodes().await?, ListCursor::default()),
                ScanState::At(nodes, cursor) => (nodes, cursor),
            };
            let (keys, next) = self.scan_from(&nodes, &cursor, page_size).await?;
            let state = match next {
                Some(cursor) => ScanState::At(nodes, cursor),
                None => ScanState::Done,
            };
            Ok(Some((keys, state)))
        });
        steps
            .map_ok(move |keys| self.read_page(keys))
            .try_buffered(READ_AHEAD)
    }

    /// One `SCAN` step on one node: (next cursor, keys).
    async fn scan_step(
        &self,
        node: Option<&ScanNode>,
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
