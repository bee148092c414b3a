//! One HTTP/1.1 connection of a benchmark's client fleet, speaking MCP's Streamable HTTP with
//! JSON answers: it opens sessions, and sends messages in them as an HTTP client does (a
//! request that provably never left goes out on a new connection; one that may have left does
//! not).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// What became of a request.
pub enum Sent {
    Answered(StatusCode, Option<String>, Bytes),
    /// It may have reached the server, with no answer.
    Unanswered(String),
}

/// A connection, opened again whenever the server closes it.
pub struct Connection {
    address: SocketAddr,
    credential: String,
    sender: Option<Sender>,
    /// Connections opened so far.
    opened: u64,
    /// Where the fleet counts connections opened again.
    reconnects: Arc<AtomicU64>,
}

impl Connection {
    pub fn new(address: SocketAddr, credential: String, reconnects: Arc<AtomicU64>) -> Self {
        Self {
            address,
            credential,
            sender: None,
            opened: 0,
            reconnects,
        }
    }

    /// A new session; tried until the server opens one.
    pub async fn open_session(&mut self) -> String {
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18",
            "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}});
        loop {
            match self.send(None, &init).await {
                Sent::Answered(StatusCode::OK, Some(session), _) => {
                    let initialized =
                        json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
                    if let Sent::Answered(StatusCode::ACCEPTED, ..) =
                        self.send(Some(&session), &initialized).await
                    {
                        return session;
                    }
                }
                Sent::Answered(status, ..) => {
                    eprintln!("initialize answered {status}; trying again");
                }
                Sent::Unanswered(why) => eprintln!("initialize unanswered ({why}); trying again"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ends `session` (`DELETE`), as a client that is done does.
    pub async fn end_session(&mut self, session: &str) -> Sent {
        let request = self.request(hyper::Method::DELETE, Some(session), None);
        self.send_request(request).await
    }

    /// Sends `body` in `session` (none: a new one).
    pub async fn send(&mut self, session: Option<&str>, body: &Value) -> Sent {
        let request = self.request(hyper::Method::POST, session, Some(body));
        self.send_request(request).await
    }

    /// Sends `request` on the connection, opening one first where there is none or the server
    /// closed it (after a `Connection: close`, or gone).
    async fn send_request(&mut self, request: hyper::Request<Full<Bytes>>) -> Sent {
        let mut request = Some(request);
        for _ in 0..3 {
            let Some(sender) = self.connected().await else {
                return Sent::Unanswered("cannot connect".to_owned());
            };
            let attempt = request.take().expect("a request to send");
            match sender.try_send_request(attempt).await {
                Ok(response) => {
                    let status = response.status();
                    let session = super::session_of(&response);
                    return match response.into_body().collect().await {
                        Ok(body) => Sent::Answered(status, session, body.to_bytes()),
                        Err(_) => {
                            self.sender = None;
                            Sent::Unanswered("answer cut".to_owned())
                        }
                    };
                }
                Err(mut error) => {
                    self.sender = None;
                    match error.take_message() {
                        Some(unsent) => request = Some(unsent),
                        None => {
                            return Sent::Unanswered(
                                "connection closed with the request sent".to_owned(),
                            );
                        }
                    }
                }
            }
        }
        Sent::Unanswered("no connection took the request".to_owned())
    }

    fn request(
        &self,
        method: hyper::Method,
        session: Option<&str>,
        body: Option<&Value>,
    ) -> hyper::Request<Full<Bytes>> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri("/mcp")
            .header("host", "mcp")
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("authorization", &self.credential);
        if let Some(session) = session {
            request = request
                .header("mcp-session-id", session)
                .header("mcp-protocol-version", "2025-06-18");
        }
        let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        request.body(Full::new(body)).expect("a valid request")
    }

    /// The open connection, or a new one; `None` if none can be opened.
    async fn connected(&mut self) -> Option<&mut Sender> {
        if let Some(sender) = &mut self.sender
            && sender.ready().await.is_ok()
        {
            return self.sender.as_mut();
        }
        self.sender = None;
        let tcp = tokio::net::TcpStream::connect(self.address).await.ok()?;
        tcp.set_nodelay(true).ok()?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .ok()?;
        tokio::spawn(connection);
        if self.opened > 0 {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        self.opened += 1;
        self.sender = Some(sender);
        self.sender.as_mut()
    }
}
