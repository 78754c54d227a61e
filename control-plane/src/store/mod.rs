//! Where the control plane keeps what must survive a replica: versioned
//! documents with compare-and-swap, watches, leases and leader election.
//!
//! Two implementations: [`FileStore`] (one process, a state directory, leases
//! in memory; the default) and [`EtcdStore`] (etcd v3, for replicas). The
//! CA state, published versions and the registry move onto this interface
//! in the next step of issue #15 (docs/architecture.md, "Control plane state
//! on etcd").

mod config;
#[doc(hidden)]
pub mod conformance;
mod election;
mod etcd;
mod file;
pub mod seal;

use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;

pub use config::{EtcdSettings, EtcdTls, StoreSettings};
pub use election::{campaign, leader, observe, Leadership};
pub use etcd::EtcdStore;
pub use file::FileStore;

/// A document's revision: the store revision of its last write. 0 means
/// "absent" in [`Store::put_if`].
pub type Rev = i64;

/// A document's value and revision.
pub type Versioned = (Vec<u8>, Rev);

/// A key under a listed prefix, with its value and revision.
pub type Listed = (String, Vec<u8>, Rev);

/// A lease: keys put with it disappear when it is not kept alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

/// A change seen by [`Store::watch`]; keys are relative to the store's prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put {
        key: String,
        value: Vec<u8>,
        rev: Rev,
    },
    Delete {
        key: String,
        rev: Rev,
    },
}

impl Change {
    pub fn key(&self) -> &str {
        match self {
            Change::Put { key, .. } | Change::Delete { key, .. } => key,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The compare-and-swap lost: someone wrote the key since `expected`.
    #[error(
        "{key} changed: expected revision {expected}, found {actual} (read it again and retry)"
    )]
    Conflict {
        key: String,
        expected: Rev,
        actual: Rev,
    },
    #[error("lease {0} expired or was revoked; grant a new one")]
    LeaseGone(i64),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("state file {path}: {message}")]
    File { path: String, message: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A stream of changes under a prefix; it ends when the store goes away.
pub type ChangeStream = BoxStream<'static, Change>;

/// The store interface. Object-safe: the server holds an `Arc<dyn Store>`.
pub trait Store: Send + Sync + 'static {
    /// The value and revision of `key`, or `None` if absent.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Versioned>>>;
    /// Every key under `prefix`, sorted, with value and revision.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<Listed>>>;
    /// Writes `key` only if its revision is still `expected` (0: only if
    /// absent); with a lease the key goes away with it. Returns the new revision.
    fn put_if<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        expected: Rev,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'a, Result<Rev>>;
    /// Like [`Store::put_if`] (no lease), and only while `guard` is still at
    /// revision `guard_rev`, in one transaction: the election key this
    /// leader wrote (a deposed leader cannot publish), or the `ca/state`
    /// revision whose deny list was consulted (a stale copy cannot issue).
    /// A lost guard is a [`StoreError::Conflict`] naming `guard`.
    fn put_if_guarded<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        expected: Rev,
        guard: &'a str,
        guard_rev: Rev,
    ) -> BoxFuture<'a, Result<Rev>>;
    /// Deletes `key` only if its revision is still `expected`.
    fn delete_if<'a>(&'a self, key: &'a str, expected: Rev) -> BoxFuture<'a, Result<()>>;
    /// Changes under `prefix` from now on. The watch is in place when this returns.
    fn watch<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<ChangeStream>>;
    /// A lease that expires `ttl` after its last keep-alive.
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId>>;
    /// Refreshes the lease; [`StoreError::LeaseGone`] once it has expired.
    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<()>>;
    /// Ends the lease now; its keys go away.
    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<()>>;
}

/// Writes `value` at `key` if it is absent, with `lease`; see [`Store::put_if`].
pub async fn put_with_lease(
    store: &dyn Store,
    key: &str,
    value: Vec<u8>,
    lease: LeaseId,
) -> Result<Rev> {
    store.put_if(key, value, 0, Some(lease)).await
}

/// Opens the store the config names.
pub async fn open(
    settings: &StoreSettings,
    state_dir: &std::path::Path,
) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    Ok(match settings {
        StoreSettings::File {} => std::sync::Arc::new(FileStore::open(state_dir)?),
        StoreSettings::Etcd(e) => std::sync::Arc::new(EtcdStore::connect(e).await?),
    })
}

#[cfg(test)]
mod tests;
