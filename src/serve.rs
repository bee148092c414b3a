//! HTTP/1.1 serving with the limits every listener of this project keeps.
//!
//! A slow or idle client must not hold a connection, a file descriptor or a drain for long: a
//! request's head must arrive within `header_timeout` (hyper's header-read timer, which also
//! runs while a keep-alive connection waits for its next request, so it closes idle ones), its
//! body within `body_timeout`, and at most `max_connections` are open at once: those over the
//! cap are closed as they come, and counted.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use bytes::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tower_service::Service;
use tracing::{debug, warn};

/// What a listener allows one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// For a request's head, and for a keep-alive connection's idling between requests.
    pub header_timeout: Duration,
    /// For a request's body, from its head on.
    pub body_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

impl Limits {
    /// A port for the kubelet's probes and hooks, and Prometheus: few clients, quick requests.
    pub const PROBES: Self = Self {
        header_timeout: Duration::from_secs(10),
        body_timeout: Duration::from_secs(10),
        max_connections: 256,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            max_connections: 10_000,
        }
    }
}

/// What one listener counts.
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    pub open: Gauge,
    /// Connections closed at once because `max_connections` were open.
    pub refused: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

/// The connection metrics of a process's listeners, by `listener` label.
#[derive(Debug, Clone, Default)]
pub struct ListenerMetrics {
    open: Family<ListenerLabels, Gauge>,
    refused: Family<ListenerLabels, Counter>,
}

impl ListenerMetrics {
    /// Registers `{prefix}_connections` and `{prefix}_connections_refused_total`.
    pub fn register(&self, registry: &mut Registry, prefix: &str) {
        registry.register(
            format!("{prefix}_connections"),
            "Open client connections, by listener",
            self.open.clone(),
        );
        registry.register(
            format!("{prefix}_connections_refused"),
            "Connections closed at once because the listener's connection cap was reached",
            self.refused.clone(),
        );
    }

    /// The metrics of the listener named `listener`.
    pub fn of(&self, listener: &'static str) -> ConnectionMetrics {
        let labels = ListenerLabels { listener };
        ConnectionMetrics {
            open: self.open.get_or_create(&labels).clone(),
            refused: self.refused.get_or_create(&labels).clone(),
        }
    }
}

/// What a listener serves: a [`Router`], or one handler (the proxy's port).
pub trait ServedApp:
    Service<Request, Response = Response, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + 'static
{
}

impl<T> ServedApp for T where
    T: Service<Request, Response = Response, Error = Infallible, Future: Send + 'static>
        + Clone
        + Send
        + 'static
{
}

/// What makes an accepted TCP connection the stream a protocol runs on (TLS, a counted
/// stream); `None` drops the connection.
pub trait Accepter: Clone + Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn accept(&self, tcp: TcpStream) -> impl Future<Output = Option<Self::Io>> + Send + 'static;
}

impl<F, Accepting, Io> Accepter for F
where
    F: Fn(TcpStream) -> Accepting + Clone + Send + 'static,
    Accepting: Future<Output = Option<Io>> + Send + 'static,
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Io = Io;

    fn accept(&self, tcp: TcpStream) -> impl Future<Output = Option<Io>> + Send + 'static {
        self(tcp)
    }
}

std::thread_local! {
    /// Which of [`serve`]'s threads this is.
    static SERVING_THREAD: Cell<Option<usize>> = const { Cell::new(None) };
}

/// How many threads [`serve`] should start for `asked` (0: one per CPU the process
/// may use, which counts its cgroup's quota, at most 4: a sidecar in front of one server).
pub fn serving_threads(asked: usize) -> usize {
    if asked > 0 {
        return asked;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// The index of the [`serve`] thread the caller runs on; `None` on any other.
pub fn serving_thread() -> Option<usize> {
    SERVING_THREAD.get()
}

/// What each connection of a listener gets: `accept` makes the accepted TCP stream what the
/// protocol runs on (TLS, a counted stream; `None` drops it), `app` (a [`Router`], or one
/// handler as the proxy's port is) answers its requests, under `limits`.
#[derive(Clone)]
pub struct Served<App, Accept> {
    pub app: App,
    pub accept: Accept,
    pub limits: Limits,
}

/// Serves `served` on `listener` until `shutdown`.
///
/// With `threads` above 0, each accepted connection is handed (in turn) to one of that many
/// threads, each a single-threaded runtime, as nginx's workers serve theirs: the tasks of a
/// connection's calls stay on one thread, where a work-stealing runtime wakes its other workers
/// on most calls (a proxy's call is two connections' tasks, handing over to each other). What a
/// thread's calls need of their own (the proxy's upstream connections) it finds by
/// [`serving_thread`]. After `shutdown` the threads serve the connections they have until those
/// close, then end. With 0, or if no thread can start, the accepting runtime serves them.
pub async fn serve<App, Accept>(
    listener: TcpListener,
    served: Served<App, Accept>,
    metrics: ConnectionMetrics,
    threads: usize,
    shutdown: impl Future<Output = ()>,
) where
    App: ServedApp,
    Accept: Accepter,
{
    let limits = served.limits;
    let handoffs: Vec<_> = (0..threads)
        .filter_map(|index| {
            let (handoff, handed) = mpsc::unbounded_channel();
            match start_thread(index, handed, served.clone()) {
                Ok(()) => Some(handoff),
                Err(error) => {
                    warn!(%error, index, "cannot start a serving thread; the others serve its share");
                    None
                }
            }
        })
        .collect();
    // What no thread takes (none asked for or started, or one ended by a panic) is served here.
    let serve_here = |tcp, peer, open| {
        tokio::spawn(serve_accepted(tcp, peer, open, served.clone()));
    };
    let mut turn = 0;
    let accepting = accept_until(&listener, limits, &metrics, |tcp, peer, open| {
        turn = (turn + 1) % handoffs.len().max(1);
        let Some(handoff) = handoffs.get(turn) else {
            return serve_here(tcp, peer, open);
        };
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(error) => {
                debug!(%peer, %error, "an accepted connection could not be handed over");
                return;
            }
        };
        if let Err(returned) = handoff.send((tcp, peer, open)) {
            let (tcp, peer, open) = returned.0;
            if let Ok(tcp) = TcpStream::from_std(tcp) {
                serve_here(tcp, peer, open);
            }
        }
    });
    tokio::select! {
        () = accepting => {}
        () = shutdown => {}
    }
}

/// A connection handed to a serving thread, with its place under the cap.
type Handoff = (std::net::TcpStream, SocketAddr, Open);

fn start_thread<App, Accept>(
    index: usize,
    mut handed: mpsc::UnboundedReceiver<Handoff>,
    served: Served<App, Accept>,
) -> std::io::Result<()>
where
    App: ServedApp,
    Accept: Accepter,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("serving-{index}"))
        .spawn(move || {
            SERVING_THREAD.set(Some(index));
            runtime.block_on(async move {
                let mut connections = JoinSet::new();
                loop {
                    tokio::select! {
                        next = handed.recv() => match next {
                            Some((tcp, peer, open)) => match TcpStream::from_std(tcp) {
                                Ok(tcp) => {
                                    connections.spawn(serve_accepted(tcp, peer, open, served.clone()));
                                }
                                Err(error) => debug!(%peer, %error, "a handed connection could not be served"),
                            },
                            None => break,
                        },
                        Some(_) = connections.join_next(), if !connections.is_empty() => {}
                    }
                }
                while connections.join_next().await.is_some() {}
            });
        })?;
    Ok(())
}

/// Accepts connections on `listener` for as long as it is polled, and hands each one under the
/// connection cap to `serve_one`; refuses (closes and counts) the ones over it.
async fn accept_until(
    listener: &TcpListener,
    limits: Limits,
    metrics: &ConnectionMetrics,
    mut serve_one: impl FnMut(TcpStream, SocketAddr, Open),
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, typically: back off rather than spin.
                warn!(%error, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.refused.inc();
            debug!(%peer, limit = limits.max_connections, "too many connections: closed");
            drop(tcp);
            continue;
        };
        // Counted here, not in the task: on a busy runtime the task may start much later, and
        // the gauge must say what the cap counts.
        serve_one(tcp, peer, Open::new(slot, metrics.open.clone()));
    }
}

/// Serves one accepted connection: `accept` (TLS, counting) first, then HTTP/1.1 with the
/// header timeout, and each request's body under its deadline.
async fn serve_accepted<App, Accept>(
    tcp: TcpStream,
    peer: SocketAddr,
    open: Open,
    served: Served<App, Accept>,
) where
    App: ServedApp,
    Accept: Accepter,
{
    let _open = open;
    let Served {
        app,
        accept,
        limits,
    } = served;
    let Some(io) = accept.accept(tcp).await else {
        return;
    };
    let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
        let request = with_body_deadline(request.map(Body::new), limits.body_timeout);
        let mut app = app.clone();
        async move {
            std::future::poll_fn(|cx| app.poll_ready(cx)).await?;
            app.call(request).await
        }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await;
    if let Err(error) = served {
        debug!(%peer, %error, "connection ended with an error");
    }
}

/// An accepted connection's place under the cap, shown in the `open` gauge while it lasts.
struct Open {
    _slot: OwnedSemaphorePermit,
    gauge: Gauge,
}

impl Open {
    fn new(slot: OwnedSemaphorePermit, gauge: Gauge) -> Self {
        gauge.inc();
        Self { _slot: slot, gauge }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Serves a port of probes and metrics ([`Limits::PROBES`], plain TCP) for the process's life.
pub async fn serve_probes(listener: TcpListener, app: Router, metrics: ConnectionMetrics) {
    let served = Served {
        app,
        accept: plain,
        limits: Limits::PROBES,
    };
    serve(listener, served, metrics, 0, std::future::pending()).await;
}

/// The request, its body bounded by `timeout` from now.
fn with_body_deadline(request: Request, timeout: Duration) -> Request {
    request.map(|body| Body::new(Deadline::new(body, timeout)))
}

/// A request body that fails if it has not ended by its deadline.
struct Deadline {
    body: Body,
    expires: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

impl Deadline {
    fn new(body: Body, timeout: Duration) -> Self {
        Self {
            body,
            expires: Box::pin(tokio::time::sleep(timeout)),
            timeout,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimeout(Duration);

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.expires.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimeout(self.timeout).into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Plain TCP, no nagle delay on small answers.
pub async fn plain(tcp: TcpStream) -> Option<TcpStream> {
    let _ = tcp.set_nodelay(true);
    Some(tcp)
}

/// Whether two secrets are equal, compared without an early exit, so that timing tells nothing
/// of a token's prefix.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0_u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// The refusal of an admin request that changes state or reveals sessions without the pod's
/// drain token (`expected`) in `X-Mcp-Drain-Token`; `None` to serve it. Without a configured
/// token such endpoints answer nobody.
pub fn refuse_without_drain_token(expected: Option<&str>, request: &Request) -> Option<Response> {
    use axum::http::StatusCode;
    use axum::response::IntoResponse as _;
    let presented = request
        .headers()
        .get(crate::api::contract::DRAIN_TOKEN_HEADER)
        .map(|value| value.as_bytes());
    match (expected, presented) {
        (Some(token), Some(presented)) if constant_time_eq(token.as_bytes(), presented) => None,
        (None, _) => Some(
            (
                StatusCode::FORBIDDEN,
                "no drain token is configured (MCP_SESSION_DRAIN_TOKEN): this endpoint answers nobody\n",
            )
                .into_response(),
        ),
        _ => {
            warn!(path = %request.uri().path(), "refused an admin request without the drain token");
            Some(
                (
                    StatusCode::UNAUTHORIZED,
                    "the X-Mcp-Drain-Token header is missing or wrong\n",
                )
                    .into_response(),
            )
        }
    }
}
