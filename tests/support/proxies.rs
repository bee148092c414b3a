//! Session proxies as the tests run them: alone or as pods sharing Redis, their logs, their
//! admin port and metrics.

use std::process::{Command, Stdio};
use std::time::Duration;

use super::sdk::{Sdk, Wire};
use super::{Process, die_with_parent, free_port, wait_listening};

/// The token every test proxy's /drain, /retire and /sessions require.
pub const DRAIN_TOKEN: &str = "test-drain-token";

/// A proxy as a pod would run it; with `redis`, sessions are shared through it.
pub fn proxy_with(
    port: u16,
    upstream: u16,
    admin: u16,
    pod: &str,
    redis: Option<&str>,
    extra: &[&str],
) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-session-operator"));
    command
        .args([
            "proxy",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream",
            &format!("http://127.0.0.1:{upstream}"),
        ])
        .args([
            "--admin-addr",
            &format!("127.0.0.1:{admin}"),
            "--hold-seconds",
            "20",
            "--pod-name",
            pod,
        ])
        .env_remove("MCP_SESSION_REDIS_URL")
        .args(["--touch-interval-seconds", "1"])
        .env("MCP_SESSION_FINGERPRINT_KEY", "test-deployment-key")
        .env("MCP_SESSION_DRAIN_TOKEN", DRAIN_TOKEN)
        .stdout(Stdio::null())
        .stderr(proxy_log(port));
    if let Some(url) = redis {
        command.args(["--redis-url", url]);
    }
    command.args(extra);
    Process(
        die_with_parent(&mut command)
            .spawn()
            .expect("start the proxy"),
    )
}

/// Where the proxy listening on `port` logs: the test's stderr with `MCP_TEST_PROXY_LOG` set
/// (and `--nocapture`), else [`proxy_log_path`], which a failing test prints.
pub fn proxy_log(port: u16) -> Stdio {
    proxy_log_at(&proxy_log_path(port))
}

/// A proxy's log: the test's stderr with `MCP_TEST_PROXY_LOG` set, else appended to `path`.
pub fn proxy_log_at(path: &std::path::Path) -> Stdio {
    if std::env::var_os("MCP_TEST_PROXY_LOG").is_some() {
        return Stdio::inherit();
    }
    std::fs::File::options()
        .create(true)
        .append(true)
        .open(path)
        .map_or_else(|_| Stdio::null(), Stdio::from)
}

/// Prints the log at its path if the test fails while it is in scope (the file itself is gone
/// once the next test binary starts).
pub struct ShowLogOnFailure(pub std::path::PathBuf);

impl Drop for ShowLogOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.0).unwrap_or_default();
            eprintln!("{}:\n{log}", self.0.display());
        }
    }
}

/// The log file of the proxy listening on `port`, in this test process's directory.
pub fn proxy_log_path(port: u16) -> std::path::PathBuf {
    super::process_dir("mcp-session-operator-proxies").join(format!("proxy-{port}.log"))
}

pub async fn admin_get(port: u16, path: &str) -> String {
    super::admin_get(port, path, DRAIN_TOKEN).await
}

/// Open file descriptors of process `pid`.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// A pod of the test: an SDK's MCP server behind a proxy that shares sessions through Redis.
pub struct Pod {
    pub server: Process,
    pub server_port: u16,
    pub proxy: Process,
    pub backend: super::balancer::Backend,
}

impl Pod {
    pub async fn start(sdk: Sdk, name: &str, redis: &str) -> Self {
        Self::start_with(sdk, Wire::Streamable, name, Some(redis), &[]).await
    }

    /// A pod whose server speaks `wire`; its proxy uses `redis` (else its embedded store) and
    /// gets the `extra` flags.
    pub async fn start_with(
        sdk: Sdk,
        wire: Wire,
        name: &str,
        redis: Option<&str>,
        extra: &[&str],
    ) -> Self {
        let (server_port, proxy_port, admin_port) = (free_port(), free_port(), free_port());
        let server = sdk.server_for(server_port, wire);
        let proxy = proxy_with(proxy_port, server_port, admin_port, name, redis, extra);
        wait_listening(server_port).await;
        wait_listening(proxy_port).await;
        let at = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        Self {
            server,
            server_port,
            proxy,
            backend: super::balancer::Backend {
                serve: at(proxy_port),
                ready: at(admin_port),
            },
        }
    }

    pub fn proxy_port(&self) -> u16 {
        self.backend.serve.port()
    }

    pub fn admin_port(&self) -> u16 {
        self.backend.ready.port()
    }

    /// The MCP server restarts (SIGTERM, started again at once).
    pub fn restart_server(&mut self, sdk: Sdk) {
        self.server.terminate();
        self.server = sdk.server(self.server_port);
    }

    /// What the kubelet does to a deleted pod: the proxy drains on SIGTERM and exits, then the
    /// MCP server stops.
    pub fn stop(mut self) {
        self.proxy.terminate();
        self.server.terminate();
    }
}

/// The sessions a pod's proxy claimed from retired pods.
pub async fn claims_of(pod: &Pod) -> f64 {
    let metrics = admin_get(pod.backend.ready.port(), "/metrics").await;
    sample(&metrics, r#"mcp_proxy_claims_total{outcome="claimed"}"#)
}

/// Waits until the proxy's /readyz answers 200 (30 s at most).
pub async fn wait_for_ready(admin: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let answer = admin_get(admin, "/readyz").await;
        if answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200") {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pod stays unready: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Parses a Prometheus counter or gauge sample.
pub fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix(name))
        .filter_map(|rest| rest.rsplit_once(' '))
        .filter_map(|(_, value)| value.trim().parse::<f64>().ok())
        .sum()
}
