//! Replays: a session the upstream does not know (it restarted, or another pod made it) gets a
//! fresh upstream session from its stored handshake, bound to the credential it was made with.

use std::sync::Arc;
use std::time::Instant;

use axum::http::{HeaderMap, HeaderValue, Method, header};
use bytes::Bytes;
use http_body_util::BodyExt as _;
use serde_json::Value;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::proxy::answers::{Failure, Unknown, header_or_empty};
use crate::proxy::backoff;
use crate::proxy::mcp::protocol::{self, PROTOCOL_VERSION_HEADER, SESSION_HEADER, StreamKind};
use crate::proxy::session::exchange::{Bound, Exchange, MAX_ATTEMPTS, Signal, session_signal};
use crate::proxy::session::table::{Lookup, Mapping, Stale, Transport, UpstreamSession};
use crate::proxy::upstream::{Outbound, UpstreamError};
use crate::proxy::{Proxy, metrics};
use crate::store::binding::{self, Binding};
use crate::store::{
    self, Claim, ClaimOutcome, NewSession, Session, SessionId, SessionPatch, StoreError, Tally,
};

/// Where a replay's handshake comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The store's record: the session as every pod sees it.
    Store,
    /// This proxy's own copy, when the store lost the session or does not answer.
    Memory,
}

struct Replayable {
    session: NewSession,
    source: Source,
}

/// How a replayed session came to this proxy, which is what a rollout counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// Served here as it was (this proxy's already, or shared): nothing to count.
    Served,
    /// Claimed from the pod that owned it; `from_draining` when that pod had drained it.
    Claimed { from_draining: bool },
    /// This proxy's own session, moving off a backend pod that left (gateway mode).
    MovedOffLeftBackend,
}

impl Arrival {
    /// Whether a replay that succeeds rehydrates a drained session.
    fn rehydrates(self) -> bool {
        matches!(
            self,
            Self::Claimed {
                from_draining: true
            } | Self::MovedOffLeftBackend
        )
    }
}

impl Proxy {
    /// Makes a fresh upstream session for the client's session from the stored handshake,
    /// at the MCP endpoint the client uses; then, unless the request is the listening stream's
    /// own, lets that stream reopen before the request goes on.
    pub(in crate::proxy) async fn replay(
        &self,
        bound: &Bound,
        exchange: &Exchange,
    ) -> Result<UpstreamSession, Failure> {
        let id = &bound.id;
        let lock = self
            .replays
            .lock()
            .await
            .entry(id.clone())
            .or_default()
            .clone();
        let result = {
            let _one_at_a_time = lock.lock().await;
            self.replay_locked(bound, exchange)
                .instrument(info_span!("replay", session = %id))
                .await
        };
        // The lock only orders the requests that arrive during a replay: the last one out
        // removes it, so the map does not keep an entry per session ever replayed.
        {
            let mut replays = self.replays.lock().await;
            if replays
                .get(id)
                .is_some_and(|current| Arc::ptr_eq(current, &lock))
                && Arc::strong_count(&lock) == 2
            {
                replays.remove(id);
            }
        }
        if result.is_ok() && exchange.stream_kind() != StreamKind::Listen {
            self.listening.reopen(id).await;
        }
        result
    }

    /// What a replay starts from: the store's record where it has one (another pod may have
    /// changed it), else the copy in memory (the store refused or evicted the session, or is
    /// down): an upstream restart never loses a session this proxy serves.
    async fn replay_source(&self, id: &SessionId) -> Result<Option<Replayable>, Failure> {
        let from_store = |session: Session| Replayable {
            session: NewSession::from_record(session.record),
            source: Source::Store,
        };
        let in_memory = self.table.stored_copy(id, self.owner());
        let Some(in_memory) = in_memory else {
            // Nothing here to fall back on: wait out a store outage.
            return Ok(self.stored(id).await?.map(from_store));
        };
        let from_memory = Replayable {
            session: in_memory,
            source: Source::Memory,
        };
        match self.store.get(id).await {
            Ok(Some(session)) => Ok(Some(from_store(session))),
            Ok(None) => {
                warn!(session = %id, "the store lacks a session served here; replaying from memory");
                Ok(Some(from_memory))
            }
            Err(error) => {
                debug!(session = %id, %error, "the store is unavailable; replaying from memory");
                Ok(Some(from_memory))
            }
        }
    }

    /// A replay in three steps: the session comes here (claimed, or moved off a backend pod
    /// that left), its handshake goes to the upstream, and the move is counted.
    async fn replay_locked(
        &self,
        bound: &Bound,
        exchange: &Exchange,
    ) -> Result<UpstreamSession, Failure> {
        let id = &bound.id;
        let unknown = |why| Err(Failure::Unknown(why));
        let lookup = self.lookup(bound);
        let held = !matches!(lookup, Lookup::Absent);
        let backend_left = match lookup {
            // Another request of this session replayed meanwhile.
            Lookup::Live(upstream) => return Ok(upstream),
            Lookup::Refused(why) => return unknown(why),
            Lookup::Stale(why) => why == Stale::Left,
            Lookup::Absent | Lookup::Unbound => false,
        };
        // Its client is ending it, and its server forgot it for that: a replay would open a
        // session that outlives its end (the listening stream, reopening, meets the `DELETE`).
        if self.ending.contains(id) && exchange.method != Method::DELETE {
            return unknown(Unknown::NotFound);
        }
        let Some(Replayable { session, source }) = self.replay_source(id).await? else {
            return unknown(Unknown::NotFound);
        };
        // A session that stays on its pod, which this proxy held and no longer does (it
        // ended, or was lost): a replay would bring it back without its state.
        if !held && self.forgot_here(&session) {
            return unknown(Unknown::NotFound);
        }
        let binding = binding::check(
            session.credential_fingerprint.as_deref(),
            bound.credential.as_deref(),
        );
        if binding == Binding::Mismatch {
            return unknown(Unknown::OtherCredential);
        }
        let arrival = self.arrive(bound, &session, source, backend_left).await?;
        // A claim binds a session bound to nobody; a session served without one is bound here.
        let credential = match (binding, &bound.credential) {
            (Binding::Unbound, Some(credential)) => {
                if !matches!(arrival, Arrival::Claimed { .. }) {
                    self.bind(id, credential).await?;
                }
                Some(credential.clone())
            }
            _ => session.credential_fingerprint.clone(),
        };
        let path = exchange.path.split('?').next().unwrap_or(&exchange.path);
        let headers = self.replay_headers(exchange);
        let handshake = self.handshake(path, headers, &session).await?;
        let Some(upstream) = self.tally_replay(id, arrival, handshake) else {
            return unknown(Unknown::NotFound);
        };
        info!(
            subscriptions = session.setup.subscriptions.len(),
            from_memory = source == Source::Memory,
            backend = upstream.backend.name(),
            "handshake replayed to the upstream"
        );
        let stored = NewSession {
            credential_fingerprint: credential,
            ..session
        }
        .owned_by(self.owner());
        let mapping = Mapping {
            upstream: upstream.clone(),
            transport: Transport::Streamable,
            stored,
        };
        self.table.remember(id, mapping, None);
        if source == Source::Memory {
            self.restore(id).await;
        }
        Ok(upstream)
    }

    /// How the session comes to this proxy: claimed from the pod that owned it, moved off a
    /// backend pod that left, or simply served here.
    async fn arrive(
        &self,
        bound: &Bound,
        session: &NewSession,
        source: Source,
        backend_left: bool,
    ) -> Result<Arrival, Failure> {
        let here = &self.config.pod_name;
        if source == Source::Store
            && session.owner_pod != *here
            && let Some(claim) = self.claim_here(&bound.id, bound.credential.clone()).await
        {
            let (outcome, arrival) = match claim {
                // From the claim, not the record read before it: the session may have been
                // drained in between.
                Ok(ClaimOutcome::Claimed { from_draining, .. }) => {
                    (metrics::Claim::Claimed, Arrival::Claimed { from_draining })
                }
                Ok(ClaimOutcome::CredentialMismatch) => {
                    return Err(Failure::Unknown(Unknown::OtherCredential));
                }
                Ok(ClaimOutcome::NotFound) => return Err(Failure::Unknown(Unknown::NotFound)),
                // Any proxy serves any session; ownership follows the GET stream.
                Ok(_) => (metrics::Claim::Shared, Arrival::Served),
                Err(error) => {
                    warn!(%error, "cannot claim the session");
                    (metrics::Claim::Failed, Arrival::Served)
                }
            };
            metrics::inc(&self.metrics.claims, outcome);
            if arrival != Arrival::Served {
                return Ok(arrival);
            }
        }
        // A session this proxy owns, moving off a backend pod that left (gateway mode): counted
        // as a sidecar counts the sessions of a pod that stops (drained, then rehydrated or
        // lost), by the session's owner alone, so that a rollout's counts read the same in
        // both modes.
        let moved =
            backend_left && source == Source::Store && here.is_some() && session.owner_pod == *here;
        Ok(if moved {
            Arrival::MovedOffLeftBackend
        } else {
            Arrival::Served
        })
    }

    /// Counts what the replay's outcome means for a rollout, once the move has one (no pod
    /// may take the session before): the upstream session, or `None` if the upstream refused
    /// the handshake and the session is lost.
    fn tally_replay(
        &self,
        id: &SessionId,
        arrival: Arrival,
        handshake: Option<UpstreamSession>,
    ) -> Option<UpstreamSession> {
        if arrival == Arrival::MovedOffLeftBackend {
            self.report(Tally::Drained, 1);
        }
        let Some(upstream) = handshake else {
            metrics::inc(&self.metrics.replays, metrics::Replay::Refused);
            warn!("the upstream refused the replayed initialize; the session is lost");
            // Counted once, by the proxy that took the session over (or moved it); the
            // client's retries (here or on other pods, which now see it owned) are the same
            // loss.
            if arrival == Arrival::MovedOffLeftBackend {
                // Its retries start from the store, as on any other pod: not a second move.
                self.forget(id);
            }
            if arrival != Arrival::Served {
                self.report(Tally::Lost, 1);
            }
            return None;
        };
        metrics::inc(&self.metrics.replays, metrics::Replay::Replayed);
        if arrival.rehydrates() {
            self.report(Tally::Rehydrated, 1);
        }
        Some(upstream)
    }

    /// Headers of the messages a replay sends: the client's credential, JSON in, JSON or an
    /// event stream out.
    pub(in crate::proxy) fn replay_headers(&self, exchange: &Exchange) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = exchange.headers.get(header::AUTHORIZATION) {
            headers.insert(header::AUTHORIZATION, value.clone());
        }
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers
    }

    /// Sends `session`'s handshake (`initialize`, `notifications/initialized`) and then the
    /// requests that set up what the client had set up (subscriptions, the log level) to the
    /// upstream at `path` (in gateway mode, the least-loaded pod that takes it); the new
    /// upstream session, `None` if the upstream refused it.
    ///
    /// A quiesce may hold the rest of a handshake whose `initialize` the upstream answered
    /// just before it stopped: the restarted upstream then does not know the session it made,
    /// and the handshake starts over rather than hand out a session that no longer exists.
    pub(in crate::proxy) async fn handshake(
        &self,
        path: &str,
        headers: HeaderMap,
        session: &NewSession,
    ) -> Result<Option<UpstreamSession>, Failure> {
        let params = session.initialize_params.clone().unwrap_or(Value::Null);
        let initialize = protocol::initialize_request(&params, session.protocol_version.as_deref());
        let deadline = Instant::now() + self.config.hold;
        for _ in 0..MAX_ATTEMPTS {
            let Some(upstream) = self
                .initialize_upstream(path, &headers, &initialize, deadline)
                .await?
            else {
                return Ok(None);
            };
            if self.set_up(path, headers.clone(), session, &upstream).await {
                return Ok(Some(upstream));
            }
            debug!(
                backend = upstream.backend.name(),
                "the upstream forgot the replayed session during its handshake; replaying again"
            );
        }
        Err(Failure::Upstream(UpstreamError::Unavailable(
            self.config.hold,
            "the MCP server keeps forgetting the replayed session".into(),
        )))
    }

    /// Sends `initialize` (in gateway mode, to the least-loaded pod that takes it): the
    /// upstream session it made, `None` if the upstream refused it.
    async fn initialize_upstream(
        &self,
        path: &str,
        headers: &HeaderMap,
        initialize: &Bytes,
        deadline: Instant,
    ) -> Result<Option<UpstreamSession>, Failure> {
        let answer = loop {
            let backend = self
                .upstream
                .pick(deadline)
                .await
                .map_err(Failure::Upstream)?;
            match self
                .upstream
                .send(&backend, Outbound::post(path, headers, initialize.clone()))
                .await
            {
                Ok(answer) => break answer,
                // That pod went away: the next one.
                Err(UpstreamError::Unreachable(reason)) if Instant::now() < deadline => {
                    debug!(%reason, backend = backend.name(), "replay: a backend pod is unreachable");
                }
                Err(error) => return Err(Failure::Upstream(error)),
            }
        };
        let status = answer.response.status();
        let upstream_id = answer
            .response
            .headers()
            .get(&SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // The initialize result (JSON or one SSE event) is not the client's to see.
        let _ = answer.response.into_body().collect().await;
        Ok(upstream_id
            .filter(|_| status.is_success())
            .map(|id| UpstreamSession::new(answer.backend, id)))
    }

    /// Sends the rest of `session`'s handshake in `upstream`: `notifications/initialized`,
    /// then its setup requests; false if the upstream does not know the session (it restarted
    /// since the `initialize`). A setup request refused otherwise is logged, not fatal.
    async fn set_up(
        &self,
        path: &str,
        mut headers: HeaderMap,
        session: &NewSession,
        upstream: &UpstreamSession,
    ) -> bool {
        headers.insert(SESSION_HEADER, header_or_empty(&upstream.id));
        if let Some(version) = session
            .protocol_version
            .as_deref()
            .and_then(protocol::header_value)
        {
            headers.insert(PROTOCOL_VERSION_HEADER, version);
        }
        let messages = std::iter::once(protocol::initialized_notification())
            .chain(protocol::setup_requests(&session.setup));
        for message in messages {
            let sent = self
                .upstream
                .send(&upstream.backend, Outbound::post(path, &headers, message))
                .await;
            match sent {
                Ok(answer) => match session_signal(answer).await {
                    Signal::UnknownSession => return false,
                    Signal::Answer(answer) => {
                        let status = answer.response.status();
                        let _ = answer.response.into_body().collect().await;
                        if !status.is_success() {
                            warn!(%status, "the upstream refused a replayed setup request");
                        }
                    }
                },
                Err(error) => warn!(%error, "cannot replay a setup request"),
            }
        }
        true
    }

    /// Binds a session bound to nobody (the seed's service wrote it) to `credential`: in the
    /// store first, atomically, so that of two identities racing for it one wins everywhere;
    /// then here. A session the store does not hold (evicted, or never written) is bound here.
    pub(in crate::proxy) async fn bind(
        &self,
        id: &SessionId,
        credential: &str,
    ) -> Result<(), Failure> {
        let patch = SessionPatch {
            bind_credential: Some(credential.to_owned()),
            ..Default::default()
        };
        match self.store.update(id, patch).await {
            Ok(Some(session))
                if binding::check(
                    session.record.credential_fingerprint.as_deref(),
                    Some(credential),
                ) != Binding::Matches =>
            {
                return Err(Failure::Unknown(Unknown::OtherCredential));
            }
            Ok(_) => {}
            Err(error) => return Err(Failure::Store(error)),
        }
        self.table.bind(id, credential);
        info!(session = %id, "a session bound to nobody is now bound to the identity using it");
        Ok(())
    }

    /// Is `bound.credential` the one the session is bound to (binding a session bound to
    /// nobody)?
    pub(in crate::proxy) async fn authorize(&self, bound: &Bound) -> Result<(), Failure> {
        let binding = match self.lookup(bound) {
            Lookup::Live(_) | Lookup::Stale(_) => return Ok(()),
            Lookup::Refused(unknown) => return Err(Failure::Unknown(unknown)),
            Lookup::Unbound => Binding::Unbound,
            Lookup::Absent => match self.stored(&bound.id).await? {
                Some(session) => binding::check(
                    session.record.credential_fingerprint.as_deref(),
                    bound.credential.as_deref(),
                ),
                None => return Err(Failure::Unknown(Unknown::NotFound)),
            },
        };
        match (binding, &bound.credential) {
            (Binding::Matches, _) => Ok(()),
            (Binding::Unbound, Some(credential)) => self.bind(&bound.id, credential).await,
            _ => Err(Failure::Unknown(Unknown::OtherCredential)),
        }
    }

    /// The stored session; while the store does not answer (a Redis restart or fail-over),
    /// tried again with backoff for up to the hold time, as requests are held while the
    /// upstream restarts.
    pub(in crate::proxy) async fn stored(
        &self,
        id: &SessionId,
    ) -> Result<Option<Session>, Failure> {
        let mut backoff = backoff::RETRY.until(Instant::now() + self.config.hold);
        loop {
            match self.store.get(id).await {
                Ok(found) => return Ok(found),
                // A record that does not parse stays what it is: no point in waiting.
                Err(error @ StoreError::Unreadable(_)) => {
                    warn!(session = %id, %error, "the stored session cannot be read");
                    return Ok(None);
                }
                Err(error) => {
                    debug!(session = %id, %error, "the store does not answer; trying again");
                    if !backoff.wait().await {
                        warn!(session = %id, %error, "cannot read the session from the store");
                        return Err(Failure::Store(error));
                    }
                }
            }
        }
    }

    /// Claims `id` for this pod, as `credential`. `None` where no claim is made: a proxy without
    /// a pod name, or a draining one (clients reach it until the endpoints drop it, but what it
    /// claimed now would be orphaned when it exits).
    pub(in crate::proxy) async fn claim_here(
        &self,
        id: &SessionId,
        credential: Option<String>,
    ) -> Option<store::Result<ClaimOutcome>> {
        let pod = self.config.pod_name.clone()?;
        if self.lifecycle.draining() {
            return None;
        }
        let claim = Claim {
            pod,
            address: self.config.advertise.clone(),
            credential_fingerprint: credential,
        };
        Some(self.store.claim(id, claim).await)
    }

    /// Another pod drained (or the operator swept) a session this proxy serves too (requests
    /// of one session may reach any pod): it is open upstream here already, so a claim is all
    /// the takeover needs. Counted as a rehydration, like a replayed one.
    pub(in crate::proxy) async fn take_over(&self, id: &SessionId) {
        let Some(bound_to) = self.table.bound_to(id) else {
            return;
        };
        let Some(claimed) = self.claim_here(id, bound_to.fingerprint()).await else {
            return;
        };
        let outcome = match claimed {
            Ok(ClaimOutcome::Claimed { from_draining, .. }) => {
                info!(session = %id, "took over a drained session served here");
                if from_draining {
                    self.report(Tally::Rehydrated, 1);
                }
                metrics::Claim::Claimed
            }
            Ok(ClaimOutcome::CredentialMismatch) => metrics::Claim::OtherCredential,
            Ok(_) => metrics::Claim::Shared,
            Err(error) => {
                warn!(session = %id, %error, "cannot claim a drained session served here");
                metrics::Claim::Failed
            }
        };
        metrics::inc(&self.metrics.claims, outcome);
    }
}
