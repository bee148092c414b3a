//! The names the operator, the webhook, the proxy and the chart share: what one part writes and
//! another reads. They live here, at the bottom of the crate, so that no part imports another
//! only to learn a name.

/// The field manager of everything the operator and its webhook apply or patch.
pub const FIELD_MANAGER: &str = "mcp-session-operator";

/// Name of the injected proxy container.
pub const PROXY_CONTAINER: &str = "mcp-session-proxy";
/// Name of the injected hold container (gateway mode, drain strategy `Wait`).
pub const HOLD_CONTAINER: &str = "mcp-session-hold";
/// Label or annotation that opts a pod out of injection when `"false"`.
pub const INJECT_KEY: &str = "mcpsession.dev/inject";
/// Annotation naming the policy that injected a pod.
pub const INJECTED_BY: &str = "mcpsession.dev/injected-by";
/// Annotation of a pod (its proxy) or a policy (all its proxies, the gateway's too) that sets
/// the proxies' log filter (`RUST_LOG` syntax: `debug`, `info,mcp_session_operator=debug`).
/// A pod's wins over its policy's.
pub const PROXY_LOG_LEVEL: &str = "mcpsession.dev/proxy-log-level";

/// The header in which the proxy's `/drain`, `/retire` and `/sessions` require the pod's drain
/// token (the webhook puts it into the backend's preStop hook).
pub const DRAIN_TOKEN_HEADER: &str = "X-Mcp-Drain-Token";

/// The header on a request one proxy forwards to the proxy of the pod that owns its session
/// (drain strategy `Wait`): an HMAC of the session id under the policy's fingerprint key, so
/// that only the policy's proxies make one.
pub const HOP_HEADER: &str = "X-Mcp-Session-Hop";

/// How long a stopping pod serves its sessions under drain strategy `Wait`, unless the policy
/// says (`spec.drain.maxWaitSeconds`).
pub const DEFAULT_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The image the operator injects and runs its gateways from, unless told otherwise: this
/// build's own.
pub fn default_image() -> String {
    format!("mcp-session-operator:{}", env!("CARGO_PKG_VERSION"))
}

/// What a proxy admits unless its flags (or its policy's `spec.limits`) say otherwise.
pub mod admission {
    /// Sessions one identity may hold in one proxy.
    pub const SESSIONS_PER_CREDENTIAL: usize = 10_000;
    /// Sessions one proxy may hold in all.
    pub const SESSIONS_PER_PROXY: usize = 20_000;
    /// Identities new to a proxy that it admits per minute.
    pub const NEW_IDENTITIES_PER_MINUTE: u32 = 600;
}

/// The environment variables the binary reads: one name for the flag that reads each and for
/// the webhook that sets it in injected pods.
pub mod env {
    pub const REDIS_URL: &str = "MCP_SESSION_REDIS_URL";
    pub const KEY_PREFIX: &str = "MCP_SESSION_KEY_PREFIX";
    pub const REDIS_CLUSTER: &str = "MCP_SESSION_REDIS_CLUSTER";
    pub const REDIS_CA_FILE: &str = "MCP_SESSION_REDIS_CA_FILE";
    pub const FINGERPRINT_KEY: &str = "MCP_SESSION_FINGERPRINT_KEY";
    pub const DRAIN_TOKEN: &str = "MCP_SESSION_DRAIN_TOKEN";
    pub const ALLOWED_ORIGINS: &str = "MCP_SESSION_ALLOWED_ORIGINS";
    pub const LOG_FORMAT: &str = "MCP_SESSION_LOG_FORMAT";
    /// The log filter (`tracing-subscriber`'s `EnvFilter` syntax).
    pub const LOG_FILTER: &str = "RUST_LOG";
    /// The pod's name, from the downward API.
    pub const POD_NAME: &str = "POD_NAME";
    /// The pod's IP (the downward API's `status.podIP`): where other proxies reach this one.
    pub const POD_IP: &str = "POD_IP";
}
