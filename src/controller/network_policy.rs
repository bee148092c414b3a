//! A NetworkPolicy per policy for its injected pods (opt-in, `--network-policies`): anyone may
//! reach the proxy's MCP port, only the named namespaces (Prometheus) its admin port. The
//! backend's own port is then closed to other pods: a client cannot go around the proxy.
//!
//! NetworkPolicies add up: an application with other ports to open adds its own. The kubelet's
//! probes and preStop hook come from the node, which common network plugins always let through.

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt as _};

use crate::api::McpSessionPolicy;
use crate::api::contract::FIELD_MANAGER;
use crate::api::contract::INJECT_KEY;

/// What the operator puts in the NetworkPolicies it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The injected proxies' admin port (`--proxy-admin-port`).
    pub admin_port: i32,
    /// Namespaces, by name, whose pods may reach the admin port (`/metrics`).
    pub metrics_from: Vec<String>,
}

/// The NetworkPolicy's name for `policy`.
pub fn name(policy: &McpSessionPolicy) -> String {
    format!("{}-mcp-session-proxy", policy.name_any())
}

/// The NetworkPolicy for `policy`'s injected pods: the pods its selector picks that have not
/// opted out of injection.
pub fn build(policy: &McpSessionPolicy, settings: &Settings) -> NetworkPolicy {
    let mut pods: LabelSelector = policy.spec.selector.clone();
    pods.match_expressions
        .get_or_insert_with(Vec::new)
        .push(LabelSelectorRequirement {
            key: INJECT_KEY.to_owned(),
            operator: "NotIn".to_owned(),
            values: Some(vec!["false".to_owned()]),
        });
    let port = |port: i32| {
        Some(vec![NetworkPolicyPort {
            port: Some(IntOrString::Int(port)),
            protocol: Some("TCP".to_owned()),
            ..NetworkPolicyPort::default()
        }])
    };
    let mut ingress = vec![NetworkPolicyIngressRule {
        ports: port(policy.spec.injection.proxy_port),
        from: None,
    }];
    if !settings.metrics_from.is_empty() {
        let from = settings
            .metrics_from
            .iter()
            .map(|namespace| NetworkPolicyPeer {
                namespace_selector: Some(LabelSelector {
                    match_labels: Some(
                        [("kubernetes.io/metadata.name".to_owned(), namespace.clone())].into(),
                    ),
                    match_expressions: None,
                }),
                ..NetworkPolicyPeer::default()
            })
            .collect();
        ingress.push(NetworkPolicyIngressRule {
            ports: port(settings.admin_port),
            from: Some(from),
        });
    }
    NetworkPolicy {
        metadata: policy.owned_object_meta(name(policy)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(pods),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(ingress),
            egress: None,
        }),
    }
}

/// Writes `policy`'s NetworkPolicy (server-side apply: unchanged, it costs no write).
pub async fn apply(
    client: &Client,
    policy: &McpSessionPolicy,
    settings: &Settings,
) -> Result<(), kube::Error> {
    let namespace = policy.namespace().unwrap_or_default();
    let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), &namespace);
    api.patch(
        &name(policy),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(build(policy, settings)),
    )
    .await
    .map(drop)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_proxy_port_is_open_the_admin_port_only_to_the_metrics_namespaces() {
        let mut policy: McpSessionPolicy = serde_json::from_value(json!({
            "apiVersion": "mcpsession.dev/v1alpha1", "kind": "McpSessionPolicy",
            "metadata": {"name": "api", "namespace": "apps", "uid": "u-1"},
            "spec": {"selector": {"matchLabels": {"app": "api"}}, "redis": {"url": "redis://r"},
                     "injection": {"proxyPort": 9000}}
        }))
        .unwrap();
        let settings = Settings {
            admin_port: 8091,
            metrics_from: vec!["monitoring".into()],
        };
        let built = serde_json::to_value(build(&policy, &settings)).unwrap();
        assert_eq!(built["metadata"]["name"], "api-mcp-session-proxy");
        assert_eq!(built["metadata"]["ownerReferences"][0]["name"], "api");
        assert_eq!(
            built["spec"]["podSelector"],
            json!({"matchLabels": {"app": "api"},
                   "matchExpressions": [{"key": "mcpsession.dev/inject", "operator": "NotIn", "values": ["false"]}]})
        );
        assert_eq!(
            built["spec"]["ingress"],
            json!([
                {"ports": [{"port": 9000, "protocol": "TCP"}]},
                {"ports": [{"port": 8091, "protocol": "TCP"}],
                 "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]},
            ])
        );
        // Without metrics namespaces the admin port is open to no pod.
        policy.spec.injection.proxy_port = 8090;
        let closed = build(
            &policy,
            &Settings {
                metrics_from: Vec::new(),
                ..settings
            },
        );
        let ingress = serde_json::to_value(closed.spec.unwrap().ingress).unwrap();
        assert_eq!(
            ingress,
            json!([{"ports": [{"port": 8090, "protocol": "TCP"}]}])
        );
    }
}
