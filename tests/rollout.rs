//! Session-aware rollouts end to end, on the 1.20 control plane with every part real: a
//! Deployment of 3 pods, each a real Python SDK MCP server that the operator's webhook injected
//! with the session proxy, run by the kubelet stand-in as local processes from the stored pod
//! spec (the injected preStop hook drains the proxy); a Service whose real EndpointSlices, kept
//! by the real EndpointSlice controller, the balancer follows as kube-proxy would; a real
//! redis-server; and
//! 50 real SDK clients (25 Python, 25 TypeScript), each with a session and credential of its own,
//! calling a tool every 200 ms throughout.

mod support;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Pod, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt as _};
use mcp_session_operator::api::{McpSessionPolicy, McpSessionPolicyStatus, RolloutStatus, pod};
use mcp_session_operator::store::{RedisStore, SessionStore};
use serde_json::{Value, json};
use support::balancer::Balancer;
use support::clients::ClientRun;
use support::containers::LocalContainers;
use support::control_plane::{TestNamespace, control_plane, wait_for};
use support::kubelet::KubeletStandIn;
use support::operator::{
    Operator, PROXY_IMAGE, install_crd, operator_kubeconfig, wait_webhook_ready,
};
use support::redis::RedisServer;
use tokio::io::AsyncBufReadExt as _;

const APP: &str = "mcp";
const TIMEOUT: Duration = Duration::from_secs(120);
/// The tool most clients call: without annotations, as most real tools are.
const UNANNOTATED: &str = "add";
/// The same tool annotated read-only: a call of it may always be sent again.
const READ_ONLY: &str = "add_read_only";
/// Clients per SDK; 50 in all.
const CLIENTS_PER_SDK: usize = 25;
/// The backend's versions: the image names the test's container runtime knows.
const V1: &str = "example/mcp-server:1";
const V2: &str = "example/mcp-server:2";
/// A broken new version: it refuses every `initialize`, so stored sessions cannot be replayed.
const V2_REFUSING: &str = "example/mcp-server:2-refuses-initialize";

/// The webhook configurations are cluster-wide: one operator (one test) at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What each image runs: this crate's binary for the injected proxy (its args are the pod
/// spec's), the Python SDK test server for the backend.
fn images(container: &Container, ip: Ipv4Addr) -> Option<std::process::Command> {
    let image = container.image.as_deref()?;
    let log = || {
        if std::env::var_os("MCP_TEST_PROXY_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        }
    };
    if image == PROXY_IMAGE {
        let mut proxy = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-session-operator"));
        proxy.stdout(Stdio::null()).stderr(log());
        return Some(proxy);
    }
    if ![V1, V2, V2_REFUSING].contains(&image) {
        return None;
    }
    let port = container
        .ports
        .iter()
        .flatten()
        .next()
        .map_or(8000, |p| p.container_port);
    let mut server = std::process::Command::new(
        std::env::var("MCP_TEST_PYTHON").unwrap_or_else(|_| "python3".into()),
    );
    server
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp/server.py"))
        .args([port.to_string(), "--host".into(), ip.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if image == V2_REFUSING {
        server.arg("--refuse-initialize");
    }
    Some(server)
}

/// How clients reach the backend pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Through the Service, to the session proxy the webhook injected into each pod.
    Sidecar,
    /// Through the policy's gateway, which the operator runs (`spec.gateway`) in front of the
    /// pods; they run their MCP server alone.
    Gateway,
}

/// The test bed of one scenario.
struct Bed {
    ns: TestNamespace,
    _operator_ns: TestNamespace,
    operator: Operator,
    redis: RedisServer,
    runtime: Arc<LocalContainers>,
    _kubelet: KubeletStandIn,
    deployments: Api<Deployment>,
    service: Balancer,
    /// Gateway mode: the gateway the clients connect to.
    gateway: Option<Gateway>,
}

impl Bed {
    /// Everything up to 3 ready pods behind the Service, their proxies injected; `rollout` is
    /// the policy's `spec.rollout`.
    async fn start(prefix: &str, rollout: Value) -> Self {
        Self::start_in(prefix, rollout, Mode::Sidecar).await
    }

    /// [`Self::start`], in `mode`: in gateway mode nothing is injected (the policy turns
    /// injection off), and a gateway follows the 3 pods.
    async fn start_in(prefix: &str, rollout: Value, mode: Mode) -> Self {
        let plane = control_plane();
        let ns = plane.namespace(prefix).await;
        let operator_ns = plane.namespace(&format!("{prefix}-op")).await;
        install_crd(&ns.client).await;
        let kubeconfig = operator_kubeconfig(plane, &ns.client, &operator_ns.name).await;
        // Persisted as a production Redis would be, so a restart loses nothing written.
        let redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
        let port = support::free_port();
        let operator = Operator::start_with_webhook(
            &kubeconfig,
            &operator_ns.name,
            &ns.name,
            "op-rollout",
            port,
            &[],
        );
        wait_webhook_ready(&ns.client, port).await;
        let policy: McpSessionPolicy = serde_json::from_value(json!({
            "apiVersion": "mcpsession.dev/v1alpha1", "kind": "McpSessionPolicy",
            "metadata": {"name": APP},
            "spec": {"selector": {"matchLabels": {"app": APP}}, "redis": {"url": redis.url()},
                     "drain": {"timeoutSeconds": 20}, "rollout": rollout,
                     "injection": {"enabled": mode == Mode::Sidecar,
                                   "fingerprintKeySecretRef": {"name": "mcp-keys", "key": "fingerprint"}},
                     "gateway": {"enabled": mode == Mode::Gateway, "replicas": Gateway::REPLICAS,
                                 "port": 8090, "backendPort": 8000}},
        }))
        .expect("policy");
        // The key every proxy of the policy fingerprints credentials with.
        let keys: Secret = serde_json::from_value(json!({
            "metadata": {"name": "mcp-keys"}, "stringData": {"fingerprint": "rollout-test-key"},
        }))
        .expect("secret");
        Api::<Secret>::namespaced(ns.client.clone(), &ns.name)
            .create(&PostParams::default(), &keys)
            .await
            .expect("create the key Secret");
        Api::<McpSessionPolicy>::namespaced(ns.client.clone(), &ns.name)
            .patch(
                APP,
                &PatchParams::apply("tests").force(),
                &Patch::Apply(&policy),
            )
            .await
            .expect("apply the policy");
        if mode == Mode::Sidecar {
            wait_injecting(&ns).await;
        }

        let runtime = Arc::new(LocalContainers::new(Box::new(images), ns.client.clone()));
        let kubelet = KubeletStandIn::start(ns.client.clone(), &ns.name, runtime.clone()).await;
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": APP},
            "spec": {"selector": {"app": APP}, "ports": [{"port": 80, "targetPort": "mcp"}]},
        }))
        .expect("service");
        Api::<Service>::namespaced(ns.client.clone(), &ns.name)
            .create(&PostParams::default(), &service)
            .await
            .expect("create the Service");
        // In gateway mode the Service is not the clients' way in; its port names the server's.
        let port = match mode {
            Mode::Sidecar => json!({"containerPort": 8000}),
            Mode::Gateway => json!({"containerPort": 8000, "name": "mcp"}),
        };
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": APP},
            "spec": {"replicas": 3, "minReadySeconds": 2, "selector": {"matchLabels": {"app": APP}},
                     "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                     "template": {"metadata": {"labels": {"app": APP}},
                                  "spec": {"containers": [{"name": "server", "image": V1, "ports": [port]}]}}},
        }))
        .expect("deployment");
        let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
        deployments
            .create(&PostParams::default(), &deployment)
            .await
            .expect("create the Deployment");
        let service = Balancer::follow_endpoints(ns.client.clone(), &ns.name, APP).await;
        service.wait_ready(3).await;
        let gateway = match mode {
            Mode::Sidecar => None,
            Mode::Gateway => Some(Gateway::start(&ns).await),
        };
        Self {
            ns,
            _operator_ns: operator_ns,
            operator,
            redis,
            runtime,
            _kubelet: kubelet,
            deployments,
            service,
            gateway,
        }
    }

    /// The port clients connect to: the gateway's, or the Service's.
    fn entry_port(&self) -> u16 {
        self.gateway
            .as_ref()
            .map_or(self.service.port, |g| g.service.port)
    }

    fn client(&self) -> &Client {
        &self.ns.client
    }

    async fn store(&self) -> RedisStore {
        self.redis
            .store("mcp:session:", Duration::from_secs(86_400))
            .await
    }

    /// Waits until the store holds `n` sessions.
    async fn wait_sessions(&self, n: u64) {
        let store = self.store().await;
        wait_for(TIMEOUT, &format!("{n} sessions in the store"), || async {
            store.counts().await.is_ok_and(|c| c.total >= n)
        })
        .await;
    }

    /// `kubectl set image`: a new backend version in the pod template.
    async fn set_image(&self, image: &str) {
        let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "server", "image": image}]}}}});
        self.deployments
            .patch(APP, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("set image");
    }

    async fn status_until(
        &self,
        what: &str,
        check: impl Fn(&McpSessionPolicyStatus) -> bool,
    ) -> McpSessionPolicyStatus {
        eprintln!("operator log: {}", self.operator.log.display());
        support::operator::status_until(self.client(), &self.ns.name, APP, what, TIMEOUT, check)
            .await
    }

    /// The rollout once it finished and every session it drained is accounted for (rehydrated
    /// or lost: the clients of the last old pod come back after it is gone), or as it stands
    /// 60 s after it finished, for the test to report.
    async fn settled_rollout(&self) -> RolloutStatus {
        let finished = self
            .status_until("the rollout finished", |s| {
                s.last_rollout
                    .as_ref()
                    .is_some_and(|r| r.finished_at.is_some())
            })
            .await;
        let mut rollout = finished.last_rollout.expect("lastRollout");
        let api: Api<McpSessionPolicy> = Api::namespaced(self.client().clone(), &self.ns.name);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while rollout.rehydrated + rollout.lost < rollout.drained
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Ok(policy) = api.get(APP).await
                && let Some(latest) = policy.status.and_then(|s| s.last_rollout)
            {
                rollout = latest;
            }
        }
        rollout
    }

    async fn pods(&self) -> Vec<Pod> {
        Api::<Pod>::namespaced(self.client().clone(), &self.ns.name)
            .list(&ListParams::default().labels(&format!("app={APP}")))
            .await
            .expect("list pods")
            .items
    }

    /// SIGKILLs `pod`'s processes and force-deletes it, as a node lost or an OOM kill would
    /// leave it.
    async fn kill_pod(&self, pod: &str) {
        self.runtime.kill(pod);
        Api::<Pod>::namespaced(self.client().clone(), &self.ns.name)
            .delete(pod, &DeleteParams::default().grace_period(0))
            .await
            .expect("force-delete the pod");
    }

    /// Until the Deployment has 3 ready pods again, `gone` not among them.
    async fn wait_replaced(&self, gone: &str) {
        self.wait_three_serving("a replacement pod ready", |p| p.name_any() != gone)
            .await;
    }

    /// Until every pod runs `image` and is ready, and none is terminating.
    async fn wait_rolled_out(&self, image: &str) {
        let runs_image = |p: &Pod| {
            p.spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .any(|c| c.image.as_deref() == Some(image))
        };
        self.wait_three_serving(&format!("every pod on {image} and ready"), runs_image)
            .await;
    }

    /// Until there are 3 pods, each ready, not terminating and `wanted`.
    async fn wait_three_serving(&self, what: &str, wanted: impl Fn(&Pod) -> bool) {
        wait_for(TIMEOUT, what, || async {
            let pods = self.pods().await;
            pods.len() == 3 && pods.iter().all(|p| pod::takes_requests(p) && wanted(p))
        })
        .await;
    }

    /// The operator's counter for this policy, 0 while it has none.
    async fn counter(&self, name: &str, extra_labels: &str) -> u64 {
        let (_, metrics) = self.operator.get("/metrics").await.expect("metrics");
        let series = format!(
            r#"{name}{{namespace="{}",policy="{APP}"{extra_labels}}} "#,
            self.ns.name
        );
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&series))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// The policy's gateway as the operator runs it (`spec.gateway`): a Deployment of 2 gateway
/// pods, run by the kubelet stand-in with their service account's credentials, reached
/// through their Service as kube-proxy would.
struct Gateway {
    service: Balancer,
    client: Client,
    namespace: String,
}

impl Gateway {
    const REPLICAS: usize = 2;

    async fn start(ns: &TestNamespace) -> Self {
        let service =
            Balancer::follow_endpoints(ns.client.clone(), &ns.name, &format!("{APP}-gateway"))
                .await;
        service.wait_ready(Self::REPLICAS).await;
        Self {
            service,
            client: ns.client.clone(),
            namespace: ns.name.clone(),
        }
    }

    /// The gateway pods' counter `name` with outcome `outcome`, summed.
    async fn counter(&self, name: &str, outcome: &str) -> u64 {
        let pods = Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
            .list(&ListParams::default().labels(&format!("mcpsession.dev/gateway={APP}")))
            .await
            .expect("list the gateway pods");
        let series = format!(r#"{name}{{outcome="{outcome}"}} "#);
        let mut sum = 0;
        for pod in pods.items {
            let Some(ip) = pod.status.and_then(|s| s.pod_ip) else {
                continue;
            };
            let address = format!("{ip}:{GATEWAY_ADMIN_PORT}");
            let Some(metrics) = support::get_at(&address, "/metrics", "").await else {
                continue;
            };
            sum += metrics
                .lines()
                .find_map(|line| line.strip_prefix(&series))
                .and_then(|value| value.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        sum
    }
}

/// The admin port of the gateways the operator runs (its `--proxy-admin-port`).
const GATEWAY_ADMIN_PORT: u16 = 8091;

/// Until the webhook has the policy: a dry-run pod comes back with the proxy.
async fn wait_injecting(ns: &TestNamespace) {
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let probe: Pod = serde_json::from_value(json!({
        "metadata": {"name": "probe", "labels": {"app": APP}},
        "spec": {"containers": [{"name": "server", "image": V1, "ports": [{"containerPort": 8000}]}]},
    }))
    .expect("pod");
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    wait_for(TIMEOUT, "the webhook to inject the proxy", || async {
        pods.create(&dry_run, &probe).await.is_ok_and(|pod| {
            pod.spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .any(|c| c.image.as_deref() == Some(PROXY_IMAGE))
        })
    })
    .await;
}

/// The 50 clients: one process per SDK, each running its clients concurrently.
struct Clients {
    stop_file: PathBuf,
    _dir: tempfile::TempDir,
    runs: Vec<tokio::task::JoinHandle<Vec<ClientRun>>>,
}

impl Clients {
    /// Clients calling `tools` (see tests/mcp/client.py: a comma-separated list cycles).
    fn start(port: u16, tools: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let stop_file = dir.path().join("stop");
        let url = format!("http://127.0.0.1:{port}/mcp");
        let python = std::env::var("MCP_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let ts = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp/ts/client.mjs");
        let py = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp/client.py");
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
                tokio::spawn(async move {
                    let stdout = child.stdout.take().expect("stdout");
                    let mut lines = tokio::io::BufReader::new(stdout).lines();
                    let mut runs = Vec::new();
                    while let Ok(Some(line)) = lines.next_line().await {
                        match ClientRun::parse(&line) {
                            Some(run) => runs.push(run),
                            None => eprintln!("client output that is no summary: {line:.300}"),
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
        }
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

fn assert_every_client_kept_its_session(runs: &[ClientRun]) {
    assert_eq!(runs.len(), 2 * CLIENTS_PER_SDK, "every client reported");
    for run in runs {
        assert_eq!(
            run.session_ids.len(),
            1,
            "{}: one session id throughout: {run:?}",
            run.name
        );
        assert!(run.calls > 0, "{run:?}");
    }
}

/// The issue's scenario: `kubectl set image` on the Deployment while 50 clients call tools.
/// The rollout runs to completion with no client error; every client keeps its session id;
/// every drained session is rehydrated and none is lost; the metrics say the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_update_under_50_clients_loses_no_session_and_no_call() {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start("e2e-roll", json!({})).await;
    let clients = Clients::start(bed.entry_port(), UNANNOTATED);
    bed.wait_sessions(2 * CLIENTS_PER_SDK as u64).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
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
    let stored: std::collections::BTreeSet<String> =
        mcp_session_operator::store::list_all(&store, 100)
            .try_collect::<Vec<_>>()
            .await
            .expect("list the sessions")
            .into_iter()
            .filter_map(|listed| match listed {
                mcp_session_operator::store::Listed::Session(s) => s.record.credential_fingerprint,
                mcp_session_operator::store::Listed::Unreadable(_) => None,
            })
            .collect();
    assert_eq!(stored, expected, "fingerprints under the policy's key");

    bed.set_image(V2).await;
    let rollout = bed.settled_rollout().await;
    // Calls go on against the new pods for a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let runs = clients.stop().await;
    report("rolling update", &runs);
    eprintln!("lastRollout: {rollout:?}");
    for run in runs
        .iter()
        .filter(|r| !r.errors.is_empty() || r.session_ids.len() != 1)
    {
        eprintln!("{run:?}");
    }

    let errors: Vec<(&str, &String)> = runs
        .iter()
        .flat_map(|r| r.errors.iter().map(|e| (r.name.as_str(), e)))
        .collect();
    assert_eq!(errors, Vec::<(&str, &String)>::new(), "no client error");
    assert_every_client_kept_its_session(&runs);
    assert!(rollout.drained > 0, "{rollout:?}");
    assert_eq!(rollout.rehydrated, rollout.drained, "{rollout:?}");
    assert_eq!(rollout.lost, 0, "{rollout:?}");
    let pods = bed.pods().await;
    assert!(
        pods.iter().all(|p| p
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .any(|c| c.image.as_deref() == Some(V2))),
        "every pod runs the new version"
    );
    // The counters held nothing before this rollout: their values are its counts.
    assert_eq!(
        bed.counter("mcp_session_drains_total", r#",by="proxy""#)
            .await,
        rollout.drained
    );
    assert_eq!(
        bed.counter("mcp_session_rehydrations_total", "").await,
        rollout.rehydrated
    );
    assert_eq!(bed.counter("mcp_sessions_lost_total", "").await, 0);
}

/// A pod SIGKILLed mid-traffic (no hook runs; then it is force-deleted, as when its node is
/// lost): the operator sweeps its sessions to draining, the other pods claim them as their
/// clients come back, and none is lost. What no server can prevent, since the pod's TCP
/// connections are reset: a call in flight on it fails, a Python SDK client whose listening
/// stream was on it dies with it (the SDK ends the client when that stream breaks), and a
/// TypeScript call whose response stream was cut waits for the SDK's own timeout (60 s). Every
/// client keeps the one session it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_pods_sessions_are_swept_and_rehydrated() {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start("e2e-kill", json!({})).await;
    let clients = Clients::start(bed.entry_port(), UNANNOTATED);
    bed.wait_sessions(2 * CLIENTS_PER_SDK as u64).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let store = bed.store().await;
    let counts = store.counts().await.expect("counts");
    let victim = counts
        .per_pod
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(pod, _)| pod.clone())
        .expect("a pod owns sessions");
    // Only a drain or a sweep moves an active session off its pod, so these are the sessions
    // the sweep will find, less any a client ends itself before it (below).
    let victims_sessions = store
        .sessions_of_pod(&victim, 10_000)
        .await
        .expect("the victim's sessions");
    let owned = victims_sessions.len() as u64;
    bed.kill_pod(&victim).await;

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
    for run in &runs {
        assert_eq!(run.session_ids.len(), 1, "one session id: {run:?}");
        // At most the one call in flight when the pod died.
        assert!(run.errors.len() <= 1, "{run:?}");
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
    let replayed = through_a_gateway("e2e-gw-roll", "rolling update", async |bed: &Bed| {
        bed.set_image(V2).await;
        bed.wait_rolled_out(V2).await;
    })
    .await;
    assert!(
        replayed >= 2 * CLIENTS_PER_SDK as u64,
        "every session left its old pod: {replayed} replays"
    );
}

/// A gateway-mode scenario: 50 clients through a gateway in front of 3 pods, every other one
/// calling the tool annotated read-only; once every session is open, `disrupt` is done to the
/// backends, and calls go on for 2 s more. Asserts what a gateway owes its clients (see
/// [`assert_only_unsendable_calls_failed`]) and that no session was lost; returns how many
/// sessions were replayed meanwhile.
async fn through_a_gateway(prefix: &str, scenario: &str, disrupt: impl AsyncFnOnce(&Bed)) -> u64 {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start_in(prefix, json!({}), Mode::Gateway).await;
    let clients = Clients::start(bed.entry_port(), &format!("{UNANNOTATED},{READ_ONLY}"));
    bed.wait_sessions(2 * CLIENTS_PER_SDK as u64).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let gateway = bed.gateway.as_ref().expect("gateway mode");
    let replays_before = gateway.counter("mcp_proxy_replays_total", "replayed").await;
    disrupt(&bed).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Before the clients stop: a client that stops ends its session (DELETE).
    let stored = bed.store().await.counts().await.expect("counts").total;
    let runs = clients.stop().await;
    let (_, errors) = report(&format!("gateway: {scenario}"), &runs);
    let replayed = gateway.counter("mcp_proxy_replays_total", "replayed").await - replays_before;
    eprintln!(
        "gateway: {scenario}: {replayed} sessions replayed on other pods, {errors} failed calls"
    );
    assert_only_unsendable_calls_failed(&runs);
    assert_eq!(stored, 2 * CLIENTS_PER_SDK as u64, "no session lost");
    replayed
}

/// What a gateway owes its clients when a backend pod goes: every client reported and kept its
/// one session; no client ended; no read-only call failed; an unannotated call failed only if
/// it was in flight on the pod that went (at most one per client), answered as such.
fn assert_only_unsendable_calls_failed(runs: &[ClientRun]) {
    for run in runs.iter().filter(|r| !r.errors.is_empty()) {
        eprintln!("{run:?}");
    }
    assert_every_client_kept_its_session(runs);
    for run in runs {
        assert!(
            !run.errors.iter().any(|e| e.starts_with("client crashed")),
            "a client ended: {run:?}"
        );
        match run.tool.as_str() {
            READ_ONLY => assert!(run.errors.is_empty(), "a read-only call failed: {run:?}"),
            _ => {
                assert!(run.errors.len() <= 1, "{run:?}");
                for error in &run.errors {
                    assert!(error.contains("may have been executed"), "{run:?}");
                }
            }
        }
    }
}

/// The same kill in gateway mode: 50 clients (25 per SDK) connected to a gateway in front of
/// the 3 pods, every other client calling the tool annotated read-only; a backend pod
/// SIGKILLed and force-deleted. The clients' connections end at the gateway, which lives on:
/// its sessions on the killed pod are replayed on the others, no client dies or changes its
/// session, no read-only call fails. An unannotated call in flight on the killed pod may fail
/// (it may have been executed, so it is not sent again), and nothing else does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_backend_pod_costs_a_gateway_s_clients_no_connection_and_no_session() {
    let scenario = "a backend pod SIGKILLed";
    let replayed = through_a_gateway("e2e-gw-kill", scenario, async |bed: &Bed| {
        let victim = bed.pods().await.first().expect("a pod").name_any();
        bed.kill_pod(&victim).await;
        bed.wait_replaced(&victim).await;
    })
    .await;
    assert!(replayed > 0, "the killed pod's sessions moved by replay");
}

/// Kubernetes restarts a pod's MCP server in place (a failed liveness probe): the server's
/// preStop quiesces the pod's proxy, the server gets SIGTERM, a new process starts from the
/// same spec. The pod is not deleted: its proxy holds the requests that arrive meanwhile, sends
/// them to the new process (the sessions' handshakes replayed) and is Ready again; 50 clients
/// calling an unannotated tool see no error and keep their sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_in_place_restart_of_a_server_costs_no_call_and_leaves_the_pod_ready() {
    let _serial = SERIAL.lock().await;
    let bed = Bed::start("e2e-inplace", json!({})).await;
    let clients = Clients::start(bed.entry_port(), UNANNOTATED);
    bed.wait_sessions(2 * CLIENTS_PER_SDK as u64).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pods = bed.pods().await;
    let pod = pods.first().expect("a pod").clone();
    let ip: std::net::Ipv4Addr = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
        .expect("pod IP");
    let started = std::time::Instant::now();
    bed.runtime
        .restart_in_place(&pod, "server", Duration::from_secs(30))
        .await;
    let restarted_in = started.elapsed();
    // Ready again (the proxy's readiness probe), without the pod being replaced.
    let runtime = bed.runtime.clone();
    wait_for(TIMEOUT, "the pod ready again", || {
        let (runtime, pod) = (runtime.clone(), pod.clone());
        async move {
            use support::kubelet::PodRuntime as _;
            runtime.ready(&pod, ip).await
        }
    })
    .await;
    let ready_in = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let runs = clients.stop().await;
    let (_, errors) = report("a server restarted in place", &runs);
    eprintln!(
        "{} restarted in place in {:.1} s, Ready again after {:.1} s; {errors} failed calls",
        pod.name_any(),
        restarted_in.as_secs_f64(),
        ready_in.as_secs_f64()
    );
    assert!(
        bed.pods()
            .await
            .iter()
            .any(|p| p.name_any() == pod.name_any() && p.metadata.deletion_timestamp.is_none()),
        "the pod stays"
    );
    assert_every_client_kept_its_session(&runs);
    let errors: Vec<&String> = runs.iter().flat_map(|r| r.errors.iter()).collect();
    assert_eq!(errors, Vec::<&String>::new(), "no client error");
}

/// Redis restarts (SIGKILL, started again on its data) in the middle of a rolling update: the
/// proxies ride out the outage, and no session is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_mid_rollout_loses_no_session() {
    let _serial = SERIAL.lock().await;
    let mut bed = Bed::start("e2e-redis", json!({})).await;
    let clients = Clients::start(bed.entry_port(), UNANNOTATED);
    bed.wait_sessions(2 * CLIENTS_PER_SDK as u64).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    bed.set_image(V2).await;
    bed.status_until("the rollout started", |s| s.last_rollout.is_some())
        .await;
    // Once the first old pod drained.
    let store = bed.store().await;
    wait_for(TIMEOUT, "a drain reported", || async {
        store.tallies().await.is_ok_and(|t| t.drained > 0)
    })
    .await;
    // SIGKILL and start again on the same data; waits until it answers.
    tokio::task::block_in_place(|| bed.redis.restart());
    let rollout = bed.settled_rollout().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let runs = clients.stop().await;
    report("Redis restarted mid-rollout", &runs);
    eprintln!("lastRollout: {rollout:?}");

    assert_every_client_kept_its_session(&runs);
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
    let bed = Bed::start("e2e-guard", json!({"maxLostSessions": 2})).await;
    let clients = Clients::start(bed.entry_port(), UNANNOTATED);
    bed.wait_sessions(2 * CLIENTS_PER_SDK as u64).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let old_pods: Vec<String> = bed.pods().await.iter().map(|p| p.name_any()).collect();

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
