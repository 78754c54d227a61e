//! The audit log: every mutation through the admin API (tokens,
//! revocation, rotation), every refused admin call and every published or
//! refused config version, as one [`AuditEntry`] each. Stored behind
//! [`AuditLog`]; the embedded default is [`JsonlAudit`], `audit.jsonl` in
//! the state directory with bounded retention; with `store: etcd`,
//! [`StoreAudit`] keeps every replica's entries in the store as well.
//! Entries never hold secrets
//! (no token values, no keys).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// One audited event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Unix seconds.
    pub time: i64,
    /// `x-request-id` of the admin call; `config-<hash prefix>` for config versions.
    pub request_id: String,
    /// The client certificate's identity, `unix-socket:uid N`, or `config-dir`.
    pub identity: String,
    /// The caller's role (`viewer`, `operator`, `admin`, `root` over the socket), if any.
    pub role: Option<String>,
    /// `token.create`, `cert.revoke`, `ca.rotate`, `config.publish`, or `METHOD path` of a refused read.
    pub action: String,
    /// What it acted on: an identity, a serial, a rotation kind, a config version.
    pub target: String,
    /// `ok` or `refused`.
    pub result: String,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Which entries a query wants.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Entries at or after this Unix time.
    pub since: Option<i64>,
    /// Entries with exactly this action.
    pub action: Option<String>,
}

impl AuditQuery {
    fn matches(&self, e: &AuditEntry) -> bool {
        self.since.is_none_or(|s| e.time >= s)
            && self.action.as_ref().is_none_or(|a| *a == e.action)
    }
}

/// Where audit entries live (swappable for a shared store).
pub trait AuditLog: Send + Sync {
    fn append(&self, entry: AuditEntry);
    /// Matching entries, oldest first.
    fn query(&self, q: &AuditQuery) -> Vec<AuditEntry>;
}

/// How much history is kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_entries: usize,
    pub max_age_secs: i64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_entries: 10_000,
            max_age_secs: 30 * 24 * 3600,
        }
    }
}

/// `audit.jsonl`: appended line by line; compacted to the retention when
/// opened and whenever it grew by a tenth of `max_entries`.
pub struct JsonlAudit {
    path: PathBuf,
    retention: Retention,
    inner: Mutex<Vec<AuditEntry>>,
}

impl JsonlAudit {
    /// Opens (or starts) `state_dir/audit.jsonl`; unreadable lines are skipped.
    pub fn open(state_dir: &Path, retention: Retention, now: i64) -> Self {
        let path = state_dir.join("audit.jsonl");
        let entries = std::fs::File::open(&path)
            .map(|f| {
                std::io::BufReader::new(f)
                    .lines()
                    .map_while(Result::ok)
                    .filter_map(|l| serde_json::from_str(&l).ok())
                    .collect()
            })
            .unwrap_or_default();
        let log = JsonlAudit {
            path,
            retention,
            inner: Mutex::new(entries),
        };
        log.compact(&mut log.entries(), now);
        log
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<AuditEntry>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops entries past the retention and rewrites the file.
    fn compact(&self, entries: &mut Vec<AuditEntry>, now: i64) {
        let oldest = now - self.retention.max_age_secs;
        entries.retain(|e| e.time >= oldest);
        let over = entries.len().saturating_sub(self.retention.max_entries);
        entries.drain(..over);
        let mut text = Vec::new();
        for e in entries.iter() {
            let _ = serde_json::to_writer(&mut text, e);
            text.push(b'\n');
        }
        if let Err(e) = super::write_atomic(&self.path, &text, true) {
            tracing::error!(error = %format!("{e:#}"), file = %self.path.display(), "cannot compact the audit log");
        }
    }
}

impl AuditLog for JsonlAudit {
    fn append(&self, entry: AuditEntry) {
        let mut entries = self.entries();
        let now = entry.time;
        let line = serde_json::to_string(&entry).unwrap_or_default();
        entries.push(entry);
        if entries.len() > self.retention.max_entries + self.retention.max_entries / 10 {
            self.compact(&mut entries, now);
            return;
        }
        let written = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            tracing::error!(error = %e, file = %self.path.display(), "cannot append to the audit log; the entry is kept in memory only");
        }
    }

    fn query(&self, q: &AuditQuery) -> Vec<AuditEntry> {
        self.entries()
            .iter()
            .filter(|e| q.matches(e))
            .cloned()
            .collect()
    }
}

/// The audit log on a shared store (`store: etcd`): every replica's
/// entries as keys `audit/<time>-<id>`, so `GET /v1/admin/audit` on any
/// replica shows them all; read from a copy a watch keeps current. This
/// replica's own entries also go to its `audit.jsonl`, as without a store.
/// The leader prunes the keys to the same retention.
pub struct StoreAudit {
    local: JsonlAudit,
    store: std::sync::Arc<dyn crate::store::Store>,
    cache: std::sync::Arc<Mutex<Cached>>,
}

/// key -> (entry, revision; 0 until the watch sees our own write).
type Cached = std::collections::BTreeMap<String, (AuditEntry, crate::store::Rev)>;

const AUDIT_PREFIX: &str = "audit/";

impl StoreAudit {
    /// Loads the entries in the store and starts the watch and the
    /// leader's pruning.
    pub async fn open(
        local: JsonlAudit,
        store: std::sync::Arc<dyn crate::store::Store>,
        leading: tokio::sync::watch::Receiver<bool>,
        retention: Retention,
    ) -> Self {
        let cache: std::sync::Arc<Mutex<Cached>> = std::sync::Arc::default();
        let (ready, listed) = tokio::sync::oneshot::channel();
        tokio::spawn(follow(store.clone(), cache.clone(), Some(ready)));
        tokio::spawn(prune(store.clone(), cache.clone(), leading, retention));
        // The first listing (after the watch is in place), or the first failure.
        let _ = listed.await;
        StoreAudit {
            local,
            store,
            cache,
        }
    }
}

fn lock(m: &Mutex<Cached>) -> std::sync::MutexGuard<'_, Cached> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes `cache` what the store listed: entries the store no longer has
/// go (pruned or deleted while the watch was down); this replica's own
/// writes the store has not confirmed yet (revision 0) stay.
fn resync(cache: &mut Cached, listed: Vec<crate::store::Listed>) {
    let mut fresh = Cached::new();
    for (k, v, rev) in listed {
        if let Ok(e) = serde_json::from_slice(&v) {
            fresh.insert(k, (e, rev));
        }
    }
    for (k, (e, rev)) in std::mem::take(cache) {
        if rev == 0 && !fresh.contains_key(&k) {
            fresh.insert(k, (e, 0));
        }
    }
    *cache = fresh;
}

/// Keeps `cache` equal to `audit/` in the store: the watch first, then a
/// full listing (so nothing written in between is missed), and both again
/// whenever the watch ends. `ready` hears after the first listing.
async fn follow(
    store: std::sync::Arc<dyn crate::store::Store>,
    cache: std::sync::Arc<Mutex<Cached>>,
    mut ready: Option<tokio::sync::oneshot::Sender<()>>,
) {
    use futures::StreamExt;
    loop {
        if let Ok(mut changes) = store.watch(AUDIT_PREFIX).await {
            match store.list(AUDIT_PREFIX).await {
                Ok(listed) => resync(&mut lock(&cache), listed),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the audit log in the store; watching again")
                }
            }
            if let Some(r) = ready.take() {
                let _ = r.send(());
            }
            while let Some(c) = changes.next().await {
                match c {
                    crate::store::Change::Put { key, value, rev } => {
                        if let Ok(e) = serde_json::from_slice(&value) {
                            lock(&cache).insert(key, (e, rev));
                        }
                    }
                    crate::store::Change::Delete { key, .. } => {
                        lock(&cache).remove(&key);
                    }
                }
            }
        }
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// Removes from `cache` the entries past `retention` at `now` (the oldest
/// beyond `max_entries`, and those older than `max_age_secs`); returns
/// their keys and revisions.
fn trim(cache: &mut Cached, retention: Retention, now: i64) -> Vec<(String, crate::store::Rev)> {
    let oldest = now - retention.max_age_secs;
    let over = cache.len().saturating_sub(retention.max_entries);
    let gone: Vec<(String, crate::store::Rev)> = cache
        .iter()
        .enumerate()
        .filter(|(i, (_, (e, _)))| *i < over || e.time < oldest)
        .map(|(_, (k, (_, rev)))| (k.clone(), *rev))
        .collect();
    for (k, _) in &gone {
        cache.remove(k);
    }
    gone
}

/// Every minute: drops entries past the retention from this replica's
/// copy and, while this replica leads, deletes them from the store.
async fn prune(
    store: std::sync::Arc<dyn crate::store::Store>,
    cache: std::sync::Arc<Mutex<Cached>>,
    leading: tokio::sync::watch::Receiver<bool>,
    retention: Retention,
) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        every.tick().await;
        let gone = trim(&mut lock(&cache), retention, super::now());
        if !*leading.borrow() {
            continue;
        }
        for (key, rev) in gone.into_iter().filter(|(_, rev)| *rev > 0) {
            let _ = store.delete_if(&key, rev).await;
        }
    }
}

impl AuditLog for StoreAudit {
    fn append(&self, entry: AuditEntry) {
        self.local.append(entry.clone());
        let key = format!("{AUDIT_PREFIX}{:012}-{}", entry.time.max(0), request_id());
        let bytes = serde_json::to_vec(&entry).unwrap_or_default();
        lock(&self.cache).entry(key.clone()).or_insert((entry, 0));
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.put_if(&key, bytes, 0, None).await {
                tracing::error!(error = %e, "cannot write an audit entry to the store; it is in this replica's audit.jsonl");
            }
        });
    }

    fn query(&self, q: &AuditQuery) -> Vec<AuditEntry> {
        lock(&self.cache)
            .values()
            .filter(|(e, _)| q.matches(e))
            .map(|(e, _)| e.clone())
            .collect()
    }
}

/// A new request id: 16 random hex digits.
pub fn request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(time: i64, action: &str) -> AuditEntry {
        AuditEntry {
            time,
            request_id: request_id(),
            identity: "alice.ops.mesh.local".into(),
            role: Some("admin".into()),
            action: action.into(),
            target: "x".into(),
            result: "ok".into(),
            reason: None,
        }
    }

    #[test]
    fn entries_survive_a_reopen_and_queries_filter_by_time_and_action() {
        let d = tempfile::tempdir().unwrap();
        let log = JsonlAudit::open(d.path(), Retention::default(), 1000);
        log.append(entry(1000, "cert.revoke"));
        log.append(entry(2000, "token.create"));
        log.append(entry(3000, "cert.revoke"));
        let log = JsonlAudit::open(d.path(), Retention::default(), 3000);
        assert_eq!(log.query(&AuditQuery::default()).len(), 3);
        let q = AuditQuery {
            since: Some(2000),
            action: Some("cert.revoke".into()),
        };
        let got = log.query(&q);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].time, 3000);
        let text = std::fs::read_to_string(d.path().join("audit.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 3, "one JSON line per entry");
    }

    #[test]
    fn a_listing_after_a_rewatch_drops_what_the_store_lost_and_keeps_unconfirmed_writes() {
        let mut cache = Cached::new();
        cache.insert("audit/1-a".into(), (entry(1, "cert.revoke"), 5));
        cache.insert("audit/2-b".into(), (entry(2, "token.create"), 0));
        let listed = vec![(
            "audit/3-c".to_string(),
            serde_json::to_vec(&entry(3, "ca.rotate")).unwrap(),
            9,
        )];
        resync(&mut cache, listed);
        let keys: Vec<&str> = cache.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["audit/2-b", "audit/3-c"],
            "pruned while the watch was down"
        );
        let r = Retention {
            max_entries: 1,
            max_age_secs: 100,
        };
        let gone = trim(&mut cache, r, 50);
        assert_eq!(gone, [("audit/2-b".to_string(), 0)]);
        assert_eq!(cache.len(), 1, "every replica trims its copy");
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_audit_opened_late_lists_entries_written_before() {
        let store: std::sync::Arc<dyn crate::store::Store> =
            std::sync::Arc::new(crate::store::FileStore::in_memory());
        let t = super::super::now();
        let bytes = serde_json::to_vec(&entry(t, "cert.revoke")).unwrap();
        store.put_if("audit/1-x", bytes, 0, None).await.unwrap();
        let d = tempfile::tempdir().unwrap();
        let local = JsonlAudit::open(d.path(), Retention::default(), t);
        let (_tx, leading) = tokio::sync::watch::channel(false);
        let log = StoreAudit::open(local, store, leading, Retention::default()).await;
        assert_eq!(log.query(&AuditQuery::default()).len(), 1);
    }

    #[test]
    fn retention_keeps_the_newest_entries_within_the_age() {
        let d = tempfile::tempdir().unwrap();
        let r = Retention {
            max_entries: 10,
            max_age_secs: 100,
        };
        let log = JsonlAudit::open(d.path(), r, 0);
        for t in 0..30 {
            log.append(entry(t, "cert.revoke"));
        }
        let kept = log.query(&AuditQuery::default());
        assert!(kept.len() <= 11, "bounded: {}", kept.len());
        assert_eq!(kept.last().unwrap().time, 29, "the newest is kept");
        // Reopened much later: everything older than max_age goes.
        let log = JsonlAudit::open(d.path(), r, 125);
        let kept = log.query(&AuditQuery::default());
        assert!(kept.iter().all(|e| e.time >= 25), "{kept:?}");
        assert_eq!(kept.len(), 5);
        let text = std::fs::read_to_string(d.path().join("audit.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 5, "the file is compacted too");
    }
}
