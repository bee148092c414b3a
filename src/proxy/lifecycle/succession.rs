//! The proxy that serves right now, and its succession.
//!
//! A retirement normally ends a proxy's life: its pod stops. In the native-sidecar form,
//! though, the backend's preStop hook retires the proxy (a native sidecar is stopped only after
//! the backend, so that hook is all it hears of a pod stop), and the kubelet runs the hook also
//! when it restarts the backend in place, after a failed liveness probe. A retired proxy whose
//! upstream then stops and answers again, with no SIGTERM of its own, is in a pod that goes on:
//! a fresh proxy succeeds it on the same listeners, and the pod is Ready again. The sessions the
//! retired one handed over wait in the store, where the successor (or any pod) claims them.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::response::Response;
use tokio::sync::watch;
use tower_service::Service;
use tracing::info;

use crate::proxy::lifecycle::control::Control;
use crate::proxy::upstream::quiesce::{Restart, follow_restart_from};
use crate::proxy::{Phase, Proxy};

/// The serving proxy, as the listeners' handlers reach it.
#[derive(Clone)]
pub struct Current(watch::Receiver<Arc<Proxy>>);

impl Current {
    pub fn get(&self) -> Arc<Proxy> {
        self.0.borrow().clone()
    }

    /// What the admin port may do with the serving proxy.
    pub fn control(&self) -> Control {
        Control::new(self.get())
    }
}

/// The client port's one handler: each request to the serving proxy. A router's matching and
/// boxing would cost a few percent of a call for a port that has a single route.
impl Service<Request> for Current {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let proxy = self.get();
        Box::pin(async move { Ok(proxy.handle(request).await) })
    }
}

/// Hands the serving proxy over to its successor.
pub struct Succeed(watch::Sender<Arc<Proxy>>);

/// `proxy` as the serving one.
pub fn current(proxy: Arc<Proxy>) -> (Succeed, Current) {
    let (sender, receiver) = watch::channel(proxy);
    (Succeed(sender), Current(receiver))
}

/// Serves with `proxy`, and its successors, until `shutdown`; then retires the serving one.
pub async fn serve(mut proxy: Arc<Proxy>, succeed: Succeed, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let maintenance = AbortOnDrop(tokio::spawn(proxy.clone().maintain()));
        let restarted_in_place = tokio::select! {
            () = &mut shutdown => false,
            () = restarted_after_retiring(&proxy) => true,
        };
        if !restarted_in_place {
            proxy.retire().await;
            drop(maintenance);
            return;
        }
        info!(
            "the MCP server restarted in place after the proxy retired, and the pod is not stopping: a fresh proxy serves"
        );
        // What the retired proxy held while the server restarted goes to it now.
        proxy.resume_upstream();
        proxy = proxy.successor();
        succeed.0.send_replace(proxy.clone());
    }
}

/// Returns once `proxy` has retired and its upstream has since stopped and answers again.
async fn restarted_after_retiring(proxy: &Proxy) {
    let _ = proxy
        .lifecycle
        .watch()
        .wait_for(|phase| *phase == Phase::Closing)
        .await;
    let Some(address) = proxy.upstream.backends().local_address() else {
        // Gateway mode: a retired gateway's pod is stopping; there is no server of its own.
        return std::future::pending().await;
    };
    // However long the kubelet's restart back-off keeps the backend down. A server that
    // stopped while the proxy waited for its sessions has begun its restart already.
    let mut stopped = proxy.lifecycle.server_stopped();
    while follow_restart_from(
        &address,
        Instant::now() + Duration::from_secs(3600),
        stopped,
    )
    .await
        != Restart::Restarted
    {
        stopped = false;
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
