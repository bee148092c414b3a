//! Waiting on what a test waits for, never on a clock: poll until it holds, and on a timeout
//! say what was awaited and what was last seen.

use std::time::{Duration, Instant};

/// Polls `condition` every 100 ms until it holds; panics naming `what` after `timeout`.
pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_until(timeout, what, || {
        let holds = condition();
        async move {
            if holds.await {
                Ok(())
            } else {
                Err(String::new())
            }
        }
    })
    .await;
}

/// Polls `look` every 100 ms until it finds what it looks for (`Ok`), and returns that; after
/// `timeout`, panics naming `what` and what the last look saw instead (its `Err`, if not empty).
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut look: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let seen = match look().await {
            Ok(found) => return found,
            Err(seen) if seen.is_empty() => seen,
            Err(seen) => format!("; last seen: {seen}"),
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}{seen}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
