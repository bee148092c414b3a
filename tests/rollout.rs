//! Session-aware rollouts end to end, on the 1.35 control plane and a real node, with every part
//! real: a Deployment of 3 pods, each a container of the Python SDK MCP server's image that the
//! operator's webhook injected with the session proxy (the project's image), scheduled by the
//! scheduler and run by the kubelet on containerd (its probes, the injected preStop hooks, the
//! grace period and the sidecar's order are the kubelet's own); a Service whose ClusterIP
//! kube-proxy routes to the endpoints the EndpointSlice controller publishes; a real
//! redis-server; and 50 real SDK clients (25 Python, 25 TypeScript), each with a session and
//! credential of its own, calling a tool every 200 ms throughout.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures::TryStreamExt as _;
use kube::ResourceExt as _;
use kube::api::{Api, ListParams, Patch, PatchParams};
use mcp_session_operator::api::{RolloutStatus, Sidecar};
use mcp_session_operator::store::{RedisStore, SessionStore, Tallies};
use serde_json::{Value, json};
use support::bed::{APP, Backend, Bed, Mode, REPLICAS, TIMEOUT, V1, V2};
use support::clients::{ClientLine, ClientRun};
use support::wait::{wait_for, wait_until};
use tokio::io::AsyncBufReadExt as _;

/// The tool most clients call: without annotations, as most real tools are.
const UNANNOTATED: &str = "add";
/// The same tool annotated read-only: a call of it may always be sent again.
const READ_ONLY: &str = "add_read_only";
/// Clients per SDK; 50 in all.
const CLIENTS_PER_SDK: usize = 25;
/// A broken new version: it refuses every `initialize`, so stored sessions cannot be replayed.
const V2_REFUSING: &str = "example/mcp-server:2-refuses-initialize";

/// The webhook configurations are cluster-wide: one operator (one test) at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The bed of a scenario, its backend the Python SDK test server.
async fn bed(prefix: &str, rollout: Value, mode: Mode) -> Bed {
    Bed::start(prefix, rollout, mode, &python_server()).await
}

/// The backend's images: the Python SDK test server (tests/mcp/server-image.sh), which
/// [`V2_REFUSING`] runs refusing every `initialize`; alive while `/livez` says so.
fn python_server() -> Backend {
    let serve: &[&str] = &["8000", "--host", "0.0.0.0"];
    let refusing: &[&str] = &["8000", "--host", "0.0.0.0", "--refuse-initialize"];
    Backend {
        images: support::images::python_server(&[
            (V1, serve),
            (V2, serve),
            (V2_REFUSING, refusing),
        ]),
        liveness: Some(LIVENESS_PATH),
    }
}

/// The server's liveness endpoint: 503 once the file [`SICK_FILE`] exists in its container.
const LIVENESS_PATH: &str = "/livez";
const SICK_FILE: &str = "/tmp/sick";

/// The 50 clients: one process per SDK, each running its clients concurrently.
struct Clients {
    stop_file: PathBuf,
    _dir: tempfile::TempDir,
    runs: Vec<tokio::task::JoinHandle<Vec<ClientRun>>>,
    /// The calls each client has made so far, by name.
    calls: tokio::sync::watch::Receiver<BTreeMap<String, u64>>,
}

impl Clients {
    /// Clients of the server at `address` calling `tools` (see tests/mcp/client.py: a
    /// comma-separated list cycles).
    fn start(address: SocketAddr, tools: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let stop_file = dir.path().join("stop");
        let url = format!("http://{address}/mcp");
        let python = std::env::var("MCP_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let ts = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp/ts/client.mjs");
        let py = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp/client.py");
        let (calls, calls_now) = tokio::sync::watch::channel(BTreeMap::new());
        let calls = std::sync::Arc::new(calls);
        let runs = [(python.as_str(), py), ("node", ts)]
            .into_iter()
            .map(|(program, script)| {
                let mut child = tokio::process::Command::new(program)
                    .args([script, url.as_str(), "600", "0.2", "Bearer rollout-client"])
                    .env("MCP_TEST_CLIENTS", CLIENTS_PER_SDK.to_string())
                    .env("MCP_TEST_STOP_FILE", &stop_file)
                    .env("MCP_TEST_TOOL_DELAY", "0.02")
                    .env("MCP_TEST_TOOL", tools)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .kill_on_drop(true)
                    .spawn()
                    .unwrap_or_else(|e| panic!("start {program} {script}: {e}"));
                let calls = calls.clone();
                tokio::spawn(async move {
                    let stdout = child.stdout.take().expect("stdout");
                    let mut lines = tokio::io::BufReader::new(stdout).lines();
                    let mut runs = Vec::new();
                    while let Ok(Some(line)) = lines.next_line().await {
                        match ClientLine::parse(&line) {
                            Some(ClientLine::Summary(run)) => runs.push(run),
                            Some(ClientLine::Called { called }) => {
                                calls.send_modify(|calls| *calls.entry(called).or_default() += 1)
                            }
                            None => eprintln!("client output that is no report: {line:.300}"),
                        }
                    }
                    let _ = child.wait().await;
                    runs
                })
            })
            .collect();
        Self {
            stop_file,
            _dir: dir,
            runs,
            calls: calls_now,
        }
    }

    /// Waits until every client has made its first call: the scenario then disrupts clients
    /// in their steady state, none still in its handshake.
    async fn wait_calling(&self) {
        self.wait_each_called_since(&BTreeMap::new(), "made a call")
            .await;
    }

    /// Waits until every client has called again since now: the calls that follow what the
    /// scenario did (a rollout, a restart) went through.
    async fn wait_calling_on(&self) {
        let now = self.calls.borrow().clone();
        self.wait_each_called_since(&now, "called again").await;
    }

    async fn wait_each_called_since(&self, before: &BTreeMap<String, u64>, what: &str) {
        let all = 2 * CLIENTS_PER_SDK;
        let called_since = |calls: &BTreeMap<String, u64>| {
            calls
                .iter()
                .filter(|(name, n)| **n > before.get(*name).copied().unwrap_or(0))
                .count()
        };
        let mut calls = self.calls.clone();
        let waited =
            tokio::time::timeout(TIMEOUT, calls.wait_for(|calls| called_since(calls) >= all)).await;
        assert!(
            waited.is_ok_and(|w| w.is_ok()),
            "{} of {all} clients {what} within {TIMEOUT:?}",
            called_since(&self.calls.borrow())
        );
    }

    /// Tells the clients to stop; their reports.
    async fn stop(self) -> Vec<ClientRun> {
        std::fs::write(&self.stop_file, b"").expect("stop file");
        let mut all = Vec::new();
        for run in self.runs {
            all.extend(run.await.expect("client reader"));
        }
        all
    }
}

/// Waits until the store holds a session for every client (the proxies store a new session
/// in the background, and count it on their next tally).
async fn wait_sessions_stored(bed: &Bed) {
    let store = bed.store().await;
    let all = 2 * CLIENTS_PER_SDK as u64;
    wait_until(TIMEOUT, "every client's session stored", || async {
        match store.counts().await {
            Ok(counts) if counts.total >= all => Ok(()),
            Ok(counts) => Err(format!("{} of {all}", counts.total)),
            Err(error) => Err(error.to_string()),
        }
    })
    .await;
}

/// Totals over the clients' reports, printed for docs/rollouts.md.
fn report(scenario: &str, runs: &[ClientRun]) -> (u64, usize) {
    let calls: u64 = runs.iter().map(|r| r.calls).sum();
    let errors: usize = runs.iter().map(|r| r.errors.len()).sum();
    let slowest = runs
        .iter()
        .map(|r| r.slowest_call_seconds)
        .fold(0.0, f64::max);
    let python = runs.iter().filter(|r| r.name.starts_with("python")).count();
    eprintln!(
        "{scenario}: {} clients ({python} Python, {} TypeScript), {calls} calls, {errors} errors, slowest call {slowest:.2} s",
        runs.len(),
        runs.len() - python
    );
    (calls, errors)
}

/// No client saw an error: every failed call listed, by client.
fn assert_no_client_error(runs: &[ClientRun]) {
    let errors: Vec<(&str, &String)> = runs
        .iter()
        .flat_map(|r| r.errors.iter().map(|e| (r.name.as_str(), e)))
        .collect();
    assert_eq!(errors, Vec::<(&str, &String)>::new(), "no client error");
}

/// Every client reported, kept one session id throughout and completed calls; for one that did
/// not, what the bed's proxies logged about its sessions.
fn assert_every_client_kept_its_session(bed: &Bed, runs: &[ClientRun]) {
    assert_eq!(runs.len(), 2 * CLIENTS_PER_SDK, "every client reported");
    for run in runs {
        assert!(
            run.session_ids.len() == 1 && run.calls > 0,
            "{}: one session id throughout, and calls made: {run:?}\nwhat the proxies logged about its sessions:\n{}",
            run.name,
            bed.proxy_log_about(&run.session_ids)
        );
    }
}

/// The issue's scenario: `kubectl set image` on the Deployment while 50 clients call tools.
/// The rollout runs to completion with no client error; every client keeps its session id;
/// every drained session is rehydrated and none is lost; the metrics say the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_update_under_50_clients_loses_no_session_and_no_call() {
    rolling_update("e2e-roll", Sidecar::Native).await;
}

/// The same through classic sidecars: the proxy a container beside the server, stopped with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_update_through_classic_sidecars_loses_no_session_and_no_call() {
    rolling_update("e2e-roll-classic", Sidecar::Classic).await;
}

async fn rolling_update(prefix: &str, sidecar: Sidecar) {
    let _serial = SERIAL.lock().await;
    let bed = bed(prefix, json!({}), Mode::Sidecar(sidecar)).await;
    let clients = Clients::start(bed.entry(), UNANNOTATED);
    clients.wait_calling().await;
    // Every proxy fingerprints credentials with the key from the policy's Secret.
    let key = mcp_session_operator::proxy::Fingerprinter::new(
        b"rollout-test-key",
        mcp_session_operator::store::binding::SessionBinding::Identity,
    )
    .expect("any key");
    let expected: std::collections::BTreeSet<String> = (0..CLIENTS_PER_SDK)
        .filter_map(|i| key.fingerprint(Some(format!("Bearer rollout-client-{i}").as_bytes())))
        .collect();
    let store = bed.store().await;
    wait_until(
        TIMEOUT,
        "every client's session stored under the policy's key",
        || async {
            let stored: std::collections::BTreeSet<String> =
                mcp_session_operator::store::list_all(&store, 100)
                    .try_collect::<Vec<_>>()
                    .await
                    .map_err(|error| error.to_string())?
                    .into_iter()
                    .filter_map(|listed| match listed {
                        mcp_session_operator::store::Listed::Session(s) => {
                            s.record.credential_fingerprint
                        }
                        mcp_session_operator::store::Listed::Unreadable(_) => None,
                    })
                    .collect();
            if stored == expected {
                Ok(())
            } else {
                Err(format!("{} fingerprints: {stored:?}", stored.len()))
            }
        },
    )
    .await;

    bed.set_image(V2).await;
    let rollout = bed.settled_rollout().await;
    // Calls go on against the new pods.
    clients.wait_calling_on().await;
    let runs = clients.stop().await;
    report("rolling update", &runs);
    eprintln!("lastRollout: {rollout:?}");
    for run in runs
        .iter()
        .filter(|r| !r.errors.is_empty() || r.session_ids.len() != 1)
    {
        eprintln!("{run:?}");
    }

    assert_no_client_error(&runs);
    assert_every_client_kept_its_session(&bed, &runs);
    assert!(rollout.drained > 0, "{rollout:?}");
    assert_eq!(rollout.rehydrated, rollout.drained, "{rollout:?}");
    assert_eq!(rollout.lost, 0, "{rollout:?}");
    let pods = bed.pods().await;
    assert_eq!(pods.len(), REPLICAS, "the rollout's pods");
    assert!(
        pods.iter().all(|p| p
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .any(|c| c.image.as_deref() == Some(V2))),
        "every pod runs the new version"
    );
    assert_the_counters_say_what_the_rollout_says(&bed, &rollout).await;
}

/// A pod SIGKILLed mid-traffic (no hook runs; then it is force-deleted, as when its node is
/// lost): the operator sweeps its sessions to draining, the other pods claim them as their
/// clients come back, and none is lost. What no server can prevent, since the pod's TCP
/// connections are reset: a call in flight on it fails, a Python SDK client whose listening
/// stream was on it dies with it (the SDK ends the client when that stream breaks), and a
/// TypeScript call whose response stream was cut waits for the SDK's own timeout (60 s). Nor
/// can it prevent what the Service does until the dead pod leaves kube-proxy's rules (the
/// endpoint's removal, then kube-proxy's next sync): a call on a new connection that kube-proxy
/// sends to the dead pod's address is refused. Every client keeps the one session it had, and
/// every failed call was sent before kube-proxy stopped routing to the dead pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_pods_sessions_are_swept_and_rehydrated() {
    let _serial = SERIAL.lock().await;
    let bed = bed("e2e-kill", json!({}), Mode::Sidecar(Sidecar::Native)).await;
    let clients = Clients::start(bed.entry(), UNANNOTATED);
    clients.wait_calling().await;
    wait_sessions_stored(&bed).await;

    let store = bed.store().await;
    let counts = store.counts().await.expect("counts");
    let victim = counts
        .per_pod
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(pod, _)| pod.clone())
        .expect("a pod owns sessions");
    let victim_ip = bed
        .pods()
        .await
        .iter()
        .find(|p| p.name_any() == victim)
        .and_then(|p| mcp_session_operator::api::pod::ip(p).map(str::to_owned))
        .expect("the victim's address");
    // Only a drain or a sweep moves an active session off its pod, so these are the sessions
    // the sweep will find, less any a client ends itself before it (below).
    let victims_sessions = store
        .sessions_of_pod(&victim, 10_000)
        .await
        .expect("the victim's sessions");
    let owned = victims_sessions.len() as u64;
    let killed = chrono::Utc::now();
    bed.kill_pod(&victim).await;
    let unrouted = bed.node.wait_unrouted(&victim_ip).await;
    eprintln!(
        "kube-proxy sent connections to the dead pod for {} ms after the kill",
        (unrouted - killed).num_milliseconds()
    );

    wait_for(TIMEOUT, "the killed pod's sessions swept", || async {
        bed.counter("mcp_session_drains_total", r#",by="sweep""#)
            .await
            > 0
    })
    .await;
    bed.wait_replaced(&victim).await;
    // Each swept session is claimed by the next pod its client reaches, or, where a pod serves
    // it already, at that pod's next touch of it (within the proxies' touch interval, 10 s).
    let swept_at = std::time::Instant::now();
    let mut draining = u64::MAX;
    while draining > 0 && swept_at.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        draining = store.counts().await.map_or(draining, |c| c.draining);
    }
    eprintln!(
        "{draining} swept sessions unclaimed {:.1} s after the sweep",
        swept_at.elapsed().as_secs_f64()
    );
    let runs = clients.stop().await;
    for run in runs.iter().filter(|r| !r.errors.is_empty()) {
        eprintln!("{run:?}");
    }
    let (_, errors) = report("a pod SIGKILLed", &runs);
    let swept = bed
        .counter("mcp_session_drains_total", r#",by="sweep""#)
        .await;
    let rehydrated = bed.counter("mcp_session_rehydrations_total", "").await;
    eprintln!(
        "{victim} owned {owned} sessions; swept {swept}, rehydrated {rehydrated}, {errors} failed calls"
    );

    let crashed = runs
        .iter()
        .filter(|r| r.errors.iter().any(|e| e.starts_with("client crashed")))
        .count();
    eprintln!("{crashed} clients ended by the SDK when their stream was reset");
    assert_eq!(runs.len(), 2 * CLIENTS_PER_SDK, "every client reported");
    // A connection kube-proxy had begun to set up when its rules changed may still be refused.
    let routed_until = unrouted + chrono::Duration::milliseconds(500);
    for run in &runs {
        assert_eq!(run.session_ids.len(), 1, "one session id: {run:?}");
        let sent = run.failed_calls_sent();
        // The SDK ending a client is no call of its own: at most once.
        assert!(sent.iter().filter(|s| s.is_none()).count() <= 1, "{run:?}");
        assert!(
            sent.iter().flatten().all(|sent| *sent <= routed_until),
            "a call failed that was sent after kube-proxy stopped routing to the dead pod \
             ({unrouted}): {run:?}"
        );
    }
    // A Python SDK client the kill ended closes its session on the way out (a DELETE, which
    // another pod serves): that session may be gone before the sweep. Every other one is swept.
    let ended_by_their_client = victims_sessions
        .iter()
        .filter(|id| {
            runs.iter().any(|r| {
                r.session_ids.contains(&id.to_string())
                    && r.errors.iter().any(|e| e.starts_with("client crashed"))
            })
        })
        .count() as u64;
    assert!(
        swept <= owned && swept + ended_by_their_client >= owned,
        "every session of the killed pod swept: {swept} of {owned}, \
         {ended_by_their_client} of them ended by their crashed client"
    );
    assert_eq!(
        store
            .sessions_of_pod(&victim, 10_000)
            .await
            .expect("sessions"),
        Vec::new(),
        "the killed pod owns no session"
    );
    assert_eq!(bed.counter("mcp_sessions_lost_total", "").await, 0);
    assert!(
        rehydrated > 0 && rehydrated <= swept,
        "swept sessions rehydrated as their clients came back: {rehydrated} of {swept}"
    );
}

/// A rolling update in gateway mode, under 50 clients, every other one calling the tool
/// annotated read-only: each old pod, once terminating, gets no new requests, and its sessions
/// move to the other pods by replay. No client ends or changes its session and no read-only
/// call fails. The backends have no preStop hook here (nothing is injected): a server that ends
/// the calls it is running when SIGTERM comes (the Python SDK's does) fails those of them that
/// may not be sent again, with an answer that says so, and only those.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_update_through_a_gateway_loses_no_session_and_no_read_only_call() {
    let scenario = ThroughAGateway::start("e2e-gw-roll").await;
    let gateway = scenario.gateway();
    let replays_before = gateway.counter("mcp_proxy_replays_total", "replayed").await;
    scenario.bed.set_image(V2).await;
    scenario.bed.wait_rolled_out(V2).await;
    // Every old pod goes: a session moved onto an old pod may be caught again.
    let (bed, _) = scenario.finish("rolling update", REPLICAS).await;
    let gateway = bed.gateway.as_ref().expect("gateway mode");
    let replayed = gateway.counter("mcp_proxy_replays_total", "replayed").await - replays_before;
    assert!(
        replayed >= 2 * CLIENTS_PER_SDK as u64,
        "every session left its old pod: {replayed} replays"
    );
    // The rollout's counts, as in sidecar mode: each session its gateway moved off an old pod
    // is drained and rehydrated (counted by the replica that owns it), none lost. A session
    // moves at its client's next request, so the counts go on for 30 s after the pods settle;
    // then the operator's counters say the same.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut rollout = bed.settled_rollout().await;
    loop {
        if counters(&bed).await == counters_after(&rollout) || std::time::Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(latest) = bed.last_rollout().await {
            rollout = latest;
        }
    }
    eprintln!("gateway: rolling update: lastRollout: {rollout:?}");
    assert!(rollout.drained > 0, "{rollout:?}");
    assert_eq!(rollout.rehydrated, rollout.drained, "{rollout:?}");
    assert_eq!(rollout.lost, 0, "{rollout:?}");
    assert_the_counters_say_what_the_rollout_says(&bed, &rollout).await;
}

/// What the operator's counters (drained by proxies, rehydrated, lost) should say after
/// `rollout`: it counts from the store's tallies when it started (its baseline); the counters,
/// from none when the operator started, hold the baseline too.
fn counters_after(rollout: &RolloutStatus) -> (u64, u64, u64) {
    let before = rollout.baseline.clone().unwrap_or_default();
    (
        before.drained + rollout.drained,
        before.rehydrated + rollout.rehydrated,
        before.lost + rollout.lost,
    )
}

async fn counters(bed: &Bed) -> (u64, u64, u64) {
    (
        bed.counter("mcp_session_drains_total", r#",by="proxy""#)
            .await,
        bed.counter("mcp_session_rehydrations_total", "").await,
        bed.counter("mcp_sessions_lost_total", "").await,
    )
}

async fn assert_the_counters_say_what_the_rollout_says(bed: &Bed, rollout: &RolloutStatus) {
    let counted = counters(bed).await;
    assert_eq!(counted, counters_after(rollout), "{rollout:?}");
    // These tests lose no session at all: none before the rollout either.
    assert_eq!(counted.2, 0, "sessions lost: {rollout:?}");
}

/// The same kill in gateway mode: 50 clients (25 per SDK) connected to a gateway in front of
/// the 3 pods, every other client calling the tool annotated read-only; a backend pod
/// SIGKILLed and force-deleted. The clients' connections end at the gateway, which lives on:
/// its sessions on the killed pod are replayed on the others, no client dies or changes its
/// session, no read-only call fails. An unannotated call in flight on the killed pod may fail
/// (it may have been executed, so it is not sent again), and nothing else does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_backend_pod_costs_a_gateway_s_clients_no_connection_and_no_session() {
    let scenario = ThroughAGateway::start("e2e-gw-kill").await;
    let replays_before = scenario
        .gateway()
        .counter("mcp_proxy_replays_total", "replayed")
        .await;
    let victim = scenario.bed.pods().await.first().expect("a pod").name_any();
    scenario.bed.kill_pod(&victim).await;
    scenario.bed.wait_replaced(&victim).await;
    let (bed, _) = scenario.finish("a backend pod SIGKILLed", 1).await;
    let gateway = bed.gateway.as_ref().expect("gateway mode");
    let replayed = gateway.counter("mcp_proxy_replays_total", "replayed").await - replays_before;
    assert!(replayed > 0, "the killed pod's sessions moved by replay");
}

/// The gateway's own rollout (`kubectl rollout restart` of its Deployment) under 50 clients,
/// every other one calling the unannotated tool: each old replica, on SIGTERM, finishes what it
/// serves, sends its clients to reconnect (`Connection: close`, its streams ended with a
/// `retry` hint) and hands its sessions over in the store; the replica a client reaches next
/// claims the session and replays it to a backend pod. The backends never stop, so nothing
/// excuses a failure: no call fails, whether it may be sent again or not, no client ends or
/// changes its session, and every session drained is rehydrated while its client calls on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_replica_rolled_under_50_clients_costs_no_call_and_no_session() {
    let scenario = ThroughAGateway::start("e2e-gw-self").await;
    let store = scenario.bed.store().await;
    let before = store.tallies().await.expect("tallies");
    let replicas = scenario.gateway().pod_names().await;
    scenario.gateway().restart().await;
    scenario.gateway().wait_replaced(&replicas).await;
    // A drained session is claimed at its client's next request to a replica that does not
    // serve it yet, or else at the next touch of it by the replica that does (within the
    // proxies' touch interval, 10 s): the clients call on meanwhile.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut tallies = store.tallies().await.expect("tallies");
    while tallies.rehydrated - before.rehydrated < tallies.drained - before.drained
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        tallies = store.tallies().await.expect("tallies");
    }
    let (drained, rehydrated, lost) = (
        tallies.drained - before.drained,
        tallies.rehydrated - before.rehydrated,
        tallies.lost - before.lost,
    );
    let (_, runs) = scenario.finish("a gateway rollout", 0).await;
    eprintln!("gateway rollout: {drained} sessions drained, {rehydrated} rehydrated, {lost} lost");
    assert_no_client_error(&runs);
    assert!(
        drained >= 2 * CLIENTS_PER_SDK as u64,
        "every session drained at least once: {drained}"
    );
    assert_eq!(rehydrated, drained, "every drained session rehydrated");
    assert_eq!(lost, 0);
}

/// A gateway-mode scenario: 50 clients through a gateway in front of 3 pods, every other one
/// calling the tool annotated read-only, every session open before the test disrupts anything.
struct ThroughAGateway {
    _serial: tokio::sync::MutexGuard<'static, ()>,
    bed: Bed,
    clients: Clients,
}

impl ThroughAGateway {
    async fn start(prefix: &str) -> Self {
        let serial = SERIAL.lock().await;
        let bed = bed(prefix, json!({}), Mode::Gateway).await;
        let clients = Clients::start(bed.entry(), &format!("{UNANNOTATED},{READ_ONLY}"));
        clients.wait_calling().await;
        wait_sessions_stored(&bed).await;
        Self {
            _serial: serial,
            bed,
            clients,
        }
    }

    fn gateway(&self) -> &support::bed::Gateway {
        self.bed.gateway.as_ref().expect("gateway mode")
    }

    /// Once every client called again: asserts what a gateway owes its clients when
    /// `pods_gone` backend pods went (see [`assert_only_unsendable_calls_failed`]) and that no
    /// session was lost; the clients' reports.
    async fn finish(self, scenario: &str, pods_gone: usize) -> (Bed, Vec<ClientRun>) {
        self.clients.wait_calling_on().await;
        // Before the clients stop: a client that stops ends its session (DELETE).
        let stored = self.bed.store().await.counts().await.expect("counts").total;
        let runs = self.clients.stop().await;
        let (_, errors) = report(&format!("gateway: {scenario}"), &runs);
        eprintln!("gateway: {scenario}: {errors} failed calls");
        assert_only_unsendable_calls_failed(&self.bed, &runs, pods_gone);
        assert_eq!(stored, 2 * CLIENTS_PER_SDK as u64, "no session lost");
        (self.bed, runs)
    }
}

/// What a gateway owes its clients when `pods_gone` backend pods go: every client reported and
/// kept its one session; no client ended; no read-only call failed; an unannotated call failed
/// only if it was in flight on a pod that went (so at most one per client and pod gone),
/// answered as such.
fn assert_only_unsendable_calls_failed(bed: &Bed, runs: &[ClientRun], pods_gone: usize) {
    for run in runs.iter().filter(|r| !r.errors.is_empty()) {
        eprintln!("{run:?}");
    }
    assert_every_client_kept_its_session(bed, runs);
    for run in runs {
        assert!(
            !run.errors.iter().any(|e| e.starts_with("client crashed")),
            "a client ended: {run:?}"
        );
        match run.tool.as_str() {
            READ_ONLY => assert!(run.errors.is_empty(), "a read-only call failed: {run:?}"),
            _ => {
                assert!(run.errors.len() <= pods_gone, "{run:?}");
                for error in &run.errors {
                    assert!(error.contains("may have been executed"), "{run:?}");
                }
            }
        }
    }
}

/// The kubelet restarts a pod's MCP server in place after its liveness probe fails: the
/// server's preStop hook reaches the pod's proxy, the server gets SIGTERM, a new container
/// starts from the same spec. The pod is not deleted. Beside a native sidecar the hook retires
/// the proxy, and the kubelet starts a fresh one; either way the requests that arrive meanwhile
/// are held, sent to the new server (the sessions' handshakes replayed), and the pod is Ready
/// again; 50 clients calling an unannotated tool see no error and keep their sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_liveness_failure_restarts_the_server_in_place_and_costs_no_call() {
    in_place_restart("e2e-inplace", Sidecar::Native).await;
}

/// The same beside a classic sidecar, which hears of the restart through the server's preStop
/// (a quiesce) and holds requests until the new server serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_liveness_failure_beside_a_classic_sidecar_costs_no_call() {
    in_place_restart("e2e-inplace-classic", Sidecar::Classic).await;
}

async fn in_place_restart(prefix: &str, sidecar: Sidecar) {
    let _serial = SERIAL.lock().await;
    let bed = bed(prefix, json!({}), Mode::Sidecar(sidecar)).await;
    let clients = Clients::start(bed.entry(), UNANNOTATED);
    clients.wait_calling().await;
    wait_sessions_stored(&bed).await;
    let pod = bed.pods().await.first().expect("a pod").name_any();
    let (restarted_in, ready_in) = sicken(&bed, &pod).await;
    clients.wait_calling_on().await;
    let runs = clients.stop().await;
    let (_, errors) = report("a server restarted in place", &runs);
    eprintln!(
        "{pod}'s server restarted in place {:.1} s after it fell sick, Ready again after {:.1} s; \
         {errors} failed calls\n{}",
        restarted_in.as_secs_f64(),
        ready_in.as_secs_f64(),
        bed.node.wide_pods(&bed.ns.name)
    );
    assert_every_client_kept_its_session(&bed, &runs);
    let errors: Vec<&String> = runs.iter().flat_map(|r| r.errors.iter()).collect();
    assert_eq!(errors, Vec::<&String>::new(), "no client error");
}

/// Makes `pod`'s server sick (its liveness probe fails from then on, until the kubelet
/// replaces the container, whose new root has no such file), and follows the kubelet's restart
/// of it in place, the pod staying: how long until the server restarted, and until the pod was
/// ready again.
async fn sicken(bed: &Bed, pod: &str) -> (Duration, Duration) {
    let started = std::time::Instant::now();
    bed.exec(
        pod,
        "server",
        &["python3", "-c", &format!("open('{SICK_FILE}', 'w')")],
    );
    let restarted = |p: &k8s_openapi::api::core::v1::Pod| {
        p.status
            .iter()
            .flat_map(|s| s.container_statuses.iter().flatten())
            .any(|c| c.name == "server" && c.restart_count > 0)
    };
    wait_for(TIMEOUT, "the server restarted by the kubelet", || async {
        bed.pods()
            .await
            .iter()
            .any(|p| p.name_any() == pod && restarted(p))
    })
    .await;
    let restarted_in = started.elapsed();
    wait_for(TIMEOUT, "the pod ready again", || async {
        bed.pods()
            .await
            .iter()
            .any(|p| p.name_any() == pod && mcp_session_operator::api::pod::takes_requests(p))
    })
    .await;
    let ready_in = started.elapsed();
    assert!(
        bed.pods()
            .await
            .iter()
            .any(|p| p.name_any() == pod && p.metadata.deletion_timestamp.is_none()),
        "the pod stays: its server restarted in place"
    );
    (restarted_in, ready_in)
}

/// Redis restarts (SIGKILL, started again on its data) in the middle of a rolling update: the
/// proxies ride out the outage, and no session is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_mid_rollout_loses_no_session() {
    let _serial = SERIAL.lock().await;
    let mut bed = bed("e2e-redis", json!({}), Mode::Sidecar(Sidecar::Native)).await;
    let clients = Clients::start(bed.entry(), UNANNOTATED);
    clients.wait_calling().await;
    wait_sessions_stored(&bed).await;

    bed.set_image(V2).await;
    bed.status_until("the rollout started", |s| s.last_rollout.is_some())
        .await;
    // Once the first old pod drained.
    let store = bed.store().await;
    wait_tally(&store, "a drain reported", |t| t.drained, 1).await;
    // SIGKILL and start again on the same data; waits until it answers.
    tokio::task::block_in_place(|| bed.redis.restart());
    let rollout = bed.settled_rollout().await;
    clients.wait_calling_on().await;
    let runs = clients.stop().await;
    report("Redis restarted mid-rollout", &runs);
    eprintln!("lastRollout: {rollout:?}");

    assert_every_client_kept_its_session(&bed, &runs);
    let errors: Vec<&String> = runs.iter().flat_map(|r| r.errors.iter()).collect();
    assert_eq!(errors, Vec::<&String>::new(), "no client error");
    assert_eq!(rollout.lost, 0, "{rollout:?}");
    assert_eq!(bed.counter("mcp_sessions_lost_total", "").await, 0);
}

/// A new version that refuses the stored sessions' `initialize`: the clients that come back to
/// it lose their sessions, `lost` passes `rollout.maxLostSessions`, and the operator pauses the
/// Deployment; the old pods not yet replaced keep running and serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_that_refuses_the_sessions_is_paused() {
    let _serial = SERIAL.lock().await;
    let bed = bed(
        "e2e-guard",
        json!({"maxLostSessions": 2}),
        Mode::Sidecar(Sidecar::Native),
    )
    .await;
    let clients = Clients::start(bed.entry(), UNANNOTATED);
    clients.wait_calling().await;
    wait_sessions_stored(&bed).await;
    let old_pods: Vec<String> = bed.pods().await.iter().map(|p| p.name_any()).collect();
    // Each new pod counts as available 10 s after it is ready (not 2): the next old pod goes
    // only then, so the rollout cannot finish in the seconds between the first lost sessions
    // and the operator's next count of them, which would leave nothing to pause.
    let slower = json!({"spec": {"minReadySeconds": 10}});
    bed.deployments
        .patch(APP, &PatchParams::default(), &Patch::Merge(&slower))
        .await
        .expect("minReadySeconds");

    bed.set_image(V2_REFUSING).await;
    let guarded = bed
        .status_until("RolloutSafe False", |s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "RolloutSafe" && c.status == "False")
        })
        .await;
    let rollout = guarded.last_rollout.clone().expect("lastRollout");
    let reason = guarded
        .conditions
        .iter()
        .find(|c| c.type_ == "RolloutSafe")
        .map(|c| c.reason.clone());
    assert_eq!(reason.as_deref(), Some("TooManyLostSessions"));
    assert!(rollout.lost > 2, "{rollout:?}");
    assert_eq!(rollout.paused.as_deref(), Some("Deployment/mcp"));
    let paused = bed.deployments.get(APP).await.expect("deployment");
    assert_eq!(paused.spec.paused, Some(true));
    // Paused: the Deployment controller starts no more replacements once it has seen the pause
    // (its observedGeneration reaches the paused spec's generation; a sync begun before it may
    // still land until then). The new ReplicaSet grows no further, and the old one shrinks no
    // further unless the new one was already at full size: a paused Deployment still scales
    // the old ReplicaSet to 0 once a full-size new one is available (Kubernetes' "saturated"
    // rule), so a replacement begun before the pause completes. (How many old pods were
    // replaced before the pause depends on how fast new pods became ready on this machine
    // against how fast clients came back and were counted lost: printed, not asserted.)
    let paused_generation = paused.metadata.generation.expect("a generation");
    let desired = paused.spec.replicas.expect("replicas");
    let observed = || async {
        bed.deployments
            .get(APP)
            .await
            .expect("deployment")
            .status
            .and_then(|s| s.observed_generation)
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while observed().await < paused_generation {
        assert!(
            std::time::Instant::now() < deadline,
            "the Deployment controller never saw the pause"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let old_hash = bed
        .pods()
        .await
        .iter()
        .find(|p| old_pods.contains(&p.name_any()))
        .and_then(|p| p.labels().get("pod-template-hash").cloned())
        .expect("an old pod with its template hash");
    let replica_sets = Api::<k8s_openapi::api::apps::v1::ReplicaSet>::namespaced(
        bed.client().clone(),
        &bed.ns.name,
    );
    // (old, new) ReplicaSet sizes of the Deployment.
    let sizes = || async {
        let mut sizes = (0, 0);
        for replica_set in replica_sets
            .list(&ListParams::default().labels(&format!("app={APP}")))
            .await
            .expect("list ReplicaSets")
            .items
        {
            let replicas = replica_set.spec.replicas.unwrap_or(0);
            if replica_set.labels().get("pod-template-hash") == Some(&old_hash) {
                sizes.0 += replicas;
            } else {
                sizes.1 += replicas;
            }
        }
        sizes
    };
    let (old_at_pause, new_at_pause) = sizes().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (old_later, new_later) = sizes().await;
    let pods = bed.pods().await;
    let surviving: Vec<&String> = old_pods
        .iter()
        .filter(|name| pods.iter().any(|p| &p.name_any() == *name))
        .collect();
    let runs = clients.stop().await;
    let (_, errors) = report("a version refusing the sessions", &runs);
    eprintln!(
        "lastRollout: {rollout:?}; old pods left: {} of 3; {errors} failed calls; \
         ReplicaSets at the pause and 5 s later: old {old_at_pause} -> {old_later}, \
         new {new_at_pause} -> {new_later}",
        surviving.len()
    );
    assert_eq!(runs.len(), 2 * CLIENTS_PER_SDK, "every client reported");
    assert_eq!(
        new_later, new_at_pause,
        "the new ReplicaSet grew after the pause: {new_at_pause} replicas, then {new_later}"
    );
    assert!(
        old_later == old_at_pause || new_at_pause == desired,
        "the old ReplicaSet scaled down after the pause while the new one was not at full size: \
         old {old_at_pause} then {old_later}, new {new_at_pause} of {desired}"
    );
    assert!(
        bed.counter("mcp_sessions_lost_total", "").await >= rollout.lost,
        "metrics agree"
    );
}

/// The tool whose answer depends on the session's earlier calls (tests/mcp/server.py): the
/// server counts them in memory, per session, as servers that keep state do. Each answer must
/// exceed the one before (by more where a call that failed in transit ran), or the client
/// reports a `state reset`: a session replayed to another process answers 1 again.
const STATEFUL: &str = "count";

/// A bed whose policy says drain strategy `Wait` (`max_wait_seconds`), and the 50 clients of
/// its stateful tool, each past its first call and its session stored.
async fn waiting_bed(prefix: &str, mode: Mode, max_wait_seconds: u64) -> (Bed, Clients) {
    waiting_bed_with(prefix, mode, max_wait_seconds, "Fail").await
}

/// [`waiting_bed`] with `onOwnerLost` set.
async fn waiting_bed_with(
    prefix: &str,
    mode: Mode,
    max_wait_seconds: u64,
    on_owner_lost: &str,
) -> (Bed, Clients) {
    let drain = json!({"drain": {"timeoutSeconds": 20, "strategy": "Wait",
                                 "maxWaitSeconds": max_wait_seconds, "onOwnerLost": on_owner_lost}});
    waiting_bed_of(prefix, mode, drain).await
}

/// [`waiting_bed`] of the policy's spec `spec` (JSON merge patch), which says `Wait`.
async fn waiting_bed_of(prefix: &str, mode: Mode, spec: Value) -> (Bed, Clients) {
    let bed = Bed::start_with(prefix, spec, mode, &python_server()).await;
    let clients = Clients::start(bed.entry(), STATEFUL);
    clients.wait_calling().await;
    wait_sessions_stored(&bed).await;
    (bed, clients)
}

/// The names of the pods of the Deployment now.
async fn pod_names(bed: &Bed) -> Vec<String> {
    bed.pods().await.iter().map(|p| p.name_any()).collect()
}

/// Sets the new version and waits until its 3 pods serve; how long that took.
async fn roll_to_v2(bed: &Bed) -> Duration {
    let started = std::time::Instant::now();
    bed.set_image(V2).await;
    wait_for(TIMEOUT, "3 new pods serving", || async {
        serving_on(bed, V2).await.len() == REPLICAS
    })
    .await;
    started.elapsed()
}

/// Until none of `old` is left; how long that took.
async fn wait_gone(bed: &Bed, old: &[String], what: &str) -> Duration {
    let started = std::time::Instant::now();
    wait_for(TIMEOUT, what, || async {
        let pods = pod_names(bed).await;
        !old.iter().any(|name| pods.contains(name))
    })
    .await;
    started.elapsed()
}

/// Whether a client's error says its session was not found (404): what it is told when the
/// state of its session is lost.
fn not_found(error: &str) -> bool {
    error.contains("404") || error.contains("Session not found") || error.contains("Not Found")
}

/// The pods of the Deployment running `image` that take requests.
async fn serving_on(bed: &Bed, image: &str) -> Vec<String> {
    bed.pods()
        .await
        .iter()
        .filter(|p| {
            mcp_session_operator::api::pod::takes_requests(p)
                && p.spec
                    .iter()
                    .flat_map(|s| s.containers.iter())
                    .any(|c| c.image.as_deref() == Some(image))
        })
        .map(|p| p.name_any())
        .collect()
}

/// A client whose state reset without its knowing: one session id throughout, and an answer
/// that is not its call's number.
fn silent_resets(runs: &[ClientRun]) -> Vec<&ClientRun> {
    runs.iter()
        .filter(|r| r.session_ids.len() == 1 && r.errors.iter().any(|e| e.contains("state reset")))
        .collect()
}

/// How many clients were answered 404: told that their session is gone.
fn told(runs: &[ClientRun]) -> usize {
    runs.iter()
        .filter(|r| r.errors.iter().any(|e| not_found(e)))
        .count()
}

/// How many sessions the store names `pod` the owner of; some.
async fn owned_by(store: &RedisStore, pod: &str) -> u64 {
    let owned = store
        .sessions_of_pod(pod, 1_000)
        .await
        .expect("the pod's sessions")
        .len() as u64;
    assert!(owned > 0, "{pod} owns sessions");
    owned
}

/// Waits until the store's tally that `tally` reads reaches `n`.
async fn wait_tally(store: &RedisStore, what: &str, tally: fn(&Tallies) -> u64, n: u64) {
    wait_until(TIMEOUT, what, || async {
        match store.tallies().await {
            Ok(t) if tally(&t) >= n => Ok(()),
            Ok(t) => Err(format!("{} of {n}: {t:?}", tally(&t))),
            Err(error) => Err(error.to_string()),
        }
    })
    .await;
}

/// What a session whose state went with its server must come to, under drain strategy `Wait`:
/// each of the `n` counted lost once (by `lost`), none replayed (`drained`), their clients
/// told, and no client's state reset within its session.
fn assert_lost_and_told(n: u64, (lost, drained): (u64, u64), runs: &[ClientRun]) {
    assert_eq!(lost, n, "each lost session counted once");
    assert_eq!(drained, 0, "nothing replayed");
    assert!(told(runs) > 0, "the clients were told: {runs:?}");
    assert_eq!(
        silent_resets(runs).len(),
        0,
        "no client's state reset within its session: {runs:?}"
    );
}

/// Drain strategy `Wait` under 50 clients (25 per SDK) of a server that keeps state per
/// session: a rolling update replaces every pod, yet each old pod, terminating, keeps serving
/// its sessions (the new pods' proxies forward their requests to it), so that every client's
/// count carries on with no error and one session id throughout; the old pods go once their
/// sessions end (the clients end them), long before `maxWaitSeconds`; nothing was moved or lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_that_keep_state_stay_on_their_pods_through_a_rolling_update() {
    stateful_rolling_update("e2e-wait", Mode::Sidecar(Sidecar::Native)).await;
}

/// The same through classic sidecars: the proxy gets its SIGTERM with the server's preStop,
/// and serves the pod's sessions from then until they end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_that_keep_state_stay_on_their_pods_through_classic_sidecars() {
    stateful_rolling_update("e2e-wait-classic", Mode::Sidecar(Sidecar::Classic)).await;
}

/// The same through the policy's gateway (2 replicas, a Service spreading each client's
/// connections over both): each session is pinned to its pod, which every replica sends it
/// to, in its one upstream session; a terminating pod serves its sessions, held by the hold
/// the webhook injected beside the server, until they end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_that_keep_state_stay_on_their_pods_through_a_gateway() {
    stateful_rolling_update("e2e-gw-wait", Mode::Gateway).await;
}

async fn stateful_rolling_update(prefix: &str, mode: Mode) {
    let _serial = SERIAL.lock().await;
    let (bed, clients) = waiting_bed(prefix, mode, 300).await;
    let old = pod_names(&bed).await;

    let rolled = roll_to_v2(&bed).await;
    let now = pod_names(&bed).await;
    let waiting_pods: Vec<&String> = old.iter().filter(|name| now.contains(name)).collect();
    let status = bed
        .status_until("the old pods' sessions reported waiting", |s| {
            s.sessions.waiting > 0
        })
        .await;
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        bed.node.wide_pods(&bed.ns.name).as_bytes(),
    );
    // Every client calls again, its requests reaching new pods and forwarded to old ones.
    clients.wait_calling_on().await;
    clients.wait_calling_on().await;
    let runs = clients.stop().await;
    let gone = wait_gone(&bed, &old, "the old pods gone once their sessions ended").await;
    eprintln!(
        "Wait ({mode:?}): 3 new pods serving {:.1} s after the update, {} old pods still serving {} sessions then; the old pods gone {:.1} s after the clients ended their sessions",
        rolled.as_secs_f64(),
        waiting_pods.len(),
        status.sessions.waiting,
        gone.as_secs_f64()
    );
    report(
        &format!("rolling update ({mode:?}), drain strategy Wait, stateful tool"),
        &runs,
    );

    assert_no_client_error(&runs);
    assert_every_client_kept_its_session(&bed, &runs);
    assert_eq!(
        waiting_pods.len(),
        REPLICAS,
        "every old pod, terminating, still served its sessions when the new ones were ready"
    );
    let tallies = bed.store().await.tallies().await.expect("tallies");
    let operator_log = std::fs::read_to_string(&bed.operator.log).unwrap_or_default();
    assert_eq!(
        (tallies.drained, tallies.lost),
        (0, 0),
        "no session moved, none lost: {tallies:?}\nwhat the proxies logged of losses:\n{}\nthe operator's:\n{}",
        bed.proxy_log_about(&["lost".to_owned(), "drained".to_owned()]),
        operator_log
            .lines()
            .filter(|line| line.contains("lost") || line.contains("swept"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Under drain strategy `Wait`, the gateway's own rollout (`kubectl rollout restart` of its
/// Deployment): the sessions are their backend pods', not the gateway's, so a replica that
/// stops hands nothing over; the replica a client reaches next finds the session's pod and
/// its upstream session in the store and sends it there. No call fails, no client changes its
/// session, no count starts again, and nothing is drained or lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_rolled_under_wait_sends_every_session_on_to_its_pod() {
    let _serial = SERIAL.lock().await;
    let (bed, clients) = waiting_bed("e2e-gw-wait-self", Mode::Gateway, 300).await;
    let gateway = bed.gateway.as_ref().expect("gateway mode");
    let replicas = gateway.pod_names().await;
    gateway.restart().await;
    gateway.wait_replaced(&replicas).await;
    clients.wait_calling_on().await;
    clients.wait_calling_on().await;
    let runs = clients.stop().await;
    report(
        "the gateway's own rollout, drain strategy Wait, stateful tool",
        &runs,
    );
    assert_no_client_error(&runs);
    assert_every_client_kept_its_session(&bed, &runs);
    let tallies = bed.store().await.tallies().await.expect("tallies");
    assert_eq!(
        (tallies.drained, tallies.lost),
        (0, 0),
        "nothing moved, nothing lost: {tallies:?}"
    );
}

/// The default, drain strategy `Move`, with the same server: a session's requests are served
/// by whichever pod the Service picks, each replaying the handshake to its own process, whose
/// count starts again. The documented contract (docs/proxy.md, "What a replay restores"): the
/// session answers, its server-side state does not follow it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_move_a_session_s_server_state_does_not_follow_it() {
    let _serial = SERIAL.lock().await;
    let bed = bed("e2e-move-state", json!({}), Mode::Sidecar(Sidecar::Native)).await;
    let clients = Clients::start(bed.entry(), STATEFUL);
    clients.wait_calling().await;
    clients.wait_calling_on().await;
    clients.wait_calling_on().await;
    let runs = clients.stop().await;
    report("drain strategy Move, stateful tool", &runs);
    let reset = silent_resets(&runs);
    eprintln!(
        "Move: {} of {} clients saw their count start again in the same session",
        reset.len(),
        runs.len()
    );
    assert!(
        !reset.is_empty(),
        "with 3 pods and no affinity, a count kept in one process resets: {runs:?}"
    );
    assert!(
        runs.iter()
            .flat_map(|r| &r.errors)
            .all(|e| e.contains("state reset")),
        "a reset is the only failure: {runs:?}"
    );
}

/// Drain strategy `Wait`, and a pod SIGKILLed and force-deleted (an OOM kill, a lost node):
/// the state of its sessions is gone with it. Each is answered 404 (its client must start a
/// new session, and knows it) and counted once as lost, and no client's count ever starts
/// again within the session it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_owner_s_sessions_are_answered_not_found_and_counted_never_reset() {
    killed_owner("e2e-wait-kill", Mode::Sidecar(Sidecar::Native)).await;
}

/// The same in gateway mode: the gateways' clients keep their connections, and each client
/// whose session was pinned to the killed pod is answered 404, once its gateway finds the pod
/// gone (or its server refusing connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_pinned_pod_s_sessions_are_answered_not_found_and_counted_never_reset() {
    killed_owner("e2e-gw-wait-kill", Mode::Gateway).await;
}

async fn killed_owner(prefix: &str, mode: Mode) {
    let _serial = SERIAL.lock().await;
    let (bed, clients) = waiting_bed(prefix, mode, 300).await;
    let store = bed.store().await;
    let victim = bed.pods().await[0].name_any();
    let owned = owned_by(&store, &victim).await;
    bed.kill_pod(&victim).await;
    let what = "every session of the killed pod counted lost";
    wait_tally(&store, what, |t| t.lost, owned).await;
    let runs = clients.stop().await;
    report(
        &format!("SIGKILL of an owner ({mode:?}), drain strategy Wait, stateful tool"),
        &runs,
    );
    let tallies = store.tallies().await.expect("tallies");
    eprintln!(
        "Wait ({mode:?}), owner killed: {owned} sessions on it, {} counted lost, {} clients answered 404",
        tallies.lost,
        told(&runs)
    );
    assert_lost_and_told(owned, (tallies.lost, tallies.drained), &runs);
}

/// Drain strategy `Wait` bounded by `maxWaitSeconds` (15 s): clients that never end their
/// sessions keep the old pods only that long. Meanwhile the status reports the sessions waiting
/// on old pods, and the rollout is in progress; then every one of those sessions is lost with
/// its pod: answered 404, counted once, never reset within a session.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollout_under_wait_ends_at_the_maximum_wait_and_counts_what_it_cut() {
    rollout_cut_at_max_wait("e2e-wait-max", Mode::Sidecar(Sidecar::Native)).await;
}

/// The same in gateway mode: the hold answers the old pods' preStop hooks at
/// `maxWaitSeconds`, and the sessions still open then are lost with their pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_s_rollout_under_wait_ends_at_the_maximum_wait_and_counts_what_it_cut() {
    rollout_cut_at_max_wait("e2e-gw-wait-max", Mode::Gateway).await;
}

async fn rollout_cut_at_max_wait(prefix: &str, mode: Mode) {
    const MAX_WAIT: u64 = 15;
    let _serial = SERIAL.lock().await;
    // The guard would pause the rollout at its first cut session, perhaps before its last new
    // pod: what is measured here is what `maxWaitSeconds` ends (a guarded pause has a test of
    // its own).
    let spec = json!({"drain": {"timeoutSeconds": 20, "strategy": "Wait", "maxWaitSeconds": MAX_WAIT},
                      "rollout": {"maxLostSessions": 1000}});
    let (bed, clients) = waiting_bed_of(prefix, mode, spec).await;
    let old = pod_names(&bed).await;
    let store = bed.store().await;
    let sessions = store.counts().await.expect("counts").total;

    let started = std::time::Instant::now();
    bed.set_image(V2).await;
    // From the first old pod's stop: its sessions wait `MAX_WAIT` at most.
    let waiting = bed
        .status_until("the rollout waiting for the old pods' sessions", |s| {
            s.sessions.waiting > 0
                && s.conditions
                    .iter()
                    .any(|c| c.type_ == "RolloutSafe" && c.reason == "WaitingForSessions")
        })
        .await;
    wait_for(TIMEOUT, "3 new pods serving", || async {
        serving_on(&bed, V2).await.len() == REPLICAS
    })
    .await;
    let rolled = started.elapsed();
    wait_gone(&bed, &old, "the old pods gone at the maximum wait").await;
    let ended = started.elapsed();
    let what = "every session of the old pods counted lost";
    wait_tally(&store, what, |t| t.lost, sessions).await;
    let rollout = bed.settled_rollout().await;
    // A client told its session is gone may open the next on an old pod that had not begun
    // to stop, and lose that one too: every session that is not alive now was cut.
    let alive = store.counts().await.expect("counts").total;
    let runs = clients.stop().await;
    let made: std::collections::BTreeSet<&String> =
        runs.iter().flat_map(|r| &r.session_ids).collect();
    let cut = made.len() as u64 - alive;
    report(
        &format!("rolling update ({mode:?}), drain strategy Wait, maxWaitSeconds 15"),
        &runs,
    );
    eprintln!(
        "Wait ({mode:?}), maxWaitSeconds {MAX_WAIT}: {} sessions waited on old pods; the old pods gone {:.1} s after the update; {cut} sessions cut of {} made, {alive} alive; lastRollout: {rollout:?}; {} clients answered 404",
        waiting.sessions.waiting,
        ended.as_secs_f64(),
        made.len(),
        told(&runs)
    );
    // The last old pod began to stop when the last new one was ready.
    let grace = Duration::from_secs(MAX_WAIT + 20 + 15);
    assert!(
        ended < rolled + grace,
        "the old pods left within their grace period ({grace:?}) of the rollout ({rolled:?}): {ended:?}"
    );
    assert!(
        cut >= sessions,
        "every first session was cut: {cut} of {sessions}"
    );
    assert_lost_and_told(cut, (rollout.lost, rollout.drained), &runs);
}

/// Drain strategy `Wait`, and the server of one pod failing its liveness probe: the kubelet
/// runs the server's preStop (the proxy starts to wait for its sessions), then, at the probe's
/// own grace that the webhook set (the drain's, not `maxWaitSeconds`), restarts the server in
/// place. Its sessions' state is gone with it: each is answered 404 and counted lost once, none
/// reset within a session; and the pod is Ready again with a fresh proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sick_server_under_wait_restarts_after_the_drain_and_its_sessions_are_told() {
    let _serial = SERIAL.lock().await;
    let (bed, clients) = waiting_bed("e2e-wait-sick", Mode::Sidecar(Sidecar::Native), 300).await;
    let store = bed.store().await;
    let pod = bed.pods().await.first().expect("a pod").name_any();
    let owned = owned_by(&store, &pod).await;
    let (restarted_in, ready_in) = sicken(&bed, &pod).await;
    let what = "the sick server's sessions counted lost";
    wait_tally(&store, what, |t| t.lost, owned).await;
    clients.wait_calling_on().await;
    let runs = clients.stop().await;
    report("a sick server under drain strategy Wait", &runs);
    let tallies = store.tallies().await.expect("tallies");
    eprintln!(
        "Wait, liveness failure: {pod}'s server restarted {:.1} s after it fell sick, Ready again after {:.1} s; {owned} sessions on it, {} counted lost",
        restarted_in.as_secs_f64(),
        ready_in.as_secs_f64(),
        tallies.lost
    );
    // The probe fails after 3 periods of 1 s; then the drain's grace (20 + 15 s).
    assert!(
        restarted_in < Duration::from_secs(60),
        "restarted at the probe's grace, not at maxWaitSeconds (300 s): {restarted_in:?}"
    );
    assert_lost_and_told(owned, (tallies.lost, tallies.drained), &runs);
}

/// Drain strategy `Wait` with `onOwnerLost: Replay`, and an owner SIGKILLed and force-deleted:
/// as the policy says, its sessions are replayed on the other pods instead of answered 404.
/// No client is told its session is gone, none is counted lost, and the replayed sessions'
/// counts start again: the state did not survive, which is what `Replay` accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_replay_a_killed_owner_s_sessions_are_replayed_not_lost() {
    let _serial = SERIAL.lock().await;
    let (bed, clients) = waiting_bed_with(
        "e2e-wait-replay",
        Mode::Sidecar(Sidecar::Native),
        300,
        "Replay",
    )
    .await;
    let store = bed.store().await;
    let victim = bed.pods().await[0].name_any();
    let owned = owned_by(&store, &victim).await;
    bed.kill_pod(&victim).await;
    // Not every one comes back: a Python SDK client whose listening stream was on the killed
    // pod ends with it.
    let what = "the killed pod's sessions replayed";
    wait_tally(&store, what, |t| t.rehydrated, 1).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let runs = clients.stop().await;
    report(
        "SIGKILL of an owner, drain strategy Wait, onOwnerLost Replay",
        &runs,
    );
    let tallies = store.tallies().await.expect("tallies");
    let told_gone = told(&runs);
    let reset = silent_resets(&runs).len();
    eprintln!(
        "Wait + Replay, owner killed: {owned} sessions on it; tallies {tallies:?}; {told_gone} clients answered 404, {reset} saw their count start again"
    );
    assert_eq!(tallies.lost, 0, "replayed, not lost: {tallies:?}");
    assert_eq!(told_gone, 0, "no client told its session is gone: {runs:?}");
    assert!(
        reset > 0,
        "the replayed sessions' state started again: {runs:?}"
    );
}
