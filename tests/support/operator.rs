//! The operator binary as a process, authenticated with a service-account token bound to the
//! RBAC of `config/rbac/` (never an admin token), against the test control plane.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::core::GroupVersionKind;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::control_plane::{ControlPlane, TestNamespace, apply_crd, apply_object, control_plane};
use super::{die_with_parent, free_port};

/// Installs the CRD (server-side apply, idempotent) and waits until it is served.
pub async fn install_crd(client: &Client) {
    let yaml = include_str!("../../crds/mcpsessionpolicies.yaml");
    let crd = serde_yaml::from_str(yaml.split("---\n").nth(1).expect("one document")).expect("CRD");
    apply_crd(client, &crd).await;
}

/// Applies `config/rbac/` for a service account in `namespace` (cluster role bound under a
/// name of this namespace) and returns a kubeconfig path with a token of that account.
pub async fn operator_kubeconfig(
    plane: &ControlPlane,
    client: &Client,
    namespace: &str,
) -> PathBuf {
    let files = [
        include_str!("../../config/rbac/service_account.yaml"),
        include_str!("../../config/rbac/role.yaml"),
        include_str!("../../config/rbac/role_binding.yaml"),
        include_str!("../../config/rbac/role_gateways.yaml"),
    ];
    for file in files {
        for document in file.split("\n---\n") {
            let text = document
                .replace("namespace: mcp-system", &format!("namespace: {namespace}"))
                .replace("kind: ClusterRoleBinding\nmetadata:\n  name: mcp-session-operator", &format!("kind: ClusterRoleBinding\nmetadata:\n  name: mcp-session-operator-{namespace}"));
            let object: DynamicObject = serde_yaml::from_str(&text).expect("RBAC object");
            apply_object(client, &object, false)
                .await
                .expect("apply RBAC");
        }
    }
    account_kubeconfig(plane, namespace, "mcp-session-operator").await
}

/// A kubeconfig path with a fresh token of `namespace/account`.
async fn account_kubeconfig(plane: &ControlPlane, namespace: &str, account: &str) -> PathBuf {
    let token = plane.token_for(namespace, account).await;
    let path = plane.dir.join(format!("kubeconfig-{account}-{namespace}"));
    plane.write_kubeconfig(&path, &token);
    path
}

/// A test namespace with the CRD installed and a kubeconfig of an operator service account in
/// it: where most operator tests begin.
pub struct OperatorNamespace {
    pub ns: TestNamespace,
    pub kubeconfig: PathBuf,
}

impl OperatorNamespace {
    pub async fn create(prefix: &str) -> Self {
        let plane = control_plane();
        let ns = plane.namespace(prefix).await;
        install_crd(&ns.client).await;
        let kubeconfig = operator_kubeconfig(plane, &ns.client, &ns.name).await;
        Self { ns, kubeconfig }
    }
}

/// The proxy image the test operators inject.
pub const PROXY_IMAGE: &str = "example/mcp-session-operator:test";

pub struct Operator {
    pub identity: String,
    pub metrics_port: u16,
    pub log: PathBuf,
    child: Child,
}

impl Operator {
    /// Starts `mcp-session-operator run` (controller only, no webhooks) with a 3 s lease and a
    /// 1 s requeue. `watch` limits it to one namespace.
    pub fn start(
        kubeconfig: &std::path::Path,
        lease_namespace: &str,
        watch: Option<&str>,
        identity: &str,
    ) -> Self {
        Self::start_with(
            kubeconfig,
            lease_namespace,
            watch,
            identity,
            &["--no-webhook"],
        )
    }

    /// As [`Operator::start`], with more flags (later ones win).
    pub fn start_with(
        kubeconfig: &std::path::Path,
        lease_namespace: &str,
        watch: Option<&str>,
        identity: &str,
        extra: &[&str],
    ) -> Self {
        let metrics_port = free_port();
        let log = kubeconfig.with_file_name(format!("operator-{identity}.log"));
        let out = std::fs::File::create(&log).expect("log");
        let err = out.try_clone().expect("log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-session-operator"));
        command
            .args([
                "run",
                "--metrics-addr",
                &format!("127.0.0.1:{metrics_port}"),
                "--namespace",
                lease_namespace,
            ])
            .args([
                "--identity",
                identity,
                "--requeue-seconds",
                "1",
                "--max-backoff-seconds",
                "2",
                "--deletion-cost-interval-seconds",
                "1",
                "--lease-seconds",
                "3",
            ])
            .env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                "info,kube=warn,mcp_session_operator::controller=debug",
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if let Some(namespace) = watch {
            command.args(["--watch-namespace", namespace]);
        }
        command.args(extra);
        let child = die_with_parent(&mut command)
            .spawn()
            .expect("spawn the operator");
        Self {
            identity: identity.to_owned(),
            metrics_port,
            log,
            child,
        }
    }

    /// As [`Operator::start_with`], serving the admission webhooks on a loopback HTTPS port
    /// that the webhook configurations it keeps point at (the proxy image it injects is
    /// `example/mcp-session-operator:test`).
    pub fn start_with_webhook(
        kubeconfig: &std::path::Path,
        lease_namespace: &str,
        watch: &str,
        identity: &str,
        port: u16,
        extra: &[&str],
    ) -> Self {
        let address = format!("127.0.0.1:{port}");
        let url = format!("https://127.0.0.1:{port}");
        let mut args = vec![
            "--webhook-addr",
            &address,
            "--webhook-url",
            &url,
            "--proxy-image",
            PROXY_IMAGE,
            "--webhook-refresh-seconds",
            "1",
        ];
        args.extend_from_slice(extra);
        Self::start_with(kubeconfig, lease_namespace, Some(watch), identity, &args)
    }

    /// Resident memory of the process.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then the exit code (within 20 s).
    pub fn terminate(&mut self) -> Option<i32> {
        // SAFETY: signalling our own child process by pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path` on the metrics port: (status code, body).
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .await
            .ok()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Some((status, body))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until the webhook configurations point at the operator serving on `port`, with a
/// caBundle.
pub async fn wait_webhook_ready(client: &Client, port: u16) {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "admissionregistration.k8s.io",
        "v1",
        "ValidatingWebhookConfiguration",
    ));
    let configs: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    super::wait::wait_for(
        Duration::from_secs(60),
        "the webhook configuration with a caBundle",
        || async {
            configs
                .get_opt("mcp-session-operator")
                .await
                .ok()
                .flatten()
                .is_some_and(|c| {
                    let client_config = &c.data["webhooks"][0]["clientConfig"];
                    client_config["caBundle"].is_string()
                        && client_config["url"]
                            .as_str()
                            .is_some_and(|u| u.contains(&format!(":{port}/")))
                })
        },
    )
    .await;
}

/// Waits until the policy's status satisfies `check` (for up to `timeout`); returns that
/// status, or panics with the last one seen.
pub async fn status_until(
    client: &Client,
    namespace: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&mcp_session_operator::api::McpSessionPolicyStatus) -> bool,
) -> mcp_session_operator::api::McpSessionPolicyStatus {
    let api: Api<mcp_session_operator::api::McpSessionPolicy> =
        Api::namespaced(client.clone(), namespace);
    let mut last = None;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Ok(policy) = api.get(name).await
            && let Some(status) = policy.status
        {
            if check(&status) {
                return status;
            }
            last = Some(status);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}; last status: {last:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
