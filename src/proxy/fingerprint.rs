//! Credential fingerprints: a session is bound to the credential that created it, without
//! storing the credential or any prefix of it.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// HMAC-SHA-256 of a request's `Authorization` header under a deployment key.
#[derive(Clone)]
pub struct Fingerprinter {
    key: Vec<u8>,
}

impl std::fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprinter(<key>)")
    }
}

impl Fingerprinter {
    pub fn new(key: &[u8]) -> Self {
        Self { key: key.to_vec() }
    }

    /// 128 bits of the HMAC, base64url (22 characters); `None` without a credential.
    pub fn fingerprint(&self, authorization: Option<&[u8]>) -> Option<String> {
        let credential = authorization?;
        // HMAC accepts keys of any length: `new_from_slice` cannot fail for it.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).ok()?;
        mac.update(credential);
        let digest = mac.finalize().into_bytes();
        Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..16]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_bind_without_revealing() {
        let f = Fingerprinter::new(b"deployment key");
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
            Fingerprinter::new(b"other key").fingerprint(Some(b"Bearer intracker_mcp_secret_123"))
        );
        assert!(!a.contains("intracker"));
        assert_eq!(f.fingerprint(None), None);
    }
}
