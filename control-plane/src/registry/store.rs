//! [`StoreRegistry`]: the registry on the store (`store: etcd`), so that
//! every replica serves every registration and a lease the store ends
//! takes its endpoint out of every route on every replica.
//!
//! - Each registration is one key, `registry/<identity>/<address>`, put
//!   under a store lease of the registration's duration. A heartbeat is the
//!   lease's keep-alive, a deregistration its revoke; when the lease runs
//!   out the store deletes the key.
//! - Every replica watches `registry/` and keeps the live registrations in
//!   memory: [`Registry::snapshot`] and [`Registry::expire`] read that
//!   cache, so the mesh watch never waits on the store. A write also lands
//!   in the cache of the replica that made it when the store confirms it.
//! - Changes are ordered by the store's revision per key, so the watch
//!   opened before the first listing and the listing itself can overlap.
//!   When the watch ends (the store went away, a compaction), the replica
//!   watches again and lists again, with backoff, and keeps serving its
//!   cache meanwhile.
//!
//! The lease id an endpoint holds is the store lease (16 hex digits) and 16
//! random hex digits. A heartbeat on a replica whose cache holds the
//! registration must match the whole id; on a replica whose watch has not
//! delivered it yet, the store lease is parsed from the id and kept alive
//! directly (unless the cache holds that store lease under another id), so
//! a heartbeat works on any replica.
//! `expires_in` is this replica's estimate: heartbeats sent to another
//! replica renew the lease without telling this one, so once the estimate
//! runs out while the store still holds the key, it rolls over by whole
//! lease periods (the store deletes the key when the lease really ends).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crank_api::mesh::EndpointRegistration;
use crank_plumbing::backoff::{Backoff, Jitter};
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};

use super::{validate, Entry, LeaseId, Pending, Registry, RegistryError, Snapshot};
use crate::store::{self, Change, ChangeStream, Rev, Store, StoreError};

/// Where registrations live in the store.
pub const PREFIX: &str = "registry/";

/// How many left entries wait for [`Registry::expire`] (as in memory).
const MAX_PENDING_EXPIRED: usize = 1024;

/// Watching the store again after its watch ended.
const RESYNC: Backoff = Backoff::new(
    Duration::from_millis(100),
    Duration::from_secs(5),
    Jitter::Equal,
);

/// What one registration key holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    lease: LeaseId,
    store_lease: i64,
    registration: EndpointRegistration,
    lease_ms: u64,
    registered_at_unix_ms: u64,
}

/// The registry on a [`Store`], its reads served from a watched cache.
pub struct StoreRegistry {
    store: Arc<dyn Store>,
    cache: Arc<Mutex<Cache>>,
    changes: tokio::sync::watch::Sender<u64>,
    follower: tokio::task::JoinHandle<()>,
}

impl StoreRegistry {
    /// Reads the registrations in `store` and follows its changes (a task
    /// on the current runtime, ended when the registry is dropped). Fails
    /// when the store does not answer.
    pub async fn start(store: Arc<dyn Store>) -> Result<StoreRegistry, RegistryError> {
        let cache = Arc::new(Mutex::new(Cache::new()));
        let (changes, _) = tokio::sync::watch::channel(0);
        let stream = sync(&*store, &cache, &changes).await.map_err(unavailable)?;
        let follower = tokio::spawn(follow(
            store.clone(),
            cache.clone(),
            changes.clone(),
            stream,
        ));
        Ok(StoreRegistry {
            store,
            cache,
            changes,
            follower,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Cache> {
        lock(&self.cache)
    }

    /// Applies a change this replica made, as its watch will see it.
    fn apply(&self, change: Change) {
        if self.lock().apply(change, Instant::now()) {
            self.notify();
        }
    }

    fn notify(&self) {
        let version = self.lock().version;
        self.changes.send_replace(version);
    }

    async fn register_now(
        &self,
        reg: EndpointRegistration,
        lease: Duration,
    ) -> Result<LeaseId, RegistryError> {
        validate(&reg, lease)?;
        let store_lease = self.store.grant(lease).await.map_err(unavailable)?;
        let id = LeaseId::new(format!(
            "{:016x}{}",
            store_lease.0 as u64,
            crank_certs::random_hex(8)
        ));
        let key = key_for(&reg);
        let record = Record {
            lease: id.clone(),
            store_lease: store_lease.0,
            registration: reg,
            lease_ms: u64::try_from(lease.as_millis()).unwrap_or(u64::MAX),
            registered_at_unix_ms: unix_ms(SystemTime::now()),
        };
        let value = serde_json::to_vec(&record).unwrap_or_default();
        // Read before the put: this replica's watch may apply the new
        // registration before the put returns, hiding the one it replaces.
        let replaced = self.lock().holders(record.registration.address, &key);
        let rev = match self.put(&key, &value, store_lease).await {
            Ok(rev) => rev,
            Err(e) => {
                let _ = self.store.revoke(store_lease).await;
                return Err(unavailable(e));
            }
        };
        self.apply(Change::Put { key, value, rev });
        // The address's earlier registration (same key: its old lease; or
        // another identity's key) stops working, as in memory.
        for (other_key, other_rev, other_lease) in replaced {
            if other_lease != store_lease.0 {
                let _ = self.store.revoke(store::LeaseId(other_lease)).await;
            }
            if let Some(other_key) = other_key {
                let _ = self.store.delete_if(&other_key, other_rev).await;
            }
        }
        tracing::info!(address = %record.registration.address, identity = %record.registration.identity, lease_s = lease.as_secs(), "endpoint registered in the store");
        Ok(id)
    }

    /// Puts `key` under `lease` whatever its revision (read, then
    /// compare-and-swap, again while another writer gets in between).
    async fn put(&self, key: &str, value: &[u8], lease: store::LeaseId) -> store::Result<Rev> {
        let mut tries = 0;
        loop {
            let expected = self.store.get(key).await?.map_or(0, |(_, rev)| rev);
            match self
                .store
                .put_if(key, value.to_vec(), expected, Some(lease))
                .await
            {
                Err(StoreError::Conflict { .. }) if tries < 5 => tries += 1,
                other => return other,
            }
        }
    }

    async fn heartbeat_now(&self, lease: &LeaseId, now: Instant) -> Result<(), RegistryError> {
        let unknown = || RegistryError::UnknownLease(lease.clone());
        let store_lease = {
            let cache = self.lock();
            match cache.store_lease(lease) {
                Some(l) => l,
                None => {
                    let l = store_lease_of(lease).ok_or_else(unknown)?;
                    if cache.holds_store_lease(l) {
                        return Err(unknown());
                    }
                    l
                }
            }
        };
        match self.store.keep_alive(store::LeaseId(store_lease)).await {
            Ok(()) => {
                self.lock().renewed(lease, now);
                Ok(())
            }
            Err(StoreError::LeaseGone(_)) => Err(unknown()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn deregister_now(&self, lease: &LeaseId) -> Result<(), RegistryError> {
        let unknown = || RegistryError::UnknownLease(lease.clone());
        let store_lease = self.lock().store_lease(lease).ok_or_else(unknown)?;
        self.store
            .revoke(store::LeaseId(store_lease))
            .await
            .map_err(unavailable)?;
        let gone = self.lock().remove_lease(lease);
        if let Some(slot) = gone {
            tracing::info!(address = %slot.record.registration.address, identity = %slot.record.registration.identity, "endpoint deregistered from the store");
            self.notify();
        }
        Ok(())
    }
}

impl Drop for StoreRegistry {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

impl Registry for StoreRegistry {
    fn register(
        &self,
        reg: EndpointRegistration,
        lease: Duration,
        _now: Instant,
    ) -> Pending<'_, LeaseId> {
        self.register_now(reg, lease).boxed()
    }

    fn heartbeat<'a>(&'a self, lease: &'a LeaseId, now: Instant) -> Pending<'a, ()> {
        self.heartbeat_now(lease, now).boxed()
    }

    fn deregister<'a>(&'a self, lease: &'a LeaseId) -> Pending<'a, ()> {
        self.deregister_now(lease).boxed()
    }

    fn expire(&self, _now: Instant) -> Vec<Entry> {
        let mut expired: Vec<Entry> = self.lock().expired.drain(..).collect();
        expired.sort_by_key(|e| e.registration.address);
        expired
    }

    fn snapshot(&self, now: Instant) -> Snapshot {
        let cache = self.lock();
        let mut entries: Vec<Entry> = cache.slots.values().map(|s| s.entry(now)).collect();
        entries.sort_by_key(|e| e.registration.address);
        Snapshot {
            version: cache.version,
            entries,
        }
    }

    fn version(&self, _now: Instant) -> u64 {
        self.lock().version
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.changes.subscribe())
    }

    fn survives_restart(&self) -> bool {
        true
    }
}

/// The store lease named by the first 16 hex digits of a lease id made by
/// [`StoreRegistry::register_now`].
fn store_lease_of(lease: &LeaseId) -> Option<i64> {
    let id = lease.as_str();
    if id.len() != 32 || !id.is_ascii() {
        return None;
    }
    u64::from_str_radix(&id[..16], 16).ok().map(|l| l as i64)
}

/// `registry/<identity>/<address>`.
fn key_for(reg: &EndpointRegistration) -> String {
    format!("{PREFIX}{}/{}", reg.identity, reg.address)
}

fn unavailable(e: StoreError) -> RegistryError {
    RegistryError::Unavailable(e.to_string())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn lock(cache: &Mutex<Cache>) -> MutexGuard<'_, Cache> {
    // Every change leaves the cache consistent before it can panic.
    cache.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Opens the watch, then lists: the cache holds the store's registrations
/// and the returned stream carries every change from before the listing.
async fn sync(
    store: &dyn Store,
    cache: &Mutex<Cache>,
    changes: &tokio::sync::watch::Sender<u64>,
) -> store::Result<ChangeStream> {
    let stream = store.watch(PREFIX).await?;
    let listed = store.list(PREFIX).await?;
    let changed = lock(cache).replace(listed, Instant::now());
    if changed {
        changes.send_replace(lock(cache).version);
    }
    Ok(stream)
}

/// Applies the store's changes to the cache; lists again when the watch ends.
async fn follow(
    store: Arc<dyn Store>,
    cache: Arc<Mutex<Cache>>,
    changes: tokio::sync::watch::Sender<u64>,
    mut stream: ChangeStream,
) {
    loop {
        while let Some(change) = stream.next().await {
            if lock(&cache).apply(change, Instant::now()) {
                changes.send_replace(lock(&cache).version);
            }
        }
        tracing::warn!("the registry's watch on the store ended; watching it again (the replica serves the registrations it holds meanwhile)");
        let mut attempts = RESYNC.attempts();
        stream = loop {
            tokio::time::sleep(attempts.next_delay()).await;
            match sync(&*store, &cache, &changes).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the registry in the store yet; retrying")
                }
            }
        };
    }
}

/// One registration as this replica holds it.
struct Slot {
    rev: Rev,
    record: Record,
    /// When this replica learnt of it, and its own renewals.
    last_heartbeat: Option<SystemTime>,
    expires_at: Instant,
}

impl Slot {
    fn duration(&self) -> Duration {
        Duration::from_millis(self.record.lease_ms)
    }

    fn entry(&self, now: Instant) -> Entry {
        let registered_at = UNIX_EPOCH + Duration::from_millis(self.record.registered_at_unix_ms);
        Entry {
            lease: self.record.lease.clone(),
            registration: self.record.registration.clone(),
            registered_at,
            last_heartbeat: self.last_heartbeat.unwrap_or(registered_at),
            expires_in: self.expires_in(now),
        }
    }

    /// This replica's estimate; past it the store still holds the key (a
    /// heartbeat went to another replica), so it rolls over by whole lease
    /// periods instead of reading 0.
    fn expires_in(&self, now: Instant) -> Duration {
        let d = self.duration();
        if now < self.expires_at || d.is_zero() {
            return self.expires_at.saturating_duration_since(now);
        }
        let over = (now - self.expires_at).as_nanos() % d.as_nanos();
        d - Duration::from_nanos(over as u64)
    }
}

/// The watched registrations by key, and the changes not yet reported.
struct Cache {
    slots: HashMap<String, Slot>,
    /// Lease id -> the key its registration is under.
    by_lease: HashMap<LeaseId, String>,
    version: u64,
    /// Left through the store (expired, or deregistered on another
    /// replica), not yet returned by `expire`.
    expired: VecDeque<Entry>,
}

impl Cache {
    fn new() -> Cache {
        Cache {
            slots: HashMap::new(),
            by_lease: HashMap::new(),
            version: 0,
            expired: VecDeque::new(),
        }
    }

    /// Applies one change in revision order per key; true when the
    /// registrations changed (the version went up).
    fn apply(&mut self, change: Change, now: Instant) -> bool {
        match change {
            Change::Put { key, value, rev } => {
                if self.slots.get(&key).is_some_and(|s| s.rev >= rev) {
                    return false;
                }
                let record: Record = match serde_json::from_slice(&value) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(key, error = %e, "ignoring a registry key that is not a registration");
                        return false;
                    }
                };
                let changed = self
                    .slots
                    .get(&key)
                    .is_none_or(|s| s.record.registration != record.registration);
                let expires_at = now + Duration::from_millis(record.lease_ms);
                let lease = record.lease.clone();
                let slot = Slot {
                    rev,
                    record,
                    last_heartbeat: None,
                    expires_at,
                };
                if let Some(old) = self.slots.insert(key.clone(), slot) {
                    self.by_lease.remove(&old.record.lease);
                }
                self.by_lease.insert(lease, key);
                if changed {
                    self.version += 1;
                }
                changed
            }
            Change::Delete { key, rev } => {
                if self.slots.get(&key).is_none_or(|s| s.rev >= rev) {
                    return false;
                }
                self.left(&key, now);
                true
            }
        }
    }

    /// Makes the cache what the store listed; true when that changed it.
    fn replace(&mut self, listed: Vec<store::Listed>, now: Instant) -> bool {
        let keys: std::collections::HashSet<&str> =
            listed.iter().map(|(k, _, _)| k.as_str()).collect();
        let gone: Vec<String> = self
            .slots
            .keys()
            .filter(|k| !keys.contains(k.as_str()))
            .cloned()
            .collect();
        let mut changed = !gone.is_empty();
        for key in gone {
            self.left(&key, now);
        }
        for (key, value, rev) in listed {
            changed |= self.apply(Change::Put { key, value, rev }, now);
        }
        changed
    }

    /// Removes a registration the store deleted and keeps it for `expire`.
    fn left(&mut self, key: &str, now: Instant) {
        let Some(slot) = self.slots.remove(key) else {
            return;
        };
        self.by_lease.remove(&slot.record.lease);
        self.version += 1;
        if self.expired.len() == MAX_PENDING_EXPIRED {
            self.expired.pop_front();
        }
        self.expired.push_back(slot.entry(now));
    }

    /// The keys (`None`: this very key) and store leases of the
    /// registrations that a new one at `address` under `key` replaces.
    fn holders(&self, address: std::net::SocketAddr, key: &str) -> Vec<(Option<String>, Rev, i64)> {
        self.slots
            .iter()
            .filter(|(_, s)| s.record.registration.address == address)
            .map(|(k, s)| {
                let other = (k != key).then(|| k.clone());
                (other, s.rev, s.record.store_lease)
            })
            .collect()
    }

    fn find(&self, lease: &LeaseId) -> Option<&String> {
        self.by_lease.get(lease)
    }

    /// True when a registration here holds `store_lease` (under its own id).
    fn holds_store_lease(&self, store_lease: i64) -> bool {
        self.slots
            .values()
            .any(|s| s.record.store_lease == store_lease)
    }

    fn store_lease(&self, lease: &LeaseId) -> Option<i64> {
        let key = self.find(lease)?;
        self.slots.get(key).map(|s| s.record.store_lease)
    }

    fn renewed(&mut self, lease: &LeaseId, now: Instant) {
        let Some(key) = self.find(lease).cloned() else {
            return;
        };
        if let Some(slot) = self.slots.get_mut(&key) {
            slot.last_heartbeat = Some(SystemTime::now());
            slot.expires_at = now + slot.duration();
        }
    }

    fn remove_lease(&mut self, lease: &LeaseId) -> Option<Slot> {
        let key = self.find(lease).cloned()?;
        let slot = self.slots.remove(&key)?;
        self.by_lease.remove(lease);
        self.version += 1;
        Some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::super::conformance;
    use super::*;
    use crate::store::FileStore;

    async fn pair() -> (StoreRegistry, StoreRegistry) {
        let s: Arc<dyn Store> = Arc::new(FileStore::in_memory());
        let a = StoreRegistry::start(s.clone()).await.unwrap();
        let b = StoreRegistry::start(s).await.unwrap();
        (a, b)
    }

    #[tokio::test(start_paused = true)]
    async fn a_registration_on_one_replica_is_served_by_the_other() {
        let (a, b) = pair().await;
        conformance::served_by_every_replica(&a, &b).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_that_runs_out_leaves_every_replica() {
        let (a, b) = pair().await;
        conformance::expiry_leaves_every_replica(&a, &b).await;
    }

    #[tokio::test(start_paused = true)]
    async fn deregister_and_replace_on_every_replica() {
        let (a, b) = pair().await;
        conformance::deregister_and_replace(&a, &b).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_memory_registry_passes_the_single_replica_bodies() {
        let m = crate::registry::MemoryRegistry::new();
        conformance::deregister_and_replace(&m, &m).await;
        conformance::expiry_leaves_every_replica(&m, &m).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_started_later_lists_what_is_there() {
        let s: Arc<dyn Store> = Arc::new(FileStore::in_memory());
        let a = StoreRegistry::start(s.clone()).await.unwrap();
        let lease = Registry::register(
            &a,
            conformance::reg("10.0.0.9:8443"),
            Duration::from_secs(10),
            Instant::now(),
        )
        .await
        .unwrap();
        let b = StoreRegistry::start(s).await.unwrap();
        let snap = b.snapshot(Instant::now());
        assert_eq!(snap.entries.len(), 1);
        assert_eq!(snap.entries[0].lease, lease);
        // A heartbeat through the late replica renews the lease.
        Registry::heartbeat(&b, &lease, Instant::now())
            .await
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_works_on_a_replica_whose_cache_lacks_the_lease() {
        let s: Arc<dyn Store> = Arc::new(FileStore::in_memory());
        let a = StoreRegistry::start(s.clone()).await.unwrap();
        let b = StoreRegistry::start(s).await.unwrap();
        // b's watch is cut: it never learns of the registration.
        b.follower.abort();
        let lease = Registry::register(
            &a,
            conformance::reg("10.0.0.7:8443"),
            Duration::from_secs(10),
            Instant::now(),
        )
        .await
        .unwrap();
        assert!(b.snapshot(Instant::now()).entries.is_empty());
        tokio::time::advance(Duration::from_secs(8)).await;
        Registry::heartbeat(&b, &lease, Instant::now())
            .await
            .expect("a heartbeat renews the store lease on any replica");
        tokio::time::advance(Duration::from_secs(8)).await;
        assert_eq!(
            a.snapshot(Instant::now()).entries.len(),
            1,
            "still registered"
        );
        // Another id for the same store lease is refused where it is known.
        let forged = LeaseId::new(format!("{}{}", &lease.as_str()[..16], "0".repeat(16)));
        let e = Registry::heartbeat(&a, &forged, Instant::now()).await;
        assert_eq!(e, Err(RegistryError::UnknownLease(forged)));
        let junk = LeaseId::new("not-a-lease");
        assert!(Registry::heartbeat(&b, &junk, Instant::now())
            .await
            .is_err());
    }

    #[test]
    fn expires_in_rolls_over_on_a_replica_that_missed_the_heartbeats() {
        let now = Instant::now();
        let mut c = Cache::new();
        let record = Record {
            lease: LeaseId::new("l1"),
            store_lease: 1,
            registration: conformance::reg("10.0.0.1:1"),
            lease_ms: 10_000,
            registered_at_unix_ms: 0,
        };
        let put = Change::Put {
            key: "registry/x/a".into(),
            value: serde_json::to_vec(&record).unwrap(),
            rev: 1,
        };
        assert!(c.apply(put, now));
        let slot = &c.slots["registry/x/a"];
        assert_eq!(
            slot.entry(now + Duration::from_secs(4)).expires_in,
            Duration::from_secs(6)
        );
        let later = slot.entry(now + Duration::from_secs(15)).expires_in;
        assert_eq!(
            later,
            Duration::from_secs(5),
            "not 0 while the store holds the key"
        );
        assert_eq!(
            c.find(&LeaseId::new("l1")).map(String::as_str),
            Some("registry/x/a")
        );
    }

    #[test]
    fn changes_apply_in_revision_order_per_key() {
        let now = Instant::now();
        let record = |port: u16| Record {
            lease: LeaseId::new(format!("l{port}")),
            store_lease: 1,
            registration: conformance::reg(&format!("10.0.0.1:{port}")),
            lease_ms: 10_000,
            registered_at_unix_ms: 0,
        };
        let put = |rev, port| Change::Put {
            key: "registry/x/a".into(),
            value: serde_json::to_vec(&record(port)).unwrap(),
            rev,
        };
        let mut c = Cache::new();
        assert!(c.apply(put(5, 1), now));
        assert!(!c.apply(put(5, 1), now), "the same event twice");
        assert!(!c.apply(put(4, 2), now), "an older put");
        let del = |rev| Change::Delete {
            key: "registry/x/a".into(),
            rev,
        };
        assert!(!c.apply(del(3), now), "an older delete");
        assert_eq!(c.version, 1);
        assert!(c.apply(put(7, 2), now));
        assert!(c.apply(del(8), now));
        assert!(c.slots.is_empty());
        assert_eq!(c.version, 3);
        assert_eq!(c.expired.len(), 1);
        assert!(!c.apply(del(9), now), "already gone");
        // Garbage under the prefix is ignored.
        let junk = Change::Put {
            key: "registry/x/b".into(),
            value: b"{".to_vec(),
            rev: 10,
        };
        assert!(!c.apply(junk, now));
        // A listing drops what the store no longer has.
        assert!(c.apply(put(11, 3), now));
        assert!(c.replace(Vec::new(), now));
        assert!(c.slots.is_empty());
    }
}
