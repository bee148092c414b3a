//! Rollout tracking: a new revision among the selected pods starts a rollout, all pods on it and
//! ready finishes it; its counts are the differences of the store's tallies (reported by the
//! proxies, docs/redis-schema.md) from when it started (docs/rollouts.md).

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use crate::api::{RolloutBaseline, RolloutStatus, pod};
use crate::store::Tallies;

/// The store's tallies at this count, and at the count before it (`None` for the first since
/// the operator started). A rollout is seen only at a count, and what the proxies reported
/// since the previous one may already be its own (an old pod that went before the count that
/// saw the new revision): it counts from the previous count's tallies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tallied {
    pub now: Tallies,
    pub before: Option<Tallies>,
}

fn baseline(tallies: Tallies) -> RolloutBaseline {
    RolloutBaseline {
        drained: tallies.drained,
        rehydrated: tallies.rehydrated,
        lost: tallies.lost,
    }
}

/// Labels naming a pod's revision: Deployments (through ReplicaSets), then StatefulSets and
/// DaemonSets.
const REVISION_LABELS: [&str; 2] = ["pod-template-hash", "controller-revision-hash"];

/// A pod's revision label.
pub fn revision(pod: &Pod) -> Option<&str> {
    let labels = pod.metadata.labels.as_ref()?;
    REVISION_LABELS
        .iter()
        .find_map(|label| labels.get(*label).map(String::as_str))
}

/// The revision being rolled out: the one whose first live pod appeared last. By group, not
/// by the newest pod: an old revision's pod recreated mid-rollout (an eviction) is not a new
/// revision. Creation times have second resolution; of revisions that appeared in the same
/// second, the one already being rolled out (`tracked`) stays so (it outgrows the old one as
/// the rollout goes on), else the one with fewer pods is the one surging in.
fn newest_revision<'a>(live: &[&'a Arc<Pod>], tracked: Option<&str>) -> Option<&'a str> {
    let mut first_seen: std::collections::BTreeMap<
        &str,
        (Option<k8s_openapi::jiff::Timestamp>, usize),
    > = std::collections::BTreeMap::new();
    for pod in live {
        let Some(revision) = revision(pod) else {
            continue;
        };
        let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let entry = first_seen.entry(revision).or_insert((created, 0));
        entry.0 = entry.0.min(created);
        entry.1 += 1;
    }
    first_seen
        .into_iter()
        .max_by_key(|(revision, (created, pods))| {
            (
                *created,
                Some(*revision) == tracked,
                std::cmp::Reverse(*pods),
            )
        })
        .map(|(revision, _)| revision)
}

/// The rollout status after looking at `pods` now; `tallies` is `None` when the store could not
/// be read (counts then stay as they were); `lingering`: the rollout finished so recently that
/// its counts go on (schedule.rs).
pub fn track(
    previous: Option<&RolloutStatus>,
    pods: &[Arc<Pod>],
    tallies: Option<Tallied>,
    now: &str,
    lingering: bool,
) -> Option<RolloutStatus> {
    let live: Vec<&Arc<Pod>> = pods.iter().filter(|p| !pod::is_terminating(p)).collect();
    let current = newest_revision(&live, previous.map(|p| p.revision.as_str()))?;
    let revisions: BTreeSet<&str> = pods.iter().filter_map(|p| revision(p)).collect();
    let settled = revisions.len() == 1 && live.iter().all(|p| pod::is_ready(p));
    let mut rollout = match previous {
        Some(previous) if previous.revision == current => previous.clone(),
        // A new revision next to an old one: a rollout starts.
        _ if revisions.len() > 1 => RolloutStatus {
            revision: current.to_owned(),
            started_at: Some(now.to_owned()),
            baseline: tallies.map(|t| baseline(t.before.unwrap_or(t.now))),
            ..Default::default()
        },
        // Nothing rolling (or a revision that replaced every pod unseen): nothing to report.
        _ => return previous.cloned(),
    };
    // Counting goes on after the pods settle until every session the rollout drained is
    // accounted for (the clients of the last old pod come back after it is gone), and for a
    // while in any case (a gateway moves a session at its client's next request).
    let accounted = rollout.rehydrated + rollout.lost >= rollout.drained;
    if rollout.finished_at.is_none() || !accounted || lingering {
        let tallies = tallies.map(|t| t.now);
        if let (Some(tallies), Some(baseline)) = (tallies, &rollout.baseline) {
            rollout.drained = tallies.drained.saturating_sub(baseline.drained);
            rollout.rehydrated = tallies.rehydrated.saturating_sub(baseline.rehydrated);
            rollout.lost = tallies.lost.saturating_sub(baseline.lost);
        } else if let Some(tallies) = tallies {
            // Started while the store was unreachable: count from now on.
            rollout.baseline = Some(baseline(tallies));
        }
    }
    if rollout.finished_at.is_none() && settled {
        rollout.finished_at = Some(now.to_owned());
    }
    Some(rollout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, hash: &str, created: &str, ready: bool, terminating: bool) -> Arc<Pod> {
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": "api", "pod-template-hash": hash},
                         "creationTimestamp": created},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        }))
        .unwrap();
        if terminating {
            pod.metadata.deletion_timestamp = pod.metadata.creation_timestamp.clone();
        }
        Arc::new(pod)
    }

    fn tallies(drained: u64, rehydrated: u64, lost: u64) -> Option<Tallied> {
        Some(Tallied {
            now: Tallies {
                drained,
                rehydrated,
                lost,
            },
            before: None,
        })
    }

    #[test]
    fn a_rollout_starts_counts_and_finishes() {
        let old = [
            pod("a", "v1", "2026-11-25T10:00:00Z", true, false),
            pod("b", "v1", "2026-11-25T10:00:00Z", true, false),
        ];
        assert_eq!(
            track(None, &old, tallies(5, 5, 0), "t0", false),
            None,
            "steady"
        );

        let rolling = [
            old[0].clone(),
            pod("b", "v1", "2026-11-25T10:00:00Z", true, true),
            pod("c", "v2", "2026-11-25T11:00:00Z", false, false),
        ];
        let started = track(None, &rolling, tallies(5, 5, 0), "t1", false).unwrap();
        assert_eq!(started.revision, "v2");
        assert_eq!(started.started_at.as_deref(), Some("t1"));
        assert_eq!(
            (started.drained, started.rehydrated, started.lost),
            (0, 0, 0)
        );

        let counted = track(Some(&started), &rolling, tallies(9, 8, 1), "t2", false).unwrap();
        assert_eq!(
            (counted.drained, counted.rehydrated, counted.lost),
            (4, 3, 1)
        );
        assert_eq!(counted.finished_at, None);

        let done = [
            pod("c", "v2", "2026-11-25T11:00:00Z", true, false),
            pod("d", "v2", "2026-11-25T11:01:00Z", true, false),
        ];
        // The pods settled while two drained sessions wait for their clients.
        let finished = track(Some(&counted), &done, tallies(10, 8, 1), "t3", false).unwrap();
        assert_eq!(finished.finished_at.as_deref(), Some("t3"));
        assert_eq!(
            (finished.drained, finished.rehydrated, finished.lost),
            (5, 3, 1)
        );
        // They come back: still this rollout's; then all are accounted for and it is frozen,
        // whatever happens to the tallies later.
        let accounted = track(Some(&finished), &done, tallies(10, 10, 1), "t4", false).unwrap();
        assert_eq!(
            (accounted.drained, accounted.rehydrated, accounted.lost),
            (5, 5, 1)
        );
        assert_eq!(accounted.finished_at.as_deref(), Some("t3"));
        let later = track(Some(&accounted), &done, tallies(20, 20, 2), "t5", false).unwrap();
        assert_eq!(later, accounted);
        // Unless it lingers: then what its gateways move meanwhile still counts.
        let lingering = track(Some(&accounted), &done, tallies(12, 12, 1), "t5", true).unwrap();
        assert_eq!(
            (lingering.drained, lingering.rehydrated, lingering.lost),
            (7, 7, 1)
        );
        assert_eq!(lingering.finished_at.as_deref(), Some("t3"));

        // The store unreadable for a while: counts stay.
        assert_eq!(
            track(Some(&counted), &rolling, None, "t5", false)
                .unwrap()
                .drained,
            4
        );
    }

    /// The count that first sees the new revision may come after an old pod went (the
    /// operator busy, or the pod events debounced): what the proxies reported since the count
    /// before is the rollout's.
    #[test]
    fn a_rollout_counts_from_the_count_before_it_was_seen() {
        let rolling = [
            pod("a", "v1", "2026-11-25T10:00:00Z", true, true),
            pod("c", "v2", "2026-11-25T11:00:00Z", true, false),
        ];
        let seen_late = Some(Tallied {
            now: Tallies {
                drained: 7,
                rehydrated: 6,
                lost: 0,
            },
            before: Some(Tallies {
                drained: 5,
                rehydrated: 5,
                lost: 0,
            }),
        });
        let started = track(None, &rolling, seen_late, "t1", false).unwrap();
        assert_eq!(
            (started.drained, started.rehydrated, started.lost),
            (2, 1, 0)
        );
        assert_eq!(
            started.baseline,
            Some(RolloutBaseline {
                drained: 5,
                rehydrated: 5,
                lost: 0
            })
        );
        // The first count since the operator started has no count before it.
        let first = track(None, &rolling, tallies(7, 6, 0), "t1", false).unwrap();
        assert_eq!((first.drained, first.rehydrated), (0, 0));
    }

    #[test]
    fn the_new_revision_is_the_group_that_appeared_last() {
        let live = [
            pod("a", "v1", "2026-11-25T10:00:00Z", true, false),
            pod("c", "v2", "2026-11-25T11:00:00Z", false, false),
            // An old pod recreated after the new revision appeared.
            pod("b", "v1", "2026-11-25T11:00:05Z", true, false),
        ];
        let refs: Vec<&Arc<Pod>> = live.iter().collect();
        assert_eq!(newest_revision(&refs, None), Some("v2"));
        // Same second: the revision with fewer pods is the one surging in.
        let tied = [
            pod("a", "v1", "2026-11-25T10:00:00Z", true, false),
            pod("b", "v1", "2026-11-25T10:00:00Z", true, false),
            pod("c", "v2", "2026-11-25T10:00:00Z", false, false),
        ];
        let refs: Vec<&Arc<Pod>> = tied.iter().collect();
        assert_eq!(newest_revision(&refs, None), Some("v2"));
        // Later in that rollout the new revision has more pods than the old: it stays the one
        // being rolled out (this flipped the tracked revision back, once, in a test).
        let later = [
            pod("b", "v1", "2026-11-25T10:00:00Z", true, false),
            pod("c", "v2", "2026-11-25T10:00:00Z", true, false),
            pod("d", "v2", "2026-11-25T10:00:09Z", false, false),
        ];
        let refs: Vec<&Arc<Pod>> = later.iter().collect();
        assert_eq!(newest_revision(&refs, Some("v2")), Some("v2"));
    }

    #[test]
    fn pods_without_a_revision_report_nothing() {
        let bare: Pod = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
        assert_eq!(
            track(None, &[Arc::new(bare)], tallies(1, 1, 1), "t", false),
            None
        );
        assert_eq!(track(None, &[], None, "t", false), None);
    }
}
