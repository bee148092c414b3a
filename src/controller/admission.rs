//! Whether the apiserver admits the selected pods. A ReplicaSet whose pods are refused (by Pod
//! Security admission, a quota, another webhook) says so only in its own `ReplicaFailure`
//! condition, where no one who watches the policy looks; the policy's status and Events repeat
//! it, naming Pod Security where that is the cause. The injected proxy meets the `restricted`
//! profile (tests/webhook.rs), so such a refusal is about the backend's own spec. ReplicaSets
//! are watched (their pod templates' specs dropped): a refusal reconciles the policies that
//! select its pods at once.

use k8s_openapi::api::apps::v1::ReplicaSet;
use kube::ResourceExt as _;

use crate::api::McpSessionPolicy;

/// What Pod Security admission's refusals say (`violates PodSecurity "restricted:latest": …`).
const POD_SECURITY: &str = "violates PodSecurity";

/// A ReplicaSet that wants pods the apiserver refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub replica_set: String,
    /// Why, without the refused pod's name, which changes with each attempt.
    pub reason: String,
}

impl Refusal {
    pub fn by_pod_security(&self) -> bool {
        self.reason.contains(POD_SECURITY)
    }
}

/// What the controller keeps of a ReplicaSet: its pod template's labels, not its pods' spec.
pub fn slim(replica_set: &mut ReplicaSet) {
    replica_set.managed_fields_mut().clear();
    if let Some(template) = replica_set.spec.template.as_mut() {
        template.spec = None;
    }
}

/// The labels of the pods `replica_set` makes.
pub fn template_labels(
    replica_set: &ReplicaSet,
) -> Option<&std::collections::BTreeMap<String, String>> {
    replica_set
        .spec
        .template
        .as_ref()?
        .metadata
        .as_ref()?
        .labels
        .as_ref()
}

/// The refusals of the ReplicaSets that want pods `policy` selects.
pub fn refusals<'a>(
    policy: &McpSessionPolicy,
    replica_sets: impl IntoIterator<Item = &'a ReplicaSet>,
) -> Vec<Refusal> {
    let mut refused: Vec<Refusal> = replica_sets
        .into_iter()
        .filter(|rs| {
            let wants_pods = rs.spec.replicas.unwrap_or(1) > 0;
            let namespace = rs.namespace().unwrap_or_default();
            wants_pods
                && template_labels(rs).is_some_and(|labels| policy.selects(&namespace, labels))
        })
        .filter_map(|rs| {
            let failure = rs.status.as_ref()?.conditions.iter().flatten().find(|c| {
                c.type_.as_deref() == Some("ReplicaFailure") && c.status.as_deref() == Some("True")
            })?;
            let message = failure.message.as_deref().unwrap_or_default();
            // `pods "api-7d9c-x4k2" is forbidden: …`
            let reason = message
                .split_once(" is forbidden: ")
                .map_or(message, |(_, why)| why);
            Some(Refusal {
                replica_set: rs.name_any(),
                reason: reason.to_owned(),
            })
        })
        .collect();
    refused.sort_by(|a, b| a.replica_set.cmp(&b.replica_set));
    refused
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy() -> McpSessionPolicy {
        serde_json::from_value(json!({"apiVersion": "mcpsession.dev/v1alpha1", "kind": "McpSessionPolicy",
            "metadata": {"name": "api", "namespace": "prod"},
            "spec": {"selector": {"matchLabels": {"app": "api"}}, "redis": {"url": "redis://r:6379"}}}))
        .unwrap()
    }

    fn replica_set(name: &str, app: &str, replicas: i32, failure: Option<&str>) -> ReplicaSet {
        let conditions: Vec<_> = failure
            .map(|message| json!({"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": message}))
            .into_iter()
            .collect();
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "prod"},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": app}},
                     "template": {"metadata": {"labels": {"app": app, "pod-template-hash": "7d9c"}}}},
            "status": {"replicas": 0, "conditions": conditions}}))
        .unwrap()
    }

    #[test]
    fn a_refused_replica_set_of_the_selected_pods_is_reported_without_the_pod_name() {
        let pod_security = r#"pods "api-7d9c-x4k2" is forbidden: violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false (container "server" must set securityContext.allowPrivilegeEscalation=false)"#;
        let quota = r#"pods "api-5f6b-p2q9" is forbidden: exceeded quota: pods"#;
        let found = refusals(
            &policy(),
            &[
                replica_set("api-7d9c", "api", 3, Some(pod_security)),
                replica_set("api-5f6b", "api", 1, Some(quota)),
                replica_set("api-1a2b", "api", 3, None),
                replica_set("api-old", "api", 0, Some(pod_security)),
                replica_set("worker-1", "worker", 3, Some(pod_security)),
            ],
        );
        let names: Vec<&str> = found.iter().map(|r| r.replica_set.as_str()).collect();
        assert_eq!(
            names,
            ["api-5f6b", "api-7d9c"],
            "scaled to none, or not selected: not the policy's"
        );
        assert!(found[1].by_pod_security() && !found[0].by_pod_security());
        assert!(found[1].reason.starts_with("violates PodSecurity"));
        assert!(!found[1].reason.contains("x4k2"), "stable across attempts");
        let mut elsewhere = replica_set("api-7d9c", "api", 3, Some(quota));
        elsewhere.metadata.namespace = Some("staging".into());
        assert!(
            refusals(&policy(), [&elsewhere]).is_empty(),
            "another namespace"
        );
    }
}
