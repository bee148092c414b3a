//! Sessions that stay on their pod (drain strategy `Wait`).
//!
//! A server that keeps a session's state in memory (a browser, a kernel, a shell) must see every
//! request of that session, and a replay to another server would answer with that state gone.
//! So a request that reaches another pod's proxy (a Service spreads connections) goes on to the
//! proxy of the pod that owns the session, with a hop header that only the policy's proxies can
//! make; and a session whose owner is gone is answered 404 and counted as lost, with its
//! reason, so that its client starts a new session knowingly. It is replayed only where the
//! policy says `onOwnerLost: Replay`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use http_body_util::Full;
use tracing::{debug, info, warn};

pub use crate::api::OnOwnerLost;
use crate::api::contract::HOP_HEADER;
use crate::proxy::answers::{Failure, Unknown, header_or_empty, plain};
use crate::proxy::mcp::protocol::strip_hop_by_hop;
use crate::proxy::metrics::{self, Loss, Outcome as _};
use crate::proxy::session::exchange::{Bound, Exchange};
use crate::proxy::session::table::Lookup;
use crate::proxy::upstream::UpstreamError;
use crate::proxy::upstream::connector::was_not_delivered;
use crate::proxy::upstream::pool::{Pool, SendError};
use crate::proxy::{Proxy, backoff};
use crate::store::binding::{self, Binding};
use crate::store::{NewSession, SessionId, SessionState, Tally};

/// Where a session's requests are served: by any proxy, or by its owner's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residence {
    /// Drain strategy `Move`: any proxy serves any session, replaying its handshake to its own
    /// server; a stopping pod's sessions move.
    Moves,
    /// Drain strategy `Wait`: a session is served by the proxy that made it, and a stopping
    /// pod serves its sessions until they end, for `max_wait` at most.
    Stays {
        max_wait: Duration,
        on_owner_lost: OnOwnerLost,
    },
}

impl Residence {
    /// How long a stopping proxy serves its sessions; `None` where they move.
    pub fn max_wait(self) -> Option<Duration> {
        match self {
            Self::Moves => None,
            Self::Stays { max_wait, .. } => Some(max_wait),
        }
    }

    /// Whether a session whose state is gone is replayed rather than answered 404.
    pub fn replays_lost(self) -> bool {
        !matches!(
            self,
            Self::Stays {
                on_owner_lost: OnOwnerLost::Fail,
                ..
            }
        )
    }
}

/// Where a session that stays on its pod is, as a request finds it.
#[derive(Debug, PartialEq, Eq)]
pub(in crate::proxy) enum Home {
    /// Served here: this proxy holds it, or no pod does yet (a session the seed's service
    /// wrote, or one from before the policy chose `Wait`), or the store does not know it.
    Here,
    /// The proxy of the pod that owns it, at this address.
    Elsewhere { pod: String, address: String },
    /// Its owner, or the owner's server, is gone with its state.
    Lost { loss: Loss, owner: Option<String> },
}

/// Connections to the policy's other proxies, one pool per owner's address, each with when it
/// was last asked for.
#[derive(Default)]
pub(in crate::proxy) struct Hops(Mutex<HashMap<String, (Pool, Instant)>>);

/// How long a pool of hops to an owner is kept unasked: owners are pods that terminate, and
/// a pod's sessions end or move within its drain, so a pool unasked for this long is one to a
/// pod that is gone (or whose address is another's now).
const HOP_POOL_UNUSED: Duration = Duration::from_secs(120);

impl Hops {
    fn pool(&self, address: &str) -> Pool {
        self.pool_at(address, Instant::now())
    }

    /// The pool for `address`, asked for at `now`. A new one first drops those unasked for
    /// [`HOP_POOL_UNUSED`] (requests still on their connections keep them open).
    fn pool_at(&self, address: &str, now: Instant) -> Pool {
        let mut pools = self.lock();
        if let Some((pool, asked)) = pools.get_mut(address) {
            *asked = now;
            return pool.clone();
        }
        pools.retain(|_, (_, asked)| now.saturating_duration_since(*asked) < HOP_POOL_UNUSED);
        let pool = Pool::new(address.to_owned());
        pools.insert(address.to_owned(), (pool.clone(), now));
        pool
    }

    fn forget(&self, address: &str) {
        self.lock().remove(address);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Pool, Instant)>> {
        // What a panic can leave behind is a map of pools: safe to keep using.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Connection attempts at an owner before it counts as gone: a pod that was just killed may
/// refuse once while its address is still routed.
pub(in crate::proxy) const OWNER_ATTEMPTS: u32 = 3;

impl Proxy {
    /// Whether a request came from another of the policy's proxies; a hop header that is not
    /// one of theirs is refused (403), never taken for a client's request.
    #[allow(clippy::result_large_err)] // The refusal is the response, built once.
    pub(in crate::proxy) fn hop_of(
        &self,
        exchange: &Exchange,
        id: &SessionId,
    ) -> Result<bool, Response> {
        let Some(presented) = exchange.headers.get(HOP_HEADER) else {
            return Ok(false);
        };
        if self.fingerprints.is_hop(id.as_str(), presented.as_bytes()) {
            return Ok(true);
        }
        warn!(session = %id, "refused a request with a hop header no proxy of this policy made");
        Err(plain(
            StatusCode::FORBIDDEN,
            "Forbidden: invalid session hop header",
        ))
    }

    /// Where `bound`'s session is served (drain strategy `Wait`). A request that came over a
    /// hop (`hop`) is never sent on: its sender found this proxy the owner in the store.
    pub(in crate::proxy) async fn home(&self, bound: &Bound, hop: bool) -> Result<Home, Failure> {
        if !matches!(self.lookup(bound), Lookup::Absent) {
            return Ok(Home::Here);
        }
        let Some(session) = self.stored(&bound.id).await? else {
            return Ok(Home::Here);
        };
        let record = session.record;
        let presented = bound.credential.as_deref();
        if binding::check(record.credential_fingerprint.as_deref(), presented) == Binding::Mismatch
        {
            return Err(Failure::Unknown(Unknown::OtherCredential));
        }
        let here = self.config.pod_name.as_deref();
        Ok(
            match (record.state(), record.owner_pod, record.owner_address) {
                // The operator swept it: its pod is gone.
                (SessionState::Draining, ..) => Home::Lost {
                    loss: Loss::OwnerGone,
                    owner: None,
                },
                // Owned here, yet not held: this proxy restarted, and its server's session with it
                // is out of reach.
                (SessionState::Active, Some(owner), _) if Some(owner.as_str()) == here => {
                    Home::Lost {
                        loss: Loss::OwnerRestarted,
                        owner: Some(owner),
                    }
                }
                (SessionState::Active, Some(pod), Some(address)) if !hop => {
                    Home::Elsewhere { pod, address }
                }
                // Sent here for another pod: the owner's address is this pod's now (a pod's IP is
                // given again once it is gone), so the owner is gone.
                (SessionState::Active, Some(owner), Some(_)) => Home::Lost {
                    loss: Loss::OwnerGone,
                    owner: Some(owner),
                },
                _ => Home::Here,
            },
        )
    }

    /// Whether a session this proxy does not hold, `stored` so, stays on its pod (drain
    /// strategy `Wait`) and names this pod its owner: this proxy held it once, and let it go.
    pub(in crate::proxy) fn forgot_here(&self, stored: &NewSession) -> bool {
        self.config.residence.max_wait().is_some()
            && self.config.pod_name.is_some()
            && stored.owner_pod == self.config.pod_name
    }

    /// Sends `exchange` to the proxy of the pod that owns its session, and its answer back as
    /// it comes (an event stream stays one; its event ids are the owner's). `None` where the
    /// owner does not take connections: it is gone, and the caller loses the session.
    pub(in crate::proxy) async fn forward_home(
        &self,
        exchange: &Exchange,
        address: &str,
    ) -> Option<Response> {
        let bound = exchange.session.as_ref()?;
        let pool = self.hops.pool(address);
        let mut pauses = backoff::RETRY;
        let mut attempt = 0;
        while attempt < OWNER_ATTEMPTS {
            let mut headers = exchange.headers.clone();
            strip_hop_by_hop(&mut headers);
            headers.remove(axum::http::header::CONTENT_LENGTH);
            headers.insert(
                HOP_HEADER,
                header_or_empty(&self.fingerprints.hop(bound.id.as_str())),
            );
            let mut request = Request::builder()
                .method(exchange.method.clone())
                .uri(exchange.path.as_str());
            if let Some(target) = request.headers_mut() {
                *target = headers;
            }
            let Ok(request) = request.body(Full::new(exchange.body.clone())) else {
                return Some(plain(
                    StatusCode::BAD_REQUEST,
                    "a request that cannot be forwarded",
                ));
            };
            match pool.send(request).await {
                Ok(response) => {
                    let (mut parts, body) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    return Some(Response::from_parts(parts, Body::new(body)));
                }
                // A pooled connection the owner had closed (a stopping proxy answers with
                // `Connection: close`): at once on another.
                Err(SendError::Exchange {
                    ref error,
                    reused: true,
                }) if was_not_delivered(error) => {}
                Err(SendError::Connect { source, .. }) => {
                    attempt += 1;
                    debug!(%source, owner = address, attempt, "the session's owner does not take connections");
                    if attempt < OWNER_ATTEMPTS {
                        pauses.wait().await;
                    }
                }
                // Sent: the owner may have run it, so it is not sent again.
                Err(error) => {
                    let failure = Failure::Upstream(UpstreamError::Lost(error.to_string()));
                    return Some(self.failure(failure, exchange));
                }
            }
        }
        self.hops.forget(address);
        None
    }

    /// A session whose state is gone with its owner (or its owner's server): removed from the
    /// store, so that every pod answers it 404 from now on, and counted once, by the proxy
    /// whose removal took it.
    pub(in crate::proxy) async fn lose(&self, id: &SessionId, loss: Loss) {
        self.forget(id);
        if self.ending.contains(id) || self.ended_elsewhere(id).await {
            debug!(session = %id, "its server forgot a session its client is ending");
            return;
        }
        match self.store.delete(id).await {
            Ok(true) => {
                warn!(session = %id, reason = loss.as_str(), "a session's state is lost with its owner; its client must start a new one");
                self.metrics
                    .lost
                    .get_or_create(&metrics::ReasonLabels {
                        reason: loss.as_str(),
                    })
                    .inc();
                self.report(Tally::Lost, 1);
            }
            Ok(false) => debug!(session = %id, "another proxy counted the lost session"),
            Err(error) => {
                warn!(session = %id, %error, "cannot remove a lost session from the store")
            }
        }
    }

    /// Counts `id` lost with its state (see [`Proxy::lose`]): the failure its request gets.
    pub(in crate::proxy) async fn lost(&self, id: &SessionId, loss: Loss) -> Failure {
        self.lose(id, loss).await;
        Failure::Unknown(Unknown::StateLost)
    }

    /// Under `onOwnerLost: Replay`: hands a session whose owner is gone over to whichever pod
    /// claims it first, as a drain would, so that it is replayed (and counted) once.
    pub(in crate::proxy) async fn release(&self, id: &SessionId, owner: &str) {
        match self
            .store
            .mark_draining(id, Some(owner), self.config.drain_timeout)
            .await
        {
            Ok(Some(_)) => {
                info!(session = %id, owner, "the session's owner is gone; replaying it here, as the policy says");
                self.report(Tally::Drained, 1);
            }
            Ok(None) => {}
            Err(error) => {
                warn!(session = %id, %error, "cannot release a session whose owner is gone")
            }
        }
    }

    /// Routes a session's request where its session stays (drain strategy `Wait`): `None` to
    /// serve it here, else the answer (the owner's, or a 404 for a session whose state is
    /// lost).
    pub(in crate::proxy) async fn route_home(&self, exchange: &Exchange) -> Option<Response> {
        let bound = exchange.session.as_ref()?;
        let hop = match self.hop_of(exchange, &bound.id) {
            Ok(hop) => hop,
            Err(refused) => return Some(refused),
        };
        let (loss, owner) = match self.home(bound, hop).await {
            Ok(Home::Here) => return None,
            Ok(Home::Elsewhere { pod, address }) => {
                match self.forward_home(exchange, &address).await {
                    Some(answer) => return Some(answer),
                    None => (Loss::OwnerGone, Some(pod)),
                }
            }
            Ok(Home::Lost { loss, owner }) => (loss, owner),
            Err(failure) => return Some(self.failure(failure, exchange)),
        };
        if self.config.residence.replays_lost() {
            // One the operator swept is claimable already.
            if let Some(owner) = owner {
                self.release(&bound.id, &owner).await;
            }
            return None;
        }
        Some(self.failure(self.lost(&bound.id, loss).await, exchange))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_to_owners_unasked_for_long_are_dropped_when_another_is_made() {
        let hops = Hops::default();
        let start = Instant::now();
        let at = |seconds| start + Duration::from_secs(seconds);
        hops.pool_at("10.0.0.1:8080", start);
        hops.pool_at("10.0.0.2:8080", at(60));
        assert_eq!(hops.lock().len(), 2, "both asked for within the limit");
        // Asked for again: kept, while the first, unasked since, goes with the next new one.
        hops.pool_at("10.0.0.2:8080", at(150));
        assert_eq!(
            hops.lock().len(),
            2,
            "nothing is dropped but for a new pool"
        );
        hops.pool_at("10.0.0.3:8080", at(200));
        let mut kept: Vec<String> = hops.lock().keys().cloned().collect();
        kept.sort();
        assert_eq!(kept, ["10.0.0.2:8080", "10.0.0.3:8080"]);
    }
}
