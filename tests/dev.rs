//! `mcp-session-operator dev` with real SDK servers and clients: the server's source edited
//! twice while a client calls its unannotated tool every 50 ms, and a restart on SIGHUP.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::sdk::{CALLS_THROUGH_A_RESTART, Sdk, SdkClient, python};
use support::wait::{wait_for, wait_until};
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

/// The MCP server `dev` runs now: its child process.
fn server_of(dev: &Process) -> Option<u32> {
    let parent = dev.0.id().to_string();
    let processes = std::fs::read_dir("/proc").ok()?;
    processes.flatten().find_map(|process| {
        let stat = std::fs::read_to_string(process.path().join("stat")).ok()?;
        // `pid (comm) state ppid ...`, and a comm may hold spaces.
        let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
        if ppid != parent {
            return None;
        }
        process.file_name().to_str()?.parse().ok()
    })
}

/// `disrupt` twice, while a client of `sdk` calls `add` every 50 ms (20 ms each in the server)
/// through `dev` on `port`: each time once the client has called for a while, and then until
/// `dev` runs a new server and the client has called through it. The client must see no error
/// and keep its session.
async fn client_through(sdk: Sdk, dev: &Process, port: u16, mut disrupt: impl FnMut(u32)) {
    let url = format!("http://127.0.0.1:{port}/mcp");
    let mut client = SdkClient::start(sdk, &url, "Bearer dev-client");
    assert!(client.calls_on(1).await, "{sdk:?}: the client never called");
    for n in 1..=2 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = server_of(dev);
        disrupt(n);
        wait_for(
            Duration::from_secs(60),
            "dev to run a new server",
            || async { server_of(dev).is_some_and(|now| Some(now) != before) },
        )
        .await;
        assert!(
            client.calls_on(CALLS_THROUGH_A_RESTART).await,
            "{sdk:?}: the client stopped calling after restart {n}"
        );
    }
    client.stop_unbroken(&format!("{sdk:?} through dev")).await;
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
        let dev = dev(
            port,
            dir.path(),
            &[&python, source.to_str().expect("path"), "{port}"],
        );
        wait_listening(port).await;
        let edit = |n| {
            let mut text = std::fs::read_to_string(&source).expect("read");
            text.push_str(&format!("\n# edit {n}\n"));
            std::fs::write(&source, text).expect("edit");
        };
        client_through(sdk, &dev, port, edit).await;
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
    let hang_up =
        |_| nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    client_through(Sdk::Python, &dev, port, hang_up).await;
    let mut dev = dev;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = wait_until(Duration::from_secs(20), "dev to stop on SIGTERM", || {
        std::future::ready(dev.0.try_wait().ok().flatten().ok_or_else(String::new))
    })
    .await;
    assert!(status.success(), "{status}");
}
