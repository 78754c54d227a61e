//! The endpoint registry: which endpoints are live, under which lease, and
//! how a route's backends resolve to weighted endpoints.
//!
//! - [`Registry`] is the small interface the control plane talks to.
//!   [`MemoryRegistry`] is the embedded default (`store: file`);
//!   [`StoreRegistry`] keeps registrations in the store under leases
//!   (`store: etcd`), so every replica serves every registration.
//! - [`resolve`] is a pure function from a [`MeshRoute`](crank_api::mesh::MeshRoute)
//!   and the live entries to weighted endpoints, tested as a table.
//!
//! Every operation that depends on time takes `now: Instant` explicitly:
//! callers pass `Instant::now()`, tests pass `t0 + 30s` and never sleep.
//! Reads ([`Registry::snapshot`], [`Registry::expire`]) are synchronous
//! (the store-backed registry answers them from its watched cache); writes
//! return futures, since on etcd they are a round trip.
//!
//! ## Leases
//!
//! An endpoint registers with a lease duration (1 s to 5 min) and gets a
//! [`LeaseId`]. It renews the lease with [`Registry::heartbeat`] before the
//! duration runs out; when the lease is unknown or has expired, the
//! heartbeat fails with [`RegistryError::UnknownLease`] and the endpoint
//! registers again. The address is the endpoint's key: registering an
//! address that is already present replaces that endpoint (its old lease
//! stops working).
//!
//! ## Versions
//!
//! A [`Snapshot`] carries a `version` that goes up whenever the set of
//! registrations changes: a new address, a registration whose data changed,
//! a deregistration, an expiry. A heartbeat, or registering the same data
//! again, leaves it alone, so watchers that push config on a new version
//! are not woken by renewals. Equal versions mean equal registrations; lease
//! ids and timestamps may differ. The version is per replica (a count of
//! the changes it saw); proxies never see it: the mesh watch compares a
//! fingerprint of each proxy's resolved endpoints, which is the same on
//! every replica that holds the same registrations.

#[doc(hidden)]
pub mod conformance;
mod memory;
mod resolve;
mod store;
mod types;
mod validate;

use std::time::{Duration, Instant};

use crank_api::mesh::EndpointRegistration;
use futures::future::BoxFuture;

pub use memory::MemoryRegistry;
pub use resolve::{matches, resolve, Resolved, WeightedEndpoint};
pub use store::StoreRegistry;
pub use types::{Entry, LeaseId, RegistryError, Snapshot};
pub use validate::{validate, MAX_LEASE, MIN_LEASE};

/// The registry for the store crank-control opened: in memory without a
/// shared store (`store: file`, one process), on the store's leases with
/// one (`store: etcd`, every replica shares it). Fails when the store does
/// not answer.
pub async fn open(
    shared: Option<std::sync::Arc<dyn crate::store::Store>>,
) -> Result<std::sync::Arc<dyn Registry>, RegistryError> {
    Ok(match shared {
        None => std::sync::Arc::new(MemoryRegistry::new()),
        Some(store) => std::sync::Arc::new(StoreRegistry::start(store).await?),
    })
}

/// What a registry write returns.
pub type Pending<'a, T> = BoxFuture<'a, Result<T, RegistryError>>;

/// The registry's operations. Implementations serialise them (each is
/// atomic) and are shared as `Arc<dyn Registry>`.
pub trait Registry: Send + Sync {
    /// Adds the endpoint, or replaces the one at the same address (new
    /// lease, new data). Fails with [`RegistryError::Invalid`] when the
    /// registration or the lease duration is invalid (see [`validate`]).
    fn register(
        &self,
        reg: EndpointRegistration,
        lease: Duration,
        now: Instant,
    ) -> Pending<'_, LeaseId>;

    /// Renews the lease for its full duration from `now`. Fails with
    /// [`RegistryError::UnknownLease`] when the lease is unknown or has
    /// expired; the caller then registers again.
    fn heartbeat<'a>(&'a self, lease: &'a LeaseId, now: Instant) -> Pending<'a, ()>;

    /// Removes the endpoint at once. Fails with
    /// [`RegistryError::UnknownLease`] when no endpoint holds the lease.
    fn deregister<'a>(&'a self, lease: &'a LeaseId) -> Pending<'a, ()>;

    /// Removes the endpoints whose lease has run out by `now` and returns
    /// them, together with any that an earlier call (such as
    /// [`Registry::snapshot`]) found expired and removed: each expiry is
    /// reported once. Call it periodically (every second or so) to log
    /// expiries and wake watchers.
    fn expire(&self, now: Instant) -> Vec<Entry>;

    /// The live entries at `now`, sorted by address, and the version.
    fn snapshot(&self, now: Instant) -> Snapshot;

    /// The version [`Registry::snapshot`] would return at `now`, without
    /// copying the entries (a watch asks on every request).
    fn version(&self, now: Instant) -> u64;

    /// Wakes on changes made elsewhere (another replica's registration, a
    /// lease the store expired); `None` where every change goes through
    /// this process's own calls.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// The registrations outlive this process (they are in a shared
    /// store): after a restart there is no need to wait for workloads to
    /// register again.
    fn survives_restart(&self) -> bool {
        false
    }
}
