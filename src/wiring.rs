//! What every session proxy of a policy is told, whether the webhook injects it beside a server
//! (`proxy`) or the controller runs it as the policy's gateway (`gateway`): the options and
//! environment both take from the policy, written once. Tests parse both command lines with
//! the CLI's own parser.

use std::collections::BTreeMap;

use kube::ResourceExt as _;
use serde_json::{Value, json};

use crate::api::McpSessionPolicy;
use crate::api::contract::{PROXY_LOG_LEVEL, env};
use crate::telemetry::LogFormat;

/// The policy's part of a proxy's command line and environment.
pub struct Wiring {
    pub args: Vec<String>,
    pub env: Vec<Value>,
}

/// The options and environment `policy` gives its proxies: the pod's name and IP, Redis (its URL from
/// the Secret by reference, never copied into the pod), the fingerprint key (by reference), the
/// allowed origins, the drain timeout and strategy, the binding, the key prefix, the TTL and the admission
/// limits; and how they log: in the operator's `format`, filtered as [`log_filter`] says for a
/// proxy in a pod annotated `pod_annotations`.
pub fn of(
    policy: &McpSessionPolicy,
    format: LogFormat,
    pod_annotations: Option<&BTreeMap<String, String>>,
) -> Wiring {
    let spec = &policy.spec;
    let mut env = common_env(policy, format, pod_annotations);
    env.push(json!({"name": env::POD_IP, "valueFrom": field("status.podIP")}));
    let key = policy.fingerprint_key();
    let secret = key.secret();
    env.push(json!({"name": env::FINGERPRINT_KEY,
        "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}}));
    if !spec.injection.allowed_origins.is_empty() {
        env.push(json!({"name": env::ALLOWED_ORIGINS,
            "value": spec.injection.allowed_origins.join(",")}));
    }
    let args = [
        "--pod-name",
        "$(POD_NAME)",
        "--drain-timeout",
        &spec.drain.timeout_seconds.to_string(),
        "--drain-strategy",
        spec.drain.strategy.as_flag(),
        "--max-wait-seconds",
        &spec.drain.max_wait_seconds.to_string(),
        "--on-owner-lost",
        spec.drain.on_owner_lost.as_flag(),
        "--binding",
        spec.binding.as_flag(),
        "--key-prefix",
        &spec.redis.key_prefix,
        "--ttl-seconds",
        &spec.ttl_seconds.to_string(),
        "--max-sessions",
        &spec.limits.sessions_per_proxy.to_string(),
        "--max-new-identities-per-minute",
        &spec.limits.new_identities_per_minute.to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    Wiring { args, env }
}

/// The options and environment of `policy`'s hold (gateway mode, drain strategy `Wait`): the
/// pod's name, Redis (by reference, as for the proxies), the key prefix, the maximum wait, and
/// how it logs, as the proxies do.
pub fn hold(
    policy: &McpSessionPolicy,
    format: LogFormat,
    pod_annotations: Option<&BTreeMap<String, String>>,
) -> Wiring {
    let spec = &policy.spec;
    let args = [
        "--pod-name",
        "$(POD_NAME)",
        "--key-prefix",
        &spec.redis.key_prefix,
        "--max-wait-seconds",
        &spec.drain.max_wait_seconds.to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    Wiring {
        args,
        env: common_env(policy, format, pod_annotations),
    }
}

/// What every container of a policy's is told: its pod's name, how it logs, and Redis.
fn common_env(
    policy: &McpSessionPolicy,
    format: LogFormat,
    pod_annotations: Option<&BTreeMap<String, String>>,
) -> Vec<Value> {
    let redis = &policy.spec.redis;
    let mut env = vec![
        json!({"name": env::POD_NAME, "valueFrom": field("metadata.name")}),
        json!({"name": env::LOG_FORMAT, "value": format.as_flag()}),
    ];
    if let Some(filter) = log_filter(policy, pod_annotations) {
        env.push(json!({"name": env::LOG_FILTER, "value": filter}));
    }
    match (&redis.url_secret_ref, &redis.url) {
        (Some(secret), _) => env.push(json!({"name": env::REDIS_URL,
            "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}})),
        (None, Some(url)) => env.push(json!({"name": env::REDIS_URL, "value": url})),
        (None, None) => {}
    }
    if redis.cluster {
        env.push(json!({"name": env::REDIS_CLUSTER, "value": "true"}));
    }
    env
}

/// An environment variable's value from the pod's own fields (the downward API).
fn field(path: &str) -> Value {
    json!({"fieldRef": {"fieldPath": path}})
}

/// The log filter of a proxy of `policy` in a pod annotated `pod_annotations`: the pod's
/// `mcpsession.dev/proxy-log-level`, else the policy's; none, the proxy's default (`info`).
pub fn log_filter<'a>(
    policy: &'a McpSessionPolicy,
    pod_annotations: Option<&'a BTreeMap<String, String>>,
) -> Option<&'a str> {
    pod_annotations
        .and_then(|a| a.get(PROXY_LOG_LEVEL))
        .or_else(|| policy.annotations().get(PROXY_LOG_LEVEL))
        .map(String::as_str)
}

/// The security context of every container the operator adds or runs: not root, nothing
/// writable, no privilege.
pub fn restricted_security_context() -> Value {
    json!({
        "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
        "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(annotations: Value) -> McpSessionPolicy {
        serde_json::from_value(json!({
            "apiVersion": "mcpsession.dev/v1alpha1", "kind": "McpSessionPolicy",
            "metadata": {"name": "api", "namespace": "apps", "annotations": annotations},
            "spec": {"selector": {"matchLabels": {"app": "api"}}, "redis": {"url": "redis://redis:6379"}}
        }))
        .expect("a policy")
    }

    fn env_of<'a>(wiring: &'a Wiring, name: &str) -> Option<&'a str> {
        wiring
            .env
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
    }

    #[test]
    fn a_pod_s_log_level_wins_over_its_policy_s_and_none_leaves_the_default() {
        let quiet = policy(json!({}));
        let loud = policy(json!({PROXY_LOG_LEVEL: "debug"}));
        let pod = BTreeMap::from([(PROXY_LOG_LEVEL.to_owned(), "trace".to_owned())]);
        let other = BTreeMap::from([("team".to_owned(), "a".to_owned())]);
        assert_eq!(log_filter(&quiet, None), None);
        assert_eq!(log_filter(&quiet, Some(&other)), None);
        assert_eq!(log_filter(&loud, None), Some("debug"), "the gateway's");
        assert_eq!(log_filter(&loud, Some(&other)), Some("debug"));
        assert_eq!(log_filter(&loud, Some(&pod)), Some("trace"));

        let wired = of(&loud, LogFormat::Json, Some(&pod));
        assert_eq!(env_of(&wired, env::LOG_FILTER), Some("trace"));
        assert_eq!(env_of(&wired, env::LOG_FORMAT), Some("json"));
        let wired = of(&quiet, LogFormat::Text, None);
        assert_eq!(env_of(&wired, env::LOG_FILTER), None, "the proxy's default");
        assert_eq!(env_of(&wired, env::LOG_FORMAT), Some("text"));
    }
}
