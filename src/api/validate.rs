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
    #[error("{}", WAIT_IN_GATEWAY)]
    WaitInGateway,
}

/// Gateway mode keeps a session on its backend pod while the pod is ready, and moves it by
/// replay when the pod stops; holding a stopping backend pod for its sessions needs a hook in
/// that pod, which gateway mode does not inject.
pub(super) const WAIT_IN_GATEWAY: &str = "spec.drain.strategy: Wait is for injected proxies; gateway mode moves sessions (set strategy Move, or turn spec.gateway off)";

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
    if spec.gateway.enabled && spec.drain.strategy == super::DrainStrategy::Wait {
        return Err(PolicyError::WaitInGateway);
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
