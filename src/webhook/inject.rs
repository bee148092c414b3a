//! The pod mutation: adds the session proxy and its wiring to a pod that a policy selects.
//! A pure function from (pod, policy, configuration) to a JSON patch, so it is tested without
//! any server.

use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation};
use jsonptr::PointerBuf;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use serde_json::{Value, json};

use crate::api::contract::{self, HOLD_CONTAINER, INJECT_KEY, INJECTED_BY, PROXY_CONTAINER, env};
use crate::api::{DrainStrategy, McpSessionPolicy, PodInjection, Sidecar};
use crate::telemetry::LogFormat;
use crate::wiring;

/// Seconds added to the drain timeout for the pod's termination grace period.
const GRACE_MARGIN_SECONDS: i64 = 15;

/// How proxies are injected; from the operator's flags.
#[derive(Debug, Clone)]
pub struct InjectorConfig {
    pub image: String,
    pub image_pull_policy: Option<String>,
    /// Port of the proxy's admin endpoints (health, drain, metrics).
    pub admin_port: i32,
    /// Inject as a native sidecar (init container with `restartPolicy: Always`, Kubernetes ≥ 1.29)
    /// where the policy does not say (`spec.injection.sidecar`).
    pub native_sidecar: bool,
    /// How the proxy logs: as the operator does.
    pub log_format: LogFormat,
}

impl InjectorConfig {
    /// Whether `policy`'s pods get a native sidecar: what the policy asks, else the operator's.
    fn native_sidecar_for(&self, policy: &McpSessionPolicy) -> bool {
        policy
            .spec
            .injection
            .sidecar
            .map_or(self.native_sidecar, |sidecar| sidecar == Sidecar::Native)
    }
}

impl Default for InjectorConfig {
    fn default() -> Self {
        Self {
            image: contract::default_image(),
            image_pull_policy: None,
            admin_port: 8091,
            native_sidecar: false,
            log_format: LogFormat::default(),
        }
    }
}

/// What the webhook does with a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Injection {
    Patch(Patch),
    /// Admit unchanged, for a reason worth a log line.
    Skip(&'static str),
    /// Admit unchanged, and tell the user why (a warning and an Event).
    Conflict(String),
}

/// A pod's drain token: 256 random bits, base64url. One per pod, made at admission: it goes
/// into the proxy's environment and the backend's preStop hook (whose `httpHeaders` cannot
/// reference a Secret), so that only the kubelet, and whoever can read the pod's spec, can
/// quiesce or retire that pod's proxy or list its sessions.
pub fn drain_token() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

pub fn inject(
    pod: &Pod,
    policy: &McpSessionPolicy,
    config: &InjectorConfig,
    drain_token: &str,
) -> Injection {
    let Some(kind) = policy.pod_injection() else {
        return Injection::Skip("the policy injects nothing");
    };
    let opted_out = |map: &std::collections::BTreeMap<String, String>| {
        map.get(INJECT_KEY).is_some_and(|v| v == "false")
    };
    if opted_out(pod.labels()) || opted_out(pod.annotations()) {
        return Injection::Skip("opted out");
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Injection::Skip("no spec");
    };
    if spec.containers.is_empty() {
        return Injection::Skip("no containers");
    }
    let init_containers = spec.init_containers.as_deref().unwrap_or_default();
    if spec
        .containers
        .iter()
        .chain(init_containers)
        .any(|c| c.name == PROXY_CONTAINER || c.name == HOLD_CONTAINER)
    {
        return Injection::Skip("already injected");
    }
    let injection = &policy.spec.injection;
    let (ours, what) = match kind {
        PodInjection::Proxy => (
            vec![injection.proxy_port, config.admin_port],
            "the session proxy",
        ),
        PodInjection::Hold => (vec![config.admin_port], "the session hold"),
    };
    if let Some((container, port)) = spec.containers.iter().chain(init_containers).find_map(|c| {
        c.ports
            .iter()
            .flatten()
            .find(|p| ours.contains(&p.container_port))
            .map(|p| (c.name.clone(), p.container_port))
    }) {
        let change = match kind {
            PodInjection::Proxy => "spec.injection.proxyPort or the container's port",
            PodInjection::Hold => "the container's port, or the operator's --proxy-admin-port",
        };
        return Injection::Conflict(format!(
            "mcp-session-operator: not injecting {what}: container {container:?} uses port {port}, which {what} of McpSessionPolicy {:?} needs; change {change}",
            policy.name_any()
        ));
    }

    let mut operations = Vec::new();
    let native_sidecar = config.native_sidecar_for(policy);
    let annotations = Some(pod.annotations());
    let (sidecar, hook_path) = match kind {
        // The backend's preStop waits on the proxy. A classic sidecar gets SIGTERM with the
        // backend's preStop when the pod stops, and retires then, so the hook quiesces: in
        // place restarts hold requests, a pod stop waits for the retirement. A native sidecar
        // is stopped only after the backend, so the backend's hook is all the proxy hears of a
        // pod stop: it retires (after an in-place restart of the backend, a fresh proxy
        // succeeds it).
        PodInjection::Proxy => (
            proxy_container(policy, config, drain_token, annotations),
            if native_sidecar { "/retire" } else { "/drain" },
        ),
        // The backend's preStop waits on the hold until the pod's sessions have ended.
        PodInjection::Hold => (
            hold_container(policy, config, drain_token, annotations),
            "/hold",
        ),
    };
    if native_sidecar {
        match spec.init_containers {
            Some(_) => operations.push(add("/spec/initContainers/-", sidecar)),
            None => operations.push(add("/spec/initContainers", json!([sidecar]))),
        }
    } else {
        operations.push(add("/spec/containers/-", sidecar));
    }
    let drain_hook = json!({"httpGet": {"path": hook_path, "port": config.admin_port,
        "httpHeaders": [{"name": contract::DRAIN_TOKEN_HEADER, "value": drain_token}]}});
    for (index, container) in spec.containers.iter().enumerate() {
        // A failed liveness probe restarts the server in place, and its sessions' state goes
        // with it whatever the proxy does: the pod's long grace (drain strategy Wait) is for a
        // pod that stops with sessions to serve, not for holding a sick server.
        if policy.spec.drain.strategy == DrainStrategy::Wait
            && container
                .liveness_probe
                .as_ref()
                .is_some_and(|probe| probe.termination_grace_period_seconds.is_none())
        {
            operations.push(add(
                &format!("/spec/containers/{index}/livenessProbe/terminationGracePeriodSeconds"),
                json!(policy.spec.drain.timeout_seconds + GRACE_MARGIN_SECONDS),
            ));
        }
        match &container.lifecycle {
            None => operations.push(add(
                &format!("/spec/containers/{index}/lifecycle"),
                json!({"preStop": drain_hook}),
            )),
            Some(lifecycle) if lifecycle.pre_stop.is_none() => operations.push(add(
                &format!("/spec/containers/{index}/lifecycle/preStop"),
                drain_hook.clone(),
            )),
            Some(_) => {} // The container's own preStop is kept.
        }
    }
    let grace = grace_period(policy);
    match spec.termination_grace_period_seconds {
        None => operations.push(add("/spec/terminationGracePeriodSeconds", json!(grace))),
        Some(current) if current < grace => {
            operations.push(PatchOperation::Replace(ReplaceOperation {
                path: pointer("/spec/terminationGracePeriodSeconds"),
                value: json!(grace),
            }))
        }
        Some(_) => {}
    }
    match &pod.metadata.annotations {
        None => operations.push(add(
            "/metadata/annotations",
            json!({INJECTED_BY: policy.name_any()}),
        )),
        Some(_) => operations.push(add(
            "/metadata/annotations/mcpsession.dev~1injected-by",
            json!(policy.name_any()),
        )),
    }
    Injection::Patch(Patch(operations))
}

/// The termination grace period a selected pod needs: the drain, and under drain strategy
/// `Wait` the longest its sessions may keep it, since the backend's preStop hook holds until
/// they have ended.
fn grace_period(policy: &McpSessionPolicy) -> i64 {
    let drain = &policy.spec.drain;
    let wait = match drain.strategy {
        DrainStrategy::Move => 0,
        DrainStrategy::Wait => drain.max_wait_seconds,
    };
    wait + drain.timeout_seconds + GRACE_MARGIN_SECONDS
}

/// The proxy container injected for `policy`: its command line is the CLI's `proxy` (a test
/// parses it with the CLI's own parser).
pub(crate) fn proxy_container(
    policy: &McpSessionPolicy,
    config: &InjectorConfig,
    drain_token: &str,
    pod_annotations: Option<&std::collections::BTreeMap<String, String>>,
) -> Value {
    let spec = &policy.spec;
    let wiring = wiring::of(policy, config.log_format, pod_annotations);
    let mut env = wiring.env;
    env.push(json!({"name": env::DRAIN_TOKEN, "value": drain_token}));
    let admin = config.admin_port;
    let mut args = vec![
        "proxy".to_owned(),
        "--listen".to_owned(),
        format!("0.0.0.0:{}", spec.injection.proxy_port),
        "--upstream".to_owned(),
        format!("http://127.0.0.1:{}", spec.injection.upstream_port),
        "--admin-addr".to_owned(),
        format!("0.0.0.0:{admin}"),
    ];
    args.extend(wiring.args);
    let mut container = json!({
        "name": PROXY_CONTAINER,
        "image": config.image,
        "args": args,
        "env": env,
        "ports": [
            {"name": "mcp", "containerPort": spec.injection.proxy_port, "protocol": "TCP"},
            {"name": "mcp-admin", "containerPort": admin, "protocol": "TCP"},
        ],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": admin}, "periodSeconds": 2, "failureThreshold": 1},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": admin}, "periodSeconds": 10, "failureThreshold": 3},
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": wiring::restricted_security_context(),
    });
    // A native sidecar starts before the backend, which the kubelet starts only once its
    // startup probe passes: the backend's first request finds the proxy serving.
    sidecar_form(&mut container, policy, config);
    container
}

/// The hold container injected for `policy` in gateway mode under drain strategy `Wait`: the
/// CLI's `hold` (a test parses it with the CLI's own parser), on the admin port.
pub(crate) fn hold_container(
    policy: &McpSessionPolicy,
    config: &InjectorConfig,
    drain_token: &str,
    pod_annotations: Option<&std::collections::BTreeMap<String, String>>,
) -> Value {
    let wiring = wiring::hold(policy, config.log_format, pod_annotations);
    let mut env = wiring.env;
    env.push(json!({"name": env::DRAIN_TOKEN, "value": drain_token}));
    let admin = config.admin_port;
    let mut args = vec![
        "hold".to_owned(),
        "--admin-addr".to_owned(),
        format!("0.0.0.0:{admin}"),
    ];
    args.extend(wiring.args);
    let mut container = json!({
        "name": HOLD_CONTAINER,
        "image": config.image,
        "args": args,
        "env": env,
        "ports": [{"name": "mcp-admin", "containerPort": admin, "protocol": "TCP"}],
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": admin}, "periodSeconds": 10, "failureThreshold": 3},
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": wiring::restricted_security_context(),
    });
    sidecar_form(&mut container, policy, config);
    container
}

/// Gives an injected container the image pull policy the operator was told, and the native
/// sidecar's form where the policy's pods get one: started (and probed) before the backend.
fn sidecar_form(container: &mut Value, policy: &McpSessionPolicy, config: &InjectorConfig) {
    if let Some(policy) = &config.image_pull_policy {
        container["imagePullPolicy"] = json!(policy);
    }
    if config.native_sidecar_for(policy) {
        container["restartPolicy"] = json!("Always");
        container["startupProbe"] = json!({"httpGet": {"path": "/healthz", "port": config.admin_port},
            "periodSeconds": 1, "failureThreshold": 60});
    }
}

fn pointer(path: &str) -> PointerBuf {
    PointerBuf::parse(path).unwrap_or_else(|e| unreachable!("static JSON pointer {path}: {e}"))
}

fn add(path: &str, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: pointer(path),
        value,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const TOKEN: &str = "test-drain-token";

    /// A container's preStop `httpGet`.
    fn pre_stop_get(
        container: &k8s_openapi::api::core::v1::Container,
    ) -> &k8s_openapi::api::core::v1::HTTPGetAction {
        container
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.http_get.as_ref())
            .expect("a preStop httpGet")
    }

    fn policy(spec: Value) -> McpSessionPolicy {
        let mut spec = spec;
        spec["selector"] = json!({"matchLabels": {"app": "api"}});
        serde_json::from_value(
            json!({"apiVersion": "mcpsession.dev/v1alpha1", "kind": "McpSessionPolicy",
            "metadata": {"name": "api", "namespace": "prod"}, "spec": spec}),
        )
        .unwrap()
    }

    fn pod(extra: Value) -> Pod {
        let mut pod = json!({"metadata": {"name": "api-0", "labels": {"app": "api"}},
            "spec": {"containers": [{"name": "server", "image": "example/mcp", "ports": [{"containerPort": 8000}]}]}});
        json_patch::merge(&mut pod, &extra);
        serde_json::from_value(pod).unwrap()
    }

    fn patched(pod: &Pod, injection: Injection) -> Pod {
        let Injection::Patch(patch) = injection else {
            panic!("expected a patch, got {injection:?}")
        };
        let mut value = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut value, &patch).unwrap();
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn the_proxy_logs_as_the_operator_does_at_the_level_its_pod_asks() {
        let annotated = pod(
            json!({"metadata": {"annotations": {contract::PROXY_LOG_LEVEL: "info,mcp_session_operator=debug"}}}),
        );
        let config = InjectorConfig {
            log_format: LogFormat::Json,
            ..InjectorConfig::default()
        };
        let pod = patched(
            &annotated,
            inject(
                &annotated,
                &policy(json!({"redis": {"url": "redis://redis:6379"}})),
                &config,
                TOKEN,
            ),
        );
        let proxy = &pod.spec.unwrap().containers[1];
        let env: BTreeMap<_, _> = proxy
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.as_str(), e.value.as_deref()?)))
            .collect();
        assert_eq!(env[env::LOG_FILTER], "info,mcp_session_operator=debug");
        assert_eq!(env[env::LOG_FORMAT], "json");
    }

    #[test]
    fn injects_a_classic_sidecar_with_its_wiring() {
        let policy = policy(
            json!({"redis": {"urlSecretRef": {"name": "redis-auth", "key": "url"}}, "drain": {"timeoutSeconds": 40},
                   "injection": {"fingerprintKeySecretRef": {"name": "mcp-keys", "key": "fingerprint"},
                                 "allowedOrigins": ["https://app.example.com", "http://localhost:6274"]}}),
        );
        let original = pod(json!({}));
        let pod = patched(
            &original,
            inject(&original, &policy, &InjectorConfig::default(), TOKEN),
        );
        let spec = pod.spec.unwrap();
        assert_eq!(spec.containers.len(), 2);
        let proxy = &spec.containers[1];
        assert_eq!(proxy.name, PROXY_CONTAINER);
        let args = proxy.args.clone().unwrap().join(" ");
        assert!(args.starts_with("proxy --listen 0.0.0.0:8090 --upstream http://127.0.0.1:8000 --admin-addr 0.0.0.0:8091 --pod-name $(POD_NAME) --drain-timeout 40"), "{args}");
        let env = serde_json::to_value(&proxy.env).unwrap();
        let redis = env
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "MCP_SESSION_REDIS_URL")
            .unwrap();
        assert_eq!(
            redis["valueFrom"]["secretKeyRef"],
            json!({"name": "redis-auth", "key": "url"}),
            "never the URL itself"
        );
        let key = env
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "MCP_SESSION_FINGERPRINT_KEY")
            .unwrap();
        assert_eq!(
            key["valueFrom"]["secretKeyRef"],
            json!({"name": "mcp-keys", "key": "fingerprint"}),
            "the fingerprint key from its Secret, never a literal"
        );
        let security = proxy.security_context.as_ref().unwrap();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(
            security.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".to_owned()])
        );
        assert!(proxy.readiness_probe.is_some() && proxy.liveness_probe.is_some());
        let hook = pre_stop_get(&spec.containers[0]);
        assert_eq!(hook.path.as_deref(), Some("/drain"));
        // The pod's drain token, in the hook and in the proxy's environment.
        let headers = hook.http_headers.as_ref().unwrap();
        assert_eq!(
            (headers[0].name.as_str(), headers[0].value.as_str()),
            ("X-Mcp-Drain-Token", TOKEN)
        );
        let env = serde_json::to_value(&proxy.env).unwrap().to_string();
        assert!(
            env.contains(r#"{"name":"MCP_SESSION_DRAIN_TOKEN","value":"test-drain-token"}"#),
            "{env}"
        );
        assert!(
            env.contains(r#"{"name":"MCP_SESSION_ALLOWED_ORIGINS","value":"https://app.example.com,http://localhost:6274"}"#),
            "the policy's origins, as the proxy's --allowed-origin reads them: {env}"
        );
        assert_ne!(drain_token(), drain_token(), "one per pod");
        assert_eq!(spec.termination_grace_period_seconds, Some(55));
        assert!(
            proxy.lifecycle.is_none(),
            "the proxy retires on SIGTERM, which a classic sidecar gets at once"
        );
        assert_eq!(pod.metadata.annotations.unwrap()[INJECTED_BY], "api");
    }

    #[test]
    fn a_pod_whose_sessions_wait_gets_the_grace_to_serve_them_and_its_ip() {
        let policy = policy(json!({"redis": {"url": "redis://r:6379"},
            "drain": {"timeoutSeconds": 20, "strategy": "Wait", "maxWaitSeconds": 600}}));
        let original = pod(json!({"spec": {"containers": [
            {"name": "server", "image": "example/mcp",
             "livenessProbe": {"httpGet": {"path": "/livez", "port": 8000}}},
            {"name": "helper", "image": "example/helper",
             "livenessProbe": {"httpGet": {"path": "/livez", "port": 9000}, "terminationGracePeriodSeconds": 5}}]}}));
        let pod = patched(
            &original,
            inject(&original, &policy, &InjectorConfig::default(), TOKEN),
        );
        let spec = pod.spec.unwrap();
        assert_eq!(
            spec.termination_grace_period_seconds,
            Some(600 + 20 + GRACE_MARGIN_SECONDS),
            "the backend's preStop holds until the sessions end, or the maximum wait"
        );
        let liveness_grace = |index: usize| {
            spec.containers[index]
                .liveness_probe
                .as_ref()
                .and_then(|probe| probe.termination_grace_period_seconds)
        };
        assert_eq!(
            liveness_grace(0),
            Some(20 + GRACE_MARGIN_SECONDS),
            "a sick server restarts after the drain, not after the wait"
        );
        assert_eq!(liveness_grace(1), Some(5), "a container's own is kept");
        let proxy = &spec.containers[2];
        let env = serde_json::to_value(&proxy.env).unwrap().to_string();
        assert!(
            env.contains(
                r#"{"name":"POD_IP","valueFrom":{"fieldRef":{"fieldPath":"status.podIP"}}}"#
            ),
            "where the other proxies forward this pod's sessions: {env}"
        );
        let args = proxy.args.as_ref().unwrap().join(" ");
        assert!(
            args.contains("--drain-strategy wait --max-wait-seconds 600 --on-owner-lost fail"),
            "{args}"
        );
    }

    #[test]
    fn a_gateway_s_pods_whose_sessions_wait_get_the_hold_and_the_grace_to_serve_them() {
        let waiting = policy(
            json!({"redis": {"urlSecretRef": {"name": "redis-auth", "key": "url"}},
            "drain": {"timeoutSeconds": 20, "strategy": "Wait", "maxWaitSeconds": 600},
            "injection": {"enabled": false}, "gateway": {"enabled": true}}),
        );
        let original = pod(json!({"spec": {"containers": [
            {"name": "server", "image": "example/mcp",
             "livenessProbe": {"httpGet": {"path": "/livez", "port": 8000}}}]}}));
        let config = InjectorConfig {
            native_sidecar: true,
            ..Default::default()
        };
        let pod = patched(&original, inject(&original, &waiting, &config, TOKEN));
        let spec = pod.spec.unwrap();
        assert_eq!(
            spec.containers.len(),
            1,
            "no proxy: the gateway is the proxy"
        );
        let hold = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(hold.name, HOLD_CONTAINER);
        assert_eq!(
            hold.restart_policy.as_deref(),
            Some("Always"),
            "stopped last"
        );
        let args = hold.args.clone().unwrap().join(" ");
        assert_eq!(
            args,
            "hold --admin-addr 0.0.0.0:8091 --pod-name $(POD_NAME) --key-prefix mcp:session: --max-wait-seconds 600"
        );
        let env = serde_json::to_value(&hold.env).unwrap().to_string();
        assert!(
            env.contains(r#""secretKeyRef":{"key":"url","name":"redis-auth"}"#),
            "Redis by reference: {env}"
        );
        let hook = pre_stop_get(&spec.containers[0]);
        assert_eq!(hook.path.as_deref(), Some("/hold"));
        assert_eq!(
            hook.host, None,
            "the pod's own: Pod Security forbids another host"
        );
        let headers = hook.http_headers.as_ref().unwrap();
        assert_eq!(headers[0].value, TOKEN);
        assert!(env.contains(TOKEN), "the hold knows the pod's drain token");
        assert_eq!(
            spec.termination_grace_period_seconds,
            Some(600 + 20 + GRACE_MARGIN_SECONDS)
        );
        let liveness = spec.containers[0].liveness_probe.as_ref().unwrap();
        assert_eq!(
            liveness.termination_grace_period_seconds,
            Some(20 + GRACE_MARGIN_SECONDS),
            "a sick server restarts after the drain, not after the wait"
        );

        // A gateway whose sessions move changes nothing in its pods.
        let moving = policy(json!({"redis": {"url": "redis://r:6379"},
            "injection": {"enabled": false}, "gateway": {"enabled": true}}));
        assert_eq!(
            inject(&original, &moving, &config, TOKEN),
            Injection::Skip("the policy injects nothing")
        );
    }

    #[test]
    fn injects_a_native_sidecar_where_the_cluster_has_them() {
        let policy = policy(json!({"redis": {"url": "redis://r:6379"}}));
        let config = InjectorConfig {
            native_sidecar: true,
            ..Default::default()
        };
        let original =
            pod(json!({"spec": {"initContainers": [{"name": "migrate", "image": "x"}]}}));
        let pod = patched(&original, inject(&original, &policy, &config, TOKEN));
        let spec = pod.spec.unwrap();
        assert_eq!(spec.containers.len(), 1);
        let init = spec.init_containers.unwrap();
        assert_eq!(init[1].name, PROXY_CONTAINER);
        assert_eq!(init[1].restart_policy.as_deref(), Some("Always"));
        let startup = init[1]
            .startup_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref());
        assert_eq!(
            startup.and_then(|get| get.path.as_deref()),
            Some("/healthz"),
            "the backend starts once the proxy serves"
        );
        assert_eq!(
            pre_stop_get(&spec.containers[0]).path.as_deref(),
            Some("/retire"),
            "a native sidecar hears of a pod stop only through the backend's hook"
        );
        let env = serde_json::to_value(&init[1].env).unwrap();
        assert!(env.to_string().contains(r#""value":"redis://r:6379""#));
    }

    #[test]
    fn the_policy_chooses_the_sidecar_over_the_operator() {
        let original = pod(json!({}));
        for (asked, operator_native, native) in [
            (Some("Native"), false, true),
            (Some("Classic"), true, false),
            (None, true, true),
            (None, false, false),
        ] {
            let mut spec = json!({"redis": {"url": "redis://r:6379"}});
            if let Some(asked) = asked {
                spec["injection"] = json!({"sidecar": asked});
            }
            let config = InjectorConfig {
                native_sidecar: operator_native,
                ..Default::default()
            };
            let pod = patched(&original, inject(&original, &policy(spec), &config, TOKEN));
            let spec = pod.spec.unwrap();
            let in_init = spec
                .init_containers
                .iter()
                .flatten()
                .any(|c| c.name == PROXY_CONTAINER);
            assert_eq!(
                in_init, native,
                "policy {asked:?}, operator native {operator_native}"
            );
            let hook = pre_stop_get(&spec.containers[0]).path.as_deref();
            assert_eq!(hook, Some(if native { "/retire" } else { "/drain" }));
        }
    }

    #[test]
    fn is_idempotent_and_respects_opt_outs_own_hooks_and_longer_grace() {
        let policy = policy(json!({"redis": {"url": "redis://r:6379"}}));
        let config = InjectorConfig::default();
        let original = pod(json!({}));
        let once = patched(&original, inject(&original, &policy, &config, TOKEN));
        assert_eq!(
            inject(&once, &policy, &config, TOKEN),
            Injection::Skip("already injected")
        );
        let opted = pod(json!({"metadata": {"annotations": {INJECT_KEY: "false"}}}));
        assert_eq!(
            inject(&opted, &policy, &config, TOKEN),
            Injection::Skip("opted out")
        );
        let own = pod(json!({"spec": {"terminationGracePeriodSeconds": 600,
            "containers": [{"name": "server", "image": "x", "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}}}]}}));
        let patched_own = patched(&own, inject(&own, &policy, &config, TOKEN));
        let spec = patched_own.spec.unwrap();
        assert!(
            spec.containers[0]
                .lifecycle
                .as_ref()
                .unwrap()
                .pre_stop
                .as_ref()
                .unwrap()
                .exec
                .is_some(),
            "own preStop kept"
        );
        assert_eq!(
            spec.termination_grace_period_seconds,
            Some(600),
            "a longer grace period is kept"
        );
    }

    #[test]
    fn a_port_collision_is_admitted_unchanged_with_a_warning() {
        let policy = policy(json!({"redis": {"url": "redis://r:6379"}}));
        let clash = pod(
            json!({"spec": {"containers": [{"name": "server", "image": "x", "ports": [{"containerPort": 8090}]}]}}),
        );
        let Injection::Conflict(message) =
            inject(&clash, &policy, &InjectorConfig::default(), TOKEN)
        else {
            panic!()
        };
        assert!(message.contains("port 8090"), "{message}");
        let empty: Pod =
            serde_json::from_value(json!({"metadata": {"name": "x"}, "spec": {"containers": []}}))
                .unwrap();
        assert_eq!(
            inject(&empty, &policy, &InjectorConfig::default(), TOKEN),
            Injection::Skip("no containers")
        );
    }
}
