//! One Redis connection per URL, shared by every policy that uses it, and when each store was
//! last pruned.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::store::{RedisStore, RedisTarget, Result};

#[derive(Default)]
pub struct StorePool {
    connections: Mutex<HashMap<(String, bool), RedisStore>>,
    /// When each store (Redis URL, key prefix) was last pruned.
    pruned: std::sync::Mutex<HashMap<(String, String), Instant>>,
}

impl StorePool {
    /// A store for `prefix` on the Redis at `url`, connecting on first use. A failed connection
    /// is not cached, so the next reconcile tries again.
    pub async fn store(
        &self,
        url: &str,
        cluster: bool,
        prefix: &str,
        ttl: Duration,
    ) -> Result<RedisStore> {
        let key = (url.to_owned(), cluster);
        if let Some(base) = self.connections.lock().await.get(&key) {
            return base.with_prefix(prefix, ttl);
        }
        // Connect without the lock: an unreachable Redis must not stall policies on other ones.
        let target = RedisTarget::parse(url)?.cluster(cluster);
        let base = RedisStore::connect(target, prefix, ttl).await?;
        let store = base.with_prefix(prefix, ttl)?;
        // A concurrent reconcile may have connected too; either connection serves.
        self.connections.lock().await.entry(key).or_insert(base);
        Ok(store)
    }

    /// Whether the store of `prefix` at `url` is due a prune at `now`, pruned once per
    /// `interval`; a store that is due is marked pruned at once, so that concurrent reconciles
    /// of policies sharing it prune once.
    pub fn prune_due(&self, url: &str, prefix: &str, interval: Duration, now: Instant) -> bool {
        let mut pruned = self.pruned.lock().unwrap_or_else(|p| p.into_inner());
        let key = (url.to_owned(), prefix.to_owned());
        match pruned.get(&key) {
            Some(at) if now.duration_since(*at) < interval => false,
            _ => {
                pruned.insert(key, now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_is_pruned_once_per_interval_and_each_store_on_its_own() {
        let (pool, every) = (StorePool::default(), Duration::from_secs(300));
        let due = |url, prefix, at| pool.prune_due(url, prefix, every, at);
        let start = Instant::now();
        assert!(due("redis://a", "mcp:", start), "first look");
        assert!(!due("redis://a", "mcp:", start), "a policy sharing it");
        assert!(due("redis://a", "other:", start), "another prefix");
        assert!(due("redis://b", "mcp:", start), "another Redis");
        assert!(!due(
            "redis://a",
            "mcp:",
            start + every - Duration::from_secs(1)
        ));
        assert!(due("redis://a", "mcp:", start + every));
    }
}
