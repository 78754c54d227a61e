//! Start-up: the identity (files, or the state directory, or a fresh
//! enrollment), policies and the tracer become a [`Runtime`]; then the
//! background tasks start, each with the handles it uses.

use std::path::Path;
use std::sync::Arc;

use crank_api::proxy::ProxyConfig;

use super::{housekeeping, reload};
use crate::enroll::{AgentSeed, AgentStatus};
use crate::health::Health;
use crate::identity::WorkloadTls;
use crate::mesh::Mesh;
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::runtime::Runtime;

/// The runtime and what the tasks and the admin listener get besides it.
pub(super) struct App {
    pub rt: Arc<Runtime>,
    pub reloader: Arc<reload::Reloader>,
    pub mesh: Option<Arc<Mesh>>,
    pub enrollment: Option<Arc<AgentStatus>>,
    agent: Option<AgentSeed>,
}

/// Builds the runtime of a validated config.
pub(super) fn runtime(cfg: &ProxyConfig, base: &Path) -> anyhow::Result<App> {
    let metrics = Metrics::new();
    let (tls, agent) = load_identity(&cfg.identity, base, &metrics)?;
    if agent.is_none() {
        warn_if_expired(&tls);
    }
    let policies = match &cfg.policy {
        Some(p) => Policies::start(p, base, &metrics)?,
        None => Policies::none(),
    };
    tracing::info!(identity = %tls.identity, "loaded workload identity");
    let tracer = tracer(cfg, &tls, &metrics)?;
    let health = Arc::new(Health::new(metrics.inflight.clone(), metrics.ready.clone()));
    // Not ready once the own certificate has expired, static or enrolled:
    // every peer refuses it then, so load balancers should stop sending here.
    health.set_cert_expiry(Some(tls.summary().not_after));
    let mesh = Mesh::new(cfg, base, &metrics.registry)?;
    let mut rt = Runtime::new(cfg, tls, metrics, health);
    rt.policies = policies;
    rt.tracer = tracer;
    rt.refusals = mesh.as_ref().map(|m| m.refusals.clone());
    let rt = Arc::new(rt);
    Ok(App {
        reloader: Arc::new(reload::Reloader::new(rt.clone(), mesh.clone())),
        rt,
        enrollment: agent.as_ref().map(|a| a.status.clone()),
        agent,
        mesh,
    })
}

/// The span exporter and tracer, with `tracing`.
fn tracer(
    cfg: &ProxyConfig,
    tls: &WorkloadTls,
    metrics: &Metrics,
) -> anyhow::Result<Option<crate::tracing::Tracer>> {
    let Some(t) = &cfg.tracing else {
        return Ok(None);
    };
    let resource = crate::tracing::export::resource(t, &tls.identity);
    let export = crate::tracing::export::ExportMetrics {
        exported: metrics.spans_exported.clone(),
        dropped: metrics.spans_dropped.clone(),
    };
    let sink = crate::tracing::export::start(t, resource, export)?;
    metrics.sampling_ratio.set(t.sampling);
    Ok(Some(crate::tracing::Tracer::new(t.sampling, sink)))
}

impl App {
    /// The identity agent, the mesh watch and registration, housekeeping
    /// and the config watch.
    pub(super) fn spawn_tasks(&mut self, path: &Path) -> std::io::Result<()> {
        let rt = &self.rt;
        if let Some(agent) = self.agent.take() {
            let handles = crate::enroll::AgentHandles {
                tls: rt.tls.clone(),
                health: rt.health.clone(),
                metrics: rt.metrics.clone(),
            };
            crate::enroll::spawn(agent, handles)?;
        }
        if let Some(mesh) = &self.mesh {
            // Before serving: the last good routes from crank-control, if any.
            mesh.load_last_good(&*self.reloader);
            let handles = crate::mesh::Handles {
                tls: rt.tls.clone(),
                health: rt.health.clone(),
                metrics: rt.metrics.clone(),
                writer: self.reloader.clone(),
            };
            crate::mesh::spawn(mesh.clone(), handles)?;
        }
        crate::routing::init_circuit_gauges(&rt.routes.load(), None, &rt.metrics);
        let keys = rt.metrics.resilience.idempotency_keys.clone();
        housekeeping::spawn(rt.quotas.clone(), rt.idempotency.clone(), keys)?;
        // Start-up is over a few seconds from now (see trim.rs).
        super::trim::spawn(std::time::Duration::from_secs(5));
        let every = std::time::Duration::from_secs(1);
        reload::spawn(path.to_path_buf(), self.reloader.clone(), every)
    }
}

/// The workload's TLS state: from files (static), or from the state
/// directory or a fresh enrollment (`identity.enroll`), with the agent that
/// keeps it fresh.
fn load_identity(
    cfg: &crank_api::proxy::IdentityConfig,
    base: &Path,
    metrics: &Metrics,
) -> anyhow::Result<(WorkloadTls, Option<crate::enroll::AgentSeed>)> {
    if cfg.enroll.is_none() {
        return Ok((WorkloadTls::load(cfg, base, metrics)?, None));
    }
    let b = crate::enroll::bootstrap(cfg, base)?;
    let tls = WorkloadTls::from_material(b.material, metrics)
        .map_err(|e| anyhow::anyhow!("identity.enroll: the enrolled material: {e}"))?;
    metrics
        .identity
        .bundle_version
        .set(b.seed.bundle_version() as i64);
    Ok((tls, Some(b.seed)))
}

fn warn_if_expired(tls: &WorkloadTls) {
    let now = crate::clock::unix_now();
    let summary = tls.summary();
    if summary.not_after < now {
        tracing::error!(identity = %tls.identity, "this workload's certificate has expired; peers will refuse it and /ready answers 503 (cert-expired). Issue a new one with `crankctl cert issue`, or enroll with crank-control (identity.enroll) so it renews by itself");
    } else if summary.not_before > now {
        tracing::error!(identity = %tls.identity, "this workload's certificate is not valid yet; check the clock");
    }
}
