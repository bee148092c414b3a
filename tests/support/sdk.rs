//! Real MCP servers and clients of the Python and TypeScript SDKs: starting them, the clients
//! that call a tool until stopped, and a server restarted under its client.

use std::process::{Command, Stdio};
use std::time::Duration;

use super::clients::ClientRun;
use super::proxies::admin_get;
use super::{Process, die_with_parent};

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
    /// The name the test server of this SDK gives in its `initialize` answer.
    pub fn server_name(self) -> &'static str {
        match self {
            Self::Python => "proxy-test-server",
            Self::TypeScript => "ts-test-server",
        }
    }

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
