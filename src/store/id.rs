//! Session ids: validated once at the edge so no hostile id reaches a Redis key.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest id accepted. UUIDs (the seed's ids) are 36 characters, the proxy's own ids 32.
pub const MAX_SESSION_ID_LEN: usize = 128;

/// Why a string is not a session id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSessionId {
    #[error("session id is empty")]
    Empty,
    #[error("session id is {0} bytes long, the limit is {MAX_SESSION_ID_LEN}")]
    TooLong(usize),
    #[error("session id contains {0:?}; allowed are ASCII letters, digits and . _ ~ + / = -")]
    BadCharacter(char),
}

/// An MCP session id as stored in Redis under `{prefix}{id}`.
///
/// MCP allows any visible ASCII in `Mcp-Session-Id`; this is narrower on purpose: no glob
/// characters (`* ? [ ] \`) that would widen a `SCAN MATCH`, no hash-tag braces that would move a
/// key to another Redis Cluster slot, no `:` that would step into another key namespace, no
/// whitespace or control characters that would end up in logs.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct SessionId(String);

impl SessionId {
    pub fn parse(raw: &str) -> Result<Self, InvalidSessionId> {
        if raw.is_empty() {
            return Err(InvalidSessionId::Empty);
        }
        if raw.len() > MAX_SESSION_ID_LEN {
            return Err(InvalidSessionId::TooLong(raw.len()));
        }
        if let Some(bad) = raw.chars().find(|c| !is_id_char(*c)) {
            return Err(InvalidSessionId::BadCharacter(bad));
        }
        Ok(Self(raw.to_owned()))
    }

    /// A fresh 128-bit random id, hex encoded (what the proxy hands to clients).
    pub fn random() -> Self {
        Self(format!("{:032x}", rand::random::<u128>()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '+' | '/' | '=' | '-')
}

impl<'de> Deserialize<'de> for SessionId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for SessionId {
    type Err = InvalidSessionId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", self.0)
    }
}

impl AsRef<str> for SessionId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_seed_and_proxy_ids() {
        for ok in [
            "a1b2c3d4-e5f6-7890-abcd-ef1234567890",
            "test-session-123",
            "dGVzdA==",
            "a.b_c~d+e/f",
        ] {
            assert_eq!(SessionId::parse(ok).unwrap().as_str(), ok);
        }
        let random = SessionId::random();
        assert_eq!(random.as_str().len(), 32);
        assert_ne!(random, SessionId::random());
    }

    #[test]
    fn rejects_hostile_ids() {
        assert_eq!(SessionId::parse(""), Err(InvalidSessionId::Empty));
        assert_eq!(
            SessionId::parse(&"a".repeat(129)),
            Err(InvalidSessionId::TooLong(129))
        );
        for (bad, c) in [
            ("*", '*'),
            ("a?b", '?'),
            ("x[1]", '['),
            ("{slot}", '{'),
            ("mcp:session:x", ':'),
            ("a b", ' '),
            ("line\nbreak", '\n'),
            ("back\\slash", '\\'),
            ("ünï", 'ü'),
            ("nul\0", '\0'),
        ] {
            assert_eq!(
                SessionId::parse(bad),
                Err(InvalidSessionId::BadCharacter(c)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn deserializing_validates() {
        assert!(serde_json::from_str::<SessionId>("\"ok-id\"").is_ok());
        assert!(serde_json::from_str::<SessionId>("\"bad id\"").is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 2000, ..Default::default() })]
        /// Whatever a client sends as a session id, what parses is made of the allowed
        /// characters only (nothing that means something in a Redis key or a log line) and
        /// round-trips.
        #[test]
        fn parsed_ids_hold_only_safe_characters(raw in "\\PC{0,140}") {
            if let Ok(id) = SessionId::parse(&raw) {
                proptest::prop_assert_eq!(id.as_str(), raw.as_str());
                proptest::prop_assert!(id.as_str().bytes().all(|b| b.is_ascii_alphanumeric() || b".-_~+/=".contains(&b)));
                proptest::prop_assert!((1..=128).contains(&id.as_str().len()));
            }
        }
    }
}
