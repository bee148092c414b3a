//! Admission latency: `cargo bench --bench webhook` (needs `MCP_TEST_KUBE_BIN`; `-- --quick` runs
//! 5 s instead of 30 s).
//!
//! The operator binary runs against the test control plane with one policy; a local load
//! generator sends pod AdmissionReviews that the policy selects (so every answer carries the
//! injection patch) at 200 requests per second over 4 keep-alive HTTPS connections, as the
//! apiserver would, and records each request's latency and any error.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use mcp_session_operator::api::McpSessionPolicy;
use serde_json::json;
use support::control_plane::control_plane;
use support::https::Sender;
use support::operator::{Operator, install_crd};
use support::wait::wait_for;

const RATE: u64 = 200;
const CONNECTIONS: u64 = 4;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let duration = Duration::from_secs(if quick { 5 } else { 30 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(duration));
}

async fn run(duration: Duration) {
    let plane = control_plane();
    let ns = plane.namespace("bench").await;
    let operator_ns = plane.namespace("bench-op").await;
    install_crd(&ns.client).await;
    let port = support::free_port();
    let (address, url) = (
        format!("127.0.0.1:{port}"),
        format!("https://127.0.0.1:{port}"),
    );
    let operator = Operator::start_with(
        &plane.kubeconfig,
        &operator_ns.name,
        Some(&ns.name),
        "bench-webhook",
        &[
            "--webhook-addr",
            &address,
            "--webhook-url",
            &url,
            "--proxy-image",
            "example/proxy:bench",
        ],
    );
    let secrets: Api<Secret> = Api::namespaced(ns.client.clone(), &operator_ns.name);
    wait_for(
        Duration::from_secs(60),
        "the webhook certificate",
        || async {
            secrets
                .get_opt("mcp-session-operator-webhook-tls")
                .await
                .ok()
                .flatten()
                .is_some()
        },
    )
    .await;
    let secret = secrets
        .get("mcp-session-operator-webhook-tls")
        .await
        .expect("secret");
    let ca = String::from_utf8(secret.data.expect("data")["ca.crt"].0.clone()).expect("PEM");
    let policy: McpSessionPolicy = serde_json::from_value(json!({"apiVersion": "mcpsession.dev/v1alpha1", "kind": "McpSessionPolicy",
        "metadata": {"name": "api"}, "spec": {"selector": {"matchLabels": {"app": "api"}}, "redis": {"url": "redis://r:6379"}}}))
    .expect("policy");
    let policies: Api<McpSessionPolicy> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_for(
        Duration::from_secs(60),
        "the policy to be admitted",
        || async {
            policies
                .create(&PostParams::default(), &policy)
                .await
                .is_ok()
        },
    )
    .await;
    let review = Arc::new(pod_review(&ns.name));
    // Warm-up: until the webhook's store has the policy and answers with a patch.
    let mut warm = connect(port, &ca).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !send(&mut warm, &review)
        .await
        .is_ok_and(|answer| answer.contains("\"patch\""))
    {
        assert!(
            Instant::now() < deadline,
            "the webhook never answered with a patch"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let interval = Duration::from_nanos(1_000_000_000 * CONNECTIONS / RATE);
    let started = Instant::now();
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|worker| {
            let (review, ca) = (review.clone(), ca.clone());
            tokio::spawn(async move {
                let mut sender = connect(port, &ca).await;
                let mut latencies = Vec::new();
                let mut errors = 0;
                let mut ticker = tokio::time::interval_at(
                    tokio::time::Instant::now() + interval * worker as u32 / CONNECTIONS as u32,
                    interval,
                );
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                while started.elapsed() < duration {
                    ticker.tick().await;
                    let sent = Instant::now();
                    match send(&mut sender, &review).await {
                        Ok(answer) if answer.contains("\"patch\"") => {
                            latencies.push(sent.elapsed())
                        }
                        _ => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (mut l, e) = worker.await.expect("worker");
        latencies.append(&mut l);
        errors += e;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let quantile = |q: f64| {
        latencies[((latencies.len() as f64 * q).ceil() as usize)
            .saturating_sub(1)
            .min(latencies.len() - 1)]
    };
    let ms = |d: Duration| format!("{:.3} ms", d.as_secs_f64() * 1000.0);
    println!();
    println!(
        "admission benchmark: pod reviews that get the injection patch, {RATE}/s target over {CONNECTIONS} keep-alive HTTPS connections, {elapsed:.1?}"
    );
    println!("{:<24} {:>12}  target", "measure", "value");
    println!("{:<24} {:>12}", "requests", latencies.len() + errors);
    println!(
        "{:<24} {:>12.1}  200",
        "achieved rate (req/s)",
        (latencies.len() + errors) as f64 / elapsed.as_secs_f64()
    );
    println!("{:<24} {:>12}", "p50", ms(quantile(0.5)));
    println!("{:<24} {:>12}  < 5 ms", "p99", ms(quantile(0.99)));
    println!(
        "{:<24} {:>12}",
        "max",
        ms(*latencies.last().expect("latencies"))
    );
    println!("{:<24} {:>12}  0", "errors", errors);
    println!(
        "{:<24} {:>12.1}",
        "operator RSS (MiB)",
        operator.rss_bytes() as f64 / 1_048_576.0
    );
}

fn pod_review(namespace: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "5d0c8f4e-1111-4000-8000-000000000001",
        "kind": {"group": "", "version": "v1", "kind": "Pod"}, "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": namespace, "operation": "CREATE", "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "api-7d9f-", "labels": {"app": "api", "pod-template-hash": "7d9f"}},
            "spec": {"containers": [{"name": "server", "image": "example/mcp:1", "ports": [{"name": "http", "containerPort": 8000}],
                "resources": {"requests": {"cpu": "100m"}}}], "terminationGracePeriodSeconds": 30}}}}))
    .expect("review")
}

async fn connect(port: u16, ca_pem: &str) -> Sender {
    support::https::connect(port, ca_pem).await.0
}

/// One review, with `?timeout=5s` as the apiserver sends it; an answer other than 200 is an error.
async fn send(sender: &mut Sender, body: &[u8]) -> Result<String, String> {
    match support::https::send(sender, "/mutate-pods?timeout=5s", body.to_vec()).await? {
        (200, answer) => Ok(answer),
        (status, _) => Err(format!("status {status}")),
    }
}
