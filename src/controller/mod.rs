//! The `McpSessionPolicy` controller: counts each policy's sessions and reports them as status,
//! Events and metrics.
//!
//! Policies, pods and Services are watched through reflector stores; a pod change reconciles the
//! policies that select it. Nothing is listed per reconcile: each one reads its pods from the
//! store and its counts from Redis indexes. Secrets are not watched (that would take `list`
//! and `watch` of every Secret): a policy's `urlSecretRef` is read with `get` when it is
//! reconciled, so a changed Secret is seen within the requeue interval.

mod deletion_cost;
mod guard;
pub mod leader;
pub mod network_policy;
mod rollout;
mod status;
mod stores;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::{Api, Patch, PatchParams};
use kube::core::SelectorExt as _;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Resource, ResourceExt as _};
use serde_json::json;
use tracing::{debug, info, instrument, warn};

use self::status::{KeyState, Observation, Problem, Routing};
use self::stores::StorePool;
use crate::api::{CountBy, McpSessionPolicy, McpSessionPolicyStatus, PodTotals, validate_spec};
use crate::metrics::Metrics;
use crate::store::{self, RedisStore, SessionCounts, SessionStore, StoreError};

/// Field manager of the status the operator applies.
pub const FIELD_MANAGER: &str = "mcp-session-operator";
/// Records fetched per SCAN page when counting seed-only prefixes.
const SCAN_PAGE: usize = 1000;
/// Sessions of one vanished pod swept per reconcile (the rest at the next one).
const SWEEP_BATCH: usize = 10_000;

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
    recorder: Recorder,
    config: Config,
    failures: std::sync::Mutex<HashMap<ObjectRef<McpSessionPolicy>, u32>>,
    /// The status last written per policy. The policy in the store can lag behind our own
    /// writes; transitions (events) and last-known counts are judged against this instead.
    written: Arc<std::sync::Mutex<HashMap<ObjectRef<McpSessionPolicy>, McpSessionPolicyStatus>>>,
    deletion_costs: deletion_cost::Writer,
}

/// Runs the controller until `shutdown` resolves. `ready` turns true once every store synced.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    config: Config,
    ready: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let scope = config.namespace.as_deref();
    let policies: Api<McpSessionPolicy> = scoped(&client, scope);
    let synced = Arc::new(Synced {
        ready,
        policies: AtomicBool::new(false),
        pods: AtomicBool::new(false),
    });
    let written: Arc<std::sync::Mutex<HashMap<_, _>>> = Default::default();
    let (policy_reader, policy_writer) = reflector::store();
    let forget = metrics.clone();
    let policy_stream = watcher(policies, watcher::Config::default())
        .default_backoff()
        .reflect(policy_writer)
        .inspect_ok({
            let (synced, written) = (synced.clone(), written.clone());
            move |event| match event {
                watcher::Event::Delete(policy) => {
                    let namespace = policy.namespace().unwrap_or_default();
                    forget.forget_policy(&namespace, &policy.name_any());
                    written
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&ObjectRef::from_obj(policy));
                }
                watcher::Event::InitDone => synced.policies_listed(),
                _ => {}
            }
        })
        .applied_objects();

    let (pod_reader, pod_writer) = reflector::store();
    let pod_stream = watcher(scoped::<Pod>(&client, scope), watcher::Config::default())
        .default_backoff()
        .modify(|pod| pod.managed_fields_mut().clear())
        .reflect(pod_writer)
        .inspect_ok({
            let synced = synced.clone();
            move |event| {
                if matches!(event, watcher::Event::InitDone) {
                    synced.pods_listed();
                }
            }
        })
        .touched_objects();
    let (service_reader, service_writer) = reflector::store();
    let service_stream = watcher(
        scoped::<Service>(&client, scope),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|service| service.managed_fields_mut().clear())
    .reflect(service_writer)
    .touched_objects();

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(config.identity.clone()),
        },
    );
    let context = Arc::new(Context {
        client,
        pods: pod_reader.clone(),
        services: service_reader,
        redis: StorePool::default(),
        metrics,
        recorder,
        config,
        failures: Default::default(),
        written,
        deletion_costs: Default::default(),
    });
    let (by_pod, by_service) = (policy_reader.clone(), policy_reader.clone());
    Controller::for_stream(policy_stream, policy_reader)
        .watches_stream(pod_stream, move |pod| policies_selecting(&by_pod, &pod))
        .watches_stream(service_stream, move |service| {
            policies_in_namespace(&by_service, service.namespace())
        })
        // Bursts of pod events (a rollout) reconcile a policy once, not once per event.
        .with_config(
            kube::runtime::controller::Config::default().debounce(Duration::from_millis(500)),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((policy, _)) => debug!(%policy, "reconciled"),
                Err(error) => warn!(%error, "reconcile failed"),
            }
        })
        .await;
}

/// Readiness: both stores have completed their initial list.
struct Synced {
    ready: Arc<AtomicBool>,
    policies: AtomicBool,
    pods: AtomicBool,
}

impl Synced {
    fn policies_listed(&self) {
        self.policies.store(true, Ordering::SeqCst);
        self.update();
    }

    fn pods_listed(&self) {
        self.pods.store(true, Ordering::SeqCst);
        self.update();
    }

    fn update(&self) {
        if self.policies.load(Ordering::SeqCst)
            && self.pods.load(Ordering::SeqCst)
            && !self.ready.swap(true, Ordering::SeqCst)
        {
            info!("policy and pod stores synced");
        }
    }
}

/// All of a namespaced kind, cluster-wide or in one namespace.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

fn policies_selecting(
    policies: &Store<McpSessionPolicy>,
    pod: &Pod,
) -> Vec<ObjectRef<McpSessionPolicy>> {
    let namespace = pod.namespace();
    policies
        .state()
        .into_iter()
        .filter(|policy| policy.namespace() == namespace && selects(policy, pod))
        .map(|policy| ObjectRef::from_obj(&*policy))
        .collect()
}

fn policies_in_namespace(
    policies: &Store<McpSessionPolicy>,
    namespace: Option<String>,
) -> Vec<ObjectRef<McpSessionPolicy>> {
    policies
        .state()
        .into_iter()
        .filter(|policy| policy.namespace() == namespace && policy.spec.injection.enabled)
        .map(|policy| ObjectRef::from_obj(&*policy))
        .collect()
}

/// How the Services that select `pods` reach them: a Service whose port targets the backend's
/// port (by number, or by a container port's name) bypasses the session proxy.
fn routing(
    policy: &McpSessionPolicy,
    namespace: &str,
    pods: &[Arc<Pod>],
    services: &Store<Service>,
) -> Routing {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let injection = &policy.spec.injection;
    if !injection.enabled {
        return Routing::InjectionDisabled;
    }
    let upstream_names: Vec<String> = pods
        .iter()
        .flat_map(|p| p.spec.iter().flat_map(|s| s.containers.iter()))
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.container_port == injection.upstream_port)
        .filter_map(|p| p.name.clone())
        .collect();
    let mut routed = 0;
    let mut bypassing = Vec::new();
    for service in services.state() {
        let Some(spec) = &service.spec else { continue };
        let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
            continue;
        };
        let selects_ours = pods
            .iter()
            .any(|pod| selector.iter().all(|(k, v)| pod.labels().get(k) == Some(v)));
        if service.namespace().as_deref() != Some(namespace) || !selects_ours {
            continue;
        }
        routed += 1;
        for port in spec.ports.iter().flatten() {
            let direct = match &port.target_port {
                Some(IntOrString::Int(target)) => *target == injection.upstream_port,
                Some(IntOrString::String(name)) => upstream_names.contains(name),
                None => port.port == injection.upstream_port,
            };
            if direct {
                bypassing.push(format!(
                    "Service {} port {} targets {}, the backend's port: set targetPort to {} (the session proxy)",
                    service.name_any(),
                    port.port,
                    injection.upstream_port,
                    injection.proxy_port
                ));
            }
        }
    }
    if bypassing.is_empty() {
        Routing::ThroughProxy(routed)
    } else {
        Routing::Bypassed(bypassing)
    }
}

/// The policy's pod selector; `None` if it is invalid or would select every pod.
fn pod_selector(policy: &McpSessionPolicy) -> Option<kube::core::Selector> {
    kube::core::Selector::try_from(policy.spec.selector.clone())
        .ok()
        .filter(|selector| !selector.selects_all())
}

fn selects(policy: &McpSessionPolicy, pod: &Pod) -> bool {
    pod_selector(policy).is_some_and(|selector| selector.matches(pod.labels()))
}

#[instrument(skip_all, fields(namespace = policy.namespace().unwrap_or_default(), policy = %policy.name_any()))]
async fn reconcile(policy: Arc<McpSessionPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let namespace = policy.namespace().ok_or(Error::NoNamespace)?;
    let name = policy.name_any();
    let selector = pod_selector(&policy);
    let selected: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|pod| {
            pod.namespace().as_deref() == Some(namespace.as_str())
                && selector.as_ref().is_some_and(|s| s.matches(pod.labels()))
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
        && selector.is_some()
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

/// The pod's Ready condition is True.
fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_totals(pods: &[Arc<Pod>]) -> PodTotals {
    let terminating = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some())
        .count();
    PodTotals {
        selected: pods.len() as u32,
        ready: pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && pod_ready(p))
            .count() as u32,
        terminating: terminating as u32,
    }
}

/// Counts the policy's sessions; any failure becomes a [`Problem`] for the status.
async fn count(
    policy: &McpSessionPolicy,
    namespace: &str,
    ctx: &Context,
) -> Result<(SessionCounts, u64, RedisStore), Problem> {
    validate_spec(&policy.spec).map_err(|e| Problem::InvalidPolicy(e.to_string()))?;
    let url = redis_url(policy, namespace, &ctx.client).await?;
    let redis = &policy.spec.redis;
    let ttl = Duration::from_secs(u64::try_from(policy.spec.ttl_seconds).unwrap_or(0));
    let started = Instant::now();
    let store = ctx
        .redis
        .store(&url, redis.cluster, &redis.key_prefix, ttl)
        .await
        .map_err(store_problem)?;
    ctx.metrics.redis_operation("connect", started.elapsed());
    let started = Instant::now();
    let result = match redis.count_by {
        CountBy::Index => store.counts().await.map(|c| (c, 0)),
        CountBy::Scan => store::scan_report(&store, SCAN_PAGE, &|_| {})
            .await
            .map(|report| (report.counts, report.unreadable.len() as u64)),
    };
    ctx.metrics.redis_operation(
        if redis.count_by == CountBy::Index {
            "count"
        } else {
            "scan"
        },
        started.elapsed(),
    );
    result
        .map(|(counts, unreadable)| (counts, unreadable, store))
        .map_err(store_problem)
}

/// Sessions owned by pods that no longer exist (a crash, a SIGKILL, an evicted node: no proxy
/// drained them) are marked draining, so that whichever pod the client reaches next claims
/// them. A pod missing from the watch cache is looked up in the apiserver first: a pod that
/// was just created must not lose its sessions to a lagging cache.
async fn sweep(
    policy: &McpSessionPolicy,
    namespace: &str,
    ctx: &Context,
    store: &RedisStore,
    counts: &SessionCounts,
    selected: &[Arc<Pod>],
) {
    // Owners among the selected pods are alive: the common case costs no look at the cache.
    let unknown: Vec<&String> = counts
        .per_pod
        .keys()
        .filter(|pod| {
            !selected
                .iter()
                .any(|p| p.metadata.name.as_deref() == Some(pod.as_str()))
        })
        .collect();
    if unknown.is_empty() {
        return;
    }
    // A pod of that name anywhere (policies in several namespaces may share a prefix) keeps
    // its sessions.
    let cached: std::collections::HashSet<String> = ctx
        .pods
        .state()
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    for pod in unknown.into_iter().filter(|pod| !cached.contains(*pod)) {
        match pods.get_opt(pod).await {
            Ok(None) => {}
            Ok(Some(_)) => continue,
            Err(error) => {
                warn!(%pod, %error, "cannot check whether a session owner exists; not sweeping");
                continue;
            }
        }
        let ids = match store.sessions_of_pod(pod, SWEEP_BATCH).await {
            Ok(ids) => ids,
            Err(error) => {
                warn!(%pod, %error, "cannot list the sessions of a vanished pod");
                continue;
            }
        };
        let hold =
            Duration::from_secs(u64::try_from(policy.spec.drain.timeout_seconds).unwrap_or(0));
        let swept = store::mark_all_draining(store, &ids, Some(pod), hold).await;
        if swept == 0 {
            continue;
        }
        info!(%pod, swept, "swept the sessions of a pod that no longer exists");
        ctx.metrics
            .drained(namespace, &policy.name_any(), "sweep", swept);
        publish(
            ctx,
            policy,
            false,
            "SessionsSwept".into(),
            format!(
                "{swept} sessions of pod {pod}, which no longer exists, marked draining: the next pod each client reaches claims its session"
            ),
        )
        .await;
    }
}

fn store_problem(error: StoreError) -> Problem {
    match error {
        StoreError::Unavailable { .. } => Problem::RedisUnreachable(error.to_string()),
        other => Problem::RedisError(other.to_string()),
    }
}

/// The policy's Redis URL, from the spec or from its Secret.
async fn redis_url(
    policy: &McpSessionPolicy,
    namespace: &str,
    client: &Client,
) -> Result<String, Problem> {
    let redis = &policy.spec.redis;
    if let Some(url) = &redis.url {
        return Ok(url.clone());
    }
    let Some(reference) = &redis.url_secret_ref else {
        return Err(Problem::InvalidPolicy(
            "spec.redis: set url or urlSecretRef".into(),
        ));
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = match secrets.get_opt(&reference.name).await {
        Ok(Some(secret)) => secret,
        Ok(None) => {
            return Err(Problem::SecretNotFound(format!(
                "Secret {namespace}/{} not found",
                reference.name
            )));
        }
        Err(e) => {
            return Err(Problem::SecretNotFound(format!(
                "cannot read Secret {namespace}/{}: {e}",
                reference.name
            )));
        }
    };
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&reference.key))
        .ok_or_else(|| {
            Problem::SecretKeyNotFound(format!(
                "Secret {namespace}/{} has no key {:?}",
                reference.name, reference.key
            ))
        })?;
    let url = String::from_utf8(value.0.clone()).map_err(|_| {
        Problem::InvalidPolicy(format!(
            "Secret {namespace}/{} key {:?} is not UTF-8",
            reference.name, reference.key
        ))
    })?;
    let url = url.trim().to_owned();
    store::RedisTarget::parse(&url).map_err(|e| {
        Problem::InvalidPolicy(format!(
            "Secret {namespace}/{} key {:?}: {e}",
            reference.name, reference.key
        ))
    })?;
    Ok(url)
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
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason,
        note: Some(note.chars().take(1024).collect()),
        action: "CountSessions".into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &policy.object_ref(&())).await {
        warn!(%error, "cannot publish an Event");
    }
}
