//! Debounced touches: a busy session costs at most one store write per interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Result, SessionId, SessionStore, Touch};

/// Entries older than this many intervals are forgotten when the map is trimmed.
const TRIM_AFTER_INTERVALS: u32 = 4;
const TRIM_EVERY: usize = 4096;

/// Sits in front of [`SessionStore::touch`] on a request path. The TTL only has to slide, not be
/// exact to the millisecond, so a touch within `interval` of the last written one is skipped.
pub struct DebouncedToucher {
    store: Arc<dyn SessionStore>,
    interval: Duration,
    last_written: Mutex<HashMap<SessionId, Instant>>,
}

/// What a debounced touch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touched {
    /// Written recently; nothing sent.
    Skipped,
    /// Written; the session exists.
    Written,
    /// Written; the session exists and is marked draining.
    Draining,
    /// Written, and the store no longer has the session.
    Gone,
}

impl DebouncedToucher {
    pub fn new(store: Arc<dyn SessionStore>, interval: Duration) -> Self {
        Self {
            store,
            interval,
            last_written: Mutex::new(HashMap::new()),
        }
    }

    pub async fn touch(&self, id: &SessionId, owner_pod: Option<&str>) -> Result<Touched> {
        let now = Instant::now();
        if !self.due(id, now) {
            return Ok(Touched::Skipped);
        }
        let result = self.store.touch(id, owner_pod).await;
        let mut last = self.lock();
        match result {
            Ok(touch @ (Touch::Active | Touch::Draining)) => {
                last.insert(id.clone(), now);
                Ok(if touch == Touch::Draining {
                    Touched::Draining
                } else {
                    Touched::Written
                })
            }
            Ok(Touch::Gone) => {
                last.remove(id);
                Ok(Touched::Gone)
            }
            Err(e) => {
                // Let the next request try again instead of waiting out the interval.
                last.remove(id);
                Err(e)
            }
        }
    }

    /// Forget a session (deleted, or handed to another pod) so its next touch is written.
    pub fn forget(&self, id: &SessionId) {
        self.lock().remove(id);
    }

    fn due(&self, id: &SessionId, now: Instant) -> bool {
        let mut last = self.lock();
        if last.len() >= TRIM_EVERY && last.len().is_power_of_two() {
            let horizon = self.interval * TRIM_AFTER_INTERVALS;
            last.retain(|_, at| now.duration_since(*at) < horizon);
        }
        match last.get(id) {
            Some(at) if now.duration_since(*at) < self.interval => false,
            _ => {
                // Claim the slot now so concurrent requests of one session send one touch.
                last.insert(id.clone(), now);
                true
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Instant>> {
        // A panic while holding this lock leaves only timestamps behind: safe to keep using.
        self.last_written
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
