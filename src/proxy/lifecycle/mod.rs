//! The proxy's life: serving, then (SIGTERM, or a quiesce in a terminating pod) draining its
//! sessions for other pods to claim, then closing; and quiescing the upstream before it restarts.

pub(super) mod admin;
pub(super) mod connections;
pub(super) mod control;
pub(super) mod succession;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, OnceCell, watch};
use tracing::{debug, info, warn};

use crate::count::{Count, Counted};
use crate::proxy::{Proxy, metrics, upstream::quiesce};
use crate::store::{self, SessionId, Tally};

/// Most sessions a drain looks up in the store's index of this pod (beyond those it holds).
pub(super) const DRAIN_BATCH: usize = 100_000;

/// Where a drain stands. Listening streams end when it starts, response streams at its
/// deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    /// Drain strategy `Wait`: no new sessions; those held here are served until they end.
    Waiting,
    Draining,
    Closing,
}

/// The phase, and what a drain waits for: requests in flight and client connections.
pub struct Lifecycle {
    phase: watch::Sender<Phase>,
    /// Requests before their response head, and response streams until they end.
    in_flight: Count,
    /// Open client connections (shared with a successor, which serves the same listener).
    connections: Count,
    /// When the drain began: its deadline counts from there.
    drain_started: std::sync::OnceLock<Instant>,
    /// Sessions the drain handed over, once it is done; every caller of `drain` waits for it.
    drained: OnceCell<u64>,
    /// One quiesce at a time; concurrent callers share it.
    quiescing: Mutex<()>,
    /// Counts quiesces: the latest owns the gate, and only its own follower reopens it.
    quiesces: watch::Sender<u64>,
    /// Whether the server beside the proxy stopped while its sessions waited (drain strategy
    /// `Wait`): a restart in place, if it answers again, has begun already.
    server_stopped: std::sync::atomic::AtomicBool,
}

impl Lifecycle {
    pub fn new(connections: Count) -> Self {
        Self {
            phase: watch::Sender::new(Phase::Serving),
            in_flight: Count::default(),
            connections,
            drain_started: std::sync::OnceLock::new(),
            drained: OnceCell::new(),
            quiescing: Mutex::new(()),
            quiesces: watch::Sender::new(0),
            server_stopped: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Waiting, draining or closing: no new sessions, no new claims.
    pub fn draining(&self) -> bool {
        self.phase() >= Phase::Waiting
    }

    /// Follows the phase (a relay ends its stream by it).
    pub fn watch(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Counts a request (or a response stream) as in flight until the guard drops.
    pub fn in_flight(&self) -> Counted {
        self.in_flight.enter()
    }

    /// The client connections, which a successor counts on.
    pub fn connections(&self) -> &Count {
        &self.connections
    }

    /// Whether the server stopped while the proxy waited for its sessions.
    pub fn server_stopped(&self) -> bool {
        self.server_stopped
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The drain's deadline, from its start (the first call starts it).
    pub(super) fn drain_deadline(&self, timeout: Duration) -> (Instant, Instant) {
        let started = *self.drain_started.get_or_init(Instant::now);
        (started, started + timeout)
    }
}

impl Proxy {
    /// Stops taking sessions, ends listening streams with a `retry` hint, lets in-flight
    /// requests finish (up to the drain timeout), and marks this proxy's sessions draining in
    /// the store so that any pod can claim them.
    ///
    /// Every caller returns when the one drain is done: each container's preStop hook calls it,
    /// and the backend's must not return (letting the kubelet stop the backend) any earlier.
    pub async fn drain(&self) -> u64 {
        *self
            .lifecycle
            .drained
            .get_or_init(|| self.drain_once())
            .await
    }

    pub(super) async fn drain_once(&self) -> u64 {
        // A gateway that pins sessions to their backend pods holds none of its own: every
        // replica reaches them there, so it has nothing to wait for nor to hand over.
        let pins = self.pins_sessions();
        if let Some(max_wait) = self.config.residence.max_wait()
            && !pins
        {
            self.wait_for_sessions(max_wait).await;
        }
        let lifecycle = &self.lifecycle;
        let (started, deadline) = lifecycle.drain_deadline(self.config.drain_timeout);
        lifecycle.phase.send_replace(Phase::Draining);
        lifecycle.in_flight.zero_by(deadline).await;
        if pins {
            self.events.flush().await;
            info!(
                seconds = started.elapsed().as_secs_f64(),
                "drained; the sessions stay pinned to their backend pods"
            );
            return 0;
        }
        // The sessions this pod owns: those it serves (the store skips any that another pod
        // owns, requests of a session may reach any pod) and any the store names it owner of
        // that it does not hold (a restarted proxy container).
        let owner = self.config.pod_name.as_deref();
        let mut ids: std::collections::BTreeSet<SessionId> = self.table.ids().into_iter().collect();
        if let Some(pod) = owner {
            match self.store.sessions_of_pod(pod, DRAIN_BATCH).await {
                Ok(owned) => ids.extend(owned),
                Err(error) => warn!(%error, "cannot list this pod's sessions in the store"),
            }
        }
        let drained =
            store::mark_all_draining(&*self.store, &ids, owner, self.config.drain_timeout).await;
        // Awaited: the process may exit right after the drain.
        if drained > 0
            && let Err(error) = self.store.tally(Tally::Drained, drained).await
        {
            warn!(%error, drained, "cannot report the drain to the store's tallies");
        }
        self.events.flush().await;
        self.metrics
            .drain_duration
            .observe(started.elapsed().as_secs_f64());
        info!(
            drained,
            seconds = started.elapsed().as_secs_f64(),
            "drained"
        );
        drained
    }
}

/// How often a proxy waiting for its sessions to end looks, and says how many are left.
const WAIT_POLL: Duration = Duration::from_millis(200);
const WAIT_REPORT: Duration = Duration::from_secs(10);
/// Looks in a row that find the MCP server beside the proxy refusing connections before its
/// sessions count as gone with it.
const SERVER_GONE_AFTER: u32 = 3;

impl Proxy {
    /// Drain strategy `Wait`: takes no new sessions (the pod is unready, and the Service stops
    /// sending it connections), and serves those it holds, directly or forwarded by the
    /// policy's other proxies, until they end: by `DELETE`, or idle for the session TTL. Those
    /// still open at `max_wait` are lost: answered 404 from then on, and counted. So are those
    /// still open when the server beside the proxy stops (the kubelet killed it: a liveness
    /// restart, whose probe's grace the webhook keeps short, or the pod's grace spent), as
    /// their state has gone with it.
    async fn wait_for_sessions(&self, max_wait: Duration) {
        let started = Instant::now();
        let deadline = started + max_wait;
        self.lifecycle.phase.send_replace(Phase::Waiting);
        let mut report = started + WAIT_REPORT;
        let server = self.upstream.backends().local_address();
        let mut refused = 0;
        loop {
            let open = self.table.len();
            if open == 0 {
                break;
            }
            let now = Instant::now();
            let loss = if now >= deadline {
                warn!(
                    open,
                    ?max_wait,
                    "sessions still open at the drain's maximum wait are lost"
                );
                Some(metrics::Loss::MaxWait)
            } else {
                match &server {
                    Some(address) if !quiesce::takes_connections(address).await => refused += 1,
                    _ => refused = 0,
                }
                (refused >= SERVER_GONE_AFTER).then(|| {
                    warn!(
                        open,
                        "the MCP server stopped while sessions waited on it: their state is gone"
                    );
                    self.lifecycle
                        .server_stopped
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    metrics::Loss::ServerRestarted
                })
            };
            if let Some(loss) = loss {
                for id in self.table.ids() {
                    self.lose(&id, loss).await;
                }
                break;
            }
            if now >= report {
                info!(open, waited = ?started.elapsed(), "waiting for this pod's sessions to end");
                report = now + WAIT_REPORT;
            }
            tokio::time::sleep(WAIT_POLL.min(deadline - now)).await;
        }
        let waited = started.elapsed();
        self.metrics.wait_duration.observe(waited.as_secs_f64());
        info!(?waited, "this pod's sessions have ended");
    }
}

/// How long after a drain begins the Service may still send the pod new connections: the
/// kubelet's readiness probe of the proxy (every 2 s, as the webhook injects it), then the
/// endpoints' update and kube-proxy's sync. A drained proxy answers (and lets through to its
/// backend) what arrives until then; one that stopped answering sooner would leave such a
/// request nowhere to go.
pub(super) const ENDPOINTS_SETTLE: Duration = Duration::from_secs(5);

/// How long a quiesce waits for the proxy's own SIGTERM: a terminating pod stops every
/// container at once, so a retirement that starts this soon after the backend's preStop is the
/// same pod stop, not an in-place restart of the backend.
pub(super) const RETIRE_SETTLE: Duration = Duration::from_secs(1);

/// What a quiesce ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quiesced {
    /// Nothing is in flight and new requests wait for the upstream's restart.
    Holding,
    /// The pod is terminating: the proxy retired, its sessions handed over.
    Retired,
}

impl Proxy {
    /// The upstream is about to stop (its preStop hook, or `dev` before a restart): new
    /// requests are held, and this returns once those the upstream is working on have finished
    /// (or the drain timeout). Held requests go to the upstream once it has restarted, or at
    /// the drain deadline if it never stops. In a terminating pod, waits for the retirement
    /// instead. See [`quiesce`].
    pub async fn quiesce(self: &Arc<Self>) -> Quiesced {
        let _one_at_a_time = self.lifecycle.quiescing.lock().await;
        // From here this quiesce owns the gate. A container restarted again while it was still
        // starting quiesces while the proxy follows the restart before: the server that
        // restart started is the one about to stop, and its coming up must not reopen the gate.
        let generation = {
            let quiesces = &self.lifecycle.quiesces;
            quiesces.send_modify(|count| *count += 1);
            *quiesces.borrow()
        };
        let started = Instant::now();
        let deadline = started + self.config.drain_timeout;
        self.hold_upstream().await;
        let mut phase = self.lifecycle.watch();
        let retiring =
            tokio::time::timeout(RETIRE_SETTLE, phase.wait_for(|p| *p >= Phase::Waiting))
                .await
                .is_ok_and(|changed| changed.is_ok());
        if retiring {
            self.resume_upstream();
            self.retire().await;
            info!("quiesce: the pod is terminating; retired");
            return Quiesced::Retired;
        }
        let Some(address) = self.upstream.backends().local_address() else {
            // Gateway mode: no server here restarts; the pods' own lifecycle moves sessions.
            self.resume_upstream();
            return Quiesced::Holding;
        };
        info!("quiesced: new requests wait for the upstream's restart");
        let proxy = self.clone();
        let mut quiesces = self.lifecycle.quiesces.subscribe();
        tokio::spawn(async move {
            let resumed = tokio::select! {
                restart = quiesce::follow_restart(&address, deadline) => {
                    proxy.resume_after(generation).then_some(restart)
                }
                _ = quiesces.wait_for(|latest| *latest != generation) => None,
            };
            match resumed {
                Some(restart) => {
                    info!(?restart, held_for = ?started.elapsed(), "resumed: held requests go to the upstream");
                }
                None => debug!("a later quiesce holds the upstream now"),
            }
        });
        Quiesced::Holding
    }

    /// Holds new requests (unless the proxy retires, which needs the upstream to the end) and
    /// returns once the upstream has finished those it was working on, or the drain timeout:
    /// the upstream may stop now without losing a call. `dev` calls it before restarting its
    /// child; [`Self::resume_upstream`] lets the held requests go.
    pub async fn hold_upstream(&self) {
        let started = Instant::now();
        if self.lifecycle.phase() == Phase::Serving {
            self.upstream.gate().close();
        }
        self.upstream_idle(started).await;
        self.metrics
            .quiesce_duration
            .observe(started.elapsed().as_secs_f64());
    }

    /// Sends held requests (and every new one) to the upstream again.
    pub fn resume_upstream(&self) {
        self.upstream.gate().open();
    }

    /// [`Self::resume_upstream`] for quiesce `generation`, unless a later quiesce holds the
    /// upstream now; false then. Checked and opened under the count's lock: a quiesce that
    /// starts meanwhile counts itself first, and closes the gate after.
    fn resume_after(&self, generation: u64) -> bool {
        let mut resumed = false;
        self.lifecycle.quiesces.send_if_modified(|latest| {
            if *latest == generation {
                self.resume_upstream();
                resumed = true;
            }
            false
        });
        resumed
    }

    /// Requests waiting for the upstream to be resumed.
    pub fn held_requests(&self) -> usize {
        self.upstream.gate().waiting()
    }

    /// Handshakes replayed since the proxy started.
    pub fn replays(&self) -> u64 {
        self.metrics
            .replays
            .get_or_create(&metrics::OutcomeLabels {
                outcome: metrics::Replay::Replayed,
            })
            .get()
    }

    /// Whether new requests are held for a restarting upstream.
    pub fn quiesced(&self) -> bool {
        self.upstream.gate().state() == quiesce::GateState::Quiesced
    }

    /// The whole stop of a pod: the drain, then answering on until the clients have gone (or
    /// the drain deadline). SIGTERM runs it, and a quiesce in a terminating pod waits on it;
    /// concurrent callers share the one drain. A retiring pod's backend serves until its
    /// clients have moved: retiring lifts a quiesce.
    pub async fn retire(&self) -> u64 {
        self.resume_upstream();
        let drained = self.drain().await;
        self.linger().await;
        drained
    }

    /// The backend's preStop hook in the native-sidecar form, which is all the proxy hears of a
    /// pod stop (a native sidecar gets its SIGTERM only once the backend has exited), and which
    /// the kubelet also runs before restarting the backend in place: retires, as SIGTERM does,
    /// then holds new requests until the backend has finished those it was working on, so that
    /// it stops with nothing in flight. What reaches the retired proxy after that waits: for the
    /// backend's restart in place (the successor lets it go, see [`succession`]), or, in a pod
    /// that stops, for nothing (its endpoints are gone and its clients have moved).
    pub async fn retire_before_backend_stops(&self) -> u64 {
        let drained = self.retire().await;
        self.upstream.gate().close();
        self.upstream_idle(Instant::now()).await;
        drained
    }

    /// Waits until the upstream has finished the requests it was working on, or the drain
    /// timeout from `started`: what both a quiesce and a retiring hook wait for.
    async fn upstream_idle(&self, started: Instant) {
        let gate = self.upstream.gate();
        if !gate.idle(started + self.config.drain_timeout).await {
            warn!(
                in_flight = gate.in_flight(),
                "the upstream did not finish its requests within the drain timeout"
            );
        }
    }

    /// After a drain, keeps answering (each answer with `Connection: close`) until the clients
    /// have closed their connections and the Service has stopped sending new ones (see
    /// [`ENDPOINTS_SETTLE`]), or the drain deadline; then ends whatever still streams, with a
    /// hint to resume elsewhere.
    pub(super) async fn linger(&self) {
        let lifecycle = &self.lifecycle;
        let (started, deadline) = lifecycle.drain_deadline(self.config.drain_timeout);
        let settled = (started + ENDPOINTS_SETTLE).min(deadline);
        // Requests ride on connections: once both are down to none, the clients have gone,
        // unless one more arrives before the endpoints have settled.
        loop {
            if !(lifecycle.connections.zero_by(deadline).await
                && lifecycle.in_flight.zero_by(deadline).await)
            {
                break;
            }
            let seen = lifecycle.connections.entered();
            tokio::time::sleep_until(settled.max(Instant::now()).into()).await;
            let quiet = lifecycle.connections.entered() == seen && lifecycle.connections.get() == 0;
            if quiet || Instant::now() >= deadline {
                break;
            }
        }
        lifecycle.phase.send_replace(Phase::Closing);
        let open = lifecycle.connections.get();
        if open > 0 {
            info!(open, "drain deadline: closing the remaining connections");
            // The relays write their hints before the connections go.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
