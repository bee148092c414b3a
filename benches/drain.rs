//! How long a rollout takes, and what it holds in memory, under drain strategy `Wait` against
//! `Move`, for servers that keep state per session: `scripts/bench.sh drain`, or
//! `cargo bench --bench drain` where the tests' set-up ran (their Kubernetes control plane,
//! `MCP_TEST_KUBE_BIN`, and their Python, `MCP_TEST_PYTHON`); `-- --quick` for shorter sessions.
//!
//! Each strategy runs in each mode on a test bed of its own (tests/support/bed.rs: the control
//! plane, the operator and its webhook, a real kubelet on containerd, kube-proxy, a real
//! redis-server): a Deployment of 3 pods of the Python SDK test server (tests/mcp/server.py),
//! each with the proxy the webhook injects (sidecar mode), or behind the policy's 2-replica
//! gateway, with the hold the webhook injects under `Wait` (gateway mode). A fleet of users written here calls the server's `count` tool, whose
//! answer is how many times the session has called it (state kept in the server's memory),
//! once a second; each user's sessions last one of [`LENGTHS`] (evenly spread, the users'
//! starts staggered over it), and end with `DELETE`, and the user opens the next at once.
//! After a steady phase as long as the longest session, `kubectl set image` on the Deployment;
//! the rollout lasts until the last old pod is gone.
//!
//! It prints, per strategy and phase: how long the rollout took, the pods' resident memory
//! (servers and proxies: steady, and at its peak during the rollout), the calls, the failed
//! ones, the state resets (a count that started again within a session: its state did not
//! follow it) and the sessions lost (a `404`, after which the user opens a new one).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::client::{Connection, Sent};
use common::usage::rss_bytes;
use kube::ResourceExt as _;
use mcp_session_operator::api::Sidecar;
use serde_json::{Value, json};
use support::bed::{BACKEND_PORT, Backend, Bed, Mode, V1, V2};
use support::operator::PROXY_IMAGE;
use tokio::sync::watch;

/// How long sessions last, a third of the users each.
const LENGTHS: [Duration; 3] = [
    Duration::from_secs(30),
    Duration::from_secs(60),
    Duration::from_secs(120),
];
const QUICK_LENGTHS: [Duration; 3] = [
    Duration::from_secs(10),
    Duration::from_secs(20),
    Duration::from_secs(40),
];
/// Users per session length.
const USERS_PER_LENGTH: usize = 10;
const CALL_PERIOD: Duration = Duration::from_secs(1);
/// How often the pods' memory is read during the rollout.
const SAMPLE_PERIOD: Duration = Duration::from_millis(500);

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let lengths = if quick { QUICK_LENGTHS } else { LENGTHS };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(lengths));
}

async fn run(lengths: [Duration; 3]) {
    let mut results = Vec::new();
    for mode in [Mode::Sidecar(Sidecar::Native), Mode::Gateway] {
        for strategy in ["Move", "Wait"] {
            results.push(scenario(mode, strategy, lengths).await);
        }
    }
    print_report(lengths, &results);
}

/// What one strategy measured in one mode.
struct Measured {
    mode: Mode,
    strategy: &'static str,
    rollout: Duration,
    steady_memory: u64,
    peak_memory: u64,
    steady: Counts,
    rolling: Counts,
}

async fn scenario(mode: Mode, strategy: &'static str, lengths: [Duration; 3]) -> Measured {
    let prefix = format!(
        "bench-drain-{}-{}",
        mode_name(mode),
        strategy.to_lowercase()
    );
    eprintln!("{prefix}: starting the test bed");
    let port = BACKEND_PORT.to_string();
    // JSON answers, which the fleet reads whole.
    let serve: &[&str] = &[&port, "--host", "0.0.0.0", "--json"];
    let backend = Backend {
        images: support::images::python_server(&[(V1, serve), (V2, serve)]),
        liveness: None,
    };
    let longest = lengths.iter().max().copied().unwrap_or_default();
    // Long enough that no session of the steady phase is cut.
    let max_wait = (longest * 3).as_secs();
    let drain =
        json!({"drain": {"timeoutSeconds": 20, "strategy": strategy, "maxWaitSeconds": max_wait}});
    let bed = Bed::start_with(&prefix, drain, mode, &backend).await;
    let memory = || {
        [V1, V2, PROXY_IMAGE]
            .iter()
            .flat_map(|image| bed.node.pids_of_image(image))
            .map(rss_bytes)
            .sum::<u64>()
    };

    let fleet = Fleet::start(bed.entry(), lengths);
    eprintln!("{prefix}: users calling; steady for {longest:?}");
    tokio::time::sleep(longest).await;
    let steady_start = fleet.tally.snapshot();
    let steady_memory = memory();
    tokio::time::sleep(longest.min(Duration::from_secs(20))).await;
    let steady = fleet.tally.snapshot().since(&steady_start);

    eprintln!("{prefix}: rolling the backend");
    let old: Vec<String> = bed.pods().await.iter().map(|p| p.name_any()).collect();
    let before = fleet.tally.snapshot();
    let started = Instant::now();
    bed.set_image(V2).await;
    let mut peak_memory = 0;
    loop {
        peak_memory = peak_memory.max(memory());
        let now: Vec<String> = bed.pods().await.iter().map(|p| p.name_any()).collect();
        if !old.iter().any(|name| now.contains(name)) {
            break;
        }
        tokio::time::sleep(SAMPLE_PERIOD).await;
    }
    let rollout = started.elapsed();
    let rolling = fleet.tally.snapshot().since(&before);
    fleet.stop().await;
    eprintln!("{prefix}: rolled out in {rollout:?}");
    Measured {
        mode,
        strategy,
        rollout,
        steady_memory,
        peak_memory,
        steady,
        rolling,
    }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Sidecar(_) => "sidecar",
        Mode::Gateway => "gateway",
    }
}

fn print_report(lengths: [Duration; 3], results: &[Measured]) {
    let lengths: Vec<String> = lengths
        .iter()
        .map(|l| format!("{} s", l.as_secs()))
        .collect();
    println!();
    println!(
        "drain benchmark: {} users, sessions of {} (a third each), a stateful call a second each; 3 pods of the Python SDK server rolled",
        USERS_PER_LENGTH * 3,
        lengths.join(", ")
    );
    println!(
        "{:<8} {:<9} {:<15} {:>10} {:>11} {:>7} {:>7} {:>7} {:>5}",
        "mode", "strategy", "phase", "rollout s", "memory MiB", "calls", "failed", "resets", "lost"
    );
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    for measured in results {
        let rows = [
            ("steady", None, measured.steady_memory, &measured.steady),
            (
                "rolling update",
                Some(measured.rollout),
                measured.peak_memory,
                &measured.rolling,
            ),
        ];
        for (phase, rollout, memory, counts) in rows {
            println!(
                "{:<8} {:<9} {:<15} {:>10} {:>11.0} {:>7} {:>7} {:>7} {:>5}",
                mode_name(measured.mode),
                measured.strategy,
                phase,
                rollout.map_or("-".to_owned(), |r| format!("{:.1}", r.as_secs_f64())),
                mib(memory),
                counts.calls,
                counts.failed,
                counts.resets,
                counts.lost
            );
        }
    }
    for pair in results.chunks(2) {
        if let [moved, waited] = pair {
            println!(
                "{}: Wait / Move: rollout {:.1}x, peak memory during it {:.2}x",
                mode_name(moved.mode),
                waited.rollout.as_secs_f64() / moved.rollout.as_secs_f64().max(1e-9),
                waited.peak_memory as f64 / moved.peak_memory.max(1) as f64
            );
        }
    }
}

/// What the fleet saw so far.
#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    failed: AtomicU64,
    resets: AtomicU64,
    lost: AtomicU64,
    reconnects: Arc<AtomicU64>,
}

/// [`Tally`] at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    calls: u64,
    failed: u64,
    resets: u64,
    lost: u64,
}

impl Tally {
    fn snapshot(&self) -> Counts {
        Counts {
            calls: self.calls.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            resets: self.resets.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
        }
    }
}

impl Counts {
    fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            calls: self.calls - earlier.calls,
            failed: self.failed - earlier.failed,
            resets: self.resets - earlier.resets,
            lost: self.lost - earlier.lost,
        }
    }
}

/// The users, each on a connection and credential of its own.
struct Fleet {
    tally: Arc<Tally>,
    stop: watch::Sender<bool>,
    users: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    fn start(address: std::net::SocketAddr, lengths: [Duration; 3]) -> Self {
        let tally = Arc::new(Tally::default());
        let (stop, _) = watch::channel(false);
        let users = (0..USERS_PER_LENGTH * 3)
            .map(|n| {
                let length = lengths[n % 3];
                // The users of one length start spread over it, so that sessions end all
                // the time.
                let offset = length.mul_f64((n / 3) as f64 / USERS_PER_LENGTH as f64);
                let connection = Connection::new(
                    address,
                    format!("Bearer drain-{n}"),
                    tally.reconnects.clone(),
                );
                let user = User {
                    connection,
                    tally: tally.clone(),
                };
                tokio::spawn(user.run(length, offset, stop.subscribe()))
            })
            .collect();
        Self { tally, stop, users }
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        for user in self.users {
            let _ = user.await;
        }
    }
}

/// One user: sessions of one length, one after the other.
struct User {
    connection: Connection,
    tally: Arc<Tally>,
}

impl User {
    async fn run(mut self, length: Duration, offset: Duration, mut stop: watch::Receiver<bool>) {
        tokio::select! {
            () = tokio::time::sleep(offset) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        while !*stop.borrow() {
            let session = self.connection.open_session().await;
            let ends = Instant::now() + length;
            let mut expected = 1_u64;
            while Instant::now() < ends && !*stop.borrow() {
                match self.count(&session, expected).await {
                    Some(count) => expected = count + 1,
                    None => break,
                }
                tokio::select! {
                    () = tokio::time::sleep(CALL_PERIOD) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            }
            let _ = self.connection.end_session(&session).await;
        }
    }

    /// Calls `count` in `session`, expecting `expected`: the count it answered (a reset
    /// counted where it is another), or `None` once the session is lost.
    async fn count(&mut self, session: &str, expected: u64) -> Option<u64> {
        let call = json!({"jsonrpc": "2.0", "id": expected, "method": "tools/call",
            "params": {"name": "count", "arguments": {}}});
        self.tally.calls.fetch_add(1, Ordering::Relaxed);
        match self.connection.send(Some(session), &call).await {
            Sent::Answered(StatusCode::OK, _, body) => {
                let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let count = answer["result"]["content"][0]["text"]
                    .as_str()
                    .and_then(|text| text.parse::<u64>().ok());
                match count {
                    // Higher: a call whose answer was lost ran. Lower: the state started again.
                    Some(count) => {
                        if count < expected {
                            self.tally.resets.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(count)
                    }
                    None => {
                        self.tally.failed.fetch_add(1, Ordering::Relaxed);
                        Some(expected - 1)
                    }
                }
            }
            Sent::Answered(StatusCode::NOT_FOUND, ..) => {
                self.tally.lost.fetch_add(1, Ordering::Relaxed);
                None
            }
            Sent::Answered(..) | Sent::Unanswered(_) => {
                self.tally.failed.fetch_add(1, Ordering::Relaxed);
                Some(expected - 1)
            }
        }
    }
}
