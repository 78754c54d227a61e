//! The file store: one process, documents in `<state_dir>/store.json`
//! (written whole, atomically, on every change), leases and the keys put
//! with them in memory only (they die with the process, like its registry).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::{Change, ChangeStream, LeaseId, Listed, Result, Rev, Store, StoreError, Versioned};

pub struct FileStore {
    inner: Arc<Mutex<Inner>>,
    changes: broadcast::Sender<Change>,
    path: Option<PathBuf>,
}

#[derive(Default, Serialize, Deserialize)]
struct Persisted {
    rev: Rev,
    docs: BTreeMap<String, Doc>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Doc {
    value: Vec<u8>,
    rev: Rev,
    #[serde(skip)]
    lease: Option<i64>,
}

#[derive(Default)]
struct Inner {
    data: Persisted,
    next_lease: i64,
    /// Lease id → its deadline and ttl.
    leases: HashMap<i64, (Instant, Duration)>,
}

impl FileStore {
    /// The store in `state_dir/store.json` (created on first write).
    pub fn open(state_dir: &Path) -> Result<FileStore> {
        let path = state_dir.join("store.json");
        let data = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| file_error(&path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted::default(),
            Err(e) => return Err(file_error(&path, e)),
        };
        Ok(FileStore::with(data, Some(path)))
    }

    /// A store that writes nothing to disk (tests, and `crankctl check`).
    pub fn in_memory() -> FileStore {
        FileStore::with(Persisted::default(), None)
    }

    fn with(data: Persisted, path: Option<PathBuf>) -> FileStore {
        let inner = Inner {
            data,
            next_lease: 1,
            leases: HashMap::new(),
        };
        FileStore {
            inner: Arc::new(Mutex::new(inner)),
            changes: broadcast::channel(1024).0,
            path,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the documents that carry no lease; called with the lock held
    /// so that writes reach the file in revision order.
    fn persist(&self, inner: &Inner) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let durable = Persisted {
            rev: inner.data.rev,
            docs: inner
                .data
                .docs
                .iter()
                .filter(|(_, d)| d.lease.is_none())
                .map(|(k, d)| (k.clone(), d.clone()))
                .collect(),
        };
        let bytes = serde_json::to_vec(&durable).map_err(|e| file_error(path, e))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| file_error(path, e))
    }

    fn delete_lease_keys(&self, lease: i64) {
        let mut inner = self.lock();
        inner.leases.remove(&lease);
        let keys: Vec<String> = inner
            .data
            .docs
            .iter()
            .filter(|(_, d)| d.lease == Some(lease))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            inner.data.rev += 1;
            inner.data.docs.remove(&key);
            let _ = self.changes.send(Change::Delete {
                key,
                rev: inner.data.rev,
            });
        }
    }
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn conflict(key: &str, expected: Rev, actual: Rev) -> StoreError {
    StoreError::Conflict {
        key: key.to_string(),
        expected,
        actual,
    }
}

impl FileStore {
    /// One write under the lock: `key` at `expected`, and `guard` at its
    /// revision when given.
    fn write(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Rev,
        lease: Option<LeaseId>,
        guard: Option<(&str, Rev)>,
    ) -> Result<Rev> {
        let mut inner = self.lock();
        if let Some((guard, guard_rev)) = guard {
            let actual = inner.data.docs.get(guard).map_or(0, |d| d.rev);
            if actual != guard_rev {
                return Err(conflict(guard, guard_rev, actual));
            }
        }
        let actual = inner.data.docs.get(key).map_or(0, |d| d.rev);
        if actual != expected {
            return Err(conflict(key, expected, actual));
        }
        if let Some(l) = lease {
            if !inner.leases.contains_key(&l.0) {
                return Err(StoreError::LeaseGone(l.0));
            }
        }
        inner.data.rev += 1;
        let rev = inner.data.rev;
        let doc = Doc {
            value: value.clone(),
            rev,
            lease: lease.map(|l| l.0),
        };
        inner.data.docs.insert(key.to_string(), doc);
        self.persist(&inner)?;
        let _ = self.changes.send(Change::Put {
            key: key.to_string(),
            value,
            rev,
        });
        Ok(rev)
    }
}

impl Store for FileStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Versioned>>> {
        let found = self
            .lock()
            .data
            .docs
            .get(key)
            .map(|d| (d.value.clone(), d.rev));
        async move { Ok(found) }.boxed()
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<Listed>>> {
        let inner = self.lock();
        let found = inner
            .data
            .docs
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, d)| (k.clone(), d.value.clone(), d.rev))
            .collect();
        async move { Ok(found) }.boxed()
    }

    fn put_if<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        expected: Rev,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'a, Result<Rev>> {
        let result = self.write(key, value, expected, lease, None);
        async move { result }.boxed()
    }

    fn put_if_guarded<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        expected: Rev,
        guard: &'a str,
        guard_rev: Rev,
    ) -> BoxFuture<'a, Result<Rev>> {
        let result = self.write(key, value, expected, None, Some((guard, guard_rev)));
        async move { result }.boxed()
    }

    fn delete_if<'a>(&'a self, key: &'a str, expected: Rev) -> BoxFuture<'a, Result<()>> {
        let result = (|| {
            let mut inner = self.lock();
            let actual = inner.data.docs.get(key).map_or(0, |d| d.rev);
            if actual != expected || actual == 0 {
                return Err(conflict(key, expected, actual));
            }
            inner.data.rev += 1;
            inner.data.docs.remove(key);
            self.persist(&inner)?;
            let _ = self.changes.send(Change::Delete {
                key: key.to_string(),
                rev: inner.data.rev,
            });
            Ok(())
        })();
        async move { result }.boxed()
    }

    fn watch<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<ChangeStream>> {
        let rx = self.changes.subscribe();
        let prefix = prefix.to_string();
        // A watcher too slow to keep up (lagged) sees its stream end and
        // restarts from a fresh read, as after an etcd compaction.
        let stream =
            futures::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.ok().map(|c| (c, rx)) },
            )
            .filter(move |c| futures::future::ready(c.key().starts_with(&prefix)));
        async move { Ok(stream.boxed()) }.boxed()
    }

    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId>> {
        let id = {
            let mut inner = self.lock();
            let id = inner.next_lease;
            inner.next_lease += 1;
            inner.leases.insert(id, (Instant::now() + ttl, ttl));
            id
        };
        let reaper = FileStore {
            inner: self.inner.clone(),
            changes: self.changes.clone(),
            path: self.path.clone(),
        };
        tokio::spawn(async move {
            loop {
                let deadline = reaper.lock().leases.get(&id).map(|l| l.0);
                let Some(deadline) = deadline else { return };
                if deadline <= Instant::now() {
                    reaper.delete_lease_keys(id);
                    return;
                }
                tokio::time::sleep_until(deadline).await;
            }
        });
        async move { Ok(LeaseId(id)) }.boxed()
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<()>> {
        let result = {
            let mut inner = self.lock();
            let now = Instant::now();
            match inner.leases.get_mut(&lease.0) {
                Some((deadline, ttl)) if *deadline > now => {
                    *deadline = now + *ttl;
                    Ok(())
                }
                _ => Err(StoreError::LeaseGone(lease.0)),
            }
        };
        async move { result }.boxed()
    }

    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<()>> {
        self.delete_lease_keys(lease.0);
        async { Ok(()) }.boxed()
    }
}
