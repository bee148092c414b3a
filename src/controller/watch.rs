//! The controller's watches: policies, pods, Services and ReplicaSets in reflector stores, and
//! which policies a change reconciles.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Resource, ResourceExt as _};
use tracing::{debug, info, warn};

use super::memory::PolicyMemory;
use super::stores::StorePool;
use super::{Config, Context, error_policy, reconcile};
use crate::api::McpSessionPolicy;
use crate::events::PolicyEvents;
use crate::metrics::Metrics;

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
    let memory = Arc::new(PolicyMemory::default());
    let (policy_reader, policy_writer) = reflector::store();
    let forget = metrics.clone();
    let policy_stream = watcher(policies, watcher::Config::default())
        .default_backoff()
        .reflect(policy_writer)
        .inspect_ok({
            let (synced, memory) = (synced.clone(), memory.clone());
            move |event| match event {
                watcher::Event::Delete(policy) => {
                    let namespace = policy.namespace().unwrap_or_default();
                    forget
                        .controller
                        .forget_policy(&namespace, &policy.name_any());
                    memory.forget(&ObjectRef::from_obj(policy));
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
    let (replica_set_reader, replica_set_writer) = reflector::store();
    let replica_set_stream = watcher(
        scoped::<ReplicaSet>(&client, scope),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(super::admission::slim)
    .reflect(replica_set_writer)
    .touched_objects();

    let events = PolicyEvents::new(client.clone(), &config.identity);
    let context = Arc::new(Context {
        client,
        pods: pod_reader.clone(),
        services: service_reader,
        replica_sets: replica_set_reader,
        redis: StorePool::default(),
        metrics,
        events,
        config,
        memory,
        deletion_costs: Default::default(),
    });
    let (by_pod, by_service, by_replica_set) = (
        policy_reader.clone(),
        policy_reader.clone(),
        policy_reader.clone(),
    );
    Controller::for_stream(policy_stream, policy_reader)
        .watches_stream(pod_stream, move |pod| {
            policies_selecting(&by_pod, pod.namespace(), pod.labels())
        })
        // A ReplicaSet whose pods are refused (or admitted again) is news for their policies.
        .watches_stream(replica_set_stream, move |replica_set| {
            match super::admission::template_labels(&replica_set) {
                Some(labels) => {
                    policies_selecting(&by_replica_set, replica_set.namespace(), labels)
                }
                None => Vec::new(),
            }
        })
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
pub(super) struct Synced {
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
pub(super) fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// The policies that select pods with `labels` in `namespace`.
pub(super) fn policies_selecting(
    policies: &Store<McpSessionPolicy>,
    namespace: Option<String>,
    labels: &std::collections::BTreeMap<String, String>,
) -> Vec<ObjectRef<McpSessionPolicy>> {
    let namespace = namespace.unwrap_or_default();
    policies
        .state()
        .into_iter()
        .filter(|policy| policy.selects(&namespace, labels))
        .map(|policy| ObjectRef::from_obj(&*policy))
        .collect()
}

pub(super) fn policies_in_namespace(
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
