//! Wiring: config → host detection → registration → the mode's work →
//! graceful stop.
//!
//! Stop order on SIGTERM/SIGINT (both modes): deregister first, so callers
//! stop being sent here; then refuse new work (503 `draining`) and let the
//! work in flight finish (bounded); then stop the worker.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, Shared};
use crate::config::{Mode, Placement, ShimConfig};
use crate::host::energy::EnergyAccountant;
use crate::host::{self, GpuState, HostInfo, HostOptions};
use crate::jobs::manager::{ExecSettings, Manager};
use crate::jobs::queue::Devices;
use crate::jobs::store::RedbStore;
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
    let (labels, ignored) = merged_labels(&host_info, &cfg.labels);
    for w in ignored {
        tracing::warn!("{w}");
    }
    let registration = ShimRegistration {
        mode: match cfg.mode {
            Mode::Serve => "serve",
            Mode::Exec => "exec",
        }
        .to_string(),
        address: cfg.listen.to_string(),
        identity: cfg.identity.clone(),
        capabilities: vec![cfg.capability.clone()],
        labels,
    };
    let registrar: Arc<dyn Registrar> = match &cfg.registration_file {
        Some(p) => Arc::new(FileRegistrar { path: p.clone() }),
        None => Arc::new(NoRegistrar),
    };
    let registry = prometheus::Registry::new();
    let gpu_metrics = GpuMetrics::new(&registry)?;
    gpu_metrics.update(&probe.gpu_stats());
    let probe = Arc::new(probe);

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        stop_signal().await;
        let _ = stop_tx.send(true);
    });
    let (ready_tx, ready_rx) = watch::channel(false);
    // Listeners close after the drain, so that new work meanwhile gets a
    // clear 503 `draining` instead of a refused connection.
    let (close_tx, close_rx) = watch::channel(false);

    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {} (listen)", cfg.listen))?;
    let admin_listener = match cfg.admin_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("listening on {a} (admin_listen)"))?,
        ),
        None => None,
    };

    match cfg.mode {
        Mode::Exec => {
            let exec = cfg.exec.as_ref().expect("validated: exec section");
            let gpus = gpu_indexes(&host_info);
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
            let settings = ExecSettings::from_config(&cfg.capability, exec)
                .map_err(|e| anyhow::anyhow!("exec: {e}"))?;
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
            let store = Arc::new(RedbStore::open(&exec.store_path())?);
            let energy = Arc::new(EnergyAccountant::new(probe.energy_sources()));
            tokio::spawn(energy.clone().run_sampler(cfg.host.energy_sample_interval));
            let job_metrics = JobMetrics::new(&registry)?;
            let (manager, recovery) = Manager::open(settings, store, devices, energy, job_metrics)
                .map_err(|e| anyhow::anyhow!(e))?;
            if recovery.queued > 0 || !recovery.interrupted.is_empty() {
                tracing::info!(
                    queued = recovery.queued,
                    interrupted = ?recovery.interrupted,
                    "job store recovered"
                );
            }
            tokio::spawn(manager.clone().run());
            let shared = Arc::new(Shared {
                host: host_info,
                probe,
                registration: registration.clone(),
                registry,
                gpu_metrics,
                ready: ready_rx,
                manager: Some(manager.clone()),
                output_content_type: exec.output.content_type.clone(),
            });
            let main = {
                let s = shared.clone();
                // Downloads in flight get a few seconds to finish.
                tokio::spawn(crate::listener::serve(
                    listener,
                    move |req| api::jobs(s.clone(), req),
                    close_rx.clone(),
                    std::time::Duration::from_secs(5),
                ))
            };
            spawn_admin(admin_listener, shared.clone(), close_rx.clone());
            // Ready to take jobs now; registration is retried until it works
            // (the serve mode does the same).
            let _ = ready_tx.send(true);
            {
                let (registrar, registration) = (registrar.clone(), registration.clone());
                tokio::spawn(async move {
                    while let Err(e) = registrar.register(&registration).await {
                        tracing::warn!(error = %e, "registration failed; retrying in 5s");
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    }
                });
            }
            tracing::info!(listen = %cfg.listen, capability = %cfg.capability, "crank-shim ready (exec)");

            let mut stop = stop_rx.clone();
            let _ = stop.wait_for(|s| *s).await;
            tracing::info!("stopping: deregistering, then draining running jobs");
            let _ = ready_tx.send(false);
            if let Err(e) = registrar.deregister().await {
                tracing::warn!(error = %e, "deregistration failed");
            }
            manager.drain(exec.drain_timeout).await;
            let _ = close_tx.send(true);
            let _ = main.await;
            tracing::info!("crank-shim stopped");
            Ok(())
        }
        Mode::Serve => {
            let serve_cfg = cfg.serve.clone().expect("validated: serve section");
            let shared = Arc::new(Shared {
                host: host_info,
                probe,
                registration: registration.clone(),
                registry: registry.clone(),
                gpu_metrics,
                ready: ready_rx,
                manager: None,
                output_content_type: String::new(),
            });
            spawn_admin(admin_listener, shared, close_rx);
            let metrics = crate::serve::ServeMetrics::new(&registry);
            let mut stop = stop_rx.clone();
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let res = crate::serve::run(
                serve_cfg,
                listener,
                registrar,
                registration,
                metrics,
                shutdown,
                ready_tx,
            )
            .await;
            let _ = close_tx.send(true);
            res
        }
    }
}

fn spawn_admin(listener: Option<TcpListener>, shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    if let Some(l) = listener {
        tokio::spawn(crate::listener::serve(
            l,
            move |req| api::admin(shared.clone(), req),
            stop,
            std::time::Duration::from_secs(1),
        ));
    }
}

/// SIGTERM or SIGINT.
pub async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
