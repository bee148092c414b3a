//! Proxy overhead: `cargo bench --bench proxy` (`-- --quick` for a short run).
//!
//! In one run: a minimal MCP server written here (JSON responses, sessions, an echo tool: as fast
//! as an upstream gets), one redis-server, and the proxy binary with Redis. A load generator
//! calls the tool with 16 concurrent sessions, first directly, then through the proxy, and
//! compares throughput and latency; then 100,000 sessions are created through the proxy and left
//! idle to measure its memory per session.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use support::redis::RedisServer;
use support::{die_with_parent, free_port};

const WORKERS: usize = 16;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (seconds, idle) = if quick { (3, 10_000) } else { (10, 100_000) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(Duration::from_secs(seconds), idle));
}

/// The upstream: an MCP server reduced to what a session needs.
async fn echo_server(port: u16) {
    async fn handle(headers: HeaderMap, body: Bytes) -> axum::response::Response {
        let message: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let id = message.get("id").cloned();
        match message.get("method").and_then(Value::as_str) {
            Some("initialize") => {
                let session = format!("{:032x}", rand::random::<u128>());
                let result = json!({"jsonrpc": "2.0", "id": id, "result": {"protocolVersion": "2025-06-18",
                    "capabilities": {"tools": {}}, "serverInfo": {"name": "echo", "version": "1"}}});
                (
                    [
                        ("mcp-session-id", session),
                        ("content-type", "application/json".into()),
                    ],
                    result.to_string(),
                )
                    .into_response()
            }
            _ if headers.get("mcp-session-id").is_none() => StatusCode::BAD_REQUEST.into_response(),
            _ if id.is_none() => StatusCode::ACCEPTED.into_response(),
            _ => {
                let result = json!({"jsonrpc": "2.0", "id": id, "result": {"content": [{"type": "text", "text": message["params"]["arguments"]["text"]}]}});
                ([("content-type", "application/json")], result.to_string()).into_response()
            }
        }
    }
    let app = axum::Router::new().route("/mcp", axum::routing::post(handle));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    tokio::spawn(async move { axum::serve(listener, app).await });
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(port: u16) -> Sender {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    sender
}

async fn post(
    sender: &mut Sender,
    session: Option<&str>,
    body: Value,
) -> (StatusCode, Option<String>) {
    let mut request = hyper::Request::post("/mcp")
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("authorization", "Bearer bench-client");
    if let Some(session) = session {
        request = request.header("mcp-session-id", session);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    sender.ready().await.expect("ready");
    let response = sender.send_request(request).await.expect("response");
    let status = response.status();
    let session = response
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let _ = response.into_body().collect().await;
    (status, session)
}

async fn open_session(sender: &mut Sender) -> String {
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18",
        "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}});
    let (status, session) = post(sender, None, init).await;
    assert_eq!(status, StatusCode::OK);
    let session = session.expect("a session id");
    post(
        sender,
        Some(&session),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    session
}

struct Load {
    rate: f64,
    p50: Duration,
    p99: Duration,
    errors: usize,
}

/// `WORKERS` sessions, each calling the echo tool back to back on its own connection.
async fn load(port: u16, duration: Duration) -> Load {
    let started = Instant::now();
    let tasks: Vec<_> = (0..WORKERS)
        .map(|_| {
            tokio::spawn(async move {
                let mut sender = connect(port).await;
                let session = open_session(&mut sender).await;
                let (mut latencies, mut errors, mut n) = (Vec::new(), 0, 0_u64);
                while started.elapsed() < duration {
                    let call = json!({"jsonrpc": "2.0", "id": n, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "hello"}}});
                    let sent = Instant::now();
                    let (status, _) = post(&mut sender, Some(&session), call).await;
                    latencies.push(sent.elapsed());
                    errors += usize::from(status != StatusCode::OK);
                    n += 1;
                }
                (latencies, errors)
            })
        })
        .collect();
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (mut l, e) = task.await.expect("worker");
        latencies.append(&mut l);
        errors += e;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Load {
        rate: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.5),
        p99: at(0.99),
        errors,
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |k| k * 1024)
}

async fn run(duration: Duration, idle: usize) {
    let redis = RedisServer::start();
    let (upstream, proxy_port, admin) = (free_port(), free_port(), free_port());
    echo_server(upstream).await;
    let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-session-operator"));
    command
        .args([
            "proxy",
            "--listen",
            &format!("127.0.0.1:{proxy_port}"),
            "--upstream",
            &format!("http://127.0.0.1:{upstream}"),
        ])
        .args([
            "--admin-addr",
            &format!("127.0.0.1:{admin}"),
            "--redis-url",
            &redis.url(),
            "--pod-name",
            "bench-0",
            // All bench sessions are anonymous: one credential.
            "--max-sessions-per-credential",
            "1000000",
        ])
        .env("MCP_SESSION_FINGERPRINT_KEY", "bench")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut proxy = die_with_parent(&mut command)
        .spawn()
        .expect("start the proxy");
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", proxy_port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the proxy did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Warm both paths, then measure.
    load(upstream, Duration::from_millis(500)).await;
    load(proxy_port, Duration::from_millis(500)).await;
    let direct = load(upstream, duration).await;
    let proxied = load(proxy_port, duration).await;

    // Idle sessions: memory of the proxy per session it maps.
    let before = rss_bytes(proxy.id());
    let per_worker = idle / 32;
    let creators: Vec<_> = (0..32)
        .map(|_| {
            tokio::spawn(async move {
                let mut sender = connect(proxy_port).await;
                for _ in 0..per_worker {
                    open_session(&mut sender).await;
                }
            })
        })
        .collect();
    let created_at = Instant::now();
    for creator in creators {
        creator.await.expect("creator");
    }
    let creation = created_at.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_bytes(proxy.id());
    let sessions = per_worker * 32;
    let _ = proxy.kill();
    let _ = proxy.wait();

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!();
    println!(
        "proxy benchmark: {WORKERS} sessions calling an echo tool back to back for {duration:?}, one redis-server"
    );
    println!(
        "{:<34} {:>12} {:>12} {:>12}  target",
        "measure", "direct", "proxy", "ratio/added"
    );
    println!(
        "{:<34} {:>12.0} {:>12.0} {:>11.2}x  >= 0.9x",
        "calls per second",
        direct.rate,
        proxied.rate,
        proxied.rate / direct.rate
    );
    println!(
        "{:<34} {:>12.1} {:>12.1} {:>12.1}  < 100 us",
        "p50 latency (us)",
        us(direct.p50),
        us(proxied.p50),
        us(proxied.p50) - us(direct.p50)
    );
    println!(
        "{:<34} {:>12.1} {:>12.1} {:>12.1}  < 1000 us",
        "p99 latency (us)",
        us(direct.p99),
        us(proxied.p99),
        us(proxied.p99) - us(direct.p99)
    );
    println!(
        "{:<34} {:>12} {:>12}",
        "errors", direct.errors, proxied.errors
    );
    println!(
        "{:<34} {:>12} {:>12.1}",
        "sessions created (per second)",
        sessions,
        sessions as f64 / creation.as_secs_f64()
    );
    println!(
        "{:<34} {:>12} {:>12}  <= 2048",
        "proxy RSS per idle session (bytes)",
        "",
        (after.saturating_sub(before)) / sessions as u64
    );
    println!(
        "{:<34} {:>12} {:>12.1}",
        "proxy RSS with them (MiB)",
        "",
        after as f64 / 1_048_576.0
    );
}
