//! The app: wiring, background tasks and the writers. Turns a validated
//! config into a [`crate::runtime::Runtime`], the Pingora services (inbound mTLS, outbound
//! HTTP proxy and local ports) and the admin listener, starts the tasks
//! (identity agent, mesh watch, config watch, housekeeping), each with the
//! handles it uses, and runs until SIGTERM has drained the proxy.

pub mod admin;
pub mod dump;
pub mod housekeeping;
pub mod reload;
mod services;
mod start;
pub mod trim;

use std::path::Path;
use std::sync::Arc;

use pingora_core::server::{RunArgs, ShutdownSignalWatch};

use crate::drain::DrainSignal;
use crate::identity::WorkloadTls;
use crate::metrics::Metrics;
use crate::policy::Policies;

/// Everything a start checks before listening: the config, then the
/// identity material (key matches cert, cert carries a Crank identity,
/// bundle holds usable roots). `crank-proxy --check` runs exactly this.
pub fn check(path: &Path) -> anyhow::Result<crank_api::proxy::ProxyConfig> {
    let cfg = crate::config::load(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    if cfg.identity.enroll.is_some() {
        crate::enroll::check(&cfg.identity, base)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    } else {
        WorkloadTls::load(&cfg.identity, base, &Metrics::new())
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    if let Some(p) = &cfg.policy {
        Policies::load(p, base).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    Ok(cfg)
}

/// Loads the config at `path` and runs the proxy until it is told to stop.
pub fn run(path: &Path) -> anyhow::Result<()> {
    let in_file = |e: &dyn std::fmt::Display| anyhow::anyhow!("{}: {e}", path.display());
    let cfg = crate::config::load(path)?;
    check_bindable(&cfg).map_err(|e| in_file(&e))?;
    if let Some(c) = &cfg.capture {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        crate::capture::config::uid_problem(c, euid).map_or(Ok(()), |e| Err(in_file(&e)))?;
    }
    let admin_listener = std::net::TcpListener::bind(cfg.admin.listen).map_err(|e| {
        let addr = cfg.admin.listen;
        in_file(&format!("admin.listen: cannot listen on {addr}: {e}"))
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut app = start::runtime(&cfg, base).map_err(|e| in_file(&e))?;
    app.spawn_tasks(path)?;
    let server = services::server(&cfg, &app.rt)?;
    let admin = admin::AdminState {
        rt: app.rt.clone(),
        reloader: app.reloader.clone(),
        enrollment: app.enrollment.clone(),
        mesh: app.mesh.clone(),
    };
    admin::spawn(admin_listener, Arc::new(admin))?;
    let mut ports: Vec<u16> = cfg.inbound.iter().map(|i| i.listen.port()).collect();
    ports.extend(cfg.outbound.http_proxy.map(|a| a.port()));
    ports.extend(cfg.outbound.ports.iter().map(|p| p.listen.port()));
    if let Some(c) = &cfg.capture {
        ports.extend(
            crate::capture::config::listen_addrs(c)
                .iter()
                .map(|(_, a)| a.port()),
        );
    }
    let health = app.rt.health.clone();
    crate::health::ready_when_listening(health, ports, std::time::Duration::from_secs(30));
    tracing::info!(
        inbound = ?cfg.inbound.as_ref().map(|i| i.listen),
        outbound_proxy = ?cfg.outbound.http_proxy,
        ports = cfg.outbound.ports.len(),
        admin = %cfg.admin.listen,
        "crank-proxy starting"
    );
    let shutdown_signal = shutdown_signal(&cfg, &app);
    server.run(RunArgs { shutdown_signal });
    Ok(())
}

/// SIGTERM drains; with `mesh.register` the workload deregisters first.
fn shutdown_signal(
    cfg: &crank_api::proxy::ProxyConfig,
    app: &start::App,
) -> Box<dyn ShutdownSignalWatch> {
    let drain = DrainSignal {
        health: app.rt.health.clone(),
        deadline: cfg.drain.deadline,
    };
    match app.mesh.clone().filter(|m| m.cfg.register.is_some()) {
        Some(mesh) => Box::new(crate::mesh::register::DeregisterFirst { mesh, drain }),
        None => Box::new(drain),
    }
}

/// Fails fast, naming the field, when a listen address is taken: Pingora
/// would retry and then panic inside a service thread, leaving the other
/// listeners (and /ready) up.
fn check_bindable(cfg: &crank_api::proxy::ProxyConfig) -> Result<(), String> {
    let mut addrs = vec![("admin.listen".to_string(), cfg.admin.listen)];
    if let Some(i) = &cfg.inbound {
        addrs.push(("inbound.listen".into(), i.listen));
    }
    if let Some(p) = cfg.outbound.http_proxy {
        addrs.push(("outbound.http_proxy".into(), p));
    }
    for (i, p) in cfg.outbound.ports.iter().enumerate() {
        addrs.push((format!("outbound.ports[{i}].listen"), p.listen));
    }
    if let Some(c) = &cfg.capture {
        addrs.extend(crate::capture::config::listen_addrs(c));
    }
    for (field, addr) in addrs {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            return Err(format!("{field}: cannot listen on {addr}: {e}; stop whatever holds the port or choose another"));
        }
    }
    Ok(())
}
