//! The listening streams of sessions, so that a replay reopens them at once.
//!
//! A server sends notifications outside any request (resource updates, list changes, logs) on
//! the session's listening (GET) stream; a notification sent while no such stream is open is
//! lost. When a request replays a session's handshake to a restarted upstream, the listening
//! stream's relay is woken to reopen its upstream stream at once, and the request waits (briefly)
//! until it has, before it is sent: what the request causes the server to announce then finds a
//! stream to go to.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::store::SessionId;

/// The longest a replayed request waits for the session's listening stream to reopen.
pub const REOPEN_WAIT: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct ListeningStreams {
    by_session: Mutex<HashMap<SessionId, Arc<Slot>>>,
}

struct Slot {
    /// Wakes the relay out of its reconnect backoff.
    wake: Notify,
    /// Counts the upstream streams the relay opened.
    opened: watch::Sender<u64>,
    relays: std::sync::atomic::AtomicUsize,
}

/// A relay's place in [`ListeningStreams`] for as long as it lives.
pub struct Registration {
    streams: Arc<ListeningStreams>,
    id: SessionId,
    slot: Arc<Slot>,
}

impl ListeningStreams {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Arc<Slot>>> {
        self.by_session.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(self: &Arc<Self>, id: &SessionId) -> Registration {
        // Counted under the lock, which the last registration's drop takes to remove the slot.
        let mut slots = self.slots();
        let slot = slots
            .entry(id.clone())
            .or_insert_with(|| {
                Arc::new(Slot {
                    wake: Notify::new(),
                    opened: watch::Sender::new(0),
                    relays: Default::default(),
                })
            })
            .clone();
        slot.relays
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        drop(slots);
        Registration {
            streams: self.clone(),
            id: id.clone(),
            slot,
        }
    }

    /// Wakes the session's listening relays and waits until one has opened a new upstream
    /// stream, or [`REOPEN_WAIT`]; at once if the session has none.
    pub async fn reopen(&self, id: &SessionId) {
        let Some(slot) = self.slots().get(id).cloned() else {
            return;
        };
        let mut opened = slot.opened.subscribe();
        let seen = *opened.borrow_and_update();
        slot.wake.notify_one();
        let _ = tokio::time::timeout(REOPEN_WAIT, opened.wait_for(|n| *n > seen)).await;
    }
}

impl Registration {
    /// Resolves when a replay asks the relay to reopen its upstream stream.
    pub async fn woken(&self) {
        self.slot.wake.notified().await;
    }

    /// The relay opened a new upstream stream.
    pub fn opened(&self) {
        self.slot.opened.send_modify(|n| *n += 1);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut slots = self.streams.slots();
        if self
            .slot
            .relays
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            slots.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_replay_waits_for_the_relay_to_reopen() {
        let streams = Arc::new(ListeningStreams::default());
        let id = SessionId::random();
        // No relay: nothing to wait for.
        tokio::time::timeout(Duration::from_millis(100), streams.reopen(&id))
            .await
            .expect("returns at once");
        let registration = streams.register(&id);
        let relay = tokio::spawn(async move {
            registration.woken().await;
            registration.opened();
            registration
        });
        tokio::time::timeout(Duration::from_secs(1), streams.reopen(&id))
            .await
            .expect("the relay reopened");
        drop(relay.await.expect("relay"));
        assert!(
            streams.slots().is_empty(),
            "the last relay removes its slot"
        );
    }
}
