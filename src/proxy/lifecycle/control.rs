//! What the admin port ([`crate::proxy::lifecycle::admin`]) may do with the serving proxy: check a drain token,
//! report readiness, quiesce or retire it, list its sessions, encode its metrics. A handle, so
//! that the admin server reaches nothing else of the proxy.

use std::sync::Arc;

use crate::proxy::{Proxy, Quiesced};
use crate::store::SessionId;

pub struct Control(Arc<Proxy>);

/// This proxy's sessions: ids only (the upstream's ids are the upstream's secrets).
#[derive(serde::Serialize)]
pub struct Sessions {
    pod: Option<String>,
    draining: bool,
    sessions: Vec<SessionId>,
}

/// Whether the pod should get new connections.
pub enum Readiness {
    /// Serving; `unstored` sessions live only in memory (the store refused or lost them).
    Ready {
        unstored: usize,
    },
    Draining,
    /// The MCP server is restarting: requests are held meanwhile.
    Quiesced,
    /// Gateway mode: the policy's pods are not listed yet.
    NoBackends,
}

impl Control {
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self(proxy)
    }

    /// What `/drain`, `/retire` and `/sessions` require; `None`: they answer nobody.
    pub fn drain_token(&self) -> Option<&str> {
        self.0.config.drain_token.as_deref()
    }

    pub fn readiness(&self) -> Readiness {
        if self.0.lifecycle.draining() {
            Readiness::Draining
        } else if self.0.quiesced() {
            Readiness::Quiesced
        } else if !self.0.upstream.backends().known() {
            Readiness::NoBackends
        } else {
            Readiness::Ready {
                unstored: self.0.unstored.len(),
            }
        }
    }

    /// See [`Proxy::quiesce`].
    pub async fn quiesce(&self) -> Quiesced {
        self.0.quiesce().await
    }

    /// See [`Proxy::retire_before_backend_stops`]; returns the sessions handed over.
    pub async fn retire(&self) -> u64 {
        self.0.retire_before_backend_stops().await
    }

    pub fn sessions(&self) -> Sessions {
        Sessions {
            pod: self.0.config.pod_name.clone(),
            draining: self.0.lifecycle.draining(),
            sessions: self.0.table.ids(),
        }
    }

    /// The proxy's metrics in the OpenMetrics text format.
    pub fn encode_metrics(&self, out: &mut String) -> std::fmt::Result {
        prometheus_client::encoding::text::encode(out, &self.0.metrics.registry)
    }
}
