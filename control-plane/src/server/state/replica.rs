//! crank-control as one replica of several sharing a store (`store: {etcd:
//! ...}`): opening the CA state from the store (seeding it on the very
//! first start), compare-and-swap changes with retry, the watches that keep
//! this replica's in-memory copy current, leader election, and publishing
//! config versions as leader. Without a shared store none of this runs and
//! [`Control::change`] is today's lock, change, save to `state.json`.
//!
//! Keys (under `store.etcd.prefix`): see [`super::shared`] for `ca/...`;
//! `mesh/version` is the published version (authenticated under the KEK),
//! written only by the leader in one transaction that checks both the
//! revision it read the current `seq` from and its own election key, so
//! `seq` is monotonic, never published twice across a failover, and a
//! deposed leader cannot publish; `elections/control` says who leads.
//!
//! A leaf is recorded in `ca/inventory/` in a transaction that checks
//! `ca/state` is still at the revision whose deny list was consulted: a
//! stale or cut-off replica cannot renew a revoked certificate, and a leaf
//! that cannot be recorded is never handed out (503).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;

use super::shared::{self, CA_PREFIX, CORE_KEY, INVENTORY_PREFIX, MESH_KEY, REPORTS_PREFIX};
use super::{CaState, Issued, Refusal, Report};
use crate::server::config::ControlConfig;
use crate::server::mesh::Published;
use crate::server::{now, Control};
use crate::store::seal::Kek;
use crate::store::{Change, Rev, Store, StoreError};

/// The election every replica joins.
pub const ELECTION: &str = "control";

/// How often a change is retried after losing a compare-and-swap.
const MAX_TRIES: usize = 16;

/// What a replica keeps besides the CA state: the KEK, the revisions it
/// last saw, who it is, and the leadership switch.
pub struct Shared {
    kek: Kek,
    /// This replica's name in `elections/control` (host and listen port).
    pub replica: String,
    core_rev: Mutex<Rev>,
    mesh_rev: Mutex<Rev>,
    /// While leading: the election key and the revision this replica
    /// wrote it at, checked by every publish.
    fence: Mutex<Option<(String, Rev)>>,
    /// Hash of the config directory the leader last looked at.
    mesh_seen: Mutex<Option<String>>,
    /// instance -> (serial, bundle version, when written): what this
    /// replica last wrote to `ca/reports/`.
    written: Mutex<HashMap<String, (String, u64, i64)>>,
    leading_tx: tokio::sync::watch::Sender<bool>,
    leader_gauge: prometheus::IntGauge,
    /// False while the store does not answer a read within `leader_ttl`
    /// (a partition): this replica's copy may be stale, so mesh watches
    /// are refused with 503 and proxies move to another replica.
    pub store_reachable: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What [`open`] found in the store.
pub struct Opened {
    pub store: Arc<dyn Store>,
    pub shared: Shared,
    pub state: CaState,
    pub leading: tokio::sync::watch::Receiver<bool>,
    pub mesh: Option<Published>,
    /// Every replica's workload reports, so a new leader decides rotations
    /// on all of them from its first tick.
    pub reports: HashMap<String, Report>,
}

/// This replica's name: the host name and the workload port.
fn replica_name(cfg: &ControlConfig) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", cfg.listen.port())
}

/// Connects to the store, loads the KEK and the CA state (seeding the store
/// from `state.json` or `ca.intermediate` on the first start of the first replica).
pub async fn open(cfg: &ControlConfig, gauge: prometheus::IntGauge) -> anyhow::Result<Opened> {
    let kek_path = cfg.kek_file.as_ref().context(
        "kek_file is required with store: {etcd: ...}; see docs/reference/control-config.md",
    )?;
    let kek = Kek::load(kek_path)?;
    let store = crate::store::open(&cfg.store, &cfg.state_dir)
        .await
        .context("opening store.etcd")?;
    let (state, core_rev) = load_or_seed(&*store, &kek, cfg).await?;
    let (mesh, mesh_rev) = match store.get(MESH_KEY).await? {
        Some((bytes, rev)) => match shared::open_mesh(&bytes, &kek) {
            Ok(p) => (Some(p), rev),
            Err(e) => {
                tracing::error!(error = %e, "the store's mesh/version is refused; this replica serves no config until the leader publishes one");
                (None, rev)
            }
        },
        None => (None, 0),
    };
    let mut reports = HashMap::new();
    for (_, v, _) in store.list(REPORTS_PREFIX).await? {
        if let Ok(r) = serde_json::from_slice::<Report>(&v) {
            shared::merge_report(&mut reports, r);
        }
    }
    let (leading_tx, leading) = tokio::sync::watch::channel(false);
    gauge.set(0);
    let shared = Shared {
        kek,
        replica: replica_name(cfg),
        core_rev: Mutex::new(core_rev),
        mesh_rev: Mutex::new(mesh_rev),
        fence: Mutex::new(None),
        mesh_seen: Mutex::new(None),
        written: Mutex::default(),
        leading_tx,
        leader_gauge: gauge,
        store_reachable: std::sync::atomic::AtomicBool::new(true),
    };
    Ok(Opened {
        store,
        shared,
        state,
        leading,
        mesh,
        reports,
    })
}

/// The CA state in the store, or the seed written there (only if absent,
/// so two replicas starting at once agree on one CA).
async fn load_or_seed(
    store: &dyn Store,
    kek: &Kek,
    cfg: &ControlConfig,
) -> anyhow::Result<(CaState, Rev)> {
    for _ in 0..3 {
        if let Some((bytes, rev)) = store.get(CORE_KEY).await? {
            let mut st = shared::open_core(&bytes, kek)?;
            if st.trust_domain != cfg.trust_domain {
                anyhow::bail!(
                    "the store's CA is for trust domain {:?} but the config says {:?}; point store.etcd.prefix at this mesh's keys",
                    st.trust_domain,
                    cfg.trust_domain
                );
            }
            st.inventory = load_inventory(store, kek).await?;
            let local = cfg.state_dir.join("state.json");
            if local.exists() {
                warn_state_json(&local);
            }
            tracing::info!(
                bundle_version = st.bundle_version,
                "loaded the CA state from the store"
            );
            return Ok((st, rev));
        }
        let path = cfg.state_dir.join("state.json");
        let st = if path.exists() {
            warn_state_json(&path);
            crate::server::load_state(&path, &cfg.trust_domain)?
        } else {
            crate::server::seed_state(cfg)?
        };
        match store
            .put_if(CORE_KEY, shared::seal_core(&st, kek)?, 0, None)
            .await
        {
            Ok(rev) => {
                for i in &st.inventory {
                    if let Err(e) = put_issued(store, kek, i, (CORE_KEY, rev)).await {
                        tracing::error!(serial = %i.serial, error = %e, "cannot copy an issued certificate into the store");
                    }
                }
                tracing::info!("seeded the store's CA state");
                return Ok((st, rev));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("the store's ca/state keeps changing while this replica starts; try again")
}

/// `state.json` keeps the intermediate's key in clear: once the store is
/// seeded it should not stay on the replicas.
fn warn_state_json(path: &std::path::Path) {
    tracing::warn!(path = %path.display(), "state.json holds the intermediate's private key in clear; once the store is seeded remove it from every replica (the store keeps the key sealed under the KEK)");
}

/// Every leaf in the store whose integrity checks; the others are logged and skipped.
async fn load_inventory(store: &dyn Store, kek: &Kek) -> crate::store::Result<Vec<Issued>> {
    let mut out = Vec::new();
    for (key, v, _) in store.list(INVENTORY_PREFIX).await? {
        match shared::open_issued(&key, &v, kek) {
            Ok(i) => out.push(i),
            Err(e) => {
                tracing::error!(key, error = %e, "ignoring a certificate record that fails its check")
            }
        }
    }
    Ok(out)
}

/// Records a leaf, only while `guard` (the `ca/state` consulted) is unchanged.
async fn put_issued(
    store: &dyn Store,
    kek: &Kek,
    i: &Issued,
    guard: (&str, Rev),
) -> crate::store::Result<Rev> {
    let bytes = shared::seal_issued(i, kek).map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let key = shared::inventory_key(&i.serial);
    store.put_if_guarded(&key, bytes, 0, guard.0, guard.1).await
}

fn unavailable(e: impl std::fmt::Display) -> Refusal {
    Refusal {
        status: 503,
        code: "store-unavailable",
        message: format!(
            "crank-control cannot reach its store ({e}); retry, or ask another replica"
        ),
    }
}

impl Control {
    /// True while this replica leads (always without a shared store): only
    /// the leader publishes, moves rotations on and prunes.
    pub fn is_leader(&self) -> bool {
        *self.leading.borrow()
    }

    /// Applies `f` to the CA state and saves the result: `state.json` in a
    /// single process; with a shared store, a compare-and-swap that is
    /// retried on a fresh copy when another replica wrote first.
    pub(in crate::server) async fn change<R>(
        &self,
        f: impl Fn(&mut CaState) -> Result<R, Refusal>,
    ) -> Result<R, Refusal> {
        let (Some(store), Some(shared)) = (&self.store, &self.shared) else {
            let mut st = self.state();
            let r = f(&mut st)?;
            self.commit(&st);
            return Ok(r);
        };
        for _ in 0..MAX_TRIES {
            let (before, rev) = {
                let st = self.state();
                (st.clone(), *lock(&shared.core_rev))
            };
            let mut after = before.clone();
            let r = f(&mut after)?;
            match self
                .write_state(&**store, shared, &before, &after, rev)
                .await
            {
                Ok(()) => return Ok(r),
                Err(StoreError::Conflict { .. }) => {
                    if let Err(e) = self.reload_core(&**store, shared).await {
                        return Err(unavailable(e));
                    }
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(unavailable("too many concurrent changes"))
    }

    /// Like [`Control::change`] for the ticker's work: saves only when `f`
    /// returns `Some`; a store failure is logged.
    pub(in crate::server) async fn change_if<R>(
        &self,
        f: impl Fn(&mut CaState) -> Option<R>,
    ) -> Option<R> {
        if self.store.is_none() {
            let mut st = self.state();
            let r = f(&mut st)?;
            self.commit(&st);
            return Some(r);
        }
        match self.change(|st| Ok(f(st))).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e.message, "cannot save a CA change; retrying on the next tick");
                None
            }
        }
    }

    /// Writes what changed between `before` and `after`: the core document
    /// with compare-and-swap on `rev`, then each new or dropped leaf.
    async fn write_state(
        &self,
        store: &dyn Store,
        shared: &Shared,
        before: &CaState,
        after: &CaState,
        rev: Rev,
    ) -> crate::store::Result<()> {
        let core_changed = shared::core_differs(before, after);
        let mut guard_rev = rev;
        if core_changed {
            let bytes = shared::seal_core(after, &shared.kek)
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let new_rev = store.put_if(CORE_KEY, bytes, rev, None).await?;
            guard_rev = new_rev;
            let mut st = self.state();
            let mut cur = lock(&shared.core_rev);
            if new_rev > *cur {
                shared::set_core(&mut st, shared::core_of(after));
                *cur = new_rev;
            }
        }
        let (added, removed) = shared::inventory_diff(before, after);
        for i in &added {
            match put_issued(store, &shared.kek, i, (CORE_KEY, guard_rev)).await {
                Ok(_) => {}
                // The core write already went through (a token was used):
                // running the change again would not be the same change.
                Err(StoreError::Conflict { .. }) if core_changed => {
                    return Err(StoreError::Unavailable(
                        "the CA state changed while the new certificate was recorded; it was not handed out".into(),
                    ))
                }
                Err(e) => {
                    tracing::error!(serial = %i.serial, error = %e, "cannot record an issued certificate in the store; it is not handed out");
                    return Err(e);
                }
            }
        }
        for serial in &removed {
            let key = format!("{INVENTORY_PREFIX}{serial}");
            if let Ok(Some((_, r))) = store.get(&key).await {
                let _ = store.delete_if(&key, r).await;
            }
        }
        let mut st = self.state();
        for i in added {
            shared::add_issued(&mut st, i.clone());
        }
        st.inventory.retain(|i| !removed.contains(&i.serial));
        self.refresh_local(&st);
        Ok(())
    }

    /// Reads the core document again after losing a compare-and-swap.
    async fn reload_core(&self, store: &dyn Store, shared: &Shared) -> anyhow::Result<()> {
        let (bytes, rev) = store
            .get(CORE_KEY)
            .await?
            .context("the store's ca/state is gone; restore it from an etcd snapshot")?;
        self.apply_core(shared, &bytes, rev)
    }

    fn apply_core(&self, shared: &Shared, bytes: &[u8], rev: Rev) -> anyhow::Result<()> {
        let core = shared::open_core(bytes, &shared.kek)?;
        let mut st = self.state();
        let mut cur = lock(&shared.core_rev);
        if rev > *cur && shared::goes_backwards(&st, &core) {
            anyhow::bail!(
                "the store's ca/state (revision {rev}) would take the CA back to revocations version {} and bundle version {} from {} and {} (an older document written again); it is refused",
                core.revocations_version,
                core.bundle_version,
                st.revocations_version,
                st.bundle_version
            );
        }
        if rev > *cur {
            shared::set_core(&mut st, core);
            *cur = rev;
            drop(cur);
            self.refresh_local(&st);
        }
        Ok(())
    }

    /// Shares a workload's report with the other replicas (the leader
    /// decides rotations on every replica's reports) when its serial or
    /// bundle changed, or it was last shared a third of `stale_after` ago.
    pub(in crate::server) fn share_report(&self, r: &Report) {
        let (Some(store), Some(shared)) = (&self.store, &self.shared) else {
            return;
        };
        let every = (self.cfg.workloads.stale_after.as_secs() as i64 / 3).max(1);
        {
            let mut w = lock(&shared.written);
            if let Some((serial, bundle, at)) = w.get(&r.instance) {
                if *serial == r.serial && *bundle == r.bundle_version && r.last_seen - at < every {
                    return;
                }
            }
            w.insert(
                r.instance.clone(),
                (r.serial.clone(), r.bundle_version, r.last_seen),
            );
        }
        let store = store.clone();
        let key = format!("{REPORTS_PREFIX}{}", r.instance);
        let bytes = serde_json::to_vec(r).unwrap_or_default();
        tokio::spawn(async move {
            let rev = store.get(&key).await.ok().flatten().map_or(0, |(_, r)| r);
            let _ = store.put_if(&key, bytes, rev, None).await;
        });
    }

    /// One change under `ca/` seen on the store's watch.
    fn apply_ca_change(&self, shared: &Shared, change: Change) {
        match change {
            Change::Put { key, value, rev } if key == CORE_KEY => {
                if let Err(e) = self.apply_core(shared, &value, rev) {
                    tracing::error!(error = %format!("{e:#}"), "cannot read the CA state another replica wrote; this replica keeps its copy");
                }
            }
            Change::Put { key, value, .. } if key.starts_with(INVENTORY_PREFIX) => {
                match shared::open_issued(&key, &value, &shared.kek) {
                    Ok(i) => shared::add_issued(&mut self.state(), i),
                    Err(e) => {
                        tracing::error!(key, error = %e, "ignoring a certificate record that fails its check")
                    }
                }
            }
            Change::Delete { key, .. } if key.starts_with(INVENTORY_PREFIX) => {
                let serial = &key[INVENTORY_PREFIX.len()..];
                self.state().inventory.retain(|i| i.serial != serial);
            }
            Change::Put { key, value, .. } if key.starts_with(REPORTS_PREFIX) => {
                if let Ok(r) = serde_json::from_slice::<Report>(&value) {
                    shared::merge_report(&mut self.reports(), r);
                }
            }
            _ => {}
        }
    }

    /// After (re)starting the watch: everything under `ca/` again.
    async fn reload_all(&self, store: &dyn Store, shared: &Shared) -> anyhow::Result<()> {
        self.reload_core(store, shared).await?;
        let inventory = load_inventory(store, &shared.kek).await?;
        self.state().inventory = inventory;
        for (_, v, _) in store.list(REPORTS_PREFIX).await? {
            if let Ok(r) = serde_json::from_slice::<Report>(&v) {
                shared::merge_report(&mut self.reports(), r);
            }
        }
        Ok(())
    }

    /// A published version seen in the store: served from now on when newer.
    fn apply_mesh(&self, shared: &Shared, bytes: &[u8], rev: Rev) {
        let p = match shared::open_mesh(bytes, &shared.kek) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, rev, "the store's mesh/version is refused; the last good version keeps serving");
                return;
            }
        };
        {
            let mut cur = lock(&shared.mesh_rev);
            *cur = (*cur).max(rev);
        }
        let mut mesh = self.mesh();
        if mesh.current.as_ref().is_some_and(|c| c.seq >= p.seq) {
            return;
        }
        tracing::info!(seq = p.seq, hash = %p.snapshot.hash, "serving the mesh config version another replica published");
        mesh.remember(&p);
        mesh.current = Some(Arc::new(p));
        self.metrics.observe_mesh(&mesh);
        drop(mesh);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Leader only: checks the config directory and publishes a new version.
    /// `seq` and the expected revision come from one read of
    /// `mesh/version`, and the write checks that revision and this
    /// leader's election key in one transaction: a deposed leader that has
    /// not noticed yet, or a publisher that raced another, loses.
    pub(in crate::server) async fn publish_shared(&self) {
        let (Some(store), Some(shared), Some(dir)) =
            (&self.store, &self.shared, &self.cfg.config_dir)
        else {
            return;
        };
        let Some(fence) = lock(&shared.fence).clone() else {
            return;
        };
        let Some((hash, snapshot)) = self.next_snapshot(shared, dir) else {
            return;
        };
        let (stored, rev) = match store.get(MESH_KEY).await {
            Ok(Some((b, r))) => (shared::open_mesh(&b, &shared.kek).ok(), r),
            Ok(None) => (None, 0),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read mesh/version; publishing on the next tick");
                return;
            }
        };
        let local = self.mesh().current.as_ref().map_or(0, |c| c.seq);
        if let Some(p) = stored.as_ref().filter(|p| p.snapshot.hash == snapshot.hash) {
            *lock(&shared.mesh_seen) = Some(hash);
            if p.seq > local {
                if let Ok(b) = shared::seal_mesh(p, &shared.kek) {
                    self.apply_mesh(shared, &b, rev);
                }
            }
            return;
        }
        let seq = stored.as_ref().map_or(0, |p| p.seq).max(local) + 1;
        let next = Published {
            seq,
            published_at: now(),
            snapshot,
        };
        let bytes = match shared::seal_mesh(&next, &shared.kek) {
            Ok(b) => b,
            Err(e) => return tracing::error!(error = %e, "cannot seal the mesh config version"),
        };
        match store
            .put_if_guarded(MESH_KEY, bytes.clone(), rev, &fence.0, fence.1)
            .await
        {
            Ok(new_rev) => {
                *lock(&shared.mesh_seen) = Some(hash.clone());
                tracing::info!(seq, hash = %next.snapshot.hash, "published mesh config");
                self.apply_mesh(shared, &bytes, new_rev);
                self.audit_config(&hash, format!("version {seq}"), None);
            }
            Err(StoreError::Conflict { key, .. }) if key == fence.0 => {
                tracing::error!("this replica no longer holds the leadership it published under; not publishing");
            }
            Err(StoreError::Conflict { .. }) => {
                tracing::warn!("another replica published first; publishing again from its version")
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot publish the mesh config to the store; retrying")
            }
        }
    }

    /// The directory's hash and snapshot, when it changed since last
    /// looked at and is valid (a refusal is recorded here).
    fn next_snapshot(
        &self,
        shared: &Shared,
        dir: &std::path::Path,
    ) -> Option<(String, crate::configdir::MeshSnapshot)> {
        let files = crate::configdir::files(dir).ok()?;
        let hash = crate::configdir::hash(&files);
        if lock(&shared.mesh_seen).as_deref() == Some(hash.as_str()) {
            return None;
        }
        match crate::configdir::load(dir) {
            Err(problems) => {
                *lock(&shared.mesh_seen) = Some(hash.clone());
                for p in &problems {
                    tracing::error!(problem = %p, "config change rejected; the last published version keeps serving");
                }
                let all: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
                self.mesh().last_error = Some((now(), problems));
                self.audit_config(&hash, "a new version".into(), Some(all.join("; ")));
                None
            }
            Ok(snapshot) => {
                self.mesh().last_error = None;
                Some((hash, snapshot))
            }
        }
    }

    /// Revoke by identity must see leaves issued on every replica: the
    /// inventory read from the store now, not this replica's copy.
    pub(in crate::server) async fn sync_inventory(&self) -> Result<(), Refusal> {
        let (Some(store), Some(shared)) = (&self.store, &self.shared) else {
            return Ok(());
        };
        let listed = load_inventory(&**store, &shared.kek)
            .await
            .map_err(unavailable)?;
        let mut st = self.state();
        for i in listed {
            shared::add_issued(&mut st, i);
        }
        Ok(())
    }

    /// Who leads, for `crankctl ca status`: (this replica, the leader).
    pub(in crate::server) async fn leader_names(&self) -> (Option<String>, Option<String>) {
        let (Some(store), Some(shared)) = (&self.store, &self.shared) else {
            return (None, None);
        };
        let leader = crate::store::leader(&**store, ELECTION)
            .await
            .ok()
            .flatten();
        (Some(shared.replica.clone()), leader)
    }
}

/// The replica's background work on a shared store: the election and the
/// watches of `ca/` and `mesh/version`.
pub fn spawn(control: &Arc<Control>, tasks: &mut tokio::task::JoinSet<()>) {
    if control.store.is_none() {
        return;
    }
    tasks.spawn(campaign(control.clone()));
    tasks.spawn(follow(control.clone(), CA_PREFIX));
    tasks.spawn(follow(control.clone(), MESH_KEY));
    tasks.spawn(probe(control.clone()));
}

/// Reads `mesh/version` every second; a read that fails or takes longer
/// than `leader_ttl` marks the store unreachable until one succeeds.
async fn probe(control: Arc<Control>) {
    use std::sync::atomic::Ordering;
    let (Some(store), Some(shared)) = (control.store.clone(), control.shared.as_ref()) else {
        return;
    };
    let limit = control.cfg.leader_ttl;
    loop {
        let ok = matches!(
            tokio::time::timeout(limit, store.get(MESH_KEY)).await,
            Ok(Ok(_))
        );
        let was = shared.store_reachable.swap(ok, Ordering::Relaxed);
        if was && !ok {
            tracing::error!(replica = %shared.replica, "the store does not answer; mesh watches are refused (503 store-unreachable) so proxies move to another replica");
            control.changed.send_modify(|v| *v += 1);
        } else if ok && !was {
            tracing::info!(replica = %shared.replica, "the store answers again; serving mesh watches");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Campaigns for `elections/control` for ever; while leading, the switch
/// is on; a lost lease turns it off at once.
async fn campaign(control: Arc<Control>) {
    let (Some(store), Some(shared)) = (control.store.clone(), control.shared.as_ref()) else {
        return;
    };
    let ttl = control.cfg.leader_ttl;
    loop {
        match crate::store::campaign(store.clone(), ELECTION, &shared.replica, ttl).await {
            Ok(mut leadership) => {
                *lock(&shared.mesh_seen) = None;
                let (key, rev) = leadership.fence();
                *lock(&shared.fence) = Some((key.to_string(), rev));
                let _ = shared.leading_tx.send(true);
                shared.leader_gauge.set(1);
                tracing::info!(replica = %shared.replica, "this replica leads (publishing, rotations, pruning)");
                leadership.lost().await;
                *lock(&shared.fence) = None;
                let _ = shared.leading_tx.send(false);
                shared.leader_gauge.set(0);
                tracing::error!(replica = %shared.replica, "this replica lost the leadership (its lease ended); it stops publishing and campaigns again");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot campaign for leadership; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Keeps this replica's copy of `prefix` current: a full read after the
/// watch is in place, then every change; a broken watch starts again.
async fn follow(control: Arc<Control>, prefix: &'static str) {
    let (Some(store), Some(shared)) = (control.store.clone(), control.shared.as_ref()) else {
        return;
    };
    loop {
        match store.watch(prefix).await {
            Ok(mut changes) => {
                if let Err(e) = catch_up(&control, &*store, shared, prefix).await {
                    tracing::warn!(error = %format!("{e:#}"), "cannot read the store after watching it");
                }
                while let Some(c) = changes.next().await {
                    match (prefix, c) {
                        (MESH_KEY, Change::Put { value, rev, .. }) => {
                            control.apply_mesh(shared, &value, rev)
                        }
                        (MESH_KEY, _) => {}
                        (_, c) => control.apply_ca_change(shared, c),
                    }
                }
                tracing::warn!(prefix, "the store's watch ended; watching again");
            }
            Err(e) => tracing::warn!(prefix, error = %e, "cannot watch the store; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn catch_up(
    control: &Control,
    store: &dyn Store,
    shared: &Shared,
    prefix: &str,
) -> anyhow::Result<()> {
    if prefix == MESH_KEY {
        if let Some((b, r)) = store.get(MESH_KEY).await? {
            control.apply_mesh(shared, &b, r);
        }
        return Ok(());
    }
    control.reload_all(store, shared).await
}

/// Leader only: drops reports of workloads gone for four `stale_after`
/// (at least an hour) from the store and from memory.
pub(in crate::server) fn forget_reports(control: &Control) {
    let Some(store) = &control.store else { return };
    let keep = (control.cfg.workloads.stale_after.as_secs() as i64 * 4).max(3600);
    let cutoff = now() - keep;
    let gone: Vec<String> = {
        let mut reports = control.reports();
        let gone = reports
            .values()
            .filter(|r| r.last_seen < cutoff)
            .map(|r| r.instance.clone())
            .collect();
        reports.retain(|_, r| r.last_seen >= cutoff);
        gone
    };
    for instance in gone {
        let store = store.clone();
        tokio::spawn(async move {
            let key = format!("{REPORTS_PREFIX}{instance}");
            if let Ok(Some((_, rev))) = store.get(&key).await {
                let _ = store.delete_if(&key, rev).await;
            }
        });
    }
}
