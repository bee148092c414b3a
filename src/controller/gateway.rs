//! A policy's gateway (`spec.gateway`, docs/gateway.md): the session proxy as a Deployment of
//! its own in front of the policy's pods. The operator writes, owned by the policy and named
//! `<policy>-gateway`: a ServiceAccount with a Role that may read the policy and its pods and
//! nothing else, the Deployment (restricted security context, probes, spread over nodes), its
//! Service, and a PodDisruptionBudget. With `enabled: false` it scales the Deployment to none.

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Client, ResourceExt as _};
use serde_json::{Value, json};

use crate::api::McpSessionPolicy;
use crate::api::contract::FIELD_MANAGER;
use crate::telemetry::LogFormat;
use crate::wiring;

/// The label that marks a policy's gateway pods, valued with the policy's name.
pub const GATEWAY_LABEL: &str = "mcpsession.dev/gateway";

/// What the operator puts in the gateways it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The image that runs the session proxy (`--proxy-image`): the operator's own.
    pub image: String,
    /// The gateway's admin port (health, metrics): the injected proxies' (`--proxy-admin-port`).
    pub admin_port: i32,
    /// How the gateway logs: as the operator does.
    pub log_format: LogFormat,
}

/// The annotation of a gateway's pod template that holds the policy's selector: the gateway
/// reads the selector once, at its start, so a change of it rolls the gateway (a rollout that
/// costs the clients nothing: each replica drains and its sessions are claimed by the next).
pub const SELECTOR_ANNOTATION: &str = "mcpsession.dev/backend-selector";

/// The name of `policy`'s gateway objects.
pub fn name(policy: &McpSessionPolicy) -> String {
    format!("{}-gateway", policy.name_any())
}

/// How the policy's gateway stands, for its condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayState {
    /// `spec.gateway.enabled` is false.
    Disabled,
    /// Written; `ready` of `replicas` gateway pods are available.
    Running { ready: i32, replicas: i32 },
    /// The objects could not be written.
    Failed(String),
}

/// The gateway's objects for `policy`, as JSON to apply.
pub fn build(policy: &McpSessionPolicy, settings: &Settings) -> Vec<Value> {
    let name = name(policy);
    let namespace = policy.namespace().unwrap_or_default();
    let meta = serde_json::to_value(policy.owned_object_meta(name.clone())).unwrap_or_default();
    let object = |api_version: &str, kind: &str, body: Value| {
        let mut object = json!({"apiVersion": api_version, "kind": kind, "metadata": meta});
        if let (Some(object), Some(body)) = (object.as_object_mut(), body.as_object()) {
            object.extend(body.clone());
        }
        object
    };
    let spec = &policy.spec.gateway;
    let labels = json!({GATEWAY_LABEL: policy.name_any()});
    let wiring = wiring::of(policy, settings.log_format, None);
    let admin = settings.admin_port;
    let mut args = vec![
        "gateway".to_owned(),
        "--policy".to_owned(),
        format!("{namespace}/{}", policy.name_any()),
        "--backend-port".to_owned(),
        spec.backend_port.to_string(),
        "--listen".to_owned(),
        format!("0.0.0.0:{}", spec.port),
        "--admin-addr".to_owned(),
        format!("0.0.0.0:{admin}"),
    ];
    args.extend(wiring.args);
    let resources = spec.resources.as_ref().map_or_else(
        || json!({"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}}),
        |r| serde_json::to_value(r).unwrap_or_default(),
    );
    let container = json!({
        "name": "gateway",
        "image": settings.image,
        "args": args,
        "env": wiring.env,
        "ports": [
            {"name": "mcp", "containerPort": spec.port, "protocol": "TCP"},
            {"name": "mcp-admin", "containerPort": admin, "protocol": "TCP"},
        ],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": admin}, "periodSeconds": 2, "failureThreshold": 1},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": admin}, "periodSeconds": 10, "failureThreshold": 3},
        "resources": resources,
        "securityContext": wiring::restricted_security_context(),
    });
    vec![
        object(
            "v1",
            "ServiceAccount",
            json!({"automountServiceAccountToken": true}),
        ),
        object(
            "rbac.authorization.k8s.io/v1",
            "Role",
            json!({"rules": [
                {"apiGroups": ["mcpsession.dev"], "resources": ["mcpsessionpolicies"],
                 "resourceNames": [policy.name_any()], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
            ]}),
        ),
        object(
            "rbac.authorization.k8s.io/v1",
            "RoleBinding",
            json!({
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
            }),
        ),
        object(
            "apps/v1",
            "Deployment",
            json!({"spec": {
                "replicas": spec.replicas,
                "selector": {"matchLabels": labels},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "template": {
                    "metadata": {
                        "labels": labels,
                        "annotations": {
                            SELECTOR_ANNOTATION: serde_json::to_string(&policy.spec.selector).unwrap_or_default(),
                        },
                    },
                    "spec": {
                        "serviceAccountName": name,
                        // The drain, then the linger for clients to move (docs/proxy.md).
                        "terminationGracePeriodSeconds": policy.spec.drain.timeout_seconds + 15,
                        "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                        "topologySpreadConstraints": [{
                            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": labels},
                        }],
                        "containers": [container],
                    },
                },
            }}),
        ),
        object(
            "v1",
            "Service",
            json!({"spec": {
                "selector": labels,
                "ports": [{"name": "mcp", "port": spec.port, "targetPort": "mcp", "protocol": "TCP"}],
            }}),
        ),
        object(
            "policy/v1",
            "PodDisruptionBudget",
            json!({"spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}}}),
        ),
    ]
}

/// Writes `policy`'s gateway (server-side apply: unchanged, it costs no write) and reports how
/// its Deployment stands.
pub async fn apply(
    client: &Client,
    policy: &McpSessionPolicy,
    settings: &Settings,
) -> GatewayState {
    let mut ready = 0;
    for object in build(policy, settings) {
        match apply_one(client, policy, object).await {
            Ok(written) => {
                if written
                    .types
                    .as_ref()
                    .is_some_and(|t| t.kind == "Deployment")
                {
                    ready = written.data["status"]["availableReplicas"]
                        .as_i64()
                        .unwrap_or(0) as i32;
                }
            }
            Err(error) => return GatewayState::Failed(error.to_string()),
        }
    }
    GatewayState::Running {
        ready,
        replicas: policy.spec.gateway.replicas,
    }
}

/// Stops `policy`'s gateway, if it has one: its Deployment scaled to none. The operator may not
/// delete Deployments (it could delete anyone's); the gateway's objects go with the policy.
pub async fn stop(client: &Client, policy: &McpSessionPolicy) -> Result<(), kube::Error> {
    let namespace = policy.namespace().unwrap_or_default();
    let api: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let scaled = api
        .patch(
            &name(policy),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await;
    match scaled {
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        other => other.map(drop),
    }
}

async fn apply_one(
    client: &Client,
    policy: &McpSessionPolicy,
    object: Value,
) -> Result<DynamicObject, kube::Error> {
    let namespace = policy.namespace().unwrap_or_default();
    let object: DynamicObject = serde_json::from_value(object).map_err(kube::Error::SerdeError)?;
    let types = object.types.clone().unwrap_or_default();
    let (group, version) = types
        .api_version
        .split_once('/')
        .unwrap_or(("", &types.api_version));
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let name = object.name_any();
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, &types.kind));
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), &namespace, &resource);
    api.patch(&name, &params, &Patch::Apply(&object)).await
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn policy() -> McpSessionPolicy {
        serde_json::from_value(json!({
            "apiVersion": "mcpsession.dev/v1alpha1", "kind": "McpSessionPolicy",
            "metadata": {"name": "api", "namespace": "apps", "uid": "u-1"},
            "spec": {"selector": {"matchLabels": {"app": "api"}},
                     "redis": {"urlSecretRef": {"name": "redis", "key": "url"}},
                     "injection": {"enabled": false},
                     "gateway": {"enabled": true, "replicas": 3, "port": 9000, "backendPort": 3000}}
        }))
        .expect("policy")
    }

    pub(crate) fn find<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
        objects
            .iter()
            .find(|o| o["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
    }

    pub(crate) fn settings() -> Settings {
        Settings {
            image: "mcp-session-operator:test".into(),
            admin_port: 8091,
            log_format: LogFormat::Json,
        }
    }

    #[test]
    fn the_gateway_is_owned_by_the_policy_and_may_read_only_its_policy_and_pods() {
        let objects = build(&policy(), &settings());
        let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                "ServiceAccount",
                "Role",
                "RoleBinding",
                "Deployment",
                "Service",
                "PodDisruptionBudget"
            ]
        );
        for object in &objects {
            assert_eq!(object["metadata"]["name"], "api-gateway", "{object}");
            assert_eq!(object["metadata"]["namespace"], "apps", "{object}");
            assert_eq!(
                object["metadata"]["ownerReferences"][0]["name"], "api",
                "{object}"
            );
        }
        let role = find(&objects, "Role");
        assert_eq!(
            role["rules"],
            json!([
                {"apiGroups": ["mcpsession.dev"], "resources": ["mcpsessionpolicies"], "resourceNames": ["api"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
            ])
        );
        let deployment = find(&objects, "Deployment");
        assert_eq!(deployment["spec"]["replicas"], 3);
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "api-gateway");
        let container = &pod["containers"][0];
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        let service = find(&objects, "Service");
        assert_eq!(service["spec"]["ports"][0]["port"], 9000);
        assert_eq!(
            service["spec"]["selector"],
            deployment["spec"]["template"]["metadata"]["labels"]
        );
    }

    /// The gateway reads the selector at its start: a new selector is a new pod template, so
    /// the Deployment rolls its replicas and they follow the pods it selects now.
    #[test]
    fn a_new_selector_rolls_the_gateway() {
        let template = |policy: &McpSessionPolicy| {
            find(&build(policy, &settings()), "Deployment")["spec"]["template"].clone()
        };
        let before = policy();
        let mut after = policy();
        after.spec.selector =
            serde_json::from_value(json!({"matchLabels": {"app": "api-v2"}})).expect("selector");
        assert_ne!(template(&before), template(&after));
        let annotation = &template(&after)["metadata"]["annotations"][SELECTOR_ANNOTATION];
        assert_eq!(annotation, r#"{"matchLabels":{"app":"api-v2"}}"#);
        assert_eq!(
            template(&before),
            template(&policy()),
            "the same policy, the same template: nothing rolls"
        );
    }

    #[test]
    fn the_gateway_logs_as_the_operator_does_at_the_level_its_policy_asks() {
        let env = |policy: &McpSessionPolicy| {
            let objects = build(policy, &settings());
            let container =
                &find(&objects, "Deployment")["spec"]["template"]["spec"]["containers"][0];
            container["env"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| {
                    Some((
                        e["name"].as_str()?.to_owned(),
                        e["value"].as_str()?.to_owned(),
                    ))
                })
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let plain = env(&policy());
        assert_eq!(
            plain[crate::api::contract::env::LOG_FORMAT],
            "json",
            "the operator's"
        );
        assert!(!plain.contains_key(crate::api::contract::env::LOG_FILTER));
        let mut annotated = policy();
        annotated.annotations_mut().insert(
            crate::api::contract::PROXY_LOG_LEVEL.to_owned(),
            "debug".to_owned(),
        );
        assert_eq!(
            env(&annotated)[crate::api::contract::env::LOG_FILTER],
            "debug"
        );
    }
}
