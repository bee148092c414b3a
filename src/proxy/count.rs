//! A count that can be waited on: requests in flight, open connections. Each unit is a guard,
//! so a future dropped mid-way (its client went away) cannot leak one, and a drain waits for
//! zero without polling.

use std::time::Instant;

use tokio::sync::watch;

#[derive(Clone)]
pub struct Count(watch::Sender<usize>);

impl Default for Count {
    fn default() -> Self {
        Self(watch::Sender::new(0))
    }
}

impl Count {
    /// Counts one until the returned guard drops.
    pub fn enter(&self) -> Counted {
        self.0.send_modify(|n| *n += 1);
        Counted(self.0.clone())
    }

    pub fn get(&self) -> usize {
        *self.0.borrow()
    }

    /// Waits until the count is zero; false if `deadline` comes first.
    pub async fn zero_by(&self, deadline: Instant) -> bool {
        let mut count = self.0.subscribe();
        let zero = count.wait_for(|n| *n == 0);
        matches!(
            tokio::time::timeout_at(deadline.into(), zero).await,
            Ok(Ok(_))
        )
    }
}

/// One unit of a [`Count`], for as long as it lives.
pub struct Counted(watch::Sender<usize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_count_is_zero_once_every_guard_has_dropped() {
        let count = Count::default();
        let (first, second) = (count.enter(), count.enter());
        assert_eq!(count.get(), 2);
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(!count.zero_by(soon).await, "two are counted");
        drop(first);
        let waiting = tokio::spawn({
            let count = count.clone();
            async move { count.zero_by(Instant::now() + Duration::from_secs(5)).await }
        });
        drop(second);
        assert!(waiting.await.unwrap());
        assert_eq!(count.get(), 0);
    }

    #[tokio::test]
    async fn a_guard_dropped_with_its_future_is_uncounted() {
        let count = Count::default();
        let task = tokio::spawn({
            let count = count.clone();
            async move {
                let _counted = count.enter();
                std::future::pending::<()>().await;
            }
        });
        while count.get() == 0 {
            tokio::task::yield_now().await;
        }
        task.abort();
        let _ = task.await;
        assert!(count.zero_by(Instant::now() + Duration::from_secs(1)).await);
    }
}
