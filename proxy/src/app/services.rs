//! The Pingora server and its services: inbound (mTLS, in front of the
//! app), outbound (the HTTP proxy and the local ports), each behind the
//! connection cap and head deadline of [`crate::conn::Listener`], and the
//! capture listeners ([`crate::capture`]).

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use crank_api::proxy::ProxyConfig;
use pingora_core::apps::HttpServerOptions;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::services::listening::Service;
use pingora_core::services::ServiceWithDependents;
use pingora_proxy::HttpProxy;

use crate::conn::{Listener, ListenerLimits};
use crate::direction::Direction;
use crate::identity::PlaintextGuard;
use crate::request::MeshProxy;
use crate::runtime::Runtime;

/// The bootstrapped Pingora server with the configured services.
pub(super) fn server(cfg: &ProxyConfig, rt: &Arc<Runtime>) -> std::io::Result<Server> {
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
    let all_open = Arc::new(AtomicUsize::new(0));
    crate::conn::spawn_trimmer(all_open.clone())?;
    let mut services: Vec<Box<dyn ServiceWithDependents>> = Vec::new();
    if let Some(inb) = &cfg.inbound {
        services.push(Box::new(inbound(cfg, inb, rt, &conf, &all_open)));
    }
    let out = &cfg.outbound;
    if out.http_proxy.is_some() || !out.ports.is_empty() {
        services.push(Box::new(outbound(cfg, rt, &conf, &all_open)));
    }
    if !out.tcp.is_empty() {
        services.push(Box::new(crate::tunnel::outbound_ports(cfg, rt)));
    }
    if let Some(c) = &cfg.capture {
        services.extend(capture(cfg, c, rt, &conf, &all_open));
    }
    server.add_services(services);
    Ok(server)
}

/// The capture listeners: outbound on loopback (the app's redirected
/// connects; captured HTTP goes into its own outbound HTTP path), and
/// inbound on every address when `capture.inbound_ports` is set.
fn capture(
    cfg: &ProxyConfig,
    c: &crank_api::proxy::CaptureConfig,
    rt: &Arc<Runtime>,
    conf: &Arc<ServerConf>,
    all_open: &Arc<AtomicUsize>,
) -> Vec<Box<dyn ServiceWithDependents>> {
    use crate::capture::{config, listen::CaptureApp, metrics::CaptureMetrics};
    let metrics = CaptureMetrics::new(&rt.metrics.registry);
    let app = MeshProxy {
        direction: Direction::Outbound,
        rt: rt.clone(),
        app: None,
    };
    let max = cfg.limits.outbound_max_connections;
    let http = Listener::new(
        http_proxy(app, cfg, conf, true),
        limits(cfg, rt, "outbound", max, all_open),
    );
    let c = Arc::new(c.clone());
    let app = |direction, http| CaptureApp {
        direction,
        rt: rt.clone(),
        cfg: c.clone(),
        metrics: metrics.clone(),
        http,
    };
    let mut out: Vec<Box<dyn ServiceWithDependents>> = Vec::new();
    let mut svc = Service::new(
        "crank capture outbound".into(),
        app(Direction::Outbound, Some(Arc::new(http))),
    );
    for a in config::outbound_addrs(&c) {
        svc.add_listener(capture_listener(a));
    }
    out.push(Box::new(svc));
    let inbound = config::inbound_addrs(&c);
    if !inbound.is_empty() {
        let mut svc = Service::new(
            "crank capture inbound".into(),
            app(Direction::Inbound, None),
        );
        for a in inbound {
            svc.add_listener(capture_listener(a));
        }
        out.push(Box::new(svc));
    }
    out
}

/// A capture listener on `addr`; an IPv6 one takes IPv6 only, so it can
/// share its port with the IPv4 one.
fn capture_listener(addr: std::net::SocketAddr) -> pingora_core::listeners::ListenerConfig {
    let l = pingora_core::listeners::ListenerConfig::tcp(addr.to_string())
        .l4_buffer(outbound_l4_buffer());
    if !addr.is_ipv6() {
        return l;
    }
    let mut opts = pingora_core::listeners::TcpSocketOptions::default();
    opts.ipv6_only = Some(true);
    l.tcp_socket_options(opts)
}

/// The caps and deadlines of one direction's listener.
fn limits(
    cfg: &ProxyConfig,
    rt: &Runtime,
    direction: &'static str,
    max_connections: usize,
    all_open: &Arc<AtomicUsize>,
) -> ListenerLimits {
    let metrics = &rt.metrics;
    ListenerLimits {
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
    }
}

type MeshService = Service<Listener<HttpProxy<MeshProxy>>>;

/// Peer sidecars → the local app, over mTLS (TLS 1.3, client certificates
/// verified, plaintext refused before the handshake).
fn inbound(
    cfg: &ProxyConfig,
    inb: &crank_api::proxy::InboundConfig,
    rt: &Arc<Runtime>,
    conf: &Arc<ServerConf>,
    all_open: &Arc<AtomicUsize>,
) -> MeshService {
    let app = MeshProxy {
        direction: Direction::Inbound,
        rt: rt.clone(),
        app: Some((inb.app, inb.app_protocol)),
    };
    let proxy = http_proxy(app, cfg, conf, false);
    let max = cfg.limits.inbound_max_connections;
    let mut listener = Listener::new(proxy, limits(cfg, rt, "inbound", max, all_open));
    if !inb.tcp.is_empty() {
        // Opaque TCP tunnels arrive on the same port (first byte NUL).
        let tunnel = crate::tunnel::InboundTunnel::new(rt.clone());
        listener = listener.with_divert(Arc::new(tunnel));
    }
    let mut svc = Service::new("crank inbound".into(), listener);
    let settings = rt.tls.server_settings(&rt.metrics);
    svc.add_tls_with_settings(&inb.listen.to_string(), None, settings);
    svc.endpoints()
        .set_pre_tls_callback(Arc::new(PlaintextGuard {
            failures: rt.metrics.handshake_failures.clone(),
            identity: rt.me.spiffe_id.clone(),
        }));
    svc
}

/// The local app → the mesh: the HTTP proxy and the local ports, plain
/// HTTP/1.1 or h2c.
fn outbound(
    cfg: &ProxyConfig,
    rt: &Arc<Runtime>,
    conf: &Arc<ServerConf>,
    all_open: &Arc<AtomicUsize>,
) -> MeshService {
    let app = MeshProxy {
        direction: Direction::Outbound,
        rt: rt.clone(),
        app: None,
    };
    let proxy = http_proxy(app, cfg, conf, true);
    let max = cfg.limits.outbound_max_connections;
    let listener = Listener::new(proxy, limits(cfg, rt, "outbound", max, all_open));
    let mut svc = Service::new("crank outbound".into(), listener);
    let out = &cfg.outbound;
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
    svc
}

/// Pingora's HTTP proxy app around `app`: the h2 windows and header list,
/// the idle timeout of h2 connections, and (outbound) h2c.
fn http_proxy(
    app: MeshProxy,
    cfg: &ProxyConfig,
    conf: &Arc<ServerConf>,
    h2c: bool,
) -> HttpProxy<MeshProxy> {
    let mut proxy = HttpProxy::new(app, conf.clone());
    proxy.handle_init_modules();
    let mut opts = HttpServerOptions::default();
    opts.h2c = h2c;
    opts.h2_idle_timeout = Some(cfg.limits.idle_timeout);
    proxy.server_options = Some(opts);
    proxy.h2_options = Some(h2_options(&cfg.limits));
    proxy
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
