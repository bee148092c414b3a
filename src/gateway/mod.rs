//! Gateway mode: the session proxy in a Deployment of its own, in front of a policy's pods.
//!
//! A sidecar dies with its pod, and its clients' connections with it. A gateway does not: when
//! a backend pod stops, crashes or loses its node, its sessions are replayed on another pod and
//! the clients' connections and streams stay open. The engine is the proxy's
//! ([`crate::proxy`]) with discovered backends ([`Backends::discovered`]); this module keeps
//! them in step with the policy's pods.

use std::sync::Arc;

use futures::TryStreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, ResourceExt as _};
use tracing::{info, warn};

use crate::api::{McpSessionPolicy, pod, pod_selector};
use crate::proxy::{Backends, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot read the policy {namespace}/{name}: {source}")]
    Policy {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("the policy {0} selects no pods (its selector is empty or invalid)")]
    SelectsNothing(String),
}

/// The policy a gateway serves: `NAMESPACE/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRef {
    pub namespace: String,
    pub name: String,
}

impl std::str::FromStr for PolicyRef {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(Self {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!("expected NAMESPACE/NAME, got {raw:?}")),
        }
    }
}

impl std::fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Reads the policy a gateway serves.
pub async fn policy(client: &Client, policy: &PolicyRef) -> Result<McpSessionPolicy, GatewayError> {
    let api: Api<McpSessionPolicy> = Api::namespaced(client.clone(), &policy.namespace);
    api.get(&policy.name)
        .await
        .map_err(|source| GatewayError::Policy {
            namespace: policy.namespace.clone(),
            name: policy.name.clone(),
            source,
        })
}

/// Keeps `backends` in step with the pods `policy` selects, their MCP servers on `port`, until
/// the watch ends (it retries on its own; it ends only when the process does).
pub async fn follow_pods(
    client: Client,
    policy: &McpSessionPolicy,
    port: u16,
    backends: Arc<Backends>,
) -> Result<(), GatewayError> {
    let namespace = policy.namespace().unwrap_or_default();
    let selector = pod_selector(&policy.spec.selector)
        .ok_or_else(|| GatewayError::SelectsNothing(policy.name_any()))?;
    let pods: Api<Pod> = Api::namespaced(client, &namespace);
    let (reader, writer) = reflector::store();
    let events = watcher(pods, watcher::Config::default().labels_from(&selector))
        .default_backoff()
        .reflect(writer);
    info!(%namespace, %selector, port, "gateway: following the policy's pods");
    let mut events = std::pin::pin!(events);
    let mut listed = false;
    let mut last = Vec::new();
    loop {
        match events.try_next().await {
            // A (re)list is applied whole, once it is done.
            Ok(Some(watcher::Event::Init | watcher::Event::InitApply(_))) => continue,
            Ok(Some(watcher::Event::InitDone)) => listed = true,
            Ok(Some(watcher::Event::Apply(_) | watcher::Event::Delete(_))) => {}
            Ok(None) => return Ok(()),
            Err(error) => {
                warn!(%error, "gateway: the pod watch failed; it retries");
                continue;
            }
        }
        let now = endpoints(&reader, port);
        if listed && (now != last || !backends.known()) {
            let serving = now.iter().filter(|e| e.serving).count();
            info!(pods = now.len(), serving, "gateway: backends changed");
            backends.update(&now);
            last = now;
        }
    }
}

/// The backends the watched pods make: each pod with an IP, serving if it takes requests.
fn endpoints(pods: &Store<Pod>, port: u16) -> Vec<Endpoint> {
    let mut endpoints: Vec<Endpoint> = pods
        .state()
        .iter()
        .filter_map(|p| endpoint(p, port))
        .collect();
    endpoints.sort_by(|a, b| a.name.cmp(&b.name));
    endpoints
}

/// The backend one pod makes, if it has an IP.
pub fn endpoint(pod: &Pod, port: u16) -> Option<Endpoint> {
    let ip = pod::ip(pod)?;
    let address = match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        _ => format!("{ip}:{port}"),
    };
    Some(Endpoint {
        name: pod.name_any(),
        address,
        serving: pod::takes_requests(pod),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(name: &str, ip: Option<&str>, ready: bool, deleting: bool) -> Pod {
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns"},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        }))
        .expect("a pod");
        if let (Some(status), Some(ip)) = (pod.status.as_mut(), ip) {
            status.pod_ip = Some(ip.into());
        }
        if deleting {
            pod.metadata.deletion_timestamp = Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
            );
        }
        pod
    }

    #[test]
    fn a_pod_serves_when_ready_and_not_terminating() {
        let serving = endpoint(&pod("a", Some("10.0.0.1"), true, false), 8000).expect("an ip");
        assert_eq!(serving.address, "10.0.0.1:8000");
        assert!(serving.serving);
        let starting = endpoint(&pod("b", Some("10.0.0.2"), false, false), 8000).expect("an ip");
        assert!(!starting.serving);
        let stopping = endpoint(&pod("c", Some("10.0.0.3"), true, true), 8000).expect("an ip");
        assert!(!stopping.serving, "a terminating pod takes nothing new");
        assert!(endpoint(&pod("d", None, true, false), 8000).is_none());
        let v6 = endpoint(&pod("e", Some("fd00::1"), true, false), 8000).expect("an ip");
        assert_eq!(v6.address, "[fd00::1]:8000");
    }

    #[test]
    fn a_policy_is_named_namespace_slash_name() {
        let parsed: PolicyRef = "apps/api".parse().expect("valid");
        assert_eq!(parsed.to_string(), "apps/api");
        for bad in ["api", "/api", "apps/", "a/b/c"] {
            assert!(bad.parse::<PolicyRef>().is_err(), "{bad}");
        }
    }
}
