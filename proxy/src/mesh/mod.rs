//! Config distribution from crank-control (`mesh`): this proxy's routes,
//! quotas and policies come from the control plane, and its local workload
//! is registered in the control plane's registry.
//!
//! - At start ([`Mesh::load_last_good`], before Pingora serves): the last
//!   applied update in `state_dir/mesh.json` is applied, so a restart while
//!   crank-control is away serves what it served before (static
//!   stability). Without it the file's routes and quotas serve.
//! - While running ([`spawn`], its own thread and runtime): [`watch`]
//!   long-polls `GET /v1/mesh/watch` and applies each new version whole
//!   ([`merge`] then [`crate::reload::apply`]), or refuses it whole;
//!   [`register`] keeps this workload's lease in the registry alive;
//!   [`report`] posts this proxy's traffic to crank-control's dashboard.
//! - On SIGTERM ([`register::DeregisterFirst`]): the registration is
//!   removed before the drain starts, so peers stop sending here.
//!
//! Calls to crank-control use the identity agent's client
//! ([`crate::enroll::client`]) with the current certificate and bundle
//! from [`crate::identity::WorkloadTls`].

pub mod merge;
pub mod metrics;
pub mod register;
pub mod report;
pub mod store;
pub mod watch;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crank_api::mesh::MeshUpdate;
use crank_api::proxy::{MeshConfig, ProxyConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, oneshot};

use crate::enroll::client::{Client, ClientCert};
use crate::health::Health;
use crate::identity::WorkloadTls;
use crate::metrics::Metrics;
use metrics::MeshMetrics;

/// Why the mesh part could not be set up (at start only; while running,
/// every error is retried).
#[derive(Debug, thiserror::Error)]
#[error("mesh: {0}")]
pub struct MeshError(pub String);

/// Where the running routes and quotas came from, for `/config_dump`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The config file: nothing was ever received.
    File,
    /// `state_dir/mesh.json`, loaded at start.
    Disk,
    /// Received from crank-control since start.
    Pushed,
}

/// The mesh part's progress, for `/config_dump`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MeshStatus {
    pub source: Source,
    pub seq: Option<u64>,
    pub hash: Option<String>,
    /// crank-control's fingerprint of the endpoints (and quotas) this
    /// proxy's routes were resolved with (the watch's `registry`); not the
    /// registry's own version that `crankctl endpoints` shows.
    pub endpoints_fingerprint: Option<u64>,
    pub routes: usize,
    pub last_update_time: Option<i64>,
    pub last_error: Option<String>,
    pub last_rejected: Option<String>,
    pub lease: Option<String>,
    pub last_registration_error: Option<String>,
    pub registration: Option<crank_api::mesh::EndpointRegistration>,
    pub control_plane: String,
    pub state_file: String,
    pub policy_dir: Option<String>,
}

/// The one writer of the running config's live fields (implemented by
/// the app's reloader): the mesh watch and the config file watch apply
/// through it, one at a time.
pub trait ConfigWriter: Send + Sync {
    /// The running config.
    fn running(&self) -> Arc<ProxyConfig>;
    /// Under the writers' lock: `change` makes the config to run from the
    /// running one, or says why not; a config that differs is applied.
    fn change(
        &self,
        change: &mut dyn FnMut(&ProxyConfig) -> Result<ProxyConfig, String>,
    ) -> Result<(), String>;
}

/// What the mesh tasks use of the running proxy: its identity (to call
/// crank-control), readiness, metrics and the config writer.
pub struct Handles {
    pub tls: Arc<WorkloadTls>,
    pub health: Arc<Health>,
    pub metrics: Metrics,
    pub writer: Arc<dyn ConfigWriter>,
}

/// The mesh part: settings, the applied update and its status.
pub struct Mesh {
    pub cfg: MeshConfig,
    /// The config file's directory: relative paths resolve against it.
    pub base: PathBuf,
    pub state_dir: PathBuf,
    pub policy_dir: Option<PathBuf>,
    pub client: Client,
    /// The enrolled instance id (`identity.enroll.state_dir/instance`).
    pub instance: String,
    pub metrics: MeshMetrics,
    /// The update the running routes and quotas come from.
    applied: Mutex<Option<Arc<MeshUpdate>>>,
    status: Mutex<MeshStatus>,
    /// Asks the registration task to deregister and stop (SIGTERM).
    stop: Mutex<Option<mpsc::Sender<oneshot::Sender<()>>>>,
    stop_rx: Mutex<Option<mpsc::Receiver<oneshot::Sender<()>>>>,
    /// Pushed policies without a `policy_dir` were logged once.
    policies_ignored: AtomicBool,
    /// Policy denials and shed requests for the next traffic report.
    pub refusals: Arc<report::RefusalRing>,
}

impl Mesh {
    /// Sets up the mesh part of a validated config; `None` without `mesh`.
    pub fn new(
        cfg: &ProxyConfig,
        base: &Path,
        registry: &prometheus::Registry,
    ) -> Result<Option<Arc<Mesh>>, MeshError> {
        let (Some(m), Some(e)) = (&cfg.mesh, &cfg.identity.enroll) else {
            return Ok(None);
        };
        let enroll_dir = crate::config::resolve(base, &e.state_dir);
        let state_dir = crate::config::resolve(base, m.state_dir.as_ref().unwrap_or(&e.state_dir));
        crate::enroll::state::ensure_dir(&state_dir).map_err(|err| {
            MeshError(format!(
                "state_dir: cannot create {}: {err}; give a directory the proxy may write",
                state_dir.display()
            ))
        })?;
        let instance = crate::enroll::state::instance_id(&enroll_dir).map_err(|err| {
            MeshError(format!(
                "cannot read {}/instance: {err}",
                enroll_dir.display()
            ))
        })?;
        let client = Client::new(&e.control_plane, &e.server_name()).map_err(MeshError)?;
        crate::enroll::client::register_metrics(registry);
        let policy_dir = m
            .policy_dir
            .as_ref()
            .map(|p| crate::config::resolve(base, p));
        let (stop_tx, stop_rx) = mpsc::channel(1);
        let status = MeshStatus {
            source: Source::File,
            seq: None,
            hash: None,
            endpoints_fingerprint: None,
            routes: cfg.routes.len(),
            last_update_time: None,
            last_error: None,
            last_rejected: None,
            lease: None,
            last_registration_error: None,
            registration: None,
            control_plane: e.control_plane.to_string(),
            state_file: store::state_file(&state_dir).display().to_string(),
            policy_dir: policy_dir.as_ref().map(|p| p.display().to_string()),
        };
        Ok(Some(Arc::new(Mesh {
            cfg: m.clone(),
            base: base.to_path_buf(),
            state_dir,
            policy_dir,
            client,
            instance,
            metrics: MeshMetrics::new(registry),
            applied: Mutex::new(None),
            status: Mutex::new(status),
            stop: Mutex::new(Some(stop_tx)),
            stop_rx: Mutex::new(Some(stop_rx)),
            policies_ignored: AtomicBool::new(false),
            refusals: Default::default(),
        })))
    }

    /// The update the running routes and quotas come from, if any.
    pub fn applied(&self) -> Option<Arc<MeshUpdate>> {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Makes `u` the applied update; returns the one before it.
    fn set_applied(&self, u: Arc<MeshUpdate>) -> Option<Arc<MeshUpdate>> {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(u)
    }

    pub(crate) fn update_status(&self, f: impl FnOnce(&mut MeshStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Forgets the last refused update once a good one applied (like
    /// crank-control, which clears its own refusal when the directory is
    /// valid again); returns it so the caller can log that it cleared.
    pub(crate) fn clear_rejected(&self) -> Option<String> {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_rejected
            .take()
    }

    /// A copy of the status.
    pub fn status(&self) -> MeshStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The `mesh` object of `/config_dump`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.status()).unwrap_or_default()
    }

    /// Applies `state_dir/mesh.json` when it exists and still fits this
    /// config (static stability across restarts). Never fails the start:
    /// an unusable file is logged and the file config serves.
    pub fn load_last_good(&self, writer: &dyn ConfigWriter) {
        let path = store::state_file(&self.state_dir);
        let update = match store::load(&self.state_dir) {
            Ok(Some(u)) => u,
            Ok(None) => {
                tracing::info!(file = %path.display(), "no last good mesh config yet; serving the config file's routes and quotas until crank-control answers");
                return;
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot use the last good mesh config; serving the config file's routes and quotas until crank-control answers");
                return;
            }
        };
        match self.apply(writer, update, Source::Disk) {
            Ok(u) => {
                tracing::info!(seq = u.version.seq, hash = %u.version.hash, endpoints_fingerprint = u.registry, routes = u.routes.len(), file = %path.display(), "loaded last good mesh config")
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "the last good mesh config no longer fits this proxy's config; serving the config file's routes and quotas until crank-control answers")
            }
        }
    }

    /// Checks an update against the running config and applies it whole,
    /// or changes nothing and says why.
    pub fn apply(
        &self,
        writer: &dyn ConfigWriter,
        update: MeshUpdate,
        source: Source,
    ) -> Result<Arc<MeshUpdate>, String> {
        let update = Arc::new(update);
        let mut before = None;
        writer.change(&mut |running| {
            let new = merge::merged(running, &update)?;
            merge::check_policy_names(&update.policies)?;
            crate::config::validate_pushed(&merge::origin(&update), &new, &self.base)
                .map_err(|e| e.to_string())?;
            before = self.set_applied(update.clone());
            Ok(new)
        })?;
        let mut errors = Vec::new();
        match &self.policy_dir {
            Some(dir) => {
                let before: Vec<&String> = before.iter().flat_map(|u| u.policies.keys()).collect();
                if let Err(e) = store::write_policies(dir, &update.policies, &before) {
                    errors.push(format!("policy_dir {}: {e}", dir.display()));
                }
            }
            None if !update.policies.is_empty()
                && !self.policies_ignored.swap(true, Ordering::Relaxed) =>
            {
                tracing::warn!(files = update.policies.len(), "crank-control sends policies, but mesh.policy_dir is not set; they are ignored");
            }
            None => {}
        }
        if source == Source::Pushed {
            if let Err(e) = store::save(&self.state_dir, &update) {
                errors.push(format!(
                    "cannot save {}: {e}; a restart serves the previous version",
                    store::state_file(&self.state_dir).display()
                ));
            }
        }
        for e in &errors {
            tracing::error!(error = %e, "mesh config applied, but not kept on disk");
        }
        self.metrics.seq.set(update.version.seq as i64);
        self.metrics
            .endpoints_fingerprint
            .set(update.registry as i64);
        self.update_status(|s| {
            s.source = source;
            s.seq = Some(update.version.seq);
            s.hash = Some(update.version.hash.clone());
            s.endpoints_fingerprint = Some(update.registry);
            s.routes = update.routes.len();
            s.last_update_time = Some(crate::clock::unix_now());
            s.last_error = errors.into_iter().next();
        });
        Ok(update)
    }

    /// Removes this workload from the registry before a drain, waiting at
    /// most `timeout`. Does nothing without `mesh.register`.
    pub async fn deregister_now(&self, timeout: std::time::Duration) {
        let stop = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(stop) = stop else { return };
        let (ack_tx, ack_rx) = oneshot::channel();
        if stop.send(ack_tx).await.is_err() {
            return;
        }
        if tokio::time::timeout(timeout, ack_rx).await.is_err() {
            tracing::warn!(timeout = ?timeout, "deregistration did not finish in time; draining anyway (the lease expires by itself)");
        }
    }
}

/// The certificate and roots to call crank-control with: the workload's
/// current ones (the identity agent swaps them in place).
pub fn credentials(
    tls: &WorkloadTls,
) -> Result<(ClientCert, Vec<CertificateDer<'static>>), String> {
    let ck = tls.client_cert();
    let mut chain = vec![CertificateDer::from(ck.leaf().borrow_raw_cert().clone())];
    chain.extend(
        ck.intermediates()
            .into_iter()
            .map(|c| CertificateDer::from(c.borrow_raw_cert().clone())),
    );
    let key = PrivateKeyDer::try_from(ck.key().clone())
        .map_err(|e| format!("our private key cannot be used as a client key: {e}"))?;
    let roots = tls
        .bundle()
        .iter()
        .map(|r| CertificateDer::from(r.borrow_raw_cert().clone()))
        .collect();
    Ok((ClientCert { chain, key }, roots))
}

/// Runs the watch and the registration on their own thread and runtime.
pub fn spawn(mesh: Arc<Mesh>, handles: Handles) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stop_rx = mesh
        .stop_rx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    std::thread::Builder::new()
        .name("crank-mesh".into())
        .spawn(move || {
            rt.block_on(async {
                let reg = async {
                    if let (Some(r), Some(stop)) = (&mesh.cfg.register, stop_rx) {
                        register::run(&mesh, &handles, r, stop).await;
                    }
                };
                tokio::join!(
                    watch::run(&mesh, &handles),
                    reg,
                    report::run(&mesh, &handles)
                );
            })
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_the_workloads_current_ones() {
        let m = crate::identity::tests::test_material();
        let chain = m.chain.clone();
        let tls = WorkloadTls::from_material(m, &crate::metrics::Metrics::new()).unwrap();
        let (cert, roots) = credentials(&tls).unwrap();
        assert_eq!(cert.chain, chain);
        assert_eq!(roots.len(), 1);
        // the key still signs for the chain: usable as a client certificate
        crate::identity::certified_key(&cert.chain, &cert.key).unwrap();
    }
}
