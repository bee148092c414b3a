//! The `McpSessionPolicy` controller: counts each policy's sessions and reports them as status,
//! Events and metrics.
//!
//! Policies, pods, Services and ReplicaSets are watched through reflector stores; a pod change
//! reconciles the policies that select it. Nothing is listed per reconcile: each one reads its pods from the
//! store and its counts from Redis indexes. Secrets are not watched (that would take `list`
//! and `watch` of every Secret): a policy's `urlSecretRef` is read with `get` when it is
//! reconciled, so a changed Secret is seen within the requeue interval.

mod admission;
mod counting;
mod deletion_cost;
pub mod gateway;
mod guard;
pub mod leader;
mod memory;
pub mod network_policy;
mod observe;
mod rollout;
mod schedule;
mod status;
mod stores;
mod watch;

pub use self::watch::run;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt as _};
use serde_json::json;
use tracing::{debug, instrument, warn};

use self::counting::{FromRedis, from_redis};
use self::gateway::GatewayState;
use self::observe::{pod_totals, routing, waiting};
use self::schedule::{jittered, requeue_after};
use self::status::{KeyState, Observation};
use self::stores::StorePool;
use crate::api::contract::FIELD_MANAGER;
use crate::api::{McpSessionPolicy, McpSessionPolicyStatus, condition};
use crate::events::{PolicyEvents, Transition};
use crate::metrics::Metrics;

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

impl Error {
    /// The `result` of `mcp_session_operator_reconciles_total` for a reconcile that failed so.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::NoNamespace => "no_namespace",
            Self::WriteStatus { .. } => "write_status",
            Self::Degraded { .. } => "degraded",
        }
    }
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
    /// Each store's session index is pruned at most this often: nothing else removes the
    /// entries of sessions that expired, so without it the index sets (and the pods they name)
    /// grow with every session ever made.
    pub prune_interval: Duration,
    /// Write a NetworkPolicy for each policy's injected pods.
    pub network_policies: Option<network_policy::Settings>,
    /// What the gateways the operator runs are made of.
    pub gateway: gateway::Settings,
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
            prune_interval: Duration::from_secs(300),
            network_policies: None,
            gateway: gateway::Settings {
                image: crate::api::contract::default_image(),
                admin_port: 8091,
                log_format: Default::default(),
            },
        }
    }
}

pub struct Context {
    client: Client,
    pods: Store<Pod>,
    services: Store<Service>,
    replica_sets: Store<ReplicaSet>,
    redis: StorePool,
    metrics: Arc<Metrics>,
    events: PolicyEvents,
    config: Config,
    /// Each policy's status last written, tallies last counted and failures in a row.
    memory: Arc<memory::PolicyMemory>,
    deletion_costs: deletion_cost::Writer,
}

/// Observe (pods, Redis, Services, the key Secret), act where the observation calls for it
/// (sweep vanished pods' sessions, pause a rollout that loses sessions, deletion costs, the
/// NetworkPolicy), then report: the status [`status::build`] derives, its transitions as Events.
#[instrument(skip_all, fields(namespace = policy.namespace().unwrap_or_default(), policy = %policy.name_any()))]
async fn reconcile(policy: Arc<McpSessionPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_policy(policy, &ctx).await;
    let took = started.elapsed();
    let outcome = result.as_ref().err().map_or("ok", Error::metric_label);
    ctx.metrics.controller.reconciled(outcome, took);
    debug!(took_us = took.as_micros() as u64, outcome, "reconciled");
    result
}

async fn reconcile_policy(
    policy: Arc<McpSessionPolicy>,
    ctx: &Arc<Context>,
) -> Result<Action, Error> {
    let namespace = policy.namespace().ok_or(Error::NoNamespace)?;
    let selected: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|pod| {
            pod.namespace()
                .is_some_and(|ns| policy.selects(&ns, pod.labels()))
        })
        .collect();
    let redis = from_redis(&policy, &namespace, ctx, &selected).await;
    let pod_sessions = sessions_per_pod(ctx, &policy, &namespace, &selected, &redis).await;
    let key = ObjectRef::from_obj(&*policy);
    let remembered = ctx.memory.status(&key);
    let previous = remembered.as_ref().or(policy.status.as_ref());
    let last_rollout =
        guard::track_and_guard(&ctx.client, &policy, &selected, previous, redis.tallies).await;
    if let Some(settings) = &ctx.config.network_policies
        && policy.spec.injection.enabled
        && crate::api::pod_selector(&policy.spec.selector).is_some()
        && let Err(error) = network_policy::apply(&ctx.client, &policy, settings).await
    {
        warn!(%error, "cannot write the NetworkPolicy of the policy's pods");
    }
    let observation = Observation {
        gateway: run_gateway(ctx, &policy, previous).await,
        fingerprint_key: fingerprint_key(ctx, &policy).await,
        routing: routing(&policy, &namespace, &selected, &ctx.services),
        refused_pods: admission::refusals(&policy, ctx.replica_sets.state().iter().map(|rs| &**rs)),
        retention: redis.retention,
        generation: policy.metadata.generation,
        pods: pod_totals(&selected),
        waiting: waiting(&selected, &pod_sessions),
        counts: redis.counts,
        pod_sessions,
        unreadable: redis.unreadable,
        last_rollout,
        max_lost_sessions: policy.spec.rollout.max_lost(),
    };
    ctx.metrics.controller.set_waiting(
        &namespace,
        &policy.name_any(),
        observation.waiting.sessions,
    );
    let next = status::build(previous, &observation);
    let requeue = requeue_after(
        next.last_rollout.as_ref(),
        ctx.config.requeue,
        chrono::Utc::now(),
    );
    if policy.status.as_ref() != Some(&next) {
        write_status(&ctx.client, &namespace, &policy.name_any(), &next).await?;
    }
    for transition in status::transitions(previous, &next) {
        publish(ctx, &policy, &transition).await;
    }
    ctx.memory.wrote(&key, next);

    match observation.counts {
        Ok(_) => {
            ctx.memory.succeeded(&key);
            Ok(Action::requeue(jittered(requeue)))
        }
        Err(problem) if problem.is_transient() => Err(Error::Degraded {
            reason: problem.reason(),
            message: problem.message().to_owned(),
        }),
        // Nothing to retry until the spec changes, which triggers a reconcile by itself.
        Err(_) => Ok(Action::requeue(ctx.config.requeue * 4)),
    }
}

/// Sessions of every selected pod (zero included, by pod name), as metrics and as the pods'
/// deletion costs.
async fn sessions_per_pod(
    ctx: &Context,
    policy: &McpSessionPolicy,
    namespace: &str,
    selected: &[Arc<Pod>],
    redis: &FromRedis,
) -> Vec<(String, u64)> {
    let Ok(counts) = &redis.counts else {
        return Vec::new();
    };
    let of = |pod: &str| counts.per_pod.get(pod).copied().unwrap_or(0);
    let mut pod_sessions: Vec<(String, u64)> = selected
        .iter()
        .map(|pod| {
            let name = pod.name_any();
            let sessions = of(&name);
            (name, sessions)
        })
        .collect();
    pod_sessions.sort();
    ctx.metrics
        .controller
        .set_sessions(namespace, &policy.name_any(), counts, &pod_sessions);
    let costs: Vec<(Arc<Pod>, u64)> = selected
        .iter()
        .map(|pod| (pod.clone(), of(&pod.name_any())))
        .collect();
    ctx.deletion_costs
        .sync(&ctx.client, &costs, ctx.config.deletion_cost_interval)
        .await;
    ctx.deletion_costs.retain(|pod| ctx.pods.get(pod).is_some());
    pod_sessions
}

/// The policy's gateway written (or, turned off, stopped), and how it stands.
async fn run_gateway(
    ctx: &Context,
    policy: &McpSessionPolicy,
    previous: Option<&McpSessionPolicyStatus>,
) -> GatewayState {
    if policy.spec.gateway.enabled {
        return gateway::apply(&ctx.client, policy, &ctx.config.gateway).await;
    }
    // Only a policy that had a gateway has one to stop: no writes on every reconcile.
    let had_one = previous.is_some_and(|status| {
        status
            .conditions
            .iter()
            .any(|c| c.type_ == condition::GATEWAY_READY && c.reason != "Disabled")
    });
    if had_one && let Err(error) = gateway::stop(&ctx.client, policy).await {
        warn!(%error, "cannot stop the policy's gateway");
        return GatewayState::Failed(format!("cannot stop the gateway: {error}"));
    }
    GatewayState::Disabled
}

/// The proxies' fingerprint key Secret, made sure of ([`crate::fingerprint_key::ensure`]).
async fn fingerprint_key(ctx: &Context, policy: &McpSessionPolicy) -> KeyState {
    if !policy.spec.injection.enabled && !policy.spec.gateway.enabled {
        return KeyState::NotNeeded;
    }
    match crate::fingerprint_key::ensure(&ctx.client, policy, false).await {
        Ok(key) => KeyState::Ready(key),
        Err(error) => KeyState::Missing {
            reason: error.reason(),
            message: error.to_string(),
        },
    }
}

fn error_policy(policy: Arc<McpSessionPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.memory.failed(&ObjectRef::from_obj(&*policy));
    let delay = ctx
        .config
        .min_backoff
        .saturating_mul(1 << (failures - 1).min(16))
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

/// An Event on `policy` from counting its sessions.
async fn publish(ctx: &Context, policy: &McpSessionPolicy, transition: &Transition) {
    ctx.events
        .publish(policy, "CountSessions", transition)
        .await;
}
