//! A container runtime for the kubelet stand-in: runs each container of a pod as a local
//! process, from the pod spec as the apiserver stored it (after admission), so that what the
//! webhook injected is what runs. The test maps images to programs; the runtime does the rest
//! as a kubelet would: environment from values and the downward API, the service account's
//! credentials (a kubeconfig in `KUBECONFIG`), `localhost` and
//! `0.0.0.0` as the pod's own loopback IP, readiness from the `httpGet` readiness probes,
//! each container's `httpGet` preStop hook then its SIGTERM, SIGKILL after the grace period,
//! and native sidecars in the order KEP-753 gives them: started first (each once its startup
//! probe passes), stopped last, in reverse order, within the pod's one grace period.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{Container, HTTPGetAction, Pod, Secret};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::Api;
use kube::{Client, ResourceExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};

use super::kubelet::PodRuntime;

/// A pod's native sidecars (KEP-753): init containers with `restartPolicy: Always`, in order.
fn sidecars(pod: &Pod) -> Vec<&Container> {
    pod.spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .filter(|c| c.restart_policy.as_deref() == Some("Always"))
        .collect()
}

/// A pod's app containers.
fn app_containers(pod: &Pod) -> impl Iterator<Item = &Container> {
    pod.spec.iter().flat_map(|s| s.containers.iter())
}

/// The program an image runs, given the container (its args and ports) and the pod's IP;
/// `None` for an image the test does not know (the pod then never starts).
pub type Images = dyn Fn(&Container, Ipv4Addr) -> Option<std::process::Command> + Send + Sync;

pub struct LocalContainers {
    images: Box<Images>,
    /// Reads the Secrets that `secretKeyRef`s name, as the kubelet does.
    client: Client,
    /// Running processes by pod name, one per container.
    pods: Mutex<HashMap<String, Vec<Process>>>,
}

/// A container's running process.
struct Process {
    container: String,
    child: Child,
}

impl Process {
    fn of(container: &Container, child: Child) -> Self {
        Self {
            container: container.name.clone(),
            child,
        }
    }
}

impl LocalContainers {
    pub fn new(images: Box<Images>, client: Client) -> Self {
        Self {
            images,
            client,
            pods: Mutex::new(HashMap::new()),
        }
    }

    /// A container's process, from the stored spec; `None` for an image the test does not know.
    async fn spawn(&self, pod: &Pod, container: &Container, ip: Ipv4Addr) -> Option<Child> {
        let mut command = (self.images)(container, ip)?;
        let mut env = environment(&self.client, container, pod, ip).await;
        if let Some(kubeconfig) = service_account_kubeconfig(pod).await {
            env.insert("KUBECONFIG".to_owned(), kubeconfig);
        }
        localize(&mut command, container, env, ip);
        command.stdin(Stdio::null());
        super::die_with_parent(&mut command);
        Some(
            Command::from(command)
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("start container {}: {e}", container.name)),
        )
    }

    fn take(&self, pod: &str) -> Vec<Process> {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(pod)
            .unwrap_or_default()
    }
}

/// The container's environment: values, the downward API and Secret keys.
async fn environment(
    client: &Client,
    container: &Container,
    pod: &Pod,
    ip: Ipv4Addr,
) -> HashMap<String, String> {
    let mut env = HashMap::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => value.clone(),
            (None, Some(from)) if from.secret_key_ref.is_some() => {
                let reference = from.secret_key_ref.as_ref().expect("checked");
                let secrets: Api<Secret> =
                    Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
                let secret = secrets
                    .get(&reference.name)
                    .await
                    .unwrap_or_else(|e| panic!("Secret {} of {}: {e}", reference.name, var.name));
                let bytes = secret
                    .data
                    .and_then(|d| d.get(&reference.key).cloned())
                    .unwrap_or_else(|| {
                        panic!("key {} of Secret {}", reference.key, reference.name)
                    });
                String::from_utf8_lossy(&bytes.0).into_owned()
            }
            (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("metadata.name") => pod.name_any(),
                Some("metadata.namespace") => pod.namespace().unwrap_or_default(),
                Some("status.podIP") => ip.to_string(),
                other => panic!(
                    "the container runtime resolves values, Secret keys and these fieldRefs only, not {other:?} of {}",
                    var.name
                ),
            },
            (None, None) => String::new(),
        };
        env.insert(var.name.clone(), value);
    }
    env
}

/// The credentials of the pod's service account, as the kubelet mounts its token: a kubeconfig
/// with a token minted for the account (`None` for the namespace's `default` account, which no
/// test's program uses).
async fn service_account_kubeconfig(pod: &Pod) -> Option<String> {
    let account = pod
        .spec
        .as_ref()?
        .service_account_name
        .as_deref()
        .filter(|a| *a != "default")?;
    let namespace = pod.namespace().unwrap_or_default();
    let plane = super::control_plane::control_plane();
    let token = plane.token_for(&namespace, account).await;
    let path = plane
        .dir
        .join(format!("kubeconfig-pod-{namespace}-{}", pod.name_any()));
    plane.write_kubeconfig(&path, &token);
    Some(path.display().to_string())
}

/// The program line a container runs, with the pod's environment and addresses.
fn localize(
    command: &mut std::process::Command,
    container: &Container,
    env: HashMap<String, String>,
    ip: Ipv4Addr,
) {
    // `$(VAR)` in args is expanded from the container's environment, as the kubelet does; a pod
    // has a network namespace of its own: its loopback and wildcard are its IP here.
    let args: Vec<String> = container
        .args
        .iter()
        .flatten()
        .map(|arg| {
            let mut arg = arg.clone();
            for (name, value) in &env {
                arg = arg.replace(&format!("$({name})"), value);
            }
            arg.replace("0.0.0.0:", &format!("{ip}:"))
                .replace("127.0.0.1:", &format!("{ip}:"))
        })
        .collect();
    command.args(args).envs(env);
}

fn port_of(action: &HTTPGetAction, container: &Container) -> Option<i32> {
    match &action.port {
        IntOrString::Int(port) => Some(*port),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port),
    }
}

/// An HTTP GET to the pod, as the kubelet's probes and hooks make; the status code.
async fn http_get(
    ip: Ipv4Addr,
    port: i32,
    path: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> Option<u16> {
    let attempt = async {
        let port = u16::try_from(port).ok()?;
        let mut stream = tokio::net::TcpStream::connect((ip, port)).await.ok()?;
        let headers: String = headers
            .iter()
            .map(|(name, value)| format!("{name}: {value}\r\n"))
            .collect();
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n{headers}\r\n").as_bytes())
            .await
            .ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        let head = String::from_utf8_lossy(&answer);
        head.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(timeout, attempt).await.ok().flatten()
}

#[async_trait]
impl PodRuntime for LocalContainers {
    /// Starts the native sidecars first, in order, each once its startup probe passes (as
    /// the kubelet does: the next container starts only then), then the app containers.
    async fn start(&self, pod: &Pod, ip: Ipv4Addr) {
        let mut processes = Vec::new();
        for container in sidecars(pod) {
            let Some(child) = self.spawn(pod, container, ip).await else {
                return;
            };
            processes.push(Process::of(container, child));
            if let Some(get) = container
                .startup_probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                && let Some(port) = port_of(get, container)
            {
                let path = get.path.as_deref().unwrap_or("/");
                let started = tokio::time::Instant::now();
                while !http_get(ip, port, path, &[], Duration::from_secs(1))
                    .await
                    .is_some_and(|status| (200..400).contains(&status))
                {
                    assert!(
                        started.elapsed() < Duration::from_secs(60),
                        "the startup probe of {} never passed",
                        container.name
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        for container in app_containers(pod) {
            let Some(child) = self.spawn(pod, container, ip).await else {
                return;
            };
            processes.push(Process::of(container, child));
        }
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pod.name_any(), processes);
    }

    /// Ready when every container's readiness probe (an `httpGet`) answers 2xx, native sidecars
    /// included, and a container without one has a process running.
    async fn ready(&self, pod: &Pod, ip: Ipv4Addr) -> bool {
        if !self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&pod.name_any())
        {
            return false;
        }
        for container in sidecars(pod).into_iter().chain(app_containers(pod)) {
            let Some(get) = container
                .readiness_probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
            else {
                continue;
            };
            let Some(port) = port_of(get, container) else {
                return false;
            };
            let path = get.path.as_deref().unwrap_or("/");
            if !http_get(ip, port, path, &[], Duration::from_secs(1))
                .await
                .is_some_and(|status| (200..300).contains(&status))
            {
                return false;
            }
        }
        true
    }

    /// Stops the pod as a kubelet does, within one grace period: the app containers (classic
    /// sidecars among them) at once, each its `httpGet` preStop hook, then SIGTERM; once they
    /// have exited, the native sidecars one by one in reverse order, each its hook and SIGTERM
    /// (KEP-753). SIGKILL for whatever still runs at the end of the grace period.
    async fn stop(&self, pod: &Pod, ip: Ipv4Addr, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        let sidecar_names: Vec<String> = sidecars(pod).iter().map(|c| c.name.clone()).collect();
        let mut processes = self.take(&pod.name_any());
        let mut sidecar_processes = Vec::new();
        for name in &sidecar_names {
            if let Some(at) = processes.iter().position(|p| &p.container == name) {
                sidecar_processes.push(processes.remove(at));
            }
        }
        let stops = processes
            .into_iter()
            .map(|process| stop_container(pod, ip, process, deadline));
        futures::future::join_all(stops).await;
        for process in sidecar_processes.into_iter().rev() {
            stop_container(pod, ip, process, deadline).await;
        }
    }
}

/// Stops one container as a kubelet does: its `httpGet` preStop hook (if it has one), then
/// SIGTERM, then SIGKILL at `deadline`.
async fn stop_container(pod: &Pod, ip: Ipv4Addr, process: Process, deadline: tokio::time::Instant) {
    let container = sidecars(pod)
        .into_iter()
        .chain(app_containers(pod))
        .find(|c| c.name == process.container);
    if let Some(container) = container
        && let Some(get) = container
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.http_get.as_ref())
        && let Some(port) = port_of(get, container)
    {
        let headers: Vec<(String, String)> = get
            .http_headers
            .iter()
            .flatten()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect();
        let path = get.path.clone().unwrap_or_default();
        let _ = tokio::time::timeout_at(
            deadline,
            http_get(ip, port, &path, &headers, Duration::from_secs(120)),
        )
        .await;
    }
    let mut child = process.child;
    if let Some(pid) = child.id() {
        // SAFETY: signalling a child of ours that has not been reaped.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    if tokio::time::timeout_at(deadline, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}
