//! When a policy is counted again: every `requeue` (jittered), every second while a rollout is
//! under way.

use std::time::Duration;

use crate::api::RolloutStatus;

/// How often a rollout under way is re-counted: the guard can pause it only at a reconcile,
/// and each second it waits lets more clients reach the new version and lose their sessions.
const ROLLOUT_REQUEUE: Duration = Duration::from_secs(1);
/// For how long after its start a rollout is re-counted that often: one that stalls (paused by
/// hand, never becoming ready) goes back to the usual period.
const ROLLOUT_WATCH: Duration = Duration::from_secs(600);

/// For how long after its pods settle a rollout's counts go on: in gateway mode a session moves
/// off an old pod (drained and rehydrated at once) only at its client's next request.
const ROLLOUT_LINGER: Duration = Duration::from_secs(30);

/// How long ago `at` (RFC 3339) was; `None` for a time that is not one, or in the future.
fn age(at: Option<&str>, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let at = chrono::DateTime::parse_from_rfc3339(at?).ok()?;
    (now - at.to_utc()).to_std().ok()
}

/// Whether `rollout` finished less than [`ROLLOUT_LINGER`] ago: its counts still go on.
pub(super) fn lingering(
    rollout: Option<&RolloutStatus>,
    now: chrono::DateTime<chrono::Utc>,
) -> bool {
    rollout.is_some_and(|rollout| {
        age(rollout.finished_at.as_deref(), now).is_some_and(|age| age < ROLLOUT_LINGER)
    })
}

/// When to re-count a policy that was counted: soon while its last rollout is under way (begun
/// in the last [`ROLLOUT_WATCH`], not finished, not paused) or lingering, else every `requeue`.
pub(super) fn requeue_after(
    last_rollout: Option<&RolloutStatus>,
    requeue: Duration,
    now: chrono::DateTime<chrono::Utc>,
) -> Duration {
    let under_way = last_rollout.is_some_and(|rollout| {
        let recent = age(rollout.started_at.as_deref(), now).is_some_and(|age| age < ROLLOUT_WATCH);
        recent && rollout.finished_at.is_none() && rollout.paused_at.is_none()
    });
    if under_way || lingering(last_rollout, now) {
        requeue.min(ROLLOUT_REQUEUE)
    } else {
        requeue
    }
}

/// `period` ± 10 %, so that policies created together do not all re-count at the same instant.
pub(super) fn jittered(period: Duration) -> Duration {
    period.mul_f64(rand::random_range(0.9..1.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rollout_under_way_is_recounted_every_second() {
        let every = Duration::from_secs(15);
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-30T00:00:30Z")
            .unwrap()
            .to_utc();
        let at = |time: &str| Some(format!("2026-11-30T{time}Z"));
        let under_way = RolloutStatus {
            started_at: at("00:00:00"),
            ..Default::default()
        };
        let due = |rollout: &RolloutStatus, period| requeue_after(Some(rollout), period, now);
        assert_eq!(requeue_after(None, every, now), every);
        assert_eq!(due(&under_way, every), ROLLOUT_REQUEUE);
        // A shorter configured period stays.
        let short = Duration::from_millis(500);
        assert_eq!(due(&under_way, short), short);
        // Finished 10 s ago: its counts linger, re-counted every second; 30 s ago: done.
        let finished = |time| RolloutStatus {
            finished_at: at(time),
            ..under_way.clone()
        };
        assert_eq!(due(&finished("00:00:20"), every), ROLLOUT_REQUEUE);
        assert!(lingering(Some(&finished("00:00:20")), now));
        assert!(!lingering(Some(&finished("00:00:00")), now));
        for done in [
            finished("00:00:00"),
            RolloutStatus {
                paused_at: at("00:00:05"),
                ..under_way.clone()
            },
            // Stalled: begun longer ago than the watch.
            RolloutStatus {
                started_at: Some("2026-11-29T23:40:00Z".into()),
                ..under_way.clone()
            },
            RolloutStatus {
                started_at: Some("not a time".into()),
                ..under_way.clone()
            },
        ] {
            assert_eq!(due(&done, every), every, "{done:?}");
        }
    }
}
