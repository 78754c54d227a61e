//! The app: wiring, background tasks and the writers. Turns a validated
//! config into a [`Runtime`], the Pingora services (inbound mTLS, outbound
//! HTTP proxy and local ports) and the admin listener, starts the tasks
//! (identity agent, mesh watch, config watch, housekeeping), each with the
//! handles it uses, and runs until SIGTERM has drained the proxy.

pub mod admin;
pub mod dump;
pub mod housekeeping;
pub mod reload;

use std::path::Path;
use std::sync::Arc;

use pingora_core::apps::HttpServerOptions;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{RunArgs, Server};
use pingora_core::services::listening::Service;
use pingora_core::services::ServiceWithDependents;
use pingora_proxy::HttpProxy;

use crate::conn::{Listener, ListenerLimits};
use crate::direction::Direction;
use crate::drain::DrainSignal;
use crate::health::Health;
use crate::identity::{PlaintextGuard, WorkloadTls};
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::request::MeshProxy;
use crate::runtime::Runtime;

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
    let cfg = crate::config::load(path)?;
    check_bindable(&cfg).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let admin_listener = std::net::TcpListener::bind(cfg.admin.listen).map_err(|e| {
        anyhow::anyhow!(
            "{}: admin.listen: cannot listen on {}: {e}",
            path.display(),
            cfg.admin.listen
        )
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let metrics = Metrics::new();
    let (tls, agent) = load_identity(&cfg.identity, base, &metrics)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if agent.is_none() {
        warn_if_expired(&tls);
    }
    let policies = match &cfg.policy {
        Some(p) => Policies::start(p, base, &metrics)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        None => Policies::none(),
    };
    tracing::info!(identity = %tls.identity, "loaded workload identity");
    let tracer = match &cfg.tracing {
        Some(t) => {
            let resource = crate::otlp::resource(t, &tls.identity);
            let sink = crate::otlp::start(
                t,
                resource,
                crate::otlp::ExportMetrics {
                    exported: metrics.spans_exported.clone(),
                    dropped: metrics.spans_dropped.clone(),
                },
            )
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            metrics.sampling_ratio.set(t.sampling);
            Some(crate::spans::Tracer::new(t.sampling, sink))
        }
        None => None,
    };

    let health = Arc::new(Health::new(metrics.inflight.clone(), metrics.ready.clone()));
    // Not ready once the own certificate has expired, static or enrolled:
    // every peer refuses it then, so load balancers should stop sending here.
    health.set_cert_expiry(Some(tls.summary().not_after));
    let mesh = crate::mesh::Mesh::new(&cfg, base, &metrics.registry)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut rt = Runtime::new(&cfg, tls, metrics.clone(), health.clone());
    rt.policies = policies;
    rt.tracer = tracer;
    rt.refusals = mesh.as_ref().map(|m| m.refusals.clone());
    let rt = Arc::new(rt);
    let reloader = Arc::new(reload::Reloader::new(rt.clone(), mesh.clone()));
    let enrollment = agent.as_ref().map(|a| a.status.clone());
    if let Some(agent) = agent {
        let handles = crate::enroll::AgentHandles {
            tls: rt.tls.clone(),
            health: health.clone(),
            metrics: metrics.clone(),
        };
        crate::enroll::spawn(agent, handles)?;
    }
    if let Some(mesh) = &mesh {
        // Before serving: the last good routes from crank-control, if any.
        mesh.load_last_good(&*reloader);
        let handles = crate::mesh::Handles {
            tls: rt.tls.clone(),
            health: health.clone(),
            metrics: metrics.clone(),
            writer: reloader.clone(),
        };
        crate::mesh::spawn(mesh.clone(), handles)?;
    }
    crate::routing::init_circuit_gauges(&rt.routes.load(), None, &metrics);
    housekeeping::spawn(
        rt.quotas.clone(),
        rt.idempotency.clone(),
        metrics.resilience.idempotency_keys.clone(),
    )?;
    reload::spawn(
        path.to_path_buf(),
        reloader.clone(),
        std::time::Duration::from_secs(1),
    )?;

    let mut conf = ServerConf {
        threads: cfg.threads,
        grace_period_seconds: Some(cfg.drain.deadline.as_secs() + 1),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    conf.upstream_keepalive_pool_size = 256;
    // One current-thread runtime per worker thread instead of Tokio's
    // work-stealing scheduler: a connection stays on one thread, with fewer
    // cross-thread wake-ups. Measured ~25% more requests per CPU second on
    // the sidecar pair (docs/benchmarks.md).
    conf.work_stealing = false;
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let conf = server.configuration.clone();

    crate::conn::raise_nofile_limit();
    let all_open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    crate::conn::spawn_trimmer(all_open.clone())?;
    let limits = |direction: &'static str, max_connections: usize| ListenerLimits {
        direction,
        max_connections,
        head_timeout: cfg.limits.request_head_timeout,
        idle_timeout: cfg.limits.idle_timeout,
        refused: metrics
            .connections_refused
            .with_label_values(&[direction, "limit"]),
        head_timeouts: metrics
            .request_head_timeouts
            .with_label_values(&[direction]),
        open_gauge: metrics.open_connections.with_label_values(&[direction]),
        all_open: all_open.clone(),
        identity: Arc::from(rt.me.spiffe_id.as_str()),
    };
    let mut services: Vec<Box<dyn ServiceWithDependents>> = Vec::new();
    if let Some(inb) = &cfg.inbound {
        let mut proxy = HttpProxy::new(
            MeshProxy {
                direction: Direction::Inbound,
                rt: rt.clone(),
                app: Some((inb.app, inb.app_protocol)),
            },
            conf.clone(),
        );
        proxy.handle_init_modules();
        proxy.h2_options = Some(h2_options(&cfg.limits));
        let mut opts = HttpServerOptions::default();
        opts.h2_idle_timeout = Some(cfg.limits.idle_timeout);
        proxy.server_options = Some(opts);
        let listener = Listener::new(proxy, limits("inbound", cfg.limits.inbound_max_connections));
        let mut svc = Service::new("crank inbound".into(), listener);
        let settings = rt.tls.server_settings(&metrics);
        svc.add_tls_with_settings(&inb.listen.to_string(), None, settings);
        svc.endpoints()
            .set_pre_tls_callback(Arc::new(PlaintextGuard {
                failures: metrics.handshake_failures.clone(),
                identity: rt.me.spiffe_id.clone(),
            }));
        services.push(Box::new(svc));
    }
    let out = &cfg.outbound;
    if out.http_proxy.is_some() || !out.ports.is_empty() {
        let mut proxy = HttpProxy::new(
            MeshProxy {
                direction: Direction::Outbound,
                rt: rt.clone(),
                app: None,
            },
            conf.clone(),
        );
        proxy.handle_init_modules();
        let mut opts = HttpServerOptions::default();
        opts.h2c = true;
        opts.h2_idle_timeout = Some(cfg.limits.idle_timeout);
        proxy.server_options = Some(opts);
        proxy.h2_options = Some(h2_options(&cfg.limits));
        let listener = Listener::new(
            proxy,
            limits("outbound", cfg.limits.outbound_max_connections),
        );
        let mut svc = Service::new("crank outbound".into(), listener);
        for addr in out
            .http_proxy
            .iter()
            .chain(out.ports.iter().map(|p| &p.listen))
        {
            svc.add_listener(
                pingora_core::listeners::ListenerConfig::tcp(addr.to_string())
                    .l4_buffer(outbound_l4_buffer()),
            );
        }
        services.push(Box::new(svc));
    }
    server.add_services(services);

    let admin = admin::AdminState {
        rt: rt.clone(),
        reloader,
        enrollment,
        mesh: mesh.clone(),
    };
    admin::spawn(admin_listener, Arc::new(admin))?;
    let mut ports: Vec<u16> = cfg.inbound.iter().map(|i| i.listen.port()).collect();
    ports.extend(cfg.outbound.http_proxy.map(|a| a.port()));
    ports.extend(cfg.outbound.ports.iter().map(|p| p.listen.port()));
    crate::health::ready_when_listening(health.clone(), ports, std::time::Duration::from_secs(30));
    tracing::info!(
        inbound = ?cfg.inbound.as_ref().map(|i| i.listen),
        outbound_proxy = ?cfg.outbound.http_proxy,
        ports = cfg.outbound.ports.len(),
        admin = %cfg.admin.listen,
        "crank-proxy starting"
    );
    let drain = DrainSignal {
        health,
        deadline: cfg.drain.deadline,
    };
    let shutdown_signal: Box<dyn pingora_core::server::ShutdownSignalWatch> =
        match mesh.filter(|m| m.cfg.register.is_some()) {
            Some(mesh) => Box::new(crate::mesh::register::DeregisterFirst { mesh, drain }),
            None => Box::new(drain),
        };
    server.run(RunArgs { shutdown_signal });
    Ok(())
}

/// The read buffer of each outbound (app-facing) connection. Pingora's
/// default is 64 KiB, allocated at accept: two thirds of what a held
/// connection costs (massif, 500 slow clients: 65 of ~100 KiB each). 16 KiB
/// still takes a whole request head of the usual size in one read, and
/// bodies larger than it are read straight into Pingora's body buffer.
fn outbound_l4_buffer() -> pingora_core::protocols::l4::stream::L4BufferSettings {
    pingora_core::protocols::l4::stream::L4BufferSettings::default().read(16 * 1024)
}

/// HTTP/2 receive windows for downstream connections. The h2 default of
/// 64 KiB makes every 64 KiB of an upload wait a round trip for a window
/// update; 1 MiB per stream and 4 MiB per connection keep uploads streaming
/// while bounding what one connection can make the proxy buffer.
///
/// The header list a downstream h2 connection may send is the edge limit
/// (`limits.max_request_header_bytes`, checked for every request) plus the
/// headroom for what a calling sidecar adds, so whatever one sidecar
/// accepts at its edge, the next one's inbound side accepts too.
fn h2_options(
    limits: &crank_api::proxy::LimitsConfig,
) -> pingora_core::protocols::http::v2::server::H2Options {
    let mut o = pingora_core::protocols::http::v2::server::default_h2_options();
    o.initial_window_size(1 << 20);
    o.initial_connection_window_size(4 << 20);
    let list = limits.max_request_header_bytes + crank_api::proxy::SIDECAR_HEADER_HEADROOM;
    o.max_header_list_size(u32::try_from(list).unwrap_or(u32::MAX));
    o
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
    for (field, addr) in addrs {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            return Err(format!("{field}: cannot listen on {addr}: {e}; stop whatever holds the port or choose another"));
        }
    }
    Ok(())
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
