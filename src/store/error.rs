//! Store errors: what went wrong, where, in words an operator can act on.

use serde::Serialize;

/// A record under the prefix that could not be read. Reported and counted, never deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("record {key}: {reason}")]
pub struct UnreadableRecord {
    /// The Redis key, lossily decoded if it is not UTF-8.
    pub key: String,
    pub reason: UnreadableReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", content = "detail", rename_all = "camelCase")]
pub enum UnreadableReason {
    #[error("key is not UTF-8")]
    KeyNotUtf8,
    #[error("key does not end in a valid session id: {0}")]
    InvalidId(String),
    #[error("value is {bytes} bytes, over the {limit}-byte limit")]
    Oversize { bytes: u64, limit: u64 },
    #[error("key holds a Redis {0}, not a string")]
    WrongType(String),
    #[error("{0}")]
    Malformed(String),
}

impl UnreadableReason {
    /// A short stable name, for grouping in `stats`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::KeyNotUtf8 => "keyNotUtf8",
            Self::InvalidId(_) => "invalidId",
            Self::Oversize { .. } => "oversize",
            Self::WrongType(_) => "wrongType",
            Self::Malformed(_) => "malformed",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid Redis URL {url}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("invalid key prefix {prefix:?}: {reason}")]
    InvalidPrefix { prefix: String, reason: String },
    #[error("cannot read the Redis CA file {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    /// Redis cannot be reached (refused, timed out, connection dropped).
    #[error("cannot reach Redis at {url}: {source}")]
    Unavailable {
        url: String,
        source: redis::RedisError,
    },
    /// Redis is at its `maxmemory` with the `noeviction` policy: it refuses every write.
    #[error(
        "Redis at {url} is full and refuses writes (maxmemory reached, policy noeviction): raise its maxmemory or free memory"
    )]
    Full { url: String },
    /// Something answers at the address, but not in the Redis protocol.
    #[error("the server at {url} does not speak the Redis protocol: is this the Redis port?")]
    NotRedis { url: String },
    /// Redis has not been reached yet; the next attempt is due shortly.
    #[error("not connected to Redis at {url} yet")]
    NotConnected { url: String },
    /// Redis answered, with an error.
    #[error("Redis at {url} failed: {source}")]
    Redis {
        url: String,
        source: redis::RedisError,
    },
    #[error(transparent)]
    Unreadable(#[from] UnreadableRecord),
    #[error(
        "session {id} kept changing under concurrent writers; gave up after {attempts} attempts"
    )]
    Contended { id: String, attempts: u32 },
}

impl StoreError {
    /// Whether retrying later may help (Redis down or busy), as opposed to bad input or data.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. } | Self::NotConnected { .. } | Self::Contended { .. }
        )
    }

    pub(crate) fn from_redis(url: &str, source: redis::RedisError) -> Self {
        let url = url.to_owned();
        let unreachable = source.is_io_error()
            || source.is_timeout()
            || source.is_connection_dropped()
            || source.is_connection_refusal()
            || source.is_unrecoverable_error()
            // Up but not serving yet: loading its data after a restart (LOADING), a Cluster
            // that is failing over (TRYAGAIN, CLUSTERDOWN, MASTERDOWN). An outage like any
            // other: a proxy starting meanwhile must come up and serve from memory.
            || matches!(source.retry_method(), redis::RetryMethod::WaitAndRetry);
        match (unreachable, source.kind()) {
            // An answer the client could not parse, on connecting: an HTTP server, say.
            (true, redis::ErrorKind::Parse) => Self::NotRedis { url },
            (true, _) => Self::Unavailable { url, source },
            (false, _) if source.code() == Some("OOM") => Self::Full { url },
            (false, _) => Self::Redis { url, source },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redis_that_is_not_serving_yet_is_an_outage() {
        // As the server sends them.
        let server = |line: &str| {
            redis::parse_redis_value(format!("-{line}\r\n").as_bytes())
                .and_then(redis::Value::extract_error)
                .expect_err("an error reply")
        };
        for code in ["LOADING", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN"] {
            let error = StoreError::from_redis("redis://r", server(&format!("{code} not now")));
            assert!(error.is_transient(), "{code}: {error:?}");
        }
        let refused = StoreError::from_redis("redis://r", server("ERR unknown command"));
        assert!(!refused.is_transient(), "{refused:?}");
    }
}
