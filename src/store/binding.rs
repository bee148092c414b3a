//! The one rule that binds a session to the identity that created it.
//!
//! Every path that serves a session asks it: the proxy's memory, its replay, `Last-Event-ID`
//! resumption, and the store's claim. A record written by the seed's service carries no
//! fingerprint; the first identity that uses it is bound to it, atomically in the store (a
//! claim or a [`SessionPatch::bind_credential`](super::SessionPatch)), so that two identities
//! racing for it cannot both win.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What of a request's `Authorization` a session is bound to (the proxy's `--binding`, a
/// policy's `spec.binding`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, clap::ValueEnum,
)]
pub enum SessionBinding {
    /// The identity a credential names: a bearer JWT's issuer and subject (a refreshed token of
    /// the same user keeps the session), any other credential as a whole.
    #[default]
    Identity,
    /// The credential itself: a refreshed token is another credential.
    Credential,
    /// Nothing: any request that knows a session id may use the session.
    None,
}

impl SessionBinding {
    /// The proxy's flag value.
    pub fn as_flag(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Credential => "credential",
            Self::None => "none",
        }
    }
}

/// What a presented fingerprint is to the one a session is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// The same identity (or no identity on either side): serve it.
    Matches,
    /// The session is bound to nobody yet and the request has an identity: bind it, then serve.
    Unbound,
    /// Another identity, or none where one is bound: answer as if the session did not exist.
    Mismatch,
}

/// Compares the fingerprint a session is bound to with the one a request presents.
pub fn check(bound: Option<&str>, presented: Option<&str>) -> Binding {
    match (bound, presented) {
        (Some(bound), Some(presented)) if bound == presented => Binding::Matches,
        (Some(_), _) => Binding::Mismatch,
        (None, None) => Binding::Matches,
        (None, Some(_)) => Binding::Unbound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values_are_what_clap_parses() {
        use clap::ValueEnum as _;
        for binding in SessionBinding::value_variants() {
            assert_eq!(
                SessionBinding::from_str(binding.as_flag(), false),
                Ok(*binding)
            );
        }
    }

    #[test]
    fn one_rule_for_every_pair() {
        assert_eq!(check(Some("a"), Some("a")), Binding::Matches);
        assert_eq!(check(Some("a"), Some("b")), Binding::Mismatch);
        assert_eq!(check(Some("a"), None), Binding::Mismatch);
        assert_eq!(check(None, None), Binding::Matches);
        assert_eq!(check(None, Some("b")), Binding::Unbound);
    }
}
