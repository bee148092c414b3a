//! The Helm chart, rendered and linted by the real helm CLI (v4, built from Go modules by
//! tests/cluster/build.sh) and installed on the test bed: the manifests the apiserver accepts,
//! the service account it creates running the operator, and what that account may and may not do.

mod support;

use std::process::Command;
use std::time::Duration;

use kube::api::{Api, DynamicObject};
use serde_json::{Value, json};
use support::control_plane::{apply_object, can, control_plane, kube_bin_dir};
use support::operator::Operator;
use support::redis::RedisServer;
use support::wait::wait_for;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/mcp-session-operator");

/// Every option switched on.
fn all_options() -> Value {
    json!({
        "webhook": {"certManager": {"enabled": true}},
        "metrics": {"serviceMonitor": {"enabled": true, "labels": {"release": "prometheus"}},
                    "prometheusRule": {"enabled": true}},
        "networkPolicy": {"enabled": true, "metricsFrom": ["monitoring"], "injectedPods": true},
        "redis": {"enabled": true},
        "gateway": {"enabled": true},
        "watchNamespace": "prod",
        "logLevel": "info,kube=debug",
        "podLabels": {"team": "mcp"},
        "podAnnotations": {"example.com/owner": "mcp"},
        "tolerations": [{"key": "dedicated", "operator": "Exists"}],
        "priorityClassName": "system-cluster-critical",
        "proxy": {"image": "registry.example/mcp-session-operator:0.1.0", "sidecar": "classic"},
    })
}

/// Runs the real helm CLI on the chart with `values`, offline (no cluster: a client-side dry run
/// renders as `helm install` would): its standard output, or what it said on failure.
fn helm(args: &[&str], values: &Value) -> Result<String, String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("values.json");
    std::fs::write(&file, values.to_string()).expect("values file");
    let output = Command::new(kube_bin_dir().join("helm"))
        .args(args)
        .arg(CHART)
        .arg("--values")
        .arg(&file)
        .env("KUBECONFIG", dir.path().join("no-cluster"))
        .env("HELM_CACHE_HOME", dir.path().join("cache"))
        .env("HELM_CONFIG_HOME", dir.path().join("config"))
        .env("HELM_DATA_HOME", dir.path().join("data"))
        .output()
        .expect("run helm");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// `helm install --dry-run=client`: the release as Helm would install it.
fn dry_run_install(values: &Value, namespace: &str) -> Result<Value, String> {
    let args = [
        "install",
        "mso",
        "--namespace",
        namespace,
        "--dry-run=client",
        "--output",
        "json",
    ];
    let release = helm(&args, values)?;
    serde_json::from_str(&release).map_err(|e| format!("helm's release is not JSON: {e}"))
}

/// The rendered objects of the chart, template by template; panics with Helm's message if it
/// does not render.
fn render(values: &Value, namespace: &str) -> Vec<DynamicObject> {
    let release = dry_run_install(values, namespace).unwrap_or_else(|error| panic!("{error}"));
    let notes = release["info"]["notes"].as_str().unwrap_or_default();
    assert!(notes.contains("kubectl get mcpsessionpolicies"), "{notes}");
    let manifest = release["manifest"]
        .as_str()
        .expect("the release's manifest");
    let mut objects = Vec::new();
    // Each document starts with `# Source: <chart>/templates/<file>`.
    for document in manifest.split("\n---\n") {
        let path = document
            .lines()
            .find_map(|line| line.strip_prefix("# Source: "))
            .unwrap_or("(no source)")
            .to_owned();
        let yaml: serde_yaml::Value = serde_yaml::from_str(document)
            .unwrap_or_else(|e| panic!("{path} is not YAML: {e}\n{document}"));
        if yaml.is_null() {
            continue;
        }
        let object: DynamicObject = serde_yaml::from_value(yaml)
            .unwrap_or_else(|e| panic!("{path} is not an object: {e}\n{document}"));
        assert!(
            object.types.is_some() && object.metadata.name.is_some(),
            "{path}: apiVersion, kind and name: {document}"
        );
        objects.push(object);
    }
    objects
}

fn kinds(objects: &[DynamicObject]) -> Vec<String> {
    let mut kinds: Vec<String> = objects
        .iter()
        .filter_map(|o| o.types.as_ref().map(|t| t.kind.clone()))
        .collect();
    kinds.sort();
    kinds
}

fn find<'a>(objects: &'a [DynamicObject], kind: &str) -> &'a DynamicObject {
    objects
        .iter()
        .find(|o| o.types.as_ref().is_some_and(|t| t.kind == kind))
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

#[test]
fn the_chart_renders_lints_and_keeps_the_crd_and_rbac_of_the_repository() {
    let defaults = render(&json!({}), "mcp-system");
    assert_eq!(
        kinds(&defaults),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "MutatingWebhookConfiguration",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "Service",
            "ServiceAccount",
            "ValidatingWebhookConfiguration"
        ]
    );
    let deployment = &find(&defaults, "Deployment").data["spec"];
    assert_eq!(deployment["replicas"], 2);
    let pod = &deployment["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    assert!(container["livenessProbe"].is_object() && container["readinessProbe"].is_object());
    let log_filter = |container: &Value| {
        container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == "RUST_LOG")
            .map(|e| e["value"].clone())
    };
    assert_eq!(log_filter(container), None, "the binary's default level");
    assert_eq!(
        deployment["template"]["metadata"]["labels"]["mcpsession.dev/inject"], "false",
        "the operator's pods opt out of its own webhook"
    );

    let everything = render(&all_options(), "mcp-system");
    for kind in [
        "Certificate",
        "Issuer",
        "ServiceMonitor",
        "PrometheusRule",
        "NetworkPolicy",
        "ConfigMap",
    ] {
        find(&everything, kind);
    }
    let container =
        &find(&everything, "Deployment").data["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(log_filter(container), Some(json!("info,kube=debug")));
    let args = container["args"].to_string();
    for flag in [
        "--tls-cert-file=",
        "--watch-namespace=prod",
        "--sidecar=classic",
        "--network-policies",
        "--metrics-namespace=monitoring",
    ] {
        assert!(args.contains(flag), "{flag} in {args}");
    }
    let rules = find(&everything, "ClusterRole").data["rules"].to_string();
    assert!(
        rules.contains(r#""resources":["networkpolicies"],"verbs":["get","create","patch"]"#),
        "{rules}"
    );
    // The opt-in rules for gateways are config/rbac/role_gateways.yaml's.
    let gateways = everything
        .iter()
        .find(|o| {
            o.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.ends_with("-gateways"))
                && o.types.as_ref().is_some_and(|t| t.kind == "ClusterRole")
        })
        .expect("the gateways' ClusterRole");
    let repository: DynamicObject = serde_yaml::from_str(
        include_str!("../config/rbac/role_gateways.yaml")
            .split("\n---\n")
            .next()
            .expect("the ClusterRole"),
    )
    .expect("RBAC object");
    assert_eq!(
        gateways.data["rules"], repository.data["rules"],
        "the gateways' rules drifted from config/rbac/role_gateways.yaml"
    );
    let redis_conf = find(&everything, "ConfigMap").data["data"]["redis.conf"].to_string();
    assert!(
        redis_conf.contains("maxmemory-policy volatile-lru"),
        "{redis_conf}"
    );

    for values in [json!({}), all_options()] {
        if let Err(report) = helm(&["lint", "--strict"], &values) {
            panic!("helm lint --strict: {report}");
        }
    }

    // The chart's CRD is the repository's (generated by `mcp-session-operator crd`).
    assert_eq!(
        std::fs::read_to_string(format!("{CHART}/crds/mcpsessionpolicies.yaml"))
            .expect("chart CRD"),
        include_str!("../crds/mcpsessionpolicies.yaml"),
        "charts/mcp-session-operator/crds/ drifted from crds/: copy crds/mcpsessionpolicies.yaml"
    );
    // Its RBAC is config/rbac/'s, rule for rule.
    let repository: Vec<DynamicObject> = include_str!("../config/rbac/role.yaml")
        .split("\n---\n")
        .map(|d| serde_yaml::from_str(d).expect("RBAC object"))
        .collect();
    for kind in ["ClusterRole", "Role"] {
        let rules = |objects: &[DynamicObject]| {
            let mut rules = find(objects, kind).data["rules"].clone();
            // The chart names the Secret after its release; config/rbac/ after the default.
            for rule in rules.as_array_mut().into_iter().flatten() {
                if let Some(names) = rule.get_mut("resourceNames")
                    && names.to_string().contains("-webhook-tls")
                {
                    *names = json!(["<webhook-tls>"]);
                }
            }
            rules
        };
        assert_eq!(
            rules(&defaults),
            rules(&repository),
            "{kind} rules drifted from config/rbac/"
        );
    }
}

#[test]
fn bad_values_are_refused_by_the_schema_with_the_key_named() {
    for (values, expected) in [
        (json!({"replicaCount": "two"}), "/replicaCount"),
        (
            json!({"replicas": 2}),
            "additional properties 'replicas' not allowed",
        ),
        (
            json!({"redis": {"enabled": true, "maxmemoryPolicy": "allkeys-lru"}}),
            "/redis/maxmemoryPolicy",
        ),
        (json!({"webhook": {"port": 70000}}), "/webhook/port"),
        (
            json!({"image": {"pullPolicy": "Sometimes"}}),
            "/image/pullPolicy",
        ),
        (
            json!({"metrics": {"serviceMonitor": {"enabled": "yes"}}}),
            "/metrics/serviceMonitor/enabled",
        ),
    ] {
        let error = helm(&["lint", "--strict"], &values)
            .err()
            .unwrap_or_else(|| panic!("{values} accepted"));
        assert!(error.contains(expected), "{values}: {error}");
        // The same values fail an install too.
        let install = dry_run_install(&values, "mcp-system");
        assert!(
            install.as_ref().is_err_and(|e| e.contains(expected)),
            "{values} installed: {install:?}"
        );
    }
    assert_eq!(helm(&["lint", "--strict"], &all_options()).err(), None);
}

/// The chart as `helm install` would apply it to the test bed (server-side dry run of
/// every object first, then for real), its service account's token running the operator
/// binary (outside the cluster: there is no kubelet), a policy reconciled with that account,
/// and SubjectAccessReviews of what the account may do (`kubectl auth can-i --as=...`).
#[tokio::test]
async fn the_chart_installs_and_its_service_account_runs_the_operator_and_nothing_more() {
    let plane = control_plane();
    let release_ns = plane.namespace("chart").await;
    let workloads = plane.namespace("chart-apps").await;
    let client = &release_ns.client;
    support::operator::install_crd(client).await;
    // The operator runs outside the cluster here (no kubelet): the apiserver calls it at a
    // loopback URL, which the chart's webhook configurations name.
    let port = support::free_port();
    let values = json!({"redis": {"enabled": true},
                        "webhook": {"url": format!("https://127.0.0.1:{port}")}});
    let objects = render(&values, &release_ns.name);
    // Every option on: what the test bed can check (it has no cert-manager nor
    // prometheus-operator CRDs), server-side dry run.
    for object in render(&all_options(), &release_ns.name) {
        let api_version = object.types.as_ref().map_or("", |t| t.api_version.as_str());
        if api_version.starts_with("cert-manager.io/")
            || api_version.starts_with("monitoring.coreos.com/")
        {
            continue;
        }
        apply_object(client, &object, true)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{api_version} {:?} refused (every option): {e}",
                    object.metadata.name
                )
            });
    }
    for dry_run in [true, false] {
        for object in &objects {
            apply_object(client, object, dry_run)
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "{} {:?} refused (dry run: {dry_run}): {e}",
                        object.types.as_ref().map_or("", |t| t.kind.as_str()),
                        object.metadata.name
                    )
                });
        }
    }

    let account = "mso-mcp-session-operator";
    let user = format!("system:serviceaccount:{}:{account}", release_ns.name);
    let in_ns = |ns: &str, verb: &str, group: &str, resource: &str| json!({"namespace": ns, "verb": verb, "group": group, "resource": resource});
    let (release, apps) = (release_ns.name.as_str(), workloads.name.as_str());
    for (allowed, attributes) in [
        (true, in_ns(apps, "watch", "", "pods")),
        (true, in_ns(apps, "patch", "", "pods")),
        (true, in_ns(apps, "patch", "apps", "deployments")),
        (
            true,
            in_ns(apps, "patch", "mcpsession.dev", "mcpsessionpolicies/status"),
        ),
        (
            true,
            in_ns(release, "update", "coordination.k8s.io", "leases"),
        ),
        (false, in_ns(apps, "delete", "", "pods")),
        (false, in_ns(apps, "create", "", "pods")),
        (false, in_ns(apps, "update", "apps", "deployments")),
        (false, in_ns(apps, "delete", "apps", "deployments")),
        (
            false,
            in_ns(apps, "update", "mcpsession.dev", "mcpsessionpolicies"),
        ),
        (
            false,
            in_ns(apps, "update", "coordination.k8s.io", "leases"),
        ),
        (true, in_ns(apps, "get", "", "secrets")),
        (false, in_ns(apps, "list", "", "secrets")),
        (false, in_ns(apps, "watch", "", "secrets")),
        // A policy's generated fingerprint key; never changed or deleted once made.
        (true, in_ns(apps, "create", "", "secrets")),
        (false, in_ns(apps, "update", "", "secrets")),
        (false, in_ns(apps, "delete", "", "secrets")),
        (false, in_ns(release, "delete", "", "secrets")),
        (
            false,
            json!({"namespace": release, "verb": "update", "resource": "secrets", "name": "someone-elses"}),
        ),
        (
            true,
            json!({"namespace": release, "verb": "update", "resource": "secrets", "name": "mso-mcp-session-operator-webhook-tls"}),
        ),
        (
            false,
            json!({"verb": "create", "group": "rbac.authorization.k8s.io", "resource": "clusterrolebindings"}),
        ),
        (
            false,
            json!({"verb": "delete", "group": "admissionregistration.k8s.io", "resource": "mutatingwebhookconfigurations", "name": "mcp-session-operator"}),
        ),
        (
            false,
            json!({"verb": "patch", "group": "admissionregistration.k8s.io", "resource": "mutatingwebhookconfigurations", "name": "someone-elses"}),
        ),
    ] {
        assert_eq!(
            can(client, &user, attributes.clone()).await,
            allowed,
            "can-i {attributes}"
        );
    }

    // The operator with nothing but the chart's account.
    let token = plane.token_for(release, account).await;
    let kubeconfig = plane.dir.join(format!("kubeconfig-chart-{release}"));
    plane.write_kubeconfig(&kubeconfig, &token);
    let redis = RedisServer::start();
    // The Service name is the chart's, so the certificate Secret is the one its Role names.
    let operator = Operator::start_with_webhook(
        &kubeconfig,
        release,
        apps,
        "op-chart",
        port,
        &["--webhook-service", "mso-mcp-session-operator-webhook"],
    );
    support::operator::wait_webhook_ready(client, port).await;
    // The operator took over the chart's webhook configurations: what it applies is what the
    // chart rendered, but for where the apiserver calls and the caBundle it keeps.
    for kind in [
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ] {
        let resource = kube::api::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(
            "admissionregistration.k8s.io",
            "v1",
            kind,
        ));
        let live = Api::<DynamicObject>::all_with(client.clone(), &resource)
            .get("mcp-session-operator")
            .await
            .expect("webhook configuration");
        let essentials = |object: &DynamicObject| {
            let mut webhook = object.data["webhooks"][0].clone();
            if let Some(fields) = webhook.as_object_mut() {
                fields.remove("clientConfig");
                // Defaulted by the apiserver: the match policy, empty selectors.
                fields.remove("matchPolicy");
                fields.retain(|_, value| value != &json!({}));
            }
            webhook
        };
        assert_eq!(
            essentials(&live),
            essentials(find(&objects, kind)),
            "{kind}: the chart drifted from src/webhook/configuration.rs"
        );
    }
    // The examples are accepted as they are (in this test's namespace), the policies by the
    // operator's validating webhook too.
    for example in [
        include_str!("../examples/intracker-backend.yaml"),
        include_str!("../examples/policy.yaml"),
        include_str!("../examples/seed-only-policy.yaml"),
        include_str!("../examples/gateway.yaml"),
    ] {
        for document in example.split("\n---\n") {
            let text =
                document.replace("namespace: prod", &format!("namespace: {}", workloads.name));
            let mut object: DynamicObject = serde_yaml::from_str(&text).expect("example object");
            object.metadata.namespace = Some(workloads.name.clone());
            apply_object(client, &object, true)
                .await
                .unwrap_or_else(|e| panic!("example refused: {e}\n{text}"));
        }
    }

    let policy: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "mcpsession.dev/v1alpha1", "kind": "McpSessionPolicy",
        "metadata": {"name": "api", "namespace": apps},
        "spec": {"selector": {"matchLabels": {"app": "api"}}, "redis": {"url": redis.url()}},
    }))
    .expect("policy");
    apply_object(client, &policy, false)
        .await
        .expect("apply the policy");
    let resource =
        kube::api::ApiResource::erase::<mcp_session_operator::api::McpSessionPolicy>(&());
    let policies: Api<DynamicObject> = Api::namespaced_with(client.clone(), apps, &resource);
    wait_for(
        Duration::from_secs(60),
        "the policy reconciled by the chart's account",
        || async {
            policies.get("api").await.is_ok_and(|p| {
                p.data["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        },
    )
    .await;
    let log = std::fs::read_to_string(&operator.log).unwrap_or_default();
    // A request the account may not make fails as kube's `ErrorResponse { message: ".. is
    // forbidden ..", reason: "Forbidden", code: 403 }`. Not any "403": ports are random.
    let denied: Vec<&str> = log
        .lines()
        .filter(|line| line.to_lowercase().contains("forbidden") || line.contains("code: 403"))
        .collect();
    assert!(
        denied.is_empty(),
        "requests the chart's account was denied:\n{}",
        denied.join("\n")
    );
}
