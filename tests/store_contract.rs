//! The store contract, run against all three stores: embedded, a real redis-server, and a real
//! 3-master Redis Cluster. They must agree to the letter.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt as _;
use mcp_session_operator::store::{
    self, Claim, ClaimOutcome, CountSource, DebouncedToucher, Listed, MemoryStore, NewSession,
    Origin, RedisStore, RedisTarget, SessionId, SessionPatch, SessionState, SessionStore,
};
use serde_json::json;
use support::redis::{RedisCluster, RedisServer};

const TTL: Duration = Duration::from_secs(3600);

fn id(raw: &str) -> SessionId {
    SessionId::parse(raw).unwrap()
}

fn owned_by(pod: &str) -> NewSession {
    NewSession {
        owner_pod: Some(pod.into()),
        owner_address: Some(address_of(pod)),
        metadata: json!({"user_id": "user-1"}).as_object().cloned().unwrap(),
        protocol_version: Some("2025-06-18".into()),
        initialize_params: Some(
            json!({"protocolVersion": "2025-06-18", "capabilities": {"roots": []}, "clientInfo": {"name": "t", "version": "1"}}),
        ),
        credential_fingerprint: Some("fp-a".into()),
        ..Default::default()
    }
}

/// Where a pod's proxy is reached, as its proxy records it.
fn address_of(pod: &str) -> String {
    format!("{pod}.pods.test:8090")
}

fn claim(pod: &str, fingerprint: &str) -> Claim {
    Claim {
        pod: pod.into(),
        address: Some(address_of(pod)),
        credential_fingerprint: Some(fingerprint.into()),
    }
}

async fn redis_store(url: &str, prefix: &str, ttl: Duration) -> Arc<dyn SessionStore> {
    let target = RedisTarget::parse(url).unwrap();
    Arc::new(RedisStore::connect(target, prefix, ttl).await.unwrap())
}

/// Everything a store must do, on one store.
async fn contract(store: Arc<dyn SessionStore>) {
    lifecycle(&*store).await;
    drain_and_claim(&*store).await;
    pinned_to_a_backend(&*store).await;
    exactly_one_claimer_wins(store.clone()).await;
    credential_binding(&*store).await;
    listing_sees_every_record_once(&*store).await;
    debounced_touches(store.clone()).await;
    event_log(&*store).await;
    sessions_of_a_pod(&*store).await;
    tallies(&*store).await;
    missing_records(&*store).await;
}

/// `missing`: which of many ids have no record, in any order and across Cluster slots.
async fn missing_records(store: &dyn SessionStore) {
    let ids: Vec<SessionId> = (0..50).map(|i| id(&format!("kept-{i}"))).collect();
    for i in &ids {
        store.create_or_rehydrate(i, owned_by("p")).await.unwrap();
    }
    for i in ids.iter().step_by(7) {
        store.delete(i).await.unwrap();
    }
    let mut asked = ids.clone();
    asked.push(id("never-written"));
    asked.reverse();
    let mut missing = store.missing(&asked).await.unwrap();
    missing.sort_by_key(|i| i.to_string());
    let mut expected: Vec<SessionId> = ids.iter().step_by(7).cloned().collect();
    expected.push(id("never-written"));
    expected.sort_by_key(|i| i.to_string());
    assert_eq!(missing, expected);
    assert_eq!(store.missing(&[]).await.unwrap(), Vec::<SessionId>::new());
    for i in &ids {
        store.delete(i).await.unwrap();
    }
}

async fn tallies(store: &dyn SessionStore) {
    let before = store.tallies().await.unwrap();
    store.tally(store::Tally::Drained, 3).await.unwrap();
    store.tally(store::Tally::Rehydrated, 2).await.unwrap();
    store.tally(store::Tally::Lost, 1).await.unwrap();
    store.tally(store::Tally::Drained, 1).await.unwrap();
    let after = store.tallies().await.unwrap();
    assert_eq!(
        (
            after.drained - before.drained,
            after.rehydrated - before.rehydrated,
            after.lost - before.lost
        ),
        (4, 2, 1)
    );
}

async fn sessions_of_a_pod(store: &dyn SessionStore) {
    let (a, b, c) = (id("of-pod-a"), id("of-pod-b"), id("of-pod-c"));
    for s in [&a, &b, &c] {
        store
            .create_or_rehydrate(s, owned_by("crashed"))
            .await
            .unwrap();
    }
    store
        .mark_draining(&c, Some("crashed"), Duration::from_secs(60))
        .await
        .unwrap();
    let mut ids = store.sessions_of_pod("crashed", 10).await.unwrap();
    ids.sort();
    assert_eq!(ids, vec![a.clone(), b.clone()], "active sessions only");
    assert_eq!(store.sessions_of_pod("crashed", 1).await.unwrap().len(), 1);
    assert!(
        store
            .sessions_of_pod("nobody", 10)
            .await
            .unwrap()
            .is_empty()
    );
    for s in [&a, &b, &c] {
        store.delete(s).await.unwrap();
    }
}

async fn event_log(store: &dyn SessionStore) {
    let s = id("streaming");
    let event = |n: u32| store::LoggedEvent {
        id: format!("g1-{n}"),
        event: n.is_multiple_of(2).then(|| "message".to_owned()),
        data: format!(r#"{{"n":{n}}}"#),
        // The upstream's own id travels with the event, where there is one.
        upstream_id: n.is_multiple_of(3).then(|| format!("upstream-{n}")),
    };
    let three = store::LogBound {
        events: 3,
        bytes: 1 << 20,
    };
    assert!(store.events(&s).await.unwrap().is_empty());
    store.create_or_rehydrate(&s, owned_by("p1")).await.unwrap();
    store
        .append_events(&s, &[event(1), event(2)], three)
        .await
        .unwrap();
    store.append_events(&s, &[], three).await.unwrap();
    store
        .append_events(&s, &[event(3), event(4)], three)
        .await
        .unwrap();
    assert_eq!(
        store.events(&s).await.unwrap(),
        vec![event(2), event(3), event(4)],
        "bounded: the newest entries, oldest first"
    );

    // Bounded in bytes too: 2.5 entries' worth keeps two; one larger than the bound is not kept
    // (the older ones stay: other streams of the session resume from them).
    let sized = |n: u32, len: usize| store::LoggedEvent {
        id: format!("p1-{n}"),
        data: "x".repeat(len),
        ..Default::default()
    };
    let size = sized(5, 1000).to_entry().len();
    let bytes = store::LogBound {
        events: 100,
        bytes: size * 5 / 2,
    };
    store
        .append_events(&s, &[sized(5, 1000), sized(6, 1000)], bytes)
        .await
        .unwrap();
    store
        .append_events(&s, &[sized(7, 1000)], bytes)
        .await
        .unwrap();
    assert_eq!(
        store.events(&s).await.unwrap(),
        vec![sized(6, 1000), sized(7, 1000)]
    );
    store
        .append_events(&s, &[sized(8, 3000)], bytes)
        .await
        .unwrap();
    assert_eq!(
        store.events(&s).await.unwrap(),
        vec![sized(6, 1000), sized(7, 1000)],
        "an entry over the whole bound is not kept"
    );
    store.delete(&s).await.unwrap();
    assert!(
        store.events(&s).await.unwrap().is_empty(),
        "the log goes with its session"
    );
}

async fn lifecycle(store: &dyn SessionStore) {
    let a = id("lifecycle-a");
    assert_eq!(store.get(&a).await.unwrap(), None);
    let (created, origin) = store
        .create_or_rehydrate(&a, owned_by("pod-1"))
        .await
        .unwrap();
    assert_eq!(origin, Origin::Created);
    assert_eq!(created.record.state(), SessionState::Active);
    assert_eq!(created.record.user_id(), Some("user-1"));

    let got = store.get(&a).await.unwrap().expect("stored");
    assert_eq!(got.record, created.record);
    let ttl = got.ttl_millis.expect("has a TTL");
    assert!(ttl > 3_590_000 && ttl <= 3_600_000, "{ttl}");
    // Empty arrays and nested params survive storage unchanged.
    assert_eq!(
        got.record.initialize_params.as_ref().unwrap()["capabilities"]["roots"],
        json!([])
    );

    // A reconnect finds the session and does not overwrite it.
    let (again, origin) = store
        .create_or_rehydrate(
            &a,
            NewSession {
                owner_pod: Some("pod-9".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(origin, Origin::Rehydrated);
    assert_eq!(again.record.owner_pod.as_deref(), Some("pod-1"));
    assert_eq!(again.record.created_at, created.record.created_at);

    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        store.touch(&a, Some("pod-1")).await.unwrap(),
        store::Touch::Active
    );
    let touched = store.get(&a).await.unwrap().unwrap();
    assert!(touched.record.last_activity_at > created.record.last_activity_at);
    assert_eq!(touched.record.created_at, created.record.created_at);
    assert!(
        !store
            .touch(&id("never-created"), None)
            .await
            .unwrap()
            .exists()
    );

    let patch = SessionPatch {
        protocol_version: Some("2025-11-25".into()),
        metadata: json!({"client": "cursor"}).as_object().cloned().unwrap(),
        ..Default::default()
    };
    let updated = store.update(&a, patch).await.unwrap().unwrap();
    assert_eq!(
        updated.record.protocol_version.as_deref(),
        Some("2025-11-25")
    );
    assert_eq!(updated.record.metadata["client"], "cursor");
    assert_eq!(
        updated.record.user_id(),
        Some("user-1"),
        "metadata is merged, not replaced"
    );
    assert!(
        store
            .update(&id("missing"), SessionPatch::default())
            .await
            .unwrap()
            .is_none()
    );

    let counts = store.counts().await.unwrap();
    assert_eq!((counts.total, counts.active, counts.draining), (1, 1, 0));
    assert_eq!(counts.per_pod.get("pod-1"), Some(&1));

    assert!(store.delete(&a).await.unwrap());
    assert!(!store.delete(&a).await.unwrap());
    assert_eq!(store.get(&a).await.unwrap(), None);
    let counts = store.counts().await.unwrap();
    assert_eq!(counts.total, 0);
    assert!(counts.per_pod.is_empty(), "{counts:?}");
}

async fn drain_and_claim(store: &dyn SessionStore) {
    let s = id("drain-me");
    store
        .create_or_rehydrate(&s, owned_by("old-pod"))
        .await
        .unwrap();
    assert_eq!(
        store.claim(&s, claim("new-pod", "fp-a")).await.unwrap(),
        ClaimOutcome::OwnedByOther {
            owner: "old-pod".into()
        },
        "an active session of a live pod is not taken"
    );
    assert!(matches!(
        store.claim(&s, claim("old-pod", "fp-a")).await.unwrap(),
        ClaimOutcome::AlreadyOwned(_)
    ));

    assert!(
        store
            .mark_draining(&s, Some("new-pod"), TTL)
            .await
            .unwrap()
            .is_none(),
        "only the owner drains a session"
    );
    let drained = store
        .mark_draining(&s, Some("old-pod"), Duration::from_secs(7200))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(drained.record.state(), SessionState::Draining);
    assert_eq!(drained.record.owner_pod, None);
    assert_eq!(
        drained.record.owner_address, None,
        "a drained session is forwarded nowhere"
    );
    assert!(drained.record.draining_since.is_some());
    assert!(
        drained.ttl_millis.unwrap() > 3_600_000,
        "draining extends the TTL to the hold"
    );
    let counts = store.counts().await.unwrap();
    assert_eq!((counts.total, counts.active, counts.draining), (1, 0, 1));
    assert!(!counts.per_pod.contains_key("old-pod"));
    assert_eq!(
        store.touch(&s, Some("new-pod")).await.unwrap(),
        store::Touch::Draining,
        "a touch tells a pod that serves the session that it was drained"
    );

    let ClaimOutcome::Claimed {
        session: claimed,
        from_draining: true,
    } = store.claim(&s, claim("new-pod", "fp-a")).await.unwrap()
    else {
        panic!("draining session is claimable");
    };
    assert_eq!(claimed.record.owner_pod.as_deref(), Some("new-pod"));
    assert_eq!(
        claimed.record.owner_address,
        Some(address_of("new-pod")),
        "the claimer's proxy is where the session is forwarded now"
    );
    assert_eq!(claimed.record.rehydrations, 1);
    assert_eq!(claimed.record.state(), SessionState::Active);
    let counts = store.counts().await.unwrap();
    assert_eq!((counts.total, counts.active, counts.draining), (1, 1, 0));
    assert_eq!(counts.per_pod.get("new-pod"), Some(&1));
    assert_eq!(
        store
            .claim(&id("nobody"), claim("p", "fp-a"))
            .await
            .unwrap(),
        ClaimOutcome::NotFound
    );
    assert!(
        store
            .mark_draining(&id("nobody"), None, TTL)
            .await
            .unwrap()
            .is_none()
    );
    store.delete(&s).await.unwrap();

    // An unowned active session (a seed-style writer's) is claimed, but not from a drain.
    let unowned = id("unowned");
    let seed_style = NewSession {
        owner_pod: None,
        ..owned_by("-")
    };
    store
        .create_or_rehydrate(&unowned, seed_style)
        .await
        .unwrap();
    assert!(matches!(
        store.claim(&unowned, claim("p", "fp-a")).await.unwrap(),
        ClaimOutcome::Claimed {
            from_draining: false,
            ..
        }
    ));
    store.delete(&unowned).await.unwrap();
}

/// A session a gateway pins to its backend pod (drain strategy `Wait`): the pod, its server's
/// address and the server's own id for the session survive every rewrite (a touch, an update),
/// count as the pod's, and go with the owner when it changes (a hand-over, a claim).
async fn pinned_to_a_backend(store: &dyn SessionStore) {
    let s = id("pinned");
    let pinned = NewSession {
        owner_address: Some("10.244.0.7:8000".into()),
        upstream_session: Some("upstream-7f3a".into()),
        ..owned_by("backend-1")
    };
    store.create_or_rehydrate(&s, pinned).await.unwrap();
    store.touch(&s, Some("backend-1")).await.unwrap();
    let patch = store::SessionPatch {
        protocol_version: Some("2025-11-25".into()),
        ..Default::default()
    };
    let updated = store.update(&s, patch).await.unwrap().expect("stored");
    assert_eq!(
        updated.record.upstream_session.as_deref(),
        Some("upstream-7f3a")
    );
    let read = store.get(&s).await.unwrap().expect("stored").record;
    assert_eq!(
        (
            read.owner_pod.as_deref(),
            read.owner_address.as_deref(),
            read.upstream_session.as_deref()
        ),
        (
            Some("backend-1"),
            Some("10.244.0.7:8000"),
            Some("upstream-7f3a")
        )
    );
    assert_eq!(
        store.sessions_of_pod("backend-1", 10).await.unwrap(),
        vec![s.clone()],
        "the pod's, for its hold to wait on"
    );
    let ending = |ending| store::SessionPatch {
        ending: Some(ending),
        ..Default::default()
    };
    let marked = store
        .update(&s, ending(true))
        .await
        .unwrap()
        .expect("stored");
    assert!(
        marked.record.ending_since.is_some(),
        "its client is ending it"
    );
    let unmarked = store
        .update(&s, ending(false))
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(
        unmarked.record.ending_since, None,
        "the server refused the end"
    );
    let drained = store
        .mark_draining(&s, Some("backend-1"), TTL)
        .await
        .unwrap()
        .expect("drained");
    assert_eq!(drained.record.upstream_session, None, "handed over");
    let ClaimOutcome::Claimed { session, .. } = store.claim(&s, claim("p", "fp-a")).await.unwrap()
    else {
        panic!("a drained session is claimable");
    };
    assert_eq!(session.record.upstream_session, None);
    store.delete(&s).await.unwrap();

    let claimed = id("pinned-claimed");
    let pinned = NewSession {
        owner_pod: None,
        upstream_session: Some("upstream-1".into()),
        ..owned_by("-")
    };
    store.create_or_rehydrate(&claimed, pinned).await.unwrap();
    store.claim(&claimed, claim("p", "fp-a")).await.unwrap();
    let read = store.get(&claimed).await.unwrap().expect("stored").record;
    assert_eq!(
        read.upstream_session, None,
        "a claimer's session is its own"
    );
    store.delete(&claimed).await.unwrap();
}

async fn exactly_one_claimer_wins(store: Arc<dyn SessionStore>) {
    let s = id("contended");
    store
        .create_or_rehydrate(&s, owned_by("dying-pod"))
        .await
        .unwrap();
    store
        .mark_draining(&s, Some("dying-pod"), TTL)
        .await
        .unwrap();
    let claimers = (0..50).map(|i| {
        let store = store.clone();
        let s = s.clone();
        tokio::spawn(async move { store.claim(&s, claim(&format!("pod-{i}"), "fp-a")).await })
    });
    let outcomes: Vec<ClaimOutcome> = futures::future::try_join_all(claimers)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.expect("claim"))
        .collect();
    let winners: Vec<&ClaimOutcome> = outcomes
        .iter()
        .filter(|o| matches!(o, ClaimOutcome::Claimed { .. }))
        .collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    let ClaimOutcome::Claimed {
        session: winner, ..
    } = winners[0]
    else {
        unreachable!()
    };
    let owner = winner.record.owner_pod.clone().unwrap();
    for outcome in &outcomes {
        match outcome {
            ClaimOutcome::Claimed { .. } => {}
            ClaimOutcome::OwnedByOther { owner: o } => assert_eq!(o, &owner),
            other => panic!("unexpected {other:?}"),
        }
    }
    let stored = store.get(&s).await.unwrap().unwrap();
    assert_eq!(stored.record.owner_pod.as_deref(), Some(owner.as_str()));
    assert_eq!(stored.record.rehydrations, 1);
    assert_eq!(store.counts().await.unwrap().per_pod.get(&owner), Some(&1));
    store.delete(&s).await.unwrap();
}

async fn credential_binding(store: &dyn SessionStore) {
    let s = id("bound");
    store.create_or_rehydrate(&s, owned_by("p1")).await.unwrap();
    store.mark_draining(&s, Some("p1"), TTL).await.unwrap();
    assert_eq!(
        store.claim(&s, claim("p2", "fp-other")).await.unwrap(),
        ClaimOutcome::CredentialMismatch
    );
    let anonymous = Claim {
        pod: "p2".into(),
        address: None,
        credential_fingerprint: None,
    };
    assert_eq!(
        store.claim(&s, anonymous).await.unwrap(),
        ClaimOutcome::CredentialMismatch
    );
    assert_eq!(
        store.get(&s).await.unwrap().unwrap().record.state(),
        SessionState::Draining,
        "refusal changes nothing"
    );
    assert!(matches!(
        store.claim(&s, claim("p2", "fp-a")).await.unwrap(),
        ClaimOutcome::Claimed { .. }
    ));
    store.delete(&s).await.unwrap();
}

async fn listing_sees_every_record_once(store: &dyn SessionStore) {
    let ids: Vec<SessionId> = (0..1200).map(|i| id(&format!("list-{i:04}"))).collect();
    futures::future::try_join_all(
        ids.iter()
            .map(|i| store.create_or_rehydrate(i, owned_by("lister"))),
    )
    .await
    .unwrap();
    let listed: Vec<Listed> = store::list_all(store, 100).try_collect().await.unwrap();
    let seen: Vec<SessionId> = listed
        .into_iter()
        .map(|l| match l {
            Listed::Session(s) => s.id,
            Listed::Unreadable(u) => panic!("unexpected unreadable {u}"),
        })
        .collect();
    let unique: HashSet<&SessionId> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no record listed twice");
    assert_eq!(unique, ids.iter().collect::<HashSet<_>>());
    let counts = store.counts().await.unwrap();
    assert_eq!(counts.total, 1200);
    assert_eq!(counts.per_pod.get("lister"), Some(&1200));
    let report = store::scan_report(store, 100, &|_| {}).await.unwrap();
    assert_eq!(report.counts.total, 1200);
    assert_eq!(report.counts.source, CountSource::Scan);
    // `sessions stats`: the index's counts and the scan's, which agree, in one pass.
    let seen = std::sync::atomic::AtomicU64::new(0);
    let (indexed, audited) = store::audit(store, 100, &|n| {
        seen.store(n, std::sync::atomic::Ordering::Relaxed);
    })
    .await
    .unwrap();
    let indexed = indexed.expect("the index the writes kept");
    assert_eq!((indexed.total, audited.counts.total), (1200, 1200));
    assert_eq!(audited.counts.per_pod, counts.per_pod);
    assert_eq!(seen.into_inner(), 1200, "progress reaches every key");
    for i in &ids {
        store.delete(i).await.unwrap();
    }
    assert_eq!(store.counts().await.unwrap().total, 0);
}

async fn debounced_touches(store: Arc<dyn SessionStore>) {
    use store::Touched;
    let s = id("busy");
    store.create_or_rehydrate(&s, owned_by("p")).await.unwrap();
    let toucher = DebouncedToucher::new(store.clone(), Duration::from_millis(300));
    let mut written = 0;
    for _ in 0..100 {
        if toucher.touch(&s, Some("p")).await.unwrap() == Touched::Written {
            written += 1;
        }
    }
    assert_eq!(written, 1, "100 touches within the interval write once");
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        toucher.touch(&s, Some("p")).await.unwrap(),
        Touched::Written
    );
    store.delete(&s).await.unwrap();
    toucher.forget(&s);
    assert_eq!(toucher.touch(&s, Some("p")).await.unwrap(), Touched::Gone);
}

/// Sessions expire after the TTL, and vanish from counts without any prune.
async fn expiry(store: Arc<dyn SessionStore>) {
    let s = id("short-lived");
    store.create_or_rehydrate(&s, owned_by("p")).await.unwrap();
    assert_eq!(store.counts().await.unwrap().total, 1);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        store.touch(&s, Some("p")).await.unwrap().exists(),
        "touch slides the TTL"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        store.get(&s).await.unwrap().is_some(),
        "alive: touched 700 ms ago, TTL 1 s"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(store.get(&s).await.unwrap().is_none(), "expired");
    let counts = store.counts().await.unwrap();
    assert_eq!((counts.total, counts.per_pod.get("p")), (0, None));

    // A drained session nobody claimed before its TTL ran out is lost, counted once; one that
    // was claimed is not, even when it expires later.
    let lost_before = store.tallies().await.unwrap().lost;
    let (unclaimed, claimed) = (id("drained-unclaimed"), id("drained-claimed"));
    for s in [&unclaimed, &claimed] {
        store.create_or_rehydrate(s, owned_by("p")).await.unwrap();
        store
            .mark_draining(s, Some("p"), Duration::ZERO)
            .await
            .unwrap();
    }
    assert!(matches!(
        store.claim(&claimed, claim("q", "fp-a")).await.unwrap(),
        ClaimOutcome::Claimed { .. }
    ));
    assert_eq!(
        store.expire_draining().await.unwrap(),
        0,
        "none expired yet"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(store.expire_draining().await.unwrap(), 1);
    assert_eq!(store.expire_draining().await.unwrap(), 0, "counted once");
    assert_eq!(store.tallies().await.unwrap().lost - lost_before, 1);
    assert_eq!(store.counts().await.unwrap().draining, 0);
}

#[tokio::test]
async fn memory_store_honours_the_contract() {
    contract(Arc::new(MemoryStore::new(TTL))).await;
    expiry(Arc::new(MemoryStore::new(Duration::from_secs(1)))).await;
}

#[tokio::test]
async fn redis_store_honours_the_contract() {
    let redis = RedisServer::start();
    contract(redis_store(&redis.url(), "mcp:session:", TTL).await).await;
    expiry(redis_store(&redis.url(), "short:", Duration::from_secs(1)).await).await;
}

#[tokio::test]
async fn redis_cluster_store_honours_the_contract() {
    let cluster = RedisCluster::start();
    contract(redis_store(&cluster.url(), "mcp:session:", TTL).await).await;
    expiry(redis_store(&cluster.url(), "short:", Duration::from_secs(1)).await).await;
    // Records really are spread over all three masters.
    let store = redis_store(&cluster.url(), "spread:", TTL).await;
    for i in 0..60 {
        store
            .create_or_rehydrate(&id(&format!("s{i}")), NewSession::default())
            .await
            .unwrap();
    }
    for node in &cluster.nodes {
        let keys: usize = node.cli(&["DBSIZE"]).unwrap().trim().parse().unwrap();
        assert!(keys >= 5, "node {} holds {keys} keys", node.port);
    }
    let memory = store.memory_usage(20).await.unwrap().unwrap();
    assert_eq!(memory.sampled, 20);
    assert!(memory.mean_bytes > 50, "{memory:?}");
}

#[tokio::test]
async fn prefixes_are_independent() {
    let redis = RedisServer::start();
    let a = redis_store(&redis.url(), "tenant-a:", TTL).await;
    let b = redis_store(&redis.url(), "tenant-b:", TTL).await;
    for i in 0..3 {
        a.create_or_rehydrate(&id(&format!("a{i}")), owned_by("pa"))
            .await
            .unwrap();
    }
    b.create_or_rehydrate(&id("b0"), owned_by("pb"))
        .await
        .unwrap();
    assert_eq!(a.counts().await.unwrap().total, 3);
    assert_eq!(b.counts().await.unwrap().total, 1);
    let listed: Vec<Listed> = store::list_all(&*b, 10).try_collect().await.unwrap();
    assert_eq!(listed.len(), 1);
}
