//! The proxy's test harness: real MCP servers and clients of the Python and TypeScript SDKs,
//! proxies in front of them (alone, or as pods sharing Redis), and raw Streamable HTTP for the
//! steps a test must control exactly.

use std::process::{Command, Stdio};
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::body::Bytes;
use serde_json::{Value, json};

use super::clients::ClientRun;
use super::{Process, die_with_parent, free_port, http_request, wait_listening};

/// The token every test proxy's /drain, /retire and /sessions require.
pub const DRAIN_TOKEN: &str = "test-drain-token";

/// The Python with the `mcp` SDK that scripts/test.sh prepares.
pub fn python() -> String {
    std::env::var("MCP_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The MCP SDKs whose real servers and clients the tests run.
#[derive(Debug, Clone, Copy)]
pub enum Sdk {
    /// The `mcp` package from PyPI.
    Python,
    /// `@modelcontextprotocol/sdk` from npm, under node, beside its node_modules.
    TypeScript,
}

impl Sdk {
    pub fn command(self, script: &str) -> Command {
        match self {
            Self::Python => {
                let mut command = Command::new(python());
                command.arg(format!(
                    "{}/tests/mcp/{script}.py",
                    env!("CARGO_MANIFEST_DIR")
                ));
                command
            }
            Self::TypeScript => {
                let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp/ts");
                assert!(
                    std::path::Path::new(dir)
                        .join("node_modules/@modelcontextprotocol/sdk")
                        .is_dir(),
                    "the TypeScript SDK is missing: scripts/test.sh runs `npm ci` in tests/mcp/ts"
                );
                let mut command = Command::new("node");
                command.arg(format!("{dir}/{script}.mjs"));
                command
            }
        }
    }

    pub fn server(self, port: u16) -> Process {
        self.server_for(port, Wire::Streamable)
    }

    /// The SDK's server speaking `wire` (HTTP+SSE: only the Python server here).
    pub fn server_for(self, port: u16, wire: Wire) -> Process {
        self.server_with(port, wire, None)
    }

    /// As [`Sdk::server_for`]; with `call_log`, the server appends to it `received A` for every
    /// `add` call that reaches it and `began A` for every one it begins to run.
    pub fn server_with(self, port: u16, wire: Wire, call_log: Option<&std::path::Path>) -> Process {
        let mut command = self.command("server");
        command.arg(port.to_string());
        if wire == Wire::Sse {
            command.arg("--sse");
        }
        if let Some(log) = call_log {
            command.env("MCP_TEST_CALL_LOG", log);
        }
        command.stdout(Stdio::null()).stderr(Stdio::null());
        Process(
            die_with_parent(&mut command)
                .spawn()
                .unwrap_or_else(|e| panic!("start the {self:?} MCP server: {e}")),
        )
    }
}

/// MCP's HTTP transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// Streamable HTTP (2025-03-26 and later), at /mcp.
    Streamable,
    /// HTTP+SSE (2024-11-05), at /sse.
    Sse,
}

impl Wire {
    pub fn path(self) -> &'static str {
        match self {
            Self::Streamable => "/mcp",
            Self::Sse => "/sse",
        }
    }
}

pub fn mcp_server(port: u16) -> Process {
    Sdk::Python.server(port)
}

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

pub struct Reply {
    pub status: u16,
    pub session: Option<String>,
    pub body: String,
}

impl Reply {
    /// The JSON-RPC message of a JSON body or of the first SSE `data:` line.
    pub fn message(&self) -> Value {
        let text = self
            .body
            .lines()
            .find_map(|l| l.strip_prefix("data:"))
            .unwrap_or(&self.body);
        serde_json::from_str(text.trim()).unwrap_or(Value::Null)
    }
}

pub async fn post(
    port: u16,
    path: &str,
    session: Option<&str>,
    authorization: Option<&str>,
    method: &str,
    body: Value,
) -> Reply {
    let mut headers = vec![
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
        ("mcp-protocol-version", "2025-06-18"),
    ];
    headers.extend(session.map(|s| ("mcp-session-id", s)));
    headers.extend(authorization.map(|a| ("authorization", a)));
    let bytes = if body.is_null() {
        Vec::new()
    } else {
        serde_json::to_vec(&body).unwrap()
    };
    let response = http_request(port, method, path, &headers, Bytes::from(bytes)).await;
    let status = response.status().as_u16();
    let session = response
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    Reply {
        status,
        session,
        body,
    }
}

pub async fn call(port: u16, session: &str, authorization: Option<&str>, id: u64, a: i64) -> Reply {
    let request = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "add", "arguments": {"a": a, "b": 1}}});
    post(port, "/mcp", Some(session), authorization, "POST", request).await
}

/// `initialize` and `notifications/initialized` through the proxy at `port`: the session id.
pub async fn open_session(port: u16, authorization: Option<&str>) -> String {
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18",
        "capabilities": {}, "clientInfo": {"name": "raw-test-client", "version": "1.0"}}});
    let reply = post(port, "/mcp", None, authorization, "POST", init).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.message()["result"]["serverInfo"]["name"],
        "proxy-test-server"
    );
    let session = reply.session.expect("the proxy's session id");
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    assert_eq!(
        post(
            port,
            "/mcp",
            Some(&session),
            authorization,
            "POST",
            initialized
        )
        .await
        .status,
        202
    );
    session
}

pub fn result_text(reply: &Reply) -> String {
    reply.message()["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

pub async fn admin_get(port: u16, path: &str) -> String {
    super::admin_get(port, path, DRAIN_TOKEN).await
}

/// An `initialize` with extra headers, on a fresh connection: status and body.
pub async fn initialize_with(port: u16, headers: &[(&str, &str)]) -> (u16, String) {
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18",
        "capabilities": {}, "clientInfo": {"name": "raw-test-client", "version": "1.0"}}});
    let mut all = vec![
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
    ];
    all.extend_from_slice(headers);
    let response = http_request(port, "POST", "/mcp", &all, Bytes::from(init.to_string())).await;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Open file descriptors of process `pid`.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Reads from `stream` until the far end closes it (a minute at most): what it sent.
pub async fn until_closed(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut seen = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut seen)).await;
    assert!(read.is_ok(), "the proxy kept the connection open");
    String::from_utf8_lossy(&seen).into_owned()
}

/// How the server is restarted under a client.
pub struct Restarts<'a> {
    pub server: &'a mut Process,
    pub port: u16,
    /// How many restarts, and when: each this long after the client has called through the
    /// server before it (the first, after the client's first call).
    pub after: &'a [Duration],
    /// The proxy's admin port, whose /drain quiesces it first (as the backend's preStop does).
    pub quiesce_at: Option<u16>,
    /// Where the restarted servers log the calls they begin.
    pub call_log: Option<&'a std::path::Path>,
}

/// Calls a client makes after a restart before the next one: at most one of them can have been
/// answered by the server that stopped (the one a quiesce waited for), so the rest went through
/// the restarted one.
pub const CALLS_THROUGH_A_RESTART: u64 = 3;

/// What a client saw while its server was restarted.
pub struct RestartRun {
    pub client: ClientRun,
    /// Restarts the client went on calling through ([`CALLS_THROUGH_A_RESTART`] calls after
    /// each); fewer than there were restarts if it stopped calling (gave up, or hung).
    pub called_through: usize,
}

/// Runs an SDK's client against `url` while its server is restarted (SIGTERM the first time,
/// SIGKILL the second: unquiesced, a call is in flight about a third of the time, and either
/// way the server drops it) and started again at once; the client lists the tools, then calls
/// `add` every 50 ms, each call taking 20 ms on the server.
///
/// Each restart waits for the client to call through the server before it, and the client is
/// stopped once it has called through the last: on a loaded machine a Python server takes
/// seconds to start, and restarts on a clock would overlap, or fall after a client that had
/// stopped.
pub async fn client_through_restarts(
    sdk: Sdk,
    wire: Wire,
    url: &str,
    restarts: Restarts<'_>,
) -> RestartRun {
    let Restarts {
        server: upstream,
        port: upstream_port,
        after,
        quiesce_at,
        call_log,
    } = restarts;
    let mut client = SdkClient::start(sdk, url, "Bearer client-token");
    assert!(client.calls_on(1).await, "the client never called");
    let mut called_through = 0;
    for (n, pause) in after.iter().enumerate() {
        tokio::time::sleep(*pause).await;
        // Signalled as the kubelet does: the preStop hook quiesces the proxy first.
        if let Some(admin) = quiesce_at {
            let quiesced = admin_get(admin, "/drain").await;
            assert!(quiesced.contains("quiesced"), "{quiesced}");
        }
        if n % 2 == 0 {
            upstream.terminate();
        } else {
            upstream.kill();
        }
        *upstream = sdk.server_with(upstream_port, wire, call_log);
        // A client that gave up (the Python one, without the proxy) ends here.
        if !client.calls_on(CALLS_THROUGH_A_RESTART).await {
            break;
        }
        called_through += 1;
    }
    RestartRun {
        client: client.stop().await,
        called_through,
    }
}

/// `tools/call` of `tool` with `arguments`.
pub async fn call_tool(
    port: u16,
    session: &str,
    authorization: Option<&str>,
    id: u64,
    tool: &str,
    arguments: Value,
) -> Reply {
    let request = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": arguments}});
    post(port, "/mcp", Some(session), authorization, "POST", request).await
}

pub async fn list_tools(port: u16, session: &str, authorization: Option<&str>) {
    let request = json!({"jsonrpc": "2.0", "id": 900, "method": "tools/list"});
    let reply = post(port, "/mcp", Some(session), authorization, "POST", request).await;
    let tools = reply.message()["result"]["tools"].clone();
    let declared = |name: &str| {
        tools
            .as_array()
            .and_then(|t| t.iter().find(|tool| tool["name"] == name))
            .map(|tool| tool["annotations"]["readOnlyHint"].clone())
    };
    assert_eq!(
        declared("add_read_only"),
        Some(json!(true)),
        "{}",
        reply.body
    );
    assert_eq!(
        declared("add"),
        Some(Value::Null),
        "the main tool is unannotated"
    );
}

/// One server-sent event as a client sees it.
#[derive(Debug, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub data: Option<String>,
    pub retry: Option<u64>,
}

/// A client's open event stream.
pub struct EventStream {
    pub status: u16,
    pub body: hyper::body::Incoming,
    pub buffer: String,
    /// Why the stream broke off (no terminating chunk), if it did.
    pub broken: Option<String>,
}

impl EventStream {
    /// `GET /mcp` for the session, resuming after `last_event_id` if given.
    pub async fn open(
        port: u16,
        session: &str,
        authorization: Option<&str>,
        last_event_id: Option<&str>,
    ) -> Self {
        let mut headers = vec![
            ("accept", "text/event-stream"),
            ("mcp-protocol-version", "2025-06-18"),
            ("mcp-session-id", session),
        ];
        headers.extend(authorization.map(|a| ("authorization", a)));
        headers.extend(last_event_id.map(|l| ("last-event-id", l)));
        Self::request(port, "GET", &headers, Bytes::new()).await
    }

    pub async fn request(port: u16, method: &str, headers: &[(&str, &str)], body: Bytes) -> Self {
        let response = http_request(port, method, "/mcp", headers, body).await;
        Self {
            status: response.status().as_u16(),
            body: response.into_body(),
            buffer: String::new(),
            broken: None,
        }
    }

    /// The next event, `None` when the stream ends (see `broken`); panics after 20 s of silence.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent::default();
                for line in block.lines() {
                    let (name, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
                    match name {
                        "id" => event.id = Some(value),
                        "data" => event.data = Some(value),
                        "retry" => event.retry = value.parse().ok(),
                        _ => {}
                    }
                }
                return Some(event);
            }
            let frame = tokio::time::timeout(Duration::from_secs(20), self.body.frame())
                .await
                .expect("an event within 20 s")?;
            let frame = match frame {
                Ok(frame) => frame,
                Err(error) => {
                    self.broken = Some(error.to_string());
                    return None;
                }
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            self.buffer.push_str(&String::from_utf8_lossy(&data));
        }
    }

    /// The next event that carries a message.
    pub async fn next_message(&mut self) -> Option<SseEvent> {
        loop {
            let event = self.next().await?;
            if event.data.as_deref().is_some_and(|d| !d.is_empty()) {
                return Some(event);
            }
        }
    }
}

pub const LIST_CHANGED: &str = "notifications/resources/list_changed";

/// Calls `notify` until the listening stream gets the notification (a restarted upstream's
/// stream is reopened behind the client's in the background).
pub async fn notify_until_heard(
    port: u16,
    session: &str,
    token: Option<&str>,
    stream: &mut EventStream,
) -> SseEvent {
    let heard = tokio::spawn({
        let session = session.to_owned();
        let token = token.map(str::to_owned);
        async move {
            for id in 1000.. {
                call_tool(port, &session, token.as_deref(), id, "notify", json!({})).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    });
    let event = stream.next_message().await.expect("the stream goes on");
    heard.abort();
    assert!(
        event
            .data
            .as_deref()
            .unwrap_or_default()
            .contains(LIST_CHANGED),
        "{event:?}"
    );
    event
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

/// A test client that calls a tool repeatedly until stopped, printing a line per call (`ok N`
/// or `error ...`) and then its summary, as JSON. It counts the calls as it reports them, so
/// that a test waits for it to call through what it disrupted rather than guessing how long that
/// takes.
pub struct SdkClient {
    /// Holds the file whose existence stops the client (its `MCP_TEST_STOP_FILE`).
    stop_dir: tempfile::TempDir,
    /// Calls made so far, answered or failed.
    calls: tokio::sync::watch::Receiver<u64>,
    summary: tokio::task::JoinHandle<Option<String>>,
}

impl SdkClient {
    /// Longest a client may take over one call before [`calls_on`](Self::calls_on) gives up.
    const PATIENCE: Duration = Duration::from_secs(60);

    /// The SDK's test client at `url`, presenting `authorization`: it lists the tools, then
    /// calls the unannotated `add` every 50 ms (20 ms each in the server), for 5 minutes at most.
    pub fn start(sdk: Sdk, url: &str, authorization: &str) -> Self {
        let mut command = tokio::process::Command::from(sdk.command("client"));
        command
            .args([url, "300", "0.05", authorization])
            .env("MCP_TEST_TOOL_DELAY", "0.02")
            .stderr(Stdio::null());
        Self::spawn(command)
    }

    /// Starts `command`, a client that reports as [`SdkClient`] describes and stops once the
    /// file `MCP_TEST_STOP_FILE` names exists.
    pub fn spawn(mut command: tokio::process::Command) -> Self {
        use tokio::io::AsyncBufReadExt as _;
        let stop_dir = tempfile::tempdir().expect("temporary directory");
        let mut client = command
            .env("MCP_TEST_STOP_FILE", stop_dir.path().join("stop"))
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the client");
        let stdout = client.stdout.take().expect("stdout");
        let (count, calls) = tokio::sync::watch::channel(0);
        let summary = tokio::spawn(async move {
            // The child whole, not just its stdout: it is killed when dropped.
            let _client = client;
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            let mut summary = None;
            while let Ok(Some(line)) = lines.next_line().await {
                if line.starts_with("ok ") || line.starts_with("error ") {
                    count.send_modify(|calls| *calls += 1);
                } else if line.starts_with('{') {
                    summary = Some(line);
                }
            }
            summary
        });
        Self {
            stop_dir,
            calls,
            summary,
        }
    }

    /// Waits until the client has made `more` calls after those it has made by now (answered
    /// or failed); false if it ended first, or took over a minute for one.
    pub async fn calls_on(&mut self, more: u64) -> bool {
        let made_by_now = *self.calls.borrow_and_update();
        for target in made_by_now + 1..=made_by_now + more {
            let made = self.calls.wait_for(|&calls| calls >= target);
            match tokio::time::timeout(Self::PATIENCE, made).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => return false,
            }
        }
        true
    }

    /// Stops the client: its summary line, `None` if it printed none.
    pub async fn stop_for_summary(self) -> Option<String> {
        std::fs::write(self.stop_dir.path().join("stop"), b"").expect("stop the client");
        self.summary.await.expect("the client's output")
    }

    /// Stops the client: its summary.
    pub async fn stop(self) -> ClientRun {
        let summary = self.stop_for_summary().await.expect("a summary line");
        ClientRun::parse(&summary).unwrap_or_else(|| panic!("not a client summary: {summary}"))
    }

    /// Stops the client, and asserts that it saw no error and one session.
    pub async fn stop_unbroken(self, what: &str) -> ClientRun {
        let run = self.stop().await;
        eprintln!("{what}: {run:?}");
        assert_eq!(run.errors, Vec::<String>::new(), "{what}: {run:?}");
        assert_eq!(run.session_ids.len(), 1, "{what}: {run:?}");
        run
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

/// A bearer JWT for `subject` (the proxy reads its claims; the signature is the backend's to
/// check, and these test servers check none).
pub fn jwt(subject: &str, serial: u32) -> String {
    use base64::Engine as _;
    let encode =
        |value: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string());
    let claims = json!({"iss": "https://idp.example", "sub": subject, "exp": 1_900_000_000 + serial, "jti": serial});
    format!(
        "Bearer {}.{}.signature-{serial}",
        encode(json!({"alg": "RS256", "typ": "JWT"})),
        encode(claims)
    )
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
