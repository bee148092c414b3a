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
use kube::api::Api;

use super::control_plane::{ControlPlane, kube_bin_dir};
use super::wait::wait_for;
use super::{Process, die_with_parent, free_port};

/// The node's name, and its address: the bridge's own, on the pod network.
pub const NODE_NAME: &str = "bed-node";
pub const NODE_IP: &str = "10.244.0.1";
const BRIDGE: &str = "bed0";
/// The sandbox image, built from Debian's busybox-static.
const PAUSE_IMAGE: &str = "pause:local";

pub struct RealNode {
    pub dir: PathBuf,
    socket: PathBuf,
    containerd: Option<Process>,
    kubelet: Option<Process>,
    kube_proxy: Option<Process>,
}

impl Drop for RealNode {
    /// Leaves nothing running or mounted: the kubelet first (it would start again what is
    /// stopped), then every container through containerd, then containerd and the shims it
    /// leaves behind (their command lines name the node's socket), then the mounts the kubelet
    /// and containerd made under the node's directory, deepest first.
    fn drop(&mut self) {
        // kube-proxy's rules go with it: `--cleanup` removes every chain it made.
        drop(self.kube_proxy.take());
        let _ = Command::new(kube_bin_dir().join("kube-proxy"))
            .arg("--cleanup")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        drop(self.kubelet.take());
        let ctr = |args: &[&str]| {
            Command::new("ctr")
                .arg("-a")
                .arg(&self.socket)
                .args(["-n", "k8s.io"])
                .args(args)
                .stderr(Stdio::null())
                .output()
        };
        if let Ok(tasks) = ctr(&["tasks", "ls", "-q"]) {
            for task in String::from_utf8_lossy(&tasks.stdout).split_whitespace() {
                let _ = ctr(&["tasks", "kill", "-a", "-s", "SIGKILL", task]);
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
        remove_kube_chains();
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
        let dir = plane.dir.join("node");
        std::fs::create_dir_all(dir.join("cni")).expect("node dir");
        let socket = dir.join("containerd.sock");
        bridge();
        std::fs::write(
            dir.join("containerd.toml"),
            containerd_config(&dir, &socket),
        )
        .expect("containerd config");
        std::fs::write(dir.join("cni/10-bed.conflist"), CNI_CONFLIST).expect("CNI config");
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
        import(&socket, &pause_image(&dir));
        import(&socket, &project_image(&dir));

        std::fs::write(dir.join("kubelet.yaml"), kubelet_config(&socket)).expect("kubelet config");
        let kubelet = spawn(
            &dir,
            "kubelet",
            Command::new(kube_bin_dir().join("kubelet"))
                .arg(format!("--config={}", dir.join("kubelet.yaml").display()))
                .arg(format!("--kubeconfig={}", plane.kubeconfig.display()))
                .arg(format!("--root-dir={}", dir.join("kubelet").display()))
                .arg(format!("--hostname-override={NODE_NAME}"))
                .arg(format!("--node-ip={NODE_IP}")),
        );
        std::fs::write(
            dir.join("kube-proxy.yaml"),
            kube_proxy_config(&plane.kubeconfig),
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
        let client = plane.client().await.expect("admin client");
        let nodes: Api<NodeObject> = Api::all(client);
        wait_for(Duration::from_secs(90), "the real node Ready", || async {
            nodes
                .get_opt(NODE_NAME)
                .await
                .ok()
                .flatten()
                .is_some_and(|n| {
                    n.status
                        .and_then(|s| s.conditions)
                        .into_iter()
                        .flatten()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
        })
        .await;
        Self {
            dir,
            socket,
            containerd: Some(containerd),
            kubelet: Some(kubelet),
            kube_proxy: Some(kube_proxy),
        }
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

const CNI_CONFLIST: &str = r#"{"cniVersion": "0.4.0", "name": "bed", "plugins": [
  {"type": "bridge", "bridge": "bed0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24", "gateway": "10.244.0.1"}]]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}"#;

fn containerd_config(dir: &Path, socket: &Path) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/library/{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
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
    )
}

fn kubelet_config(socket: &Path) -> String {
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
"#,
        socket = socket.display(),
    )
}

/// kube-proxy in iptables mode: Services' ClusterIPs, for the host's own connections too,
/// DNAT'd to their endpoints on the pod network; no masquerade beyond it, no conntrack tuning
/// (the VM's sysctls stay as they are).
fn kube_proxy_config(kubeconfig: &Path) -> String {
    let (healthz, metrics) = (free_port(), free_port());
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
mode: iptables
hostnameOverride: {NODE_NAME}
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

/// The sandbox image: Debian's busybox-static, waiting for its SIGTERM.
fn pause_image(dir: &Path) -> PathBuf {
    let rootfs = dir.join("pause-rootfs/bin");
    std::fs::create_dir_all(&rootfs).expect("pause rootfs");
    std::fs::copy("/bin/busybox", rootfs.join("busybox")).expect("busybox-static");
    let archive = dir.join("pause.oci.tar");
    oci_archive(
        &dir.join("pause-rootfs"),
        r#"{"User":"65535:65535","Entrypoint":["/bin/busybox","sh","-c","trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"],"WorkingDir":"/"}"#,
        PAUSE_IMAGE,
        &archive,
    );
    archive
}

/// The project's image as an OCI archive in `dir`, from `scripts/image.sh` with this test
/// build's binary (stripped), named [`PROJECT_IMAGE`].
pub fn project_image(dir: &Path) -> PathBuf {
    let binary = dir.join("mcp-session-operator");
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(&binary)
        .arg(env!("CARGO_BIN_EXE_mcp-session-operator"))
        .status()
        .expect("strip");
    assert!(stripped.success(), "strip the binary");
    let archive = dir.join("mcp-session-operator.oci.tar");
    run_script(
        Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/image.sh"))
            .arg("--binary")
            .arg(&binary)
            .arg("--output")
            .arg(&archive)
            .args(["--name", PROJECT_IMAGE]),
    );
    archive
}

/// The project's image as the node knows it.
pub const PROJECT_IMAGE: &str = "mcp-session-operator:bed";

fn oci_archive(rootfs: &Path, config: &str, name: &str, archive: &Path) {
    run_script(
        Command::new("bash")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/oci-archive.sh"
            ))
            .arg(rootfs)
            .arg(config)
            .arg(name)
            .arg(archive),
    );
}

fn run_script(command: &mut Command) {
    let output = command.output().expect("a script");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
