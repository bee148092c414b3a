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
        let mut connections = self.connections.lock().await;
        if let Some(base) = connections.get(&key) {
            return base.with_prefix(prefix, ttl);
        }
        let target = RedisTarget::parse(url)?.cluster(cluster);
        let base = RedisStore::connect(target, prefix, ttl).await?;
        let store = base.with_prefix(prefix, ttl)?;
        connections.insert(key, base);
        Ok(store)
    }
}
