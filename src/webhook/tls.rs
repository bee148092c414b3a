//! The webhook's serving certificate: managed by the operator (a CA and a certificate in a
//! Secret, renewed before expiry) or read from files (cert-manager), and swapped into the
//! running TLS server without a restart.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::info;

use super::WebhookError;

const NOT_AFTER: &str = "mcpsession.dev/not-after";
const SANS: &str = "mcpsession.dev/sans";
const CA_COMMON_NAME: &str = "mcp-session-operator webhook CA";
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Hands the current certificate to every TLS handshake; replaced in place on rotation.
#[derive(Debug, Default)]
pub struct CertResolver {
    current: RwLock<Option<(String, Arc<CertifiedKey>)>>,
}

impl CertResolver {
    /// Installs `cert_pem` (chain) and `key_pem` unless they are what is served already.
    pub fn install(&self, cert_pem: &str, key_pem: &str) -> Result<bool, WebhookError> {
        if self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|(pem, _)| pem == cert_pem)
        {
            return Ok(false);
        }
        let bad = |what: &str, e: String| WebhookError::Tls(format!("{what}: {e}"));
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| bad("certificate PEM", e.to_string()))?;
        if chain.is_empty() {
            return Err(bad("certificate PEM", "no certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| bad("key PEM", e.to_string()))?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| bad("key", e.to_string()))?;
        let certified = CertifiedKey::new(chain, signing);
        // A certificate file rewritten before its key (or the reverse) is not served half-new.
        certified
            .keys_match()
            .map_err(|e| bad("certificate and key", e.to_string()))?;
        let certified = Arc::new(certified);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) =
            Some((cert_pem.to_owned(), certified));
        Ok(true)
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(_, key)| key.clone())
    }
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum TlsSource {
    /// The operator's own CA and certificate, in a Secret of its namespace.
    Managed {
        secret: String,
        /// DNS names and IP addresses the certificate is for.
        names: Vec<String>,
        validity: Duration,
    },
    /// PEM files, e.g. mounted from a cert-manager Certificate; `ca` is the caBundle, if the
    /// operator should set it (cert-manager's CA injector can do that instead).
    Files {
        cert: PathBuf,
        key: PathBuf,
        ca: Option<PathBuf>,
    },
}

/// Loads the certificate into `resolver`, creating or renewing it first where the operator
/// manages it. Returns the CA PEM for the webhook configurations' `caBundle`, if known.
pub async fn refresh(
    source: &TlsSource,
    secrets: &Api<Secret>,
    resolver: &CertResolver,
) -> Result<Option<String>, WebhookError> {
    match source {
        TlsSource::Files { cert, key, ca } => {
            let read = |path: &PathBuf| {
                std::fs::read_to_string(path)
                    .map_err(|e| WebhookError::Tls(format!("reading {}: {e}", path.display())))
            };
            if resolver.install(&read(cert)?, &read(key)?)? {
                info!(cert = %cert.display(), "serving the webhook certificate from files");
            }
            ca.as_ref().map(read).transpose()
        }
        TlsSource::Managed {
            secret,
            names,
            validity,
        } => {
            let stored = managed(secrets, secret, names, *validity).await?;
            if resolver.install(&stored.cert, &stored.key)? {
                info!(secret = %secret, "serving the webhook certificate from its Secret");
            }
            Ok(Some(stored.ca_cert))
        }
    }
}

/// The certificate in the Secret `name`, issued (or renewed) first if it is missing, for other
/// names, or near its end. Replicas that start together race to write it: the one that loses
/// reads the winner's certificate and serves that one.
async fn managed(
    secrets: &Api<Secret>,
    name: &str,
    names: &[String],
    validity: Duration,
) -> Result<Stored, WebhookError> {
    let mut lost_races = 0;
    loop {
        let current = secrets.get_opt(name).await.map_err(WebhookError::Kube)?;
        if let Some(stored) = current
            .as_ref()
            .and_then(|s| Stored::read(s, names, validity))
        {
            return Ok(stored);
        }
        let ca = current.as_ref().and_then(Stored::ca);
        let issued = issue(names, validity, ca)?;
        match write(secrets, name, current, &issued).await? {
            Write::Done => {
                info!(secret = %name, "issued a new webhook serving certificate");
                return Ok(issued);
            }
            Write::AnotherReplicaFirst if lost_races < MAX_LOST_RACES => lost_races += 1,
            Write::AnotherReplicaFirst => {
                return Err(WebhookError::Tls(format!(
                    "the certificate Secret {name} changed under every one of {MAX_LOST_RACES} writes"
                )));
            }
        }
    }
}

/// How often in a row a replica may find that another wrote the certificate Secret first; each
/// time it reads what the other wrote, which serves unless it is stale again at once.
const MAX_LOST_RACES: u32 = 3;

/// How a write of the certificate Secret went.
enum Write {
    Done,
    /// The Secret changed since it was read (created or rotated by another replica).
    AnotherReplicaFirst,
}

/// The contents of the certificate Secret.
struct Stored {
    ca_cert: String,
    ca_key: String,
    cert: String,
    key: String,
    not_after: SystemTime,
    sans: String,
}

impl Stored {
    fn field(secret: &Secret, key: &str) -> Option<String> {
        secret
            .data
            .as_ref()?
            .get(key)
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
    }

    fn ca(secret: &Secret) -> Option<(String, String)> {
        Some((
            Self::field(secret, "ca.crt")?,
            Self::field(secret, "ca.key")?,
        ))
    }

    /// The stored certificate, if it is for `names` and has over a third of its validity left.
    fn read(secret: &Secret, names: &[String], validity: Duration) -> Option<Self> {
        let annotations = secret.metadata.annotations.as_ref()?;
        let not_after = chrono::DateTime::parse_from_rfc3339(annotations.get(NOT_AFTER)?).ok()?;
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(not_after.timestamp()).ok()?);
        let sans = annotations.get(SANS)?.clone();
        if sans != names.join(",") || not_after < SystemTime::now() + validity / 3 {
            return None;
        }
        let (ca_cert, ca_key) = Self::ca(secret)?;
        Some(Self {
            ca_cert,
            ca_key,
            cert: Self::field(secret, "tls.crt")?,
            key: Self::field(secret, "tls.key")?,
            not_after,
            sans,
        })
    }
}

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// A serving certificate for `names`, signed by the existing CA (so the caBundle stays) or a new one.
fn issue(
    names: &[String],
    validity: Duration,
    ca: Option<(String, String)>,
) -> Result<Stored, WebhookError> {
    let tls = |e: rcgen::Error| WebhookError::Tls(e.to_string());
    let now = SystemTime::now();
    let (ca_cert, ca_key) =
        match ca.and_then(|(cert, key)| KeyPair::from_pem(&key).ok().map(|k| (cert, k))) {
            Some(existing) => existing,
            None => {
                let key = KeyPair::generate().map_err(tls)?;
                let mut params = ca_params().map_err(tls)?;
                params.not_before = now.into();
                params.not_after = (now + CA_VALIDITY).into();
                (params.self_signed(&key).map_err(tls)?.pem(), key)
            }
        };
    let issuer_params = ca_params().map_err(tls)?;
    let issuer = Issuer::from_params(&issuer_params, &ca_key);
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    for name in names {
        params.subject_alt_names.push(match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.clone().try_into().map_err(tls)?),
        });
    }
    let not_after = now + validity;
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = not_after.into();
    let key = KeyPair::generate().map_err(tls)?;
    let cert = params.signed_by(&key, &issuer).map_err(tls)?;
    Ok(Stored {
        ca_cert,
        ca_key: ca_key.serialize_pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
        not_after,
        sans: names.join(","),
    })
}

async fn write(
    secrets: &Api<Secret>,
    name: &str,
    current: Option<Secret>,
    stored: &Stored,
) -> Result<Write, WebhookError> {
    let not_after = chrono::DateTime::<chrono::Utc>::from(stored.not_after).to_rfc3339();
    let data = BTreeMap::from([
        (
            "ca.crt".to_owned(),
            ByteString(stored.ca_cert.clone().into_bytes()),
        ),
        (
            "ca.key".to_owned(),
            ByteString(stored.ca_key.clone().into_bytes()),
        ),
        (
            "tls.crt".to_owned(),
            ByteString(stored.cert.clone().into_bytes()),
        ),
        (
            "tls.key".to_owned(),
            ByteString(stored.key.clone().into_bytes()),
        ),
    ]);
    let annotations = BTreeMap::from([
        (NOT_AFTER.to_owned(), not_after),
        (SANS.to_owned(), stored.sans.clone()),
    ]);
    let result = match current {
        Some(mut secret) => {
            secret.data = Some(data);
            secret
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .extend(annotations);
            // Carries the resourceVersion read: a replica that rotated first wins, we re-read.
            secrets.replace(name, &PostParams::default(), &secret).await
        }
        None => {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    annotations: Some(annotations),
                    ..Default::default()
                },
                data: Some(data),
                type_: Some("Opaque".into()),
                ..Default::default()
            };
            secrets.create(&PostParams::default(), &secret).await
        }
    };
    match result {
        Ok(_) => Ok(Write::Done),
        // A create that finds the Secret, or a replace whose resourceVersion is stale.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(Write::AnotherReplicaFirst),
        Err(e) => Err(WebhookError::Kube(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_load_and_reuse_their_ca() {
        let names = vec!["webhook.mcp-system.svc".to_owned(), "127.0.0.1".to_owned()];
        let first = issue(&names, Duration::from_secs(3600), None).unwrap();
        let resolver = CertResolver::default();
        assert!(resolver.install(&first.cert, &first.key).unwrap());
        assert!(
            !resolver.install(&first.cert, &first.key).unwrap(),
            "unchanged: no reload"
        );
        let renewed = issue(
            &names,
            Duration::from_secs(3600),
            Some((first.ca_cert.clone(), first.ca_key.clone())),
        )
        .unwrap();
        assert_eq!(
            renewed.ca_cert, first.ca_cert,
            "a renewal keeps the CA, so the caBundle stays valid"
        );
        assert_ne!(renewed.cert, first.cert);
        assert!(resolver.install(&renewed.cert, &renewed.key).unwrap());
        assert!(resolver.install("garbage", "garbage").is_err());
        assert!(
            resolver.install(&first.cert, &renewed.key).is_err(),
            "a key of another certificate is refused"
        );
    }
}
