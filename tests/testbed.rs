//! Smoke tests of the test bed itself: a real kube-apiserver, kube-controller-manager and
//! scheduler (1.35, built from Go modules) with a real node. Later tests build on each property
//! shown here.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt as _;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use serde_json::json;
use support::control_plane::{apply_crd, control_plane};
use support::https::HttpsServer;
use support::images;
use support::node::RealNode;
use support::wait::wait_for;

const TIMEOUT: Duration = Duration::from_secs(90);

fn deployment(name: &str, image: &str) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{"name": "mcp", "image": image, "ports": [{"containerPort": 8000}]}],
                },
            },
        },
    }))
    .expect("deployment")
}

async fn rolled_out(deployments: &Api<Deployment>, name: &str) -> bool {
    let Ok(d) = deployments.get(name).await else {
        return false;
    };
    let (spec, status) = (d.spec, d.status.unwrap_or_default());
    let want = spec.replicas.unwrap_or(1);
    status.observed_generation == d.metadata.generation
        && status.updated_replicas == Some(want)
        && status.available_replicas == Some(want)
        && status.replicas == Some(want)
}

/// What the pods of a namespace went through, in the order the apiserver reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PodEvent {
    Ready(String),
    Terminating(String),
    Removed(String),
}

/// Records each pod's first Ready, its deletion's start and its removal, from a watch.
fn record_pod_events(pods: Api<Pod>) -> (Arc<Mutex<Vec<PodEvent>>>, tokio::task::JoinHandle<()>) {
    use futures::StreamExt as _;
    use kube::runtime::watcher;
    let events: Arc<Mutex<Vec<PodEvent>>> = Arc::default();
    let recorded = events.clone();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(pods, watcher::Config::default()));
        while let Some(event) = stream.next().await {
            let (pod, gone) = match event {
                Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => (pod, false),
                Ok(watcher::Event::Delete(pod)) => (pod, true),
                _ => continue,
            };
            let name = pod.name_any();
            let mut events = recorded.lock().unwrap();
            let mut note = |event: PodEvent| {
                if !events.contains(&event) {
                    events.push(event);
                }
            };
            if mcp_session_operator::api::pod::takes_requests(&pod) {
                note(PodEvent::Ready(name.clone()));
            }
            if pod.metadata.deletion_timestamp.is_some() {
                note(PodEvent::Terminating(name.clone()));
            }
            if gone {
                note(PodEvent::Removed(name));
            }
        }
    });
    (events, task)
}

#[tokio::test]
async fn a_deployment_becomes_available_and_rolls_out_pod_by_pod() {
    let plane = control_plane();
    let node = RealNode::start(plane).await;
    for image in ["example/mcp:1", "example/mcp:2"] {
        node.tag(images::PAUSE, image);
    }
    let ns = plane.namespace("rollout").await;
    let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let (events, watching) = record_pod_events(pods.clone());
    deployments
        .create(&PostParams::default(), &deployment("mcp", "example/mcp:1"))
        .await
        .unwrap();
    wait_for(TIMEOUT, "3 available replicas", || {
        rolled_out(&deployments, "mcp")
    })
    .await;
    let old: Vec<String> = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert_eq!(old.len(), 3);
    for pod in pods.list(&ListParams::default()).await.unwrap() {
        let spec = pod.spec.unwrap();
        let status = pod.status.unwrap();
        assert_eq!(
            spec.node_name.as_deref(),
            Some(node.name.as_str()),
            "scheduled"
        );
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert!(
            status.pod_ip.unwrap().starts_with("10.244.0."),
            "a pod IP of the node's CNI network"
        );
    }

    let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "mcp", "image": "example/mcp:2"}]}}}});
    deployments
        .patch("mcp", &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .unwrap();
    wait_for(TIMEOUT, "the rolling update to finish", || {
        rolled_out(&deployments, "mcp")
    })
    .await;
    wait_for(TIMEOUT, "the old pods to be removed", || async {
        pods.list(&ListParams::default())
            .await
            .map(|l| l.items.len() == 3)
            .unwrap_or(false)
    })
    .await;
    wait_for(TIMEOUT, "the old pods' removal watched", || async {
        let events = events.lock().unwrap();
        old.iter()
            .all(|pod| events.contains(&PodEvent::Removed(pod.clone())))
    })
    .await;
    watching.abort();

    let events = events.lock().unwrap().clone();
    let position = |event: &PodEvent| events.iter().position(|e| e == event);
    let mut terminations = Vec::new();
    for pod in &old {
        let terminating = position(&PodEvent::Terminating(pod.clone()))
            .unwrap_or_else(|| panic!("{pod} never terminated: {events:?}"));
        let removed = position(&PodEvent::Removed(pod.clone())).expect("removed");
        assert!(terminating < removed, "{pod}: graceful order: {events:?}");
        terminations.push(terminating);
    }
    terminations.sort();
    // maxUnavailable 0: before the k-th old pod goes, k new pods are ready.
    for (k, at) in terminations.iter().enumerate() {
        let new_ready = events[..*at]
            .iter()
            .filter(|e| matches!(e, PodEvent::Ready(p) if !old.contains(p)))
            .count();
        assert!(
            new_ready > k,
            "old pod {k} terminated with only {new_ready} new pods ready: {events:?}"
        );
    }
}

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.testbed.mcpsession.dev
spec:
  group: testbed.mcpsession.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wdg]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1}
              labels: {type: object, additionalProperties: {type: string}}
          status:
            type: object
            properties:
              counts: {type: object, additionalProperties: {type: integer}}
"#;

#[tokio::test]
async fn a_crd_applied_from_yaml_is_served_with_server_side_apply_of_status() {
    let plane = control_plane();
    let ns = plane.namespace("crd").await;
    let crd: CustomResourceDefinition = serde_yaml::from_str(CRD).unwrap();
    apply_crd(&ns.client, &crd).await;
    let apply = PatchParams::apply("testbed").force();
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "testbed.mcpsession.dev",
        "v1",
        "Widget",
    ));
    let widgets: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &resource);
    let widget = json!({"apiVersion": "testbed.mcpsession.dev/v1", "kind": "Widget", "metadata": {"name": "w"},
                        "spec": {"size": 3, "labels": {"a": "b"}}});
    wait_for(TIMEOUT, "the widget resource to be served", || async {
        widgets
            .patch("w", &apply, &Patch::Apply(&widget))
            .await
            .is_ok()
    })
    .await;
    // Status by server-side apply, with a map.
    let status = json!({"apiVersion": "testbed.mcpsession.dev/v1", "kind": "Widget", "metadata": {"name": "w"},
                        "status": {"counts": {"pod-a": 2, "pod-b": 5}}});
    widgets
        .patch_status("w", &apply, &Patch::Apply(&status))
        .await
        .unwrap();
    let stored = widgets.get("w").await.unwrap();
    assert_eq!(stored.data["spec"]["size"], 3);
    assert_eq!(stored.data["status"]["counts"]["pod-b"], 5);
    // The schema is enforced.
    let invalid = json!({"apiVersion": "testbed.mcpsession.dev/v1", "kind": "Widget", "metadata": {"name": "bad"}, "spec": {"size": 0}});
    let err = widgets
        .patch("bad", &apply, &Patch::Apply(&invalid))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("spec.size"), "{err}");
}

#[tokio::test]
async fn the_apiserver_calls_a_webhook_at_a_loopback_https_url() {
    let plane = control_plane();
    let ns = plane.namespace("webhook").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let server = HttpsServer::start(Arc::new(move |_path: &str, body: Vec<u8>| {
        seen.fetch_add(1, Ordering::SeqCst);
        let review: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let name = review["request"]["name"].as_str().unwrap_or_default();
        let allowed = name != "deny-me";
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "response": {"uid": review["request"]["uid"], "allowed": allowed,
                         "status": {"message": format!("test webhook refuses {name}")}},
        }))
        .unwrap_or_default()
    }))
    .await;
    // Select the test's namespace by a label of ours (the other tests' namespaces, on the same
    // control plane, must not call this webhook).
    let namespaces: Api<Namespace> = Api::all(ns.client.clone());
    let label = json!({"metadata": {"labels": {"testbed.mcpsession.dev/webhook": ns.name}}});
    namespaces
        .patch(&ns.name, &PatchParams::default(), &Patch::Merge(label))
        .await
        .unwrap();
    let config = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": format!("testbed-{}", ns.name)},
        "webhooks": [{
            "name": "configmaps.testbed.mcpsession.dev",
            "clientConfig": {"url": format!("https://127.0.0.1:{}/validate", server.address.port()),
                             "caBundle": base64(server.ca_pem.as_bytes())},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["configmaps"]}],
            "namespaceSelector": {"matchLabels": {"testbed.mcpsession.dev/webhook": ns.name}},
            "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"], "timeoutSeconds": 5,
        }],
    });
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "admissionregistration.k8s.io",
        "v1",
        "ValidatingWebhookConfiguration",
    ));
    let webhooks: Api<DynamicObject> = Api::all_with(ns.client.clone(), &resource);
    webhooks
        .create(
            &PostParams::default(),
            &serde_json::from_value(config).unwrap(),
        )
        .await
        .unwrap();

    let configmaps: Api<ConfigMap> = Api::namespaced(ns.client.clone(), &ns.name);
    let map = |name: &str| {
        serde_json::from_value::<ConfigMap>(json!({"metadata": {"name": name}})).unwrap()
    };
    // The configuration takes effect within a moment: retry until the denial shows.
    wait_for(TIMEOUT, "the webhook to deny", || async {
        match configmaps
            .create(&PostParams::default(), &map("deny-me"))
            .await
        {
            Err(e) => e.to_string().contains("test webhook refuses deny-me"),
            Ok(_) => {
                let _ = configmaps.delete("deny-me", &Default::default()).await;
                false
            }
        }
    })
    .await;
    let before = calls.load(Ordering::SeqCst);
    configmaps
        .create(&PostParams::default(), &map("allowed"))
        .await
        .unwrap();
    assert!(
        calls.load(Ordering::SeqCst) > before,
        "the webhook saw the allowed create too"
    );
    webhooks
        .delete(&format!("testbed-{}", ns.name), &Default::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_service_account_gets_what_its_role_grants_and_nothing_else() {
    let plane = control_plane();
    let ns = plane.namespace("rbac").await;
    let objects = [
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "narrow"}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "read-configmaps"},
               "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "narrow"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-configmaps"},
               "subjects": [{"kind": "ServiceAccount", "name": "narrow", "namespace": ns.name}]}),
    ];
    for object in objects {
        let object: DynamicObject = serde_json::from_value(object).unwrap();
        let types = object.types.clone().unwrap();
        let (group, version) = types
            .api_version
            .split_once('/')
            .unwrap_or(("", &types.api_version));
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, &types.kind));
        let api: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &resource);
        api.create(&PostParams::default(), &object).await.unwrap();
    }
    let client = plane.client_as(&ns.name, "narrow").await;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    configmaps
        .list(&ListParams::default())
        .await
        .expect("granted: list configmaps");
    let forbidden = |e: kube::Error| matches!(e, kube::Error::Api(s) if s.code == 403);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    assert!(
        forbidden(secrets.list(&ListParams::default()).await.unwrap_err()),
        "secrets are not granted"
    );
    let map: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
    assert!(
        forbidden(
            configmaps
                .create(&PostParams::default(), &map)
                .await
                .unwrap_err()
        ),
        "create is not granted"
    );
    let elsewhere: Api<ConfigMap> = Api::namespaced(client, "default");
    assert!(
        forbidden(elsewhere.list(&ListParams::default()).await.unwrap_err()),
        "other namespaces are not granted"
    );
}

/// Base64, as Kubernetes serializes bytes.
fn base64(bytes: &[u8]) -> serde_json::Value {
    serde_json::to_value(k8s_openapi::ByteString(bytes.to_vec())).unwrap()
}
