//! Real servers for the integration tests, started on free loopback ports and stopped on drop
//! (also when a test panics; and by the kernel if the test process dies, via PDEATHSIG).

#![allow(dead_code)] // Each test binary uses a different part of this module.

pub mod balancer;
pub mod containers;
pub mod control_plane;
pub mod https;
pub mod kubelet;
pub mod operator;
pub mod redis;

use std::net::TcpListener;
use std::process::Command;

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    listener.local_addr().expect("local address").port()
}

/// A test's child process, killed (SIGKILL) when dropped, also when the test panics.
pub struct Process(pub std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    /// Starts `command`, dying with the test process.
    pub fn start(command: &mut Command, what: &str) -> Self {
        Self(
            die_with_parent(command)
                .spawn()
                .unwrap_or_else(|e| panic!("start {what}: {e}")),
        )
    }

    /// SIGKILL, and wait for the exit.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM, as the kubelet stops a container, and wait for the exit.
    pub fn terminate(&mut self) {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

/// Waits until something accepts connections on the loopback `port` (30 s at most).
pub async fn wait_listening(port: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing listens on {port}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A GET on a proxy's admin port with `drain_token`: the whole HTTP/1.0 answer.
pub async fn admin_get(port: u16, path: &str, drain_token: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("admin");
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: x\r\nX-Mcp-Drain-Token: {drain_token}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut text = String::new();
    stream.read_to_string(&mut text).await.expect("read");
    text
}

/// One HTTP/1.1 request to a loopback `port` on a fresh connection: the response, its body
/// unread. `Host` is `127.0.0.1:PORT` unless `headers` name another.
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: hyper::body::Bytes,
) -> hyper::Response<hyper::body::Incoming> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("handshake");
    tokio::spawn(connection);
    let mut request = hyper::Request::builder().method(method).uri(path);
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        request = request.header("host", format!("127.0.0.1:{port}"));
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(http_body_util::Full::new(body))
        .expect("request");
    sender.send_request(request).await.expect("response")
}

/// Makes `command` die with the test process, so no server outlives a killed test run.
pub fn die_with_parent(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Finds a program the README's test command installs, with a message naming the package.
pub fn require_program(program: &str, package: &str) -> String {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/bin", "/usr/sbin"])
    {
        let path = std::path::Path::new(dir).join(program);
        if path.is_file() {
            return path.display().to_string();
        }
    }
    panic!("`{program}` not found: install the Debian package `{package}` (scripts/test.sh does)");
}
