//! The rollout test bed: the 1.35 control plane and a real node, with every part real. A
//! Deployment of 3 backend pods, real containers that the real kubelet runs on containerd
//! from images imported into the node (in sidecar mode with the session proxy the operator's
//! webhook injected, the project's own image, whose preStop hook drains it); a Service whose
//! ClusterIP kube-proxy routes to the ready pods' addresses, as the real EndpointSlice
//! controller publishes them; in gateway mode the gateway the operator runs, in pods of the
//! same image; a real redis-server that the pods reach at the node's address. The backend's
//! image is the caller's: the tests run the Python SDK's server, the gateway benchmark a
//! lighter one of its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt as _};
use mcp_session_operator::api::{
    McpSessionPolicy, McpSessionPolicyStatus, RolloutStatus, Sidecar, pod,
};
use mcp_session_operator::store::RedisStore;
use serde_json::{Value, json};

use super::control_plane::{
    TestNamespace, control_plane, restricted_container_security, restricted_pod_security,
};
use super::images;
use super::node::{NODE_IP, RealNode};
use super::operator::{
    Operator, PROXY_IMAGE, install_crd, operator_kubeconfig, wait_webhook_ready,
};
use super::redis::RedisServer;
use super::wait::{wait_for, wait_until};

/// The policy, the Deployment, its Service and its pods' `app` label.
pub const APP: &str = "mcp";
pub const TIMEOUT: Duration = Duration::from_secs(120);
/// The backend's versions: images the [`Backend`]'s archive holds.
pub const V1: &str = "example/mcp-server:1";
pub const V2: &str = "example/mcp-server:2";
/// The backend's pods.
pub const REPLICAS: usize = 3;
/// The port the backend's container declares, and serves on.
pub const BACKEND_PORT: u16 = 8000;

/// The backend the pods run.
pub struct Backend {
    /// An OCI archive with the images [`V1`] and [`V2`] (and any other version a test sets),
    /// each serving MCP at `/mcp` on [`BACKEND_PORT`].
    pub images: PathBuf,
    /// A path on [`BACKEND_PORT`] that answers 200 while the server is alive: the container's
    /// liveness probe, if any.
    pub liveness: Option<&'static str>,
}

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

/// The test bed of one scenario. The node goes first when it drops: the namespaces' pods are
/// then left for the next node of the test binary to finish.
pub struct Bed {
    pub node: RealNode,
    pub ns: TestNamespace,
    _operator_ns: TestNamespace,
    pub operator: Operator,
    pub redis: RedisServer,
    pub deployments: Api<Deployment>,
    pub service: ClusterService,
    /// Gateway mode: the gateway the clients connect to.
    pub gateway: Option<Gateway>,
}

impl Bed {
    /// Everything up to 3 ready pods running `backend`'s [`V1`], in `mode`: in sidecar mode
    /// behind the Service with their proxies injected; in gateway mode alone (the policy turns
    /// injection off), a gateway following them. `rollout` is the policy's `spec.rollout`.
    pub async fn start(prefix: &str, rollout: Value, mode: Mode, backend: &Backend) -> Self {
        Self::start_with(prefix, json!({ "rollout": rollout }), mode, backend).await
    }

    /// [`Self::start`] with `spec` merged into the policy's spec (JSON merge patch).
    pub async fn start_with(prefix: &str, spec: Value, mode: Mode, backend: &Backend) -> Self {
        let plane = control_plane();
        let node = RealNode::start(plane).await;
        node.import(&backend.images);
        // The image the operator injects and runs gateways of: the project's.
        node.tag(images::PROJECT, PROXY_IMAGE);
        let ns = plane.namespace(prefix).await;
        // Pod Security admission at its strictest: the injected proxies, the gateway and the
        // backends' own spec must all pass it, or no pod starts.
        ns.enforce_restricted().await;
        let operator_ns = plane.namespace(&format!("{prefix}-op")).await;
        install_crd(&ns.client).await;
        let kubeconfig = operator_kubeconfig(plane, &ns.client, &operator_ns.name).await;
        // Persisted as a production Redis would be, so a restart loses nothing written; on the
        // node's address for the pods, on loopback for the tests.
        let redis = RedisServer::start_with(&[
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--bind",
            "127.0.0.1",
            NODE_IP,
            // It has no password, as the pods' proxies connect from their own addresses.
            "--protected-mode",
            "no",
        ]);
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
            // The gateway is the proxy; under drain strategy Wait the pods get the hold.
            Mode::Gateway => json!({"enabled": false, "sidecar": Sidecar::Native,
                "fingerprintKeySecretRef": {"name": "mcp-keys", "key": "fingerprint"}}),
        };
        let mut policy = json!({
            "apiVersion": "mcpsession.dev/v1alpha1", "kind": "McpSessionPolicy",
            "metadata": {"name": APP},
            "spec": {"selector": {"matchLabels": {"app": APP}}, "redis": {"url": redis.url_on(NODE_IP)},
                     "drain": {"timeoutSeconds": 20},
                     "injection": injection,
                     "gateway": {"enabled": mode == Mode::Gateway, "replicas": Gateway::REPLICAS,
                                 "port": 8090, "backendPort": BACKEND_PORT}},
        });
        json_patch::merge(&mut policy["spec"], &spec);
        // The proxies' and gateways' log filter, to see more of a failing scenario.
        if let Ok(filter) = std::env::var("MCP_TEST_PROXY_LOG_LEVEL") {
            policy["metadata"]["annotations"] =
                json!({mcp_session_operator::api::contract::PROXY_LOG_LEVEL: filter});
        }
        let policy: McpSessionPolicy = serde_json::from_value(policy).expect("policy");
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
        let injected = match (mode, policy.pod_injection()) {
            (_, None) => None,
            (Mode::Sidecar(sidecar), Some(_)) => Some(sidecar),
            (Mode::Gateway, Some(_)) => Some(Sidecar::Native),
        };
        if let Some(sidecar) = injected {
            wait_injecting(&ns, sidecar).await;
        }
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
        let mut server = json!({"name": "server", "image": V1, "ports": [port],
                                "securityContext": restricted_container_security()});
        if let Some(path) = backend.liveness {
            // Probed only once the server is up (the startup probe): a server still importing
            // its SDK is not dead.
            let probe =
                json!({"httpGet": {"path": path, "port": BACKEND_PORT}, "periodSeconds": 1});
            let mut startup = probe.clone();
            startup["failureThreshold"] = json!(120);
            server["startupProbe"] = startup;
            server["livenessProbe"] = probe;
        }
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": APP},
            "spec": {"replicas": REPLICAS, "minReadySeconds": 2, "selector": {"matchLabels": {"app": APP}},
                     "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                     "template": {"metadata": {"labels": {"app": APP}},
                                  "spec": {"securityContext": restricted_pod_security(),
                                           "containers": [server]}}},
        }))
        .expect("deployment");
        let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
        deployments
            .create(&PostParams::default(), &deployment)
            .await
            .expect("create the Deployment");
        let service = ClusterService::of(&ns, APP).await;
        service.wait_ready(REPLICAS).await;
        if let Some(sidecar) = injected {
            let pods = Api::<Pod>::namespaced(ns.client.clone(), &ns.name)
                .list(&ListParams::default().labels(&format!("app={APP}")))
                .await
                .expect("list pods")
                .items;
            let injected: Vec<Option<Sidecar>> = pods.iter().map(injected_as).collect();
            assert_eq!(
                injected,
                vec![Some(sidecar); REPLICAS],
                "the pods' sidecars"
            );
            let what = match mode {
                Mode::Sidecar(_) => "proxy",
                Mode::Gateway => "hold",
            };
            eprintln!("{REPLICAS} pods ready, each with a {sidecar:?} sidecar {what}");
        }
        let gateway = match mode {
            Mode::Sidecar(_) => None,
            Mode::Gateway => Some(Gateway::start(&ns).await),
        };
        // Past the test harness's capture, so that every run's log shows the real pods.
        let _ =
            std::io::Write::write_all(&mut std::io::stderr(), node.wide_pods(&ns.name).as_bytes());
        Self {
            node,
            ns,
            _operator_ns: operator_ns,
            operator,
            redis,
            deployments,
            service,
            gateway,
        }
    }

    /// What the bed's proxies logged about any of `subjects` (session ids, say), container log
    /// by container log, as the kubelet wrote them: for a failed assertion to show what
    /// happened to a client's session.
    pub fn proxy_log_about(&self, subjects: &[String]) -> String {
        let mut found = String::new();
        let mut files = self.node.container_logs(
            &self.ns.name,
            &[
                mcp_session_operator::api::contract::PROXY_CONTAINER,
                "gateway",
            ],
        );
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

    /// Where clients connect: the gateway's Service, or the backend's.
    pub fn entry(&self) -> SocketAddr {
        self.gateway
            .as_ref()
            .map_or(self.service.address, |g| g.service.address)
    }

    pub fn client(&self) -> &Client {
        &self.ns.client
    }

    pub async fn store(&self) -> RedisStore {
        self.redis
            .store("mcp:session:", Duration::from_secs(86_400))
            .await
    }

    /// `kubectl exec POD -c CONTAINER -- COMMAND`, through the apiserver and the kubelet.
    pub fn exec(&self, pod: &str, container: &str, command: &[&str]) {
        let mut args = vec!["-n", &self.ns.name, "exec", pod, "-c", container, "--"];
        args.extend(command);
        let output = self.node.kubectl(&args).expect("kubectl");
        assert!(
            output.status.success(),
            "kubectl exec {pod} -c {container} -- {command:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

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

    /// SIGKILLs `pod`'s containers and force-deletes it, as a node lost or an OOM kill would
    /// leave it.
    pub async fn kill_pod(&self, pod: &str) {
        self.node.kill_pod(&self.ns.name, pod);
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
/// pods on the node, with their service account's credentials, reached through their Service.
pub struct Gateway {
    pub service: ClusterService,
    client: Client,
    namespace: String,
}

impl Gateway {
    pub const REPLICAS: usize = 2;

    async fn start(ns: &TestNamespace) -> Self {
        let service = ClusterService::of(ns, &format!("{APP}-gateway")).await;
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

/// A Service as clients reach it: its ClusterIP and port, which kube-proxy's rules take to the
/// ready endpoints the EndpointSlice controller publishes.
pub struct ClusterService {
    pub address: SocketAddr,
    name: String,
    slices: Api<EndpointSlice>,
}

impl ClusterService {
    /// The Service `name`, once it exists (the operator creates the gateway's).
    async fn of(ns: &TestNamespace, name: &str) -> Self {
        let services: Api<Service> = Api::namespaced(ns.client.clone(), &ns.name);
        let address = wait_until(TIMEOUT, &format!("the Service {name}"), || async {
            let service = services
                .get_opt(name)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("not created yet")?;
            let spec = service.spec.unwrap_or_default();
            let ip = spec.cluster_ip.ok_or("no ClusterIP")?;
            let port = spec.ports.iter().flatten().next().ok_or("no port")?.port;
            format!("{ip}:{port}")
                .parse::<SocketAddr>()
                .map_err(|e| e.to_string())
        })
        .await;
        Self {
            address,
            name: name.to_owned(),
            slices: Api::namespaced(ns.client.clone(), &ns.name),
        }
    }

    /// Until `n` endpoints are ready and the ClusterIP takes a connection (kube-proxy synced).
    pub async fn wait_ready(&self, n: usize) {
        let slices =
            ListParams::default().labels(&format!("kubernetes.io/service-name={}", self.name));
        wait_until(
            TIMEOUT,
            &format!("{n} ready endpoints of {}", self.name),
            || async {
                let ready = self
                    .slices
                    .list(&slices)
                    .await
                    .map_err(|e| e.to_string())?
                    .items
                    .iter()
                    .flat_map(|s| s.endpoints.iter().flatten())
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                    .count();
                if ready < n {
                    return Err(format!("{ready} ready"));
                }
                tokio::net::TcpStream::connect(self.address)
                    .await
                    .map(drop)
                    .map_err(|e| format!("{ready} ready; {}: {e}", self.address))
            },
        )
        .await;
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
    wait_for(TIMEOUT, "the webhook to inject its sidecar", || async {
        pods.create(&dry_run, &probe)
            .await
            .is_ok_and(|pod| injected_as(&pod) == Some(sidecar))
    })
    .await;
}

/// How the webhook injected its sidecar (the proxy, or in gateway mode the hold: both run the
/// project's image) into `pod`, if it did: a native sidecar is an init container with
/// `restartPolicy: Always`, a classic one a container.
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
