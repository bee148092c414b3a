//! Where Redis is and how to connect to it: standalone or Cluster, plain or TLS.

use std::path::Path;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, TlsCertificates, Value};

use crate::store::StoreError;

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

/// A Redis deployment: one URL (standalone), or several seed URLs / `cluster` (Redis Cluster).
#[derive(Clone)]
pub struct RedisTarget {
    urls: Vec<String>,
    cluster: bool,
    ca_pem: Option<Vec<u8>>,
    connect_timeout: Duration,
    response_timeout: Duration,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget")
            .field("urls", &self.masked())
            .field("cluster", &self.cluster)
            .field("custom_ca", &self.ca_pem.is_some())
            .finish()
    }
}

impl RedisTarget {
    /// `redis://[user:password@]host:port[/db]`, `rediss://` for TLS; a comma-separated list of
    /// URLs names the seed nodes of a Redis Cluster.
    pub fn parse(urls: &str) -> Result<Self, StoreError> {
        let urls: Vec<String> = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect();
        if urls.is_empty() {
            return Err(StoreError::InvalidUrl {
                url: String::new(),
                reason: "it is empty".into(),
            });
        }
        for url in &urls {
            validate_url(url)?;
        }
        let cluster = urls.len() > 1;
        Ok(Self {
            urls,
            cluster,
            ca_pem: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
        })
    }

    /// Treat the URL(s) as seeds of a Redis Cluster.
    pub fn cluster(mut self, cluster: bool) -> Self {
        self.cluster = self.cluster || cluster;
        self
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// Trust this PEM CA for `rediss://` instead of the system roots.
    pub fn with_ca_pem(mut self, pem: Vec<u8>) -> Self {
        self.ca_pem = Some(pem);
        self
    }

    pub fn with_ca_file(self, path: &Path) -> Result<Self, StoreError> {
        let pem = std::fs::read(path).map_err(|source| StoreError::CaFile {
            path: path.display().to_string(),
            source,
        })?;
        Ok(self.with_ca_pem(pem))
    }

    pub fn with_timeouts(mut self, connect: Duration, response: Duration) -> Self {
        self.connect_timeout = connect;
        self.response_timeout = response;
        self
    }

    /// The URL(s) with any password replaced by `***`, for messages and logs.
    pub fn masked(&self) -> String {
        self.urls
            .iter()
            .map(|u| mask_url(u))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn certificates(&self) -> Option<TlsCertificates> {
        self.ca_pem.as_ref().map(|pem| TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.clone()),
        })
    }

    /// Connects (eagerly, so a wrong address fails here with a clear error). The connection
    /// multiplexes concurrent requests and reconnects by itself after Redis comes back.
    pub(crate) async fn connect(&self) -> Result<Conn, StoreError> {
        let fail = |source| StoreError::from_redis(&self.masked(), source);
        if self.cluster {
            let mut builder = ClusterClientBuilder::new(self.urls.clone())
                .connection_timeout(self.connect_timeout)
                .response_timeout(self.response_timeout)
                .retries(2);
            if let Some(certs) = self.certificates() {
                builder = builder.certs(certs);
            }
            let client = builder.build().map_err(fail)?;
            let conn = client.get_async_connection().await.map_err(fail)?;
            return Ok(Conn::Cluster(conn));
        }
        let url = self.urls[0].as_str();
        let client = match self.certificates() {
            Some(certs) => redis::Client::build_with_tls(url, certs),
            None => redis::Client::open(url),
        }
        .map_err(fail)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(fail)?;
        Ok(Conn::Single(conn))
    }
}

fn validate_url(url: &str) -> Result<(), StoreError> {
    let invalid = |reason: String| StoreError::InvalidUrl {
        url: mask_url(url),
        reason,
    };
    let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
    if !matches!(parsed.scheme(), "redis" | "rediss" | "redis+unix" | "unix") {
        return Err(invalid(format!(
            "scheme {:?} is not redis://, rediss:// or redis+unix://",
            parsed.scheme()
        )));
    }
    url.into_connection_info()
        .map_err(|e| invalid(e.to_string()))?;
    Ok(())
}

/// `url` with its password (or a lone username, which Redis ≥ 6 may use as a password)
/// masked. Unparsable input is masked whole after the scheme.
pub fn mask_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => match url.split_once("://") {
            Some((scheme, rest)) if rest.contains('@') => {
                let host = rest.rsplit_once('@').map_or("", |(_, h)| h);
                format!("{scheme}://***@{host}")
            }
            _ => url.to_owned(),
        },
    }
}

/// One multiplexed connection to either kind of deployment.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_passwords() {
        assert_eq!(
            mask_url("redis://:hunter2@redis:6379/0"),
            "redis://:***@redis:6379/0"
        );
        assert_eq!(
            mask_url("rediss://app:s3cr3t@h:6380"),
            "rediss://app:***@h:6380"
        );
        assert_eq!(mask_url("redis://redis:6379"), "redis://redis:6379");
        let target = RedisTarget::parse("redis://:pw@a:1,redis://:pw@b:2").unwrap();
        assert!(target.is_cluster());
        assert_eq!(target.masked(), "redis://:***@a:1,redis://:***@b:2");
        assert!(!format!("{target:?}").contains("pw"));
    }

    #[test]
    fn rejects_bad_urls_with_the_password_masked() {
        for bad in [
            "",
            "http://redis:6379",
            "redis://:pw@host:notaport",
            "not a url",
        ] {
            let err = RedisTarget::parse(bad).unwrap_err();
            assert!(matches!(err, StoreError::InvalidUrl { .. }), "{bad}: {err}");
            assert!(!err.to_string().contains(":pw@"), "{err}");
        }
    }
}
