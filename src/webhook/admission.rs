//! The two admission handlers: decode an AdmissionReview, decide, encode the answer. Thin on
//! purpose: the decisions live in `inject` and in `api::validate_spec` / `overlap`.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt as _;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::{DynamicObject, SelectorExt as _};
use kube::runtime::reflector::Store;
use tracing::{info, warn};

use super::inject::{Injection, InjectorConfig, inject};
use crate::api::{McpSessionPolicy, pod_selector, validate_spec};

pub const REVIEW_API_VERSION: &str = "admission.k8s.io/v1";

/// Why a request body is no AdmissionReview we can answer (HTTP 400, never a 500).
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("the body is not an AdmissionReview: {0}")]
    Malformed(String),
    #[error("AdmissionReview apiVersion {0:?} is not supported; {REVIEW_API_VERSION} is served")]
    ApiVersion(String),
    #[error("the AdmissionReview has no request")]
    NoRequest,
}

/// Decodes a review; never panics, whatever the bytes.
pub fn decode(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, ReviewError> {
    // The version first: a review of another version is named as such, not as malformed.
    let types: kube::core::TypeMeta =
        serde_json::from_slice(body).map_err(|e| ReviewError::Malformed(e.to_string()))?;
    if types.api_version != REVIEW_API_VERSION {
        return Err(ReviewError::ApiVersion(types.api_version));
    }
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| ReviewError::Malformed(e.to_string()))?;
    if review.types.api_version != REVIEW_API_VERSION {
        return Err(ReviewError::ApiVersion(review.types.api_version));
    }
    review.try_into().map_err(|_| ReviewError::NoRequest)
}

/// Namespaces whose pods are never mutated, whatever the webhook configuration selects (its
/// namespaceSelector reads a label, which an administrator can change).
pub struct Exclusions {
    pub namespaces: Vec<String>,
}

/// What the pod webhook decided for one pod.
pub struct Mutation {
    pub response: AdmissionResponse,
    /// The policy whose proxy the response's patch injects.
    pub injected: Option<Arc<McpSessionPolicy>>,
    /// A policy that selects the pod but whose proxy cannot be injected, and why.
    pub conflict: Option<(McpSessionPolicy, String)>,
}

impl Mutation {
    fn unchanged(response: AdmissionResponse) -> Self {
        Self {
            response,
            injected: None,
            conflict: None,
        }
    }
}

/// `POST /mutate-pods`.
pub fn mutate_pod(
    request: &AdmissionRequest<DynamicObject>,
    policies: &Store<McpSessionPolicy>,
    config: &InjectorConfig,
    exclusions: &Exclusions,
) -> Mutation {
    let response = AdmissionResponse::from(request);
    let namespace = request.namespace.clone().unwrap_or_default();
    if request.operation != Operation::Create || exclusions.namespaces.contains(&namespace) {
        return Mutation::unchanged(response);
    }
    let Some(object) = &request.object else {
        return Mutation::unchanged(response);
    };
    let pod: Pod = match serde_json::to_value(object).and_then(serde_json::from_value) {
        Ok(pod) => pod,
        Err(error) => {
            warn!(%namespace, %error, "admitting a pod that does not decode, unchanged");
            return Mutation::unchanged(response);
        }
    };
    let mut matching: Vec<Arc<McpSessionPolicy>> = policies
        .state()
        .into_iter()
        .filter(|p| p.pod_injection().is_some() && p.selects(&namespace, pod.labels()))
        .collect();
    // Overlaps are refused by the validating webhook; should one exist, the oldest policy wins.
    matching.sort_by_key(|p| (p.creation_timestamp().map(|t| t.0), p.name_any()));
    let Some(policy) = matching.first() else {
        return Mutation::unchanged(response);
    };
    let name = pod
        .metadata
        .name
        .clone()
        .or(pod.metadata.generate_name.clone())
        .unwrap_or_default();
    match inject(&pod, policy, config, &super::inject::drain_token()) {
        Injection::Patch(patch) => match response.clone().with_patch(patch) {
            Ok(patched) => {
                info!(%namespace, pod = %name, policy = %policy.name_any(), injection = ?policy.pod_injection(), "injecting");
                Mutation {
                    response: patched,
                    injected: Some(policy.clone()),
                    conflict: None,
                }
            }
            Err(error) => {
                warn!(%error, "cannot encode the patch; admitting unchanged");
                Mutation::unchanged(response)
            }
        },
        Injection::Skip(reason) => {
            info!(%namespace, pod = %name, reason, "not injecting");
            Mutation::unchanged(response)
        }
        Injection::Conflict(message) => {
            warn!(%namespace, pod = %name, %message, "not injecting");
            let mut response = response;
            response.warnings = Some(vec![message.clone()]);
            Mutation {
                response,
                injected: None,
                conflict: Some(((**policy).clone(), message)),
            }
        }
    }
}

/// `POST /validate-policies`.
pub fn validate_policy(
    request: &AdmissionRequest<DynamicObject>,
    policies: &Store<McpSessionPolicy>,
    pods: &[BTreeMap<String, String>],
) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    if !matches!(request.operation, Operation::Create | Operation::Update) {
        return response;
    }
    let Some(object) = &request.object else {
        return response;
    };
    let policy: McpSessionPolicy = match serde_json::to_value(object)
        .and_then(serde_json::from_value)
    {
        Ok(policy) => policy,
        Err(error) => return response.deny(format!("McpSessionPolicy does not decode: {error}")),
    };
    let name = policy
        .metadata
        .name
        .clone()
        .unwrap_or_else(|| request.name.clone());
    if let Err(error) = validate_spec(&policy.spec) {
        return response.deny(format!("McpSessionPolicy {name:?} is invalid: {error}"));
    }
    let namespace = request.namespace.clone().unwrap_or_default();
    let others = policies.state().into_iter().filter(|other| {
        other.namespace().as_deref() == Some(namespace.as_str()) && other.name_any() != name
    });
    for other in others {
        if let Some(example) = overlap(&policy.spec.selector, &other.spec.selector, pods) {
            return response.deny(format!(
                "McpSessionPolicy {name:?} is invalid: spec.selector overlaps with McpSessionPolicy {:?} in namespace {namespace:?} (both select {example}); a pod's sessions must belong to one policy",
                other.name_any()
            ));
        }
    }
    response
}

/// Whether two selectors can select one pod; returns a description of such a pod. Checks the
/// pods that exist, and a pod labelled exactly as each selector requires (complete for
/// `matchLabels`, `In` and `Exists`; `NotIn`/`DoesNotExist` only narrow).
pub fn overlap(
    a: &LabelSelector,
    b: &LabelSelector,
    pods: &[BTreeMap<String, String>],
) -> Option<String> {
    let (sa, sb) = (pod_selector(a)?, pod_selector(b)?);
    let describe = |labels: &BTreeMap<String, String>| {
        let text: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("pods labelled {}", text.join(","))
    };
    if let Some(pod) = pods
        .iter()
        .find(|labels| sa.matches(labels) && sb.matches(labels))
    {
        return Some(describe(pod));
    }
    [minimal_labels(a), minimal_labels(b)]
        .into_iter()
        .find(|labels| sa.matches(labels) && sb.matches(labels))
        .map(|labels| describe(&labels))
}

/// The smallest label set a selector accepts, if its requirements alone say so.
fn minimal_labels(selector: &LabelSelector) -> BTreeMap<String, String> {
    let mut labels = selector.match_labels.clone().unwrap_or_default();
    for requirement in selector.match_expressions.iter().flatten() {
        let first = requirement.values.as_ref().and_then(|v| v.first()).cloned();
        match (requirement.operator.as_str(), first) {
            ("In", Some(value)) => {
                labels.entry(requirement.key.clone()).or_insert(value);
            }
            ("Exists", _) => {
                labels
                    .entry(requirement.key.clone())
                    .or_insert_with(|| "any".into());
            }
            _ => {}
        }
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn selector(value: serde_json::Value) -> LabelSelector {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn overlapping_selectors_are_found_and_named() {
        let app = selector(json!({"matchLabels": {"app": "api"}}));
        let app_tier = selector(json!({"matchLabels": {"app": "api", "tier": "web"}}));
        let other = selector(json!({"matchLabels": {"app": "worker"}}));
        let in_expr = selector(
            json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["api", "web"]}]}),
        );
        assert_eq!(
            overlap(&app, &app_tier, &[]).as_deref(),
            Some("pods labelled app=api,tier=web")
        );
        assert!(overlap(&app, &other, &[]).is_none());
        assert!(overlap(&in_expr, &app, &[]).is_some());
        let not_web = selector(
            json!({"matchLabels": {"app": "api"}, "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["web"]}]}),
        );
        let existing = [BTreeMap::from([
            ("app".to_owned(), "api".to_owned()),
            ("tier".to_owned(), "db".to_owned()),
        ])];
        assert!(
            overlap(&not_web, &app, &existing).is_some(),
            "an existing pod both select"
        );
    }

    #[test]
    fn bad_reviews_are_errors_not_panics() {
        assert!(matches!(
            decode(b"{not json"),
            Err(ReviewError::Malformed(_))
        ));
        assert!(
            matches!(decode(br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":null}"#), Err(ReviewError::ApiVersion(v)) if v == "admission.k8s.io/v1beta1")
        );
        assert!(matches!(
            decode(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#),
            Err(ReviewError::NoRequest)
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 2000, ..Default::default() })]
        /// Arbitrary bytes, and arbitrary JSON in the request's place, decode to an error or a
        /// request; nothing panics.
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512), key in "[a-zA-Z]{0,12}", value in "\\PC{0,40}") {
            let _ = decode(&bytes);
            let review = format!(r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"u","{key}":"{}"}}}}"#, value.replace(['"', '\\'], ""));
            let _ = decode(review.as_bytes());
        }
    }
}
