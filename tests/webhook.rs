//! The admission webhooks on the real control plane: the apiserver calls the operator at a
//! loopback HTTPS URL with the caBundle the operator generated and keeps current.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::{Client, ResourceExt as _};
use mcp_session_operator::api::McpSessionPolicy;
use serde_json::json;
use support::control_plane::{
    ControlPlane, TestNamespace, control_plane, restricted_container_security,
    restricted_pod_security,
};
use support::operator::{Operator, install_crd, operator_kubeconfig, wait_webhook_ready};
use support::wait::{wait_for, wait_until};

const TIMEOUT: Duration = Duration::from_secs(60);
const SECRET: &str = "mcp-session-operator-webhook-tls";

/// The webhook configurations are cluster-wide: one operator (one test) at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Setup {
    /// Where the workloads and policies are.
    ns: TestNamespace,
    /// The operator's own namespace (its Lease and certificate Secret; never injected).
    operator_ns: TestNamespace,
    operator: Operator,
    port: u16,
}

async fn setup(plane: &'static ControlPlane, prefix: &str, extra: &[&str]) -> Setup {
    let ns = plane.namespace(prefix).await;
    let operator_ns = plane.namespace(&format!("{prefix}-op")).await;
    install_crd(&ns.client).await;
    let kubeconfig = operator_kubeconfig(plane, &ns.client, &operator_ns.name).await;
    let port = support::free_port();
    let operator = Operator::start_with_webhook(
        &kubeconfig,
        &operator_ns.name,
        &ns.name,
        "op-webhook",
        port,
        extra,
    );
    wait_webhook_ready(&ns.client, port).await;
    Setup {
        ns,
        operator_ns,
        operator,
        port,
    }
}

fn policy(name: &str, spec: serde_json::Value) -> DynamicObject {
    serde_json::from_value(json!({"apiVersion": "mcpsession.dev/v1alpha1", "kind": "McpSessionPolicy", "metadata": {"name": name}, "spec": spec})).unwrap()
}

async fn create_policy(
    client: &Client,
    namespace: &str,
    object: DynamicObject,
) -> Result<(), String> {
    let resource = ApiResource::erase::<McpSessionPolicy>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    api.create(&PostParams::default(), &object)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

fn pod(
    name: &str,
    labels: serde_json::Value,
    annotations: serde_json::Value,
    ports: &[i32],
) -> Pod {
    let ports: Vec<serde_json::Value> = ports.iter().map(|p| json!({"containerPort": p})).collect();
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"containers": [{"name": "server", "image": "example/mcp:1", "ports": ports}]}}),
    )
    .unwrap()
}

/// How many pod admissions the operator's mutating webhook has answered (or refused).
async fn mutate_calls(operator: &Operator) -> u64 {
    let (_, metrics) = operator
        .get("/metrics")
        .await
        .expect("the operator's metrics");
    metrics
        .lines()
        .filter(|line| {
            line.starts_with(r#"mcp_session_webhook_requests_total{webhook="mutate-pods""#)
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The names of a pod's containers, init containers (native sidecars among them) first.
fn containers(pod: &Pod) -> Vec<String> {
    pod.spec
        .iter()
        .flat_map(|s| {
            s.init_containers
                .iter()
                .flatten()
                .chain(s.containers.iter())
        })
        .map(|c| c.name.clone())
        .collect()
}

#[tokio::test]
async fn selected_pods_get_the_proxy_and_invalid_policies_are_refused() {
    let _serial = SERIAL.lock().await;
    let plane = control_plane();
    let Setup {
        ns,
        mut operator,
        operator_ns: _operator_ns,
        ..
    } = setup(plane, "inject", &[]).await;
    let selector = json!({"matchLabels": {"app": "api"}});
    create_policy(&ns.client, &ns.name, policy("api", json!({"selector": selector,
        "redis": {"urlSecretRef": {"name": "redis-auth", "key": "url"}}, "drain": {"timeoutSeconds": 20}})))
    .await
    .expect("a valid policy is admitted");
    // The webhook reads policies from its store: wait until it has this one.
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_for(TIMEOUT, "a probe pod to be injected", || async {
        let name = format!("probe-{:04x}", rand::random::<u16>());
        match pods
            .create(
                &PostParams::default(),
                &pod(&name, json!({"app": "api"}), json!({}), &[8000]),
            )
            .await
        {
            Ok(created) => containers(&created).contains(&"mcp-session-proxy".to_owned()),
            Err(_) => false,
        }
    })
    .await;

    // Pods of a Deployment, as the ReplicaSet controller creates them.
    let deployment: Deployment = serde_json::from_value(json!({"metadata": {"name": "api"}, "spec": {"replicas": 2,
        "selector": {"matchLabels": {"app": "api"}},
        "template": {"metadata": {"labels": {"app": "api"}, "annotations": {"mcpsession.dev/proxy-log-level": "debug"}},
            "spec": {"containers": [{"name": "server", "image": "example/mcp:1", "ports": [{"containerPort": 8000}]}]}}}}))
    .unwrap();
    Api::<Deployment>::namespaced(ns.client.clone(), &ns.name)
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let params = ListParams::default().labels("app=api");
    wait_for(TIMEOUT, "the Deployment's pods", || async {
        pods.list(&params)
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|p| p.name_any().starts_with("api-"))
                    .count()
                    == 2
            })
            .unwrap_or(false)
    })
    .await;
    for stored in pods
        .list(&params)
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.name_any().starts_with("api-"))
    {
        let spec = stored.spec.clone().unwrap();
        assert_eq!(
            containers(&stored),
            ["mcp-session-proxy", "server"],
            "a native sidecar, as the cluster has them"
        );
        let proxy = &spec.init_containers.as_ref().expect("init containers")[0];
        assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
        assert_eq!(
            proxy.image.as_deref(),
            Some("example/mcp-session-operator:test")
        );
        let env = serde_json::to_value(&proxy.env).unwrap().to_string();
        assert!(
            env.contains(r#""secretKeyRef":{"key":"url","name":"redis-auth"}"#),
            "{env}"
        );
        assert!(
            env.contains(r#""secretKeyRef":{"key":"key","name":"api-fingerprint-key"}"#),
            "the policy's generated fingerprint key: {env}"
        );
        assert!(
            env.contains(r#"{"name":"RUST_LOG","value":"debug"}"#),
            "the log level the pod template asks: {env}"
        );
        assert_eq!(
            spec.containers[0]
                .lifecycle
                .as_ref()
                .unwrap()
                .pre_stop
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/retire"),
            "a native sidecar hears of a pod stop only through the backend's hook"
        );
        assert_eq!(spec.termination_grace_period_seconds, Some(35));
        assert_eq!(stored.annotations()["mcpsession.dev/injected-by"], "api");
    }

    // The generated key exists before the pod that reads it (made by the webhook, or by the
    // operator's reconcile, whichever came first).
    let secrets: Api<Secret> = Api::namespaced(ns.client.clone(), &ns.name);
    let generated = secrets.get("api-fingerprint-key").await.expect("generated");
    assert!(generated.data.is_some_and(|d| d.contains_key("key")));

    // A policy naming a key Secret that does not exist: its pods are refused, saying why, until
    // the Secret exists.
    create_policy(&ns.client, &ns.name, policy("keyed", json!({"selector": {"matchLabels": {"app": "keyed"}},
        "redis": {"url": "redis://127.0.0.1:6379"}, "injection": {"fingerprintKeySecretRef": {"name": "keyed-keys", "key": "fp"}}})))
    .await
    .expect("a valid policy is admitted");
    let keyed = |name: &str| pod(name, json!({"app": "keyed"}), json!({}), &[8000]);
    let deadline = std::time::Instant::now() + TIMEOUT;
    let refusal = loop {
        match pods.create(&PostParams::default(), &keyed("keyed-0")).await {
            Err(error) => break error.to_string(),
            Ok(created) => {
                // Admitted before the webhook knew the policy: try again.
                assert!(std::time::Instant::now() < deadline, "never refused");
                let _ = pods
                    .delete(
                        &created.name_any(),
                        &DeleteParams::default().grace_period(0),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(
        refusal.contains(&format!("Secret {}/keyed-keys", ns.name))
            && refusal.contains("does not exist"),
        "{refusal}"
    );
    let key: Secret = serde_json::from_value(
        json!({"metadata": {"name": "keyed-keys"}, "stringData": {"fp": "our own key"}}),
    )
    .unwrap();
    secrets.create(&PostParams::default(), &key).await.unwrap();
    let admitted = pods
        .create(&PostParams::default(), &keyed("keyed-1"))
        .await
        .expect("admitted once the Secret exists");
    assert!(containers(&admitted).contains(&"mcp-session-proxy".to_owned()));

    // Opted out, or not selected: untouched. The apiserver does not even call the webhook for
    // a pod opted out by annotation, nor for one without labels (`matchConditions`).
    let calls_before = mutate_calls(&operator).await;
    let unlabelled = pods
        .create(
            &PostParams::default(),
            &pod("unlabelled", json!({}), json!({}), &[8000]),
        )
        .await
        .unwrap();
    assert_eq!(containers(&unlabelled), ["server"]);
    let opted = pods
        .create(
            &PostParams::default(),
            &pod(
                "opted-out",
                json!({"app": "api", "mcpsession.dev/inject": "false"}),
                json!({}),
                &[8000],
            ),
        )
        .await
        .unwrap();
    assert_eq!(containers(&opted), ["server"]);
    let annotated = pods
        .create(
            &PostParams::default(),
            &pod(
                "opted-out-2",
                json!({"app": "api"}),
                json!({"mcpsession.dev/inject": "false"}),
                &[8000],
            ),
        )
        .await
        .unwrap();
    assert_eq!(containers(&annotated), ["server"]);
    assert_eq!(
        mutate_calls(&operator).await,
        calls_before,
        "the apiserver called the webhook for a pod no policy can select"
    );
    let other = pods
        .create(
            &PostParams::default(),
            &pod("other", json!({"app": "worker"}), json!({}), &[8000]),
        )
        .await
        .unwrap();
    assert_eq!(containers(&other), ["server"]);
    assert!(
        mutate_calls(&operator).await > calls_before,
        "a labelled pod is the webhook's to judge"
    );
    // A port the proxy needs: admitted unchanged, with an Event on the policy.
    let clash = pods
        .create(
            &PostParams::default(),
            &pod("clash", json!({"app": "api"}), json!({}), &[8090]),
        )
        .await
        .unwrap();
    assert_eq!(containers(&clash), ["server"]);
    let events: Api<Event> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_for(TIMEOUT, "a ProxyNotInjected event", || async {
        events.list(&ListParams::default()).await.is_ok_and(|l| {
            l.items.iter().any(|e| {
                e.reason.as_deref() == Some("ProxyNotInjected")
                    && e.note.as_deref().unwrap_or_default().contains("port 8090")
            })
        })
    })
    .await;

    // What the schema cannot check, refused with the webhook's message.
    // What needs the cluster or parsing: the validating webhook refuses it.
    let by_webhook = [
        (
            policy(
                "overlap",
                json!({"selector": {"matchLabels": {"app": "api", "tier": "web"}}, "redis": {"url": "redis://r:6379"}}),
            ),
            "overlaps with McpSessionPolicy \"api\"",
        ),
        (
            policy(
                "url",
                json!({"selector": {"matchLabels": {"app": "d"}}, "redis": {"url": "redis://:secret@host:notaport"}}),
            ),
            "spec.redis.url: invalid Redis URL",
        ),
    ];
    for (object, message) in by_webhook {
        let err = create_policy(&ns.client, &ns.name, object)
            .await
            .expect_err("refused");
        assert!(
            err.contains("admission webhook \"policies.mcpsession.dev\" denied the request"),
            "{err}"
        );
        assert!(err.contains(message), "{message} in {err}");
        assert!(!err.contains(":secret@"), "no password in messages: {err}");
    }
    // What the schema can say: its CEL rules refuse it before any webhook is called, with the
    // webhook's own words.
    let by_schema = [
        (
            policy(
                "both",
                json!({"selector": {"matchLabels": {"app": "b"}}, "redis": {"url": "redis://r:6379", "urlSecretRef": {"name": "s", "key": "k"}}}),
            ),
            "set exactly one of url and urlSecretRef",
        ),
        (
            policy(
                "empty",
                json!({"selector": {}, "redis": {"url": "redis://r:6379"}}),
            ),
            "spec.selector must require a label",
        ),
        (
            policy(
                "ports",
                json!({"selector": {"matchLabels": {"app": "c"}}, "redis": {"url": "redis://r:6379"}, "injection": {"proxyPort": 8000}}),
            ),
            "proxyPort and upstreamPort must differ",
        ),
    ];
    for (object, message) in by_schema {
        let err = create_policy(&ns.client, &ns.name, object)
            .await
            .expect_err("refused");
        assert!(!err.contains("admission webhook"), "{err}");
        assert!(err.contains(message), "{message} in {err}");
    }
    assert!(operator.is_running(), "{}", operator.logs());
}

#[tokio::test]
async fn pods_are_still_created_while_the_operator_is_down() {
    let _serial = SERIAL.lock().await;
    let plane = control_plane();
    let Setup {
        ns,
        mut operator,
        operator_ns: _operator_ns,
        ..
    } = setup(plane, "down", &[]).await;
    create_policy(&ns.client, &ns.name, policy("api", json!({"selector": {"matchLabels": {"app": "api"}}, "redis": {"url": "redis://r:6379"}}))).await.unwrap();
    operator.kill();
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let created = pods
        .create(
            &PostParams::default(),
            &pod("while-down", json!({"app": "api"}), json!({}), &[8000]),
        )
        .await
        .expect("failurePolicy Ignore");
    assert_eq!(
        containers(&created),
        ["server"],
        "admitted without the proxy"
    );
    // Policies, though, are not admitted unvalidated.
    let err = create_policy(
        &ns.client,
        &ns.name,
        policy(
            "late",
            json!({"selector": {"matchLabels": {"app": "x"}}, "redis": {"url": "redis://r:6379"}}),
        ),
    )
    .await
    .expect_err("failurePolicy Fail");
    assert!(err.contains("policies.mcpsession.dev"), "{err}");
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let _serial = SERIAL.lock().await;
    let plane = control_plane();
    // 30 s certificates, renewed with a third of their life left: a rotation every 20 s.
    let Setup {
        ns,
        mut operator,
        port,
        operator_ns,
    } = setup(plane, "rotate", &["--webhook-cert-validity-seconds", "30"]).await;
    let secrets: Api<Secret> = Api::namespaced(operator_ns.client.clone(), &operator_ns.name);
    let field = |secret: &Secret, key: &str| {
        String::from_utf8(secret.data.as_ref().unwrap()[key].0.clone()).unwrap()
    };
    let first = secrets.get(SECRET).await.unwrap();
    let ca = field(&first, "ca.crt");
    let (_, _, served) = support::https::post(port, &ca, "/healthz", Vec::new()).await;
    assert_eq!(served, der(&field(&first, "tls.crt")));
    wait_for(Duration::from_secs(45), "a renewed certificate", || async {
        secrets
            .get(SECRET)
            .await
            .is_ok_and(|s| field(&s, "tls.crt") != field(&first, "tls.crt"))
    })
    .await;
    let renewed = secrets.get(SECRET).await.unwrap();
    assert_eq!(
        field(&renewed, "ca.crt"),
        ca,
        "the CA, and so the caBundle, stays"
    );
    wait_for(TIMEOUT, "the renewed certificate to be served", || async {
        support::https::post(port, &ca, "/healthz", Vec::new())
            .await
            .2
            == der(&field(&renewed, "tls.crt"))
    })
    .await;
    // The apiserver still trusts it.
    create_policy(
        &ns.client,
        &ns.name,
        policy(
            "after-rotation",
            json!({"selector": {"matchLabels": {"app": "x"}}, "redis": {"url": "redis://r:6379"}}),
        ),
    )
    .await
    .expect("validated over the renewed certificate");
    assert!(operator.is_running(), "no restart: {}", operator.logs());
}

#[tokio::test]
async fn bad_admission_requests_get_clear_answers_never_a_500() {
    let _serial = SERIAL.lock().await;
    let plane = control_plane();
    let Setup {
        ns,
        mut operator,
        port,
        operator_ns,
    } = setup(plane, "bad-review", &[]).await;
    let secrets: Api<Secret> = Api::namespaced(operator_ns.client.clone(), &operator_ns.name);
    let ca = String::from_utf8(
        secrets.get(SECRET).await.unwrap().data.unwrap()["ca.crt"]
            .0
            .clone(),
    )
    .unwrap();
    let post = |path: &'static str, body: Vec<u8>| support::https::post(port, &ca, path, body);

    let (status, body, _) = post("/mutate-pods", b"{broken".to_vec()).await;
    assert_eq!(status, 400);
    assert!(
        body.contains("the body is not an AdmissionReview"),
        "{body}"
    );
    let (status, body, _) = post("/mutate-pods", br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"1"}}"#.to_vec()).await;
    assert_eq!(status, 400);
    assert!(body.contains("admission.k8s.io/v1 is served"), "{body}");
    let status =
        support::https::post_status_during_upload(port, &ca, "/validate-policies", 4 << 20).await;
    assert_eq!(status, 413, "oversized");
    let review = |object: serde_json::Value, kind: &str, resource: &str| {
        serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "4b1a8f0e-0000-4000-8000-000000000001", "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": resource}, "namespace": ns.name, "operation": "CREATE",
            "userInfo": {"username": "test"}, "object": object, "unknownField": {"nested": [1, 2]}}}))
        .unwrap()
    };
    let (status, body, _) = post("/mutate-pods", review(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"app": "api"}}, "spec": {"containers": []}}), "Pod", "pods")).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert!(
        answer["response"]["patch"].is_null(),
        "no containers: allowed without a patch"
    );
    let (status, body, _) = post("/validate-policies", review(json!({"apiVersion": "mcpsession.dev/v1alpha1", "kind": "McpSessionPolicy", "metadata": {"name": "x"}, "spec": {"selector": 7}}), "McpSessionPolicy", "mcpsessionpolicies")).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], false);
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("does not decode"),
        "{body}"
    );
    let (status, _, _) = post("/nothing-here", b"{}".to_vec()).await;
    assert_eq!(status, 404);
    assert!(operator.is_running(), "{}", operator.logs());
    let (_, metrics) = operator.get("/metrics").await.unwrap();
    assert!(
        metrics.contains(
            r#"mcp_session_webhook_requests_total{webhook="mutate-pods",result="bad_request"} 2"#
        ),
        "{metrics}"
    );
}

fn der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// A CA and a serving certificate for 127.0.0.1, as cert-manager would mount them.
fn write_certificate_files(
    dir: &std::path::Path,
    ca: &(rcgen::CertificateParams, rcgen::KeyPair),
) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names.push(rcgen::SanType::IpAddress(
        std::net::Ipv4Addr::LOCALHOST.into(),
    ));
    let cert = params
        .signed_by(&key, &rcgen::Issuer::from_params(&ca.0, &ca.1))
        .unwrap();
    std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    cert.pem()
}

#[tokio::test]
async fn certificates_from_files_are_served_and_reloaded() {
    let _serial = SERIAL.lock().await;
    let plane = control_plane();
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    std::fs::write(dir.path().join("ca.crt"), &ca_pem).unwrap();
    let ca = (ca_params, ca_key);
    let first = write_certificate_files(dir.path(), &ca);
    let path = |f: &str| dir.path().join(f).display().to_string();
    let (cert, key, ca_file) = (path("tls.crt"), path("tls.key"), path("ca.crt"));
    let Setup {
        ns,
        mut operator,
        port,
        operator_ns,
    } = setup(
        plane,
        "files",
        &[
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-file",
            &ca_file,
        ],
    )
    .await;
    assert_eq!(
        support::https::post(port, &ca_pem, "/healthz", Vec::new())
            .await
            .2,
        der(&first)
    );
    create_policy(
        &ns.client,
        &ns.name,
        policy(
            "ok",
            json!({"selector": {"matchLabels": {"app": "x"}}, "redis": {"url": "redis://r:6379"}}),
        ),
    )
    .await
    .expect("validated over the mounted certificate");
    let secrets: Api<Secret> = Api::namespaced(operator_ns.client.clone(), &operator_ns.name);
    assert!(
        secrets.get_opt(SECRET).await.unwrap().is_none(),
        "no managed Secret with mounted certificates"
    );
    // cert-manager renews: the files change, the server follows.
    let second = write_certificate_files(dir.path(), &ca);
    wait_for(TIMEOUT, "the renewed file to be served", || async {
        support::https::post(port, &ca_pem, "/healthz", Vec::new())
            .await
            .2
            == der(&second)
    })
    .await;
    assert!(operator.is_running(), "{}", operator.logs());
}

/// A namespace that enforces the `restricted` Pod Security profile admits a pod the webhook
/// injected, and refuses one whose own spec breaks the profile for the backend's container
/// alone: the proxy's patch never adds a violation.
#[tokio::test]
async fn restricted_pod_security_admits_injected_pods_and_blames_only_the_backend() {
    let _serial = SERIAL.lock().await;
    let plane = control_plane();
    // The operator serves the webhooks for as long as it is held.
    let Setup {
        ns,
        operator: _operator,
        operator_ns: _operator_ns,
        ..
    } = setup(plane, "restricted", &[]).await;
    ns.enforce_restricted().await;
    create_policy(
        &ns.client,
        &ns.name,
        policy(
            "api",
            json!({"selector": {"matchLabels": {"app": "api"}},
        "redis": {"url": "redis://127.0.0.1:6379"}}),
        ),
    )
    .await
    .expect("a valid policy is admitted");
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let restricted: Pod = serde_json::from_value(json!({
        "metadata": {"labels": {"app": "api"}},
        "spec": {"securityContext": restricted_pod_security(),
                 "containers": [{"name": "server", "image": "example/mcp:1", "ports": [{"containerPort": 8000}],
                                 "securityContext": restricted_container_security()}]},
    }))
    .unwrap();
    // The webhook reads policies from its store: retried until it has this one.
    let admitted = wait_until(TIMEOUT, "an injected pod admitted", || async {
        let mut pod = restricted.clone();
        pod.metadata.name = Some(format!("ok-{:04x}", rand::random::<u16>()));
        match pods.create(&PostParams::default(), &pod).await {
            Ok(created) if containers(&created).contains(&"mcp-session-proxy".to_owned()) => {
                Ok(created)
            }
            Ok(created) => Err(format!("not injected: {:?}", containers(&created))),
            Err(error) => Err(error.to_string()),
        }
    })
    .await;
    assert_eq!(containers(&admitted), ["mcp-session-proxy", "server"]);

    let careless = pod("careless", json!({"app": "api"}), json!({}), &[8000]);
    let refusal = pods
        .create(&PostParams::default(), &careless)
        .await
        .expect_err("a pod that breaks the profile is refused")
        .to_string();
    assert!(
        refusal.contains("violates PodSecurity \"restricted:latest\""),
        "{refusal}"
    );
    assert!(refusal.contains("\"server\""), "{refusal}");
    assert!(
        !refusal.contains("mcp-session-proxy"),
        "the injected proxy breaks nothing: {refusal}"
    );

    // The same backend in a Deployment: its ReplicaSet is refused every pod, which only the
    // ReplicaSet's status would say; the policy says it, in a condition and an Event.
    let deployment: Deployment = serde_json::from_value(
        json!({"metadata": {"name": "careless"}, "spec": {"replicas": 1,
        "selector": {"matchLabels": {"app": "api"}},
        "template": {"metadata": {"labels": {"app": "api"}}, "spec": careless.spec}}}),
    )
    .unwrap();
    Api::<Deployment>::namespaced(ns.client.clone(), &ns.name)
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let events: Api<Event> = Api::namespaced(ns.client.clone(), &ns.name);
    let note = wait_until(
        TIMEOUT,
        "a PodSecurityRefused event on the policy",
        || async {
            let list = events
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            let reasons: Vec<String> = list.items.iter().filter_map(|e| e.reason.clone()).collect();
            list.items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some("PodSecurityRefused")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("api")
                })
                .and_then(|e| e.note)
                .ok_or_else(|| format!("events so far: {reasons:?}"))
        },
    )
    .await;
    assert!(
        note.contains("violates PodSecurity \"restricted:latest\""),
        "{note}"
    );
    assert!(note.contains("container \"server\""), "{note}");
    assert!(!note.contains("mcp-session-proxy"), "{note}");
    let policy = Api::<McpSessionPolicy>::namespaced(ns.client.clone(), &ns.name)
        .get("api")
        .await
        .unwrap();
    let admitted = policy
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == "PodsAdmitted")
        .cloned()
        .expect("a PodsAdmitted condition");
    assert_eq!(
        (admitted.status.as_str(), admitted.reason.as_str()),
        ("False", "PodSecurityRefused")
    );
}
