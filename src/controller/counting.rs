//! What a reconcile reads of Redis: the policy's store, its counts, tallies and retention; on
//! the way, the sessions of pods that are gone are swept.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt as _};
use tracing::{Instrument as _, debug, info, warn};

use super::rollout::Tallied;
use super::status::Problem;
use super::{Context, publish};
use crate::api::{CountBy, McpSessionPolicy, validate_spec};
use crate::events::Transition;
use crate::store::redis::RetentionVerdict;
use crate::store::{self, RedisStore, SessionCounts, SessionStore, StoreError};

/// Records fetched per SCAN page when counting seed-only prefixes.
const SCAN_PAGE: usize = 1000;
/// Sessions of one vanished pod swept per reconcile (the rest at the next one).
const SWEEP_BATCH: usize = 10_000;

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
    ctx.metrics
        .controller
        .redis_operation("connect", started.elapsed());
    let started = Instant::now();
    let result = match redis.count_by {
        CountBy::Index => store.counts().await.map(|c| (c, 0)),
        CountBy::Scan => store::scan_report(&store, SCAN_PAGE, &|_| {})
            .await
            .map(|report| (report.counts, report.unreadable.len() as u64)),
    };
    ctx.metrics.controller.redis_operation(
        if redis.count_by == CountBy::Index {
            "count"
        } else {
            "scan"
        },
        started.elapsed(),
    );
    if result.is_ok() && redis.count_by == CountBy::Index {
        prune_when_due(ctx, &url, &store);
    }
    result
        .map(|(counts, unreadable)| (counts, unreadable, store))
        .map_err(store_problem)
}

/// Prunes the store's indexes (expired entries, entries of records gone, pods with no session
/// left) once per `prune_interval`, in the background: on a large store it reads every index
/// entry, and the reconcile need not wait for it.
fn prune_when_due(ctx: &Context, url: &str, store: &RedisStore) {
    let prefix = store.keys().prefix();
    if !ctx
        .redis
        .prune_due(url, prefix, ctx.config.prune_interval, Instant::now())
    {
        return;
    }
    let store = store.clone();
    let metrics = ctx.metrics.clone();
    tokio::spawn(
        async move {
            let started = Instant::now();
            match store.prune().await {
                Ok(report) => {
                    metrics
                        .controller
                        .redis_operation("prune", started.elapsed());
                    let removed = report.expired + report.dangling + report.pods;
                    if removed > 0 {
                        info!(
                            expired = report.expired,
                            dangling = report.dangling,
                            pods = report.pods,
                            lost = report.lost,
                            "pruned the session index"
                        );
                    }
                }
                Err(error) => warn!(%error, "cannot prune the session index"),
            }
        }
        .in_current_span(),
    );
}

/// Sessions owned by pods that no longer exist (a crash, a SIGKILL, an evicted node: no proxy
/// drained them) are marked draining, so that whichever pod the client reaches next claims
/// them. A pod missing from the watch cache is looked up in the apiserver first: a pod that
/// was just created must not lose its sessions to a lagging cache.
async fn sweep(
    policy: &McpSessionPolicy,
    ctx: &Context,
    store: &RedisStore,
    counts: &SessionCounts,
    selected: &[Arc<Pod>],
) {
    let namespace = policy.namespace().unwrap_or_default();
    let namespace = namespace.as_str();
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
        if policy.spec.drain.loses_orphans() {
            lose_orphans(policy, ctx, store, pod, &ids).await;
            continue;
        }
        let hold =
            Duration::from_secs(u64::try_from(policy.spec.drain.timeout_seconds).unwrap_or(0));
        let swept = store::mark_all_draining(store, &ids, Some(pod), hold).await;
        if swept == 0 {
            continue;
        }
        info!(%pod, swept, "swept the sessions of a pod that no longer exists");
        ctx.metrics
            .controller
            .drained(namespace, &policy.name_any(), "sweep", swept);
        let note = format!(
            "{swept} sessions of pod {pod}, which no longer exists, marked draining: the next pod each client reaches claims its session"
        );
        publish(ctx, policy, &Transition::normal("SessionsSwept", note)).await;
    }
}

/// Drain strategy `Wait` (`onOwnerLost: Fail`): the sessions of a pod that no longer exists
/// lost their state with it. They are removed, so that every proxy answers them 404 (their
/// clients start new sessions, knowingly), and counted as lost, each once: by whoever removed
/// it (a proxy whose client came back first counts its own).
async fn lose_orphans(
    policy: &McpSessionPolicy,
    ctx: &Context,
    store: &RedisStore,
    pod: &str,
    ids: &[store::SessionId],
) {
    let mut lost = 0;
    for id in ids {
        match store.delete(id).await {
            Ok(true) => lost += 1,
            Ok(false) => {}
            Err(error) => {
                warn!(%pod, session = %id, %error, "cannot remove a session whose pod is gone")
            }
        }
    }
    if lost == 0 {
        return;
    }
    if let Err(error) = store.tally(store::Tally::Lost, lost).await {
        warn!(%error, lost, "cannot count the lost sessions in the store's tallies");
    }
    warn!(%pod, lost, "the sessions of a pod that no longer exists are lost with it");
    let note = format!(
        "{lost} sessions of pod {pod}, which no longer exists, are lost with the state it held (drain strategy Wait): their clients get 404 and start new sessions"
    );
    publish(ctx, policy, &Transition::warning("SessionsLost", note)).await;
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

/// What Redis said in one reconcile.
pub(super) struct FromRedis {
    pub counts: Result<SessionCounts, Problem>,
    pub unreadable: u64,
    pub tallies: Option<Tallied>,
    pub retention: Option<RetentionVerdict>,
}

/// The policy's counts, tallies and Redis's retention; on the way, the sessions of vanished
/// pods are swept and draining sessions that expired are counted lost (before the tallies are
/// read, so that they show in this reconcile's `lost`).
pub(super) async fn from_redis(
    policy: &McpSessionPolicy,
    namespace: &str,
    ctx: &Context,
    selected: &[Arc<Pod>],
) -> FromRedis {
    let name = policy.name_any();
    let (counts, unreadable, store) = match count(policy, namespace, ctx).await {
        Ok(counted) => counted,
        Err(problem) => {
            let redis_up = match &problem {
                Problem::RedisUnreachable(_) | Problem::RedisError(_) => Some(false),
                _ => None,
            };
            ctx.metrics
                .controller
                .set_redis_up(namespace, &name, redis_up);
            return FromRedis {
                counts: Err(problem),
                unreadable: 0,
                tallies: None,
                retention: None,
            };
        }
    };
    ctx.metrics
        .controller
        .set_redis_up(namespace, &name, Some(true));
    sweep(policy, ctx, &store, &counts, selected).await;
    if let Err(error) = store.expire_draining().await {
        warn!(%error, "cannot count the draining sessions that expired");
    }
    let tallies = match store.tallies().await {
        Ok(now) => {
            let before = ctx.memory.counted(&ObjectRef::from_obj(policy), now);
            ctx.metrics
                .controller
                .proxy_tallies(namespace, &name, before, now);
            Some(Tallied { now, before })
        }
        Err(error) => {
            warn!(%error, "cannot read the store's tallies");
            None
        }
    };
    let retention = match store.read_retention().await {
        Ok(retention) => Some(retention.verdict()),
        Err(error) => {
            debug!(%error, "cannot read Redis's eviction policy and memory");
            None
        }
    };
    FromRedis {
        counts: Ok(counts),
        unreadable,
        tallies,
        retention,
    }
}
