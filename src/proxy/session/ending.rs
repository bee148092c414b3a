//! Sessions whose client is ending them (`DELETE`), while their server forgets them.
//!
//! Both SDKs' servers end a session's streams before they answer its `DELETE`, so the
//! listening stream's relay reopens it while the `DELETE` is still on its way back, and meets
//! a server that forgot the session. That is the session's end, not a loss to count (drain
//! strategy `Wait`) nor a restart to replay.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};

use crate::store::SessionId;

#[derive(Default)]
pub(in crate::proxy) struct Ending(Mutex<HashSet<SessionId>>);

/// A session in [`Ending`], until dropped.
pub(in crate::proxy) struct EndingGuard<'a> {
    ending: &'a Ending,
    id: SessionId,
}

impl Ending {
    pub(in crate::proxy) fn enter(&self, id: &SessionId) -> EndingGuard<'_> {
        self.lock().insert(id.clone());
        EndingGuard {
            ending: self,
            id: id.clone(),
        }
    }

    pub(in crate::proxy) fn contains(&self, id: &SessionId) -> bool {
        self.lock().contains(id)
    }

    fn lock(&self) -> MutexGuard<'_, HashSet<SessionId>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for EndingGuard<'_> {
    fn drop(&mut self) {
        self.ending.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_ending_while_its_guard_lives() {
        let ending = Ending::default();
        let id = SessionId::random();
        {
            let _guard = ending.enter(&id);
            assert!(ending.contains(&id));
        }
        assert!(!ending.contains(&id));
    }
}
