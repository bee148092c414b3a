//! A count that can be waited on: requests in flight, open connections. Each unit is a guard,
//! so a future dropped mid-way (its client went away) cannot leak one, and a drain waits for
//! zero without polling.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::Notify;

/// Every request enters and leaves one: an atomic, and a wake-up only when the count reaches
/// zero (a watch channel would take its lock and wake its subscribers on every change).
#[derive(Clone, Default)]
pub struct Count(Arc<Shared>);

#[derive(Default)]
struct Shared {
    count: AtomicUsize,
    /// Every unit ever counted: whether one came and went meanwhile.
    entered: AtomicU64,
    zero: Notify,
}

impl Count {
    /// Counts one until the returned guard drops.
    pub fn enter(&self) -> Counted {
        self.0.count.fetch_add(1, Ordering::AcqRel);
        self.0.entered.fetch_add(1, Ordering::AcqRel);
        Counted(self.0.clone())
    }

    /// How many units were ever counted.
    pub fn entered(&self) -> u64 {
        self.0.entered.load(Ordering::Acquire)
    }

    pub fn get(&self) -> usize {
        self.0.count.load(Ordering::Acquire)
    }

    /// Waits until the count is zero; false if `deadline` comes first.
    pub async fn zero_by(&self, deadline: Instant) -> bool {
        tokio::time::timeout_at(deadline.into(), self.zero())
            .await
            .is_ok()
    }

    /// Waits until the count is zero.
    pub async fn zero(&self) {
        loop {
            // Registered before the check, so a guard dropped in between still wakes it.
            let notified = self.0.zero.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One unit of a [`Count`], for as long as it lives.
pub struct Counted(Arc<Shared>);

impl Drop for Counted {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.zero.notify_waiters();
        }
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
