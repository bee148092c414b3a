//! HTTPS for the webhook: rustls with a swappable certificate, axum behind it.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use super::tls::CertResolver;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` over TLS on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    resolver: Arc<CertResolver>,
    app: Router,
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
    let accept = async {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "accept failed");
                    continue;
                }
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => return debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => return debug!(%peer, "TLS handshake timed out"),
                };
                let service = TowerToHyperService::new(app);
                if let Err(error) =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await
                {
                    debug!(%peer, %error, "connection ended with an error");
                }
            });
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown => {}
    }
}
