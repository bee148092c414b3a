//! The rollout guard: when a rollout loses more sessions than the policy allows, the Deployments
//! rolling out the selected pods are paused (`spec.paused`), once per rollout, so that the rest
//! of the old pods keep serving while someone looks. Only workloads that own selected pods are
//! touched; StatefulSets and DaemonSets have no pause and are reported instead.

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt as _};
use serde_json::json;
use tracing::{info, warn};

use super::rollout::Tallied;
use crate::api::{McpSessionPolicy, McpSessionPolicyStatus, RolloutStatus};

/// What the guard did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Paused {
    /// Deployments paused (now or already).
    pub deployments: Vec<String>,
    /// Owners of selected pods that cannot be paused (`Kind/name`).
    pub unpausable: Vec<String>,
}

/// Pauses the Deployments that own the selected pods of `revision`.
pub async fn pause(client: &Client, namespace: &str, pods: &[Arc<Pod>], revision: &str) -> Paused {
    let mut replica_sets = BTreeSet::new();
    let mut paused = Paused::default();
    for pod in pods {
        if super::rollout::revision(pod) != Some(revision) {
            continue;
        }
        for owner in pod
            .owner_references()
            .iter()
            .filter(|o| o.controller == Some(true))
        {
            match owner.kind.as_str() {
                "ReplicaSet" => {
                    replica_sets.insert(owner.name.clone());
                }
                kind => {
                    let name = format!("{kind}/{}", owner.name);
                    if !paused.unpausable.contains(&name) {
                        paused.unpausable.push(name);
                    }
                }
            }
        }
    }
    let replica_set_api: Api<ReplicaSet> = Api::namespaced(client.clone(), namespace);
    let mut deployments = BTreeSet::new();
    for name in replica_sets {
        match replica_set_api.get_opt(&name).await {
            Ok(Some(replica_set)) => deployments.extend(
                replica_set
                    .owner_references()
                    .iter()
                    .filter(|o| o.controller == Some(true) && o.kind == "Deployment")
                    .map(|o| o.name.clone()),
            ),
            Ok(None) => {}
            Err(error) => warn!(replica_set = %name, %error, "cannot read a ReplicaSet"),
        }
    }
    let deployment_api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let patch = json!({"spec": {"paused": true}});
    for name in deployments {
        match deployment_api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                info!(deployment = %name, "rollout paused: too many sessions lost");
                paused.deployments.push(name);
            }
            Err(error) => warn!(deployment = %name, %error, "cannot pause the Deployment"),
        }
    }
    paused
}

/// The last rollout of the selected pods, tracked from the previous status and the tallies;
/// one that has lost more sessions than allowed is paused, once.
pub(super) async fn track_and_guard(
    client: &Client,
    policy: &McpSessionPolicy,
    selected: &[Arc<Pod>],
    previous: Option<&McpSessionPolicyStatus>,
    tallies: Option<Tallied>,
) -> Option<RolloutStatus> {
    let clock = chrono::Utc::now();
    let now = clock.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let previous_rollout = previous.and_then(|p| p.last_rollout.as_ref());
    let mut last_rollout = super::rollout::track(
        previous_rollout,
        selected,
        tallies,
        &now,
        super::schedule::lingering(previous_rollout, clock),
    );
    if let Some(rollout) = &mut last_rollout
        && rollout.finished_at.is_none()
        && rollout.paused_at.is_none()
        && rollout.lost > policy.spec.rollout.max_lost()
    {
        let namespace = policy.namespace().unwrap_or_default();
        let paused = pause(client, &namespace, selected, &rollout.revision).await;
        let mut what: Vec<String> = paused
            .deployments
            .iter()
            .map(|d| format!("Deployment/{d}"))
            .collect();
        what.extend(
            paused
                .unpausable
                .iter()
                .map(|o| format!("{o} (cannot be paused)")),
        );
        rollout.paused_at = Some(now);
        rollout.paused = Some(if what.is_empty() {
            "nothing owns the new pods".to_owned()
        } else {
            what.join(", ")
        });
    }
    last_rollout
}
