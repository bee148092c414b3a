//! Compatibility with the seed's Python session service, both ways, against one real
//! redis-server: a port of its `get_session`/`get_all_sessions`/`create_session` with redis-py
//! (tests/seed/seed_service.py) reads what this crate writes, and this crate reads, lists,
//! counts and rehydrates what it writes.

mod support;

use std::process::Command;
use std::time::Duration;

use mcp_session_operator::store::{
    self, Claim, ClaimOutcome, NewSession, Origin, SessionId, SessionStore,
};
use serde_json::{Value, json};
use support::redis::RedisServer;

/// The Python with redis-py that scripts/test.sh prepares (`MCP_TEST_PYTHON`), else `python3`.
fn seed_service(redis: &RedisServer, args: &[&str]) -> Value {
    let python = std::env::var("MCP_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/seed/seed_service.py");
    let output = Command::new(&python)
        .arg(script)
        .arg(redis.url())
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {python}: {e}; run scripts/test.sh, which installs redis-py")
        });
    assert!(
        output.status.success(),
        "seed service {args:?} failed (is redis-py installed? scripts/test.sh sets MCP_TEST_PYTHON):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("seed service prints JSON")
}

fn id(raw: &str) -> SessionId {
    SessionId::parse(raw).unwrap()
}

#[tokio::test]
async fn the_seed_service_reads_what_this_crate_writes() {
    let redis = RedisServer::start();
    let store = redis
        .store("mcp:session:", Duration::from_secs(86_400))
        .await;
    let new = NewSession {
        owner_pod: Some("backend-0".into()),
        metadata: json!({"user_id": "user-7"}).as_object().cloned().unwrap(),
        protocol_version: Some("2025-06-18".into()),
        initialize_params: Some(json!({"capabilities": {}, "clientInfo": {"name": "cursor"}})),
        credential_fingerprint: Some("hmac-of-credential".into()),
        ..Default::default()
    };
    store
        .create_or_rehydrate(&id("rust-written"), new)
        .await
        .unwrap();
    store
        .touch(&id("rust-written"), Some("backend-0"))
        .await
        .unwrap();
    store
        .mark_draining(
            &id("rust-written"),
            Some("backend-0"),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    store
        .create_or_rehydrate(&id("second"), NewSession::default())
        .await
        .unwrap();
    store.counts().await.unwrap(); // builds the index, whose keys the seed must not trip over

    let session = seed_service(&redis, &["get", "rust-written"]);
    assert_eq!(session["connection_id"], "rust-written");
    assert_eq!(session["metadata"]["user_id"], "user-7");
    assert_eq!(session["state"], "draining");
    let all = seed_service(&redis, &["all"]);
    let mut ids: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["connection_id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["rust-written", "second"]);
    // The seed's own activity update rewrites the record; this crate still reads all of it.
    assert_eq!(
        seed_service(&redis, &["touch", "rust-written"]),
        json!(true)
    );
    let after = store.get(&id("rust-written")).await.unwrap().unwrap();
    assert_eq!(
        after.record.credential_fingerprint.as_deref(),
        Some("hmac-of-credential")
    );
    assert_eq!(after.record.owner_pod, None);
}

#[tokio::test]
async fn this_crate_reads_what_the_seed_service_writes() {
    let redis = RedisServer::start();
    for (i, user) in ["alice", "bob", "carol"].iter().enumerate() {
        seed_service(
            &redis,
            &[
                "create",
                &format!("seed-{i}"),
                user,
                "intracker_mcp_secret_key_123",
            ],
        );
    }
    let generated = seed_service(&redis, &["create", "", "dave", "k"]);
    let uuid = generated["connection_id"].as_str().unwrap().to_owned();

    let store = redis
        .store("mcp:session:", Duration::from_secs(86_400))
        .await;
    let report = store::scan_report(&store, 100, &|_| {}).await.unwrap();
    assert_eq!(report.counts.total, 4);
    assert!(report.unreadable.is_empty());
    // No index yet (the seed keeps none): `sessions stats` scans and says so, writing nothing;
    // the first count (the operator's) builds it.
    assert!(store.indexed_counts().await.unwrap().is_none());
    let (indexed, audited) = store::audit(&store, 100, &|_| {}).await.unwrap();
    assert_eq!((indexed, audited.counts.total), (None, 4));
    assert!(store.indexed_counts().await.unwrap().is_none(), "read only");
    assert_eq!(store.counts().await.unwrap().total, 4);
    assert_eq!(
        store.indexed_counts().await.unwrap().map(|c| c.total),
        Some(4)
    );
    let seed = store.get(&id(&uuid)).await.unwrap().unwrap();
    assert_eq!(seed.record.user_id(), Some("dave"));
    let ttl = seed.ttl_millis.unwrap();
    assert!(ttl > 86_000_000, "the seed's 24 h TTL: {ttl}");

    let (rehydrated, origin) = store
        .create_or_rehydrate(&id("seed-0"), NewSession::default())
        .await
        .unwrap();
    assert_eq!(origin, Origin::Rehydrated);
    assert_eq!(rehydrated.record.user_id(), Some("alice"));
    // A seed session has no credential fingerprint: any pod may pick it up.
    let claim = Claim {
        pod: "backend-1".into(),
        address: None,
        credential_fingerprint: Some("fp".into()),
    };
    assert!(matches!(
        store.claim(&id("seed-1"), claim).await.unwrap(),
        ClaimOutcome::Claimed { .. }
    ));
    // And the seed still reads its records after this crate rewrote them.
    let back = seed_service(&redis, &["get", "seed-1"]);
    assert_eq!(back["metadata"]["user_id"], "bob");
    assert_eq!(back["owner_pod"], "backend-1");
}
