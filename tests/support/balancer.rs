//! A load balancer for the proxy tests' pods, which are local processes, not pods: spreads TCP
//! connections round-robin over the backends the test adds that are ready (readiness polled
//! every 100 ms), as a Service's kube-proxy rules do. Connections are never sticky: what an MCP
//! client opens next may reach any ready pod. (The rollout bed's pods are real, and so is its
//! kube-proxy.)

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// A pod behind the Service: where it serves, and its readiness endpoint.
#[derive(Debug, Clone)]
pub struct Backend {
    pub serve: SocketAddr,
    pub ready: SocketAddr,
}

struct Member {
    backend: Backend,
    ready: AtomicBool,
    /// Taken out of the endpoints (its pod is terminating).
    removed: AtomicBool,
}

pub struct Balancer {
    pub port: u16,
    members: Arc<Mutex<Vec<Arc<Member>>>>,
    task: tokio::task::JoinHandle<()>,
    /// Connections handed to each backend so far, by serve address.
    pub connections: Arc<Mutex<Vec<(SocketAddr, usize)>>>,
}

impl Balancer {
    pub async fn start(backends: Vec<Backend>) -> Self {
        let balancer = Self::listen().await;
        for backend in backends {
            balancer.add(backend);
        }
        balancer
    }

    async fn listen() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let members: Arc<Mutex<Vec<Arc<Member>>>> = Arc::default();
        let connections: Arc<Mutex<Vec<(SocketAddr, usize)>>> = Arc::default();
        Self {
            port,
            members: members.clone(),
            task: tokio::spawn(serve(listener, members.clone(), connections.clone())),
            connections,
        }
    }

    /// A new pod joins (not ready until its probe says so).
    pub fn add(&self, backend: Backend) {
        let member = Arc::new(Member {
            backend,
            ready: AtomicBool::new(false),
            removed: AtomicBool::new(false),
        });
        tokio::spawn(probe(member.clone()));
        self.members.lock().unwrap().push(member);
    }

    /// A pod is deleted: the endpoints drop it at once, whatever its probe says, before its
    /// containers are stopped.
    pub fn remove(&self, serve: SocketAddr) {
        for member in self.members.lock().unwrap().iter() {
            if member.backend.serve == serve {
                member.removed.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Ready backends right now.
    pub fn ready(&self) -> Vec<SocketAddr> {
        self.members
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.serves())
            .map(|m| m.backend.serve)
            .collect()
    }

    /// Waits until `n` backends are ready.
    pub async fn wait_ready(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.ready().len() < n {
            assert!(tokio::time::Instant::now() < deadline, "{n} ready backends");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Member {
    fn serves(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.removed.load(Ordering::SeqCst)
    }
}

async fn probe(member: Arc<Member>) {
    loop {
        let ready = probe_once(member.backend.ready).await;
        member.ready.store(ready, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn probe_once(address: SocketAddr) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(address).await.ok()?;
        stream
            .write_all(b"GET /readyz HTTP/1.0\r\nHost: probe\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0_u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.ends_with(b"200"))
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

async fn serve(
    listener: TcpListener,
    members: Arc<Mutex<Vec<Arc<Member>>>>,
    connections: Arc<Mutex<Vec<(SocketAddr, usize)>>>,
) {
    let next = AtomicUsize::new(0);
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            continue;
        };
        let ready: Vec<SocketAddr> = members
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.serves())
            .map(|m| m.backend.serve)
            .collect();
        if ready.is_empty() {
            continue; // No endpoints: the connection is reset, as kube-proxy does.
        }
        let target = ready[next.fetch_add(1, Ordering::Relaxed) % ready.len()];
        {
            let mut counts = connections.lock().unwrap();
            match counts.iter_mut().find(|(a, _)| *a == target) {
                Some((_, n)) => *n += 1,
                None => counts.push((target, 1)),
            }
        }
        tokio::spawn(async move {
            if let Ok(mut backend) = TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
            }
        });
    }
}
