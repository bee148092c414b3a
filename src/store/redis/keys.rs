//! Key names of the schema (docs/redis-schema.md).
//!
//! Records live at `{prefix}{id}`, exactly where the seed's service puts them. Index keys start
//! with `{prefix}` in braces: outside the records' `SCAN MATCH {prefix}*` (so the seed's
//! `get_all_sessions` never meets a sorted set) and sharing one Redis Cluster hash slot, so that
//! an index operation never crosses slots.

use super::super::{SessionId, StoreError, UnreadableReason};

/// Member kept at score +inf in every index set. Its absence means the set was evicted or never
/// built, and the counts rebuild it. `!` cannot occur in a session id or a pod name.
pub const SENTINEL: &str = "!index";

const MAX_PREFIX_LEN: usize = 200;

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    /// `{prefix}`: the hash tag shared by all index keys.
    tag: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Result<Self, StoreError> {
        let invalid = |reason: &str| StoreError::InvalidPrefix {
            prefix: prefix.to_owned(),
            reason: reason.to_owned(),
        };
        if prefix.is_empty() {
            return Err(invalid("it is empty"));
        }
        if prefix.len() > MAX_PREFIX_LEN {
            return Err(invalid("it is longer than 200 bytes"));
        }
        if let Some(c) = prefix.chars().find(|c| {
            matches!(c, '{' | '}' | '*' | '?' | '[' | ']' | '\\') || !c.is_ascii_graphic()
        }) {
            return Err(invalid(&format!(
                "{c:?} is not allowed (no braces, glob characters, whitespace or non-ASCII)"
            )));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            tag: format!("{{{prefix}}}"),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn record(&self, id: &SessionId) -> String {
        format!("{}{}", self.prefix, id)
    }

    /// `SCAN MATCH` pattern for records; the prefix holds no glob characters.
    pub fn record_pattern(&self) -> String {
        format!("{}*", self.prefix)
    }

    /// The session id of a record key, or why the key is not a readable record.
    pub fn id_of(&self, key: &[u8]) -> Result<SessionId, UnreadableReason> {
        let key = std::str::from_utf8(key).map_err(|_| UnreadableReason::KeyNotUtf8)?;
        let raw = key.strip_prefix(&self.prefix).unwrap_or(key);
        SessionId::parse(raw).map_err(|e| UnreadableReason::InvalidId(e.to_string()))
    }

    /// List: the session's event log. `{record key}` as hash tag: the record's Cluster slot,
    /// and outside the records' `SCAN` pattern.
    pub fn events(&self, id: &SessionId) -> String {
        format!("{{{}{}}}:events", self.prefix, id)
    }

    /// Sorted set: every indexed session, scored by expiry (unix ms).
    pub fn expiry(&self) -> String {
        format!("{}:expiry", self.tag)
    }

    /// Sorted set: draining sessions, scored by expiry.
    pub fn draining(&self) -> String {
        format!("{}:draining", self.tag)
    }

    /// Hash: running tallies of sessions drained, rehydrated and lost.
    pub fn tallies(&self) -> String {
        format!("{}:tallies", self.tag)
    }

    /// Sorted set: pods that own sessions, scored by when they last got one.
    pub fn pods(&self) -> String {
        format!("{}:pods", self.tag)
    }

    /// Sorted set: active sessions owned by `pod`, scored by expiry.
    pub fn pod(&self, pod: &str) -> String {
        format!("{}:pod:{pod}", self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_keys_stay_outside_the_record_pattern_and_share_a_slot() {
        let keys = Keys::new("mcp:session:").unwrap();
        let id = SessionId::parse("abc").unwrap();
        assert_eq!(keys.record(&id), "mcp:session:abc");
        for index in [
            keys.expiry(),
            keys.draining(),
            keys.pods(),
            keys.pod("web-0"),
            keys.tallies(),
        ] {
            assert!(index.starts_with("{mcp:session:}:"), "{index}");
            assert!(!index.starts_with(keys.prefix()));
            // Redis Cluster hashes only what stands between the first `{` and the next `}`.
            let tag = &index[1..index.find('}').unwrap()];
            assert_eq!(tag, "mcp:session:");
        }
    }

    #[test]
    fn an_event_log_shares_its_records_slot_and_stays_out_of_the_scan() {
        let keys = Keys::new("mcp:session:").unwrap();
        let id = SessionId::parse("abc").unwrap();
        let log = keys.events(&id);
        assert_eq!(log, "{mcp:session:abc}:events");
        assert!(!log.starts_with(keys.prefix()));
        assert_eq!(&log[1..log.find('}').unwrap()], keys.record(&id));
    }

    #[test]
    fn rejects_prefixes_that_would_break_patterns_or_slots() {
        for bad in ["", "a{b}", "mcp:*", "x?", "sp ace", "brack[", "back\\", "ü"] {
            assert!(Keys::new(bad).is_err(), "{bad:?}");
        }
        assert!(Keys::new("tenant-a:mcp:").is_ok());
    }

    #[test]
    fn ids_of_keys() {
        let keys = Keys::new("mcp:session:").unwrap();
        assert_eq!(keys.id_of(b"mcp:session:abc").unwrap().as_str(), "abc");
        assert_eq!(
            keys.id_of(b"mcp:session:\xff"),
            Err(UnreadableReason::KeyNotUtf8)
        );
        assert!(matches!(
            keys.id_of(b"mcp:session:a b"),
            Err(UnreadableReason::InvalidId(_))
        ));
    }
}
