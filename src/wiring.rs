//! What every session proxy of a policy is told, whether the webhook injects it beside a server
//! (`proxy`) or the controller runs it as the policy's gateway (`gateway`): the options and
//! environment both take from the policy, written once. Tests parse both command lines with
//! the CLI's own parser.

use serde_json::{Value, json};

use crate::api::McpSessionPolicy;
use crate::api::contract::env;

/// The policy's part of a proxy's command line and environment.
pub struct Wiring {
    pub args: Vec<String>,
    pub env: Vec<Value>,
}

/// The options and environment `policy` gives its proxies: the pod's name and IP, Redis (its URL from
/// the Secret by reference, never copied into the pod), the fingerprint key (by reference), the
/// allowed origins, the drain timeout and strategy, the binding, the key prefix, the TTL and the admission
/// limits.
pub fn of(policy: &McpSessionPolicy) -> Wiring {
    let spec = &policy.spec;
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    let mut env = vec![
        json!({"name": env::POD_NAME, "valueFrom": field("metadata.name")}),
        json!({"name": env::POD_IP, "valueFrom": field("status.podIP")}),
    ];
    match (&spec.redis.url_secret_ref, &spec.redis.url) {
        (Some(secret), _) => env.push(json!({"name": env::REDIS_URL,
            "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}})),
        (None, Some(url)) => env.push(json!({"name": env::REDIS_URL, "value": url})),
        (None, None) => {}
    }
    if spec.redis.cluster {
        env.push(json!({"name": env::REDIS_CLUSTER, "value": "true"}));
    }
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

/// The security context of every container the operator adds or runs: not root, nothing
/// writable, no privilege.
pub fn restricted_security_context() -> Value {
    json!({
        "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
        "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    })
}
