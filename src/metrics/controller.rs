//! The controller's metrics: sessions per policy and pod, reconciles, drains and what the
//! proxies report, and the latency of its Redis operations.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::latency_buckets;
use crate::store::SessionCounts;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyStateLabels {
    pub namespace: String,
    pub policy: String,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub namespace: String,
    pub policy: String,
    pub pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DrainLabels {
    pub namespace: String,
    pub policy: String,
    /// Who drained: `proxy` (a stopping pod's proxy) or `sweep` (the operator, for a pod that
    /// no longer exists).
    pub by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub namespace: String,
    pub policy: String,
}

/// A policy, as metric series know it.
type PolicyKey = (String, String);

pub struct ControllerMetrics {
    sessions: Family<PolicyStateLabels, Gauge>,
    sessions_per_pod: Family<PodLabels, Gauge>,
    reconciles: Family<ResultLabels, Counter>,
    reconcile_duration: Histogram,
    redis_duration: Family<OperationLabels, Histogram>,
    drains: Family<DrainLabels, Counter>,
    rehydrations: Family<PolicyLabels, Counter>,
    lost: Family<PolicyLabels, Counter>,
    redis_up: Family<PolicyLabels, Gauge>,
    waiting: Family<PolicyLabels, Gauge>,
    /// Pods with a series, per policy, so that series of vanished pods can be removed.
    pods_with_series: Mutex<BTreeMap<PolicyKey, BTreeSet<String>>>,
}

impl ControllerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let sessions = Family::<PolicyStateLabels, Gauge>::default();
        registry.register(
            "mcp_sessions",
            "Sessions of a policy by state (active, draining)",
            sessions.clone(),
        );
        let sessions_per_pod = Family::<PodLabels, Gauge>::default();
        registry.register(
            "mcp_sessions_per_pod",
            "Active sessions owned by each selected pod",
            sessions_per_pod.clone(),
        );
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register(
            "mcp_session_operator_reconciles",
            "Policy reconciliations by result",
            reconciles.clone(),
        );
        let reconcile_duration = latency_buckets();
        registry.register(
            "mcp_session_operator_reconcile_duration_seconds",
            "Time to reconcile one policy",
            reconcile_duration.clone(),
        );
        let redis_duration = Family::<OperationLabels, Histogram>::new_with_constructor(
            latency_buckets as fn() -> Histogram,
        );
        registry.register(
            "mcp_session_redis_command_duration_seconds",
            "Latency of session store operations against Redis",
            redis_duration.clone(),
        );
        let drains = Family::<DrainLabels, Counter>::default();
        registry.register(
            "mcp_session_drains",
            "Sessions marked draining, claimable by any pod, by who drained them",
            drains.clone(),
        );
        let rehydrations = Family::<PolicyLabels, Counter>::default();
        registry.register(
            "mcp_session_rehydrations",
            "Draining sessions claimed by another pod and replayed to its server",
            rehydrations.clone(),
        );
        let lost = Family::<PolicyLabels, Counter>::default();
        registry.register(
            "mcp_sessions_lost",
            "Sessions a client came back for and could not get",
            lost.clone(),
        );
        let redis_up = Family::<PolicyLabels, Gauge>::default();
        registry.register(
            "mcp_session_redis_up",
            "Whether the policy's Redis answered at the last reconcile (1) or not (0)",
            redis_up.clone(),
        );
        let waiting = Family::<PolicyLabels, Gauge>::default();
        registry.register(
            "mcp_sessions_waiting",
            "Active sessions that terminating pods serve until they end (drain strategy Wait)",
            waiting.clone(),
        );
        Self {
            waiting,
            sessions,
            sessions_per_pod,
            reconciles,
            reconcile_duration,
            redis_duration,
            drains,
            rehydrations,
            lost,
            redis_up,
            pods_with_series: Mutex::default(),
        }
    }

    pub fn reconciled(&self, result: &'static str, took: Duration) {
        self.reconciles
            .get_or_create(&ResultLabels { result })
            .inc();
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    pub fn drained(&self, namespace: &str, policy: &str, by: &'static str, sessions: u64) {
        self.drains
            .get_or_create(&DrainLabels {
                namespace: namespace.to_owned(),
                policy: policy.to_owned(),
                by,
            })
            .inc_by(sessions);
    }

    /// Adds what the proxies reported to the store between two counts (`before` is `None` at
    /// the first since the operator started: all of it): the counters then rise with
    /// `lastRollout`'s counts. A tally that went down (Redis lost it) restarts the comparison
    /// without taking anything back.
    pub fn proxy_tallies(
        &self,
        namespace: &str,
        policy: &str,
        before: Option<crate::store::Tallies>,
        now: crate::store::Tallies,
    ) {
        let before = before.unwrap_or_default();
        let added = |now: u64, before: u64| if now >= before { now - before } else { now };
        let labels = PolicyLabels {
            namespace: namespace.to_owned(),
            policy: policy.to_owned(),
        };
        self.drained(
            namespace,
            policy,
            "proxy",
            added(now.drained, before.drained),
        );
        self.rehydrations
            .get_or_create(&labels)
            .inc_by(added(now.rehydrated, before.rehydrated));
        self.lost
            .get_or_create(&labels)
            .inc_by(added(now.lost, before.lost));
    }

    pub fn redis_operation(&self, operation: &'static str, took: Duration) {
        self.redis_duration
            .get_or_create(&OperationLabels { operation })
            .observe(took.as_secs_f64());
    }

    /// Sets a policy's session gauges; `per_pod` lists every selected pod (zero included).
    pub fn set_sessions(
        &self,
        namespace: &str,
        policy: &str,
        counts: &SessionCounts,
        per_pod: &[(String, u64)],
    ) {
        for (state, value) in [("active", counts.active), ("draining", counts.draining)] {
            let labels = PolicyStateLabels {
                namespace: namespace.into(),
                policy: policy.into(),
                state,
            };
            self.sessions
                .get_or_create(&labels)
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
        let mut known = self
            .pods_with_series
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let entry = known
            .entry((namespace.to_owned(), policy.to_owned()))
            .or_default();
        let current: BTreeSet<String> = per_pod.iter().map(|(pod, _)| pod.clone()).collect();
        for gone in entry.difference(&current) {
            self.sessions_per_pod.remove(&PodLabels {
                namespace: namespace.into(),
                policy: policy.into(),
                pod: gone.clone(),
            });
        }
        for (pod, value) in per_pod {
            let labels = PodLabels {
                namespace: namespace.into(),
                policy: policy.into(),
                pod: pod.clone(),
            };
            self.sessions_per_pod
                .get_or_create(&labels)
                .set(i64::try_from(*value).unwrap_or(i64::MAX));
        }
        *entry = current;
    }

    /// Whether the policy's Redis answered; `None`: the policy has no usable Redis target (an
    /// invalid policy, a missing Secret), which is not an outage.
    pub fn set_redis_up(&self, namespace: &str, policy: &str, up: Option<bool>) {
        let labels = PolicyLabels {
            namespace: namespace.into(),
            policy: policy.into(),
        };
        match up {
            Some(up) => {
                self.redis_up.get_or_create(&labels).set(i64::from(up));
            }
            None => {
                self.redis_up.remove(&labels);
            }
        }
    }

    /// Sessions that terminating pods still serve.
    pub fn set_waiting(&self, namespace: &str, policy: &str, sessions: u64) {
        let labels = PolicyLabels {
            namespace: namespace.into(),
            policy: policy.into(),
        };
        self.waiting
            .get_or_create(&labels)
            .set(i64::try_from(sessions).unwrap_or(i64::MAX));
    }

    /// Removes every series of a deleted policy.
    pub fn forget_policy(&self, namespace: &str, policy: &str) {
        for state in ["active", "draining"] {
            self.sessions.remove(&PolicyStateLabels {
                namespace: namespace.into(),
                policy: policy.into(),
                state,
            });
        }
        for by in ["proxy", "sweep"] {
            self.drains.remove(&DrainLabels {
                namespace: namespace.into(),
                policy: policy.into(),
                by,
            });
        }
        let labels = PolicyLabels {
            namespace: namespace.into(),
            policy: policy.into(),
        };
        self.rehydrations.remove(&labels);
        self.lost.remove(&labels);
        self.redis_up.remove(&labels);
        self.waiting.remove(&labels);
        let mut known = self
            .pods_with_series
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for pod in known
            .remove(&(namespace.to_owned(), policy.to_owned()))
            .unwrap_or_default()
        {
            self.sessions_per_pod.remove(&PodLabels {
                namespace: namespace.into(),
                policy: policy.into(),
                pod,
            });
        }
    }
}
