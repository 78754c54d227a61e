//! Behaviour every [`Store`] must have, one body for both stores: the unit
//! tests run it on [`super::FileStore`] (paused time), the end-to-end tests
//! (tests/tests/etcd_store.rs) on a real etcd (real time, bounded waits).
//! Each check panics with what went wrong.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::{campaign, leader, observe, put_with_lease, Change, ChangeStream, Store, StoreError};

/// Compare-and-swap: a stale revision loses and names the current one.
pub async fn cas_conflicts(store: &dyn Store) {
    let k = "cas/doc";
    let r1 = store
        .put_if(k, b"v1".to_vec(), 0, None)
        .await
        .expect("create");
    match store.put_if(k, b"again".to_vec(), 0, None).await {
        Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, r1),
        other => panic!("a second create must conflict, got {other:?}"),
    }
    let r2 = store
        .put_if(k, b"v2".to_vec(), r1, None)
        .await
        .expect("update at r1");
    assert!(r2 > r1, "revisions grow: {r1} then {r2}");
    assert_eq!(store.get(k).await.unwrap(), Some((b"v2".to_vec(), r2)));
    match store.put_if(k, b"stale".to_vec(), r1, None).await {
        Err(e @ StoreError::Conflict { .. }) => assert!(e.to_string().contains("retry"), "{e}"),
        other => panic!("a stale write must conflict, got {other:?}"),
    }
    assert!(
        store.delete_if(k, r1).await.is_err(),
        "a stale delete must conflict"
    );
    store.delete_if(k, r2).await.expect("delete at r2");
    assert_eq!(store.get(k).await.unwrap(), None);
    store
        .put_if("cas/list/b", b"b".to_vec(), 0, None)
        .await
        .unwrap();
    store
        .put_if("cas/list/a", b"a".to_vec(), 0, None)
        .await
        .unwrap();
    store
        .put_if("cas/listx", b"x".to_vec(), 0, None)
        .await
        .unwrap();
    let keys: Vec<String> = store
        .list("cas/list/")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _, _)| k)
        .collect();
    assert_eq!(keys, ["cas/list/a", "cas/list/b"]);
}

/// Waits (at most `limit`) for a change matching `f`.
pub async fn next_matching(
    changes: &mut ChangeStream,
    limit: Duration,
    f: impl Fn(&Change) -> bool,
) -> Change {
    let wait = async {
        while let Some(c) = changes.next().await {
            if f(&c) {
                return c;
            }
        }
        panic!("the watch ended");
    };
    tokio::time::timeout(limit, wait)
        .await
        .expect("no matching change in time")
}

/// A watch on `a` sees what `b` writes under its prefix, and only that.
pub async fn watch_sees_other_client(a: &dyn Store, b: &dyn Store) {
    let mut changes = a.watch("watched/").await.unwrap();
    b.put_if("unwatched/x", b"no".to_vec(), 0, None)
        .await
        .unwrap();
    let rev = b
        .put_if("watched/x", b"yes".to_vec(), 0, None)
        .await
        .unwrap();
    let c = next_matching(&mut changes, Duration::from_secs(5), |_| true).await;
    assert_eq!(
        c,
        Change::Put {
            key: "watched/x".into(),
            value: b"yes".to_vec(),
            rev
        }
    );
    b.delete_if("watched/x", rev).await.unwrap();
    let c = next_matching(&mut changes, Duration::from_secs(5), |_| true).await;
    assert!(
        matches!(c, Change::Delete { ref key, .. } if key == "watched/x"),
        "{c:?}"
    );
}

/// A key put with a lease lives while the lease is kept alive and goes
/// away (a watch sees the delete) within about `ttl` once it is not.
pub async fn lease_expiry(store: &dyn Store, ttl: Duration) {
    let lease = store.grant(ttl).await.unwrap();
    let mut changes = store.watch("leased/").await.unwrap();
    put_with_lease(store, "leased/ep", b"10.0.0.1".to_vec(), lease)
        .await
        .unwrap();
    next_matching(&mut changes, Duration::from_secs(5), |c| {
        matches!(c, Change::Put { .. })
    })
    .await;
    for _ in 0..4 {
        tokio::time::sleep(ttl / 2).await;
        store
            .keep_alive(lease)
            .await
            .expect("keep-alive of a live lease");
    }
    assert!(
        store.get("leased/ep").await.unwrap().is_some(),
        "kept alive past its ttl, the key must stay"
    );
    let gone = next_matching(&mut changes, ttl * 2 + Duration::from_secs(2), |c| {
        matches!(c, Change::Delete { .. })
    })
    .await;
    assert_eq!(gone.key(), "leased/ep");
    assert_eq!(store.get("leased/ep").await.unwrap(), None);
    let ka = store.keep_alive(lease).await;
    assert!(matches!(ka, Err(StoreError::LeaseGone(_))), "{ka:?}");
    let late = put_with_lease(store, "leased/late", b"x".to_vec(), lease).await;
    assert!(matches!(late, Err(StoreError::LeaseGone(_))), "{late:?}");
}

/// Two contenders: one leads, the other waits; when the leader dies
/// (dropped, no resign) the other leads within about the ttl; a resign
/// hands over at once.
pub async fn election_fails_over(a: Arc<dyn Store>, b: Arc<dyn Store>, ttl: Duration) {
    let first = campaign(a.clone(), "singleton", "replica-a", ttl)
        .await
        .unwrap();
    assert!(first.is_leader());
    assert_eq!(
        leader(&*b, "singleton").await.unwrap().as_deref(),
        Some("replica-a")
    );
    let b2 = b.clone();
    let mut second = tokio::spawn(async move { campaign(b2, "singleton", "replica-b", ttl).await });
    // The leader keeps its role past its ttl: the other contender waits.
    assert!(
        tokio::time::timeout(ttl * 2, &mut second).await.is_err(),
        "two leaders at once"
    );
    let crashed = tokio::time::Instant::now();
    drop(first);
    let second = tokio::time::timeout(ttl * 3 + Duration::from_secs(2), second)
        .await
        .expect("the other contender must lead after the leader's lease expires")
        .unwrap()
        .unwrap();
    assert!(crashed.elapsed() <= ttl * 3 + Duration::from_secs(2));
    assert!(second.is_leader());
    assert_eq!(
        leader(&*a, "singleton").await.unwrap().as_deref(),
        Some("replica-b")
    );
    // A resign hands over without waiting for the ttl.
    let a2 = a.clone();
    let third = tokio::spawn(async move { campaign(a2, "singleton", "replica-a", ttl).await });
    second.resign().await.unwrap();
    let third = tokio::time::timeout(ttl, third)
        .await
        .expect("resign hands over at once")
        .unwrap()
        .unwrap();
    assert_eq!(
        leader(&*b, "singleton").await.unwrap().as_deref(),
        Some("replica-a")
    );
    third.resign().await.unwrap();
    assert_eq!(leader(&*b, "singleton").await.unwrap(), None);
}

async fn next_leader(
    who: &mut futures::stream::BoxStream<'static, Option<String>>,
) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(5), who.next())
        .await
        .expect("no leader change in time")
        .expect("the observe stream ended")
}

/// An observer on another client sees nobody, then the leader, then nobody
/// after it resigns.
pub async fn observers_see_who_leads(a: Arc<dyn Store>, b: Arc<dyn Store>, ttl: Duration) {
    let mut who = observe(&*b, "observed").await.unwrap();
    assert_eq!(next_leader(&mut who).await, None);
    let held = campaign(a, "observed", "replica-a", ttl).await.unwrap();
    assert_eq!(next_leader(&mut who).await.as_deref(), Some("replica-a"));
    held.resign().await.unwrap();
    assert_eq!(next_leader(&mut who).await, None);
}

/// A leader whose lease ends (revoked here; in life, expired while the
/// store was out of reach) learns it within the ttl and a contender takes over.
pub async fn leadership_lost_with_its_lease(a: Arc<dyn Store>, b: Arc<dyn Store>, ttl: Duration) {
    let mut held = campaign(a.clone(), "fenced", "replica-a", ttl)
        .await
        .unwrap();
    a.revoke(held.lease()).await.unwrap();
    tokio::time::timeout(ttl * 2, held.lost())
        .await
        .expect("the leader must learn it lost its lease");
    assert!(!held.is_leader());
    let next = tokio::time::timeout(ttl * 2, campaign(b, "fenced", "replica-b", ttl))
        .await
        .expect("the role is free once the lease is gone")
        .unwrap();
    assert!(next.is_leader());
}

/// Two contenders publishing numbered versions the way the leader does
/// (read the current version, write `seq + 1` only if it is unchanged,
/// read again on a conflict): every number is written exactly once, in
/// order, whoever wins each round (what keeps `mesh/version` monotonic
/// and never published twice across a failover).
pub async fn publish_is_monotonic(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    const EACH: u64 = 20;
    async fn publish(store: Arc<dyn Store>, n: u64) -> Vec<u64> {
        let key = "mesh/version";
        let mut won = Vec::new();
        while (won.len() as u64) < n {
            let (seq, rev) = match store.get(key).await.expect("get") {
                Some((v, rev)) => (String::from_utf8(v).unwrap().parse::<u64>().unwrap(), rev),
                None => (0, 0),
            };
            match store
                .put_if(key, (seq + 1).to_string().into_bytes(), rev, None)
                .await
            {
                Ok(_) => won.push(seq + 1),
                Err(StoreError::Conflict { .. }) => tokio::task::yield_now().await,
                Err(e) => panic!("publishing: {e}"),
            }
        }
        won
    }
    let (x, y) = tokio::join!(
        tokio::spawn(publish(a.clone(), EACH)),
        tokio::spawn(publish(b, EACH))
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    for won in [&x, &y] {
        assert!(
            won.windows(2).all(|w| w[0] < w[1]),
            "one contender's versions grow: {won:?}"
        );
    }
    let mut all: Vec<u64> = x.iter().chain(&y).copied().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=2 * EACH).collect::<Vec<_>>(),
        "a: {x:?}, b: {y:?}"
    );
    let (v, _) = a.get("mesh/version").await.unwrap().unwrap();
    assert_eq!(v, (2 * EACH).to_string().into_bytes());
}

/// A write guarded by another key's revision lands only while the guard is
/// unchanged: a deposed leader's publish (guard: its election key) and a
/// leaf checked against a `ca/state` another replica changed since (guard:
/// that revision) both lose with a conflict naming the guard, and write nothing.
pub async fn guarded_writes_fence(a: Arc<dyn Store>, b: Arc<dyn Store>, ttl: Duration) {
    let held = campaign(a.clone(), "guarded", "replica-a", ttl)
        .await
        .unwrap();
    let (key, rev) = held.fence();
    let key = key.to_string();
    let r1 = a
        .put_if_guarded("guarded/doc", b"1".to_vec(), 0, &key, rev)
        .await
        .expect("the leader publishes");
    held.resign().await.unwrap();
    let next = campaign(b.clone(), "guarded", "replica-b", ttl)
        .await
        .unwrap();
    match a
        .put_if_guarded("guarded/doc", b"2".to_vec(), r1, &key, rev)
        .await
    {
        Err(StoreError::Conflict { key: k, .. }) => assert_eq!(k, key),
        other => panic!("a deposed leader must not publish, got {other:?}"),
    }
    let (k2, rev2) = next.fence();
    let r2 = b
        .put_if_guarded("guarded/doc", b"2".to_vec(), r1, k2, rev2)
        .await
        .expect("the new leader publishes");
    match b
        .put_if_guarded("guarded/doc", b"3".to_vec(), r1, k2, rev2)
        .await
    {
        Err(StoreError::Conflict { key: k, actual, .. }) => {
            assert_eq!((k.as_str(), actual), ("guarded/doc", r2))
        }
        other => panic!("a stale revision of the key itself conflicts, got {other:?}"),
    }
    let core = a
        .put_if("guarded/state", b"s1".to_vec(), 0, None)
        .await
        .unwrap();
    a.put_if("guarded/state", b"s2".to_vec(), core, None)
        .await
        .unwrap();
    match a
        .put_if_guarded("guarded/leaf/x", b"l".to_vec(), 0, "guarded/state", core)
        .await
    {
        Err(StoreError::Conflict { key: k, .. }) => assert_eq!(k, "guarded/state"),
        other => panic!("a leaf checked against a stale ca/state must not land, got {other:?}"),
    }
    assert_eq!(a.get("guarded/leaf/x").await.unwrap(), None);
    assert_eq!(
        b.get("guarded/doc").await.unwrap(),
        Some((b"2".to_vec(), r2))
    );
}
