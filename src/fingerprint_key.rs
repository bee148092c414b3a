//! The Secret with the key a policy's proxies fingerprint credentials with: the one the policy
//! names, checked; or one generated per policy, so that no two policies (and no two
//! installations) share a key that whoever reads Redis could test credential guesses with.
//!
//! The operator makes sure of it at each reconcile (and says so in a condition); the webhook
//! does too before it injects a proxy that reads it, so a pod never waits for a Secret that
//! only the operator's next reconcile would create.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt as _};
use tracing::info;

use crate::api::{FingerprintKey, McpSessionPolicy, SecretKeyRef};

/// Why a policy's proxies would find no fingerprint key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "Secret {namespace}/{name}, which the policy names for its fingerprint key, does not exist: create it, or drop fingerprintKeySecretRef to have one generated"
    )]
    SecretNotFound { namespace: String, name: String },
    #[error("Secret {namespace}/{name} has no key {key:?} (the policy's fingerprint key)")]
    KeyNotFound {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("cannot read Secret {namespace}/{name}: {source}")]
    Read {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("cannot create the fingerprint key Secret {namespace}/{name}: {source}")]
    Create {
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

impl KeyError {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::SecretNotFound { .. } => "SecretNotFound",
            Self::KeyNotFound { .. } => "SecretKeyNotFound",
            Self::Read { .. } => "SecretUnreadable",
            Self::Create { .. } => "CannotGenerate",
        }
    }
}

/// Makes sure the policy's fingerprint key exists: a named one is checked, a generated one is
/// created if missing (not on a dry run), never replaced (that would unbind every session).
pub async fn ensure(
    client: &Client,
    policy: &McpSessionPolicy,
    dry_run: bool,
) -> Result<FingerprintKey, KeyError> {
    let namespace = policy.namespace().unwrap_or_default();
    let key = policy.fingerprint_key();
    let SecretKeyRef { name, key: field } = key.secret();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let found = secrets
        .get_opt(name)
        .await
        .map_err(|source| KeyError::Read {
            namespace: namespace.clone(),
            name: name.clone(),
            source,
        })?;
    match (found, &key) {
        (Some(secret), _) if holds(&secret, field) => Ok(key),
        (Some(_), _) => Err(KeyError::KeyNotFound {
            namespace,
            name: name.clone(),
            key: field.clone(),
        }),
        (None, FingerprintKey::Named(_)) => Err(KeyError::SecretNotFound {
            namespace,
            name: name.clone(),
        }),
        (None, FingerprintKey::Generated(_)) if dry_run => Ok(key),
        (None, FingerprintKey::Generated(_)) => {
            let secret = generated(policy, name, field);
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    info!(%namespace, secret = %name, "generated the policy's fingerprint key");
                    Ok(key)
                }
                // Made by the operator or the webhook meanwhile: the same kind of key.
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(key),
                Err(source) => Err(KeyError::Create {
                    namespace,
                    name: name.clone(),
                    source,
                }),
            }
        }
    }
}

fn holds(secret: &Secret, field: &str) -> bool {
    secret
        .data
        .as_ref()
        .and_then(|data| data.get(field))
        .is_some_and(|value| !value.0.is_empty())
}

/// 256 random bits, hex: an environment variable's value as it is.
fn generated(policy: &McpSessionPolicy, name: &str, field: &str) -> Secret {
    let value: String = rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Secret {
        metadata: policy.owned_object_meta(name.to_owned()),
        type_: Some("Opaque".to_owned()),
        data: Some([(field.to_owned(), ByteString(value.into_bytes()))].into()),
        ..Secret::default()
    }
}
