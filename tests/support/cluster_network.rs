//! The apiserver's way into the cluster network: its `cluster` egress selection (an
//! EgressSelectorConfiguration naming an HTTP CONNECT proxy), which carries its calls to
//! webhooks by Service. A CONNECT to a Service's ClusterIP and port goes to one of that port's
//! endpoints, as kube-proxy on the apiserver's node would route it (computed as the balancer
//! computes them: the loopback pod IPs of the kubelet stand-in cannot be EndpointSlices); any
//! other address is dialled as it is. With a real kubelet and kube-proxy this goes.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// The egress selector configuration that sends the apiserver's cluster traffic to the Unix
/// socket `socket` (1.35's HTTP CONNECT over TCP insists on client certificates even for an
/// `http://` URL: a nil TLS configuration crashes it).
pub fn egress_configuration(socket: &std::path::Path) -> String {
    format!(
        "apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n- name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n    transport:\n      uds:\n        udsName: {}\n",
        socket.display()
    )
}

/// Serves CONNECT requests on `listener` until the process ends.
pub async fn serve(listener: UnixListener, client: Client) {
    let next = std::sync::Arc::new(AtomicUsize::new(0));
    loop {
        let Ok((connection, _)) = listener.accept().await else {
            continue;
        };
        let (client, next) = (client.clone(), next.clone());
        tokio::spawn(async move {
            let setup = tunnel_setup(connection, &client, &next);
            if let Ok(Some((mut from, mut to))) =
                tokio::time::timeout(Duration::from_secs(10), setup).await
            {
                let _ = tokio::io::copy_bidirectional(&mut from, &mut to).await;
            }
        });
    }
}

/// Reads the CONNECT request, dials where it goes and answers 200; `None` (after a 503 where
/// there is no endpoint) if it cannot.
async fn tunnel_setup(
    mut connection: UnixStream,
    client: &Client,
    next: &AtomicUsize,
) -> Option<(UnixStream, TcpStream)> {
    let mut head = Vec::new();
    let mut byte = [0_u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        connection.read_exact(&mut byte).await.ok()?;
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let target: SocketAddr = head
        .strip_prefix("CONNECT ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let candidates = match service_endpoints(client, target).await {
        Some(endpoints) => endpoints,
        None => vec![target],
    };
    if candidates.is_empty() {
        let _ = connection
            .write_all(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
            .await;
        return None;
    }
    let chosen = candidates[next.fetch_add(1, Ordering::Relaxed) % candidates.len()];
    let upstream = TcpStream::connect(chosen).await.ok()?;
    connection
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .ok()?;
    Some((connection, upstream))
}

/// The endpoints behind a ClusterIP and port; `None` if no Service has that address.
async fn service_endpoints(client: &Client, target: SocketAddr) -> Option<Vec<SocketAddr>> {
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await
        .ok()?;
    let service = services.items.into_iter().find(|s| {
        s.spec
            .as_ref()
            .and_then(|spec| spec.cluster_ip.as_deref())
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            == Some(target.ip())
    })?;
    let port = service
        .spec
        .as_ref()?
        .ports
        .iter()
        .flatten()
        .find(|p| i32::from(target.port()) == p.port)?
        .clone();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &service.namespace()?);
    Some(
        super::balancer::endpoints_of(&service, &port, &pods)
            .await
            .unwrap_or_default(),
    )
}
