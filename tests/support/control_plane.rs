//! A real Kubernetes control plane for the tests: etcd 3.6, kube-apiserver and
//! kube-controller-manager of today (built from Go modules by tests/cluster/build.sh) on free
//! loopback ports, one per test binary; the nodes are real (see `node`).
//!
//! The processes are spawned from a keeper thread that lives as long as the test process, with
//! PDEATHSIG: when the test binary exits (or is killed), the kernel kills them; nothing strays.

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::{Client, Config};

use super::wait::wait_for;
use super::{die_with_parent, free_port};

const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The `kubernetes` Service's ClusterIP: the first of `--service-cluster-ip-range`.
const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

pub struct ControlPlane {
    pub dir: PathBuf,
    pub api_port: u16,
    pub ca_pem: Vec<u8>,
    pub kubeconfig: PathBuf,
    admin_token: String,
    processes: Mutex<Vec<(String, Child)>>,
}

static CONTROL_PLANE: OnceLock<ControlPlane> = OnceLock::new();

/// The control plane of this test binary, started on first use (about 10 s).
pub fn control_plane() -> &'static ControlPlane {
    CONTROL_PLANE.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("control-plane-keeper".into())
            .spawn(move || {
                tx.send(ControlPlane::start())
                    .expect("hand over the control plane");
                // Children die with the thread that spawned them (PDEATHSIG): keep it alive.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn the keeper thread");
        rx.recv().expect("control plane started")
    })
}

/// Where tests/cluster/build.sh put the binaries (`MCP_TEST_KUBE_BIN`, set by scripts/test.sh).
pub fn kube_bin_dir() -> PathBuf {
    let dir = std::env::var("MCP_TEST_KUBE_BIN").unwrap_or_else(|_| {
        panic!("MCP_TEST_KUBE_BIN is not set: run scripts/test.sh, or `export MCP_TEST_KUBE_BIN=$(tests/cluster/build.sh)`")
    });
    let dir = PathBuf::from(dir);
    for binary in [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kubectl",
        "helm",
    ] {
        assert!(
            dir.join(binary).is_file(),
            "{} missing: run tests/cluster/build.sh",
            dir.join(binary).display()
        );
    }
    dir
}

impl ControlPlane {
    fn start() -> Self {
        let started = Instant::now();
        let bin = kube_bin_dir();
        let dir = fresh_dir();
        let path = |f: &str| dir.join(f);
        let ca_pem = write_certificates(&dir);
        let admin_token = format!("admin-{:032x}", rand::random::<u128>());
        std::fs::write(
            path("tokens.csv"),
            format!("{admin_token},admin,admin,\"system:masters\"\n"),
        )
        .expect("token file");
        std::fs::write(path(ADMIN_TOKEN_FILE), &admin_token).expect("token");

        let (etcd_port, etcd_peer_port, api_port) = (free_port(), free_port(), free_port());
        let plane = Self {
            kubeconfig: path("kubeconfig"),
            dir: dir.clone(),
            api_port,
            ca_pem,
            admin_token,
            processes: Mutex::new(Vec::new()),
        };
        plane.write_kubeconfig(&plane.kubeconfig, &plane.admin_token);

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        plane.spawn(
            "etcd",
            Command::new(bin.join("etcd")).args([
                "--data-dir",
                &path("etcd").display().to_string(),
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &format!("default={peer_url}"),
                "--unsafe-no-fsync",
            ]),
        );
        let p = |f: &str| path(f).display().to_string();
        plane.spawn(
            "kube-apiserver",
            Command::new(bin.join("kube-apiserver")).args([
                &format!("--etcd-servers={etcd_url}"),
                // Pods reach it too, through the `kubernetes` Service (10.96.0.1, as kube-proxy
                // routes it) to the real node's address: the gateways' in-cluster clients.
                "--bind-address=0.0.0.0",
                &format!("--advertise-address={}", super::node::NODE_IP),
                &format!("--secure-port={api_port}"),
                &format!("--cert-dir={}", p("apiserver-certs")),
                &format!("--tls-cert-file={}", p("apiserver.pem")),
                &format!("--tls-private-key-file={}", p("apiserver.key")),
                &format!("--client-ca-file={}", p("ca.pem")),
                &format!("--token-auth-file={}", p("tokens.csv")),
                "--authorization-mode=RBAC",
                &format!("--service-account-key-file={}", p("sa.pub")),
                &format!("--service-account-signing-key-file={}", p("sa.key")),
                &format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
                &format!("--service-cluster-ip-range={}", super::node::SERVICES),
                "--enable-admission-plugins=MutatingAdmissionWebhook,ValidatingAdmissionWebhook",
                "--allow-privileged=true",
                "--profiling=false",
                "--enable-priority-and-fairness=false",
                // The real node's kubelet by its address (logs, exec), not by its name. Webhooks
                // by Service are called at their ClusterIP, which the node's kube-proxy routes
                // for the host's own connections too.
                "--kubelet-preferred-address-types=InternalIP",
            ]),
        );
        plane.wait_ready();
        plane.spawn(
            "kube-controller-manager",
            Command::new(bin.join("kube-controller-manager")).args([
                &format!("--kubeconfig={}", p("kubeconfig")),
                "--leader-elect=false",
                "--secure-port=0",
                "--use-service-account-credentials=false",
                &format!("--service-account-private-key-file={}", p("sa.key")),
                &format!("--root-ca-file={}", p("ca.pem")),
                // Off: on a loaded 2-core machine a kubelet's heartbeat may come late, and the
                // node lifecycle controller would taint its node and evict its pods mid-test. The
                // node lifts its registration taint itself (see `node`).
                "--controllers=*,-nodelifecycle",
                "--profiling=false",
            ]),
        );
        eprintln!(
            "control plane ready on https://127.0.0.1:{api_port} in {:.1?} ({})",
            started.elapsed(),
            dir.display()
        );
        // What the bed runs, as the real kubectl reports it.
        let version = Command::new(bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&plane.kubeconfig)
            .args(["version", "--output=yaml"])
            .output()
            .expect("run kubectl version");
        assert!(
            version.status.success(),
            "kubectl version: {}",
            String::from_utf8_lossy(&version.stderr)
        );
        let version = String::from_utf8_lossy(&version.stdout);
        let versions: Vec<&str> = version
            .lines()
            .filter(|line| line.trim_start().starts_with("gitVersion:"))
            .map(str::trim)
            .collect();
        // Past the test harness's capture, so that every run's log says what it ran on.
        let _ = writeln!(
            std::io::stderr(),
            "kubectl version (client, server): {}",
            versions.join(", ")
        );
        plane
    }

    fn spawn(&self, name: &str, command: &mut Command) {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).expect("log file");
        let err = log.try_clone().expect("log file");
        command.stdin(Stdio::null()).stdout(log).stderr(err);
        let child = die_with_parent(command)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        self.processes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name.to_owned(), child));
    }

    /// Fails with the tail of each component's log if one exits.
    fn check_alive(&self) {
        let mut processes = self.processes.lock().unwrap_or_else(|p| p.into_inner());
        for (name, child) in processes.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(self.dir.join(format!("{name}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!("{name} exited with {status}:\n{}", tail.join("\n"));
            }
        }
    }

    fn wait_ready(&self) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                self.check_alive();
                if let Ok(client) = self.client().await {
                    let request = http::Request::get("/readyz")
                        .body(Vec::new())
                        .expect("request");
                    if let Ok(body) = client.request_text(request).await
                        && body.trim() == "ok"
                    {
                        return;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "kube-apiserver not ready after 90 s (logs in {})",
                    self.dir.display()
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }

    pub fn api_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    pub fn write_kubeconfig(&self, path: &Path, token: &str) {
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: testbed\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: testbed\n  context: {{cluster: testbed, user: user}}\ncurrent-context: testbed\n",
            self.api_url(),
            self.dir.join("ca.pem").display()
        );
        std::fs::write(path, kubeconfig).expect("write kubeconfig");
    }

    /// An admin client, for the current tokio runtime.
    pub async fn client(&self) -> kube::Result<Client> {
        self.client_for(&self.kubeconfig).await
    }

    async fn client_for(&self, kubeconfig: &Path) -> kube::Result<Client> {
        let kubeconfig = Kubeconfig::read_from(kubeconfig).map_err(kube::Error::InferKubeconfig)?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(kube::Error::InferKubeconfig)?;
        Client::try_from(config)
    }

    /// A client authenticated as `namespace/service_account` with a freshly minted token.
    pub async fn client_as(&self, namespace: &str, service_account: &str) -> Client {
        let token = self.token_for(namespace, service_account).await;
        let path = self
            .dir
            .join(format!("kubeconfig-{namespace}-{service_account}"));
        self.write_kubeconfig(&path, &token);
        self.client_for(&path)
            .await
            .expect("service account client")
    }

    /// Mints a token for a service account through the TokenRequest API.
    pub async fn token_for(&self, namespace: &str, service_account: &str) -> String {
        let client = self.client().await.expect("admin client");
        let accounts: Api<ServiceAccount> = Api::namespaced(client, namespace);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![SERVICE_ACCOUNT_ISSUER.into()]),
                expiration_seconds: Some(3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        let minted: TokenRequest = accounts
            .create_subresource("token", service_account, &PostParams::default(), &request)
            .await
            .expect("TokenRequest");
        minted.status.and_then(|s| s.token).expect("a minted token")
    }

    /// A fresh namespace for one test, ready for pods (its default service account exists).
    pub async fn namespace(&self, prefix: &str) -> TestNamespace {
        let client = self.client().await.expect("admin client");
        let name = format!("{prefix}-{:08x}", rand::random::<u32>());
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))
                .expect("namespace");
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .expect("create namespace");
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        wait_for(
            Duration::from_secs(30),
            "the default service account",
            || async { accounts.get_opt("default").await.ok().flatten().is_some() },
        )
        .await;
        TestNamespace { name, client }
    }
}

/// Applies a CRD (server-side, idempotent) and waits until the apiserver serves it.
pub async fn apply_crd(
    client: &Client,
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.metadata.name.clone().expect("CRD name");
    let apply = kube::api::PatchParams::apply("tests").force();
    crds.patch(&name, &apply, &kube::api::Patch::Apply(crd))
        .await
        .expect("apply CRD");
    wait_for(
        Duration::from_secs(60),
        "the CRD to be established",
        || async {
            crds.get(&name)
                .await
                .ok()
                .and_then(|c| c.status)
                .and_then(|s| s.conditions)
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        },
    )
    .await;
}

/// A namespace deleted when the test ends.
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
}

impl TestNamespace {
    /// Labels the namespace so that Pod Security admission enforces the `restricted` profile,
    /// at the server's latest version, on the pods created in it.
    pub async fn enforce_restricted(&self) {
        let label = serde_json::json!({"metadata": {"labels": {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
        }}});
        Api::<Namespace>::all(self.client.clone())
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(label))
            .await
            .expect("label the namespace restricted");
    }
}

/// A pod's security context as the `restricted` Pod Security profile asks for it.
pub fn restricted_pod_security() -> serde_json::Value {
    serde_json::json!({"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}})
}

/// A container's security context as the `restricted` Pod Security profile asks for it.
pub fn restricted_container_security() -> serde_json::Value {
    serde_json::json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}})
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let (client, name) = (self.client.clone(), self.name.clone());
        // Best effort: the control plane dies with the test binary anyway.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = Api::<Namespace>::all(client)
                    .delete(&name, &DeleteParams::default())
                    .await;
            });
        }
    }
}

/// Server-side applies an object of any kind (namespaced ones in their `metadata.namespace`),
/// or with `dry_run` has the apiserver validate and admit it without storing it.
pub async fn apply_object(
    client: &Client,
    object: &DynamicObject,
    dry_run: bool,
) -> kube::Result<()> {
    let types = object.types.clone().unwrap_or_default();
    let (group, version) = types
        .api_version
        .split_once('/')
        .unwrap_or(("", &types.api_version));
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, &types.kind));
    let api: Api<DynamicObject> = match object.metadata.namespace.as_deref() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let mut params = PatchParams::apply("tests").force();
    params.dry_run = dry_run;
    let name = object.metadata.name.clone().unwrap_or_default();
    api.patch(&name, &params, &Patch::Apply(object))
        .await
        .map(drop)
}

/// Whether `user` (a service account, by its user name) may do what `attributes` say
/// (`kubectl auth can-i --as=...`), by a SubjectAccessReview.
pub async fn can(client: &Client, user: &str, attributes: serde_json::Value) -> bool {
    let review: SubjectAccessReview = serde_json::from_value(serde_json::json!({
        "spec": {"user": user, "groups": ["system:serviceaccounts", "system:authenticated"],
                 "resourceAttributes": attributes}
    }))
    .expect("review");
    let reviews: Api<SubjectAccessReview> = Api::all(client.clone());
    reviews
        .create(&PostParams::default(), &review)
        .await
        .expect("SubjectAccessReview")
        .status
        .is_some_and(|s| s.allowed)
}

/// This process's testbed directory, emptied.
fn fresh_dir() -> PathBuf {
    let dir = super::process_dir("mcp-session-operator-testbed");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("testbed dir");
    dir
}

/// CA, apiserver serving certificate and service-account signing key. The certificate names
/// every address a client dials: loopback (the tests), the `kubernetes` Service's ClusterIP and
/// the node's address behind it (pods).
fn write_certificates(dir: &Path) -> Vec<u8> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "testbed CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = Issuer::from_params(&ca_params, &ca_key);

    let key = KeyPair::generate().expect("apiserver key");
    let mut params =
        CertificateParams::new(vec!["localhost".into(), "kubernetes.default.svc".into()])
            .expect("params");
    for ip in [
        Ipv4Addr::LOCALHOST,
        KUBERNETES_SERVICE_IP,
        super::node::NODE_IP.parse().expect("the node's address"),
    ] {
        params.subject_alt_names.push(SanType::IpAddress(ip.into()));
    }
    params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    let cert = params
        .signed_by(&key, &issuer)
        .expect("apiserver certificate");

    let sa_key = KeyPair::generate().expect("service account key");
    let write =
        |name: &str, contents: String| std::fs::write(dir.join(name), contents).expect("write");
    write("ca.pem", ca.pem());
    write("ca.key", ca_key.serialize_pem());
    write("apiserver.pem", cert.pem());
    write("apiserver.key", key.serialize_pem());
    write("sa.key", sa_key.serialize_pem());
    write("sa.pub", sa_key.public_key_pem());
    ca.pem().into_bytes()
}
