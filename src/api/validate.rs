//! What the schema cannot check about a policy. Used by the controller (a condition) and by
//! the validating webhook (a denial).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::McpSessionPolicySpec;
use crate::store::RedisTarget;
use crate::store::redis::Keys;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "spec.selector must require a label: give matchLabels, or a matchExpressions entry with operator In or Exists"
    )]
    NoRequiredLabel,
    #[error("spec.selector: {0}")]
    BadSelector(String),
    #[error("spec.redis: set exactly one of url and urlSecretRef")]
    RedisTargetAmbiguous,
    #[error("spec.redis.url: {0}")]
    BadRedisUrl(String),
    #[error("spec.redis.keyPrefix: {0}")]
    BadKeyPrefix(String),
    #[error("spec.injection: proxyPort and upstreamPort must differ (both are {0})")]
    PortClash(i32),
    #[error("spec.injection.allowedOrigins: {0}")]
    BadOrigin(#[from] super::origin::InvalidOrigin),
    #[error("{}", REPLAY_IN_GATEWAY)]
    ReplayInGateway,
}

/// A gateway under `Wait` pins each session to its backend pod, and a session whose pod is gone
/// is answered 404: replaying it instead would need the gateway replicas to agree on the one
/// new pod and upstream session for it, which they do not (docs/rollouts.md).
pub(super) const REPLAY_IN_GATEWAY: &str = "spec.drain.onOwnerLost: Replay is for injected proxies; a gateway under strategy Wait answers a session whose pod is gone 404 (set onOwnerLost Fail, or strategy Move)";

/// Checks a spec beyond its schema.
pub fn validate_spec(spec: &McpSessionPolicySpec) -> Result<(), PolicyError> {
    validate_selector(&spec.selector)?;
    match (&spec.redis.url, &spec.redis.url_secret_ref) {
        (Some(url), None) => {
            RedisTarget::parse(url).map_err(|e| PolicyError::BadRedisUrl(e.to_string()))?;
        }
        (None, Some(_)) => {}
        _ => return Err(PolicyError::RedisTargetAmbiguous),
    }
    Keys::new(&spec.redis.key_prefix).map_err(|e| PolicyError::BadKeyPrefix(e.to_string()))?;
    if spec.injection.proxy_port == spec.injection.upstream_port {
        return Err(PolicyError::PortClash(spec.injection.proxy_port));
    }
    super::origin::AllowedOrigins::parse(&spec.injection.allowed_origins)?;
    if spec.gateway.enabled
        && spec.drain.strategy == super::DrainStrategy::Wait
        && spec.drain.on_owner_lost == super::OnOwnerLost::Replay
    {
        return Err(PolicyError::ReplayInGateway);
    }
    Ok(())
}

/// A selector must require some label (the CRD's CEL rule says the same): one of only
/// `NotIn` and `DoesNotExist` selects pods without labels, which the mutating webhook's
/// `matchConditions` never send to it.
fn validate_selector(selector: &LabelSelector) -> Result<(), PolicyError> {
    let labels = selector
        .match_labels
        .as_ref()
        .is_some_and(|l| !l.is_empty());
    let expressions = selector
        .match_expressions
        .iter()
        .flatten()
        .any(|e| e.operator == "In" || e.operator == "Exists");
    if !labels && !expressions {
        return Err(PolicyError::NoRequiredLabel);
    }
    kube::core::Selector::try_from(selector.clone())
        .map(drop)
        .map_err(|e| PolicyError::BadSelector(e.to_string()))
}
