//! Store benchmark: `cargo bench --bench store` (add `-- --quick` for a short run).
//!
//! In one run, against one real redis-server: the store's get / touch / create throughput next
//! to `redis-benchmark` GET / SET at the same concurrency, pipeline depth and value size; the
//! indexed count of 1,000,000 sessions next to the seed's way (`KEYS` + `GET` each) at 100,000;
//! and memory per record. Prints a table of ratios; docs/benchmarks.md records a run.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcp_session_operator::store::{NewSession, RedisStore, RedisTarget, SessionId, SessionStore};
use redis::AsyncCommands as _;
use support::redis::RedisServer;

/// Concurrent clients: redis-benchmark's `-c`, the store's concurrent tasks.
const CONCURRENCY: usize = 50;
const TTL: Duration = Duration::from_secs(86_400);
/// The sessions a full proxy holds (`--max-sessions`' default), and the ids its write-back
/// check sends per round trip.
const WRITE_BACK_HELD: usize = 20_000;
const WRITE_BACK_BATCH: usize = 500;

struct Scale {
    requests: usize,
    counted: usize,
    seed_counted: usize,
    /// Seed-only records (no index) that `sessions stats` reads.
    stats_records: usize,
}

struct Row {
    what: String,
    value: f64,
    unit: &'static str,
    baseline: String,
    ratio: Option<f64>,
    target: &'static str,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick {
        Scale {
            requests: 20_000,
            counted: 100_000,
            seed_counted: 10_000,
            stats_records: 20_000,
        }
    } else {
        Scale {
            requests: 200_000,
            counted: 1_000_000,
            seed_counted: 100_000,
            stats_records: 200_000,
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let redis = RedisServer::start();
    let rows = runtime.block_on(run(&redis, &scale));
    print_table(&rows, &scale);
}

async fn run(redis: &RedisServer, scale: &Scale) -> Vec<Row> {
    let store = Arc::new(
        RedisStore::connect(
            RedisTarget::parse(&redis.url()).expect("url"),
            "mcp:session:",
            TTL,
        )
        .await
        .expect("connect"),
    );
    // Throughput: the store next to redis-benchmark with the same value size.
    let ids = Arc::new(create_sessions(&store, 10_000, "warm").await);
    let record_bytes = store
        .get(&ids[0])
        .await
        .expect("get")
        .expect("exists")
        .record
        .to_json()
        .len();
    let baseline = redis_benchmark(redis.port, scale.requests, record_bytes);
    let (s, list) = (store.clone(), ids.clone());
    let get = throughput(scale.requests, move |i| {
        let (store, id) = (s.clone(), list[i % list.len()].clone());
        async move { store.get(&id).await.map(drop) }
    })
    .await;
    let (s, list) = (store.clone(), ids.clone());
    let touch = throughput(scale.requests, move |i| {
        let (store, id) = (s.clone(), list[i % list.len()].clone());
        async move { store.touch(&id, Some("bench-pod")).await.map(drop) }
    })
    .await;
    let s = store.clone();
    let create = throughput(scale.requests, move |i| {
        let store = s.clone();
        async move {
            store
                .create_or_rehydrate(&bench_id("new", i), new_session())
                .await
                .map(drop)
        }
    })
    .await;

    // Counting: fill to `counted` sessions, then count through the index.
    let used_before = used_memory(redis);
    let existing = 10_000 + scale.requests;
    let fill = scale.counted.saturating_sub(existing);
    eprintln!("creating {fill} more sessions through the store for the count ...");
    let s = store.clone();
    throughput(fill, move |i| {
        let store = s.clone();
        async move {
            store
                .create_or_rehydrate(&bench_id("fill", i), new_session())
                .await
                .map(drop)
        }
    })
    .await;
    let per_session_total = (used_memory(redis) - used_before) as f64 / fill.max(1) as f64;
    store.counts().await.expect("first count builds the index");
    let (count_time, total) =
        median_time(21, || async { store.counts().await.expect("count").total }).await;
    assert_eq!(total as usize, scale.counted, "the count is right");
    // A proxy's write-back check (src/proxy/session/bookkeeping.rs): `missing` over the
    // sessions a full proxy holds, 500 ids a round trip (one EXISTS each, pipelined), next to
    // as many GETs at redis-benchmark's rate.
    let held: Vec<SessionId> = (0..WRITE_BACK_HELD).map(|i| bench_id("fill", i)).collect();
    let (check_time, lost) = median_time(5, || async {
        let mut lost = 0;
        for batch in held.chunks(WRITE_BACK_BATCH) {
            lost += store.missing(batch).await.expect("missing").len();
        }
        lost
    })
    .await;
    assert_eq!(lost, 0, "every held session exists");
    let proxy_record = memory_per_record(redis, "shape-proxy:", new_session()).await;
    let minimal = NewSession {
        initialize_params: None,
        protocol_version: None,
        ..new_session()
    };
    let owned_record = memory_per_record(redis, "shape-owned:", minimal).await;
    let seed_record = memory_per_record(redis, "shape-seed:", NewSession::default()).await;

    // The seed's way: KEYS + GET each, in a database holding `seed_counted` sessions.
    let seed_url = redis.url().replace("/0", "/1");
    let seed_store = Arc::new(
        RedisStore::connect(
            RedisTarget::parse(&seed_url).expect("url"),
            "mcp:session:",
            TTL,
        )
        .await
        .expect("connect db 1"),
    );
    let s = seed_store.clone();
    throughput(scale.seed_counted, move |i| {
        let store = s.clone();
        async move {
            store
                .create_or_rehydrate(&bench_id("seed", i), new_session())
                .await
                .map(drop)
        }
    })
    .await;
    let seed_time = seed_count(&seed_url, scale.seed_counted).await;
    seed_store.counts().await.expect("build index");
    let (index_small, _) = median_time(21, || async {
        seed_store.counts().await.expect("count").total
    })
    .await;

    // `sessions stats` over records only the seed's service wrote (no index yet), next to the
    // seed's KEYS + GET over the same records.
    let stats_url = redis.url().replace("/0", "/2");
    seed_records(&stats_url, scale.stats_records).await;
    let seed_stats_time = seed_count(&stats_url, scale.stats_records).await;
    let stats_time = sessions_stats(&stats_url, scale.stats_records);

    let ratio = |ours: f64, theirs: f64| Some(ours / theirs);
    vec![
        Row {
            what: format!("get ({record_bytes} B record)"),
            value: get,
            unit: "ops/s",
            baseline: format!("GET {:.0}/s", baseline.get),
            ratio: ratio(get, baseline.get),
            target: ">= 0.8x",
        },
        Row {
            what: "touch (debounce off)".into(),
            value: touch,
            unit: "ops/s",
            baseline: format!("SET {:.0}/s", baseline.set),
            ratio: ratio(touch, baseline.set),
            target: ">= 0.5x",
        },
        Row {
            what: "create".into(),
            value: create,
            unit: "ops/s",
            baseline: format!("SET {:.0}/s", baseline.set),
            ratio: ratio(create, baseline.set),
            target: "-",
        },
        Row {
            what: format!("count {} (index)", scale.counted),
            value: ms(count_time),
            unit: "ms",
            baseline: "-".into(),
            ratio: None,
            target: "< 10 ms",
        },
        Row {
            what: format!("count {} (index)", scale.seed_counted),
            value: ms(index_small),
            unit: "ms",
            baseline: format!("KEYS+GET {:.0} ms", ms(seed_time)),
            ratio: Some(seed_time.as_secs_f64() / index_small.as_secs_f64()),
            target: "(x faster)",
        },
        Row {
            what: format!("sessions stats {} seed records", scale.stats_records),
            value: ms(stats_time),
            unit: "ms",
            // The seed's time is one round trip per record: how long one takes on the machine
            // at that moment moves this ratio more than anything the command does.
            baseline: format!(
                "KEYS+GET {:.0} ms, {:.0} us/GET",
                ms(seed_stats_time),
                ms(seed_stats_time) * 1000.0 / scale.stats_records as f64
            ),
            ratio: Some(seed_stats_time.as_secs_f64() / stats_time.as_secs_f64()),
            target: ">= 25x faster",
        },
        Row {
            what: format!("write-back check {WRITE_BACK_HELD} ({WRITE_BACK_BATCH}/trip)"),
            value: ms(check_time),
            unit: "ms",
            baseline: format!(
                "{WRITE_BACK_HELD} GETs {:.0} ms",
                WRITE_BACK_HELD as f64 * 1000.0 / baseline.get
            ),
            ratio: Some(WRITE_BACK_HELD as f64 / baseline.get / check_time.as_secs_f64()),
            target: "(x faster)",
        },
        Row {
            what: "MEMORY USAGE seed record".into(),
            value: seed_record,
            unit: "bytes",
            baseline: "seed's fields only".into(),
            ratio: None,
            target: "<= 400",
        },
        Row {
            what: "MEMORY USAGE owned record".into(),
            value: owned_record,
            unit: "bytes",
            baseline: "+ pod, user, fingerprint".into(),
            ratio: None,
            target: "<= 400",
        },
        Row {
            what: "MEMORY USAGE proxy record".into(),
            value: proxy_record,
            unit: "bytes",
            baseline: "+ initialize params".into(),
            ratio: None,
            target: "<= 400",
        },
        Row {
            what: "used_memory per session".into(),
            value: per_session_total,
            unit: "bytes",
            baseline: "record + indexes".into(),
            ratio: None,
            target: "-",
        },
    ]
}

fn new_session() -> NewSession {
    NewSession {
        owner_pod: Some("bench-pod-7d9f-abcde".into()),
        metadata: serde_json::json!({"user_id": "user-123"})
            .as_object()
            .cloned()
            .unwrap_or_default(),
        protocol_version: Some("2025-06-18".into()),
        initialize_params: Some(
            serde_json::json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "cursor", "version": "1.0"}}),
        ),
        // What the proxy stores: 128 bits of an HMAC-SHA-256, base64url.
        credential_fingerprint: Some("PwqcHStOX2BxgpOktcbX6A".into()),
        ..Default::default()
    }
}

/// Mean `MEMORY USAGE` of 1,000 records of one shape, written through the store.
async fn memory_per_record(redis: &RedisServer, prefix: &str, shape: NewSession) -> f64 {
    let target = RedisTarget::parse(&redis.url()).expect("url");
    let store = RedisStore::connect(target, prefix, TTL)
        .await
        .expect("connect");
    for _ in 0..1000 {
        store
            .create_or_rehydrate(&SessionId::random(), shape.clone())
            .await
            .expect("create");
    }
    store
        .memory_usage(1000)
        .await
        .expect("memory")
        .expect("redis")
        .mean_bytes as f64
}

fn bench_id(kind: &str, i: usize) -> SessionId {
    SessionId::parse(&format!(
        "{kind}-{i:08}-{:016x}",
        i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    ))
    .expect("valid id")
}

async fn create_sessions(store: &Arc<RedisStore>, n: usize, kind: &str) -> Vec<SessionId> {
    let ids: Arc<Vec<SessionId>> = Arc::new((0..n).map(|i| bench_id(kind, i)).collect());
    let (s, list) = (store.clone(), ids.clone());
    throughput(n, move |i| {
        let (store, ids) = (s.clone(), list.clone());
        async move {
            store
                .create_or_rehydrate(&ids[i], new_session())
                .await
                .map(drop)
        }
    })
    .await;
    ids.to_vec()
}

/// Runs `n` operations with [`CONCURRENCY`] tasks; returns operations per second.
async fn throughput<F, Fut, E>(n: usize, op: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send,
    E: std::fmt::Debug,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|worker| {
            let op = op.clone();
            tokio::spawn(async move {
                for i in (worker..n).step_by(CONCURRENCY) {
                    op(i).await.expect("operation");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("worker");
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn median_time<F, Fut, T>(runs: usize, f: F) -> (Duration, T)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let started = Instant::now();
        last = Some(f().await);
        times.push(started.elapsed());
    }
    times.sort();
    (times[runs / 2], last.expect("at least one run"))
}

/// The seed's `get_all_sessions`: `KEYS mcp:session:*`, then one `GET` per key.
/// Writes `n` records as the seed's service does (`SETEX` of its JSON), pipelined.
async fn seed_records(url: &str, n: usize) {
    let client = redis::Client::open(url).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            let id = format!("{:032x}", (*i as u128) << 64 | 0x5eed);
            let record = serde_json::json!({"connection_id": id, "created_at": "2026-11-29T10:00:00.000000",
                "last_activity_at": "2026-11-29T10:00:00.000000", "metadata": {"user_id": format!("user-{}", i % 97)}});
            pipe.set_ex(format!("mcp:session:{id}"), record.to_string(), 86_400)
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await.expect("seed records");
    }
}

/// `mcp-session-operator sessions stats` against `url`, timed whole (the process included).
fn sessions_stats(url: &str, expected: usize) -> Duration {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_mcp-session-operator"))
        .args(["sessions", "stats", "--output", "json", "--redis-url", url])
        .output()
        .expect("run sessions stats");
    let elapsed = started.elapsed();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON stats");
    assert_eq!(stats["scanned"]["total"], expected, "{stats}");
    elapsed
}

async fn seed_count(url: &str, expected: usize) -> Duration {
    let client = redis::Client::open(url).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let started = Instant::now();
    let keys: Vec<String> = conn.keys("mcp:session:*").await.expect("KEYS");
    let mut found = 0;
    for key in &keys {
        let value: Option<String> = conn.get(key).await.expect("GET");
        found += usize::from(value.is_some());
    }
    let elapsed = started.elapsed();
    assert_eq!(found, expected);
    elapsed
}

struct Baseline {
    get: f64,
    set: f64,
}

fn redis_benchmark(port: u16, requests: usize, value_bytes: usize) -> Baseline {
    let binary = support::require_program("redis-benchmark", "redis-tools");
    let output = Command::new(binary)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-c",
            &CONCURRENCY.to_string(),
        ])
        .args([
            "-n",
            &requests.to_string(),
            "-P",
            "1",
            "-d",
            &value_bytes.to_string(),
        ])
        .args(["-t", "set,get", "--csv"])
        .output()
        .expect("run redis-benchmark");
    let csv = String::from_utf8_lossy(&output.stdout);
    let rate = |name: &str| -> f64 {
        csv.lines()
            .find(|l| l.starts_with(&format!("\"{name}\"")))
            .and_then(|l| l.split(',').nth(1))
            .and_then(|v| v.trim_matches('"').parse().ok())
            .unwrap_or_else(|| panic!("no {name} rate in redis-benchmark output:\n{csv}"))
    };
    Baseline {
        get: rate("GET"),
        set: rate("SET"),
    }
}

fn used_memory(redis: &RedisServer) -> i64 {
    let info = redis.cli(&["INFO", "memory"]).expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory in INFO")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print_table(rows: &[Row], scale: &Scale) {
    println!();
    println!(
        "store benchmark: {} requests per throughput row, {CONCURRENCY} concurrent clients, pipeline depth 1, one redis-server",
        scale.requests
    );
    let header = ["measure", "value", "unit", "baseline (same run)", "ratio"];
    println!(
        "{:<36} {:>12} {:<6}  {:<30} {:>9}  target",
        header[0], header[1], header[2], header[3], header[4]
    );
    for row in rows {
        let ratio = row
            .ratio
            .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"));
        println!(
            "{:<36} {:>12.2} {:<6}  {:<30} {:>9}  {}",
            row.what, row.value, row.unit, row.baseline, ratio, row.target
        );
    }
}
