//! The session record: the seed's JSON (`connection_id`, `created_at`, `last_activity_at`,
//! `metadata`) plus optional fields of this project. Unknown fields survive a rewrite.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, SubsecRound as _, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Whether a session is served by a live pod or waits to be claimed by another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    Active,
    Draining,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Draining => "draining",
        }
    }
}

impl std::fmt::Display for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SessionState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(Self::Active),
            "draining" => Ok(Self::Draining),
            other => Err(format!(
                "unknown session state {other:?} (active, draining)"
            )),
        }
    }
}

/// A UTC instant written the way the seed's Python service writes it: `datetime.utcnow()
/// .isoformat()`, naive, microseconds. Read back also with an offset or `Z`, from any writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub DateTime<Utc>);

const SEED_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.6f";

impl Timestamp {
    /// Now, at the microsecond precision the record stores.
    pub fn now() -> Self {
        Self(Utc::now().trunc_subsecs(6))
    }

    /// The seed's wire format, also what the touch script writes.
    pub fn to_seed_string(self) -> String {
        self.0.format(SEED_FORMAT).to_string()
    }

    pub fn parse(raw: &str) -> Result<Self, String> {
        if let Ok(with_offset) = DateTime::parse_from_rfc3339(raw) {
            return Ok(Self(with_offset.with_timezone(&Utc)));
        }
        NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S%.f")
            .map(|naive| Self(naive.and_utc()))
            .map_err(|e| format!("timestamp {raw:?} is not ISO 8601: {e}"))
    }

    pub fn unix_millis(self) -> i64 {
        self.0.timestamp_millis()
    }

    pub fn rfc3339(self) -> String {
        self.0.to_rfc3339_opts(SecondsFormat::Secs, true)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_seed_string())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// One stored session. Field order matters: `last_activity_at` precedes every nested object,
/// which is what lets the touch script rewrite it in place (see `redis::scripts`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub connection_id: String,
    pub created_at: Timestamp,
    pub last_activity_at: Timestamp,
    /// The seed's free-form metadata (`user_id`, and in seed records `api_key_prefix`, which this
    /// project reads and keeps but never writes).
    #[serde(default)]
    pub metadata: Map<String, Value>,
    /// Absent in seed records, which count as active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<SessionState>,
    /// The pod whose proxy holds the session's GET stream; none while draining.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_pod: Option<String>,
    /// Where other proxies reach the owner's (`ip:port`): a session that stays on its pod
    /// (drain strategy `Wait`) is forwarded there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_address: Option<String>,
    /// The owner's own id for the session, where a gateway pins the session to the backend pod
    /// that holds its state (drain strategy `Wait`): `owner_pod` and `owner_address` are then
    /// that pod's, and every gateway replica sends the session's requests there, in this
    /// session. Dropped with the owner (a hand-over, a claim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    /// The client's `initialize` params, replayed to a fresh upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initialize_params: Option<Value>,
    /// HMAC of the credential that created the session; never the credential itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rehydrations: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining_since: Option<Timestamp>,
    /// Since when its client is ending the session (its `DELETE` is on its way to the server):
    /// the server forgetting the session now is its end, not a loss. Marked by a gateway that
    /// pins sessions to their pods, whose other replicas meet the end on the session's streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ending_since: Option<Timestamp>,
    /// What the client set up after `initialize`, re-established after a replay.
    #[serde(default, skip_serializing_if = "SessionSetup::is_empty")]
    pub setup: SessionSetup,
    /// Fields written by other (newer) writers, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Session state a client sets up with requests after `initialize` (MCP 2025-11-25): resource
/// subscriptions and the log level. A fresh upstream knows none of it, so a replay sends these
/// requests again after the handshake.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSetup {
    /// URIs of `resources/subscribe`, in the order they were made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscriptions: Vec<String>,
    /// The level of the last `logging/setLevel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
}

/// A request that changes a session's [`SessionSetup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetupChange {
    Subscribe(String),
    Unsubscribe(String),
    LogLevel(String),
}

impl SessionSetup {
    /// Subscriptions kept per session: a bound on what one client makes the proxy store.
    pub const MAX_SUBSCRIPTIONS: usize = 256;
    /// Longest URI or level kept.
    pub const MAX_VALUE_BYTES: usize = 2048;

    pub fn is_empty(&self) -> bool {
        self.subscriptions.is_empty() && self.log_level.is_none()
    }

    /// Applies a change; false if it was refused by the bounds, or changed nothing.
    pub fn apply(&mut self, change: SetupChange) -> bool {
        match change {
            SetupChange::Subscribe(uri) => {
                if uri.len() > Self::MAX_VALUE_BYTES
                    || self.subscriptions.len() >= Self::MAX_SUBSCRIPTIONS
                    || self.subscriptions.contains(&uri)
                {
                    return false;
                }
                self.subscriptions.push(uri);
            }
            SetupChange::Unsubscribe(uri) => {
                let before = self.subscriptions.len();
                self.subscriptions.retain(|kept| *kept != uri);
                return self.subscriptions.len() != before;
            }
            SetupChange::LogLevel(level) => {
                if level.len() > Self::MAX_VALUE_BYTES || self.log_level.as_ref() == Some(&level) {
                    return false;
                }
                self.log_level = Some(level);
            }
        }
        true
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl SessionRecord {
    /// Marks the session draining, owned by nobody: any pod may claim it.
    pub fn hand_over(&mut self, now: Timestamp) {
        self.set_state(SessionState::Draining);
        self.owner_pod = None;
        self.owner_address = None;
        self.upstream_session = None;
        self.draining_since = Some(now);
    }

    pub fn new(connection_id: &str, now: Timestamp) -> Self {
        Self {
            connection_id: connection_id.to_owned(),
            created_at: now,
            last_activity_at: now,
            metadata: Map::new(),
            state: None,
            owner_pod: None,
            owner_address: None,
            upstream_session: None,
            protocol_version: None,
            initialize_params: None,
            credential_fingerprint: None,
            rehydrations: 0,
            draining_since: None,
            ending_since: None,
            setup: SessionSetup::default(),
            extra: Map::new(),
        }
    }

    pub fn state(&self) -> SessionState {
        self.state.unwrap_or(SessionState::Active)
    }

    /// Sets the state; `active` is written as no field at all, as in the seed's records (every
    /// byte of a record is paid for once per session in Redis memory).
    pub fn set_state(&mut self, state: SessionState) {
        self.state = (state == SessionState::Draining).then_some(state);
    }

    pub fn user_id(&self) -> Option<&str> {
        self.metadata.get("user_id").and_then(Value::as_str)
    }

    pub fn to_json(&self) -> String {
        // Serializing this struct cannot fail: every map key is a string.
        serde_json::to_string(self).unwrap_or_else(|e| unreachable!("record serializes: {e}"))
    }

    pub fn from_json(raw: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(raw).map_err(|e| format!("value is not UTF-8: {e}"))?;
        serde_json::from_str(text).map_err(|e| format!("malformed session JSON: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_RECORD: &str = r#"{"connection_id": "a1b2c3d4-e5f6-7890-abcd-ef1234567890", "created_at": "2026-01-15T10:00:00.000000", "last_activity_at": "2026-01-15T10:05:00.000000", "metadata": {"user_id": "user-123", "api_key_prefix": "intracker_mcp"}}"#;

    #[test]
    fn reads_the_seeds_records() {
        let record = SessionRecord::from_json(SEED_RECORD.as_bytes()).unwrap();
        assert_eq!(record.state(), SessionState::Active);
        assert_eq!(record.user_id(), Some("user-123"));
        assert_eq!(
            record.created_at.to_seed_string(),
            "2026-01-15T10:00:00.000000"
        );
        assert_eq!(record.owner_pod, None);
        // The seed's own metadata is kept through a rewrite.
        let rewritten = SessionRecord::from_json(record.to_json().as_bytes()).unwrap();
        assert_eq!(rewritten, record);
    }

    #[test]
    fn writes_seed_order_and_format() {
        let now = Timestamp::parse("2026-01-15T10:00:00Z").unwrap();
        let json = SessionRecord::new("abc", now).to_json();
        assert_eq!(
            json,
            r#"{"connection_id":"abc","created_at":"2026-01-15T10:00:00.000000","last_activity_at":"2026-01-15T10:00:00.000000","metadata":{}}"#
        );
    }

    #[test]
    fn keeps_unknown_fields() {
        let raw = r#"{"connection_id":"x","created_at":"2026-01-15T10:00:00","last_activity_at":"2026-01-15T10:00:00+02:00","metadata":{},"future":{"a":[1,2]}}"#;
        let record = SessionRecord::from_json(raw.as_bytes()).unwrap();
        assert_eq!(record.extra["future"]["a"][1], 2);
        assert_eq!(
            record.last_activity_at.to_seed_string(),
            "2026-01-15T08:00:00.000000"
        );
        assert!(record.to_json().contains(r#""future":{"a":[1,2]}"#));
    }

    #[test]
    fn setup_changes_are_bounded_and_survive_a_rewrite() {
        let mut setup = SessionSetup::default();
        assert!(setup.apply(SetupChange::Subscribe("file:///a".into())));
        assert!(!setup.apply(SetupChange::Subscribe("file:///a".into())));
        assert!(setup.apply(SetupChange::Subscribe("file:///b".into())));
        assert!(setup.apply(SetupChange::Unsubscribe("file:///a".into())));
        assert!(!setup.apply(SetupChange::Unsubscribe("file:///zz".into())));
        assert!(setup.apply(SetupChange::LogLevel("debug".into())));
        assert!(!setup.apply(SetupChange::Subscribe("x".repeat(5000))));
        for n in 0..SessionSetup::MAX_SUBSCRIPTIONS {
            setup.apply(SetupChange::Subscribe(format!("u{n}")));
        }
        assert_eq!(setup.subscriptions.len(), SessionSetup::MAX_SUBSCRIPTIONS);
        let mut record = SessionRecord::new("x", Timestamp::now());
        record.setup = setup.clone();
        let read = SessionRecord::from_json(record.to_json().as_bytes()).unwrap();
        assert_eq!(read.setup, setup);
        assert_eq!(read.setup.subscriptions[0], "file:///b");
        // Without setup, nothing is written (seed-shaped records stay seed-shaped).
        assert!(
            !SessionRecord::new("y", Timestamp::now())
                .to_json()
                .contains("setup")
        );
    }

    #[test]
    fn bad_records_are_errors_not_panics() {
        for bad in [
            &b"not json"[..],
            br#"{"connection_id": 7, "created_at": "x", "last_activity_at": "y"}"#,
            br#"{"connection_id":"x","created_at":"yesterday","last_activity_at":"2026-01-15T10:00:00"}"#,
            br#"{"connection_id":"x","created_at":"2026-01-15T10:00:00","last_activity_at":"2026-01-15T10:00:00","state":"zombie"}"#,
            br#"[1,2,3]"#,
            b"\xff\xfe",
        ] {
            assert!(SessionRecord::from_json(bad).is_err(), "{bad:?}");
        }
    }
}
