//! `crank-control`: the mesh CA. It serves the workload identity API
//! (enroll, renew, watch) over TLS, the admin API over a Unix socket for
//! `crankctl`, and `/metrics`. [`Control`] holds the state behind one mutex;
//! every change is saved to `state.json` and wakes the watchers.
//!
//! Ports and tasks: `listen` (TLS, workload API), `admin_socket` (HTTP/1.1
//! over a Unix socket), optional `metrics_listen` and `dashboard_listen`
//! (the web dashboard, [`dashboard`]), and one ticker task ([`ticker`])
//! that moves rotations on, prunes expired entries, renews the server's own
//! certificate and checks the config directory, at once when its inotify
//! watch sees an edit.
//!
//! Modules by concern: [`listeners`] (the accept loops), [`workload`] (the
//! workload API: routing, enroll, renew, identity watch), [`ca_admin`] (the
//! admin API's CA calls), [`mesh`] (config publishing, mesh watch, the
//! registry), [`traffic`] (proxy reports, the dashboard's state), [`http`]
//! (shared request and refusal helpers), [`state`] (the CA state machine).
//! With `store: {etcd: ...}` the state lives in the store shared by every
//! replica and one replica leads ([`state::replica`]); without it,
//! `state.json` as always.
//! This file: opening the state, saving, the ticker, and [`run`].

pub mod admin;
mod admin_access;
pub mod audit;
mod ca_admin;
pub mod config;
mod dashboard;
mod http;
mod listeners;
pub mod mesh;
mod metrics;
pub mod roles;
pub mod routes;
pub mod state;
mod ticker;
mod tls;
pub mod traffic;
mod workload;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use crank_certs::Ca;

use config::ControlConfig;
use state::{CaState, Report};

/// The running control plane.
pub struct Control {
    pub cfg: ControlConfig,
    state: Mutex<CaState>,
    reports: Mutex<HashMap<String, Report>>,
    /// Bumped on every change a watcher may care about.
    changed: tokio::sync::watch::Sender<u64>,
    tls: tls::ServerTls,
    metrics: metrics::Metrics,
    /// Workload reports live in memory: after a start, rotations wait until
    /// every live workload had the chance to report (one longest watch).
    started: std::time::Instant,
    /// The state existed before this start (a restart, not a first start).
    restarted: bool,
    /// The published mesh config and what proxies report.
    mesh: Mutex<mesh::MeshState>,
    /// Live endpoints with leases: in memory, or on the shared store's
    /// leases with `store: etcd` ([`crate::registry::open`]).
    registry: Arc<dyn crate::registry::Registry>,
    /// A config was published before this start: proxies are waiting for
    /// the registry to fill again (see `registry_grace_left`).
    mesh_restarted: bool,
    update_cache: Mutex<mesh::UpdateCache>,
    /// The proxies' traffic reports, for the dashboard.
    traffic: Mutex<traffic::store::TrafficStore>,
    /// Admin mutations, refusals and config versions ([`audit`]).
    audit: Box<dyn audit::AuditLog>,
    /// The store shared with the other replicas (`store: {etcd: ...}`);
    /// `None`: state.json, one process.
    pub(crate) store: Option<Arc<dyn crate::store::Store>>,
    /// True while this replica leads (always true without a shared store);
    /// see [`Control::is_leader`].
    pub(crate) leading: tokio::sync::watch::Receiver<bool>,
    /// The KEK and revisions of the shared store.
    shared: Option<state::replica::Shared>,
}

/// What [`Control::open`] starts from.
struct Loaded {
    state: CaState,
    restarted: bool,
    store: Option<Arc<dyn crate::store::Store>>,
    shared: Option<state::replica::Shared>,
    leading: tokio::sync::watch::Receiver<bool>,
    mesh: Option<mesh::Published>,
    reports: HashMap<String, Report>,
}

/// Longer than the longest watch (60 s): by then every live workload has
/// reported again after a control plane restart.
const RESYNC_GRACE: Duration = Duration::from_secs(65);

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Control {
    /// Loads `state.json`, or seeds it from `ca.intermediate` on first
    /// start; with a shared store, the state in the store.
    pub async fn open(cfg: ControlConfig) -> Result<Arc<Control>> {
        private_state_dir(&cfg.state_dir)?;
        let metrics = metrics::Metrics::new();
        let gauge = leader_gauge(&metrics);
        let loaded = load(&cfg, gauge).await?;
        let state = loaded.state;
        let restarted = loaded.restarted;
        let mut mesh_state = mesh::MeshState::open(&cfg.state_dir);
        if let Some(p) = loaded.mesh {
            mesh_state.remember(&p);
            mesh_state.current = Some(Arc::new(p));
        }
        let audit = open_audit(&cfg.state_dir, loaded.store.as_ref(), &loaded.leading).await;
        let signer = state.signer()?;
        let tls = tls::ServerTls::new(&signer, &state.bundle().pem, &cfg.certs)?;
        let (changed, _) = tokio::sync::watch::channel(0);
        let registry = crate::registry::open(loaded.store.clone())
            .await
            .map_err(|e| anyhow::anyhow!("store: cannot read the registry: {e}"))?;
        let control = Arc::new(Control {
            metrics,
            cfg,
            state: Mutex::new(state),
            reports: Mutex::new(loaded.reports),
            changed,
            tls,
            started: std::time::Instant::now(),
            restarted,
            mesh_restarted: mesh_state.current.is_some(),
            mesh: Mutex::new(mesh_state),
            update_cache: Mutex::default(),
            traffic: Mutex::default(),
            registry,
            audit,
            store: loaded.store,
            leading: loaded.leading,
            shared: loaded.shared,
        });
        control.tick_mesh();
        {
            let st = control.state();
            if control.store.is_some() {
                control.refresh_local(&st);
            } else {
                control.save(&st)?;
            }
            control.metrics.observe(&st, &control.tls);
        }
        Ok(control)
    }

    pub fn state(&self) -> MutexGuard<'_, CaState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reports(&self) -> MutexGuard<'_, HashMap<String, Report>> {
        self.reports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `state.json` (0600) and `bundle.pem` atomically.
    fn save(&self, st: &CaState) -> Result<()> {
        let dir = &self.cfg.state_dir;
        write_atomic(
            &dir.join("state.json"),
            &serde_json::to_vec_pretty(st)?,
            true,
        )?;
        write_atomic(&dir.join("bundle.pem"), st.bundle().pem.as_bytes(), false)?;
        Ok(())
    }

    /// Saves, refreshes TLS and metrics, and wakes watchers after a change.
    fn commit(&self, st: &CaState) {
        if let Err(e) = self.save(st) {
            tracing::error!(error = %format!("{e:#}"), "cannot save the CA state; the change applies in memory only until the next save");
        }
        self.refresh_local(st);
    }

    /// Refreshes TLS and metrics and wakes watchers after a change (saved
    /// already, or seen in the shared store).
    fn refresh_local(&self, st: &CaState) {
        if self.store.is_some() {
            let bundle = self.cfg.state_dir.join("bundle.pem");
            if let Err(e) = write_atomic(&bundle, st.bundle().pem.as_bytes(), false) {
                tracing::warn!(error = %format!("{e:#}"), "cannot write bundle.pem");
            }
        }
        if let Ok(signer) = st.signer() {
            if let Err(e) = self.tls.update(&signer, &st.bundle().pem, &self.cfg.certs) {
                tracing::error!(error = %format!("{e:#}"), "cannot refresh the control plane's own TLS");
            }
        }
        self.metrics.observe(st, &self.tls);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Moves a rotation on if every active workload caught up (the leader only).
    async fn advance(&self) {
        if !self.is_leader() || self.restarted && self.started.elapsed() < RESYNC_GRACE {
            return;
        }
        if self.state().rotation.phase == state::Phase::Idle {
            return;
        }
        let reports = self.reports().clone();
        let stale = self.cfg.workloads.stale_after;
        let moved = self
            .change_if(|st| {
                st.advance(&reports, stale, now())
                    .map(|l| (l, st.bundle_version))
            })
            .await;
        if let Some((line, bundle_version)) = moved {
            tracing::info!(bundle_version, "{line}");
        }
    }

    async fn tick(&self) {
        self.tick_mesh();
        if self.is_leader() {
            self.publish_shared().await;
            let t = now();
            if self.store.is_none() || self.state().needs_prune(t) {
                self.change_if(|st| st.prune(t).then_some(())).await;
            }
            state::replica::forget_reports(self);
        }
        self.advance().await;
        if self.tls.needs_renewal() {
            let st = self.state();
            self.commit_or_refresh(&st);
        }
        let st = self.state();
        self.metrics
            .observe_workloads(&st, &self.reports(), self.cfg.workloads.stale_after);
    }
}

impl Control {
    /// `commit` in a single process; with a shared store only the local refresh.
    fn commit_or_refresh(&self, st: &CaState) {
        if self.store.is_some() {
            self.refresh_local(st);
        } else {
            self.commit(st);
        }
    }
}

/// `crank_control_leader`: 1 while this replica leads (always 1 without a shared store).
fn leader_gauge(m: &metrics::Metrics) -> prometheus::IntGauge {
    let g = prometheus::IntGauge::new(
        "crank_control_leader",
        "1 while this crank-control replica leads (publishes config versions, moves rotations on, prunes); always 1 without a shared store",
    )
    .expect("a valid metric");
    if let Err(e) = m.registry.register(Box::new(g.clone())) {
        tracing::error!(error = %e, "cannot register crank_control_leader");
    }
    g.set(1);
    g
}

/// `audit.jsonl`, and with a shared store every replica's entries there too.
async fn open_audit(
    state_dir: &Path,
    store: Option<&Arc<dyn crate::store::Store>>,
    leading: &tokio::sync::watch::Receiver<bool>,
) -> Box<dyn audit::AuditLog> {
    let local = audit::JsonlAudit::open(state_dir, audit::Retention::default(), now());
    match store {
        Some(store) => Box::new(
            audit::StoreAudit::open(
                local,
                store.clone(),
                leading.clone(),
                audit::Retention::default(),
            )
            .await,
        ),
        None => Box::new(local),
    }
}

/// The starting state: `state.json` (or the seed), or the shared store.
async fn load(cfg: &ControlConfig, gauge: prometheus::IntGauge) -> Result<Loaded> {
    if matches!(cfg.store, crate::store::StoreSettings::Etcd(_)) {
        let o = state::replica::open(cfg, gauge).await?;
        return Ok(Loaded {
            state: o.state,
            restarted: false,
            store: Some(o.store),
            shared: Some(o.shared),
            leading: o.leading,
            mesh: o.mesh,
            reports: o.reports,
        });
    }
    let path = cfg.state_dir.join("state.json");
    let restarted = path.exists();
    let state = if restarted {
        load_state(&path, &cfg.trust_domain)?
    } else {
        seed_state(cfg)?
    };
    Ok(Loaded {
        state,
        restarted,
        store: None,
        shared: None,
        leading: tokio::sync::watch::channel(true).1,
        mesh: None,
        reports: HashMap::new(),
    })
}

/// Makes `state_dir` and keeps it private: state.json holds intermediate
/// keys, and the admin socket sits there too.
fn private_state_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating state_dir {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making state_dir {} private (0700)", dir.display()))
}

/// `state.json` of an earlier start, for this trust domain.
fn load_state(path: &Path, trust_domain: &str) -> Result<CaState> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let st: CaState = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a crank-control state file; restore it from backup",
            path.display()
        )
    })?;
    if st.trust_domain != trust_domain {
        anyhow::bail!(
            "{} is for trust domain {:?} but the config says {:?}",
            path.display(),
            st.trust_domain,
            trust_domain
        );
    }
    tracing::info!(file = %path.display(), bundle_version = st.bundle_version, "loaded CA state");
    Ok(st)
}

/// A first start: the CA state from `ca.intermediate` and its root.
fn seed_state(cfg: &ControlConfig) -> Result<CaState> {
    let dir = &cfg.ca.intermediate;
    let inter = Ca::load(dir, &cfg.trust_domain).with_context(|| {
        format!("loading ca.intermediate {} (make it with `crankctl ca intermediate --root ROOT_DIR --out {}`)", dir.display(), dir.display())
    })?;
    let root = std::fs::read_to_string(dir.join("bundle.pem"))
        .with_context(|| format!("reading {}/bundle.pem (the root)", dir.display()))?;
    let st = CaState::seed(&inter, &root, now())?;
    tracing::info!(dir = %dir.display(), "seeded the CA from the intermediate");
    Ok(st)
}

fn write_atomic(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if secret {
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// For `--check`: the CA material loads (state.json when it exists, else
/// the seed intermediate with its root).
pub fn check_ca(cfg: &ControlConfig) -> Result<()> {
    let path = cfg.state_dir.join("state.json");
    if path.exists() {
        let st: CaState = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("{} is not a crank-control state file", path.display()))?;
        st.signer()?;
        return Ok(());
    }
    let dir = &cfg.ca.intermediate;
    let inter = Ca::load(dir, &cfg.trust_domain).with_context(|| {
        format!(
            "ca.intermediate {}: make it with `crankctl ca intermediate --root ROOT_DIR --out {}`",
            dir.display(),
            dir.display()
        )
    })?;
    let root = std::fs::read_to_string(dir.join("bundle.pem"))
        .with_context(|| format!("reading {}/bundle.pem (the root)", dir.display()))?;
    CaState::seed(&inter, &root, now())?;
    Ok(())
}

/// Runs crank-control until SIGTERM/SIGINT: the listeners stop accepting,
/// the admin socket is removed.
pub async fn run(cfg: ControlConfig) -> Result<()> {
    let period = ticker::tick_period(std::env::var("CRANK_CONTROL_TICK").ok().as_deref())
        .map_err(anyhow::Error::msg)?;
    let control = Control::open(cfg).await?;
    let mut signals = crank_plumbing::Signals::install()?;
    let drain = crank_plumbing::Drain::new();
    let mut tasks = spawn_listeners(&control, &drain).await?;
    state::replica::spawn(&control, &mut tasks);
    tasks.spawn(control.clone().run_ticker(period));
    let signal = tokio::select! {
        s = signals.recv() => s,
        r = tasks.join_next() => {
            let _ = std::fs::remove_file(&control.cfg.admin_socket);
            anyhow::bail!("a crank-control task ended unexpectedly ({r:?}); see the log above");
        }
    };
    tracing::info!(signal, "crank-control stopping");
    drain.start();
    let _ = std::fs::remove_file(&control.cfg.admin_socket);
    Ok(())
}

/// Binds every listener (an address in use fails the start) and serves
/// each on its own task until `drain` starts.
async fn spawn_listeners(
    control: &Arc<Control>,
    drain: &crank_plumbing::Drain,
) -> Result<tokio::task::JoinSet<()>> {
    let cfg = &control.cfg;
    let stop = || {
        let d = drain.clone();
        async move { d.signaled().await }
    };
    let workload = bind_tcp("listen", cfg.listen).await?;
    let admin = bind_admin(&cfg.admin_socket)?;
    tracing::info!(listen = %cfg.listen, admin_socket = %cfg.admin_socket.display(), trust_domain = %cfg.trust_domain, "crank-control serving");
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(listeners::serve(
        "workload",
        control.clone(),
        workload,
        stop(),
        listeners::workload_conn,
    ));
    tasks.spawn(listeners::serve(
        "admin",
        control.clone(),
        admin,
        stop(),
        listeners::admin_conn,
    ));
    if let Some(addr) = cfg.admin_listen {
        let l = bind_tcp("admin_listen", addr).await?;
        tracing::info!(admin_listen = %addr, "remote admin API serving (mTLS, roles.yaml)");
        tasks.spawn(listeners::serve(
            "admin-tls",
            control.clone(),
            l,
            stop(),
            listeners::admin_tls_conn,
        ));
    }
    if let Some(addr) = cfg.metrics_listen {
        let l = bind_tcp("metrics_listen", addr).await?;
        tasks.spawn(listeners::serve(
            "metrics",
            control.clone(),
            l,
            stop(),
            listeners::metrics_conn,
        ));
    }
    if let Some(addr) = cfg.dashboard_listen {
        let l = bind_tcp("dashboard_listen", addr).await?;
        tracing::info!(dashboard = %format!("http://{addr}/"), "dashboard serving");
        let c = control.clone();
        let state = move || serde_json::to_vec(&c.dashboard_state());
        tasks.spawn(dashboard::serve_dashboard(l, state, stop()));
    }
    Ok(tasks)
}

async fn bind_tcp(field: &str, addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("{field} {addr}: cannot bind"))
}

fn bind_admin(path: &PathBuf) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("admin_socket {}: cannot bind", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}
