//! Keep-alive connections to the MCP server, pooled.
//!
//! One upstream, HTTP/1.1, and (for a serving thread's pool) one thread: hyper-util's general
//! client (any number of hosts, HTTP/2, proxies, a pool shared across threads) cost about a
//! quarter of a bare forward's instructions here, which this pool does without. A connection
//! goes back to the pool when its response has been read to the end; one whose response was
//! dropped half-read is closed, as its next bytes would be that response's.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::{Request, Response};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use crate::proxy::upstream::connector::Watched;

/// How long a connection may wait in the pool; servers close idle ones on their own timeouts.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection: the request was never sent.
    #[error("cannot connect to {address}: {source}")]
    Connect { address: String, source: io::Error },
    /// The exchange failed; `reused` says whether on a connection that had served before (one
    /// the server may have closed while it sat in the pool).
    #[error("{error}")]
    Exchange {
        #[source]
        error: hyper::Error,
        reused: bool,
    },
}

/// Connections to one `host:port`. Cheap to clone: clones share the pool.
#[derive(Clone)]
pub struct Pool {
    address: Arc<str>,
    idle: Arc<Mutex<VecDeque<Idle>>>,
}

struct Idle {
    sender: SendRequest<Full<Bytes>>,
    since: Instant,
}

impl Pool {
    pub fn new(address: String) -> Self {
        Self {
            address: address.into(),
            idle: Arc::default(),
        }
    }

    /// Sends `request` (its URI in origin form, its `Host` set) on a pooled connection, or a
    /// new one.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<Response<Pooled>, SendError> {
        let (mut sender, reused) = match self.checkout().await {
            Some(sender) => (sender, true),
            None => (self.connect().await?, false),
        };
        match sender.send_request(request).await {
            Ok(response) => Ok(response.map(|body| Pooled {
                body,
                checkin: Some((sender, self.clone())),
            })),
            Err(error) => Err(SendError::Exchange { error, reused }),
        }
    }

    fn idle(&self) -> MutexGuard<'_, VecDeque<Idle>> {
        // What a panic can leave behind is a list of connections: safe to keep using.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used connection that is still open and takes a request.
    async fn checkout(&self) -> Option<SendRequest<Full<Bytes>>> {
        loop {
            let Idle { mut sender, .. } = self.idle().pop_back()?;
            if sender.is_closed() {
                continue;
            }
            // Back in the pool as its response ended, it may not have turned to wait for the
            // next request yet; a closed one fails here.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn checkin(&self, sender: SendRequest<Full<Bytes>>) {
        let now = Instant::now();
        let mut idle = self.idle();
        while idle
            .front()
            .is_some_and(|oldest| now.duration_since(oldest.since) > IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        idle.push_back(Idle { sender, since: now });
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, SendError> {
        let failed = |source| SendError::Connect {
            address: self.address.to_string(),
            source,
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&*self.address))
            .await
            .map_err(|_| failed(io::ErrorKind::TimedOut.into()))?
            .map_err(failed)?;
        tcp.set_nodelay(true).map_err(failed)?;
        let (sender, connection) = http1::handshake(Watched::new(TokioIo::new(tcp)))
            .await
            .map_err(|error| failed(io::Error::other(error)))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%error, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

/// A response body whose connection goes back to its pool once the body has been read whole.
pub struct Pooled {
    body: Incoming,
    checkin: Option<(SendRequest<Full<Bytes>>, Pool)>,
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                if let Some((sender, pool)) = self.checkin.take() {
                    pool.checkin(sender);
                }
            }
            // The connection is done for; dropping its sender lets it close.
            Poll::Ready(Some(Err(_))) => self.checkin = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // An empty body may be dropped without a poll.
        if self.body.is_end_stream()
            && let Some((sender, pool)) = self.checkin.take()
        {
            pool.checkin(sender);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    /// A server that answers every request on a connection with `body` (content-length says
    /// `declared` bytes, so that a test can leave a response half-sent), and counts connections.
    async fn server(body: &'static [u8], declared: usize) -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let head =
                                format!("HTTP/1.1 200 OK\r\ncontent-length: {declared}\r\n\r\n");
                            if stream.write_all(head.as_bytes()).await.is_err()
                                || stream.write_all(body).await.is_err()
                            {
                                return;
                            }
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (port, accepted)
    }

    fn get() -> Request<Full<Bytes>> {
        Request::get("/mcp")
            .header("host", "127.0.0.1")
            .body(Full::default())
            .expect("request")
    }

    #[tokio::test]
    async fn a_connection_serves_again_once_its_response_was_read() {
        let (port, accepted) = server(b"ok", 2).await;
        let pool = Pool::new(format!("127.0.0.1:{port}"));
        for _ in 0..3 {
            let response = pool.send(get()).await.expect("answer");
            let body = response.into_body().collect().await.expect("body");
            assert_eq!(body.to_bytes(), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection, reused");
    }

    #[tokio::test]
    async fn a_response_dropped_half_read_closes_its_connection() {
        // Declares 4 bytes, sends 2: the rest of the response never comes.
        let (port, accepted) = server(b"ok", 4).await;
        let pool = Pool::new(format!("127.0.0.1:{port}"));
        for _ in 0..2 {
            let response = pool.send(get()).await.expect("answer");
            drop(response);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "never reused");
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("address").port()
        };
        let pool = Pool::new(format!("127.0.0.1:{port}"));
        assert!(matches!(
            pool.send(get()).await,
            Err(SendError::Connect { .. })
        ));
    }
}
