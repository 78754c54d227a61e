//! [`MemoryRegistry`]: the embedded registry, a map behind a mutex. It
//! forgets everything on restart; endpoints re-register when their next
//! heartbeat fails.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crank_api::mesh::EndpointRegistration;

use futures::FutureExt;

use super::{validate, Entry, LeaseId, Pending, Registry, RegistryError, Snapshot};

/// How many expired entries wait for [`Registry::expire`] to report them
/// before the oldest are dropped (only when nobody calls `expire`).
const MAX_PENDING_EXPIRED: usize = 1024;

/// The in-memory [`Registry`].
pub struct MemoryRegistry {
    inner: Mutex<Inner>,
}

impl MemoryRegistry {
    pub fn new() -> Self {
        Self::with_clock_anchor(Instant::now(), SystemTime::now())
    }

    /// A registry whose display times (`registered_at`, `last_heartbeat`)
    /// take `instant` to be `wall`. Tests use it to get exact times.
    pub fn with_clock_anchor(instant: Instant, wall: SystemTime) -> Self {
        Self {
            inner: Mutex::new(Inner {
                anchor: (instant, wall),
                by_address: HashMap::new(),
                by_lease: HashMap::new(),
                version: 0,
                expired: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every operation leaves the maps consistent before it can panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry for MemoryRegistry {
    fn register(
        &self,
        reg: EndpointRegistration,
        lease: Duration,
        now: Instant,
    ) -> Pending<'_, LeaseId> {
        futures::future::ready(MemoryRegistry::register(self, reg, lease, now)).boxed()
    }

    fn heartbeat<'a>(&'a self, lease: &'a LeaseId, now: Instant) -> Pending<'a, ()> {
        futures::future::ready(MemoryRegistry::heartbeat(self, lease, now)).boxed()
    }

    fn deregister<'a>(&'a self, lease: &'a LeaseId) -> Pending<'a, ()> {
        futures::future::ready(MemoryRegistry::deregister(self, lease)).boxed()
    }

    fn expire(&self, now: Instant) -> Vec<Entry> {
        let mut inner = self.lock();
        inner.purge(now);
        let mut expired: Vec<Entry> = inner.expired.drain(..).collect();
        expired.sort_by_key(|e| e.registration.address);
        expired
    }

    fn version(&self, now: Instant) -> u64 {
        let mut inner = self.lock();
        inner.purge(now);
        inner.version
    }

    fn snapshot(&self, now: Instant) -> Snapshot {
        let mut inner = self.lock();
        inner.purge(now);
        let mut entries: Vec<Entry> = inner
            .by_address
            .values()
            .map(|slot| inner.entry(slot, now))
            .collect();
        entries.sort_by_key(|e| e.registration.address);
        Snapshot {
            version: inner.version,
            entries,
        }
    }
}

/// The operations themselves, synchronous (the [`Registry`] impl wraps
/// them in ready futures).
impl MemoryRegistry {
    pub fn register(
        &self,
        reg: EndpointRegistration,
        lease: Duration,
        now: Instant,
    ) -> Result<LeaseId, RegistryError> {
        validate(&reg, lease)?;
        let mut inner = self.lock();
        inner.purge(now);
        let changed = match inner.by_address.remove(&reg.address) {
            Some(old) => {
                inner.by_lease.remove(&old.lease);
                old.registration != reg
            }
            None => true,
        };
        if changed {
            inner.version += 1;
        }
        let id = LeaseId::random();
        tracing::info!(
            address = %reg.address,
            identity = %reg.identity,
            lease_s = lease.as_secs(),
            changed,
            "endpoint registered"
        );
        inner.by_lease.insert(id.clone(), reg.address);
        inner.by_address.insert(
            reg.address,
            Slot {
                lease: id.clone(),
                registration: reg,
                duration: lease,
                registered_at: now,
                last_heartbeat: now,
                expires_at: now + lease,
            },
        );
        Ok(id)
    }

    pub fn heartbeat(&self, lease: &LeaseId, now: Instant) -> Result<(), RegistryError> {
        let mut inner = self.lock();
        let unknown = || RegistryError::UnknownLease(lease.clone());
        let address = *inner.by_lease.get(lease).ok_or_else(unknown)?;
        let slot = inner.by_address.get_mut(&address).ok_or_else(unknown)?;
        if slot.expires_at <= now {
            inner.remove_expired(address, now);
            return Err(unknown());
        }
        slot.last_heartbeat = now;
        slot.expires_at = now + slot.duration;
        Ok(())
    }

    pub fn deregister(&self, lease: &LeaseId) -> Result<(), RegistryError> {
        let mut inner = self.lock();
        let address = inner
            .by_lease
            .get(lease)
            .copied()
            .ok_or_else(|| RegistryError::UnknownLease(lease.clone()))?;
        if let Some(slot) = inner.remove(address) {
            tracing::info!(
                address = %address,
                identity = %slot.registration.identity,
                "endpoint deregistered"
            );
        }
        Ok(())
    }
}

struct Slot {
    lease: LeaseId,
    registration: EndpointRegistration,
    duration: Duration,
    registered_at: Instant,
    last_heartbeat: Instant,
    expires_at: Instant,
}

struct Inner {
    /// An instant and the wall-clock time it stands for (display only).
    anchor: (Instant, SystemTime),
    by_address: HashMap<SocketAddr, Slot>,
    by_lease: HashMap<LeaseId, SocketAddr>,
    version: u64,
    /// Removed on expiry, not yet returned by `expire`.
    expired: VecDeque<Entry>,
}

impl Inner {
    /// Removes the endpoint at `address` and bumps the version.
    fn remove(&mut self, address: SocketAddr) -> Option<Slot> {
        let slot = self.by_address.remove(&address)?;
        self.by_lease.remove(&slot.lease);
        self.version += 1;
        Some(slot)
    }

    /// Removes every endpoint whose lease ran out by `now`.
    fn purge(&mut self, now: Instant) {
        let expired: Vec<SocketAddr> = self
            .by_address
            .iter()
            .filter(|(_, slot)| slot.expires_at <= now)
            .map(|(address, _)| *address)
            .collect();
        for address in expired {
            self.remove_expired(address, now);
        }
    }

    /// Removes an expired endpoint and keeps it for `expire` to report.
    fn remove_expired(&mut self, address: SocketAddr, now: Instant) {
        let Some(slot) = self.remove(address) else {
            return;
        };
        tracing::info!(
            address = %address,
            identity = %slot.registration.identity,
            "endpoint lease expired"
        );
        if self.expired.len() == MAX_PENDING_EXPIRED {
            self.expired.pop_front();
            tracing::warn!("dropping an unreported expiry: nothing calls Registry::expire");
        }
        let entry = self.entry(&slot, now);
        self.expired.push_back(entry);
    }

    fn entry(&self, slot: &Slot, now: Instant) -> Entry {
        Entry {
            lease: slot.lease.clone(),
            registration: slot.registration.clone(),
            registered_at: self.wall(slot.registered_at),
            last_heartbeat: self.wall(slot.last_heartbeat),
            expires_in: slot.expires_at.saturating_duration_since(now),
        }
    }

    fn wall(&self, at: Instant) -> SystemTime {
        let (instant, wall) = self.anchor;
        match at.checked_duration_since(instant) {
            Some(after) => wall + after,
            None => wall.checked_sub(instant - at).unwrap_or(UNIX_EPOCH),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn reg(address: &str) -> EndpointRegistration {
        EndpointRegistration {
            address: address.parse().unwrap(),
            identity: "transcode.acme.crank.local".into(),
            capabilities: vec!["transcode:v1".into()],
            labels: BTreeMap::from([("gpu".into(), "nvidia".into())]),
        }
    }

    fn addresses(entries: &[Entry]) -> Vec<String> {
        entries
            .iter()
            .map(|e| e.registration.address.to_string())
            .collect()
    }

    fn setup() -> (MemoryRegistry, Instant) {
        let t0 = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        (MemoryRegistry::with_clock_anchor(t0, wall), t0)
    }

    #[test]
    fn register_then_snapshot() {
        let (r, t0) = setup();
        assert_eq!(r.snapshot(t0).version, 0);
        let lease = r.register(reg("10.0.0.1:8443"), 30 * SEC, t0).unwrap();
        let snap = r.snapshot(t0 + 5 * SEC);
        assert_eq!(snap.version, 1);
        assert_eq!(snap.entries.len(), 1);
        let e = &snap.entries[0];
        assert_eq!(e.lease, lease);
        assert_eq!(e.registration, reg("10.0.0.1:8443"));
        assert_eq!(e.expires_in, 25 * SEC);
        let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(unix(e.registered_at), 1_700_000_000);
        assert_eq!(unix(e.last_heartbeat), 1_700_000_000);
    }

    #[test]
    fn expiry_removes_exactly_the_expired_and_bumps_version() {
        let (r, t0) = setup();
        r.register(reg("10.0.0.1:8443"), 10 * SEC, t0).unwrap();
        r.register(reg("10.0.0.2:8443"), 30 * SEC, t0).unwrap();
        r.register(reg("10.0.0.3:8443"), 10 * SEC, t0 + 5 * SEC)
            .unwrap();
        assert_eq!(r.snapshot(t0).version, 3);

        assert!(r.expire(t0 + 9 * SEC).is_empty());
        assert_eq!(r.snapshot(t0 + 9 * SEC).version, 3);

        // A lease ends at exactly registration + duration.
        let gone = r.expire(t0 + 10 * SEC);
        assert_eq!(addresses(&gone), ["10.0.0.1:8443"]);
        assert_eq!(gone[0].expires_in, Duration::ZERO);
        let snap = r.snapshot(t0 + 10 * SEC);
        assert_eq!(snap.version, 4);
        assert_eq!(addresses(&snap.entries), ["10.0.0.2:8443", "10.0.0.3:8443"]);

        let gone = r.expire(t0 + 31 * SEC);
        assert_eq!(addresses(&gone), ["10.0.0.2:8443", "10.0.0.3:8443"]);
        let snap = r.snapshot(t0 + 31 * SEC);
        assert_eq!(snap.version, 6);
        assert!(snap.entries.is_empty());
        assert!(r.expire(t0 + 60 * SEC).is_empty(), "reported once");
    }

    #[test]
    fn heartbeat_extends_without_changing_version() {
        let (r, t0) = setup();
        let lease = r.register(reg("10.0.0.1:8443"), 10 * SEC, t0).unwrap();
        r.heartbeat(&lease, t0 + 8 * SEC).unwrap();
        let snap = r.snapshot(t0 + 17 * SEC);
        assert_eq!(snap.version, 1);
        assert_eq!(snap.entries[0].expires_in, SEC);
        assert_eq!(
            snap.entries[0]
                .last_heartbeat
                .duration_since(snap.entries[0].registered_at)
                .unwrap(),
            8 * SEC
        );
        assert!(r.expire(t0 + 17 * SEC).is_empty());
        assert_eq!(addresses(&r.expire(t0 + 18 * SEC)), ["10.0.0.1:8443"]);
    }

    #[test]
    fn heartbeat_on_expired_lease_errors_and_removes() {
        let (r, t0) = setup();
        let lease = r.register(reg("10.0.0.1:8443"), 10 * SEC, t0).unwrap();
        assert_eq!(
            r.heartbeat(&lease, t0 + 10 * SEC),
            Err(RegistryError::UnknownLease(lease.clone()))
        );
        let snap = r.snapshot(t0 + 10 * SEC);
        assert_eq!(snap.version, 2);
        assert!(snap.entries.is_empty());
        // The expiry is still reported, once.
        assert_eq!(addresses(&r.expire(t0 + 11 * SEC)), ["10.0.0.1:8443"]);
        assert!(r.heartbeat(&lease, t0 + 11 * SEC).is_err());
    }

    #[test]
    fn heartbeat_on_unknown_lease_errors() {
        let (r, t0) = setup();
        let bogus = LeaseId::new("00ff");
        assert_eq!(
            r.heartbeat(&bogus, t0),
            Err(RegistryError::UnknownLease(bogus.clone()))
        );
        assert_eq!(
            r.deregister(&bogus),
            Err(RegistryError::UnknownLease(bogus))
        );
        assert_eq!(r.snapshot(t0).version, 0);
    }

    #[test]
    fn snapshot_removes_expired_and_expire_still_reports_them() {
        let (r, t0) = setup();
        r.register(reg("10.0.0.1:8443"), 10 * SEC, t0).unwrap();
        assert_eq!(Registry::version(&r, t0), 1);
        // The version alone sees the expiry too (a watch asks only that).
        assert_eq!(Registry::version(&r, t0 + 10 * SEC), 2);
        let snap = r.snapshot(t0 + 10 * SEC);
        assert!(snap.entries.is_empty());
        assert_eq!(snap.version, 2, "same version means same entries");
        assert_eq!(addresses(&r.expire(t0 + 10 * SEC)), ["10.0.0.1:8443"]);
    }

    #[test]
    fn deregister_is_immediate() {
        let (r, t0) = setup();
        let lease = r.register(reg("10.0.0.1:8443"), 30 * SEC, t0).unwrap();
        r.register(reg("10.0.0.2:8443"), 30 * SEC, t0).unwrap();
        r.deregister(&lease).unwrap();
        let snap = r.snapshot(t0);
        assert_eq!(snap.version, 3);
        assert_eq!(addresses(&snap.entries), ["10.0.0.2:8443"]);
        assert!(r.deregister(&lease).is_err());
        assert!(r.heartbeat(&lease, t0).is_err());
        assert!(r.expire(t0 + 60 * SEC).len() == 1, "only 10.0.0.2 expires");
    }

    #[test]
    fn reregistering_an_address_replaces_it() {
        let (r, t0) = setup();
        let old = r.register(reg("10.0.0.1:8443"), 10 * SEC, t0).unwrap();
        let mut changed = reg("10.0.0.1:8443");
        changed.labels.insert("zone".into(), "eu-1".into());
        let new = r.register(changed.clone(), 30 * SEC, t0 + 5 * SEC).unwrap();
        assert_ne!(old, new);
        assert!(r.heartbeat(&old, t0 + 6 * SEC).is_err());
        r.heartbeat(&new, t0 + 6 * SEC).unwrap();

        let snap = r.snapshot(t0 + 20 * SEC);
        assert_eq!(snap.version, 2);
        assert_eq!(snap.entries.len(), 1);
        assert_eq!(snap.entries[0].registration, changed);
        assert_eq!(snap.entries[0].lease, new);
        assert!(r.expire(t0 + 20 * SEC).is_empty(), "the old lease is gone");
    }

    #[test]
    fn reregistering_the_same_data_keeps_the_version() {
        let (r, t0) = setup();
        let old = r.register(reg("10.0.0.1:8443"), 10 * SEC, t0).unwrap();
        let new = r
            .register(reg("10.0.0.1:8443"), 10 * SEC, t0 + SEC)
            .unwrap();
        assert_ne!(old, new);
        let snap = r.snapshot(t0 + SEC);
        assert_eq!(snap.version, 1);
        assert_eq!(snap.entries[0].lease, new);
        assert!(r.heartbeat(&old, t0 + 2 * SEC).is_err());
    }

    #[test]
    fn invalid_registration_changes_nothing() {
        let (r, t0) = setup();
        let mut bad = reg("10.0.0.1:8443");
        bad.capabilities.clear();
        match r.register(bad, 30 * SEC, t0) {
            Err(RegistryError::Invalid { field, .. }) => assert_eq!(field, "capabilities"),
            other => panic!("expected Invalid, got {other:?}"),
        }
        assert!(matches!(
            r.register(reg("10.0.0.1:8443"), 10 * 60 * SEC, t0),
            Err(RegistryError::Invalid { field, .. }) if field == "lease"
        ));
        let snap = r.snapshot(t0);
        assert_eq!(snap.version, 0);
        assert!(snap.entries.is_empty());
    }

    #[test]
    fn unreported_expiries_are_bounded() {
        let (r, t0) = setup();
        for i in 0..=MAX_PENDING_EXPIRED {
            let address = format!("10.0.{}.{}:8443", i / 256, i % 256);
            r.register(reg(&address), SEC, t0).unwrap();
        }
        assert!(r.snapshot(t0 + SEC).entries.is_empty());
        assert_eq!(r.expire(t0 + SEC).len(), MAX_PENDING_EXPIRED);
    }

    #[test]
    fn usable_as_a_shared_trait_object() {
        let (r, t0) = setup();
        let shared: Arc<dyn Registry> = Arc::new(r);
        let lease = shared
            .register(reg("10.0.0.1:8443"), SEC, t0)
            .now_or_never()
            .unwrap()
            .unwrap();
        let other = Arc::clone(&shared);
        std::thread::spawn(move || other.heartbeat(&lease, t0).now_or_never().unwrap().unwrap())
            .join()
            .unwrap();
        assert_eq!(shared.snapshot(t0).entries.len(), 1);
    }
}
