//! A tiny HTTPS server for tests that need the apiserver to call them (webhooks): a serving
//! certificate for 127.0.0.1 signed by a fresh CA, and a handler from request body to response.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub type Handler = Arc<dyn Fn(&str, Vec<u8>) -> Vec<u8> + Send + Sync>;

pub struct HttpsServer {
    pub address: SocketAddr,
    /// PEM of the CA that signed the serving certificate (a webhook's `caBundle`).
    pub ca_pem: String,
    task: tokio::task::JoinHandle<()>,
}

impl HttpsServer {
    pub async fn start(handler: Handler) -> Self {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "test webhook CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
        let cert = params
            .signed_by(&key, &Issuer::from_params(&ca_params, &ca_key))
            .expect("cert");

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocols")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, handler) = (acceptor.clone(), handler.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |request: hyper::Request<hyper::body::Incoming>| {
                            let handler = handler.clone();
                            async move {
                                let path = request.uri().path().to_owned();
                                let body = request
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes().to_vec())
                                    .unwrap_or_default();
                                let response = handler(&path, body);
                                let mut reply =
                                    hyper::Response::new(Full::new(Bytes::from(response)));
                                reply.headers_mut().insert(
                                    "content-type",
                                    "application/json".parse().expect("header"),
                                );
                                Ok::<_, Infallible>(reply)
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            address,
            ca_pem: ca.pem(),
            task,
        }
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to `127.0.0.1:{port}`, trusting only `ca_pem`; also the server's leaf
/// certificate in DER.
async fn tls_connect(port: u16, ca_pem: &str) -> (TlsStream, Vec<u8>) {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let server_name = rustls::pki_types::ServerName::IpAddress(
        std::net::IpAddr::from(Ipv4Addr::LOCALHOST).into(),
    );
    let tls = connector
        .connect(server_name, tcp)
        .await
        .expect("TLS handshake");
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    (tls, leaf)
}

/// An HTTP/1.1 connection over TLS to `127.0.0.1:{port}`, trusting only `ca_pem`; also the
/// server's leaf certificate in DER.
pub async fn connect(port: u16, ca_pem: &str) -> (Sender, Vec<u8>) {
    let (tls, leaf) = tls_connect(port, ca_pem).await;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP handshake");
    tokio::spawn(connection);
    (sender, leaf)
}

/// POSTs a JSON body of `length` bytes and returns the status the server answered with, even
/// when it answers before the body is sent and closes the connection under the upload, as a
/// server refusing an oversized body may. Go's HTTP client, the apiserver's, reads such an
/// early answer; hyper's client reports the failed write instead when the close wins the race,
/// so this writes and reads on their own tasks and keeps only the answer.
pub async fn post_status_during_upload(port: u16, ca_pem: &str, path: &str, length: usize) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (tls, _) = tls_connect(port, ca_pem).await;
    let (mut reader, mut writer) = tokio::io::split(tls);
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
         content-length: {length}\r\n\r\n"
    );
    let upload = tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await?;
        let chunk = vec![b' '; 64 * 1024];
        let mut left = length;
        while left > 0 {
            let n = left.min(chunk.len());
            writer.write_all(&chunk[..n]).await?;
            left -= n;
        }
        writer.flush().await
    });
    let mut answer = Vec::new();
    let read = async {
        let mut buffer = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = reader.read(&mut buffer).await.expect("read the answer");
            assert!(n > 0, "the connection closed before an answer: {answer:?}");
            answer.extend_from_slice(&buffer[..n]);
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), read)
        .await
        .expect("an answer within 30 s");
    upload.abort();
    let head = String::from_utf8_lossy(&answer);
    head.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head}"))
}

/// Sends one JSON POST on `sender`: (status, body).
pub async fn send(sender: &mut Sender, path: &str, body: Vec<u8>) -> Result<(u16, String), String> {
    let request = hyper::Request::post(path)
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    sender.ready().await.map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// POSTs `body` to `https://127.0.0.1:{port}{path}` on a new connection, trusting only
/// `ca_pem`: (status, body, the server's leaf certificate in DER).
pub async fn post(port: u16, ca_pem: &str, path: &str, body: Vec<u8>) -> (u16, String, Vec<u8>) {
    let (mut sender, leaf) = connect(port, ca_pem).await;
    let (status, body) = send(&mut sender, path, body).await.expect("response");
    (status, body, leaf)
}
