//! What every registry must do, written once and run on each: the memory
//! registry (one replica: `a` and `b` are the same), the store registry on
//! the file store (unit tests, paused time) and on a real etcd
//! (`tests/tests/registry_etcd.rs`, two replicas on two clients).
//!
//! Each body takes two replicas of one registry; waits poll (never sleep a
//! fixed time) until a deadline in the runtime's clock.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crank_api::mesh::EndpointRegistration;

use super::{LeaseId, Registry, RegistryError};

/// The lease the bodies use: etcd's shortest is about two seconds.
pub const LEASE: Duration = Duration::from_secs(2);

/// Time as the bodies pass it: the runtime's clock (paused in unit tests).
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A valid registration at `address`.
pub fn reg(address: &str) -> EndpointRegistration {
    EndpointRegistration {
        address: address.parse().expect("a test address"),
        identity: "transcode.acme.crank.local".into(),
        capabilities: vec!["transcode:v1".into()],
        labels: BTreeMap::from([("gpu".into(), "nvidia".into())]),
    }
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after 15 s.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn addresses(r: &dyn Registry) -> Vec<String> {
    r.snapshot(now())
        .entries
        .iter()
        .map(|e| e.registration.address.to_string())
        .collect()
}

/// Registered on `a`, served by `b` (and `b`'s change signal fires);
/// renewed and deregistered through `b`, gone from `a`.
pub async fn served_by_every_replica(a: &dyn Registry, b: &dyn Registry) {
    let mut woken = b.changes();
    let before = b.snapshot(now()).version;
    let lease = a
        .register(reg("10.0.0.1:8443"), LEASE, now())
        .await
        .unwrap();
    eventually("b serves a's registration", || {
        addresses(b) == ["10.0.0.1:8443"]
    })
    .await;
    let snap = b.snapshot(now());
    assert_eq!(snap.entries[0].lease, lease);
    assert_eq!(snap.entries[0].registration, reg("10.0.0.1:8443"));
    assert!(snap.version > before, "the version went up");
    if let Some(rx) = woken.as_mut() {
        assert!(rx.has_changed().unwrap_or(false), "b's watchers are woken");
    }
    b.heartbeat(&lease, now()).await.unwrap();
    b.deregister(&lease).await.unwrap();
    eventually("a drops what b deregistered", || addresses(a).is_empty()).await;
    assert_eq!(
        a.heartbeat(&lease, now()).await,
        Err(RegistryError::UnknownLease(lease))
    );
}

/// Heartbeats through `b` keep `a`'s registration past its lease; once
/// they stop, it leaves both replicas and `expire` reports it.
pub async fn expiry_leaves_every_replica(a: &dyn Registry, b: &dyn Registry) {
    // What earlier bodies left behind is not this body's expiry.
    a.expire(now());
    let lease = a
        .register(reg("10.0.0.2:8443"), LEASE, now())
        .await
        .unwrap();
    eventually("b serves it", || addresses(b) == ["10.0.0.2:8443"]).await;
    let until = tokio::time::Instant::now() + 2 * LEASE;
    while tokio::time::Instant::now() < until {
        b.heartbeat(&lease, now()).await.unwrap();
        tokio::time::sleep(LEASE / 4).await;
        assert_eq!(addresses(a), ["10.0.0.2:8443"], "renewed, it stays");
    }
    eventually("the lease ran out on a", || addresses(a).is_empty()).await;
    eventually("the lease ran out on b", || addresses(b).is_empty()).await;
    let gone = a.expire(now());
    assert_eq!(gone.len(), 1, "reported once: {gone:?}");
    assert_eq!(gone[0].registration.address.to_string(), "10.0.0.2:8443");
    assert!(a.expire(now()).is_empty());
    assert_eq!(
        b.heartbeat(&lease, now()).await,
        Err(RegistryError::UnknownLease(lease))
    );
}

/// Registering an address again replaces it everywhere (the old lease
/// stops working); bad input and unknown leases are refused.
pub async fn deregister_and_replace(a: &dyn Registry, b: &dyn Registry) {
    let old = a
        .register(reg("10.0.0.3:8443"), LEASE * 5, now())
        .await
        .unwrap();
    eventually("b serves it", || addresses(b) == ["10.0.0.3:8443"]).await;
    let mut changed = reg("10.0.0.3:8443");
    changed.labels.insert("zone".into(), "eu-1".into());
    let new = b.register(changed.clone(), LEASE * 5, now()).await.unwrap();
    assert_ne!(old, new);
    let replaced = |r: &dyn Registry| {
        let s = r.snapshot(now());
        s.entries.len() == 1 && s.entries[0].registration == changed
    };
    eventually("a serves the new registration", || replaced(a)).await;
    assert!(replaced(b));
    assert_eq!(
        a.heartbeat(&old, now()).await,
        Err(RegistryError::UnknownLease(old.clone()))
    );
    a.heartbeat(&new, now()).await.unwrap();

    let mut bad = reg("10.0.0.4:8443");
    bad.capabilities.clear();
    assert!(matches!(
        a.register(bad, LEASE, now()).await,
        Err(RegistryError::Invalid { field, .. }) if field == "capabilities"
    ));
    let bogus = LeaseId::new("00ff");
    assert_eq!(
        b.deregister(&bogus).await,
        Err(RegistryError::UnknownLease(bogus))
    );

    a.deregister(&new).await.unwrap();
    assert!(addresses(a).is_empty(), "gone at once where deregistered");
    eventually("b drops it", || addresses(b).is_empty()).await;
    assert!(a.deregister(&new).await.is_err());
}
