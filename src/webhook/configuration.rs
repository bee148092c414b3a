//! The operator's own MutatingWebhookConfiguration and ValidatingWebhookConfiguration (both
//! named `mcp-session-operator`), applied with the current caBundle.

use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use serde_json::{Value, json};

use super::WebhookError;
use crate::api::contract::{FIELD_MANAGER, HOLD_CONTAINER, INJECT_KEY, PROXY_CONTAINER};

pub const NAME: &str = "mcp-session-operator";
pub const MUTATE_PATH: &str = "/mutate-pods";
pub const VALIDATE_PATH: &str = "/validate-policies";

/// How the apiserver reaches the webhook.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// An explicit base URL (`https://host:port`), e.g. a loopback address outside a cluster.
    Url(String),
    /// The in-cluster Service.
    Service {
        namespace: String,
        name: String,
        port: i32,
    },
}

impl Endpoint {
    fn client_config(&self, path: &str, ca_bundle: Option<&str>) -> Value {
        let mut config = match self {
            Self::Url(base) => json!({"url": format!("{}{path}", base.trim_end_matches('/'))}),
            Self::Service {
                namespace,
                name,
                port,
            } => {
                json!({"service": {"namespace": namespace, "name": name, "path": path, "port": port}})
            }
        };
        if let Some(ca) = ca_bundle {
            config["caBundle"] =
                serde_json::to_value(k8s_openapi::ByteString(ca.as_bytes().to_vec()))
                    .unwrap_or_default();
        }
        config
    }

    /// Names the serving certificate must carry.
    pub fn certificate_names(&self) -> Vec<String> {
        match self {
            Self::Url(base) => {
                let host = url::Url::parse(base)
                    .ok()
                    .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_owned()));
                host.into_iter().collect()
            }
            Self::Service {
                namespace, name, ..
            } => {
                vec![
                    format!("{name}.{namespace}.svc"),
                    format!("{name}.{namespace}.svc.cluster.local"),
                    format!("{name}.{namespace}"),
                ]
            }
        }
    }
}

/// When the apiserver calls the mutating webhook (`matchConditions`, CEL): only for a pod that
/// a policy can select and that has no proxy (nor hold) yet, so that most pods of a cluster never wait on
/// the operator. Every policy's selector requires a label (the CRD's rule), so an unlabelled
/// pod is never selected. The chart renders the same conditions.
fn mutate_match_conditions() -> Value {
    let no_proxy_in = |list: &str| {
        format!("{list}.exists(c, c.name == '{PROXY_CONTAINER}' || c.name == '{HOLD_CONTAINER}')")
    };
    json!([
        {"name": "has-labels",
         "expression": "has(object.metadata.labels) && size(object.metadata.labels) > 0"},
        {"name": "not-opted-out",
         "expression": format!("!has(object.metadata.annotations) || !('{INJECT_KEY}' in object.metadata.annotations) || object.metadata.annotations['{INJECT_KEY}'] != 'false'")},
        {"name": "no-proxy-yet",
         "expression": format!("!{} && !(has(object.spec.initContainers) && {})",
             no_proxy_in("object.spec.containers"), no_proxy_in("object.spec.initContainers"))},
    ])
}

/// Applies both configurations. `operator_namespace` is excluded along with kube-system.
pub async fn apply(
    client: &Client,
    endpoint: &Endpoint,
    ca_bundle: Option<&str>,
    operator_namespace: &str,
) -> Result<(), WebhookError> {
    // `NotIn` on the name label, which the apiserver sets on every namespace; the handler skips
    // them as well.
    let namespaces = json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn",
        "values": ["kube-system", operator_namespace]}]});
    let mutating = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": NAME, "labels": {"app.kubernetes.io/managed-by": NAME}},
        "webhooks": [{
            "name": "pods.mcpsession.dev",
            "clientConfig": endpoint.client_config(MUTATE_PATH, ca_bundle),
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}],
            // A down operator must never block workloads.
            "failurePolicy": "Ignore",
            // It may create the policy's generated fingerprint key Secret, never on a dry run.
            "sideEffects": "NoneOnDryRun",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5,
            "reinvocationPolicy": "IfNeeded",
            "namespaceSelector": namespaces,
            "objectSelector": {"matchExpressions": [{"key": INJECT_KEY, "operator": "NotIn", "values": ["false"]}]},
            "matchConditions": mutate_match_conditions(),
        }],
    });
    let validating = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": NAME, "labels": {"app.kubernetes.io/managed-by": NAME}},
        "webhooks": [{
            "name": "policies.mcpsession.dev",
            "clientConfig": endpoint.client_config(VALIDATE_PATH, ca_bundle),
            "rules": [{"apiGroups": ["mcpsession.dev"], "apiVersions": ["v1alpha1"], "operations": ["CREATE", "UPDATE"],
                       "resources": ["mcpsessionpolicies"], "scope": "Namespaced"}],
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5,
        }],
    });
    for (kind, object) in [
        ("MutatingWebhookConfiguration", mutating),
        ("ValidatingWebhookConfiguration", validating),
    ] {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
            "admissionregistration.k8s.io",
            "v1",
            kind,
        ));
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        api.patch(
            NAME,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await
        .map_err(WebhookError::Kube)?;
    }
    Ok(())
}
