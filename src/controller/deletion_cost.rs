//! `controller.kubernetes.io/pod-deletion-cost` in step with each selected pod's sessions, so
//! that a scale-down removes the emptiest pods first (the ReplicaSet controller deletes pods of
//! lower cost first, Kubernetes 1.22+; older servers ignore the annotation).
//!
//! A pod's cost is rewritten only on a meaningful change (any change of a count below 10, else
//! 10 % of the written cost) and at most once per interval per pod: the annotation is a hint for the next
//! scale-down, not a live gauge, and every patch is a write to etcd.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt as _};
use serde_json::json;
use tracing::{debug, warn};

use crate::api::pod;

pub const ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";

/// The cost for a pod holding `sessions` (the annotation is an int32).
pub fn cost(sessions: u64) -> i32 {
    i32::try_from(sessions).unwrap_or(i32::MAX)
}

/// Whether a pod annotated `current` should be rewritten for `sessions`.
pub fn meaningful(current: Option<&str>, sessions: u64) -> bool {
    let Some(current) = current.and_then(|c| c.trim().parse::<i64>().ok()) else {
        return true; // Missing or not ours to read: write it.
    };
    // 10 % of what is written, and any change of a small count.
    current.abs_diff(i64::from(cost(sessions))) >= 1.max(current.unsigned_abs() / 10)
}

/// When each pod's cost was last written, for the rate limit.
#[derive(Default)]
pub struct Writer {
    written: Mutex<HashMap<ObjectRef<Pod>, Instant>>,
}

impl Writer {
    /// Brings the pods' annotations in step with their sessions; failures are logged and
    /// retried on a later reconcile, never fatal to it. Returns how many pods were patched.
    pub async fn sync(
        &self,
        client: &Client,
        pods: &[(std::sync::Arc<Pod>, u64)],
        every: Duration,
    ) -> usize {
        let mut patched = 0;
        for (pod, sessions) in pods {
            if pod::is_terminating(pod) {
                continue; // Going anyway.
            }
            let current = pod.annotations().get(ANNOTATION).map(String::as_str);
            if !meaningful(current, *sessions) {
                continue;
            }
            let key = ObjectRef::from_obj(&**pod);
            let due = self
                .written
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .is_none_or(|at| at.elapsed() >= every);
            if !due {
                continue;
            }
            let Some(namespace) = pod.namespace() else {
                continue;
            };
            let name = pod.name_any();
            let patch =
                json!({"metadata": {"annotations": {ANNOTATION: cost(*sessions).to_string()}}});
            let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    debug!(pod = %name, sessions, "pod deletion cost written");
                    patched += 1;
                }
                Err(error) => {
                    warn!(pod = %name, %error, "cannot write the pod deletion cost");
                    continue;
                }
            }
            self.written
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, Instant::now());
        }
        patched
    }

    /// Forgets pods that are gone.
    pub fn retain(&self, live: impl Fn(&ObjectRef<Pod>) -> bool) {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|key, _| live(key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_meaningful_changes_are_written() {
        assert!(meaningful(None, 0), "a pod without a cost gets one");
        assert!(meaningful(Some("not a number"), 3));
        assert!(!meaningful(Some("3"), 3));
        assert!(
            meaningful(Some("3"), 4),
            "small counts: every session matters"
        );
        assert!(meaningful(Some("1"), 0), "an emptied pod goes first");
        assert!(!meaningful(Some("1000"), 1050), "5 % of a large count");
        assert!(meaningful(Some("1000"), 1100));
        assert!(meaningful(Some("-5"), 0));
        assert_eq!(cost(u64::MAX), i32::MAX);
    }
}
