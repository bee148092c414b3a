//! The rollout test bed: the 1.35 control plane with every part real. A Deployment of 3 backend
//! pods, run by the kubelet stand-in as local processes from the stored pod spec (in sidecar
//! mode with the session proxy the operator's webhook injected, whose preStop hook drains it);
//! a Service whose real EndpointSlices, kept by the real EndpointSlice controller, a balancer
//! follows as kube-proxy would; in gateway mode the gateway the operator runs; a real
//! redis-server. The backend's program is the caller's: the tests run the Python SDK's server,
//! the gateway benchmark a lighter one of its own.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Pod, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt as _};
use mcp_session_operator::api::{
    McpSessionPolicy, McpSessionPolicyStatus, RolloutStatus, Sidecar, pod,
};
use mcp_session_operator::store::RedisStore;
use serde_json::{Value, json};

use super::balancer::Balancer;
use super::containers::LocalContainers;
use super::control_plane::{
    TestNamespace, control_plane, restricted_container_security, restricted_pod_security,
};
use super::kubelet::KubeletStandIn;
use super::operator::{
    Operator, PROXY_IMAGE, install_crd, operator_kubeconfig, wait_webhook_ready,
};
use super::redis::RedisServer;
use super::wait::wait_for;

/// The policy, the Deployment, its Service and its pods' `app` label.
pub const APP: &str = "mcp";
pub const TIMEOUT: Duration = Duration::from_secs(120);
/// The backend's versions: image names the bed's [`BackendImages`] know.
pub const V1: &str = "example/mcp-server:1";
pub const V2: &str = "example/mcp-server:2";
/// The backend's pods.
pub const REPLICAS: usize = 3;
/// The port the backend's container declares, and serves on.
pub const BACKEND_PORT: u16 = 8000;

/// The program a backend image runs on `port` at the pod's IP; `None` for an image it does
/// not know (the pod then never starts).
pub type BackendImages = fn(image: &str, port: u16, ip: Ipv4Addr) -> Option<std::process::Command>;

/// What each image runs: this crate's binary for the proxy (injected or a gateway; its args are
/// the pod spec's), `backend`'s program for the backend. Each proxy logs to `proxy-<pod IP>.log`
/// in `logs` (appended: a pod that reuses an address continues its file).
fn images(
    backend: BackendImages,
    logs: PathBuf,
) -> impl Fn(&Container, Ipv4Addr) -> Option<std::process::Command> {
    move |container, ip| {
        let image = container.image.as_deref()?;
        if image == PROXY_IMAGE {
            let mut proxy = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-session-operator"));
            if std::env::var_os("RUST_LOG").is_none() {
                proxy.env("RUST_LOG", PROXY_LOG_LEVEL);
            }
            proxy
                .stdout(Stdio::null())
                .stderr(super::proxies::proxy_log_at(
                    &logs.join(format!("proxy-{ip}.log")),
                ));
            return Some(proxy);
        }
        let port = container
            .ports
            .iter()
            .flatten()
            .next()
            .and_then(|p| u16::try_from(p.container_port).ok())
            .unwrap_or(BACKEND_PORT);
        backend(image, port, ip)
    }
}

/// What the bed's proxies log: enough of the proxy's own steps (replays, held and relayed
/// streams) to follow one session through a failed scenario.
const PROXY_LOG_LEVEL: &str = "info,mcp_session_operator::proxy=debug";

/// How clients reach the backend pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Through the Service, to the session proxy the webhook injected into each pod, as the
    /// policy's `injection.sidecar` asks: a native sidecar (an init container, started before
    /// the server and stopped after it) or a classic one (a container beside it).
    Sidecar(Sidecar),
    /// Through the policy's gateway, which the operator runs (`spec.gateway`) in front of the
    /// pods; they run their MCP server alone.
    Gateway,
}

/// The test bed of one scenario.
pub struct Bed {
    pub ns: TestNamespace,
    _operator_ns: TestNamespace,
    pub operator: Operator,
    pub redis: RedisServer,
    pub runtime: Arc<LocalContainers>,
    _kubelet: KubeletStandIn,
    pub deployments: Api<Deployment>,
    pub service: Balancer,
    /// Gateway mode: the gateway the clients connect to.
    pub gateway: Option<Gateway>,
    /// Where the pods' proxies log, a file per pod.
    proxy_logs: PathBuf,
}

impl Bed {
    /// Everything up to 3 ready pods running `backend`'s [`V1`], in `mode`: in sidecar mode
    /// behind the Service with their proxies injected; in gateway mode alone (the policy turns
    /// injection off), a gateway following them. `rollout` is the policy's `spec.rollout`.
    pub async fn start(prefix: &str, rollout: Value, mode: Mode, backend: BackendImages) -> Self {
        let plane = control_plane();
        let ns = plane.namespace(prefix).await;
        // Pod Security admission at its strictest: the injected proxies, the gateway and the
        // backends' own spec must all pass it, or no pod starts.
        ns.enforce_restricted().await;
        let operator_ns = plane.namespace(&format!("{prefix}-op")).await;
        install_crd(&ns.client).await;
        let kubeconfig = operator_kubeconfig(plane, &ns.client, &operator_ns.name).await;
        // Persisted as a production Redis would be, so a restart loses nothing written.
        let redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
        let port = super::free_port();
        let operator = Operator::start_with_webhook(
            &kubeconfig,
            &operator_ns.name,
            &ns.name,
            "op-rollout",
            port,
            &[],
        );
        wait_webhook_ready(&ns.client, port).await;
        let injection = match mode {
            Mode::Sidecar(sidecar) => json!({"enabled": true, "sidecar": sidecar,
                "fingerprintKeySecretRef": {"name": "mcp-keys", "key": "fingerprint"}}),
            Mode::Gateway => json!({"enabled": false,
                "fingerprintKeySecretRef": {"name": "mcp-keys", "key": "fingerprint"}}),
        };
        let policy: McpSessionPolicy = serde_json::from_value(json!({
            "apiVersion": "mcpsession.dev/v1alpha1", "kind": "McpSessionPolicy",
            "metadata": {"name": APP},
            "spec": {"selector": {"matchLabels": {"app": APP}}, "redis": {"url": redis.url()},
                     "drain": {"timeoutSeconds": 20}, "rollout": rollout,
                     "injection": injection,
                     "gateway": {"enabled": mode == Mode::Gateway, "replicas": Gateway::REPLICAS,
                                 "port": 8090, "backendPort": BACKEND_PORT}},
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
        if let Mode::Sidecar(sidecar) = mode {
            wait_injecting(&ns, sidecar).await;
        }

        let proxy_logs = super::process_dir("mcp-session-operator-proxies").join(&ns.name);
        std::fs::create_dir_all(&proxy_logs).expect("a directory for the proxies' logs");
        let runtime = Arc::new(LocalContainers::new(
            Box::new(images(backend, proxy_logs.clone())),
            ns.client.clone(),
        ));
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
            Mode::Sidecar(_) => json!({"containerPort": BACKEND_PORT}),
            Mode::Gateway => json!({"containerPort": BACKEND_PORT, "name": "mcp"}),
        };
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": APP},
            "spec": {"replicas": REPLICAS, "minReadySeconds": 2, "selector": {"matchLabels": {"app": APP}},
                     "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                     "template": {"metadata": {"labels": {"app": APP}},
                                  "spec": {"securityContext": restricted_pod_security(),
                                           "containers": [{"name": "server", "image": V1, "ports": [port],
                                                           "securityContext": restricted_container_security()}]}}},
        }))
        .expect("deployment");
        let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
        deployments
            .create(&PostParams::default(), &deployment)
            .await
            .expect("create the Deployment");
        let service = Balancer::follow_service(ns.client.clone(), &ns.name, APP).await;
        service.wait_ready(REPLICAS).await;
        if let Mode::Sidecar(sidecar) = mode {
            let pods = Api::<Pod>::namespaced(ns.client.clone(), &ns.name)
                .list(&ListParams::default().labels(&format!("app={APP}")))
                .await
                .expect("list pods")
                .items;
            let injected: Vec<Option<Sidecar>> = pods.iter().map(injected_as).collect();
            assert_eq!(injected, vec![Some(sidecar); REPLICAS], "the pods' proxies");
            eprintln!("{REPLICAS} pods ready, each with a {sidecar:?} sidecar proxy");
        }
        let gateway = match mode {
            Mode::Sidecar(_) => None,
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
            proxy_logs,
        }
    }

    /// What the bed's proxies logged about any of `subjects` (session ids, say), file by file:
    /// for a failed assertion to show what happened to a client's session.
    pub fn proxy_log_about(&self, subjects: &[String]) -> String {
        let mut found = String::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.proxy_logs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .collect();
        files.sort();
        for file in files {
            let log = std::fs::read_to_string(&file).unwrap_or_default();
            let lines: Vec<&str> = log
                .lines()
                .filter(|line| subjects.iter().any(|s| line.contains(s.as_str())))
                .collect();
            if !lines.is_empty() {
                found.push_str(&format!("{}:\n{}\n", file.display(), lines.join("\n")));
            }
        }
        found
    }

    /// The port clients connect to: the gateway's, or the Service's.
    pub fn entry_port(&self) -> u16 {
        self.gateway
            .as_ref()
            .map_or(self.service.port, |g| g.service.port)
    }

    pub fn client(&self) -> &Client {
        &self.ns.client
    }

    pub async fn store(&self) -> RedisStore {
        self.redis
            .store("mcp:session:", Duration::from_secs(86_400))
            .await
    }

    /// `kubectl set image`: a new backend version in the pod template.
    /// What `kubectl set image deployment/mcp server=IMAGE` does: a strategic merge patch,
    /// which merges the container by name and keeps the rest of it.
    pub async fn set_image(&self, image: &str) {
        let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "server", "image": image}]}}}});
        self.deployments
            .patch(APP, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
            .expect("set image");
    }

    pub async fn status_until(
        &self,
        what: &str,
        check: impl Fn(&McpSessionPolicyStatus) -> bool,
    ) -> McpSessionPolicyStatus {
        eprintln!("operator log: {}", self.operator.log.display());
        super::operator::status_until(self.client(), &self.ns.name, APP, what, TIMEOUT, check).await
    }

    /// The rollout once it finished and every session it drained is accounted for (rehydrated
    /// or lost: the clients of the last old pod come back after it is gone), or as it stands
    /// 60 s after it finished, for the test to report.
    pub async fn settled_rollout(&self) -> RolloutStatus {
        let finished = self
            .status_until("the rollout finished", |s| {
                s.last_rollout
                    .as_ref()
                    .is_some_and(|r| r.finished_at.is_some())
            })
            .await;
        let mut rollout = finished.last_rollout.expect("lastRollout");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while rollout.rehydrated + rollout.lost < rollout.drained
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Some(latest) = self.last_rollout().await {
                rollout = latest;
            }
        }
        rollout
    }

    /// The policy's `status.lastRollout` now; `None` while there is none (or the read failed).
    pub async fn last_rollout(&self) -> Option<RolloutStatus> {
        Api::<McpSessionPolicy>::namespaced(self.client().clone(), &self.ns.name)
            .get(APP)
            .await
            .ok()?
            .status?
            .last_rollout
    }

    pub async fn pods(&self) -> Vec<Pod> {
        Api::<Pod>::namespaced(self.client().clone(), &self.ns.name)
            .list(&ListParams::default().labels(&format!("app={APP}")))
            .await
            .expect("list pods")
            .items
    }

    /// SIGKILLs `pod`'s processes and force-deletes it, as a node lost or an OOM kill would
    /// leave it.
    pub async fn kill_pod(&self, pod: &str) {
        self.runtime.kill(pod);
        Api::<Pod>::namespaced(self.client().clone(), &self.ns.name)
            .delete(pod, &DeleteParams::default().grace_period(0))
            .await
            .expect("force-delete the pod");
    }

    /// Until the Deployment has 3 ready pods again, `gone` not among them.
    pub async fn wait_replaced(&self, gone: &str) {
        self.wait_three_serving("a replacement pod ready", |p| p.name_any() != gone)
            .await;
    }

    /// Until every pod runs `image` and is ready, and none is terminating.
    pub async fn wait_rolled_out(&self, image: &str) {
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
    pub async fn wait_three_serving(&self, what: &str, wanted: impl Fn(&Pod) -> bool) {
        wait_for(TIMEOUT, what, || async {
            let pods = self.pods().await;
            pods.len() == REPLICAS && pods.iter().all(|p| pod::takes_requests(p) && wanted(p))
        })
        .await;
    }

    /// The operator's counter for this policy, 0 while it has none.
    pub async fn counter(&self, name: &str, extra_labels: &str) -> u64 {
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
pub struct Gateway {
    pub service: Balancer,
    client: Client,
    namespace: String,
}

impl Gateway {
    pub const REPLICAS: usize = 2;

    async fn start(ns: &TestNamespace) -> Self {
        let service =
            Balancer::follow_service(ns.client.clone(), &ns.name, &format!("{APP}-gateway")).await;
        service.wait_ready(Self::REPLICAS).await;
        Self {
            service,
            client: ns.client.clone(),
            namespace: ns.name.clone(),
        }
    }

    async fn pods(&self) -> Vec<Pod> {
        Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
            .list(&ListParams::default().labels(&format!("mcpsession.dev/gateway={APP}")))
            .await
            .expect("list the gateway pods")
            .items
    }

    pub async fn pod_names(&self) -> Vec<String> {
        self.pods().await.iter().map(|p| p.name_any()).collect()
    }

    /// `kubectl rollout restart` of the gateway's Deployment: its replicas replaced one by one.
    pub async fn restart(&self) {
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {
            "kubectl.kubernetes.io/restartedAt": format!("{:?}", std::time::SystemTime::now()),
        }}}}});
        Api::<Deployment>::namespaced(self.client.clone(), &self.namespace)
            .patch(
                &format!("{APP}-gateway"),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .expect("restart the gateway");
    }

    /// Until every replica is new (none of `old`) and ready, and the old ones are gone.
    pub async fn wait_replaced(&self, old: &[String]) {
        wait_for(TIMEOUT, "the gateway's replicas replaced", || async {
            let pods = self.pods().await;
            pods.len() == Self::REPLICAS
                && pods
                    .iter()
                    .all(|p| pod::takes_requests(p) && !old.contains(&p.name_any()))
        })
        .await;
    }

    /// The gateway pods' counter `name` with outcome `outcome`, summed.
    pub async fn counter(&self, name: &str, outcome: &str) -> u64 {
        let series = format!(r#"{name}{{outcome="{outcome}"}} "#);
        let mut sum = 0;
        for pod in self.pods().await {
            let Some(ip) = pod.status.and_then(|s| s.pod_ip) else {
                continue;
            };
            let address = format!("{ip}:{GATEWAY_ADMIN_PORT}");
            let Some(metrics) = super::get_at(&address, "/metrics", "").await else {
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
pub const GATEWAY_ADMIN_PORT: u16 = 8091;

/// Until the webhook has the policy: a dry-run pod comes back with the proxy, as `sidecar`.
async fn wait_injecting(ns: &TestNamespace, sidecar: Sidecar) {
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let probe: Pod = serde_json::from_value(json!({
        "metadata": {"name": "probe", "labels": {"app": APP}},
        "spec": {"securityContext": restricted_pod_security(),
                 "containers": [{"name": "server", "image": V1, "ports": [{"containerPort": BACKEND_PORT}],
                                 "securityContext": restricted_container_security()}]},
    }))
    .expect("pod");
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    wait_for(TIMEOUT, "the webhook to inject the proxy", || async {
        pods.create(&dry_run, &probe)
            .await
            .is_ok_and(|pod| injected_as(&pod) == Some(sidecar))
    })
    .await;
}

/// How the webhook injected the proxy into `pod`, if it did: a native sidecar is an init
/// container with `restartPolicy: Always`, a classic one a container.
pub fn injected_as(pod: &Pod) -> Option<Sidecar> {
    let spec = pod.spec.as_ref()?;
    let is_proxy = |c: &&Container| c.image.as_deref() == Some(PROXY_IMAGE);
    if let Some(proxy) = spec.init_containers.iter().flatten().find(is_proxy) {
        return (proxy.restart_policy.as_deref() == Some("Always")).then_some(Sidecar::Native);
    }
    spec.containers
        .iter()
        .find(is_proxy)
        .map(|_| Sidecar::Classic)
}
