//! The first real pods: the real 1.35 kubelet on containerd and runc runs a pod of the project's
//! own image (built by scripts/image.sh, imported, never pulled) on a CNI bridge network; the
//! kubelet probes it over that network, and a graceful deletion stops it.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use support::control_plane::{
    control_plane, restricted_container_security, restricted_pod_security,
};
use support::images;
use support::node::RealNode;
use support::wait::{wait_for, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_of_the_project_image_runs_on_the_real_kubelet() {
    let plane = control_plane();
    let node = RealNode::start(plane).await;
    let ns = plane.namespace("real").await;
    ns.enforce_restricted().await;
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "proxy", "labels": {"app": "proxy"}},
        "spec": {"nodeName": node.name, "automountServiceAccountToken": false,
                 "terminationGracePeriodSeconds": 20,
                 "securityContext": restricted_pod_security(),
                 "containers": [{"name": "proxy", "image": images::qualified(images::PROJECT),
                                 "imagePullPolicy": "Never",
                                 "args": ["proxy", "--listen", "0.0.0.0:8090", "--upstream", "http://127.0.0.1:8000",
                                          "--admin-addr", "0.0.0.0:8091"],
                                 "ports": [{"containerPort": 8090}, {"containerPort": 8091}],
                                 "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8091}, "periodSeconds": 1},
                                 "securityContext": restricted_container_security()}]},
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create the pod");
    let ip = wait_until(
        Duration::from_secs(90),
        "the pod Running and Ready",
        || async {
            let pod = pods.get("proxy").await.map_err(|e| e.to_string())?;
            let status = pod.status.unwrap_or_default();
            let ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            match (ready, status.pod_ip) {
                (true, Some(ip)) => Ok(ip),
                _ => Err(format!(
                    "phase {:?}, {:?}; kubelet log in {}",
                    status.phase,
                    status.container_statuses,
                    node.dir.display()
                )),
            }
        },
    )
    .await;
    // Past the test harness's capture, so that every run's log shows the real pod.
    let _ = std::io::Write::write_all(&mut std::io::stderr(), node.wide_pods(&ns.name).as_bytes());
    assert!(ip.starts_with("10.244.0."), "a CNI address: {ip}");
    let health = support::get_at(&format!("{ip}:8091"), "/healthz", "").await;
    assert!(health.is_some(), "the pod answers on the pod network");

    // A Service: the EndpointSlice controller publishes the pod's CNI address, and kube-proxy's
    // iptables rules take the host's connection to the ClusterIP there.
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "proxy"},
        "spec": {"selector": {"app": "proxy"}, "ports": [{"port": 80, "targetPort": 8091}]},
    }))
    .expect("service");
    let cluster_ip = Api::<Service>::namespaced(ns.client.clone(), &ns.name)
        .create(&PostParams::default(), &service)
        .await
        .expect("create the Service")
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("a ClusterIP");
    wait_until(
        Duration::from_secs(60),
        "the ClusterIP routed to the pod",
        || async {
            support::get_at(&format!("{cluster_ip}:80"), "/healthz", "")
                .await
                .ok_or_else(|| format!("nothing at {cluster_ip}:80 yet"))
        },
    )
    .await;
    eprintln!("Service {cluster_ip}:80 reaches the pod at {ip}:8091 through kube-proxy's rules");

    // The apiserver reaches the kubelet too (logs, exec), at the node's address.
    let logs = pods
        .logs("proxy", &Default::default())
        .await
        .expect("kubectl logs, through the apiserver and the kubelet");
    assert!(logs.contains("session proxy serving"), "{logs}");

    pods.delete("proxy", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for(Duration::from_secs(40), "the pod gone", || async {
        pods.get_opt("proxy").await.is_ok_and(|p| p.is_none())
    })
    .await;
}
