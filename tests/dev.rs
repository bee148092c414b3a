//! `mcp-session-operator dev` with real SDK servers and clients: the server's source edited
//! twice while a client calls its unannotated tool every 50 ms, and a restart on SIGHUP.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::clients::ClientRun;
use support::mcp::{Sdk, python, start_client};
use support::{die_with_parent, free_port, wait_listening};

const MCP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp");

/// `dev`, stopped with SIGTERM at the end so that it stops its server (a SIGKILLed `dev` would
/// leave it running).
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `dev` serving on `listen`, watching `watched`, running `server`.
fn dev(listen: u16, watched: &std::path::Path, server: &[&str]) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-session-operator"));
    command
        .args(["dev", "--listen", &format!("127.0.0.1:{listen}")])
        .arg("--watch")
        .arg(watched)
        .arg("--")
        .args(server)
        .env_remove("MCP_SESSION_REDIS_URL")
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("MCP_TEST_PROXY_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
    Process(die_with_parent(&mut command).spawn().expect("start dev"))
}

/// A client of `sdk` calling `add` every 50 ms for `seconds` (20 ms each in the server)
/// through `port`, while `during` edits or signals; its summary.
async fn client_while(
    sdk: Sdk,
    port: u16,
    seconds: u32,
    during: impl std::future::Future<Output = ()>,
) -> ClientRun {
    let url = format!("http://127.0.0.1:{port}/mcp");
    let child = start_client(sdk, &url, seconds, "Bearer dev-client");
    let (output, ()) = tokio::join!(child.wait_with_output(), during);
    let output = output.expect("client");
    let text = String::from_utf8_lossy(&output.stdout);
    let summary = text
        .lines()
        .rev()
        .find(|line| line.starts_with('{'))
        .unwrap_or_else(|| panic!("{sdk:?}: no summary in {text}"));
    ClientRun::parse(summary).unwrap_or_else(|| panic!("{sdk:?}: not a summary: {summary}"))
}

/// What a developer does to a server while Cursor is connected: edits its source twice. Each
/// edit restarts it (quiesce, stop, start, resume); the client, calling an unannotated tool
/// every 50 ms, sees no error and keeps its session, for both SDKs' clients.
#[tokio::test]
async fn code_edits_restart_the_server_without_a_failed_call() {
    for sdk in [Sdk::Python, Sdk::TypeScript] {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("server.py");
        std::fs::copy(format!("{MCP}/server.py"), &source).expect("copy the server");
        let port = free_port();
        let python = python();
        let _dev = dev(
            port,
            dir.path(),
            &[&python, source.to_str().expect("path"), "{port}"],
        );
        wait_listening(port).await;
        let edits = async {
            for n in 1..=2 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                let mut text = std::fs::read_to_string(&source).expect("read");
                text.push_str(&format!("\n# edit {n}\n"));
                std::fs::write(&source, text).expect("edit");
            }
        };
        let summary = client_while(sdk, port, 10, edits).await;
        eprintln!("{sdk:?} through dev, two edits: {summary:?}");
        assert!(summary.errors.is_empty(), "{sdk:?}: {:?}", summary.errors);
        assert_eq!(summary.session_ids.len(), 1, "{sdk:?}: {summary:?}");
        assert!(summary.calls > 40, "{sdk:?}: {summary:?}");
    }
}

/// SIGHUP restarts the server too, without a failed call; SIGTERM stops `dev` (and its server).
#[tokio::test]
async fn sighup_restarts_the_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("server.py");
    std::fs::copy(format!("{MCP}/server.py"), &source).expect("copy the server");
    let port = free_port();
    let python = python();
    let dev = dev(
        port,
        dir.path(),
        &[&python, source.to_str().expect("path"), "{port}"],
    );
    wait_listening(port).await;
    let pid = nix::unistd::Pid::from_raw(dev.0.id() as i32);
    let hangups = async {
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
        }
    };
    let summary = client_while(Sdk::Python, port, 7, hangups).await;
    assert!(summary.errors.is_empty(), "{:?}", summary.errors);
    assert_eq!(summary.session_ids.len(), 1, "{summary:?}");
    let mut dev = dev;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Ok(Some(status)) = dev.0.try_wait() {
            break status;
        }
        assert!(Instant::now() < deadline, "dev did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}");
}
