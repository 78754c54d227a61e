//! Wiring: config → host detection → registration → the mode's work →
//! graceful stop.
//!
//! Stop order on SIGTERM/SIGINT (both modes): deregister first, so callers
//! stop being sent here; then refuse new work (503 `draining`) and let the
//! work in flight finish (bounded); then stop the worker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use crank_plumbing::Signals;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, Shared};
use crate::config::{ExecConfig, Mode, Placement, ShimConfig};
use crate::host::energy::EnergyAccountant;
use crate::host::{self, GpuState, HostInfo, HostOptions, HostProbe};
use crate::jobs::queue::Devices;
use crate::jobs::store::RedbStore;
use crate::jobs::{ExecSettings, Manager};
use crate::listener;
use crate::metrics::{GpuMetrics, JobMetrics};
use crate::registration::{FileRegistrar, NoRegistrar, Registrar, ShimRegistration};

/// Labels announced for this worker: what the host detection found, then
/// the config's labels, which may add but not contradict detected ones
/// (`gpu=nvidia` on a host without a GPU would route GPU work here).
pub fn merged_labels(
    host: &HostInfo,
    configured: &BTreeMap<String, String>,
) -> (BTreeMap<String, String>, Vec<String>) {
    let mut labels = host::labels(host);
    let mut ignored = Vec::new();
    for (k, v) in configured {
        match labels.get(k) {
            Some(d) if d != v => ignored.push(format!(
                "label {k}={v} from config contradicts the detected {k}={d}; the detected value is announced"
            )),
            _ => {
                labels.insert(k.clone(), v.clone());
            }
        }
    }
    (labels, ignored)
}

pub fn gpu_indexes(host: &HostInfo) -> Vec<u32> {
    match &host.gpu {
        GpuState::Present { devices, .. } => devices.iter().map(|d| d.index).collect(),
        _ => Vec::new(),
    }
}

/// Runs the shim until a stop signal; returns once the worker is stopped.
pub async fn run(cfg: ShimConfig) -> anyhow::Result<()> {
    let (host_info, probe) = detect_host(&cfg);
    let registration = registration(&cfg, &host_info);
    let registrar: Arc<dyn Registrar> = match &cfg.registration_file {
        Some(p) => Arc::new(FileRegistrar { path: p.clone() }),
        None => Arc::new(NoRegistrar),
    };
    let registry = prometheus::Registry::new();
    let gpu_metrics = GpuMetrics::new(&registry)?;
    gpu_metrics.update(&probe.gpu_stats());
    let stop = stop_on_signal().context("installing the SIGTERM and SIGINT handlers")?;
    let listeners = Listeners::bind(&cfg).await?;
    let (ready_tx, ready_rx) = watch::channel(false);
    let shared = Shared {
        host: host_info,
        probe: Arc::new(probe),
        registration,
        registry,
        gpu_metrics,
        ready: ready_rx,
        manager: None,
        output_content_type: String::new(),
    };
    let ready = Ready {
        tx: ready_tx,
        registrar,
        stop,
    };
    match cfg.mode {
        Mode::Exec => run_exec(&cfg, shared, listeners, ready).await,
        Mode::Serve => run_serve(&cfg, shared, listeners, ready).await,
    }
}

/// Host detection, with what it found in the log.
fn detect_host(cfg: &ShimConfig) -> (HostInfo, HostProbe) {
    let (host_info, probe) = host::detect(&HostOptions {
        powercap_root: cfg.host.powercap_root.clone(),
        nvml: cfg.host.nvml,
        ..HostOptions::default()
    });
    match &host_info.gpu {
        GpuState::None { reason } => tracing::info!(%reason, "no GPU: gpu=none"),
        GpuState::Present { devices, .. } => {
            tracing::info!(gpus = devices.len(), "GPUs detected")
        }
    }
    (host_info, probe)
}

/// What this shim announces: its mode, address, identity, capability, and
/// the detected labels merged with the config's.
fn registration(cfg: &ShimConfig, host_info: &HostInfo) -> ShimRegistration {
    let (labels, ignored) = merged_labels(host_info, &cfg.labels);
    for w in ignored {
        tracing::warn!("{w}");
    }
    ShimRegistration {
        mode: match cfg.mode {
            Mode::Serve => "serve",
            Mode::Exec => "exec",
        }
        .to_string(),
        address: cfg.listen.to_string(),
        identity: cfg.identity.clone(),
        capabilities: vec![cfg.capability.clone()],
        labels,
    }
}

/// A watch that turns true at the first SIGTERM or SIGINT.
fn stop_on_signal() -> std::io::Result<watch::Receiver<bool>> {
    let mut signals = Signals::install()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        let which = signals.recv().await;
        tracing::info!(signal = which, "stop signal");
        let _ = stop_tx.send(true);
    });
    Ok(stop_rx)
}

/// The listeners, bound before anything is announced (a taken port stops
/// the start, naming the field).
struct Listeners {
    main: TcpListener,
    admin: Option<TcpListener>,
    /// Listeners close after the drain, so that new work meanwhile gets a
    /// clear 503 `draining` instead of a refused connection.
    close: watch::Sender<bool>,
}

impl Listeners {
    async fn bind(cfg: &ShimConfig) -> anyhow::Result<Listeners> {
        let main = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("listening on {} (listen)", cfg.listen))?;
        let admin = match cfg.admin_listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .with_context(|| format!("listening on {a} (admin_listen)"))?,
            ),
            None => None,
        };
        Ok(Listeners {
            main,
            admin,
            close: watch::channel(false).0,
        })
    }

    /// Serves the admin routes until the listeners close.
    fn spawn_admin(&mut self, shared: Arc<Shared>) {
        if let Some(l) = self.admin.take() {
            tokio::spawn(listener::serve(
                "admin_listen",
                l,
                move |req| api::admin(shared.clone(), req),
                self.close.subscribe(),
                Duration::from_secs(1),
            ));
        }
    }
}

/// Readiness, the registrar, and the stop signal.
struct Ready {
    tx: watch::Sender<bool>,
    registrar: Arc<dyn Registrar>,
    stop: watch::Receiver<bool>,
}

/// `exec` mode: the job API until a stop; then deregister, drain the
/// running jobs, close the listeners.
async fn run_exec(
    cfg: &ShimConfig,
    mut shared: Shared,
    mut listeners: Listeners,
    mut ready: Ready,
) -> anyhow::Result<()> {
    let exec = cfg.exec.as_ref().expect("validated: exec section");
    let manager = open_manager(cfg, exec, &shared).await?;
    shared.manager = Some(manager.clone());
    shared.output_content_type = exec.output.content_type.clone();
    let shared = Arc::new(shared);
    listeners.spawn_admin(shared.clone());
    let main = {
        let s = shared.clone();
        // Downloads in flight get a few seconds to finish.
        tokio::spawn(listener::serve(
            "listen",
            listeners.main,
            move |req| api::jobs(s.clone(), req),
            listeners.close.subscribe(),
            Duration::from_secs(5),
        ))
    };
    // Ready to take jobs now; registration is retried until it works (the
    // serve mode does the same).
    let _ = ready.tx.send(true);
    spawn_registration(ready.registrar.clone(), shared.registration.clone());
    tracing::info!(listen = %cfg.listen, capability = %cfg.capability, "crank-shim ready (exec)");

    let _ = ready.stop.wait_for(|s| *s).await;
    tracing::info!("stopping: deregistering, then draining running jobs");
    let _ = ready.tx.send(false);
    if let Err(e) = ready.registrar.deregister().await {
        tracing::warn!(error = %e, "deregistration failed");
    }
    manager.drain(exec.drain_timeout).await;
    let _ = listeners.close.send(true);
    let _ = main.await;
    tracing::info!("crank-shim stopped");
    Ok(())
}

/// The job manager on this host's devices, its store recovered and its
/// dispatcher running.
async fn open_manager(
    cfg: &ShimConfig,
    exec: &ExecConfig,
    shared: &Shared,
) -> anyhow::Result<Arc<Manager>> {
    let mut settings = ExecSettings::from_config(&cfg.capability, exec)
        .map_err(|e| anyhow::anyhow!("exec: {e}"))?;
    let cluster = crate::jobs::cluster::connect(&cfg.capability, exec, &shared.host).await?;
    settings.usage_source = cluster.as_ref().map(|c| c.queue.usage_source());
    let devices = devices(exec, &shared.host)?;
    let store = Arc::new(RedbStore::open(&exec.store_path())?);
    let energy = Arc::new(EnergyAccountant::new(shared.probe.energy_sources()));
    tokio::spawn(energy.clone().run_sampler(cfg.host.energy_sample_interval));
    let job_metrics = JobMetrics::new(&shared.registry)?;
    let (manager, recovery) = Manager::open(settings, store, devices, energy, job_metrics)
        .map_err(|e| anyhow::anyhow!(e))?;
    let host = cluster
        .as_ref()
        .map_or(shared.host.hostname.clone(), |c| c.queue.host.clone());
    manager.attach(host, cluster, exec.queue.preemption());
    if recovery.queued > 0 || !recovery.interrupted.is_empty() {
        tracing::info!(
            queued = recovery.queued,
            interrupted = ?recovery.interrupted,
            "job store recovered"
        );
    }
    tokio::spawn(manager.clone().run());
    tracing::info!(enforcement = manager.settings.enforcer.name(), "job limits");
    crate::cron::spawn(&manager);
    Ok(manager)
}

/// The device slots `exec.devices` asks for on this host; refused when no
/// job could ever run.
fn devices(exec: &ExecConfig, host_info: &HostInfo) -> anyhow::Result<Devices> {
    let gpus = gpu_indexes(host_info);
    if exec.devices.placement == Placement::Gpu && gpus.is_empty() {
        let reason = match &host_info.gpu {
            GpuState::None { reason } => reason.clone(),
            _ => "no usable GPU".into(),
        };
        anyhow::bail!(
            "exec.devices.placement is `gpu` but this host has no GPU ({reason}); \
             set placement to `any` or `cpu`, or run this shim on a GPU host"
        );
    }
    let devices = Devices::new(
        &gpus,
        exec.devices.sessions_per_gpu,
        exec.cpu_slots(host_info.cpu.cores),
        exec.devices.placement != Placement::Cpu,
        exec.devices.placement != Placement::Gpu,
    );
    if devices.capacity() == 0 {
        anyhow::bail!(
            "no job could ever run here: this host has no GPU and exec.devices.cpu_slots is 0; \
             give cpu_slots at least 1"
        );
    }
    Ok(devices)
}

/// Registers in the background, retrying every 5 s until it works.
fn spawn_registration(registrar: Arc<dyn Registrar>, registration: ShimRegistration) {
    tokio::spawn(async move {
        while let Err(e) = registrar.register(&registration).await {
            tracing::warn!(error = %e, "registration failed; retrying in 5s");
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
}

/// `serve` mode: the supervisor and the front proxy (see [`crate::serve`]).
async fn run_serve(
    cfg: &ShimConfig,
    shared: Shared,
    mut listeners: Listeners,
    ready: Ready,
) -> anyhow::Result<()> {
    let serve_cfg = cfg.serve.clone().expect("validated: serve section");
    let metrics = crate::serve::ServeMetrics::new(&shared.registry);
    let registration = shared.registration.clone();
    listeners.spawn_admin(Arc::new(shared));
    let mut stop = ready.stop;
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let res = crate::serve::run(
        serve_cfg,
        listeners.main,
        ready.registrar,
        registration,
        metrics,
        shutdown,
        ready.tx,
    )
    .await;
    let _ = listeners.close.send(true);
    res
}
