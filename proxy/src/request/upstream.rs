//! Where an attempt goes and what it carries: the local app (inbound) or
//! an endpoint of the route over mTLS (outbound), with timeouts cut to the
//! route's deadline; and the headers the next hop gets.

use std::sync::Arc;
use std::time::Duration;

use crank_api::proxy::AppProtocol;
use pingora_core::upstreams::peer::{HttpPeer, Peer};
use pingora_error::{Error, ErrorType, Result};
use pingora_http::RequestHeader;
use pingora_proxy::Session;

use super::{Ctx, MeshProxy};
use crate::direction::Direction;
use crate::headers::{CAPABILITY_HEADER, CLIENT_ID_HEADER};

impl MeshProxy {
    /// The peer of this attempt, with its timeouts.
    pub(crate) async fn peer(&self, session: &Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let mut peer = match self.direction {
            Direction::Inbound => self.app_peer(session.req_header())?,
            Direction::Outbound => self.endpoint_peer(session.is_upgrade_req(), ctx).await?,
        };
        let timeouts = &self.rt.config.load().timeouts;
        let connect = self.attempt_timeout(ctx, timeouts.connect);
        peer.options.connection_timeout = Some(connect);
        peer.options.total_connection_timeout = Some(connect);
        peer.options.read_timeout = Some(self.attempt_timeout(ctx, timeouts.upstream_read));
        peer.options.write_timeout = peer.options.read_timeout;
        peer.options.idle_timeout = Some(Duration::from_secs(90));
        ctx.upstream = peer.address().as_inet().copied();
        Ok(Box::new(peer))
    }

    /// Inbound: the local app; h2c for gRPC (or as configured), else HTTP/1.1.
    fn app_peer(&self, req: &RequestHeader) -> Result<HttpPeer> {
        let (addr, proto) = self
            .app
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "inbound without app"))?;
        let mut peer = HttpPeer::new(addr, false, String::new());
        if wants_h2c(proto, req) {
            peer.options.set_http_version(2, 2);
            peer.options.max_h2_streams = 128;
        } else {
            peer.options.set_http_version(1, 1);
        }
        Ok(peer)
    }

    /// Outbound: an endpoint of the route, over mTLS with our client
    /// certificate, the bundle as CA and the endpoint's identity as SNI.
    async fn endpoint_peer(&self, upgrade: bool, ctx: &mut Ctx) -> Result<HttpPeer> {
        let route = ctx
            .route
            .clone()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no route chosen"))?;
        let idx = self.next_endpoint(ctx, &route).await?;
        if let Some(dest) = &route.egress {
            return egress_peer(dest).await;
        }
        let ep = &route.endpoints[idx];
        ctx.endpoint_identity = Some(Arc::clone(&ep.spiffe_id));
        let tls = &self.rt.tls;
        // Read before the TLS state the peer is built from: a change after
        // it makes the next request build again.
        let epoch = tls.peer_epoch();
        let mut peer = ep.peer.get_or_build(epoch, || {
            let mut peer = HttpPeer::new(ep.address, true, ep.server_name.clone());
            peer.client_cert_key = Some(tls.client_cert());
            peer.options.ca = Some(tls.bundle());
            // Pingora's pool key covers the client cert but not the roots:
            // a new root or deny-list generation starts a new pool.
            peer.group_key = tls.pool_key(&ep.address);
            peer.options.set_http_version(2, 1);
            peer.options.max_h2_streams = 128;
            peer
        });
        if upgrade {
            // WebSocket and other upgrades need HTTP/1.1 between sidecars.
            peer.options.set_http_version(1, 1);
        }
        Ok(peer)
    }

    /// The headers the next hop gets: trace context, the verified caller
    /// (inbound) or the route's capability in origin form (outbound).
    pub(crate) fn next_hop_headers(&self, req: &mut RequestHeader, ctx: &Ctx) -> Result<()> {
        req.remove_header(CLIENT_ID_HEADER);
        if let Some(hop) = &ctx.hop {
            // This hop takes part in the trace: the next hop's parent is
            // this span. Without tracing the headers pass untouched.
            req.insert_header("traceparent", &*hop.traceparent())?;
            req.remove_header("tracestate");
            if let Some(ts) = &hop.tracestate {
                req.insert_header("tracestate", ts.as_str())?;
            }
        }
        match self.direction {
            Direction::Inbound => {
                if let Some(peer) = &ctx.peer {
                    req.insert_header(CLIENT_ID_HEADER, peer.spiffe_id.as_str())?;
                }
            }
            Direction::Outbound => {
                crate::routing::authority::to_origin_form(req)?;
                req.remove_header(CAPABILITY_HEADER);
                let route = ctx.route.as_ref();
                match route.and_then(|r| r.egress.as_ref()) {
                    // Outside the mesh: the destination's own name as
                    // `Host` (a pass-through keeps the caller's).
                    Some(d) if d.name != crate::egress::UNDECLARED_ROUTE => {
                        req.insert_header(http::header::HOST, d.address.as_str())?;
                    }
                    Some(_) => {
                        req.append_header(http::header::VIA, crate::egress::VIA)?;
                    }
                    None => {
                        if let Some(cap) = route.and_then(|r| r.capability.as_deref()) {
                            req.insert_header(CAPABILITY_HEADER, cap)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Outbound to a destination outside the mesh: its address now (a DNS
/// name is resolved at each attempt) in the peer built at load, which
/// carries the destination's CA and no client certificate.
async fn egress_peer(dest: &crate::egress::Destination) -> Result<HttpPeer> {
    let addr = dest.resolve().await.map_err(|e| {
        Error::explain(
            ErrorType::ConnectNoRoute,
            format!("egress destination {}: {e}", dest.name),
        )
    })?;
    Ok(dest.peer(addr))
}

/// Whether to speak h2c to the local app for this request.
pub fn wants_h2c(proto: AppProtocol, req: &RequestHeader) -> bool {
    match proto {
        AppProtocol::H2c => true,
        AppProtocol::Http1 => false,
        AppProtocol::Auto => is_grpc(req),
    }
}

/// gRPC requests say so in their content type.
pub fn is_grpc(req: &RequestHeader) -> bool {
    req.headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, ctype: Option<&str>) -> RequestHeader {
        let mut r = RequestHeader::build("GET", uri.as_bytes(), None).unwrap();
        if let Some(c) = ctype {
            r.insert_header("content-type", c).unwrap();
        }
        r
    }

    #[test]
    fn h2c_choice() {
        let grpc = req("/svc/M", Some("application/grpc+proto"));
        let plain = req("/", Some("application/json"));
        assert!(wants_h2c(AppProtocol::Auto, &grpc));
        assert!(!wants_h2c(AppProtocol::Auto, &plain));
        assert!(wants_h2c(AppProtocol::H2c, &plain));
        assert!(!wants_h2c(AppProtocol::Http1, &grpc));
    }
}
