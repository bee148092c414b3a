//! Real servers for the integration tests, started on free loopback ports and stopped on drop
//! (also when a test panics; and by the kernel if the test process dies, via PDEATHSIG).

#![allow(dead_code)]
// Each test binary uses a different part of this module.
// The wire helpers take a request's parts as they go on the wire (port, path, session,
// credential, method, body); the crate itself keeps to five parameters (clippy.toml).
#![allow(clippy::too_many_arguments)]

pub mod balancer;
pub mod bed;
pub mod clients;
pub mod control_plane;
pub mod https;
pub mod images;
pub mod node;
pub mod operator;
pub mod proxies;
pub mod redis;
pub mod sdk;
pub mod wait;
pub mod wire;

use std::net::TcpListener;
use std::process::Command;

/// A loopback port nobody listens on right now, handed out once in this test process.
///
/// Not the kernel's pick of an ephemeral port: the kernel may give the same port to another
/// test moments after a server of this one stopped on it (a test that restarts its server then
/// talks to the other test's), or to a client connection's local end before the server binds
/// it. So the ports come from below the ephemeral range, in turn, each at most once.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = outside_ephemeral_range();
    let span = u32::from(high - low);
    assert!(span > 0, "no unprivileged port outside the ephemeral range");
    // Test processes run one at a time, but a lingering child of the last may hold its ports:
    // each process starts elsewhere in the range.
    let start = std::process::id() * 7919 % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = low + u16::try_from(offset).expect("within the range");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {low}..{high}");
}

/// The widest run of ports that neither needs privileges nor is in the kernel's ephemeral range.
fn outside_ephemeral_range() -> (u16, u16) {
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = range
        .split_whitespace()
        .filter_map(|n| n.parse::<u16>().ok());
    let (first, last) = match (bounds.next(), bounds.next()) {
        (Some(first), Some(last)) => (first, last),
        _ => (32768, 60999),
    };
    let below = (1024, first.max(1024));
    let above = (last.saturating_add(1).max(1024), u16::MAX);
    if below.1 - below.0 >= above.1 - above.0 {
        below
    } else {
        above
    }
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

    /// Sends `signal` (SIGSTOP pauses the process, SIGCONT lets it go on).
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe {
            libc::kill(self.0.id() as i32, signal);
        }
    }

    /// SIGTERM, as the kubelet stops a container, and wait for the exit.
    pub fn terminate(&mut self) {
        self.signal(libc::SIGTERM);
        let _ = self.0.wait();
    }
}

/// Connections waiting in the accept queue of what listens on the loopback `port` (the kernel
/// completes them while the listener's process is paused), from /proc/net/tcp.
pub fn accept_queue(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address, rem_address, st (0A: LISTEN), tx_queue:rx_queue, which for a
            // listening socket counts its accept queue.
            (fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A"))
                .then(|| fields.get(4)?.split(':').nth(1))
                .flatten()
                .and_then(|queued| usize::from_str_radix(queued, 16).ok())
        })
        .sum()
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
    get_at(&format!("127.0.0.1:{port}"), path, drain_token)
        .await
        .expect("admin")
}

/// [`admin_get`] at any `address` (`ip:port`); `None` if it cannot be reached.
pub async fn get_at(address: &str, path: &str, drain_token: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: x\r\nX-Mcp-Drain-Token: {drain_token}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    Some(text)
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

/// `{temp}/{root}/{this process's id}`, created; the directories of test processes that are gone
/// are removed on the way.
pub fn process_dir(root: &str) -> std::path::PathBuf {
    let root = std::env::temp_dir().join(root);
    std::fs::create_dir_all(&root).expect("a directory for test files");
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            let pid = entry.file_name().to_string_lossy().parse::<u32>().ok();
            if pid.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = root.join(std::process::id().to_string());
    std::fs::create_dir_all(&dir).expect("a directory for test files");
    dir
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
