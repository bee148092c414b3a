//! A real `redis-server` (standalone, TLS or 3-master Cluster) per test.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{die_with_parent, free_port, require_program};

pub struct RedisServer {
    pub port: u16,
    pub dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
    /// Port clients connect to with TLS, if started with TLS.
    pub tls_port: Option<u16>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra `redis-server` arguments, e.g. `["--requirepass", "pw"]`.
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let mut args: Vec<String> = vec![
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            "".into(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            dir.path().display().to_string(),
            "--logfile".into(),
            dir.path().join("redis.log").display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut server = Self {
            port,
            dir,
            args,
            child: None,
            tls_port: None,
        };
        server.spawn();
        server
    }

    /// Starts with TLS on a second port; returns the server and the CA PEM that signed it.
    pub fn start_tls() -> (Self, Vec<u8>) {
        let certs = tempfile::tempdir().expect("temp dir");
        let ca_pem = write_test_certificates(certs.path());
        let tls_port = free_port();
        let p = |f: &str| certs.path().join(f).display().to_string();
        let args = [
            "--tls-port".to_owned(),
            tls_port.to_string(),
            "--tls-cert-file".into(),
            p("server.pem"),
            "--tls-key-file".into(),
            p("server.key"),
            "--tls-ca-cert-file".into(),
            p("ca.pem"),
            "--tls-auth-clients".into(),
            "no".into(),
        ];
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut server = Self::start_with(&refs);
        server.tls_port = Some(tls_port);
        // Keep the certificate files as long as the server runs.
        std::mem::forget(certs);
        (server, ca_pem)
    }

    fn spawn(&mut self) {
        self.launch(&[]);
        self.wait_ready();
    }

    /// Starts `redis-server` with the server's arguments and `extra`, without waiting for it.
    fn launch(&mut self, extra: &[String]) {
        let binary = require_program("redis-server", "redis-server");
        let mut command = Command::new(binary);
        command
            .args(&self.args)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = die_with_parent(&mut command)
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self
                .cli(&["PING"])
                .map(|o| o.trim() == "PONG")
                .unwrap_or(false)
                || self
                    .cli(&["PING"])
                    .map(|o| o.contains("NOAUTH"))
                    .unwrap_or(false)
            {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let log =
                    std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
                panic!("redis-server exited with {status}:\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        self.url_on("127.0.0.1")
    }

    /// The URL at another address the server binds (`--bind`).
    pub fn url_on(&self, address: &str) -> String {
        format!("redis://{address}:{}/0", self.port)
    }

    /// A store on this server under `prefix`.
    pub async fn store(
        &self,
        prefix: &str,
        ttl: Duration,
    ) -> mcp_session_operator::store::RedisStore {
        let target =
            mcp_session_operator::store::RedisTarget::parse(&self.url()).expect("test URL");
        mcp_session_operator::store::RedisStore::connect(target, prefix, ttl)
            .await
            .expect("connect to the test redis-server")
    }

    /// Runs `redis-cli` against the server; its stdout (errors included, as redis-cli prints).
    pub fn cli(&self, args: &[&str]) -> std::io::Result<String> {
        redis_cli(self.port, args)
    }

    /// SIGKILLs the server (no shutdown save: only what was persisted survives).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Saves the data set, then starts the server again loading it slowly (Redis's own testing
    /// knob: `key_load_delay_us` per key, clients answered between every KB read), and returns
    /// while it loads: until then it answers every command `LOADING`, as a restarted Redis with
    /// a large data set does.
    pub fn restart_loading_slowly(&mut self, key_load_delay_us: u32) {
        let saved = self.cli(&["SAVE"]).expect("SAVE");
        assert_eq!(saved.trim(), "OK", "SAVE: {saved}");
        self.kill();
        self.launch(&[
            "--key-load-delay".into(),
            key_load_delay_us.to_string(),
            "--loading-process-events-interval-bytes".into(),
            "1024".into(),
        ]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.is_loading() {
            assert!(
                Instant::now() < deadline,
                "redis-server never began loading"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A number `INFO` reports (`used_memory`, `evicted_keys`...).
    pub fn info_number(&self, field: &str) -> u64 {
        let info = self.cli(&["INFO"]).expect("INFO");
        info.lines()
            .find_map(|line| line.strip_prefix(&format!("{field}:")))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in INFO"))
    }

    /// Memory pressure: `maxmemory-policy` set to `policy`, and `maxmemory` to what the server
    /// uses now plus `room` bytes. Returns the limit.
    pub fn limit_memory(&self, policy: &str, room: u64) -> u64 {
        self.cli(&["CONFIG", "SET", "maxmemory", "0"])
            .expect("CONFIG SET");
        let limit = self.info_number("used_memory") + room;
        for (name, value) in [
            ("maxmemory-policy", policy.to_owned()),
            ("maxmemory", limit.to_string()),
        ] {
            let answer = self
                .cli(&["CONFIG", "SET", name, &value])
                .expect("CONFIG SET");
            assert_eq!(answer.trim(), "OK", "CONFIG SET {name} {value}: {answer}");
        }
        limit
    }

    /// Writes `keys` filler keys of 1 KiB (each with a TTL of an hour if `expiring`, as session
    /// records have one) in one script, then waits until the server has evicted what it must
    /// to be under its `maxmemory` again (it evicts a little after each command).
    pub fn fill_past_limit(&self, keys: usize, expiring: bool) {
        let ttl = if expiring { ", 'EX', 3600" } else { "" };
        let script = format!(
            "for i = 1, {keys} do redis.call('SET', 'filler:' .. i, string.rep('x', 1024){ttl}) end"
        );
        self.cli(&["EVAL", &script, "0"]).expect("EVAL");
        let limit = self.info_number("maxmemory");
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.info_number("used_memory") > limit {
            assert!(Instant::now() < deadline, "still over maxmemory after 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Is the server loading its data set (answering `LOADING`)?
    pub fn is_loading(&self) -> bool {
        self.cli(&["PING"]).is_ok_and(|o| o.starts_with("LOADING"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn redis_cli(port: u16, args: &[&str]) -> std::io::Result<String> {
    let output = Command::new(require_program("redis-cli", "redis-tools"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A 3-master Redis Cluster on loopback.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                // The bus port defaults to the port + 10000, which may fall in the kernel's
                // ephemeral range and be taken by any outgoing connection: a free one instead.
                let bus_port = free_port().to_string();
                RedisServer::start_with(&[
                    "--cluster-port",
                    &bus_port,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addresses.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let output = redis_cli(nodes[0].port, &args).expect("redis-cli --cluster create");
        assert!(
            output.contains("[OK] All 16384 slots covered"),
            "cluster create failed:\n{output}"
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &nodes {
            loop {
                let info = node.cli(&["CLUSTER", "INFO"]).unwrap_or_default();
                if info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster did not converge:\n{info}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self { nodes }
    }

    /// Seed URLs of all nodes, comma-separated (what `RedisTarget::parse` takes).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A CA and a server certificate for 127.0.0.1/localhost; returns the CA PEM.
fn write_test_certificates(dir: &Path) -> Vec<u8> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mcp-session-operator test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let server_key = KeyPair::generate().expect("server key");
    let server_params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("params");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let server = server_params
        .signed_by(&server_key, &issuer)
        .expect("server certificate");
    let write = |name: &str, contents: String| {
        std::fs::write(dir.join(name), contents).expect("write certificate file");
    };
    write("ca.pem", ca.pem());
    write("server.pem", server.pem());
    write("server.key", server_key.serialize_pem());
    ca.pem().into_bytes()
}
