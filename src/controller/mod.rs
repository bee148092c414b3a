//! The `McpSessionPolicy` controller: counts each policy's sessions and reports them as status,
//! Events and metrics.
//!
//! Policies, pods and Services are watched through reflector stores; a pod change reconciles the
//! policies that select it. Nothing is listed per reconcile: each one reads its pods from the
//! store and its counts from Redis indexes. Secrets are not watched (that would take `list`
//! and `watch` of every Secret): a policy's `urlSecretRef` is read with `get` when it is
//! reconciled, so a changed Secret is seen within the requeue interval.

mod counting;
mod deletion_cost;
mod guard;
pub mod leader;
pub mod network_policy;
mod observe;
mod rollout;
mod status;
mod stores;
mod watch;

pub use self::watch::run;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt as _};
use serde_json::json;
use tracing::{debug, instrument, warn};

use self::counting::{count, sweep};
use self::observe::{pod_totals, routing};
use self::status::{KeyState, Observation, Problem};
use self::stores::StorePool;
use crate::api::{McpSessionPolicy, McpSessionPolicyStatus};
use crate::events::PolicyEvents;
use crate::metrics::Metrics;
use crate::store::SessionStore;

/// Field manager of the status the operator applies.
pub const FIELD_MANAGER: &str = "mcp-session-operator";
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("policy has no namespace")]
    NoNamespace,
    #[error("writing the status of {policy}: {source}")]
    WriteStatus { policy: String, source: kube::Error },
    /// Status says what; returned so that `error_policy` retries with backoff.
    #[error("{reason}: {message}")]
    Degraded {
        reason: &'static str,
        message: String,
    },
}

/// Tuning of the controller.
#[derive(Debug, Clone)]
pub struct Config {
    /// Re-count every policy this often, even when nothing in Kubernetes changed.
    pub requeue: Duration,
    /// First retry after a failure; doubles per failure up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// This replica's name, for Events.
    pub identity: String,
    /// Watch one namespace only (namespaced RBAC), instead of the whole cluster.
    pub namespace: Option<String>,
    /// A pod's deletion cost is rewritten at most this often.
    pub deletion_cost_interval: Duration,
    /// Write a NetworkPolicy for each policy's injected pods.
    pub network_policies: Option<network_policy::Settings>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            requeue: Duration::from_secs(15),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            identity: "mcp-session-operator".into(),
            namespace: None,
            deletion_cost_interval: Duration::from_secs(30),
            network_policies: None,
        }
    }
}

pub struct Context {
    client: Client,
    pods: Store<Pod>,
    services: Store<Service>,
    redis: StorePool,
    metrics: Arc<Metrics>,
    events: PolicyEvents,
    config: Config,
    failures: std::sync::Mutex<HashMap<ObjectRef<McpSessionPolicy>, u32>>,
    /// The status last written per policy. The policy in the store can lag behind our own
    /// writes; transitions (events) and last-known counts are judged against this instead.
    written: Arc<std::sync::Mutex<HashMap<ObjectRef<McpSessionPolicy>, McpSessionPolicyStatus>>>,
    deletion_costs: deletion_cost::Writer,
}

#[instrument(skip_all, fields(namespace = policy.namespace().unwrap_or_default(), policy = %policy.name_any()))]
async fn reconcile(policy: Arc<McpSessionPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let namespace = policy.namespace().ok_or(Error::NoNamespace)?;
    let name = policy.name_any();
    let selected: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|pod| {
            pod.namespace()
                .is_some_and(|ns| policy.selects(&ns, pod.labels()))
        })
        .collect();
    let pods = pod_totals(&selected);

    let (counts, unreadable, tallies, retention) = match count(&policy, &namespace, &ctx).await {
        Ok((counts, unreadable, store)) => {
            sweep(&policy, &namespace, &ctx, &store, &counts, &selected).await;
            // Before reading the tallies, so that a session that ran out of time draining
            // shows in this reconcile's `lost`.
            if let Err(error) = store.expire_draining().await {
                warn!(%error, "cannot count the draining sessions that expired");
            }
            let tallies = match store.tallies().await {
                Ok(tallies) => {
                    ctx.metrics.proxy_tallies(&namespace, &name, tallies);
                    Some(tallies)
                }
                Err(error) => {
                    warn!(%error, "cannot read the store's tallies");
                    None
                }
            };
            let retention = match store.retention().await {
                Ok(retention) => Some(retention.verdict()),
                Err(error) => {
                    debug!(%error, "cannot read Redis's eviction policy and memory");
                    None
                }
            };
            (Ok(counts), unreadable, tallies, retention)
        }
        Err(problem) => (Err(problem), 0, None, None),
    };
    let redis_up = match &counts {
        Ok(_) => Some(true),
        Err(Problem::RedisUnreachable(_) | Problem::RedisError(_)) => Some(false),
        Err(_) => None,
    };
    ctx.metrics.set_redis_up(&namespace, &name, redis_up);
    let mut pod_names: Vec<String> = selected.iter().map(|p| p.name_any()).collect();
    pod_names.sort();
    let pod_sessions: Vec<(String, u64)> = match &counts {
        Ok(counts) => pod_names
            .iter()
            .map(|pod| (pod.clone(), counts.per_pod.get(pod).copied().unwrap_or(0)))
            .collect(),
        Err(_) => Vec::new(),
    };
    if let Ok(counts) = &counts {
        ctx.metrics
            .set_sessions(&namespace, &name, counts, &pod_sessions);
        let costs: Vec<(Arc<Pod>, u64)> = selected
            .iter()
            .map(|pod| {
                let sessions = counts.per_pod.get(&pod.name_any()).copied().unwrap_or(0);
                (pod.clone(), sessions)
            })
            .collect();
        ctx.deletion_costs
            .sync(&ctx.client, &costs, ctx.config.deletion_cost_interval)
            .await;
        ctx.deletion_costs.retain(|pod| ctx.pods.get(pod).is_some());
    }
    let key = ObjectRef::from_obj(&*policy);
    let remembered = ctx
        .written
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .cloned();
    let previous = remembered.as_ref().or(policy.status.as_ref());
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut last_rollout = rollout::track(
        previous.and_then(|p| p.last_rollout.as_ref()),
        &selected,
        tallies,
        &now,
    );
    let max_lost_sessions = u64::try_from(policy.spec.rollout.max_lost_sessions).unwrap_or(0);
    if let Some(rollout) = &mut last_rollout
        && rollout.finished_at.is_none()
        && rollout.paused_at.is_none()
        && rollout.lost > max_lost_sessions
    {
        let paused = guard::pause(&ctx.client, &namespace, &selected, &rollout.revision).await;
        let mut what: Vec<String> = paused
            .deployments
            .iter()
            .map(|d| format!("Deployment/{d}"))
            .collect();
        what.extend(
            paused
                .unpausable
                .iter()
                .map(|o| format!("{o} (cannot be paused)")),
        );
        rollout.paused_at = Some(now.clone());
        rollout.paused = Some(if what.is_empty() {
            "nothing owns the new pods".to_owned()
        } else {
            what.join(", ")
        });
    }
    let routing = routing(&policy, &namespace, &selected, &ctx.services);
    if let Some(settings) = &ctx.config.network_policies
        && policy.spec.injection.enabled
        && crate::api::pod_selector(&policy.spec.selector).is_some()
        && let Err(error) = network_policy::apply(&ctx.client, &policy, settings).await
    {
        warn!(%error, "cannot write the NetworkPolicy of the policy's pods");
    }
    let fingerprint_key = if policy.spec.injection.enabled {
        match crate::fingerprint_key::ensure(&ctx.client, &policy, false).await {
            Ok(key) => KeyState::Ready(key),
            Err(error) => KeyState::Missing {
                reason: error.reason(),
                message: error.to_string(),
            },
        }
    } else {
        KeyState::NotNeeded
    };
    let observation = Observation {
        fingerprint_key,
        routing,
        retention,
        generation: policy.metadata.generation,
        counts,
        pod_sessions,
        pods,
        unreadable,
        last_rollout,
        max_lost_sessions,
    };
    let next = status::build(previous, &observation);
    if policy.status.as_ref() != Some(&next) {
        write_status(&ctx.client, &namespace, &name, &next).await?;
    }
    for (warning, reason, note) in status::transitions(previous, &next) {
        publish(&ctx, &policy, warning, reason, note).await;
    }
    ctx.written
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, next);

    let result = match observation.counts {
        Ok(_) => {
            ctx.failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&ObjectRef::from_obj(&*policy));
            Ok(Action::requeue(jittered(ctx.config.requeue)))
        }
        Err(problem) if problem.is_transient() => Err(Error::Degraded {
            reason: problem.reason(),
            message: problem.message().to_owned(),
        }),
        // Nothing to retry until the spec changes, which triggers a reconcile by itself.
        Err(_) => Ok(Action::requeue(ctx.config.requeue * 4)),
    };
    let took = started.elapsed();
    ctx.metrics
        .reconciled(if result.is_ok() { "ok" } else { "error" }, took);
    debug!(took_us = took.as_micros() as u64, "reconciled");
    result
}

/// `period` ± 10 %, so that policies created together do not all re-count at the same instant.
fn jittered(period: Duration) -> Duration {
    period.mul_f64(rand::random_range(0.9..1.1))
}

fn error_policy(policy: Arc<McpSessionPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
    let n = failures.entry(ObjectRef::from_obj(&*policy)).or_default();
    *n = n.saturating_add(1);
    let delay = ctx
        .config
        .min_backoff
        .saturating_mul(1 << (*n - 1).min(16))
        .min(ctx.config.max_backoff);
    warn!(policy = %policy.name_any(), %error, retry_in = ?delay, "reconcile failed; backing off");
    Action::requeue(delay)
}

async fn write_status(
    client: &Client,
    namespace: &str,
    name: &str,
    status: &McpSessionPolicyStatus,
) -> Result<(), Error> {
    let api: Api<McpSessionPolicy> = Api::namespaced(client.clone(), namespace);
    let patch = json!({
        "apiVersion": McpSessionPolicy::api_version(&()),
        "kind": McpSessionPolicy::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(drop)
    .map_err(|source| Error::WriteStatus {
        policy: format!("{namespace}/{name}"),
        source,
    })
}

async fn publish(
    ctx: &Context,
    policy: &McpSessionPolicy,
    warning: bool,
    reason: String,
    note: String,
) {
    ctx.events
        .publish(policy, warning, &reason, "CountSessions", &note)
        .await;
}
