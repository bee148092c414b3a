//! One Redis connection per URL, shared by every policy that uses it.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::store::{RedisStore, RedisTarget, Result};

#[derive(Default)]
pub struct StorePool {
    connections: Mutex<HashMap<(String, bool), RedisStore>>,
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
}
