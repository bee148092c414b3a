//! Gateway mode at scale, next to sidecar mode: `scripts/bench.sh gateway`, or
//! `cargo bench --bench gateway` where the tests' set-up ran (it needs their Kubernetes
//! control plane, `MCP_TEST_KUBE_BIN`); `-- --quick` for 2,000 sessions instead of 10,000.
//!
//! Each mode runs on a test bed of its own (tests/support/bed.rs: the control plane, the
//! operator and its webhook, a real kubelet on containerd running every container from an
//! image, kube-proxy, a real redis-server): a Deployment of 3 backend pods running a minimal MCP
//! server (benches/common/echo.rs, this binary in an image of its own), in sidecar mode each with the proxy the webhook injects, in gateway
//! mode behind the 2 gateway replicas the operator runs. A client fleet written here (not SDK
//! processes) opens the sessions, 10 per connection and credential, and calls the echo tool,
//! which has no annotations and takes 20 ms, at 1,000 calls per second in all (each session
//! every 10 s) throughout:
//! 1. steady, 20 s: what the proxies' processes spend per call (CPU, from /proc) and hold per
//!    session (their resident memory grown while the sessions opened);
//! 2. `kubectl set image` on the Deployment, until every pod runs the new version;
//! 3. one backend pod SIGKILLed and force-deleted (a lost node, an OOM kill), until it is
//!    replaced; then 12 s more, so that every session is called after the last disruption.
//!
//! It prints, per mode and per phase, the calls, the failed ones and why, the sessions lost
//! (a `404` for a session the fleet had: it opens a new one), and the slowest call.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::client::{Connection, Sent};
use common::usage::{Usage, rss_bytes};
use kube::ResourceExt as _;
use mcp_session_operator::api::Sidecar;
use serde_json::{Value, json};
use support::bed::{BACKEND_PORT, Backend, Bed, Mode, V1, V2};
use support::images;
use support::operator::PROXY_IMAGE;
use tokio::sync::watch;

/// Sessions per connection (and per credential).
const SESSIONS_PER_CONNECTION: usize = 10;
/// How often each session calls the tool.
const SESSION_PERIOD: Duration = Duration::from_secs(10);
/// How long the echo tool takes.
const TOOL_DELAY_MS: u64 = 20;
/// What the calls do after the pod killed last is replaced: more than one `SESSION_PERIOD`.
const TAIL: Duration = Duration::from_secs(12);

/// The argument under which this binary is the backend pods' MCP server.
const ECHO_BACKEND: &str = "--echo-backend";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == ECHO_BACKEND) {
        echo_backend(&args[at + 1..]);
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let (sessions, steady) = if quick {
        (2_000, Duration::from_secs(10))
    } else {
        (10_000, Duration::from_secs(20))
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(sessions, steady));
}

/// The backend pods' program: `--echo-backend PORT`, one serving thread (a pod's share of
/// the machine), until SIGTERM, then the calls it has are finished.
fn echo_backend(args: &[String]) {
    let port: u16 = args.first().and_then(|p| p.parse().ok()).expect("PORT");
    let ip = Ipv4Addr::UNSPECIFIED;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((ip, port))
            .await
            .expect("bind");
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler");
        let stop = async move {
            terminate.recv().await;
        };
        common::echo::serve(listener, stop).await.expect("serve");
    });
}

/// The bed's backend images: both versions run the echo server (this binary) on the port the
/// bed's Deployment declares.
fn echo_images(dir: &std::path::Path) -> Backend {
    let binary = std::env::current_exe().expect("this benchmark's binary");
    let port = BACKEND_PORT.to_string();
    Backend {
        images: images::binary(&binary, &[ECHO_BACKEND, &port], &[V1, V2], dir),
        liveness: None,
    }
}

async fn run(sessions: usize, steady: Duration) {
    let mut results = Vec::new();
    for mode in [Mode::Sidecar(Sidecar::Native), Mode::Gateway] {
        results.push(scenario(mode, sessions, steady).await);
    }
    print_report(sessions, &results);
}

/// What one mode measured.
struct Measured {
    mode: Mode,
    opened_per_second: f64,
    cpu_per_call: Duration,
    rss_per_session: u64,
    /// The fleet's counts at the end of each phase, in order.
    phases: Vec<(&'static str, Counts)>,
}

async fn scenario(mode: Mode, sessions: usize, steady: Duration) -> Measured {
    let prefix = match mode {
        Mode::Sidecar(_) => "bench-sidecar",
        Mode::Gateway => "bench-gateway",
    };
    eprintln!("{prefix}: starting the test bed");
    let images = tempfile::tempdir().expect("a directory for the backend's image");
    let bed = Bed::start(prefix, json!({}), mode, &echo_images(images.path())).await;
    let proxies = || bed.node.pids_of_image(PROXY_IMAGE);
    let memory = || proxies().into_iter().map(rss_bytes).sum::<u64>();

    let before = memory();
    let opening = Instant::now();
    let fleet = Fleet::open(bed.entry(), sessions).await;
    let opened_per_second = sessions as f64 / opening.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_per_session = memory().saturating_sub(before) / sessions as u64;
    eprintln!("{prefix}: {sessions} sessions open; calling");

    let mut phases = Vec::new();
    fleet.start();
    let start = fleet.tally.snapshot();
    let spent = Usage::of_all(&proxies());
    tokio::time::sleep(steady).await;
    let spent = Usage::of_all(&proxies()).since(spent);
    let steady_counts = fleet.tally.snapshot();
    let cpu_per_call = spent.cpu / (steady_counts.calls - start.calls).max(1) as u32;
    phases.push(("steady", steady_counts.since(&start)));

    eprintln!("{prefix}: rolling the backend");
    bed.set_image(V2).await;
    bed.wait_rolled_out(V2).await;
    let rolled = fleet.tally.snapshot();
    phases.push(("rolling update", rolled.since(&steady_counts)));

    let victim = bed.pods().await.first().expect("a pod").name_any();
    eprintln!("{prefix}: killing {victim}");
    bed.kill_pod(&victim).await;
    bed.wait_replaced(&victim).await;
    tokio::time::sleep(TAIL).await;
    let killed = fleet.tally.snapshot();
    phases.push(("pod SIGKILLed", killed.since(&rolled)));
    fleet.stop().await;
    Measured {
        mode,
        opened_per_second,
        cpu_per_call,
        rss_per_session,
        phases,
    }
}

fn print_report(sessions: usize, results: &[Measured]) {
    let connections = sessions / SESSIONS_PER_CONNECTION;
    println!();
    println!(
        "gateway benchmark: {sessions} sessions over {connections} connections, the unannotated echo tool ({TOOL_DELAY_MS} ms) at {:.0} calls/s in all; 3 backend pods rolled, then one SIGKILLed",
        sessions as f64 / SESSION_PERIOD.as_secs_f64()
    );
    println!(
        "{:<8} {:<15} {:>7} {:>7} {:>5} {:>11} {:>10}  failures",
        "mode", "phase", "calls", "failed", "lost", "reconnects", "slowest s"
    );
    for measured in results {
        for (phase, counts) in &measured.phases {
            let failures: Vec<String> = counts
                .failures
                .iter()
                .map(|(why, n)| format!("{n} {why}"))
                .collect();
            println!(
                "{:<8} {:<15} {:>7} {:>7} {:>5} {:>11} {:>10.2}  {}",
                mode_name(measured.mode),
                phase,
                counts.calls,
                counts.failed,
                counts.lost,
                counts.reconnects,
                counts.slowest.as_secs_f64(),
                failures.join("; ")
            );
        }
    }
    println!();
    println!(
        "{:<8} {:>15} {:>12} {:>15}",
        "mode", "sessions/s open", "cpu us/call", "rss B/session"
    );
    for measured in results {
        println!(
            "{:<8} {:>15.0} {:>12.1} {:>15}",
            mode_name(measured.mode),
            measured.opened_per_second,
            measured.cpu_per_call.as_secs_f64() * 1e6,
            measured.rss_per_session
        );
    }
    if let [sidecar, gateway] = results {
        println!(
            "gateway / sidecar: cpu per call {:.2}x, memory per session {:.2}x (the proxies of the 3 pods against the 2 gateway replicas, each in all)",
            gateway.cpu_per_call.as_secs_f64() / sidecar.cpu_per_call.as_secs_f64().max(1e-9),
            gateway.rss_per_session as f64 / sidecar.rss_per_session.max(1) as f64
        );
    }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Sidecar(_) => "sidecar",
        Mode::Gateway => "gateway",
    }
}

/// What the fleet saw so far.
#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    failed: AtomicU64,
    lost: AtomicU64,
    reconnects: Arc<AtomicU64>,
    slowest_us: AtomicU64,
    /// Failed calls by what the client saw.
    failures: Mutex<BTreeMap<String, u64>>,
}

/// [`Tally`] at one moment; the slowest call since the last one.
#[derive(Debug, Clone, Default)]
struct Counts {
    calls: u64,
    failed: u64,
    lost: u64,
    reconnects: u64,
    slowest: Duration,
    failures: BTreeMap<String, u64>,
}

impl Tally {
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        *self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(why)
            .or_default() += 1;
    }

    /// The counts so far; the slowest call restarts from here.
    fn snapshot(&self) -> Counts {
        Counts {
            calls: self.calls.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            slowest: Duration::from_micros(self.slowest_us.swap(0, Ordering::Relaxed)),
            failures: self
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

impl Counts {
    fn since(&self, earlier: &Counts) -> Counts {
        let mut failures = self.failures.clone();
        for (why, n) in &earlier.failures {
            if let Some(now) = failures.get_mut(why) {
                *now -= n;
            }
        }
        failures.retain(|_, n| *n > 0);
        Counts {
            calls: self.calls - earlier.calls,
            failed: self.failed - earlier.failed,
            lost: self.lost - earlier.lost,
            reconnects: self.reconnects - earlier.reconnects,
            slowest: self.slowest,
            failures,
        }
    }
}

/// The client fleet: connections, each holding `SESSIONS_PER_CONNECTION` sessions of one
/// credential and calling them in turn.
struct Fleet {
    tally: Arc<Tally>,
    /// `false` until the calls start, `true` to stop them.
    calling: watch::Sender<Option<bool>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// Opens `sessions` through `address`; returns once all are open.
    async fn open(address: std::net::SocketAddr, sessions: usize) -> Self {
        let connections = sessions / SESSIONS_PER_CONNECTION;
        let tally = Arc::new(Tally::default());
        let (calling, _) = watch::channel(None);
        let opened = Arc::new(tokio::sync::Barrier::new(connections + 1));
        // Each connection calls once per `period`, the connections staggered over it.
        let period = SESSION_PERIOD / SESSIONS_PER_CONNECTION as u32;
        let workers = (0..connections)
            .map(|n| {
                let mut client = Client {
                    connection: Connection::new(
                        address,
                        format!("Bearer bench-{n}"),
                        tally.reconnects.clone(),
                    ),
                    tally: tally.clone(),
                };
                let opened = opened.clone();
                let mut calling = calling.subscribe();
                let offset = period.mul_f64(n as f64 / connections as f64);
                tokio::spawn(async move {
                    let mut sessions = Vec::with_capacity(SESSIONS_PER_CONNECTION);
                    for _ in 0..SESSIONS_PER_CONNECTION {
                        sessions.push(client.connection.open_session().await);
                    }
                    opened.wait().await;
                    if calling.wait_for(Option::is_some).await.is_err() {
                        return;
                    }
                    let mut ticks =
                        tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    for n in 0_u64.. {
                        tokio::select! {
                            _ = ticks.tick() => {}
                            _ = calling.wait_for(|c| *c == Some(true)) => return,
                        }
                        let at = n as usize % sessions.len();
                        if client.call(&sessions[at], n).await == Called::SessionGone {
                            sessions[at] = client.connection.open_session().await;
                        }
                    }
                })
            })
            .collect();
        opened.wait().await;
        Self {
            tally,
            calling,
            workers,
        }
    }

    fn start(&self) {
        self.calling.send_replace(Some(false));
    }

    async fn stop(self) {
        self.calling.send_replace(Some(true));
        for worker in self.workers {
            let _ = worker.await;
        }
    }
}

/// One connection of the fleet and the tally it counts in.
struct Client {
    connection: Connection,
    tally: Arc<Tally>,
}

#[derive(Debug, PartialEq, Eq)]
enum Called {
    Answered,
    Failed,
    SessionGone,
}

impl Client {
    /// Calls the echo tool in `session`, counting what became of it.
    async fn call(&mut self, session: &str, n: u64) -> Called {
        let text = n.to_string();
        let call = json!({"jsonrpc": "2.0", "id": n, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": text, "delay_ms": TOOL_DELAY_MS}}});
        let started = Instant::now();
        let sent = self.connection.send(Some(session), &call).await;
        let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.tally.slowest_us.fetch_max(took, Ordering::Relaxed);
        self.tally.calls.fetch_add(1, Ordering::Relaxed);
        match sent {
            Sent::Answered(StatusCode::OK, _, body) => {
                let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                if answer["result"]["content"][0]["text"] == text.as_str() {
                    return Called::Answered;
                }
                let why = match answer["error"]["message"].as_str() {
                    // The proxy's answer for a call its server took and never answered.
                    Some(m) if m.contains("may have been executed") => {
                        "in flight on a server that went, answered \"may have been executed\""
                            .to_owned()
                    }
                    Some(m) => format!("error: {m:.80}"),
                    None => "a wrong answer".to_owned(),
                };
                self.tally.fail(why);
                Called::Failed
            }
            Sent::Answered(StatusCode::NOT_FOUND, ..) => {
                self.tally.lost.fetch_add(1, Ordering::Relaxed);
                self.tally.fail("404, session lost".to_owned());
                Called::SessionGone
            }
            Sent::Answered(status, ..) => {
                self.tally.fail(format!("status {}", status.as_u16()));
                Called::Failed
            }
            Sent::Unanswered(why) => {
                self.tally.fail(why);
                Called::Failed
            }
        }
    }
}
