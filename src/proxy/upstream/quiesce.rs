//! Quiescing the upstream: what the proxy does when its MCP server is about to stop.
//!
//! The backend container's preStop hook calls the proxy's `/drain` (and `dev` quiesces before
//! it restarts its child). From then on the [`Gate`] holds every new request instead of sending
//! it, the requests the server is working on finish, and only then does the hook return and the
//! server get its SIGTERM: no call is in flight when it stops, so no call can be lost with it,
//! whatever the tool. The held requests go to the server when it answers again (Kubernetes
//! restarted the container in place), or, if no stop follows within the drain timeout, when the
//! gate reopens at that deadline.
//!
//! A pod that terminates runs every container's stop at once: the backend's preStop quiesces
//! while the proxy gets SIGTERM and retires, answering its clients (through the still running
//! backend) until they have moved to other pods. Retiring lifts the quiesce, and the backend's
//! hook returns only when the retirement is done.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use tokio::sync::watch;

use crate::count::{Count, Counted};

/// Whether requests may go to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateState {
    Open,
    /// The upstream is about to stop, or restarting: requests wait.
    Quiesced,
}

/// The gate every request passes on its way to the upstream, and the count of what the upstream
/// is working on.
pub struct Gate {
    state: watch::Sender<GateState>,
    /// Requests sent and not fully answered (for a POST: until its response body ends).
    in_flight: Count,
    /// Requests waiting at the closed gate.
    waiting: std::sync::atomic::AtomicUsize,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            state: watch::Sender::new(GateState::Open),
            in_flight: Count::default(),
            waiting: Default::default(),
        }
    }
}

impl Gate {
    pub fn state(&self) -> GateState {
        *self.state.borrow()
    }

    pub fn close(&self) {
        self.state.send_replace(GateState::Quiesced);
    }

    pub fn open(&self) {
        self.state.send_replace(GateState::Open);
    }

    /// Waits until the gate is open and counts the request as in flight from then on, until the
    /// guard drops; `None` if `deadline` comes first.
    ///
    /// The count is taken while the gate's state is read, under its lock: a [`close`] that
    /// follows sees the request in flight, so a quiesce ([`close`], then [`idle`]) can never
    /// miss a request that passed just before it (one released by an [`open`] a moment
    /// earlier, say) and stop the server under it.
    ///
    /// [`close`]: Self::close
    /// [`idle`]: Self::idle
    /// [`open`]: Self::open
    pub async fn pass(&self, deadline: Instant) -> Option<Counted> {
        use std::sync::atomic::Ordering;
        {
            let state = self.state.borrow();
            if *state == GateState::Open {
                return Some(self.in_flight.enter());
            }
        }
        /// Counts a waiting request until it passes or is dropped (its client went away).
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        let mut state = self.state.subscribe();
        let open = state.wait_for(|s| *s == GateState::Open);
        match tokio::time::timeout_at(deadline.into(), open).await {
            // `open` still holds the state's read lock here.
            Ok(Ok(open)) => {
                let counted = self.in_flight.enter();
                drop(open);
                Some(counted)
            }
            Ok(Err(_)) | Err(_) => None,
        }
    }

    /// Requests waiting at the closed gate.
    pub fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Counts a request as in flight until the guard drops, whatever the gate's state: for what
    /// continues a request already counted (an answer that comes on another stream).
    pub fn sending(&self) -> Counted {
        self.in_flight.enter()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Waits until nothing is in flight; false if `deadline` comes first.
    pub async fn idle(&self, deadline: Instant) -> bool {
        self.in_flight.zero_by(deadline).await
    }
}

/// A response body that keeps its request in flight until it ends (or is dropped).
pub struct Tracked {
    inner: Body,
    in_flight: Option<Counted>,
}

impl Tracked {
    pub fn body(inner: Body, in_flight: Counted) -> Body {
        Body::new(Self {
            inner,
            in_flight: Some(in_flight),
        })
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How often a quiesced proxy looks for its upstream going away and coming back: well inside
/// the time any server process takes to start, so that no restart goes unseen.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// What the upstream did after a quiesce, as the probe saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// It stopped and answers again: restarted in place.
    Restarted,
    /// It never stopped within the deadline (a preStop without a stop).
    NeverStopped,
    /// It stopped and did not come back within the deadline.
    StillDown,
}

/// Whether the upstream at `address` takes connections (within [`PROBE_INTERVAL`]).
pub async fn takes_connections(address: &str) -> bool {
    tokio::time::timeout(PROBE_INTERVAL, tokio::net::TcpStream::connect(address))
        .await
        .is_ok_and(|connected| connected.is_ok())
}

/// Follows the upstream at `address` until it has stopped and answers again, or `deadline`.
pub async fn follow_restart(address: &str, deadline: Instant) -> Restart {
    follow_restart_from(address, deadline, false).await
}

/// [`follow_restart`] for an upstream already seen `stopped` (then it only has to answer).
pub async fn follow_restart_from(address: &str, deadline: Instant, mut stopped: bool) -> Restart {
    while Instant::now() < deadline {
        let up = takes_connections(address).await;
        match (up, stopped) {
            (true, true) => return Restart::Restarted,
            (false, _) => stopped = true,
            (true, false) => {}
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
    if stopped {
        Restart::StillDown
    } else {
        Restart::NeverStopped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    #[tokio::test]
    async fn the_gate_holds_requests_and_counts_what_is_in_flight() {
        let gate = std::sync::Arc::new(Gate::default());
        let soon = || Instant::now() + Duration::from_millis(50);
        let passed = gate.pass(soon()).await.expect("open");
        assert_eq!(gate.in_flight(), 1, "counted from its passing");
        gate.close();
        assert!(!gate.idle(soon()).await, "a quiesce waits for what passed");
        drop(passed);
        assert!(gate.idle(soon()).await);
        assert!(gate.pass(soon()).await.is_none(), "held while quiesced");
        let waiting = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.pass(Instant::now() + Duration::from_secs(5)).await })
        };
        gate.open();
        let request = waiting.await.unwrap().expect("released when it reopens");
        assert_eq!(gate.in_flight(), 1);
        assert!(!gate.idle(soon()).await);
        // A response body keeps its request in flight until it has been read to its end.
        let body = Tracked::body(Body::from("answer"), request);
        assert_eq!(gate.in_flight(), 1);
        let read = body.collect().await.unwrap().to_bytes();
        assert_eq!(&read[..], b"answer");
        assert!(gate.idle(soon()).await);
        // Or until it is dropped unread.
        drop(Tracked::body(Body::from("x"), gate.sending()));
        assert_eq!(gate.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_restart_in_place_is_seen_as_a_stop_then_an_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        // Up all along: no stop followed.
        let deadline = Instant::now() + Duration::from_millis(400);
        assert_eq!(
            follow_restart(&address, deadline).await,
            Restart::NeverStopped
        );
        drop(listener);
        let (probe_address, rebind) = (address.clone(), address.clone());
        let probe = tokio::spawn(async move {
            follow_restart(&probe_address, Instant::now() + Duration::from_secs(5)).await
        });
        tokio::time::sleep(Duration::from_millis(400)).await;
        let _back = tokio::net::TcpListener::bind(&rebind).await.unwrap();
        assert_eq!(probe.await.unwrap(), Restart::Restarted);
        drop(_back);
        assert_eq!(
            follow_restart(&address, Instant::now() + Duration::from_millis(300)).await,
            Restart::StillDown
        );
    }
}
