//! The operator on the real control plane with a real redis-server, run as a process with the
//! service-account RBAC of config/rbac/.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt as _};
use mcp_session_operator::api::{McpSessionPolicy, McpSessionPolicyStatus};
use mcp_session_operator::store::{NewSession, RedisStore, SessionId, SessionState, SessionStore};
use serde_json::json;
use support::control_plane::{TestNamespace, control_plane};
use support::images;
use support::node::{NODE_IP, RealNode};
use support::operator::{Operator, OperatorNamespace, PROXY_IMAGE, install_crd};
use support::redis::RedisServer;
use support::wait::wait_for;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Operators watch more than their test's namespace (one of them the whole cluster): run the
/// tests of this file one at a time, as a cluster runs one operator.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn policy(name: &str, spec: serde_json::Value) -> McpSessionPolicy {
    serde_json::from_value(json!({"apiVersion": "mcpsession.dev/v1alpha1", "kind": "McpSessionPolicy", "metadata": {"name": name}, "spec": spec}))
        .expect("policy")
}

/// A test namespace with the CRD and a kubeconfig of the operator's service account, and a
/// real node that runs its pods (the tests' `example/mcp` images are the sandbox's sleeper,
/// the operator's image the project's).
struct Bed {
    ns: TestNamespace,
    kubeconfig: std::path::PathBuf,
    _node: RealNode,
}

async fn bed(prefix: &str) -> Bed {
    let node = node_running_sleepers().await;
    let OperatorNamespace { ns, kubeconfig } = OperatorNamespace::create(prefix).await;
    Bed {
        ns,
        kubeconfig,
        _node: node,
    }
}

/// A real node on which the tests' server images (`example/mcp:1`, `:2`) are sleepers, ready
/// once started: what these tests check is what the operator makes of the pods, not what
/// runs in them.
async fn node_running_sleepers() -> RealNode {
    let node = RealNode::start(control_plane()).await;
    for image in ["example/mcp:1", "example/mcp:2"] {
        node.tag(images::PAUSE, image);
    }
    // The operator's gateways: of the image it is told, or of its own default.
    for image in [
        PROXY_IMAGE.to_owned(),
        mcp_session_operator::api::contract::default_image(),
    ] {
        node.tag(images::PROJECT, &image);
    }
    node
}

/// A Deployment of 2 pods labelled `app`, rolled out one surge pod at a time; `minReadySeconds`
/// keeps a rollout going for a few seconds, long enough to report into it.
async fn rolling_deployment(client: &Client, namespace: &str, app: &str) -> Api<Deployment> {
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": app},
        "spec": {"replicas": 2, "minReadySeconds": 5, "selector": {"matchLabels": {"app": app}},
                 "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                 "template": {"metadata": {"labels": {"app": app}}, "spec": {"containers": [{"name": "mcp", "image": "example/mcp:1"}]}}},
    }))
    .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    deployments
}

/// A new image in the pod template: a rollout.
async fn roll(deployments: &Api<Deployment>, app: &str) {
    let new_image = json!({"spec": {"template": {"spec": {"containers": [{"name": "mcp", "image": "example/mcp:2"}]}}}});
    deployments
        .patch(app, &PatchParams::default(), &Patch::Merge(&new_image))
        .await
        .unwrap();
}

async fn apply(client: &Client, namespace: &str, policy: &McpSessionPolicy) {
    let api: Api<McpSessionPolicy> = Api::namespaced(client.clone(), namespace);
    api.patch(
        &policy.name_any(),
        &PatchParams::apply("tests").force(),
        &Patch::Apply(policy),
    )
    .await
    .expect("apply policy");
}

/// Waits until the policy's status satisfies `check`; returns that status.
async fn status_until(
    client: &Client,
    namespace: &str,
    name: &str,
    what: &str,
    check: impl Fn(&McpSessionPolicyStatus) -> bool,
) -> McpSessionPolicyStatus {
    support::operator::status_until(client, namespace, name, what, TIMEOUT, check).await
}

fn condition<'a>(status: &'a McpSessionPolicyStatus, type_: &str) -> (&'a str, &'a str) {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map_or(("", ""), |c| (c.status.as_str(), c.reason.as_str()))
}

async fn store(redis: &RedisServer, prefix: &str) -> RedisStore {
    redis.store(prefix, Duration::from_secs(3600)).await
}

async fn events(client: &Client, namespace: &str, reason: &str) -> usize {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    api.list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .filter(|e| e.reason.as_deref() == Some(reason))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn status_metrics_and_printer_columns_follow_the_sessions_of_selected_pods() {
    let _serial = SERIAL.lock().await;
    let _node = node_running_sleepers().await;
    let OperatorNamespace { ns, kubeconfig } = OperatorNamespace::create("status").await;
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "api"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "api"}},
                 "template": {"metadata": {"labels": {"app": "api"}}, "spec": {"containers": [{"name": "mcp", "image": "example/mcp:1"}]}}},
    }))
    .unwrap();
    Api::<Deployment>::namespaced(ns.client.clone(), &ns.name)
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_for(TIMEOUT, "2 pods", || async {
        pods.list(&ListParams::default())
            .await
            .map(|l| l.items.len() == 2)
            .unwrap_or(false)
    })
    .await;
    let mut pod_names: Vec<String> = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    pod_names.sort();

    let redis = RedisServer::start();
    let sessions = store(&redis, "mcp:session:").await;
    for i in 0..5 {
        let owner = Some(pod_names[i % 2].clone());
        sessions
            .create_or_rehydrate(
                &SessionId::random(),
                NewSession {
                    owner_pod: owner,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    sessions
        .create_or_rehydrate(&SessionId::parse("unowned").unwrap(), NewSession::default())
        .await
        .unwrap();
    let draining = SessionId::random();
    sessions
        .create_or_rehydrate(
            &draining,
            NewSession {
                owner_pod: Some(pod_names[0].clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    sessions
        .mark_draining(&draining, Some(&pod_names[0]), Duration::from_secs(600))
        .await
        .unwrap();

    let mut operator = Operator::start(&kubeconfig, &ns.name, Some(&ns.name), "op-status");
    apply(
        &ns.client,
        &ns.name,
        &policy(
            "api",
            json!({"selector": {"matchLabels": {"app": "api"}}, "redis": {"url": redis.url()}}),
        ),
    )
    .await;
    let status = status_until(&ns.client, &ns.name, "api", "7 sessions counted", |s| {
        s.sessions.total == 7 && s.pods.ready == 2
    })
    .await;
    assert_eq!((status.sessions.active, status.sessions.draining), (6, 1));
    assert_eq!(condition(&status, "Ready"), ("True", "SessionsCounted"));
    assert_eq!(condition(&status, "RedisReachable"), ("True", "Connected"));
    assert_eq!(condition(&status, "RolloutSafe").0, "True");
    assert_eq!(status.pods.selected, 2);
    let per_pod: Vec<(String, u64)> = status
        .pod_sessions
        .iter()
        .map(|p| (p.pod.clone(), p.sessions))
        .collect();
    assert_eq!(
        per_pod,
        vec![(pod_names[0].clone(), 3), (pod_names[1].clone(), 2)]
    );
    let api: Api<McpSessionPolicy> = Api::namespaced(ns.client.clone(), &ns.name);
    assert_eq!(
        status.observed_generation,
        api.get("api").await.unwrap().metadata.generation
    );

    // Each selected pod's deletion cost follows its sessions (a scale-down removes the
    // emptiest first).
    let costs_are = |expected: [&'static str; 2]| {
        let (pods, names) = (pods.clone(), pod_names.clone());
        async move {
            let mut seen = Vec::new();
            for name in &names {
                let pod = pods.get(name).await.unwrap();
                seen.push(
                    pod.annotations()
                        .get("controller.kubernetes.io/pod-deletion-cost")
                        .cloned()
                        .unwrap_or_default(),
                );
            }
            seen == expected
        }
    };
    wait_for(TIMEOUT, "deletion costs 3 and 2", || costs_are(["3", "2"])).await;

    // A new session shows up at the next requeue, and the status is only written on change.
    sessions
        .create_or_rehydrate(
            &SessionId::random(),
            NewSession {
                owner_pod: Some(pod_names[1].clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    status_until(&ns.client, &ns.name, "api", "8 sessions", |s| {
        s.sessions.total == 8
    })
    .await;
    wait_for(TIMEOUT, "deletion costs 3 and 3", || costs_are(["3", "3"])).await;
    let version = api.get("api").await.unwrap().metadata.resource_version;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        api.get("api").await.unwrap().metadata.resource_version,
        version,
        "no write without a change"
    );

    // kubectl get msp: the printer columns, through the Table API.
    let request = http::Request::get(format!(
        "/apis/mcpsession.dev/v1alpha1/namespaces/{}/mcpsessionpolicies",
        ns.name
    ))
    .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
    .body(Vec::new())
    .unwrap();
    let table: serde_json::Value =
        serde_json::from_str(&ns.client.request_text(request).await.unwrap()).unwrap();
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        [
            "Name", "Sessions", "Draining", "Ready", "Strategy", "Gateway", "Age"
        ]
    );
    assert_eq!(table["rows"][0]["cells"][1], 8);
    assert_eq!(table["rows"][0]["cells"][2], 1);
    assert_eq!(table["rows"][0]["cells"][3], "True");
    assert_eq!(
        table["rows"][0]["cells"][4], "Move",
        "the default strategy, as the apiserver defaulted it"
    );
    assert_eq!(table["rows"][0]["cells"][5], false, "sidecar mode");

    let (code, metrics) = operator.get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    let series = format!(
        r#"mcp_sessions{{namespace="{}",policy="api",state="active"}} 7"#,
        ns.name
    );
    assert!(metrics.contains(&series), "{metrics}");
    let pod_series = format!(
        r#"mcp_sessions_per_pod{{namespace="{}",policy="api",pod="{}"}} 3"#,
        ns.name, pod_names[1]
    );
    assert!(metrics.contains(&pod_series), "{metrics}");
    assert!(
        metrics.contains("mcp_session_operator_reconciles_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mcp_session_redis_command_duration_seconds_bucket"),
        "{metrics}"
    );
    assert_eq!(operator.get("/readyz").await.unwrap().0, 200);
    assert_eq!(operator.get("/healthz").await.unwrap().0, 200);

    // A pod died without draining (SIGKILL, a lost node): its sessions are swept, marked
    // draining for whichever pod each client reaches next; live pods keep theirs.
    let ghosts = [SessionId::random(), SessionId::random()];
    for ghost in &ghosts {
        sessions
            .create_or_rehydrate(
                ghost,
                NewSession {
                    owner_pod: Some("api-gone-7d9f".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    let status = status_until(
        &ns.client,
        &ns.name,
        "api",
        "the ghost's sessions swept",
        |s| s.sessions.total == 10 && s.sessions.draining == 3,
    )
    .await;
    assert_eq!(status.sessions.active, 7);
    for ghost in &ghosts {
        let swept = sessions.get(ghost).await.unwrap().unwrap();
        assert_eq!(swept.record.owner_pod, None);
        assert_eq!(swept.record.state(), SessionState::Draining);
    }
    assert_eq!(events(&ns.client, &ns.name, "SessionsSwept").await, 1);
    let (_, metrics) = operator.get("/metrics").await.unwrap();
    let swept = format!(
        r#"mcp_session_drains_total{{namespace="{}",policy="api",by="sweep"}} 2"#,
        ns.name
    );
    assert!(metrics.contains(&swept), "{metrics}");

    api.delete("api", &DeleteParams::default()).await.unwrap();
    wait_for(TIMEOUT, "the policy's series to go", || async {
        operator
            .get("/metrics")
            .await
            .is_some_and(|(_, m)| !m.contains(r#"policy="api""#))
    })
    .await;
    assert!(operator.is_running(), "{}", operator.logs());
}

#[tokio::test]
async fn seed_written_sessions_are_counted_by_scan_and_by_a_rebuilt_index() {
    let _serial = SERIAL.lock().await;
    let OperatorNamespace { ns, kubeconfig } = OperatorNamespace::create("seed").await;
    let redis = RedisServer::start();
    let _operator = Operator::start_with(
        &kubeconfig,
        &ns.name,
        Some(&ns.name),
        "op-seed",
        &["--no-webhook", "--prune-interval-seconds", "1"],
    );
    let selector = json!({"matchLabels": {"app": "legacy"}});
    apply(&ns.client, &ns.name, &policy("by-scan", json!({"selector": selector, "redis": {"url": redis.url(), "keyPrefix": "legacy:", "countBy": "Scan"}}))).await;
    status_until(&ns.client, &ns.name, "by-scan", "an empty count", |s| {
        condition(s, "Ready").0 == "True"
    })
    .await;
    // Written the seed's way after the policy exists: plain keys, no index.
    for i in 0..30 {
        let record = format!(
            r#"{{"connection_id": "s{i}", "created_at": "2026-01-15T10:00:00.000000", "last_activity_at": "2026-01-15T10:00:00.000000", "metadata": {{"user_id": "u"}}}}"#
        );
        redis
            .cli(&["SET", &format!("legacy:s{i}"), &record, "EX", "86400"])
            .unwrap();
    }
    redis.cli(&["SET", "legacy:broken", "{nope"]).unwrap();
    let status = status_until(&ns.client, &ns.name, "by-scan", "30 seed sessions", |s| {
        s.sessions.total == 30
    })
    .await;
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert!(
        ready.message.contains("1 unreadable records skipped"),
        "{}",
        ready.message
    );
    // The default (index) policy over the same keys: the first count builds the index.
    apply(
        &ns.client,
        &ns.name,
        &policy(
            "by-index",
            json!({"selector": selector, "redis": {"url": redis.url(), "keyPrefix": "legacy:"}}),
        ),
    )
    .await;
    status_until(
        &ns.client,
        &ns.name,
        "by-index",
        "30 sessions through the index",
        |s| s.sessions.total == 30,
    )
    .await;

    // What only a prune removes: the entries of a session that expired (the record went with
    // its TTL; the entry stays), of a pod that owned it and has nothing left, and of a record
    // deleted behind the index's back. The operator prunes each store once per interval.
    for args in [
        ["ZADD", "{legacy:}:expiry", "1000", "expired"],
        ["ZADD", "{legacy:}:pod:gone-0", "1000", "expired"],
        ["ZADD", "{legacy:}:pods", "1000", "gone-0"],
        ["ZADD", "{legacy:}:expiry", "99999999999999", "deleted"],
    ] {
        redis.cli(&args).unwrap();
    }
    let index = || {
        let card = |key: &str| redis.cli(&["ZCARD", key]).unwrap().trim().to_owned();
        (
            card("{legacy:}:expiry"),
            card("{legacy:}:pods"),
            redis
                .cli(&["EXISTS", "{legacy:}:pod:gone-0"])
                .unwrap()
                .trim()
                .to_owned(),
        )
    };
    let pruned = ("31".to_owned(), "1".to_owned(), "0".to_owned());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while index() != pruned {
        assert!(
            std::time::Instant::now() < deadline,
            "index never pruned: (expiry, pods, gone pod's set) = {:?}, 30 sessions and the sentinels expected",
            index()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = status_until(&ns.client, &ns.name, "by-index", "still 30", |s| {
        s.sessions.total == 30
    })
    .await;
    assert_eq!(status.sessions.total, 30);
}

/// A Redis that evicts session records (here `volatile-lru` filled past its limit with keys
/// that have a TTL, as session records do; then `allkeys-lru`) turns `SessionsRetained` False
/// within a reconcile, with one Event per reason, and the count drops the evicted sessions.
#[tokio::test]
async fn an_evicting_redis_is_a_condition_and_an_event_within_a_reconcile() {
    const SESSIONS: u64 = 50;
    let _serial = SERIAL.lock().await;
    let OperatorNamespace { ns, kubeconfig } = OperatorNamespace::create("evicting").await;
    let redis = RedisServer::start();
    let sessions = store(&redis, "mcp:session:").await;
    for _ in 0..SESSIONS {
        sessions
            .create_or_rehydrate(&SessionId::random(), NewSession::default())
            .await
            .unwrap();
    }
    let _operator = Operator::start(&kubeconfig, &ns.name, Some(&ns.name), "op-evicting");
    apply(
        &ns.client,
        &ns.name,
        &policy(
            "p",
            json!({"selector": {"matchLabels": {"app": "x"}}, "redis": {"url": redis.url()}}),
        ),
    )
    .await;
    let kept = status_until(&ns.client, &ns.name, "p", "every session counted", |s| {
        s.sessions.total == SESSIONS
    })
    .await;
    assert_eq!(condition(&kept, "SessionsRetained"), ("True", "Retained"));

    redis.limit_memory("volatile-lru", 50_000);
    redis.fill_past_limit(1000, true);
    let started = std::time::Instant::now();
    let evicted = status_until(&ns.client, &ns.name, "p", "SessionsRetained=False", |s| {
        condition(s, "SessionsRetained").0 == "False"
    })
    .await;
    eprintln!(
        "SessionsRetained False {:.1} s after the evictions",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        condition(&evicted, "SessionsRetained"),
        ("False", "KeysEvicted")
    );
    wait_for(TIMEOUT, "a KeysEvicted event", || async {
        events(&ns.client, &ns.name, "KeysEvicted").await == 1
    })
    .await;
    let left = mcp_session_operator::store::scan_report(&sessions, 100, &|_| {})
        .await
        .expect("scan")
        .counts
        .total;
    assert!(left < SESSIONS, "Redis evicted no session record");
    status_until(
        &ns.client,
        &ns.name,
        "p",
        "the evicted sessions uncounted",
        |s| s.sessions.total < SESSIONS,
    )
    .await;

    redis
        .cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"])
        .unwrap();
    let any_key = status_until(&ns.client, &ns.name, "p", "EvictionPolicy", |s| {
        condition(s, "SessionsRetained") == ("False", "EvictionPolicy")
    })
    .await;
    let message = any_key
        .conditions
        .iter()
        .find(|c| c.type_ == "SessionsRetained")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("allkeys-lru"), "{message}");
    wait_for(TIMEOUT, "an EvictionPolicy event", || async {
        events(&ns.client, &ns.name, "EvictionPolicy").await == 1
    })
    .await;
}

#[tokio::test]
async fn a_redis_outage_is_a_condition_and_events_and_the_operator_keeps_running() {
    let _serial = SERIAL.lock().await;
    let OperatorNamespace { ns, kubeconfig } = OperatorNamespace::create("outage").await;
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    store(&redis, "mcp:session:")
        .await
        .create_or_rehydrate(&SessionId::random(), NewSession::default())
        .await
        .unwrap();
    let mut operator = Operator::start(&kubeconfig, &ns.name, Some(&ns.name), "op-outage");
    apply(
        &ns.client,
        &ns.name,
        &policy(
            "p",
            json!({"selector": {"matchLabels": {"app": "x"}}, "redis": {"url": redis.url()}}),
        ),
    )
    .await;
    status_until(&ns.client, &ns.name, "p", "1 session", |s| {
        s.sessions.total == 1
    })
    .await;

    redis.kill();
    let down = status_until(&ns.client, &ns.name, "p", "RedisReachable=False", |s| {
        condition(s, "RedisReachable").0 == "False"
    })
    .await;
    assert_eq!(condition(&down, "Ready"), ("False", "RedisUnreachable"));
    assert_eq!(down.sessions.total, 1, "the last known count is kept");
    let message = &down
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .message;
    assert!(
        message.contains(&format!("127.0.0.1:{}", redis.port)),
        "{message}"
    );
    wait_for(TIMEOUT, "a RedisUnreachable event", || async {
        events(&ns.client, &ns.name, "RedisUnreachable").await == 1
    })
    .await;
    let redis_up = |value: u8| {
        format!(
            r#"mcp_session_redis_up{{namespace="{}",policy="p"}} {value}"#,
            ns.name
        )
    };
    let (_, metrics) = operator.get("/metrics").await.expect("metrics");
    assert!(metrics.contains(&redis_up(0)), "{metrics}");

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        events(&ns.client, &ns.name, "RedisUnreachable").await,
        1,
        "one event per transition, not per reconcile"
    );
    redis.restart();
    let up = status_until(&ns.client, &ns.name, "p", "RedisReachable=True", |s| {
        condition(s, "RedisReachable").0 == "True"
    })
    .await;
    assert_eq!(condition(&up, "Ready"), ("True", "SessionsCounted"));
    wait_for(TIMEOUT, "a RedisReachable event", || async {
        events(&ns.client, &ns.name, "RedisReachable").await == 1
    })
    .await;
    let (_, metrics) = operator.get("/metrics").await.expect("metrics");
    assert!(metrics.contains(&redis_up(1)), "{metrics}");
    assert!(
        operator.is_running(),
        "the operator never exits: {}",
        operator.logs()
    );
}

#[tokio::test]
async fn bad_input_is_a_condition_and_other_policies_and_namespaces_are_unaffected() {
    let _serial = SERIAL.lock().await;
    let OperatorNamespace { ns, kubeconfig } = OperatorNamespace::create("bad").await;
    let other = control_plane().namespace("other").await;
    let redis = RedisServer::start();
    for (prefix, n) in [("a:", 3), ("b:", 5)] {
        let sessions = store(&redis, prefix).await;
        for _ in 0..n {
            sessions
                .create_or_rehydrate(&SessionId::random(), NewSession::default())
                .await
                .unwrap();
        }
    }
    // Cluster-wide: this operator watches every namespace.
    let mut operator = Operator::start(&kubeconfig, &ns.name, None, "op-bad");
    let selector = json!({"matchLabels": {"app": "x"}});
    apply(
        &ns.client,
        &ns.name,
        &policy(
            "a",
            json!({"selector": selector, "redis": {"url": redis.url(), "keyPrefix": "a:"}}),
        ),
    )
    .await;
    apply(
        &other.client,
        &other.name,
        &policy(
            "b",
            json!({"selector": selector, "redis": {"url": redis.url(), "keyPrefix": "b:"}}),
        ),
    )
    .await;
    apply(&ns.client, &ns.name, &policy("no-secret", json!({"selector": selector, "redis": {"urlSecretRef": {"name": "redis-auth", "key": "url"}}}))).await;
    apply(&ns.client, &ns.name, &policy("unreachable", json!({"selector": selector, "redis": {"url": format!("redis://127.0.0.1:{}", support::free_port())}}))).await;
    apply(
        &ns.client,
        &ns.name,
        // The schema's pattern and CEL rules pass it; only parsing the URL finds it bad.
        &policy(
            "bad-url",
            json!({"selector": selector, "redis": {"url": "redis://r:99999"}}),
        ),
    )
    .await;

    status_until(&ns.client, &ns.name, "a", "3 sessions under a:", |s| {
        s.sessions.total == 3
    })
    .await;
    status_until(
        &other.client,
        &other.name,
        "b",
        "5 sessions under b: in another namespace",
        |s| s.sessions.total == 5,
    )
    .await;
    let missing = status_until(&ns.client, &ns.name, "no-secret", "SecretNotFound", |s| {
        condition(s, "Ready").1 == "SecretNotFound"
    })
    .await;
    assert_eq!(
        condition(&missing, "RedisReachable"),
        ("Unknown", "NotChecked")
    );
    status_until(
        &ns.client,
        &ns.name,
        "unreachable",
        "RedisUnreachable",
        |s| condition(s, "Ready").1 == "RedisUnreachable",
    )
    .await;
    let invalid = status_until(&ns.client, &ns.name, "bad-url", "InvalidPolicy", |s| {
        condition(s, "Ready").1 == "InvalidPolicy"
    })
    .await;
    assert!(
        invalid
            .conditions
            .iter()
            .any(|c| c.message.contains("spec.redis.url"))
    );
    wait_for(TIMEOUT, "a SecretNotFound event", || async {
        events(&ns.client, &ns.name, "SecretNotFound").await >= 1
    })
    .await;

    // A Secret with a key that is no URL, then a good one: each change reconciles at once.
    let secrets: Api<Secret> = Api::namespaced(ns.client.clone(), &ns.name);
    let secret = |url: &str| {
        serde_json::from_value::<Secret>(
            json!({"metadata": {"name": "redis-auth"}, "stringData": {"url": url}}),
        )
        .unwrap()
    };
    secrets
        .create(&PostParams::default(), &secret("not a url"))
        .await
        .unwrap();
    status_until(
        &ns.client,
        &ns.name,
        "no-secret",
        "an invalid URL from the Secret",
        |s| condition(s, "Ready").1 == "InvalidPolicy",
    )
    .await;
    secrets
        .replace(
            "redis-auth",
            &PostParams::default(),
            &secret(&format!("redis://127.0.0.1:{}/0", redis.port)),
        )
        .await
        .unwrap();
    let fixed = status_until(
        &ns.client,
        &ns.name,
        "no-secret",
        "Ready from the Secret's URL",
        |s| condition(s, "Ready").0 == "True",
    )
    .await;
    assert_eq!(fixed.sessions.total, 0, "the default prefix holds nothing");
    // The policies that work were never disturbed.
    status_until(&ns.client, &ns.name, "a", "still 3", |s| {
        s.sessions.total == 3 && condition(s, "Ready").0 == "True"
    })
    .await;
    assert!(operator.is_running(), "{}", operator.logs());
}

#[tokio::test]
async fn the_schema_rejects_invalid_specs_with_readable_messages() {
    let _serial = SERIAL.lock().await;
    let plane = control_plane();
    let ns = plane.namespace("schema").await;
    install_crd(&ns.client).await;
    let api: Api<McpSessionPolicy> = Api::namespaced(ns.client.clone(), &ns.name);
    // Untyped, so that specs the Rust types would refuse reach the apiserver.
    let resource = kube::api::ApiResource::erase::<McpSessionPolicy>(&());
    let raw: Api<kube::api::DynamicObject> =
        Api::namespaced_with(ns.client.clone(), &ns.name, &resource);
    let selector = json!({"matchLabels": {"app": "x"}});
    let cases = [
        (
            json!({"selector": selector, "redis": {"url": "redis://r:6379"}, "ttlSeconds": 5}),
            "spec.ttlSeconds",
        ),
        (
            json!({"selector": selector, "redis": {"url": "http://r"}}),
            "spec.redis.url",
        ),
        (
            json!({"selector": selector, "redis": {"url": "redis://r", "keyPrefix": "mcp:*"}}),
            "spec.redis.keyPrefix",
        ),
        (
            json!({"selector": selector, "redis": {"url": "redis://r", "countBy": "Guess"}}),
            "spec.redis.countBy",
        ),
        (
            json!({"selector": selector, "redis": {"url": "redis://r"}, "injection": {"proxyPort": 70000}}),
            "spec.injection.proxyPort",
        ),
        (json!({"selector": selector}), "spec.redis"),
        // CEL rules (x-kubernetes-validations): no webhook is registered here, the apiserver
        // alone refuses these.
        (
            json!({"selector": selector, "redis": {"url": "redis://r", "urlSecretRef": {"name": "s", "key": "url"}}}),
            "spec.redis: set exactly one of url and urlSecretRef",
        ),
        (
            json!({"selector": selector, "redis": {}}),
            "spec.redis: set exactly one of url and urlSecretRef",
        ),
        (
            json!({"selector": selector, "redis": {"url": "redis://r"}, "injection": {"proxyPort": 8000}}),
            "spec.injection: proxyPort and upstreamPort must differ",
        ),
        (
            json!({"selector": {}, "redis": {"url": "redis://r"}}),
            "spec.selector must require a label",
        ),
        (
            json!({"selector": {"matchLabels": {}, "matchExpressions": []}, "redis": {"url": "redis://r"}}),
            "spec.selector must require a label",
        ),
        // Selects every pod without a `tier` label, unlabelled pods among them.
        (
            json!({"selector": {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["batch"]}]},
                   "redis": {"url": "redis://r"}}),
            "spec.selector must require a label",
        ),
        (
            json!({"selector": selector, "redis": {"url": "redis://r"}, "gateway": {"enabled": true},
                   "drain": {"strategy": "Wait", "onOwnerLost": "Replay"}}),
            "spec.drain.onOwnerLost: Replay is for injected proxies",
        ),
    ];
    for (spec, field) in cases {
        let object = json!({"apiVersion": "mcpsession.dev/v1alpha1", "kind": "McpSessionPolicy", "metadata": {"name": "invalid"}, "spec": spec});
        let object: kube::api::DynamicObject = serde_json::from_value(object).unwrap();
        let err = raw
            .create(&PostParams::default(), &object)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{spec}: {err}");
    }
    let created = api
        .create(
            &PostParams::default(),
            &policy(
                "defaults",
                json!({"selector": selector, "redis": {"url": "redis://r:6379"}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        created.spec.ttl_seconds, 86_400,
        "the apiserver applied the defaults"
    );
    assert_eq!(created.spec.injection.proxy_port, 8090);
    // A gateway whose sessions stay on their pods: admitted.
    api.create(
        &PostParams::default(),
        &policy(
            "waiting-gateway",
            json!({"selector": selector, "redis": {"url": "redis://r:6379"}, "gateway": {"enabled": true},
                   "drain": {"strategy": "Wait"}}),
        ),
    )
    .await
    .expect("Wait with a gateway is admitted");
}

#[tokio::test]
async fn two_operators_elect_one_leader_and_fail_over_when_it_dies() {
    let _serial = SERIAL.lock().await;
    let OperatorNamespace { ns, kubeconfig } = OperatorNamespace::create("leader").await;
    let redis = RedisServer::start();
    let sessions = store(&redis, "mcp:session:").await;
    let mut first = Operator::start(&kubeconfig, &ns.name, Some(&ns.name), "op-one");
    let mut second = Operator::start(&kubeconfig, &ns.name, Some(&ns.name), "op-two");
    let leases: Api<Lease> = Api::namespaced(ns.client.clone(), &ns.name);
    let holder = || async {
        leases
            .get_opt("mcp-session-operator")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    };
    wait_for(TIMEOUT, "a leader", || async { holder().await.is_some() }).await;
    apply(
        &ns.client,
        &ns.name,
        &policy(
            "p",
            json!({"selector": {"matchLabels": {"app": "x"}}, "redis": {"url": redis.url()}}),
        ),
    )
    .await;
    status_until(&ns.client, &ns.name, "p", "a status from the leader", |s| {
        condition(s, "Ready").0 == "True"
    })
    .await;

    let leader = holder().await.unwrap();
    let (dying, standby) = if leader == "op-one" {
        (&mut first, &mut second)
    } else {
        (&mut second, &mut first)
    };
    for _ in 0..10 {
        let (_, metrics) = standby.get("/metrics").await.unwrap_or_default();
        assert!(
            !metrics.contains("mcp_sessions{"),
            "the standby does not reconcile"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(standby.get("/readyz").await.unwrap().1, "ok: standby");
    dying.kill();
    let killed_at = std::time::Instant::now();
    let standby_name = standby.identity.clone();
    wait_for(TIMEOUT, "the standby to take over", || async {
        holder().await.as_deref() == Some(standby_name.as_str())
    })
    .await;
    let failover = killed_at.elapsed();
    assert!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );
    sessions
        .create_or_rehydrate(&SessionId::random(), NewSession::default())
        .await
        .unwrap();
    status_until(&ns.client, &ns.name, "p", "the new leader's count", |s| {
        s.sessions.total == 1
    })
    .await;
    assert!(standby.is_running(), "{}", standby.logs());
    eprintln!("leader failover after SIGKILL took {failover:?}");

    // A graceful stop releases the lease: a third replica takes over at once.
    let mut third = Operator::start(&kubeconfig, &ns.name, Some(&ns.name), "op-three");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopped_at = std::time::Instant::now();
    assert_eq!(
        standby.terminate(),
        Some(0),
        "SIGTERM exits cleanly: {}",
        standby.logs()
    );
    wait_for(TIMEOUT, "the third replica to take over", || async {
        holder().await.as_deref() == Some("op-three")
    })
    .await;
    let handover = stopped_at.elapsed();
    assert!(
        handover < Duration::from_secs(3),
        "handover after SIGTERM took {handover:?}"
    );
    assert!(third.is_running(), "{}", third.logs());
    eprintln!("leader handover after SIGTERM took {handover:?}");
}

/// A policy that names no fingerprint key gets its own, in a Secret the policy owns, never
/// replaced; a named Secret that is missing is a condition and an Event, and the condition
/// clears when the Secret appears. Counting goes on meanwhile. With `--network-policies`, each
/// policy's pods get a NetworkPolicy (the chart's option, and the RBAC rule it adds).
#[tokio::test]
async fn each_policy_gets_its_own_fingerprint_key_and_a_missing_named_one_is_a_condition() {
    let _serial = SERIAL.lock().await;
    let OperatorNamespace { ns, kubeconfig } = OperatorNamespace::create("keys").await;
    let rbac = [
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "network-policies", "namespace": ns.name},
               "rules": [{"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["get", "create", "patch"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "network-policies", "namespace": ns.name},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "network-policies"},
               "subjects": [{"kind": "ServiceAccount", "name": "mcp-session-operator", "namespace": ns.name}]}),
    ];
    for object in rbac {
        let object: kube::api::DynamicObject = serde_json::from_value(object).unwrap();
        support::control_plane::apply_object(&ns.client, &object, false)
            .await
            .expect("RBAC");
    }
    let redis = RedisServer::start();
    let mut operator = Operator::start_with(
        &kubeconfig,
        &ns.name,
        Some(&ns.name),
        "op-keys",
        &[
            "--no-webhook",
            "--network-policies",
            "--metrics-namespace=monitoring",
        ],
    );
    let spec = |app: &str, injection: serde_json::Value| json!({"selector": {"matchLabels": {"app": app}}, "redis": {"url": redis.url()}, "injection": injection});
    for name in ["gen-a", "gen-b"] {
        apply(&ns.client, &ns.name, &policy(name, spec(name, json!({})))).await;
    }
    let named = json!({"fingerprintKeySecretRef": {"name": "keys", "key": "fingerprint"}});
    apply(&ns.client, &ns.name, &policy("named", spec("named", named))).await;

    let secrets: Api<Secret> = Api::namespaced(ns.client.clone(), &ns.name);
    let mut keys = Vec::new();
    for name in ["gen-a", "gen-b"] {
        status_until(&ns.client, &ns.name, name, "a generated key", |s| {
            condition(s, "FingerprintKeyReady") == ("True", "Generated")
        })
        .await;
        let secret = secrets
            .get(&format!("{name}-fingerprint-key"))
            .await
            .expect("the generated Secret");
        let owner = &secret.metadata.owner_references.as_ref().expect("owned")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("McpSessionPolicy", name)
        );
        let key = secret
            .data
            .as_ref()
            .and_then(|d| d.get("key"))
            .expect("key")
            .0
            .clone();
        assert_eq!(key.len(), 64, "256 bits, hex");
        keys.push(key);
    }
    assert_ne!(keys[0], keys[1], "one key per policy");

    let network_policies: Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
        Api::namespaced(ns.client.clone(), &ns.name);
    let written = network_policies
        .get("gen-a-mcp-session-proxy")
        .await
        .expect("the pods' NetworkPolicy");
    let spec = serde_json::to_value(written.spec).unwrap();
    assert_eq!(spec["podSelector"]["matchLabels"], json!({"app": "gen-a"}));
    assert_eq!(
        spec["ingress"],
        json!([{"ports": [{"port": 8090, "protocol": "TCP"}]},
               {"ports": [{"port": 8091, "protocol": "TCP"}],
                "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]}])
    );

    let missing = status_until(
        &ns.client,
        &ns.name,
        "named",
        "the named Secret missing",
        |s| condition(s, "FingerprintKeyReady") == ("False", "SecretNotFound"),
    )
    .await;
    assert_eq!(condition(&missing, "Ready").0, "True", "counting goes on");
    assert!(
        missing
            .conditions
            .iter()
            .any(|c| c.message.contains(&format!("{}/keys", ns.name))),
        "{missing:?}"
    );
    wait_for(TIMEOUT, "a SecretNotFound event", || async {
        events(&ns.client, &ns.name, "SecretNotFound").await >= 1
    })
    .await;
    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "keys"}, "stringData": {"fingerprint": "a key of our own"}}),
    )
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    // A spec change reconciles at once (Secrets are not watched).
    apply(
        &ns.client,
        &ns.name,
        &policy(
            "named",
            json!({"selector": {"matchLabels": {"app": "named"}}, "redis": {"url": redis.url()}, "ttlSeconds": 7200,
                   "injection": {"fingerprintKeySecretRef": {"name": "keys", "key": "fingerprint"}}}),
        ),
    )
    .await;
    status_until(&ns.client, &ns.name, "named", "the named key", |s| {
        condition(s, "FingerprintKeyReady") == ("True", "Named")
    })
    .await;
    let again = secrets.get("gen-a-fingerprint-key").await.unwrap();
    assert_eq!(
        again.data.as_ref().and_then(|d| d.get("key")).map(|k| &k.0),
        Some(&keys[0]),
        "never replaced"
    );
    assert!(operator.is_running(), "{}", operator.logs());
}

#[tokio::test]
async fn a_service_that_bypasses_the_proxy_is_a_condition_and_an_event() {
    let _serial = SERIAL.lock().await;
    let OperatorNamespace { ns, kubeconfig } = OperatorNamespace::create("routing").await;
    let redis = RedisServer::start();
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "api-0", "labels": {"app": "api"}},
        "spec": {"containers": [{"name": "server", "image": "example/mcp:1", "ports": [{"name": "http", "containerPort": 8000}]}]}}))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(ns.client.clone(), &ns.name);
    let service = |target: serde_json::Value| {
        serde_json::from_value::<k8s_openapi::api::core::v1::Service>(
            json!({"metadata": {"name": "api"},
            "spec": {"selector": {"app": "api"}, "ports": [{"port": 80, "targetPort": target}]}}),
        )
        .unwrap()
    };
    services
        .create(&PostParams::default(), &service(json!("http")))
        .await
        .unwrap();
    let _operator = Operator::start(&kubeconfig, &ns.name, Some(&ns.name), "op-routing");
    apply(
        &ns.client,
        &ns.name,
        &policy(
            "api",
            json!({"selector": {"matchLabels": {"app": "api"}}, "redis": {"url": redis.url()}}),
        ),
    )
    .await;
    let bypassed = status_until(&ns.client, &ns.name, "api", "ServicesRouted=False", |s| {
        condition(s, "ServicesRouted").0 == "False"
    })
    .await;
    let message = &bypassed
        .conditions
        .iter()
        .find(|c| c.type_ == "ServicesRouted")
        .unwrap()
        .message;
    assert!(
        message.contains("Service api port 80 targets 8000")
            && message.contains("set targetPort to 8090"),
        "{message}"
    );
    wait_for(TIMEOUT, "a ServiceBypassesProxy event", || async {
        events(&ns.client, &ns.name, "ServiceBypassesProxy").await == 1
    })
    .await;
    let mut fixed = services.get("api").await.unwrap();
    fixed.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].target_port =
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8090));
    services
        .replace("api", &PostParams::default(), &fixed)
        .await
        .unwrap();
    let routed = status_until(&ns.client, &ns.name, "api", "ServicesRouted=True", |s| {
        condition(s, "ServicesRouted").0 == "True"
    })
    .await;
    assert_eq!(condition(&routed, "ServicesRouted").1, "ThroughProxy");
}

/// A rolling update of a Deployment's pod template: the policy's `lastRollout` names the new
/// revision, counts what the proxies reported to the store while it ran (the store calls a
/// drained and a claiming proxy make, tested with real proxies in tests/proxy.rs) and not what
/// they reported before it, and records when it finished.
#[tokio::test]
async fn a_rollout_is_tracked_and_counted_from_the_proxies_reports() {
    use mcp_session_operator::store::Tally;
    let _serial = SERIAL.lock().await;
    let Bed { ns, kubeconfig, .. } = &bed("rollout").await;
    let deployments = rolling_deployment(&ns.client, &ns.name, "web").await;
    let redis = RedisServer::start();
    let sessions = store(&redis, "mcp:session:").await;
    // Reported before the rollout (an earlier one): not this rollout's.
    sessions.tally(Tally::Drained, 7).await.unwrap();
    sessions.tally(Tally::Rehydrated, 6).await.unwrap();
    sessions.tally(Tally::Lost, 1).await.unwrap();
    let operator = Operator::start(kubeconfig, &ns.name, Some(&ns.name), "op-rollout");
    apply(
        &ns.client,
        &ns.name,
        &policy(
            "web",
            json!({"selector": {"matchLabels": {"app": "web"}}, "redis": {"url": redis.url()}}),
        ),
    )
    .await;
    let steady = status_until(&ns.client, &ns.name, "web", "2 ready pods", |s| {
        s.pods.ready == 2
    })
    .await;
    assert_eq!(steady.last_rollout, None, "no rollout yet");

    roll(&deployments, "web").await;
    let started = status_until(&ns.client, &ns.name, "web", "a rollout started", |s| {
        s.last_rollout
            .as_ref()
            .is_some_and(|r| r.started_at.is_some())
    })
    .await;
    let rollout = started.last_rollout.unwrap();
    assert_eq!(rollout.finished_at, None, "{rollout:?}");
    assert_eq!(
        (rollout.drained, rollout.rehydrated, rollout.lost),
        (0, 0, 0)
    );
    // Two old pods drain one session each; other pods claim both.
    sessions.tally(Tally::Drained, 2).await.unwrap();
    sessions.tally(Tally::Rehydrated, 2).await.unwrap();
    let finished = status_until(&ns.client, &ns.name, "web", "the rollout finished", |s| {
        s.last_rollout
            .as_ref()
            .is_some_and(|r| r.finished_at.is_some())
    })
    .await;
    let rollout = finished.last_rollout.unwrap();
    assert_eq!(
        (rollout.drained, rollout.rehydrated, rollout.lost),
        (2, 2, 0),
        "{rollout:?}"
    );
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let hashes: std::collections::BTreeSet<String> = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.labels().get("pod-template-hash").cloned())
        .collect();
    assert_eq!(
        hashes.into_iter().collect::<Vec<_>>(),
        vec![rollout.revision.clone()]
    );
    // The counters hold everything the proxies reported (7 + 2 drained, 6 + 2 rehydrated, 1
    // lost); their increase over the rollout is its status.
    let (_, metrics) = operator.get("/metrics").await.unwrap();
    for series in [
        format!(
            r#"mcp_session_drains_total{{namespace="{}",policy="web",by="proxy"}} 9"#,
            ns.name
        ),
        format!(
            r#"mcp_session_rehydrations_total{{namespace="{}",policy="web"}} 8"#,
            ns.name
        ),
        format!(
            r#"mcp_sessions_lost_total{{namespace="{}",policy="web"}} 1"#,
            ns.name
        ),
    ] {
        assert!(metrics.contains(&series), "{series} in {metrics}");
    }
}

/// A rollout that loses more sessions than `rollout.maxLostSessions` (a new version that refuses
/// the stored sessions) is paused: the Deployment gets `spec.paused`, RolloutSafe turns False
/// with TooManyLostSessions and an Event says so; a Deployment the policy does not select is
/// untouched, and once someone resumes it the rollout is not paused again.
#[tokio::test]
async fn a_rollout_that_loses_too_many_sessions_is_paused() {
    use mcp_session_operator::store::Tally;
    let _serial = SERIAL.lock().await;
    let Bed { ns, kubeconfig, .. } = &bed("guard").await;
    let deployments = rolling_deployment(&ns.client, &ns.name, "web").await;
    rolling_deployment(&ns.client, &ns.name, "other").await;
    let redis = RedisServer::start();
    let sessions = store(&redis, "mcp:session:").await;
    let _operator = Operator::start(kubeconfig, &ns.name, Some(&ns.name), "op-guard");
    apply(
        &ns.client,
        &ns.name,
        &policy(
            "web",
            json!({"selector": {"matchLabels": {"app": "web"}}, "redis": {"url": redis.url()},
                   "rollout": {"maxLostSessions": 1}}),
        ),
    )
    .await;
    status_until(&ns.client, &ns.name, "web", "2 ready pods", |s| {
        s.pods.ready == 2
    })
    .await;
    for app in ["web", "other"] {
        roll(&deployments, app).await;
    }
    status_until(&ns.client, &ns.name, "web", "a rollout started", |s| {
        s.last_rollout
            .as_ref()
            .is_some_and(|r| r.started_at.is_some())
    })
    .await;
    // The new version refuses the replayed sessions: the proxies report them lost.
    sessions.tally(Tally::Drained, 2).await.unwrap();
    sessions.tally(Tally::Lost, 2).await.unwrap();
    let guarded = status_until(&ns.client, &ns.name, "web", "RolloutSafe False", |s| {
        condition(s, "RolloutSafe").0 == "False"
    })
    .await;
    let (_, reason) = condition(&guarded, "RolloutSafe");
    assert_eq!(reason, "TooManyLostSessions");
    let rollout = guarded.last_rollout.unwrap();
    assert_eq!(rollout.lost, 2);
    assert_eq!(rollout.paused.as_deref(), Some("Deployment/web"));
    assert_eq!(
        deployments.get("web").await.unwrap().spec.paused,
        Some(true)
    );
    assert_ne!(
        deployments.get("other").await.unwrap().spec.paused,
        Some(true),
        "not selected: never paused"
    );
    wait_for(TIMEOUT, "a TooManyLostSessions Event", || async {
        events(&ns.client, &ns.name, "TooManyLostSessions").await == 1
    })
    .await;

    // Someone resumes: the rollout finishes and is not paused again.
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": false}})),
        )
        .await
        .unwrap();
    let finished = status_until(&ns.client, &ns.name, "web", "the rollout finished", |s| {
        s.last_rollout
            .as_ref()
            .is_some_and(|r| r.finished_at.is_some())
    })
    .await;
    assert_eq!(
        condition(&finished, "RolloutSafe").1,
        "TooManyLostSessions",
        "{finished:#?}"
    );
    assert_ne!(
        deployments.get("web").await.unwrap().spec.paused,
        Some(true)
    );
}

/// Gateway mode: a policy with `spec.gateway` gets its gateway from the operator, owned by the
/// policy and named `<policy>-gateway`: a ServiceAccount whose Role lets it read that policy and
/// the pods and nothing more (SubjectAccessReviews), a Deployment running `gateway` for the
/// policy, a Service and a PodDisruptionBudget; its readiness is a condition. Turned off, the
/// gateway is scaled to none (the operator may not delete Deployments).
#[tokio::test]
async fn a_policy_in_gateway_mode_gets_a_gateway_that_may_read_only_its_policy_and_pods() {
    let _serial = SERIAL.lock().await;
    let bed = bed("gateway").await;
    let (client, namespace) = (&bed.ns.client, bed.ns.name.as_str());
    // Where the gateway's pods reach it: at the node's address.
    let redis =
        RedisServer::start_with(&["--bind", "127.0.0.1", NODE_IP, "--protected-mode", "no"]);
    let mut operator = Operator::start_with(
        &bed.kubeconfig,
        namespace,
        Some(namespace),
        "op-gateway",
        &["--no-webhook"],
    );
    let spec = |enabled: bool| {
        json!({"selector": {"matchLabels": {"app": "weather"}}, "redis": {"url": redis.url_on(NODE_IP)},
               "injection": {"enabled": false},
               "gateway": {"enabled": enabled, "replicas": 2, "port": 9000, "backendPort": 3000}})
    };
    apply(client, namespace, &policy("weather", spec(true))).await;
    // The gateway's pods run on the node, and are ready once they have listed the policy's.
    let status = status_until(client, namespace, "weather", "the gateway available", |s| {
        condition(s, "GatewayReady") == ("True", "Available")
    })
    .await;
    assert_eq!(
        condition(&status, "FingerprintKeyReady"),
        ("True", "Generated")
    );

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let deployment = deployments
        .get("weather-gateway")
        .await
        .expect("the gateway");
    let owner = &deployment
        .metadata
        .owner_references
        .as_ref()
        .expect("owned")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("McpSessionPolicy", "weather")
    );
    let pod = deployment.spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some("weather-gateway"));
    let args = pod.containers[0].args.clone().unwrap_or_default().join(" ");
    assert!(
        args.starts_with(&format!(
            "gateway --policy {namespace}/weather --backend-port 3000 --listen 0.0.0.0:9000"
        )),
        "{args}"
    );
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(client.clone(), namespace);
    let service = services
        .get("weather-gateway")
        .await
        .expect("the gateway's Service");
    assert_eq!(
        service.spec.and_then(|s| s.ports).expect("ports")[0].port,
        9000
    );
    let budgets: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        namespace,
        &kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "policy",
            "v1",
            "PodDisruptionBudget",
        )),
    );
    budgets
        .get("weather-gateway")
        .await
        .expect("the gateway's PodDisruptionBudget");

    let gateway = format!("system:serviceaccount:{namespace}:weather-gateway");
    let attributes = |verb: &str, group: &str, resource: &str, name: &str| json!({"namespace": namespace, "verb": verb, "group": group, "resource": resource, "name": name});
    for (allowed, what) in [
        (
            true,
            attributes("get", "mcpsession.dev", "mcpsessionpolicies", "weather"),
        ),
        (true, attributes("list", "", "pods", "")),
        (true, attributes("watch", "", "pods", "")),
        (
            false,
            attributes("get", "mcpsession.dev", "mcpsessionpolicies", "another"),
        ),
        (
            false,
            attributes("patch", "mcpsession.dev", "mcpsessionpolicies", "weather"),
        ),
        (false, attributes("patch", "", "pods", "")),
        (false, attributes("get", "", "secrets", "")),
        (false, attributes("list", "", "services", "")),
    ] {
        assert_eq!(
            support::control_plane::can(client, &gateway, what.clone()).await,
            allowed,
            "{what}"
        );
    }

    apply(client, namespace, &policy("weather", spec(false))).await;
    status_until(client, namespace, "weather", "the gateway off", |s| {
        condition(s, "GatewayReady") == ("True", "Disabled")
    })
    .await;
    let stopped = deployments.get("weather-gateway").await.expect("kept");
    assert_eq!(stopped.spec.replicas, Some(0));
    assert!(operator.is_running(), "{}", operator.logs());
}
