//! Proxy overhead: `scripts/bench.sh proxy` (installs nginx and HAProxy from Debian first), or
//! `cargo bench --bench proxy` where they are installed (`-- --quick` for a short run).
//!
//! In one run: a minimal MCP server (benches/common/echo.rs: JSON answers, sessions, an echo tool:
//! as fast as an upstream gets), one redis-server, and three reverse proxies in front of the server: nginx
//! (2 workers, keep-alive connections to the upstream), HAProxy (2 threads, connection reuse) and
//! this proxy with Redis. Each path, the direct one first, is loaded the same way: `tools/call`
//! over 16 sessions at a fixed 2,000 calls per second (the latency each proxy adds to the direct
//! path's), then back to back (throughput at saturation), each load in rounds that the paths
//! take in turn, so that a change in the machine's other load is shared by all. At the fixed
//! rate, each proxy's CPU time and context switches per call are read from /proc (its processes
//! and threads): what it costs, which the load sharing two cores disturbs less than its
//! latency. Then 100,000 sessions are created through this proxy and left idle, for its memory
//! per session.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path as FsPath;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::usage::{Usage, rss_bytes};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use support::redis::RedisServer;
use support::{die_with_parent, free_port};

/// Sessions, each on its own connection.
const WORKERS: usize = 16;
/// The moderate load at which latency is compared.
const PACED_RATE: f64 = 2000.0;
/// Rounds each load is split into, the paths taking turns.
const ROUNDS: u32 = 5;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (seconds, idle) = if quick { (3, 10_000) } else { (10, 100_000) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(Duration::from_secs(seconds), idle));
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
    let session = common::session_of(&response);
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

/// What one load on one path measured.
struct Load {
    calls: usize,
    rate: f64,
    p50: Duration,
    p99: Duration,
    errors: usize,
}

/// A load's calls, gathered over its rounds.
#[derive(Default)]
struct Samples {
    latencies: Vec<Duration>,
    errors: usize,
    /// Time spent calling (sessions are opened before it starts).
    elapsed: Duration,
}

impl Samples {
    fn add(&mut self, mut round: Samples) {
        self.latencies.append(&mut round.latencies);
        self.errors += round.errors;
        self.elapsed += round.elapsed;
    }

    fn load(mut self) -> Load {
        self.latencies.sort();
        let n = self.latencies.len();
        let at = |q: f64| self.latencies[((n as f64 * q) as usize).min(n.saturating_sub(1))];
        Load {
            calls: n,
            rate: n as f64 / self.elapsed.as_secs_f64(),
            p50: at(0.5),
            p99: at(0.99),
            errors: self.errors,
        }
    }
}

/// One round on `port`: `WORKERS` sessions, each on its own connection, opened first; then all
/// call the echo tool for `duration`, back to back or at `rate` calls per second in all (each
/// call's latency from its sending: at this rate a call is answered long before the next of its
/// session is due, and the timer's millisecond ticks would otherwise count as latency). What
/// `pid`'s processes spent is read around the calls alone.
async fn round(
    port: u16,
    duration: Duration,
    rate: Option<f64>,
    pid: Option<u32>,
) -> (Samples, Option<Usage>) {
    // Every session open, then the usage read, then the calls: the barrier is passed twice.
    let phase = Arc::new(tokio::sync::Barrier::new(WORKERS + 1));
    let tasks: Vec<_> = (0..WORKERS)
        .map(|worker| {
            let phase = phase.clone();
            tokio::spawn(async move {
                let mut sender = connect(port).await;
                let session = open_session(&mut sender).await;
                phase.wait().await;
                phase.wait().await;
                let started = Instant::now();
                let mut ticks = rate.map(|rate| {
                    let period = Duration::from_secs_f64(WORKERS as f64 / rate);
                    // Workers staggered over one period: calls arrive evenly.
                    let first = tokio::time::Instant::now() + period.mul_f64(worker as f64 / WORKERS as f64);
                    tokio::time::interval_at(first, period)
                });
                let (mut latencies, mut errors, mut n) = (Vec::new(), 0, 0_u64);
                while started.elapsed() < duration {
                    if let Some(ticks) = &mut ticks {
                        ticks.tick().await;
                    }
                    let sent = Instant::now();
                    let call = json!({"jsonrpc": "2.0", "id": n, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "hello"}}});
                    let (status, _) = post(&mut sender, Some(&session), call).await;
                    latencies.push(sent.elapsed());
                    errors += usize::from(status != StatusCode::OK);
                    n += 1;
                }
                (latencies, errors)
            })
        })
        .collect();
    phase.wait().await;
    let before = pid.map(Usage::of);
    phase.wait().await;
    let started = Instant::now();
    let mut samples = Samples::default();
    for task in tasks {
        let (mut latencies, errors) = task.await.expect("worker");
        samples.latencies.append(&mut latencies);
        samples.errors += errors;
    }
    samples.elapsed = started.elapsed();
    let usage = pid
        .zip(before)
        .map(|(pid, before)| Usage::of(pid).since(before));
    (samples, usage)
}

/// A process stopped when dropped: asked with SIGTERM first, since nginx's master stops its
/// workers only then (killed, it leaves them running, serving and taking CPU from later runs).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        let pid = i32::try_from(self.0.id()).unwrap_or(i32::MAX);
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(command: &mut Command, what: &str) -> Running {
    let child = die_with_parent(command.stdout(Stdio::null()).stderr(Stdio::null()))
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {what} ({e}): scripts/bench.sh installs nginx and HAProxy")
        });
    Running(child)
}

/// nginx as a reverse proxy is usually configured: 2 workers (one per core), keep-alive
/// connections to the upstream, no access log, responses not buffered; no limit on the requests
/// of a keep-alive connection (the default closes one every 1,000).
fn nginx(dir: &FsPath, port: u16, upstream: u16) -> Running {
    let root = std::env::var("USER").is_ok_and(|user| user == "root")
        || std::fs::read_to_string("/proc/self/status")
            .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")));
    let d = dir.display();
    let config = format!(
        "{user}worker_processes 2;\npid {d}/nginx.pid;\nerror_log stderr;\ndaemon off;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 10000000;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         upstream mcp {{ server 127.0.0.1:{upstream}; keepalive 64; keepalive_requests 10000000; }}\n\
         server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://mcp;\n\
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n",
        user = if root { "user root;\n" } else { "" },
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config).expect("nginx.conf");
    start(
        Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&path)
            .args(["-e", "stderr"]),
        "nginx",
    )
}

/// HAProxy in HTTP mode with 2 threads, server connections reused across client connections.
fn haproxy(dir: &FsPath, port: u16, upstream: u16) -> Running {
    let config = format!(
        "global\n  nbthread 2\n  maxconn 4096\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option http-keep-alive\n\
         frontend mcp\n  bind 127.0.0.1:{port}\n  default_backend upstream\n\
         backend upstream\n  http-reuse always\n  server echo 127.0.0.1:{upstream}\n"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).expect("haproxy.cfg");
    start(
        Command::new("haproxy").arg("-f").arg(&path).arg("-db"),
        "HAProxy",
    )
}

/// This proxy, as a pod runs it: with Redis, a pod name, a fingerprint key.
fn session_proxy(port: u16, upstream: u16, admin: u16, redis: &str) -> Running {
    start(
        Command::new(env!("CARGO_BIN_EXE_mcp-session-operator"))
            .args(["proxy", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", &format!("http://127.0.0.1:{upstream}")])
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .args(["--redis-url", redis, "--pod-name", "bench-0"])
            // All bench sessions are one client's: one credential, more sessions than a
            // proxy holds by default.
            .args(["--max-sessions-per-credential", "1000000"])
            .args(["--max-sessions", "1000000"])
            .env("MCP_SESSION_FINGERPRINT_KEY", "bench")
            .env("RUST_LOG", "warn"),
        "the proxy",
    )
}

async fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A path under test: its port, and its proxy's process (none for the direct path).
struct Path {
    name: &'static str,
    port: u16,
    pid: Option<u32>,
}

/// One path's measurements: paced, then saturated; what its proxy spent under the paced load.
struct Measured {
    name: &'static str,
    paced: Load,
    saturated: Load,
    paced_usage: Option<Usage>,
}

/// Loads every path, paced then saturated, each load split into `ROUNDS` rounds in which the
/// paths take turns: a drift in what else the two shared cores run (the load generator, the
/// upstream and Redis share them) then falls on every path alike, not on whichever comes last.
async fn measure(paths: &[Path], duration: Duration) -> Vec<Measured> {
    // Warm the connections, the pools and the caches.
    for path in paths {
        round(path.port, Duration::from_millis(500), None, None).await;
    }
    let each = duration / ROUNDS;
    let paced = load_in_turns(paths, each, Some(PACED_RATE)).await;
    let saturated = load_in_turns(paths, each, None).await;
    paths
        .iter()
        .zip(paced.into_iter().zip(saturated))
        .map(|(path, ((paced, paced_usage), (saturated, _)))| Measured {
            name: path.name,
            paced: paced.load(),
            saturated: saturated.load(),
            paced_usage,
        })
        .collect()
}

/// `ROUNDS` rounds of `each` at `rate` (none: back to back), the paths taking turns in each;
/// per path, its calls and what its proxy spent on them.
async fn load_in_turns(
    paths: &[Path],
    each: Duration,
    rate: Option<f64>,
) -> Vec<(Samples, Option<Usage>)> {
    let mut gathered: Vec<(Samples, Option<Usage>)> =
        paths.iter().map(|_| (Samples::default(), None)).collect();
    for _ in 0..ROUNDS {
        for (path, (samples, usage)) in paths.iter().zip(&mut gathered) {
            let (round, spent) = round(path.port, each, rate, path.pid).await;
            samples.add(round);
            if let Some(spent) = spent {
                usage.get_or_insert_with(Usage::default).add(spent);
            }
        }
    }
    gathered
}

async fn run(duration: Duration, idle: usize) {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", upstream))
        .await
        .expect("bind the upstream");
    tokio::spawn(common::echo::serve(listener, std::future::pending()));
    let ports = [free_port(), free_port(), free_port(), free_port()];
    let [nginx_port, haproxy_port, proxy_port, admin] = ports;
    let _nginx = nginx(dir.path(), nginx_port, upstream);
    let _haproxy = haproxy(dir.path(), haproxy_port, upstream);
    let proxy = session_proxy(proxy_port, upstream, admin, &redis.url());
    for port in [upstream, nginx_port, haproxy_port, proxy_port] {
        wait_listening(port).await;
    }

    let path = |name, port, pid| Path { name, port, pid };
    let paths = measure(
        &[
            path("direct", upstream, None),
            path("nginx 1.22", nginx_port, Some(_nginx.0.id())),
            path("HAProxy 2.6", haproxy_port, Some(_haproxy.0.id())),
            path("mcp-session-operator proxy", proxy_port, Some(proxy.0.id())),
        ],
        duration,
    )
    .await;

    // Idle sessions: memory of the proxy per session it maps.
    let before = rss_bytes(proxy.0.id());
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
    let after = rss_bytes(proxy.0.id());
    let sessions = per_worker * 32;
    drop(proxy);

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let direct = &paths[0];
    let nginx = &paths[1];
    println!();
    println!(
        "proxy benchmark: tools/call over {WORKERS} sessions, at {PACED_RATE:.0}/s and back to back, {duration:?} each in {ROUNDS} rounds taken in turn; one redis-server"
    );
    println!(
        "{:<28} {:>9} {:>9} {:>10} {:>10} {:>11} {:>9} {:>9} {:>7} {:>12} {:>8} {:>8}",
        "path",
        "p50 us",
        "p99 us",
        "added p50",
        "added p99",
        "saturation",
        "x direct",
        "x nginx",
        "errors",
        "cpu us/call",
        "of user",
        "cs/call"
    );
    for path in &paths {
        // What the proxy's processes spent per call at the paced rate (none: the direct path).
        let (cpu, user, switches) = match path.paced_usage {
            Some(usage) => {
                let calls = path.paced.calls.max(1) as f64;
                (
                    format!("{:.1}", us(usage.cpu) / calls),
                    format!("{:.1}", us(usage.user) / calls),
                    format!("{:.2}", usage.switches as f64 / calls),
                )
            }
            None => ("-".to_owned(), "-".to_owned(), "-".to_owned()),
        };
        println!(
            "{:<28} {:>9.1} {:>9.1} {:>10.1} {:>10.1} {:>11.0} {:>8.2}x {:>8.2}x {:>7} {:>12} {:>8} {:>8}",
            path.name,
            us(path.paced.p50),
            us(path.paced.p99),
            us(path.paced.p50) - us(direct.paced.p50),
            us(path.paced.p99) - us(direct.paced.p99),
            path.saturated.rate,
            path.saturated.rate / direct.saturated.rate,
            path.saturated.rate / nginx.saturated.rate,
            path.paced.errors + path.saturated.errors,
            cpu,
            user,
            switches,
        );
    }
    let proxy = &paths[3];
    println!(
        "target: the proxy's added p50 and p99 at most nginx's ({:.1} and {:.1} us), its saturation at least nginx's",
        us(nginx.paced.p50) - us(direct.paced.p50),
        us(nginx.paced.p99) - us(direct.paced.p99),
    );
    println!(
        "saturation back to back: p50 {:.1} us direct, {:.1} us nginx, {:.1} us proxy",
        us(direct.saturated.p50),
        us(nginx.saturated.p50),
        us(proxy.saturated.p50)
    );
    println!(
        "sessions created through the proxy: {sessions} at {:.0}/s; its RSS per idle session {} bytes (target <= 2048), {:.1} MiB with them",
        sessions as f64 / creation.as_secs_f64(),
        after.saturating_sub(before) / sessions as u64,
        after as f64 / 1_048_576.0
    );
}
