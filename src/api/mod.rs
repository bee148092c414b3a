//! The `McpSessionPolicy` custom resource (group `mcpsession.dev`, version `v1alpha1`).
//!
//! The schema carries what OpenAPI and CEL can check (required fields, bounds, patterns, enums,
//! defaults; one of url and urlSecretRef, ports that differ, a selector that selects
//! something), so that the apiserver refuses a bad policy even while the operator is down; the
//! validating webhook checks what needs parsing (see `validate`).

pub mod contract;
pub mod origin;
pub mod pod;
mod validate;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, ObjectMeta};
use kube::core::SelectorExt as _;
use kube::{CustomResource, KubeSchema, ResourceExt as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use self::validate::{PolicyError, validate_spec};
use crate::store::binding::SessionBinding;
use crate::store::{DEFAULT_KEY_PREFIX, DEFAULT_TTL};

/// Which pods serve MCP, how their sessions are stored, and how they drain.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "mcpsession.dev",
    version = "v1alpha1",
    kind = "McpSessionPolicy",
    plural = "mcpsessionpolicies",
    shortname = "msp",
    category = "mcp",
    namespaced,
    status = "McpSessionPolicyStatus",
    printcolumn = r#"{"name":"Sessions","type":"integer","jsonPath":".status.sessions.total"}"#,
    printcolumn = r#"{"name":"Draining","type":"integer","jsonPath":".status.sessions.draining"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Strategy","type":"string","jsonPath":".spec.drain.strategy"}"#,
    printcolumn = r#"{"name":"Gateway","type":"boolean","jsonPath":".spec.gateway.enabled"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new(NO_REPLAY_IN_GATEWAY).message(validate::REPLAY_IN_GATEWAY))]
#[serde(rename_all = "camelCase")]
pub struct McpSessionPolicySpec {
    /// The backend pods that serve MCP, in the policy's namespace.
    #[x_kube(validation = Rule::new(REQUIRES_A_LABEL)
        .message("spec.selector must require a label: give matchLabels, or a matchExpressions entry with operator In or Exists")
        .reason(Reason::FieldValueRequired))]
    pub selector: LabelSelector,
    /// Sliding session TTL: every request of a session extends it by this much.
    #[serde(default = "default_ttl_seconds")]
    #[schemars(range(min = 60, max = 2_592_000))]
    pub ttl_seconds: i64,
    /// Where sessions are stored.
    pub redis: RedisSpec,
    /// How a stopping pod hands its sessions over (docs/rollouts.md).
    #[serde(default)]
    pub drain: DrainSpec,
    /// The session proxy the webhook injects into selected pods.
    #[serde(default)]
    pub injection: InjectionSpec,
    /// The rollout guard.
    #[serde(default)]
    pub rollout: RolloutSpec,
    /// Gateway mode (docs/gateway.md): the proxy as a Deployment of its own in front of the
    /// selected pods, so that a pod that dies costs no client its connection.
    #[serde(default)]
    pub gateway: GatewaySpec,
    /// What a session is bound to, so that no other client can use its id: `Identity` (a
    /// bearer JWT's issuer and subject, so that a refreshed token keeps the session; any other
    /// credential as a whole), `Credential` (the Authorization header as a whole: a refreshed
    /// token is refused), or `None` (anyone who knows the session id).
    #[serde(default)]
    pub binding: SessionBinding,
    /// What each of the policy's proxies (injected, or its gateway's) admits: a new session
    /// beyond these gets 429 with `Retry-After` (docs/security.md).
    #[serde(default)]
    pub limits: SessionLimits,
}

/// CEL: a label selector that requires a label, by value or by key (an empty one selects every
/// pod; one of only `NotIn` and `DoesNotExist` selects unlabelled pods too).
const REQUIRES_A_LABEL: &str = "(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && self.matchExpressions.exists(e, e.operator == 'In' || e.operator == 'Exists'))";

/// CEL: `onOwnerLost: Replay` under `Wait` only with injected proxies (see
/// [`validate::REPLAY_IN_GATEWAY`]).
const NO_REPLAY_IN_GATEWAY: &str = "!(has(self.gateway) && has(self.gateway.enabled) && self.gateway.enabled && has(self.drain) && has(self.drain.strategy) && self.drain.strategy == 'Wait' && has(self.drain.onOwnerLost) && self.drain.onOwnerLost == 'Replay')";

fn default_ttl_seconds() -> i64 {
    DEFAULT_TTL.as_secs() as i64
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.url) != has(self.urlSecretRef)")
    .message("spec.redis: set exactly one of url and urlSecretRef"))]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// `redis://[user:password@]host:port[/db]`, `rediss://` for TLS, or comma-separated seed
    /// URLs of a Redis Cluster. Prefer `urlSecretRef` when the URL holds a password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^rediss?://\S+$"), length(max = 2048))]
    pub url: Option<String>,
    /// A key of a Secret in the policy's namespace holding the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_secret_ref: Option<SecretKeyRef>,
    /// Prefix of session keys; the seed's default is `mcp:session:`.
    #[serde(default = "default_key_prefix")]
    // Visible ASCII without braces, `*`, `?`, `[`, `\` and `]` (see docs/redis-schema.md).
    #[schemars(regex(pattern = r"^[!-)+->@-Z^-z|~]{1,200}$"))]
    pub key_prefix: String,
    /// The URL names a Redis Cluster.
    #[serde(default)]
    pub cluster: bool,
    /// How sessions are counted: `Index` (O(log n), for sessions written by the proxy), or `Scan`
    /// (an incremental SCAN, for backends that write seed-style keys only).
    #[serde(default)]
    pub count_by: CountBy,
}

fn default_key_prefix() -> String {
    DEFAULT_KEY_PREFIX.to_owned()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum CountBy {
    #[default]
    Index,
    Scan,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key in the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainSpec {
    /// How long a draining pod waits for in-flight requests before it stops.
    #[serde(default = "default_drain_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: i64,
    /// What happens to a stopping pod's sessions: `Move` (replayed on another pod: right for
    /// servers whose sessions are only the handshake) or `Wait` (each stays on its pod until
    /// it ends: for servers that keep a session's state in memory).
    #[serde(default)]
    pub strategy: DrainStrategy,
    /// Under `Wait`: how long a stopping pod serves its sessions at most; those still open then
    /// are lost (answered 404 and counted). The pods' termination grace period is set to match.
    #[serde(default = "default_max_wait")]
    #[schemars(range(min = 1, max = 86_400))]
    pub max_wait_seconds: i64,
    /// Under `Wait`: what a session whose pod is gone (a crash, an OOM kill, `maxWaitSeconds`)
    /// becomes: `Fail` (answered 404, so that the client starts a new session knowingly, and
    /// counted as lost) or `Replay` (replayed on another pod, its server-side state gone).
    #[serde(default)]
    pub on_owner_lost: OnOwnerLost,
}

fn default_drain_timeout() -> i64 {
    30
}

fn default_max_wait() -> i64 {
    crate::api::contract::DEFAULT_MAX_WAIT.as_secs() as i64
}

impl Default for DrainSpec {
    fn default() -> Self {
        Self {
            timeout_seconds: default_drain_timeout(),
            strategy: DrainStrategy::default(),
            max_wait_seconds: default_max_wait(),
            on_owner_lost: OnOwnerLost::default(),
        }
    }
}

/// What the webhook adds to a selected pod (see [`McpSessionPolicy::pod_injection`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodInjection {
    /// The session proxy, in front of the pod's MCP server.
    Proxy,
    /// The hold, on which the backend's preStop hook waits until the pod's sessions end.
    Hold,
}

/// What a stopping pod does with its sessions (docs/rollouts.md, "Move or Wait").
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, clap::ValueEnum,
)]
pub enum DrainStrategy {
    /// Each session moves to another pod, its handshake replayed there.
    #[default]
    Move,
    /// Each session stays on its pod until it ends (or `maxWaitSeconds`); requests that reach
    /// another pod are forwarded to it.
    Wait,
}

/// What becomes of a session under `Wait` whose pod is gone.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, clap::ValueEnum,
)]
pub enum OnOwnerLost {
    /// Answered 404 and counted as lost: the client starts a new session knowingly.
    #[default]
    Fail,
    /// Replayed on another pod, as `Move` would: the session answers, its state is gone.
    Replay,
}

impl DrainSpec {
    /// Whether a session whose pod is gone is lost (answered 404, counted) rather than moved:
    /// drain strategy `Wait` with `onOwnerLost: Fail`.
    pub fn loses_orphans(&self) -> bool {
        self.strategy == DrainStrategy::Wait && self.on_owner_lost == OnOwnerLost::Fail
    }
}

impl DrainStrategy {
    /// The proxy's flag value.
    pub fn as_flag(self) -> &'static str {
        match self {
            Self::Move => "move",
            Self::Wait => "wait",
        }
    }
}

impl OnOwnerLost {
    /// The proxy's flag value.
    pub fn as_flag(self) -> &'static str {
        match self {
            Self::Fail => "fail",
            Self::Replay => "replay",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("self.proxyPort != self.upstreamPort")
    .message("spec.injection: proxyPort and upstreamPort must differ"))]
#[serde(rename_all = "camelCase")]
pub struct InjectionSpec {
    /// Inject the session proxy into selected pods.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Port the proxy listens on (what Services should target).
    #[serde(default = "default_proxy_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub proxy_port: i32,
    /// Port of the MCP server in the pod.
    #[serde(default = "default_upstream_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub upstream_port: i32,
    /// A key of a Secret in the policy's namespace holding the key the proxies fingerprint
    /// credentials with (HMAC-SHA-256), the same for every pod of the policy. Without it the
    /// operator generates one for the policy: the Secret `<policy>-fingerprint-key`, owned by
    /// the policy (deleted with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint_key_secret_ref: Option<SecretKeyRef>,
    /// Web page origins (`https://app.example.com`, `null`, or `*` for any) whose requests the
    /// proxy passes; a request with another `Origin` gets 403. Requests without `Origin` (clients
    /// that are not browsers) always pass. Empty: pages of localhost only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_origins: Vec<String>,
    /// How the proxy joins the pod: `Native` (an init container with `restartPolicy: Always`,
    /// started before the server and stopped after it; Kubernetes 1.29 and newer) or
    /// `Classic` (a container beside the server). Omitted: the operator's `--sidecar`, by
    /// default native where the cluster has native sidecars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<Sidecar>,
}

/// The two ways a pod can carry the session proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Sidecar {
    Native,
    Classic,
}

fn default_true() -> bool {
    true
}
fn default_proxy_port() -> i32 {
    8090
}
fn default_upstream_port() -> i32 {
    8000
}

impl Default for InjectionSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            proxy_port: default_proxy_port(),
            upstream_port: default_upstream_port(),
            fingerprint_key_secret_ref: None,
            allowed_origins: Vec::new(),
            sidecar: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Run a gateway for this policy: a Deployment, Service, PodDisruptionBudget and
    /// ServiceAccount named `<policy>-gateway`, owned by the policy. Turn `injection` off with
    /// it: the gateway is the proxy.
    #[serde(default)]
    pub enabled: bool,
    /// Gateway pods; two or more, so that one can stop while the other serves.
    #[serde(default = "default_gateway_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: i32,
    /// Port of the gateway's Service and pods: what clients connect to.
    #[serde(default = "default_proxy_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Port of the MCP server in each selected pod.
    #[serde(default = "default_upstream_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub backend_port: i32,
    /// The gateway container's resources (default: 100m CPU and 64Mi requested, 512Mi limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
}

fn default_gateway_replicas() -> i32 {
    2
}

impl Default for GatewaySpec {
    fn default() -> Self {
        Self {
            enabled: false,
            replicas: default_gateway_replicas(),
            port: default_proxy_port(),
            backend_port: default_upstream_port(),
            resources: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionLimits {
    /// Sessions one proxy may hold in all, whoever opened them.
    #[serde(default = "default_sessions_per_proxy")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub sessions_per_proxy: i32,
    /// Identities (as `binding` sees them) that hold no session in a proxy yet, admitted by it
    /// per minute, in bursts of up to a tenth of it; 0: no limit. A client that varies its
    /// Authorization value is held to this.
    #[serde(default = "default_new_identities_per_minute")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub new_identities_per_minute: i32,
}

fn default_sessions_per_proxy() -> i32 {
    i32::try_from(contract::admission::SESSIONS_PER_PROXY).unwrap_or(i32::MAX)
}
fn default_new_identities_per_minute() -> i32 {
    i32::try_from(contract::admission::NEW_IDENTITIES_PER_MINUTE).unwrap_or(i32::MAX)
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            sessions_per_proxy: default_sessions_per_proxy(),
            new_identities_per_minute: default_new_identities_per_minute(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Pause a rollout (`spec.paused` of its Deployment) that loses more sessions than this.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub max_lost_sessions: i64,
}

impl RolloutSpec {
    /// The sessions a rollout may lose before it is paused (a negative value, which the schema
    /// refuses, counts as none).
    pub fn max_lost(&self) -> u64 {
        u64::try_from(self.max_lost_sessions).unwrap_or(0)
    }
}

/// What the operator observed, written by server-side apply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct McpSessionPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `RedisReachable`, `RolloutSafe`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub sessions: SessionTotals,
    /// Sessions owned by each selected pod.
    #[serde(default)]
    pub pod_sessions: Vec<PodSessions>,
    #[serde(default)]
    pub pods: PodTotals,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rollout: Option<RolloutStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SessionTotals {
    pub total: u64,
    pub active: u64,
    pub draining: u64,
    /// Active sessions owned by terminating pods, which serve them until they end (drain
    /// strategy `Wait`).
    #[serde(default)]
    pub waiting: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PodSessions {
    pub pod: String,
    pub sessions: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PodTotals {
    pub selected: u32,
    pub ready: u32,
    pub terminating: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The revision rolled out (the pods' `pod-template-hash` or `controller-revision-hash`).
    pub revision: String,
    /// Sessions marked draining by the proxies of pods that stopped, during the rollout.
    pub drained: u64,
    /// Draining sessions claimed by another pod and replayed to its server.
    pub rehydrated: u64,
    /// Sessions a client came back for and could not get.
    pub lost: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// When the guard paused the rollout for losing too many sessions (once per rollout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_at: Option<String>,
    /// What the guard paused, or could not pause (`Kind/name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
    /// The store's tallies when the rollout started: the counts are differences from these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<RolloutBaseline>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutBaseline {
    pub drained: u64,
    pub rehydrated: u64,
    pub lost: u64,
}

/// Condition types.
/// Where a policy's proxies get the key they fingerprint credentials with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FingerprintKey {
    /// The Secret key the policy names (`spec.injection.fingerprintKeySecretRef`).
    Named(SecretKeyRef),
    /// The Secret the operator generates for a policy that names none, owned by the policy.
    Generated(SecretKeyRef),
}

impl FingerprintKey {
    pub fn secret(&self) -> &SecretKeyRef {
        match self {
            Self::Named(secret) | Self::Generated(secret) => secret,
        }
    }
}

/// A label selector as a policy uses it: `None` if it is invalid or would select every pod (a
/// policy whose selector selects everything selects nothing).
pub fn pod_selector(selector: &LabelSelector) -> Option<kube::core::Selector> {
    kube::core::Selector::try_from(selector.clone())
        .ok()
        .filter(|selector| !selector.selects_all())
}

impl McpSessionPolicy {
    /// Whether this policy selects a pod with these `labels` in `namespace`: the one rule of
    /// the controller and the webhook.
    pub fn selects(
        &self,
        namespace: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> bool {
        self.namespace().as_deref() == Some(namespace)
            && pod_selector(&self.spec.selector).is_some_and(|selector| selector.matches(labels))
    }

    /// Metadata of an object the operator makes for this policy (its key Secret, its pods'
    /// NetworkPolicy): in the policy's namespace, labelled as the operator's, owned by the
    /// policy so that it is deleted with it. The owner reference does not block the policy's
    /// deletion, which would take `update` of policies' finalizers under
    /// OwnerReferencesPermissionEnforcement.
    pub fn owned_object_meta(&self, name: String) -> ObjectMeta {
        use kube::Resource as _;
        ObjectMeta {
            name: Some(name),
            namespace: self.namespace(),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "mcp-session-operator".to_owned(),
                )]
                .into(),
            ),
            owner_references: self.controller_owner_ref(&()).map(|mut owner| {
                owner.block_owner_deletion = None;
                vec![owner]
            }),
            ..ObjectMeta::default()
        }
    }

    /// What the webhook adds to the pods this policy selects: the session proxy (sidecar
    /// mode), or in gateway mode under drain strategy `Wait`, the hold that keeps a stopping
    /// pod for its sessions; nothing else in gateway mode, nor with injection off.
    pub fn pod_injection(&self) -> Option<PodInjection> {
        let spec = &self.spec;
        if spec.gateway.enabled && spec.drain.strategy == DrainStrategy::Wait {
            Some(PodInjection::Hold)
        } else if spec.injection.enabled {
            Some(PodInjection::Proxy)
        } else {
            None
        }
    }

    /// The key of the Secret holding this policy's fingerprint key: the one its spec names,
    /// else `<policy>-fingerprint-key`, key `key`, which the operator generates.
    pub fn fingerprint_key(&self) -> FingerprintKey {
        match &self.spec.injection.fingerprint_key_secret_ref {
            Some(secret) => FingerprintKey::Named(secret.clone()),
            None => FingerprintKey::Generated(SecretKeyRef {
                name: format!("{}-fingerprint-key", self.name_any()),
                key: "key".to_owned(),
            }),
        }
    }
}

pub mod condition {
    pub const READY: &str = "Ready";
    pub const REDIS_REACHABLE: &str = "RedisReachable";
    pub const ROLLOUT_SAFE: &str = "RolloutSafe";
    /// Services selecting the pods target the proxy's port, not the backend's.
    pub const SERVICES_ROUTED: &str = "ServicesRouted";
    /// Redis keeps session records until their TTL: it neither evicts them nor refuses writes.
    pub const SESSIONS_RETAINED: &str = "SessionsRetained";
    /// The Secret with the key the proxies fingerprint credentials with exists and holds it.
    pub const FINGERPRINT_KEY_READY: &str = "FingerprintKeyReady";
    /// Gateway mode: the policy's gateway is written and has a ready pod (or none is wanted).
    pub const GATEWAY_READY: &str = "GatewayReady";
    /// The apiserver admits the pods the selected pods' ReplicaSets create (a refusal by Pod
    /// Security admission is the backend's own spec: the injected proxy meets `restricted`).
    pub const PODS_ADMITTED: &str = "PodsAdmitted";
}

/// The CustomResourceDefinition as YAML: what `mcp-session-operator crd` prints and
/// `crds/mcpsessionpolicies.yaml` holds.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt as _;
    let crd = McpSessionPolicy::crd();
    let yaml =
        serde_yaml::to_string(&crd).unwrap_or_else(|e| unreachable!("a CRD serializes: {e}"));
    format!("# Generated by `mcp-session-operator crd`; do not edit.\n---\n{yaml}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `crds/mcpsessionpolicies.yaml` is what the code generates; regenerate it with
    /// `cargo run -- crd > crds/mcpsessionpolicies.yaml`.
    #[test]
    fn committed_crd_matches_the_code() {
        let committed = include_str!("../../crds/mcpsessionpolicies.yaml");
        assert!(
            committed == crd_yaml(),
            "crds/mcpsessionpolicies.yaml drifted: run `cargo run -- crd > crds/mcpsessionpolicies.yaml`"
        );
    }

    #[test]
    fn examples_parse_and_validate() {
        for example in [
            include_str!("../../examples/policy.yaml"),
            include_str!("../../examples/seed-only-policy.yaml"),
        ] {
            for document in serde_yaml::Deserializer::from_str(example) {
                let value = serde_yaml::Value::deserialize(document).unwrap();
                if value["kind"] == "McpSessionPolicy" {
                    let policy: McpSessionPolicy = serde_yaml::from_value(value).unwrap();
                    validate_spec(&policy.spec).unwrap();
                }
            }
        }
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let spec: McpSessionPolicySpec = serde_json::from_value(serde_json::json!({
            "selector": {"matchLabels": {"app": "x"}},
            "redis": {"url": "redis://r:6379"},
        }))
        .unwrap();
        assert_eq!(spec.ttl_seconds, 86_400);
        assert_eq!(spec.redis.key_prefix, "mcp:session:");
        assert_eq!(spec.drain.timeout_seconds, 30);
        assert_eq!(
            (spec.injection.proxy_port, spec.injection.upstream_port),
            (8090, 8000)
        );
        validate_spec(&spec).unwrap();
    }

    #[test]
    fn what_the_schema_cannot_check() {
        let base = || -> McpSessionPolicySpec {
            serde_json::from_value(serde_json::json!({"selector": {"matchLabels": {"app": "x"}}, "redis": {"url": "redis://r:6379"}})).unwrap()
        };
        let mut empty = base();
        empty.selector = Default::default();
        assert_eq!(validate_spec(&empty), Err(PolicyError::NoRequiredLabel));
        let mut only_exclusions = base();
        only_exclusions.selector = serde_json::from_value(serde_json::json!(
            {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["batch"]},
                                  {"key": "legacy", "operator": "DoesNotExist"}]}))
        .unwrap();
        assert_eq!(
            validate_spec(&only_exclusions),
            Err(PolicyError::NoRequiredLabel),
            "selects unlabelled pods"
        );
        let mut by_key = base();
        by_key.selector = serde_json::from_value(serde_json::json!(
            {"matchExpressions": [{"key": "mcp", "operator": "Exists"}]}))
        .unwrap();
        assert_eq!(validate_spec(&by_key), Ok(()));
        let mut both = base();
        both.redis.url_secret_ref = Some(SecretKeyRef {
            name: "s".into(),
            key: "k".into(),
        });
        assert_eq!(validate_spec(&both), Err(PolicyError::RedisTargetAmbiguous));
        let mut clash = base();
        clash.injection.upstream_port = 8090;
        assert_eq!(validate_spec(&clash), Err(PolicyError::PortClash(8090)));
        let mut waiting_gateway = base();
        waiting_gateway.gateway.enabled = true;
        waiting_gateway.drain.strategy = DrainStrategy::Wait;
        assert_eq!(validate_spec(&waiting_gateway), Ok(()));
        waiting_gateway.drain.on_owner_lost = OnOwnerLost::Replay;
        assert_eq!(
            validate_spec(&waiting_gateway),
            Err(PolicyError::ReplayInGateway)
        );
        waiting_gateway.gateway.enabled = false;
        assert_eq!(validate_spec(&waiting_gateway), Ok(()));
        let mut bad_origin = base();
        bad_origin.injection.allowed_origins = vec!["app.example.com".into()];
        assert_eq!(
            validate_spec(&bad_origin).map_err(|e| e.to_string()),
            Err("spec.injection.allowedOrigins: \"app.example.com\" is not an origin: use scheme://host[:port], `null` or `*`".into())
        );
        let mut bad_url = base();
        bad_url.redis.url = Some("redis://:pw@host:notaport".into());
        let err = validate_spec(&bad_url).unwrap_err().to_string();
        assert!(
            err.starts_with("spec.redis.url: invalid Redis URL") && !err.contains(":pw@"),
            "{err}"
        );
        let mut bad_expression = base();
        bad_expression.selector.match_expressions = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                key: "tier".into(),
                operator: "Near".into(),
                values: None,
            },
        ]);
        assert!(matches!(
            validate_spec(&bad_expression),
            Err(PolicyError::BadSelector(_))
        ));
    }
}
