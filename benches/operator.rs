//! Operator benchmark: `cargo bench --bench operator` (needs `MCP_TEST_KUBE_BIN`, as the tests;
//! add `-- --quick` for a tenth of the scale).
//!
//! Against the test control plane and one real redis-server: 100 policies selecting 1,000 pods,
//! with 1,000,000 sessions. Measures reconcile latency (each reconcile's `took_us` debug line),
//! Redis commands per reconcile at two session counts (they must not grow with sessions), the
//! operator's resident memory, and apiserver writes while nothing changes (must be none).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use mcp_session_operator::api::McpSessionPolicy;
use mcp_session_operator::store::{NewSession, RedisStore, RedisTarget, SessionId, SessionStore};
use serde_json::json;
use support::control_plane::control_plane;
use support::operator::{Operator, install_crd};
use support::redis::RedisServer;

const POLICIES: usize = 100;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (pods, sessions) = if quick {
        (100, 100_000)
    } else {
        (1_000, 1_000_000)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(pods, sessions));
}

async fn run(pod_count: usize, session_count: usize) {
    let plane = control_plane();
    let ns = plane.namespace("bench").await;
    install_crd(&ns.client).await;
    let redis = RedisServer::start();
    eprintln!("creating {pod_count} pods ...");
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let names: Vec<String> = (0..pod_count)
        .map(|i| format!("backend-{:03}-{i:05}", i % POLICIES))
        .collect();
    futures::future::join_all(names.chunks(pod_count / 20).map(|chunk| {
        let pods = pods.clone();
        async move {
            for name in chunk {
                let policy = &name[8..11];
                let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name, "labels": {"app": format!("backend-{policy}")}},
                    "spec": {"containers": [{"name": "mcp", "image": "example/mcp:1"}]}})).expect("pod");
                pods.create(&PostParams::default(), &pod).await.expect("create pod");
            }
        }
    }))
    .await;

    // A tenth of the sessions first, to compare Redis work per reconcile at two sizes.
    let stores = Arc::new(connect_stores(&redis).await);
    let names = Arc::new(names);
    load(&stores, &names, 0, session_count / 10).await;
    let kubeconfig = plane.kubeconfig.clone();
    let operator = Operator::start_with(
        &kubeconfig,
        &ns.name,
        Some(&ns.name),
        "bench",
        &["--requeue-seconds", "5", "--no-webhook"],
    );
    let policies: Api<McpSessionPolicy> = Api::namespaced(ns.client.clone(), &ns.name);
    for p in 0..POLICIES {
        let policy: McpSessionPolicy = serde_json::from_value(json!({
            "apiVersion": "mcpsession.dev/v1alpha1", "kind": "McpSessionPolicy", "metadata": {"name": format!("backend-{p:03}")},
            "spec": {"selector": {"matchLabels": {"app": format!("backend-{p:03}")}}, "redis": {"url": redis.url(), "keyPrefix": format!("p{p:03}:")}},
        }))
        .expect("policy");
        policies
            .create(&PostParams::default(), &policy)
            .await
            .expect("create policy");
    }
    wait_counted(&policies, session_count / 10).await;
    let small = steady_state(&operator, &redis, &policies).await;

    load(&stores, &names, session_count / 10, session_count).await;
    wait_counted(&policies, session_count).await;
    let large = steady_state(&operator, &redis, &policies).await;

    println!();
    println!(
        "operator benchmark: {POLICIES} policies, {pod_count} pods, one redis-server, requeue every 5 s"
    );
    println!(
        "{:<44} {:>14} {:>14}  target",
        "measure",
        format!("{} sessions", session_count / 10),
        format!("{session_count} sessions")
    );
    let row = |what: &str, a: String, b: String, target: &str| {
        println!("{what:<44} {a:>14} {b:>14}  {target}")
    };
    row(
        "reconciles measured",
        small.reconciles.to_string(),
        large.reconciles.to_string(),
        "",
    );
    row("reconcile p50", ms(small.p50), ms(large.p50), "");
    row("reconcile p99", ms(small.p99), ms(large.p99), "< 50 ms");
    row(
        "Redis commands per reconcile",
        format!("{:.1}", small.redis_per_reconcile),
        format!("{:.1}", large.redis_per_reconcile),
        "independent of sessions",
    );
    row(
        "operator RSS",
        format!("{:.1} MiB", small.rss_mib),
        format!("{:.1} MiB", large.rss_mib),
        "< 100 MiB",
    );
    row(
        "status writes in 15 s without change",
        small.writes.to_string(),
        large.writes.to_string(),
        "0",
    );
}

async fn connect_stores(redis: &RedisServer) -> Vec<RedisStore> {
    let base = RedisStore::connect(
        RedisTarget::parse(&redis.url()).expect("url"),
        "p000:",
        Duration::from_secs(86_400),
    )
    .await
    .expect("connect");
    (0..POLICIES)
        .map(|p| {
            base.with_prefix(&format!("p{p:03}:"), Duration::from_secs(86_400))
                .expect("prefix")
        })
        .collect()
}

/// Sessions `from..to`, spread evenly over policies and their pods.
async fn load(stores: &Arc<Vec<RedisStore>>, pods: &Arc<Vec<String>>, from: usize, to: usize) {
    eprintln!("creating sessions {from}..{to} ...");
    let started = Instant::now();
    let workers = 64;
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (stores, pods) = (stores.clone(), pods.clone());
            tokio::spawn(async move {
                for i in (from + w..to).step_by(workers) {
                    let pod = &pods[i % pods.len()];
                    let policy = i % pods.len() % POLICIES;
                    let new = NewSession {
                        owner_pod: Some(pod.clone()),
                        ..Default::default()
                    };
                    stores[policy]
                        .create_or_rehydrate(&SessionId::random(), new)
                        .await
                        .expect("create");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("loader");
    }
    eprintln!("  {} sessions in {:.1?}", to - from, started.elapsed());
}

async fn wait_counted(policies: &Api<McpSessionPolicy>, total: usize) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let list = policies
            .list(&ListParams::default())
            .await
            .expect("list policies");
        let counted: u64 = list
            .items
            .iter()
            .filter_map(|p| p.status.as_ref())
            .map(|s| s.sessions.total)
            .sum();
        if counted as usize == total && list.items.len() == POLICIES {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "policies count {counted} of {total} sessions"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

struct Steady {
    reconciles: u64,
    p50: f64,
    p99: f64,
    redis_per_reconcile: f64,
    rss_mib: f64,
    writes: usize,
}

/// 15 s without changes: reconcile latency, Redis commands per reconcile, RSS, status writes.
async fn steady_state(
    operator: &Operator,
    redis: &RedisServer,
    policies: &Api<McpSessionPolicy>,
) -> Steady {
    tokio::time::sleep(Duration::from_secs(6)).await;
    let versions = |list: Vec<McpSessionPolicy>| -> BTreeMap<String, Option<String>> {
        list.into_iter()
            .map(|p| {
                (
                    p.metadata.name.clone().unwrap_or_default(),
                    p.metadata.resource_version,
                )
            })
            .collect()
    };
    let before_versions = versions(
        policies
            .list(&ListParams::default())
            .await
            .expect("list")
            .items,
    );
    let log_start = operator.logs().len();
    let commands_before = redis_commands(redis);
    tokio::time::sleep(Duration::from_secs(15)).await;
    let mut took: Vec<u64> = operator.logs()[log_start..]
        .lines()
        .filter_map(|line| {
            line.split("took_us=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    took.sort_unstable();
    let commands_after = redis_commands(redis);
    let after_versions = versions(
        policies
            .list(&ListParams::default())
            .await
            .expect("list")
            .items,
    );
    let writes = before_versions
        .iter()
        .filter(|(name, version)| after_versions.get(*name) != Some(version))
        .count();
    let reconciles = took.len() as u64;
    let quantile = |q: f64| {
        let index = ((took.len() as f64 * q).ceil() as usize).saturating_sub(1);
        took.get(index).map_or(f64::NAN, |us| *us as f64 / 1e6)
    };
    Steady {
        reconciles,
        p50: quantile(0.5),
        p99: quantile(0.99),
        // Minus the INFO call of each sample.
        redis_per_reconcile: (commands_after - commands_before - 1) as f64
            / reconciles.max(1) as f64,
        rss_mib: operator.rss_bytes() as f64 / 1_048_576.0,
        writes,
    }
}

fn redis_commands(redis: &RedisServer) -> u64 {
    let info = redis.cli(&["INFO", "stats"]).expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_commands_processed")
}

fn ms(seconds: f64) -> String {
    format!("{:.2} ms", seconds * 1000.0)
}
