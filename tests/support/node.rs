//! A real node for the test bed: containerd and runc from Debian, the real kubelet of the 1.35
//! build, and a CNI bridge network (Debian's plugins) on this machine, which the pods reach and
//! nothing else: no route off the machine, no masquerade. Images are OCI archives built here
//! (`scripts/image.sh`, `scripts/oci-archive.sh`) and imported into containerd; pods never pull.
//!
//! The settings are the ones this VM needs (docs/testing.md): cgroup v1 with the `cgroupfs`
//! driver (`failCgroupV1: false`), no QoS cgroups, swap tolerated, runc unable to lower
//! `oom_score_adj` (containerd's `restrict_oom_score_adj`, the kubelet's `oomScoreAdj: 0`),
//! eviction thresholds low enough for a nearly full disk.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node as NodeObject;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::control_plane::{ControlPlane, kube_bin_dir};
use super::images;
use super::wait::wait_for;
use super::{Process, die_with_parent, free_port};

/// The node's address: the bridge's own, on the pod network.
pub const NODE_IP: &str = "10.244.0.1";
const BRIDGE: &str = "bed0";
/// The Services' ClusterIP range (the apiserver's `--service-cluster-ip-range`).
pub const SERVICES: &str = "10.96.0.0/16";

pub struct RealNode {
    /// `bed-node-<n>`: each node a test binary starts has a name of its own, so that no pod
    /// of the last test's, bound to the last node, is ever run by this one.
    pub name: String,
    pub dir: PathBuf,
    socket: PathBuf,
    kubeconfig: PathBuf,
    containerd: Option<Process>,
    kubelet: Option<Process>,
    kube_proxy: Option<Process>,
    scheduler: Option<Process>,
}

impl Drop for RealNode {
    /// Leaves nothing running or mounted: the kubelet first (it would start again what is
    /// stopped), then every container through containerd, then containerd and the shims it
    /// leaves behind (their command lines name the node's socket), then the mounts the kubelet
    /// and containerd made under the node's directory, deepest first.
    fn drop(&mut self) {
        drop(self.scheduler.take());
        // kube-proxy's rules go with it: `--cleanup` removes every chain it made.
        drop(self.kube_proxy.take());
        let _ = Command::new(kube_bin_dir().join("kube-proxy"))
            .arg("--cleanup")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        drop(self.kubelet.take());
        // Its pods are orphans now, which the pod garbage collector deletes.
        let _ = self.kubectl(&["delete", "node", &self.name, "--wait=false"]);
        if let Ok(tasks) = self.ctr(&["tasks", "ls", "-q"]) {
            for task in String::from_utf8_lossy(&tasks.stdout).split_whitespace() {
                let _ = self.ctr(&["tasks", "kill", "-a", "-s", "SIGKILL", task]);
            }
        }
        drop(self.containerd.take());
        let _ = Command::new("pkill")
            .args(["-KILL", "-f"])
            .arg(self.socket.as_os_str())
            .status();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|point| Path::new(point).starts_with(&self.dir))
            .collect();
        under.sort_by_key(|point| std::cmp::Reverse(point.len()));
        for point in under {
            let _ = Command::new("umount").args(["-l", point]).status();
        }
        remove_pod_links();
        remove_kube_chains();
    }
}

/// Removes the pods' ends of the bridge: the pods' network namespaces (mounted under the node's
/// directory, `netns_mounts_under_state_dir`) go with their mounts and processes, and their
/// veths with them; any link still on the bridge would answer for an address the next node
/// hands out again.
fn remove_pod_links() {
    let links = Command::new("ip")
        .args(["-o", "link", "show", "master", BRIDGE])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // `25: veth586da4b0@if2: <...> ...`
    for link in links
        .lines()
        .filter_map(|line| line.split(": ").nth(1)?.split('@').next())
    {
        // Gone already if its namespace went with the mounts: nothing to say then.
        let _ = Command::new("ip")
            .args(["link", "delete", link])
            .stderr(Stdio::null())
            .status();
    }
}

/// Removes the iptables chains the kubelet makes and `kube-proxy --cleanup` leaves
/// (`KUBE-FIREWALL`, `KUBE-KUBELET-CANARY`): the rules in the built-in chains that jump to
/// them (by number: a rule's comment would not survive being read back as words), then the
/// chains, in every table.
fn remove_kube_chains() {
    let iptables = |table: &str, args: &[&str]| {
        Command::new("iptables")
            .args(["-t", table])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    for table in ["filter", "nat", "mangle"] {
        let rules = iptables(table, &["-S"]);
        // The built-in chains' rules that jump to a KUBE- chain, by number, last first.
        for chain in rules
            .lines()
            .filter_map(|l| l.strip_prefix("-P ")?.split(' ').next())
        {
            let listed = iptables(table, &["-L", chain, "-n", "--line-numbers"]);
            let mut numbers: Vec<&str> = listed
                .lines()
                .filter(|line| {
                    line.split_whitespace()
                        .nth(1)
                        .is_some_and(|t| t.starts_with("KUBE-"))
                })
                .filter_map(|line| line.split_whitespace().next())
                .collect();
            numbers.reverse();
            for number in numbers {
                iptables(table, &["-D", chain, number]);
            }
        }
        for chain in rules.lines().filter_map(|l| l.strip_prefix("-N KUBE-")) {
            let chain = format!("KUBE-{chain}");
            iptables(table, &["-F", &chain]);
            iptables(table, &["-X", &chain]);
        }
    }
}

impl RealNode {
    /// containerd and the kubelet, registered with `plane`, Ready; the project's image (this
    /// test build's binary, stripped) and the sandbox image imported.
    pub async fn start(plane: &ControlPlane) -> Self {
        // A directory of its own for each node a test binary starts (one per test, in turn):
        // nothing of the last one's containers, mounts or addresses is left to find.
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = plane.dir.join(format!("node-{n}"));
        let name = format!("bed-node-{n}");
        std::fs::create_dir_all(dir.join("cni")).expect("node dir");
        let socket = dir.join("containerd.sock");
        bridge();
        std::fs::write(
            dir.join("containerd.toml"),
            containerd_config(&dir, &socket),
        )
        .expect("containerd config");
        std::fs::write(dir.join("cni/10-bed.conflist"), cni_conflist(&dir)).expect("CNI config");
        let containerd = spawn(
            &dir,
            "containerd",
            Command::new("containerd")
                .arg("--config")
                .arg(dir.join("containerd.toml")),
        );
        wait_for(Duration::from_secs(30), "containerd's socket", || async {
            socket.exists()
        })
        .await;
        import(&socket, &images::pause(&dir));
        import(&socket, &images::project(&dir));

        std::fs::write(dir.join("kubelet.yaml"), kubelet_config(&socket, &dir))
            .expect("kubelet config");
        let kubelet = spawn(
            &dir,
            "kubelet",
            Command::new(kube_bin_dir().join("kubelet"))
                .arg(format!("--config={}", dir.join("kubelet.yaml").display()))
                .arg(format!("--kubeconfig={}", plane.kubeconfig.display()))
                .arg(format!("--root-dir={}", dir.join("kubelet").display()))
                .arg(format!("--hostname-override={name}"))
                .arg(format!("--node-ip={NODE_IP}")),
        );
        std::fs::write(
            dir.join("kube-proxy.yaml"),
            kube_proxy_config(&plane.kubeconfig, &name),
        )
        .expect("kube-proxy config");
        let kube_proxy = spawn(
            &dir,
            "kube-proxy",
            Command::new(kube_bin_dir().join("kube-proxy")).arg(format!(
                "--config={}",
                dir.join("kube-proxy.yaml").display()
            )),
        );
        // The scheduler places the pods that controllers create (a Deployment's) on the node; it
        // runs with the node, so that it never places a pod on a node that has gone.
        let scheduler = spawn(
            &dir,
            "kube-scheduler",
            Command::new(kube_bin_dir().join("kube-scheduler")).args([
                &format!("--kubeconfig={}", plane.kubeconfig.display()),
                "--leader-elect=false",
                "--secure-port=0",
                "--profiling=false",
            ]),
        );
        let client = plane.client().await.expect("admin client");
        let nodes: Api<NodeObject> = Api::all(client);
        wait_for(Duration::from_secs(90), "the real node Ready", || async {
            nodes.get_opt(&name).await.ok().flatten().is_some_and(|n| {
                n.status
                    .and_then(|s| s.conditions)
                    .into_iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        })
        .await;
        // The kubelet registers the node tainted not-ready, and the node lifecycle controller
        // would lift the taint once it is Ready; the bed runs without that controller (see
        // `control_plane`), so the node lifts it here, once.
        let untainted = json!({"spec": {"taints": null}});
        nodes
            .patch(&name, &PatchParams::default(), &Patch::Merge(&untainted))
            .await
            .expect("lift the not-ready taint");
        Self {
            name,
            dir,
            socket,
            kubeconfig: plane.kubeconfig.clone(),
            containerd: Some(containerd),
            kubelet: Some(kubelet),
            kube_proxy: Some(kube_proxy),
            scheduler: Some(scheduler),
        }
    }

    /// `ctr -n k8s.io images import ARCHIVE`: the archive's images, as its names give them.
    pub fn import(&self, archive: &Path) {
        import(&self.socket, archive);
    }

    /// `ctr images tag`: `image` known by another name too (both as a pod spec writes them).
    pub fn tag(&self, image: &str, also: &str) {
        let output = self
            .ctr(&[
                "images",
                "tag",
                "--force",
                &images::qualified(image),
                &images::qualified(also),
            ])
            .expect("ctr");
        assert!(
            output.status.success(),
            "tag {image} as {also}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The host's process ids of the running containers of `image` (as a pod spec writes it).
    pub fn pids_of_image(&self, image: &str) -> Vec<u32> {
        let image = images::qualified(image);
        let listed = |args: &[&str]| {
            self.ctr(args)
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        // CONTAINER IMAGE RUNTIME, then TASK PID STATUS.
        let containers = listed(&["containers", "ls"]);
        let of_image: Vec<&str> = containers
            .lines()
            .skip(1)
            .filter_map(|line| {
                let mut columns = line.split_whitespace();
                let id = columns.next()?;
                (columns.next()? == image).then_some(id)
            })
            .collect();
        listed(&["tasks", "ls"])
            .lines()
            .skip(1)
            .filter_map(|line| {
                let columns: Vec<&str> = line.split_whitespace().collect();
                match columns.as_slice() {
                    [task, pid, "RUNNING"] if of_image.contains(task) => pid.parse().ok(),
                    _ => None,
                }
            })
            .collect()
    }

    /// Until kube-proxy sends no Service's connections to `ip` any more (no DNAT rule names
    /// it); when that was seen.
    pub async fn wait_unrouted(&self, ip: &str) -> chrono::DateTime<chrono::Utc> {
        let target = format!("--to-destination {ip}:");
        wait_for(
            Duration::from_secs(60),
            &format!("kube-proxy's rules without {ip}"),
            || async {
                Command::new("iptables")
                    .args(["-t", "nat", "-S"])
                    .output()
                    .is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).contains(&target))
            },
        )
        .await;
        chrono::Utc::now()
    }

    /// SIGKILLs every container of the pod `namespace/name` at once, its sandbox too, as a node
    /// that dies does: no hook runs, and its connections end with its processes.
    pub fn kill_pod(&self, namespace: &str, name: &str) {
        let filter = format!(
            r#"labels."io.kubernetes.pod.namespace"=={namespace},labels."io.kubernetes.pod.name"=={name}"#
        );
        let ids = self
            .ctr(&["containers", "ls", "-q", &filter])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        assert!(
            !ids.is_empty(),
            "no container of pod {namespace}/{name} on the node"
        );
        for id in ids {
            let _ = self.ctr(&["tasks", "kill", "--all", "--signal", "SIGKILL", id]);
        }
    }

    /// The log files the kubelet wrote for the containers named one of `containers` in
    /// `namespace`'s pods (`<namespace>_<pod>_<uid>/<container>/<restart>.log`).
    pub fn container_logs(&self, namespace: &str, containers: &[&str]) -> Vec<PathBuf> {
        let prefix = format!("{namespace}_");
        let entries = |dir: &Path| -> Vec<PathBuf> {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|entry| entry.path())
                .collect()
        };
        entries(&self.dir.join("pod-logs"))
            .into_iter()
            .filter(|pod| {
                pod.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
            })
            .flat_map(|pod| entries(&pod))
            .filter(|container| {
                container
                    .file_name()
                    .is_some_and(|n| containers.iter().any(|c| n == *c))
            })
            .flat_map(|container| entries(&container))
            .collect()
    }

    /// `kubectl get pods -o wide` in `namespace`: the pods, their node and their addresses.
    pub fn wide_pods(&self, namespace: &str) -> String {
        let output = self
            .kubectl(&["-n", namespace, "get", "pods", "-o", "wide"])
            .expect("kubectl");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The real kubectl, as the cluster's admin.
    pub fn kubectl(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new(kube_bin_dir().join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
    }

    fn ctr(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", "k8s.io"])
            .args(args)
            .output()
    }
}

/// `ctr -n k8s.io images import ARCHIVE`.
fn import(socket: &Path, archive: &Path) {
    let output = Command::new("ctr")
        .arg("-a")
        .arg(socket)
        .args(["-n", "k8s.io", "images", "import"])
        .arg(archive)
        .output()
        .expect("ctr");
    assert!(
        output.status.success(),
        "import {}: {}",
        archive.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The pod network's bridge, with the node's address; the CNI bridge plugin (`isGateway`)
/// finds it in place.
fn bridge() {
    let ip = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ip(&["link", "show", BRIDGE]) {
        assert!(
            ip(&["link", "add", BRIDGE, "type", "bridge"]),
            "create {BRIDGE}"
        );
    }
    ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", BRIDGE]);
    assert!(ip(&["link", "set", BRIDGE, "up"]), "{BRIDGE} up");
}

/// The pod network: the bridge, addresses from host-local, whose leases live in the node's
/// directory (a node killed at the end of a test releases none of them). Pods route the
/// Services' range to the node, where kube-proxy's rules take it; nothing else leaves it.
fn cni_conflist(dir: &Path) -> String {
    format!(
        r#"{{"cniVersion": "0.4.0", "name": "bed", "plugins": [
  {{"type": "bridge", "bridge": "{BRIDGE}", "isGateway": true, "ipMasq": false,
   "ipam": {{"type": "host-local", "dataDir": "{leases}",
             "ranges": [[{{"subnet": "10.244.0.0/24", "gateway": "{NODE_IP}"}}]],
             "routes": [{{"dst": "{SERVICES}"}}]}}}},
  {{"type": "portmap", "capabilities": {{"portMappings": true}}}}]}}"#,
        leases = dir.join("cni-leases").display(),
    )
}

fn containerd_config(dir: &Path, socket: &Path) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
        root = dir.join("containerd/root").display(),
        state = dir.join("containerd/state").display(),
        socket = socket.display(),
        cni = dir.join("cni").display(),
        pause = images::qualified(images::PAUSE),
    )
}

fn kubelet_config(socket: &Path, dir: &Path) -> String {
    let (port, healthz) = (free_port(), free_port());
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
containerRuntimeEndpoint: unix://{socket}
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
cgroupsPerQOS: false
enforceNodeAllocatable: []
oomScoreAdj: 0
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization: {{mode: AlwaysAllow}}
evictionHard: {{"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
podLogsDir: {logs}
"#,
        socket = socket.display(),
        logs = dir.join("pod-logs").display(),
    )
}

/// kube-proxy in iptables mode: Services' ClusterIPs, for the host's own connections too,
/// DNAT'd to their endpoints on the pod network; no masquerade beyond it, no conntrack tuning
/// (the VM's sysctls stay as they are).
fn kube_proxy_config(kubeconfig: &Path, node: &str) -> String {
    let (healthz, metrics) = (free_port(), free_port());
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
mode: iptables
hostnameOverride: {node}
clusterCIDR: 10.244.0.0/24
healthzBindAddress: 127.0.0.1:{healthz}
metricsBindAddress: 127.0.0.1:{metrics}
conntrack:
  maxPerCore: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  masqueradeAll: false
  localhostNodePorts: false
"#,
        kubeconfig = kubeconfig.display(),
    )
}

fn spawn(dir: &Path, name: &str, command: &mut Command) -> Process {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
    let err = log.try_clone().expect("log");
    Process(
        die_with_parent(command.stdout(log).stderr(err))
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}")),
    )
}
