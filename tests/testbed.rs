//! Smoke tests of the test bed itself: a real kube-apiserver and kube-controller-manager (1.35,
//! built from Go modules) with the kubelet stand-in. Later tests build on each property
//! shown here.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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
use support::kubelet::{KubeletStandIn, NoProcesses, PodEvent};
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

#[tokio::test]
async fn a_deployment_becomes_available_and_rolls_out_pod_by_pod() {
    let plane = control_plane();
    let ns = plane.namespace("rollout").await;
    let kubelet = KubeletStandIn::start(ns.client.clone(), &ns.name, Arc::new(NoProcesses)).await;
    let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
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
        let status = pod.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert!(
            status.pod_ip.unwrap().starts_with("127.1."),
            "a loopback pod IP"
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

    let events = kubelet.events();
    let position = |event: &PodEvent| events.iter().position(|e| e == event);
    let mut terminations = Vec::new();
    for pod in &old {
        let terminating = position(&PodEvent::Terminating(pod.clone()))
            .unwrap_or_else(|| panic!("{pod} never terminated: {events:?}"));
        let stopped = position(&PodEvent::Stopped(pod.clone())).expect("stopped");
        let removed = position(&PodEvent::Removed(pod.clone())).expect("removed");
        assert!(
            terminating < stopped && stopped < removed,
            "{pod}: graceful order: {events:?}"
        );
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

/// Pods that are real processes: a Python HTTP server per pod on the pod's own loopback IP.
/// preStop is an HTTP call to it; stop is SIGTERM within the grace period.
struct HttpServerPods {
    processes: std::sync::Mutex<std::collections::HashMap<String, std::process::Child>>,
    pre_stops: std::sync::Mutex<Vec<String>>,
    exits: std::sync::Mutex<Vec<(String, Option<i32>)>>,
}

#[async_trait::async_trait]
impl support::kubelet::PodRuntime for HttpServerPods {
    async fn start(&self, pod: &Pod, ip: std::net::Ipv4Addr) {
        let mut command = std::process::Command::new("python3");
        command
            .args(["-m", "http.server", "8000", "--bind", &ip.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let child = support::die_with_parent(&mut command)
            .spawn()
            .expect("python3 -m http.server");
        self.processes.lock().unwrap().insert(pod.name_any(), child);
    }

    async fn ready(&self, _pod: &Pod, ip: std::net::Ipv4Addr) -> bool {
        tokio::net::TcpStream::connect((ip, 8000)).await.is_ok()
    }

    async fn stop(&self, pod: &Pod, ip: std::net::Ipv4Addr, grace: Duration) {
        self.pre_stop(pod, ip).await;
        self.terminate(pod, grace).await;
    }
}

impl HttpServerPods {
    /// The preStop hook: an HTTP call to the pod's server.
    async fn pre_stop(&self, pod: &Pod, ip: std::net::Ipv4Addr) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let Ok(mut stream) = tokio::net::TcpStream::connect((ip, 8000)).await else {
            return;
        };
        let _ = stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer).await;
        if answer.starts_with("HTTP/1.0 200") {
            self.pre_stops.lock().unwrap().push(pod.name_any());
        }
    }

    /// SIGTERM, SIGKILL after `grace`.
    async fn terminate(&self, pod: &Pod, grace: Duration) {
        let Some(mut child) = self.processes.lock().unwrap().remove(&pod.name_any()) else {
            return;
        };
        // SAFETY: signalling a child process we spawned.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + grace;
        let code = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break status.code().or(Some(-1));
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.exits.lock().unwrap().push((pod.name_any(), code));
    }
}

#[tokio::test]
async fn pods_can_be_real_processes_with_a_prestop_hook_and_sigterm() {
    let plane = control_plane();
    let ns = plane.namespace("processes").await;
    let runtime = Arc::new(HttpServerPods {
        processes: Default::default(),
        pre_stops: Default::default(),
        exits: Default::default(),
    });
    let kubelet = KubeletStandIn::start(ns.client.clone(), &ns.name, runtime.clone()).await;
    let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &ns.name);
    let mut web = deployment("web", "example/web:1");
    web.spec.replicas = Some(2);
    deployments
        .create(&PostParams::default(), &web)
        .await
        .unwrap();
    wait_for(TIMEOUT, "2 ready pods serving HTTP", || {
        rolled_out(&deployments, "web")
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let victim = pods.list(&ListParams::default()).await.unwrap().items[0].clone();
    let ip: std::net::Ipv4Addr = victim
        .status
        .as_ref()
        .unwrap()
        .pod_ip
        .as_ref()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect((ip, 8000)).await.is_ok(),
        "the pod's process listens on its pod IP"
    );

    pods.delete(&victim.name_any(), &Default::default())
        .await
        .unwrap();
    wait_for(TIMEOUT, "the pod to be removed", || async {
        pods.get_opt(&victim.name_any()).await.unwrap().is_none()
    })
    .await;
    assert_eq!(
        *runtime.pre_stops.lock().unwrap(),
        [victim.name_any()],
        "preStop reached the process"
    );
    let exits = runtime.exits.lock().unwrap().clone();
    assert_eq!(exits.len(), 1);
    assert!(
        exits[0].1.is_some(),
        "exited on SIGTERM within the grace period: {exits:?}"
    );
    assert!(
        tokio::net::TcpStream::connect((ip, 8000)).await.is_err(),
        "the process is gone"
    );
    wait_for(TIMEOUT, "a replacement pod", || {
        rolled_out(&deployments, "web")
    })
    .await;
    assert!(
        kubelet
            .events()
            .contains(&PodEvent::Removed(victim.name_any()))
    );
}
