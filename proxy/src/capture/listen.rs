//! The capture listeners' app: for each connection the rules redirected,
//! its original destination, protocol detection, then
//!
//! * outbound: HTTP to a mesh destination into the outbound HTTP path
//!   (routes, retries, policy, mTLS: the same as the HTTP proxy listener);
//!   anything else meets the outbound policy ([`super::policy`]) first,
//!   then goes to a mesh destination into the opaque TCP tunnel, to an
//!   egress destination straight on, and to an undeclared destination as
//!   `egress.mode` or `capture.undeclared` says; this host's own addresses
//!   go straight on;
//! * inbound: a caller without a sidecar, allowed or refused by
//!   `capture.inbound_plaintext` and then by the inbound policy, spliced to
//!   the app on the port it dialled.
//!
//! A connection that was not redirected (someone connected to the
//! listener's port itself) is refused: proxying it to its own address
//! would loop.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use async_trait::async_trait;
use crank_api::proxy::{CapturePlaintext, CaptureUndeclared};
use pingora_core::apps::ServerApp;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{GetSocketDigest, Stream};
use pingora_core::server::ShutdownWatch;
use pingora_proxy::HttpProxy;

use super::detect::{sniff, Protocol};
use super::forward;
use super::forward::Direct;
use super::metrics::CaptureMetrics;
use super::route::{claim, classify, host_matches, local_addrs, Destination};
use crate::conn::Listener;
use crate::direction::Direction;
use crate::request::MeshProxy;
use crate::runtime::Runtime;

/// One direction's capture listener.
pub struct CaptureApp {
    pub direction: Direction,
    pub rt: Arc<Runtime>,
    pub cfg: Arc<crank_api::proxy::CaptureConfig>,
    pub metrics: CaptureMetrics,
    /// Outbound: the HTTP path captured HTTP connections go into.
    pub http: Option<Arc<Listener<HttpProxy<MeshProxy>>>>,
}

#[async_trait]
impl ServerApp for CaptureApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let dir = self.direction.as_str();
        let mut l4 = stream.into_any().downcast::<L4Stream>().ok()?;
        // SAFETY: the descriptor belongs to `l4`, which outlives the borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(l4.as_raw_fd()) };
        let digest = l4.get_socket_digest();
        let local = digest
            .as_ref()
            .and_then(|d| d.local_addr()?.as_inet().copied());
        // Conntrack answers for any tracked connection: one that was not
        // rewritten has its own local address as the "original".
        let dst = match crank_capture::original_dst(&fd) {
            Ok(d) if Some(d) != local => d,
            res => {
                let peer = digest.as_ref().and_then(|d| d.peer_addr().cloned());
                let error = res.err().map(|e| e.to_string());
                tracing::warn!(direction = dir, peer = ?peer, listener = ?local, error = ?error, "refused a connection to the capture listener that the capture rules did not redirect: a direct connect would loop; connect to the destination itself and let the rules redirect it");
                self.metrics.refused_early(dir, "not-redirected");
                return None;
            }
        };
        let skip = self.server_speaks_first(dst);
        let (protocol, outcome, seen) = match sniff(&mut *l4, skip, self.cfg.detect_timeout).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(direction = dir, %dst, error = %e, "captured connection failed during protocol detection");
                return None;
            }
        };
        self.metrics.detected(dir, protocol, outcome);
        tracing::debug!(direction = dir, %dst, protocol = protocol.as_str(), outcome = outcome.as_str(), "captured connection");
        match self.direction {
            Direction::Outbound => self.outbound(l4, dst, protocol, seen, shutdown).await,
            Direction::Inbound => self.inbound(l4, dst, protocol, seen).await,
        }
        None
    }
}

impl CaptureApp {
    async fn outbound(
        self: &Arc<Self>,
        mut l4: Box<L4Stream>,
        dst: SocketAddr,
        protocol: Protocol,
        seen: Vec<u8>,
        shutdown: &ShutdownWatch,
    ) {
        let dir = "outbound";
        let table = self.rt.routes.load_full();
        let dest = classify(&table, dst, |ip| local_addrs().contains(&ip));
        match dest {
            Destination::Mesh(_) if protocol.is_http() => {
                let Some(http) = &self.http else { return };
                if let Some(d) = l4.get_socket_digest() {
                    let inet = pingora_core::protocols::l4::socket::SocketAddr::Inet(dst);
                    let _ = d.original_dst.set(Some(inet));
                }
                l4.rewind(&seen);
                http.process_new(l4, shutdown).await;
            }
            // An egress destination is no sidecar: its bytes go straight on.
            Destination::Mesh(route) if route.egress.is_some() => {
                let label = Some(route.name.clone());
                if self.allowed(dst, None, route.egress.as_deref(), protocol) {
                    let how = Direct {
                        kind: "egress",
                        label,
                    };
                    self.count_egress(&route.name, route.egress.as_deref());
                    forward::direct(&self.rt, l4, &seen, dst, how).await;
                }
            }
            // The tunnel asks the outbound policy.
            Destination::Mesh(route) => {
                let cap = claim(&table, dst, &route);
                forward::to_mesh(&self.rt, l4, seen.into(), dst, route, cap).await;
            }
            Destination::Local if self.is_own_listener(dst) => {
                tracing::warn!(direction = dir, %dst, "refused a captured connection to the capture listener's own port: it would loop");
                self.metrics.refused(dir, "loop");
            }
            Destination::Local => {
                let how = Direct {
                    kind: "local",
                    label: None,
                };
                forward::direct(&self.rt, l4, &seen, dst, how).await;
            }
            Destination::Undeclared => self.undeclared(l4, dst, protocol, seen).await,
        }
    }

    /// A destination neither in the mesh nor this host's: `egress.mode`
    /// decides when the mesh config sets it, else `capture.undeclared`.
    async fn undeclared(
        &self,
        l4: Box<L4Stream>,
        dst: SocketAddr,
        protocol: Protocol,
        seen: Vec<u8>,
    ) {
        use crate::egress::Undeclared;
        let table = self.rt.routes.load_full();
        let mode = table.egress().mode();
        if let Some(m) = mode {
            let m = m.as_str();
            self.rt
                .metrics
                .egress
                .undeclared
                .with_label_values(&[m])
                .inc();
        }
        let pass = match table.egress().undeclared() {
            Undeclared::Uncontrolled => self.cfg.undeclared == CaptureUndeclared::Passthrough,
            Undeclared::Allow => true,
            Undeclared::Audit => {
                tracing::warn!(reason = "egress-not-declared", mode = "audit", %dst, protocol = protocol.as_str(), "passing through a captured connection to an undeclared destination outside the mesh");
                true
            }
            Undeclared::Deny => false,
        };
        if pass {
            let dest = crate::egress::Destination::undeclared(&dst.ip().to_string(), dst.port());
            let dest = dest.ok();
            if self.allowed(dst, None, dest.as_ref(), protocol) {
                let label = Some(crate::egress::UNDECLARED_ROUTE.to_string());
                let how = Direct {
                    kind: "undeclared",
                    label,
                };
                self.count_egress(crate::egress::UNDECLARED_ROUTE, dest.as_ref());
                forward::direct(&self.rt, l4, &seen, dst, how).await;
            }
            return;
        }
        tracing::warn!(direction = "outbound", %dst, protocol = protocol.as_str(), egress_mode = ?mode, "refused a captured connection to {dst}: no route or egress destination declares it (egress.mode: deny, or capture.undeclared: refuse); declare it in the mesh config's egress.yaml, add a route, or exclude it from capture (capture.exclude_outbound_cidrs)");
        self.metrics.refused("outbound", "undeclared");
    }

    /// A plain (sidecar-less) caller of the app's port `dst`:
    /// `capture.inbound_plaintext`, then the inbound policy.
    async fn inbound(&self, l4: Box<L4Stream>, dst: SocketAddr, protocol: Protocol, seen: Vec<u8>) {
        let peer = l4
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
        if self.cfg.inbound_plaintext == CapturePlaintext::Deny {
            tracing::warn!(direction = "inbound", %dst, peer = ?peer, protocol = protocol.as_str(), "refused a caller without a sidecar on a captured port (capture.inbound_plaintext: deny); callers must come through their sidecar (mTLS)");
            self.metrics.refused("inbound", "plaintext-denied");
            return;
        }
        if let Err(d) = super::policy::inbound(&self.rt, peer, dst) {
            tracing::warn!(direction = "inbound", %dst, peer = ?peer, protocol = protocol.as_str(), outcome = d.outcome, detail = %d.detail, "refused a caller without a sidecar on a captured port: the inbound policy denies it (input.connection.source is null for a caller without a sidecar)");
            self.metrics.refused("inbound", d.outcome);
            return;
        }
        let how = Direct {
            kind: "inbound-plaintext",
            label: None,
        };
        forward::direct(&self.rt, l4, &seen, dst, how).await;
    }

    /// The outbound policy on an opaque or TLS connection to `dst`; a
    /// denial is logged and counted (`crank_capture_refused_total`).
    fn allowed(
        &self,
        dst: SocketAddr,
        capability: Option<String>,
        egress: Option<&crate::egress::Destination>,
        protocol: Protocol,
    ) -> bool {
        let Err(d) = super::policy::outbound(&self.rt, Some(dst), capability, egress) else {
            return true;
        };
        tracing::warn!(direction = "outbound", %dst, protocol = protocol.as_str(), egress = egress.map(|e| e.name.as_str()), outcome = d.outcome, detail = %d.detail, "refused a captured connection: the outbound policy denies it");
        self.metrics.refused("outbound", d.outcome);
        false
    }

    /// `crank_egress_requests_total` for a connection forwarded outside
    /// the mesh (`status_class="tcp"`).
    fn count_egress(&self, route: &str, dest: Option<&crate::egress::Destination>) {
        let name = dest.map_or("undeclared", crate::egress::destination_label);
        self.rt
            .metrics
            .egress
            .requests
            .with_label_values(&[route, name, "tcp"])
            .inc();
    }

    /// Detection is skipped for a port in `capture.server_speaks_first`,
    /// and outbound for one of the `address:port` or `range:port` hosts
    /// of a route that says `server_speaks_first: true`.
    fn server_speaks_first(&self, dst: SocketAddr) -> bool {
        if self.cfg.server_speaks_first.contains(&dst.port()) {
            return true;
        }
        self.direction == Direction::Outbound
            && super::route::route_for(&self.rt.routes.load(), dst).is_some_and(|r| {
                r.cfg.server_speaks_first
                    && r.cfg.hosts.iter().any(|h| host_matches(h, dst).is_some())
            })
    }

    /// `dst` is this proxy's own outbound capture port.
    fn is_own_listener(&self, dst: SocketAddr) -> bool {
        dst.port() == self.cfg.outbound_port
    }
}
