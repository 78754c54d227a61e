//! Opaque TCP through the mesh (`docs/reference/opaque-tcp.md`).
//!
//! Outbound ([`outbound`]): an app's TCP connection (from an
//! `outbound.tcp` port, or handed over by the capture listener with the
//! bytes it read while detecting the protocol) goes over mTLS to the
//! sidecar serving its capability, with our client certificate and the
//! peer's identity checked as for HTTP. The first bytes are a small
//! header ([`header`]): the original destination and the capability. The
//! peer answers with one reply frame, then both sidecars splice
//! ([`splice`]).
//!
//! Inbound ([`InboundTunnel`]): the inbound mTLS listener hands a tunnel
//! over by its first byte ([`crate::conn::Divert`]); the peer's verified
//! identity, `inbound.tcp` (which local server) and the connection-level
//! policy (`input.connection`) decide, then the sidecar connects to the
//! local server and splices.
//!
//! Each tunnel writes one access log line (`crank::access`, `kind: tcp`)
//! and counts in `crank_tcp_*` ([`metrics`], kept in the `metrics` leaf).
//!
//! [`policy`] is the one connection-level policy decision, for tunnels
//! and for the capture listeners above (which use it from here, so the
//! tunnel never goes up to capture).

pub mod header;
mod inbound;
mod outbound;
pub mod policy;
pub mod splice;

use std::net::SocketAddr;
use std::time::Instant;

use prometheus::IntGauge;

pub use self::inbound::InboundTunnel;
pub use self::outbound::{outbound, OutboundPorts, TunnelTarget};
pub use self::splice::{CloseReason, Spliced};

pub use crate::metrics::tunnel as metrics;
use crate::runtime::Runtime;

/// How a tunnel ended, for the caller (the capture listener's tests and
/// logs): its outcome label and the bytes each way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// A close reason (`closed`, `idle-timeout`, ...) or why it never
    /// opened (`no-route`, `policy-denied`, `limit`, ...).
    pub outcome: &'static str,
    pub sent: u64,
    pub received: u64,
}

/// A slot under `tunnel.max_connections`; dropping it frees the slot.
/// Tunnels and the capture listener's direct forwards share the limit.
pub(crate) struct Slot(IntGauge);

impl Slot {
    /// A slot of `direction`, or `None` when it holds its maximum.
    pub(crate) fn take(rt: &Runtime, direction: &str) -> Option<Slot> {
        let max = rt.config.load().tunnel.max_connections;
        let gauge = rt.metrics.tunnel.open.with_label_values(&[direction]);
        gauge.inc();
        if usize::try_from(gauge.get()).unwrap_or(usize::MAX) > max {
            gauge.dec();
            return None;
        }
        Some(Slot(gauge))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One tunnel's (or direct forward's) facts for its access log line and
/// metrics.
pub(crate) struct Record<'a> {
    rt: &'a Runtime,
    direction: &'static str,
    started: Instant,
    /// The calling workload (inbound: the verified peer; outbound: us).
    pub(crate) source: Option<String>,
    /// The serving workload (outbound: the endpoint's identity; inbound: us).
    pub(crate) destination: Option<String>,
    pub(crate) original_destination: Option<SocketAddr>,
    pub(crate) capability: Option<String>,
    /// Where the bytes went: the peer sidecar or the local server.
    pub(crate) upstream: Option<SocketAddr>,
    /// A captured connection forwarded without a tunnel: why
    /// (`egress`, `undeclared`, `local`, `inbound-plaintext`); `None` for
    /// a tunnel.
    pub(crate) forward: Option<&'static str>,
}

impl<'a> Record<'a> {
    pub(crate) fn new(rt: &'a Runtime, direction: &'static str) -> Self {
        Record {
            rt,
            direction,
            started: Instant::now(),
            source: None,
            destination: None,
            original_destination: None,
            capability: None,
            upstream: None,
            forward: None,
        }
    }

    /// Logs and counts the tunnel's end. `detail` says why it was refused.
    pub(crate) fn finish(
        self,
        outcome: &'static str,
        sent: u64,
        received: u64,
        detail: &str,
    ) -> Ended {
        let m = &self.rt.metrics.tunnel;
        let cap = self.capability.as_deref().unwrap_or("");
        m.connections
            .with_label_values(&[self.direction, cap, outcome])
            .inc();
        m.bytes
            .with_label_values(&[self.direction, "sent"])
            .inc_by(sent);
        m.bytes
            .with_label_values(&[self.direction, "received"])
            .inc_by(received);
        let elapsed = self.started.elapsed();
        m.duration
            .with_label_values(&[self.direction])
            .observe(elapsed.as_secs_f64());
        if self.rt.access_log {
            tracing::info!(
                target: "crank::access",
                kind = "tcp",
                direction = self.direction,
                source = self.source.as_deref(),
                destination = self.destination.as_deref(),
                original_destination = self.original_destination.map(|a| a.to_string()),
                capability = self.capability.as_deref(),
                upstream = self.upstream.map(|a| a.to_string()),
                forward = self.forward,
                bytes_sent = sent,
                bytes_received = received,
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                close_reason = outcome,
                detail = (!detail.is_empty()).then_some(detail),
            );
        }
        Ended {
            outcome,
            sent,
            received,
        }
    }
}

/// The `outbound.tcp` listeners, one Pingora service.
pub fn outbound_ports(
    cfg: &crank_api::proxy::ProxyConfig,
    rt: &std::sync::Arc<Runtime>,
) -> pingora_core::services::listening::Service<OutboundPorts> {
    let app = OutboundPorts { rt: rt.clone() };
    let mut svc = pingora_core::services::listening::Service::new("crank tcp".into(), app);
    for port in &cfg.outbound.tcp {
        svc.add_tcp(&port.listen.to_string());
    }
    svc
}
