//! Sessions a gateway pins to their backend pods (drain strategy `Wait` in gateway mode).
//!
//! A server that keeps a session's state in memory must see every request of that session, in
//! that session. A gateway's replicas each serve any session (a Service spreads connections),
//! so the session's owner is recorded in the store as the backend pod itself, with the
//! backend's own id for the session: whichever replica a request reaches sends it there, in
//! that session, without a replay. The pod serves its sessions while it terminates (its
//! preStop hook holds it until they end, see `crate::hold`); a session whose pod is gone, or
//! whose server forgot it, is answered 404 and counted as lost, never replayed.

use std::borrow::Cow;

use tracing::debug;

use crate::proxy::Proxy;
use crate::proxy::answers::{Failure, Unknown};
use crate::proxy::metrics::Loss;
use crate::proxy::session::exchange::Bound;
use crate::proxy::session::table::{Lookup, Mapping, Stale, Transport, UpstreamSession};
use crate::proxy::upstream::UpstreamError;
use crate::store::binding::{self, Binding};
use crate::store::{NewSession, Owner, SessionId, SessionPatch, SessionRecord, SessionState};

/// Where a pinned session's record says it lives.
#[derive(Debug, PartialEq, Eq)]
struct Pin<'a> {
    pod: &'a str,
    address: &'a str,
    upstream_session: &'a str,
}

impl<'a> Pin<'a> {
    /// The record's pin; `None` for a session no gateway pinned (made before the policy chose
    /// `Wait`, handed over, or written by the seed's service): such a session moves, as before.
    fn of(record: &'a SessionRecord) -> Option<Self> {
        if record.state() != SessionState::Active {
            return None;
        }
        Some(Self {
            pod: record.owner_pod.as_deref()?,
            address: record.owner_address.as_deref()?,
            upstream_session: record.upstream_session.as_deref()?,
        })
    }
}

impl Proxy {
    /// Whether this proxy pins sessions to their backend pods: a gateway (its backends are
    /// discovered) under drain strategy `Wait`.
    pub(in crate::proxy) fn pins_sessions(&self) -> bool {
        self.config.residence.max_wait().is_some() && self.upstream.backends().is_discovered()
    }

    /// Who owns a session served in `upstream`: the backend pod where this proxy pins
    /// sessions, else this proxy.
    pub(in crate::proxy) fn owner_on(&self, upstream: &UpstreamSession) -> Owner {
        if !self.pins_sessions() {
            return self.owner();
        }
        Owner {
            pod: Some(upstream.backend.name().to_owned()),
            address: Some(upstream.backend.address().to_owned()),
            upstream_session: Some(upstream.id.to_string()),
        }
    }

    /// The pod a touch of `id` slides the per-pod index of: the session's owner. Asked on
    /// every request: this proxy's pod name is lent, not copied.
    pub(in crate::proxy) fn owner_pod_of(&self, id: &SessionId) -> Option<Cow<'_, str>> {
        if !self.pins_sessions() {
            return self.config.pod_name.as_deref().map(Cow::Borrowed);
        }
        self.table
            .upstream_of(id)
            .map(|upstream| Cow::Owned(upstream.backend.name().to_owned()))
    }

    /// The upstream session of a pinned session this proxy has no live mapping for (`lookup`
    /// says so): the one its record names, on its pod, while the pod watch reports the pod;
    /// an error (the session counted lost) once the pod or its server forgot it. `None` for a
    /// session no gateway pinned, which is replayed as before.
    pub(in crate::proxy) async fn pinned_upstream(
        &self,
        bound: &Bound,
        lookup: Lookup,
    ) -> Result<Option<UpstreamSession>, Failure> {
        let id = &bound.id;
        match lookup {
            Lookup::Live(upstream) => return Ok(Some(upstream)),
            Lookup::Refused(unknown) => return Err(Failure::Unknown(unknown)),
            Lookup::Stale(Stale::Left) => return Err(self.lost(id, Loss::OwnerGone).await),
            Lookup::Stale(Stale::Forgotten) => {
                return Err(self.lost(id, Loss::ServerRestarted).await);
            }
            Lookup::Unbound | Lookup::Absent => {}
        }
        match self.adopt(bound).await? {
            Adoption::Adopted(upstream) => Ok(Some(upstream)),
            Adoption::PodGone => Err(self.lost(id, Loss::OwnerGone).await),
            Adoption::NotPinned => Ok(None),
        }
    }

    /// Maps a session that another replica made (or this one, before it restarted) to the
    /// upstream session its record pins it to, without a replay.
    pub(in crate::proxy) async fn adopt(&self, bound: &Bound) -> Result<Adoption, Failure> {
        let id = &bound.id;
        if let Some(upstream) = self.table.upstream_of(id) {
            return Ok(Adoption::Adopted(upstream));
        }
        let Some(session) = self.stored(id).await? else {
            return Err(Failure::Unknown(Unknown::NotFound));
        };
        let record = session.record;
        let Some(pin) = Pin::of(&record) else {
            return Ok(Adoption::NotPinned);
        };
        match binding::check(
            record.credential_fingerprint.as_deref(),
            bound.credential.as_deref(),
        ) {
            Binding::Mismatch => return Err(Failure::Unknown(Unknown::OtherCredential)),
            Binding::Unbound => {
                if let Some(credential) = &bound.credential {
                    self.bind(id, credential).await?;
                }
            }
            Binding::Matches => {}
        }
        let backends = self.upstream.backends();
        let Some(backend) = backends.find(pin.pod, pin.address) else {
            if !backends.known() {
                return Err(Failure::Upstream(UpstreamError::Unavailable(
                    self.config.hold,
                    "the gateway has not listed the MCP server pods yet".into(),
                )));
            }
            return Ok(Adoption::PodGone);
        };
        let upstream = UpstreamSession::new(backend, pin.upstream_session);
        debug!(session = %id, backend = upstream.backend.name(), "serving a session pinned to its pod");
        let mapping = Mapping {
            upstream: upstream.clone(),
            transport: Transport::Streamable,
            stored: NewSession::from_record(record),
        };
        self.table.remember(id, mapping, None);
        Ok(Adoption::Adopted(upstream))
    }

    /// Whether another gateway replica is ending `id` for its client (where this proxy pins
    /// sessions): the session's server forgot it for that, and its streams here met the end.
    pub(in crate::proxy) async fn ended_elsewhere(&self, id: &SessionId) -> bool {
        if !self.pins_sessions() {
            return false;
        }
        matches!(
            self.store.get(id).await,
            Ok(Some(session)) if session.record.ending_since.is_some()
        )
    }

    /// Marks `id` being ended by its client in the store, before its `DELETE` goes to its
    /// server (where this proxy pins sessions): the other replicas, whose streams of the
    /// session the server ends first, then know it for an end, not a loss. `ending: false`
    /// takes the mark back, where the server refused the `DELETE`.
    pub(in crate::proxy) async fn mark_ending(&self, id: &SessionId, ending: bool) {
        if !self.pins_sessions() {
            return;
        }
        let patch = SessionPatch {
            ending: Some(ending),
            ..SessionPatch::default()
        };
        if let Err(error) = self.store.update(id, patch).await {
            debug!(session = %id, %error, "cannot mark the session's end in the store");
        }
    }
}

/// What a pinned session's record leads to.
pub(in crate::proxy) enum Adoption {
    /// Its upstream session, on its pod.
    Adopted(UpstreamSession),
    /// Its pod is gone, and its state with it.
    PodGone,
    /// No gateway pinned it: it moves, by replay, as before.
    NotPinned,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Timestamp;

    #[test]
    fn a_record_is_pinned_only_with_its_pod_address_and_upstream_session() {
        let mut record = SessionRecord::new("s", Timestamp::now());
        assert_eq!(Pin::of(&record), None, "a seed record");
        record.owner_pod = Some("api-1".into());
        record.owner_address = Some("10.0.0.1:8000".into());
        assert_eq!(Pin::of(&record), None, "a session a proxy owns");
        record.upstream_session = Some("upstream-1".into());
        assert_eq!(
            Pin::of(&record),
            Some(Pin {
                pod: "api-1",
                address: "10.0.0.1:8000",
                upstream_session: "upstream-1"
            })
        );
        record.hand_over(Timestamp::now());
        assert_eq!(Pin::of(&record), None, "handed over: it moves");
    }
}
