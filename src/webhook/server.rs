//! HTTPS for the webhook: rustls with a swappable certificate, axum behind it.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use super::tls::CertResolver;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The apiserver's calls: it gives a webhook at most 30 s, and opens few connections.
const LIMITS: crate::serve::Limits = crate::serve::Limits {
    header_timeout: Duration::from_secs(30),
    body_timeout: Duration::from_secs(10),
    max_connections: 1_000,
};

/// Serves `app` over TLS on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    resolver: Arc<CertResolver>,
    app: Router,
    metrics: crate::serve::ConnectionMetrics,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = match rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(builder) => builder.with_no_client_auth().with_cert_resolver(resolver),
        Err(error) => {
            warn!(%error, "cannot configure TLS; the webhook is not served");
            return;
        }
    };
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let handshake = move |tcp: tokio::net::TcpStream| {
        let acceptor = acceptor.clone();
        async move {
            let peer = tcp.peer_addr().ok();
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => Some(tls),
                Ok(Err(error)) => {
                    debug!(?peer, %error, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    debug!(?peer, "TLS handshake timed out");
                    None
                }
            }
        }
    };
    let served = crate::serve::Served {
        app,
        accept: handshake,
        limits: LIMITS,
    };
    crate::serve::serve(listener, served, metrics, 0, shutdown).await;
}
