//! Credential fingerprints: a session is bound to the identity that created it, without
//! storing the credential or any prefix of it.
//!
//! What is fingerprinted depends on the [`SessionBinding`]:
//! - `Identity`: a bearer token that is a JWT binds by its issuer and subject, read from its
//!   payload without checking the signature. The backend still validates every token it gets;
//!   the proxy only needs to know which user a token names to refuse another user's token on
//!   this session, and a refreshed token of the same user (OAuth clients refresh hourly) keeps
//!   the session. Any other credential binds as a whole, as with `Credential`.
//! - `Credential`: the credential as a whole, its scheme word case-insensitive.
//! - `None`: nothing; sessions are bound to nobody.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::serve::constant_time_eq;
use crate::store::binding::SessionBinding;

/// Largest JWT payload read for its issuer and subject.
const MAX_JWT_PAYLOAD: usize = 16 * 1024;

/// HMAC-SHA-256 of what a request's `Authorization` header binds to, under a deployment key.
#[derive(Clone)]
pub struct Fingerprinter {
    /// The HMAC with the key already absorbed: every request is fingerprinted, and the key's
    /// two padded blocks are half of the hashing.
    keyed: Hmac<Sha256>,
    binding: SessionBinding,
}

impl std::fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprinter(<key>, {:?})", self.binding)
    }
}

/// What a credential binds a session to.
#[derive(Debug, PartialEq, Eq)]
enum Subject<'a> {
    /// A JWT's issuer and subject.
    Identity { issuer: String, subject: String },
    /// The credential as a whole: its scheme (any case) and the rest.
    Credential { scheme: &'a str, rest: &'a [u8] },
}

impl Fingerprinter {
    /// HMAC takes keys of any length; the error is the `hmac` crate's signature, never seen.
    pub fn new(key: &[u8], binding: SessionBinding) -> Result<Self, hmac::digest::InvalidLength> {
        Ok(Self {
            keyed: Hmac::<Sha256>::new_from_slice(key)?,
            binding,
        })
    }

    /// The hop header's value for a request of session `id` that one of the policy's proxies
    /// forwards to another (see [`HOP_HEADER`](crate::api::contract::HOP_HEADER)): 128 bits
    /// of an HMAC under the same key, in a domain no credential's input can reach (a header
    /// cannot hold a NUL byte).
    pub fn hop(&self, id: &str) -> String {
        let mut mac = self.keyed.clone();
        mac.update(b"\0hop\0");
        mac.update(id.as_bytes());
        Self::encode(mac)
    }

    /// Whether `presented` is the hop header's value for session `id`.
    pub fn is_hop(&self, id: &str, presented: &[u8]) -> bool {
        constant_time_eq(self.hop(id).as_bytes(), presented)
    }

    /// 128 bits of the HMAC, base64url (22 characters); `None` without a credential, or when
    /// sessions are bound to nobody.
    pub fn fingerprint(&self, authorization: Option<&[u8]>) -> Option<String> {
        let credential = authorization?;
        let mut mac = self.keyed.clone();
        match subject(credential, self.binding)? {
            // Not a byte string a header can hold, so it cannot collide with a credential.
            Subject::Identity { issuer, subject } => {
                mac.update(b"\0jwt\0");
                mac.update(issuer.as_bytes());
                mac.update(b"\0");
                mac.update(subject.as_bytes());
            }
            // The canonical form of the header: `Bearer abc` stays byte for byte what it was
            // before schemes were compared without case, so stored bindings still match.
            Subject::Credential { scheme, rest } => {
                for (at, byte) in scheme.bytes().enumerate() {
                    let canonical = if at == 0 {
                        byte.to_ascii_uppercase()
                    } else {
                        byte.to_ascii_lowercase()
                    };
                    mac.update(&[canonical]);
                }
                if !scheme.is_empty() && !rest.is_empty() {
                    mac.update(b" ");
                }
                mac.update(rest);
            }
        }
        Some(Self::encode(mac))
    }

    /// The first 128 bits of the HMAC, base64url.
    fn encode(mac: Hmac<Sha256>) -> String {
        let digest = mac.finalize().into_bytes();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..16])
    }
}

/// What `credential` binds to under `binding`; `None` where nothing does.
fn subject(credential: &[u8], binding: SessionBinding) -> Option<Subject<'_>> {
    if binding == SessionBinding::None {
        return None;
    }
    let trimmed = credential.trim_ascii();
    let (scheme, rest) = match trimmed.iter().position(u8::is_ascii_whitespace) {
        Some(at) => (&trimmed[..at], trimmed[at..].trim_ascii_start()),
        None => (&trimmed[..0], trimmed),
    };
    let Ok(scheme) = std::str::from_utf8(scheme) else {
        return Some(Subject::Credential {
            scheme: "",
            rest: trimmed,
        });
    };
    if binding == SessionBinding::Identity
        && scheme.eq_ignore_ascii_case("bearer")
        && let Some((issuer, subject)) = jwt_identity(rest)
    {
        return Some(Subject::Identity { issuer, subject });
    }
    Some(Subject::Credential { scheme, rest })
}

/// The issuer and subject of a JWT (three base64url parts, a JSON payload with a string `sub`);
/// `None` for anything else, which then binds as an opaque credential.
fn jwt_identity(token: &[u8]) -> Option<(String, String)> {
    #[derive(Deserialize)]
    struct Claims {
        #[serde(default)]
        iss: Option<String>,
        sub: String,
    }
    let token = std::str::from_utf8(token).ok()?;
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > MAX_JWT_PAYLOAD {
        return None;
    }
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Claims = serde_json::from_slice(&payload).ok()?;
    (!claims.sub.is_empty()).then(|| (claims.iss.unwrap_or_default(), claims.sub))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str, signature: &str) -> String {
        let encode = |text: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text);
        format!(
            "Bearer {}.{}.{signature}",
            encode(r#"{"alg":"RS256","typ":"JWT"}"#),
            encode(claims)
        )
    }

    #[test]
    fn a_hop_header_is_made_only_with_the_key_and_for_one_session() {
        let f = Fingerprinter::new(b"policy key", SessionBinding::Identity).expect("any key");
        let other = Fingerprinter::new(b"another key", SessionBinding::Identity).expect("any key");
        let hop = f.hop("session-1");
        assert!(f.is_hop("session-1", hop.as_bytes()));
        assert!(!f.is_hop("session-2", hop.as_bytes()), "one session's");
        assert!(
            !other.is_hop("session-1", hop.as_bytes()),
            "the policy's key's"
        );
        assert!(!f.is_hop("session-1", b""));
        assert_ne!(
            Some(hop),
            f.fingerprint(Some(b"session-1")),
            "never a credential's fingerprint"
        );
    }

    #[test]
    fn fingerprints_bind_without_revealing() {
        let f = Fingerprinter::new(b"deployment key", SessionBinding::Credential).expect("any key");
        let a = f
            .fingerprint(Some(b"Bearer intracker_mcp_secret_123"))
            .unwrap();
        assert_eq!(a.len(), 22);
        assert_eq!(
            Some(a.clone()),
            f.fingerprint(Some(b"Bearer intracker_mcp_secret_123"))
        );
        assert_ne!(Some(a.clone()), f.fingerprint(Some(b"Bearer someone_else")));
        assert_ne!(
            Some(a.clone()),
            Fingerprinter::new(b"other key", SessionBinding::Credential)
                .expect("any key")
                .fingerprint(Some(b"Bearer intracker_mcp_secret_123"))
        );
        assert!(!a.contains("intracker"));
        assert_eq!(f.fingerprint(None), None);
    }

    #[test]
    fn the_canonical_bearer_form_is_the_bytes_it_always_was() {
        // Sessions stored before schemes were case-insensitive keep matching.
        let f = Fingerprinter::new(b"k", SessionBinding::Credential).expect("any key");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"k").unwrap();
        mac.update(b"Bearer abc");
        let before = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(&mac.finalize().into_bytes()[..16]);
        assert_eq!(f.fingerprint(Some(b"Bearer abc")), Some(before.clone()));
        for variant in [
            &b"bearer abc"[..],
            b"BEARER abc",
            b"Bearer   abc",
            b" bearer\tabc ",
        ] {
            assert_eq!(
                f.fingerprint(Some(variant)),
                Some(before.clone()),
                "{variant:?}"
            );
        }
        assert_ne!(f.fingerprint(Some(b"Bearer ABC")), Some(before));
        assert!(f.fingerprint(Some(b"")).is_some());
    }

    #[test]
    fn a_refreshed_token_of_the_same_subject_keeps_its_identity() {
        let f = Fingerprinter::new(b"k", SessionBinding::Identity).expect("any key");
        let first = jwt(r#"{"iss":"https://idp","sub":"alice","exp":1}"#, "sig1");
        let refreshed = jwt(
            r#"{"iss":"https://idp","sub":"alice","exp":2,"jti":"x"}"#,
            "sig2",
        );
        let other = jwt(r#"{"iss":"https://idp","sub":"bob","exp":1}"#, "sig1");
        let other_issuer = jwt(r#"{"iss":"https://evil","sub":"alice"}"#, "sig1");
        let id = |token: &str| f.fingerprint(Some(token.as_bytes()));
        assert_eq!(id(&first), id(&refreshed));
        assert_eq!(id(&first), id(&first.replacen("Bearer", "bearer", 1)));
        assert_ne!(id(&first), id(&other));
        assert_ne!(id(&first), id(&other_issuer));
        // Bound to the credential, a refresh is another credential.
        let strict = Fingerprinter::new(b"k", SessionBinding::Credential).expect("any key");
        assert_ne!(
            strict.fingerprint(Some(first.as_bytes())),
            strict.fingerprint(Some(refreshed.as_bytes()))
        );
        // Bound to nobody.
        let open = Fingerprinter::new(b"k", SessionBinding::None).expect("any key");
        assert_eq!(open.fingerprint(Some(first.as_bytes())), None);
    }

    #[test]
    fn what_is_not_a_jwt_binds_as_a_credential() {
        let f = Fingerprinter::new(b"k", SessionBinding::Identity).expect("any key");
        let credential = Fingerprinter::new(b"k", SessionBinding::Credential).expect("any key");
        for token in [
            "Bearer opaque-token".to_owned(),
            "Bearer a.b".to_owned(),
            "Bearer a.b.c.d".to_owned(),
            "Bearer x.bm90IGpzb24.y".to_owned(),
            jwt(r#"{"iss":"https://idp"}"#, "s"),
            jwt(r#"{"iss":"https://idp","sub":""}"#, "s"),
            jwt(r#"{"sub":7}"#, "s"),
            "Basic YWxpY2U6cGFzcw==".to_owned(),
        ] {
            assert_eq!(
                f.fingerprint(Some(token.as_bytes())),
                credential.fingerprint(Some(token.as_bytes())),
                "{token}"
            );
        }
        // A JWT outside the bearer scheme is a credential too.
        let basic = jwt(r#"{"sub":"alice"}"#, "s").replacen("Bearer", "Token", 1);
        assert_eq!(
            f.fingerprint(Some(basic.as_bytes())),
            credential.fingerprint(Some(basic.as_bytes()))
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 2000, ..Default::default() })]
        /// Any Authorization header, including JWT-shaped ones with arbitrary parts, gives a
        /// fingerprint (the same each time) or none, never a panic; the binding `None` binds
        /// nothing.
        #[test]
        fn any_header_fingerprints_or_not_and_never_panics(
            header in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            parts in proptest::collection::vec("[A-Za-z0-9_=+/-]{0,40}", 3),
        ) {
            let jwt = format!("Bearer {}", parts.join("."));
            for binding in [SessionBinding::Identity, SessionBinding::Credential, SessionBinding::None] {
                let f = Fingerprinter::new(b"key", binding).expect("any key");
                for presented in [header.as_slice(), jwt.as_bytes()] {
                    let first = f.fingerprint(Some(presented));
                    proptest::prop_assert_eq!(&first, &f.fingerprint(Some(presented)));
                    if binding == SessionBinding::None {
                        proptest::prop_assert!(first.is_none());
                    }
                }
            }
        }
    }
}
