//! Redis-only behaviour of the store: seed-written records, bad data, index self-healing,
//! pruning, AUTH, TLS, and a Redis killed and restarted mid-run.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt as _;
use mcp_session_operator::store::{
    self, CountSource, Listed, NewSession, Origin, RedisStore, RedisTarget, SessionId,
    SessionStore, StoreError, UnreadableReason,
};
use support::redis::RedisServer;

const TTL: Duration = Duration::from_secs(3600);

fn id(raw: &str) -> SessionId {
    SessionId::parse(raw).unwrap()
}

async fn connect(redis: &RedisServer) -> RedisStore {
    redis.store("mcp:session:", TTL).await
}

/// A record exactly as the seed's Python service writes it (`json.dumps`, naive timestamps).
fn seed_json(id: &str) -> String {
    format!(
        r#"{{"connection_id": "{id}", "created_at": "2026-01-15T10:00:00.000000", "last_activity_at": "2026-01-15T10:05:00.000000", "metadata": {{"user_id": "user-123", "api_key_prefix": "intracker_mcp"}}}}"#
    )
}

#[tokio::test]
async fn seed_written_records_are_read_listed_counted_and_rehydrated() {
    let redis = RedisServer::start();
    for i in 0..5 {
        let key = format!("mcp:session:seed-{i}");
        redis
            .cli(&["SET", &key, &seed_json(&format!("seed-{i}")), "EX", "86400"])
            .unwrap();
    }
    let store = connect(&redis).await;
    let seed = store.get(&id("seed-0")).await.unwrap().unwrap();
    assert_eq!(seed.record.user_id(), Some("user-123"));
    assert_eq!(
        seed.record.metadata["api_key_prefix"], "intracker_mcp",
        "kept, never rewritten"
    );
    assert_eq!(
        seed.record.created_at.to_seed_string(),
        "2026-01-15T10:00:00.000000"
    );

    // No index exists yet: the first count builds it from a scan.
    let counts = store.counts().await.unwrap();
    assert_eq!(
        (counts.total, counts.active, counts.source),
        (5, 5, CountSource::Rebuilt)
    );
    assert_eq!(store.counts().await.unwrap().source, CountSource::Index);
    let report = store::scan_report(&store, 100, &|_| {}).await.unwrap();
    assert_eq!(report.counts.total, 5);

    // A client reconnecting with a seed session id gets it back, untouched but for activity.
    let (session, origin) = store
        .create_or_rehydrate(&id("seed-1"), NewSession::default())
        .await
        .unwrap();
    assert_eq!(origin, Origin::Rehydrated);
    assert_eq!(session.record.user_id(), Some("user-123"));
    let raw = redis.cli(&["GET", "mcp:session:seed-1"]).unwrap();
    assert!(
        raw.contains(r#""metadata": {"user_id": "user-123""#),
        "seed JSON kept as written: {raw}"
    );
    assert!(
        !raw.contains("2026-01-15T10:05:00"),
        "last_activity_at rewritten in place: {raw}"
    );
}

#[tokio::test]
async fn bad_records_are_reported_never_fatal_and_never_deleted() {
    let redis = RedisServer::start();
    let store = connect(&redis).await.with_max_record_bytes(4096);
    store
        .create_or_rehydrate(&id("good"), NewSession::default())
        .await
        .unwrap();
    let big = format!(r#"{{"connection_id":"big","pad":"{}"}}"#, "x".repeat(5000));
    let bad: [(&str, &str); 4] = [
        ("mcp:session:malformed", "{not json"),
        (
            "mcp:session:wrong-types",
            r#"{"connection_id": 42, "created_at": [], "last_activity_at": null}"#,
        ),
        ("mcp:session:big", &big),
        ("mcp:session:bad id", &seed_json("x")),
    ];
    for (key, value) in bad {
        redis.cli(&["SET", key, value]).unwrap();
    }
    redis
        .cli(&["HSET", "mcp:session:a-hash", "f", "v"])
        .unwrap();
    // A key that is not UTF-8, written through the client (redis-cli cannot send raw bytes).
    let client = redis::Client::open(redis.url()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(b"mcp:session:\xff\xfe".as_slice())
        .arg("{}")
        .query_async(&mut raw)
        .await
        .unwrap();

    let listed: Vec<Listed> = store::list_all(&store, 3).try_collect().await.unwrap();
    let mut kinds: Vec<&str> = listed
        .iter()
        .filter_map(|l| match l {
            Listed::Unreadable(u) => Some(u.reason.kind()),
            Listed::Session(_) => None,
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "invalidId",
            "keyNotUtf8",
            "malformed",
            "malformed",
            "oversize",
            "wrongType"
        ]
    );
    assert_eq!(listed.len(), 7, "the good record is listed too");

    let report = store::scan_report(&store, 100, &|_| {}).await.unwrap();
    assert_eq!(report.counts.total, 1);
    assert_eq!(report.unreadable.len(), 6);

    match store.get(&id("malformed")).await {
        Err(StoreError::Unreadable(u)) => {
            assert!(matches!(u.reason, UnreadableReason::Malformed(_)));
            assert!(u.to_string().contains("mcp:session:malformed"), "{u}");
        }
        other => panic!("expected unreadable, got {other:?}"),
    }
    assert!(matches!(
        store.get(&id("a-hash")).await,
        Err(StoreError::Unreadable(u)) if u.reason == UnreadableReason::WrongType("hash".into())
    ));
    // Rehydrating onto a record that does not parse refuses instead of overwriting it.
    assert!(matches!(
        store
            .create_or_rehydrate(&id("malformed"), NewSession::default())
            .await,
        Err(StoreError::Unreadable(_))
    ));
    assert!(matches!(
        store
            .create_or_rehydrate(&id("a-hash"), NewSession::default())
            .await,
        Err(StoreError::Unreadable(_))
    ));
    assert!(matches!(
        store
            .claim(
                &id("wrong-types"),
                store::Claim {
                    pod: "p".into(),
                    address: None,
                    credential_fingerprint: None
                }
            )
            .await,
        Err(StoreError::Unreadable(_))
    ));

    store.rebuild_index(&mut |_| {}).await.unwrap();
    store.prune().await.unwrap();
    assert_eq!(
        redis.cli(&["GET", "mcp:session:malformed"]).unwrap().trim(),
        "{not json"
    );
    assert_eq!(
        redis.cli(&["EXISTS", "mcp:session:big"]).unwrap().trim(),
        "1"
    );
    assert_eq!(
        redis.cli(&["TYPE", "mcp:session:a-hash"]).unwrap().trim(),
        "hash"
    );
    assert_eq!(store.counts().await.unwrap().total, 1);
}

#[tokio::test]
async fn bad_event_log_entries_are_skipped_and_a_wrong_type_is_an_error() {
    let redis = RedisServer::start();
    let store = connect(&redis).await;
    let s = id("logged");
    store
        .create_or_rehydrate(&s, NewSession::default())
        .await
        .unwrap();
    let good = store::LoggedEvent {
        id: "g1-1".into(),
        event: None,
        data: "{}".into(),
        ..Default::default()
    };
    store
        .append_events(&s, std::slice::from_ref(&good), store::LogBound::DEFAULT)
        .await
        .unwrap();
    let key = "{mcp:session:logged}:events";
    redis
        .cli(&["RPUSH", key, "{not json", r#"{"id": 5}"#])
        .unwrap();
    assert_eq!(store.events(&s).await.unwrap(), vec![good]);
    let ttl: i64 = redis.cli(&["PTTL", key]).unwrap().trim().parse().unwrap();
    assert!(ttl > 0, "the log expires");

    redis.cli(&["DEL", key]).unwrap();
    redis.cli(&["SET", key, "a string"]).unwrap();
    let error = store.events(&s).await.unwrap_err();
    assert!(error.to_string().contains("WRONGTYPE"), "{error}");
}

#[tokio::test]
async fn counts_heal_after_the_index_is_evicted() {
    let redis = RedisServer::start();
    let store = connect(&redis).await;
    for i in 0..30 {
        let new = NewSession {
            owner_pod: Some(format!("pod-{}", i % 3)),
            ..Default::default()
        };
        store
            .create_or_rehydrate(&id(&format!("s{i}")), new)
            .await
            .unwrap();
    }
    store
        .mark_draining(&id("s0"), Some("pod-0"), TTL)
        .await
        .unwrap();
    assert_eq!(
        store.counts().await.unwrap().source,
        CountSource::Rebuilt,
        "first count builds"
    );
    let before = store.counts().await.unwrap();
    assert_eq!(
        (before.total, before.draining, before.source),
        (30, 1, CountSource::Index)
    );

    // What allkeys-lru may do: drop the index sets but not the records.
    for key in ["{mcp:session:}:expiry", "{mcp:session:}:draining"] {
        redis.cli(&["DEL", key]).unwrap();
    }
    let healed = store.counts().await.unwrap();
    assert_eq!(healed.source, CountSource::Rebuilt);
    assert_eq!((healed.total, healed.active, healed.draining), (30, 29, 1));
    assert_eq!(healed.per_pod, before.per_pod);

    // What allkeys-lru does as well: drop records but not their index entries. A rebuild
    // counts the records there are, not the entries it found.
    for i in 20..30 {
        redis.cli(&["DEL", &format!("mcp:session:s{i}")]).unwrap();
    }
    redis.cli(&["DEL", "{mcp:session:}:expiry"]).unwrap();
    let rebuilt = store.counts().await.unwrap();
    assert_eq!(
        (rebuilt.total, rebuilt.source),
        (20, CountSource::Rebuilt),
        "{rebuilt:?}"
    );
    assert_eq!(rebuilt.per_pod.values().sum::<u64>(), 19, "{rebuilt:?}");

    // On a Redis that evicts, a whole index is checked against the records before it counts.
    for i in 10..15 {
        redis.cli(&["DEL", &format!("mcp:session:s{i}")]).unwrap();
    }
    assert_eq!(store.counts().await.unwrap().total, 20, "trusted as it is");
    redis
        .cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"])
        .unwrap();
    let verified = store.counts().await.unwrap();
    assert_eq!(
        (verified.total, verified.draining, verified.source),
        (15, 1, CountSource::Verified),
        "{verified:?}"
    );
    assert_eq!(verified.per_pod.values().sum::<u64>(), 14, "{verified:?}");
}

#[tokio::test]
async fn prune_removes_expired_and_dangling_entries_but_no_record() {
    let redis = RedisServer::start();
    let store = connect(&redis).await;
    for i in 0..10 {
        let new = NewSession {
            owner_pod: Some("gone-pod".into()),
            ..Default::default()
        };
        store
            .create_or_rehydrate(&id(&format!("p{i}")), new)
            .await
            .unwrap();
    }
    store
        .create_or_rehydrate(
            &id("keep"),
            NewSession {
                owner_pod: Some("live".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    store.counts().await.unwrap();
    // Deleted behind the index's back (the seed's delete_session, or an eviction).
    for i in 0..10 {
        redis.cli(&["DEL", &format!("mcp:session:p{i}")]).unwrap();
    }
    let report = store.prune().await.unwrap();
    assert_eq!(
        report.dangling, 20,
        "expiry and per-pod entries: {report:?}"
    );
    let report = store.prune().await.unwrap();
    assert_eq!(report.pods, 1, "the emptied pod is dropped: {report:?}");
    let counts = store.counts().await.unwrap();
    assert_eq!(counts.total, 1);
    assert_eq!(counts.per_pod.keys().collect::<Vec<_>>(), ["live"]);
    assert!(store.get(&id("keep")).await.unwrap().is_some());

    // Expired entries: a 1 s TTL store writing into its own prefix.
    let short = redis.store("short:", Duration::from_millis(300)).await;
    short
        .create_or_rehydrate(
            &id("x"),
            NewSession {
                owner_pod: Some("p".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    short.counts().await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let report = short.prune().await.unwrap();
    assert_eq!((report.expired, report.pods), (2, 1), "{report:?}");
}

#[tokio::test]
async fn auth_and_masked_errors() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret-pw"]);
    let url = format!("redis://:s3cret-pw@127.0.0.1:{}/0", redis.port);
    let store = RedisStore::connect(RedisTarget::parse(&url).unwrap(), "mcp:session:", TTL)
        .await
        .unwrap();
    store
        .create_or_rehydrate(&id("authed"), NewSession::default())
        .await
        .unwrap();
    assert!(!store.describe().contains("s3cret-pw"));

    let wrong = format!("redis://:wrong-pw@127.0.0.1:{}/0", redis.port);
    let err = RedisStore::connect(RedisTarget::parse(&wrong).unwrap(), "mcp:session:", TTL)
        .await
        .err()
        .unwrap();
    let message = err.to_string();
    assert!(!message.contains("wrong-pw"), "{message}");
    assert!(message.contains(":***@127.0.0.1"), "{message}");

    let down = format!("redis://:pw@127.0.0.1:{}/0", support::free_port());
    let err = RedisStore::connect(RedisTarget::parse(&down).unwrap(), "mcp:session:", TTL)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("cannot reach Redis at redis://:***@127.0.0.1:"),
        "{err}"
    );
}

#[tokio::test]
async fn tls_with_a_private_ca() {
    let (redis, ca_pem) = RedisServer::start_tls();
    let url = format!("rediss://127.0.0.1:{}/0", redis.tls_port.unwrap());
    let target = RedisTarget::parse(&url).unwrap().with_ca_pem(ca_pem);
    let store = RedisStore::connect(target, "mcp:session:", TTL)
        .await
        .unwrap();
    store
        .create_or_rehydrate(&id("over-tls"), NewSession::default())
        .await
        .unwrap();
    assert_eq!(store.counts().await.unwrap().total, 1);
    // Without the CA the server is not trusted.
    let untrusted =
        RedisStore::connect(RedisTarget::parse(&url).unwrap(), "mcp:session:", TTL).await;
    assert!(untrusted.is_err());
}

/// Redis SIGKILLed mid-run: operations fail with a clear error while it is down, the same store
/// recovers by itself once it is back, and every write acknowledged before the kill survives
/// (appendfsync always).
#[tokio::test]
async fn survives_a_redis_restart() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let store = Arc::new(connect(&redis).await);
    let mut acknowledged = Vec::new();
    for i in 0..200 {
        let s = id(&format!("durable-{i}"));
        store
            .create_or_rehydrate(&s, NewSession::default())
            .await
            .unwrap();
        acknowledged.push(s);
    }
    redis.kill();
    let err = store.get(&acknowledged[0]).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(
        err.to_string()
            .contains(&format!("127.0.0.1:{}", redis.port)),
        "{err}"
    );
    assert!(
        store
            .create_or_rehydrate(&id("while-down"), NewSession::default())
            .await
            .is_err()
    );

    redis.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match store.get(&acknowledged[0]).await {
            Ok(found) => {
                assert!(found.is_some());
                break;
            }
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "no recovery: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    for s in &acknowledged {
        assert!(store.get(s).await.unwrap().is_some(), "{s} lost");
    }
    // The script cache died with the server: scripted writes still work.
    assert!(store.touch(&acknowledged[1], None).await.unwrap().exists());
    store
        .mark_draining(&acknowledged[2], None, TTL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.counts().await.unwrap().total, 200);
}
