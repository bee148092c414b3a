//! The sessions this proxy serves: the upstream session each maps to, the identity it is bound
//! to, what the store holds of it (to write it back, or replay from it, when the store lacks
//! it), and how many sessions each identity holds. One lock, behind methods: nothing outside
//! this file sees the map.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use serde_json::Value;

use crate::proxy::Unknown;
use crate::proxy::session::admission::{Admission, Holdings};
pub use crate::proxy::session::admission::{AdmissionLimits, Refusal};
use crate::proxy::upstream::backends::{Assigned, Backend};
use crate::store::binding::{self, Binding};
use crate::store::{NewSession, Owner, SessionId, SessionSetup, SetupChange};

/// The session table of one proxy.
pub struct SessionTable {
    sessions: RwLock<Sessions>,
    /// `mcp_proxy_sessions`.
    gauge: Gauge,
    /// Last use is kept in seconds since this, in 32 bits per session.
    started: Instant,
    /// Wakes whoever waits for a session's upstream side to change.
    remapped: tokio::sync::Notify,
    /// Whether sessions stay on a backend pod that takes nothing new (it terminates) until it
    /// is gone (a gateway under drain strategy `Wait`), rather than move off it at once.
    stay_on_leaving_backends: bool,
}

impl SessionTable {
    pub fn new(limits: AdmissionLimits, gauge: Gauge, stay_on_leaving_backends: bool) -> Self {
        let started = Instant::now();
        Self {
            sessions: RwLock::new(Sessions {
                by_id: HashMap::new(),
                holdings: Holdings::default(),
                admission: Admission::new(limits, started),
            }),
            gauge,
            started,
            remapped: tokio::sync::Notify::new(),
            stay_on_leaving_backends,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Sessions> {
        self.sessions.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Sessions> {
        self.sessions.write().unwrap_or_else(|p| p.into_inner())
    }

    fn now_secs(&self) -> u32 {
        u32::try_from(self.started.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    /// What the table says of a session of `transport`, for `credential` (marking it used). A
    /// session of the other transport is unknown here.
    pub fn lookup(&self, id: &SessionId, credential: Option<&str>, transport: Transport) -> Lookup {
        let sessions = self.read();
        let Some(mapped) = sessions.by_id.get(id) else {
            return Lookup::Absent;
        };
        match binding::check(mapped.credential.as_deref(), credential) {
            Binding::Mismatch => return Lookup::Refused(Unknown::OtherCredential),
            Binding::Unbound => return Lookup::Unbound,
            Binding::Matches => {}
        }
        if mapped.transport != transport {
            return Lookup::Refused(Unknown::NotFound);
        }
        mapped.last_used.store(self.now_secs(), Ordering::Relaxed);
        match &mapped.upstream {
            // A pod that stopped taking requests (gateway mode): the session moves by replay,
            // or where it stays on its pod, once the pod is gone. An HTTP+SSE session moves
            // with its stream instead.
            UpstreamState::Live(upstream)
                if transport == Transport::Streamable && self.has_left(&upstream.backend) =>
            {
                Lookup::Stale(Stale::Left)
            }
            UpstreamState::Live(upstream) => Lookup::Live(upstream.clone()),
            UpstreamState::Stale(why) => Lookup::Stale(*why),
        }
    }

    /// Whether a session on `backend` must leave it.
    fn has_left(&self, backend: &Backend) -> bool {
        if self.stay_on_leaving_backends {
            backend.is_gone()
        } else {
            !backend.takes_requests()
        }
    }

    /// The upstream side of a mapped session, whoever asks.
    pub fn upstream_of(&self, id: &SessionId) -> Option<UpstreamSession> {
        match &self.read().by_id.get(id)?.upstream {
            UpstreamState::Live(upstream) => Some(upstream.clone()),
            UpstreamState::Stale(_) => None,
        }
    }

    /// The identity a mapped session is bound to; `None` for a session not mapped here.
    pub fn bound_to(&self, id: &SessionId) -> Option<BoundTo> {
        let sessions = self.read();
        let mapped = sessions.by_id.get(id)?;
        Some(match mapped.credential.as_deref() {
            Some(fingerprint) => BoundTo::Credential(fingerprint.to_owned()),
            None => BoundTo::Nobody,
        })
    }

    /// Points a mapped session at a new upstream session.
    pub fn remap(&self, id: &SessionId, upstream: UpstreamSession) {
        if let Some(mapped) = self.write().by_id.get_mut(id) {
            mapped.upstream = UpstreamState::Live(upstream);
        }
        self.remapped.notify_waiters();
    }

    /// Waits until `id` maps to an upstream session other than `old` (true), or to none, or
    /// `deadline` (false).
    pub async fn remapped_from(
        &self,
        id: &SessionId,
        old: &UpstreamSession,
        deadline: Instant,
    ) -> bool {
        loop {
            // Registered before the look, so that a change in between is not missed.
            let changed = self.remapped.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.upstream_of(id) {
                Some(current) if !current.is(old) => return true,
                Some(_) => {}
                None => return false,
            }
            if tokio::time::timeout_at(deadline.into(), changed)
                .await
                .is_err()
            {
                return false;
            }
        }
    }

    /// The upstream no longer knows the session it mapped `id` to: the next request replays
    /// the handshake. Only if `id` still maps to `upstream_id` (a concurrent request may have
    /// replayed meanwhile). The copy of what the store holds stays: while the store lacks the
    /// session (Redis refused or evicted it), it is what the replay uses.
    pub fn invalidate(&self, id: &SessionId, upstream: &UpstreamSession, why: Stale) {
        if let Some(mapped) = self.write().by_id.get_mut(id)
            && matches!(&mapped.upstream, UpstreamState::Live(u) if u.is(upstream))
        {
            mapped.upstream = UpstreamState::Stale(why);
        }
        self.remapped.notify_waiters();
    }

    /// Binds a mapped session bound to nobody to `credential` (the store bound it first).
    pub fn bind(&self, id: &SessionId, credential: &str) {
        let mut sessions = self.write();
        let sessions = &mut *sessions;
        if let Some(mapped) = sessions.by_id.get_mut(id)
            && mapped.credential.is_none()
        {
            let bound: Box<str> = credential.into();
            mapped.credential = Some(bound.clone());
            sessions.holdings.release(&None);
            sessions.holdings.hold(Some(bound));
        }
    }

    /// The stored `initialize` params of a mapped session.
    pub fn initialize_params(&self, id: &SessionId) -> Option<Value> {
        let text = self
            .read()
            .by_id
            .get(id)?
            .stored
            .initialize_params
            .clone()?;
        serde_json::from_str(&text).ok()
    }

    /// Keeps `params` as the session's `initialize` params; false if it is not mapped or
    /// already has them.
    pub fn set_initialize_params(&self, id: &SessionId, params: &Value) -> bool {
        let mut sessions = self.write();
        let Some(mapped) = sessions.by_id.get_mut(id) else {
            return false;
        };
        if mapped.stored.initialize_params.is_some() {
            return false;
        }
        mapped.stored.initialize_params = serde_json::to_string(params)
            .ok()
            .map(String::into_boxed_str);
        true
    }

    /// Applies a setup request's change to the session's copy; whether it changed anything.
    pub fn record_setup(&self, id: &SessionId, change: SetupChange) -> bool {
        self.write()
            .by_id
            .get_mut(id)
            .is_some_and(|mapped| mapped.stored.setup.apply(change))
    }

    /// Keeps the protocol version the upstream negotiated; whether it is news.
    pub fn set_protocol_version(&self, id: &SessionId, version: &str) -> bool {
        let mut sessions = self.write();
        let Some(mapped) = sessions.by_id.get_mut(id) else {
            return false;
        };
        if mapped.stored.protocol_version.as_deref() == Some(version) {
            return false;
        }
        mapped.stored.protocol_version = Some(version.into());
        true
    }

    /// What the store should hold of a mapped session, owned by `owner`.
    pub fn stored_copy(&self, id: &SessionId, owner: Owner) -> Option<NewSession> {
        self.read().by_id.get(id).map(|mapped| {
            mapped
                .stored
                .to_new_session(mapped.credential.as_deref().map(String::from))
                .owned_by(owner)
        })
    }

    /// A place for a new session of `credential` (as the binding sees it), taken now so that
    /// concurrent `initialize`s cannot all pass the check; or why there is none.
    pub fn admit(&self, credential: Option<String>) -> Result<Slot<'_>, Refusal> {
        let key: Option<Box<str>> = credential.as_deref().map(Box::from);
        let mut sessions = self.write();
        let sessions = &mut *sessions;
        sessions
            .admission
            .admit(&mut sessions.holdings, &key, Instant::now())?;
        Ok(Slot {
            sessions: &self.sessions,
            key,
            credential,
            used: false,
        })
    }

    /// Maps `id`; a new session counts against its credential's limit, in the `slot` its
    /// admission took if it has one.
    pub fn remember(&self, id: &SessionId, mapping: Mapping, slot: Option<Slot<'_>>) {
        let Mapping {
            upstream,
            transport,
            stored,
        } = mapping;
        let credential: Option<Box<str>> = stored.credential_fingerprint.as_deref().map(Box::from);
        let mapped = Mapped {
            upstream: UpstreamState::Live(upstream),
            transport,
            credential: credential.clone(),
            last_used: AtomicU32::new(self.now_secs()),
            stored: StoredCopy::of(&stored),
        };
        let mut sessions = self.write();
        let new = sessions.by_id.insert(id.clone(), mapped).is_none();
        self.gauge.set(sessions.by_id.len() as i64);
        match slot {
            Some(mut slot) if new && slot.key == credential => slot.used = true,
            _ if new => sessions.holdings.hold(credential),
            _ => {}
        }
        // An unused slot gives itself back, taking the lock: not while this holds it.
        drop(sessions);
        self.remapped.notify_waiters();
    }

    /// Drops everything the table knows of `id`.
    pub fn unmap(&self, id: &SessionId) {
        let mut sessions = self.write();
        if let Some(mapped) = sessions.by_id.remove(id) {
            sessions.holdings.release(&mapped.credential);
        }
        self.gauge.set(sessions.by_id.len() as i64);
        drop(sessions);
        self.remapped.notify_waiters();
    }

    /// Sessions unused for longer than `ttl`.
    pub fn idle(&self, ttl: Duration) -> Vec<SessionId> {
        let ttl = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX);
        let now = self.now_secs();
        self.read()
            .by_id
            .iter()
            .filter(|(_, m)| now.saturating_sub(m.last_used.load(Ordering::Relaxed)) > ttl)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// How many sessions are mapped.
    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    /// Every mapped session's id.
    pub fn ids(&self) -> Vec<SessionId> {
        self.read().by_id.keys().cloned().collect()
    }
}

/// The sessions this proxy has upstream sessions for.
struct Sessions {
    by_id: HashMap<SessionId, Mapped>,
    /// Sessions per identity, admitted slots included.
    holdings: Holdings,
    admission: Admission,
}

/// How a session reaches its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Streamable HTTP: the upstream session id goes in `Mcp-Session-Id`.
    Streamable,
    /// HTTP+SSE (2024-11-05): the upstream's message endpoint, session included.
    Sse,
}

/// A session's side at a backend: the backend, and the session id it gave (HTTP+SSE: its
/// message endpoint, session included).
#[derive(Debug, Clone)]
pub struct UpstreamSession {
    pub backend: Assigned,
    pub id: Box<str>,
}

impl UpstreamSession {
    pub fn new(backend: Assigned, id: impl Into<Box<str>>) -> Self {
        Self {
            backend,
            id: id.into(),
        }
    }

    /// The same session at the same backend.
    pub fn is(&self, other: &UpstreamSession) -> bool {
        self.id == other.id && self.backend.same(&other.backend)
    }
}

/// A session this proxy has an upstream session for.
#[derive(Debug)]
struct Mapped {
    upstream: UpstreamState,
    transport: Transport,
    credential: Option<Box<str>>,
    /// Seconds since the proxy started, at the last request: idle sessions are dropped.
    last_used: AtomicU32,
    /// What the store holds of the session, to write it again if the store loses it (a Redis
    /// restarted without persistence): a live proxy's sessions are never lost with it.
    stored: StoredCopy,
}

/// The stored handshake as compact JSON text: a parsed JSON tree takes several times the
/// memory of its text, per session, for a copy that is read only if the store loses it.
#[derive(Debug, Clone)]
struct StoredCopy {
    initialize_params: Option<Box<str>>,
    protocol_version: Option<Box<str>>,
    metadata: Option<Box<str>>,
    setup: SessionSetup,
}

impl StoredCopy {
    fn of(session: &NewSession) -> Self {
        let text = |value: &Value| {
            serde_json::to_string(value)
                .ok()
                .map(String::into_boxed_str)
        };
        Self {
            initialize_params: session.initialize_params.as_ref().and_then(text),
            protocol_version: session.protocol_version.as_deref().map(Box::from),
            metadata: (!session.metadata.is_empty())
                .then(|| {
                    serde_json::to_string(&session.metadata)
                        .ok()
                        .map(String::into_boxed_str)
                })
                .flatten(),
            setup: session.setup.clone(),
        }
    }

    fn to_new_session(&self, credential: Option<String>) -> NewSession {
        fn parse<T: serde::de::DeserializeOwned>(text: &Option<Box<str>>) -> Option<T> {
            text.as_deref().and_then(|t| serde_json::from_str(t).ok())
        }
        NewSession {
            metadata: parse(&self.metadata).unwrap_or_default(),
            protocol_version: self.protocol_version.as_deref().map(String::from),
            initialize_params: parse(&self.initialize_params),
            credential_fingerprint: credential,
            setup: self.setup.clone(),
            ..Default::default()
        }
    }
}

/// A mapped session's backend side.
#[derive(Debug)]
enum UpstreamState {
    Live(UpstreamSession),
    /// The next request replays the handshake.
    Stale(Stale),
}

/// Why a session known here needs its handshake replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// Its server said it does not know it (it restarted in place).
    Forgotten,
    /// Its backend pod left (gateway mode: terminating, not ready, gone, or unreachable): the
    /// session moves to another pod.
    Left,
}

/// What the table maps a session to: its upstream session, the transport its client uses, and
/// what the store holds of it (kept, so that an upstream restart never loses the session).
pub struct Mapping {
    pub upstream: UpstreamSession,
    pub transport: Transport,
    pub stored: NewSession,
}

/// The identity a mapped session is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundTo {
    /// Served without a credential so far; the first one presented binds it.
    Nobody,
    /// The fingerprint of the credential that made it.
    Credential(String),
}

impl BoundTo {
    pub fn fingerprint(self) -> Option<String> {
        match self {
            Self::Nobody => None,
            Self::Credential(fingerprint) => Some(fingerprint),
        }
    }
}

/// What this proxy's memory says of a session, for a request presenting a credential.
#[derive(Debug)]
pub enum Lookup {
    /// Mapped to a live upstream session.
    Live(UpstreamSession),
    /// Known here, but the upstream lost it: replay, from the store or from the copy here.
    Stale(Stale),
    /// Known here and bound to nobody, and the request has an identity: bind it first.
    Unbound,
    /// Not known here.
    Absent,
    Refused(Unknown),
}

/// A session a credential may still open, taken at admission; given back when dropped unless
/// a session was remembered in it.
pub struct Slot<'a> {
    sessions: &'a RwLock<Sessions>,
    /// The key it counts under.
    key: Option<Box<str>>,
    /// The credential's fingerprint, for the new session.
    pub credential: Option<String>,
    used: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.used {
            let mut sessions = self.sessions.write().unwrap_or_else(|p| p.into_inner());
            sessions.holdings.release(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_leaves_a_terminating_backend_at_once_unless_sessions_stay() {
        use crate::proxy::upstream::backends::{Backends, Endpoint};
        let backends = Backends::discovered(1);
        let report = |serving: bool, present: bool| {
            let endpoints = [Endpoint {
                name: "a".into(),
                address: "127.0.0.1:1".into(),
                serving,
            }];
            backends.update(if present { &endpoints[..] } else { &[] });
        };
        report(true, true);
        let id = SessionId::random();
        let tables = [false, true].map(|stay| {
            let table = SessionTable::new(AdmissionLimits::DEFAULT, Gauge::default(), stay);
            let mapping = Mapping {
                upstream: UpstreamSession::new(backends.pick().expect("a serves"), "u"),
                transport: Transport::Streamable,
                stored: NewSession::default(),
            };
            table.remember(&id, mapping, None);
            table
        });
        let looked = |table: &SessionTable| match table.lookup(&id, None, Transport::Streamable) {
            Lookup::Live(_) => "live",
            Lookup::Stale(Stale::Left) => "left",
            other => panic!("{other:?}"),
        };
        assert_eq!(tables.each_ref().map(looked), ["live", "live"]);
        report(false, true);
        assert_eq!(
            tables.each_ref().map(looked),
            ["left", "live"],
            "terminating"
        );
        report(false, false);
        assert_eq!(tables.each_ref().map(looked), ["left", "left"], "gone");
    }

    #[test]
    fn the_compact_copy_restores_what_was_stored() {
        let session = NewSession {
            owner_pod: Some("old".into()),
            owner_address: Some("10.0.0.1:8090".into()),
            upstream_session: None,
            metadata: serde_json::json!({"user_id": "u-1"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            protocol_version: Some("2025-06-18".into()),
            initialize_params: Some(
                serde_json::json!({"capabilities": {"roots": []}, "clientInfo": {"name": "c"}}),
            ),
            credential_fingerprint: Some("fp".into()),
            setup: SessionSetup {
                subscriptions: vec!["demo://resource/1".into()],
                log_level: Some("debug".into()),
            },
        };
        let copy = StoredCopy::of(&session);
        let owner = Owner {
            pod: Some("pod-b".into()),
            address: Some("10.0.0.2:8090".into()),
            upstream_session: None,
        };
        let restored = copy.to_new_session(Some("fp".into())).owned_by(owner);
        assert_eq!(restored.owner_pod.as_deref(), Some("pod-b"));
        assert_eq!(restored.owner_address.as_deref(), Some("10.0.0.2:8090"));
        assert_eq!(restored.metadata, session.metadata);
        assert_eq!(restored.protocol_version, session.protocol_version);
        assert_eq!(restored.initialize_params, session.initialize_params);
        assert_eq!(restored.credential_fingerprint.as_deref(), Some("fp"));
        assert_eq!(restored.setup, session.setup);
        let empty = StoredCopy::of(&NewSession::default());
        assert!(empty.metadata.is_none() && empty.initialize_params.is_none());
    }
}
