//! The one backoff of the proxy's retry loops: pauses that double from a first one up to a
//! ceiling, within a deadline (a request is held, and retried, for the hold time at most).

use std::time::{Duration, Instant};

/// A request held while the upstream does not answer: a restart is short, so tried again soon.
pub const HOLD: Backoff = Backoff::new(Duration::from_millis(25), Duration::from_millis(500));

/// Everything else tried again (the store, a stream's reconnection, a request resent).
pub const RETRY: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));

/// A listening stream the upstream keeps ending as soon as it opens: not hammered, but a replay
/// cuts the pause short.
pub const REOPEN: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(3200));

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    next: Duration,
    ceiling: Duration,
    deadline: Option<Instant>,
}

impl Backoff {
    /// Pauses from `first`, doubling up to `ceiling`, without a deadline.
    pub const fn new(first: Duration, ceiling: Duration) -> Self {
        Self {
            next: first,
            ceiling,
            deadline: None,
        }
    }

    /// The same, with no pause that ends past `deadline`.
    pub const fn until(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The next pause, or `None` where it would end past the deadline.
    pub fn next_pause(&mut self) -> Option<Duration> {
        let pause = self.next;
        if self
            .deadline
            .is_some_and(|deadline| Instant::now() + pause > deadline)
        {
            return None;
        }
        self.next = (self.next * 2).min(self.ceiling);
        Some(pause)
    }

    /// Sleeps the next pause; false (at once) where it would end past the deadline.
    pub async fn wait(&mut self) -> bool {
        match self.next_pause() {
            Some(pause) => {
                tokio::time::sleep(pause).await;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn pauses_double_up_to_the_ceiling() {
        let mut backoff = Backoff::new(50 * MS, 300 * MS);
        let pauses: Vec<_> = (0..5).map(|_| backoff.next_pause().unwrap()).collect();
        assert_eq!(pauses, [50 * MS, 100 * MS, 200 * MS, 300 * MS, 300 * MS]);
    }

    #[test]
    fn no_pause_ends_past_the_deadline() {
        let mut backoff = Backoff::new(50 * MS, 1000 * MS).until(Instant::now() + 120 * MS);
        assert_eq!(backoff.next_pause(), Some(50 * MS));
        // 100 ms more would still fit only if no time had passed: the deadline is absolute.
        let second = backoff.next_pause();
        assert!(second.is_none() || second == Some(100 * MS));
        assert_eq!(backoff.next_pause(), None, "200 ms cannot fit in 120");
    }
}
