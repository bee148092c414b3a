//! What the operator and the gateway read of a selected pod: one rule for "ready" and one for
//! "takes requests", so that the status the controller reports and the pods the gateway sends
//! to never disagree.

use k8s_openapi::api::core::v1::Pod;

/// The pod's Ready condition is True.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Deleted and still stopping.
pub fn is_terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// Ready and not terminating: new sessions and requests may go to it.
pub fn takes_requests(pod: &Pod) -> bool {
    is_ready(pod) && !is_terminating(pod)
}

/// The pod's IP, once it has one.
pub fn ip(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .filter(|ip| !ip.is_empty())
}
