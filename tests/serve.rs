//! Every listener's limits, on real sockets: idle, half-sent and stalled clients are closed,
//! connections over the cap are closed at once and counted, and serving threads take
//! connections in turn and serve them past shutdown.

mod support;

use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use mcp_session_operator::serve::{
    ConnectionMetrics, Limits, Served, plain, serve, serving_thread,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use support::wire::{read_until_closed, until_closed};

async fn start(limits: Limits) -> (u16, ConnectionMetrics) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let metrics = ConnectionMetrics::default();
    let app = Router::new().route(
        "/",
        axum::routing::post(|body: Bytes| async move { format!("{} bytes", body.len()) }),
    );
    let served = Served {
        app,
        accept: plain,
        limits,
    };
    tokio::spawn(serve(
        listener,
        served,
        metrics.clone(),
        0,
        std::future::pending(),
    ));
    (port, metrics)
}

#[tokio::test]
async fn idle_half_sent_and_stalled_clients_are_closed() {
    let limits = Limits {
        header_timeout: Duration::from_millis(300),
        body_timeout: Duration::from_millis(300),
        max_connections: 100,
    };
    let (port, metrics) = start(limits).await;
    let connect = || TcpStream::connect(("127.0.0.1", port));
    let mut idle = connect().await.expect("connect");
    let mut half = connect().await.expect("connect");
    half.write_all(b"POST / HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut stalled = connect().await.expect("connect");
    stalled
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .expect("write");
    let started = std::time::Instant::now();
    assert_eq!(until_closed(&mut idle).await, "", "an idle connection");
    assert!(
        !until_closed(&mut half).await.contains("200"),
        "a half-sent head"
    );
    let answer = until_closed(&mut stalled).await;
    assert!(!answer.contains("200 OK"), "a stalled body: {answer}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // A client that sends its request whole is served, and may keep its connection.
    let mut client = connect().await.expect("connect");
    client
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok")
        .await
        .expect("write");
    let mut answer = [0u8; 256];
    let n = client.read(&mut answer).await.expect("read");
    assert!(String::from_utf8_lossy(&answer[..n]).contains("2 bytes"));
    assert_eq!(metrics.refused.get(), 0);
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once_and_counted() {
    let limits = Limits {
        max_connections: 3,
        ..Limits::default()
    };
    let (port, metrics) = start(limits).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect"),
        );
    }
    // Accepted in order: let the three take their slots.
    while metrics.open.get() < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut over = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    assert_eq!(until_closed(&mut over).await, "");
    assert_eq!(metrics.refused.get(), 1);
    drop(held);
    while metrics.open.get() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut again = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    again
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        .await
        .expect("write");
    let mut answer = [0u8; 256];
    let n = again.read(&mut answer).await.expect("read");
    assert!(String::from_utf8_lossy(&answer[..n]).contains("200 OK"));
}

/// Sends one request on `stream` and reads its answer's body (a short one, in one read).
async fn ask(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut answer = [0u8; 512];
    let n = stream.read(&mut answer).await.expect("read");
    let text = String::from_utf8_lossy(&answer[..n]).into_owned();
    text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned()
}

#[tokio::test]
async fn threads_take_connections_in_turn_and_serve_them_past_shutdown() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let app = Router::new().route(
        "/",
        axum::routing::get(|| async { format!("{:?}", serving_thread()) }),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = Served {
        app,
        accept: plain,
        limits: Limits::default(),
    };
    let serving = tokio::spawn(serve(
        listener,
        served,
        ConnectionMetrics::default(),
        2,
        async move {
            let _ = stopped.await;
        },
    ));
    let mut connections = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let thread = ask(&mut stream).await;
        connections.push((stream, thread));
    }
    let threads: Vec<&str> = connections.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(threads, ["Some(1)", "Some(0)", "Some(1)", "Some(0)"]);
    // Not on a serving thread: the test's own.
    assert_eq!(serving_thread(), None);

    let _ = stop.send(());
    serving.await.expect("serving ends at shutdown");
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());
    for (stream, thread) in &mut connections {
        assert_eq!(&ask(stream).await, thread, "still served by its thread");
    }
}

#[tokio::test]
async fn until_closed_fails_on_a_connection_that_stays_open() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let holder = tokio::spawn(async move {
        let (mut held, _) = listener.accept().await.expect("accept");
        held.write_all(b"hello").await.expect("write");
        // Held open, never closed, for longer than the read waits.
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(held);
    });
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let read = read_until_closed(&mut stream, Duration::from_millis(300)).await;
    assert_eq!(
        read,
        Err("hello".to_owned()),
        "an open connection is an error"
    );
    holder.abort();
}
