//! What a reconcile reads of Kubernetes: the selected pods' totals and how Services reach them.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt as _;
use kube::runtime::reflector::Store;

use super::status::Routing;
use crate::api::{McpSessionPolicy, PodTotals, pod};

/// How the Services that select `pods` reach them: a Service whose port targets the backend's
/// port (by number, or by a container port's name) bypasses the session proxy.
pub(super) fn routing(
    policy: &McpSessionPolicy,
    namespace: &str,
    pods: &[Arc<Pod>],
    services: &Store<Service>,
) -> Routing {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let injection = &policy.spec.injection;
    if !injection.enabled {
        return Routing::InjectionDisabled;
    }
    let upstream_names: Vec<String> = pods
        .iter()
        .flat_map(|p| p.spec.iter().flat_map(|s| s.containers.iter()))
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.container_port == injection.upstream_port)
        .filter_map(|p| p.name.clone())
        .collect();
    let mut routed = 0;
    let mut bypassing = Vec::new();
    for service in services.state() {
        let Some(spec) = &service.spec else { continue };
        let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
            continue;
        };
        let selects_ours = pods
            .iter()
            .any(|pod| selector.iter().all(|(k, v)| pod.labels().get(k) == Some(v)));
        if service.namespace().as_deref() != Some(namespace) || !selects_ours {
            continue;
        }
        routed += 1;
        for port in spec.ports.iter().flatten() {
            let direct = match &port.target_port {
                Some(IntOrString::Int(target)) => *target == injection.upstream_port,
                Some(IntOrString::String(name)) => upstream_names.contains(name),
                None => port.port == injection.upstream_port,
            };
            if direct {
                bypassing.push(format!(
                    "Service {} port {} targets {}, the backend's port: set targetPort to {} (the session proxy)",
                    service.name_any(),
                    port.port,
                    injection.upstream_port,
                    injection.proxy_port
                ));
            }
        }
    }
    if bypassing.is_empty() {
        Routing::ThroughProxy(routed)
    } else {
        Routing::Bypassed(bypassing)
    }
}

/// Sessions that terminating pods still serve (drain strategy `Wait`), and those pods, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Waiting {
    pub sessions: u64,
    pub pods: Vec<String>,
}

/// What of `pod_sessions` (by pod name) the terminating ones among `pods` hold.
pub(super) fn waiting(pods: &[Arc<Pod>], pod_sessions: &[(String, u64)]) -> Waiting {
    let mut waiting = Waiting::default();
    for (name, sessions) in pod_sessions.iter().filter(|(_, n)| *n > 0) {
        let terminating = pods
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some(name) && pod::is_terminating(p));
        if terminating {
            waiting.sessions += sessions;
            waiting.pods.push(name.clone());
        }
    }
    waiting
}

pub(super) fn pod_totals(pods: &[Arc<Pod>]) -> PodTotals {
    let terminating = pods.iter().filter(|p| pod::is_terminating(p)).count();
    PodTotals {
        selected: pods.len() as u32,
        ready: pods.iter().filter(|p| pod::takes_requests(p)).count() as u32,
        terminating: terminating as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, terminating: bool) -> Arc<Pod> {
        let mut pod = Pod::default();
        pod.metadata.name = Some(name.into());
        if terminating {
            pod.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ));
        }
        Arc::new(pod)
    }

    #[test]
    fn sessions_wait_on_terminating_pods_that_hold_them() {
        let pods = [pod("new", false), pod("old-a", true), pod("old-b", true)];
        let sessions = [
            ("new".to_owned(), 5),
            ("old-a".to_owned(), 3),
            ("old-b".to_owned(), 0),
        ];
        assert_eq!(
            waiting(&pods, &sessions),
            Waiting {
                sessions: 3,
                pods: vec!["old-a".into()],
            },
            "a terminating pod without sessions waits for nothing"
        );
        assert_eq!(waiting(&pods[..1], &sessions[..1]), Waiting::default());
    }
}
