//! A kubelet stand-in, driven by the tests: registers a Node, binds the pending pods of one
//! namespace to it, runs what the test's [`PodRuntime`] starts for each pod, reports pods
//! Running and Ready with a loopback pod IP of their own (and probes readiness on, reporting
//! each change), and on graceful deletion runs the pod's preStop action, stops it within the
//! grace period and removes it, as a kubelet does.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{Container, Node, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// What a "pod" is, for a test: by default nothing runs and every pod is ready at once.
#[async_trait]
pub trait PodRuntime: Send + Sync + 'static {
    /// Starts the pod's processes, listening on `ip`.
    async fn start(&self, _pod: &Pod, _ip: Ipv4Addr) {}
    /// The readiness probe.
    async fn ready(&self, _pod: &Pod, _ip: Ipv4Addr) -> bool {
        true
    }
    /// The stop of a pod deleted gracefully: each container's preStop hook, then its SIGTERM,
    /// SIGKILL after `grace`.
    async fn stop(&self, _pod: &Pod, _ip: Ipv4Addr, _grace: Duration) {}
}

pub struct NoProcesses;
impl PodRuntime for NoProcesses {}

/// What the stand-in did, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodEvent {
    Bound(String),
    Ready(String),
    Terminating(String),
    Stopped(String),
    Removed(String),
}

pub struct KubeletStandIn {
    pub node: String,
    events: Arc<Mutex<Vec<PodEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

impl KubeletStandIn {
    pub async fn start(client: Client, namespace: &str, runtime: Arc<dyn PodRuntime>) -> Self {
        let node = format!("standin-{namespace}");
        register_node(&client, &node).await;
        let events = Arc::new(Mutex::new(Vec::new()));
        let worker = Worker {
            pods: Api::namespaced(client, namespace),
            node: node.clone(),
            runtime,
            events: events.clone(),
            ips: Mutex::new(HashMap::new()),
            started: Mutex::new(HashSet::new()),
            terminating: Mutex::new(HashSet::new()),
        };
        let task = tokio::spawn(Arc::new(worker).run());
        Self { node, events, task }
    }

    pub fn events(&self) -> Vec<PodEvent> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for KubeletStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn register_node(client: &Client, name: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
    }))
    .expect("node");
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("register node");
    let status = json!({"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet stand-in",
                        "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "capacity": {"cpu": "64", "memory": "256Gi", "pods": "1000"},
        "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "1000"},
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .expect("node status");
}

/// A scheduled, initialized pod's conditions, ready or not.
fn conditions(ready: bool) -> serde_json::Value {
    let ready = if ready { "True" } else { "False" };
    json!([
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()},
        {"type": "Initialized", "status": "True", "lastTransitionTime": now()},
        {"type": "ContainersReady", "status": ready, "lastTransitionTime": now()},
        {"type": "Ready", "status": ready, "lastTransitionTime": now()},
    ])
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

struct Worker {
    pods: Api<Pod>,
    node: String,
    runtime: Arc<dyn PodRuntime>,
    events: Arc<Mutex<Vec<PodEvent>>>,
    ips: Mutex<HashMap<String, Ipv4Addr>>,
    started: Mutex<HashSet<String>>,
    terminating: Mutex<HashSet<String>>,
}

impl Worker {
    fn record(&self, event: PodEvent) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }

    /// A loopback address of the pod's own (127.1.x.y), so that pods can listen on one port each;
    /// unique in the test process, as stand-ins of several tests may run at once.
    fn ip_of(&self, pod: &str) -> Ipv4Addr {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let mut ips = self.ips.lock().unwrap_or_else(|p| p.into_inner());
        *ips.entry(pod.to_owned())
            .or_insert_with(|| Ipv4Addr::from(0x7f01_0000 + NEXT.fetch_add(1, Ordering::Relaxed)))
    }

    async fn run(self: Arc<Self>) {
        loop {
            if let Ok(pods) = self.pods.list(&ListParams::default()).await {
                for pod in pods.items {
                    let worker = self.clone();
                    worker.sync(pod).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn sync(self: Arc<Self>, pod: Pod) {
        let Some(name) = pod.metadata.name.clone() else {
            return;
        };
        let spec = pod.spec.clone().unwrap_or_default();
        if pod.metadata.deletion_timestamp.is_some() {
            if spec.node_name.as_deref() != Some(&self.node) {
                // Never bound: nothing runs; finish the deletion.
                let _ = self
                    .pods
                    .delete(&name, &DeleteParams::default().grace_period(0))
                    .await;
                return;
            }
            if self
                .terminating
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone())
            {
                tokio::spawn(self.clone().terminate(pod, name));
            }
            return;
        }
        match spec.node_name.as_deref() {
            None => self.bind(&name).await,
            Some(node) if node == self.node => {
                let fresh = self
                    .started
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.clone());
                if fresh {
                    tokio::spawn(self.clone().start(pod, name));
                }
            }
            Some(_) => {}
        }
    }

    async fn bind(&self, name: &str) {
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node},
        });
        let bound = self
            .pods
            .create_subresource::<_, serde_json::Value>(
                "binding",
                name,
                &PostParams::default(),
                &binding,
            )
            .await;
        if bound.is_ok() {
            self.record(PodEvent::Bound(name.to_owned()));
        }
    }

    async fn start(self: Arc<Self>, pod: Pod, name: String) {
        let ip = self.ip_of(&name);
        self.runtime.start(&pod, ip).await;
        let running = json!({"status": {
            "phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
            "hostIP": "127.0.0.1", "startTime": now(),
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now()},
            ],
        }});
        let _ = self
            .pods
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(running))
            .await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.runtime.ready(&pod, ip).await {
            if Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let running = |c: &Container| {
            json!({"name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "",
            "ready": true, "restartCount": 0, "started": true, "state": {"running": {"startedAt": now()}}})
        };
        let containers: Vec<serde_json::Value> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(running)
            .collect();
        // Native sidecars run beside them (the stand-in's runtime started them first).
        let sidecars: Vec<serde_json::Value> = pod
            .spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten())
            .filter(|c| c.restart_policy.as_deref() == Some("Always"))
            .map(running)
            .collect();
        let ready = json!({"status": {
            "conditions": conditions(true),
            "containerStatuses": containers,
            "initContainerStatuses": sidecars,
        }});
        if self
            .pods
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(ready))
            .await
            .is_ok()
        {
            self.record(PodEvent::Ready(name.clone()));
            tokio::spawn(self.probe_readiness(pod, name, ip));
        }
    }

    /// Probes a running pod's readiness every second, as a kubelet runs readiness probes (the
    /// injected proxy's every 2 s), and reports each change in its Ready condition, until the
    /// pod terminates (which reports it not ready itself).
    async fn probe_readiness(self: Arc<Self>, pod: Pod, name: String, ip: Ipv4Addr) {
        let mut ready = true;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let terminating = self
                .terminating
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&name);
            if terminating {
                return;
            }
            let now_ready = self.runtime.ready(&pod, ip).await;
            if now_ready == ready {
                continue;
            }
            let status = json!({"status": {"conditions": conditions(now_ready)}});
            if self
                .pods
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                .await
                .is_ok()
            {
                ready = now_ready;
            }
        }
    }

    async fn terminate(self: Arc<Self>, pod: Pod, name: String) {
        self.record(PodEvent::Terminating(name.clone()));
        let ip = self.ip_of(&name);
        let grace = Duration::from_secs(
            pod.metadata
                .deletion_grace_period_seconds
                .and_then(|s| u64::try_from(s).ok())
                .unwrap_or(30),
        );
        let started = Instant::now();
        // The kubelet marks a terminating pod not ready, so that endpoints stop sending to it.
        let not_ready = json!({"status": {"conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": now()}]}});
        // Strategic merge: conditions merge by type instead of replacing the list.
        let _ = self
            .pods
            .patch_status(&name, &PatchParams::default(), &Patch::Strategic(not_ready))
            .await;
        self.runtime
            .stop(&pod, ip, grace.saturating_sub(started.elapsed()))
            .await;
        self.record(PodEvent::Stopped(name.clone()));
        if self
            .pods
            .delete(&name, &DeleteParams::default().grace_period(0))
            .await
            .is_ok()
        {
            self.record(PodEvent::Removed(name));
        }
    }
}
