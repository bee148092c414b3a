//! What the operator keeps of each policy from one reconcile to the next, forgotten when the
//! policy is deleted.

use std::collections::HashMap;
use std::sync::Mutex;

use kube::runtime::reflector::ObjectRef;

use crate::api::{McpSessionPolicy, McpSessionPolicyStatus};
use crate::store::Tallies;

type PolicyRef = ObjectRef<McpSessionPolicy>;

#[derive(Default)]
pub(super) struct PolicyMemory(Mutex<HashMap<PolicyRef, Remembered>>);

#[derive(Default)]
struct Remembered {
    /// The status last written. The policy in the reflector can lag behind our own writes:
    /// transitions (Events) and last-known counts are judged against this instead.
    status: Option<McpSessionPolicyStatus>,
    /// The store's tallies at the last count: the operator's counters add what came since,
    /// and a rollout first seen now counts from them.
    tallies: Option<Tallies>,
    /// Reconciles failed in a row, which the retry's backoff doubles with.
    failures: u32,
}

impl PolicyMemory {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<PolicyRef, Remembered>) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(super) fn status(&self, policy: &PolicyRef) -> Option<McpSessionPolicyStatus> {
        self.with(|memory| memory.get(policy).and_then(|r| r.status.clone()))
    }

    pub(super) fn wrote(&self, policy: &PolicyRef, status: McpSessionPolicyStatus) {
        self.with(|memory| memory.entry(policy.clone()).or_default().status = Some(status));
    }

    /// Keeps `now` as the policy's tallies; returns those of the count before (`None` on the
    /// first since the operator started).
    pub(super) fn counted(&self, policy: &PolicyRef, now: Tallies) -> Option<Tallies> {
        self.with(|memory| {
            memory
                .entry(policy.clone())
                .or_default()
                .tallies
                .replace(now)
        })
    }

    /// Counts a failed reconcile; returns the failures in a row, this one included.
    pub(super) fn failed(&self, policy: &PolicyRef) -> u32 {
        self.with(|memory| {
            let failures = &mut memory.entry(policy.clone()).or_default().failures;
            *failures = failures.saturating_add(1);
            *failures
        })
    }

    pub(super) fn succeeded(&self, policy: &PolicyRef) {
        self.with(|memory| {
            if let Some(remembered) = memory.get_mut(policy) {
                remembered.failures = 0;
            }
        });
    }

    pub(super) fn forget(&self, policy: &PolicyRef) {
        self.with(|memory| memory.remove(policy));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_is_remembered_until_forgotten() {
        let memory = PolicyMemory::default();
        let policy = ObjectRef::new("p").within("ns");
        let tallies = |drained| Tallies {
            drained,
            ..Default::default()
        };
        assert_eq!(memory.counted(&policy, tallies(1)), None);
        assert_eq!(memory.counted(&policy, tallies(3)), Some(tallies(1)));
        assert!(memory.status(&policy).is_none());
        memory.wrote(&policy, McpSessionPolicyStatus::default());
        assert_eq!(
            memory.status(&policy),
            Some(McpSessionPolicyStatus::default())
        );
        assert_eq!(memory.counted(&policy, tallies(4)), Some(tallies(3)));
        assert_eq!((memory.failed(&policy), memory.failed(&policy)), (1, 2));
        memory.succeeded(&policy);
        assert_eq!(memory.failed(&policy), 1);
        memory.forget(&policy);
        assert!(memory.status(&policy).is_none());
        assert_eq!(memory.counted(&policy, tallies(5)), None);
    }
}
