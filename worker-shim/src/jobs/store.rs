//! Where job records live: a local embedded database (redb), so a restarted
//! shim knows its history and can tell which jobs it interrupted.
//!
//! Every state change is written through (one small transaction, fsynced by
//! redb) before it is visible in the API. The store is a trait so tests, and
//! later a shared store, can stand in.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::job::JobRecord;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");

/// A store failure, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("job store: {0}")]
pub struct StoreError(String);

fn err(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{what}: {e}"))
}

pub trait JobStore: Send + Sync {
    fn put(&self, rec: &JobRecord) -> Result<(), StoreError>;
    fn remove(&self, id: &str) -> Result<(), StoreError>;
    /// Every record, in submission order.
    fn load_all(&self) -> Result<Vec<JobRecord>, StoreError>;
}

/// The embedded default: one redb file.
pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    /// Opens (or creates) the store. A second shim on the same file is
    /// refused by redb's lock, with this error.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| err(&format!("creating {}", dir.display()), e))?;
        }
        let db = Database::create(path).map_err(|e| {
            err(
                &format!(
                    "opening {} (is another crank-shim using this store?)",
                    path.display()
                ),
                e,
            )
        })?;
        let tx = db.begin_write().map_err(|e| err("begin", e))?;
        tx.open_table(JOBS)
            .map_err(|e| err("creating the jobs table", e))?;
        tx.commit().map_err(|e| err("commit", e))?;
        Ok(RedbStore { db })
    }
}

impl JobStore for RedbStore {
    fn put(&self, rec: &JobRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(rec).map_err(|e| err("encoding", e))?;
        let tx = self.db.begin_write().map_err(|e| err("begin", e))?;
        {
            let mut t = tx.open_table(JOBS).map_err(|e| err("open", e))?;
            t.insert(rec.id.as_str(), bytes.as_slice())
                .map_err(|e| err("insert", e))?;
        }
        tx.commit().map_err(|e| err("commit", e))
    }

    fn remove(&self, id: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(|e| err("begin", e))?;
        {
            let mut t = tx.open_table(JOBS).map_err(|e| err("open", e))?;
            t.remove(id).map_err(|e| err("remove", e))?;
        }
        tx.commit().map_err(|e| err("commit", e))
    }

    fn load_all(&self) -> Result<Vec<JobRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| err("begin", e))?;
        let t = tx.open_table(JOBS).map_err(|e| err("open", e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| err("scan", e))? {
            let (k, v) = row.map_err(|e| err("scan", e))?;
            match serde_json::from_slice::<JobRecord>(v.value()) {
                Ok(rec) => out.push(rec),
                // A record this version cannot read is skipped, not fatal.
                Err(e) => {
                    tracing::warn!(job = k.value(), error = %e, "unreadable job record skipped")
                }
            }
        }
        out.sort_by_key(|r| r.seq);
        Ok(out)
    }
}

/// In memory, for tests.
#[derive(Default)]
pub struct MemoryStore {
    jobs: Mutex<HashMap<String, JobRecord>>,
}

impl JobStore for MemoryStore {
    fn put(&self, rec: &JobRecord) -> Result<(), StoreError> {
        self.jobs
            .lock()
            .unwrap()
            .insert(rec.id.clone(), rec.clone());
        Ok(())
    }
    fn remove(&self, id: &str) -> Result<(), StoreError> {
        self.jobs.lock().unwrap().remove(id);
        Ok(())
    }
    fn load_all(&self) -> Result<Vec<JobRecord>, StoreError> {
        let mut v: Vec<_> = self.jobs.lock().unwrap().values().cloned().collect();
        v.sort_by_key(|r| r.seq);
        Ok(v)
    }
}
