//! Connections to the MCP server that can tell a request it never received from one it may
//! have started.
//!
//! A stopping server closes its connections. A request that meets that close fails as a request
//! the server read and then died on does: the connection ends before an answer. Only one it
//! never read may be sent again whatever the tool, and two signals prove that:
//! - the server had closed before the request's first byte: the connection looks (a
//!   non-blocking peek) before writing each request, and finds the close or bytes nobody asked
//!   for; a write that fails before any byte of the request left counts the same;
//! - the server reset the connection before any answer: a TCP stack resets (rather than closes)
//!   a connection whose received bytes its process never read, so the request, or its end, was
//!   never read. (A server that aborts connections on purpose after reading a request would
//!   defeat this; none of the SDKs' servers do.)
//!
//! Either fails with [`NotDelivered`]. Everything else that ends a connection after the
//! request's first byte leaves it "may have been executed".

use std::error::Error as StdError;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::TokioIo;
use tokio::io::ReadBuf;
use tokio::net::TcpStream;

/// The server never read the request: it cannot have run it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotDelivered {
    #[error("the MCP server had closed the connection before the request was written")]
    Closed,
    #[error("the MCP server reset the connection with the request unread")]
    Unread,
}

impl From<NotDelivered> for io::Error {
    fn from(reason: NotDelivered) -> Self {
        let kind = match reason {
            NotDelivered::Closed => io::ErrorKind::ConnectionAborted,
            NotDelivered::Unread => io::ErrorKind::ConnectionReset,
        };
        Self::new(kind, reason)
    }
}

/// Did the request never reach the server? [`NotDelivered`], or hyper's own cancellation,
/// anywhere in the chain of `error`'s causes.
pub fn was_not_delivered(error: &(dyn StdError + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        // hyper cancels a request it never began to write (its connection closed first).
        let canceled = error
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled);
        if canceled || error.is::<NotDelivered>() {
            return true;
        }
        // An io::Error's `source` skips its payload: look into the payload itself.
        cause = match error.downcast_ref::<io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn StdError + 'static)),
            None => error.source(),
        };
    }
    false
}

/// `error` and its causes, as one line: hyper's own message ("client error (SendRequest)")
/// says nothing of why.
pub fn with_causes(error: &(dyn StdError + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        let text = error.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = error.source();
    }
    line
}

/// A connection that knows whether the request being written has had a byte sent yet.
pub struct Watched {
    io: TokioIo<TcpStream>,
    /// A byte of the current request has been written, and no byte of its answer read yet.
    awaiting_answer: bool,
}

impl Watched {
    pub fn new(io: TokioIo<TcpStream>) -> Self {
        Self {
            io,
            awaiting_answer: false,
        }
    }

    /// Before a request's first byte: has the server closed (or spoken) since its last answer?
    fn check_before_request(&self, cx: &mut Context<'_>) -> io::Result<()> {
        let mut byte = [0u8; 1];
        let mut peeked = ReadBuf::new(&mut byte);
        match self.io.inner().poll_peek(cx, &mut peeked) {
            Poll::Pending => Ok(()),
            Poll::Ready(_) => Err(NotDelivered::Closed.into()),
        }
    }

    /// A write of the request's first bytes: what fails before any of them left is not
    /// delivered.
    fn first_write(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut TokioIo<TcpStream>>, &mut Context<'_>) -> Poll<io::Result<usize>>,
        nonempty: bool,
    ) -> Poll<io::Result<usize>> {
        self.check_before_request(cx)?;
        match write(Pin::new(&mut self.io), cx) {
            Poll::Ready(Ok(0)) if nonempty => Poll::Ready(Err(NotDelivered::Closed.into())),
            Poll::Ready(Ok(written)) => {
                self.awaiting_answer = written > 0;
                Poll::Ready(Ok(written))
            }
            Poll::Ready(Err(_)) => Poll::Ready(Err(NotDelivered::Closed.into())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Read for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        // hyper reads an answer only after writing its request whole.
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Err(error))
                if self.awaiting_answer && error.kind() == io::ErrorKind::ConnectionReset =>
            {
                self.awaiting_answer = false;
                Poll::Ready(Err(NotDelivered::Unread.into()))
            }
            Poll::Ready(read) => {
                self.awaiting_answer = false;
                Poll::Ready(read)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Write for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.awaiting_answer {
            return Pin::new(&mut self.io).poll_write(cx, buf);
        }
        self.first_write(cx, |io, cx| io.poll_write(cx, buf), !buf.is_empty())
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.awaiting_answer {
            return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        }
        let nonempty = bufs.iter().any(|b| !b.is_empty());
        self.first_write(cx, |io, cx| io.poll_write_vectored(cx, bufs), nonempty)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Full};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;
    use crate::proxy::upstream::pool::{Pool, SendError};

    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    fn client(port: u16) -> Pool {
        Pool::new(format!("127.0.0.1:{port}"))
    }

    async fn post(client: &Pool) -> Result<Bytes, SendError> {
        let request = hyper::Request::post("/mcp")
            .header("host", "127.0.0.1")
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("request");
        let response = client.send(request).await?;
        Ok(response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes())
    }

    /// Reads one request (headers and the 2-byte body) from `stream`.
    async fn read_request(stream: &mut TcpStream) {
        let mut seen = Vec::new();
        let mut chunk = [0u8; 1024];
        while !seen.windows(6).any(|w| w == b"\r\n\r\n{}") {
            let n = stream.read(&mut chunk).await.expect("read");
            assert_ne!(n, 0, "the request ended early");
            seen.extend_from_slice(&chunk[..n]);
        }
    }

    /// Writes `bytes` to `connection` as hyper does, with the connection's own checks.
    async fn write(connection: &mut Watched, bytes: &[u8]) -> io::Result<usize> {
        std::future::poll_fn(|cx| Pin::new(&mut *connection).poll_write(cx, bytes)).await
    }

    /// A real socket the server closed while it sat idle after an answer, as a stopping server
    /// closes its keep-alive connections: the next request's first write is not delivered.
    #[tokio::test]
    async fn a_request_on_a_connection_the_server_closed_is_not_delivered() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let mut connection = Watched::new(TokioIo::new(
            TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect"),
        ));
        let (mut server, _) = listener.accept().await.expect("accept");

        write(
            &mut connection,
            b"POST /mcp HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}",
        )
        .await
        .expect("the first request");
        read_request(&mut server).await;
        server.write_all(ANSWER).await.expect("answer");
        let mut answer = [0u8; 64];
        let mut cursor = hyper::rt::ReadBuf::new(&mut answer);
        std::future::poll_fn(|cx| Pin::new(&mut connection).poll_read(cx, cursor.unfilled()))
            .await
            .expect("the answer");

        drop(server);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let error = write(&mut connection, b"POST /mcp HTTP/1.1\r\n")
            .await
            .expect_err("the server is gone");
        assert!(was_not_delivered(&error), "{error:?}");
    }

    /// The same through the pool: whether the pool notices the close first (the request
    /// goes out on a new connection) or the connection's check does (not delivered), the request
    /// is never one the server may have read.
    #[tokio::test]
    async fn a_pooled_connection_the_server_closed_never_loses_a_request() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            read_request(&mut stream).await;
            stream.write_all(ANSWER).await.expect("answer");
            drop(stream);
            listener
        });
        let client = client(port);
        assert_eq!(post(&client).await.expect("first"), "ok");
        let listener = server.await.expect("server");
        // The FIN arrives while this test holds the runtime's only thread, so the pool's
        // connection task has not seen it when the next request is written.
        std::thread::sleep(Duration::from_millis(50));
        let second = tokio::spawn({
            let client = client.clone();
            async move { post(&client).await }
        });
        let accepted = tokio::time::timeout(Duration::from_secs(5), listener.accept()).await;
        match accepted {
            Ok(Ok((mut stream, _))) => {
                read_request(&mut stream).await;
                stream.write_all(ANSWER).await.expect("answer");
                assert_eq!(second.await.expect("task").expect("second"), "ok");
            }
            _ => {
                let error = second
                    .await
                    .expect("task")
                    .expect_err("the closed connection");
                assert!(was_not_delivered(&error), "{error:?}");
            }
        }
    }

    /// A server that closes with the request unread in its socket (a process killed before it
    /// read it): the reset proves it never had the request.
    #[tokio::test]
    async fn a_request_the_server_never_read_is_not_delivered() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let mut byte = [0u8; 1];
            while stream.peek(&mut byte).await.expect("peek") == 0 {}
            // Wait for the whole request, still unread, before the close.
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(stream);
        });
        let error = post(&client(port)).await.expect_err("no answer");
        assert!(was_not_delivered(&error), "{error:?}");
    }

    /// A server that read the request and then closed without answering may have run it.
    #[tokio::test]
    async fn a_request_the_server_read_may_have_been_executed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            read_request(&mut stream).await;
            drop(stream);
        });
        let error = post(&client(port)).await.expect_err("no answer");
        assert!(!was_not_delivered(&error), "{error:?}");
    }

    #[test]
    fn not_delivered_is_found_among_the_causes() {
        let closed = io::Error::from(NotDelivered::Closed);
        assert!(was_not_delivered(&closed));
        assert!(was_not_delivered(&io::Error::other(closed)));
        assert!(!was_not_delivered(&io::Error::other("connection reset")));
    }
}
